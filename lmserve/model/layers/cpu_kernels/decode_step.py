"""ctypes binding of ``decode_step.c``: a Llama-family model's whole decode step (every layer, the
final norm) as one native call, over linear layers that all run on the VNNI GEMV (GGUF
Q4_0/Q4_1/Q8_0 weights kept quantized) or all on the bf16 panel GEMM (``sbgemm`` /
``sbgemm_amx``). ``model/backends/decode_step.py`` decides where it applies and fills the structs;
this module only holds the binding. The step computes what the eager path computes, with the same
kernels; tests hold the two equal bit for bit.

The step keeps raw pointers to the model's weights and, once bound at the first call, to the KV
caches: both must outlive it and not move (the model owns it; the runner allocates its caches
once). Its buffers make it single-threaded: one step at a time, as the engine runs.

Tensor parallelism: the layers are the rank's shards; the embeddings come from the model's
(vocab-parallel) ``embed_tokens`` and the C step calls back into Python (``ALL_REDUCE_FN``, on the
thread that made the call) to all-reduce the hidden states after ``o_proj`` and ``down_proj``, so
every rank must run the step with the same rows, as the eager path's collectives require.

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

import torch

from lmserve.distributed.communication import all_reduce
from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.cpu_kernels.abi import ALL_REDUCE_FN
from lmserve.model.layers.cpu_kernels.abi import DECODE_BUFFERS as _BUFFERS
from lmserve.model.layers.cpu_kernels.abi import DecodeModel as _Model
from lmserve.model.layers.cpu_kernels.abi import DecodeStepArgs, bind, load_kernels
from lmserve.model.layers.cpu_kernels.abi import Layer as _Layer
from lmserve.model.layers.cpu_kernels.build import KernelBuildError, kernels_disabled
from lmserve.model.layers.cpu_kernels.cpu_ops import DTYPE_CODES, get_cpu_ops

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_step.c")

class LlamaDecodeStep:
    """The native decode step of one ``LlamaForCausalLM`` over ``layers`` (the filled structs, see
    ``model/backends/decode_step.py``). The caller runs it for decode-only steps of 1 to
    ``max_rows`` sequences (``takes``); anything the kernel refuses (it checks seq_lens, block ids
    and slots before writing anything) is a ValueError."""

    def __init__(self, lib: ctypes.CDLL, model: torch.nn.Module, layers: list[_Layer], dtype: torch.dtype,
                 max_rows: int) -> None:
        inner = model.model
        attn0 = inner.layers[0].self_attn
        cfg = model.config
        self._fn = bind(lib, "lms_decode_step")
        self.max_rows = max_rows
        self._embed_tokens = inner.embed_tokens
        self._cos_sin_cache = inner.rotary_emb.cos_sin_cache
        hidden, d = cfg.hidden_size, attn0.head_dim
        inter = inner.layers[0].mlp.down_proj.in_features  # this rank's share under tensor parallelism
        widths = {"h": hidden, "res": hidden, "normed": hidden,
                  "qkv": (attn0.num_heads + 2 * attn0.num_kv_heads) * d, "q": attn0.num_heads * d,
                  "k": attn0.num_kv_heads * d, "attn": attn0.num_heads * d,
                  "gu": 2 * inter, "act": inter, "out": hidden}
        self._bufs = {name: torch.empty(max_rows, w, dtype=dtype) for name, w in widths.items()}
        self._cos_sin = torch.empty(max_rows, d, dtype=dtype)
        self._layers = (_Layer * len(layers))(*layers)
        self._parallel = getattr(model, "parallel", None)
        self._comm_error: BaseException | None = None
        self._all_reduce_fn = None  # the ctypes callback, kept alive as long as the step
        if self._parallel is not None and self._parallel.tp_size > 1:
            self._all_reduce_fn = ALL_REDUCE_FN(self._all_reduce_h)
        self._model = _Model(num_layers=len(layers), hidden=hidden, num_heads=attn0.num_heads,
                             num_kv_heads=attn0.num_kv_heads, head_dim=d, intermediate=inter,
                             dtype=DTYPE_CODES[dtype], block_size=0, max_rows=max_rows,
                             eps=inner.norm.variance_epsilon, scale=attn0.attn.scale, layers=self._layers,
                             final_norm=inner.norm.weight.data_ptr(),
                             **{n: self._bufs[n].data_ptr() for n in _BUFFERS},
                             all_reduce=ctypes.cast(self._all_reduce_fn, ctypes.c_void_p).value
                             if self._all_reduce_fn is not None else None)
        self._bound: list[torch.Tensor] | None = None  # the KV caches the layers point at

    def _all_reduce_h(self, buf: int, numel: int, ctx: int) -> None:
        """The C step's callback: sum the first ``numel`` elements of ``h`` over the TP ranks, in
        place. An exception cannot cross the C boundary: it is kept and raised after the step."""
        del buf, ctx  # always the ``h`` buffer
        try:
            all_reduce(self._bufs["h"].view(-1)[:numel], self._parallel)
        except BaseException as e:  # noqa: BLE001 - re-raised by __call__
            self._comm_error = e

    def _bind(self, kv_caches: list[torch.Tensor], block_size: int) -> None:
        """Point the layers at ``kv_caches`` ([2, num_blocks, block_size, Hkv, D] each, contiguous,
        in the model dtype); ValueError if they are not such."""
        if len(kv_caches) != len(self._layers):
            raise ValueError(f"decode step: {len(kv_caches)} KV caches for {len(self._layers)} layers")
        dtype = self._bufs["h"].dtype
        for layer, cache in zip(self._layers, kv_caches):
            if cache.dtype != dtype or cache.device.type != "cpu" or not cache.is_contiguous() or \
                    cache.dim() != 5 or cache.shape[2] != block_size:
                raise ValueError("decode step: a KV cache is not a contiguous CPU "
                                 f"[2, num_blocks, {block_size}, Hkv, D] tensor in {dtype}")
            layer.kv_cache, layer.num_blocks = cache.data_ptr(), cache.shape[1]
        self._model.block_size = block_size
        self._bound = kv_caches

    def unbind(self) -> None:
        """Forget the KV caches (sleep mode frees them); the next call binds the ones it gets."""
        for layer in self._layers:
            layer.kv_cache, layer.num_blocks = 0, 0
        self._bound = None

    def takes(self, meta: AttentionMetadata) -> bool:
        """Whether a step runs here: decode-only, 1 to ``max_rows`` sequences (the policy the
        model's forward applies; every other step runs layer by layer)."""
        return meta.decode_only and 1 <= meta.num_seqs <= self.max_rows and meta.num_decodes == meta.num_seqs

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor:
        """As ``LlamaModel.forward`` for a step the step ``takes``: hidden states [T, hidden] after
        the final norm (a new tensor). ValueError for metadata or caches it cannot run."""
        rows = input_ids.shape[0]
        if not self.takes(meta) or rows != meta.num_seqs:
            raise ValueError(f"decode step called for a step it does not take ({rows} rows, "
                             f"{meta.num_decodes} decodes of {meta.num_seqs} sequences)")
        if kv_caches is not self._bound or self._model.block_size != meta.block_size:
            self._bind(kv_caches, meta.block_size)
        tables, seq_lens, slots = meta.block_tables, meta.seq_lens, meta.slot_mapping
        if tables.dtype != torch.int32 or not tables.is_contiguous() or seq_lens.dtype != torch.int32 or \
                slots.dtype != torch.int64 or tables.device.type != "cpu":
            raise ValueError("decode step: block tables / seq_lens must be contiguous CPU int32, slots int64")
        h, cs = self._bufs["h"][:rows], self._cos_sin[:rows]
        if self._all_reduce_fn is not None:  # a vocab-parallel table: masked lookup + all-reduce
            h.copy_(self._embed_tokens(input_ids))
        else:
            torch.index_select(self._embed_tokens.weight, 0, input_ids, out=h)
        torch.index_select(self._cos_sin_cache, 0, positions, out=cs)
        rc = self._fn(DecodeStepArgs(model=ctypes.pointer(self._model), cos_sin=cs.data_ptr(),
                                     block_tables=tables.data_ptr(), bt_width=tables.shape[1],
                                     seq_lens=seq_lens.data_ptr(), slots=slots.data_ptr(), rows=rows,
                                     num_threads=torch.get_num_threads()))
        if self._comm_error is not None:
            error, self._comm_error = self._comm_error, None
            raise RuntimeError("decode step: the all-reduce between layers failed") from error
        if rc != 0:
            raise ValueError(f"decode step kernel refused the step (rc {rc}): a seq_len, block id or slot "
                             "is out of range")
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


def decode_step_library() -> ctypes.CDLL | None:
    """The loaded ``decode_step.c``, or None (kernels off, no VNNI GEMV, or a failed build: logged)."""
    if kernels_disabled():
        return None
    ops = get_cpu_ops()
    if ops is None or not ops.has_qgemv:
        return None
    env = os.environ
    return _load(env.get("LMSERVE_KERNEL_CC"), env.get("LMSERVE_KERNEL_CACHE"))
