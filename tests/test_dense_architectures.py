"""GPT-2, OPT, Gemma 2, Gemma 3, Phi-3 and GPT-NeoX against HF transformers (fp32): each a tiny
random checkpoint made here from its transformers config (sliding windows shorter than the long
prompt), run through the whole engine under chunked prefill, prefix caching and preemption;
greedy tokens must equal HF's token for token and their logprobs be within 1e-3."""

from __future__ import annotations

import pytest
import torch

from lmserve import LLM, SamplingParams
from tests.model_utils import randomize_parameters

MAX_TOKENS = 8
PROMPTS = [
    [5, 17, 42, 99, 3, 250, 7],
    list(range(20, 57)),  # 37 tokens: longer than every sliding window below, several blocks
    [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312],
]
_COMMON = dict(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)


def _config(kind: str):
    import transformers as tf

    if kind == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **{**_COMMON, "tie_word_embeddings": True})
    if kind == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True,
                            **{**_COMMON, "tie_word_embeddings": True})
    if kind == "opt-postnorm-proj":  # opt-350m's shape: post-norm blocks, project_in/out
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=32, do_layer_norm_before=False,
                            **{**_COMMON, "tie_word_embeddings": True})
    if kind == "gemma2":  # sliding layers interleaved with global ones, both soft-caps
        return tf.Gemma2Config(**{**_LLAMA_LIKE, "num_hidden_layers": 4}, **_COMMON, head_dim=16, sliding_window=8,
                               query_pre_attn_scalar=24, attn_logit_softcapping=4.0, final_logit_softcapping=6.0)
    if kind == "gemma3":
        return tf.Gemma3TextConfig(**_LLAMA_LIKE, **_COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                                    "full_attention": {"rope_type": "default", "rope_theta": 1e4}})
    if kind == "phi3":  # sliding window on every layer, partial rotary (Phi-4-mini)
        return tf.Phi3Config(**_LLAMA_LIKE, **_COMMON, sliding_window=8,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    if kind == "phi3-longrope":
        half = 64 // 4 // 2
        return tf.Phi3Config(**_LLAMA_LIKE, **_COMMON, original_max_position_embeddings=64, rope_parameters={
            "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.5 * i for i in range(half)], "original_max_position_embeddings": 64})
    if kind == "gpt-neox":
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True, **_COMMON)
    if kind == "gpt-neox-sequential":
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=256, rotary_pct=1.0, use_parallel_residual=False, **_COMMON)
    raise ValueError(kind)


KINDS = ("gpt2", "opt", "opt-postnorm-proj", "gemma2", "gemma3", "phi3", "phi3-longrope", "gpt-neox",
         "gpt-neox-sequential")


def make_checkpoint(path: str, kind: str, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _config(kind)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_parameters(model, seed=0, std=0.2)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.eval().save_pretrained(path)
    return model


def hf_greedy(model, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs, each step a full forward without cache (the reference)."""
    ids = list(prompt)
    logprobs = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            lp = torch.log_softmax(logits, dim=-1)
            tok = int(lp.argmax())
            ids.append(tok)
            logprobs.append(float(lp[tok]))
    return ids[len(prompt):], logprobs


@pytest.fixture(scope="module", params=KINDS)
def arch(request, tmp_path_factory):
    """(kind, checkpoint dir, HF references {prompt index: (tokens, logprobs)})."""
    path = str(tmp_path_factory.mktemp(request.param))
    model = make_checkpoint(path, request.param)
    prompts = PROMPTS + PREEMPT_PROMPTS + SHARED_PREFIX_PROMPTS
    return request.param, path, [hf_greedy(model, p, MAX_TOKENS) for p in prompts]


PREEMPT_PROMPTS = [[3 + i, 50 + i, 9, 200 + i, 7, 31 + i, 90] for i in range(4)]
SHARED_PREFIX_PROMPTS = [list(range(100, 121)) + [7, 8, 9], list(range(100, 121)) + [400, 401]]
MODES = {
    "chunked-prefill": (PROMPTS, 0, dict(max_num_batched_tokens=8, enable_chunked_prefill=True)),
    "prefix-caching": (SHARED_PREFIX_PROMPTS, len(PROMPTS) + len(PREEMPT_PROMPTS), {}),
    "preemption": (PREEMPT_PROMPTS, len(PROMPTS), dict(num_gpu_blocks_override=10)),
}


def run_llm(path: str, prompts: list[list[int]], sequential_prefix: bool = False, **kw):
    args = dict(skip_tokenizer_init=True, dtype="float32", block_size=4, kv_cache_memory=4 * 2**20)
    args.update(kw)
    llm = LLM(path, **args)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False, logprobs=0)
    reqs = [{"prompt_token_ids": p} for p in prompts]
    if sequential_prefix:  # the first request fills the cache, the others hit it
        outs = llm.generate(reqs[:1], params) + llm.generate(reqs[1:], params)
    else:
        outs = llm.generate(reqs, params)
    return llm, [(o.outputs[0].token_ids, [next(iter(d.values())).logprob for d in o.outputs[0].logprobs])
                 for o in outs]


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_and_logprobs_equal_transformers(arch, mode):
    kind, path, refs = arch
    prompts, first, kw = MODES[mode]
    llm, got = run_llm(path, prompts, sequential_prefix=mode == "prefix-caching", **kw)
    for i, (tokens, logprobs) in enumerate(got):
        ref_tokens, ref_logprobs = refs[first + i]
        assert list(tokens) == ref_tokens, f"{kind} {mode} prompt {i}"
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) < 1e-3, f"{kind} {mode} prompt {i}"
    if mode == "preemption":
        assert llm.llm_engine.core.scheduler.num_preemptions_total > 0
    if mode == "prefix-caching":
        assert llm.llm_engine.core.kv_manager.stats.hits > 0


# -- GGUF ---------------------------------------------------------------------------------------------
_CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
GGUF_KINDS = {"gpt2": "GPT2", "gemma2": "GEMMA2", "gemma3": "GEMMA3", "phi3": "PHI3"}


def write_gguf_as_llama_cpp(model, path: str, kind: str) -> None:
    """Write ``model`` as llama.cpp's converter would (tensor names from the gguf package's own
    name map, GPT-2's Conv1D weights transposed, Gemma's norms stored as 1 + w, 2-D weights in
    Q8_0), rounding the model's own 2-D weights through Q8_0 so that it stays the exact reference."""
    import gguf
    import numpy as np

    cfg = model.config
    arch = gguf.MODEL_ARCH[GGUF_KINDS[kind]]
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    if kind == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_feed_forward_length(4 * cfg.hidden_size)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w.add_context_length(cfg.max_position_embeddings)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg.sliding_window)
        if kind == "gemma3":
            w.add_rope_freq_base(float(cfg.rope_parameters["full_attention"]["rope_theta"]))
        else:
            w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
            w.add_rope_dimension_count(int(head_dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0)))
        if kind == "gemma2":
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    qtype = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
            assert gname is not None, name
            arr = t.detach().float().numpy()
            if name.endswith(_CONV1D_SUFFIXES):
                arr = arr.T
            if kind.startswith("gemma") and name.endswith("norm.weight"):
                arr = arr + 1.0
            if arr.ndim == 2:
                q = gguf.quants.quantize(np.ascontiguousarray(arr), qtype)
                rounded = gguf.quants.dequantize(q, qtype).reshape(arr.shape)
                t.copy_(torch.from_numpy(rounded.T if name.endswith(_CONV1D_SUFFIXES) else rounded))
                w.add_tensor(gname, q, raw_dtype=qtype)
            else:
                w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# What llama.cpp fixes rather than stores: Gemma's GGUF has no output tensor (tied) and its
