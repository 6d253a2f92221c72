"""The LoRA delta of one step, batched over every row whatever its adapter.

A step's flat batch holds rows of up to ``max_loras`` adapters and of the base model. For a
projection module with weight W, each row x with adapter i gets ``x @ W^T + (x @ A_i^T) @ B_i``
(``LayerDelta``), the base rows nothing more.

Where the bf16 CPU kernel loads and the rows and factors are bf16, one native call per module does
it (``lms_lora_sbgemm``, ``cpu_kernels/lora_gemm.py``): the rows with an adapter, grouped by adapter
(``rows`` / ``slot_start``, once per step), each against its own adapter's factors only (packed once
per adapter and module; the set's tables of their addresses once per set and module). Otherwise
two torch forms, chosen once per step by the builder:

* Segments (prefill-heavy steps, or every row on one adapter): the rows form runs of consecutive
  sequences with one adapter; per run ``h = x[run] @ A_i^T`` then, per shard block of ``B_i``,
  ``y[run, shard cols] += h[:, shard rows] @ B_i[block]``. Only useful flops; ``1 + shards`` torch
  calls per run and module, so it is used for at most ``SEGMENT_MAX_RUNS`` runs averaging
  ``SEGMENT_MIN_ROWS`` rows or more.
* Masked (decode steps: one row per sequence, adapters interleaved), no loop over rows or adapters:

      h = x @ A_cat^T        shrink: every row against the A rows of every active adapter  [T, C]
      h *= mask               mask[t, c] = 1 where column c belongs to row t's adapter      [T, C]
      y += h @ B_diag         expand: one call, whatever the module's output shards

  ``A_cat`` stacks the active adapters' A rows shard by shard; ``B_diag`` stacks, per output shard
  g (Q, K, V; gate, up; or the whole), the adapters' B^T blocks of g, block-diagonally (zeros
  between shards). A merged module's expand multiplies those zeros but makes one small GEMM call
  instead of one per shard (``_one_expand``).

Each adapter's weights are prepared (packed for the panel GEMM, see ``_Weight``) once per module
and shared by every set it is in; ``A_cat`` / ``B_g`` are built on a set's first masked step and
kept for the next steps (``LoRABatchBuilder``: the last few sets), and the mask once per step and
column layout, so a steady decode batch concatenates nothing. A module no active adapter targets costs nothing. Zero
columns of the masked rows add exact zeros, so a base row's output is the base model's own.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from lmserve.lora.checkpoint import LayerDelta, LoRAAdapter
from lmserve.model.layers.cpu_kernels.lora_gemm import (CpuLoRAGemm, NativeTables, PackedFactors, StepCall,
                                                         get_lora_kernel)
from lmserve.model.layers.cpu_kernels.sgemm import get_panel_kernel

# A step uses the segment form when it has at most SEGMENT_MAX_RUNS runs of rows on one adapter
# (each run costs a few torch/kernel calls per module) averaging at least SEGMENT_MIN_ROWS rows.
SEGMENT_MAX_RUNS = 8
SEGMENT_MIN_ROWS = 16


class _Weight:
    """A [K, N] right-hand factor, multiplied by lmserve's own panel GEMM where it takes the dtype
    and shape (``cpu_kernels/sgemm.py``), else by torch. The panel kernel runs in the same OpenMP
    thread pool as the model's native kernels: torch's own pool, woken between two of them for a
    small matmul, finds the cores still held by the other pool's spinning threads (measured on the
    2-core test machine: a [32, 64] @ [64, 576] bf16 addmm took ~200 us inside a decode step
    against ~30 us alone)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w.contiguous()  # [K, N]
        self.n = w.shape[1]
        kernel = get_panel_kernel(w.dtype) if w.device.type == "cpu" else None
        wt = self.w.t()
        self.kernel = kernel if kernel is not None and kernel.takes(wt) else None
        self.panels = self.kernel.pack(wt) if self.kernel is not None else None

    def product(self, h: torch.Tensor) -> torch.Tensor:
        """h [M, K] @ w, in w's dtype."""
        h = h if h.dtype == self.w.dtype else h.to(self.w.dtype)
        if self.kernel is not None:
            return self.kernel.matmul(h, self.panels, self.n, None)
        return torch.mm(h, self.w)

    def add_product(self, y: torch.Tensor, h: torch.Tensor) -> None:
        """y += h @ w in place (y may be a strided view), in y's dtype."""
        if self.kernel is None and y.dtype == self.w.dtype:
            y.addmm_(h if h.dtype == self.w.dtype else h.to(self.w.dtype), self.w)
            return
        y.add_(self.product(h))

    def product_into(self, h: torch.Tensor, out: torch.Tensor) -> None:
        """out = h @ w (out [M, N] in w's dtype, unit column stride; the panel kernel writes in place)."""
        h = h if h.dtype == self.w.dtype else h.to(self.w.dtype)
        if self.kernel is not None:
            self.kernel.matmul(h, self.panels, self.n, None, out=out)
        else:
            torch.mm(h, self.w, out=out)


