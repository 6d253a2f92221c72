"""Compile a kernel library of this package at first use, cache it, load it.

A library is named by its main C source (``cpu_ops.c``, ``paged_attention.c``, ``sgemm.c``,
``sbgemm.c``, ``decode_step.c``) and made of that source, the sources whose internal functions it
calls (``LIBRARY_UNITS``) and ``lms_abi.c`` (the ABI version and layout table every library
exports, see ``lms_abi.h``). No source includes another: each is compiled to its own object with its
own flags (``UNIT_FLAGS``: ``cpu_ops.c`` and ``decode_step.c`` take ``-ffp-contract=off``) plus the
caller's extra flags, with ``-fvisibility=hidden`` (only ``lms_abi.h``'s entry points are exported),
and the objects are linked into one shared library. So the decode step links the very objects of
the eager kernels, compiled with the same flags.

The library lands in ``$LMSERVE_KERNEL_CACHE`` (default ``$LMSERVE_CACHE_DIR/kernels``, else
``~/.cache/lmserve/kernels``) under a name that hashes every source and header of this directory,
the library's units and their flags, the extra flags, the compiler's version and the CPU's flags,
so that an edited source or header, other flags, another compiler or another machine sharing the
home directory gets its own build. Objects are compiled in a temporary directory (in parallel), the
library linked to a temporary name and renamed into place, so concurrent processes never load a
half-written file (both may compile; the last rename wins) and nothing is left behind.

``$LMSERVE_KERNEL_CC`` names the compiler (default: ``gcc`` on ``PATH``). Compiling takes a few
seconds (plain C with intrinsics; no torch headers).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

BASE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=gnu11", "-fvisibility=hidden")  # every object
LINK_FLAGS = ("-shared", "-fopenmp")
# Each translation unit's own flags, on top of BASE_FLAGS: cpu_ops.c must not fuse a product and an
# add into an FMA the torch reference does not do (cpu_ops.c); decode_step.c keeps the same rule.
UNIT_FLAGS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "lms_abi.c": (), "cpu_ops.c": ("-ffp-contract=off",), "paged_attention.c": (), "paged_attention_amx.c": (),
    "sgemm.c": (), "sbgemm.c": (), "sbgemm_amx.c": (), "lora_sbgemm.c": (), "decode_step.c": ("-ffp-contract=off",)})
# A library's units besides lms_abi.c, by its main source: the main source first, then those it calls into.
LIBRARY_UNITS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "cpu_ops.c": ("cpu_ops.c",),
    "paged_attention.c": ("paged_attention.c", "paged_attention_amx.c"),
    "sgemm.c": ("sgemm.c",),
    "sbgemm.c": ("sbgemm.c", "sbgemm_amx.c", "lora_sbgemm.c"),
    "decode_step.c": ("decode_step.c", "cpu_ops.c", "paged_attention.c", "paged_attention_amx.c", "sbgemm.c",
                      "sbgemm_amx.c"),
})
# Set to anything but "" or "0", it switches every native CPU kernel off (the pure-torch reference paths).
DISABLE_ENV = "LMSERVE_DISABLE_CPU_KERNELS"


def kernels_disabled() -> bool:
    """Whether ``LMSERVE_DISABLE_CPU_KERNELS`` switches the native CPU kernels off (read at each call)."""
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


class KernelBuildError(RuntimeError):
    """No compiler, the compile failed, or the library did not load; the message says which."""


def kernel_cache_dir() -> Path:
    env = os.environ.get("LMSERVE_KERNEL_CACHE")
    if env:
        return Path(env)
    root = os.environ.get("LMSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lmserve")
    return Path(root) / "kernels"


def find_compiler() -> str:
    """The compiler's path; raises KernelBuildError when there is none."""
    cc = os.environ.get("LMSERVE_KERNEL_CC") or "gcc"
    path = shutil.which(cc)
    if path is None:
        raise KernelBuildError(f"no C compiler: {cc!r} is not on PATH (set LMSERVE_KERNEL_CC to use another)")
    return path


def _cpu_flags() -> str:
    """The CPU's feature flags (part of the cache key: the build uses -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        res = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"compiler {cc} does not run: {e}") from e
    if res.returncode != 0:
        raise KernelBuildError(f"compiler {cc} --version failed: {res.stderr.strip()[:200]}")
    return res.stdout.splitlines()[0] if res.stdout else ""


def library_units(source: Path) -> tuple[Path, ...]:
    """The translation units of ``source``'s library (see the module docstring)."""
    names = LIBRARY_UNITS.get(source.name, (source.name,))
    return tuple(source.parent / n for n in ("lms_abi.c", *names))


def _compile_commands(cc: str, units: tuple[Path, ...], extra_flags: tuple[str, ...],
                      obj_dir: str) -> list[tuple[Path, list[str]]]:
    return [(u, [cc, *BASE_FLAGS, *UNIT_FLAGS.get(u.name, ()), *extra_flags, "-c", str(u), "-o",
                 os.path.join(obj_dir, f"{i}-{u.stem}.o")]) for i, u in enumerate(units)]


def _run_all(commands: list[tuple[Path, list[str]]]) -> None:
    """Runs the compile commands in parallel; raises KernelBuildError naming the first that failed."""
    procs = []
    try:
        for unit, cmd in commands:
            procs.append((unit, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        for unit, proc in procs:
            _, err = proc.communicate(timeout=300)
            if proc.returncode != 0:
                raise KernelBuildError(f"{Path(commands[0][1][0]).name} failed on {unit.name}: {err.strip()[-2000:]}")
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def build_library(source: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Path of the library of ``source`` (compiling it unless a cached build exists)."""
    cc = find_compiler()
    extra_flags = tuple(extra_flags)
    units = library_units(source)
    # every header and source of the directory (a unit may include any header by relative name)
    files = sorted(p for p in source.parent.iterdir() if p.suffix in (".h", ".c"))
    text = b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in files)
    recipe = "\n".join(f"{u.name}: {' '.join(UNIT_FLAGS.get(u.name, ()))}" for u in units)
    key = hashlib.sha256(b"\0".join([text, recipe.encode(), " ".join(BASE_FLAGS + LINK_FLAGS + extra_flags).encode(),
                                     _compiler_version(cc).encode(), _cpu_flags().encode()])).hexdigest()[:24]
    out_dir = kernel_cache_dir()
    target = out_dir / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so.tmp", dir=out_dir)
        os.close(fd)
    except OSError as e:
        raise KernelBuildError(f"kernel cache {out_dir} is not writable: {e}") from e
    try:
        with tempfile.TemporaryDirectory(prefix="lmserve-kernel-") as obj_dir:
            commands = _compile_commands(cc, units, extra_flags, obj_dir)
            _run_all(commands)
            objects = [cmd[-1] for _, cmd in commands]
            res = subprocess.run([cc, *LINK_FLAGS, *extra_flags, "-o", tmp, *objects], capture_output=True,
                                 text=True, timeout=300)
            if res.returncode != 0:
                raise KernelBuildError(f"{Path(cc).name} failed linking {source.name}: {res.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"compiling {source.name} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (or find) and load ``source``; raises KernelBuildError on any failure."""
    path = build_library(source, extra_flags)
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelBuildError(f"loading {path} failed: {e}") from e
