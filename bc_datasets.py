"""Dataset loaders for the BinaryConnect reproduction (§4.2–4.4 and §6).

Every loader returns ``(train_set, valid_set, test_set)``, each ``(X, y)`` with X float32 in bc01 layout
(N, C, H, W), C-contiguous, and y one-hot float32 (N, 10) with values {0, 1}. The experiment scripts map
y to hinge targets with ``2*y - 1`` themselves (§4.1).

All user-facing data problems raise :class:`DatasetError`, whose message says which file or directory is
involved and what to do about it.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import scipy.io

import preprocessing
from atomic import atomic_write, fsync_dir


class DatasetError(RuntimeError):
    """A dataset file is missing, corrupt or unreadable; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------
# Official files. MD5s as published by torchvision (datasets/mnist.py, cifar.py, svhn.py).

MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# A file under another name (a subset such as t10k-8000-images-idx3-ubyte.gz, a renamed copy) is
# found by these patterns when the official name is absent.
MNIST_PATTERNS = {
    "train-images-idx3-ubyte.gz": "train*images*idx3*",
    "train-labels-idx1-ubyte.gz": "train*labels*idx1*",
    "t10k-images-idx3-ubyte.gz": "t10k*images*idx3*",
    "t10k-labels-idx1-ubyte.gz": "t10k*labels*idx1*",
}
# torchvision's order: the S3 copy first, since yann.lecun.com often refuses downloads.
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")

CIFAR10_TAR = "cifar-10-python.tar.gz"
CIFAR10_TAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_BATCHES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR10_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
# §6.2: pylearn2_gcn_whitened = GCN(scale=55) then ZCA(filter_bias=0.1). Bump the version whenever the
# cached arrays would change for the same sources and parameters.
CIFAR10_GCN = dict(scale=55., subtract_mean=True, use_std=False, sqrt_bias=0., min_divisor=1e-8)
CIFAR10_ZCA_FILTER_BIAS = 0.1
CIFAR10_CACHE_VERSION = 1

SVHN_FILES = {
    "train": ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
    "extra": ("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7"),
}
SVHN_MIRRORS = ("http://ufldl.stanford.edu/housenumbers/",)
SVHN_SETS = ("splitted_train", "valid", "test")


# ---------------------------------------------------------------------------------------------------------
# Checksums and downloads

def md5sum(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _corrupt(path, got, expected) -> DatasetError:
    return DatasetError(
        f"corrupt: {path} has MD5 {got}, expected {expected}; delete it and rerun "
        f"(it will be downloaded again), or pass verify_checksums=False (--verify_checksums=False to "
        f"the scripts) if it is a subset or a mirror you trust")


def download(url, dest, md5=None, timeout=60) -> Path:
    """Download ``url`` to ``dest`` atomically (``atomic.atomic_write``), checking ``md5`` if given."""
    dest = Path(dest)
    h = hashlib.md5()
    print(f"Downloading {url} -> {dest}", flush=True)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "binaryconnect-reproduction"})
        with urllib.request.urlopen(request, timeout=timeout) as response, atomic_write(dest) as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
            if md5 is not None and h.hexdigest() != md5:  # raised inside: the partial file goes too
                raise DatasetError(f"Checksum mismatch downloading {url} to {dest}: got MD5 "
                                   f"{h.hexdigest()}, expected {md5}; the partial file was deleted")
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError and timeouts are OSErrors
        reason = getattr(e, "reason", None) or e
        raise DatasetError(f"Could not download {url}: {reason}") from e
    return dest


_download_file = download  # fetch()'s ``download`` flag shadows the function's name inside it


def _url(mirror, name):
    return mirror + name if mirror.endswith("/") else mirror + "/" + name


