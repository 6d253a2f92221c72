"""The FastAPI app: routes, auth, request ids, CORS, and the one place where exceptions
become HTTP responses (``{"error": {"message", "type", "param", "code"}}``).

``build_app(args, engine)`` makes an app from the serve flags; ``engine`` may be None and
set later (``ServerState.set_engine``): until then every route but /health, /ping and
/metrics answers 503. No module-level mutable state: everything hangs off ``app.state``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from lmserve.entrypoints.api_routes import add_api_routes
from lmserve.entrypoints.chat_template_sandbox import TemplateSandbox
from lmserve.entrypoints.openai.limits import (DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HEADER_COUNT,
                                               RequestLimitsMiddleware)
from lmserve.entrypoints.openai.protocol_common import check_request_id
from lmserve.entrypoints.openai.protocol_completions import ChatCompletionRequest, CompletionRequest
from lmserve.entrypoints.openai.protocol_pooling import (ClassificationChatRequest,
                                                         ClassificationCompletionRequest, EmbeddingChatRequest,
                                                         EmbeddingCompletionRequest, PoolingChatRequest,
                                                         PoolingCompletionRequest, RerankRequest, ScoreRequest)
from lmserve.entrypoints.openai.protocol_tokenization import (DetokenizeRequest, TokenizeChatRequest,
                                                              TokenizeCompletionRequest)
from lmserve.entrypoints.anthropic.serving import AnthropicServingMessages
from lmserve.entrypoints.openai.responses.serving import OpenAIServingResponses
from lmserve.entrypoints.openai.responses.store import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, ResponseStore
from lmserve.entrypoints.openai.serving_batch_chat import OpenAIServingChatBatch
from lmserve.entrypoints.openai.serving_chat import OpenAIServingChat
from lmserve.entrypoints.openai.serving_classification import OpenAIServingClassification
from lmserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from lmserve.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from lmserve.entrypoints.openai.serving_engine import (DEFAULT_MAX_LOG_LEN, DEFAULT_MAX_STOP_STRINGS, ServerOptions,
                                                       clip, error_body)
from lmserve.entrypoints.openai.serving_lora import (RUNTIME_UPDATE_ENVS, LoadLoRAAdapterRequest, ServedLoRAs,
                                                    UnloadLoRAAdapterRequest, runtime_updates_allowed)
from lmserve.entrypoints.openai.serving_models import OpenAIServingModels
from lmserve.entrypoints.openai.serving_pooling import OpenAIServingPooling
from lmserve.entrypoints.openai.serving_score import ServingScores
from lmserve.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from lmserve.entrypoints.score_utils import score_mode
from lmserve.errors import InvalidRequestError, LMServeError, NotReadyError
from lmserve.metrics import EngineMetrics

logger = logging.getLogger("lmserve.server")

UNAUTHENTICATED_PATHS = frozenset({"/health", "/ping", "/metrics"})
# Requests counted by GET /load (as vLLM's ``load_aware_call`` routes).
LOAD_TRACKED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/pooling",
                                "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank",
                                "/v1/responses", "/v1/messages", "/v1/chat/completions/batch"})
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def lmserve_version() -> str:
    try:
        from importlib.metadata import version
        return version("lmserve")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0.0.0+unknown"


@dataclass
class _Handlers:
    """One handler per API; None where the model cannot serve it (a generative model has no
    pooling handlers, a pooling model no generation ones), which is vLLM's 400
    "The model does not support ... API"."""

    models: OpenAIServingModels
    tokenization: OpenAIServingTokenization
    completion: OpenAIServingCompletion | None = None
    chat: OpenAIServingChat | None = None
    embedding: OpenAIServingEmbedding | None = None
    pooling: OpenAIServingPooling | None = None
    classification: OpenAIServingClassification | None = None
    score: ServingScores | None = None
    responses: OpenAIServingResponses | None = None
    messages: AnthropicServingMessages | None = None
    batch_chat: OpenAIServingChatBatch | None = None

    def get(self, name: str, api: str) -> Any:
        handler = getattr(self, name)
        if handler is None:
            raise InvalidRequestError(f"The model does not support {api}")
        return handler


def tool_reasoning_options(args: Any, tokenizer: Any) -> dict[str, Any]:
    """The ServerOptions fields of the tool-calling and reasoning flags (checked by cli_args)."""
    from lmserve.reasoning import ReasoningParserManager
    from lmserve.reasoning.config import ReasoningConfig
    reasoning = getattr(args, "reasoning_parser", "") or None
    config = getattr(args, "reasoning_config", None)
    if isinstance(config, (str, dict)):
        config = ReasoningConfig.from_flag(config)
    if reasoning is not None or config is not None:
        config = config or ReasoningConfig(reasoning_parser=reasoning or "")
        parser = ReasoningParserManager.get_reasoning_parser(reasoning)(tokenizer) if reasoning else None
        config.resolve(tokenizer, parser)
    from lmserve.structured_output.config import StructuredOutputsConfig
    so_config = StructuredOutputsConfig.from_cli(getattr(args, "structured_outputs_config", None))
    return dict(tool_call_parser=getattr(args, "tool_call_parser", None) or None,
                enable_auto_tool_choice=bool(getattr(args, "enable_auto_tool_choice", False)),
                exclude_tools_when_tool_choice_none=bool(getattr(args, "exclude_tools_when_tool_choice_none", False)),
                reasoning_parser=reasoning, reasoning_config=config, grammar_in_reasoning=so_config.enable_in_reasoning)


class ServerState:
    """Per-app state. ``handlers`` is None until the engine is set."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.engine: Any = None
        self.handlers: _Handlers | None = None
        self.in_flight = 0  # generation requests being answered (GET /load)
        names = list(getattr(args, "served_model_name", None) or [])
        self.metrics = EngineMetrics(names[0] if names else (getattr(args, "model", None) or DEFAULT_MODEL_NAME))
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="lmserve-prep")  # see ServerOptions
        self.template_sandbox = TemplateSandbox()
        self.response_store = ResponseStore(
            int(getattr(args, "responses_store_max_entries", DEFAULT_MAX_ENTRIES)),
            int(getattr(args, "responses_store_max_bytes", DEFAULT_MAX_BYTES)))
        self.chat_template: str | None = None  # --chat-template, read once (a bad path fails at start)
        if getattr(args, "chat_template", None) is not None:
            from lmserve.chat_template import load_chat_template
            self.chat_template = load_chat_template(args.chat_template)

    def set_engine(self, engine: Any) -> None:
        """Builds the handlers for ``engine``; raises ValueError when the tool/reasoning flags do
        not fit its tokenizer (--reasoning-config strings that tokenize to nothing)."""
        args = self.args
        mc = engine.model_config
        names = tuple(getattr(args, "served_model_name", None) or [mc.served_model_name])
        if self.metrics.model_name != names[0]:
            self.metrics = EngineMetrics(names[0])
        self.metrics.set_stats_source(engine.get_stats)
        options = ServerOptions(
            served_model_names=names, model_root=getattr(mc, "model", None),
            response_role=getattr(args, "response_role", "assistant"), chat_template=self.chat_template,
            chat_template_content_format=getattr(args, "chat_template_content_format", "auto"),
            return_tokens_as_token_ids=bool(getattr(args, "return_tokens_as_token_ids", False)),
            enable_prompt_tokens_details=bool(getattr(args, "enable_prompt_tokens_details", False)),
            log_requests=bool(getattr(args, "enable_log_requests", False)),
            log_outputs=bool(getattr(args, "enable_log_outputs", False)),
            log_deltas=bool(getattr(args, "enable_log_deltas", True)),
            default_chat_template_kwargs=getattr(args, "default_chat_template_kwargs", None),
            max_log_len=getattr(args, "max_log_len", DEFAULT_MAX_LOG_LEN),
            trust_request_chat_template=bool(getattr(args, "trust_request_chat_template", False)),
            max_stop_strings=int(getattr(args, "max_stop_strings", DEFAULT_MAX_STOP_STRINGS)),
            force_include_usage=bool(getattr(args, "enable_force_include_usage", False)),
            **tool_reasoning_options(args, engine.tokenizer),
            executor=self.executor, template_sandbox=self.template_sandbox, loras=self._served_loras(engine, names))
        handlers = _Handlers(models=OpenAIServingModels(options, mc.max_model_len),
                             tokenization=OpenAIServingTokenization(engine, options, self.metrics))
        if getattr(mc, "runner_type", "generate") == "pooling":
            tasks = tuple(mc.supported_pooling_tasks)
            handlers.pooling = OpenAIServingPooling(engine, options, self.metrics)
            if "embed" in tasks:
                handlers.embedding = OpenAIServingEmbedding(engine, options, self.metrics)
            if "classify" in tasks:
                handlers.classification = OpenAIServingClassification(engine, options, self.metrics)
            try:
                score_mode(mc)  # a cross-encoder (one label) or an embedding model
                handlers.score = ServingScores(engine, options, self.metrics)
            except ValueError:
                pass
        else:
            handlers.completion = OpenAIServingCompletion(engine, options, self.metrics)
            handlers.chat = OpenAIServingChat(engine, options, self.metrics)
            handlers.responses = OpenAIServingResponses(handlers.chat, self.response_store)
            handlers.messages = AnthropicServingMessages(
                handlers.chat, getattr(args, "anthropic_disabled_thinking_effort", "auto"))
            handlers.batch_chat = OpenAIServingChatBatch(handlers.chat)
        self.handlers = handlers
        self.engine = engine

    def _served_loras(self, engine: Any, names: tuple[str, ...]) -> ServedLoRAs | None:
        """The adapters served by name (None without --enable-lora); --lora-modules are loaded here."""
        args = self.args
        modules = [m for group in getattr(args, "lora_modules", None) or [] for m in group]
        inner = getattr(engine, "engine", None)
        if getattr(getattr(inner, "config", None), "lora_config", None) is None:
            if modules:
                raise ValueError("--lora-modules needs --enable-lora")
            return None
        loras = ServedLoRAs(engine, names, getattr(args, "lora_allowed_dirs", None))
        loras.add_static(modules)
        return loras

    def log_ignored(self, request: Any) -> None:
        ignored = request.ignored_fields()
        if ignored:
            logger.warning("The following fields were present in the request but ignored: %s",
                           clip(repr(ignored), getattr(self.args, "max_log_len", DEFAULT_MAX_LOG_LEN)))

    async def aclose(self) -> None:
        """Stops the render processes and the worker thread (the server is stopping)."""
        await self.template_sandbox.aclose()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> _Handlers:
        if self.handlers is None:
            raise NotReadyError("The server is starting: the model is still loading. Retry shortly.")
        return self.handlers


