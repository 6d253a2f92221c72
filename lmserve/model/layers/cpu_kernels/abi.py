"""The Python side of the kernels' C boundary (``lms_abi.h``): one ctypes struct per C argument
struct, the signature of every exported entry point, and the check that a loaded library was built
with the same boundary.

Design (argument structs, not torch custom ops): every entry point takes one ``const LmsXxxArgs*``,
filled here by field name, so no call depends on the order of up to 20 positional arguments, and a
call converts one pointer instead of each scalar (no slower per call: benchmarks/README.md, "Kernel
measurements"). torch custom ops would give
schemas too, but need a C++ extension built against torch's headers at first use (minutes instead of
seconds, and a rebuild per torch version) for no gain on these plain-pointer kernels.

The check (``check_abi``, run by ``load_kernels`` on every library it loads): ``lms_abi_version()``
equals ``ABI_VERSION``, and for every struct here the library's layout table (generated in C from the
same field lists that declare the structs) lists the same fields in the same order, each with the
same offset, size and kind of type, and the same ``sizeof``. Any difference raises
``KernelBuildError`` (the binding then reports the kernels unavailable, as after a failed build):
a stale cached library or a struct edited on one side only can never be called.

Changing a struct or an entry point means changing ``lms_abi.h`` and this module together and
bumping ``LMS_ABI_VERSION`` / ``ABI_VERSION``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from lmserve.model.layers.cpu_kernels.build import KernelBuildError, load_library

ABI_VERSION = 3  # LMS_ABI_VERSION

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class AbiStruct(ctypes.Structure):
    """Base of the boundary's structs: ``_c_name_`` is the C typedef, and the struct's id in the
    layout table is its index in ``STRUCTS``. Build instances with keyword arguments (the C names);
    a field left out is 0 / NULL."""

    _c_name_ = ""


class RmsNormArgs(AbiStruct):
    _c_name_ = "LmsRmsNormArgs"
    _fields_ = [("x", _p), ("x_stride", _i64), ("res", _p), ("res_stride", _i64), ("weight", _p), ("out", _p),
                ("res_out", _p), ("rows", _i64), ("hidden", _i64), ("eps", _f32), ("dtype", _i32),
                ("num_threads", _i32)]


class RopeArgs(AbiStruct):
    _c_name_ = "LmsRopeArgs"
    _fields_ = [("q", _p), ("q_stride", _i64), ("k", _p), ("k_stride", _i64), ("cos_sin", _p), ("cs_stride", _i64),
                ("q_out", _p), ("k_out", _p), ("rows", _i64), ("num_q_heads", _i64), ("num_kv_heads", _i64),
                ("head_dim", _i64), ("dtype", _i32), ("num_threads", _i32)]


class SiluMulArgs(AbiStruct):
    _c_name_ = "LmsSiluMulArgs"
    _fields_ = [("x", _p), ("x_stride", _i64), ("out", _p), ("rows", _i64), ("inter", _i64), ("dtype", _i32),
                ("num_threads", _i32)]


class QgemvArgs(AbiStruct):
    _c_name_ = "LmsQgemvArgs"
    _fields_ = [("x", _p), ("x_stride", _i64), ("qw", _p), ("d", _p), ("m", _p), ("bias", _p), ("out", _p),
                ("out_stride", _i64), ("rows", _i64), ("n", _i64), ("k", _i64), ("dtype", _i32), ("nibbles", _i32),
                ("num_threads", _i32)]


class PagedDecodeArgs(AbiStruct):
    _c_name_ = "LmsPagedDecodeArgs"
    _fields_ = [("q", _p), ("q_row_stride", _i64), ("kv_cache", _p), ("num_blocks", _i64), ("block_tables", _p),
                ("bt_row_stride", _i64), ("bt_width", _i64), ("seq_lens", _p), ("out", _p),
                ("out_row_stride", _i64), ("scale", _f32), ("dtype", _i32), ("kv_dtype", _i32),
                ("block_size", _i32), ("num_seqs", _i32), ("num_heads", _i32), ("num_kv_heads", _i32),
                ("head_dim", _i32), ("sliding_window", _i32), ("num_threads", _i32)]


class PagedChunksArgs(AbiStruct):
    _c_name_ = "LmsPagedChunksArgs"
    _fields_ = [("q", _p), ("q_row_stride", _i64), ("kv_cache", _p), ("num_blocks", _i64), ("block_tables", _p),
                ("bt_row_stride", _i64), ("bt_width", _i64), ("query_start_loc", _p), ("seq_lens", _p),
                ("out", _p), ("out_row_stride", _i64), ("scale", _f32), ("block_size", _i32), ("num_seqs", _i32),
                ("num_heads", _i32), ("num_kv_heads", _i32), ("head_dim", _i32), ("num_threads", _i32)]


class WriteKvArgs(AbiStruct):
    _c_name_ = "LmsWriteKvArgs"
    _fields_ = [("k", _p), ("k_row_stride", _i64), ("v", _p), ("v_row_stride", _i64), ("kv_cache", _p),
                ("num_slots", _i64), ("slots", _p), ("num_tokens", _i64), ("row_elems", _i64), ("dtype", _i32)]


class GemmArgs(AbiStruct):
    _c_name_ = "LmsGemmArgs"
    _fields_ = [("x", _p), ("lda", _i64), ("packed", _p), ("bias", _p), ("out", _p), ("ldo", _i64), ("m", _i64),
                ("n", _i64), ("k", _i64), ("num_threads", _i32)]


class PackArgs(AbiStruct):
    _c_name_ = "LmsPackArgs"
    _fields_ = [("weight", _p), ("packed", _p), ("n", _i64), ("k", _i64), ("num_threads", _i32)]


class QLinear(AbiStruct):
    """A linear layer of the decode step: quantized (qw, d, m) or bf16 panels (qw NULL)."""

    _c_name_ = "LmsQLinear"
    _fields_ = [("qw", _p), ("d", _p), ("m", _p), ("bias", _p), ("n", _i64), ("k", _i64), ("nibbles", _i32),
                ("panels", _p), ("amx", _i32)]


class Layer(AbiStruct):
    _c_name_ = "LmsLayer"
    _fields_ = [("input_norm", _p), ("post_norm", _p), ("q_norm", _p), ("k_norm", _p), ("qkv", QLinear),
                ("o", QLinear), ("gate_up", QLinear), ("down", QLinear), ("kv_cache", _p), ("num_blocks", _i64),
                ("sliding_window", _i32)]


DECODE_BUFFERS = ("h", "res", "normed", "qkv", "q", "k", "attn", "gu", "act", "out")


class DecodeModel(AbiStruct):
    _c_name_ = "LmsDecodeModel"
    _fields_ = [(name, _i32) for name in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim",
                                          "intermediate", "dtype", "block_size", "max_rows")] + \
               [("eps", _f32), ("scale", _f32), ("layers", ctypes.POINTER(Layer)), ("final_norm", _p)] + \
               [(name, _p) for name in DECODE_BUFFERS] + [("all_reduce", _p), ("all_reduce_ctx", _p)]

# lms_abi.h's LmsAllReduceFn: (buffer, number of elements, context) -> None
ALL_REDUCE_FN = ctypes.CFUNCTYPE(None, _p, _i64, _p)


class DecodeStepArgs(AbiStruct):
    _c_name_ = "LmsDecodeStepArgs"
    _fields_ = [("model", ctypes.POINTER(DecodeModel)), ("cos_sin", _p), ("block_tables", _p), ("bt_width", _i64),
                ("seq_lens", _p), ("slots", _p), ("rows", _i32), ("num_threads", _i32)]


class LoraArgs(AbiStruct):
    _c_name_ = "LmsLoraArgs"
    _fields_ = [("x", _p), ("ldx", _i64), ("y", _p), ("ldy", _i64), ("k", _i64), ("n", _i64), ("num_rows", _i64),
                ("rows", _p), ("num_entries", _i64), ("slot_start", _p), ("shrink", _p), ("blocks", _p),
                ("a_cat", _p), ("c_total", _i64), ("num_slots", _i32), ("num_blocks", _i32), ("amx", _i32),
                ("num_threads", _i32)]


# in the order of lms_abi.h's LMS_ABI_STRUCTS (a struct's index is its id there)
STRUCTS: tuple[type[AbiStruct], ...] = (RmsNormArgs, RopeArgs, SiluMulArgs, QgemvArgs, PagedDecodeArgs,
                                        PagedChunksArgs, WriteKvArgs, GemmArgs, PackArgs, QLinear, Layer,
                                        DecodeModel, DecodeStepArgs, LoraArgs)

# Every entry point: name -> (restype, argtypes). An int32 result is LMS_OK (0) or a negative LMS_ERR_*.
_I = ctypes.c_int32
SIGNATURES: Mapping[str, tuple[type | None, tuple[type, ...]]] = MappingProxyType({
    "lms_rms_norm": (_I, (ctypes.POINTER(RmsNormArgs),)),
    "lms_rope_neox": (_I, (ctypes.POINTER(RopeArgs),)),
    "lms_silu_mul": (_I, (ctypes.POINTER(SiluMulArgs),)),
    "lms_silu_available": (_I, ()),
    "lms_qgemv": (_I, (ctypes.POINTER(QgemvArgs),)),
    "lms_qgemv_available": (_I, ()),
    "lms_paged_decode": (_I, (ctypes.POINTER(PagedDecodeArgs),)),
    "lms_paged_attention": (_I, (ctypes.POINTER(PagedChunksArgs),)),
    "lms_write_kv": (_I, (ctypes.POINTER(WriteKvArgs),)),
    "lms_kernel_info": (_I, ()),
    "lms_attention_amx_info": (_I, ()),
    "lms_supports_dtype": (_I, (_I,)),
    "lms_sgemm_info": (_I, ()),
    "lms_sgemm_pack": (None, (ctypes.POINTER(PackArgs),)),
    "lms_sgemm": (_I, (ctypes.POINTER(GemmArgs),)),
    "lms_sbgemm_info": (_I, ()),
    "lms_sbgemm_pack": (None, (ctypes.POINTER(PackArgs),)),
    "lms_sbgemm": (_I, (ctypes.POINTER(GemmArgs),)),
    "lms_sbgemm_amx_info": (_I, ()),
    "lms_sbgemm_amx_pack": (None, (ctypes.POINTER(PackArgs),)),
    "lms_sbgemm_amx": (_I, (ctypes.POINTER(GemmArgs),)),
    "lms_sbgemm_amx_x3": (_I, (ctypes.POINTER(GemmArgs),)),
    "lms_lora_sbgemm": (_I, (ctypes.POINTER(LoraArgs),)),
    "lms_decode_step_available": (_I, ()),
    "lms_decode_step": (_I, (ctypes.POINTER(DecodeStepArgs),)),
})


class _AbiField(ctypes.Structure):
    """lms_abi.h's LmsAbiField (the layout table's row; its own layout is fixed by ABI_VERSION)."""

    _fields_ = [("name", ctypes.c_char_p), ("type", ctypes.c_char_p), ("offset", _i64), ("size", _i64)]


_KINDS = {_i32: "int32_t", _i64: "int64_t", _f32: "float"}


def _kind(ctype: type) -> str:
    """The kind of C type a ctypes field type stands for: "ptr", "int32_t", "int64_t", "float" or a
    struct's C name (compared with the C type as written in lms_abi.h)."""
    if ctype is _p or issubclass(ctype, ctypes._Pointer):  # type: ignore[attr-defined]
        return "ptr"
    if issubclass(ctype, AbiStruct):
        return ctype._c_name_
    return _KINDS.get(ctype, ctype.__name__)


