"""Reading the datasets (§4.2-4.4, §6): the official files that dataset_files.py finds, made into
the arrays the scripts train on, and the CIFAR-10 cache.

Every loader returns (train_set, valid_set, test_set), each (X, y) with X float32 in bc01 layout
(N, C, H, W), C-contiguous, and y one-hot float32 (N, 10) with values {0, 1}. The experiment
scripts map y to hinge targets with 2*y - 1 themselves (§4.1). Every problem a user can fix raises
dataset_files.DatasetError, whose message names the file or folder and says what to do.
"""
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
import scipy.io

import preprocessing
from atomic import fsync_dir
from dataset_files import (CIFAR10_BATCHES, CIFAR10_DIR, CIFAR10_MIRRORS, CIFAR10_TAR,
                           CIFAR10_TAR_MD5, SVHN_MIRRORS, SVHN_PREPROCESSED, SVHN_SETS,
                           DatasetError, check_folder, corrupt, fetch, mnist_files)

# §6.2: pylearn2_gcn_whitened = GCN(scale=55) then ZCA(filter_bias=0.1). Bump the version whenever
# the cached arrays would change for the same sources and parameters.
CIFAR10_GCN = dict(scale=55., subtract_mean=True, use_std=False, sqrt_bias=0., min_divisor=1e-8)
CIFAR10_ZCA_FILTER_BIAS = 0.1
CIFAR10_CACHE_VERSION = 1


def _split_train(X, y, train_set_size):
    """The original's split of a training file: train = rows [0:train_set_size], valid = the
    rest."""
    if not 0 < train_set_size <= len(X):
        raise DatasetError(f"train_set_size must be in 1..{len(X)} for this training file, "
                           f"got {train_set_size}")
    n = train_set_size
    return (X[:n], y[:n]), (X[n:], y[n:])


def one_hot(labels):
    """Class indices 0..9 -> float32 (N, 10) one-hot rows, as the scripts' np.eye(10)[y]."""
    return np.eye(10, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]


# ------------------------------------------------------------------------------------------------
# MNIST (§4.2, §6.1)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """An idx file (gzipped or not, told apart by the gzip magic) as a native-endian array."""
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path} is a truncated or corrupt gzip file ({e}); delete it and "
                               f"download it again") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an idx file ({len(data)} bytes, starting "
                           f"{data[:4].hex() or '-'}); delete it and download it again")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated (incomplete idx header); delete it and download "
                           "it again")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(f"{path} is truncated or corrupt: {len(data)} bytes of idx data, its "
                           f"header (shape {shape}) needs {expected}; delete it and download it "
                           "again")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def mnist_split(images_path, labels_path):
    """One MNIST file pair -> (X float32 (N, 1, 28, 28) centred with the file's own per-pixel mean,
    y one-hot), as pylearn2 loaded a split (§6.1)."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DatasetError(f"{images_path}: expected uint8 images of shape (N, 28, 28), got "
                           f"{images.dtype} {images.shape}")
    if labels.shape != (len(images),) or labels.max(initial=0) > 9:
        raise DatasetError(f"{labels_path}: expected {len(images)} labels in 0..9 to match "
                           f"{images_path}, got shape {labels.shape}")
    # center=True subtracts the per-pixel mean of the whole file that was read (before any
    # start/stop slicing).
    X = mnist_pixels(images)
    X -= pixel_mean(X)
    return X.reshape(-1, 1, 28, 28), one_hot(labels)


def mnist_pixels(images):
    """§6.1: uint8 pixels as float32 / 255."""
    return np.asarray(images).astype(np.float32) / np.float32(255)


def pixel_mean(X):
    """§6.1's per-pixel mean of a split, accumulated in float64 for accuracy, stored in float32."""
    return X.mean(axis=0, dtype=np.float64).astype(np.float32)


def load_mnist(data_dir, train_set_size=50000, verify_checksums=True, download=True, mirrors=None,
               files=None):
    """MNIST as in [P2:datasets/mnist.py]: train = train file [0:train_set_size], valid = the rest;
    the files as mnist_files finds them. Every file is checked for a consistent idx header and
    size."""
    paths = mnist_files(data_dir, verify_checksums=verify_checksums, download=download,
                        mirrors=mirrors, files=files)
    X, y = mnist_split(paths["train-images-idx3-ubyte.gz"], paths["train-labels-idx1-ubyte.gz"])
    X_test, y_test = mnist_split(paths["t10k-images-idx3-ubyte.gz"],
                                 paths["t10k-labels-idx1-ubyte.gz"])
    return _split_train(X, y, train_set_size) + ((X_test, y_test),)


# ------------------------------------------------------------------------------------------------
# CIFAR-10 (§4.3, §6.2)

