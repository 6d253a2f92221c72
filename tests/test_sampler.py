"""The batched sampler: every sampling parameter, seeds, logprobs, and distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmserve.sampling_params import SamplingParams
from lmserve.worker.input_batch import InputBatch, make_generator
from lmserve.worker.logits_processors.loading import build_logitsprocs
from lmserve.worker.sampler import (
    Sampler,
    _top_k_top_p_sorted,
    apply_top_k_top_p,
    compute_logprobs_tensors,
)
from tests.sampling_helpers import chisquare_pvalue, draw, make_batch, processed_logits, sample

# Ten tokens, strictly decreasing logits: softmax ~ [.40, .24, .15, .09, .05, ...].
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5])
N_DRAWS = 12000
P_OK = 1e-3  # a correct sampler fails this with probability 1e-3 per test (fixed seeds: never)
P_WRONG = 1e-8


def softmax(x: torch.Tensor) -> np.ndarray:
    return torch.softmax(x.double(), -1).numpy()


def top_p_reference(probs: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches p."""
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]  # mass strictly above each token
    keep = np.zeros_like(probs, dtype=bool)
    keep[order[before < p]] = True
    return np.where(keep, probs, 0.0)


# ---------------------------------------------------------------------- basics
def test_output_shapes_and_greedy():
    batch, _ = make_batch([SamplingParams(temperature=0.0)] * 3, vocab=16)
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    out = sample(batch, logits)
    assert out.sampled_token_ids.dtype == torch.int64 and out.sampled_token_ids.shape == (3,)
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_mixed_greedy_and_random_rows():
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
    batch, _ = make_batch(params, vocab=8)
    logits = torch.zeros(2, 8)
    logits[0, 5] = 0.1  # greedy row: argmax is 5 although the distribution is flat
    seen = {sample(batch, logits, Sampler(torch.Generator().manual_seed(s))).sampled_token_ids[1].item()
            for s in range(40)}
    assert all(sample(batch, logits, Sampler(torch.Generator().manual_seed(s))).sampled_token_ids[0] == 5
               for s in range(10))
    assert len(seen) > 3  # the random row really samples


def test_rejects_wrong_logits_shape():
    batch, _ = make_batch([SamplingParams()] * 2, vocab=8)
    with pytest.raises(ValueError, match="num_reqs=2"):
        Sampler()(torch.zeros(3, 8), batch.make_sampling_metadata())


def test_bf16_logits_are_accepted():
    batch, _ = make_batch([SamplingParams(temperature=0.0, logprobs=2)], vocab=8)
    out = sample(batch, LOGITS[:8].unsqueeze(0).to(torch.bfloat16))
    assert out.sampled_token_ids.tolist() == [0]
    assert out.logprobs is not None and out.logprobs.logprobs.dtype == torch.float32


# ---------------------------------------------------------------------- distributions
def test_temperature_distribution():
    counts = draw(SamplingParams(temperature=0.5), LOGITS, N_DRAWS, seed=1)
    assert chisquare_pvalue(counts, softmax(LOGITS / 0.5)) > P_OK
    assert chisquare_pvalue(counts, softmax(LOGITS)) < P_WRONG  # ignoring temperature would pass this


def test_high_temperature_distribution():
    counts = draw(SamplingParams(temperature=2.0), LOGITS, N_DRAWS, seed=2)
    assert chisquare_pvalue(counts, softmax(LOGITS / 2.0)) > P_OK
    assert chisquare_pvalue(counts, softmax(LOGITS)) < P_WRONG


def test_default_temperature_one_distribution():
    counts = draw(SamplingParams(), LOGITS, N_DRAWS, seed=3)
    assert chisquare_pvalue(counts, softmax(LOGITS)) > P_OK


def test_top_k_distribution():
    counts = draw(SamplingParams(top_k=3), LOGITS, N_DRAWS, seed=4)
    probs = softmax(LOGITS)
    probs[3:] = 0.0
    assert counts[3:].sum() == 0
    assert chisquare_pvalue(counts, probs) > P_OK


