"""The LoRA delta of one step, batched over every row whatever its adapter.

A step's flat batch holds rows of up to ``max_loras`` adapters and of the base model. For a
projection module with weight W, each row x with adapter i gets ``x @ W^T + (x @ A_i^T) @ B_i``
(``LayerDelta``), the base rows nothing more. Two ways, chosen once per step by the builder:

* Segments (prefill-heavy steps, or every row on one adapter): the rows form runs of consecutive
  sequences with one adapter; per run ``h = x[run] @ A_i^T`` then, per shard block of ``B_i``,
  ``y[run, shard cols] += h[:, shard rows] @ B_i[block]``. Only useful flops; ``1 + shards`` torch
  calls per run and module, so it is used when the runs average ``SEGMENT_MIN_ROWS`` rows or more.
* Masked (decode steps: one row per sequence, adapters interleaved), no loop over rows or adapters:

      h = x @ A_cat^T        shrink: every row against the A rows of every active adapter  [T, C]
      h *= mask               mask[t, c] = 1 where column c belongs to row t's adapter      [T, C]
      y[:, cols_g] += h[:, g] @ B_g   expand, per output shard g (Q, K, V; gate, up; or the whole)

  ``A_cat`` stacks the active adapters' A rows shard by shard and ``B_g`` the adapters' B^T blocks
  of shard g, so a merged module's expand never multiplies the other shards' zero columns.

``A_cat`` / ``B_g`` are built once per set of active adapters and module and kept for the next
steps (``LoRABatchBuilder``: the last few sets), and the mask once per step and column layout, so a
steady decode batch concatenates nothing. A module no active adapter targets costs nothing. Zero
columns of the masked rows add exact zeros, so a base row's output is the base model's own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmserve.lora.checkpoint import LayerDelta, LoRAAdapter

# A step uses the segment form when its adapter runs average at least this many rows.
SEGMENT_MIN_ROWS = 16


@dataclass
class _Expand:
    """One output shard's expand: columns [h0, h1) of the shrink times ``b`` into y[:, y0:y1]."""
    h0: int
    h1: int
    y0: int
    y1: int
    b: torch.Tensor  # [h1 - h0, y1 - y0], contiguous


@dataclass
class _ModuleWeights:
    a_cat: torch.Tensor  # [C, in]: every active adapter's A rows, grouped by output shard
    owner: tuple[int, ...]  # per column of a_cat: the index of its adapter in the active set
    expands: list[_Expand]  # the masked form's per-shard expands
    own: list[tuple[torch.Tensor, list[_Expand]] | None]  # per adapter: its A and its blocks (segments)


def _blocks_of(delta: LayerDelta) -> list[_Expand]:
    return [_Expand(r0, r1, c0, c1, delta.b[r0:r1, c0:c1].contiguous()) for r0, r1, c0, c1 in delta.nonzero_blocks()]


