"""The whole engine on tiny random MoE checkpoints (Mixtral top-2 of 6; Qwen3-MoE top-8 of 16 with a
dense layer from mlp_only_layers): greedy outputs token for token equal to transformers (fp32)
under chunked prefill, prefix caching and preemption, and logprobs within 1e-3."""

from __future__ import annotations

import pytest
import torch

from lmserve import SamplingParams

from tests.moe_utils import make_tiny_moe_checkpoint
from tests.test_engine_hf_equivalence import MAX_TOKENS, PROMPTS, hf_greedy, make_llm, run_greedy

KINDS = ("mixtral", "qwen3_moe")
MODES = {
    "default": {},
    "chunked-small-budget": dict(max_num_batched_tokens=8, enable_chunked_prefill=True),
    "no-prefix-cache": dict(enable_prefix_caching=False),
}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-moe")
    return {k: make_tiny_moe_checkpoint(str(root / k), k) for k in KINDS}


@pytest.fixture(scope="module")
def moe_references(moe_models):
    return {k: hf_greedy(path, PROMPTS, MAX_TOKENS) for k, path in moe_models.items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_equals_hf(moe_models, moe_references, kind, mode):
    llm = make_llm(moe_models[kind], **MODES[mode])
    assert run_greedy(llm) == moe_references[kind]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_preemption_and_prefix_cache_keep_outputs_exact(moe_models, kind):
    # Four prompts sharing a 12-token prefix (3 full blocks of 4) fit at first, but growing by 10
    # tokens they cannot all stay in 14 blocks: requests are preempted and recomputed, and the
    # later ones hit the prefix cache.
    prefix = list(range(100, 112))
    prompts = [prefix + [3 + i, 50 + i, 9] for i in range(4)]
    ref = hf_greedy(moe_models[kind], prompts, MAX_TOKENS)
    llm = make_llm(moe_models[kind], num_gpu_blocks_override=14)
    assert run_greedy(llm, prompts) == ref
    core = llm.llm_engine.core
    assert core.scheduler.num_preemptions_total > 0
    assert core.kv_manager.stats.hits >= 12


@pytest.mark.parametrize("kind", KINDS)
def test_logprobs_match_hf(moe_models, kind):
    from transformers import AutoModelForCausalLM

    path = moe_models[kind]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = make_llm(path, max_num_batched_tokens=8)  # prompt logprobs across chunks
    prompt = PROMPTS[2]
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=5, prompt_logprobs=3, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    full = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)  # [len, vocab]
    for i in range(1, len(prompt)):
        entry = out.prompt_logprobs[i]
        assert abs(entry[prompt[i]].logprob - ref[i - 1, prompt[i]].item()) < 1e-3
        top = torch.topk(ref[i - 1], 3)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert t in entry and abs(entry[t].logprob - v) < 1e-3
    for j, tok in enumerate(out.outputs[0].token_ids):
        pos = len(prompt) + j - 1
        entry = out.outputs[0].logprobs[j]
        assert entry[tok].rank == 1 and len(entry) == 5
        for t, lp in entry.items():
            assert abs(lp.logprob - ref[pos, t].item()) < 1e-3


def test_pooling_runner_embeds_and_classifies_like_transformers(moe_models, tmp_path):
    """--runner pooling: a MoE causal LM as a LAST-pooling embedding model, and a
    Qwen3MoeForSequenceClassification checkpoint as a classifier, both against transformers."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from lmserve.pooling_params import PoolingParams
    from tests.model_utils import randomize_parameters
    from tests.moe_utils import tiny_moe_config
    from tests.test_engine_pooling import make_engine, run_all

    prompts = PROMPTS[:3]
    engine = make_engine(moe_models["mixtral"])
    outs, _ = run_all(engine, prompts, PoolingParams(task="embed", normalize=False))
    hf = AutoModel.from_pretrained(moe_models["mixtral"], dtype=torch.float32)
    with torch.no_grad():
        for out, p in zip(outs, prompts):
            torch.testing.assert_close(out.outputs.data, hf(torch.tensor([p])).last_hidden_state[0, -1],
                                       atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)
    cls = AutoModelForSequenceClassification.from_config(tiny_moe_config("qwen3_moe", num_labels=3, pad_token_id=0),
                                                         dtype=torch.float32).eval()
    randomize_parameters(cls, seed=9)
    cls.save_pretrained(str(tmp_path))
    engine = make_engine(str(tmp_path))
    outs, _ = run_all(engine, prompts, PoolingParams(task="classify"))
    with torch.no_grad():
        for out, p in zip(outs, prompts):
            ref = torch.softmax(cls(torch.tensor([p])).logits[0].float(), dim=-1)
            torch.testing.assert_close(out.outputs.data, ref, atol=1e-4, rtol=1e-4)


def test_enable_lora_is_refused_at_start_up(moe_models):
    with pytest.raises(ValueError, match="--enable-lora.*mixture-of-experts"):
        make_llm(moe_models["qwen3_moe"], enable_lora=True)