def test_top_p_distribution():
    counts = draw(SamplingParams(top_p=0.7), LOGITS, N_DRAWS, seed=5)
    expected = top_p_reference(softmax(LOGITS), 0.7)
    assert (expected > 0).sum() == 3  # .40 + .24 < .7 <= .40 + .24 + .15
    assert chisquare_pvalue(counts, expected) > P_OK


def test_top_k_and_top_p_together():
    counts = draw(SamplingParams(top_k=5, top_p=0.8, temperature=1.5), LOGITS, N_DRAWS, seed=6)
    probs = softmax(LOGITS / 1.5)
    probs[5:] = 0.0
    expected = top_p_reference(probs / probs.sum(), 0.8)
    assert chisquare_pvalue(counts, expected) > P_OK


@pytest.mark.parametrize("scale", [8.0, 3.0, 0.1])  # peaked: candidate path; flat: falls back to the sort
def test_top_p_candidate_path_matches_full_sort(scale):
    gen = torch.Generator().manual_seed(int(scale * 10))
    rows, vocab = 64, 3000
    logits = torch.randn(rows, vocab, generator=gen) * scale
    k = torch.tensor([[vocab, 5, 100, 256][i % 4] for i in range(rows)])
    p = torch.tensor([[1.0, 0.5, 0.9, 0.99][(i // 4) % 4] for i in range(rows)])
    for kk in (None, k):
        fast = apply_top_k_top_p(logits.clone(), kk, p, num_candidates=256)
        ref = _top_k_top_p_sorted(logits.clone(), kk, p)
        assert torch.equal(torch.isfinite(fast), torch.isfinite(ref))
        assert torch.equal(fast[torch.isfinite(fast)], logits[torch.isfinite(ref)])


def test_min_p_distribution_after_temperature():
    # min_p filters the tempered distribution: at T=2 tokens 0..4 have p >= 0.3 * p_max;
    # applied before temperature it would keep only tokens 0..2.
    counts = draw(SamplingParams(min_p=0.3, temperature=2.0), LOGITS, N_DRAWS, seed=7)
    probs = softmax(LOGITS / 2.0)
    probs[5:] = 0.0
    assert counts[5:].sum() == 0 and counts[3:5].sum() > 0
    assert chisquare_pvalue(counts, probs) > P_OK


def test_min_p_at_temperature_one():
    counts = draw(SamplingParams(min_p=0.3), LOGITS, N_DRAWS, seed=8)
    probs = softmax(LOGITS)
    probs[3:] = 0.0
    assert chisquare_pvalue(counts, probs) > P_OK


def test_per_row_parameters_in_one_batch():
    """Rows with different params in the same batch each follow their own distribution."""
    params = [SamplingParams(top_k=2), SamplingParams(temperature=0.5), SamplingParams(min_p=0.3)]
    rows = 3000
    batch, _ = make_batch(params * rows, vocab=10)
    sampler = Sampler(torch.Generator().manual_seed(9))
    tokens = np.concatenate([sampler(LOGITS.expand(3 * rows, 10).clone(),
                                     batch.make_sampling_metadata()).sampled_token_ids.numpy()
                             for _ in range(2)]).reshape(-1, 3)
    counts = [np.bincount(tokens[:, j], minlength=10) for j in range(3)]
    p_top_k = softmax(LOGITS)
    p_top_k[2:] = 0
    p_min_p = softmax(LOGITS)
    p_min_p[3:] = 0
    assert chisquare_pvalue(counts[0], p_top_k) > P_OK
    assert chisquare_pvalue(counts[1], softmax(LOGITS / 0.5)) > P_OK
    assert chisquare_pvalue(counts[2], p_min_p) > P_OK


# ---------------------------------------------------------------------- seeds
def _run_seeded(seed: int, churn: bool, shared_seed: int, steps: int = 12) -> list[int]:
    """Tokens of request "target" (seed ``seed``) over ``steps`` sampled steps; with
    ``churn`` other requests come and go, the target changes rows and skips steps."""
    vocab = 40
    target = SamplingParams(seed=seed, temperature=1.0)
    batch = InputBatch(8, vocab, "cpu", build_logitsprocs(None, "cpu", custom=()))
    sampler = Sampler(torch.Generator().manual_seed(shared_seed))
    gen = make_generator(target)
    out: list[int] = []
    others: dict[str, list[int]] = {}
    step = 0
    while len(out) < steps:
        step += 1
        if churn:
            for k in range(step % 3 + 1):  # new neighbours every step, some seeded
                rid = f"o{step}-{k}"
                p = SamplingParams(seed=step * 10 + k) if k % 2 else SamplingParams(top_k=5)
                others[rid] = []
                batch.add_request(rid, p, [1, 2], others[rid])
            for rid in list(others)[:-3]:
                batch.remove_request(rid)
                del others[rid]
        skip = churn and step % 4 == 0  # e.g. preempted or not scheduled this step
        if skip and "target" in batch:
            batch.remove_request("target")
        elif not skip and "target" not in batch:
            batch.add_request("target", target, [1, 2], out, gen)
        batch.refresh()
        # Logits of a row depend on the request and its position in its own output only.
        logits = torch.stack([
            torch.randn(vocab, generator=torch.Generator().manual_seed(len(out) if r == "target" else 999))
            for r in batch.req_ids])
        tokens = sampler(logits, batch.make_sampling_metadata()).sampled_token_ids.tolist()
        for rid, tok in zip(batch.req_ids, tokens):
            (out if rid == "target" else others[rid]).append(tok)
    return out[:steps]


def test_seeded_sampling_repeats_exactly():
    assert _run_seeded(7, churn=False, shared_seed=0) == _run_seeded(7, churn=False, shared_seed=1)


def test_seeded_sampling_independent_of_batch_composition():
    alone = _run_seeded(7, churn=False, shared_seed=0)
    assert _run_seeded(7, churn=True, shared_seed=5) == alone


def test_seed_matters():
    assert _run_seeded(7, churn=False, shared_seed=0) != _run_seeded(8, churn=False, shared_seed=0)


def test_unseeded_rows_use_the_shared_generator():
    a = _run_seeded_unseeded(shared_seed=0)
    assert a == _run_seeded_unseeded(shared_seed=0)
    assert a != _run_seeded_unseeded(shared_seed=1)


def _run_seeded_unseeded(shared_seed: int) -> list[int]:
    batch, _ = make_batch([SamplingParams()] * 4, vocab=50)
    out = sample(batch, torch.zeros(4, 50), Sampler(torch.Generator().manual_seed(shared_seed)))
    return out.sampled_token_ids.tolist()


# ---------------------------------------------------------------------- masks and processors
def test_allowed_token_ids():
    params = [SamplingParams(temperature=0.0, allowed_token_ids=[3, 7]), SamplingParams(temperature=0.0),
              SamplingParams(allowed_token_ids=[1, 2])]
    batch, _ = make_batch(params, vocab=10)
    out = sample(batch, LOGITS.expand(3, 10))
    assert out.sampled_token_ids[:2].tolist() == [3, 0]  # row 1 is unaffected
    counts = draw(SamplingParams(allowed_token_ids=[1, 2, 8]), LOGITS, 4000)
    expected = np.zeros(10)
    expected[[1, 2, 8]] = softmax(LOGITS)[[1, 2, 8]]
    assert chisquare_pvalue(counts, expected) > P_OK


class _FakeTokenizer:
    vocab = {"bad": [7], " bad": [7], "two words": [3, 4], " two words": [3, 4]}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.vocab[text]


def test_bad_words():
    params = SamplingParams(temperature=0.0, bad_words=["bad", "two words"])
    params.update_from_tokenizer(_FakeTokenizer())
    assert params.bad_words_token_ids == [[7], [3, 4]]
    logits = torch.zeros(1, 10)
    logits[0, 7], logits[0, 4] = 5.0, 4.0
    batch, outs = make_batch([params], vocab=10, outputs=[[1]])
    out = processed_logits(batch, logits)
    assert out[0, 7] == float("-inf")  # single-token bad word: always banned
    assert out[0, 4] == 4.0  # "two words" not started: 4 allowed
    assert sample(batch, logits).sampled_token_ids.item() == 4
    outs[0].append(3)  # the output now ends with the bad word's prefix
    batch.refresh()
    assert processed_logits(batch, logits)[0, 4] == float("-inf")
    assert sample(batch, logits).sampled_token_ids.item() not in (4, 7)


def test_logit_bias():
    params = [SamplingParams(temperature=0.0, logit_bias={5: 10.0, 0: -1.0}), SamplingParams(temperature=0.0)]
    batch, _ = make_batch(params, vocab=10)
    out = processed_logits(batch, LOGITS.expand(2, 10))
    assert out[0, 5] == pytest.approx(-0.5 + 10.0) and out[0, 0] == pytest.approx(1.0)
    assert torch.equal(out[1], LOGITS)
    assert sample(batch, LOGITS.expand(2, 10)).sampled_token_ids.tolist() == [5, 0]


def test_min_tokens_blocks_stop_tokens_until_reached():
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[0])
    batch, outs = make_batch([params, SamplingParams(temperature=0.0)], vocab=10)
    tokens = []
    for _ in range(3):
        toks = sample(batch, LOGITS.expand(2, 10)).sampled_token_ids.tolist()
        assert toks[1] == 0  # the other row is never blocked
        tokens.append(toks[0])
        outs[0].append(toks[0])
        outs[1].append(toks[1])
        batch.refresh()
    assert tokens == [1, 1, 0]


def test_min_tokens_blocks_model_eos():
    params = SamplingParams(temperature=0.0, min_tokens=1)
    params.update_from_generation_config({"eos_token_id": [0, 2]}, eos_token_id=0)
    batch, outs = make_batch([params], vocab=10)
    logits = LOGITS.clone()
    logits[2] = 1.9
    assert sample(batch, logits.unsqueeze(0)).sampled_token_ids.item() == 1  # 0 and 2 banned
    outs[0].append(1)
    batch.refresh()
    assert sample(batch, logits.unsqueeze(0)).sampled_token_ids.item() == 0


# ---------------------------------------------------------------------- penalties
def test_presence_and_frequency_penalties_exact():
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), SamplingParams()]
    batch, _ = make_batch(params, vocab=10, outputs=[[3, 3, 5], [3, 3, 5]])
    out = processed_logits(batch, LOGITS.expand(2, 10))
    expected = LOGITS.clone()
    expected[3] -= 0.5 + 2 * 0.25
    expected[5] -= 0.5 + 0.25
    assert torch.allclose(out[0], expected)
    assert torch.equal(out[1], LOGITS)  # penalties are per row


def test_presence_penalty_changes_choice():
    batch, _ = make_batch([SamplingParams(temperature=0.0, presence_penalty=1.0)], vocab=10, outputs=[[0]])
    assert sample(batch, LOGITS.unsqueeze(0)).sampled_token_ids.item() == 1


def test_frequency_penalty_counts_occurrences():
    logits = torch.tensor([[1.0, 0.6, 0.0, 0.0]])
    once, _ = make_batch([SamplingParams(temperature=0.0, frequency_penalty=0.3)], vocab=4, outputs=[[0]])
    twice, _ = make_batch([SamplingParams(temperature=0.0, frequency_penalty=0.3)], vocab=4, outputs=[[0, 0]])
    assert sample(once, logits).sampled_token_ids.item() == 0  # 1.0 - 0.3 > 0.6
    assert sample(twice, logits).sampled_token_ids.item() == 1  # 1.0 - 0.6 < 0.6


def test_repetition_penalty_exact_prompt_and_output():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, -0.5]])
    batch, _ = make_batch([SamplingParams(repetition_penalty=2.0)], vocab=5, prompts=[[0]], outputs=[[1]])
    out = processed_logits(batch, logits)
    assert torch.allclose(out, torch.tensor([[1.0, -2.0, 3.0, 0.5, -0.5]]))


