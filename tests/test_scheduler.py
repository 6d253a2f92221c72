"""Scheduler + block pool under randomised workloads, with a fake model (random tokens).

After every step: the block-pool invariants hold, token budget and max_num_seqs are
respected, and every running request holds enough blocks for its computed tokens.
"""

import random

import pytest
from hypothesis import given, settings, strategies as st

from lmserve.config import SchedulerConfig
from lmserve.engine.kv_cache import KVCacheManager
from lmserve.engine.request import Request, RequestStatus
from lmserve.engine.scheduler import Scheduler
from lmserve.sampling_params import SamplingParams


def make_scheduler(num_blocks=24, block_size=4, budget=16, max_seqs=4, chunked=True,
                   caching=True, policy="fcfs", memory_bound_tokens=0):
    kv = KVCacheManager(num_blocks, block_size, caching)
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=64,
                          enable_chunked_prefill=chunked, policy=policy,
                          memory_bound_tokens=memory_bound_tokens)
    return Scheduler(cfg, kv)


def fake_step(sched: Scheduler, rng: random.Random) -> list[str]:
    """One engine step with random sampled tokens; returns finished request ids."""
    out = sched.schedule()
    cfg = sched.config
    assert out.num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    sched.update_after_step(out.scheduled)
    finished = []
    for s in out.scheduled:
        r = s.request
        assert len(s.block_ids) * sched.kv.block_size >= r.num_computed_tokens
        if s.samples:
            r.append_output_token(rng.randrange(50))
            if r.num_output_tokens >= r.max_tokens:
                finished.append(r.request_id)
    for rid in finished:
        sched.finish_request(rid, RequestStatus.FINISHED_LENGTH)
    sched.kv.check_invariants()
    return finished


def new_request(i: int, prompt_len: int, max_tokens: int, shared: bool, priority: int = 0) -> Request:
    prefix = [1, 2, 3, 4, 5, 6, 7, 8] if shared else []
    r = Request(f"r{i}", prefix + [100 + i] * prompt_len, SamplingParams(max_tokens=max_tokens),
                priority=priority)
    r.max_tokens = max_tokens
    return r


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), chunked=st.booleans(), caching=st.booleans(),
       policy=st.sampled_from(["fcfs", "priority"]), num_blocks=st.integers(12, 40),
       knee=st.sampled_from([0, 6]))
def test_random_workload_invariants(seed, chunked, caching, policy, num_blocks, knee):
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=num_blocks, chunked=chunked, caching=caching, policy=policy,
                           budget=16 if chunked else 64, memory_bound_tokens=knee)
    next_id = 0
    for _ in range(120):
        if rng.random() < 0.3:
            pr = rng.randrange(0, 3) if policy == "priority" else 0
            sched.add_request(new_request(next_id, rng.randrange(1, 30), rng.randrange(1, 12),
                                          rng.random() < 0.5, pr))
            next_id += 1
        if rng.random() < 0.1 and sched.requests:
            # Abort anything, including requests in the middle of their prefill.
            victim = rng.choice(list(sched.requests))
            sched.finish_request(victim, RequestStatus.FINISHED_ABORTED)
            sched.kv.check_invariants()
        fake_step(sched, rng)
    while sched.has_unfinished():
        fake_step(sched, rng)
    assert sched.kv.pool.num_free_blocks == sched.kv.num_blocks


def test_chunked_prefill_splits_long_prompt():
    sched = make_scheduler(budget=8)
    sched.add_request(new_request(0, 20, 2, False))
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [8] and not out.scheduled[0].samples
    sched.update_after_step(out.scheduled)
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [8]
    sched.update_after_step(out.scheduled)
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [4] and out.scheduled[0].samples


def test_prompt_that_fits_a_step_is_not_split_beside_others():
    sched = make_scheduler(budget=16)
    rng = random.Random(0)
    sched.add_request(new_request(0, 12, 4, False))
    sched.add_request(new_request(1, 8, 4, False))
    sched.add_request(new_request(2, 40, 4, False))
    out = sched.schedule()
    # r1 (8 tokens) would get only 4 of the 16: it waits, whole, and so does r2 behind it (FCFS).
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("r0", 12)]
    sched.update_after_step(out.scheduled)
    out.scheduled[0].request.append_output_token(7)
    out = sched.schedule()
    # r2 is longer than any step: it is split even beside others, taking what r0 and r1 leave.
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("r0", 1), ("r1", 8), ("r2", 7)]
    while sched.has_unfinished():
        fake_step(sched, rng)


