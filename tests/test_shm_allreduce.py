"""``lmserve/distributed/shm_allreduce.py``: the shared-memory all-reduce equals gloo's sum on every
rank (bitwise the same across ranks), alternates its buffers safely over many calls, and a missing
peer is an error after the timeout, not a hang."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmserve.distributed import shm_allreduce
from lmserve.distributed.shm_allreduce import ShmAllReduce

pytestmark = pytest.mark.skipif(not shm_allreduce.supported(), reason="x86-64 only")


def _worker(rank: int, world: int, init_file: str, name: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    shm = ShmAllReduce(name, rank, world, max_bytes=1 << 16, create=rank == 0)
    dist.barrier()
    if rank == 0:
        shm.unlink()
    gen = torch.Generator().manual_seed(100 + rank)
    results = []
    for i, (shape, dtype) in enumerate([((3, 5), torch.float32), ((1, 896), torch.bfloat16), ((7,), torch.float32),
                                        ((4, 64), torch.bfloat16)] * 25):
        x = torch.randn(shape, generator=gen).to(dtype)
        ref = x.clone()
        dist.all_reduce(ref)
        got = shm.all_reduce(x.clone())
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
        results.append(got)
    torch.save(results, os.path.join(out_dir, f"r{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_matches_gloo_and_is_identical_on_every_rank():
    with tempfile.TemporaryDirectory() as tmp:
        name = shm_allreduce.new_segment_name()
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), name, tmp), nprocs=2, join=True)
        r0, r1 = torch.load(os.path.join(tmp, "r0.pt")), torch.load(os.path.join(tmp, "r1.pt"))
        assert len(r0) == 100 and all(torch.equal(a, b) for a, b in zip(r0, r1))
        assert not os.path.exists(os.path.join("/dev/shm", name))


def test_missing_peer_times_out_and_large_tensors_are_refused():
    name = shm_allreduce.new_segment_name()
    shm = ShmAllReduce(name, 0, 2, max_bytes=256, create=True, timeout_s=0.2)
    try:
        assert not shm.fits(torch.zeros(65))
        with pytest.raises(ValueError):
            shm.all_reduce(torch.zeros(65))
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] did not arrive"):
            shm.all_reduce(torch.ones(4))
    finally:
        shm.unlink()