def test_repetition_penalty_changes_choice():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    batch, _ = make_batch([SamplingParams(temperature=0.0, repetition_penalty=1.5)], vocab=3, prompts=[[0]])
    assert sample(batch, logits).sampled_token_ids.item() == 1


# ---------------------------------------------------------------------- logprobs
def test_logprobs_are_raw_and_include_the_sampled_token():
    # The processed distribution only allows the least likely token; logprobs are still the
    # model's raw ones, the sampled token comes first with its rank, then the top-k.
    params = [SamplingParams(allowed_token_ids=[9], temperature=0.7, logit_bias={9: 3.0}, logprobs=2)]
    batch, _ = make_batch(params, vocab=10)
    out = sample(batch, LOGITS.unsqueeze(0))
    lp = out.logprobs
    raw = torch.log_softmax(LOGITS, -1)
    assert out.sampled_token_ids.item() == 9
    assert lp is not None and lp.token_ids.tolist() == [[9, 0, 1]]
    assert torch.allclose(lp.logprobs, raw[[9, 0, 1]].unsqueeze(0))
    assert lp.ranks.tolist() == [10]


def test_logprobs_widths_and_ranks():
    params = [SamplingParams(temperature=0.0, logprobs=0), SamplingParams(logprobs=3), SamplingParams()]
    batch, _ = make_batch(params, vocab=10)
    logits = LOGITS.expand(3, 10)
    out = sample(batch, logits)
    lp = out.logprobs
    assert lp is not None and lp.token_ids.shape == (3, 4)  # widest request: 3 + sampled
    raw = torch.log_softmax(LOGITS, -1)
    for row in range(3):
        tok = out.sampled_token_ids[row].item()
        assert lp.token_ids[row, 0] == tok
        assert lp.logprobs[row, 0] == pytest.approx(raw[tok].item())
        assert lp.ranks[row] == tok + 1  # logits strictly decreasing
        assert lp.token_ids[row, 1:].tolist() == [0, 1, 2]


