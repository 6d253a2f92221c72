"""LoRA adapters against PEFT: greedy tokens of a batch mixing three adapters and the base model
equal PEFT's merged model in transformers (fp32) token for token, on the tiny Llama, Qwen2 and
Qwen3 checkpoints, under chunked prefill and prefix caching; one step holds several adapters and
base rows; the same prompt under two adapters never shares KV blocks; bad adapters are refused."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.lora.batch import LoRABatchBuilder
from lmserve.lora.request import LoRARequest
from tests.lora_utils import ADAPTER_SPECS, greedy, make_peft_adapter

MAX_TOKENS = 8
PREFIX = list(range(100, 121))  # 21 tokens: 5 full blocks of 4, shared by every prompt
PROMPTS = [PREFIX + [7, 8, 9], PREFIX + [10], PREFIX + [400, 401, 402, 403], [11, 12, 13]]


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    """kind -> (adapter name -> (path, PEFT merged reference outputs)), and the base outputs."""
    from transformers import AutoModelForCausalLM

    out = {}
    for kind, base in tiny_models.items():
        root = tmp_path_factory.mktemp(f"lora_{kind}")
        made = {}
        for seed, (name, spec) in enumerate(ADAPTER_SPECS.items(), start=1):
            path = str(root / name)
            merged = make_peft_adapter(base, path, seed, **spec)
            made[name] = (path, greedy(merged, PROMPTS, MAX_TOKENS))
        base_ref = greedy(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), PROMPTS, MAX_TOKENS)
        out[kind] = (made, base_ref)
    return out


def make_llm(path: str, **kw) -> LLM:
    args = dict(skip_tokenizer_init=True, dtype="float32", block_size=4, kv_cache_memory=4 * 2**20,
                enable_lora=True, max_loras=3, max_lora_rank=16)
    args.update(kw)
    return LLM(path, **args)


def run(llm: LLM, prompts, loras):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras)
    return [o.outputs[0].token_ids for o in outs]


def record_steps(llm: LLM) -> list[tuple[int, bool]]:
    """Records, per step with adapters, (number of adapters, whether base rows are present)."""
    runner = llm.llm_engine.core.runner
    seen: list[tuple[int, bool]] = []
    build = runner.lora_builder.build

    def spy(per_seq, query_lens, device):
        mapping = build(per_seq, query_lens, device)
        if mapping is not None:
            seen.append((len(mapping.adapters), any(a is None for a in per_seq)))
        return mapping

    runner.lora_builder.build = spy
    return seen


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_mixed_adapters_equal_peft_merged(tiny_models, adapters, kind):
    made, base_ref = adapters[kind]
    names = list(made)
    requests = {n: LoRARequest(n, i + 1, made[n][0]) for i, n in enumerate(names)}
    # every prompt under every adapter and the base model, all in one generate call: steps mix them
    prompts, loras, expected = [], [], []
    for j, p in enumerate(PROMPTS):
        for n in names + [None]:
            prompts.append(p)
            loras.append(requests[n] if n else None)
            expected.append(made[n][1][j] if n else base_ref[j])
    # adapters must actually change the outputs, or this test could not fail
    assert all(made[n][1] != base_ref for n in names)
    # a small token budget chunks the 25-token prompts; prefix caching shares PREFIX within an adapter
    llm = make_llm(tiny_models[kind], max_num_batched_tokens=16)
    steps = record_steps(llm)
    assert run(llm, prompts, loras) == expected
    assert max(n for n, _ in steps) == 3 and any(n >= 2 and base for n, base in steps)
    assert llm.llm_engine.core.kv_manager.stats.hits > 0
    # a second pass reads PREFIX (and whole prompts) from the prefix cache, still exact
    assert run(llm, prompts, loras) == expected


@pytest.mark.parametrize("form", ["native-avx512", "native-amx"])
def test_native_kernel_in_a_bf16_model_matches_the_torch_forms(tiny_models, adapters, form):
    """bf16 end to end: the next-token distributions of a batch mixing three adapters and the base
    model, with the deltas on the native kernel, equal those of the torch forms within bf16 rounding."""
    made, _ = adapters["llama"]
    kernel = _native_kernel(form)
    names = list(made)
    requests = [LoRARequest(n, i + 1, made[n][0]) for i, n in enumerate(names)] + [None]
    prompts = [p for p in PROMPTS for _ in requests]
    loras = requests * len(PROMPTS)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=20, detokenize=False)
    llm = make_llm(tiny_models["llama"], dtype="bfloat16", max_num_batched_tokens=64, enable_prefix_caching=False)
    runner = llm.llm_engine.core.runner
    got = {}
    for name, builder in (("native", LoRABatchBuilder(native=kernel)), ("torch", LoRABatchBuilder(native=False))):
        runner.lora_builder = builder
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras)
        got[name] = [o.outputs[0] for o in outs]
    assert len({tuple(o.token_ids) for o in got["native"]}) > 1  # adapters make a difference here
    for lora, a, b in zip(loras, got["native"], got["torch"]):
        la, lb = a.logprobs[0], b.logprobs[0]
        common = set(la) & set(lb)
        assert len(common) >= 15
        diff = max(abs(la[t].logprob - lb[t].logprob) for t in common)
        assert (diff == 0) if lora is None else (diff < 0.15), (lora, diff)  # base rows: untouched by either
        # the same greedy token, but where the two best are tied within that rounding
        (token,) = a.token_ids
        assert token == b.token_ids[0] or lb[b.token_ids[0]].logprob - lb[token].logprob < 0.15


def test_max_loras_one_serialises_adapters(tiny_models, adapters):
    made, base_ref = adapters["llama"]
    llm = make_llm(tiny_models["llama"], max_loras=1, max_cpu_loras=2)
    steps = record_steps(llm)
    names = list(made)
    loras = [LoRARequest(n, i + 1, made[n][0]) for i, n in enumerate(names)] + [None]
    got = run(llm, [PROMPTS[0]] * 4, loras)
    assert got == [made[n][1][0] for n in names] + [base_ref[0]]
    assert max(n for n, _ in steps) == 1


def test_same_prompt_under_two_adapters_shares_no_blocks(tiny_models, adapters):
    made, base_ref = adapters["qwen3"]
    llm = make_llm(tiny_models["qwen3"])
    core = llm.llm_engine.core
    a1, a2 = LoRARequest("all", 1, made["all"][0]), LoRARequest("mlp", 2, made["mlp"][0])
    prompt = PROMPTS[2]

    def cached_and_blocks(lora):
        llm.llm_engine.add_request("r", {"prompt_token_ids": prompt},
                                   SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), lora_request=lora)
        core.step()
        req = core.scheduler.requests["r"]
        cached, blocks = req.num_cached_tokens, set(core.kv_manager.block_ids("r"))
        llm.llm_engine.abort_request("r")
        return cached, blocks

    c1, b1 = cached_and_blocks(a1)
    c2, b2 = cached_and_blocks(a2)
    c0, b0 = cached_and_blocks(None)
    c1_again, b1_again = cached_and_blocks(a1)
    assert c1 == c2 == c0 == 0  # nothing shared across adapters or with the base model
    assert not (b1 & b2) and not (b1 & b0) and not (b2 & b0)
    assert c1_again == 24 and b1_again & b1  # the same adapter does hit its own blocks


def _write_adapter(path: str, config: dict, tensors: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}, f)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    return path


def test_bad_adapters_are_refused_clearly(tiny_models, adapters, tmp_path):
    made, _ = adapters["llama"]
    llm = make_llm(tiny_models["llama"], max_lora_rank=8)
    params = SamplingParams(max_tokens=2)
    prompt = {"prompt_token_ids": [1, 2, 3]}
    with pytest.raises(ValueError, match="LoRA rank 16 .* greater than max_lora_rank 8"):
        llm.generate(prompt, params, lora_request=LoRARequest("mlp", 3, made["mlp"][0]))
    lm_head = _write_adapter(str(tmp_path / "head"), {"target_modules": ["q_proj"]},
                             {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                              "base_model.model.lm_head.lora_B.weight": torch.zeros(512, 4)})
    with pytest.raises(ValueError, match="unsupported target module .*lm_head"):
        llm.generate(prompt, params, lora_request=LoRARequest("head", 4, lm_head))
    embed = _write_adapter(str(tmp_path / "emb"), {"target_modules": ["embed_tokens"]}, {})
    with pytest.raises(ValueError, match=r"target modules \['embed_tokens'\] are not supported"):
        llm.generate(prompt, params, lora_request=LoRARequest("emb", 5, embed))
    dora = _write_adapter(str(tmp_path / "dora"), {"use_dora": True}, {})
    with pytest.raises(ValueError, match="DoRA"):
        llm.generate(prompt, params, lora_request=LoRARequest("dora", 6, dora))
    with pytest.raises(ValueError, match="No adapter_config.json"):
        llm.generate(prompt, params, lora_request=LoRARequest("missing", 7, str(tmp_path / "nowhere")))
    plain = LLM(tiny_models["llama"], skip_tokenizer_init=True, dtype="float32", kv_cache_memory=2**22)
    with pytest.raises(ValueError, match="not enabled.*--enable-lora"):
        plain.generate(prompt, params, lora_request=LoRARequest("all", 1, made["all"][0]))
    assert llm.llm_engine.core.scheduler.num_unfinished == 0  # a refused request leaves nothing behind


def _native_kernel(form):
    """None for a torch form; the native kernel of the form's mode, or a skip where it does not load."""
    from lmserve.model.layers.cpu_kernels.lora_gemm import get_lora_kernel

    if not form.startswith("native"):
        return None
    kernel = get_lora_kernel(amx=form == "native-amx")
    if kernel is None:
        pytest.skip(f"{form} needs AVX512-BF16" + (" and AMX tiles" if form == "native-amx" else ""))
    return kernel


