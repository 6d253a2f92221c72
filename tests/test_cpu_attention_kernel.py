"""The native CPU paged-decode kernel (lmserve/model/layers/cpu_kernels) against the pure-torch
reference ``TorchPagedAttention.decode``: random shapes, every build variant this CPU can run
(AVX-512 with and without AVX512_BF16, portable C), the whole model path, and the fallbacks."""

from __future__ import annotations

import logging
import math
import random
import shutil

import pytest
import torch

from lmserve.model.backends import attention as attention_backends
from lmserve.model.backends.attention import NativePagedAttention, TorchPagedAttention, write_kv_cache
from lmserve.model.layers.attention import KVCacheSpec, PagedAttention
from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.cpu_kernels import build
from lmserve.model.layers.cpu_kernels.build import DISABLE_ENV
from lmserve.model.layers.cpu_kernels.paged_attention import SOURCE, get_paged_attention_kernel
from tests.backend_utils import cpu_plan

from tests.model_utils import PagedTestCache

GARBAGE = 1e4  # in every cache slot a decode must not read: reading one breaks the comparison

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the kernel")


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv("LMSERVE_KERNEL_CC", raising=False)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _variants() -> list[tuple[str, ...]]:
    """Extra compiler flags of each build path this CPU runs: the native build, AVX-512
    without AVX512_BF16, and portable C."""
    flags = _cpu_flags()
    out: list[tuple[str, ...]] = [()]
    if "avx512_bf16" in flags:
        out.append(("-mno-avx512bf16",))
    if "avx512f" in flags:
        out.append(("-mno-avx512f",))
    return out


@pytest.fixture(scope="module", params=_variants(), ids=lambda f: " ".join(f) or "native")
def kernel(request):
    k = get_paged_attention_kernel(request.param)
    assert k is not None, "gcc is on PATH but the kernel did not build (see the log)"
    return k


