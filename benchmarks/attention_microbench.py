"""Paged decode attention on CPU: the pure-torch reference vs the native kernel (cpu_kernels).

Times one ``PagedAttention.forward`` call (one layer: write the new K/V, then attend) over a
batch of decodes, both ways, on the shapes of issue 4:

- W2: 32 sequences, 14 query / 2 KV heads (Qwen2.5-0.5B), head_dim 64, contexts 40..290;
- W3: 1 sequence, 9 / 3 heads (SmolLM2-135M), head_dim 64, contexts 64..320;
- W4: 8 sequences, 14 / 2 heads, head_dim 64, contexts ~1100.

Each figure is the minimum over ``--repeats`` of the mean over ``--iters`` calls. ``--layers N``
rotates over N separate layer caches, as a model does, so that the KV cache of the layer being
read is not already in the CPU's caches (default 1: hot).

``--prefill`` times instead one chunk of ``qlen`` tokens that continues a cached context of
``ctx`` tokens: gather + SDPA (``TorchPagedAttention.prefill``) vs the decode kernel run as qlen
one-token queries (``_prefill_native``) at every length, and which one the length rule
(``attention.prefill_on_native_kernel``) picks; ctx 0 is a fresh prompt (SDPA, causal). In bf16
on a CPU with AMX also the AMX path (``CpuPagedAttention.chunks``), which then takes every chunk.
Usage:

    python benchmarks/attention_microbench.py [--dtype bfloat16|float32] [--layers 24] [--threads 1]
    python benchmarks/attention_microbench.py --prefill [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from dataclasses import dataclass

import torch

import lmserve.model.backends.attention as attention_mod
from lmserve.model.backends.attention import NativePagedAttention, TorchPagedAttention
from lmserve.model.layers.attention import KVCacheSpec, PagedAttention
from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.cpu_kernels.paged_attention import get_paged_attention_kernel


@dataclass(frozen=True)
class Workload:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    seq_lens: tuple[int, ...]


def workloads(seed: int = 0) -> list[Workload]:
    rng = random.Random(seed)
    return [
        Workload("W2 32 seqs 14/2 ctx 40..290", 14, 2, 64, tuple(rng.randint(40, 290) for _ in range(32))),
        Workload("W3 1 seq 9/3 ctx 64", 9, 3, 64, (64,)),
        Workload("W3 1 seq 9/3 ctx 192", 9, 3, 64, (192,)),
        Workload("W3 1 seq 9/3 ctx 320", 9, 3, 64, (320,)),
        Workload("W4 8 seqs 14/2 ctx ~1100", 14, 2, 64, tuple(rng.randint(1050, 1150) for _ in range(8))),
    ]


def make_case(w: Workload, dtype: torch.dtype, block_size: int, layers: int, seed: int = 0):
    """-> (attn, q, k, v, caches, meta) for one decode step of ``w`` (blocks shuffled)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + block_size - 1) // block_size for n in w.seq_lens]
    num_blocks = sum(blocks_per_seq) + 1
    ids = list(range(1, num_blocks))
    random.Random(seed).shuffle(ids)
    tables, slots, pos = [], [], 0
    width = max(blocks_per_seq)
    for n, nb in zip(w.seq_lens, blocks_per_seq):
        row = ids[pos:pos + nb]
        pos += nb
        tables.append(row + [0] * (width - nb))
        slots.append(row[(n - 1) // block_size] * block_size + (n - 1) % block_size)
    nd = len(w.seq_lens)
    meta = AttentionMetadata(
        num_decodes=nd, query_start_loc=torch.arange(nd + 1, dtype=torch.int32),
        seq_lens=torch.tensor(w.seq_lens, dtype=torch.int32), block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64), block_size=block_size, query_lens_cpu=[1] * nd,
        seq_lens_cpu=list(w.seq_lens), max_query_len=1, max_seq_len=max(w.seq_lens))
    spec = KVCacheSpec(num_layers=layers, num_kv_heads=w.num_kv_heads, head_dim=w.head_dim, dtype=dtype)
    caches = spec.allocate(num_blocks, block_size, "cpu")
    for c in caches:
        c.copy_(torch.randn(c.shape, generator=gen))
    q = torch.randn(nd, w.num_heads, w.head_dim, generator=gen).to(dtype)
    k = torch.randn(nd, w.num_kv_heads, w.head_dim, generator=gen).to(dtype)
    v = torch.randn(nd, w.num_kv_heads, w.head_dim, generator=gen).to(dtype)
    attn = PagedAttention(w.num_heads, w.num_kv_heads, w.head_dim, scale=w.head_dim ** -0.5)
    return attn, q, k, v, caches, meta


def time_forward(attn, q, k, v, caches, meta, iters: int, repeats: int) -> float:
    """Seconds per forward call: min over repeats of the mean over iters (rotating caches)."""
    it = iter(range(1 << 62))
    return time_call(lambda: attn(q, k, v, caches[next(it) % len(caches)], meta), iters, repeats)


def time_call(fn, iters: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t) / iters)
    return best


