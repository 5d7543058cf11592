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
  BC_XNOR_PATH            portable, avx2 or avx512: the XNOR-popcount path of BinaryNet layers
                          (default: the fastest this CPU runs; one it cannot run is an error)
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
        lib.bc_xnor.argtypes = [P, L, L, P, L, L, L, P, L, P, P, P, L, P, ctypes.c_int,
                                ctypes.c_int]
        lib.bc_xnor.restype = None
        lib.bc_xnor_paths.restype = ctypes.c_int
        lib.bc_popsum.argtypes = [P, L, L, ctypes.c_int, ctypes.c_int]
        lib.bc_popsum.restype = L
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


# ---- BinaryNet: hidden layers in bits (packed.c's bc_xnor; docs/inference.md, "XNOR path") ----
# Activations travel as rows of uint64 words of sign bits, a set bit meaning -1, input 64k + j at
# bit j of word k (so that a comparison's mask is a word as it stands), zero bits past the last
# input: a convolution's as (N, H, W, words per position), a dense layer's as (N, words); the
# weights are packed by the same function.

XNOR_PATHS = ("portable", "avx2", "avx512")


def xnor_paths(lib):
    """The names of the XNOR paths this CPU runs."""
    have = lib.bc_xnor_paths()
    return [name for i, name in enumerate(XNOR_PATHS) if have >> i & 1]


def xnor_path(lib):
    """BC_XNOR_PATH's path (refused, naming the others, if this CPU lacks it), else the fastest."""
    have = xnor_paths(lib)
    want = os.environ.get("BC_XNOR_PATH", "").lower()
    if want and want not in have:
        raise ValueError(f"BC_XNOR_PATH={want}: this CPU runs {', '.join(have)}"
                         + ("" if want in XNOR_PATHS else f" (of {', '.join(XNOR_PATHS)})"))
    return XNOR_PATHS.index(want or have[-1])


def pack_bits(neg):
    """bool (..., n), True for -1 -> uint64 (..., ceil(n / 64)), bit j of word k for 64k + j."""
    b = np.packbits(neg, axis=-1, bitorder="little")
    pad = -b.shape[-1] % 8
    if pad:
        b = np.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, pad)])
    return np.ascontiguousarray(b).view(np.uint64)


def negative(x):
    """Where binary_tanh_unit(x) is -1: round3(hard_sigmoid(x)) = 0, i.e. (x + 1) / 2 < 0.5 in
    float32, as binary_net.py computes it (x < 0, but x within 2**-25 below 0 gives +1)."""
    return (x + np.float32(1)) / np.float32(2) < np.float32(0.5)


def sign_bits(x):
    """float32 (N, C, H, W) or (N, n) -> the bits of binary_tanh_unit(x)."""
    neg = negative(x)
    return pack_bits(neg.transpose(0, 2, 3, 1) if x.ndim == 4 else neg)


def pack_xnor(op, signs):
    """op's weights (export.py's bits, 1 = +H) as rows of words laid out as its input's bits: a
    conv's (C_out, kh * kw * words per C_in), a dense layer's after a conv in (H, W, C) order."""
    shape, n = op["shape"], int(np.prod(op["shape"]))
    neg = np.unpackbits(signs, count=n).reshape(shape) == 0
    if op["kind"] == "conv":
        rows = pack_bits(neg.transpose(0, 2, 3, 1))  # (C_out, kh, kw, words)
    elif len(op["in_shape"]) == 3:
        rows = pack_bits(neg.reshape(shape[0], *op["in_shape"]).transpose(0, 2, 3, 1))
    else:
        rows = pack_bits(neg)
    return np.ascontiguousarray(rows.reshape(shape[0], -1))


def thresholds(op, corr):
    """(thr (configs, n_out padded to 64k) int32, flip bits (k,) uint64) of bc_xnor from op's T and
    direction: the unit is +1 iff s >= T (direction +1) or s <= T (-1), s the +-1 dot product.
    The kernel's d = popcount(x XOR w) over all n = kh*kw*C_in positions gives s = n - 2d - corr,
    corr the weights' sum over the taps that fall into the zero padding (0 for dense)."""
    n = int(np.prod(op["shape"][1:]))
    T, up = op["T"].astype(np.int64), op["direction"] > 0
    m = n - corr.astype(np.int64) - T  # +1 iff d <= m / 2 (up), d >= m / 2 (down)
    thr = np.where(up, np.floor_divide(m, 2), -np.floor_divide(-m, 2) - 1)
    thr = np.pad(thr, ((0, 0), (0, -thr.shape[1] % 64)))
    return np.ascontiguousarray(thr, np.int32), pack_bits(~up)


