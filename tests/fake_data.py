"""Tiny datasets in the official on-disk layouts, for tests (and end-to-end script runs).

Each writer returns the raw arrays it wrote, so a test can compute its expected numbers itself.
"""
import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import scipy.io

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
              np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array):
    """The idx encoding of `array`: big-endian header (0, 0, type code, ndim, dims) then the data."""
    array = np.asarray(array)
    if array.dtype.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def write_idx(path, array, compress=True):
    data = idx_bytes(array)
    Path(path).write_bytes(gzip.compress(data) if compress else data)


def _balanced_labels(rng, n, low=0):
    # every class gets n // 10 or n // 10 + 1 examples, in random order
    return (rng.permutation(np.arange(n) % 10) + low).astype(np.uint8)


def write_fake_mnist(dir, n_train=60, n_test=10, seed=0, compress=True):
    """The four MNIST idx files under their official names (with '.gz' only if compress).

    Returns {'train_images', 'train_labels', 'test_images', 'test_labels'} (uint8 arrays).
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, which, n in (("train", "train", n_train), ("t10k", "test", n_test)):
        out[f"{which}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        out[f"{which}_labels"] = _balanced_labels(rng, n)
        suffix = ".gz" if compress else ""
        write_idx(dir / f"{prefix}-images-idx3-ubyte{suffix}", out[f"{which}_images"], compress)
        write_idx(dir / f"{prefix}-labels-idx1-ubyte{suffix}", out[f"{which}_labels"], compress)
    return out


def cifar10_batch_bytes(data, labels, batch_label="fake batch", bytes_keys=False):
    """A CIFAR-10 batch pickled so that it unpickles like the official Python-2 files: protocol 2, the
    array's global named numpy.core.multiarray._reconstruct and its bytes held as a (latin1) string,
    which is what a Python-2 str becomes under pickle.load(encoding='latin1'). With bytes_keys the dict
    keys are bytes, as after loading the official files with encoding='bytes' and pickling them again."""
    from numpy._core.multiarray import _reconstruct

    data = np.ascontiguousarray(data, dtype=np.uint8)

    class Py2StylePickler(pickle.Pickler):
        def reducer_override(self, obj):
            if type(obj) is np.ndarray:
                state = (1, obj.shape, obj.dtype, False, obj.tobytes().decode("latin1"))
                return _reconstruct, (np.ndarray, (0,), "b"), state
            return NotImplemented

    batch = {"batch_label": batch_label, "labels": [int(v) for v in labels], "data": data,
             "filenames": [f"fake_{i}.png" for i in range(len(data))]}
    if bytes_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    buffer = io.BytesIO()
    Py2StylePickler(buffer, protocol=2).dump(batch)
    # GLOBAL names end with a newline, so this replacement cannot hit anything else
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n_reconstruct\n",
                                     b"cnumpy.core.multiarray\n_reconstruct\n")


def write_cifar10_batches(dir, train_batches, test, as_tar=False, bytes_keys=False):
    """Write `dir/cifar-10-batches-py/` (or `dir/cifar-10-python.tar.gz` holding it) from the five
    (data (n, 3072) uint8 c01, labels) pairs in `train_batches` and the (data, labels) pair `test`."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    files = {f"data_batch_{i + 1}": cifar10_batch_bytes(d, l, f"training batch {i + 1} of 5", bytes_keys)
             for i, (d, l) in enumerate(train_batches)}
    files["test_batch"] = cifar10_batch_bytes(*test, "testing batch 1 of 1", bytes_keys)
    meta = {"num_cases_per_batch": len(train_batches[0][0]), "num_vis": 3072,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                            "ship", "truck"]}
    files["batches.meta"] = pickle.dumps(meta, protocol=2)
    if as_tar:
        with tarfile.open(dir / "cifar-10-python.tar.gz", "w:gz") as archive:
            for name, raw in files.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                archive.addfile(info, io.BytesIO(raw))
    else:
        (dir / "cifar-10-batches-py").mkdir(exist_ok=True)
        for name, raw in files.items():
            (dir / "cifar-10-batches-py" / name).write_bytes(raw)


def write_fake_cifar10(dir, n_per_batch=20, n_test=20, seed=0, as_tar=False, bytes_keys=False):
    """A tiny CIFAR-10 in the official pickle layout (see write_cifar10_batches).

    Returns {'train_data' (5*n_per_batch, 3072) uint8 in file order, 'train_labels', 'test_data',
    'test_labels'}.
    """
    rng = np.random.default_rng(seed)
    batches = [(rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8), _balanced_labels(rng, n_per_batch))
               for _ in range(5)]
    test = (rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), _balanced_labels(rng, n_test))
    write_cifar10_batches(dir, batches, test, as_tar=as_tar, bytes_keys=bytes_keys)
    return {"train_data": np.concatenate([d for d, _ in batches]),
            "train_labels": np.concatenate([l for _, l in batches]),
            "test_data": test[0], "test_labels": test[1]}


def write_fake_svhn_mat(dir, n_train=100, n_test=30, n_extra=60, seed=0):
    """train_32x32.mat, test_32x32.mat and extra_32x32.mat in the official format-2 layout: X uint8
    (32, 32, 3, N), y uint8 (N, 1) with labels 1..10 (digit 0 stored as 10).

    Labels are balanced, each class getting n // 10 or n // 10 + 1 images, so a class-balanced split
    taking k per class needs n >= 10 * k (plus what should remain): the official 400 / 200 per class
    need n_train > 4000 and n_extra > 2000; tests pass smaller per-class numbers with small n.
    Returns {'train' | 'test' | 'extra': (X, y (N,))}.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for which, n in (("train", n_train), ("test", n_test), ("extra", n_extra)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = _balanced_labels(rng, n, low=1)
        scipy.io.savemat(dir / f"{which}_32x32.mat", {"X": X, "y": y.reshape(-1, 1)})
        out[which] = (X, y)
    return out


def script_config(script="mnist", **overrides):
    """A script's own hyperparameters (its globals, read as configure reads them), with
    `overrides`: the one shape of the configuration that start_run and training.train take."""
    import runpy

    import configurator
    root = Path(__file__).resolve().parents[1]
    config = configurator.hyperparameters(runpy.run_path(str(root / f"{script}.py"),
                                                         run_name=script))
    unknown = sorted(set(overrides) - set(config))
    assert not unknown, f"{script}.py has no hyperparameters {unknown}"
    config.update(overrides)
    return config
