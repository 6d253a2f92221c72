"""The pooler: turns a pooling model's hidden states into per-prompt outputs (vLLM's ``Pooler``).

Tasks (``PoolingParams.task``, already verified, so ``normalize`` / ``use_activation`` /
``dimensions`` hold their final values):
- ``embed``: pool each prompt's rows by ``PoolerConfig.pooling_type`` (CLS: first token,
  LAST: last token, MEAN: mean of its tokens), keep the first ``dimensions`` values if set,
  then L2-normalize if ``normalize`` -> [d].
- ``token_embed``: every token's row, with the same ``dimensions`` / ``normalize`` per row -> [len, d].
- ``classify`` / ``score``: pool, apply the model's classifier head, subtract ``logit_bias``
  (vLLM's sign), then, if ``use_activation``, softmax over the labels (sigmoid when there is a
  single label, as for cross-encoders) -> [num_labels].
- ``token_classify``: the head on every token -> [len, num_labels], activation as above.
  With pooling type STEP only rows whose prompt token is ``step_tag_id`` are kept, and with
  ``returned_token_ids`` only those columns (chosen before the activation, as vLLM does).

Pooled values are computed in float32; every returned tensor is float32 on the hidden
states' device. Sequence tasks (embed / classify / score) need pooling type CLS, LAST or
MEAN; token tasks ignore the pooling type except STEP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.config import PoolerConfig
from lmserve.pooling_params import PoolingParams

SEQUENCE_TASKS = ("embed", "classify", "score")
TOKEN_TASKS = ("token_embed", "token_classify")
CLASSIFY_TASKS = ("classify", "score", "token_classify")
SEQUENCE_POOLING_TYPES = ("CLS", "LAST", "MEAN")


def supported_tasks(model_tasks: tuple[str, ...], config: PoolerConfig) -> tuple[str, ...]:
    """The subset of a model class's ``pooling_tasks`` that ``config`` can serve: with pooling
    type ALL or STEP (per-token poolings) only the token tasks remain."""
    if config.pooling_type in SEQUENCE_POOLING_TYPES or config.pooling_type is None:
        return tuple(model_tasks)
    return tuple(t for t in model_tasks if t in TOKEN_TASKS)


@dataclass
class PoolingMetadata:
    """The prompts of one pooling step, in the order of the hidden rows.

    Invariants: the three lists have one entry per sequence; sequence i owns hidden rows
    ``sum(prompt_lens[:i]) .. sum(prompt_lens[:i+1]) - 1``; ``len(prompt_token_ids[i]) ==
    prompt_lens[i]`` (only read by STEP pooling); every ``params[i].task`` is set.
    """

    prompt_lens: list[int]
    params: list[PoolingParams]
    prompt_token_ids: list[list[int]]


class Pooler(nn.Module):
    """Pools hidden states per ``PoolerConfig`` and each sequence's ``PoolingParams``.

    ``head`` maps [N, H] rows (any float dtype) to float32 logits [N, num_labels]; it is
    required for the classify / score / token_classify tasks. The pooler holds no parameters.
    """

    def __init__(self, config: PoolerConfig, head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 num_labels: int | None = None) -> None:
        super().__init__()
        if config.pooling_type is None:
            raise ValueError("the pooler config must be resolved (pooling_type set)")
        self.config = config
        self.head = head
        self.num_labels = num_labels

    def extra_repr(self) -> str:
        return f"pooling_type={self.config.pooling_type}, num_labels={self.num_labels}"

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, meta: PoolingMetadata) -> list[torch.Tensor]:
        """hidden [>= sum(prompt_lens), H]: the sequences' rows back to back (rows past them are
        ignored). Returns one float32 tensor per sequence, on ``hidden``'s device."""
        lens = meta.prompt_lens
        if len(meta.params) != len(lens):
            raise ValueError("PoolingMetadata needs one PoolingParams per sequence")
        if hidden.shape[0] < sum(lens):
            raise ValueError(f"{hidden.shape[0]} hidden rows for prompts of {sum(lens)} tokens")
        starts = [0] * len(lens)
        for i in range(1, len(lens)):
            starts[i] = starts[i - 1] + lens[i - 1]
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(meta.params):
            if p.task is None:
                raise ValueError("pooling params must be verified (task set) before pooling")
            groups.setdefault(p.task, []).append(i)
        out: list[torch.Tensor | None] = [None] * len(lens)
        for task, idx in groups.items():
            if task in SEQUENCE_TASKS:
                pooled = self._pool(hidden, idx, starts, lens)  # [n, H] float32
                results = self._embed(pooled, idx, meta) if task == "embed" else self._classify(pooled, idx, meta)
            elif task in TOKEN_TASKS:
                results = [self._tokens(hidden[starts[i]:starts[i] + lens[i]], i, task, meta) for i in idx]
            else:
                raise ValueError(f"Unknown pooling task {task!r}")
            for i, r in zip(idx, results):
                out[i] = r
        return out  # type: ignore[return-value]

    # -- sequence pooling ------------------------------------------------------------------
    def _pool(self, hidden: torch.Tensor, idx: list[int], starts: list[int], lens: list[int]) -> torch.Tensor:
        """-> [len(idx), H] float32: each selected sequence pooled by the config's pooling type."""
        ptype = self.config.pooling_type
        if ptype not in SEQUENCE_POOLING_TYPES:
            raise ValueError(f"pooling type {ptype} gives per-token outputs; it cannot serve "
                             "embed, classify or score requests")
        dev = hidden.device
        if ptype == "CLS":
            rows = torch.tensor([starts[i] for i in idx], device=dev)
            return hidden.index_select(0, rows).float()
        if ptype == "LAST":
            rows = torch.tensor([starts[i] + lens[i] - 1 for i in idx], device=dev)
            return hidden.index_select(0, rows).float()
        # MEAN: segment sums with index_add_ (one pass over the rows, no per-sequence loop).
        n = len(idx)
        seg_lens = torch.tensor([lens[i] for i in idx], device=dev)  # [n]
        total = int(sum(lens[i] for i in idx))
        seg = torch.repeat_interleave(torch.arange(n, device=dev), seg_lens, output_size=total)  # [total]
        if n == len(lens):  # every sequence: its rows are exactly the first `total` rows
            rows = hidden[:total]
        else:
            seg_starts = torch.tensor([starts[i] for i in idx], device=dev)  # [n] in `hidden`
            first = torch.cumsum(seg_lens, 0) - seg_lens  # [n] in the gathered rows
            rows = hidden.index_select(0, seg_starts[seg] + torch.arange(total, device=dev) - first[seg])
        sums = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=dev)
        sums.index_add_(0, seg, rows.float())
        return sums / seg_lens.unsqueeze(1).float()  # [n, H]

    def _embed(self, pooled: torch.Tensor, idx: list[int], meta: PoolingMetadata) -> list[torch.Tensor]:
        params = [meta.params[i] for i in idx]
        dims = {p.dimensions for p in params}
        if len(dims) == 1:  # the common case: one batched slice and normalize
            (d,) = dims
            x = pooled[:, :d] if d is not None else pooled
            return list(_normalize_rows(x, [bool(p.normalize) for p in params]).unbind(0))
        return [_embed_rows(pooled[j:j + 1], p)[0] for j, p in enumerate(params)]

    def _classify(self, pooled: torch.Tensor, idx: list[int], meta: PoolingMetadata) -> list[torch.Tensor]:
        logits = self._logits(pooled)  # [n, num_labels]
        flags = [meta.params[i].use_activation is not False for i in idx]
        if all(flags):
            return list(self._activate(logits).unbind(0))
        if not any(flags):
            return list(logits.unbind(0))
        return [self._activate(row[None])[0] if f else row for row, f in zip(logits, flags)]

    # -- token-wise ------------------------------------------------------------------------
    def _tokens(self, rows: torch.Tensor, i: int, task: str, meta: PoolingMetadata) -> torch.Tensor:
        """rows [len, H] of sequence i -> [kept rows, d | num_labels] float32."""
        p = meta.params[i]
        step = self.config.pooling_type == "STEP"
        keep = None
        if step and self.config.step_tag_id is not None:
            ids = torch.tensor(meta.prompt_token_ids[i], device=rows.device)
            keep = ids == self.config.step_tag_id  # [len]
        columns = self.config.returned_token_ids if step and self.config.returned_token_ids else None
        if task == "token_embed":
            data = rows.float()
            if keep is not None:
                data = data[keep]
            if columns is not None:
                data = data[:, columns]
            return _embed_rows(data, p)
        if keep is not None:
            rows = rows[keep]
        logits = self._logits(rows.float())  # [kept, num_labels]
        if columns is not None:
            logits = logits[:, columns]
        return self._activate(logits) if p.use_activation is not False else logits

    # -- heads -----------------------------------------------------------------------------
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ValueError("this model has no classification head")
        logits = self.head(x).float()
        if self.config.logit_bias is not None:
            logits = logits - self.config.logit_bias
        return logits

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid for one label (or one selected column), softmax over labels otherwise."""
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)


def _normalize_rows(x: torch.Tensor, flags: list[bool]) -> torch.Tensor:
    """L2-normalize the rows of x [n, d] whose flag is set."""
    if all(flags):
        return F.normalize(x, p=2, dim=-1)
    if not any(flags):
        return x
    mask = torch.tensor(flags, device=x.device).unsqueeze(1)
    return torch.where(mask, F.normalize(x, p=2, dim=-1), x)


def _embed_rows(x: torch.Tensor, p: PoolingParams) -> torch.Tensor:
    """Matryoshka truncation then optional L2 normalization of every row of x [n, H]."""
    if p.dimensions is not None:
        x = x[:, :p.dimensions]
    return F.normalize(x, p=2, dim=-1) if p.normalize else x
