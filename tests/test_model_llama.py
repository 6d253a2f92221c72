"""Llama-family models with paged attention vs Hugging Face transformers (fp32, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from lmserve.config import ModelConfig
from lmserve.model.layers.attention import KVCacheSpec, PagedAttention
from lmserve.model.layers.rotary import RotaryEmbedding
from lmserve.model.loader import get_model
from lmserve.model.loader.hf_config import checkpoint_dtype, load_hf_config
from lmserve.model.models.llama import LlamaForCausalLM
from lmserve.model.models.registry import get_model_class

from tests.model_utils import PagedTestCache, hf_logits, make_hf_model

ATOL = RTOL = 1e-4
_SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)


def _configs() -> dict[str, object]:
    return {
        "llama": LlamaConfig(**_SMALL),
        "llama-bias-headdim-mha": LlamaConfig(**{**_SMALL, "num_key_value_heads": 4}, head_dim=24,
                                              attention_bias=True, mlp_bias=True),
        "llama3-rope": LlamaConfig(**_SMALL, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "yarn-rope": LlamaConfig(**_SMALL, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 32}),
        "linear-rope": LlamaConfig(**_SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 100.0,
                                                              "factor": 2.0}),
        "mistral-sliding": MistralConfig(**_SMALL, sliding_window=6),
        "qwen2-tied": Qwen2Config(**_SMALL, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**_SMALL, head_dim=32, tie_word_embeddings=False),
    }


def _model_config(path: str, dtype: torch.dtype = torch.float32) -> ModelConfig:
    return ModelConfig(model=path, model_path=path, gguf_file=None, tokenizer=path,
                       hf_config=load_hf_config(path), dtype=dtype, max_model_len=128, served_model_name="tiny")


@pytest.fixture(scope="module", params=list(_configs()))
def pair(request, tmp_path_factory):
    """(our model loaded through get_model from safetensors, HF reference model)."""
    config = _configs()[request.param]
    hf = make_hf_model(config, seed=hash(request.param) % 1000)
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path)
    ours = get_model(_model_config(path), torch.device("cpu"))
    return ours, hf


def _run(model, cache: PagedTestCache, chunks, pad_tokens: int = 0):
    batch = cache.step(chunks, pad_tokens=pad_tokens)
    hidden = model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta)
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    return {sid: logits[batch.starts[sid]: batch.starts[sid] + len(toks)] for sid, toks in chunks}


def _tokens(n: int, seed: int, vocab: int = 96) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _assert_batched_runs_agree(model_a, model_b, tol: float = 1e-4) -> None:
    """Two loads of one checkpoint (a fast path and its reference) give the same logits, within
    ``tol``, and the same greedy tokens over one batched run of three prompts of mixed lengths."""
    chunks = [("a", _tokens(17, 1)), ("b", _tokens(5, 2)), ("c", _tokens(40, 3))]
    out_a = _run(model_a, PagedTestCache(model_a.kv_cache_spec()), chunks)
    out_b = _run(model_b, PagedTestCache(model_b.kv_cache_spec()), chunks)
    for sid, _ in chunks:
        assert (out_a[sid] - out_b[sid]).abs().max() < tol
        assert torch.equal(out_a[sid].argmax(-1), out_b[sid].argmax(-1))


def test_full_prefill(pair):
    ours, hf = pair
    toks = _tokens(19, 1)
    out = _run(ours, PagedTestCache(ours.kv_cache_spec()), [("a", toks)])["a"]
    torch.testing.assert_close(out, hf_logits(hf, toks), atol=ATOL, rtol=RTOL)


def test_chunked_prefill_then_decode(pair):
    ours, hf = pair
    toks = _tokens(20, 2)
    ref = hf_logits(hf, toks)
    cache = PagedTestCache(ours.kv_cache_spec(), seed=3)
    torch.testing.assert_close(_run(ours, cache, [("a", toks[:7])])["a"], ref[:7], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(_run(ours, cache, [("a", toks[7:15])])["a"], ref[7:15], atol=ATOL, rtol=RTOL)
    for i in range(15, 20):
        torch.testing.assert_close(_run(ours, cache, [("a", [toks[i]])])["a"], ref[i:i + 1], atol=ATOL, rtol=RTOL)


def test_mixed_batch(pair):
    """Three sequences of different lengths; decodes and (chunked) prefills in one flat batch."""
    ours, hf = pair
    seqs = {"a": _tokens(11, 4), "b": _tokens(23, 5), "c": _tokens(11, 6)}
    refs = {sid: hf_logits(hf, t) for sid, t in seqs.items()}
    done = {sid: 0 for sid in seqs}
    cache = PagedTestCache(ours.kv_cache_spec(), seed=7)
    plan = [{"a": 7, "b": 5},  # two prefills
            {"a": 1, "b": 9, "c": 9},  # decode + chunk continuing a cached prefix + full prefill
            {"a": 1, "c": 1, "b": 6},  # decodes + chunk
            {"a": 1, "b": 1, "c": 1},  # all decodes
            {"b": 2, "a": 1}]  # decode + short chunk
    for step, grants in enumerate(plan):
        chunks = [(sid, seqs[sid][done[sid]: done[sid] + n]) for sid, n in grants.items()]
        out = _run(ours, cache, chunks, pad_tokens=2 if step == 3 else 0)
        for sid, n in grants.items():
            torch.testing.assert_close(out[sid], refs[sid][done[sid]: done[sid] + n], atol=ATOL, rtol=RTOL,
                                       msg=lambda m, s=sid, st=step: f"step {st}, seq {s}: {m}")
            done[sid] += n


def test_bf16_close_to_fp32(tmp_path):
    config = Qwen3Config(**_SMALL, head_dim=32)
    hf = make_hf_model(config, seed=11)
    hf.save_pretrained(str(tmp_path))
    ours = get_model(_model_config(str(tmp_path), torch.bfloat16), "cpu")
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    assert ours.kv_cache_spec().dtype == torch.bfloat16
    toks = _tokens(13, 8)
    ref = hf_logits(hf, toks)
    cache = PagedTestCache(ours.kv_cache_spec())
    out = torch.cat([_run(ours, cache, [("a", toks[:10])])["a"], _run(ours, cache, [("a", toks[10:11])])["a"],
                     _run(ours, cache, [("a", toks[11:])])["a"]])
    scale = ref.abs().max()
    assert (out - ref).abs().max() < 0.05 * scale
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


# ---- attention backend alone -------------------------------------------------------------------

def _naive_attention(q, k, v, pos_q, pos_k, scale, window):
    """q [n, Hq, D], k/v [L, Hkv, D]; token at pos_q sees keys at pos <= pos_q (and within window)."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = pos_k[None, :] <= pos_q[:, None]
    if window is not None:
        mask &= pos_k[None, :] > pos_q[:, None] - window
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_matches_naive(window):
    hq, hkv, d = 6, 2, 16
    attn = PagedAttention(hq, hkv, d, scale=d ** -0.5, sliding_window=window)
    spec = KVCacheSpec(num_layers=1, num_kv_heads=hkv, head_dim=d, dtype=torch.float32)
    cache = PagedTestCache(spec, num_blocks=32, block_size=4, seed=1)
    gen = torch.Generator().manual_seed(0)
    history: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    plan = [{"a": 6, "b": 9}, {"a": 1, "b": 4, "c": 13}, {"a": 1, "b": 1, "c": 1}, {"c": 1, "a": 3}]
    for grants in plan:
        chunks = [(sid, [0] * n) for sid, n in grants.items()]
        batch = cache.step(chunks, pad_tokens=1)
        T = len(batch.input_ids)
        q = torch.randn(T, hq, d, generator=gen)
        k = torch.randn(T, hkv, d, generator=gen)
        v = torch.randn(T, hkv, d, generator=gen)
        out = attn(q, k, v, cache.kv_caches[0], batch.meta)
        assert torch.all(out[-1] == 0)  # the padding token
        for sid, n in grants.items():
            s = batch.starts[sid]
            ks, vs = history.get(sid, (torch.empty(0, hkv, d), torch.empty(0, hkv, d)))
            ks, vs = torch.cat([ks, k[s:s + n]]), torch.cat([vs, v[s:s + n]])
            history[sid] = (ks, vs)
            L = ks.shape[0]
            ref = _naive_attention(q[s:s + n], ks, vs, torch.arange(L - n, L), torch.arange(L), d ** -0.5, window)
            torch.testing.assert_close(out[s:s + n], ref, atol=1e-5, rtol=1e-5)


