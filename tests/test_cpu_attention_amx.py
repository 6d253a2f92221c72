"""The AMX path of the CPU paged-attention kernel (paged_attention_amx.h): bf16 prefill chunks
over a cached context and decodes, on CPUs with AMX-BF16 (skipped elsewhere), against an exact
fp32 reference, for batch and thread invariance, and through ``PagedAttention.forward``."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from lmserve.model.layers.attention import PagedAttention
from lmserve.model.layers.cpu_kernels.paged_attention import get_paged_attention_kernel

from tests.test_cpu_attention_kernel import forward_on_off, make_decode_case


@pytest.fixture(scope="module")
def kernel():
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the kernel")
    k = get_paged_attention_kernel()
    if k is None or not k.amx:
        pytest.skip("this CPU (or build) has no AMX-BF16 path")
    return k


def chunk_case(chunks: list[tuple[int, int]], hq: int, hkv: int, d: int, block_size: int, seed: int):
    """(q [T, Hq, D] bf16, cache bf16, tables, qsl, seq_lens) for chunks (ctx, qlen): sequence i
    holds ctx + qlen tokens, the last qlen of them its queries."""
    _, cache, meta = make_decode_case([c + n for c, n in chunks], hq, hkv, d, block_size, torch.float32, seed)
    qsl = [0]
    for _, n in chunks:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], hq, d, generator=torch.Generator().manual_seed(seed + 1))
    return (q.to(torch.bfloat16), cache.to(torch.bfloat16), meta.block_tables,
            torch.tensor(qsl, dtype=torch.int32), meta.seq_lens)


def reference(q, cache, tables, qsl, seq_lens, hkv: int, scale: float) -> torch.Tensor:
    """Exact causal attention in fp32 on the same bf16 inputs."""
    out = torch.empty(q.shape, dtype=torch.float32)
    bs = cache.shape[2]
    g = q.shape[1] // hkv
    for i in range(len(seq_lens)):
        L, a, b = int(seq_lens[i]), int(qsl[i]), int(qsl[i + 1])
        blocks = tables[i, :(L + bs - 1) // bs].long()
        k = cache[0, blocks].flatten(0, 1)[:L].float().repeat_interleave(g, dim=1)  # [L, Hq, D]
        v = cache[1, blocks].flatten(0, 1)[:L].float().repeat_interleave(g, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[a:b].float(), k) * scale
        pos = torch.arange(L - (b - a), L).unsqueeze(1)
        s.masked_fill_(torch.arange(L).unsqueeze(0) > pos, float("-inf"))
        out[a:b] = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)
    return out


def run(kernel, q, cache, tables, qsl, seq_lens, scale: float, threads: int = 2) -> torch.Tensor:
    out = torch.full_like(q, float("nan"))
    assert kernel.chunks(q, cache, tables, qsl, seq_lens, out, scale, threads)
    return out


def random_batches(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        hkv, g = rng.choice([1, 2]), (1, 3, 7, 16)[i % 4]
        chunks = [(rng.choice([0, 0, 1, 15, 16, 17, rng.randint(1, 300)]), rng.choice([1, 2, 5, 16, 33, 70]))
                  for _ in range(rng.randint(1, 4))]
        yield dict(chunks=chunks, hq=hkv * g, hkv=hkv, d=(64, 128)[i % 2], block_size=(16, 32)[i % 3 == 0],
                   seed=100 + i)


@pytest.mark.parametrize("case", list(random_batches(16)), ids=lambda c: (
    f"bs{c['block_size']}-hq{c['hq']}/{c['hkv']}-d{c['d']}-{c['chunks']}"))
def test_chunks_equal_exact_reference(kernel, case):
    """Within bf16 rounding (the probabilities are rounded to bf16, as the reference path does)
    of exact fp32 attention; no slot past a context (GARBAGE) is read into a result."""
    q, cache, tables, qsl, seq_lens = chunk_case(**case)
    scale = case["d"] ** -0.5
    out = run(kernel, q, cache, tables, qsl, seq_lens, scale)
    torch.testing.assert_close(out.float(), reference(q, cache, tables, qsl, seq_lens, case["hkv"], scale),
                               atol=2e-2, rtol=2e-2)


def test_nan_past_the_context_is_never_read(kernel):
    """Slots past a context inside its last block are loaded with the tile but must not reach a
    result: with NaN there, the output is unchanged."""
    q, cache, tables, qsl, seq_lens = chunk_case([(5, 3), (0, 20), (40, 1)], 14, 2, 64, 16, seed=3)
    ref = run(kernel, q, cache, tables, qsl, seq_lens, 0.125)
    poisoned = cache.clone()
    poisoned[cache.float() == 1e4] = float("nan")
    out = run(kernel, q, poisoned, tables, qsl, seq_lens, 0.125)
    assert torch.equal(out, ref)


def test_batch_and_thread_invariant(kernel):
    """A chunk's output bits do not depend on the other chunks of the call, on how its rows are
    split into work items, or on the thread count."""
    chunks = [(100, 70), (0, 9), (300, 1), (17, 33)]
    q, cache, tables, qsl, seq_lens = chunk_case(chunks, 14, 2, 64, 16, seed=4)
    full = run(kernel, q, cache, tables, qsl, seq_lens, 0.125)
    for threads in (1, 3, 8):
        assert torch.equal(run(kernel, q, cache, tables, qsl, seq_lens, 0.125, threads), full)
    for i in range(len(chunks)):
        a, b = int(qsl[i]), int(qsl[i + 1])
        alone = run(kernel, q[a:b], cache, tables[i:i + 1], torch.tensor([0, b - a], dtype=torch.int32),
                    seq_lens[i:i + 1], 0.125)
        assert torch.equal(alone, full[a:b])


def test_decode_is_a_chunk_of_one(kernel):
    """kernel.decode takes the same AMX path (7 query heads per KV head): a decode batch gives the
    bits of one-token chunks."""
    lens = [1, 16, 17, 250, 1100]
    q, cache, meta = make_decode_case(lens, 14, 2, 64, 16, torch.bfloat16, seed=5)
    out = torch.empty_like(q)
    assert kernel.decode(q, cache, meta.block_tables, meta.seq_lens, out, 0.125, None, 2)
    chunked = run(kernel, q, cache, meta.block_tables, torch.arange(len(lens) + 1, dtype=torch.int32),
                  meta.seq_lens, 0.125)
    assert torch.equal(out, chunked)


def test_takes_chunks_only_where_the_path_runs(kernel):
    cache = torch.zeros(2, 4, 16, 2, 64, dtype=torch.bfloat16)
    q = torch.zeros(3, 14, 64, dtype=torch.bfloat16)
    assert kernel.takes_chunks(q, cache, None)
    assert not kernel.takes_chunks(q, cache, 8)  # a sliding window
    assert not kernel.takes_chunks(q.float(), cache.float(), None)
    assert not kernel.takes_chunks(q[..., :32], cache[..., :32], None)  # head dim % 64
    assert not kernel.takes_chunks(q, torch.zeros(2, 4, 8, 2, 64, dtype=torch.bfloat16), None)  # block size % 16


def test_forward_mixed_batch_on_off_bf16(kernel, monkeypatch):
    """Decodes, fresh prompts, chunks continuing a cached context and padding rows in one bf16
    batch through PagedAttention.forward: the AMX path agrees with the pure-torch reference."""
    attn = PagedAttention(14, 2, 64, scale=64 ** -0.5)
    plan = [{"a": 40, "b": 9}, {"a": 1, "b": 30, "c": 100}, {"a": 1, "b": 1, "c": 20}, {"c": 1, "a": 50, "b": 1}]
    forward_on_off(monkeypatch, attn, torch.bfloat16, 16, plan, 4e-2)
