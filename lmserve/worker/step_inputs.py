"""``StepInputs``: everything every rank needs to run one step's forward pass, and nothing else.

The driver (rank 0) builds it from the scheduler's output (``ModelRunner.prepare``); with several
ranks the executor sends it to every other rank (pickled, on CPU), and each rank runs
``ModelRunner.run_model`` on it. It holds no request objects, sampling parameters, grammars or
generators: those stay on the driver, which alone samples.

Invariants: ``input_ids``, ``positions`` and ``meta`` describe one flat batch of T tokens as
``AttentionMetadata`` documents (decodes first); every index of every ``logits_groups`` entry is
in ``[0, T)``. ``run_model`` computes ``compute_logits`` once per group, in list order, on the
hidden rows the group names (the same calls on every rank of the last pipeline stage).

Pickling (``__reduce__``) sends every tensor as a numpy array: torch's own tensor pickling costs
~350 us per step to write and ~500 us to read back, this ~20 us each (``benchmarks/step_broadcast.py``).
Unpickled tensors are on CPU; ``to(device)`` moves them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from lmserve.model.layers.attention_metadata import AttentionMetadata


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    # Flat token indices whose logits the driver needs, one list per group: each prompt-logprob
    # chunk (consecutive indices), then the sampling rows (the last token of each sampling request).
    logits_groups: list[list[int]]

    def __reduce__(self):
        meta = {f.name: _to_wire(getattr(self.meta, f.name)) for f in fields(self.meta)}
        return _step_from_wire, (_to_wire(self.input_ids), _to_wire(self.positions), meta, self.logits_groups)

    def to(self, device: torch.device) -> "StepInputs":
        """This step with every tensor on ``device`` (self when they already are)."""
        if self.input_ids.device == torch.device(device):
            return self
        moved = {f.name: _move(getattr(self.meta, f.name), device) for f in fields(self.meta)}
        return StepInputs(self.input_ids.to(device), self.positions.to(device), AttentionMetadata(**moved),
                          self.logits_groups)

    @staticmethod
    def rows(hidden: torch.Tensor, group: list[int]) -> torch.Tensor:
        """``hidden[group]``: a slice (no copy) when the indices are consecutive."""
        first, last = group[0], group[-1]
        if last - first + 1 == len(group) and all(b == a + 1 for a, b in zip(group, group[1:])):
            return hidden[first:last + 1]
        return hidden[group]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def micro_batches(self, count: int) -> list[tuple[int, int]]:
        """Splits the step's sequences into at most ``count`` contiguous runs of about equal token
        counts; returns their sequence ranges ``(first_seq, end_seq)``. Every rank computes the
        same split from the same inputs."""
        query_lens = self.meta.query_lens_cpu
        n = len(query_lens)
        count = max(1, min(count, n))
        total = sum(query_lens)
        bounds, acc, seq = [0], 0, 0
        for k in range(1, count):
            target = total * k / count
            while seq < n - (count - k) and acc + query_lens[seq] <= target:
                acc += query_lens[seq]
                seq += 1
            if seq == bounds[-1]:  # each run holds at least one sequence
                acc += query_lens[seq]
                seq += 1
            bounds.append(seq)
        bounds.append(n)
        return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def slice_metadata(meta: AttentionMetadata, first_seq: int, end_seq: int) -> tuple[AttentionMetadata, int, int]:
    """The metadata of sequences ``[first_seq, end_seq)`` of a step, as a batch of its own, and
    the flat token range ``[t0, t1)`` they occupy. ``decode_only`` keeps the whole step's value,
    so a micro-batch takes the same kernels as the step would."""
    qlens = meta.query_lens_cpu[first_seq:end_seq]
    slens = meta.seq_lens_cpu[first_seq:end_seq]
    t0 = int(sum(meta.query_lens_cpu[:first_seq]))
    t1 = t0 + int(sum(qlens))
    qsl = meta.query_start_loc[first_seq:end_seq + 1] - t0
    sub = replace(meta, num_decodes=max(0, min(meta.num_decodes, end_seq) - first_seq),
                  query_start_loc=qsl, seq_lens=meta.seq_lens[first_seq:end_seq],
                  block_tables=meta.block_tables[first_seq:end_seq], slot_mapping=meta.slot_mapping[t0:t1],
                  query_lens_cpu=list(qlens), seq_lens_cpu=list(slens), max_query_len=max(qlens),
                  max_seq_len=max(slens))
    return sub, t0, t1


def _to_wire(value):
    return value.cpu().numpy() if isinstance(value, torch.Tensor) else value


def _from_wire(value):
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _move(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _step_from_wire(input_ids, positions, meta: dict, logits_groups) -> StepInputs:
    return StepInputs(_from_wire(input_ids), _from_wire(positions),
                      AttentionMetadata(**{k: _from_wire(v) for k, v in meta.items()}), logits_groups)