def fetch_all(data_dir, files, mirrors, verify_checksums=True, download=True, what="dataset",
              alternatives="") -> dict:
    """Return {file name: path} for every ``files`` entry ({name: md5 or None}) in ``data_dir``.

    A present file is checked against its MD5 (when verify_checksums); a missing one is downloaded from
    the first mirror that works. If some stay missing, ONE DatasetError lists them all, the directory
    and where to get them. Directories this call creates for the downloads are removed again if no
    file lands in them.
    """
    data_dir = Path(data_dir)
    paths, missing = {}, []
    for name, md5 in files.items():
        path = data_dir / name
        if path.is_file():
            if verify_checksums and md5 is not None:
                got = md5sum(path)
                if got != md5:
                    raise _corrupt(path, got, md5)
            paths[name] = path
        else:
            missing.append(name)

    errors = []
    if missing and download:
        # A download that fails must not leave behind the directory it was going to fill (a
        # misspelt --data_dir would otherwise become a new empty directory): the ones made here
        # are removed again if no file lands in them.
        created = [d for d in (data_dir, *data_dir.parents) if not d.exists()]
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            errors.append(f"Cannot create {data_dir}: {e}")
        try:
            dead = set()  # mirrors that did not answer at all are not retried for the next files
            for name in list(missing) if not errors else []:
                for mirror in mirrors:
                    if mirror in dead:
                        continue
                    url = _url(mirror, name)
                    try:
                        paths[name] = _download_file(url, data_dir / name,
                                                     files[name] if verify_checksums else None)
                        missing.remove(name)
                        break
                    except DatasetError as e:
                        errors.append(str(e))
                        cause = e.__cause__
                        if isinstance(cause, OSError) and not isinstance(cause, urllib.error.HTTPError):
                            dead.add(mirror)
        finally:  # Ctrl-C during a download too
            for d in created:  # deepest first; rmdir refuses a directory that is not empty
                try:
                    d.rmdir()
                except OSError:
                    break

    if missing:
        why = "; ".join(errors) if errors else "Downloading is disabled (download=False)"
        raise DatasetError(
            f"{what}: missing in {data_dir}: {', '.join(missing)}. {why}. "
            f"Get them from {' or '.join(mirrors)} (<url><file name>, e.g. {_url(mirrors[0], missing[0])}) "
            f"and put them in {data_dir}" + (f" {alternatives}" if alternatives else "") + ".")
    return paths


def fetch(data_dir, filename, md5, mirrors, verify_checksums=True, download=True, what="dataset",
          alternatives="") -> Path:
    """Path of ``data_dir/filename``, downloading it from ``mirrors`` if absent (see fetch_all)."""
    return fetch_all(data_dir, {filename: md5}, mirrors, verify_checksums, download, what,
                     alternatives)[filename]


def _split_train(X, y, train_set_size):
    """The original's split of a training file: train = rows [0:train_set_size], valid = the rest."""
    if not 0 < train_set_size <= len(X):
        raise DatasetError(f"train_set_size must be in 1..{len(X)} for this training file, "
                           f"got {train_set_size}")
    n = train_set_size
    return (X[:n], y[:n]), (X[n:], y[n:])


def one_hot(labels) -> np.ndarray:
    """Class indices 0..9 -> float32 (N, 10) one-hot rows, as the scripts' np.eye(10)[y]."""
    return np.eye(10, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]


# ---------------------------------------------------------------------------------------------------------
# MNIST (§4.2, §6.1)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read an idx file (gzipped or not, told apart by the gzip magic) into a native-endian array."""
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
        raise DatasetError(f"{path} is truncated (incomplete idx header); delete it and download it again")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(f"{path} is truncated or corrupt: {len(data)} bytes of idx data, its header "
                           f"(shape {shape}) needs {expected}; delete it and download it again")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def mnist_split(images_path, labels_path, center=True):
    """One MNIST file pair -> (X float32 (N, 1, 28, 28) centred with the file's own per-pixel mean,
    y one-hot), as pylearn2 loaded a split (§6.1); center=False: X is pixels / 255, in [0, 1]."""
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
    if center:
        X -= pixel_mean(X)
    return X.reshape(-1, 1, 28, 28), one_hot(labels)


def mnist_pixels(images):
    """§6.1: uint8 pixels as float32 / 255."""
    return np.asarray(images).astype(np.float32) / np.float32(255)


def pixel_mean(X):
    """§6.1's per-pixel mean of a split, accumulated in float64 for accuracy, stored in float32."""
    return X.mean(axis=0, dtype=np.float64).astype(np.float32)


def _find_mnist_file(data_dir: Path, name: str) -> Path | None:
    """The one file of ``data_dir`` matching ``name``'s pattern (e.g. t10k*images*idx3*), or None."""
    pattern = MNIST_PATTERNS[name]
    found = sorted(p for p in data_dir.glob(pattern) if p.is_file())
    if len(found) > 1:
        raise DatasetError(
            f"MNIST: {name} is not in {data_dir}, and {len(found)} files there match {pattern}: "
            f"{', '.join(p.name for p in found)}; keep only the one to use, or rename it {name}, or "
            f"name it with load_mnist(files={{{name!r}: path}})")
    return found[0] if found else None


