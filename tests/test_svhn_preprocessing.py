"""svhn_preprocessing.py end to end on tiny fake .mat files in the official layout (§6.3)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
import preprocessing as pp
import svhn_preprocessing as sp
from fake_data import write_fake_svhn_mat

N_TRAIN, N_TEST, N_EXTRA = 100, 23, 60  # 10 / 6 images per label in train / extra
K_TRAIN, K_EXTRA = 5, 3                 # valid images per label from train / extra
SETS = ("splitted_train", "valid", "test")


def run_script(data_dir, out_dir, *extra):
    cmd = [sys.executable, "svhn_preprocessing.py", f"--data_dir={data_dir}",
           f"--SVHN_LOCAL_PATH={out_dir}", f"--n_valid_train={K_TRAIN}", f"--n_valid_extra={K_EXTRA}",
           "--verify_checksums=False", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


def load_outputs(out_dir):
    return {s: (np.load(out_dir / f"{s}_X.npy"), np.load(out_dir / f"{s}_y.npy")) for s in SETS}


def as_images(X):
    # the design matrix is c01: image n, channel c, row r, column q is the .mat's X[r, q, c, n]
    n = X.shape[3]
    out = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for c in range(3):
        out[:, c] = np.moveaxis(X[:, :, c, :], 2, 0)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("mat")
    raw = write_fake_svhn_mat(data_dir, n_train=N_TRAIN, n_test=N_TEST, n_extra=N_EXTRA, seed=0)
    out = {}
    for name, args in (("chunk7", ["--chunk_size=7"]), ("big", ["--chunk_size=1000"]),
                       ("all_channels", ["--chunk_size=7", "--lcn_channels=0,1,2"])):
        out_dir = tmp_path_factory.mktemp(name)
        result = run_script(data_dir, out_dir, *args)
        assert result.returncode == 0, result.stdout + result.stderr
        out[name] = (out_dir, result.stdout)
    return raw, out


def test_shapes_counts_and_labels(runs):
    raw, out = runs
    out_dir, stdout = out["chunk7"]
    arrays = load_outputs(out_dir)
    n_valid = 10 * (K_TRAIN + K_EXTRA)
    sizes = {"splitted_train": N_TRAIN + N_EXTRA - n_valid, "valid": n_valid, "test": N_TEST}
    for s in SETS:
        X, y = arrays[s]
        assert X.dtype == np.float32 and X.shape == (sizes[s], 3, 32, 32) and X.flags.c_contiguous
        assert y.dtype == np.float32 and y.shape == (sizes[s], 10)
        assert set(np.unique(y)) == {0., 1.} and np.all(y.sum(axis=1) == 1)
        assert np.all(np.isfinite(X))
    assert sorted(os.listdir(out_dir)) == sorted(f"{s}_{a}.npy" for s in SETS for a in "Xy")
    assert "splitted_train: chunk 12/12" in stdout and "test: chunk 4/4" in stdout  # 80 / 7, 23 / 7


def test_values_split_and_order(runs):
    raw, out = runs
    arrays = load_outputs(out["chunk7"][0])
    labels = {w: raw[w][1] for w in raw}
    processed = {w: pp.svhn_gcn_lcn(as_images(raw[w][0])) for w in raw}
    where = {}
    for w in ("train", "extra"):
        for i, img in enumerate(processed[w]):
            where[img.tobytes()] = (w, i)
    assert len(where) == N_TRAIN + N_EXTRA

    found = {}
    for s in ("splitted_train", "valid"):
        X, y = arrays[s]
        rows = [where[img.tobytes()] for img in X]  # KeyError: a row is not a processed source image
        found[s] = rows
        for (w, i), onehot in zip(rows, y):
            assert onehot.argmax() == labels[w][i] - 1  # column = label - 1: digit 0 (10) -> column 9
    train_rows, valid_rows = set(found["splitted_train"]), set(found["valid"])
    assert len(train_rows) == len(found["splitted_train"]) and len(valid_rows) == len(found["valid"])
    assert not train_rows & valid_rows
    assert train_rows | valid_rows == set(where.values())
    for label in range(1, 11):
        assert sum(w == "train" and labels[w][i] == label for w, i in valid_rows) == K_TRAIN
        assert sum(w == "extra" and labels[w][i] == label for w, i in valid_rows) == K_EXTRA
    assert any(labels[w][i] == 10 for w, i in valid_rows)

    # the order is the one split_train_valid gives (tested on its own in test_preprocessing.py)
    ts, ti, vs, vi = pp.split_train_valid(labels["train"], labels["extra"],
                                          n_valid_train=K_TRAIN, n_valid_extra=K_EXTRA)
    names = ("train", "extra")
    assert found["splitted_train"] == [(names[s], i) for s, i in zip(ts, ti)]
    assert found["valid"] == [(names[s], i) for s, i in zip(vs, vi)]

    # test: every image, in pylearn2's make_data order (a fresh RandomState(322) shuffles range(n))
    order = list(range(N_TEST))
    np.random.RandomState(322).shuffle(order)
    X, y = arrays["test"]
    np.testing.assert_array_equal(X, processed["test"][order])
    np.testing.assert_array_equal(y.argmax(axis=1), labels["test"][order].astype(int) - 1)
    # channel 0 is LCN'd, channels 1 and 2 keep their GCN values (the original's quirk)
    gcn = pp.global_contrast_normalize(as_images(raw["test"][0]).reshape(N_TEST, -1).astype(np.float32))
    np.testing.assert_array_equal(X[:, 1:], gcn.reshape(-1, 3, 32, 32)[order, 1:])


def test_chunk_size_does_not_change_the_files(runs):
    raw, out = runs
    for s in SETS:
        for a in "Xy":
            small = (out["chunk7"][0] / f"{s}_{a}.npy").read_bytes()
            big = (out["big"][0] / f"{s}_{a}.npy").read_bytes()
            assert small == big, f"{s}_{a}.npy differs between chunk_size 7 and 1000"


def test_all_channels_option(runs):
    raw, out = runs
    X = np.load(out["all_channels"][0] / "test_X.npy")
    order = pp.shuffle_order(N_TEST)
    want = pp.lecun_lcn(pp.global_contrast_normalize(
        as_images(raw["test"][0]).reshape(N_TEST, -1)).reshape(-1, 3, 32, 32), channels=(0, 1, 2))
    np.testing.assert_array_equal(X, want[order])
    quirk = np.load(out["chunk7"][0] / "test_X.npy")
    np.testing.assert_array_equal(X[:, 0], quirk[:, 0])
    assert np.abs(X[:, 1:]).mean() > 10 * np.abs(quirk[:, 1:]).mean()  # LCN scale vs GCN scale


def test_bad_arguments(tmp_path):
    result = run_script(tmp_path, tmp_path / "out", "--lcn_channels=0,3")
    assert result.returncode == 2 and "lcn_channels" in result.stderr
    result = run_script(tmp_path / "nowhere", tmp_path / "out", "--chunk_size=0")
    assert result.returncode == 2 and "chunk_size" in result.stderr


def one_line_error(result):
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, short", [
    (["--n_valid_train=11"], ["train"]),  # the fake train file has 10 images of each label
    (["--n_valid_extra=7"], ["extra"]),  # and extra 6
    (["--n_valid_train=11", "--n_valid_extra=7"], ["train", "extra"])])
def test_too_few_images_per_label_names_the_options(tmp_path, args, short):
    data_dir = tmp_path / "mat"
    write_fake_svhn_mat(data_dir, n_train=N_TRAIN, n_test=N_TEST, n_extra=N_EXTRA, seed=0)
    result = run_script(data_dir, tmp_path / "out", *args)
    assert result.returncode == 2
    line = one_line_error(result)
    assert "--n_valid_train" in line and "--n_valid_extra" in line
    for which, count in (("train", 10), ("extra", 6)):
        assert (f"{data_dir / which}_32x32.mat has {count} images of label" in line) == (which in short)
    assert "at most --n_valid_train=10 and --n_valid_extra=6" in line
    assert not (tmp_path / "out").exists()  # nothing written, not even the directory


def test_unwritable_output_directory(tmp_path):
    data_dir = tmp_path / "mat"
    write_fake_svhn_mat(data_dir, n_train=N_TRAIN, n_test=N_TEST, n_extra=N_EXTRA, seed=0)
    (tmp_path / "a_file").write_text("")
    result = run_script(data_dir, tmp_path / "a_file" / "out")
    assert result.returncode == 2
    assert "cannot write to SVHN_LOCAL_PATH=" + str(tmp_path / "a_file" / "out") in one_line_error(result)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_names_the_file(tmp_path):
    """A write that fails (here to /dev/full, through the writer's temporary name) ends the script
    with the file and the reason, leaves no final file, and its temporary name is cleaned up."""
    data_dir = tmp_path / "mat"
    write_fake_svhn_mat(data_dir, n_train=N_TRAIN, n_test=N_TEST, n_extra=N_EXTRA, seed=0)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".valid_X.npy.tmp").symlink_to("/dev/full")  # atomic.atomic_write's temporary name
    result = run_script(data_dir, out)
    assert result.returncode == 1
    assert one_line_error(result) == f"error: {out / 'valid_X.npy'}: No space left on device"
    assert os.listdir(out) == []


# ------------------------------------------------------------------------ atomic, interrupted writes

def small_source(n=10):
    rng = np.random.default_rng(1)
    X = np.asfortranarray(rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8))
    y = (np.arange(n) % 10 + 1).astype(np.uint8)
    return X, y


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_no_final_file(tmp_path, monkeypatch, error):
    X, y = small_source()
    (tmp_path / "valid_y.npy").write_bytes(b"old contents")  # a previous run's file stays untouched
    calls = []
    real = sp.svhn_gcn_lcn

    def failing(images, channels):
        calls.append(len(images))
        if len(calls) == 2:
            raise error("interrupted")
        return real(images, channels=channels)

    monkeypatch.setattr(sp, "svhn_gcn_lcn", failing)
    n = len(y)
    with pytest.raises(error):
        sp.write_set("valid", str(tmp_path), (X,), (y,), np.zeros(n, np.uint8), np.arange(n), (0,), 3)
    assert calls == [3, 3]
    assert sorted(os.listdir(tmp_path)) == ["valid_y.npy"]
    assert (tmp_path / "valid_y.npy").read_bytes() == b"old contents"


def test_write_set_completes_and_replaces(tmp_path):
    X, y = small_source()
    (tmp_path / "valid_X.npy").write_bytes(b"old contents")
    idx = np.array([4, 0, 9, 2, 2])
    sp.write_set("valid", str(tmp_path), (X,), (y,), np.zeros(5, np.uint8), idx, (0,), 2)
    assert sorted(os.listdir(tmp_path)) == ["valid_X.npy", "valid_y.npy"]
    got_X, got_y = np.load(tmp_path / "valid_X.npy"), np.load(tmp_path / "valid_y.npy")
    np.testing.assert_array_equal(got_X, pp.svhn_gcn_lcn(as_images(X)[idx]))
    np.testing.assert_array_equal(got_y, np.eye(10, dtype=np.float32)[y[idx].astype(int) - 1])


def test_writer_refuses_a_short_file(tmp_path):
    path = tmp_path / "a.npy"
    with pytest.raises(RuntimeError, match="1 of 2 rows"):
        with sp.AtomicNpyWriter(path, (2, 3)) as w:
            w.write(np.ones((1, 3)))
    with pytest.raises(ValueError):
        with sp.AtomicNpyWriter(path, (2, 3)) as w:
            w.write(np.ones((3, 3)))
    assert os.listdir(tmp_path) == []


def test_ctrl_c_ends_with_one_line(tmp_path):
    write_fake_svhn_mat(tmp_path / "mat", n_train=120, n_test=60, n_extra=80)
    runner = tmp_path / "interrupt.py"
    runner.write_text(
        "import runpy, sys, bc_datasets\n"
        "def read(*a, **k):\n"
        "    raise KeyboardInterrupt\n"
        "bc_datasets.read_svhn_mat = read\n"
        f"sys.argv = ['svhn_preprocessing.py', '--data_dir={tmp_path / 'mat'}',\n"
        f"            '--SVHN_LOCAL_PATH={tmp_path / 'out'}', '--verify_checksums=False']\n"
        f"runpy.run_path({str(REPO / 'svhn_preprocessing.py')!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, str(runner)], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 130 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("interrupted")
