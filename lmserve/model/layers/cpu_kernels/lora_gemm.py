"""ctypes binding of ``lms_lora_sbgemm`` (``lora_sbgemm.c``): the LoRA deltas of one projection for
every adapter of a step in one native call, bf16, each row's expand by its own adapter's factor.

``get_lora_kernel()`` returns a ``CpuLoRAGemm`` where the bf16 panel kernel loads (AVX512-BF16,
kernels not switched off), else None (the callers keep their torch forms). It runs on AMX tiles
where the CPU and the OS grant them (``amx``), else on the AVX-512 micro-kernel; the two modes lay
the factors out differently, and ``pack_factors`` / ``tables`` build the current mode's. Factors are
packed once per adapter and module; a set of adapters gets its tables once per module, which hold
addresses of packed tensors: ``NativeTables`` keeps those tensors alive with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.model.layers.cpu_kernels.abi import LoraArgs, bind
from lmserve.model.layers.cpu_kernels.sgemm import CpuPanelGemm, get_kernel

AMX_K = 32  # the AMX mode's K-step: its factors' inner sizes are padded to multiples of it


@dataclass(frozen=True)
class PackedFactors:
    """One adapter's factors for one module. ``a``: its shrink rows [c, in] (packed for the
    AVX-512 mode; as plain bf16 rows for the AMX mode, which stacks a set's in one packed matrix);
    ``blocks``: per expand, (h0, kb, y0, nb, packed [nb, kb] weight)."""
    a: torch.Tensor
    c: int
    blocks: tuple[tuple[int, int, int, int, torch.Tensor], ...]


@dataclass(frozen=True)
class NativeTables:
    """A set's tables for one module (see ``lms_abi.h``, LMS_LORA_ARGS), with what they point into."""
    shrink: torch.Tensor
    blocks: torch.Tensor
    a_cat: torch.Tensor | None
    c_total: int  # a_cat's rows (0: none)
    factors: tuple[PackedFactors | None, ...]

    def __post_init__(self) -> None:  # the addresses a call passes, read once
        object.__setattr__(self, "shrink_ptr", self.shrink.data_ptr())
        object.__setattr__(self, "blocks_ptr", self.blocks.data_ptr())
        object.__setattr__(self, "num_blocks", self.blocks.numel() // 6)
        object.__setattr__(self, "a_cat_ptr", None if self.a_cat is None else self.a_cat.data_ptr())


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[0] % multiple
    return torch.cat([t, t.new_zeros(extra, t.shape[1])]) if extra else t


def _tiles_short_k(w: torch.Tensor) -> torch.Tensor:
    """w [N, kb] (kb even, at most 32) in the AMX tile layout of K = kb: per 32-column block, two
    tiles [kb / 2, 16, 2] (sbgemm.h, amx_block_acc_short; for kb = 32 lms_sbgemm_amx_pack's)."""
    n, kb = w.shape
    w = torch.cat([w, w.new_zeros(-n % AMX_K, kb)]) if n % AMX_K else w
    return w.reshape(-1, 2, 16, kb // 2, 2).permute(0, 1, 3, 2, 4).contiguous()


class CpuLoRAGemm:
    """The loaded kernel: ``pack_factors`` once per adapter and module, ``tables`` once per set of
    adapters and module, ``add_deltas`` per step and module."""

    def __init__(self, panel: CpuPanelGemm, amx: CpuPanelGemm | None) -> None:
        self._panel = panel  # AVX-512 mode: lms_sbgemm_pack's layout
        self._amx = amx  # AMX mode: lms_sbgemm_amx_pack's
        self._fn = bind(panel._lib, "lms_lora_sbgemm")

    @property
    def amx(self) -> bool:
        return self._amx is not None

    def pack_factors(self, a: torch.Tensor, b: torch.Tensor,
                     blocks: tuple[tuple[int, int, int, int], ...]) -> PackedFactors:
        """a [C, in], b [C, out] (B^T, scaled, zero outside ``blocks``: (row0, row1, col0, col1)).
        One expand per block, of its own rows and columns only, a block of odd height padded with a
        zero row of B (and, AVX-512, of A). AMX: a block of more than 32 rows is padded to a
        multiple of 32; with any such block, one expand over the blocks' column span instead (b's
        zeros included), C padded to a multiple of 32 (the kernel pads h with zeros to match).
        Padding adds exact zeros."""
        if self._amx is not None:
            a16 = a.to(torch.bfloat16).contiguous()
            if any(r1 - r0 > AMX_K for r0, r1, _, _ in blocks):
                y0, y1 = min(c0 for _, _, c0, _ in blocks), max(c1 for _, _, _, c1 in blocks)
                b_pad = _pad_rows(b[:, y0:y1], AMX_K)
                return PackedFactors(a16, a.shape[0], ((0, b_pad.shape[0], y0, y1 - y0, self._amx.pack(b_pad.t())),))
            return PackedFactors(a16, a.shape[0], tuple(
                (r0, kb, c0, c1 - c0, _tiles_short_k(_pad_rows(b[r0:r1, c0:c1], 2).t().to(torch.bfloat16)))
                for r0, r1, c0, c1 in blocks for kb in [r1 - r0 + (r1 - r0) % 2]))
        a_rows, packed = [], []
        h0 = 0
        for r0, r1, c0, c1 in blocks:
            a_blk, b_blk = _pad_rows(a[r0:r1], 2), _pad_rows(b[r0:r1, c0:c1], 2)
            a_rows.append(a_blk)
            packed.append((h0, a_blk.shape[0], c0, c1 - c0, self._panel.pack(b_blk.t())))
            h0 += a_blk.shape[0]
        return PackedFactors(self._panel.pack(torch.cat(a_rows)), h0, tuple(packed))

    @staticmethod
    def takes(k: int, dtype: torch.dtype) -> bool:
        """Whether a module of ``k`` input features in ``dtype`` runs here."""
        return dtype == torch.bfloat16 and k >= 2 and k % 2 == 0

    def tables(self, per_slot: list[PackedFactors | None]) -> NativeTables:
        """The tables of a set of adapters (slot order) for one module."""
        shrink, blocks, rows = [], [], []
        offset = 0
        for slot, f in enumerate(per_slot):
            if f is None:
                shrink += [0, 0]
                continue
            if self._amx is not None:
                shrink += [offset, f.c]
                rows.append(f.a)
                offset += f.c
            else:
                shrink += [f.a.data_ptr(), f.c]
            for h0, kb, y0, nb, panels in f.blocks:
                blocks += [slot, h0, kb, y0, nb, panels.data_ptr()]
        a_cat = self._amx.pack(torch.cat(rows)) if self._amx is not None and rows else None
        return NativeTables(torch.tensor(shrink, dtype=torch.int64), torch.tensor(blocks, dtype=torch.int64),
                            a_cat, offset if a_cat is not None else 0, tuple(per_slot))

    def add_deltas(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, slot_start: torch.Tensor,
                   tables: NativeTables) -> None:
        """y[rows[i]] += the delta of x[rows[i]] under the slot whose range of ``slot_start``
        holds i (x [T, in], y [T, out] bf16, unit column stride; rows int32; slot_start int64
        [slots + 1]; ``tables`` from ``tables`` for those slots)."""
        self.for_rows(rows, slot_start)(x, y, tables)

    def for_rows(self, rows: torch.Tensor, slot_start: torch.Tensor) -> StepCall:
        """``add_deltas`` with rows and slot_start bound (once per step, for every module)."""
        if rows.dtype != torch.int32 or not rows.is_contiguous() or slot_start.dtype != torch.int64 \
                or not slot_start.is_contiguous():
            raise ValueError("lms_lora_sbgemm rejected its arguments: rows int32, slot_start int64, contiguous")
        return StepCall(self._fn, rows, slot_start, int(self._amx is not None))


class StepCall:
    """``CpuLoRAGemm.add_deltas`` for one step's rows: one argument struct filled per call."""

    def __init__(self, fn, rows: torch.Tensor, slot_start: torch.Tensor, amx: int) -> None:
        self._fn = fn
        self._keep = (rows, slot_start)  # the struct points into them
        self._slots = slot_start.numel() - 1
        self._args = LoraArgs(rows=rows.data_ptr(), num_entries=rows.numel(), slot_start=slot_start.data_ptr(),
                              num_slots=self._slots, amx=amx)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, tables: NativeTables) -> None:
        if (x.dtype != torch.bfloat16 or y.dtype != torch.bfloat16 or x.stride(-1) != 1 or y.stride(-1) != 1
                or x.shape[0] != y.shape[0] or tables.shrink.numel() != 2 * self._slots):
            raise ValueError("lms_lora_sbgemm rejected its arguments: dtypes, strides or table sizes")
        a = self._args
        a.x, a.ldx, a.k, a.num_rows = x.data_ptr(), x.stride(0), x.shape[1], x.shape[0]
        a.y, a.ldy, a.n = y.data_ptr(), y.stride(0), y.shape[1]
        a.shrink, a.blocks, a.num_blocks = tables.shrink_ptr, tables.blocks_ptr, tables.num_blocks
        a.a_cat, a.c_total = tables.a_cat_ptr, tables.c_total
        a.num_threads = torch.get_num_threads()
        rc = self._fn(a)
        if rc != 0:
            raise ValueError(f"lms_lora_sbgemm rejected its arguments (code {rc}): x {tuple(x.shape)}, "
                             f"y {tuple(y.shape)}")


def get_lora_kernel(amx: bool | None = None) -> CpuLoRAGemm | None:
    """The kernel, or None where the bf16 panel kernel does not load (see the module docstring).
    ``amx``: None uses the tiles where they load; False the AVX-512 mode; True the AMX mode or None."""
    panel = get_kernel("sbgemm")
    if panel is None:
        return None
    tiles = get_kernel("sbgemm_amx") if amx is not False else None
    if amx and tiles is None:
        return None
    return CpuLoRAGemm(panel, tiles)