def mnist_files(data_dir, names=tuple(MNIST_FILES), verify_checksums=True, download=True,
                mirrors=None, files=None) -> dict:
    """{official name: path} of the MNIST files `names` (official names, e.g.
    't10k-images-idx3-ubyte.gz').

    Each is, in this order: ``files[official name]`` when given (a path); the official name in
    ``data_dir``; its uncompressed copy (the name without '.gz'); the only file of ``data_dir``
    matching its pattern (``MNIST_PATTERNS``, e.g. ``t10k-8000-images-idx3-ubyte.gz`` for
    t10k*images*idx3*); else it is downloaded. Only a file under the official '.gz' name is checked
    against the official MD5: a copy under another name is an uncompressed file, a subset or a
    mirror's copy, whose MD5 is not the published one; a note names each such file.
    """
    data_dir = Path(data_dir)
    files = dict(files or {})
    if unknown := sorted(set(files) - set(MNIST_FILES)):
        raise DatasetError(f"MNIST: files= takes the official names as keys ({', '.join(MNIST_FILES)}), "
                           f"got {', '.join(map(repr, unknown))}")
    paths, needed = {}, {}
    for name in names:
        md5 = MNIST_FILES[name]
        if name in files:
            path, how = Path(files[name]), "given in files="
            if not path.is_file():
                raise DatasetError(f"MNIST: {path}, given in files= for {name}, is not a file")
        elif (data_dir / name).is_file():
            needed[name] = md5  # fetch_all checks its MD5
            continue
        elif (data_dir / name[:-len(".gz")]).is_file():
            paths[name] = data_dir / name[:-len(".gz")]  # no MD5 published for it: no note either
            continue
        elif path := _find_mnist_file(data_dir, name):
            how = f"found by its prefix, {MNIST_PATTERNS[name]}"
        else:
            needed[name] = md5
            continue
        if path.name == name:
            if verify_checksums and (got := md5sum(path)) != md5:
                raise _corrupt(path, got, md5)
        else:
            print(f"MNIST: using {path} as {name} ({how}); its MD5 is not checked, since under "
                  f"another name it is a subset or a copy", flush=True)
        paths[name] = path
    patterns = ", ".join(MNIST_PATTERNS[name] for name in needed if not (data_dir / name).is_file())
    paths.update(fetch_all(
        data_dir, needed, tuple(mirrors or MNIST_MIRRORS), verify_checksums, download, what="MNIST",
        alternatives=f"(uncompressed copies without '.gz' work too, and so do files under other names "
                     f"found by prefix, one per pattern: {patterns}, e.g. a subset such as "
                     f"t10k-8000-images-idx3-ubyte.gz, whose MD5 is not checked; from Python, "
                     f"load_mnist(files={{official name: path}}) names them)"))
    return paths


def load_mnist(data_dir, train_set_size=50000, verify_checksums=True, download=True, mirrors=None,
               files=None, center=True):
    """MNIST as in [P2:datasets/mnist.py]: train = train file [0:train_set_size], valid = the rest;
    the files as mnist_files finds them. Every file is checked for a consistent idx header and
    size. center=False: pylearn2's center=False, pixels / 255 (BinaryNet's, §13.5)."""
    paths = mnist_files(data_dir, verify_checksums=verify_checksums, download=download,
                        mirrors=mirrors, files=files)
    X, y = mnist_split(paths["train-images-idx3-ubyte.gz"], paths["train-labels-idx1-ubyte.gz"],
                       center)
    X_test, y_test = mnist_split(paths["t10k-images-idx3-ubyte.gz"],
                                 paths["t10k-labels-idx1-ubyte.gz"], center)
    return _split_train(X, y, train_set_size) + ((X_test, y_test),)


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10 (§4.3, §6.2)

