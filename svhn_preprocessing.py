"""Preprocess SVHN as the original svhn_preprocessing.py did through pylearn2 (docs/original.md §6.3).

    python svhn_preprocessing.py [config.py ...] [--key=value ...]

Reads the official format-2 files train_32x32.mat, extra_32x32.mat and test_32x32.mat from data_dir,
splits train + extra into splitted_train (598,388 images) and valid (6,000) with pylearn2's rule
(RandomState(322)), shuffles test as pylearn2's make_data did, and writes for each set
<SVHN_LOCAL_PATH>/<set>_X.npy, float32 (N, 3, 32, 32) after GCN (scale 1) and LeCun LCN (with
--inputs=binarynet: 2*pixels/255 - 1, BinaryNet's inputs; config/svhn_binarynet.py reads them), and
<set>_y.npy, float32 one-hot (N, 10) with column = label - 1 (digit 0, label 10, is column 9).
The sets are streamed in chunks of chunk_size images; each file is written under a temporary name
and renamed when complete, so an interrupted run never leaves a partial file under a final name.
"""
import os
import sys
import tempfile
import time

import numpy as np

import bc_datasets
from atomic import atomic_write
from configurator import configure
from preprocessing import shuffle_order, split_train_valid, svhn_gcn_lcn

data_dir = "data/svhn"  # the official .mat files; missing ones are downloaded here
SVHN_LOCAL_PATH = os.environ.get("SVHN_LOCAL_PATH", "data/svhn/preprocessed")  # output directory
inputs = "binaryconnect"  # GCN + LCN (§6.3); "binarynet": 2*pixels/255 - 1 (§13.5)
lcn_channels = "0"  # the original's quirk: LCN on channel 0 only (§6.3); "0,1,2" normalises all
verify_checksums = True  # check the .mat files' MD5s before use
chunk_size = 5000  # images per chunk (pylearn2 used batches of 5000)
seed = 322  # pylearn2's RandomState seed for the split and the shuffles
n_valid_train = 400  # valid images per class taken from train
n_valid_extra = 200  # valid images per class taken from extra


class AtomicNpyWriter:
    """Writes a .npy file of known shape chunk by chunk through `atomic.atomic_write`; the file
    appears under `path` only on a clean exit with every row written. Rows go out with plain
    sequential writes rather than through a memmap, so the written data never counts in the
    process's resident memory."""

    def __init__(self, path, shape, dtype=np.float32):
        self.path = os.fspath(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self._atomic = self._file = None

    def __enter__(self):
        self._atomic = atomic_write(self.path)
        self._file = self._atomic.__enter__()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._file, header)
        return self

    def write(self, chunk):
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        if chunk.shape[1:] != self.shape[1:] or self.rows + len(chunk) > self.shape[0]:
            raise ValueError(f"{self.path}: chunk of shape {chunk.shape} does not fit rows "
                             f"{self.rows}.. of {self.shape}")
        try:
            self._file.write(chunk.data)
        except OSError as e:  # a full disk's error names no file: name the one being written
            e.filename = e.filename or self.path
            raise
        self.rows += len(chunk)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self.rows != self.shape[0]:
            short = RuntimeError(f"{self.path}: {self.rows} of {self.shape[0]} rows written")
            self._atomic.__exit__(RuntimeError, short, None)  # deletes the temporary file
            raise short
        try:
            return self._atomic.__exit__(exc_type, exc, tb)
        except OSError as e:  # closing flushes what a failed write left in the buffer: a full
            if e is not exc:  # disk fails again there, and that error replaces the one passed in
                e.filename = e.filename or self.path
            raise


def one_hot(labels):
    """.mat labels 1..10 -> float32 (N, 10), column = label - 1 (pylearn2 <= Oct 2014, §6.3)."""
    labels = np.asarray(labels).ravel().astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise ValueError(f"SVHN labels must be 1..10, found {labels.min()}..{labels.max()}")
    return bc_datasets.one_hot(labels - 1)


def gather_images(sources, src, idx):
    """Images (n, 3, 32, 32) uint8 for output rows given by (src, idx); sources[s] is a .mat X of
    shape (32, 32, 3, N). The design matrix is in c01 order, i.e. X transposed to (N, 3, 32, 32)."""
    out = np.empty((len(idx), 3, 32, 32), dtype=np.uint8)
    for s, X in enumerate(sources):
        rows = np.nonzero(src == s)[0]
        if len(rows):
            # indexing the transposed view copies whole images (contiguous in loadmat's Fortran
            # order); np.take(X, ..., axis=3) is ~500x slower on the real layout
            out[rows] = X.transpose(3, 2, 0, 1)[idx[rows]]
    return out


