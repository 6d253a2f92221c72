"""Paged attention: the pure-torch reference backend, and the KV cache spec.

The KV cache of one layer is one tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 = keys, 1 = values). A token's K/V lives at the flat slot
``block_id * block_size + offset``; a sequence's context is read through its row of
``block_tables``. Fast backends (a CPU kernel, Triton on CUDA) must agree with this one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.cpu_kernels import CpuPagedAttention, get_paged_attention_kernel, log_fallback_once


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


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new keys/values at their slots; slots < 0 are skipped (padding tokens).

    k, v: [T, Hkv, D]; kv_cache: [2, num_blocks, block_size, Hkv, D]; slot_mapping: [T].
    """
    num_tokens = k.shape[0]
    slots = slot_mapping[:num_tokens]
    key_cache = kv_cache[0].view(-1, *kv_cache.shape[-2:])  # [num_slots, Hkv, D]
    value_cache = kv_cache[1].view(-1, *kv_cache.shape[-2:])
    if slots.device.type == "cpu" and bool((slots >= 0).all()):
        key_cache.index_copy_(0, slots, k.to(key_cache.dtype))
        value_cache.index_copy_(0, slots, v.to(value_cache.dtype))
        return
    valid = slots >= 0  # boolean indexing: a device sync on CUDA, only on this reference path
    key_cache[slots[valid]] = k[valid].to(key_cache.dtype)
    value_cache[slots[valid]] = v[valid].to(value_cache.dtype)


# Chunks continuing a cached context go to the CPU decode kernel (as qlen one-token queries) where
# that measured faster than gather + SDPA (benchmarks/attention_microbench.py --prefill):
# - fp32: up to 16 tokens (Zen 4, Sapphire Rapids);
# - bf16 on CPUs without AMX: any length (Zen 4: torch's bf16 flash attention has no fast kernel);
# - bf16 with AMX, where torch's runs on AMX tiles: up to 12,288 query-key pairs (qlen x seq_len).
#   Sapphire Rapids, 14/2 heads: ctx 100 qlen 32 native 0.27 vs SDPA 0.32 ms, qlen 128 1.34 vs 0.97;
#   ctx 1000 qlen 8 0.53 vs 0.61, qlen 16 0.96 vs 0.74.
NATIVE_PREFILL_MAX_QLEN_FP32 = 16
NATIVE_PREFILL_MAX_PAIRS_BF16_AMX = 12288


@functools.cache
def _torch_sdpa_on_amx() -> bool:
    return bool(torch.cpu._is_amx_tile_supported())


def prefill_on_native_kernel(dtype: torch.dtype, qlen: int, seq_len: int) -> bool:
    """Whether a chunk of ``qlen`` tokens ending a ``seq_len``-token context runs on the decode kernel."""
    if dtype != torch.bfloat16:
        return qlen <= NATIVE_PREFILL_MAX_QLEN_FP32
    return not _torch_sdpa_on_amx() or qlen * seq_len <= NATIVE_PREFILL_MAX_PAIRS_BF16_AMX