def prefill_table(dtype: torch.dtype, block_size: int, iters: int, repeats: int) -> None:
    """Both ways at every length (the length rule lifted); the last column is what the rule picks."""
    kernel = get_paged_attention_kernel()
    amx = kernel is not None and kernel.amx and dtype == torch.bfloat16
    print(f"{'chunk continuing a context':34s} {'SDPA ms':>9s} {'native ms':>10s} {'speed-up':>9s}  rule"
          f"{'   AMX ms  speed-up' if amx else ''}")
    rule_native = attention_mod.prefill_on_decode_kernel
    attention_mod.prefill_on_decode_kernel = lambda *_args: True
    native = NativePagedAttention(kernel, False, False)
    sdpa_amx = bool(torch.cpu._is_amx_tile_supported())
    try:
        for hq, hkv in ((14, 2), (9, 3)):
            for ctx in (0, 100, 1000):
                for qlen in (2, 4, 8, 16, 32, 128, 512):
                    w = Workload("", hq, hkv, 64, (ctx + qlen,))
                    attn, _, _, _, caches, meta = make_case(w, dtype, block_size, 1)
                    meta.num_decodes, meta.query_lens_cpu = 0, [qlen]
                    q = torch.randn(qlen, hq, 64, generator=torch.Generator().manual_seed(qlen)).to(dtype)
                    out = torch.empty_like(q)
                    n = max(1, iters // qlen)
                    kv = caches[0][:, meta.block_tables[0].long()].flatten(1, 2)[:, ctx:ctx + qlen]  # the chunk's own
                    t_ref = time_call(lambda: TorchPagedAttention.prefill(attn, 0, q, kv[0], kv[1], caches[0], meta), n, repeats)
                    if ctx:
                        t_nat = time_call(lambda: native.chunk_on_decode_kernel(attn, 0, q, caches[0], meta, out), n,
                                          repeats)
                        rule = "native" if rule_native(dtype, qlen, ctx + qlen, sdpa_amx) else "SDPA"
                    else:
                        rule = "SDPA"
                    nat = f"{t_nat * 1e3:10.3f} {t_ref / t_nat:8.1f}x" if ctx else f"{'-':>10s} {'-':>9s}"
                    line = f"{hq}/{hkv} heads ctx {ctx:5d} qlen {qlen:4d}      {t_ref * 1e3:9.3f} {nat}  {rule:6s}"
                    if amx:
                        qsl = torch.tensor([0, qlen], dtype=torch.int32)
                        t_amx = time_call(lambda: kernel.chunks(q, caches[0], meta.block_tables, qsl, meta.seq_lens,
                                                                out, attn.scale, torch.get_num_threads()), n, repeats)
                        line += f" {t_amx * 1e3:8.3f} {t_ref / t_amx:8.1f}x"
                    print(line)
    finally:
        attention_mod.prefill_on_decode_kernel = rule_native


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=1, help="rotate over this many layer caches (1 = hot)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--prefill", action="store_true", help="chunks continuing a cached context instead")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kernel = get_paged_attention_kernel()
    if kernel is None:
        raise SystemExit("the CPU kernel is unavailable (see the log above)")
    print(f"{args.dtype}, block_size {args.block_size}, {args.layers} layer cache(s), "
          f"{torch.get_num_threads()} threads, kernel: {kernel.path}, "
          f"load avg {os.getloadavg()[0]:.2f}")
    if args.prefill:
        with torch.inference_mode():
            prefill_table(dtype, args.block_size, args.iters, args.repeats)
        return
    print(f"{'workload':30s} {'KV MB':>7s} {'reference ms':>13s} {'native ms':>10s} {'speed-up':>9s}")
    with torch.inference_mode():
        for w in workloads():
            case = make_case(w, dtype, args.block_size, args.layers)
            attn, q, k, v, caches, meta = case
            native = NativePagedAttention(kernel, kernel.amx and dtype == torch.bfloat16,
                                          bool(torch.cpu._is_amx_tile_supported()))
            attn.backend = native
            nat_out = attn(q, k, v, caches[0], meta)
            attn.backend = TorchPagedAttention()
            torch.testing.assert_close(attn(q, k, v, caches[0], meta), nat_out, atol=2e-2, rtol=2e-2)
            t_ref = time_forward(*case, args.iters, args.repeats)
            attn.backend = native
            t_nat = time_forward(*case, args.iters, args.repeats)
            kv_mb = 2 * sum(w.seq_lens) * w.num_kv_heads * w.head_dim * dtype.itemsize / 1e6
            print(f"{w.name:30s} {kv_mb:7.2f} {t_ref * 1e3:13.3f} {t_nat * 1e3:10.3f} {t_ref / t_nat:8.1f}x")


if __name__ == "__main__":
    main()
