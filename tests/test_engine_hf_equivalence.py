"""Greedy outputs and logprobs of the whole engine against HF transformers (fp32),
on tiny random Llama, Qwen2 and Qwen3 checkpoints, under every scheduling mode."""

from __future__ import annotations

import pytest
import torch

from lmserve import LLM, SamplingParams

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 7],
    [11, 12],
    list(range(20, 57)),  # 37 tokens: several blocks, chunked with a small budget
    [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312],
]
MAX_TOKENS = 10


def hf_greedy(path: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    outs = []
    for p in prompts:
        gen = model.generate(torch.tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
        outs.append(gen[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def references(tiny_models):
    return {k: hf_greedy(path, PROMPTS, MAX_TOKENS) for k, path in tiny_models.items()}


def make_llm(path: str, **kw) -> LLM:
    args = dict(skip_tokenizer_init=True, dtype="float32", block_size=4, kv_cache_memory=4 * 2**20)
    args.update(kw)
    return LLM(path, **args)


def run_greedy(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


MODES = {
    "default": {},
    "chunked-small-budget": dict(max_num_batched_tokens=8, enable_chunked_prefill=True),
    "no-chunking": dict(enable_chunked_prefill=False, max_num_batched_tokens=1024),
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "one-seq-at-a-time": dict(max_num_seqs=1),
}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_equals_hf(tiny_models, references, kind, mode):
    llm = make_llm(tiny_models[kind], **MODES[mode])
    assert run_greedy(llm) == references[kind]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_preemption_keeps_outputs_exact(tiny_models, kind):
    # Four 7-token prompts fit at first (2 blocks each of the 10), but growing to 17 tokens
    # (5 blocks each) they cannot all stay: requests are preempted and recomputed.
    prompts = [[3 + i, 50 + i, 9, 200 + i, 7, 31 + i, 90] for i in range(4)]
    ref = hf_greedy(tiny_models[kind], prompts, MAX_TOKENS)
    llm = make_llm(tiny_models[kind], num_gpu_blocks_override=10)
    assert run_greedy(llm, prompts) == ref
    assert llm.llm_engine.core.scheduler.num_preemptions_total > 0


def test_shared_prefix_hits_cache_and_stays_exact(tiny_models):
    path = tiny_models["llama"]
    prefix = list(range(100, 133))  # 33 tokens: 8 full blocks of 4
    prompts = [prefix + [7, 8, 9], prefix + [10], prefix + [400, 401, 402, 403, 404]]
    ref = hf_greedy(path, prompts, MAX_TOKENS)
    llm = make_llm(path)
    first = run_greedy(llm, prompts[:1])
    stats0 = llm.llm_engine.core.kv_manager.stats.hits
    rest = run_greedy(llm, prompts[1:])
    assert first + rest == ref
    hits = llm.llm_engine.core.kv_manager.stats.hits - stats0
    assert hits >= 2 * 32  # both later prompts reused the 8 cached prefix blocks
    outs = llm.generate([{"prompt_token_ids": prompts[1]}], SamplingParams(max_tokens=1, temperature=0))
    assert outs[0].num_cached_tokens == 32


def test_invariants_after_every_step_with_aborts(tiny_models):
    """Random workload on the real tiny model: aborts mid-prefill, preemption, prefix hits;
    the block pool stays consistent after every step and is fully free at the end."""
    import random

    llm = make_llm(tiny_models["llama"], num_gpu_blocks_override=16, max_num_batched_tokens=16)
    engine = llm.llm_engine
    kv = engine.core.kv_manager
    rng = random.Random(0)
    shared = list(range(40, 52))
    live: list[str] = []
    for i in range(60):
        if rng.random() < 0.4:
            prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 20))]
            rid = f"req{i}"
            engine.add_request(rid, {"prompt_token_ids": prompt},
                               SamplingParams(temperature=1.0, max_tokens=rng.randrange(1, 12), seed=i))
            live.append(rid)
        if live and rng.random() < 0.15:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        for out in engine.step():
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
        kv.check_invariants()
    while engine.has_unfinished_requests():
        engine.step()
        kv.check_invariants()
    assert kv.pool.num_free_blocks == kv.num_blocks


def test_logprobs_match_hf(tiny_models):
    from transformers import AutoModelForCausalLM

    path = tiny_models["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = make_llm(path, max_num_batched_tokens=8)  # prompt logprobs across chunks
    prompt = PROMPTS[2]
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=5, prompt_logprobs=3, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    full = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)  # [len, vocab]
    # Prompt logprobs: position i holds the logprob of prompt[i] given prompt[:i].
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        entry = out.prompt_logprobs[i]
        assert prompt[i] in entry
        assert abs(entry[prompt[i]].logprob - ref[i - 1, prompt[i]].item()) < 1e-3
        top = torch.topk(ref[i - 1], 3)
        for rank, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            assert t in entry and abs(entry[t].logprob - v) < 1e-3 and entry[t].rank == rank
        true_rank = int((ref[i - 1] > ref[i - 1, prompt[i]]).sum()) + 1
        assert entry[prompt[i]].rank == true_rank
    # Sample logprobs: the sampled token always present, with its rank, plus the top 5.
    cum = 0.0
    for j, tok in enumerate(out.outputs[0].token_ids):
        pos = len(prompt) + j - 1
        entry = out.outputs[0].logprobs[j]
        assert tok in entry and entry[tok].rank == 1  # greedy
        assert abs(entry[tok].logprob - ref[pos, tok].item()) < 1e-3
        assert len(entry) == 5  # greedy token is also the top-1
        for t, lp in entry.items():
            assert abs(lp.logprob - ref[pos, t].item()) < 1e-3
        cum += ref[pos, tok].item()
    assert abs(out.outputs[0].cumulative_logprob - cum) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_equals_hf_on_cuda(tiny_models, references, kind):
    llm = make_llm(tiny_models[kind], device="cuda")
    assert run_greedy(llm) == references[kind]
