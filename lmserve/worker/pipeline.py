"""One step through the pipeline stages, in micro-batches.

The step's sequences are split into ``min(pp_size, num_seqs)`` contiguous micro-batches
(``StepInputs.micro_batches``; whole sequences, so attention never crosses one). Stage ``s`` runs
micro-batch ``i`` as soon as it has received it, and hands its (hidden, residual) to stage ``s+1``
with a non-blocking send, so it computes ``i+1`` while the next stage computes ``i``. The last
stage keeps every micro-batch's final hidden rows, computes the logits of the step's row groups
exactly as one rank would (the same ``compute_logits`` calls on the same rows), and its TP rank 0
sends them to the driver (rank 0), which receives them after handing off its last micro-batch.

Peers are global ranks: stage ``s`` of TP rank ``t`` is rank ``s * tp_size + t``; every transfer goes
over the PP group of that TP rank. Every rank derives the shapes it receives from ``StepInputs``
(hidden size, micro-batch token counts, group sizes), so no shape is ever sent.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lmserve.distributed.parallel_state import ParallelContext
from lmserve.worker.step_inputs import StepInputs, slice_metadata


def _stage_rank(parallel: ParallelContext, pp_rank: int) -> int:
    return pp_rank * parallel.tp_size + parallel.tp_rank


def run_pipelined(model: nn.Module, kv_caches: list[torch.Tensor], step: StepInputs,
                  parallel: ParallelContext) -> list[torch.Tensor] | None:
    """This rank's part of the step; the logits groups on the driver, None elsewhere."""
    group = parallel.pp_group
    hidden_size = model.config.hidden_size
    dtype = model.dtype
    first, last = parallel.is_first_stage, parallel.is_last_stage
    prev_rank = None if first else _stage_rank(parallel, parallel.pp_rank - 1)
    next_rank = None if last else _stage_rank(parallel, parallel.pp_rank + 1)
    pending: list = []  # the sends still in flight (their tensors stay referenced until waited on)
    final = torch.empty(step.num_tokens, hidden_size, dtype=dtype) if last else None
    for first_seq, end_seq in step.micro_batches(parallel.pp_size):
        meta, t0, t1 = slice_metadata(step.meta, first_seq, end_seq)
        intermediate = None
        if not first:
            hidden = torch.empty(t1 - t0, hidden_size, dtype=dtype)
            residual = torch.empty(t1 - t0, hidden_size, dtype=dtype)
            dist.recv(hidden, src=prev_rank, group=group)
            dist.recv(residual, src=prev_rank, group=group)
            intermediate = (hidden, residual)
        out = model.forward_stage(step.input_ids[t0:t1], step.positions[t0:t1], kv_caches, meta, intermediate)
        if last:
            final[t0:t1] = out
        else:
            for t in out:
                t = t.contiguous()
                if t.dtype != dtype:
                    raise RuntimeError(f"pipeline stage output is {t.dtype}, expected {dtype}")
                pending.append((dist.isend(t, dst=next_rank, group=group), t))
    for work, _ in pending:
        work.wait()
    if last:
        logits = [model.compute_logits(step.rows(final, g)) for g in step.logits_groups]
        if parallel.is_driver:
            return logits
        if parallel.tp_rank == 0:
            for t in logits:
                dist.send(t.contiguous(), dst=0, group=group)
        return None
    if not parallel.is_driver:
        return None
    vocab = model.config.vocab_size
    last_rank = _stage_rank(parallel, parallel.pp_size - 1)
    received = []
    for g in step.logits_groups:
        t = torch.empty(len(g), vocab, dtype=torch.float32)
        dist.recv(t, src=last_rank, group=group)
        received.append(t)
    return received
