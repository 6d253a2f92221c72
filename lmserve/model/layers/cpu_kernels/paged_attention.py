"""ctypes binding of ``paged_attention.c``: paged decode attention and the KV-cache write on CPU.

``get_paged_attention_kernel()`` compiles and loads the C source at first use (``build.py``) and
returns a ``CpuPagedAttention``, or None where it cannot be had (no compiler, compile or load
failure: logged once) or is switched off with ``LMSERVE_DISABLE_CPU_KERNELS=1``. The only state
is the loaded library, held by that object and cached by the lru_cache'd loader. ctypes releases
the GIL for the duration of each call. Each call fills one of ``abi.py``'s argument structs
(``lms_abi.h``); the library is refused at load when its ABI differs (``abi.check_abi``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from lmserve.model.layers.attention_metadata import AttentionMetadata
from lmserve.model.layers.cpu_kernels.abi import PagedChunksArgs, PagedDecodeArgs, WriteKvArgs, bind, load_kernels
from lmserve.model.layers.cpu_kernels.build import KernelBuildError, kernels_disabled

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.c")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ERRORS = {-1: "unsupported arguments", -2: "a seq_len is < 1 or past its block table",
           -3: "a block id is out of range", -4: "out of memory"}


class CpuPagedAttention:
    """The loaded kernels. ``unsupported`` says why a layer call cannot use them (or None);
    ``write_kv``, ``decode`` and ``chunks`` then do the work and return True, or raise ValueError
    (nothing done) for inputs whose layout they do not take."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        """``lib``: the checked library of paged_attention.c (``abi.load_kernels``)."""
        self._lib = lib
        self._decode = bind(lib, "lms_paged_decode")
        self._write = bind(lib, "lms_write_kv")
        self._chunks = bind(lib, "lms_paged_attention")
        self.path = ("portable C", "AVX-512", "AVX-512 + AVX512_BF16")[bind(lib, "lms_kernel_info")()]
        # bf16, head dim % 64 == 0, block size % 16 == 0, no sliding window: AMX tiles
        # (paged_attention_amx.c), for decodes and for ``chunks``
        self.amx = bool(bind(lib, "lms_attention_amx_info")())
        supports = bind(lib, "lms_supports_dtype")
        self.dtypes = frozenset(dt for dt, code in _DTYPE_CODES.items() if supports(code))

    def unsupported(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> str | None:
        """Why this layer call (q [T, Hq, D], kv_cache [2, num_blocks, block_size, Hkv, D]) cannot
        run on the kernels, or None."""
        if q.device.type != "cpu" or kv_cache.device.type != "cpu" or meta.block_tables.device.type != "cpu":
            return "tensors are not on CPU"
        if q.dtype != kv_cache.dtype or q.dtype not in self.dtypes:
            return f"dtypes q={q.dtype} / kv_cache={kv_cache.dtype} are not supported"
        if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[2] != meta.block_size \
                or kv_cache.shape[4] != q.shape[-1] or not kv_cache.is_contiguous():
            return "kv_cache is not a contiguous [2, num_blocks, block_size, Hkv, D] tensor"
        if meta.seq_lens.dtype != torch.int32 or meta.block_tables.dtype != torch.int32 \
                or meta.slot_mapping.dtype != torch.int64:
            return "metadata dtypes are not int32 (seq_lens, block_tables) / int64 (slot_mapping)"
        return None

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
        """``write_kv_cache`` (k, v: [T, Hkv, D]; slots < 0 skipped); True. ValueError if k/v do not fit."""
        hkv, d = kv_cache.shape[3], kv_cache.shape[4]
        if k.dtype != kv_cache.dtype or v.dtype != kv_cache.dtype or not _dense_rows(k, hkv, d) \
                or not _dense_rows(v, hkv, d) or not slot_mapping.is_contiguous() \
                or slot_mapping.shape[0] < k.shape[0]:
            raise ValueError("KV write: k / v are not dense [T, Hkv, D] rows of the cache's dtype")
        num_slots = kv_cache.shape[1] * kv_cache.shape[2]
        rc = self._write(WriteKvArgs(k=k.data_ptr(), k_row_stride=k.stride(0), v=v.data_ptr(), v_row_stride=v.stride(0),
                                     kv_cache=kv_cache.data_ptr(), num_slots=num_slots, slots=slot_mapping.data_ptr(),
                                     num_tokens=k.shape[0], row_elems=hkv * d, dtype=_DTYPE_CODES[k.dtype]))
        if rc != 0:
            raise IndexError(f"slot_mapping has a slot >= {num_slots}")
        return True

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               out: torch.Tensor, scale: float, sliding_window: int | None, num_threads: int) -> bool:
        """One-token queries q [nd, Hq, D] into out [nd, Hq, D]: row i attends to the first
        seq_lens[i] tokens of its block table row block_tables[i] (the last sliding_window of
        them, when set), as ``PagedAttention._decode``. block_tables [>= nd, W] int32 may repeat
        a row (stride 0); seq_lens [>= nd] int32. ValueError if q/out do not fit."""
        nd, hq, d = q.shape
        _dense_q_out(q, out, "decode")
        _, num_blocks, block_size, hkv, _ = kv_cache.shape
        tables = _unit_stride(block_tables)
        seq_lens = seq_lens if seq_lens.is_contiguous() else seq_lens.contiguous()
        code = _DTYPE_CODES[q.dtype]
        rc = self._decode(PagedDecodeArgs(
            q=q.data_ptr(), q_row_stride=q.stride(0), kv_cache=kv_cache.data_ptr(), num_blocks=num_blocks,
            block_tables=tables.data_ptr(), bt_row_stride=tables.stride(0), bt_width=tables.shape[1],
            seq_lens=seq_lens.data_ptr(), out=out.data_ptr(), out_row_stride=out.stride(0), scale=scale, dtype=code,
            kv_dtype=code, block_size=block_size, num_seqs=nd, num_heads=hq, num_kv_heads=hkv, head_dim=d,
            sliding_window=sliding_window or 0, num_threads=num_threads))
        if rc != 0:
            raise ValueError(f"paged decode kernel: {_ERRORS.get(rc, f'error {rc}')}")
        return True

    def takes_chunks(self, q: torch.Tensor, kv_cache: torch.Tensor, sliding_window: int | None) -> bool:
        """Whether ``chunks`` runs this layer's prefill chunks (the AMX path takes them)."""
        return self.amx and q.dtype == torch.bfloat16 and sliding_window is None and q.shape[-1] % 64 == 0 \
            and kv_cache.shape[2] % 16 == 0

    def chunks(self, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
               query_start_loc: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor, scale: float,
               num_threads: int) -> bool:
        """Query chunks q [T, Hq, D] into out [T, Hq, D] (where ``takes_chunks``): sequence i's
        queries are rows query_start_loc[i] .. query_start_loc[i + 1] (int32, starting at 0), the
        last of its seq_lens[i] tokens, already in the cache; query r of a chunk of qlen attends to
        the first seq_lens[i] - qlen + r + 1 tokens of block_tables[i] (int32 [n, W]) -- causal
        prefill over a cached context, as ``TorchPagedAttention.prefill``. ValueError if q/out do not fit."""
        _, hq, d = q.shape
        _dense_q_out(q, out, "prefill chunks")
        _, num_blocks, block_size, hkv, _ = kv_cache.shape
        tables = _unit_stride(block_tables)
        qsl, seq_lens = query_start_loc.contiguous(), seq_lens.contiguous()
        rc = self._chunks(PagedChunksArgs(
            q=q.data_ptr(), q_row_stride=q.stride(0), kv_cache=kv_cache.data_ptr(), num_blocks=num_blocks,
            block_tables=tables.data_ptr(), bt_row_stride=tables.stride(0), bt_width=tables.shape[1],
            query_start_loc=qsl.data_ptr(), seq_lens=seq_lens.data_ptr(), out=out.data_ptr(),
            out_row_stride=out.stride(0), scale=scale, block_size=block_size, num_seqs=seq_lens.shape[0],
            num_heads=hq, num_kv_heads=hkv, head_dim=d, num_threads=num_threads))
        if rc != 0:
            raise ValueError(f"paged attention kernel: {_ERRORS.get(rc, f'error {rc}')}")
        return True