def _border_classes(op, H, W):
    """For a conv on H x W: (each output position's class (Ho*Wo,) int32, the classes' pad masks
    (classes, kh, kw)): positions whose window overlaps the zero padding alike share a class."""
    kh, kw = op["shape"][2:]
    ph, pw = op["padding"]
    inside = np.pad(np.ones((H, W), bool), ((ph, ph), (pw, pw)))
    win = np.lib.stride_tricks.sliding_window_view(inside, (kh, kw))
    masks, cls = np.unique(~win.reshape(-1, kh * kw), axis=0, return_inverse=True)
    return cls.reshape(-1).astype(np.int32), masks.reshape(-1, kh, kw)


def _conv_tables(op, H, W):
    key = ("tables", H, W)
    if key not in op:
        cls, masks = _border_classes(op, H, W)
        C_out, C_in, kh, kw = op["shape"]
        neg = np.unpackbits(op["signs_bits"], count=int(np.prod(op["shape"]))).reshape(
            op["shape"]) == 0
        tap_sums = (C_in - 2 * neg.sum(1, dtype=np.int64))  # (C_out, kh, kw): sum_c of w = +-1
        corr = np.einsum("okl,gkl->go", tap_sums, masks.astype(np.int64))
        op[key] = (cls,) + thresholds(op, corr)
    return op[key]


def _run_xnor(lib, cols, op, row_cls=None, thr=None, flip=None):
    rows, nw = cols.shape
    n_out = op["shape"][0]
    w = op["xbits"]
    if thr is None:  # the last layer: the counts
        counts = np.empty((rows, n_out), np.int32)
        lib.bc_xnor(cols.ctypes.data, rows, nw, w.ctypes.data, n_out, w.shape[1], nw, None, 0,
                    None, None, None, 0, counts.ctypes.data, threads(), xnor_path(lib))
        return counts
    out = np.empty((rows, len(flip)), np.uint64)
    lib.bc_xnor(cols.ctypes.data, rows, nw, w.ctypes.data, n_out, w.shape[1], nw,
                thr.ctypes.data, thr.shape[1], flip.ctypes.data,
                None if row_cls is None else row_cls.ctypes.data, out.ctypes.data, len(flip), None,
                threads(), xnor_path(lib))
    return out


def xnor_dense(lib, x, op):
    """x (N, words) bits -> the next layer's bits (N, words'), or, for the last layer (no
    threshold), H * s as float32 (N, n_out)."""
    x = np.ascontiguousarray(x)
    if "T" not in op:
        n = op["shape"][1]
        return (n - 2 * _run_xnor(lib, x, op)).astype(np.float32) * np.float32(op["H"])
    if "tables" not in op:
        op["tables"] = thresholds(op, np.zeros((1, op["shape"][0]), np.int64))
    return _run_xnor(lib, x, op, None, *op["tables"])


def xnor_conv(lib, x, op):
    """x (N, H, W, words) bits -> (N, Ho, Wo, words') bits, max-pooled 2x2 when op["pool"]: a
    unit whose batch norm increases with s is +1 where any of the 4 is (max commutes with it),
    one whose batch norm decreases (gamma < 0) where all 4 are."""
    N, H, W, cw = x.shape
    C_out, _, kh, kw = op["shape"]
    ph, pw = op["padding"]
    # padding words are zero bits, +1 inputs: the border classes' thresholds take them back out
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))
    Ho, Wo = win.shape[1:3]
    cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(N * Ho * Wo, kh * kw * cw)
    cls, thr, flip = _conv_tables(op, H, W)
    y = _run_xnor(lib, cols, op, np.tile(cls, N), thr, flip).reshape(N, Ho, Wo, -1)
    if op.get("pool"):
        q = y[:, :Ho // 2 * 2, :Wo // 2 * 2]
        a, b, c, d = q[:, ::2, ::2], q[:, ::2, 1::2], q[:, 1::2, ::2], q[:, 1::2, 1::2]
        up = op.setdefault("up_words", pack_bits(op["direction"] > 0))
        y = ((a & b & c & d) & up) | ((a | b | c | d) & ~up)  # bits are -1: AND of -1 = OR of +1
    return np.ascontiguousarray(y)
