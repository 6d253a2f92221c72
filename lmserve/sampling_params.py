"""Sampling parameters of one request, field for field as vLLM's ``SamplingParams``.

Invariants after construction (``__post_init__`` validates and normalises):
- ``temperature < 1e-5`` means greedy; top_p/top_k/min_p are then reset to "off".
- ``stop`` and ``stop_token_ids`` are lists (possibly empty), never None.
- ``top_k`` of 0 or -1 means "off" and is stored as 0.
- ``extra_args`` is a dict (possibly empty): custom logits processors read it.
- ``stop_token_ids`` and ``allowed_token_ids`` hold no duplicates (first occurrences kept).
Validation errors are ``ValueError`` with a message naming the field, which the
server turns into a 400.
"""

from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass, field
from typing import Any

_SAMPLING_EPS = 1e-5
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM 0.32's bound on ``logprob_token_ids``


def _valid_unicode(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (no tokenizer or UTF-8 encoder can take it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
_MAX_SEED = 2**63 - 1


class RequestOutputKind(enum.IntEnum):
    """How outputs are reported while a request runs (as vLLM)."""

    CUMULATIVE = 0  # each output holds everything generated so far
    DELTA = 1  # each output holds only what is new since the last one
    FINAL_ONLY = 2  # a single output when the request finishes


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class StructuredOutputsParams:
    """One grammar constraint on the output (vLLM's ``StructuredOutputsParams``, same fields).

    Exactly one of ``json`` (a JSON schema, dict or JSON text), ``regex``, ``choice`` (a list of
    strings), ``grammar`` (EBNF/GBNF, or Lark when it has no ``::=``), ``json_object`` (any JSON
    object) and ``structural_tag`` (JSON text, xgrammar's structural tag) must be given; the
    others are options. ``lmserve.structured_output`` compiles it (xgrammar).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # Options.
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        given = self.constraint_kinds()
        if len(given) > 1:
            raise ValueError(f"structured_outputs takes exactly one kind of constraint, but several are given: "
                             f"{given}")
        if not given:
            raise ValueError("structured_outputs needs one kind of constraint (json, regex, choice, grammar, "
                             "json_object or structural_tag), but none is given")

    def constraint_kinds(self) -> list[str]:
        """The constraint fields that are set (``json_object=False`` counts as unset)."""
        return [k for k in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
                if getattr(self, k) is not None and not (k == "json_object" and self.json_object is False)]


@dataclass
class RepetitionDetectionParams:
    """Stop generation early when the output repeats an n-gram pattern.

    The request stops when the last ``max_pattern_size`` .. ``min_pattern_size`` token
    pattern has repeated at least ``min_count`` times back to back.
    """

    max_pattern_size: int = 0
    min_pattern_size: int = 0
    min_count: int = 0

    def __post_init__(self) -> None:
        if self.min_pattern_size < 0 or self.max_pattern_size < self.min_pattern_size:
            raise ValueError("repetition_detection needs 0 <= min_pattern_size <= max_pattern_size")
        if self.max_pattern_size > 0 and self.min_count < 2:
            raise ValueError("repetition_detection.min_count must be at least 2")


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    repetition_detection: RepetitionDetectionParams | None = None
    # Per-request logits processors (vLLM's v0 field): callables ``fn(output_ids, logits_row)`` or
    # ``fn(prompt_ids, output_ids, logits_row)`` returning the row, applied before penalties.
    logits_processors: list[Any] | None = None
    # Logprobs of exactly these token ids (plus the sampled one) at every generated position,
    # instead of the top-k (vLLM 0.32's ``logprob_token_ids``; at most 128 ids).
    logprob_token_ids: list[int] | None = None

    # Filled by the engine, not by users: token ids of ``bad_words`` and the EOS ids.
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    _eos_token_id: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        # Both are sets in meaning: duplicates would only cost every step that reads them.
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(dict.fromkeys(self.allowed_token_ids))
        if self.bad_words is None:
            self.bad_words = []
        if self.extra_args is None:
            self.extra_args = {}
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.top_k == -1:
            self.top_k = 0
        if self.logprobs is True:  # type: ignore[comparison-overlap]
            self.logprobs = 1
        if self.prompt_logprobs is True:  # type: ignore[comparison-overlap]
            self.prompt_logprobs = 1
        if self.best_of is None:
            self.best_of = self.n
        self._verify()
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the other filters cannot change the argmax.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        self._all_stop_token_ids.update(self.stop_token_ids)

    # ------------------------------------------------------------------ validation
    def _verify(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be at least 1, got {self.n}.")
        if self.best_of is not None and self.best_of < self.n:
            bad(f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not 0.0 < self.repetition_penalty <= 2.0 ** 31:
            bad(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not self.temperature >= 0.0:  # also catches NaN
            bad(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.seed is not None and not -_MAX_SEED - 1 <= self.seed <= _MAX_SEED:
            bad(f"seed must fit in a signed 64-bit integer, got {self.seed}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            bad(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        if self.logprobs is not None and self.logprobs < -1:
            bad(f"logprobs must be non-negative or -1 (whole vocabulary), got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < -1:
            bad(f"prompt_logprobs must be non-negative or -1 (whole vocabulary), got {self.prompt_logprobs}.")
        if self.truncate_prompt_tokens is not None and (
            self.truncate_prompt_tokens == 0 or self.truncate_prompt_tokens < -1
        ):
            bad(f"truncate_prompt_tokens must be -1 or at least 1, got {self.truncate_prompt_tokens}.")
        if any(not s for s in self.stop):  # type: ignore[union-attr]
            bad("stop cannot contain an empty string.")
        for name in ("stop", "bad_words"):
            for s in getattr(self, name):
                if not isinstance(s, str):
                    bad(f"{name} must hold strings, got {type(s).__name__}.")
                if not s.isascii() and not _valid_unicode(s):
                    bad(f"{name} contains a lone UTF-16 surrogate, which is not valid Unicode text.")
        if self.stop and not self.detokenize:
            bad("stop strings are only supported when detokenize is True.")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):  # type: ignore[union-attr]
            bad("stop_token_ids must be non-negative integers.")
        if self.allowed_token_ids is not None and len(self.allowed_token_ids) == 0:
            bad("allowed_token_ids is not None and empty!")
        if self.logit_bias is not None:
            for tok, b in self.logit_bias.items():
                if not -100.0 <= b <= 100.0:
                    bad(f"logit_bias values must be in [-100, 100], got {b} for token {tok}.")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "length_penalty"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                bad(f"{name} must be a finite number, got {value}.")
        if self.use_beam_search:
            if self.temperature > _SAMPLING_EPS:
                bad("beam search needs temperature 0.")
            if self.n < 1:
                bad("beam search needs n (the beam width) >= 1.")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            bad("extra_args must be a dict.")
        if self.logits_processors is not None and not all(callable(p) for p in self.logits_processors):
            bad("logits_processors must hold callables fn(output_ids, logits) or fn(prompt_ids, output_ids, logits).")
        if self.logprob_token_ids is not None:
            ids = self.logprob_token_ids
            if not isinstance(ids, list) or any(type(t) is not int for t in ids):
                bad("logprob_token_ids must be a list of integer token ids.")
            if len(ids) > MAX_LOGPROB_TOKEN_IDS:
                bad(f"Requested logprob_token_ids of length {len(ids)}, which is greater than max allowed: "
                    f"{MAX_LOGPROB_TOKEN_IDS}")
            if self.logprobs is not None and self.logprobs != len(ids):
                bad(f"When both logprobs and logprob_token_ids are set, logprobs must equal "
                    f"len(logprob_token_ids). Got logprobs={self.logprobs}, len(logprob_token_ids)={len(ids)}.")
            if self.use_beam_search:
                bad("logprob_token_ids is not supported with beam search.")

    def verify_against_vocab(self, vocab_size: int) -> None:
        """Token ids given by the user must exist in the model's vocabulary. Each message names
        every bad id of its field."""
        for name, ids in (("allowed_token_ids", self.allowed_token_ids),
                          ("stop_token_ids", self.stop_token_ids),
                          ("logit_bias", list(self.logit_bias or ())),
                          ("logprob_token_ids", self.logprob_token_ids)):
            bad_ids = [t for t in ids or () if not 0 <= t < vocab_size]
            if bad_ids:
                raise ValueError(f"{name} contains out-of-vocab token id(s) {bad_ids} (vocab size {vocab_size}).")

    @property
    def num_logprobs(self) -> int | None:
        """Logprobs wanted per generated token (-1: the whole vocabulary), or None. With
        ``logprob_token_ids`` and no ``logprobs``: their count (as vLLM)."""
        if self.logprobs is not None:
            return self.logprobs
        return len(self.logprob_token_ids) if self.logprob_token_ids else None

    # ------------------------------------------------------------------ derived
    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM_SEED if self.seed is not None else SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        return self._all_stop_token_ids

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        return self._bad_words_token_ids

    def update_from_tokenizer(self, tokenizer: Any) -> None:
        """Tokenizes ``bad_words`` (with and without a leading space, as vLLM)."""
        if not self.bad_words:
            self._bad_words_token_ids = []
            return
        out: list[list[int]] = []
        for word in self.bad_words:
            for text in (word, " " + word.lstrip()):
                ids = tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        self._bad_words_token_ids = out

    def update_from_generation_config(self, generation_config: dict[str, Any],
                                      eos_token_id: int | None) -> None:
        """As vLLM: the model's EOS joins ``all_stop_token_ids`` (so min_tokens masks it);
        generation_config.json's other EOS ids also become ``stop_token_ids`` unless
        ``ignore_eos``. The EOS itself is checked against ``ignore_eos`` by the engine."""
        if eos_token_id is not None:
            self._eos_token_id = eos_token_id
            self._all_stop_token_ids.add(eos_token_id)
        eos_ids = generation_config.get("eos_token_id", None)
        extra = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or ())
        extra.discard(eos_token_id)
        if extra:
            self._all_stop_token_ids.update(extra)
            if not self.ignore_eos:
                self.stop_token_ids = sorted(set(self.stop_token_ids) | extra)  # type: ignore[arg-type]

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)


@dataclass
class BeamSearchParams:
    """Parameters of ``LLM.beam_search`` (as vLLM)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
