"""Mixture-of-experts models (Mixtral, Qwen3-MoE): the expert dispatch against a naive per-token
reference, the layer layout a config implies, and logits against transformers (fp32) from
safetensors and from GGUF."""

from __future__ import annotations

import pytest
import torch

from lmserve.config import ModelConfig
from lmserve.model.backends.plan import BackendPlan
from lmserve.model.layers.fused_moe import FusedMoE, fused_moe, select_experts
from lmserve.model.loader import get_model
from lmserve.model.loader.gguf_loader import gguf_to_hf_name
from lmserve.model.loader.hf_config import load_hf_config
from lmserve.model.loader.safetensors_loader import iter_checkpoint_weights
from lmserve.model.models.llama import LlamaMLP
from lmserve.model.models.moe import MoeForCausalLM, MoeForSequenceClassification, MoeSpec, stack_expert_weights
from lmserve.model.models.registry import resolve_model_class

from tests.model_utils import PagedTestCache, hf_logits, make_hf_model
from tests.moe_utils import naive_moe, tiny_moe_config, write_tiny_moe_gguf

TOKENS = [5, 17, 33, 2, 90, 41, 7, 64, 12, 300, 8, 451, 77]


# ---- the dispatch ------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 2), (3, 8, 2), (37, 6, 2), (29, 16, 8), (5, 8, 8)])
@pytest.mark.parametrize("gather_max_rows", [0, 10_000])  # grouped path, gathered path
def test_fused_moe_equals_naive_reference(num_tokens, num_experts, top_k, gather_max_rows):
    gen = torch.Generator().manual_seed(num_tokens * 100 + num_experts)
    hidden, inter = 24, 20
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.3
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) * 0.3
    weights, ids = select_experts(torch.randn(num_tokens, num_experts, generator=gen), top_k, renormalize=True)
    out = fused_moe(x, w13, w2, weights, ids, gather_max_rows=gather_max_rows)
    assert out.dtype == x.dtype and out.shape == (num_tokens, hidden)
    torch.testing.assert_close(out.double(), naive_moe(x, w13, w2, weights, ids), atol=1e-4, rtol=1e-4)


def test_fused_moe_bf16_paths_agree():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 32, generator=gen).bfloat16()
    w13 = (torch.randn(4, 48, 32, generator=gen) * 0.2).bfloat16()
    w2 = (torch.randn(4, 32, 24, generator=gen) * 0.2).bfloat16()
    weights, ids = select_experts(torch.randn(6, 4, generator=gen), 2, renormalize=False)
    ref = naive_moe(x.float(), w13.float(), w2.float(), weights, ids)
    for rows in (0, 10_000):
        out = fused_moe(x, w13, w2, weights, ids, gather_max_rows=rows)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), ref, atol=5e-2, rtol=5e-2)


def test_select_experts_matches_transformers_routers():
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    x = torch.randn(11, 64, generator=torch.Generator().manual_seed(2))
    for kind, router_cls, renorm in [("mixtral", MixtralTopKRouter, True), ("qwen3_moe", Qwen3MoeTopKRouter, False)]:
        router = router_cls(tiny_moe_config(kind))
        torch.nn.init.normal_(router.weight, std=0.5)
        _, ref_w, ref_ids = router(x)
        w, ids = select_experts(x @ router.weight.T, router.top_k, renorm)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(w, ref_w.float())


# ---- layout ------------------------------------------------------------------------------------

def test_qwen3_moe_sparse_layers_follow_mlp_only_layers_and_step():
    spec = MoeSpec.from_config(tiny_moe_config("qwen3_moe", num_hidden_layers=6, mlp_only_layers=[3],
                                               decoder_sparse_step=2))
    assert spec.sparse_layers == (False, True, False, False, False, True)
    assert (spec.num_experts, spec.top_k, spec.expert_intermediate_size, spec.renormalize) == (16, 8, 32, False)
    model = MoeForCausalLM(tiny_moe_config("qwen3_moe"), torch.float32)
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [FusedMoE, LlamaMLP, FusedMoE]
    assert model.model.layers[0].self_attn.qk_norm  # Qwen3's q/k norms
    mixtral = MoeSpec.from_config(tiny_moe_config("mixtral"))
    assert mixtral.sparse_layers == (True,) * 3 and mixtral.renormalize and mixtral.top_k == 2
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoeForCausalLM(tiny_moe_config("mixtral", num_experts_per_tok=7), torch.float32)
    with pytest.raises(ValueError, match="LoRA adapters on mixture-of-experts"):
        model.model.layers[0].mlp(torch.zeros(1, 64), False, object())


