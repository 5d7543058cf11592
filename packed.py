"""Inference from the packed sign bits (packed.c, compiled once into a cache folder): the weights
stay one bit each in memory, and the dense products and the convolutions' im2col products are
additions of +-x (docs/inference.md has the measurements behind the choices).

numpy and ctypes only, no torch. When no C compiler is found, or the build fails, `kernel()`
returns None after one warning, and infer.py falls back to its numpy float32 path (the reference).

Environment:
  BC_INFER_KERNEL=numpy   skip the kernel (infer.py then runs the numpy path)
  BC_CACHE_DIR            where the compiled library goes (default: $XDG_CACHE_HOME/binaryconnect,
                          else ~/.cache/binaryconnect)
  BC_INFER_THREADS        threads per product (default: the CPUs this process may use)
  CC                      the compiler (default: cc, else gcc)
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).resolve().with_name("packed.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lib = None  # the loaded library, False once it failed


class KernelWarning(UserWarning):
    """The packed kernel could not be built or loaded; the numpy float32 path runs instead."""


def cache_dir():
    if os.environ.get("BC_CACHE_DIR"):
        return Path(os.environ["BC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "binaryconnect"


def _cpu_flags():
    # -march=native code must not run on another CPU sharing the cache folder (an NFS home).
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _compiler():
    cc = os.environ.get("CC")
    return shutil.which(cc) if cc else (shutil.which("cc") or shutil.which("gcc"))


def build():
    """The path of the compiled library, compiling it if this source, compiler and CPU have no
    build in the cache yet. Raises OSError (no compiler, failed build) with the reason."""
    cc = _compiler()
    if cc is None:
        raise OSError(f"no C compiler ({os.environ.get('CC') or 'cc or gcc'}) on the PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS),
                                    platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"packed-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compiled under a temporary name and renamed: several processes may build at once.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise OSError(f"{cc} failed on {SOURCE.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def kernel():
    """The ctypes library, or None (with one KernelWarning) when it cannot be had."""
    global _lib
    if _lib is None:
        if os.environ.get("BC_INFER_KERNEL", "").lower() == "numpy":
            _lib = False
            return None
        try:
            lib = ctypes.CDLL(str(build()))
        except OSError as e:
            warnings.warn(f"the packed 1-bit kernel is unavailable ({e}); infer.py runs the "
                          "numpy float32 path instead, the same results, slower",
                          KernelWarning, stacklevel=2)
            _lib = False
            return None
        L, P = ctypes.c_long, ctypes.c_void_p
        lib.bc_dense.argtypes = [P, L, L, P, L, L, L, ctypes.c_float, P, L, ctypes.c_int]
        lib.bc_dense.restype = None
        lib.bc_sum.argtypes = [P, L, L, ctypes.c_int]
        lib.bc_sum.restype = ctypes.c_double
        lib.bc_avx2.restype = ctypes.c_int
        _lib = lib
    return _lib or None


def threads():
    if os.environ.get("BC_INFER_THREADS"):
        return max(1, int(os.environ["BC_INFER_THREADS"]))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pack(flat_bits, shape):
    """export.py's bits (np.packbits of the C-order weights, 1 = +H) -> (rows, n_groups): one row
    of bytes per output (per output channel for a conv), set bit = -H, padded to whole bytes and
    to 4-byte rows, plus 4 readable bytes at the end (packed.c's layout)."""
    out, n_in = shape[0], int(np.prod(shape[1:]))
    n_groups = -(-n_in // 8)
    row_bytes = -(-n_groups // 4) * 4
    if n_in % 8 == 0:  # the rows are whole bytes already: no unpacking at all
        rows = np.bitwise_not(flat_bits[:out * n_in // 8]).reshape(out, n_in // 8)
    else:  # a row ends mid-byte (the first conv's 27 inputs): realign, a few bytes, once
        bits = np.unpackbits(flat_bits, count=out * n_in).reshape(out, n_in)
        rows = np.packbits(1 - bits, axis=1)
    buf = np.zeros(out * row_bytes + 4, np.uint8)
    buf[:out * row_bytes].reshape(out, row_bytes)[:, :rows.shape[1]] = rows
    return buf, n_groups, row_bytes


def unpack(op):
    """The +-1 float32 matrix (out, n_in) of op's packed bits: the numpy reference path's."""
    out, n_in = op["shape"][0], int(np.prod(op["shape"][1:]))
    rows = op["bits"][:out * op["row_bytes"]].reshape(out, op["row_bytes"])
    return 1 - 2 * np.unpackbits(rows, axis=1, count=n_in).astype(np.float32)


def dense(lib, x, op):
    """x (N, n_in) float32 -> H * x @ signs.T, (N, out) float32, from op's packed bits."""
    n_groups, row_bytes = op["n_groups"], op["row_bytes"]
    x = np.ascontiguousarray(x, np.float32)
    if x.shape[1] != 8 * n_groups:  # zero inputs against the padding bits
        x = np.pad(x, ((0, 0), (0, 8 * n_groups - x.shape[1])))
    out = op["shape"][0]
    y = np.empty((len(x), out), np.float32)
    lib.bc_dense(x.ctypes.data, len(x), x.shape[1], op["bits"].ctypes.data, out, row_bytes,
                 n_groups, op["H"], y.ctypes.data, out, threads())
    return y


def conv(lib, x, op):
    """Zero-padded stride-1 correlation of x (N, C, H, W) by im2col and dense(), times H."""
    C_out, C_in, kh, kw = op["shape"]
    ph, pw = op["padding"]
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    N, _, Ho, Wo = win.shape[:4]
    k = C_in * kh * kw
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(N * Ho * Wo, k)  # a copy, as in infer.py
    if k % 8:  # the first conv's 27 columns: zero-padded to whole groups here, not in dense()
        cols = np.pad(cols, ((0, 0), (0, 8 * op["n_groups"] - k)))
    y = dense(lib, cols, op)
    return np.ascontiguousarray(y.reshape(N, Ho, Wo, C_out).transpose(0, 3, 1, 2))