# ---------------------------------------------------------------------- errors
def error_response(err: LMServeError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(err).model_dump(), status_code=err.status_code, headers=headers)


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A readable message and the ``param`` (dotted path of the first bad field)."""
    parts: list[str] = []
    param = None
    seen: set[str] = set()
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ())][1:] if e.get("loc", ("",))[0] == "body" else \
            [str(x) for x in e.get("loc", ())]
        clean = []
        for x in loc:  # union members appear as "str", "list[int]", "function-after[...]": stop there
            if "[" in x or x in _UNION_TAGS or "-" in x:
                break
            clean.append(x)
        where = ".".join(clean)
        if where in seen:
            continue
        seen.add(where)
        etype = e.get("type")
        if etype == "json_invalid":
            msg = f"Invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}"
        elif not where and etype == "missing":
            msg = "The request body is required: a JSON object."
        elif not where and etype in ("model_attributes_type", "dict_type", "model_type"):
            msg = "The request body must be a JSON object (sent with Content-Type: application/json)."
        else:
            msg = f"{where}: {e.get('msg')}" if where else str(e.get("msg"))
        parts.append(msg)
        param = param or where or None
    if len(parts) > 5:
        parts = parts[:5] + [f"... and {len(parts) - 5} more errors"]
    return "; ".join(parts) or "Invalid request", param


def install_exception_handlers(app: FastAPI) -> None:
    """The one place exceptions map to HTTP responses."""

    def log_stack(request: Request, exc: BaseException) -> None:
        """--log-error-stack: the stack of every error response (internal errors always log theirs)."""
        if getattr(app.state.server.args, "log_error_stack", False):
            logger.error("Error response to %s %s", request.method, _route_path(request.scope), exc_info=exc)

    @app.exception_handler(LMServeError)
    async def _lmserve(request: Request, exc: LMServeError) -> JSONResponse:
        log_stack(request, exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        log_stack(request, exc)
        msg, param = _validation_message(exc)
        return error_response(InvalidRequestError(msg, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        log_stack(request, exc)
        err = LMServeError(str(exc.detail))
        err.status_code = exc.status_code
        err.err_type = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
                        413: "RequestTooLargeError"}.get(exc.status_code, "HTTPError")
        if exc.status_code == 400 and "parsing the body" in err.message:
            err.message = "Invalid JSON body: the body could not be parsed (malformed JSON or invalid UTF-8)."
        return error_response(err, headers=getattr(exc, "headers", None))

    @app.exception_handler(ValueError)
    async def _value(request: Request, exc: ValueError) -> JSONResponse:
        log_stack(request, exc)
        return error_response(InvalidRequestError(str(exc)))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("Internal error")
        return error_response(LMServeError(f"Internal server error: {type(exc).__name__}"))


# ---------------------------------------------------------------------- middleware (pure ASGI)
def _route_path(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class AuthMiddleware:
    """Requires ``Authorization: Bearer <key>`` everywhere except /health, /ping, /metrics
    and CORS preflights. Keys are compared in constant time."""

    def __init__(self, app: Any, api_keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or \
                _route_path(scope) in UNAUTHENTICATED_PATHS:
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
        if not any(secrets.compare_digest(token, k) for k in self.keys):
            err = LMServeError("Unauthorized: a valid API key is required (Authorization: Bearer <key>).")
            err.status_code, err.err_type = 401, "AuthenticationError"
            return await error_response(err, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        return await self.app(scope, receive, send)


class RequestTrackingMiddleware:
    """Counts in-flight generation and pooling requests (GET /load) and, when enabled, sets the
    ``X-Request-Id`` response header (the client's, or the id the handler chose)."""

    def __init__(self, app: Any, state: ServerState, echo_request_id: bool) -> None:
        self.app = app
        self.state = state
        self.echo = echo_request_id

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tracked = _route_path(scope) in LOAD_TRACKED_PATHS
        if tracked:
            self.state.in_flight += 1

        async def send_wrapper(message: dict) -> None:
            if self.echo and message["type"] == "http.response.start":
                rid = (scope.get("state") or {}).get("request_id") or _header(scope, b"x-request-id") \
                    or uuid.uuid4().hex
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", rid.encode("latin-1", "replace"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if tracked:
                self.state.in_flight -= 1


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def _load_middleware(app: FastAPI, path: str) -> None:
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    if not module_name:
        raise ValueError(f"--middleware {path!r}: expected an import path such as package.module.name")
    obj = getattr(importlib.import_module(module_name), attr)
    if inspect.isclass(obj):
        app.add_middleware(obj)
    elif inspect.iscoroutinefunction(obj):
        app.middleware("http")(obj)
    else:
        raise ValueError(f"--middleware {path!r} is neither a class nor an async function")


# ---------------------------------------------------------------------- app
def _base_request_id(raw: Request, body_id: str, body_set: bool) -> str:
    """The client's X-Request-Id wins, then a request_id set in the body, then a random id.
    A client's id is kept as given (it is the response's id too) but must pass
    ``check_request_id``; it need not be unique: the engine runs each request under its own id."""
    header = raw.headers.get("x-request-id")
    if header:
        rid = check_request_id(header, "X-Request-Id")
    else:
        rid = body_id if body_set and body_id else uuid.uuid4().hex
    raw.state.request_id = rid
    return rid


def _respond(result: Any) -> Any:
    if result is None:  # the client went away before the answer was ready
        return Response(status_code=499)
    if isinstance(result, Response):
        return result
    return JSONResponse(result.model_dump())


def build_app(args: argparse.Namespace, engine: Any = None) -> FastAPI:
    """The app for ``args`` (the serve flags). ``--root-path`` is the ASGI server's business
    (uvicorn's ``root_path``), so the app itself is mounted at /."""
    docs = not getattr(args, "disable_fastapi_docs", False)
    app = FastAPI(title="lmserve", version=lmserve_version(), openapi_url="/openapi.json" if docs else None, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None)
    state = ServerState(args)
    app.state.server = state
    if engine is not None:
        state.set_engine(engine)
    install_exception_handlers(app)
    _add_routes(app, state)

    api_key = getattr(args, "api_key", None)
    if api_key:
        app.add_middleware(AuthMiddleware, api_keys=[api_key] if isinstance(api_key, str) else list(api_key))
    keep_alive = float(getattr(args, "sse_keep_alive_interval", 0) or 0)
    if keep_alive > 0:
        from lmserve.entrypoints.openai.sse_keepalive import SSEKeepAliveMiddleware
        app.add_middleware(SSEKeepAliveMiddleware, interval=keep_alive)
    app.add_middleware(RequestTrackingMiddleware, state=state,
                       echo_request_id=bool(getattr(args, "enable_request_id_headers", False)))
    app.add_middleware(RequestLimitsMiddleware,
                       max_body_bytes=int(getattr(args, "max_request_body_bytes", DEFAULT_MAX_BODY_BYTES)),
                       max_header_count=int(getattr(args, "h11_max_header_count", DEFAULT_MAX_HEADER_COUNT)))
    app.add_middleware(CORSMiddleware, allow_origins=list(getattr(args, "allowed_origins", ["*"])),
                       allow_credentials=bool(getattr(args, "allow_credentials", False)),
                       allow_methods=list(getattr(args, "allowed_methods", ["*"])),
                       allow_headers=list(getattr(args, "allowed_headers", ["*"])))
    for path in getattr(args, "middleware", None) or []:
        _load_middleware(app, path)
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        if state.engine is None:
            raise NotReadyError("The server is starting: the model is still loading.")
        await state.engine.check_health()
        return Response(status_code=200)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        return await health()

    @app.get("/version")
    async def version() -> dict:
        return {"version": lmserve_version()}

    @app.get("/load")
    async def load() -> dict:
        return {"server_load": state.in_flight}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models() -> Any:
        return JSONResponse(state.ready().models.list_models().model_dump())

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Any:
        return JSONResponse(state.ready().models.get_model(model).model_dump())

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request) -> Any:
        handler = state.ready().get("completion", "Completions API")
        state.log_ignored(request)
        rid = _base_request_id(raw, request.request_id, "request_id" in request.model_fields_set)
        return _respond(await handler.create_completion(request, f"cmpl-{rid}", raw))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Any:
        handler = state.ready().get("chat", "Chat Completions API")
        state.log_ignored(request)
        rid = _base_request_id(raw, request.request_id, "request_id" in request.model_fields_set)
        return _respond(await handler.create_chat_completion(request, f"chatcmpl-{rid}", raw))

    @app.post("/tokenize")
    async def tokenize(body: dict[str, Any]) -> Any:
        request = _parse(body, TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest)
        return JSONResponse((await state.ready().tokenization.tokenize_request(request)).model_dump())

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> Any:
        return JSONResponse((await state.ready().tokenization.detokenize_request(request)).model_dump())

    _add_pooling_routes(app, state)
    add_api_routes(app, state, _parse, _base_request_id)
    if runtime_updates_allowed():
        _add_lora_routes(app, state)


