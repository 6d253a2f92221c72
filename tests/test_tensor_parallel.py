"""Tensor parallelism of the model layer: TP=2 (two processes over gloo) equals TP=1.

One spawn of two ranks builds every scenario with ``get_model(..., parallel=ctx)`` (tiny Llama with
one KV head, so replicated, an odd vocab and biases everywhere; tied Qwen2; Qwen3; a Q8_0 GGUF kept
quantized; dummy weights), drives each through chunked prefills, a mixed step and decode-only
steps over a paged KV cache, greedy; the parent runs the same steps on the TP=1 model and compares
logits (fp32, tight) and generated tokens (equal). The rest are in-process unit tests of the
sharding math (no process group: only ``forward`` of a sharded layer needs one).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

from lmserve.config import ModelConfig
from lmserve.distributed.parallel_state import ParallelContext
from lmserve.model.backends.block_formats import BlockQuantizedWeight
from lmserve.model.layers.parallel_linear import (ColumnParallelLinear, HeadLayout, MergedColumnParallelLinear,
                                                  ParallelLMHead, RowParallelLinear, VocabParallelEmbedding,
                                                  vocab_range)
from lmserve.model.layers.sharding import narrow_weight
from lmserve.model.loader import get_model
from lmserve.model.loader.hf_config import load_hf_config

from tests.model_utils import PagedTestCache, make_hf_model, write_tiny_gguf

TP = 2
_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
_PROMPTS = {"a": 11, "b": 23, "c": 9}
# prompt tokens granted per step (chunked prefill); a sequence whose prompt is done decodes
_PREFILL_PLAN = [{"a": 7, "b": 5}, {"a": 4, "b": 9, "c": 9}, {"b": 9}]
_STEPS = 6


def _tp(rank: int, size: int = TP) -> ParallelContext:
    return ParallelContext(tp_rank=rank, tp_size=size)


def _model_config(path: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32, **kw) -> ModelConfig:
    return ModelConfig(model=path, model_path=path, gguf_file=gguf_file, tokenizer=path,
                       hf_config=load_hf_config(path, gguf_file), dtype=dtype, max_model_len=256,
                       served_model_name="tiny", **kw)


def _drive(model, vocab: int) -> tuple[list[torch.Tensor], dict[str, list[int]]]:
    """Run ``_STEPS`` steps (chunked prefills, a mixed step, then decode-only steps), greedy.
    Returns every step's logits and the tokens generated per sequence."""
    gen = torch.Generator().manual_seed(0)
    prompts = {sid: torch.randint(0, vocab, (n,), generator=gen).tolist() for sid, n in _PROMPTS.items()}
    fed = dict.fromkeys(prompts, 0)
    out: dict[str, list[int]] = {sid: [] for sid in prompts}
    cache = PagedTestCache(model.kv_cache_spec(), num_blocks=64, block_size=4, seed=1)
    all_logits = []
    for step in range(_STEPS):
        grants = _PREFILL_PLAN[step] if step < len(_PREFILL_PLAN) else {}
        chunks = []
        for sid, prompt in prompts.items():
            if fed[sid] < len(prompt) and sid in grants:
                chunks.append((sid, prompt[fed[sid]: fed[sid] + grants[sid]]))
            elif out[sid]:
                chunks.append((sid, [out[sid][-1]]))
        decode_only = all(fed[sid] == len(prompts[sid]) for sid, _ in chunks)
        batch = cache.step(chunks, decode_only=decode_only)
        logits = model.compute_logits(model(batch.input_ids, batch.positions, cache.kv_caches, batch.meta))
        assert logits.shape == (batch.input_ids.shape[0], vocab) and logits.dtype == torch.float32
        all_logits.append(logits)
        for sid, toks in chunks:
            fed[sid] = min(fed[sid] + len(toks), len(prompts[sid]))
            if fed[sid] == len(prompts[sid]):
                out[sid].append(int(logits[batch.starts[sid] + len(toks) - 1].argmax()))
    return all_logits, out


