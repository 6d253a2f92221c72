"""Paged attention: the layer, and the KV cache spec.

The KV cache of one layer is one tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 = keys, 1 = values). A token's K/V lives at the flat slot
``block_id * block_size + offset``; a sequence's context is read through its row of
``block_tables``. The computation is the layer's ``backend`` (``model/backends/attention.py``):
the pure-torch reference when built, the plan's choice once loaded; every backend agrees with
the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmserve.model.backends.attention import AttentionBackend, TorchPagedAttention
from lmserve.model.layers.attention_metadata import AttentionMetadata


@dataclass(frozen=True)
class KVCacheSpec:
    """What the engine needs to size and allocate the paged KV cache of a model.

    Invariant: each of the ``num_layers`` attention layers gets its own tensor of shape
    ``kv_cache_shape(num_blocks, block_size)`` and dtype ``dtype``; a block id names the
    same block in every layer, so one block costs ``bytes_per_block(block_size)`` in all.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_block(self, block_size: int) -> int:
        """Bytes of one block id across all layers, keys and values."""
        elem = self.dtype.itemsize
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * elem

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int, int]:
        """Shape of one layer's cache tensor."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def allocate(self, num_blocks: int, block_size: int, device: torch.device | str) -> list[torch.Tensor]:
        """One zeroed cache tensor per layer."""
        shape = self.kv_cache_shape(num_blocks, block_size)
        return [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(self.num_layers)]


class PagedAttention(nn.Module):
    """Attention of new tokens over their sequences' whole context, through a paged KV cache.

    ``forward`` first writes the new K/V at ``meta.slot_mapping``, then each new token at
    position p attends to keys at positions <= p of its own sequence (and > p - sliding_window
    when a window is set). ``backend`` does both (``model/backends/attention.py``).
    ``logits_soft_cap`` (Gemma 2): scores become ``cap * tanh(scores / cap)`` before the softmax.
    """

    backend: AttentionBackend

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None
        self.backend = TorchPagedAttention()

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"scale={self.scale:.4g}, sliding_window={self.sliding_window}, "
                f"logits_soft_cap={self.logits_soft_cap}, backend={self.backend.name}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D], kv_cache: [2, num_blocks, block_size, Hkv, D] -> [T, Hq, D]."""
        return self.backend.forward(self, q, k, v, kv_cache, meta)


def cache_sliding_window(model: nn.Module) -> int | None:
    """The window past which a sequence's KV blocks may be freed (``KVCacheManager``): the largest
    window when every ``PagedAttention`` layer of ``model`` has one; None when any layer is global
    (it reads every block) or the model has no paged attention."""
    windows = [m.sliding_window for m in model.modules() if isinstance(m, PagedAttention)]
    if not windows or any(w is None for w in windows):
        return None
    return max(windows)