def test_logprobs_whole_vocabulary():
    """A whole-vocabulary row costs no top-k: the runner reads it from ``raw_logprobs``; the
    top-k is only as wide as the top-k rows need."""
    batch, _ = make_batch([SamplingParams(logprobs=-1), SamplingParams(logprobs=2)], vocab=10)
    out = sample(batch, torch.stack([LOGITS, LOGITS]))
    assert out.logprobs is not None and out.logprobs.token_ids.shape == (2, 3)
    assert out.raw_logprobs is not None and out.raw_logprobs.shape == (2, 10)
    assert torch.allclose(out.raw_logprobs[0].exp().sum(), torch.tensor(1.0))
    only_topk = sample(make_batch([SamplingParams(logprobs=2)], vocab=10)[0], LOGITS.unsqueeze(0))
    assert only_topk.raw_logprobs is None


def test_compute_logprobs_tensors_ranks_with_ties():
    logprobs = torch.log(torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.3, 0.5]]))
    t = compute_logprobs_tensors(logprobs, torch.tensor([1, 0]), 2)
    assert t.ranks.tolist() == [1, 3]  # rank = 1 + strictly larger logprobs
    assert t.token_ids[:, 0].tolist() == [1, 0]
    assert t.token_ids[1, 1:].tolist() == [2, 1]
    assert compute_logprobs_tensors(logprobs, torch.tensor([2, 2]), -1).token_ids.shape == (2, 4)
    assert compute_logprobs_tensors(logprobs, torch.tensor([2, 2]), 0).token_ids.shape == (2, 1)
