"""Weights as loaders hand them to tensor-parallel layers, and the slicing those layers do on them.

A loader yields, per checkpoint tensor, a ``torch.Tensor``, a ``BlockQuantizedWeight`` (GGUF
blocks kept quantized) or, when the model is sharded, a ``LazyWeight``: a handle on the tensor in
its file (a safetensors slice, a memory-mapped GGUF tensor) that reads only what ``narrow`` asks
for. A tensor-parallel layer narrows each tensor to its rank's rows or columns
(``narrow_weight``), so no rank reads, dequantizes or holds the full matrix; every other tensor
(norms, replicated layers) is read whole (``materialize``).
"""

from __future__ import annotations

import logging

import torch

from lmserve.model.backends.block_formats import GROUP, BlockQuantizedWeight

logger = logging.getLogger(__name__)


class LazyWeight:
    """A checkpoint tensor not yet read. ``shape`` is its torch-layout shape; ``narrow`` reads one
    slice along ``dim`` and ``materialize`` the whole tensor, each as a ``torch.Tensor`` or (GGUF
    blocks kept quantized) a ``BlockQuantizedWeight``. Valid only until the loader yields the next
    tensor (the file may be closed then)."""

    name: str = ""

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor | BlockQuantizedWeight:
        raise NotImplementedError

    def materialize(self) -> torch.Tensor | BlockQuantizedWeight:
        raise NotImplementedError


Weight = torch.Tensor | BlockQuantizedWeight | LazyWeight


def materialize(w: Weight) -> torch.Tensor | BlockQuantizedWeight:
    """The whole tensor (``w`` itself unless it is a ``LazyWeight``)."""
    return w.materialize() if isinstance(w, LazyWeight) else w


def narrow_weight(w: Weight, dim: int, start: int, length: int, name: str = "") -> torch.Tensor | BlockQuantizedWeight:
    """``w``'s slice [start, start + length) along ``dim`` (0: rows, 1: columns of a matrix).

    Block-quantized weights stay quantized for row slices, and for column slices whose bounds are
    multiples of the 32-wide blocks; any other column slice is dequantized (and logged)."""
    if isinstance(w, LazyWeight):
        return w.narrow(dim, start, length)
    if isinstance(w, BlockQuantizedWeight):
        if dim == 0:
            return BlockQuantizedWeight(w.qtype, w.blocks[start:start + length].contiguous())
        if start % GROUP == 0 and length % GROUP == 0:
            return BlockQuantizedWeight(w.qtype, w.blocks[:, start // GROUP:(start + length) // GROUP].contiguous())
        logger.info("%s: columns [%d, %d) cut %s blocks of %d: this shard is dequantized", name or "weight",
                    start, start + length, w.qtype, GROUP)
        return w.dequantize().narrow(dim, start, length).contiguous()
    return w.narrow(dim, start, length)


def pad_rows(w: torch.Tensor | BlockQuantizedWeight, rows: int) -> torch.Tensor | BlockQuantizedWeight:
    """``w`` [n, ...] with zero rows appended up to ``rows`` (zero blocks are zero weights in every
    block format: d = m = 0)."""
    n = w.shape[0]
    if n == rows:
        return w
    if isinstance(w, BlockQuantizedWeight):
        pad = w.blocks.new_zeros((rows - n, *w.blocks.shape[1:]))
        return BlockQuantizedWeight(w.qtype, torch.cat([w.blocks, pad]))
    return torch.cat([w, w.new_zeros((rows - n, *w.shape[1:]))])


def cat_rows(parts: list[torch.Tensor | BlockQuantizedWeight]) -> torch.Tensor | BlockQuantizedWeight:
    """Row slices concatenated; dense if any part is (the quantized parts are then dequantized)."""
    if all(isinstance(p, BlockQuantizedWeight) for p in parts) and len({p.qtype for p in parts}) == 1:
        return BlockQuantizedWeight(parts[0].qtype, torch.cat([p.blocks for p in parts]))
    dense = [p.dequantize() if isinstance(p, BlockQuantizedWeight) else p for p in parts]
    return torch.cat(dense)
