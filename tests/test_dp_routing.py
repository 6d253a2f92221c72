"""The data-parallel router: load score, round-robin on ties, prefix-cache affinity and its margin."""

from __future__ import annotations

import pickle

import pytest

from lmserve.engine.dp_routing import AFFINITY_BLOCKS, DPRouter, ReplicaLoad, prefix_keys


def test_a_burst_spreads_round_robin() -> None:
    router = DPRouter(3)
    chosen = [router.choose(()) for _ in range(6)]
    assert sorted(chosen) == [0, 0, 1, 1, 2, 2]
    assert [load.in_flight for load in router.loads] == [2, 2, 2]


def test_finished_requests_free_their_replica() -> None:
    router = DPRouter(2)
    a, b = router.choose(()), router.choose(())
    assert {a, b} == {0, 1}
    router.finished(a)
    assert router.choose(()) == a


def test_n_counts_every_sequence() -> None:
    router = DPRouter(2)
    first = router.choose((), num_seqs=4)
    assert [router.choose(()) for _ in range(3)] == [1 - first] * 3  # 1, 2, 3 < 4 sequences


def test_reported_load_counts_when_above_the_in_flight_floor() -> None:
    router = DPRouter(2)
    router.report(0, waiting=0, running=5, kv_cache_usage=0.1)  # e.g. another client's requests
    assert router.choose(()) == 1
    # waiting requests weigh more when the KV cache is nearly full (vLLM's penalty)
    assert ReplicaLoad(waiting=2, running=2, kv_cache_usage=1.0).score() == 4 + 2 * 6 * 0.5
    assert ReplicaLoad(waiting=2, running=2, kv_cache_usage=0.4).score() == 4


def test_prefix_affinity_sends_a_shared_prefix_back_to_its_replica() -> None:
    router = DPRouter(2, margin=2)
    shared = list(range(64))
    first = router.choose(prefix_keys(shared + [1, 2, 3], 16))
    # one more request elsewhere, then the shared prefix again: same replica despite the round-robin turn
    assert router.choose(prefix_keys(list(range(100, 140)), 16)) == 1 - first
    assert router.choose(prefix_keys(shared + [9], 16)) == first


def test_affinity_yields_to_load_beyond_the_margin() -> None:
    router = DPRouter(2, margin=2)
    keys = prefix_keys(list(range(32)), 16)
    home = router.choose(keys)
    router.loads[home].in_flight += 5  # now 6 vs 0: beyond the margin
    assert router.choose(keys) == 1 - home


def test_a_short_match_only_breaks_ties() -> None:
    router = DPRouter(2, margin=4)
    header = list(range(16))  # one block shared by every request (a chat template's header)
    home = router.choose(prefix_keys(header + [1] * 10, 16))
    assert router.choose(prefix_keys(header + [2] * 10, 16)) == 1 - home  # 1 vs 0 in flight: beyond 4/8
    router.finished(home)
    router.finished(1 - home)
    # equal loads: the one-block match breaks the tie (the round-robin turn alone would alternate)
    last = router.choose(prefix_keys(header + [3] * 10, 16))
    router.finished(last)
    assert router.choose(prefix_keys(header + [4] * 10, 16)) == last


def test_the_longest_known_prefix_wins() -> None:
    router = DPRouter(2, margin=100)
    short = router.choose(prefix_keys(list(range(16)), 16))
    longer = list(range(16)) + [500] * 16
    router.loads[short].in_flight += 1  # force the next, unrelated choice elsewhere
    other = router.choose(prefix_keys([7] * 40, 16))
    assert other != short
    # ``longer`` shares only its first block with ``short``: it goes there and becomes a longer key
    assert router.choose(prefix_keys(longer, 16)) == short
    assert router.choose(prefix_keys(longer + [1] * 16, 16)) == short


def test_prefix_keys() -> None:
    assert prefix_keys(list(range(15)), 16) == []  # shorter than a block: nothing to reuse
    keys = prefix_keys(list(range(16 * (AFFINITY_BLOCKS + 3))), 16)
    assert len(keys) == AFFINITY_BLOCKS and len(set(keys)) == AFFINITY_BLOCKS
    assert prefix_keys(list(range(32)), 16)[0] == prefix_keys(list(range(16)) + [0] * 16, 16)[0]
    assert prefix_keys(list(range(32)), 16, salt="a") != prefix_keys(list(range(32)), 16, salt="b")


def test_affinity_table_is_bounded() -> None:
    router = DPRouter(2, max_entries=10)
    for i in range(50):
        router.choose(prefix_keys([i] * 32, 16))
    assert len(router._affinity) <= 10  # noqa: SLF001


def test_llm_refuses_offline_data_parallelism() -> None:
    from lmserve.entrypoints.llm import LLM
    with pytest.raises(ValueError, match="separate launches"):
        LLM(data_parallel_size=2)


def test_dev_route_calls_pickle() -> None:
    """The dev routes hand call_in_engine functools.partials of module functions, which a
    data-parallel front can send to its replicas."""
    import functools

    from lmserve.engine import sleep_mode
    for fn in (sleep_mode.reset_prefix_cache, functools.partial(sleep_mode.sleep, level=1),
               functools.partial(sleep_mode.wake_up, tags=None), sleep_mode.release_kv_cache_memory):
        pickle.loads(pickle.dumps(fn))
