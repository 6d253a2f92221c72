"""Weight-only quantized linear layers for llama.cpp's 32-wide block formats (Q4_0, Q4_1, Q8_0),
run with torch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``).

Why: a decode step of a small model multiplies one row by every weight matrix; a bf16
``F.linear`` at M=1 reads ~10 GB/s here, while the int4 kernel reads 4-bit weights (plus one
scale/zero pair per 32) near the memory bandwidth: ~4-6x faster at M=1. It is a per-row GEMV,
so its time grows linearly with M and a bf16 matmul wins from ~10 rows on
(``benchmarks/quantized_linear_microbench.py``): every quantized module also keeps the
dequantized weight in the model dtype as ``weight`` and dispatches on the number of rows.
The kernel is fast for bf16 activations only (its fp32 path is 10-30x slower), so modules pack
their scales in bf16 and an fp32 model's rows are rounded to bf16 for the int path (``KERNEL_DTYPES``).

Formats (``w`` the float weight, ``q`` the stored integer, per block of 32 along K, fp16 d/m):
- Q4_0: ``w = d * (q - 8)``, q in 0..15 -> int4 with scale ``d``, zero ``0``;
- Q4_1: ``w = d * q + m`` -> int4 with scale ``d``, zero ``m + 8 d``;
- Q8_0: ``w = d * q``, q in -128..127, is split exactly into two int4 halves along a doubled K:
  ``q + 128 = 16 a + b`` with ``a, b`` in 0..15, so ``w = [(a - 8) * 16d + 0] + [(b - 8) * d + 8d]``;
  the input is duplicated (``[x, x]``) and one int4 matmul computes both halves. This keeps Q8_0
  exact (a per-row int8 requantization for ``_weight_int8pack_mm`` costs ~1.2% relative weight
  error on SmolLM2's embedding, and that kernel is slower than the int4 one: 3.0 vs 1.9 ms for
  the 49152x576 lm_head at M=1).
The kernel computes ``(q - 8) * scale + zero`` with scale/zero in the activation dtype, so the
int path differs from the dequantized weight only by the bf16 rounding of d and of ``m + 8 d``
(the same order as the dense path's rounding of every weight to bf16).

On CPUs with AVX-512 VNNI the weights are instead kept in (nearly) the file's own layout and run
by lmserve's integer-dot GEMV (``VnniWeight``, ``cpu_kernels/cpu_ops.c``): the activations are
quantized to 15 bits per block of 32 (relative error 2^-15 of the block's largest element, well
below the bf16 rounding of the int4 path), split exactly into two signed bytes, and each group of
4 blocks' dot products is four VPDPBUSD. Measured on SmolLM2-135M's shapes (Zen 4, 2 threads,
``benchmarks/quantized_linear_microbench.py --token``: the 121 matmuls of one decode token, 96 MB
of blocks read from DRAM, each called from Python): best of 30 tokens 6.9 ms against 7.8 with the
int4 kernel; the 49152x576 Q8_0 head alone 0.85 ms against 1.44 with the earlier two-VPDPWSSD
kernel. Called one by one, each GEMV still pays ~10-20 us of Python and ctypes overhead, which is
why a quantized model's decode step runs all of them from one native call (``decode_step.c``).
``LMSERVE_DISABLE_CPU_KERNELS=1`` keeps the
torch kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.layers.cpu_gemm import PrepackedWeight, dense_linear
from lmserve.model.layers.cpu_kernels.cpu_ops import QGEMV_MAX_K, CpuOps, get_cpu_ops
from lmserve.model.layers.linear import Linear, MergedLinear, VocabEmbedding

GROUP = 32  # llama.cpp's block length for Q4_0/Q4_1/Q8_0 = the int4 kernel's group size
# Bytes per block of 32 weights: fp16 d [, fp16 m], then the packed values.
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
# The int4 kernel needs the output dimension to be a multiple of this (rows are padded).
_N_ALIGN = 16
# Largest number of rows (tokens) for which the int kernel beats a bf16 matmul, per layout,
# measured with benchmarks/quantized_linear_microbench.py on SmolLM2's shapes (AMD EPYC Zen 4,
# 2 threads): "int4" one int4 matmul (Q4_0/Q4_1); "q8x2" the doubled-K int4 matmul for Q8_0.
MAX_ROWS = {"int4": 8, "q8x2": 4, "vnni": 4}
# Activation dtypes that take the int kernel; other dtypes always use the dense weight. Modules pack
# their scales in bf16, the kernel's only fast CPU path: fp32 rows are rounded to bf16 on the way in
# and the result widened back (llama.cpp likewise rounds activations for its quantized dot products).
# For an fp32 model (kept quantized only with --quantization gguf) that is the bigger win: a decode
# step reads 4-bit weights instead of 32-bit ones (SmolLM2 on an AVX2 CPU: 54 ms per token, 124 dense).
KERNEL_DTYPES = (torch.bfloat16, torch.float32)
_COMPUTE_DTYPE = torch.bfloat16


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


def pack_blocks(weights: Sequence[BlockQuantizedWeight], dtype: torch.dtype) -> "VnniWeight | PackedWeight | None":
    """The int path's weight for ``weights`` stacked along N: ``VnniWeight`` where the CPU has
    the kernel (and the kernels are on), else ``PackedWeight`` (torch's int4 kernel); None if
    they cannot share one matmul."""
    ops = get_cpu_ops()
    if ops is not None and ops.has_qgemv:
        packed = VnniWeight.from_blocks(weights, ops)
        if packed is not None:
            return packed
    return PackedWeight.from_blocks(weights, dtype)


def _use_kernel(qweight: PackedWeight | VnniWeight | None, x: torch.Tensor) -> bool:
    return qweight is not None and x.dtype in KERNEL_DTYPES and x.shape[0] <= qweight.max_rows \
        and x.device.type == "cpu"


def _matmul(qweight: PackedWeight | VnniWeight | None, weight: torch.Tensor, bias: torch.Tensor | None,
            x: torch.Tensor, allowed: bool, packed: PrepackedWeight | None) -> torch.Tensor:
    """x [..., K] -> [..., N]: the int kernel for few rows when ``allowed``, else the dense weight.

    Layers inside the model pass ``allowed = AttentionMetadata.decode_only``: prompt tokens always
    take the dense path, so a prompt's last position (hence its first sampled token) comes out the
    same whether the prompt was prefilled whole or, after a prefix-cache hit, as a 1-token chunk.
    ``packed``: the dense weight prepacked for oneDNN (``cpu_gemm``), used instead of ``weight``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not allowed or not _use_kernel(qweight, x2):
        return dense_linear(x, weight, bias, packed)
    y = qweight(x2)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, y.shape[-1])