class PagedAttention(nn.Module):
    """Attention of new tokens over their sequences' whole context, through a paged KV cache.

    ``forward`` first writes the new K/V at ``meta.slot_mapping``, then each new token at
    position p attends to keys at positions <= p of its own sequence (and > p - sliding_window
    when a window is set). Decodes (the first ``meta.num_decodes`` sequences) run as one
    batched computation; prefill chunks one sequence at a time with SDPA.

    On CPU the KV write, the decodes and chunks that continue a cached context (in bf16 on a
    CPU with AMX: every prefill chunk, in one call) run on native kernels (``cpu_kernels``: they
    read K/V in place through the block table, no gather copy). ``LMSERVE_DISABLE_CPU_KERNELS=1``,
    a build failure or inputs they do not take fall back to the pure-torch ``write_kv_cache`` /
    ``_decode`` / ``_prefill``, which they must agree with.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"scale={self.scale:.4g}, sliding_window={self.sliding_window}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D], kv_cache: [2, num_blocks, block_size, Hkv, D] -> [T, Hq, D]."""
        kernel = self._cpu_kernel(q, kv_cache, meta)
        if kernel is None or not kernel.write_kv(k, v, kv_cache, meta.slot_mapping):
            write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)  # [T, Hq, D]
        num_tokens = meta.num_tokens
        if num_tokens < q.shape[0]:
            out[num_tokens:] = 0  # padding rows past the batch's tokens
        nd = meta.num_decodes
        if nd > 0 and (kernel is None or not kernel.decode(q[:nd], kv_cache, meta.block_tables, meta.seq_lens,
                                                           out[:nd], self.scale, self.sliding_window,
                                                           torch.get_num_threads())):
            out[:nd] = self._decode(q[:nd], kv_cache, meta)
        start = nd  # decodes have one token each
        if nd < meta.num_seqs and kernel is not None and kernel.takes_chunks(q, kv_cache, self.sliding_window):
            qsl = meta.query_start_loc[nd:].cpu()
            if kernel.chunks(q[nd:num_tokens], kv_cache, meta.block_tables[nd:], qsl - qsl[0], meta.seq_lens[nd:],
                             out[nd:num_tokens], self.scale, torch.get_num_threads()):
                return out
        for i in range(nd, meta.num_seqs):
            qlen = meta.query_lens_cpu[i]
            if qlen == 0:
                continue
            end = start + qlen
            if kernel is None or not self._prefill_native(i, q[start:end], kv_cache, meta, out[start:end], kernel):
                out[start:end] = self._prefill(i, q[start:end], k[start:end], v[start:end], kv_cache, meta)
            start = end
        return out

    @staticmethod
    def _cpu_kernel(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> CpuPagedAttention | None:
        """The native CPU kernels when they are on, built, and take this call's tensors."""
        if q.device.type != "cpu":
            return None
        kernel = get_paged_attention_kernel()
        if kernel is None:
            return None
        reason = kernel.unsupported(q, kv_cache, meta)
        if reason is not None:
            log_fallback_once(reason)
            return None
        return kernel

    # -- decodes: one token per sequence, batched ----------------------------------------------
    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [nd, Hq, D] -> [nd, Hq, D]; sequence i attends to its first seq_lens[i] cached tokens."""
        nd = q.shape[0]
        bs = meta.block_size
        max_len = max(meta.seq_lens_cpu[:nd])
        nblocks = (max_len + bs - 1) // bs
        L = nblocks * bs
        blocks = meta.block_tables[:nd, :nblocks].reshape(-1).long()  # [nd * nb]
        # Gather each sequence's blocks (index_select is ~2x faster than advanced indexing on CPU),
        # then lay K/V out as [nd, Hkv, L, D] so both matmuls are plain batched GEMMs.
        keys = kv_cache[0].index_select(0, blocks).view(nd, L, self.num_kv_heads, self.head_dim)
        values = kv_cache[1].index_select(0, blocks).view(nd, L, self.num_kv_heads, self.head_dim)
        keys = keys.transpose(1, 2).contiguous().to(q.dtype)  # [nd, Hkv, L, D]
        values = values.transpose(1, 2).contiguous().to(q.dtype)  # [nd, Hkv, L, D]
        pos = torch.arange(L, device=q.device)  # [L]
        seq_lens = meta.seq_lens[:nd].to(pos.dtype).unsqueeze(1)  # [nd, 1]
        mask = pos.unsqueeze(0) < seq_lens  # [nd, L]; also hides padding blocks' garbage
        if self.sliding_window is not None:
            mask &= pos.unsqueeze(0) >= seq_lens - self.sliding_window
        # GQA without repeating K/V: the G query heads of one KV head form the rows of one GEMM.
        g = self.num_heads // self.num_kv_heads
        qg = q.reshape(nd, self.num_kv_heads, g, self.head_dim)  # [nd, Hkv, G, D]
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * self.scale  # [nd, Hkv, G, L] fp32
        scores.masked_fill_(~mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)  # [nd, Hkv, G, L]
        out = torch.matmul(probs, values)  # [nd, Hkv, G, D]
        return out.reshape(nd, self.num_heads, self.head_dim)

    # -- prefills: one sequence (chunk) at a time ----------------------------------------------
    def _prefill_native(self, i: int, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                        out: torch.Tensor, kernel: CpuPagedAttention) -> bool:
        """A chunk q [qlen, Hq, D] that continues a cached context, on the decode kernel as qlen
        one-token queries (row r sees the first ctx_len + r + 1 tokens of the sequence's blocks),
        into out [qlen, Hq, D]. Only where that measured faster than gather + SDPA
        (``prefill_on_native_kernel``). False (nothing written) otherwise."""
        qlen = q.shape[0]
        seq_len = meta.seq_lens_cpu[i]
        if seq_len == qlen or not prefill_on_native_kernel(q.dtype, qlen, seq_len):
            return False
        seq_lens = torch.arange(seq_len - qlen + 1, seq_len + 1, dtype=torch.int32)  # [qlen]
        tables = meta.block_tables[i:i + 1].expand(qlen, -1)  # [qlen, W], one row repeated (stride 0)
        return kernel.decode(q, kv_cache, tables, seq_lens, out, self.scale, self.sliding_window,
                             torch.get_num_threads())

    def _prefill(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """q: [qlen, Hq, D], k/v: [qlen, Hkv, D] (already in the cache) -> [qlen, Hq, D]."""
        qlen = q.shape[0]
        seq_len = meta.seq_lens_cpu[i]
        ctx_len = seq_len - qlen  # tokens cached before this chunk
        if ctx_len > 0:
            bs = meta.block_size
            nblocks = (seq_len + bs - 1) // bs
            table = meta.block_tables[i, :nblocks].long()  # [nb]
            keys = kv_cache[0].index_select(0, table).view(-1, self.num_kv_heads, self.head_dim)[:seq_len]
            values = kv_cache[1].index_select(0, table).view(-1, self.num_kv_heads, self.head_dim)[:seq_len]
        else:
            keys, values = k, v
        mask = None
        if ctx_len > 0 or self.sliding_window is not None:
            q_pos = torch.arange(ctx_len, seq_len, device=q.device).unsqueeze(1)  # [qlen, 1]
            k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)  # [1, seq_len]
            mask = k_pos <= q_pos  # [qlen, seq_len]
            if self.sliding_window is not None:
                mask &= k_pos > q_pos - self.sliding_window
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, Hq, qlen, D]
            keys.to(q.dtype).transpose(0, 1).unsqueeze(0),  # [1, Hkv, seq_len, D]
            values.to(q.dtype).transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [1, Hq, qlen, D]
        return out.squeeze(0).transpose(0, 1)