NATIVE_FORMS = ["segments", "masked", "native-avx512", "native-amx"]


@pytest.mark.parametrize("form", NATIVE_FORMS)
def test_batched_delta_equals_per_row_reference(monkeypatch, form):
    """Every form of the batched delta (per-run segments, masked shrink with one block-diagonal expand, and
    the native bf16 kernel) equals each row's own x A^T B, base rows untouched; merged modules (shard
    blocks) and an odd rank included."""
    from lmserve.lora import batch as lora_batch
    from lmserve.lora.checkpoint import LayerDelta, LoRAAdapter

    kernel = _native_kernel(form)
    monkeypatch.setattr(lora_batch, "SEGMENT_MIN_ROWS", 0 if form == "segments" else 10**6)
    dtype = torch.bfloat16 if kernel is not None else torch.float32
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    def merged(shard_ranks):  # a Q|K|V-like module of 24 = 12 + 6 + 6 columns; rank 0: shard not targeted
        cols = ((0, 12), (12, 18), (18, 24))
        a_rows, b_rows, blocks = [], [], []
        for (c0, c1), r in zip(cols, shard_ranks):
            if r:
                b = torch.zeros(r, 24, dtype=dtype)
                b[:, c0:c1] = randn(r, c1 - c0)
                blocks.append((sum(t.shape[0] for t in a_rows), sum(t.shape[0] for t in a_rows) + r, c0, c1))
                a_rows.append(randn(r, 32))
                b_rows.append(b)
        return LayerDelta(torch.cat(a_rows), torch.cat(b_rows), tuple(blocks))

    adapters = [LoRAAdapter(i + 1, f"a{i}", "", r, {"m": LayerDelta(randn(r, 32), randn(r, 24)), "qkv": merged(ranks)})
                for i, (r, ranks) in enumerate(((4, (4, 4, 4)), (8, (8, 0, 8)), (3, (0, 3, 0))))]
    adapters.append(LoRAAdapter(9, "other", "", 4, {}))  # targets no module here
    adapters.append(LoRAAdapter(10, "wide", "", 34, {"m": LayerDelta(randn(34, 32), randn(34, 24)),  # rank > 32
                                                      "qkv": merged((34, 2, 0))}))
    per_seq = [adapters[1], None, adapters[0], adapters[3], adapters[2], adapters[1], adapters[4], adapters[1]]
    qlens = [1, 3, 2, 1, 4, 2, 3, 1]
    mapping = LoRABatchBuilder(native=kernel or False).build(per_seq, qlens, torch.device("cpu"))
    assert mapping.segmented == (form == "segments")
    assert mapping.active.kernel is kernel
    x = randn(sum(qlens), 32)
    y0 = randn(sum(qlens), 24)
    for key in ("m", "qkv"):
        got = mapping.add_delta(key, x, y0.clone())
        row = 0
        for ad, q in zip(per_seq, qlens):
            for _ in range(q):
                d = ad.deltas.get(key) if ad is not None else None
                if d is None:
                    assert got[row].equal(y0[row])
                else:  # the shrink is rounded to the factors' dtype, the sum once
                    h = (x[row].float() @ d.a.float().T).to(dtype).float()
                    torch.testing.assert_close(got[row], (y0[row].float() + h @ d.b.float()).to(dtype))
                row += 1
    assert mapping.add_delta("absent", x, y0.clone()).equal(y0)


