"""One token bitmask per step for every constrained row of the batch, applied in one call.

``GrammarBitmask`` owns an int32 buffer of ``[max_rows, ceil(vocab / 32)]`` words (allocated
once); per step ``fill(rows)`` writes each constrained row's allowed tokens and returns a
``StepGrammarMask`` that the sampler applies to the logits in place (banned tokens -> -inf),
rows it does not name left untouched. Only rows that sample a token this step are in the
batch, so a chunked prefill that does not reach its end is never masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class BitmaskFiller(Protocol):
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None: ...


@dataclass
class StepGrammarMask:
    """This step's mask: ``bitmask[r]`` holds the allowed tokens of logits row ``r`` for each
    ``r`` in ``rows`` (bit ``t % 32`` of word ``t // 32`` set: token t allowed)."""

    bitmask: torch.Tensor  # [>= max(rows) + 1, ceil(V / 32)] int32, CPU
    rows: list[int]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Sets the banned tokens of the masked rows to -inf, in place (``logits`` [B, V])."""
        vocab = logits.shape[-1]
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            import xgrammar as xgr

            xgr.apply_token_bitmask_inplace(logits, self.bitmask[:logits.shape[0]], vocab_size=vocab,
                                            indices=self.rows)
            return logits
        return apply_bitmask_torch(logits, self.bitmask, self.rows)


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, W] int32 words -> [N, vocab] bool, True where the token is allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [N, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The portable path (any device and dtype): one masked_fill over the masked rows."""
    idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
    allowed = unpack_bitmask(bitmask[rows].to(logits.device), logits.shape[-1])  # [R, V]
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
    return logits


class GrammarBitmask:
    """The reusable buffer (see the module docstring)."""

    def __init__(self, max_rows: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.bitmask = torch.full((max_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)

    def fill(self, constrained: list[tuple[int, BitmaskFiller]]) -> StepGrammarMask | None:
        """``constrained``: (logits row, its grammar state) pairs; None when there are none."""
        if not constrained:
            return None
        for row, state in constrained:
            state.fill_bitmask(self.bitmask, row)
        return StepGrammarMask(self.bitmask, [row for row, _ in constrained])
