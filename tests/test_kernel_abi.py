"""The CPU kernels' C boundary (``cpu_kernels/lms_abi.h`` and ``abi.py``): every library passes the
ABI check at load, a struct or version that differs from the library is refused (and the kernels are
then reported unavailable), and the C sources include no ``.c`` file and no header cycle."""

from __future__ import annotations

import ctypes
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lmserve.model.layers.cpu_kernels import abi, build, cpu_ops, paged_attention

KERNELS = Path(abi.__file__).parent
needs_cc = pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler")


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    return build.load_library(KERNELS / "cpu_ops.c")


@needs_cc
@pytest.mark.parametrize("source", sorted(build.LIBRARY_UNITS))
def test_every_library_passes_the_check(source):
    lib = abi.load_kernels(KERNELS / source)  # raises KernelBuildError on a mismatch
    bound = [name for name in abi.SIGNATURES if hasattr(lib, name)]
    assert bound and all(abi.bind(lib, name).argtypes is not None for name in bound)


def test_struct_ids_follow_the_c_table(lib):
    assert lib.lms_abi_num_structs() == len(abi.STRUCTS)
    names = lib.lms_abi_struct_name
    names.argtypes, names.restype = [ctypes.c_int32], ctypes.c_char_p
    assert [names(i).decode() for i in range(len(abi.STRUCTS))] == [s._c_name_ for s in abi.STRUCTS]
    assert names(len(abi.STRUCTS)) is None
    size = lib.lms_struct_size
    size.argtypes, size.restype = [ctypes.c_int32], ctypes.c_int64
    assert [size(i) for i in range(len(abi.STRUCTS))] == [ctypes.sizeof(s) for s in abi.STRUCTS]
    assert size(-1) == -1 and size(len(abi.STRUCTS)) == -1


def _variant(cls: type[abi.AbiStruct], fields: list, c_name: str | None = None) -> type[abi.AbiStruct]:
    """A struct like ``cls`` (same C name unless given) with other ``fields``."""
    return type(cls.__name__, (abi.AbiStruct,), {"_c_name_": c_name or cls._c_name_, "_fields_": fields})


def _with(cls: type[abi.AbiStruct], variant: type[abi.AbiStruct]) -> tuple[type[abi.AbiStruct], ...]:
    return tuple(variant if s is cls else s for s in abi.STRUCTS)


def _wrong_structs() -> dict[str, tuple[type[abi.AbiStruct], ...]]:
    rms = list(abi.RmsNormArgs._fields_)
    swapped = rms[:]
    swapped[0], swapped[2] = swapped[2], swapped[0]  # x <-> res: same kinds and sizes, other names
    eps_as_int = [(n, ctypes.c_int32 if n == "eps" else t) for n, t in rms]  # same size, other kind
    stride32 = [(n, ctypes.c_int32 if n == "x_stride" else t) for n, t in rms]
    renamed = [("rows_" if n == "rows" else n, t) for n, t in rms]
    qlinear = [(n, t) for n, t in abi.QLinear._fields_ if n != "amx"]
    qlin_variant = _variant(abi.QLinear, qlinear)
    layer_of_variant = _variant(abi.Layer, [(n, qlin_variant if t is abi.QLinear else t)
                                            for n, t in abi.Layer._fields_])
    return {
        "a field dropped": _with(abi.RmsNormArgs, _variant(abi.RmsNormArgs, rms[:-1])),
        "a field added": _with(abi.RmsNormArgs, _variant(abi.RmsNormArgs, rms + [("extra", ctypes.c_int32)])),
        "two fields swapped": _with(abi.RmsNormArgs, _variant(abi.RmsNormArgs, swapped)),
        "a float declared int32": _with(abi.RmsNormArgs, _variant(abi.RmsNormArgs, eps_as_int)),
        "an int64 declared int32": _with(abi.RmsNormArgs, _variant(abi.RmsNormArgs, stride32)),
        "a field renamed": _with(abi.RmsNormArgs, _variant(abi.RmsNormArgs, renamed)),
        "the last field dropped": _with(abi.QLinear, qlin_variant),
        "a nested struct changed": _with(abi.Layer, layer_of_variant),
        "another C struct at this id": _with(abi.RopeArgs, _variant(abi.RopeArgs, abi.RopeArgs._fields_, "LmsOther")),
        "a struct missing": abi.STRUCTS[:-1],
        "two structs swapped": (abi.STRUCTS[1], abi.STRUCTS[0], *abi.STRUCTS[2:]),
    }


@pytest.mark.parametrize("case", list(_wrong_structs()))
def test_a_wrong_struct_is_refused(lib, case):
    with pytest.raises(build.KernelBuildError, match="ABI|struct"):
        abi.check_abi(lib, _wrong_structs()[case])


def test_the_real_structs_pass_and_a_wrong_version_is_refused(lib):
    abi.check_abi(lib)
    with pytest.raises(build.KernelBuildError, match="ABI version"):
        abi.check_abi(lib, version=abi.ABI_VERSION + 1)


def test_a_library_without_the_table_is_refused():
    libc = ctypes.CDLL(None)
    with pytest.raises(build.KernelBuildError, match="no ABI table"):
        abi.check_abi(libc)


@needs_cc
def test_a_mismatched_library_is_reported_unavailable(monkeypatch, caplog):
    """A library whose ABI differs from the bindings' is never called: the loaders log why and
    return None, as after a failed build (the callers then run the torch reference)."""
    monkeypatch.setattr(abi, "ABI_VERSION", abi.ABI_VERSION + 1)
    cpu_ops._load.cache_clear()
    paged_attention._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert cpu_ops.get_cpu_ops() is None
            assert paged_attention.get_paged_attention_kernel() is None
        assert sum("ABI version" in r.message for r in caplog.records) == 2
    finally:
        cpu_ops._load.cache_clear()
        paged_attention._load.cache_clear()
    monkeypatch.undo()
    assert cpu_ops.get_cpu_ops() is not None


# ---- the C sources --------------------------------------------------------------------------------

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def _includes() -> dict[str, list[str]]:
    return {p.name: INCLUDE.findall(p.read_text()) for p in sorted(KERNELS.iterdir()) if p.suffix in (".c", ".h")}


def test_no_source_includes_a_c_file():
    offenders = {f: [i for i in inc if not i.endswith(".h")] for f, inc in _includes().items()}
    assert not {f: i for f, i in offenders.items() if i}


def test_header_includes_have_no_cycle():
    graph = {f: [i for i in inc if i.endswith(".h")] for f, inc in _includes().items() if f.endswith(".h")}
    assert all(i in graph for deps in graph.values() for i in deps), "a header includes a missing file"
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, f"include cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for header in graph:
        if header not in state:
            visit(header, [header])


def test_every_source_is_a_unit_of_some_library():
    units = {u for names in build.LIBRARY_UNITS.values() for u in names} | {"lms_abi.c"}
    assert {p.name for p in KERNELS.glob("*.c")} == units == set(build.UNIT_FLAGS)


@needs_cc
@pytest.mark.parametrize("header", sorted(p.name for p in KERNELS.glob("*.h")))
def test_every_header_stands_alone(header):
    """Each header compiles on its own: it uses no type or macro that only its includer defines."""
    res = subprocess.run(["gcc", *build.BASE_FLAGS, "-fsyntax-only", "-Wall", "-Werror", "-x", "c",
                          str(KERNELS / header)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