@pytest.mark.parametrize("form", NATIVE_FORMS)
def test_a_step_reuses_a_kept_superset_of_its_adapters(form, monkeypatch):
    """Adapters leaving a running batch keep its set (no new concatenation); a new adapter joins the
    last set while the union fits; every row still gets exactly its own adapter's delta."""
    from lmserve.lora import batch as lora_batch
    from lmserve.lora.checkpoint import LayerDelta, LoRAAdapter

    kernel = _native_kernel(form)
    monkeypatch.setattr(lora_batch, "SEGMENT_MIN_ROWS", 0 if form == "segments" else 10**6)
    dtype = torch.bfloat16 if kernel is not None else torch.float32
    gen = torch.Generator().manual_seed(1)
    ads = [LoRAAdapter(i + 1, f"a{i}", "", 4, {"m": LayerDelta(torch.randn(4, 16, generator=gen).to(dtype),
                                                                torch.randn(4, 8, generator=gen).to(dtype))})
           for i in range(4)]
    builder = LoRABatchBuilder(max_union=3, native=kernel or False)
    cpu = torch.device("cpu")
    first = builder.build([ads[0], ads[1], ads[2]], [1, 1, 1], cpu)
    later = builder.build([ads[2], None, ads[0]], [2, 1, 1], cpu)  # a subset: the same set
    assert later.active is first.active and [a.lora_id for a in later.adapters] == [1, 3]
    joined = builder.build([ads[3]], [1], cpu)  # a union of 4 > max_union: a set of its own
    assert joined.active.adapters == (ads[3],)
    grown = builder.build([ads[0]], [1], cpu)  # found in the first set
    assert grown.active is first.active
    union = LoRABatchBuilder(max_union=8)
    union.build([ads[0], ads[1]], [1, 1], cpu)
    assert [a.lora_id for a in union.build([ads[2]], [1], cpu).active.adapters] == [1, 2, 3]  # joins the last set
    for mapping, per_seq, qlens in ((later, [ads[2], None, ads[0]], [2, 1, 1]), (joined, [ads[3]], [1])):
        x = torch.randn(sum(qlens), 16, generator=gen).to(dtype)
        y0 = torch.randn(sum(qlens), 8, generator=gen).to(dtype)
        got = mapping.add_delta("m", x, y0.clone())
        row = 0
        for ad, q in zip(per_seq, qlens):
            for _ in range(q):
                d = None if ad is None else ad.deltas["m"]
                h = None if d is None else (x[row].float() @ d.a.float().T).to(dtype).float()
                want = y0[row] if d is None else (y0[row].float() + h @ d.b.float()).to(dtype)
                torch.testing.assert_close(got[row], want)
                row += 1


