"""The state of one request inside the engine: one dataclass, owned by the scheduler.

Invariants:
- ``all_token_ids == prompt_token_ids + output_token_ids`` at all times.
- ``0 <= num_computed_tokens <= num_tokens``; tokens below ``num_computed_tokens`` have
  their K/V in the request's blocks.
- ``output_token_ids`` is appended to in place, never replaced: logits processors hold
  a live reference to it.
- A pooling request (``pooling_params`` set) is never chunked and never reads the prefix
  cache: it runs its whole prompt in one step and finishes there, with no output tokens.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lmserve.lora.checkpoint import LoRAAdapter
from lmserve.lora.request import LoRARequest
from lmserve.pooling_params import PoolingParams
from lmserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything after PREEMPTED is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_REPETITION = 6

    @property
    def finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_REPETITION: "repetition",
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None  # None exactly for pooling requests
    eos_token_id: int | None = None
    priority: int = 0
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.time)
    prompt: str | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit of the first scheduling, -1 before
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    max_tokens: int = 16  # resolved against max_model_len by the engine
    block_hashes: list[bytes] = field(default_factory=list)  # of each full block of all_token_ids
    generator: torch.Generator | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Prompt logprobs are computed chunk by chunk; the scheduler skips the prefix cache for them.
    prompt_logprobs_done: int = 0
    pooling_params: PoolingParams | None = None  # set for embed/classify/score requests
    token_type_ids: list[int] | None = None  # segment ids of a cross-encoder pair, one per prompt token
    # structured outputs: this sequence's grammar state (lmserve.structured_output.GrammarState), or None.
    # Invariant: it has accepted exactly ``output_token_ids`` (the engine advances it on every append).
    grammar: Any = None
    # The LoRA adapter it runs with (``lmserve/lora``): the request, and the loaded weights, held
    # until the request finishes so that unloading the adapter never frees them under it.
    lora_request: LoRARequest | None = None
    lora: LoRAAdapter | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        if self.token_type_ids is not None and len(self.token_type_ids) != len(self.prompt_token_ids):
            raise ValueError("token_type_ids must have one entry per prompt token")
        if (self.sampling_params is None) == (self.pooling_params is None):
            raise ValueError("a request has either sampling params or pooling params")
        if self.sampling_params is not None and self.sampling_params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.sampling_params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def lora_id(self) -> int | None:
        return None if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def is_pooling(self) -> bool:
        return self.pooling_params is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params is not None and self.sampling_params.prompt_logprobs is not None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def sort_key(self) -> tuple[int, float]:
        """Lower sorts first: what the priority policy serves first."""
        return (self.priority, self.arrival_time)
