"""The LoRA delta of one step, batched over every row whatever its adapter.

A step's flat batch holds rows of up to ``max_loras`` adapters and of the base model. For a
projection module with weight W, each row x with adapter i gets ``x @ W^T + (x @ A_i^T) @ B_i``
(``LayerDelta``), the base rows nothing more. Computed with no loop over requests or adapters:

    h = x @ A_cat^T          shrink: every row against the A rows of every active adapter  [T, C]
    h *= mask                 mask[t, c] = 1 where column c belongs to row t's adapter      [T, C]
    y += h @ B_cat            expand                                                       [T, out]

``A_cat`` / ``B_cat`` stack the active adapters' A and B^T for that module (C = the sum of their
ranks there), in the LoRA dtype. They are built once per set of active adapters and module and
kept for the next steps (``LoRABatchBuilder``: the last few sets), so a steady decode batch
concatenates nothing. A module no active adapter targets costs nothing. The extra work is
``2 * T * C * (in + out)`` flops next to the base ``2 * T * in * out``; zero columns of the masked
rows add exact zeros, so a base row's output is the base model's own.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from lmserve.lora.checkpoint import LoRAAdapter

# (A_cat [C, in], B_cat [C, out], columns per active adapter)
_ModuleWeights = tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]


class _ActiveSet:
    """The concatenated weights of one set of adapters, built per module on first use."""

    def __init__(self, adapters: tuple[LoRAAdapter, ...]) -> None:
        self.adapters = adapters  # held: the cache key is their identities
        self._modules: dict[str, _ModuleWeights | None] = {}

    def module(self, key: str) -> _ModuleWeights | None:
        if key not in self._modules:
            deltas = [ad.deltas.get(key) for ad in self.adapters]
            present = [d for d in deltas if d is not None]
            self._modules[key] = None if not present else (
                torch.cat([d.a for d in present]).contiguous(), torch.cat([d.b for d in present]).contiguous(),
                tuple(0 if d is None else d.a.shape[0] for d in deltas))
        return self._modules[key]


class LoRAStepMapping:
    """Which adapter each row of one step uses, and the delta of any module for those rows.
    Passed down the model as ``AttentionMetadata.lora`` (None when no row has an adapter)."""

    def __init__(self, active: _ActiveSet, token_slot: torch.Tensor) -> None:
        self.active = active
        self.token_slot = token_slot  # [T] int64: index into active.adapters, -1 for base rows
        self.num_tokens = int(token_slot.numel())
        self.uniform = len(active.adapters) == 1 and bool((token_slot == 0).all())
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def adapters(self) -> tuple[LoRAAdapter, ...]:
        return self.active.adapters

    def _mask(self, widths: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        mask = self._masks.get(widths)
        if mask is None:
            owner = torch.repeat_interleave(torch.arange(len(widths), device=self.token_slot.device),
                                            torch.tensor(widths, device=self.token_slot.device))
            mask = (self.token_slot[:, None] == owner[None, :]).to(dtype)
            self._masks[widths] = mask
        return mask

    def add_delta(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, out] (the base output for x [T, in]) plus the rows' LoRA deltas of module ``key``."""
        weights = self.active.module(key)
        if weights is None:
            return y
        if x.shape[0] != self.num_tokens:
            raise ValueError(f"LoRA mapping is for {self.num_tokens} rows, the module got {x.shape[0]}")
        a, b, widths = weights
        h = F.linear(x if x.dtype == a.dtype else x.to(a.dtype), a)  # shrink [T, C]
        if not self.uniform:
            h.mul_(self._mask(widths, h.dtype))
        if y.dtype == b.dtype and y.is_contiguous():
            return y.addmm_(h, b)
        return y.add_(torch.mm(h, b).to(y.dtype))


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
        slots = torch.tensor([-1 if ad is None else pos[id(ad)] for ad in per_seq], dtype=torch.int64)
        token_slot = torch.repeat_interleave(slots, torch.tensor(query_lens, dtype=torch.int64)).to(device)
        return LoRAStepMapping(active, token_slot)

    def clear(self) -> None:
        self._sets.clear()