# ---- smaller pieces ------------------------------------------------------------------------------

def test_rotary_matches_hf_llama3():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = _configs()["llama3-rope"]
    ours = RotaryEmbedding.from_config(config, 16, torch.float32)
    ref = LlamaRotaryEmbedding(config)
    pos = torch.tensor([0, 3, 17, 100, 127])
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    cos, sin = ref(q, pos[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_out, k_out = ours(pos, q, k)
    torch.testing.assert_close(q_out, q_ref[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_out, k_ref[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


def test_yarn_cache_covers_extended_context():
    config = _configs()["yarn-rope"]
    rope = RotaryEmbedding.from_config(config, 16, torch.float32)
    assert rope.max_position == 128  # max(max_position_embeddings, 32 * 4)
    assert math.isclose(rope.attention_scaling, 0.1 * math.log(4.0) + 1.0, rel_tol=1e-6)


def test_kv_cache_spec():
    model = LlamaForCausalLM(Qwen3Config(**_SMALL, head_dim=32), torch.bfloat16)
    spec = model.kv_cache_spec()
    assert spec == KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=32, dtype=torch.bfloat16)
    assert spec.bytes_per_block(16) == 2 * 2 * 16 * 2 * 32 * 2
    caches = spec.allocate(3, 16, "cpu")
    assert len(caches) == 2 and caches[0].shape == (2, 3, 16, 2, 32)


def test_registry():
    assert get_model_class(Qwen2Config(**_SMALL, architectures=["Qwen2ForCausalLM"])) is LlamaForCausalLM
    assert get_model_class(LlamaConfig(**_SMALL)) is LlamaForCausalLM  # no architectures: by model_type
    with pytest.raises(ValueError, match="Supported architectures: .*LlamaForCausalLM, MistralForCausalLM"):
        get_model_class(LlamaConfig(**_SMALL, architectures=["FalconForCausalLM"]))


def test_load_weights_errors():
    config = LlamaConfig(**_SMALL)
    hf = make_hf_model(config)
    state = dict(hf.state_dict())
    model = LlamaForCausalLM(config, torch.float32)
    with pytest.raises(ValueError, match="Unexpected weights.*model.layers.0.self_attn.bogus.weight"):
        model.load_weights([*state.items(), ("model.layers.0.self_attn.bogus.weight", torch.zeros(1))])
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing.*model.layers.1.mlp.gate_up_proj.weight"):
        model.load_weights(state.items())
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        model.load_weights(state.items())


def test_dummy_load_format(tmp_path):
    config = Qwen2Config(**_SMALL, architectures=["Qwen2ForCausalLM"])
    config.save_pretrained(str(tmp_path))
    mc = ModelConfig(model="x", model_path=str(tmp_path), gguf_file=None, tokenizer=str(tmp_path),
                     hf_config=load_hf_config(str(tmp_path)), dtype=torch.float32, max_model_len=64,
                     served_model_name="x", load_format="dummy")
    model = get_model(mc, "cpu")
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    cache = PagedTestCache(model.kv_cache_spec())
    out = _run(model, cache, [("a", [1, 2, 3, 4, 5])])["a"]
    assert torch.isfinite(out).all() and out.std() > 0


def test_checkpoint_dtype(tmp_path):
    config = LlamaConfig(**_SMALL, dtype="bfloat16")
    config.save_pretrained(str(tmp_path))
    assert checkpoint_dtype(load_hf_config(str(tmp_path)), str(tmp_path)) == torch.bfloat16
    assert checkpoint_dtype(config, None, "model.gguf") == torch.float32


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_auto_dtype_follows_the_cpu(fast_bf16):
    """--dtype auto: a 16-bit checkpoint keeps its dtype and fp32 becomes bf16 on a CPU with native
    bf16; on one without (AVX2 only: bf16 emulated, ~100x slower) auto is fp32. CUDA and explicit
    dtypes are unaffected."""
    from lmserve.config import resolve_dtype

    expect_cpu = torch.bfloat16 if fast_bf16 else torch.float32
    assert resolve_dtype("auto", torch.float32, "cpu", fast_bf16=fast_bf16) == expect_cpu
    assert resolve_dtype("auto", torch.bfloat16, "cpu", fast_bf16=fast_bf16) == expect_cpu
    assert resolve_dtype("auto", None, "cpu", fast_bf16=fast_bf16) == expect_cpu
    assert resolve_dtype("auto", torch.float16, "cpu", fast_bf16=True) == torch.float16
    assert resolve_dtype("auto", torch.float32, "cuda", fast_bf16=fast_bf16) == torch.float16
    assert resolve_dtype("auto", torch.bfloat16, "cuda", fast_bf16=fast_bf16) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.float32, "cpu", fast_bf16=fast_bf16) == torch.bfloat16
    assert resolve_dtype("float32", torch.bfloat16, "cpu", fast_bf16=fast_bf16) == torch.float32
