"""The datasets' files: the official names, MD5s and mirrors, checksums, downloads, and finding the
files in a data_dir (§4.2-4.4). bc_datasets.py reads what these find.

Every problem a user can fix raises DatasetError, whose message names the file or folder and says
what to do.
"""
import hashlib
import http.client
import urllib.error
import urllib.request
from pathlib import Path

from atomic import atomic_write
from errors import UserError


class DatasetError(UserError):
    """A dataset file is missing, corrupt or unreadable; the message says what to do."""


# ------------------------------------------------------------------------------------------------
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
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "http://yann.lecun.com/exdb/mnist/")

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

SVHN_FILES = {
    "train": ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
    "extra": ("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7"),
}
SVHN_MIRRORS = ("http://ufldl.stanford.edu/housenumbers/",)
SVHN_SETS = ("splitted_train", "valid", "test")  # svhn_preprocessing.py's output
SVHN_PREPROCESSED = "preprocessed SVHN"  # what check_folder calls them

# What each dataset's folder holds (glob patterns), and the script that reads it: a user who gives
# one script another dataset's folder is told which, rather than a download started into it.
SIGNS = {
    "MNIST": ("mnist.py", tuple(MNIST_PATTERNS.values())),
    "CIFAR-10": ("cifar10.py", (CIFAR10_TAR, CIFAR10_DIR)),
    "SVHN": ("svhn_preprocessing.py", tuple(name for name, _ in SVHN_FILES.values())),
    SVHN_PREPROCESSED: ("svhn.py", tuple(f"{s}_X.npy" for s in SVHN_SETS)),
}


# ------------------------------------------------------------------------------------------------
# Checksums and downloads