def make_decode_case(seq_lens: list[int], hq: int, hkv: int, d: int, block_size: int, dtype: torch.dtype,
                     seed: int):
    """(q [nd, Hq, D], kv_cache, meta) for one batch of decodes: each sequence's blocks are
    shuffled ids, and every slot it must not read (other blocks, past seq_len) holds GARBAGE."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 3
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    cache = torch.full((2, num_blocks, block_size, hkv, d), GARBAGE)
    width = max(per_seq) + 2  # padding columns (0) past every sequence's blocks
    tables = []
    for n, nb in zip(seq_lens, per_seq):
        row, ids = ids[:nb], ids[nb:]
        for t in range(n):
            cache[:, row[t // block_size], t % block_size] = torch.randn(2, hkv, d, generator=gen)
        tables.append(row + [0] * (width - nb))
    nd = len(seq_lens)
    meta = AttentionMetadata(
        num_decodes=nd, query_start_loc=torch.arange(nd + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.zeros(nd, dtype=torch.int64), block_size=block_size, query_lens_cpu=[1] * nd,
        seq_lens_cpu=list(seq_lens), max_query_len=1, max_seq_len=max(seq_lens))
    q = torch.randn(nd, hq, d, generator=gen)
    return q.to(dtype), cache.to(dtype), meta


def random_cases(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        bs = (1, 4, 16, 32)[i % 4]
        hkv = rng.choice([1, 2, 3])
        g = (1, 3, 7)[i % 3]
        d = rng.choice([64, 128, 80])
        nd = rng.randint(1, 6)
        lens = [rng.choice([1, bs, bs + 1, 2 * bs, rng.randint(1, 200)]) for _ in range(nd)]
        window = rng.choice([None, None, 1, 7, 33])
        yield dict(seq_lens=lens, hq=hkv * g, hkv=hkv, d=d, block_size=bs, window=window, seed=seed * 1000 + i)


def _run_native(kernel, attn: PagedAttention, q, cache, meta, threads: int = 2) -> torch.Tensor:
    out = torch.full_like(q, float("nan"))
    assert kernel.unsupported(q, cache, meta) is None
    assert kernel.decode(q, cache, meta.block_tables, meta.seq_lens, out, attn.scale, attn.sliding_window, threads)
    return out


@pytest.mark.parametrize("case", list(random_cases(24)), ids=lambda c: (
    f"bs{c['block_size']}-hq{c['hq']}/{c['hkv']}-d{c['d']}-w{c['window']}-{c['seq_lens']}"))
def test_fp32_equals_reference(kernel, case):
    case = dict(case)
    attn = PagedAttention(case["hq"], case["hkv"], case["d"], scale=case["d"] ** -0.5, sliding_window=case.pop("window"))
    q, cache, meta = make_decode_case(**case, dtype=torch.float32)
    torch.testing.assert_close(_run_native(kernel, attn, q, cache, meta), TorchPagedAttention.decode(attn, q, cache, meta),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_sequences_split_by_sequence_or_by_head_alike(kernel, dtype):
    """With 4+ sequences per thread a work item is a whole sequence (all its KV heads), else one
    (sequence, head): the two splits give the same bits, and many sequences equal the reference."""
    attn = PagedAttention(14, 2, 64, scale=0.125)
    q, cache, meta = make_decode_case([1, 17, 40, 64, 90], hq=14, hkv=2, d=64, block_size=16, dtype=dtype, seed=5)
    # 5 sequences: one thread takes them per sequence, two threads per (sequence, head)
    assert torch.equal(_run_native(kernel, attn, q, cache, meta, threads=1), _run_native(kernel, attn, q, cache, meta))
    rng = random.Random(6)
    lens = [rng.randint(1, 300) for _ in range(20)]
    q, cache, meta = make_decode_case(lens, hq=14, hkv=2, d=64, block_size=16, dtype=dtype, seed=6)
    ref = TorchPagedAttention.decode(attn, q.float(), cache.float(), meta)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(_run_native(kernel, attn, q, cache, meta).float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_within_rounding(kernel, dtype):
    """16-bit: as exact as fp32 math on the same 16-bit inputs up to the output's rounding,
    and within 16-bit tolerance of the 16-bit reference (which rounds scores and probabilities)."""
    for case in random_cases(12, seed=1):
        window = case.pop("window")
        attn = PagedAttention(case["hq"], case["hkv"], case["d"], scale=case["d"] ** -0.5, sliding_window=window)
        q, cache, meta = make_decode_case(**case, dtype=dtype)
        out = _run_native(kernel, attn, q, cache, meta)
        assert out.dtype == dtype
        exact = TorchPagedAttention.decode(attn, q.float(), cache.float(), meta)
        torch.testing.assert_close(out.float(), exact, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(out, TorchPagedAttention.decode(attn, q, cache, meta), atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_chunk_with_context_equals_reference(kernel, dtype, monkeypatch):
    """A chunk continuing a cached context, as one-token queries on the decode kernel: equal to
    gather + SDPA (``TorchPagedAttention.prefill``), with and without a sliding window."""
    monkeypatch.setattr(attention_backends, "prefill_on_decode_kernel", lambda *a: True)  # every length native
    rng = random.Random(9)
    for trial in range(10):
        bs = (1, 4, 16, 32)[trial % 4]
        hkv, g, d = rng.choice([1, 2]), (1, 3, 7)[trial % 3], rng.choice([64, 80])
        qlen, ctx = rng.choice([2, 5, 16, 40]), rng.randint(1, 90)
        window = rng.choice([None, 3, 20])
        attn = PagedAttention(hkv * g, hkv, d, scale=d ** -0.5, sliding_window=window)
        _, cache, meta = make_decode_case([ctx + qlen], hkv * g, hkv, d, bs, dtype, seed=trial)
        meta.num_decodes, meta.query_lens_cpu = 0, [qlen]
        q = torch.randn(qlen, hkv * g, d, generator=torch.Generator().manual_seed(trial)).to(dtype)
        out = torch.full_like(q, float("nan"))
        assert NativePagedAttention(kernel, False, False).chunk_on_decode_kernel(attn, 0, q, cache, meta, out)
        ref = TorchPagedAttention.prefill(attn, 0, q, None, None, cache, meta)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-2, rtol=4e-2)
        torch.testing.assert_close(out, ref, **tol)
    meta.seq_lens_cpu = [qlen]  # no cached context: SDPA's
    assert not NativePagedAttention(kernel, False, False).chunk_on_decode_kernel(attn, 0, q, cache, meta, out)


def test_prefill_length_rule(kernel, monkeypatch):
    """Chunks go to SDPA past the measured crossover: fp32 past 16 tokens; bf16 past 12,288
    query-key pairs where torch's flash attention runs on AMX, never elsewhere."""
    on_native = attention_backends.prefill_on_decode_kernel
    for amx in (True, False):
        assert on_native(torch.float32, 16, 5000, amx) and not on_native(torch.float32, 17, 20, amx)
        assert on_native(torch.bfloat16, 8, 1536, amx) and on_native(torch.bfloat16, 512, 4096, amx) is not amx
        assert on_native(torch.bfloat16, 8, 1537, amx) is not amx
    monkeypatch.setattr(attention_backends, "prefill_on_decode_kernel", lambda dtype, qlen, seq_len, amx: qlen <= 4)
    attn = PagedAttention(4, 2, 64, scale=0.125)
    backend = NativePagedAttention(kernel, False, False)
    for qlen, native in ((4, True), (5, False)):
        _, cache, meta = make_decode_case([30 + qlen], 4, 2, 64, 16, torch.float32, seed=qlen)
        meta.num_decodes, meta.query_lens_cpu = 0, [qlen]
        q = torch.randn(qlen, 4, 64)
        assert backend.chunk_on_decode_kernel(attn, 0, q, cache, meta, torch.empty_like(q)) is native