def _load_dense_and_packed(weight: torch.Tensor, loaded: BlockQuantizedWeight,
                           name: str) -> PackedWeight | VnniWeight | None:
    """Copy ``loaded`` dequantized into ``weight`` (its dense copy) and return it packed."""
    if tuple(loaded.shape) != tuple(weight.shape):
        raise ValueError(f"{name}: checkpoint shape {loaded.shape} != model shape {tuple(weight.shape)}")
    with torch.no_grad():
        weight.copy_(loaded.dequantize())
    return pack_blocks([loaded], _COMPUTE_DTYPE)


class QuantizedLinear(Linear):
    """A ``Linear`` whose weight also lives packed as ``qweight`` (a ``PackedWeight``).

    ``weight`` holds the dequantized weight in the model dtype (used for many rows, and what
    ``weight`` always meant); ``qweight`` is None until ``load_quantized`` (then it is the dense path only).
    """

    qweight: PackedWeight | VnniWeight | None

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.qweight = None

    @classmethod
    def from_linear(cls, linear: Linear) -> "QuantizedLinear":
        """Same shape, sharing ``linear``'s weight and bias Parameters (so what is loaded stays)."""
        new = cls(linear.in_features, linear.out_features, bias=False, dtype=linear.weight.dtype)
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def load_quantized(self, loaded: BlockQuantizedWeight, name: str = "weight") -> None:
        self.qweight = _load_dense_and_packed(self.weight, loaded, name)

    def forward(self, x: torch.Tensor, decode_only: bool = False) -> torch.Tensor:
        return _matmul(self.qweight, self.weight, self.bias, x, decode_only, self.packed_weight)


