"""Backend of linear layers whose weight arrived in a llama.cpp block format (GGUF Q4_0, Q4_1,
Q8_0) and stays quantized: ``BlockQuantLinear``.

A decode step multiplies few rows by every weight matrix, so reading 4- or 8-bit weights instead of
16-bit ones is the win; for many rows a dense matmul is faster. So the layer keeps both: the
dequantized weight in the model dtype (run by a dense ``LinearBackend``) and an integer kernel's
weight, and ``BlockQuantLinear.apply`` takes the integer kernel exactly when the step is
decode-only and has at most ``max_rows`` rows (a fixed policy, ``MAX_ROWS``; the figures behind
it are in benchmarks/README.md). Prompt tokens always take the dense path, so a prompt's last
position comes out the same whether it was prefilled whole or, after a prefix-cache hit, as a
1-token chunk. The integer kernels:
- ``VnniWeight`` (``vnni``): lmserve's integer-dot GEMV (``cpu_ops.c``, AVX-512 VNNI), weights in
  (nearly) the file's own layout; activations quantized to 15 bits per block of 32 (relative error
  2^-15 of the block's largest element) and split exactly into two signed bytes;
- ``PackedWeight`` (``int4`` for Q4_*, ``q8x2`` for Q8_0): torch's CPU int4 kernel
  (``aten._weight_int4pack_mm_for_cpu``), which computes ``(q - 8) * scale + zero`` in bf16:
  Q4_0 is scale ``d``, zero ``0``; Q4_1 scale ``d``, zero ``m + 8 d``; Q8_0 is split exactly into
  two int4 halves along a doubled K (``q + 128 = 16 a + b``, so
  ``w = [(a - 8) * 16d + 0] + [(b - 8) * d + 8d]``, the input duplicated as ``[x, x]``). It is fast
  for bf16 activations only, so scales are packed in bf16 and an fp32 model's rows are rounded to
  bf16 on the way in (as llama.cpp rounds activations for its quantized dot products).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmserve.model.backends.block_formats import GROUP, BlockQuantizedWeight
from lmserve.model.backends.linear import LinearBackend
from lmserve.model.layers.cpu_kernels.cpu_ops import QGEMV_MAX_K, CpuOps

# The int4 kernel needs the output dimension to be a multiple of this (rows are padded).
_N_ALIGN = 16
# Most rows (tokens) for which each integer kernel runs; more rows take the dense weight.
MAX_ROWS = {"int4": 8, "q8x2": 4, "vnni": 4}
# Activation dtypes that take the integer kernels; other dtypes always use the dense weight.
KERNEL_DTYPES = (torch.bfloat16, torch.float32)
_COMPUTE_DTYPE = torch.bfloat16


def _layout(qtype: str) -> str:
    return "q8x2" if qtype == "Q8_0" else "int4"


class PackedWeight(nn.Module):
    """A weight [N, K] packed for ``aten._weight_int4pack_mm_for_cpu`` (see the module
    docstring for the layouts). ``forward(x [M, K])`` -> [M, N] in x's dtype, computed in the
    dtype the scales were packed in."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, out_features: int, in_features: int,
                 layout: str) -> None:
        super().__init__()
        self.register_buffer("packed", packed)  # uint8 [N_pad, K' / 2]
        self.register_buffer("scales_zeros", scales_zeros)  # [K' / 32, N_pad, 2]
        self.out_features = out_features
        self.in_features = in_features
        self.layout = layout
        self.max_rows = MAX_ROWS[layout]

    def extra_repr(self) -> str:
        return f"{self.layout}, out_features={self.out_features}, in_features={self.in_features}, " \
               f"max_rows={self.max_rows}"

    @classmethod
    def from_blocks(cls, weights: Sequence[BlockQuantizedWeight], dtype: torch.dtype) -> "PackedWeight | None":
        """Pack ``weights`` stacked along N (merged shards); None if they cannot share one matmul
        (different K, or Q8_0 mixed with Q4_*). ``dtype``: the activation dtype."""
        if not weights or len({w.shape[1] for w in weights}) != 1 or len({_layout(w.qtype) for w in weights}) != 1:
            return None
        layout = _layout(weights[0].qtype)
        qs, scales, zeros = [], [], []
        for w in weights:
            q, d, m = w.unpack()
            if w.qtype == "Q8_0":
                u = q.to(torch.int32) + 128  # 0..255 = 16 a + b
                qs.append(torch.cat([u >> 4, u & 0x0F], dim=1))  # [N, 2K]
                scales.append(torch.cat([16 * d, d], dim=1))  # [N, 2K/32]
                zeros.append(torch.cat([torch.zeros_like(d), 8 * d], dim=1))
            else:
                qs.append(q.to(torch.int32))
                scales.append(d)
                zeros.append(torch.zeros_like(d) if m is None else m + 8 * d)
        q, s, z = torch.cat(qs), torch.cat(scales), torch.cat(zeros)  # [N, K'], [N, K'/32] x2
        n, k = sum(w.shape[0] for w in weights), weights[0].shape[1]
        pad = -n % _N_ALIGN
        if pad:  # zero rows: q = 8 with scale and zero 0
            q = torch.cat([q, torch.full((pad, q.shape[1]), 8, dtype=torch.int32)])
            s = torch.cat([s, s.new_zeros(pad, s.shape[1])])
            z = torch.cat([z, z.new_zeros(pad, z.shape[1])])
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        scales_zeros = torch.stack([s.t(), z.t()], dim=-1).to(dtype).contiguous()  # [K'/32, N_pad, 2]
        return cls(packed, scales_zeros, n, k, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype, computed in the scales' dtype (x converted to it)."""
        xk = x.to(self.scales_zeros.dtype)
        if self.layout == "q8x2":
            xk = torch.cat([xk, xk], dim=-1)  # [M, 2K]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk.contiguous(), self.packed, GROUP, self.scales_zeros)
        y = y if y.shape[-1] == self.out_features else y[:, : self.out_features]
        return y.to(x.dtype)


class VnniWeight(nn.Module):
    """A weight [N, K] for ``CpuOps.qgemv`` (``cpu_ops.c`` gives the layout): u8 values ``qw``
    (Q4: the file's nibbles; Q8_0: ``q + 128``, groups of 4 blocks interleaved by halves) and fp16
    per-block ``d``, ``m`` with ``w = d * u + m``. ``forward(x [M, K])`` -> [M, N] in x's dtype
    (fp32 or bf16), x quantized to 15 bits per block of 32 inside the kernel."""

    def __init__(self, qw: torch.Tensor, d: torch.Tensor, m: torch.Tensor, nibbles: bool, in_features: int,
                 ops: CpuOps) -> None:
        super().__init__()
        self.register_buffer("qw", qw)  # uint8 [N, K/2] (nibbles) or [N, K]
        self.register_buffer("d", d)  # float16 [N, K/32]
        self.register_buffer("m", m)  # float16 [N, K/32]
        self.nibbles = nibbles
        self.out_features, self.in_features = d.shape[0], in_features
        self.layout = "vnni"
        self.max_rows = MAX_ROWS["vnni"]
        self._ops = ops

    def extra_repr(self) -> str:
        return f"{'q4' if self.nibbles else 'q8'}, out_features={self.out_features}, " \
               f"in_features={self.in_features}, max_rows={self.max_rows}"

    @staticmethod
    def _parts(w: BlockQuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qw, d, m) of one weight in the kernel's layout."""
        d, m, qs = w.fields()
        n, nb = d.shape
        if w.qtype == "Q8_0":  # u = q + 128; per group of 4 blocks (2 at the end): values 0..15, then 16..31
            u = (qs.to(torch.int16) + 128).to(torch.uint8)  # [N, nb, 32]
            full = nb // 4 * 4
            groups = [u[:, :full].reshape(n, nb // 4, 4, 2, 16).transpose(2, 3).reshape(n, full * GROUP)]
            if nb > full:
                groups.append(u[:, full:].reshape(n, nb - full, 2, 16).transpose(1, 2).reshape(n, -1))
            return torch.cat(groups, dim=1).contiguous(), d, (-128 * d.float()).half()
        qw = qs.reshape(n, nb * 16).contiguous()  # the file's nibbles as they are
        return qw, d, m if m is not None else (-8 * d.float()).half()  # Q4_0: w = d q - 8 d

    @classmethod
    def from_blocks(cls, weights: Sequence[BlockQuantizedWeight], ops: CpuOps) -> "VnniWeight | None":
        """``weights`` stacked along N; None where they cannot share the kernel (K not a multiple
        of 64 or above 16384, different K, Q8_0 mixed with Q4_*, or an m = -128 d beyond fp16's range)."""
        ks = {w.shape[1] for w in weights}
        if not weights or len(ks) != 1 or next(iter(ks)) % 64 or next(iter(ks)) > QGEMV_MAX_K or \
                len({_layout(w.qtype) for w in weights}) != 1:
            return None
        parts = [cls._parts(w) for w in weights]
        qw, d, m = (torch.cat([p[i] for p in parts]) for i in range(3))
        if not torch.isfinite(m).all():
            return None
        return cls(qw, d, m, weights[0].qtype != "Q8_0", weights[0].shape[1], ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._ops.qgemv(x.contiguous(), self.qw, self.d, self.m, self.nibbles)
        if y is None:
            raise ValueError(f"VNNI GEMV declined x {tuple(x.shape)} {x.dtype}")
        return y


def vnni_takes(weights: Sequence[BlockQuantizedWeight]) -> bool:
    """Whether ``VnniWeight.from_blocks`` takes the shape of ``weights`` stacked along N."""
    ks = {w.shape[1] for w in weights}
    return bool(weights) and len(ks) == 1 and next(iter(ks)) % 64 == 0 and next(iter(ks)) <= QGEMV_MAX_K \
        and len({_layout(w.qtype) for w in weights}) == 1


class BlockQuantLinear(LinearBackend):
    """The integer kernel ``qweight`` for decode-only steps of at most ``qweight.max_rows`` rows in
    ``KERNEL_DTYPES``; every other call runs ``dense`` on the dequantized weight (see the module
    docstring). ``name`` is ``"<int layout> + <dense backend>"``."""

    def __init__(self, qweight: "PackedWeight | VnniWeight", dense: LinearBackend) -> None:
        self.qweight = qweight
        self.dense = dense
        self.name = f"{qweight.layout} + {dense.name}"

    def apply(self, layer: nn.Module, x: torch.Tensor, decode_only: bool = False) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if not decode_only or x2.shape[0] > self.qweight.max_rows or x.dtype not in KERNEL_DTYPES:
            return self.dense.apply(layer, x, decode_only)
        y = self.qweight(x2)
        bias = getattr(layer, "bias", None)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, y.shape[-1])

    def dense_weight(self, layer: nn.Module) -> torch.Tensor:
        return self.dense.dense_weight(layer)


def pack_int_weight(weights: Sequence[BlockQuantizedWeight], ops: CpuOps | None) -> "VnniWeight | PackedWeight | None":
    """The integer kernel's weight for ``weights`` stacked along N: ``VnniWeight`` when ``ops`` (the
    plan chose the VNNI GEMV) and its layout takes them (an ``m = -128 d`` beyond fp16's range does
    not), else torch's int4 ``PackedWeight``; None if they cannot share one matmul."""
    if ops is not None and vnni_takes(weights):
        packed = VnniWeight.from_blocks(weights, ops)
        if packed is not None:
            return packed
    return PackedWeight.from_blocks(weights, _COMPUTE_DTYPE)