def md5sum(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def corrupt(path, got, expected):
    return DatasetError(
        f"corrupt: {path} has MD5 {got}, expected {expected}; delete it and rerun (it will be "
        "downloaded again), or pass verify_checksums=False (--verify_checksums=False to the "
        "scripts) if it is a subset or a mirror you trust")


def download_file(url, dest, md5=None, timeout=60):
    """Download `url` to `dest` atomically (atomic.atomic_write), checking `md5` if given."""
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
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts: OSErrors
        reason = getattr(e, "reason", None) or e
        raise DatasetError(f"Could not download {url}: {reason}") from e
    return dest


def _url(mirror, name):
    return mirror + name if mirror.endswith("/") else mirror + "/" + name


def check_folder(data_dir, what):
    """Before anything is downloaded into `data_dir`, where `what`'s files are missing: a file
    given as the folder, or another dataset's folder (its files, none of `what`'s), is named."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DatasetError(f"{what}: {data_dir} is not a folder; give the folder that holds the "
                           f"{what} files")
    if what not in SIGNS or not data_dir.is_dir():
        return
    def found(dataset):
        return sorted({p.name for pattern in SIGNS[dataset][1] for p in data_dir.glob(pattern)})
    if found(what):
        return
    for other in SIGNS:
        if other != what and (names := found(other)):
            raise DatasetError(
                f"{what}: {data_dir} holds {other} files ({', '.join(names[:3])}), which "
                f"{SIGNS[other][0]} reads, and none of {what}'s; give the folder of the {what} "
                "files")


def fetch_all(data_dir, files, mirrors, verify_checksums=True, download=True, what="dataset",
              alternatives=""):
    """{file name: path} for every `files` entry ({name: md5 or None}) in `data_dir`.

    A present file is checked against its MD5 (when verify_checksums); a missing one is downloaded
    from the first mirror that works. If some stay missing, ONE DatasetError lists them all, the
    folder and where to get them. Folders this call creates for the downloads are removed again if
    no file lands in them.
    """
    data_dir = Path(data_dir)
    paths, missing = {}, []
    for name, md5 in files.items():
        path = data_dir / name
        if path.is_file():
            if verify_checksums and md5 is not None:
                got = md5sum(path)
                if got != md5:
                    raise corrupt(path, got, md5)
            paths[name] = path
        else:
            missing.append(name)
    if missing:
        check_folder(data_dir, what)

    errors = []
    if missing and download:
        # A download that fails must not leave behind the folder it was going to fill (a misspelt
        # --data_dir would otherwise become a new empty folder): the ones made here are removed
        # again if no file lands in them.
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
                    try:
                        paths[name] = download_file(_url(mirror, name), data_dir / name,
                                                    files[name] if verify_checksums else None)
                        missing.remove(name)
                        break
                    except DatasetError as e:
                        errors.append(str(e))
                        cause = e.__cause__
                        if (isinstance(cause, OSError)
                                and not isinstance(cause, urllib.error.HTTPError)):
                            dead.add(mirror)
        finally:  # Ctrl-C during a download too
            for d in created:  # deepest first; rmdir refuses a folder that is not empty
                try:
                    d.rmdir()
                except OSError:
                    break

    if missing:
        why = "; ".join(errors) if errors else "Downloading is disabled (download=False)"
        raise DatasetError(
            f"{what}: missing in {data_dir}: {', '.join(missing)}. {why}. Get them from "
            f"{' or '.join(mirrors)} (<url><file name>, e.g. {_url(mirrors[0], missing[0])}) and "
            f"put them in {data_dir}" + (f" {alternatives}" if alternatives else "") + ".")
    return paths


def fetch(data_dir, filename, md5, mirrors, verify_checksums=True, download=True, what="dataset",
          alternatives=""):
    """The path of data_dir/filename, downloaded from `mirrors` if absent (see fetch_all)."""
    return fetch_all(data_dir, {filename: md5}, mirrors, verify_checksums, download, what,
                     alternatives)[filename]


# ------------------------------------------------------------------------------------------------
# Finding each dataset's files

def _find_mnist_file(data_dir, name):
    """The one file of `data_dir` matching `name`'s pattern (e.g. t10k*images*idx3*), or None."""
    pattern = MNIST_PATTERNS[name]
    found = sorted(p for p in data_dir.glob(pattern) if p.is_file())
    if len(found) > 1:
        raise DatasetError(
            f"MNIST: {name} is not in {data_dir}, and {len(found)} files there match {pattern}: "
            f"{', '.join(p.name for p in found)}; keep only the one to use, or rename it {name}, "
            f"or name it with load_mnist(files={{{name!r}: path}})")
    return found[0] if found else None


def mnist_files(data_dir, names=tuple(MNIST_FILES), verify_checksums=True, download=True,
                mirrors=None, files=None):
    """{official name: path} of the MNIST files `names` (official names, e.g.
    't10k-images-idx3-ubyte.gz').

    Each is, in this order: files[official name] when given (a path); the official name in
    data_dir; its uncompressed copy (the name without '.gz'); the only file of data_dir matching
    its pattern (MNIST_PATTERNS, e.g. t10k-8000-images-idx3-ubyte.gz for t10k*images*idx3*); else
    it is downloaded. Only a file under the official '.gz' name is checked against the official
    MD5: a copy under another name is an uncompressed file, a subset or a mirror's copy, whose MD5
    is not the published one; a note names each such file.
    """
    data_dir = Path(data_dir)
    files = dict(files or {})
    if unknown := sorted(set(files) - set(MNIST_FILES)):
        raise DatasetError(f"MNIST: files= takes the official names as keys "
                           f"({', '.join(MNIST_FILES)}), got {', '.join(map(repr, unknown))}")
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
                raise corrupt(path, got, md5)
        else:
            print(f"MNIST: using {path} as {name} ({how}); its MD5 is not checked, since under "
                  f"another name it is a subset or a copy", flush=True)
        paths[name] = path
    patterns = ", ".join(MNIST_PATTERNS[name] for name in needed if not (data_dir / name).is_file())
    paths.update(fetch_all(
        data_dir, needed, tuple(mirrors or MNIST_MIRRORS), verify_checksums, download,
        what="MNIST", alternatives=(
            "(uncompressed copies without '.gz' work too, and so do files under other names "
            f"found by prefix, one per pattern: {patterns}, e.g. a subset such as "
            "t10k-8000-images-idx3-ubyte.gz, whose MD5 is not checked; from Python, "
            "load_mnist(files={official name: path}) names them)")))
    return paths


def svhn_mat_files(data_dir, verify_checksums=True, download=True, mirrors=None):
    """{'train'|'test'|'extra': path of the official format-2 .mat file}, downloading missing
    ones."""
    files = {name: md5 for name, md5 in SVHN_FILES.values()}
    paths = fetch_all(data_dir, files, tuple(mirrors or SVHN_MIRRORS), verify_checksums, download,
                      what="SVHN")
    return {which: paths[name] for which, (name, _) in SVHN_FILES.items()}