def _add_lora_routes(app: FastAPI, state: ServerState) -> None:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter (only with runtime updates allowed:
    ``serving_lora.RUNTIME_UPDATE_ENVS``); 200 with vLLM's plain-text success line."""
    logger.warning("LoRA adapters may be loaded and unloaded at run time (%s is set); loads read only from "
                   "--lora-allowed-dirs", " or ".join(RUNTIME_UPDATE_ENVS))

    def served() -> ServedLoRAs:
        loras = state.ready().models.options.loras
        if loras is None:
            raise InvalidRequestError("LoRA adapters are not enabled: start the server with --enable-lora")
        return loras

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> Response:
        if request.is_3d_lora_weight:
            raise InvalidRequestError("is_3d_lora_weight concerns MoE adapters; lmserve's models have no experts",
                                      "is_3d_lora_weight")
        return Response(await served().load(request.lora_name, request.lora_path, request.load_inplace))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> Response:
        return Response(await served().unload(request.lora_name, request.lora_int_id))


def _parse(body: dict[str, Any], model: type) -> Any:
    """``body`` validated as ``model``; errors read as FastAPI's own body validation errors."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from e


def _add_pooling_routes(app: FastAPI, state: ServerState) -> None:
    """The pooling APIs. ``input`` and ``messages`` bodies are two request models: the body
    is parsed as the one whose key it has."""

    def rid(raw: Request, request: Any, prefix: str) -> str:
        return f"{prefix}-{_base_request_id(raw, request.request_id, 'request_id' in request.model_fields_set)}"

    @app.post("/v1/embeddings")
    async def embeddings(body: dict[str, Any], raw: Request) -> Any:
        handler = state.ready().get("embedding", "Embeddings API")
        request = _parse(body, EmbeddingChatRequest if "messages" in body else EmbeddingCompletionRequest)
        state.log_ignored(request)
        return _respond(await handler.create_embedding(request, rid(raw, request, "embd"), raw))

    @app.post("/pooling")
    async def pooling(body: dict[str, Any], raw: Request) -> Any:
        handler = state.ready().get("pooling", "Pooling API")
        request = _parse(body, PoolingChatRequest if "messages" in body else PoolingCompletionRequest)
        state.log_ignored(request)
        return _respond(await handler.create_pooling(request, rid(raw, request, "pool"), raw))

    @app.post("/classify")
    async def classify(body: dict[str, Any], raw: Request) -> Any:
        handler = state.ready().get("classification", "Classification API")
        request = _parse(body, ClassificationChatRequest if "messages" in body else ClassificationCompletionRequest)
        state.log_ignored(request)
        return _respond(await handler.create_classify(request, rid(raw, request, "classify"), raw))

    async def score(request: ScoreRequest, raw: Request) -> Any:
        handler = state.ready().get("score", "Score API")
        state.log_ignored(request)
        return _respond(await handler.create_score(request, rid(raw, request, "score"), raw))

    async def rerank(request: RerankRequest, raw: Request) -> Any:
        handler = state.ready().get("score", "Rerank (Score) API")
        state.log_ignored(request)
        return _respond(await handler.do_rerank(request, rid(raw, request, "rerank"), raw))

    for path in ("/score", "/v1/score"):
        app.post(path)(score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.post(path)(rerank)


