"""All-reduce through shared memory, for the ranks of one group that run on one host.

Why by hand: torch.distributed's CPU backend (gloo) reduces through loopback TCP, tens to hundreds
of microseconds per call even for a few KiB, and a tensor-parallel decoder calls it twice per layer
every step; oneCCL (torch-ccl), which vLLM's CPU backend relies on with a shared-memory path of its
own, is not a dependency we take. This module is the one small piece those libraries do not give us:
each rank copies its tensor into its slot of a shared segment, publishes a counter, waits for every
rank's counter, then sums the slots in rank order.

Contract:
- Every rank of the group calls ``all_reduce`` the same number of times, in the same order, with
  tensors of the same shape and dtype (the collective contract of torch.distributed).
- Every rank gets the bitwise-same result: the slots are summed in rank order, on every rank.
- Tensors above ``max_bytes`` are not taken (``fits``): the caller falls back to gloo.
- A peer that stops calling (it died) makes ``all_reduce`` raise ``RuntimeError`` after
  ``timeout_s``; it never hangs forever.
- Two buffers alternate by call parity: a rank writes buffer ``p`` of call ``s + 2`` only after
  every rank published call ``s + 1``, which each does after it finished reading call ``s``.
- Memory ordering: the data copy happens before the counter store in program order, and x86's
  stores become visible in order (TSO). ``supported()`` is True on x86-64 only; elsewhere the caller
  keeps gloo.
"""

from __future__ import annotations

import os
import platform
import time
import uuid

import torch

_HEADER = 64  # bytes per rank's counter (one cache line each)


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def new_segment_name() -> str:
    """A fresh name for a segment under /dev/shm (the driver makes it and sends it to the ranks)."""
    return f"lmserve-allreduce-{os.getpid()}-{uuid.uuid4().hex[:12]}"


class ShmAllReduce:
    """One group's shared segment. ``create``: this rank makes the file (exactly one rank does,
    before the others open it); ``unlink()`` may be called once every rank has opened it."""

    def __init__(self, name: str, rank: int, world_size: int, max_bytes: int = 1 << 20,
                 create: bool = False, timeout_s: float = 60.0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.rank, self.world_size, self.max_bytes, self.timeout_s = rank, world_size, max_bytes, timeout_s
        self.path = os.path.join("/dev/shm", name)
        slot = (max_bytes + 63) // 64 * 64
        size = _HEADER * world_size + 2 * world_size * slot
        if create:
            with open(self.path, "wb") as f:
                f.truncate(size)
        self._raw = torch.from_file(self.path, shared=True, size=size, dtype=torch.uint8)
        self._flags = self._raw[:_HEADER * world_size].view(torch.int64).view(world_size, _HEADER // 8)
        self._flags_np = self._flags.numpy()[:, 0]  # the counters, read without torch's per-call cost
        self._slots = self._raw[_HEADER * world_size:].view(2, world_size, slot)
        self._calls = 0
        self._views: dict[tuple, torch.Tensor] = {}

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() * x.element_size() <= self.max_bytes

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``x`` (contiguous) over the group, in place; returns ``x``."""
        if not x.is_contiguous():
            raise ValueError("shared-memory all-reduce takes contiguous tensors")
        if not self.fits(x):
            raise ValueError(f"{x.numel() * x.element_size()} bytes exceed the segment's {self.max_bytes}")
        self._calls += 1
        call, parity = self._calls, self._calls % 2
        key = (parity, x.dtype, x.numel())
        slots = self._views.get(key)
        if slots is None:  # [world, numel] views of this call's buffer, made once per shape
            nbytes = x.numel() * x.element_size()
            slots = self._slots[parity, :, :nbytes].view(x.dtype)
            self._views[key] = slots
        slots[self.rank].copy_(x.view(-1))
        self._flags_np[self.rank] = call
        self._wait_for(call)
        flat = x.view(-1)
        if self.world_size == 2:  # one rounding of a + b: what a float32 sum rounds to, too
            torch.add(slots[0], slots[1], out=flat)
        elif x.dtype in (torch.bfloat16, torch.float16):
            flat.copy_(slots.sum(dim=0, dtype=torch.float32))
        else:
            torch.sum(slots, dim=0, out=flat)
        return x

    def _wait_for(self, call: int) -> None:
        flags = self._flags_np
        if flags.min() >= call:
            return
        spins = 0
        deadline = None
        while flags.min() < call:
            spins += 1
            if spins > 2000:  # past a few tens of microseconds: stop hogging a core another rank may need
                time.sleep(0 if spins < 4000 else 1e-5)
                if deadline is None:
                    deadline = time.monotonic() + self.timeout_s
                elif time.monotonic() > deadline:
                    late = [r for r in range(self.world_size) if flags[r] < call]
                    raise RuntimeError(f"shared-memory all-reduce: rank(s) {late} did not arrive within "
                                       f"{self.timeout_s:.0f} s (a worker died or hangs)")