def _scenarios(root: str) -> dict[str, ModelConfig]:
    """name -> model config; checkpoints written under ``root``."""
    configs = {
        # one KV head (replicated on both ranks), odd vocab (padded shard), biases in every projection
        "llama-kv1-bias": LlamaConfig(**{**_BASE, "num_key_value_heads": 1}, vocab_size=97, attention_bias=True,
                                      mlp_bias=True, tie_word_embeddings=False),
        "qwen2-tied": Qwen2Config(**_BASE, vocab_size=96, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**_BASE, vocab_size=96, head_dim=16, tie_word_embeddings=False),
        # decoder_base's DecoderAttention / GatedMLP: tied head, both soft-caps, sliding layers
        "gemma2": Gemma2Config(**_BASE, vocab_size=96, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                               attn_logit_softcapping=4.0, final_logit_softcapping=6.0),
        # checkpoint-fused qkv_proj / gate_up_proj, cut per projection at load; partial rotary
        "phi3-fused": Phi3Config(**_BASE, vocab_size=96, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0, rope_parameters={
            "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
    }
    out = {}
    for i, (name, cfg) in enumerate(configs.items()):
        path = os.path.join(root, name)
        make_hf_model(cfg, seed=i).save_pretrained(path)
        out[name] = _model_config(path)
    gguf_dir = os.path.join(root, "llama-gguf")
    os.makedirs(gguf_dir)
    # every shard's K a multiple of 64, so each rank's decode steps take the same integer kernel as TP=1's
    wide = LlamaConfig(**{**_BASE, "hidden_size": 128, "intermediate_size": 256}, vocab_size=96)
    write_tiny_gguf(make_hf_model(wide, seed=7), os.path.join(gguf_dir, "m.gguf"), "llama", quant="Q8_0")
    out["llama-gguf-q8-kept"] = _model_config(gguf_dir, "m.gguf", quantization="gguf")
    # tied and block-quantized: the vocab-parallel table stays quantized (its head on the integer kernel)
    tied_dir = os.path.join(root, "qwen2-gguf")
    os.makedirs(tied_dir)
    tied = Qwen2Config(**{**_BASE, "hidden_size": 128, "intermediate_size": 256}, vocab_size=96,
                       tie_word_embeddings=True)
    write_tiny_gguf(make_hf_model(tied, seed=8), os.path.join(tied_dir, "m.gguf"), "qwen2", quant="Q8_0")
    out["qwen2-gguf-q8-tied-kept"] = _model_config(tied_dir, "m.gguf", quantization="gguf")
    out["qwen3-dummy"] = _model_config(out["qwen3"].model_path, load_format="dummy", seed=3)
    # bf16: panel GEMMs per shard, and the native decode step on bf16 panels (K of every shard a multiple of 64)
    bf16_dir = os.path.join(root, "qwen2-bf16")
    make_hf_model(Qwen2Config(**{**_BASE, "hidden_size": 128, "intermediate_size": 256}, vocab_size=96,
                              tie_word_embeddings=True), seed=1).save_pretrained(bf16_dir)
    out["qwen2-bf16"] = _model_config(bf16_dir, dtype=torch.bfloat16)
    return out


def _rank_main(rank: int, root: str, shm_name: str | None) -> None:
    """One TP rank: every scenario at TP=2, results saved by rank (both ranks must agree). Every
    other scenario all-reduces through the shared-memory segment (x86-64), the others through gloo."""
    import torch.distributed as dist

    from lmserve.distributed.shm_allreduce import ShmAllReduce

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=TP)
    shm = None
    if shm_name is not None:
        if rank != 0:
            dist.barrier()  # rank 0 creates the segment first
        shm = ShmAllReduce(shm_name, rank, TP, create=rank == 0)
        if rank == 0:
            dist.barrier()
        dist.barrier()
        if rank == 0:
            shm.unlink()
    contexts = [ParallelContext(tp_rank=rank, tp_size=TP, tp_group=dist.group.WORLD),
                ParallelContext(tp_rank=rank, tp_size=TP, tp_group=dist.group.WORLD, tp_shm=shm)]
    results = {}
    for i, (name, mc) in enumerate(torch.load(os.path.join(root, "scenarios.pt"), weights_only=False).items()):
        model = get_model(mc, "cpu", parallel=contexts[i % 2])
        logits, tokens = _drive(model, mc.hf_config.vocab_size)
        layer = model.model.layers[0]
        results[name] = dict(logits=logits, tokens=tokens, kv_heads=model.kv_cache_spec().num_kv_heads,
                             embed=type(model.model.embed_tokens).__name__,
                             qkv=type(layer.self_attn.qkv_proj).__name__, down=type(layer.mlp.down_proj).__name__,
                             decode_step=getattr(model, "decode_step", None) is not None)
        if results[name]["decode_step"]:  # the same steps on the eager path: the native step must equal it
            model.decode_step = None
            results[name]["eager_logits"] = _drive(model, mc.hf_config.vocab_size)[0]
    torch.save(results, os.path.join(root, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    """(scenarios, rank-0 results, rank-1 results) of one two-process TP=2 run."""
    import torch.multiprocessing as mp

    root = str(tmp_path_factory.mktemp("tp"))
    scenarios = _scenarios(root)
    torch.save(scenarios, os.path.join(root, "scenarios.pt"))
    from lmserve.distributed.shm_allreduce import new_segment_name, supported

    mp.spawn(_rank_main, args=(root, new_segment_name() if supported() else None), nprocs=TP, join=True)
    ranks = [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=False) for r in range(TP)]
    return scenarios, ranks


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-kv1-bias", "qwen2-tied", "qwen3", "gemma2", "phi3-fused", "llama-gguf-q8-kept",
                                  "qwen2-gguf-q8-tied-kept", "qwen3-dummy", "qwen2-bf16"])
