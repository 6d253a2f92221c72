"""Read llama.cpp GGUF checkpoints: rename every tensor to Hugging Face's names and dequantize it,
or keep Q4_0/Q4_1/Q8_0 matrices quantized (``BlockQuantizedWeight``) for the int4 CPU kernels.

The header is parsed here directly (a few dozen lines of ``struct``): ``gguf.GGUFReader``
decodes every tokenizer array up front, which costs seconds on each read of a small model.
Tensor data is memory-mapped and dequantized with ``gguf.quants.dequantize``, so every type
the gguf package supports (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_*/Q*_K/IQ*) works.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm.auto import tqdm

from lmserve.model.backends.block_formats import BLOCK_BYTES, GROUP, BlockQuantizedWeight
from lmserve.model.layers.sharding import LazyWeight, narrow_weight
from lmserve.model.models.llama import ROPE_FREQ_FACTORS

logger = logging.getLogger(__name__)

_PROGRESS_DELAY_S = 2.0
# llama.cpp architectures whose converter permutes Q/K rows (its "LlamaModel" family).
_PERMUTED_QK_ARCHS = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": ROPE_FREQ_FACTORS,
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # mixture of experts: the router and the stacked [E, ...] experts (models/moe.py stacks them)
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
# Other llama.cpp architectures: their block names, onto the names their model's ``load_weights``
# takes (HF's for Gemma and Phi-3; for GPT-2 the internal ones of ``decoder_base``, because its
# HF checkpoints hold Conv1D [in, out] weights and llama.cpp's hold torch's [out, in]).
_GEMMA_BLOCK_NAMES = {**_BLOCK_NAMES, "post_attention_norm": "post_attention_layernorm",
                      "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_ARCH_BLOCK_NAMES = {
    "gpt2": {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.fc_in", "ffn_down": "mlp.fc_out"},
    "gemma2": _GEMMA_BLOCK_NAMES,
    "gemma3": _GEMMA_BLOCK_NAMES,
    # fused Q|K|V and gate|up, as in HF's Phi-3 checkpoints
    "phi3": {**_BLOCK_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}
_ARCH_GLOBAL_NAMES = {
    "gpt2": {"token_embd.weight": "model.embed_tokens.weight", "position_embd.weight": "model.embed_positions.weight",
             "output_norm.weight": "model.norm.weight", "output_norm.bias": "model.norm.bias",
             "output.weight": "lm_head.weight"},
}
# Tensors that are config, not weights: Phi-3's LongRoPE factors (``hf_config`` reads them).
CONFIG_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")
# llama.cpp stores Gemma's RMSNorm weights as 1 + w (HF's checkpoints hold w)
_NORM_PLUS_ONE_ARCHS = ("gemma2", "gemma3")
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# older llama.cpp Mixtral files: one tensor per expert, blk.N.ffn_gate.E.weight
_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")

# GGUF metadata value types -> struct format (8 = string and 9 = array are handled apart).
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# ggml types stored as plain numpy items; all others are raw bytes for gguf.quants.dequantize.
_PLAIN_TYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}
# ggml types that can stay quantized (their blocks map onto the int4 kernel exactly).
_BLOCK_TYPES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: innermost (contiguous) dimension first
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    """Scalar and string metadata of a GGUF file (arrays are skipped) and its tensor table."""

    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data_offset: int  # absolute file offset of the (aligned) data section

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.tensors]


def _read_str(f: BinaryIO) -> bytes:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n)


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype == 8:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, 1)
    elif vtype == 9:
        item_type, count = struct.unpack("<IQ", f.read(12))
        if item_type in _SCALAR_FORMATS:
            f.seek(struct.calcsize(_SCALAR_FORMATS[item_type]) * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, item_type)
    else:
        f.seek(struct.calcsize(_SCALAR_FORMATS[vtype]), 1)


def read_gguf_header(path: str) -> GGUFHeader:
    """Parse a GGUF file's header (metadata scalars/strings, tensor table); arrays are skipped."""
    with open(path, "rb") as f:
        magic, (version,) = f.read(4), struct.unpack("<I", f.read(4))
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a little-endian GGUF v2/v3 file")
        n_tensors, n_kv = struct.unpack("<QQ", f.read(16))
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _read_str(f).decode("utf-8")
            (vtype,) = struct.unpack("<I", f.read(4))
            if vtype == 8:
                metadata[key] = _read_str(f).decode("utf-8", errors="replace")
            elif vtype in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[vtype]
                (metadata[key],) = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
            else:
                _skip_value(f, vtype)
        tensors = []
        for _ in range(n_tensors):
            name = _read_str(f).decode("utf-8")
            (n_dims,) = struct.unpack("<I", f.read(4))
            dims = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
            ggml_type, offset = struct.unpack("<IQ", f.read(12))
            tensors.append(GGUFTensorInfo(name, tuple(int(d) for d in dims), ggml_type, offset))
        alignment = int(metadata.get("general.alignment", 32))
        data_offset = -(-f.tell() // alignment) * alignment
    return GGUFHeader(metadata, tensors, data_offset)


def gguf_to_hf_name(name: str, arch: str = "llama") -> str:
    """llama.cpp tensor name -> the name the model of ``arch`` loads (Hugging Face's, but for
    GPT-2: ``_ARCH_BLOCK_NAMES``); ValueError if unknown."""
    global_names = _ARCH_GLOBAL_NAMES.get(arch, _GLOBAL_NAMES)
    if name in global_names:
        return global_names[name]
    block_names = _ARCH_BLOCK_NAMES.get(arch, _BLOCK_NAMES)
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in block_names:
        return f"model.layers.{m.group(1)}.{block_names[m.group(2)]}.{m.group(3)}"
    m = _EXPERT_RE.match(name)
    if m:
        return f"model.layers.{m.group(1)}.mlp.experts.{m.group(3)}.{m.group(2)}_proj.weight"
    family = "Llama-family or MoE" if arch not in _ARCH_BLOCK_NAMES else arch
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face equivalent for {family} models")


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved pairs -> HF's rotate-half layout).

    w: [n_head * head_dim, ...] (a weight or a bias). The converter did, per head,
    ``w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2)``; this is its inverse.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize_tensor(data: np.memmap | np.ndarray, info: GGUFTensorInfo) -> torch.Tensor:
    """One tensor of a GGUF file (``data``: the whole file, as uint8) -> float torch tensor in
    torch layout [out, in] (GGUF lists dims innermost first, so torch's shape is the reverse)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType(info.ggml_type)
    shape = tuple(reversed(info.dims))
    n_elems = int(np.prod(shape)) if shape else 1
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_bytes = n_elems * type_size // block_size
    return _dequantize_bytes(data[info.offset: info.offset + n_bytes], shape, info.ggml_type)


def _dequantize_bytes(raw: np.ndarray, shape: tuple[int, ...], ggml_type: int) -> torch.Tensor:
    """A tensor of ``shape`` (torch layout) stored as the uint8 ``raw`` in ggml type ``ggml_type``,
    dequantized to a float torch tensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quant_shape_to_byte_shape

    qtype = GGMLQuantizationType(ggml_type)
    if ggml_type in _PLAIN_TYPES:
        arr = raw.view(_PLAIN_TYPES[ggml_type]).reshape(shape)
    else:
        arr = raw.reshape(quant_shape_to_byte_shape(shape, qtype))
    out = dequantize(arr, qtype)
    if not out.flags.writeable or not out.flags.c_contiguous:
        out = np.array(out)  # memory-mapped F32/F16 data is read-only
    if out.dtype not in (np.float32, np.float16):
        out = out.astype(np.float32)
    return torch.from_numpy(out).reshape(shape)