class _BatchUnpickler(pickle.Unpickler):
    """Only what an official CIFAR-10 batch needs (a dict of lists, strings and a uint8 array), so a
    tampered file cannot run code."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch")
        return super().find_class(module, name)


def _parse_cifar_batch(raw: bytes, origin) -> tuple[np.ndarray, np.ndarray]:
    try:
        # The official batches are Python-2 pickles: latin1 turns their byte strings back into the array
        # bytes (numpy re-encodes them) and their dict keys into str.
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
        batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
        data = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"])
    except Exception as e:  # any failure here means the file is not a valid batch
        raise DatasetError(f"{origin} is truncated or corrupt, not a readable CIFAR-10 batch "
                           f"({type(e).__name__}: {e}); delete it and get it again") from e
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),)
            or not np.isin(labels, np.arange(10)).all()):
        raise DatasetError(f"{origin} is not a CIFAR-10 batch: expected uint8 data (N, 3072) and N labels "
                           f"in 0..9, got {data.dtype} {data.shape} and labels {labels.shape}")
    return data, labels.astype(np.uint8)


def read_cifar10_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """One official CIFAR-10 pickle batch -> (data uint8 (N, 3072) in c01 order, labels uint8 (N,))."""
    return _parse_cifar_batch(Path(path).read_bytes(), path)


def _cifar10_sources(data_dir, verify_checksums, download, mirrors) -> dict:
    """{batch name: (raw bytes, md5 of the bytes, origin)} from the extracted directory or the tarball."""
    folder = Path(data_dir) / CIFAR10_DIR
    if all((folder / name).is_file() for name in CIFAR10_BATCHES):
        out = {}
        for name, md5 in CIFAR10_BATCHES.items():
            raw = (folder / name).read_bytes()
            got = hashlib.md5(raw).hexdigest()
            if verify_checksums and got != md5:
                raise _corrupt(folder / name, got, md5)
            out[name] = (raw, got, folder / name)
        return out

    tar = fetch(data_dir, CIFAR10_TAR, CIFAR10_TAR_MD5, tuple(mirrors or CIFAR10_MIRRORS), verify_checksums,
                download, what="CIFAR-10",
                alternatives=f"(or extract it there, giving {folder}/ with {', '.join(CIFAR10_BATCHES)})")
    out = {}
    try:
        with tarfile.open(tar, "r:gz") as archive:
            for member in archive:
                name = member.name.rsplit("/", 1)[-1]
                if name in CIFAR10_BATCHES and member.isfile():
                    raw = archive.extractfile(member).read()
                    out[name] = (raw, hashlib.md5(raw).hexdigest(), f"{tar}:{member.name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DatasetError(f"{tar} is truncated or corrupt ({type(e).__name__}: {e}); delete it and "
                           f"rerun (it will be downloaded again)") from e
    if missing := [n for n in CIFAR10_BATCHES if n not in out]:
        raise DatasetError(f"{tar} lacks {', '.join(missing)}; delete it and rerun (it will be downloaded "
                           f"again)")
    return out


def _gcn_zca(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """§6.2 on uint8 design matrices: GCN per image, then ZCA fit on all of ``train``."""
    g_train = preprocessing.global_contrast_normalize(train.astype(np.float32), **CIFAR10_GCN)
    g_test = preprocessing.global_contrast_normalize(test.astype(np.float32), **CIFAR10_GCN)
    mean, P = preprocessing.zca_fit(g_train, filter_bias=CIFAR10_ZCA_FILTER_BIAS)
    # ZCA acts row by row, so applying it in chunks, in place, gives the same numbers with less memory.
    for g in (g_train, g_test):
        for i in range(0, len(g), 10000):
            g[i:i + 10000] = preprocessing.zca_apply(g[i:i + 10000], mean, P)
    return g_train, g_test


def _save_cache(entry: Path, arrays: dict, meta: dict):
    """Write the arrays as .npy files into a temporary directory, then rename it to ``entry``."""
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
        print(f"warning: could not write the cache {entry} ({e}); continuing without it", flush=True)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_cache(entry: Path, names) -> dict | None:
    if not entry.is_dir():
        return None
    print(f"Loading preprocessed CIFAR-10 from the cache {entry}", flush=True)
    try:
        return {name: np.load(entry / f"{name}.npy") for name in names}
    except (OSError, ValueError, EOFError) as e:
        print(f"warning: the cache {entry} is unreadable ({e}); rebuilding it", flush=True)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def scale_pixels(pixels) -> np.ndarray:
    """BinaryNet's CIFAR-10 and SVHN inputs (§13.5): 2/255 * pixels - 1 in float32, in [-1, 1]."""
    return np.asarray(pixels, dtype=np.float32) * np.float32(2. / 255.) - np.float32(1.)


def _cifar10_arrays(sources, preprocess) -> dict:
    """The train batches in file order (§4.3) and the test batch, through preprocess(train, test),
    as bc01 arrays (a row is in c01 order: 1024 R, 1024 G, 1024 B) with their labels."""
    batches = {name: _parse_cifar_batch(raw, origin) for name, (raw, _, origin) in sources.items()}
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    X_train, X_test = preprocess(np.concatenate([d for d, _ in train]), batches["test_batch"][0])
    return {"train_X": X_train.reshape(-1, 3, 32, 32), "train_y": np.concatenate([l for _, l in train]),
            "test_X": X_test.reshape(-1, 3, 32, 32), "test_y": batches["test_batch"][1]}


