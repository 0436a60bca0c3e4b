"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

A kernel is a plain C file next to this module. It is built once per (source, compiler flags,
CPU model) into `~/.cache/ponder/kernels/` — a fraction of a second, since it includes no torch
headers — and called with raw tensor pointers; ctypes releases the GIL for the call. It links
against `libgomp.so.1`, which torch has already loaded, so kernel and torch share one OpenMP
thread pool instead of fighting over the cores.

Without a compiler (or with `PONDER_NATIVE_KERNELS=0`) `load()` returns None and callers keep
their pure-PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp before any kernel library)

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11"]
# Kernels whose results are tested to be exact (bit for bit: against a plain-C reference, across
# batch compositions, against torch's draw) are built without -ffast-math, which would let the
# compiler reassociate their sums. One mechanism for all of them, no per-file pragmas.
_EXACT_KERNELS = {"quant_matmul", "paged_attention", "sampling", "token_mask"}
# Linked without -ffast-math: that would pull in crtfastmath.o, which flushes denormals for the
# whole process (torch included) when the library loads.
_LINK_FLAGS = ["-shared", "-fopenmp", "-lm"]


def enabled() -> bool:
    return os.environ.get("PONDER_NATIVE_KERNELS", "1") not in ("0", "false", "no")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("PONDER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ponder")
    return Path(root) / "kernels"


def _flags(name: str, extra: tuple[str, ...]) -> list[str]:
    flags = [f for f in _COMPILE_FLAGS if not (name in _EXACT_KERNELS and f == "-ffast-math")]
    return flags + list(extra)


@cache
def load(name: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernel library `name` (from `name.c`), or None if it cannot be built.
    `extra_flags` build a variant (tests use `-mno-avx512f` to build the AVX2 path)."""
    if not enabled():
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None or platform.system() != "Linux":
        logger.warning("no C compiler found; native kernels disabled (slower pure-PyTorch attention)")
        return None
    source = _HERE / f"{name}.c"
    flags = _flags(name, extra_flags)
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(flags + _LINK_FLAGS).encode(),
                                     compiler.encode(), _cpu_model().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        try:
            _build(compiler, source, target, flags)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            logger.warning("building native kernel %s failed; using pure PyTorch: %s", name, detail)
            return None
    return ctypes.CDLL(str(target))


def _build(compiler: str, source: Path, target: Path, flags: list[str]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "kernel.o", Path(tmp) / target.name
        subprocess.run([compiler, *flags, "-c", str(source), "-o", str(obj)],
                       check=True, capture_output=True, text=True)
        subprocess.run([compiler, str(obj), *_LINK_FLAGS, "-o", str(lib)], check=True, capture_output=True, text=True)
        os.replace(lib, target)   # atomic: concurrent builders never see a partial file


def bind(library: str, symbol: str, argtypes: list, restype=None):
    """A typed ctypes function from a kernel library, or None if the library cannot be built."""
    lib = load(library)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = argtypes, restype
    return fn


PTR, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
