"""What the engine returns to callers, shaped as vLLM's ``RequestOutput``.

``logprobs`` of a completion is a list with one dict per generated token, mapping
token id -> ``Logprob``; each dict holds the top-k tokens and always the sampled one.
``prompt_logprobs`` has one entry per prompt token, the first being None (nothing
predicts the first token).

A whole-vocabulary entry (``logprobs``/``prompt_logprobs`` of -1) is a ``VocabLogprobs``: a
read-only mapping over two arrays (ids by descending logprob, and their logprobs), 8 bytes a
token instead of a ``Logprob`` object each; ``Logprob`` objects are made as they are read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


class VocabLogprobs(Mapping):
    """{token id: Logprob} over the whole vocabulary, iterated best first.

    ``ids`` (int) are the vocabulary sorted by descending ``lps`` (float32); entry i has rank
    i + 1, except ``chosen`` (the sampled or prompt token), whose rank is ``chosen_rank``
    (1 + the number of tokens strictly more likely, as for top-k entries). ``texts[id]`` is
    the decoded token (None: no tokenizer)."""

    __slots__ = ("ids", "lps", "chosen", "chosen_rank", "texts", "_pos")

    def __init__(self, ids: np.ndarray, lps: np.ndarray, chosen: int, chosen_rank: int,
                 texts: Sequence[str] | None) -> None:
        self.ids, self.lps, self.chosen, self.chosen_rank, self.texts = ids, lps, chosen, chosen_rank, texts
        self._pos: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids.tolist())

    def __contains__(self, token_id: object) -> bool:
        return isinstance(token_id, int) and 0 <= token_id < len(self.ids)

    def _entry(self, token_id: int, pos: int, lp: float) -> Logprob:
        rank = self.chosen_rank if token_id == self.chosen else pos + 1
        return Logprob(lp, rank, None if self.texts is None else self.texts[token_id])

    def __getitem__(self, token_id: int) -> Logprob:
        if token_id not in self:
            raise KeyError(token_id)
        if self._pos is None:
            self._pos = np.empty(len(self.ids), dtype=np.int64)
            self._pos[self.ids] = np.arange(len(self.ids))
        pos = int(self._pos[token_id])
        return self._entry(token_id, pos, float(self.lps[pos]))

    def ranked_items(self) -> list[tuple[int, Logprob]]:
        """Every (id, Logprob), best first (one pass over the arrays, no sort)."""
        return [(t, self._entry(t, i, lp)) for i, (t, lp) in enumerate(zip(self.ids.tolist(), self.lps.tolist()))]

    def items(self):  # type: ignore[override]
        return self.ranked_items()


SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "repetition" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    kv_transfer_params: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
                f"outputs={self.outputs!r}, finished={self.finished}, "
                f"num_cached_tokens={self.num_cached_tokens})")


@dataclass
class PoolingOutput:
    """The pooled result of one prompt. ``data`` is a float32 CPU tensor:
    [hidden] (or [dimensions]) for embed, [num_labels] for classify, [1] for score,
    [num_tokens, hidden | num_labels] for token_embed / token_classify."""

    data: Any  # torch.Tensor


@dataclass
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    num_cached_tokens: int = 0
    prompt: str | None = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(request_id={self.request_id!r}, outputs={self.outputs!r}, "
                f"prompt_token_ids={self.prompt_token_ids!r}, finished={self.finished})")


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)

    @classmethod
    def from_base(cls, out: PoolingOutput) -> "EmbeddingOutput":
        if out.data.dim() != 1:
            raise ValueError("an embedding must be one vector")
        return cls(out.data.tolist())


@dataclass
class ClassificationOutput:
    probs: list[float]  # probabilities (or raw logits when activation is off), one per label

    @property
    def num_classes(self) -> int:
        return len(self.probs)

    @classmethod
    def from_base(cls, out: PoolingOutput) -> "ClassificationOutput":
        if out.data.dim() != 1:
            raise ValueError("a classification must be one vector")
        return cls(out.data.tolist())


@dataclass
class ScoringOutput:
    score: float

    @classmethod
    def from_base(cls, out: PoolingOutput) -> "ScoringOutput":
        if out.data.dim() > 1 or out.data.numel() != 1:
            raise ValueError("a score must be one number")
        return cls(float(out.data.reshape(-1)[0]))


def _typed_request_output(output_cls: type):
    class _Typed(PoolingRequestOutput):
        @classmethod
        def from_base(cls, base: PoolingRequestOutput):
            return cls(base.request_id, output_cls.from_base(base.outputs), base.prompt_token_ids,
                       base.finished, base.num_cached_tokens, base.prompt)
    return _Typed


class EmbeddingRequestOutput(_typed_request_output(EmbeddingOutput)):
    """``outputs`` is an ``EmbeddingOutput``."""


class ClassificationRequestOutput(_typed_request_output(ClassificationOutput)):
    """``outputs`` is a ``ClassificationOutput``."""


class ScoringRequestOutput(_typed_request_output(ScoringOutput)):
    """``outputs`` is a ``ScoringOutput``."""