def load_cifar10(data_dir, train_set_size=45000, verify_checksums=True, download=True, mirrors=None,
                 cache_dir=None, gcn_zca=True):
    """CIFAR-10 preprocessed like pylearn2's ``pylearn2_gcn_whitened`` (§6.2); gcn_zca=False:
    scaled to [-1, 1] instead, as BinaryNet's cifar10.py did (§13.5).

    Reads ``data_dir/cifar-10-batches-py/`` if it holds all six batches, else ``cifar-10-python.tar.gz``
    (downloaded if absent). train = rows [0:train_set_size] of data_batch_1..5 in file order, valid = the
    rest, test = test_batch. The preprocessed arrays are cached under ``cache_dir`` (default
    ``data_dir/cache``), keyed by the batches' MD5s and the preprocessing parameters.
    """
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir / "cache"
    sources = _cifar10_sources(data_dir, verify_checksums, download, mirrors)
    if not gcn_zca:  # seconds to compute: no cache
        arrays = _cifar10_arrays(sources, lambda train, test: (scale_pixels(train), scale_pixels(test)))
    else:
        meta = {"format_version": CIFAR10_CACHE_VERSION, "gcn": CIFAR10_GCN,
                "zca_filter_bias": CIFAR10_ZCA_FILTER_BIAS,
                "sources_md5": {name: md5 for name, (_, md5, _) in sources.items()}}
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        entry = cache_dir / f"cifar10_gcn_zca_{key}"
        arrays = _load_cache(entry, ("train_X", "train_y", "test_X", "test_y"))
        if arrays is None:
            print(f"Building the preprocessed CIFAR-10 cache (GCN scale 55 + ZCA fit on the training "
                  f"images; takes minutes): {entry}", flush=True)
            arrays = _cifar10_arrays(sources, _gcn_zca)
            _save_cache(entry, arrays, meta)

    return (_split_train(arrays["train_X"], one_hot(arrays["train_y"]), train_set_size)
            + ((arrays["test_X"], one_hot(arrays["test_y"])),))


# ---------------------------------------------------------------------------------------------------------
# SVHN (§4.4, §6.3). The split and GCN/LCN live in svhn_preprocessing.py; this reads its inputs/outputs.

def svhn_mat_files(data_dir, verify_checksums=True, download=True, mirrors=None) -> dict:
    """{'train'|'test'|'extra': path of the official format-2 .mat file}, downloading missing ones."""
    files = {name: md5 for name, md5 in SVHN_FILES.values()}
    paths = fetch_all(data_dir, files, tuple(mirrors or SVHN_MIRRORS), verify_checksums, download,
                      what="SVHN")
    return {which: paths[name] for which, (name, _) in SVHN_FILES.items()}


def read_svhn_mat(path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN format-2 .mat -> (X uint8 (32, 32, 3, N) as stored, y uint8 (N,) in 1..10, 10 = digit 0)."""
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # scipy raises many types (ValueError, OSError, MatReadError...) on bad files
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
    missing = [f"{s}_{a}.npy" for s in SVHN_SETS for a in "Xy" if not (path / f"{s}_{a}.npy").is_file()]
    if missing:
        raise DatasetError(f"SVHN: missing in {path}: {', '.join(missing)}. Run `python "
                           f"svhn_preprocessing.py` first; it reads train/test/extra_32x32.mat and writes "
                           f"these files.")
    out = []
    for s in SVHN_SETS:
        try:
            X = np.load(path / f"{s}_X.npy", mmap_mode="r")  # 7 GB for splitted_train: never in RAM
            y = np.load(path / f"{s}_y.npy")
        except (OSError, ValueError, EOFError) as e:
            raise DatasetError(f"{path}/{s}_X.npy or {s}_y.npy is truncated or corrupt ({e}); rerun "
                               f"`python svhn_preprocessing.py`") from e
        if X.dtype != np.float32 or X.shape[1:] != (3, 32, 32) or y.shape != (len(X), 10):
            raise DatasetError(f"{path}: {s}_X.npy / {s}_y.npy should be float32 (N, 3, 32, 32) and "
                               f"(N, 10), got {X.dtype} {X.shape} and {y.shape}; rerun "
                               f"`python svhn_preprocessing.py`")
        out.append((X, y.astype(np.float32, copy=False)))
    return tuple(out)