class QuantizedMergedLinear(MergedLinear):
    """A ``MergedLinear`` whose shards may arrive block-quantized: the dequantized rows go into
    ``weight`` at once, and when every shard has arrived quantized in formats that share one
    layout (Q4_0/Q4_1 together, or all Q8_0) they are packed together as ``qweight``. Otherwise
    (a dense shard, or Q8_0 mixed with Q4_*) the module stays dense. ``split`` is unchanged."""

    qweight: PackedWeight | VnniWeight | None

    def __init__(self, in_features: int, output_sizes: Sequence[int], shard_names: Sequence[str],
                 bias: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, output_sizes, shard_names, bias=bias, dtype=dtype)
        self.qweight = None
        self._pending: dict[str, BlockQuantizedWeight | None] = {}  # shard -> blocks (None: dense)

    @classmethod
    def from_merged(cls, merged: MergedLinear) -> "QuantizedMergedLinear":
        """Same shards, sharing ``merged``'s weight and bias Parameters."""
        new = cls(merged.in_features, merged.output_sizes, merged.shard_names, bias=False,
                  dtype=merged.weight.dtype)
        new.weight, new.bias = merged.weight, merged.bias
        return new

    def load_shard(self, param_name: str, shard: str, loaded: torch.Tensor | BlockQuantizedWeight) -> None:
        quantized = isinstance(loaded, BlockQuantizedWeight)
        if param_name == "weight":
            self._pending[shard] = loaded if quantized else None
        super().load_shard(param_name, shard, loaded.dequantize() if quantized else loaded)
        if param_name == "weight" and len(self._pending) == len(self.shard_names):
            parts = [self._pending[s] for s in self.shard_names]
            self.qweight = None if any(p is None for p in parts) else \
                pack_blocks(parts, _COMPUTE_DTYPE)
            self._pending = {}

    def forward(self, x: torch.Tensor, decode_only: bool = False) -> torch.Tensor:
        return _matmul(self.qweight, self.weight, self.bias, x, decode_only, self.packed_weight)


class QuantizedEmbedding(VocabEmbedding):
    """A token embedding whose table arrived block-quantized. Lookups read ``weight`` (the
    dequantized table in the model dtype, exact); ``project`` (the tied lm_head) runs the int
    kernel for few rows."""

    qweight: PackedWeight | VnniWeight | None

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype=dtype)
        self.qweight = None

    @classmethod
    def from_embedding(cls, emb: VocabEmbedding) -> "QuantizedEmbedding":
        new = cls(emb.num_embeddings, emb.embedding_dim, dtype=emb.weight.dtype)
        new.weight = emb.weight
        return new

    def load_quantized(self, loaded: BlockQuantizedWeight, name: str = "weight") -> None:
        self.qweight = _load_dense_and_packed(self.weight, loaded, name)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied lm_head: it only sees the rows that sample, whose count alone picks the path."""
        return _matmul(self.qweight, self.weight, None, hidden, True, self.packed_weight)


def quantized_module_for(module: nn.Module) -> nn.Module | None:
    """The quantized counterpart of a ``Linear``/``MergedLinear``/``VocabEmbedding`` (sharing its
    parameters), the module itself if it already is one, or None for other modules."""
    if isinstance(module, (QuantizedLinear, QuantizedMergedLinear, QuantizedEmbedding)):
        return module
    if isinstance(module, MergedLinear):
        return QuantizedMergedLinear.from_merged(module)
    if isinstance(module, Linear):
        return QuantizedLinear.from_linear(module)
    if isinstance(module, VocabEmbedding):
        return QuantizedEmbedding.from_embedding(module)
    return None