def read_gguf_tensor(path: str, name: str) -> torch.Tensor:
    """One tensor of the GGUF file at ``path``, dequantized (KeyError if it has none of that name)."""
    header = read_gguf_header(path)
    info = next((t for t in header.tensors if t.name == name), None)
    if info is None:
        raise KeyError(f"{path} has no tensor {name!r}")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=header.data_offset)
    try:
        return dequantize_tensor(data, info).clone()
    finally:
        del data


def block_quantized_tensor(data: np.memmap | np.ndarray, info: GGUFTensorInfo) -> BlockQuantizedWeight | None:
    """A 2-D Q4_0/Q4_1/Q8_0 tensor's blocks (copied out of ``data``, the whole file as uint8) as
    uint8 [N, K/32, bytes per block]; None for any other type or shape."""
    qtype = _BLOCK_TYPES.get(info.ggml_type)
    if qtype is None or len(info.dims) != 2 or info.dims[0] % GROUP:
        return None
    k, n = info.dims
    n_bytes = n * (k // GROUP) * BLOCK_BYTES[qtype]
    raw = np.array(data[info.offset: info.offset + n_bytes])  # a writable copy of the mapped bytes
    return BlockQuantizedWeight(qtype, torch.from_numpy(raw).reshape(n, k // GROUP, BLOCK_BYTES[qtype]))


class GGUFWeight(LazyWeight):
    """One tensor of a memory-mapped GGUF file, read whole (``materialize``: what
    ``iter_gguf_weights`` yields without ``lazy``) or by slices, each reading only its bytes: rows
    (every ggml type stores rows contiguously), or columns on the type's block boundaries (for
    Q4_0/Q4_1/Q8_0 kept quantized: 32-wide blocks; any other column cut dequantizes the tensor,
    logged). A slice of Q/K rows must hold whole heads; it is un-permuted head by head.

    ``permuted_heads``: the head count of a llama-architecture Q/K tensor (rows to un-permute);
    ``minus_one``: a Gemma norm stored as 1 + w."""

    def __init__(self, data: np.memmap, info: GGUFTensorInfo, name: str, keep_quantized: bool,
                 permuted_heads: int | None = None, minus_one: bool = False) -> None:
        self._data, self._info, self.name = data, info, name
        self._keep_quantized = keep_quantized
        self._permuted_heads, self._minus_one = permuted_heads, minus_one

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self._info.dims))

    def _finish(self, rows: torch.Tensor, qtype: str | None, heads: int | None
                ) -> torch.Tensor | BlockQuantizedWeight:
        if heads:
            rows = unpermute_qk(rows, heads)
        if self._minus_one:
            rows = rows.float() - 1.0
        return BlockQuantizedWeight(qtype, rows.contiguous()) if qtype is not None else rows

    def materialize(self) -> torch.Tensor | BlockQuantizedWeight:
        weight = block_quantized_tensor(self._data, self._info) if self._keep_quantized else None
        if weight is not None:
            return self._finish(weight.blocks, weight.qtype, self._permuted_heads)
        return self._finish(dequantize_tensor(self._data, self._info), None, self._permuted_heads)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor | BlockQuantizedWeight:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        info = self._info
        if len(info.dims) != 2:
            return narrow_weight(self.materialize(), dim, start, length, self.name)
        n, k = self.shape
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
        row_bytes = k // block * type_size
        raw = self._data[info.offset: info.offset + n * row_bytes].reshape(n, row_bytes)  # mapped, not read
        heads = None
        if dim == 0:
            if self._permuted_heads:
                per_head = n // self._permuted_heads
                if start % per_head or length % per_head:
                    raise ValueError(f"{self.name}: rows [{start}, {start + length}) split a head")
                heads = length // per_head
            part, shape = raw[start:start + length], (length, k)
        elif start % block or length % block or self._permuted_heads:
            logger.info("%s: columns [%d, %d) cut its %d-wide blocks: the tensor is dequantized whole",
                        self.name, start, start + length, block)
            return narrow_weight(self.materialize(), dim, start, length, self.name)
        else:
            part, shape = raw[:, start // block * type_size:(start + length) // block * type_size], (n, length)
        part = np.array(part)  # a writable copy of this slice's bytes (the only ones read)
        qtype = _BLOCK_TYPES.get(info.ggml_type) if self._keep_quantized else None
        if qtype is not None:
            blocks = torch.from_numpy(part).reshape(shape[0], shape[1] // GROUP, BLOCK_BYTES[qtype])
            return self._finish(blocks, qtype, heads)
        return self._finish(_dequantize_bytes(part, shape, info.ggml_type), None, heads)


def iter_gguf_weights(path: str, hf_config: Any, keep_quantized: bool = False, lazy: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor | BlockQuantizedWeight | GGUFWeight]]:
    """Yield (HF parameter name, float tensor) for every tensor of the GGUF file at ``path``.

    With ``keep_quantized``, 2-D Q4_0/Q4_1/Q8_0 tensors are yielded as ``BlockQuantizedWeight``
    (their blocks, not dequantized); every other tensor is dequantized as without it.
    Q/K weights (and biases) of llama-architecture files are un-permuted using the head counts
    of ``hf_config`` (for blocks: their rows, each row's blocks moving with it), so the result
    equals transformers' own GGUF loading.

    With ``lazy`` (a tensor-parallel rank) every tensor comes as a ``GGUFWeight`` that reads only
    the slices its layer asks for (the same values, sliced).
    """
    header = read_gguf_header(path)
    arch = header.metadata.get("general.architecture", "")
    n_head = int(hf_config.num_attention_heads)
    n_kv = int(getattr(hf_config, "num_key_value_heads", None) or n_head)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=header.data_offset)
    try:
        for info in tqdm(header.tensors, desc="Loading GGUF", delay=_PROGRESS_DELAY_S, leave=False):
            if info.name in CONFIG_TENSORS:
                continue  # read into the config (``hf_config``), not weights
            hf_name = gguf_to_hf_name(info.name, arch)
            if lazy:
                heads = None
                if arch in _PERMUTED_QK_ARCHS and ".self_attn.q_proj." in hf_name:
                    heads = n_head
                elif arch in _PERMUTED_QK_ARCHS and ".self_attn.k_proj." in hf_name:
                    heads = n_kv
                minus_one = arch in _NORM_PLUS_ONE_ARCHS and hf_name.endswith("norm.weight")
                yield hf_name, GGUFWeight(data, info, hf_name, keep_quantized, heads, minus_one)
                continue
            weight: torch.Tensor | BlockQuantizedWeight | None = None
            if keep_quantized:
                weight = block_quantized_tensor(data, info)
            rows = weight.blocks if weight is not None else dequantize_tensor(data, info)
            if arch in _PERMUTED_QK_ARCHS:
                if ".self_attn.q_proj." in hf_name:
                    rows = unpermute_qk(rows, n_head)
                elif ".self_attn.k_proj." in hf_name:
                    rows = unpermute_qk(rows, n_kv)
            if arch in _NORM_PLUS_ONE_ARCHS and hf_name.endswith("norm.weight"):
                rows = rows.float() - 1.0
            yield hf_name, (BlockQuantizedWeight(weight.qtype, rows.contiguous()) if weight is not None else rows)
    finally:
        del data