def _dense_q_out(q: torch.Tensor, out: torch.Tensor, what: str) -> None:
    """ValueError unless q and out are [N, Hq, D] with dense rows (any row stride)."""
    if not (_dense_rows(q, q.shape[1], q.shape[2]) and _dense_rows(out, q.shape[1], q.shape[2])):
        raise ValueError(f"{what}: q / out rows are not dense [Hq, D]")


def _unit_stride(tables: torch.Tensor) -> torch.Tensor:
    """Block tables whose rows the kernels can read (unit stride within a row; a row may repeat)."""
    return tables if tables.stride(-1) == 1 else tables.contiguous()


def _dense_rows(t: torch.Tensor, heads: int, d: int) -> bool:
    """t is [N, heads, d] with each row's heads and dims dense (any row stride)."""
    return t.dim() == 3 and t.shape[1] == heads and t.shape[2] == d and t.stride(2) == 1 and t.stride(1) == d


@functools.lru_cache(maxsize=None)
def _load(compiler: str | None, cache_dir: str | None, extra_flags: tuple[str, ...]) -> CpuPagedAttention | None:
    """One load per (compiler, cache dir, flags) setting: the environment values are part of the
    key so that changing them takes effect (build.py reads them again)."""
    del compiler, cache_dir
    try:
        kernel = CpuPagedAttention(load_kernels(SOURCE, extra_flags))
    except (KernelBuildError, AttributeError) as e:
        logger.warning("CPU paged-attention kernel unavailable, using the pure-torch path: %s", e)
        return None
    logger.info("CPU paged-attention kernel loaded (%s)", kernel.path)
    return kernel


def get_paged_attention_kernel(extra_flags: tuple[str, ...] = ()) -> CpuPagedAttention | None:
    """The kernels, or None when disabled (``LMSERVE_DISABLE_CPU_KERNELS=1``) or unavailable.
    ``extra_flags`` (tests, benchmarks) builds a variant, e.g. ``("-mno-avx512f",)``."""
    if kernels_disabled():
        return None
    env = os.environ
    return _load(env.get("LMSERVE_KERNEL_CC"), env.get("LMSERVE_KERNEL_CACHE"), extra_flags)
