"""Request models of POST /v1/completions and POST /v1/chat/completions, on top of
``SamplingRequest``. The invariants of the request models are listed in ``protocol``.
"""

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmserve.entrypoints.openai.protocol_common import INT64_MAX, PROMPT_SCHEMA, ChatMessageParam
from lmserve.entrypoints.openai.protocol_sampling import MAX_N, SamplingRequest
from lmserve.errors import InvalidRequestError
from lmserve.sampling_params import SamplingParams


def _check_token_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(t) is int for t in value):
        raise ValueError(f"{what} must be a list of integer token ids")
    return value


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: Any = Field(..., json_schema_extra=PROMPT_SCHEMA)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=-1)  # -1: the whole vocabulary (bounded by --max-logprobs)
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
        if self.logprob_token_ids and self.logprobs is None:
            raise InvalidRequestError("when using `logprob_token_ids`, `logprobs` must be set.", "logprob_token_ids")
        self.check_logprob_token_ids()

    def to_sampling_params(self, default_max_tokens: int, default_sampling_params: dict[str, Any],
                           max_logprobs: int, vocab_size: int | None = None) -> SamplingParams:
        """As vLLM: ``logprob_token_ids`` replaces the top-k ``logprobs`` (then only needed set)."""
        self.check_logit_bias(vocab_size)
        if not self.logprob_token_ids:
            self.check_logprobs_limit(self.logprobs, "logprobs", max_logprobs, vocab_size)
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo and self.logprobs is not None:
            prompt_logprobs = self.logprobs
        self.check_logprobs_limit(prompt_logprobs, "prompt_logprobs", max_logprobs, vocab_size)
        kwargs = self._sampling_kwargs(self.resolve_max_tokens(default_max_tokens, default_sampling_params),
                                       default_sampling_params)
        kwargs.update(logprobs=None if self.logprob_token_ids else self.logprobs, prompt_logprobs=prompt_logprobs,
                      logprob_token_ids=self.logprob_token_ids or None)
        return self._build(kwargs)


# vLLM 0.32's ``reasoning_effort`` values (chat completions; the Responses and Anthropic APIs map onto it)
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageParam] = Field(min_length=1)
    logprobs: bool | None = False
    # null is 0 (as vLLM); -1: the whole vocabulary (bounded by --max-logprobs, not OpenAI's 20).
    top_logprobs: int | None = Field(0, ge=-1)
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
    reasoning_effort: Literal[REASONING_EFFORTS] | None = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _effort_to_template(self) -> "ChatCompletionRequest":
        """vLLM's ``build_chat_params``: ``reasoning_effort`` reaches the chat template (and the
        reasoning parser) as the ``reasoning_effort`` kwarg, over the request's own
        ``chat_template_kwargs``, with ``enable_thinking`` = (effort != "none") unless those set it."""
        if self.reasoning_effort is not None:
            kwargs = dict(self.chat_template_kwargs or {})
            kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
            kwargs["reasoning_effort"] = self.reasoning_effort
            self.chat_template_kwargs = kwargs
        return self

    def validate_request(self) -> None:
        super().validate_request()
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("when using `top_logprobs`, `logprobs` must be set to true.",
                                      "top_logprobs")
        if self.logprob_token_ids and not self.logprobs:
            raise InvalidRequestError("when using `logprob_token_ids`, `logprobs` must be set to true.",
                                      "logprob_token_ids")
        self.check_logprob_token_ids()
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
                           max_logprobs: int, vocab_size: int | None = None) -> SamplingParams:
        """As vLLM: ``logprob_token_ids`` replaces the top-k ``top_logprobs``."""
        self.check_logit_bias(vocab_size)
        logprobs = None
        if self.logprobs and not self.logprob_token_ids:
            logprobs = self.top_logprobs or 0
        self.check_logprobs_limit(logprobs, "top_logprobs", max_logprobs, vocab_size)
        self.check_logprobs_limit(self.prompt_logprobs, "prompt_logprobs", max_logprobs, vocab_size)
        kwargs = self._sampling_kwargs(self.resolve_max_tokens(default_max_tokens, default_sampling_params),
                                       default_sampling_params)
        kwargs.update(logprobs=logprobs, prompt_logprobs=self.prompt_logprobs,
                      logprob_token_ids=self.logprob_token_ids or None)
        return self._build(kwargs)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template_dict() for m in self.messages]