def test_registry_resolves_moe_architectures():
    assert resolve_model_class(tiny_moe_config("mixtral"))[:2] == (MoeForCausalLM, "generate")
    assert resolve_model_class(tiny_moe_config("qwen3_moe"), "pooling")[1:] == ("pooling", "embed")
    cfg = tiny_moe_config("qwen3_moe", architectures=["Qwen3MoeForSequenceClassification"], num_labels=3)
    assert resolve_model_class(cfg)[0] is MoeForSequenceClassification


# ---- logits against transformers ----------------------------------------------------------------

def _prefill_then_decode_logits(model, prompt: list[int], steps: list[int]) -> torch.Tensor:
    """Logits [len(prompt) + len(steps), vocab]: the prompt as one chunk, then one decode step per
    token (decode steps of one row take the gathered dispatch)."""
    cache = PagedTestCache(model.kv_cache_spec(), num_blocks=64, block_size=4)
    batch = cache.step([("a", prompt)])
    rows = [model.compute_logits(model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta))]
    for tok in steps:
        batch = cache.step([("a", [tok])], decode_only=True)
        rows.append(model.compute_logits(model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta)))
    return torch.cat(rows)


def _model_config(model_dir: str, gguf_file: str | None = None, **kw) -> ModelConfig:
    return ModelConfig(model=model_dir, model_path=model_dir, gguf_file=gguf_file, tokenizer=model_dir,
                       hf_config=load_hf_config(model_dir, gguf_file), dtype=torch.float32, max_model_len=128,
                       served_model_name="m", **kw)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_safetensors_logits_equal_transformers(tmp_path, kind):
    hf = make_hf_model(tiny_moe_config(kind), seed=3)
    hf.save_pretrained(str(tmp_path))
    model = get_model(_model_config(str(tmp_path)), "cpu")  # per-expert tensors, backends bound
    assert isinstance(model, MoeForCausalLM)
    packs = BackendPlan.for_device("cpu", torch.float32).linear(torch.float32, 64).backend not in ("torch", "onednn")
    moe_layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert moe_layers and all((m.packed_experts is not None) == packs for m in moe_layers)
    got = _prefill_then_decode_logits(model, TOKENS[:9], TOKENS[9:])
    torch.testing.assert_close(got, hf_logits(hf, TOKENS), atol=1e-4, rtol=1e-4)


def test_transformers_fused_expert_layout_loads(tmp_path):
    """transformers' own in-memory layout (experts.gate_up_proj / down_proj) loads as it is."""
    hf = make_hf_model(tiny_moe_config("qwen3_moe"), seed=4)
    model = MoeForCausalLM(hf.config, torch.float32)
    model.load_weights(hf.state_dict().items())
    got = _prefill_then_decode_logits(model, TOKENS[:9], TOKENS[9:])
    torch.testing.assert_close(got, hf_logits(hf, TOKENS), atol=1e-4, rtol=1e-4)


def test_incomplete_or_stray_experts_are_refused(tmp_path):
    hf = make_hf_model(tiny_moe_config("mixtral"), seed=5)
    hf.save_pretrained(str(tmp_path))
    dropped = "model.layers.1.block_sparse_moe.experts.5.w3.weight"
    weights = [(n, t) for n, t in iter_checkpoint_weights(str(tmp_path)) if n != dropped]
    model = MoeForCausalLM(hf.config, torch.float32)
    with pytest.raises(ValueError, match=r"incomplete.*model\.layers\.1 gate.*model\.layers\.1 up \(5 experts\)"):
        model.load_weights(weights)
    stray = [("model.layers.0.block_sparse_moe.experts.6.w1.weight", torch.zeros(64, 64))]
    with pytest.raises(ValueError, match="out of range"):
        list(stack_expert_weights(model, stray))
    qwen = MoeForCausalLM(tiny_moe_config("qwen3_moe"), torch.float32)
    with pytest.raises(ValueError, match="no experts"):  # layer 1 is dense (mlp_only_layers)
        list(stack_expert_weights(qwen, [("model.layers.1.mlp.experts.0.up_proj.weight", torch.zeros(32, 64))]))


