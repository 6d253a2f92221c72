"""Backends of ``PagedAttention``: the pure-torch reference and lmserve's native CPU kernels.

A backend's ``forward(layer, q, k, v, kv_cache, meta)`` first writes the new K/V at
``meta.slot_mapping`` (slots < 0 skipped), then each new token at position p attends to keys at
positions <= p of its own sequence (and > p - sliding_window when the layer has a window); a
layer's ``logits_soft_cap`` caps the scores (``cap * tanh(s / cap)``), which only the reference runs.
Decodes (the first ``meta.num_decodes`` sequences, one token each) come first in the batch.
The KV cache of one layer is ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (0 = keys,
1 = values); a token's K/V lives at slot ``block_id * block_size + offset``.

``NativePagedAttention`` must agree with ``TorchPagedAttention`` (tests hold them to it). It runs
the KV write and the decodes on the native kernels always; prefill chunks by a fixed policy:
- all of a step's chunks in one AMX call (``CpuPagedAttention.chunks``) when the plan found AMX
  for this layer (bf16, head dim % 64 == 0, no window) and the cache's block size is a multiple
  of 16 (a property of the engine's cache, fixed for its lifetime);
- else per chunk: a chunk continuing a cached context runs on the decode kernel as one-token
  queries where that measured faster than gather + SDPA (``prefill_on_decode_kernel``), and
  everything else on the reference's SDPA path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.cpu_kernels.paged_attention import CpuPagedAttention

# Where a chunk continuing a cached context runs on the decode kernel instead of gather + SDPA
# (benchmarks/README.md, "Kernel measurements", attention_microbench.py --prefill):
# fp32 up to this many query tokens; bf16 any length unless torch's SDPA runs on AMX tiles, then
# up to this many query x key pairs.
DECODE_KERNEL_MAX_QLEN_FP32 = 16
DECODE_KERNEL_MAX_PAIRS_BF16_AMX = 12288


def prefill_on_decode_kernel(dtype: torch.dtype, qlen: int, seq_len: int, sdpa_on_amx: bool) -> bool:
    """Whether a chunk of ``qlen`` tokens ending a ``seq_len``-token context runs on the decode
    kernel (``sdpa_on_amx``: torch's CPU SDPA runs on AMX tiles here)."""
    if dtype != torch.bfloat16:
        return qlen <= DECODE_KERNEL_MAX_QLEN_FP32
    return not sdpa_on_amx or qlen * seq_len <= DECODE_KERNEL_MAX_PAIRS_BF16_AMX


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


class AttentionBackend:
    name = ""

    def forward(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D] (rows past ``meta.num_tokens``: 0)."""
        raise NotImplementedError


class TorchPagedAttention(AttentionBackend):
    """The reference: decodes as one batched computation over gathered blocks, prefill chunks one
    sequence at a time with torch's SDPA. Runs on any device."""

    name = "torch"

    def forward(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        out = _output_for(q, meta)
        nd = meta.num_decodes
        if nd > 0:
            out[:nd] = self.decode(layer, q[:nd], kv_cache, meta)
        start = nd
        for i in range(nd, meta.num_seqs):
            qlen = meta.query_lens_cpu[i]
            end = start + qlen
            if qlen:
                out[start:end] = self.prefill(layer, i, q[start:end], k[start:end], v[start:end], kv_cache, meta)
            start = end
        return out

    @staticmethod
    def decode(layer: nn.Module, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [nd, Hq, D] -> [nd, Hq, D]; sequence i attends to its first seq_lens[i] cached tokens."""
        nd, hkv, d = q.shape[0], layer.num_kv_heads, layer.head_dim
        bs = meta.block_size
        max_len = max(meta.seq_lens_cpu[:nd])
        nblocks = (max_len + bs - 1) // bs
        L = nblocks * bs
        blocks = meta.block_tables[:nd, :nblocks].reshape(-1).long()  # [nd * nb]
        # Gather each sequence's blocks, then lay K/V out as [nd, Hkv, L, D] so both matmuls are
        # plain batched GEMMs.
        keys = kv_cache[0].index_select(0, blocks).view(nd, L, hkv, d)
        values = kv_cache[1].index_select(0, blocks).view(nd, L, hkv, d)
        keys = keys.transpose(1, 2).contiguous().to(q.dtype)  # [nd, Hkv, L, D]
        values = values.transpose(1, 2).contiguous().to(q.dtype)  # [nd, Hkv, L, D]
        pos = torch.arange(L, device=q.device)  # [L]
        seq_lens = meta.seq_lens[:nd].to(pos.dtype).unsqueeze(1)  # [nd, 1]
        mask = pos.unsqueeze(0) < seq_lens  # [nd, L]; also hides padding blocks' garbage
        if layer.sliding_window is not None:
            mask &= pos.unsqueeze(0) >= seq_lens - layer.sliding_window
        # GQA without repeating K/V: the G query heads of one KV head form the rows of one GEMM.
        g = layer.num_heads // hkv
        qg = q.reshape(nd, hkv, g, d)  # [nd, Hkv, G, D]
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * layer.scale  # [nd, Hkv, G, L] fp32
        scores = soft_cap(scores, layer.logits_soft_cap)
        scores.masked_fill_(~mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)  # [nd, Hkv, G, L]
        out = torch.matmul(probs, values)  # [nd, Hkv, G, D]
        return out.reshape(nd, layer.num_heads, d)

    @staticmethod
    def prefill(layer: nn.Module, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """Sequence i's chunk q: [qlen, Hq, D], k/v: [qlen, Hkv, D] (already in the cache) -> [qlen, Hq, D]."""
        qlen = q.shape[0]
        seq_len = meta.seq_lens_cpu[i]
        ctx_len = seq_len - qlen  # tokens cached before this chunk
        hkv, d = layer.num_kv_heads, layer.head_dim
        if ctx_len > 0:
            bs = meta.block_size
            nblocks = (seq_len + bs - 1) // bs
            table = meta.block_tables[i, :nblocks].long()  # [nb]
            keys = kv_cache[0].index_select(0, table).view(-1, hkv, d)[:seq_len]
            values = kv_cache[1].index_select(0, table).view(-1, hkv, d)[:seq_len]
        else:
            keys, values = k, v
        mask = None
        window = layer.sliding_window
        if ctx_len > 0 or window is not None:
            q_pos = torch.arange(ctx_len, seq_len, device=q.device).unsqueeze(1)  # [qlen, 1]
            k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)  # [1, seq_len]
            mask = k_pos <= q_pos  # [qlen, seq_len]
            if window is not None:
                mask &= k_pos > q_pos - window
        if layer.logits_soft_cap is not None:
            return _capped_attention(layer, q, keys, values, mask, ctx_len)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, Hq, qlen, D]
            keys.to(q.dtype).transpose(0, 1).unsqueeze(0),  # [1, Hkv, seq_len, D]
            values.to(q.dtype).transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            scale=layer.scale,
            enable_gqa=layer.num_heads != hkv,
        )  # [1, Hq, qlen, D]
        return out.squeeze(0).transpose(0, 1)


