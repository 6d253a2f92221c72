"""Built-in logits processors: min_p, logit_bias, min_tokens (as vLLM v1's), and the adapter of
a request's own ``logits_processors`` (``per_request``).

Each keeps a sparse ``batch index -> state`` dict updated with ``process_dict_updates``
and rebuilds its small index tensors only when that dict changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lmserve.sampling_params import SamplingParams
from lmserve.worker.logits_processors.interface import BatchUpdate, LogitsProcessor, process_dict_updates
from lmserve.worker.logits_processors.per_request import RequestLogitsProcessorsAdapter

if TYPE_CHECKING:
    from lmserve.config import EngineConfig


def _index_tensor(data: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.long, device=device)


class MinPLogitsProcessor(LogitsProcessor):
    """min_p: drop tokens whose probability is below ``min_p * max probability``.

    Argmax-invariant, so the sampler applies it after temperature, to the tempered
    distribution (as vLLM v1). Rows without min_p are untouched.
    """

    def __init__(self, vllm_config: "EngineConfig | None", device: torch.device, is_pin_memory: bool) -> None:
        self.device = torch.device(device)
        self.min_p_by_index: dict[int, float] = {}
        self.batch_size = 0
        self.min_p: torch.Tensor | None = None  # [batch_size, 1] float32, None when no row uses min_p

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        changed = process_dict_updates(self.min_p_by_index, batch_update,
                                       lambda params, _p, _o: params.min_p or None)
        if batch_update is not None and batch_update.batch_size != self.batch_size:
            self.batch_size = batch_update.batch_size
            changed = True
        if not changed:
            return
        if not self.min_p_by_index:
            self.min_p = None
            return
        dense = [0.0] * self.batch_size
        for index, value in self.min_p_by_index.items():
            dense[index] = value
        self.min_p = torch.tensor(dense, dtype=torch.float32, device=self.device).unsqueeze(1)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.min_p is None:
            return logits
        probs = torch.softmax(logits, dim=-1)  # [B, V]
        threshold = probs.amax(dim=-1, keepdim=True).mul_(self.min_p)  # [B, 1]
        return logits.masked_fill_(probs < threshold, float("-inf"))


class LogitBiasLogitsProcessor(LogitsProcessor):
    """logit_bias: add ``bias`` to the logit of each listed token of the request."""

    def __init__(self, vllm_config: "EngineConfig | None", device: torch.device, is_pin_memory: bool) -> None:
        self.device = torch.device(device)
        self.biases: dict[int, dict[int, float]] = {}
        self.rows = self.cols = _index_tensor([], self.device)
        self.values = torch.empty(0, dtype=torch.float32, device=self.device)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not process_dict_updates(self.biases, batch_update, lambda params, _p, _o: params.logit_bias or None):
            return
        rows: list[int] = []
        cols: list[int] = []
        values: list[float] = []
        for index, bias in self.biases.items():
            rows.extend([index] * len(bias))
            cols.extend(bias.keys())
            values.extend(bias.values())
        self.rows, self.cols = _index_tensor(rows, self.device), _index_tensor(cols, self.device)
        self.values = torch.tensor(values, dtype=torch.float32, device=self.device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.biases:
            logits[self.rows, self.cols] += self.values.to(logits.dtype)
        return logits


class MinTokensLogitsProcessor(LogitsProcessor):
    """min_tokens: ban the request's stop/EOS token ids until it has ``min_tokens`` outputs.

    Reads the live output list at every ``update_state`` (called each step), so a row is
    released as soon as enough tokens exist. The banned set is ``all_stop_token_ids``
    plus the model EOS (``_eos_token_id``) when the params carry one.
    """

    def __init__(self, vllm_config: "EngineConfig | None", device: torch.device, is_pin_memory: bool) -> None:
        self.device = torch.device(device)
        # index -> (min_tokens, live output list, banned token ids)
        self.min_toks: dict[int, tuple[int, Sequence[int], set[int]]] = {}
        self.rows = self.cols = _index_tensor([], self.device)

    def is_argmax_invariant(self) -> bool:
        return False

    @staticmethod
    def new_state(params: SamplingParams, _prompt: list[int] | None,
                  output_tok_ids: list[int]) -> tuple[int, Sequence[int], set[int]] | None:
        if not params.min_tokens or len(output_tok_ids) >= params.min_tokens:
            return None
        banned = set(params.all_stop_token_ids)
        eos = getattr(params, "_eos_token_id", None)
        if eos is not None:
            banned.add(eos)
        if not banned:
            return None
        return params.min_tokens, output_tok_ids, banned

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        changed = process_dict_updates(self.min_toks, batch_update, self.new_state)
        done = [i for i, (n, out, _) in self.min_toks.items() if len(out) >= n]
        for index in done:
            del self.min_toks[index]
        if not (changed or done):
            return
        rows: list[int] = []
        cols: list[int] = []
        for index, (_, _, banned) in self.min_toks.items():
            rows.extend([index] * len(banned))
            cols.extend(banned)
        self.rows, self.cols = _index_tensor(rows, self.device), _index_tensor(cols, self.device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.min_toks:
            logits[self.rows, self.cols] = float("-inf")
        return logits


BUILTIN_LOGITS_PROCESSORS: tuple[type[LogitsProcessor], ...] = (
    MinTokensLogitsProcessor,
    LogitBiasLogitsProcessor,
    MinPLogitsProcessor,
    RequestLogitsProcessorsAdapter,  # a request's own ``logits_processors`` (--logits-processor-pattern)
)
