"""The routes beyond completions/chat/pooling: the Responses API, Anthropic's Messages API,
batch chat, /tokenizer_info (behind --enable-tokenizer-info-endpoint) and, with
``VLLM_SERVER_DEV_MODE=1`` in the environment (as vLLM gates them), the development routes
/reset_prefix_cache, /reset_mm_cache, /reset_encoder_cache (no such caches: 200), /server_info,
/sleep, /wake_up, /is_sleeping, /release_kv_cache_memory and /collective_rpc (refused).

Errors on /v1/messages* are Anthropic-shaped; everywhere else OpenAI-shaped (the app's
exception handlers).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Query, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from lmserve.engine import sleep_mode
from lmserve.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from lmserve.entrypoints.anthropic.serving import anthropic_error
from lmserve.entrypoints.openai.responses.protocol import ResponsesRequest
from lmserve.entrypoints.openai.serving_batch_chat import split_batch
from lmserve.entrypoints.openai.protocol_common import check_request_id
from lmserve.entrypoints.openai.protocol_completions import ChatCompletionRequest
from lmserve.errors import InvalidRequestError, LMServeError

logger = logging.getLogger("lmserve.server")


def dev_mode_enabled(environ: dict[str, str] | None = None) -> bool:
    return (environ if environ is not None else os.environ).get("VLLM_SERVER_DEV_MODE", "0") == "1"


def _answer(result: Any) -> Any:
    if result is None:  # the client went away before the answer was ready
        return Response(status_code=499)
    if isinstance(result, Response):
        return result
    return JSONResponse(result if isinstance(result, dict) else result.model_dump())


def add_api_routes(app: FastAPI, state: Any, parse: Callable[[dict[str, Any], type], Any],
                   base_request_id: Callable[[Request, str, bool], str]) -> None:
    """Adds the routes; ``state`` is the app's ``ServerState``, ``parse`` and ``base_request_id``
    the app's body parser and request-id rule (passed in: this module is imported by the app)."""
    _add_responses_routes(app, state)
    _add_anthropic_routes(app, state)

    @app.post("/v1/chat/completions/batch")
    async def batch_chat(body: dict[str, Any], raw: Request) -> Any:
        handler = state.ready().get("batch_chat", "Chat Completions API")
        requests = split_batch(body, lambda one: parse(one, ChatCompletionRequest))
        state.log_ignored(requests[0])
        rid = base_request_id(raw, requests[0].request_id, "request_id" in body)
        return _answer(await handler.create_batch_chat_completion(requests, f"chatcmpl-{rid}", raw))

    if getattr(state.args, "enable_tokenizer_info_endpoint", False):
        @app.get("/tokenizer_info")
        async def tokenizer_info() -> Any:
            return JSONResponse(await state.ready().tokenization.tokenizer_info())

    if dev_mode_enabled():
        logger.warning("SECURITY WARNING: Development endpoints are enabled (VLLM_SERVER_DEV_MODE=1)! "
                       "This should NOT be used in production!")
        _add_dev_routes(app, state)


# ---------------------------------------------------------------------- responses
def _add_responses_routes(app: FastAPI, state: Any) -> None:
    @app.post("/v1/responses")
    async def create_responses(request: ResponsesRequest, raw: Request) -> Any:
        handler = state.ready().get("responses", "Responses API")
        state.log_ignored(request)
        check_request_id(request.request_id)
        raw.state.request_id = request.request_id
        return _answer(await handler.create_responses(request, raw))

    @app.get("/v1/responses/{response_id}")
    async def retrieve_responses(response_id: str, stream: bool | None = None,
                                 starting_after: int | None = None) -> Any:
        handler = state.ready().get("responses", "Responses API")
        if starting_after is not None and not stream:
            raise InvalidRequestError("starting_after applies to stream=true only.", "starting_after")
        return _answer(handler.retrieve(response_id, stream, starting_after))

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_responses(response_id: str) -> Any:
        handler = state.ready().get("responses", "Responses API")
        return JSONResponse(await handler.cancel(response_id))


# ---------------------------------------------------------------------- anthropic
async def _anthropic_body(raw: Request, model: type) -> Any:
    try:
        body = json.loads(await raw.body())
    except ValueError:
        raise InvalidRequestError("Invalid JSON body: the body could not be parsed.") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        parts = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        raise InvalidRequestError("; ".join(parts) or "Invalid request") from None