class _BatchUnpickler(pickle.Unpickler):
    """Only what an official CIFAR-10 batch needs (a dict of lists, strings and a uint8 array), so
    a tampered file cannot run code."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch")
        return super().find_class(module, name)


def _parse_cifar_batch(raw, origin):
    try:
        # The official batches are Python-2 pickles: latin1 turns their byte strings back into the
        # array bytes (numpy re-encodes them) and their dict keys into str.
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
        batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
        data = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"])
    except Exception as e:  # any failure here means the file is not a valid batch
        raise DatasetError(f"{origin} is truncated or corrupt, not a readable CIFAR-10 batch "
                           f"({type(e).__name__}: {e}); delete it and get it again") from e
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072
            or labels.shape != (len(data),) or not np.isin(labels, np.arange(10)).all()):
        raise DatasetError(f"{origin} is not a CIFAR-10 batch: expected uint8 data (N, 3072) and "
                           f"N labels in 0..9, got {data.dtype} {data.shape} and labels "
                           f"{labels.shape}")
    return data, labels.astype(np.uint8)


def read_cifar10_batch(path):
    """One official CIFAR-10 pickle batch -> (data uint8 (N, 3072) in c01 order, labels uint8
    (N,))."""
    return _parse_cifar_batch(Path(path).read_bytes(), path)


def _cifar10_sources(data_dir, verify_checksums, download, mirrors):
    """{batch name: (raw bytes, md5 of the bytes, origin)} from the extracted folder or the
    tarball."""
    folder = Path(data_dir) / CIFAR10_DIR
    if all((folder / name).is_file() for name in CIFAR10_BATCHES):
        out = {}
        for name, md5 in CIFAR10_BATCHES.items():
            raw = (folder / name).read_bytes()
            got = hashlib.md5(raw).hexdigest()
            if verify_checksums and got != md5:
                raise corrupt(folder / name, got, md5)
            out[name] = (raw, got, folder / name)
        return out

    tar = fetch(data_dir, CIFAR10_TAR, CIFAR10_TAR_MD5, tuple(mirrors or CIFAR10_MIRRORS),
                verify_checksums, download, what="CIFAR-10", alternatives=(
                    f"(or extract it there, giving {folder}/ with {', '.join(CIFAR10_BATCHES)})"))
    out = {}
    try:
        with tarfile.open(tar, "r:gz") as archive:
            for member in archive:
                name = member.name.rsplit("/", 1)[-1]
                if name in CIFAR10_BATCHES and member.isfile():
                    raw = archive.extractfile(member).read()
                    out[name] = (raw, hashlib.md5(raw).hexdigest(), f"{tar}:{member.name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DatasetError(f"{tar} is truncated or corrupt ({type(e).__name__}: {e}); delete it "
                           "and rerun (it will be downloaded again)") from e
    if missing := [n for n in CIFAR10_BATCHES if n not in out]:
        raise DatasetError(f"{tar} lacks {', '.join(missing)}; delete it and rerun (it will be "
                           "downloaded again)")
    return out


def _gcn_zca(train, test):
    """§6.2 on uint8 design matrices: GCN per image, then ZCA fit on all of `train`."""
    g_train = preprocessing.global_contrast_normalize(train.astype(np.float32), **CIFAR10_GCN)
    g_test = preprocessing.global_contrast_normalize(test.astype(np.float32), **CIFAR10_GCN)
    mean, P = preprocessing.zca_fit(g_train, filter_bias=CIFAR10_ZCA_FILTER_BIAS)
    # ZCA acts row by row, so applying it in chunks, in place, gives the same numbers with less
    # memory.
    for g in (g_train, g_test):
        for i in range(0, len(g), 10000):
            g[i:i + 10000] = preprocessing.zca_apply(g[i:i + 10000], mean, P)
    return g_train, g_test


def _save_cache(entry, arrays, meta):
    """Write the arrays as .npy files into a temporary folder, then rename it to `entry`."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
        for name, array in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, array)
                f.flush()
                os.fsync(f.fileno())
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        try:
            os.replace(tmp, entry)
        except OSError:
            if not entry.is_dir():  # otherwise another process has just written the same cache
                raise
        fsync_dir(entry.parent)
    except OSError as e:
        print(f"warning: could not write the cache {entry} ({e}); continuing without it",
              flush=True)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_cache(entry, names):
    if not entry.is_dir():
        return None
    print(f"Loading preprocessed CIFAR-10 from the cache {entry}", flush=True)
    try:
        return {name: np.load(entry / f"{name}.npy") for name in names}
    except (OSError, ValueError, EOFError) as e:
        print(f"warning: the cache {entry} is unreadable ({e}); rebuilding it", flush=True)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def load_cifar10(data_dir, train_set_size=45000, verify_checksums=True, download=True, mirrors=None,
                 cache_dir=None):
    """CIFAR-10 preprocessed like pylearn2's pylearn2_gcn_whitened (§6.2).

    Reads data_dir/cifar-10-batches-py/ if it holds all six batches, else cifar-10-python.tar.gz
    (downloaded if absent). train = rows [0:train_set_size] of data_batch_1..5 in file order,
    valid = the rest, test = test_batch. The preprocessed arrays are cached under cache_dir
    (default data_dir/cache), keyed by the batches' MD5s and the preprocessing parameters.
    """
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir / "cache"
    sources = _cifar10_sources(data_dir, verify_checksums, download, mirrors)
    meta = {"format_version": CIFAR10_CACHE_VERSION, "gcn": CIFAR10_GCN,
            "zca_filter_bias": CIFAR10_ZCA_FILTER_BIAS,
            "sources_md5": {name: md5 for name, (_, md5, _) in sources.items()}}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    entry = cache_dir / f"cifar10_gcn_zca_{key}"
    names = ("train_X", "train_y", "test_X", "test_y")

    arrays = _load_cache(entry, names)
    if arrays is None:
        batches = {name: _parse_cifar_batch(raw, origin)
                   for name, (raw, _, origin) in sources.items()}
        print(f"Building the preprocessed CIFAR-10 cache (GCN scale 55 + ZCA fit on the training "
              f"images; takes minutes): {entry}", flush=True)
        train = [batches[f"data_batch_{i}"] for i in range(1, 6)]  # file order, §4.3
        X_train, X_test = _gcn_zca(np.concatenate([d for d, _ in train]), batches["test_batch"][0])
        # The design matrix rows are in c01 order (1024 R, 1024 G, 1024 B), so this reshape is bc01.
        arrays = {"train_X": X_train.reshape(-1, 3, 32, 32),
                  "train_y": np.concatenate([l for _, l in train]),
                  "test_X": X_test.reshape(-1, 3, 32, 32), "test_y": batches["test_batch"][1]}
        _save_cache(entry, arrays, meta)

    return (_split_train(arrays["train_X"], one_hot(arrays["train_y"]), train_set_size)
            + ((arrays["test_X"], one_hot(arrays["test_y"])),))