# attention scale is 1/sqrt(head_dim) below 27B; Gemma 3's
# local RoPE base is 10000 and its layer pattern 5 sliding : 1 global (transformers' default).
GGUF_OVERRIDES = {"gemma2": dict(tie_word_embeddings=True, query_pre_attn_scalar=16),
                  "gemma3": dict(tie_word_embeddings=True, query_pre_attn_scalar=16, layer_types=["sliding_attention"] * 2, rope_parameters={
                      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                      "full_attention": {"rope_type": "default", "rope_theta": 1e6}})}


@pytest.mark.parametrize("kind", list(GGUF_KINDS))
def test_gguf_equals_transformers(tmp_path, kind):
    model = make_checkpoint(str(tmp_path / "hf"), kind, **GGUF_OVERRIDES.get(kind, {}))
    write_gguf_as_llama_cpp(model, str(tmp_path / "tiny.gguf"), kind)
    refs = [hf_greedy(model, p, MAX_TOKENS) for p in PROMPTS]
    _, got = run_llm(str(tmp_path / "tiny.gguf"), PROMPTS, max_num_batched_tokens=8, quantization="none")
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, refs, strict=True):
        assert list(tokens) == ref_tokens, kind
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) < 1e-3, kind


# -- sliding window in the paged cache -------------------------------------------------------------
def test_window_frees_blocks_and_long_sequences_fit(tmp_path):
    """Phi-3 with an 8-token window on every layer: a 45-token sequence runs in a pool of 7
    blocks of 4 (28 tokens), because blocks behind every layer's window are freed; outputs
    stay HF's. An interleaved model (Gemma 2: global layers) keeps every block."""
    model = make_checkpoint(str(tmp_path / "phi3"), "phi3")
    prompt = PROMPTS[1]  # 37 tokens
    ref_tokens, ref_logprobs = hf_greedy(model, prompt, MAX_TOKENS)
    llm, got = run_llm(str(tmp_path / "phi3"), [prompt], num_gpu_blocks_override=7, max_num_batched_tokens=8,
                       enable_chunked_prefill=True)
    kv = llm.llm_engine.core.kv_manager
    assert kv.sliding_window == 8
    assert list(got[0][0]) == ref_tokens
    assert max(abs(a - b) for a, b in zip(got[0][1], ref_logprobs)) < 1e-3
    kv.check_invariants()

    make_checkpoint(str(tmp_path / "gemma2"), "gemma2")
    gemma = LLM(str(tmp_path / "gemma2"), skip_tokenizer_init=True, dtype="float32", block_size=4,
                num_gpu_blocks_override=7)
    assert gemma.llm_engine.core.kv_manager.sliding_window is None
    with pytest.raises(ValueError, match="leaves no room"):
        gemma.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=2))


def test_kv_manager_window_unit():
    from lmserve.engine.kv_cache import KVCacheManager
    from lmserve.engine.request import Request

    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True, sliding_window=6)
    req = Request("r", list(range(30)), SamplingParams(max_tokens=4))
    assert kv.allocate_slots(req, 8)
    req.num_computed_tokens = 8
    assert kv.allocate_slots(req, 8)  # next tokens from position 8 see keys > 2: block 0 stays
    assert kv.null_block not in kv.req_blocks["r"]
    req.num_computed_tokens = 16
    assert kv.allocate_slots(req, 8)  # from position 16: keys > 10 -> blocks 0, 1 freed (positions 0..7)
    assert kv.req_blocks["r"][:2] == [kv.null_block, kv.null_block]
    assert kv.req_blocks["r"][2] is not kv.null_block
    assert kv.block_ids("r")[:2] == [0, 0] and len(kv.block_ids("r")) == 6
    assert kv.pool.num_free_blocks == 8 - 4
    kv.check_invariants()
    kv.free(req)
    assert kv.pool.num_free_blocks == 8
    kv.check_invariants()
