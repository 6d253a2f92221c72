"""POST /score, /v1/score and /rerank, /v1/rerank, /v2/rerank (vLLM's Score and Re-rank APIs).

Both score pairs: /score pairs ``text_1`` with ``text_2`` (1-1, 1-N, N-N), /rerank pairs the
``query`` with each document. A cross-encoder scores each pair as one prompt; an embedding
model scores it as the cosine similarity of the two embeddings (each distinct text is
embedded once). ``score_utils`` holds the pairing rules, shared with ``LLM.score``.

Rerank results are sorted by relevance, best first (ties keep the documents' order); each
keeps its document's original ``index``; ``top_n`` > 0 keeps the first ``top_n``.
Usage counts the tokens of every pair (for an embedding model, both prompts and a pad token,
as vLLM).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request

from lmserve.entrypoints.openai.protocol_pooling import (RerankDocument, RerankRequest, RerankResponse,
                                                         RerankResult, RerankUsage, ScoreRequest,
                                                         ScoreResponse, ScoreResponseData)
from lmserve.entrypoints.openai.serving_pooling_base import (OpenAIServingPoolingBase, PoolingPrompt,
                                                             pooling_usage)
from lmserve.entrypoints.score_utils import (cross_encoder_prompt, dedup_inputs, embedding_pair_scores,
                                             score_mode, validate_score_input)
from lmserve.errors import InvalidRequestError
from lmserve.outputs import PoolingRequestOutput, ScoringOutput
from lmserve.pooling_params import PoolingParams


class ServingScores(OpenAIServingPoolingBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode = score_mode(self.model_config)  # "cross_encoder" | "embedding"

    # ------------------------------------------------------------------ entries
    async def create_score(self, request: ScoreRequest, request_id: str,
                           raw_request: Request | None) -> ScoreResponse | None:
        """The response, or None when the client went away first."""
        self.check_model(request.model)
        request.validate_request()
        texts_1, texts_2 = self._pairs(request.text_1, request.text_2, "text_1", "text_2")
        created = int(time.time())
        outs = await self._score(texts_1, texts_2, request, request_id, raw_request, ("text_1", "text_2"))
        if outs is None:
            return None
        data = [ScoreResponseData(index=i, score=ScoringOutput.from_base(o.outputs).score)
                for i, o in enumerate(outs)]
        return ScoreResponse(id=request_id, created=created, model=self.model_name, data=data,
                             usage=pooling_usage(outs))

    async def do_rerank(self, request: RerankRequest, request_id: str,
                        raw_request: Request | None) -> RerankResponse | None:
        """The response, or None when the client went away first."""
        self.check_model(request.model)
        request.validate_request()
        documents = request.document_texts()
        texts_1, texts_2 = self._pairs(request.query, documents, "query", "documents")
        outs = await self._score(texts_1, texts_2, request, request_id, raw_request, ("query", "documents"))
        if outs is None:
            return None
        results = [RerankResult(index=i, relevance_score=ScoringOutput.from_base(o.outputs).score,
                                document=RerankDocument(text=documents[i]) if request.return_documents else None)
                   for i, o in enumerate(outs)]
        results.sort(key=lambda r: r.relevance_score, reverse=True)  # stable: ties keep document order
        if 0 < request.top_n < len(results):
            results = results[:request.top_n]
        return RerankResponse(id=request_id, model=self.model_name, results=results,
                              usage=RerankUsage(total_tokens=sum(len(o.prompt_token_ids) for o in outs)))

    # ------------------------------------------------------------------ scoring
    @staticmethod
    def _pairs(data_1: Any, data_2: Any, param_1: str, param_2: str) -> tuple[list[str], list[str]]:
        try:
            return validate_score_input(data_1, data_2)
        except ValueError as e:
            raise InvalidRequestError(str(e), param_2 if "text_pair" in str(e) or "lengths" in str(e)
                                      else param_1) from e

    def _check_chars(self, n_chars: int, param: str) -> None:
        """Refuses without tokenizing a pair that certainly holds more tokens than the context."""
        limit = self._max_token_bytes
        if limit and n_chars > self.max_model_len * limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"{param} is {n_chars} characters long, which is more than that many tokens can hold. "
                "Please reduce the length of the input, or set truncate_prompt_tokens.", param)

    async def _score(self, texts_1: list[str], texts_2: list[str], request: ScoreRequest | RerankRequest,
                     request_id: str, raw_request: Request | None,
                     params_names: tuple[str, str]) -> list[PoolingRequestOutput] | None:
        """One output per pair, in order, whose data is the pair's score."""
        self.check_fanout(len(texts_1), params_names[1])
        max_length = self.max_length(request)
        param_2 = params_names[1]
        if self.mode == "cross_encoder":
            params = self.verify_params(request.to_pooling_params("score"), request)
            prompts = await self.off_loop(self._pair_prompts, texts_1, texts_2, max_length, param_2)
            return await self.encode_all(prompts, params, request_id, request, raw_request)
        # An embedding model: activation flags do not apply to the embeddings being compared.
        params = self.verify_params(PoolingParams(task="embed"), request)
        unique, pos_1, pos_2 = dedup_inputs(texts_1, texts_2)
        last_1 = max(pos_1)  # side-1 texts come first among the unique ones
        prompts = await self.off_loop(self._text_prompts, unique, last_1, max_length, params_names)
        embeds = await self.encode_all(prompts, params, request_id, request, raw_request)
        if embeds is None:
            return None
        return embedding_pair_scores([embeds[i] for i in pos_1], [embeds[j] for j in pos_2],
                                     getattr(self.require_tokenizer(), "pad_token_id", None))

    def _pair_prompts(self, texts_1: list[str], texts_2: list[str], max_length: int | None,
                      param: str) -> list[PoolingPrompt]:
        """Cross-encoder prompts of the pairs (runs on the worker thread)."""
        tok = self.require_tokenizer()
        prompts = []
        for a, b in zip(texts_1, texts_2):
            self.check_text(a, param, check_length=False)
            self.check_text(b, param, check_length=False)
            if max_length is None:
                self._check_chars(len(a) + len(b), param)
            p = cross_encoder_prompt(tok, a, b, max_length)
            prompt = PoolingPrompt(p["prompt_token_ids"], p["prompt"], p.get("token_type_ids"))
            self.check_length(len(prompt.token_ids), "score", param)
            prompts.append(prompt)
        return prompts

    def _text_prompts(self, unique: list[str], last_1: int, max_length: int | None,
                      params_names: tuple[str, str]) -> list[PoolingPrompt]:
        """One prompt per distinct text (runs on the worker thread)."""
        prompts = []
        for j, text in enumerate(unique):
            param = params_names[0] if j <= last_1 else params_names[1]
            prompt = PoolingPrompt(self.tokenize_text(text, True, max_length, param), text)
            self.check_length(len(prompt.token_ids), "score", param)
            prompts.append(prompt)
        return prompts
