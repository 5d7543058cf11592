"""bc_datasets: the file readers and the MNIST / CIFAR-10 / SVHN loaders (the checksums and
downloads: test_dataset_files.py).

Expected numbers are computed here with numpy (§6.1 centring, §6.2 GCN + ZCA), never by the code
under test. The real-data tests use ../shared/data and are skipped when it is absent.
"""
import contextlib
import gzip
import hashlib
import io
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

import bc_datasets
import dataset_files
import preprocessing
from dataset_files import DatasetError
from fake_data import (idx_bytes, write_cifar10_batches, write_fake_cifar10, write_fake_mnist,
                       write_fake_svhn_mat, write_idx)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

OFFICIAL_MNIST_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                      "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432"}


def md5_of(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def one_hot(labels):
    out = np.zeros((len(labels), 10), dtype=np.float32)
    out[np.arange(len(labels)), labels] = 1
    return out


# ---------------------------------------------------------------------------------------------------------
# idx reader

@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_any_shape_and_type(tmp_path, compress):
    rng = np.random.default_rng(0)
    arrays = {"images": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
              "labels": rng.integers(0, 10, 13, dtype=np.uint8),
              "odd": rng.integers(-1000, 1000, (5, 3, 2), dtype=np.int32).astype(">i4"),
              "floats": rng.standard_normal((3, 4)).astype(">f4"),
              "empty": np.zeros((0, 28, 28), dtype=np.uint8)}
    for name, array in arrays.items():
        write_idx(tmp_path / name, array, compress=compress)
        got = bc_datasets.read_idx(tmp_path / name)
        assert got.shape == array.shape
        assert got.dtype == array.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got, array)