def soft_cap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's attention logit soft-capping: ``cap * tanh(scores / cap)`` (identity without a cap)."""
    return scores if cap is None else torch.tanh(scores / cap) * cap


def _capped_attention(layer: nn.Module, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor | None, ctx_len: int) -> torch.Tensor:
    """Prefill attention with soft-capped scores (SDPA cannot cap): q [qlen, Hq, D], keys/values
    [seq_len, Hkv, D] -> [qlen, Hq, D]; scores and softmax in fp32 as HF's eager attention."""
    qlen, seq_len = q.shape[0], keys.shape[0]
    if mask is None:
        q_pos = torch.arange(ctx_len, seq_len, device=q.device).unsqueeze(1)
        mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= q_pos  # [qlen, seq_len]
    g = layer.num_heads // layer.num_kv_heads
    k = keys.to(q.dtype).transpose(0, 1)  # [Hkv, seq_len, D]
    v = values.to(q.dtype).transpose(0, 1)
    qg = q.transpose(0, 1).reshape(layer.num_kv_heads, g * qlen, -1)  # [Hkv, G*qlen, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * layer.scale  # [Hkv, G*qlen, seq_len]
    scores = soft_cap(scores, layer.logits_soft_cap).view(layer.num_kv_heads, g, qlen, seq_len)
    scores.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(layer.num_kv_heads, g * qlen, seq_len)
    out = torch.matmul(probs, v)  # [Hkv, G*qlen, D]
    return out.view(layer.num_heads, qlen, -1).transpose(0, 1)


