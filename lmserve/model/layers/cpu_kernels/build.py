"""Compile a C source of this package into a shared library at first use, cache it, load it.

The library lands in ``$LMSERVE_KERNEL_CACHE`` (default ``$LMSERVE_CACHE_DIR/kernels``, else
``~/.cache/lmserve/kernels``) under a name that hashes the source, the flags, the compiler's
version and the CPU's flags, so that an edited source (or header beside it), another compiler or
another machine sharing the home directory gets its own build. It is written to a temporary name
and renamed into place, so concurrent processes never load a half-written file (both may compile; the last rename wins).

``$LMSERVE_KERNEL_CC`` names the compiler (default: ``gcc`` on ``PATH``). Compiling takes about a
second (plain C with intrinsics; no torch headers).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

BASE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
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


def build_library(source: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Path of the compiled ``source`` (compiling it unless a cached build exists)."""
    cc = find_compiler()
    flags = BASE_FLAGS + tuple(extra_flags)
    # the source and every header and source beside it (a source may include them by relative name)
    siblings = sorted(p for p in source.parent.iterdir() if p.suffix in (".h", ".c") and p != source)
    text = source.read_bytes() + b"".join(p.read_bytes() for p in siblings)
    key = hashlib.sha256(b"\0".join([text, " ".join(flags).encode(), _compiler_version(cc).encode(),
                                     _cpu_flags().encode()])).hexdigest()[:24]
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
        res = subprocess.run([cc, *flags, "-o", tmp, str(source)], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise KernelBuildError(f"{Path(cc).name} failed on {source.name}: {res.stderr.strip()[-2000:]}")
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
