"""dataset_files: checksums and downloads (against a local HTTP server), and what a data_dir
that is not a dataset's folder says (a file; another dataset's folder)."""
import functools
import hashlib
import http.server
import socket
import threading

import numpy as np
import pytest

import bc_datasets
import dataset_files
from dataset_files import DatasetError
from fake_data import write_fake_cifar10, write_fake_mnist, write_fake_svhn_mat
from test_bc_datasets import md5_of, one_hot


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """(directory served, its base URL) on 127.0.0.1, an OS-chosen port."""
    monkeypatch.setenv("no_proxy", "*")
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def dead_mirror():
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def serve_blob(root, name="blob.bin", size=300_000):
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    (root / name).write_bytes(data)
    return data, hashlib.md5(data).hexdigest()


def test_fetch_downloads_and_verifies(tmp_path, http_server):
    root, url = http_server
    data, md5 = serve_blob(root)
    data_dir = tmp_path / "data" / "sub"  # created on demand
    path = dataset_files.fetch(data_dir, "blob.bin", md5, [url])
    assert path == data_dir / "blob.bin" and path.read_bytes() == data
    assert sorted(p.name for p in data_dir.iterdir()) == ["blob.bin"]  # no .part left
    assert dataset_files.md5sum(path) == md5
    # present now: returned without downloading, even with every mirror dead
    assert dataset_files.fetch(data_dir, "blob.bin", md5, ["http://127.0.0.1:9/"]) == path


def test_fetch_tries_the_mirrors_in_order(tmp_path, http_server, dead_mirror):
    root, url = http_server
    data, md5 = serve_blob(root)
    path = dataset_files.fetch(tmp_path, "blob.bin", md5, [dead_mirror, url + "nothing-here/", url])
    assert path.read_bytes() == data


def test_download_wrong_checksum_leaves_nothing(tmp_path, http_server):
    root, url = http_server
    serve_blob(root)
    dest = tmp_path / "blob.bin"
    with pytest.raises(DatasetError) as info:
        dataset_files.download_file(url + "blob.bin", dest, md5="0" * 32)
    assert url + "blob.bin" in str(info.value) and str(dest) in str(info.value)
    assert list(tmp_path.iterdir()) == [root]  # neither blob.bin nor blob.bin.part

    data_dir = tmp_path / "data"
    with pytest.raises(DatasetError, match="blob.bin"):
        dataset_files.fetch(data_dir, "blob.bin", "0" * 32, [url])
    assert not data_dir.exists()


def test_fetch_missing_and_no_mirror_reachable(tmp_path, dead_mirror):
    data_dir = tmp_path / "data"
    with pytest.raises(DatasetError) as info:
        dataset_files.fetch_all(data_dir, {"a.bin": None, "b.bin": None}, [dead_mirror])
    message = str(info.value)
    assert str(data_dir) in message and "a.bin" in message and "b.bin" in message
    assert dead_mirror in message
    assert not data_dir.exists()


def test_failed_download_creates_no_directory(tmp_path):
    data_dir = tmp_path / "a" / "mnist"
    with pytest.raises(DatasetError, match=r"Could not download http://127\.0\.0\.1:9/"):
        bc_datasets.load_mnist(data_dir, mirrors=["http://127.0.0.1:9/"])
    assert list(tmp_path.iterdir()) == []  # neither a/ nor a/mnist/
    # A directory that was there before stays, empty as it was.
    data_dir.mkdir(parents=True)
    with pytest.raises(DatasetError):
        bc_datasets.load_mnist(data_dir, mirrors=["http://127.0.0.1:9/"])
    assert data_dir.is_dir() and not any(data_dir.iterdir())