def _output_for(q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    out = torch.empty_like(q)  # [T, Hq, D]
    if meta.num_tokens < q.shape[0]:
        out[meta.num_tokens:] = 0  # padding rows past the batch's tokens
    return out


class NativePagedAttention(AttentionBackend):
    """lmserve's CPU kernels (``cpu_kernels/paged_attention.c``), reading K/V in place through the
    block table (no gather copy); the policy is in the module docstring. ``amx_chunks``: the plan
    found the AMX chunk kernel for this layer; ``sdpa_on_amx``: torch's SDPA runs on AMX here."""

    def __init__(self, kernel: CpuPagedAttention, amx_chunks: bool, sdpa_on_amx: bool) -> None:
        self.kernel = kernel
        self.amx_chunks = amx_chunks
        self.sdpa_on_amx = sdpa_on_amx
        self.name = "native + AMX chunks" if amx_chunks else "native"

    def _check(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        reason = self.kernel.unsupported(q, kv_cache, meta)
        if reason is not None:
            raise ValueError(f"native paged attention was chosen for this layer but {reason}")

    def forward(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        self._check(q, kv_cache, meta)
        threads = torch.get_num_threads()
        self.kernel.write_kv(k, v, kv_cache, meta.slot_mapping)
        out = _output_for(q, meta)
        nd, num_tokens = meta.num_decodes, meta.num_tokens
        if nd > 0:
            self.kernel.decode(q[:nd], kv_cache, meta.block_tables, meta.seq_lens, out[:nd], layer.scale,
                               layer.sliding_window, threads)
        if nd == meta.num_seqs:
            return out
        if self.amx_chunks and kv_cache.shape[2] % 16 == 0:
            qsl = meta.query_start_loc[nd:].cpu()
            self.kernel.chunks(q[nd:num_tokens], kv_cache, meta.block_tables[nd:], qsl - qsl[0], meta.seq_lens[nd:],
                               out[nd:num_tokens], layer.scale, threads)
            return out
        start = nd
        for i in range(nd, meta.num_seqs):
            end = start + meta.query_lens_cpu[i]
            if end > start and not self.chunk_on_decode_kernel(layer, i, q[start:end], kv_cache, meta,
                                                                out[start:end], threads):
                out[start:end] = TorchPagedAttention.prefill(layer, i, q[start:end], k[start:end], v[start:end],
                                                             kv_cache, meta)
            start = end
        return out

    def chunk_on_decode_kernel(self, layer: nn.Module, i: int, q: torch.Tensor, kv_cache: torch.Tensor,
                               meta: AttentionMetadata, out: torch.Tensor, threads: int | None = None) -> bool:
        """Sequence i's chunk q [qlen, Hq, D] into out [qlen, Hq, D] on the decode kernel, as qlen
        one-token queries (row r sees the first ctx_len + r + 1 tokens of the sequence's blocks), when
        the policy picks it: a cached context before the chunk and ``prefill_on_decode_kernel``.
        Returns whether it ran (nothing is written otherwise)."""
        qlen, seq_len = q.shape[0], meta.seq_lens_cpu[i]
        if seq_len == qlen or not prefill_on_decode_kernel(q.dtype, qlen, seq_len, self.sdpa_on_amx):
            return False
        seq_lens = torch.arange(seq_len - qlen + 1, seq_len + 1, dtype=torch.int32)  # [qlen]
        tables = meta.block_tables[i:i + 1].expand(qlen, -1)  # [qlen, W], one row repeated (stride 0)
        self.kernel.decode(q, kv_cache, tables, seq_lens, out, layer.scale, layer.sliding_window,
                           threads or torch.get_num_threads())
        return True
