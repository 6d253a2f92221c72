"""POST /v1/chat/completions/batch (vLLM 0.32): several conversations in one request.

The body is a chat-completions body whose ``messages`` is a list of conversations. Each
conversation runs as its own chat request (the chat handler's generation path, engine id
``{request id}_{i}``), all at once; the answer is one ``chat.completion`` with choice ``i``
for conversation ``i`` and the usage summed. As vLLM: no streaming, no tools, no beam
search, ``n`` must be 1; any refusal of one conversation refuses the whole request before
anything runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from lmserve.entrypoints.openai.protocol_completions import ChatCompletionRequest
from lmserve.entrypoints.openai.protocol_responses import (ChatCompletionResponse, ChatCompletionResponseChoice,
                                                          UsageInfo)
from lmserve.entrypoints.openai.serving_chat import OpenAIServingChat
from lmserve.entrypoints.openai.serving_engine import until_disconnected
from lmserve.errors import InvalidRequestError


def split_batch(body: dict[str, Any], parse: Callable[[dict[str, Any]], ChatCompletionRequest]
                ) -> list[ChatCompletionRequest]:
    """One chat request per conversation of a batch body, each validated by ``parse``."""
    conversations = body.get("messages")
    if not isinstance(conversations, list) or not conversations or \
            not all(isinstance(c, list) and c for c in conversations):
        raise InvalidRequestError("messages must be a non-empty list of conversations, each a non-empty list of "
                                  "messages.", "messages")
    for field, ok, why in (("stream", lambda v: not v, "Batch chat completions do not support streaming."),
                           ("tools", lambda v: not v, "Batch chat completions do not support tools."),
                           ("use_beam_search", lambda v: not v, "Batch chat completions do not support beam "
                                                                "search. Please set `use_beam_search` to False."),
                           ("n", lambda v: v in (None, 1), "Batch chat completions support only n=1."),
                           ("tool_choice", lambda v: v in (None, "none"), "Batch chat completions do not support "
                                                                          "tools.")):
        if not ok(body.get(field)):
            raise InvalidRequestError(why, field)
    return [parse({**body, "messages": conv}) for conv in conversations]


class OpenAIServingChatBatch:
    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat

    async def create_batch_chat_completion(self, requests: list[ChatCompletionRequest], request_id: str,
                                           raw_request: Request | None) -> ChatCompletionResponse | None:
        self.chat.check_fanout(len(requests), "messages")
        started = []
        try:
            for i, req in enumerate(requests):
                started.append(await self.chat.start_generation(req, f"{request_id}_{i}"))
        except BaseException:
            for _, _, merger in started:
                await merger.aclose()
            raise
        created = int(time.time())

        async def answer_all() -> ChatCompletionResponse:
            results = await asyncio.gather(*(self.chat.full_response(req, request_id, created, prompt, merger)
                                             for req, (prompt, _, merger) in zip(requests, started)))
            choices: list[ChatCompletionResponseChoice] = []
            usage = UsageInfo()
            for i, res in enumerate(results):
                choices.append(res.choices[0].model_copy(update={"index": i}))
                usage.prompt_tokens += res.usage.prompt_tokens
                usage.completion_tokens += res.usage.completion_tokens
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            return ChatCompletionResponse(id=request_id, created=created, model=self.chat.model_name,
                                          choices=choices, usage=usage)

        class _CloseAll:
            async def aclose(self) -> None:
                for _, _, merger in started:
                    await merger.aclose()

        return await until_disconnected(raw_request, answer_all(), cleanup=_CloseAll())