def test_thread_counts_and_strided_q(kernel):
    """Any thread count gives the same result; q may have a row stride (a view of a wider tensor)."""
    q, cache, meta = make_decode_case([5, 17, 64, 1, 33], 14, 2, 64, 16, torch.float32, seed=3)
    wide = torch.randn(q.shape[0], 20, 64)
    wide[:, :14] = q
    attn = PagedAttention(14, 2, 64, scale=0.125)
    ref = TorchPagedAttention.decode(attn, q, cache, meta)
    for threads in (1, 2, 3, 64):
        torch.testing.assert_close(_run_native(kernel, attn, wide[:, :14], cache, meta, threads), ref,
                                   atol=1e-5, rtol=1e-5)


def test_bad_metadata_raises(kernel):
    q, cache, meta = make_decode_case([5, 9], 4, 2, 64, 4, torch.float32, seed=4)
    attn = PagedAttention(4, 2, 64, scale=0.125)
    meta.block_tables[1, 1] = cache.shape[1]  # a block id past the cache
    with pytest.raises(ValueError, match="block id"):
        _run_native(kernel, attn, q, cache, meta)
    meta.block_tables[1, 1] = 0
    meta.seq_lens[0] = 1000  # past the block table
    with pytest.raises(ValueError, match="seq_len"):
        _run_native(kernel, attn, q, cache, meta)


# ---- through PagedAttention.forward -------------------------------------------------------------