def _add_anthropic_routes(app: FastAPI, state: Any) -> None:
    @app.post("/v1/messages")
    async def create_messages(raw: Request) -> Any:
        try:
            handler = state.ready().get("messages", "Messages API")
            request = await _anthropic_body(raw, AnthropicMessagesRequest)
            state.log_ignored(request)
            return _answer(await handler.create_messages(request, raw))
        except LMServeError as e:
            return anthropic_error(e)
        except ValueError as e:
            return anthropic_error(InvalidRequestError(str(e)))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(raw: Request) -> Any:
        try:
            handler = state.ready().get("messages", "Messages API")
            request = await _anthropic_body(raw, AnthropicCountTokensRequest)
            state.log_ignored(request)
            return JSONResponse(await handler.count_tokens(request))
        except LMServeError as e:
            return anthropic_error(e)
        except ValueError as e:
            return anthropic_error(InvalidRequestError(str(e)))


# ---------------------------------------------------------------------- dev mode
def _add_dev_routes(app: FastAPI, state: Any) -> None:
    def engine() -> Any:
        state.ready()
        return state.engine

    def sleep_enabled() -> None:
        if not getattr(state.args, "enable_sleep_mode", False):
            raise InvalidRequestError("Sleep mode is not enabled: start the server with --enable-sleep-mode.")

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(reset_running_requests: bool = Query(default=False),
                                 reset_external: bool = Query(default=False)) -> Any:
        if reset_running_requests or reset_external:
            raise InvalidRequestError("reset_running_requests and reset_external are not supported: the prefix "
                                      "cache is reset only when no request holds blocks, and there is no "
                                      "external cache.", "reset_running_requests" if reset_running_requests
                                      else "reset_external")
        logger.info("Resetting prefix cache...")
        success = await engine().call_in_engine(sleep_mode.reset_prefix_cache)
        return JSONResponse({"success": bool(success)})

    @app.get("/server_info")
    async def server_info(config_format: str = Query(default="text")) -> Any:
        if config_format not in ("text", "json"):
            raise InvalidRequestError("config_format must be 'text' or 'json'.", "config_format")
        config = engine().engine_config
        if config_format == "text":
            shown: Any = str(config)
        else:  # the engine config's dataclasses as JSON (torch dtypes and the like as strings)
            shown = json.loads(json.dumps(dataclasses.asdict(config) if dataclasses.is_dataclass(config)
                                          else vars(config), default=str))
        return JSONResponse({
            "vllm_config": shown,
            "vllm_env": {k: v for k, v in sorted(os.environ.items())
                         if (k.startswith("VLLM_") or k.startswith("LMSERVE_")) and "KEY" not in k},
            "system_env": {"python": sys.version.split()[0], "platform": platform.platform(),
                           "machine": platform.machine(), "cpu_count": os.cpu_count()}})

    @app.post("/sleep")
    async def sleep(level: int = Query(default=1, ge=0, le=2), mode: str = Query(default="abort")) -> Any:
        sleep_enabled()
        if mode != "abort":
            raise InvalidRequestError(f"sleep mode {mode!r} is not supported: in-flight requests are aborted "
                                      "(mode=abort).", "mode")
        await engine().call_in_engine(functools.partial(sleep_mode.sleep, level=level))  # picklable (DP)
        return JSONResponse({"status": "sleeping", "level": level})

    @app.post("/wake_up")
    async def wake_up(raw: Request) -> Any:
        sleep_enabled()
        tags = raw.query_params.getlist("tags") or None
        awake = await engine().call_in_engine(functools.partial(sleep_mode.wake_up, tags=tags))
        return JSONResponse({"status": "awake" if awake else "sleeping", "tags": tags})

    @app.post("/release_kv_cache_memory")
    async def release_kv_cache_memory() -> Any:
        sleep_enabled()
        await engine().call_in_engine(sleep_mode.release_kv_cache_memory)
        return JSONResponse({"status": "kv_cache_released"})

    @app.post("/reset_mm_cache")
    async def reset_mm_cache() -> Response:
        """lmserve serves text-only models: there is no multimodal cache, so nothing to reset."""
        return Response(status_code=200)

    @app.post("/reset_encoder_cache")
    async def reset_encoder_cache() -> Response:
        """No encoder cache exists (text-only models): nothing to reset."""
        return Response(status_code=200)

    @app.post("/collective_rpc")
    async def collective_rpc() -> Any:
        raise InvalidRequestError("collective_rpc is not supported: lmserve runs one engine in the server "
                                  "process, with no worker processes to call.")

    @app.get("/is_sleeping")
    async def is_sleeping() -> Any:
        return JSONResponse({"is_sleeping": sleep_mode.is_sleeping(engine())})