def test_tp2_equals_tp1(tp_runs, name):
    scenarios, ranks = tp_runs
    mc = scenarios[name]
    ref_logits, ref_tokens = _drive(get_model(mc, "cpu"), mc.hf_config.vocab_size)
    quantized, bf16 = name.endswith("-kept"), mc.dtype == torch.bfloat16
    for rank in ranks:  # every rank gets the full-vocab logits, identical
        got = rank[name]
        if not bf16:  # fp32: greedy token for token (bf16 rounds the partial sums before the all-reduce)
            assert got["tokens"] == ref_tokens
        for step, (a, b) in enumerate(zip(got["logits"], ref_logits, strict=True)):
            # decode-only steps of a kept-quantized model take the integer GEMV, which rounds activations to
            # 15 bits per 32-block: the all-reduce's summation order (1e-7) may move one rounding step
            atol = 0.25 if bf16 else 2e-3 if quantized and step >= len(_PREFILL_PLAN) else 2e-5
            rtol = 0.05 if bf16 else 1e-5
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, s=step: f"{name} step {s}: {m}")
    assert ranks[0][name]["tokens"] == ranks[1][name]["tokens"]
    got = ranks[0][name]
    # the native decode step (all-reduce by callback) runs the decode-only steps of the kept-quantized
    # model (VNNI GEMV) and of the bf16 one (bf16 panels), where this CPU has it
    assert got["decode_step"] == ((quantized or bf16) and _native_decode_step(mc.dtype))
    if got["decode_step"]:  # same kernels, same sums: the step with its all-reduce callback equals eager TP
        for native, eager in zip(got["logits"], got["eager_logits"], strict=True):
            torch.testing.assert_close(native, eager, atol=1e-6, rtol=1e-6)
    total_kv = mc.hf_config.num_key_value_heads
    assert got["kv_heads"] == max(1, total_kv // TP)
    assert got["qkv"] == ("Quantized" if quantized else "") + "MergedColumnParallelLinear"
    assert got["down"] == ("Quantized" if quantized else "") + "RowParallelLinear"
    assert got["embed"] == ("Quantized" if quantized else "") + "VocabParallelEmbedding"


def _native_decode_step(dtype: torch.dtype) -> bool:
    from lmserve.model.backends.plan import BackendPlan
    from lmserve.model.layers.cpu_kernels.decode_step import decode_step_library

    plan = BackendPlan.for_device("cpu", dtype)
    if dtype == torch.bfloat16 and plan.linear(dtype, 128).backend not in ("sbgemm", "sbgemm_amx"):
        return False
    return decode_step_library() is not None and plan.decode_step().backend == "native"


# ----------------------------------------------------------------------------- sharding math

def test_head_layout_splits_and_replicates():
    assert [HeadLayout.of(8, 4, _tp(r)) for r in range(2)] == [HeadLayout(4, 2, 0, 0), HeadLayout(4, 2, 4, 2)]
    # fewer KV heads than ranks: each rank holds the KV head its query heads read
    layouts = [HeadLayout.of(8, 2, _tp(r, 4)) for r in range(4)]
    assert [(h.q_start, h.num_heads, h.kv_start, h.num_kv_heads) for h in layouts] == \
        [(0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1), (6, 2, 1, 1)]
    for h in layouts:  # GQA: query head q reads KV head q // (8 // 2)
        assert {q // 4 for q in range(h.q_start, h.q_start + h.num_heads)} == {h.kv_start}
    with pytest.raises(ValueError, match="num_attention_heads"):
        HeadLayout.of(6, 2, _tp(0, 4))
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        HeadLayout.of(12, 3, _tp(0, 4))


def test_vocab_range_pads_the_last_shard():
    assert [vocab_range(97, _tp(r)) for r in range(2)] == [(0, 49, 49), (49, 97, 49)]
    assert [vocab_range(5, _tp(r, 4)) for r in range(4)] == [(0, 2, 2), (2, 4, 2), (4, 5, 2), (5, 5, 2)]


def _full(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_column_and_row_shards_rebuild_the_full_product():
    x, w, b = _full((3, 8)), _full((6, 8), 1), _full((6,), 2)
    cols = [ColumnParallelLinear(8, 6, _tp(r), bias=True) for r in range(2)]
    for layer in cols:
        layer.weight.data.copy_(layer.shard_weight("weight", w))
        layer.bias.data.copy_(layer.shard_weight("bias", b))
    torch.testing.assert_close(torch.cat([F.linear(x, c.weight, c.bias) for c in cols], -1), F.linear(x, w, b))
    rows = [RowParallelLinear(8, 6, _tp(r), bias=True) for r in range(2)]
    assert rows[0].bias is not None and rows[1].bias is None  # the bias is added once, on rank 0
    assert rows[1].shard_weight("bias", b) is None
    partial = []
    for r, layer in enumerate(rows):
        layer.weight.data.copy_(layer.shard_weight("weight", w))
        if layer.bias is not None:
            layer.bias.data.copy_(layer.shard_weight("bias", b))
        partial.append(F.linear(x[:, r * 4:(r + 1) * 4], layer.weight, layer.bias))
    torch.testing.assert_close(partial[0] + partial[1], F.linear(x, w, b))
    assert rows[0].full_shape("weight") == (6, 8) and cols[1].full_shape("bias") == (6,)


def test_merged_qkv_shards_by_heads_and_whole_tensor_matches_per_projection():
    # 4 query heads, 1 KV head (replicated), head_dim 2, hidden 8: q 8 rows, k 2, v 2
    layers = [MergedColumnParallelLinear.qkv(8, 4, 1, 2, _tp(r)) for r in range(2)]
    q, k, v = _full((8, 8), 1), _full((2, 8), 2), _full((2, 8), 3)
    for r, layer in enumerate(layers):
        assert layer.output_sizes == [4, 2, 2]
        per_proj = torch.cat([layer.shard_weight("weight", t, s) for t, s in ((q, "q"), (k, "k"), (v, "v"))])
        whole = layer.shard_weight("weight", torch.cat([q, k, v]))  # the merged parameter at once (dummy)
        torch.testing.assert_close(per_proj, torch.cat([q[r * 4:(r + 1) * 4], k, v]))
        torch.testing.assert_close(whole, per_proj)
    gate_up = MergedColumnParallelLinear.gate_up(8, 6, _tp(1))
    assert gate_up.output_sizes == [3, 3] and gate_up.full_shape("weight") == (12, 8)
    g, u = _full((6, 8), 4), _full((6, 8), 5)
    torch.testing.assert_close(gate_up.shard_weight("weight", torch.cat([g, u])), torch.cat([g[3:], u[3:]]))


def test_vocab_parallel_shards_and_head():
    table = _full((5, 4))
    embs = [VocabParallelEmbedding(5, 4, _tp(r)) for r in range(2)]
    heads = [ParallelLMHead(4, 5, _tp(r)) for r in range(2)]
    for emb, head in zip(embs, heads):
        emb.weight.data.copy_(emb.shard_weight("weight", table))
        head.weight.data.copy_(head.shard_weight("weight", table))
        assert emb.full_shape("weight") == (5, 4) and emb.num_embeddings == 3
    assert torch.equal(embs[1].weight[2], torch.zeros(4))  # padding row
    torch.testing.assert_close(torch.cat([e.weight for e in embs])[:5], table)
    torch.testing.assert_close(torch.cat([h.weight for h in heads])[:5], table)


def test_block_quantized_column_cuts_stay_quantized_on_block_bounds():
    blocks = torch.randint(0, 255, (4, 4, 34), dtype=torch.uint8)
    blocks[..., 0:2] = torch.tensor([0, 0x3C], dtype=torch.uint8)  # d = 1.0 (fp16), no NaN/inf scales
    w = BlockQuantizedWeight("Q8_0", blocks)
    dense = w.dequantize()
    aligned = narrow_weight(w, 1, 64, 64)
    assert isinstance(aligned, BlockQuantizedWeight)
    torch.testing.assert_close(aligned.dequantize(), dense[:, 64:])
    rows = narrow_weight(w, 0, 1, 2)
    assert isinstance(rows, BlockQuantizedWeight)
    torch.testing.assert_close(rows.dequantize(), dense[1:3])
    cut = narrow_weight(w, 1, 48, 64)  # not on a block bound: dequantized
    assert isinstance(cut, torch.Tensor)
    torch.testing.assert_close(cut, dense[:, 48:112])


def test_gguf_lazy_slices_equal_the_whole_tensor(tmp_path):
    from lmserve.model.loader.gguf_loader import iter_gguf_weights

    hf = make_hf_model(LlamaConfig(**_BASE, vocab_size=96), seed=2)
    write_tiny_gguf(hf, str(tmp_path / "m.gguf"), "llama", quant="Q8_0")
    cfg = load_hf_config(str(tmp_path), "m.gguf")
    for keep in (False, True):
        whole = dict(iter_gguf_weights(str(tmp_path / "m.gguf"), cfg, keep_quantized=keep))
        for name, lazy in iter_gguf_weights(str(tmp_path / "m.gguf"), cfg, keep_quantized=keep, lazy=True):
            ref = whole[name]
            ref = ref.dequantize() if isinstance(ref, BlockQuantizedWeight) else ref
            if len(lazy.shape) != 2:
                torch.testing.assert_close(lazy.materialize(), ref)
                continue
            n, k = lazy.shape
            rows = 16 if "q_proj" in name or "k_proj" in name else n // 2  # whole heads (head_dim 16)
            for dim, start, length in ((0, n - rows, rows), (1, k // 2, k // 2)):
                part = lazy.narrow(dim, start, length)
                assert isinstance(part, BlockQuantizedWeight) == keep, name
                part = part.dequantize() if keep else part
                torch.testing.assert_close(part, ref.narrow(dim, start, length), msg=name)


def test_models_that_cannot_shard_refuse(tmp_path):
    from transformers import BertConfig, GPT2Config

    from lmserve.model.models.bert import BertModel
    from lmserve.model.models.gpt2 import GPT2LMHeadModel

    with pytest.raises(ValueError, match="GPT2LMHeadModel does not support tensor parallelism"):
        GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=96), torch.float32, parallel=_tp(0))
    with pytest.raises(ValueError, match="BertModel does not support tensor parallelism"):
        BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
                  torch.float32, parallel=_tp(1))


def test_lora_refused_under_tensor_parallelism():
    from lmserve.model.models.llama import LlamaForCausalLM, enable_lora

    model = LlamaForCausalLM(LlamaConfig(**_BASE, vocab_size=96), torch.float32, parallel=_tp(0))
    with pytest.raises(ValueError, match="LoRA adapters .* tensor parallelism"):
        enable_lora(model)


def test_a_rank_reads_only_its_shards_of_the_matrices(tmp_path, monkeypatch):
    """Loading one rank from safetensors narrows every projection, embedding and head lazily: the
    only tensors read whole are the 1-D ones (norms, replicated)."""
    from lmserve.model.loader.safetensors_loader import SafetensorsWeight, iter_checkpoint_weights
    from lmserve.model.models.llama import LlamaForCausalLM

    cfg = Qwen3Config(**_BASE, vocab_size=97, head_dim=16, tie_word_embeddings=False)
    hf = make_hf_model(cfg, seed=4)
    hf.save_pretrained(str(tmp_path))
    whole_reads: list[tuple[str, int]] = []
    materialize = SafetensorsWeight.materialize

    def record(self):
        whole_reads.append((self.name, len(self.shape)))
        return materialize(self)

    monkeypatch.setattr(SafetensorsWeight, "materialize", record)
    model = LlamaForCausalLM(cfg, torch.float32, parallel=_tp(1))
    model.load_weights(iter_checkpoint_weights(str(tmp_path), lazy=True))
    assert whole_reads and all(ndim == 1 for _, ndim in whole_reads), whole_reads
    state = hf.state_dict()
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight,
                               state["model.layers.1.mlp.down_proj.weight"][:, 64:])
    torch.testing.assert_close(model.lm_head.weight[:48], state["lm_head.weight"][49:])
    assert torch.equal(model.lm_head.weight[48], torch.zeros(64))  # the padding row