def _c_kind(c_type: str) -> str:
    return "ptr" if "*" in c_type else c_type.strip()


def check_abi(lib: ctypes.CDLL, structs: tuple[type[AbiStruct], ...] = STRUCTS, version: int | None = None) -> None:
    """Raises KernelBuildError unless ``lib`` was built with ABI ``version`` (default ``ABI_VERSION``)
    and its layout table matches ``structs`` (by id: a struct's index), field by field (see the
    module docstring)."""
    version = ABI_VERSION if version is None else version
    try:
        lib_version = int(lib.lms_abi_version())
        num_structs, struct_name = lib.lms_abi_num_structs, lib.lms_abi_struct_name
        size_of, field_of = lib.lms_struct_size, lib.lms_abi_field
    except AttributeError as e:
        raise KernelBuildError(f"the kernel library has no ABI table ({e}): built from other sources") from e
    if lib_version != version:
        raise KernelBuildError(f"kernel library ABI version {lib_version}, this lmserve expects {version}")
    struct_name.argtypes, struct_name.restype = [_i32], ctypes.c_char_p
    size_of.argtypes, size_of.restype = [_i32], _i64
    field_of.argtypes, field_of.restype = [_i32, _i32], ctypes.POINTER(_AbiField)
    if int(num_structs()) != len(structs):
        raise KernelBuildError(f"kernel library declares {num_structs()} ABI structs, this lmserve {len(structs)}")
    for sid, cls in enumerate(structs):
        c_name = (struct_name(sid) or b"").decode()
        where = f"ABI struct {sid} ({cls.__name__} / C {c_name})"
        if c_name != cls._c_name_:
            raise KernelBuildError(f"{where}: the library names it {c_name!r}, expected {cls._c_name_!r}")
        c_fields = []
        while True:
            f = field_of(sid, len(c_fields))
            if not f:
                break
            c_fields.append((f.contents.name.decode(), _c_kind(f.contents.type.decode()), f.contents.offset,
                             f.contents.size))
        py_fields = [(name, _kind(t), getattr(cls, name).offset, getattr(cls, name).size)
                     for name, t in cls._fields_]  # type: ignore[misc]
        if c_fields != py_fields:
            diff = next(((c, p) for c, p in zip(c_fields, py_fields) if c != p), None)
            detail = f"C {diff[0]} vs Python {diff[1]}" if diff else \
                f"C has {len(c_fields)} fields, Python {len(py_fields)}"
            raise KernelBuildError(f"{where}: field layout differs ((name, kind, offset, size): {detail})")
        if int(size_of(sid)) != ctypes.sizeof(cls):
            raise KernelBuildError(f"{where}: sizeof {size_of(sid)} in C, {ctypes.sizeof(cls)} in Python")


def bind(lib: ctypes.CDLL, name: str) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    """The entry point ``name`` of ``lib`` with its signature set (AttributeError if the library
    lacks it)."""
    fn = getattr(lib, name)
    restype, argtypes = SIGNATURES[name]
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


def load_kernels(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (or find), load and check the library of ``source`` (build.py); raises
    KernelBuildError on any failure, a mismatched ABI included."""
    lib = load_library(source, extra_flags)
    check_abi(lib)
    return lib
