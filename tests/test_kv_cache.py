"""Block pool and prefix-cache bookkeeping, without a model."""

from hypothesis import given, settings, strategies as st

from lmserve.engine.kv_cache import KVCacheManager, hash_block
from lmserve.engine.request import Request
from lmserve.sampling_params import SamplingParams


def make_req(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), cache_salt=salt)


def test_hash_chain_depends_on_prefix_and_salt():
    a = hash_block(None, [1, 2, 3, 4], None)
    assert a == hash_block(None, [1, 2, 3, 4], None)
    assert a != hash_block(None, [1, 2, 3, 5], None)
    assert a != hash_block(None, [1, 2, 3, 4], "tenant")
    assert hash_block(a, [5, 6], None) != hash_block(None, [5, 6], None)


def test_prefix_hit_never_covers_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    r1 = make_req("a", list(range(8)))
    assert kv.allocate_slots(r1, 8)
    r1.num_computed_tokens = 8
    kv.free(r1)
    r2 = make_req("b", list(range(8)))  # identical prompt of exactly two blocks
    hits, n = kv.get_computed_blocks(r2)
    assert n == 4 and len(hits) == 1  # the second block would cover the last token
    r3 = make_req("c", list(range(9)))
    hits, n = kv.get_computed_blocks(r3)
    assert n == 8
    kv.check_invariants()


def test_cache_salt_isolates_tenants():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    r1 = make_req("a", list(range(9)), salt="alice")
    assert kv.allocate_slots(r1, 9)
    kv.free(r1)
    assert kv.get_computed_blocks(make_req("b", list(range(9)), salt="bob"))[1] == 0
    assert kv.get_computed_blocks(make_req("c", list(range(9))))[1] == 0
    assert kv.get_computed_blocks(make_req("d", list(range(9)), salt="alice"))[1] == 8


def test_lru_eviction_order_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True)
    r1 = make_req("a", [1, 2, 3, 4, 5, 6, 7])
    assert kv.allocate_slots(r1, 7)  # 4 blocks, 3 full ones cached
    kv.free(r1)
    # Need one block: the tail block (least valuable) is evicted first.
    r2 = make_req("b", [9])
    assert kv.allocate_slots(r2, 1)
    r3 = make_req("c", [1, 2, 3, 4, 5, 6, 7])
    assert kv.get_computed_blocks(r3)[1] == 6  # all three full blocks survived
    kv.check_invariants()


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_caching=True)
    r = make_req("a", list(range(12)))
    assert not kv.allocate_slots(r, 12)
    assert kv.pool.num_free_blocks == 2 and "a" not in kv.req_blocks
    kv.check_invariants()


def test_shared_blocks_ref_counts():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    r1 = make_req("a", list(range(9)))
    assert kv.allocate_slots(r1, 9)
    r1.num_computed_tokens = 9
    r2 = make_req("b", list(range(9)))
    hits, n = kv.get_computed_blocks(r2)
    assert n == 8
    r2.num_computed_tokens = 0
    assert kv.allocate_slots(r2, 1, hits)
    assert [b.ref_cnt for b in hits] == [2, 2]
    kv.check_invariants()
    kv.free(r1)
    kv.check_invariants()
    assert [b.ref_cnt for b in hits] == [1, 1]
    kv.free(r2)
    kv.check_invariants()
    assert kv.pool.num_free_blocks == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "hit"]), st.integers(0, 5),
                          st.integers(1, 20)), max_size=60))
def test_random_alloc_free_keeps_invariants(ops):
    kv = KVCacheManager(num_blocks=12, block_size=4, enable_caching=True)
    live: dict[str, Request] = {}
    for op, which, length in ops:
        rid = f"r{which}"
        if op == "free" and rid in live:
            kv.free(live.pop(rid))
        elif op in ("alloc", "hit") and rid not in live:
            base = [7] * 8 if op == "hit" else [which] * 3
            req = make_req(rid, base + list(range(length)))
            hits, n = kv.get_computed_blocks(req)
            if kv.allocate_slots(req, req.num_tokens - n, hits):
                req.num_computed_tokens = n
                live[rid] = req
        kv.check_invariants()
