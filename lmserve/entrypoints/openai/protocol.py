"""Request models of the OpenAI-compatible API: the OpenAI fields plus vLLM's extra ones
(spec: seeds 001 and 002), and their translation into ``SamplingParams``.

Invariants:
- type and range errors are pydantic errors (the app turns them into 400 with ``param``);
  cross-field rules and "not supported yet" are ``InvalidRequestError`` raised by
  ``validate_request()``, also 400 with ``param``;
- unknown fields are accepted and ignored (as vLLM) and listed by ``ignored_fields()``;
- no string anywhere in a request holds a lone surrogate (JSON allows ``"\\ud800"``, Unicode
  does not: tokenizers, logs and responses cannot take it), and no number is NaN or infinite:
  both are 400s naming the field;
- a ``request_id`` has no control or format characters (it reaches logs and response ids);
- ``to_sampling_params`` never mutates the request and always sets ``output_kind=DELTA``:
  every response, streaming or not, is built from deltas.
Response models live in ``protocol_responses``.
"""

import re
import time
import unicodedata
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmserve.errors import InvalidRequestError
from lmserve.sampling_params import (RepetitionDetectionParams, RequestOutputKind, SamplingParams)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The OpenAPI schema of a prompt / input field (validated by hand, for vLLM's messages): text, texts,
# token ids, or lists of token ids.
PROMPT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                           {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                           {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                            "minItems": 1}]}
MAX_N = 128  # choices per prompt
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat top_logprobs
MAX_STOP_CHARS = 65536  # characters in all of a request's stop strings (and, apart, its bad_words)

# vLLM's fallbacks when neither the request nor generation_config.json sets a value.
_DEFAULT_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def random_uuid() -> str:
    return uuid.uuid4().hex