@dataclass
class _Expand:
    """One output shard's expand: columns [h0, h1) of the shrink times ``b`` into y[:, y0:y1]."""
    h0: int
    h1: int
    y0: int
    y1: int
    b: _Weight  # [h1 - h0, y1 - y0]


_Own = tuple[_Weight, list[_Expand]]  # one adapter's A^T and its shard blocks, for one module


def _prepare(delta: LayerDelta) -> _Own:
    return _Weight(delta.a.t()), [_Expand(r0, r1, c0, c1, _Weight(delta.b[r0:r1, c0:c1]))
                                  for r0, r1, c0, c1 in delta.nonzero_blocks()]


class _ModuleWeights:
    """One module's weights for a set of adapters: ``own`` per adapter (the segment form), and,
    built on the first masked step, ``a_cat`` [in, C] (every adapter's A^T columns grouped by
    output shard), ``owner`` (per column, the index of its adapter) and the per-shard expands."""

    def __init__(self, own: list[_Own | None]) -> None:
        self.own = own
        self._masked: tuple[_Weight, tuple[int, ...], list[_Expand]] | None = None

    def masked(self) -> tuple[_Weight, tuple[int, ...], list[_Expand]]:
        if self._masked is None:
            groups: dict[tuple[int, int], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
            for slot, o in enumerate(self.own):
                if o is not None:
                    for blk in o[1]:
                        groups.setdefault((blk.y0, blk.y1), []).append((slot, o[0].w[:, blk.h0:blk.h1], blk.b.w))
            a_cols, owner, expands = [], [], []
            for (y0, y1), members in sorted(groups.items()):
                h0 = len(owner)
                for slot, a, _ in members:
                    a_cols.append(a)
                    owner.extend([slot] * a.shape[1])
                expands.append(_Expand(h0, len(owner), y0, y1, _Weight(torch.cat([b for _, _, b in members]))))
            self._masked = (_Weight(torch.cat(a_cols, dim=1)), tuple(owner), _one_expand(expands))
        return self._masked


def _one_expand(expands: list[_Expand]) -> list[_Expand]:
    """Several shard expands as one: a block-diagonal B over the shards' column span (zeros off
    the blocks). One GEMM call instead of one per shard (each small call costs its fixed floor of
    tens of us, far above its flops); the zero blocks add exact zeros, so each column's value is
    the sum of the same nonzero products."""
    if len(expands) < 2:
        return expands
    c = expands[-1].h1
    y0, y1 = min(e.y0 for e in expands), max(e.y1 for e in expands)
    blocks = [e.b.w for e in expands]
    b = torch.zeros(c, y1 - y0, dtype=blocks[0].dtype)
    for e, w in zip(expands, blocks):
        b[e.h0:e.h1, e.y0 - y0:e.y1 - y0] += w
    return [_Expand(0, c, y0, y1, _Weight(b))]


class _ActiveSet:
    """The weights of one set of adapters, per module on first use. Each adapter's own prepared
    (packed) weights come from ``prepared`` / ``packed``, shared by every set it is in. ``kernel``:
    the native kernel where it applies to every factor of the set (bf16), else None."""

    def __init__(self, adapters: tuple[LoRAAdapter, ...],
                 prepared: weakref.WeakKeyDictionary[LoRAAdapter, dict[str, _Own]],
                 packed: weakref.WeakKeyDictionary[LoRAAdapter, dict[str, PackedFactors]],
                 kernel: CpuLoRAGemm | None) -> None:
        self.adapters = adapters  # held: the cache key is their identities
        self.key = tuple(id(a) for a in adapters)
        self.ids = frozenset(self.key)
        self._prepared = prepared
        self._packed = packed
        self._modules: dict[str, _ModuleWeights | None] = {}
        self._native: dict[str, NativeTables | None] = {}
        bf16 = all(d.a.dtype == d.b.dtype == torch.bfloat16 and d.a.device.type == "cpu"
                   for a in adapters for d in a.deltas.values())
        self.kernel = kernel if bf16 else None

    def _own(self, adapter: LoRAAdapter, key: str) -> _Own | None:
        delta = adapter.deltas.get(key)
        if delta is None:
            return None
        per_module = self._prepared.setdefault(adapter, {})
        if key not in per_module:
            per_module[key] = _prepare(delta)
        return per_module[key]

    def module(self, key: str) -> _ModuleWeights | None:
        if key not in self._modules:
            own = [self._own(ad, key) for ad in self.adapters]
            self._modules[key] = None if all(o is None for o in own) else _ModuleWeights(own)
        return self._modules[key]

    def _factors(self, adapter: LoRAAdapter, key: str) -> PackedFactors | None:
        delta = adapter.deltas.get(key)
        if delta is None or self.kernel is None:
            return None
        per_module = self._packed.setdefault(adapter, {})
        if key not in per_module:
            per_module[key] = self.kernel.pack_factors(delta.a, delta.b, delta.nonzero_blocks())
        return per_module[key]

    def native(self, key: str) -> NativeTables | None:
        """Module ``key``'s tables for the native kernel (``kernel`` not None); None where no
        adapter of the set has a delta there."""
        if key not in self._native:
            factors = [self._factors(ad, key) for ad in self.adapters]
            self._native[key] = None if all(f is None for f in factors) else self.kernel.tables(factors)
        return self._native[key]


def _expand(y: torch.Tensor, h: torch.Tensor, expands: list[_Expand]) -> torch.Tensor:
    """y += the expands of h, each into its own columns. Where they run on the panel kernel, each
    writes its columns of one contiguous buffer and a single add lands it on y (adds into a
    column slice of y are strided, and slow in bf16); else one addmm per expand."""
    if len(expands) > 1 and all(e.b.kernel is not None for e in expands) and y.is_contiguous():
        spans = sorted((e.y0, e.y1) for e in expands)
        if all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:])):  # disjoint columns
            covered = spans[0][0] == 0 and spans[-1][1] == y.shape[1] and all(
                prev[1] == nxt[0] for prev, nxt in zip(spans, spans[1:]))
            d = (torch.empty if covered else torch.zeros)(y.shape, dtype=expands[0].b.w.dtype)
            for e in expands:
                e.b.product_into(h[:, e.h0:e.h1], d[:, e.y0:e.y1])
            return y.add_(d)
    for e in expands:
        e.b.add_product(y[:, e.y0:e.y1], h[:, e.h0:e.h1])
    return y


