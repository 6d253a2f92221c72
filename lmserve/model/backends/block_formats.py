"""llama.cpp's 32-wide block formats (Q4_0, Q4_1, Q8_0) as a GGUF file stores them.

Formats (``w`` the float weight, ``q`` the stored integer, per block of 32 along K, fp16 d/m):
- Q4_0: ``w = d * (q - 8)``, q in 0..15;
- Q4_1: ``w = d * q + m``, q in 0..15;
- Q8_0: ``w = d * q``, q in -128..127.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32  # llama.cpp's block length for Q4_0/Q4_1/Q8_0
# Bytes per block of 32 weights: fp16 d [, fp16 m], then the packed values.
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass(frozen=True)
class BlockQuantizedWeight:
    """A weight [N, K] in a llama.cpp 32-wide block format, as stored in a GGUF file.

    ``blocks``: uint8 [N, K // 32, BLOCK_BYTES[qtype]], row-major like the file (one row of the
    torch-layout weight = K // 32 consecutive blocks), so row operations (slicing, the Q/K
    un-permutation, concatenation of merged shards) act on ``blocks`` directly.
    """

    qtype: str  # "Q4_0" | "Q4_1" | "Q8_0"
    blocks: torch.Tensor

    def __post_init__(self) -> None:
        if self.qtype not in BLOCK_BYTES:
            raise ValueError(f"unsupported block format {self.qtype!r}; one of {sorted(BLOCK_BYTES)}")
        if self.blocks.dtype != torch.uint8 or self.blocks.dim() != 3 or \
                self.blocks.shape[2] != BLOCK_BYTES[self.qtype]:
            raise ValueError(f"{self.qtype} blocks must be uint8 [N, K/32, {BLOCK_BYTES[self.qtype]}], "
                             f"got {self.blocks.dtype} {tuple(self.blocks.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.blocks.shape[1] * GROUP

    def fields(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The blocks' stored fields (d, m, qs): d float16 [N, K/32]; m float16 [N, K/32] for Q4_1,
        else None; qs the packed values, uint8 [N, K/32, 16] for Q4_* (value j in the low nibble of
        byte j, value j + 16 in the high one) or int8 [N, K/32, 32] for Q8_0."""
        b = self.blocks
        n, nb, _ = b.shape
        d = b[..., 0:2].contiguous().view(torch.float16).reshape(n, nb)
        if self.qtype == "Q8_0":
            return d, None, b[..., 2:].contiguous().view(torch.int8)
        if self.qtype == "Q4_1":
            return d, b[..., 2:4].contiguous().view(torch.float16).reshape(n, nb), b[..., 4:]
        return d, None, b[..., 2:]

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q, d, m): q [N, K] (uint8 0..15 for Q4_*, int8 for Q8_0), d and m float32 [N, K/32]
        (m is None except for Q4_1). The weight is ``d * (q - 8)``, ``d * q + m`` or ``d * q``."""
        d, m, qs = self.fields()
        n, k = self.shape
        q = qs.reshape(n, k) if self.qtype == "Q8_0" else torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, k)
        return q, d.float(), None if m is None else m.float()

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], bit-equal to ``gguf.quants.dequantize`` of the same blocks."""
        q, d, m = self.unpack()
        n, k = self.shape
        d = d.reshape(n, k // GROUP, 1)
        qf = q.float().reshape(n, k // GROUP, GROUP)
        if self.qtype == "Q4_0":
            w = d * (qf - 8)
        elif self.qtype == "Q4_1":
            w = d * qf + m.reshape(n, k // GROUP, 1)
        else:
            w = qf * d
        return w.reshape(n, k)


