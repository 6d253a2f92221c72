"""POST /tokenize and /detokenize (vLLM's custom tokenizer API).

/tokenize takes either ``prompt`` (text) or ``messages`` (rendered through the chat
template exactly as /v1/chat/completions renders them) and reports the token ids, their
count and the context size. /detokenize turns ids back into text.
"""

from __future__ import annotations

from typing import Any

from lmserve.entrypoints.openai.protocol_responses import DetokenizeResponse, TokenizeResponse
from lmserve.entrypoints.openai.protocol_tokenization import (DetokenizeRequest, TokenizeChatRequest,
                                                              TokenizeCompletionRequest)
from lmserve.entrypoints.openai.serving_chat import OpenAIServingChat
from lmserve.errors import InvalidRequestError


class OpenAIServingTokenization(OpenAIServingChat):
    """Shares rendering and tokenization with the chat handler (one code path)."""

    async def tokenize_request(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        self.check_model(request.model)
        if isinstance(request, TokenizeChatRequest):
            if request.continue_final_message and request.add_generation_prompt:
                raise InvalidRequestError("Cannot set both `continue_final_message` and `add_generation_prompt` "
                                          "to True.", "continue_final_message")
            text = await self.render([m.to_template_dict() for m in request.messages],
                               add_generation_prompt=request.add_generation_prompt,
                               continue_final_message=request.continue_final_message, tools=request.tools,
                               documents=request.documents, chat_template=request.chat_template,
                               chat_template_kwargs=request.chat_template_kwargs)
            param = "messages"
        else:
            text, param = request.prompt, "prompt"
        ids = await self.off_loop(self.tokenize, text, request.add_special_tokens, param)
        strs = None
        if request.return_token_strs:
            strs = list(self.require_tokenizer("return_token_strs", "Token strings").convert_ids_to_tokens(ids))
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize_request(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        tok = self.require_tokenizer("tokens", "/detokenize")

        def decode() -> str:
            self.check_token_ids(request.tokens, "tokens")
            return tok.decode(request.tokens)

        return DetokenizeResponse(prompt=await self.off_loop(decode))

    async def tokenizer_info(self) -> dict[str, Any]:
        """GET /tokenizer_info (--enable-tokenizer-info-endpoint), vLLM's shape: the tokenizer's
        init kwargs (special tokens as their text), ``tokenizer_class`` and, when the server
        has one, ``chat_template``. File paths on the server (vocab, merges, tokenizer file)
        are left out."""
        tok = self.require_tokenizer()
        config = {k: v for k, v in dict(getattr(tok, "init_kwargs", None) or {}).items()
                  if k not in ("vocab_file", "merges_file", "tokenizer_file", "tokenizer_object")}
        info = _json_safe(config)
        info["tokenizer_class"] = type(tok).__name__
        if self.options.chat_template:
            info["chat_template"] = self.options.chat_template
        return info


def _json_safe(obj: Any) -> Any:
    if hasattr(obj, "content") and isinstance(getattr(obj, "content"), str):  # AddedToken
        return obj.content
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)