class LoRAStepMapping:
    """Which adapter each row of one step uses, and the delta of any module for those rows.
    Passed down the model as ``AttentionMetadata.lora`` (None when no row has an adapter).
    ``runs``: (first row, end row, adapter index) of each run of consecutive rows on one adapter;
    ``segmented``: whether the deltas are computed per run (else masked, see the module docstring)."""

    def __init__(self, active: _ActiveSet, token_slot: torch.Tensor, runs: list[tuple[int, int, int]],
                 segmented: bool, adapters: tuple[LoRAAdapter, ...] | None = None) -> None:
        self.active = active
        self._adapters = adapters if adapters is not None else active.adapters
        self.token_slot = token_slot  # [T] int64: index into active.adapters, -1 for base rows
        self.num_tokens = int(token_slot.numel())
        self.runs = runs
        self.segmented = segmented
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}
        self._native_call: StepCall | None = None

    @property
    def adapters(self) -> tuple[LoRAAdapter, ...]:
        """The adapters this step's rows use (its set, ``active``, may hold more)."""
        return self._adapters

    def _mask(self, owner: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        mask = self._masks.get(owner)
        if mask is None:
            cols = torch.tensor(owner, device=self.token_slot.device)
            mask = (self.token_slot[:, None] == cols[None, :]).to(dtype)
            self._masks[owner] = mask
        return mask

    def _native(self, kernel: CpuLoRAGemm) -> StepCall:
        """The native call bound to this step's rows with an adapter, grouped by slot in row order
        (rows int32, slot_start int64 [slots + 1]), once per step."""
        if self._native_call is None:
            slots = self.token_slot.cpu()
            order = torch.argsort(slots, stable=True)
            base = int((slots < 0).sum())
            counts = torch.bincount(slots[slots >= 0], minlength=len(self.active.adapters))
            self._native_call = kernel.for_rows(order[base:].to(torch.int32),
                                                torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int64))
        return self._native_call

    def add_delta(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, out] (the base output for x [T, in]) plus the rows' LoRA deltas of module ``key``."""
        if x.shape[0] != self.num_tokens:
            raise ValueError(f"LoRA mapping is for {self.num_tokens} rows, the module got {x.shape[0]}")
        kernel = self.active.kernel
        if (kernel is not None and x.device.type == "cpu" and x.dtype == y.dtype == torch.bfloat16
                and kernel.takes(x.shape[1], x.dtype) and x.stride(-1) == 1 and y.stride(-1) == 1):
            native = self.active.native(key)
            if native is not None:
                self._native(kernel)(x, y, native)
            return y
        weights = self.active.module(key)
        if weights is None:
            return y
        if not self.segmented:
            a_cat, owner, expands = weights.masked()
            h = a_cat.product(x)  # shrink [T, C]
            h.mul_(self._mask(owner, h.dtype))
            return _expand(y, h, expands)
        for r0, r1, slot in self.runs:
            own = weights.own[slot]
            if own is None:
                continue
            a, blocks = own
            _expand(y[r0:r1], a.product(x[r0:r1]), blocks)
        return y


