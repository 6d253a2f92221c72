"""Paged KV-cache bookkeeping: a pool of fixed-size blocks with ref counts and a
prefix cache keyed by chained block hashes. Pure Python; the tensors live in the
model runner.

Prefix caching (vLLM v1's scheme):
- a *full* block of a request's token ids has hash ``H(parent_hash, token ids, salt)``,
  so equal hashes mean equal whole prefixes; ``cache_salt`` and the LoRA adapter id are mixed
  into the first block so tenants with different salts, and requests under different adapters
  (or an adapter and the base model), never share blocks;
- a freed block keeps its hash and stays reusable until it is evicted; free blocks are
  evicted least-recently-freed first (a request's blocks are freed tail first, so the
  end of a prefix goes before its start);
- a cache hit never covers a request's last known token (it must be computed to
  produce logits).

Sliding window (``sliding_window`` set only when *every* attention layer has one; an
interleaved model with global layers needs every block and keeps them): before a request
gets new slots, its blocks whose tokens all lie outside the window of every token still to
be computed are freed (they keep their hash, so they stay prefix-cache hits until evicted)
and replaced in its block list by the manager's ``null_block``, which keeps positions
aligned. A null entry's id in ``block_ids`` is 0: attention masks those positions, never
using what block 0 holds.

Invariants (``check_invariants``): every block is either free (ref_cnt == 0, in the
free queue) or used (ref_cnt > 0, not in the queue); free + used == total; a block's
ref_cnt equals the number of requests that hold it; no request holds a block twice
(null entries aside).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from lmserve.engine.request import Request


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


def hash_block(parent: bytes | None, token_ids: list[int] | tuple[int, ...], salt: str | None,
               lora_id: int | None = None) -> bytes:
    """SHA-256 over (parent hash, token ids, LoRA adapter id, salt): collision resistant, so one
    tenant cannot craft a prompt that aliases another's cached prefix, and the same tokens under
    two adapters (or an adapter and the base model) never share a block."""
    h = hashlib.sha256()
    h.update(parent or b"\0")
    h.update(array("q", token_ids).tobytes())
    if lora_id is not None:
        h.update(b"lora:%d\0" % lora_id)
    if salt is not None:
        h.update(b"salt:" + salt.encode("utf-8", "surrogatepass"))
    return h.digest()[:16]


class BlockPool:
    """All KV blocks, a free queue in eviction (LRU) order, and the hash -> block map."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def get_cached(self, block_hash: bytes) -> KVCacheBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, n: int) -> list[KVCacheBlock]:
        """Takes n blocks from the head of the free queue, evicting their cached hashes."""
        if n > len(self._free):
            raise ValueError(f"cannot allocate {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Takes a reference on cache-hit blocks (removing free ones from the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[KVCacheBlock]) -> None:
        """Drops one reference on each block; blocks reaching 0 join the free queue's
        tail in the order given (callers pass a request's blocks tail first)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise AssertionError(f"block {block.block_id} freed more often than taken")
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_block(self, block: KVCacheBlock, block_hash: bytes) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        # First writer wins: an existing equal block stays the one that hits.
        self._cached.setdefault(block_hash, block)

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached hash; only possible when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        for block in self.blocks:
            block.block_hash = None
        return True


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which found in the cache
    requests: int = 0

    def reset(self) -> "PrefixCacheStats":
        old = PrefixCacheStats(self.queries, self.hits, self.requests)
        self.queries = self.hits = self.requests = 0
        return old


class KVCacheManager:
    """Maps requests to their blocks. The scheduler is its only caller."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool,
                 sliding_window: int | None = None) -> None:
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {sliding_window}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.null_block = KVCacheBlock(-1)  # stands for a block freed out of the window
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.stats = PrefixCacheStats()

    # ------------------------------------------------------------------ queries
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table row (0 for blocks freed out of the sliding window)."""
        return [0 if b is self.null_block else b.block_id for b in self.req_blocks.get(request_id, ())]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ hashing
    def update_block_hashes(self, request: Request) -> None:
        """Extends ``request.block_hashes`` to cover every full block of its tokens."""
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            first = i == 0  # the salt and adapter enter the first block; the chain carries them on
            hashes.append(hash_block(parent, tokens[i * bs:(i + 1) * bs], request.cache_salt if first else None,
                                     request.lora_id if first else None))

    # ------------------------------------------------------------------ allocation
    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of the request in whole blocks, never covering its
        last token. Takes no references (``allocate_slots`` does)."""
        if not self.enable_caching or request.wants_prompt_logprobs or request.is_pooling:
            return [], 0
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached(block_hash)
            if block is None:
                break
            hits.append(block)
        self.stats.requests += 1
        self.stats.queries += request.num_tokens
        self.stats.hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None) -> bool:
        """Makes room for ``num_new_tokens`` after the computed tokens (and after
        ``new_computed_blocks``, cache hits that the request takes over now).
        Returns False, changing nothing, when the free blocks do not suffice."""
        new_computed_blocks = new_computed_blocks or []
        self._free_out_of_window(request)
        held = self.req_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total_needed = self.blocks_needed(num_computed + num_new_tokens)
        num_to_allocate = total_needed - len(held) - len(new_computed_blocks)
        # Hit blocks that sit in the free queue stop being allocatable once touched.
        num_free_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_to_allocate > self.pool.num_free_blocks - num_free_hits:
            return False
        blocks = self.req_blocks.setdefault(request.request_id, [])
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
        if num_to_allocate > 0:
            blocks.extend(self.pool.allocate(num_to_allocate))
        self._cache_full_blocks(request, num_computed + num_new_tokens)
        return True

    def _free_out_of_window(self, request: Request) -> None:
        """Frees the request's blocks that no token from ``num_computed_tokens`` on can see: a
        token at position p sees keys at positions > p - sliding_window, so a block whose last
        position is <= num_computed_tokens - sliding_window is never read again."""
        if self.sliding_window is None:
            return
        blocks = self.req_blocks.get(request.request_id)
        if not blocks:
            return
        num_skipped = max(0, request.num_computed_tokens - self.sliding_window + 1) // self.block_size
        freed = []
        for i in range(min(num_skipped, len(blocks))):
            if blocks[i] is not self.null_block:
                freed.append(blocks[i])
                blocks[i] = self.null_block
        if freed:
            self.pool.free(list(reversed(freed)))

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Registers the hashes of blocks that are full once ``num_tokens`` are computed.
        Within one step every layer writes all new K/V before attending, so a block
        registered now is readable by another request scheduled in the same step."""
        if not self.enable_caching:
            return
        self.update_block_hashes(request)
        blocks = self.req_blocks[request.request_id]
        num_full = min(num_tokens // self.block_size, len(request.block_hashes))
        for i in range(num_full):
            if blocks[i].block_hash is None and blocks[i] is not self.null_block:
                self.pool.cache_block(blocks[i], request.block_hashes[i])

    def free(self, request: Request) -> None:
        """Releases the request's blocks, tail first (so the tail is evicted first)."""
        blocks = [b for b in self.req_blocks.pop(request.request_id, ()) if b is not self.null_block]
        if blocks:
            self.pool.free(list(reversed(blocks)))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    # ------------------------------------------------------------------ checking
    def check_invariants(self) -> None:
        """Raises AssertionError if the bookkeeping is inconsistent (tests call this)."""
        pool = self.pool
        holders: dict[int, int] = {}
        for req_id, blocks in self.req_blocks.items():
            ids = [b.block_id for b in blocks if b is not self.null_block]
            assert len(ids) == len(set(ids)), f"request {req_id} holds a block twice"
            for i in ids:
                holders[i] = holders.get(i, 0) + 1
        num_used = 0
        for block in pool.blocks:
            assert block.ref_cnt >= 0, f"block {block.block_id} has ref_cnt {block.ref_cnt}"
            assert block.ref_cnt == holders.get(block.block_id, 0), (
                f"block {block.block_id}: ref_cnt {block.ref_cnt} != holders {holders.get(block.block_id, 0)}")
            in_free = block.block_id in pool._free
            assert in_free == (block.ref_cnt == 0), f"block {block.block_id} free-queue membership is wrong"
            num_used += block.ref_cnt > 0
        assert pool.num_free_blocks + num_used == pool.num_blocks, "free + used != total"
        for block_hash, block in pool._cached.items():
            assert block.block_hash == block_hash, "cached map points at a block with another hash"