def forward_on_off(monkeypatch, attn: PagedAttention, dtype: torch.dtype, block_size: int,
                   plan: list[dict[str, int]], tol: float) -> None:
    """Steps of ``plan`` (sequence -> new tokens) through forward with the kernels on and off
    (the same inputs both ways, two padding rows): outputs within ``tol``, padding rows zero."""
    spec = KVCacheSpec(num_layers=1, num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim, dtype=dtype)
    caches = {on: PagedTestCache(spec, num_blocks=64, block_size=block_size, seed=1) for on in (True, False)}
    for step, grants in enumerate(plan):
        chunks = [(sid, [0] * n) for sid, n in grants.items()]
        outs = {}
        for on, cache in caches.items():
            batch = cache.step(chunks, pad_tokens=2)
            T = len(batch.input_ids)
            g = torch.Generator().manual_seed(step)  # the same inputs both ways
            qkv = [torch.randn(T, h, attn.head_dim, generator=g).to(dtype)
                   for h in (attn.num_heads, attn.num_kv_heads, attn.num_kv_heads)]
            attn.backend = native_backend(attn, dtype) if on else TorchPagedAttention()
            outs[on] = attn(*qkv, cache.kv_caches[0], batch.meta)
        assert torch.all(outs[True][-2:] == 0)
        torch.testing.assert_close(outs[True].float(), outs[False].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("window", [None, 5])
def test_forward_mixed_batch_on_off(monkeypatch, window):
    """Decodes, chunked prefills (some continuing a cached context: native) and padding rows in
    one batch: forward's output with the kernels equals the reference's; padding rows are zero."""
    attn = PagedAttention(6, 2, 64, scale=64 ** -0.5, sliding_window=window)
    plan = [{"a": 6, "b": 9}, {"a": 1, "b": 4, "c": 13}, {"a": 1, "b": 1, "c": 1}, {"c": 1, "a": 3, "b": 1}]
    forward_on_off(monkeypatch, attn, torch.float32, 4, plan, 1e-5)


def test_write_kv_equals_reference(kernel):
    """Slots -1 are skipped; v may be a strided view (as split from a fused qkv projection)."""
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(8)
        caches = [torch.randn(2, 6, 4, 2, 64, generator=gen).to(dtype) for _ in range(2)]
        caches[1].copy_(caches[0])
        k = torch.randn(5, 2, 64, generator=gen).to(dtype)
        v = torch.randn(5, 4, 64, generator=gen).to(dtype)[:, 1:3]
        slots = torch.tensor([3, -1, 23, 0, 9, 17], dtype=torch.int64)  # one more than the tokens
        write_kv_cache(k, v, caches[0], slots)
        assert kernel.write_kv(k, v, caches[1], slots)
        assert torch.equal(caches[0], caches[1])
        with pytest.raises(IndexError):
            kernel.write_kv(k, v, caches[1], torch.tensor([0, 1, 2, 3, 24]))


def native_backend(attn: PagedAttention, dtype: torch.dtype) -> NativePagedAttention:
    """The native backend this machine's plan gives ``attn`` in ``dtype`` (it must give one)."""
    plan = cpu_plan(dtype)
    choice = plan.attention(dtype, attn.head_dim, attn.sliding_window)
    assert choice.backend.startswith("native"), choice
    return NativePagedAttention(plan.native.attention, "AMX" in choice.backend, plan.sdpa_on_amx)


def test_switch_and_mixed_dtypes_are_not_silent(monkeypatch):
    """LMSERVE_DISABLE_CPU_KERNELS=1: the plan gives the reference; a native backend handed what
    it does not take (q fp32, cache bf16) raises instead of switching to the reference."""
    q, cache, meta = make_decode_case([3, 8], 4, 2, 64, 4, torch.float32, seed=5)
    assert cpu_plan(torch.float32).attention(torch.float32, 64, None).backend == "native"
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert cpu_plan(torch.float32).attention(torch.float32, 64, None).backend == "torch"
    monkeypatch.delenv(DISABLE_ENV)
    cache16 = cache.to(torch.bfloat16)
    attn = PagedAttention(4, 2, 64, scale=0.125)
    kv = torch.zeros(0, 2, 64)
    meta.slot_mapping = torch.full((2,), -1, dtype=torch.int64)  # write nothing
    torch.testing.assert_close(attn(q, kv, kv, cache16, meta), TorchPagedAttention.decode(attn, q, cache16, meta))
    attn.backend = native_backend(attn, torch.float32)
    with pytest.raises(ValueError, match="dtypes"):
        attn(q, kv, kv, cache16, meta)


# ---- build, cache and fallbacks -------------------------------------------------------------------

def test_no_compiler_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LMSERVE_KERNEL_CC", str(tmp_path / "no-such-gcc"))
    monkeypatch.setenv("LMSERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        assert get_paged_attention_kernel() is None
    assert any("unavailable" in r.message and "no C compiler" in r.message for r in caplog.records)
    plan = cpu_plan(torch.float32)  # no kernel builds: the plan gives every layer its reference
    assert "paged_attention" not in plan.kernels
    assert plan.attention(torch.float32, 64, None).backend == "torch"


def test_failing_compiler_falls_back(monkeypatch, tmp_path, caplog):
    fake = tmp_path / "fake-gcc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'fake 1.0' && exit 0\necho 'error: boom' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LMSERVE_KERNEL_CC", str(fake))
    monkeypatch.setenv("LMSERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        assert get_paged_attention_kernel() is None
    assert any("boom" in r.message for r in caplog.records)
    assert not list((tmp_path / "cache").glob("*.so*"))  # no half-written file left behind


def test_build_is_cached_and_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("LMSERVE_KERNEL_CACHE", str(tmp_path))
    flags = ("-mno-avx512f",) if "avx512f" in _cpu_flags() else ()
    path = build.build_library(SOURCE, flags)
    assert path.parent == tmp_path and path.exists()
    mtime = path.stat().st_mtime_ns
    assert build.build_library(SOURCE, flags) == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files
    assert build.build_library(SOURCE, flags + ("-DLMS_UNUSED_FLAG",)) != path  # flags are in the key


# ---- the whole model ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_llm_greedy_same_tokens_on_off(tiny_models, monkeypatch, kind):
    from lmserve import LLM, SamplingParams

    prompts = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(20, 57)), [300 + i for i in range(13)]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, detokenize=False)
    reference_decode = TorchPagedAttention.decode
    calls = []

    def counting_decode(*args):
        calls.append(1)
        return reference_decode(*args)

    monkeypatch.setattr(TorchPagedAttention, "decode", staticmethod(counting_decode))
    results = {}
    for on in (True, False):
        calls.clear()
        if on:
            monkeypatch.delenv(DISABLE_ENV, raising=False)
        else:
            monkeypatch.setenv(DISABLE_ENV, "1")
        llm = LLM(tiny_models[kind], skip_tokenizer_init=True, dtype="float32", block_size=4,
                  kv_cache_memory=4 * 2**20, max_num_batched_tokens=16)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        results[on] = [o.outputs[0].token_ids for o in outs]
        assert bool(calls) != on  # the reference decode ran only with the kernel off
    assert results[True] == results[False]