def test_unloading_an_adapter_in_use_keeps_its_running_requests_exact(tiny_models, adapters):
    made, _ = adapters["llama"]
    llm = make_llm(tiny_models["llama"], max_cpu_loras=3)
    engine = llm.llm_engine
    a1 = LoRARequest("all", 1, made["all"][0])
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    engine.add_request("r", {"prompt_token_ids": PROMPTS[0]}, params, lora_request=a1)
    engine.step()
    engine.step()
    assert engine.remove_lora(1) and 1 not in engine.list_loras()
    for i, n in enumerate(("qv-rslora", "mlp")):  # other adapters take the cache meanwhile
        engine.add_lora(LoRARequest(n, 10 + i, made[n][0]))
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert outs[0].outputs[0].token_ids == made["all"][1][0]


def test_lora_on_a_pooling_model_is_refused(tiny_models):
    with pytest.raises(ValueError, match="--enable-lora.*pooling"):
        LLM(tiny_models["llama"], runner="pooling", enable_lora=True, skip_tokenizer_init=True)


@pytest.mark.parametrize("path", ["quantized-int-kernel", "quantized-dense", "packed-dense"])
def test_delta_on_every_linear_backend(path):
    """Linear.forward adds the delta after whatever backend the plan bound: a GGUF block-quantized
    layer on its integer kernel (decode-only, few rows) or its dense path, and a packed bf16 weight.
    The output is the backend's own base output plus the rows' deltas (base rows unchanged)."""
    gguf = pytest.importorskip("gguf")
    from lmserve.lora.checkpoint import LayerDelta, LoRAAdapter
    from lmserve.model.backends.block_formats import BLOCK_BYTES, BlockQuantizedWeight
    from lmserve.model.layers.linear import Linear
    from lmserve.model.layers.quantized_linear import QuantizedLinear
    from tests.backend_utils import bind

    gen = torch.Generator().manual_seed(0)
    n, k = 96, 128
    lin = Linear(k, n, dtype=torch.bfloat16)
    if path.startswith("quantized"):
        import numpy as np
        raw = gguf.quants.quantize(np.asarray(torch.randn(n, k, generator=gen) * 0.05), gguf.GGMLQuantizationType.Q8_0)
        lin = QuantizedLinear.from_linear(lin)
        lin.load_quantized(BlockQuantizedWeight("Q8_0", torch.from_numpy(raw).reshape(n, k // 32, BLOCK_BYTES["Q8_0"])))
    else:
        lin.weight.data.copy_(torch.randn(n, k, generator=gen) * 0.05)
    bind(lin)
    if path.startswith("quantized"):
        assert type(lin.backend).__name__ == "BlockQuantLinear"
    lin.lora_key = "m"
    ads = [LoRAAdapter(i + 1, f"a{i}", "", 8, {"m": LayerDelta(torch.randn(8, k, generator=gen).bfloat16() * 0.1,
                                                                torch.randn(8, n, generator=gen).bfloat16() * 0.1)})
           for i in range(2)]
    per_seq = [ads[0], None, ads[1], ads[0]]
    qlens = [1, 1, 1, 1] if path == "quantized-int-kernel" else [3, 70, 2, 1]
    decode_only = path == "quantized-int-kernel"
    mapping = LoRABatchBuilder().build(per_seq, qlens, torch.device("cpu"))
    x = torch.randn(sum(qlens), k, generator=gen).bfloat16()
    base = lin(x, decode_only)
    got = lin(x, decode_only, mapping)
    row = 0
    for ad, q in zip(per_seq, qlens):
        for _ in range(q):
            if ad is None:
                assert torch.equal(got[row], base[row])
            else:
                d = ad.deltas["m"]
                want = base[row].float() + (x[row].float() @ d.a.float().T) @ d.b.float()
                torch.testing.assert_close(got[row].float(), want, rtol=2e-2, atol=2e-2)
            row += 1


@pytest.mark.parametrize("form", ["native-avx512", "native-amx"])
def test_native_kernel_refuses_bad_tables_and_writes_nothing(form):
    """lms_lora_sbgemm checks every index it is given (rows, slot ranges, blocks) before writing."""
    import dataclasses

    kernel = _native_kernel(form)
    gen = torch.Generator().manual_seed(2)
    factors = kernel.pack_factors(torch.randn(4, 32, generator=gen).bfloat16(),
                                  torch.randn(4, 24, generator=gen).bfloat16(), ((0, 4, 0, 24),))
    tables = kernel.tables([factors])
    x = torch.randn(3, 32, generator=gen).bfloat16()
    rows, start = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 2])
    y = torch.zeros(3, 24, dtype=torch.bfloat16)
    kernel.add_deltas(x, y, rows, start, tables)
    assert y[0].ne(0).any() and y[1].eq(0).all() and y[2].ne(0).any()
    wide = tables.blocks.clone()
    wide[4] = 25  # an expand past y's 24 columns
    bad = [(torch.tensor([0, 3], dtype=torch.int32), start, tables),  # a row past x
           (rows, torch.tensor([0, 3]), tables),  # a slot range past rows
           (rows, torch.tensor([1, 2]), tables),  # not starting at 0
           (rows, start, dataclasses.replace(tables, blocks=wide))]
    for r, s, t in bad:
        y = torch.zeros(3, 24, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="lms_lora_sbgemm rejected"):
            kernel.add_deltas(x, y, r, s, t)
        assert y.eq(0).all()