# ------------------------------------------------------------------------------------------------
# SVHN (§4.4, §6.3). The split and GCN/LCN are svhn_preprocessing.py's; this reads what it reads
# and what it writes.

def read_svhn_mat(path):
    """An SVHN format-2 .mat -> (X uint8 (32, 32, 3, N) as stored, y uint8 (N,) in 1..10, 10 =
    digit 0)."""
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # scipy raises many types on bad files (ValueError, OSError, ...)
        raise DatasetError(f"{path} is truncated or corrupt, not a readable SVHN .mat file "
                           f"({type(e).__name__}: {e}); delete it and get it again "
                           f"({SVHN_MIRRORS[0]})") from e
    X, y = mat.get("X"), mat.get("y")
    if X is None or y is None or X.dtype != np.uint8 or X.ndim != 4 or X.shape[:3] != (32, 32, 3):
        raise DatasetError(f"{path}: expected X uint8 (32, 32, 3, N) and y (N, 1), got "
                           f"{None if X is None else (X.dtype, X.shape)} and "
                           f"{None if y is None else y.shape}")
    y = y.reshape(-1)
    if len(y) != X.shape[3] or y.min(initial=1) < 1 or y.max(initial=1) > 10:
        raise DatasetError(f"{path}: expected {X.shape[3]} labels in 1..10, got {len(y)} in "
                           f"{y.min(initial=1)}..{y.max(initial=1)}")
    return X, y.astype(np.uint8)


def load_svhn(path):
    """The arrays svhn_preprocessing.py writes: X memory-mapped (read-only), y in memory."""
    path = Path(path)
    missing = [f"{s}_{a}.npy" for s in SVHN_SETS for a in "Xy"
               if not (path / f"{s}_{a}.npy").is_file()]
    if missing:
        check_folder(path, SVHN_PREPROCESSED)
        raise DatasetError(f"SVHN: missing in {path}: {', '.join(missing)}. Run `python "
                           "svhn_preprocessing.py` first; it reads train/test/extra_32x32.mat and "
                           "writes these files.")
    out = []
    for s in SVHN_SETS:
        try:
            X = np.load(path / f"{s}_X.npy", mmap_mode="r")  # 7 GB for splitted_train: never in RAM
            y = np.load(path / f"{s}_y.npy")
        except (OSError, ValueError, EOFError) as e:
            raise DatasetError(f"{path}/{s}_X.npy or {s}_y.npy is truncated or corrupt ({e}); "
                               "rerun `python svhn_preprocessing.py`") from e
        if X.dtype != np.float32 or X.shape[1:] != (3, 32, 32) or y.shape != (len(X), 10):
            raise DatasetError(f"{path}: {s}_X.npy / {s}_y.npy should be float32 (N, 3, 32, 32) "
                               f"and (N, 10), got {X.dtype} {X.shape} and {y.shape}; rerun "
                               "`python svhn_preprocessing.py`")
        out.append((X, y.astype(np.float32, copy=False)))
    return tuple(out)