def test_alone_a_prompt_is_split_to_fill_the_step():
    sched = make_scheduler(budget=16)
    sched.add_request(new_request(0, 20, 4, False))
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [16]


def test_memory_bound_tokens_spreads_new_prompts_over_steps():
    rng = random.Random(0)
    sched = make_scheduler(budget=64, max_seqs=8, num_blocks=64, memory_bound_tokens=10)
    for i in range(4):
        sched.add_request(new_request(i, 5, 8, False))
    out = sched.schedule()
    # Two 5-token prompts reach the knee (10); a third would pass it, so it waits.
    assert [s.num_new_tokens for s in out.scheduled] == [5, 5]
    for s in out.scheduled:
        s.request.append_output_token(1)
    sched.update_after_step(out.scheduled)
    out = sched.schedule()
    # Two decodes + one prompt = 7; the fourth prompt would make 12 > 10.
    assert sorted(s.num_new_tokens for s in out.scheduled) == [1, 1, 5]
    while sched.has_unfinished():
        fake_step(sched, rng)


def test_memory_bound_tokens_never_blocks_the_first_prompt_of_a_step():
    big = make_scheduler(budget=64, num_blocks=64, memory_bound_tokens=10)
    big.add_request(new_request(0, 30, 2, False))
    big.add_request(new_request(1, 2, 2, False))
    assert [s.num_new_tokens for s in big.schedule().scheduled] == [30]
    off = make_scheduler(budget=64, max_seqs=8, num_blocks=64, memory_bound_tokens=0)
    for i in range(4):
        off.add_request(new_request(i, 5, 8, False))
    assert [s.num_new_tokens for s in off.schedule().scheduled] == [5, 5, 5, 5]


def test_no_chunking_waits_for_budget():
    sched = make_scheduler(budget=64, chunked=False)
    sched.add_request(new_request(0, 20, 4, False))
    sched.add_request(new_request(1, 50, 4, False))
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [20]  # 50 does not fit in the 44 left


def test_mixed_prefill_and_decode_in_one_step():
    sched = make_scheduler(budget=16)
    sched.add_request(new_request(0, 4, 5, False))
    rng = random.Random(0)
    fake_step(sched, rng)
    sched.add_request(new_request(1, 10, 5, False))
    out = sched.schedule()
    assert sorted(s.num_new_tokens for s in out.scheduled) == [1, 10]


def test_preemption_when_blocks_run_out():
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64, max_seqs=4)
    rng = random.Random(0)
    for i in range(3):
        sched.add_request(new_request(i, 7, 16, False))
    preempted = 0
    for _ in range(200):
        out_before = sched.num_preemptions_total
        fake_step(sched, rng)
        preempted += sched.num_preemptions_total - out_before
        if not sched.has_unfinished():
            break
    assert preempted > 0
    assert not sched.has_unfinished()


def test_priority_policy_order_and_fcfs_rejects_priority():
    sched = make_scheduler(policy="priority", max_seqs=1, budget=64)
    sched.add_request(new_request(0, 4, 1, False, priority=5))
    sched.add_request(new_request(1, 4, 1, False, priority=-1))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["r1"]
    fcfs = make_scheduler()
    with pytest.raises(ValueError, match="priority"):
        fcfs.add_request(new_request(2, 4, 1, False, priority=1))


def test_prefix_cache_hit_counts_and_skips_work():
    sched = make_scheduler(budget=64)
    rng = random.Random(0)
    sched.add_request(new_request(0, 4, 1, True))
    while sched.has_unfinished():
        fake_step(sched, rng)
    sched.add_request(new_request(1, 4, 1, True))
    out = sched.schedule()
    (s,) = out.scheduled
    assert s.request.num_cached_tokens == 8 and s.num_new_tokens == 4
    assert sched.kv.stats.hits == 8