class LoRABatchBuilder:
    """Builds each step's ``LoRAStepMapping``; keeps the concatenated weights of the last
    ``max_sets`` adapter sets (a steady batch reuses its set step after step)."""

    def __init__(self, max_sets: int = 4, max_union: int = 8, native: bool | CpuLoRAGemm = True) -> None:
        """``native``: True uses the native kernel where it loads, False the torch forms only, a
        ``CpuLoRAGemm`` that kernel."""
        self.max_sets = max_sets
        self.max_union = max_union
        self._kernel = native if isinstance(native, CpuLoRAGemm) else get_lora_kernel() if native else None
        self._sets: OrderedDict[tuple[int, ...], _ActiveSet] = OrderedDict()
        # per adapter (alive while any request or the cache holds it): its prepared weights per module
        self._prepared: weakref.WeakKeyDictionary[LoRAAdapter, dict[str, _Own]] = weakref.WeakKeyDictionary()
        self._packed: weakref.WeakKeyDictionary[LoRAAdapter, dict[str, PackedFactors]] = weakref.WeakKeyDictionary()

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
        active = self._active_set(distinct)
        pos = {id(a): i for i, a in enumerate(active.adapters)}
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
        segmented = len(runs) <= SEGMENT_MAX_RUNS and adapter_rows >= SEGMENT_MIN_ROWS * len(runs)
        slots = torch.tensor(seq_slots, dtype=torch.int64)
        token_slot = torch.repeat_interleave(slots, torch.tensor(query_lens, dtype=torch.int64)).to(device)
        used = tuple(a for a in active.adapters if id(a) in distinct)
        return LoRAStepMapping(active, token_slot, runs, segmented, used)

    def _active_set(self, distinct: dict[int, LoRAAdapter]) -> _ActiveSet:
        """A kept set holding every adapter of the step (the smallest such), else a new one: the
        step's adapters joined with the last set's when the union has at most ``max_union``
        adapters. A set may hold adapters no row of the step uses: the masked form's mask keeps
        only each row's own adapter's columns, so those cost flops, never a different result,
        while adapters joining and leaving a running batch reuse one set's concatenated weights
        instead of building (concatenating and packing) one per combination."""
        wanted = set(distinct)
        supersets = [s for s in self._sets.values() if wanted <= s.ids]
        if supersets:
            active = min(supersets, key=lambda s: len(s.adapters))
        else:
            members = dict(distinct)
            if self._sets:
                last = next(reversed(self._sets.values()))
                union = {**{id(a): a for a in last.adapters}, **members}
                if len(union) <= self.max_union:
                    members = union
            adapters = tuple(sorted(members.values(), key=lambda a: (a.lora_id, id(a))))
            active = _ActiveSet(adapters, self._prepared, self._packed, self._kernel)
            self._sets[active.key] = active
            while len(self._sets) > self.max_sets:
                self._sets.popitem(last=False)
        self._sets.move_to_end(active.key)
        return active

    def clear(self) -> None:
        self._sets.clear()
        self._prepared.clear()
        self._packed.clear()