def find_lone_surrogate(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string in ``value`` (JSON data) that holds a lone
    surrogate, or None. Dict keys are checked too."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return where or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                key = str(k).encode("utf-8", "backslashreplace").decode("utf-8")  # the path is text too
                sub = f"{where}.{key}" if where else key
                if isinstance(k, str) and key != k:
                    return sub
                stack.append((item, sub))
        elif isinstance(v, list):
            stack.extend((item, f"{where}.{i}") for i, item in enumerate(v) if isinstance(item, (str, dict, list)))
    return None


def check_request_id(value: str, param: str = "request_id") -> str:
    """``value`` if it can be a request id: at most 256 characters, none of them control or
    format characters (Unicode category C*: newlines, escapes, bidi overrides)."""
    if len(value) > 256:
        raise InvalidRequestError(f"{param} is longer than 256 characters.", param)
    if not value.isprintable() or any(unicodedata.category(c)[0] == "C" for c in value):
        raise InvalidRequestError(f"{param} must not contain control or format characters.", param)
    return value


class OpenAIBaseModel(BaseModel):
    """Accepts unknown fields (ignored, as vLLM does); refuses lone surrogates and NaN/inf."""

    model_config = ConfigDict(extra="allow", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = find_lone_surrogate(data)
        if where is not None:
            raise ValueError(f"{where} contains a lone UTF-16 surrogate (such as \\ud800), which is not valid "
                             "Unicode text")
        return data

    def ignored_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class ResponseFormat(OpenAIBaseModel):
    type: str = "text"


class RepetitionDetection(OpenAIBaseModel):
    max_pattern_size: int = Field(0, ge=0)
    min_pattern_size: int = Field(0, ge=0)
    min_count: int = Field(0, ge=0)


def _check_token_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(t) is int for t in value):
        raise ValueError(f"{what} must be a list of integer token ids")
    return value


class SamplingRequest(OpenAIBaseModel):
    """Fields shared by the completions and chat requests."""

    model: str | None = None
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = Field(default_factory=list)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    user: str | None = None
    # vLLM sampling extras
    use_beam_search: bool = False
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    length_penalty: float = 1.0
    stop_token_ids: list[int] | None = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=INT64_MAX)
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(None, ge=-1)
    bad_words: list[str] = Field(default_factory=list)
    # vLLM request extras
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)
    request_id: str = Field(default_factory=random_uuid, max_length=256)
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    repetition_detection: RepetitionDetection | None = None
    thinking_token_budget: int | None = None

    @field_validator("request_id")
    @classmethod
    def _printable_id(cls, v: str) -> str:
        return check_request_id(v)

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v: Any) -> Any:
        if v == "" or (isinstance(v, list) and any(s == "" for s in v)):
            raise ValueError("stop strings cannot be empty")
        return v

    # ------------------------------------------------------------------ checks
    def validate_request(self) -> None:
        """Cross-field rules; raises InvalidRequestError (400) naming the field."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("Stream options can only be defined when `stream=True`.",
                                      "stream_options")
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidRequestError("`prompt_logprobs` are not available when `stream=True`.",
                                      "prompt_logprobs")
        if self.logit_bias:
            for key, bias in self.logit_bias.items():
                if not re.fullmatch(r"\s*-?\d+\s*", key):
                    raise InvalidRequestError(f"logit_bias keys must be token ids (integers as strings), "
                                              f"got {key!r}.", "logit_bias")
                if not -100.0 <= bias <= 100.0:
                    raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {bias} for "
                                              f"token {key}.", "logit_bias")
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequestError(f"response_format of type {self.response_format.type!r} is not "
                                      "supported yet: structured outputs come in a later release; only "
                                      "{'type': 'text'} is accepted.", "response_format")
        if self.structured_outputs:
            raise InvalidRequestError("structured_outputs are not supported yet (a later release).",
                                      "structured_outputs")
        if self.thinking_token_budget is not None and self.thinking_token_budget < -1:
            raise InvalidRequestError("thinking_token_budget must be -1 (unlimited) or at least 0.",
                                      "thinking_token_budget")

    def check_list_limits(self, max_stop_strings: int) -> None:
        """``stop`` and ``bad_words`` hold at most ``max_stop_strings`` entries and
        ``MAX_STOP_CHARS`` characters each (every entry is checked against the output at every
        step, at a cost that grows with its length)."""
        for name in ("stop", "bad_words"):
            value = getattr(self, name)
            items = [] if value is None else [value] if isinstance(value, str) else value
            if len(items) > max_stop_strings:
                raise InvalidRequestError(f"{name} has {len(items)} entries; at most {max_stop_strings} are allowed "
                                          "(--max-stop-strings).", name)
            chars = sum(len(v) for v in items)
            if chars > MAX_STOP_CHARS:
                raise InvalidRequestError(f"{name} holds {chars} characters in all; at most {MAX_STOP_CHARS} are "
                                          "allowed.", name)

    def check_logprobs_limit(self, value: int | None, name: str, max_logprobs: int) -> None:
        if value is None or max_logprobs == -1:
            return
        if value == -1 or value > max_logprobs:
            raise InvalidRequestError(f"Requested {name} of {value}, which is greater than max allowed: "
                                      f"{max_logprobs}. Start the server with a larger --max-logprobs.", name)

    # ------------------------------------------------------------------ translation
    def _sampling_kwargs(self, max_tokens: int, default_sampling_params: dict[str, Any]) -> dict[str, Any]:
        d = default_sampling_params or {}

        def pick(name: str) -> Any:
            value = getattr(self, name)
            if value is None and name == "temperature" and self.use_beam_search:
                return 0.0  # beam search ranks by logprob; sampling temperature does not apply
            return value if value is not None else d.get(name, _DEFAULT_SAMPLING[name])

        extra_args: dict[str, Any] = dict(self.vllm_xargs or {})
        if self.kv_transfer_params:
            extra_args["kv_transfer_params"] = self.kv_transfer_params
        rep = None
        if self.repetition_detection is not None:
            r = self.repetition_detection
            try:
                rep = RepetitionDetectionParams(r.max_pattern_size, r.min_pattern_size, r.min_count)
            except ValueError as e:
                raise InvalidRequestError(str(e), "repetition_detection") from e
        return dict(
            n=self.n, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0, repetition_penalty=pick("repetition_penalty"),
            temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"), min_p=pick("min_p"),
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, bad_words=self.bad_words,
            ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            truncate_prompt_tokens=self.truncate_prompt_tokens, output_kind=RequestOutputKind.DELTA,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            allowed_token_ids=self.allowed_token_ids, extra_args=extra_args,
            use_beam_search=self.use_beam_search, length_penalty=self.length_penalty,
            repetition_detection=rep)

    def requested_max_tokens(self) -> int | None:
        """The max_tokens the client asked for explicitly (None: not set)."""
        return self.max_tokens if "max_tokens" in self.model_fields_set else None  # type: ignore[attr-defined]

    def resolve_max_tokens(self, default_max_tokens: int, default_sampling_params: dict[str, Any]) -> int:
        """vLLM's rule: the smallest of what the client asked, the room left in the context
        (``default_max_tokens``) and the server-wide cap from generation_config.json."""
        candidates = [default_max_tokens, self.max_tokens,  # type: ignore[attr-defined]
                      (default_sampling_params or {}).get("max_tokens")]
        return max(1, min(c for c in candidates if c is not None))

    def _build(self, kwargs: dict[str, Any]) -> SamplingParams:
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            raise InvalidRequestError(str(e), _param_from_message(str(e), type(self))) from e


def _param_from_message(message: str, model: type[BaseModel]) -> str | None:
    m = re.match(r"\W*(\w+)", message)
    if m and m.group(1) in model.model_fields:
        return m.group(1)
    return None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: Any = Field(..., json_schema_extra=PROMPT_SCHEMA)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(16, ge=1, le=INT64_MAX)
    suffix: str | None = None
    prompt_embeds: Any = None
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        msg = ("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
               "token ids")
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError(msg + (" (got an empty list)" if v == [] else ""))
        if all(isinstance(p, str) for p in v):
            return v
        if all(type(t) is int for t in v):
            return v
        if all(isinstance(p, list) for p in v):
            for p in v:
                if not p:
                    raise ValueError("a prompt of token ids cannot be empty")
                _check_token_list(p, "each prompt of token ids")
            return v
        raise ValueError(msg)

    def prompts(self) -> list[str | list[int]]:
        """The prompt batch: each item is text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and type(p[0]) is int):
            return [p]
        return list(p)

    def validate_request(self) -> None:
        super().validate_request()
        if self.suffix is not None:
            raise InvalidRequestError("suffix is not currently supported", "suffix")
        if self.prompt_embeds is not None:
            raise InvalidRequestError("prompt_embeds is not supported by lmserve", "prompt_embeds")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of different from n is not supported (as vLLM v1).", "best_of")

    def to_sampling_params(self, default_max_tokens: int, default_sampling_params: dict[str, Any],
                           max_logprobs: int) -> SamplingParams:
        self.check_logprobs_limit(self.logprobs, "logprobs", max_logprobs)
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo and self.logprobs is not None:
            prompt_logprobs = self.logprobs
        self.check_logprobs_limit(prompt_logprobs, "prompt_logprobs", max_logprobs)
        kwargs = self._sampling_kwargs(self.resolve_max_tokens(default_max_tokens, default_sampling_params),
                                       default_sampling_params)
        kwargs.update(logprobs=self.logprobs, prompt_logprobs=prompt_logprobs)
        return self._build(kwargs)