def test_read_idx_tells_gzip_by_magic_not_name(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    (tmp_path / "raw.gz").write_bytes(idx_bytes(array))
    (tmp_path / "zipped").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(bc_datasets.read_idx(tmp_path / "raw.gz"), array)
    np.testing.assert_array_equal(bc_datasets.read_idx(tmp_path / "zipped"), array)


@pytest.mark.parametrize("damage", ["truncated_gzip", "truncated_raw", "bad_magic", "short_header"])
def test_read_idx_damaged_file_names_it(tmp_path, damage):
    data = idx_bytes(np.ones((3, 28, 28), dtype=np.uint8))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    if damage == "truncated_gzip":
        zipped = gzip.compress(data)
        path.write_bytes(zipped[:len(zipped) // 2])
    elif damage == "truncated_raw":
        path.write_bytes(data[:-10])
    elif damage == "bad_magic":
        path.write_bytes(b"<html>not found</html>")
    else:
        path.write_bytes(data[:6])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz") as info:
        bc_datasets.read_idx(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# MNIST on tiny fake files

def expected_mnist(images, train_set_size=None):
    """§6.1: pixels/255, minus the per-pixel mean of the whole file; then slice."""
    X = images.astype(np.float64) / 255
    X = (X - X.mean(axis=0)).reshape(-1, 1, 28, 28)
    return X


@pytest.mark.parametrize("compress", [True, False])
def test_load_mnist_centres_like_pylearn2(tmp_path, compress):
    raw = write_fake_mnist(tmp_path, n_train=60, n_test=10, seed=1, compress=compress)
    train, valid, test = bc_datasets.load_mnist(tmp_path, train_set_size=50, verify_checksums=False,
                                                download=False)
    X_all = expected_mnist(raw["train_images"])  # train and valid share the mean of all 60
    for (X, y), X_ref, labels in ((train, X_all[:50], raw["train_labels"][:50]),
                                  (valid, X_all[50:], raw["train_labels"][50:]),
                                  (test, expected_mnist(raw["test_images"]), raw["test_labels"])):
        assert X.dtype == np.float32 and y.dtype == np.float32
        assert X.flags.c_contiguous and X.shape == X_ref.shape
        np.testing.assert_allclose(X, X_ref, atol=2e-7)
        np.testing.assert_array_equal(y, one_hot(labels))
    # The valid rows are not centred on their own: their mean is not zero, the mean of all 60 is.
    assert np.abs(np.concatenate([train[0], valid[0]]).mean(axis=0)).max() < 1e-6
    assert np.abs(valid[0].mean(axis=0)).max() > 1e-3


def test_load_mnist_checks_official_md5(tmp_path):
    write_fake_mnist(tmp_path)
    with pytest.raises(DatasetError) as info:
        bc_datasets.load_mnist(tmp_path, download=False)
    message = str(info.value)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    assert "corrupt" in message and str(path) in message
    assert md5_of(path) in message and "f68b3c2dcbeaaa9fbdd348bbdeb94873" in message
    assert "verify_checksums=False" in message


def test_load_mnist_missing_lists_every_file(tmp_path):
    with pytest.raises(DatasetError) as info:
        bc_datasets.load_mnist(tmp_path / "mnist", download=False)
    message = str(info.value)
    assert str(tmp_path / "mnist") in message
    for name in dataset_files.MNIST_FILES:
        assert name in message
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in message
    # ... and that files under other names are found by prefix, unchecked
    for pattern in ("train*images*idx3*", "train*labels*idx1*", "t10k*images*idx3*",
                    "t10k*labels*idx1*"):
        assert pattern in message
    assert "found by prefix" in message and "MD5 is not checked" in message

    write_fake_mnist(tmp_path / "some")
    (tmp_path / "some" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as info:
        bc_datasets.load_mnist(tmp_path / "some", verify_checksums=False, download=False)
    message = str(info.value)
    assert "missing in " + str(tmp_path / "some") + ": t10k-images-idx3-ubyte.gz." in message
    assert "t10k*images*idx3*" in message and "train*images*idx3*" not in message


def rename_mnist(dir, old_new):
    for old, new in old_new.items():
        (dir / old).rename(dir / new)


SUBSET_NAMES = {"t10k-images-idx3-ubyte.gz": "t10k-8000-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz": "t10k-8000-labels-idx1-ubyte.gz"}


def assert_same_sets(got, want):
    for (X, y), (X0, y0) in zip(got, want):
        np.testing.assert_array_equal(X, X0)
        np.testing.assert_array_equal(y, y0)


def test_load_mnist_finds_other_names_by_prefix(tmp_path, capsys):
    write_fake_mnist(tmp_path / "official", n_train=30, n_test=10, seed=2)
    want = bc_datasets.load_mnist(tmp_path / "official", train_set_size=20, verify_checksums=False,
                                  download=False)
    write_fake_mnist(tmp_path / "d", n_train=30, n_test=10, seed=2)
    rename_mnist(tmp_path / "d", {"train-images-idx3-ubyte.gz": "train-images.idx3-ubyte.gz",
                                  "train-labels-idx1-ubyte.gz": "train-labels.idx1-ubyte.gz",
                                  **SUBSET_NAMES})
    # An interrupted download's temporary file is hidden: never taken for a subset.
    (tmp_path / "d" / ".t10k-images-idx3-ubyte.gz.tmp").write_bytes(b"partial")
    capsys.readouterr()
    # verify_checksums=True: the fake files' MD5s are not the official ones, and none is checked,
    # since none has its official name.
    got = bc_datasets.load_mnist(tmp_path / "d", train_set_size=20, download=False)
    assert_same_sets(got, want)
    notes = capsys.readouterr().out.splitlines()
    assert len(notes) == 4
    for line, new in zip(notes, ["train-images.idx3-ubyte.gz", "train-labels.idx1-ubyte.gz",
                                 *SUBSET_NAMES.values()]):
        assert str(tmp_path / "d" / new) in line and "MD5 is not checked" in line


def test_load_mnist_official_name_then_uncompressed_then_prefix(tmp_path, capsys):
    write_fake_mnist(tmp_path, n_train=30, n_test=10, seed=2)
    want = bc_datasets.load_mnist(tmp_path, train_set_size=20, verify_checksums=False, download=False)
    # Candidates by prefix do not matter (nor are they ambiguous) where the official file is.
    write_fake_mnist(tmp_path / "other", n_train=30, n_test=10, seed=3)
    for name in dataset_files.MNIST_FILES:
        for prefix in ("copy1-", "copy2-"):
            copy = tmp_path / name.replace("-", f"-{prefix}", 1)  # e.g. train-copy1-images-...
            copy.write_bytes((tmp_path / "other" / name).read_bytes())
    capsys.readouterr()
    assert_same_sets(bc_datasets.load_mnist(tmp_path, train_set_size=20, verify_checksums=False,
                                            download=False), want)
    # An uncompressed copy (official name without '.gz') comes before the files found by prefix.
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name[:-3]).write_bytes(gzip.decompress((tmp_path / name).read_bytes()))
        (tmp_path / name).unlink()
    assert_same_sets(bc_datasets.load_mnist(tmp_path, train_set_size=20, verify_checksums=False,
                                            download=False), want)
    assert capsys.readouterr().out == ""


def test_load_mnist_ambiguous_prefix_names_the_candidates(tmp_path):
    write_fake_mnist(tmp_path)
    rename_mnist(tmp_path, SUBSET_NAMES)
    other = tmp_path / "t10k-2000-images-idx3-ubyte.gz"
    other.write_bytes((tmp_path / "t10k-8000-images-idx3-ubyte.gz").read_bytes())
    with pytest.raises(DatasetError) as info:
        bc_datasets.load_mnist(tmp_path, verify_checksums=False, download=False)
    message = str(info.value)
    assert "t10k*images*idx3*" in message and str(tmp_path) in message
    assert "t10k-2000-images-idx3-ubyte.gz, t10k-8000-images-idx3-ubyte.gz" in message
    assert "files=" in message
    # Naming the one to use settles it.
    bc_datasets.load_mnist(tmp_path, train_set_size=50, verify_checksums=False, download=False,
                           files={"t10k-images-idx3-ubyte.gz": other})


def test_load_mnist_files_given_explicitly(tmp_path, capsys):
    raw = write_fake_mnist(tmp_path / "a", n_train=30, n_test=10, seed=2)
    rename_mnist(tmp_path / "a", SUBSET_NAMES)
    files = {name: tmp_path / "a" / SUBSET_NAMES.get(name, name) for name in dataset_files.MNIST_FILES}
    capsys.readouterr()
    # data_dir is empty and download=False: every file comes from files=
    train, valid, test = bc_datasets.load_mnist(tmp_path / "empty", train_set_size=20, download=False,
                                                verify_checksums=False, files=files)
    np.testing.assert_array_equal(test[1], one_hot(raw["test_labels"]))
    notes = capsys.readouterr().out
    assert notes.count("MD5 is not checked") == 2 and "t10k-8000-labels-idx1-ubyte.gz" in notes
    assert not (tmp_path / "empty").exists()
    # A file given under its official name is checked like one found in data_dir.
    with pytest.raises(DatasetError, match="corrupt: .*train-images-idx3-ubyte.gz"):
        bc_datasets.load_mnist(tmp_path / "empty", download=False, files=files)
    with pytest.raises(DatasetError, match="nothing.gz, given in files= for t10k-images"):
        bc_datasets.load_mnist(tmp_path / "a", download=False, verify_checksums=False,
                               files={"t10k-images-idx3-ubyte.gz": tmp_path / "nothing.gz"})
    with pytest.raises(DatasetError, match="official names as keys .* 'test-images'"):
        bc_datasets.load_mnist(tmp_path / "a", download=False,
                               files={"test-images": files["t10k-images-idx3-ubyte.gz"]})


def test_load_mnist_truncated_file_names_it(tmp_path):
    write_fake_mnist(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz"):
        bc_datasets.load_mnist(tmp_path, verify_checksums=False, download=False)


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10 on a tiny fake dataset

def reference_gcn(data, scale=55.):
    """§6.2 step 2 in float64: per image minus its mean, divided by its L2 norm / scale."""
    X = data.astype(np.float64)
    X -= X.mean(axis=1, keepdims=True)
    divisor = np.sqrt((X ** 2).sum(axis=1)) / scale
    divisor[divisor < 1e-8] = 1.
    return X / divisor[:, None]


def reference_zca_few_rows(G_train, G_test, bias=0.1):
    """§6.2 step 3 for N < D, without a D x D eigendecomposition: with A = G_train - mu = U S V^T,
    C + bias I = V diag(s^2/N + bias) V^T + bias (I - V V^T), so
    P = V diag((s^2/N + bias)^-1/2) V^T + (I - V V^T) / sqrt(bias)."""
    mu = G_train.mean(axis=0)
    _, s, Vt = np.linalg.svd(G_train - mu, full_matrices=False)
    f = 1 / np.sqrt(s ** 2 / len(G_train) + bias)

    def apply(G):
        B = G - mu
        BV = B @ Vt.T
        return (BV * f) @ Vt + (B - BV @ Vt) / np.sqrt(bias)

    return apply(G_train), apply(G_test)


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    """The same tiny CIFAR-10 as an extracted directory and as a tarball, loaded once (that builds the
    cache, the slow step: a 3072 x 3072 eigendecomposition)."""
    root = tmp_path_factory.mktemp("cifar")
    raw = write_fake_cifar10(root / "dir", n_per_batch=20, n_test=15, seed=3)
    write_fake_cifar10(root / "tar", n_per_batch=20, n_test=15, seed=3, as_tar=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sets = bc_datasets.load_cifar10(root / "dir", train_set_size=90, verify_checksums=False,
                                        download=False, cache_dir=root / "cache")
    return {"root": root, "raw": raw, "sets": sets, "stdout": out.getvalue()}


def test_cifar10_gcn_zca_matches_reference(fake_cifar):
    raw, (train, valid, test) = fake_cifar["raw"], fake_cifar["sets"]
    assert "Building" in fake_cifar["stdout"]
    Z_train, Z_test = reference_zca_few_rows(reference_gcn(raw["train_data"]),
                                             reference_gcn(raw["test_data"]))
    Z_train, Z_test = Z_train.reshape(-1, 3, 32, 32), Z_test.reshape(-1, 3, 32, 32)
    for (X, y), X_ref, labels in ((train, Z_train[:90], raw["train_labels"][:90]),
                                  (valid, Z_train[90:], raw["train_labels"][90:]),
                                  (test, Z_test, raw["test_labels"])):
        assert X.dtype == np.float32 and X.flags.c_contiguous and X.shape == X_ref.shape
        np.testing.assert_allclose(X, X_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(y, one_hot(labels))


def test_cifar10_second_call_hits_the_cache(fake_cifar, capsys):
    root = fake_cifar["root"]
    sets = bc_datasets.load_cifar10(root / "dir", train_set_size=90, verify_checksums=False,
                                    download=False, cache_dir=root / "cache")
    printed = capsys.readouterr().out
    assert "Loading" in printed and "Building" not in printed
    for (X, y), (X0, y0) in zip(sets, fake_cifar["sets"]):
        np.testing.assert_array_equal(X, X0)
        np.testing.assert_array_equal(y, y0)
    entries = list((root / "cache").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no temporary left behind
    # The cache holds all 100 training rows: another split needs no rebuild.
    train, valid, _ = bc_datasets.load_cifar10(root / "dir", train_set_size=60, verify_checksums=False,
                                               download=False, cache_dir=root / "cache")
    assert "Building" not in capsys.readouterr().out
    np.testing.assert_array_equal(np.concatenate([train[0], valid[0]]),
                                  np.concatenate([fake_cifar["sets"][0][0], fake_cifar["sets"][1][0]]))


def test_cifar10_tarball_same_batches_same_cache(fake_cifar, capsys):
    root = fake_cifar["root"]
    sets = bc_datasets.load_cifar10(root / "tar", train_set_size=90, verify_checksums=False,
                                    download=False, cache_dir=root / "cache")
    assert "Building" not in capsys.readouterr().out  # the cache key is the batches' content
    for (X, _), (X0, _) in zip(sets, fake_cifar["sets"]):
        np.testing.assert_array_equal(X, X0)


def identity_preprocessing(train, test):
    return train.astype(np.float32), test.astype(np.float32)


@pytest.mark.parametrize("as_tar,bytes_keys", [(False, False), (True, False), (False, True)])
def test_cifar10_layout_and_order(tmp_path, monkeypatch, as_tar, bytes_keys):
    """With the preprocessing replaced by the identity: rows in file order, c01 rows reshaped to bc01."""
    monkeypatch.setattr(bc_datasets, "_gcn_zca", identity_preprocessing)
    raw = write_fake_cifar10(tmp_path, n_per_batch=4, n_test=6, seed=5, as_tar=as_tar, bytes_keys=bytes_keys)
    train, valid, test = bc_datasets.load_cifar10(tmp_path, train_set_size=17, verify_checksums=False,
                                                  download=False)
    assert (tmp_path / "cache").is_dir()  # the default cache_dir
    X = raw["train_data"].reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(train[0], X[:17])
    np.testing.assert_array_equal(valid[0], X[17:])
    np.testing.assert_array_equal(test[0], raw["test_data"].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(valid[1], one_hot(raw["train_labels"][17:]))
    assert test[0][0, 1, 0, 0] == raw["test_data"][0, 1024]  # channel 1 starts at value 1024


def test_cifar10_cache_key_follows_content(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bc_datasets, "_gcn_zca", identity_preprocessing)
    kwargs = dict(train_set_size=10, verify_checksums=False, download=False, cache_dir=tmp_path / "cache")
    write_fake_cifar10(tmp_path / "d", n_per_batch=4, n_test=4, seed=0)
    bc_datasets.load_cifar10(tmp_path / "d", **kwargs)
    raw = write_fake_cifar10(tmp_path / "d", n_per_batch=4, n_test=4, seed=1)
    capsys.readouterr()
    _, _, test = bc_datasets.load_cifar10(tmp_path / "d", **kwargs)
    assert "Building" in capsys.readouterr().out
    np.testing.assert_array_equal(test[0], raw["test_data"].reshape(-1, 3, 32, 32))
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_cifar10_unwritable_cache_is_not_fatal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bc_datasets, "_gcn_zca", identity_preprocessing)
    raw = write_fake_cifar10(tmp_path, n_per_batch=4, n_test=4)
    (tmp_path / "not_a_dir").write_text("")
    _, _, test = bc_datasets.load_cifar10(tmp_path, train_set_size=10, verify_checksums=False, download=False,
                                          cache_dir=tmp_path / "not_a_dir" / "cache")
    assert "could not write the cache" in capsys.readouterr().out
    np.testing.assert_array_equal(test[0], raw["test_data"].reshape(-1, 3, 32, 32))


def test_cifar10_checks_official_md5(tmp_path):
    write_fake_cifar10(tmp_path / "d", n_per_batch=2, n_test=2)
    with pytest.raises(DatasetError, match="corrupt: .*data_batch_1 has MD5") as info:
        bc_datasets.load_cifar10(tmp_path / "d", download=False)
    assert "c99cafc152244af753f735de768cd75f" in str(info.value)
    write_fake_cifar10(tmp_path / "t", n_per_batch=2, n_test=2, as_tar=True)
    with pytest.raises(DatasetError, match="c58f30108f718f92721af3b95e74349a") as info:
        bc_datasets.load_cifar10(tmp_path / "t", download=False)
    assert str(tmp_path / "t" / "cifar-10-python.tar.gz") in str(info.value)


def test_cifar10_truncated_batch_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bc_datasets, "_gcn_zca", identity_preprocessing)
    write_fake_cifar10(tmp_path, n_per_batch=4, n_test=4)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DatasetError, match="corrupt") as info:
        bc_datasets.load_cifar10(tmp_path, train_set_size=10, verify_checksums=False, download=False)
    assert str(path) in str(info.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_cifar10_truncated_tarball_names_it(tmp_path):
    write_fake_cifar10(tmp_path, n_per_batch=4, n_test=4, as_tar=True)
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(path.read_bytes()[:20000])
    with pytest.raises(DatasetError, match="corrupt") as info:
        bc_datasets.load_cifar10(tmp_path, train_set_size=10, verify_checksums=False, download=False)
    assert str(path) in str(info.value)


def test_cifar10_batch_with_foreign_objects_is_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": shutil.rmtree, "labels": []}, protocol=2))
    with pytest.raises(DatasetError, match="unexpected object shutil.rmtree") as info:
        bc_datasets.read_cifar10_batch(path)
    assert str(path) in str(info.value)


def test_cifar10_missing_says_where_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as info:
        bc_datasets.load_cifar10(tmp_path / "cifar", download=False)
    message = str(info.value)
    assert str(tmp_path / "cifar") in message and "cifar-10-python.tar.gz" in message
    assert "cifar-10-batches-py" in message and "https://www.cs.toronto.edu/~kriz/" in message


# ---------------------------------------------------------------------------------------------------------
# SVHN

def test_svhn_mat_files_and_reader(tmp_path):
    raw = write_fake_svhn_mat(tmp_path, n_train=40, n_test=20, n_extra=30)
    files = dataset_files.svhn_mat_files(tmp_path, verify_checksums=False, download=False)
    assert files == {w: tmp_path / f"{w}_32x32.mat" for w in ("train", "test", "extra")}
    for which, (X_ref, y_ref) in raw.items():
        X, y = bc_datasets.read_svhn_mat(files[which])
        assert X.dtype == np.uint8 and X.shape == (32, 32, 3, len(y_ref))
        assert y.dtype == np.uint8 and y.shape == (len(y_ref),)
        np.testing.assert_array_equal(X, X_ref)
        np.testing.assert_array_equal(y, y_ref)
        assert y.min() == 1 and y.max() == 10  # digit 0 is stored as 10


def test_svhn_mat_files_checks_md5_and_reports_missing(tmp_path):
    write_fake_svhn_mat(tmp_path, n_train=10, n_test=10, n_extra=10)
    with pytest.raises(DatasetError, match="corrupt: .*e26dedcc434d2e4c54c9b2d4a06d8373"):
        dataset_files.svhn_mat_files(tmp_path, download=False)
    with pytest.raises(DatasetError) as info:
        dataset_files.svhn_mat_files(tmp_path / "none", download=False)
    message = str(info.value)
    assert str(tmp_path / "none") in message and "http://ufldl.stanford.edu/housenumbers/" in message
    for name in ("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"):
        assert name in message


def test_read_svhn_mat_truncated_names_it(tmp_path):
    write_fake_svhn_mat(tmp_path, n_train=20, n_test=10, n_extra=10)
    path = tmp_path / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[:30000])
    with pytest.raises(DatasetError, match="corrupt") as info:
        bc_datasets.read_svhn_mat(path)
    assert str(path) in str(info.value)


def write_svhn_npy(path, sizes=(("splitted_train", 12), ("valid", 5), ("test", 7))):
    rng = np.random.default_rng(0)
    out = {}
    for name, n in sizes:
        X = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        y = one_hot(rng.integers(0, 10, n))
        np.save(path / f"{name}_X.npy", X)
        np.save(path / f"{name}_y.npy", y)
        out[name] = (X, y)
    return out


def test_load_svhn_memory_maps_X(tmp_path):
    ref = write_svhn_npy(tmp_path)
    sets = bc_datasets.load_svhn(tmp_path)
    for (X, y), name in zip(sets, ("splitted_train", "valid", "test")):
        assert isinstance(X, np.memmap) and X.dtype == np.float32
        assert not isinstance(y, np.memmap) and y.dtype == np.float32
        np.testing.assert_array_equal(X, ref[name][0])
        np.testing.assert_array_equal(y, ref[name][1])


def test_load_svhn_missing_or_bad_files(tmp_path):
    with pytest.raises(DatasetError) as info:
        bc_datasets.load_svhn(tmp_path / "svhn")
    message = str(info.value)
    assert "python svhn_preprocessing.py" in message and str(tmp_path / "svhn") in message
    assert "splitted_train_X.npy" in message and "test_y.npy" in message
    write_svhn_npy(tmp_path)
    np.save(tmp_path / "valid_y.npy", np.zeros((4, 10), np.float32))  # 5 images, 4 labels
    with pytest.raises(DatasetError, match="valid_X.npy"):
        bc_datasets.load_svhn(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Real data (../shared/data)

def read_idx_gz(path):
    data = gzip.decompress(Path(path).read_bytes())
    ndim = data[3]
    shape = np.frombuffer(data, ">u4", ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def test_real_mnist(capsys):
    src = SHARED_DATA / "mnist"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        assert md5_of(src / name) == OFFICIAL_MNIST_MD5[name]  # the README's claim

    # The folder as it is: the official train files (MD5-checked) and the 8000-image test subset,
    # found by its prefix and, not being the official file, not checked.
    train, valid, test = bc_datasets.load_mnist(src, download=False)
    notes = capsys.readouterr().out.splitlines()
    assert len(notes) == 2
    for line, kind in zip(notes, ("images-idx3", "labels-idx1")):
        assert f"{src}/t10k-8000-{kind}-ubyte.gz as t10k-{kind}-ubyte.gz" in line
        assert "MD5 is not checked" in line
    assert [len(s[0]) for s in (train, valid, test)] == [50000, 10000, 8000]
    assert train[0].shape[1:] == (1, 28, 28) and train[0].dtype == np.float32
    counts = (train[1].sum(0) + valid[1].sum(0)).astype(int)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test[1].sum(0).astype(int).tolist() == [801, 882, 814, 821, 790, 738, 771, 822, 758, 803]

    images = read_idx_gz(src / "train-images-idx3-ubyte.gz").astype(np.float64) / 255
    mean = images.mean(axis=0)
    rows = [0, 1, 49999, 50000, 59999]
    got = np.concatenate([train[0], valid[0]])[rows, 0]
    np.testing.assert_allclose(got, images[rows] - mean, atol=1e-6)
    test_images = read_idx_gz(src / "t10k-8000-images-idx3-ubyte.gz").astype(np.float64) / 255
    np.testing.assert_allclose(test[0][:3, 0], test_images[:3] - test_images.mean(axis=0), atol=1e-6)


@pytest.mark.slow
def test_real_cifar10(tmp_path, monkeypatch):
    src = SHARED_DATA / "cifar10"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")

    def c01(npz):  # README: NHWC images -> the official (N, 3072) R, G, B planes
        images = npz["images"]
        return images.transpose(0, 3, 1, 2).reshape(len(images), 3072), npz["labels"]

    batches = [c01(np.load(src / f"data_batch_{i}.npz")) for i in range(1, 6)]
    test_data, test_labels = c01(np.load(src / "test_batch_8000.npz"))
    write_cifar10_batches(tmp_path, batches, (test_data, test_labels))
    train_data = np.concatenate([d for d, _ in batches])
    train_labels = np.concatenate([l for _, l in batches])

    # Record what ZCA is fitted on (the GCN output) and what it returns, to check both against numpy.
    seen = {}
    real_fit = preprocessing.zca_fit

    def spy_fit(X, filter_bias=0.1):
        seen["G"], seen["filter_bias"] = np.array(X, copy=True), filter_bias
        seen["mean"], seen["P"] = real_fit(X, filter_bias=filter_bias)
        return seen["mean"], seen["P"]

    monkeypatch.setattr(preprocessing, "zca_fit", spy_fit)
    start = time.time()
    train, valid, test = bc_datasets.load_cifar10(tmp_path, verify_checksums=False, download=False,
                                                  cache_dir=tmp_path / "cache")
    print(f"\nload_cifar10 on the real 50000 + 8000 images (GCN + ZCA, cache written): "
          f"{time.time() - start:.1f} s")

    assert [len(s[0]) for s in (train, valid, test)] == [45000, 5000, 8000]
    for X, _ in (train, valid, test):
        assert X.shape[1:] == (3, 32, 32) and X.dtype == np.float32 and X.flags.c_contiguous
    np.testing.assert_array_equal(train[1].argmax(1), train_labels[:45000])
    np.testing.assert_array_equal(valid[1].argmax(1), batches[4][1][5000:])  # last 5000 of batch 5
    np.testing.assert_array_equal(test[1].argmax(1), test_labels)

    # GCN: every training image has norm 55 and matches the float64 reference.
    G = seen["G"]
    assert G.shape == (50000, 3072) and seen["filter_bias"] == 0.1
    for a in range(0, 50000, 10000):
        block = G[a:a + 10000].astype(np.float64)
        np.testing.assert_allclose(np.linalg.norm(block, axis=1), 55., rtol=1e-5)
        np.testing.assert_allclose(block, reference_gcn(train_data[a:a + 10000]), atol=1e-5)

    # ZCA: mean = per-feature mean; P symmetric with P (C + 0.1 I) P = I, checked on random vectors
    # (C v needs only products with the centred data, no 3072 x 3072 eigendecomposition here).
    mean, P = seen["mean"], seen["P"]
    np.testing.assert_allclose(mean, G.mean(axis=0, dtype=np.float64), atol=1e-9)
    np.testing.assert_allclose(P, P.T, atol=1e-9)
    V = np.random.default_rng(0).standard_normal((3072, 4))
    CV = 0.1 * V
    for a in range(0, 50000, 10000):
        A = G[a:a + 10000].astype(np.float64) - mean
        CV += A.T @ (A @ V) / 50000
    np.testing.assert_allclose(P @ (P @ CV), V, atol=1e-6 * np.abs(V).max())
    assert (np.einsum("ij,ij->j", V, P @ V) > 0).all()

    # The returned arrays are (G - mean) @ P, for the training rows and the test rows alike.
    rows = np.sort(np.random.default_rng(1).choice(50000, 300, replace=False))
    whitened = np.concatenate([train[0][rows[rows < 45000]], valid[0][rows[rows >= 45000] - 45000]])
    np.testing.assert_allclose(whitened.reshape(300, 3072), (G[rows].astype(np.float64) - mean) @ P,
                               atol=1e-3)
    G_test = reference_gcn(test_data[:300])
    np.testing.assert_allclose(test[0][:300].reshape(300, 3072), (G_test - mean) @ P, atol=1e-3)

    # Through the real loader and preprocessing, a reduced BinaryConnect CNN (the §4.3 layer
    # order, widths 16-32-64, FC 128) trained for 2 epochs on the first 10000 training images must
    # beat chance (90 % error) by a wide margin. Deterministic BC: stochastic BC's sampling noise
    # keeps a net this small near chance for its first epochs (measured: 89 % after 2 epochs),
    # since its test-time real weights meet BN statistics gathered with sampled ones (§3).
    # 10000 images rather than 5000: with 5000 (200 steps) the test error was 64 % on one CPU and
    # 73.6 % on another for the same code, 70.9 % after later changes to the training code (float
    # rounding, amplified by so short a training): too close to the bound. Measured on this project's 2-core CPU, test error after 2 epochs: 57.3 % (seed 1234,
    # the one used here), 55.2 % and 52.2 % (seeds 1 and 2); validation error 57.5, 57.1, 52.8 %.
    import rundir
    import training
    from fake_data import script_config
    from models import cnn
    run = rundir.start_run("cifar10", script_config(
        "cifar10", seed=1234, device="cpu", resume="", out_dir=str(tmp_path / "run"),
        batch_size=50, LR_start=0.003, LR_fin=0.003 * 0.5 ** 2, num_epochs=2))
    try:
        model = cnn(widths=(16, 32, 64), fc_units=128, stochastic=False)
        history = training.train(model, ((train[0][:10000], train[1][:10000]), valid,
                                         (test[0][:2000], test[1][:2000])), run)
    finally:
        sys.stdout.file.close()
        sys.stdout = sys.stdout.stream
    print(f"reduced CNN after 2 epochs: validation error {history[-1]['val_err']:.2f} %, "
          f"test error {history[-1]['test_err']:.2f} %")
    assert history[-1]["test_err"] < 70.
