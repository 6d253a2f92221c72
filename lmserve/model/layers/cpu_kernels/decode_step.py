"""ctypes binding of ``decode_step.c``: a Llama-family model's whole decode step (every layer, the
final norm) as one native call, for CPU models whose linear layers all run on the VNNI GEMV (GGUF
Q4_0/Q4_1/Q8_0 weights kept quantized, on a CPU with AVX-512 VNNI), or all on the bf16 panel GEMM
(bf16 weights packed by ``cpu_gemm`` for ``sbgemm`` / ``sbgemm_amx``).

``attach_decode_step(model)`` gives such a model a ``LlamaDecodeStep`` as ``model.decode_step``
(``LlamaForCausalLM.forward`` then runs decode-only steps of up to ``max_rows`` sequences through
it); any other model, or ``LMSERVE_DECODE_STEP=0``, or no kernels, leaves ``decode_step`` None
and the eager path runs. The step computes what the eager path computes, with the same kernels;
tests hold the two equal bit for bit.

The step keeps raw pointers to the model's weights and, once bound at the first call, to the KV
caches: both must outlive it and not move (the model owns it; the runner allocates its caches
once). Its buffers make it single-threaded: one step at a time, as the engine runs.

The C structs it fills (``LmsDecodeModel``, ``LmsLayer``, ``LmsQLinear``, ``LmsDecodeStepArgs``) are
``abi.py``'s (``_Model``, ``_Layer``, ``_QLinear`` here), checked against the library's layout table
when it is loaded (``abi.check_abi``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch

from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.cpu_gemm import PanelWeight
from lmserve.model.layers.cpu_kernels.abi import DECODE_BUFFERS as _BUFFERS
from lmserve.model.layers.cpu_kernels.abi import DecodeModel as _Model
from lmserve.model.layers.cpu_kernels.abi import DecodeStepArgs, bind, load_kernels
from lmserve.model.layers.cpu_kernels.abi import Layer as _Layer
from lmserve.model.layers.cpu_kernels.abi import QLinear as _QLinear
from lmserve.model.layers.cpu_kernels.build import KernelBuildError, kernels_disabled
from lmserve.model.layers.cpu_kernels.cpu_ops import DTYPE_CODES, QGEMV_MAX_K, get_cpu_ops
from lmserve.model.layers.quantized_linear import MAX_ROWS as INT_KERNEL_MAX_ROWS
from lmserve.model.layers.quantized_linear import VnniWeight

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_step.c")
ENV = "LMSERVE_DECODE_STEP"  # "0" switches the one-call decode step off (the eager path runs)
# sequences per step: where the eager path runs the VNNI GEMV (more rows take the dense weight there)
MAX_ROWS = INT_KERNEL_MAX_ROWS["vnni"]
# sequences per step on bf16 panels (the eager path takes any; this bounds the step's buffers)
PANEL_MAX_ROWS = 256

def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _qlinear(module: Any) -> _QLinear | None:
    """The VNNI weight, or the bf16 panels, of a (merged) linear layer as the C struct, or None if
    it has neither."""
    w = getattr(module, "qweight", None)
    if isinstance(w, VnniWeight):
        return _QLinear(qw=w.qw.data_ptr(), d=w.d.data_ptr(), m=w.m.data_ptr(), bias=_ptr(module.bias),
                        n=w.out_features, k=w.in_features, nibbles=int(w.nibbles), panels=None, amx=0)
    p = getattr(module, "packed_weight", None)
    if w is None and isinstance(p, PanelWeight) and p.dtype == torch.bfloat16 and \
            (module.bias is None or module.bias.dtype == torch.bfloat16):
        n, k = p.shape
        return _QLinear(qw=None, d=None, m=None, bias=_ptr(module.bias), n=n, k=k, nibbles=0,
                        panels=p.panels.data_ptr(), amx=int(p.backend == "sbgemm_amx"))
    return None


class LlamaDecodeStep:
    """The native decode step of one ``LlamaForCausalLM`` (see the module docstring); build it
    with ``LlamaDecodeStep.build``. Calling it runs a step or returns None (the caller then runs
    the eager path): more than ``max_rows`` sequences, a prompt token in the step, or inputs the
    kernel refuses (it checks seq_lens, block ids and slots before writing anything)."""

    def __init__(self, lib: ctypes.CDLL, model: torch.nn.Module, layers: list[_Layer], dtype: torch.dtype,
                 max_rows: int) -> None:
        inner = model.model
        attn0 = inner.layers[0].self_attn
        cfg = model.config
        self._fn = bind(lib, "lms_decode_step")
        self.max_rows = max_rows
        self._embed = inner.embed_tokens.weight
        self._cos_sin_cache = inner.rotary_emb.cos_sin_cache
        hidden, d = cfg.hidden_size, attn0.head_dim
        widths = {"h": hidden, "res": hidden, "normed": hidden,
                  "qkv": (attn0.num_heads + 2 * attn0.num_kv_heads) * d, "q": attn0.num_heads * d,
                  "k": attn0.num_kv_heads * d, "attn": attn0.num_heads * d,
                  "gu": 2 * cfg.intermediate_size, "act": cfg.intermediate_size, "out": hidden}
        self._bufs = {name: torch.empty(max_rows, w, dtype=dtype) for name, w in widths.items()}
        self._cos_sin = torch.empty(max_rows, d, dtype=dtype)
        self._layers = (_Layer * len(layers))(*layers)
        self._model = _Model(num_layers=len(layers), hidden=hidden, num_heads=attn0.num_heads,
                             num_kv_heads=attn0.num_kv_heads, head_dim=d, intermediate=cfg.intermediate_size,
                             dtype=DTYPE_CODES[dtype], block_size=0, max_rows=max_rows,
                             eps=inner.norm.variance_epsilon, scale=attn0.attn.scale, layers=self._layers,
                             final_norm=inner.norm.weight.data_ptr(),
                             **{n: self._bufs[n].data_ptr() for n in _BUFFERS})
        self._bound: list[torch.Tensor] | None = None  # the KV caches the layers point at

    @classmethod
    def build(cls, model: torch.nn.Module) -> "LlamaDecodeStep | None":
        """The step for ``model``, or None where it does not apply (see the module docstring):
        not a CPU Llama-family causal LM in fp32/bf16, a linear layer off the VNNI GEMV and off the
        bf16 panels (or a mix of the two), mixed norm epsilons, or shapes past the kernels' limits."""
        lib = _load_library()
        inner = getattr(model, "model", None)
        if lib is None or inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
            return None
        dtype = inner.embed_tokens.weight.dtype
        cfg = model.config
        if dtype not in DTYPE_CODES or inner.embed_tokens.weight.device.type != "cpu" or \
                inner.rotary_emb.cos_sin_cache.dtype != dtype:
            return None
        eps = inner.norm.variance_epsilon
        layers, kinds = [], set()
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = [_qlinear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            head_norms = (attn.q_norm, attn.k_norm) if attn.qk_norm else ()
            if any(q is None for q in linears) or any(n.variance_epsilon != eps for n in norms + head_norms) or \
                    attn.attn.scale != inner.layers[0].self_attn.attn.scale:
                return None
            kinds.update(bool(q.panels) for q in linears)
            qk = [n.weight.data_ptr() for n in head_norms] or [None, None]
            qkv, o, gate_up, down = linears
            layers.append(_Layer(input_norm=norms[0].weight.data_ptr(), post_norm=norms[1].weight.data_ptr(),
                                 q_norm=qk[0], k_norm=qk[1], qkv=qkv, o=o, gate_up=gate_up, down=down, kv_cache=None,
                                 num_blocks=0, sliding_window=attn.attn.sliding_window or 0))
        if not layers or len(kinds) != 1:
            return None
        if kinds == {True}:
            return cls(lib, model, layers, dtype, PANEL_MAX_ROWS) if dtype == torch.bfloat16 else None
        attn0 = inner.layers[0].self_attn
        k_max = max(cfg.hidden_size, cfg.intermediate_size, attn0.head_dim * attn0.num_heads)
        return cls(lib, model, layers, dtype, MAX_ROWS) if k_max <= QGEMV_MAX_K else None

    def _bind(self, kv_caches: list[torch.Tensor], block_size: int) -> bool:
        """Point the layers at ``kv_caches`` ([2, num_blocks, block_size, Hkv, D] each, contiguous,
        in the model dtype); False if they are not such."""
        if len(kv_caches) != len(self._layers):
            return False
        dtype = self._bufs["h"].dtype
        for layer, cache in zip(self._layers, kv_caches):
            if cache.dtype != dtype or cache.device.type != "cpu" or not cache.is_contiguous() or \
                    cache.dim() != 5 or cache.shape[2] != block_size:
                return False
            layer.kv_cache, layer.num_blocks = cache.data_ptr(), cache.shape[1]
        self._model.block_size = block_size
        self._bound = kv_caches
        return True

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor | None:
        """As ``LlamaModel.forward`` for a decode-only step: hidden states [T, hidden] after the
        final norm (a new tensor), or None (nothing done) where the step does not take the call."""
        rows = input_ids.shape[0]
        if not meta.decode_only or not 1 <= rows <= self.max_rows or meta.num_decodes != rows or \
                meta.num_seqs != rows:
            return None
        if (kv_caches is not self._bound or self._model.block_size != meta.block_size) and \
                not self._bind(kv_caches, meta.block_size):
            return None
        tables, seq_lens, slots = meta.block_tables, meta.seq_lens, meta.slot_mapping
        if tables.dtype != torch.int32 or not tables.is_contiguous() or seq_lens.dtype != torch.int32 or \
                slots.dtype != torch.int64 or tables.device.type != "cpu":
            return None
        h, cs = self._bufs["h"][:rows], self._cos_sin[:rows]
        torch.index_select(self._embed, 0, input_ids, out=h)
        torch.index_select(self._cos_sin_cache, 0, positions, out=cs)
        rc = self._fn(DecodeStepArgs(model=ctypes.pointer(self._model), cos_sin=cs.data_ptr(),
                                     block_tables=tables.data_ptr(), bt_width=tables.shape[1],
                                     seq_lens=seq_lens.data_ptr(), slots=slots.data_ptr(), rows=rows,
                                     num_threads=torch.get_num_threads()))
        if rc != 0:
            return None
        return self._bufs["out"][:rows].clone()


@functools.lru_cache(maxsize=None)
def _load(compiler: str | None, cache_dir: str | None) -> ctypes.CDLL | None:
    del compiler, cache_dir  # part of the cache key only (build.py reads them)
    try:
        lib = load_kernels(SOURCE)
        available = bind(lib, "lms_decode_step_available")()
    except (KernelBuildError, AttributeError) as e:
        logger.warning("the native decode step is unavailable, decoding on the eager path: %s", e)
        return None
    return lib if available else None


def _load_library() -> ctypes.CDLL | None:
    if kernels_disabled() or os.environ.get(ENV, "1") == "0":
        return None
    ops = get_cpu_ops()
    if ops is None or not ops.has_qgemv:
        return None
    env = os.environ
    return _load(env.get("LMSERVE_KERNEL_CC"), env.get("LMSERVE_KERNEL_CACHE"))


def attach_decode_step(model: torch.nn.Module) -> bool:
    """Give ``model`` its native decode step (``model.decode_step``) where one applies; call once
    after loading, after the weights are packed. Returns whether it got one."""
    if not hasattr(model, "decode_step"):
        return False
    model.decode_step = LlamaDecodeStep.build(model)
    return model.decode_step is not None