class ChatMessageParam(OpenAIBaseModel):
    """One chat message. Extra keys (tool_calls, name, ...) are passed to the template."""

    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None

    def to_template_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageParam] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_prompt_text: bool | None = None
    media_io_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True

    def validate_request(self) -> None:
        super().validate_request()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("when using `top_logprobs`, `logprobs` must be set to true.",
                                      "top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequestError("Cannot set both `continue_final_message` and `add_generation_prompt` "
                                      "to True.", "continue_final_message")
        self._check_tools()

    def _check_tools(self) -> None:
        """vLLM's rules for ``tools`` / ``tool_choice`` (``tool_choice`` defaults to "auto" when
        tools are given, to "none" otherwise)."""
        usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
        if self.tools == []:
            raise InvalidRequestError("`tools` must not be an empty array. Either provide at least one tool or "
                                      "omit the field entirely.", "tools")
        for k, tool in enumerate(self.tools or []):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if tool.get("type", "function") != "function" or not isinstance(fn, dict):
                raise InvalidRequestError(f"tools[{k}] must be {{'type': 'function', 'function': {{...}}}}.",
                                          f"tools.{k}")
            if not isinstance(fn.get("name"), str) or not fn["name"]:
                raise InvalidRequestError(f"tools[{k}].function.name must be a non-empty string.",
                                          f"tools.{k}.function.name")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise InvalidRequestError(f"tools[{k}].function.parameters must be a JSON schema object.",
                                          f"tools.{k}.function.parameters")
        if self.tool_choice is None:
            self.tool_choice = "auto" if self.tools else "none"
            return
        if self.tool_choice == "none":
            return
        if not self.tools:
            raise InvalidRequestError("When using `tool_choice`, `tools` must be set.", "tool_choice")
        if isinstance(self.tool_choice, str):
            if self.tool_choice not in ("auto", "required"):
                raise InvalidRequestError(f"Invalid value for `tool_choice`: {self.tool_choice}! Only named tools, "
                                          '"none", "auto" or "required" are supported.', "tool_choice")
            return
        function = self.tool_choice.get("function")
        if not isinstance(function, dict):
            raise InvalidRequestError(f"Invalid value for `function`: `{function}` in `tool_choice`! {usage}",
                                      "tool_choice.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"Invalid `name` in `function`: `{name}` in `tool_choice`! {usage}",
                                      "tool_choice.function.name")
        if not any(t["function"]["name"] == name for t in self.tools):
            raise InvalidRequestError(f"The tool specified in `tool_choice` does not match any of the specified "
                                      f"`tools`: {name}", "tool_choice")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def resolve_max_tokens(self, default_max_tokens: int, default_sampling_params: dict[str, Any]) -> int:
        candidates = [default_max_tokens, self.requested_max_tokens(),
                      (default_sampling_params or {}).get("max_tokens")]
        return max(1, min(c for c in candidates if c is not None))

    def to_sampling_params(self, default_max_tokens: int, default_sampling_params: dict[str, Any],
                           max_logprobs: int) -> SamplingParams:
        logprobs = None
        if self.logprobs:
            logprobs = self.top_logprobs or 0
        self.check_logprobs_limit(logprobs, "top_logprobs", max_logprobs)
        self.check_logprobs_limit(self.prompt_logprobs, "prompt_logprobs", max_logprobs)
        kwargs = self._sampling_kwargs(self.resolve_max_tokens(default_max_tokens, default_sampling_params),
                                       default_sampling_params)
        kwargs.update(logprobs=logprobs, prompt_logprobs=self.prompt_logprobs)
        return self._build(kwargs)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template_dict() for m in self.messages]


# ---------------------------------------------------------------------- tokenizer API
class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[ChatMessageParam] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, str]] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


def now() -> int:
    return int(time.time())

