"""The fields and rules shared by the completions and chat requests (``SamplingRequest``):
sampling and vLLM extras, structured outputs (``response_format``, ``structured_outputs``, the
legacy ``guided_*`` fields) and their translation into ``SamplingParams``. The invariants of the
request models are listed in ``protocol``.
"""

import dataclasses
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmserve.entrypoints.openai.protocol_common import (INT64_MAX, INT64_MIN, OpenAIBaseModel, check_request_id,
                                                        random_uuid)
from lmserve.errors import InvalidRequestError
from lmserve.sampling_params import (MAX_LOGPROB_TOKEN_IDS, RepetitionDetectionParams, RequestOutputKind,
                                     SamplingParams, StructuredOutputsParams)

MAX_N = 128  # choices per prompt
MAX_STOP_CHARS = 65536  # characters in all of a request's stop strings (and, apart, its bad_words)

# vLLM's fallbacks when neither the request nor generation_config.json sets a value.
_DEFAULT_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class JsonSchemaResponseFormat(OpenAIBaseModel):
    """OpenAI's ``response_format.json_schema``. ``strict`` is accepted either way: xgrammar
    always generates exactly the schema (no undeclared properties)."""

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    """``text``, ``json_object``, ``json_schema`` (OpenAI) or ``structural_tag`` (vLLM: xgrammar's
    ``format``, or the legacy ``structures`` + ``triggers``)."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"] = "text"
    json_schema: JsonSchemaResponseFormat | None = None
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None
    format: Any = None

    def constraint(self) -> dict[str, Any]:
        """The ``StructuredOutputsParams`` field this format sets ({} for text)."""
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.json_schema is None:
                raise InvalidRequestError("When response_format type is 'json_schema', the 'json_schema' field "
                                          "(with its 'schema') must be provided.", "response_format.json_schema")
            return {"json": self.json_schema.json_schema}
        if self.type == "structural_tag":
            if self.format is not None:
                tag: dict[str, Any] = {"type": "structural_tag", "format": self.format}
            elif self.structures is not None and self.triggers is not None:
                tag = {"structures": self.structures, "triggers": self.triggers}
            else:
                raise InvalidRequestError("A structural_tag response_format needs 'format' (or the legacy "
                                          "'structures' and 'triggers').", "response_format")
            return {"structural_tag": json.dumps(tag)}
        return {}


# The legacy guided-decoding fields (removed in vLLM, documented by seed 002) and what they map to.
LEGACY_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                        "guided_grammar": "grammar", "guided_whitespace_pattern": "whitespace_pattern"}
_STRUCTURED_OUTPUTS_KEYS = {f.name for f in dataclasses.fields(StructuredOutputsParams)}


class LogitsProcessorConstructor(BaseModel):
    """A per-request logits processor: ``qualname(*args, **kwargs)`` gives the callable."""

    model_config = ConfigDict(extra="forbid")
    qualname: str
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None


class RepetitionDetection(OpenAIBaseModel):
    max_pattern_size: int = Field(0, ge=0)
    min_pattern_size: int = Field(0, ge=0)
    min_count: int = Field(0, ge=0)


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
    # Logprobs of exactly these ids at each generated position (vLLM 0.32); needs logprobs set.
    logprob_token_ids: list[int] | None = None
    bad_words: list[str] = Field(default_factory=list)
    # vLLM request extras
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)
    request_id: str = Field(default_factory=random_uuid, max_length=256)
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    repetition_detection: RepetitionDetection | None = None
    thinking_token_budget: int | None = None
    # qualified names or {"qualname", "args", "kwargs"}: allowed by --logits-processor-pattern
    logits_processors: list[str | LogitsProcessorConstructor] | None = None

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
        # logit_bias is checked by to_sampling_params, where the vocabulary size is known, so that
        # one 400 names every bad entry.
        if self.structured_outputs_params() is not None and self.use_beam_search:
            raise InvalidRequestError("structured outputs (structured_outputs, response_format, guided_*) cannot "
                                      "be combined with use_beam_search.", "use_beam_search")
        if self.thinking_token_budget is not None and self.thinking_token_budget < -1:
            raise InvalidRequestError("thinking_token_budget must be -1 (unlimited) or at least 0.",
                                      "thinking_token_budget")

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The request's one grammar constraint, from ``structured_outputs``, ``response_format``
        or the legacy ``guided_*`` fields (None: unconstrained). Raises InvalidRequestError."""
        kwargs: dict[str, Any] = {}
        source = None
        if self.structured_outputs is not None:
            unknown = sorted(set(self.structured_outputs) - _STRUCTURED_OUTPUTS_KEYS - {"_backend"})
            if unknown:
                raise InvalidRequestError(f"structured_outputs has unknown key(s) {unknown}; known keys: "
                                          f"{sorted(_STRUCTURED_OUTPUTS_KEYS)}.", "structured_outputs")
            kwargs = {k: v for k, v in self.structured_outputs.items() if v is not None and k != "_backend"}
            source = "structured_outputs"
        legacy = {dst: getattr(self, src) for src, dst in LEGACY_GUIDED_FIELDS.items() if getattr(self, src) is not None}
        if legacy:
            if source is not None:
                raise InvalidRequestError("Give the constraint either in structured_outputs or in the legacy "
                                          "guided_* fields, not both.", "structured_outputs")
            kwargs, source = legacy, "guided_*"
        backend = self.guided_decoding_backend
        if backend is not None:
            name, _, options = backend.partition(":")
            if name not in ("auto", "xgrammar", ""):
                raise InvalidRequestError(f"guided_decoding_backend {name!r} is not available: lmserve constrains "
                                          "decoding with xgrammar ('xgrammar' or 'auto').", "guided_decoding_backend")
            for option in filter(None, options.split(",")):
                if option == "disable-any-whitespace":
                    kwargs["disable_any_whitespace"] = True
                elif option not in ("no-fallback", "no-additional-properties"):
                    raise InvalidRequestError(f"guided_decoding_backend option {option!r} is not known (known: "
                                              "disable-any-whitespace, no-fallback, no-additional-properties).",
                                              "guided_decoding_backend")
        if self.response_format is not None:
            override = self.response_format.constraint()
            if override:
                given = [k for k in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
                         if k in kwargs]
                if given:
                    raise InvalidRequestError(f"response_format and {source} ({given[0]}) both constrain the "
                                              "output; use one.", "response_format")
                kwargs.update(override)
                source = source or "response_format"
        if source is None:
            return None
        if "whitespace_pattern" in kwargs and kwargs["whitespace_pattern"] is None:
            del kwargs["whitespace_pattern"]
        try:
            return StructuredOutputsParams(**kwargs)
        except (TypeError, ValueError) as e:
            param = source if source != "guided_*" else next(iter(sorted(
                src for src in LEGACY_GUIDED_FIELDS if getattr(self, src) is not None)))
            raise InvalidRequestError(f"{param}: {e}", param) from None
    def check_logit_bias(self, vocab_size: int | None = None) -> None:
        """One 400 naming every bad entry of ``logit_bias``: keys that are not integer token ids,
        ids outside the vocabulary (when ``vocab_size`` is known) and biases outside [-100, 100]."""
        if not self.logit_bias:
            return
        not_ids: list[str] = []
        out_of_vocab: list[int] = []
        out_of_range: dict[str, float] = {}
        for key, bias in self.logit_bias.items():
            if not re.fullmatch(r"\s*-?\d{1,20}\s*", key):
                not_ids.append(key)
            elif vocab_size is not None and not 0 <= int(key) < vocab_size:
                out_of_vocab.append(int(key))
            if not -100.0 <= bias <= 100.0:
                out_of_range[key] = bias
        problems = []
        if not_ids:
            problems.append(f"key(s) that are not integer token ids: {not_ids!r}")
        if out_of_vocab:
            problems.append(f"out-of-vocab token id(s) {out_of_vocab} (vocabulary size: {vocab_size})")
        if out_of_range:
            problems.append(f"bias value(s) outside [-100, 100]: {out_of_range!r}")
        if problems:
            raise InvalidRequestError("logit_bias contains " + "; ".join(problems) + ".", "logit_bias")

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

    def check_logprobs_limit(self, value: int | None, name: str, max_logprobs: int,
                             vocab_size: int | None = None) -> None:
        """vLLM 0.32's rule: -1 (the whole vocabulary) counts as ``vocab_size`` logprobs, and
        ``--max-logprobs -1`` allows up to ``vocab_size``; more than the limit is a 400."""
        if not value:
            return
        if vocab_size is None:  # the vocabulary is unknown here: -1 only passes an unbounded server
            if max_logprobs == -1 or (value != -1 and value <= max_logprobs):
                return
            wanted, limit = value, max_logprobs
        else:
            wanted = vocab_size if value == -1 else value
            limit = vocab_size if max_logprobs == -1 else max_logprobs
            if wanted <= limit:
                return
        shown = "-1 (the whole vocabulary)" if value == -1 else str(wanted)
        raise InvalidRequestError(f"Requested {name} of {shown}, which is greater than max allowed: {limit}. "
                                  "Start the server with a larger --max-logprobs (-1: no bound).", name)

    def check_logprob_token_ids(self) -> None:
        """vLLM's rules for ``logprob_token_ids`` that need only the request."""
        ids = self.logprob_token_ids  # type: ignore[attr-defined]
        if not ids:
            return
        if self.use_beam_search:
            raise InvalidRequestError("`logprob_token_ids` is not supported with beam search.", "logprob_token_ids")
        if len(ids) > MAX_LOGPROB_TOKEN_IDS:
            raise InvalidRequestError(f"Requested logprob_token_ids of length {len(ids)}, which is greater than "
                                      f"max allowed: {MAX_LOGPROB_TOKEN_IDS}", "logprob_token_ids")

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
            repetition_detection=rep, structured_outputs=self.structured_outputs_params())

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