def test_interrupted_download_creates_no_directory(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset_files, "download_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dataset_files.fetch(tmp_path / "data", "blob.bin", None, ["http://127.0.0.1:9/"])
    assert list(tmp_path.iterdir()) == []


def test_partly_failed_download_keeps_what_it_got(tmp_path, http_server):
    root, url = http_server
    data, md5 = serve_blob(root)
    data_dir = tmp_path / "new" / "data"
    with pytest.raises(DatasetError, match="missing in .*: absent.bin"):
        dataset_files.fetch_all(data_dir, {"blob.bin": md5, "absent.bin": None}, [url])
    assert [p.name for p in data_dir.iterdir()] == ["blob.bin"]
    assert (data_dir / "blob.bin").read_bytes() == data


def test_fetch_present_but_corrupt(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"not the right bytes")
    with pytest.raises(DatasetError) as info:
        dataset_files.fetch(tmp_path, "blob.bin", "0" * 32, ["http://127.0.0.1:9/"])
    message = str(info.value)
    assert message.startswith("corrupt: ") and str(path) in message
    assert md5_of(path) in message and "0" * 32 in message
    assert dataset_files.fetch(tmp_path, "blob.bin", "0" * 32, [], verify_checksums=False) == path


def test_load_mnist_downloads_from_mirror(tmp_path, http_server):
    root, url = http_server
    raw = write_fake_mnist(root, n_train=20, n_test=10)
    train, valid, test = bc_datasets.load_mnist(tmp_path / "mnist", train_set_size=15,
                                                verify_checksums=False, mirrors=[url])
    assert (len(train[0]), len(valid[0]), len(test[0])) == (15, 5, 10)
    np.testing.assert_array_equal(test[1], one_hot(raw["test_labels"]))
    downloaded = sorted(p.name for p in (tmp_path / "mnist").iterdir())
    assert downloaded == sorted(dataset_files.MNIST_FILES)


# A data_dir that is not the dataset's folder (issue 25, fault 3) ------------------------------

def no_download(*args, **kwargs):
    raise AssertionError("nothing should be downloaded")


@pytest.mark.parametrize("load", [bc_datasets.load_mnist, bc_datasets.load_cifar10,
                                  dataset_files.svhn_mat_files, bc_datasets.load_svhn])
def test_a_file_given_as_the_folder_says_not_a_folder(tmp_path, monkeypatch, load):
    """It used to say 'missing in .../README.md ... put them in .../README.md'."""
    monkeypatch.setattr(dataset_files, "download_file", no_download)
    readme = tmp_path / "README.md"
    readme.write_text("not a dataset\n")
    with pytest.raises(DatasetError) as info:
        load(readme)
    message = str(info.value)
    assert f"{readme} is not a folder" in message and "missing in" not in message
    assert readme.read_text() == "not a dataset\n"


@pytest.mark.parametrize("write, load, named, script", [
    (lambda d: write_fake_cifar10(d, as_tar=True), bc_datasets.load_mnist, "CIFAR-10",
     "cifar10.py"),
    (write_fake_cifar10, bc_datasets.load_mnist, "CIFAR-10", "cifar10.py"),  # the batches' folder
    (write_fake_mnist, bc_datasets.load_cifar10, "MNIST", "mnist.py"),
    (write_fake_svhn_mat, bc_datasets.load_mnist, "SVHN", "svhn_preprocessing.py"),
    (write_fake_mnist, dataset_files.svhn_mat_files, "MNIST", "mnist.py"),
    (write_fake_mnist, bc_datasets.load_svhn, "MNIST", "mnist.py")])
def test_another_datasets_folder_names_it_and_downloads_nothing(tmp_path, monkeypatch, write,
                                                               load, named, script):
    """The CIFAR-10 files given to mnist.py used to start a download of MNIST into their folder."""
    monkeypatch.setattr(dataset_files, "download_file", no_download)
    folder = tmp_path / "other"
    write(folder)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(DatasetError) as info:
        load(folder)
    message = str(info.value)
    assert f"{folder} holds {named} files" in message and f"{script} reads" in message, message
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_a_folder_with_some_of_its_own_files_still_downloads_the_rest(tmp_path, http_server):
    """Only a folder with none of the dataset's files and another's is refused: an MNIST folder
    missing its test files (beside a CIFAR-10 archive) downloads them."""
    root, url = http_server
    write_fake_mnist(root, n_train=20, n_test=10)
    folder = tmp_path / "data"
    write_fake_mnist(folder, n_train=20, n_test=10)
    write_fake_cifar10(folder, as_tar=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (folder / name).unlink()
    train, _, test = bc_datasets.load_mnist(folder, train_set_size=15, verify_checksums=False,
                                            mirrors=[url])
    assert len(train[0]) == 15 and len(test[0]) == 10