def test_sequence_classification_equals_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tests.model_utils import randomize_parameters

    cfg = tiny_moe_config("qwen3_moe", num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32).eval()
    randomize_parameters(hf, seed=6)
    hf.save_pretrained(str(tmp_path))
    assert resolve_model_class(load_hf_config(str(tmp_path)))[0] is MoeForSequenceClassification
    model = MoeForSequenceClassification(cfg, torch.float32)
    model.load_weights(iter_checkpoint_weights(str(tmp_path)))
    cache = PagedTestCache(model.kv_cache_spec(), num_blocks=64, block_size=4)
    batch = cache.step([("a", TOKENS)])
    hidden = model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(model.classifier_head(hidden[-1:])[0], ref, atol=1e-4, rtol=1e-4)


# ---- GGUF ----------------------------------------------------------------------------------------

def test_gguf_moe_names():
    assert gguf_to_hf_name("blk.3.ffn_gate_inp.weight") == "model.layers.3.mlp.gate.weight"
    assert gguf_to_hf_name("blk.0.ffn_gate_exps.weight") == "model.layers.0.mlp.experts.gate_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_down_exps.weight") == "model.layers.0.mlp.experts.down_proj.weight"
    assert gguf_to_hf_name("blk.1.ffn_up.7.weight") == "model.layers.1.mlp.experts.7.up_proj.weight"


@pytest.mark.parametrize("kind,arch,overrides", [
    ("mixtral", "llama", {}),
    ("qwen3_moe", "qwen3moe", dict(norm_topk_prob=True)),  # llama.cpp's qwen3moe always renormalizes
])
def test_gguf_roundtrip_equals_transformers(tmp_path, kind, arch, overrides):
    """A GGUF written as llama.cpp's converter writes MoE models (stacked Q8_0 experts, F32 router;
    Mixtral as arch "llama" with expert_count) loads back to the model it came from; the
    Qwen3-MoE file keeps its dense layer 1, which the loader reads off the missing router."""
    hf = make_hf_model(tiny_moe_config(kind, **overrides), seed=7)
    write_tiny_moe_gguf(hf, str(tmp_path / "tiny.gguf"), arch)
    mc = _model_config(str(tmp_path), "tiny.gguf")
    cfg = mc.hf_config
    assert cfg.model_type == kind
    assert cfg.architectures == [{"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[kind]]
    if kind == "qwen3_moe":
        assert (cfg.moe_intermediate_size, cfg.num_experts, cfg.mlp_only_layers) == (32, 16, [1])
    else:
        assert (cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok) == (64, 6, 2)
    model = get_model(mc, "cpu")
    got = _prefill_then_decode_logits(model, TOKENS[:9], TOKENS[9:])
    torch.testing.assert_close(got, hf_logits(hf, TOKENS), atol=1e-4, rtol=1e-4)


def test_bf16_packed_experts_match_stacked_torch_experts():
    """The experts on the plan's bf16 backend (AMX / oneDNN panels where this CPU has them) give the
    logits of the same model on torch's stacked weights, up to bf16 rounding."""
    from lmserve.model.loader.binding import bind_backends

    hf = make_hf_model(tiny_moe_config("mixtral"), seed=8)
    state = {n: t.bfloat16() for n, t in hf.state_dict().items()}
    ref_model, packed_model = (MoeForCausalLM(hf.config, torch.bfloat16) for _ in range(2))
    for m in (ref_model, packed_model):
        m.load_weights(state.items())
    table = bind_backends(packed_model, BackendPlan.for_device("cpu", torch.bfloat16))
    assert len(table.backends("moe_experts")) == 1
    ref = _prefill_then_decode_logits(ref_model, TOKENS[:9], TOKENS[9:])
    got = _prefill_then_decode_logits(packed_model, TOKENS[:9], TOKENS[9:])
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(got, ref, atol=0.15 * ref.abs().max().item(), rtol=0)