def write_set(name, out_dir, sources, labels, src, idx, channels, chunk, inputs="binaryconnect"):
    """Writes <out_dir>/<name>_X.npy and <name>_y.npy for the output rows (src, idx) of `sources`
    (the .mat X arrays) and `labels` (their 1..10 label vectors), `chunk` images at a time;
    inputs="binarynet": the pixels scaled to [-1, 1] instead of GCN + LCN (§13.5)."""
    n = len(idx)
    n_chunks = -(-n // chunk)
    y = np.empty((n, 10), dtype=np.float32)
    for s, lab in enumerate(labels):
        rows = np.nonzero(src == s)[0]
        y[rows] = one_hot(np.asarray(lab).ravel()[idx[rows]])
    t0 = time.time()
    with AtomicNpyWriter(os.path.join(out_dir, f"{name}_X.npy"), (n, 3, 32, 32)) as wx, \
            AtomicNpyWriter(os.path.join(out_dir, f"{name}_y.npy"), (n, 10)) as wy:
        wy.write(y)
        for k, a in enumerate(range(0, n, chunk)):
            images = gather_images(sources, src[a:a + chunk], idx[a:a + chunk])
            wx.write(svhn_gcn_lcn(images, channels=channels) if inputs == "binaryconnect"
                     else bc_datasets.scale_pixels(images))
            print(f"{name}: chunk {k + 1}/{n_chunks} ({min(a + chunk, n)}/{n} images, "
                  f"{time.time() - t0:.0f} s)", flush=True)
    print(f"{name}: wrote {n} images to {out_dir} in {time.time() - t0:.1f} s", flush=True)


def usage_error(message):
    """Ends the script on an option that cannot work: one line, exit status 2 (argparse's code for
    a usage error), no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def parse_channels(text):
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        channels = ()
    if not channels or len(set(channels)) != len(channels) or any(c not in (0, 1, 2) for c in channels):
        usage_error(f"--lcn_channels={text}: give distinct channels among 0, 1, 2 separated by commas, "
                    f"e.g. 0 or 0,1,2")
    return channels


def check_split(files, y_train, y_extra):
    """The split takes n_valid_train / n_valid_extra images of EVERY label (pylearn2's rule); a file
    with fewer (a subset, a small test file) is an option problem, so say which options fix it."""
    fewest, short = {}, []
    for which, y, option, n in (("train", y_train, "n_valid_train", n_valid_train),
                                ("extra", y_extra, "n_valid_extra", n_valid_extra)):
        counts = np.bincount(np.asarray(y).ravel(), minlength=11)[1:11]
        label = int(counts.argmin()) + 1
        fewest[which] = int(counts.min())
        if fewest[which] < n:
            digit = " (digit 0)" if label == 10 else ""
            short.append(f"{files[which]} has {fewest[which]} images of label {label}{digit}, but "
                         f"--{option}={n} takes {n} of each label")
    if short:
        usage_error(f"too few images per label for the validation split: {'; '.join(short)}. "
                    f"These files allow at most --n_valid_train={fewest['train']} and "
                    f"--n_valid_extra={fewest['extra']}")


def make_output_dir(path):
    """Creates `path` and checks that files can be written there before hours of work."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as e:
        raise SystemExit(f"error: cannot write to SVHN_LOCAL_PATH={path}: {e.strerror or e}") from None


def main():
    t_start = time.time()
    # configure() checks the options' own limits (configurator.CHECKS); these two stay for callers
    # of main() that bypass it
    channels = parse_channels(lcn_channels)
    if chunk_size < 1:
        usage_error(f"--chunk_size={chunk_size}: must be at least 1")
    files = bc_datasets.svhn_mat_files(data_dir, verify_checksums=verify_checksums)

    X_train, y_train = bc_datasets.read_svhn_mat(files["train"])
    X_extra, y_extra = bc_datasets.read_svhn_mat(files["extra"])
    check_split(files, y_train, y_extra)
    make_output_dir(SVHN_LOCAL_PATH)
    print(f"SVHN: GCN + LCN on channel(s) {channels}" if inputs == "binaryconnect" else
          "SVHN: pixels scaled to [-1, 1] (BinaryNet)", f"writing to {SVHN_LOCAL_PATH}", flush=True)
    train_src, train_idx, valid_src, valid_idx = split_train_valid(
        y_train, y_extra, seed=seed, n_valid_train=n_valid_train, n_valid_extra=n_valid_extra)
    sources, labels = (X_train, X_extra), (y_train, y_extra)
    write_set("valid", SVHN_LOCAL_PATH, sources, labels, valid_src, valid_idx, channels, chunk_size,
              inputs)
    write_set("splitted_train", SVHN_LOCAL_PATH, sources, labels, train_src, train_idx, channels,
              chunk_size, inputs)
    del X_train, X_extra, sources  # free the 1.6 GB of extra before reading test

    X_test, y_test = bc_datasets.read_svhn_mat(files["test"])
    order = shuffle_order(len(y_test), seed=seed)
    write_set("test", SVHN_LOCAL_PATH, (X_test,), (y_test,), np.zeros(len(order), np.uint8), order,
              channels, chunk_size, inputs)
    print(f"SVHN preprocessing done in {time.time() - t_start:.1f} s", flush=True)


if __name__ == "__main__":
    # configure() runs here rather than at import, so that tests can import this module
    config = configure(globals())
    try:
        main()
    except bc_datasets.DatasetError as e:  # missing or corrupt: the message says what to do
        raise SystemExit(f"error: {e}")
    except OSError as e:  # e.g. a full disk while writing: the file and the reason, no traceback
        raise SystemExit(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror
                         else f"error: {e}") from None
    except KeyboardInterrupt:  # every file is written atomically: none is left half-written
        print("interrupted; the sets already written are complete, no partial file was left",
              file=sys.stderr)
        raise SystemExit(130) from None