class _ActiveSet:
    """The concatenated weights of one set of adapters, built per module on first use."""

    def __init__(self, adapters: tuple[LoRAAdapter, ...]) -> None:
        self.adapters = adapters  # held: the cache key is their identities
        self._modules: dict[str, _ModuleWeights | None] = {}

    def module(self, key: str) -> _ModuleWeights | None:
        if key not in self._modules:
            deltas = [ad.deltas.get(key) for ad in self.adapters]
            own = [None if d is None else (d.a, _blocks_of(d)) for d in deltas]
            if all(o is None for o in own):
                self._modules[key] = None
                return None
            groups: dict[tuple[int, int], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
            for slot, o in enumerate(own):
                if o is not None:
                    for blk in o[1]:
                        groups.setdefault((blk.y0, blk.y1), []).append((slot, o[0][blk.h0:blk.h1], blk.b))
            a_rows, owner, expands = [], [], []
            for (y0, y1), members in sorted(groups.items()):
                h0 = len(owner)
                for slot, a, _ in members:
                    a_rows.append(a)
                    owner.extend([slot] * a.shape[0])
                expands.append(_Expand(h0, len(owner), y0, y1, torch.cat([b for _, _, b in members]).contiguous()))
            self._modules[key] = _ModuleWeights(torch.cat(a_rows).contiguous(), tuple(owner), expands, own)
        return self._modules[key]


def _add_product(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> None:
    """y += h @ b in place (y may be a strided view), in y's dtype."""
    if y.dtype == b.dtype:
        y.addmm_(h, b)
    else:
        y.add_(torch.mm(h, b).to(y.dtype))


class LoRAStepMapping:
    """Which adapter each row of one step uses, and the delta of any module for those rows.
    Passed down the model as ``AttentionMetadata.lora`` (None when no row has an adapter).
    ``runs``: (first row, end row, adapter index) of each run of consecutive rows on one adapter;
    ``segmented``: whether the deltas are computed per run (else masked, see the module docstring)."""

    def __init__(self, active: _ActiveSet, token_slot: torch.Tensor, runs: list[tuple[int, int, int]],
                 segmented: bool) -> None:
        self.active = active
        self.token_slot = token_slot  # [T] int64: index into active.adapters, -1 for base rows
        self.num_tokens = int(token_slot.numel())
        self.runs = runs
        self.segmented = segmented
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def adapters(self) -> tuple[LoRAAdapter, ...]:
        return self.active.adapters

    def _mask(self, owner: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        mask = self._masks.get(owner)
        if mask is None:
            cols = torch.tensor(owner, device=self.token_slot.device)
            mask = (self.token_slot[:, None] == cols[None, :]).to(dtype)
            self._masks[owner] = mask
        return mask

    def add_delta(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, out] (the base output for x [T, in]) plus the rows' LoRA deltas of module ``key``."""
        weights = self.active.module(key)
        if weights is None:
            return y
        if x.shape[0] != self.num_tokens:
            raise ValueError(f"LoRA mapping is for {self.num_tokens} rows, the module got {x.shape[0]}")
        if not self.segmented:
            a = weights.a_cat
            h = F.linear(x if x.dtype == a.dtype else x.to(a.dtype), a)  # shrink [T, C]
            h.mul_(self._mask(weights.owner, h.dtype))
            for e in weights.expands:
                _add_product(y[:, e.y0:e.y1], h[:, e.h0:e.h1], e.b)
            return y
        for r0, r1, slot in self.runs:
            own = weights.own[slot]
            if own is None:
                continue
            a, blocks = own
            xs = x[r0:r1]
            h = F.linear(xs if xs.dtype == a.dtype else xs.to(a.dtype), a)
            for e in blocks:
                _add_product(y[r0:r1, e.y0:e.y1], h[:, e.h0:e.h1], e.b)
        return y


class LoRABatchBuilder:
    """Builds each step's ``LoRAStepMapping``; keeps the concatenated weights of the last
    ``max_sets`` adapter sets (a steady batch reuses its set step after step)."""

    def __init__(self, max_sets: int = 4) -> None:
        self.max_sets = max_sets
        self._sets: OrderedDict[tuple[int, ...], _ActiveSet] = OrderedDict()

    def build(self, per_seq: list[LoRAAdapter | None], query_lens: list[int],
              device: torch.device) -> LoRAStepMapping | None:
        """``per_seq[i]``: the adapter of the batch's i-th sequence (None: base), which has
        ``query_lens[i]`` rows. None when no sequence has an adapter."""
        distinct: dict[int, LoRAAdapter] = {}
        for ad in per_seq:
            if ad is not None:
                distinct.setdefault(id(ad), ad)
        if not distinct:
            return None
        adapters = tuple(sorted(distinct.values(), key=lambda a: (a.lora_id, id(a))))
        key = tuple(id(a) for a in adapters)
        active = self._sets.get(key)
        if active is None:
            active = self._sets[key] = _ActiveSet(adapters)
            while len(self._sets) > self.max_sets:
                self._sets.popitem(last=False)
        self._sets.move_to_end(key)
        pos = {id(a): i for i, a in enumerate(adapters)}
        seq_slots = [-1 if ad is None else pos[id(ad)] for ad in per_seq]
        runs: list[tuple[int, int, int]] = []
        row = 0
        for slot, n in zip(seq_slots, query_lens):
            if slot >= 0 and n > 0:
                if runs and runs[-1][1] == row and runs[-1][2] == slot:
                    runs[-1] = (runs[-1][0], row + n, slot)
                else:
                    runs.append((row, row + n, slot))
            row += n
        adapter_rows = sum(r1 - r0 for r0, r1, _ in runs)
        segmented = len(runs) == 1 or adapter_rows >= SEGMENT_MIN_ROWS * len(runs)
        slots = torch.tensor(seq_slots, dtype=torch.int64)
        token_slot = torch.repeat_interleave(slots, torch.tensor(query_lens, dtype=torch.int64)).to(device)
        return LoRAStepMapping(active, token_slot, runs, segmented)

    def clear(self) -> None:
        self._sets.clear()
