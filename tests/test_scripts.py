"""The experiment scripts end to end, as a user runs them: subprocesses on tiny data in the
official layouts (tests/fake_data.py)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fake_data import write_fake_cifar10, write_fake_mnist, write_fake_svhn_mat

ROOT = Path(__file__).resolve().parents[1]

REPORT_LABELS = ["LR:", "training loss:", "validation loss:", "validation error rate:",
                 "best epoch:", "best validation error rate:", "test loss:", "test error rate:"]


def run_script(script, *args, env=None, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def check_report(stdout, num_epochs):
    """The original's per-epoch report (§5): 'Epoch e of n took ...s' then eight lines,
    two spaces and a label padded to 33 characters."""
    lines = stdout.splitlines()
    starts = [i for i, l in enumerate(lines) if re.fullmatch(r"Epoch \d+ of \d+ took .*s", l)]
    assert len(starts) == num_epochs
    for e, i in enumerate(starts, 1):
        assert lines[i].startswith(f"Epoch {e} of {num_epochs} took ")
        for label, line in zip(REPORT_LABELS, lines[i + 1:i + 9]):
            assert line[:33] == ("  " + label).ljust(33), line
            assert line[33:] and line[33] != " "
    return lines


def test_mnist_end_to_end(tmp_path):
    write_fake_mnist(tmp_path / "data", n_train=300, n_test=100)
    out = tmp_path / "run"
    proc = run_script("mnist.py", f"--data_dir={tmp_path / 'data'}", "--verify_checksums=False",
                      "--train_set_size=200", "--num_units=16", "--num_epochs=2",
                      "--batch_size=50", f"--out_dir={out}", "--device=cpu")
    lines = check_report(proc.stdout, 2)
    # the start-up prints of the original, in order
    for expected in ["batch_size = 50", "alpha = 0.15", "num_units = 16", "stochastic = True",
                     "W_LR_scale = Glorot", "Loading MNIST dataset...", "Building the MLP...",
                     "Training..."]:
        assert expected in lines, expected
    assert lines.index("Loading MNIST dataset...") < lines.index("Building the MLP...") \
        < lines.index("Training...")
    # one W_LR_scale / H pair per binary layer (4 layers), printed at build time (§1.3)
    assert sum(l.startswith("W_LR_scale = ") for l in lines) == 1 + 4
    assert sum(l.startswith("H = ") for l in lines) == 1 + 4
    assert lines[-1].startswith("Best validation error rate")
    assert (out / "last.pt").exists() and (out / "best.pt").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # the log holds the report as printed
    assert "Epoch 2 of 2 took" in (out / "log.txt").read_text()
    record = json.loads((out / "hparams.json").read_text())
    assert record["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", record["git_commit"])
    # plot.py draws the run's curves and the first layer's weights
    run_script("plot.py", str(out))
    for png in ("curves.png", "weights_hist_run.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_config_file_then_overrides(tmp_path):
    write_fake_mnist(tmp_path / "data", n_train=120, n_test=50)
    config = tmp_path / "tiny.py"
    config.write_text("num_units = 8\nnum_epochs = 1\nbatch_size = 40\nLR_start = 0.01\n")
    out = tmp_path / "run"
    run_script("mnist.py", str(config), "--batch_size=20", f"--data_dir={tmp_path / 'data'}",
               "--verify_checksums=False", "--train_set_size=100", f"--out_dir={out}",
               "--device=cpu")
    hparams = json.loads((out / "hparams.json").read_text())["hparams"]
    assert hparams["num_units"] == 8 and hparams["batch_size"] == 20
    assert hparams["LR_start"] == 0.01 and hparams["stochastic"] is True


@pytest.mark.parametrize("arg, words", [
    ("--num_units=many", ["num_units", "int"]),
    ("--stochastic=maybe", ["stochastic", "bool"]),
    ("--LR_start=fast", ["LR_start", "float"]),
    ("--num_unit=10", ["num_unit", "valid names", "num_units", "LR_start"]),
    ("--num_units", ["--num_units=value"]),
    ("--batch_size=0", ["batch_size=0", "positive"]),
    ("--num_epochs=-1", ["num_epochs=-1", "positive"]),
])
def test_bad_override_is_named(tmp_path, arg, words):
    proc = run_script("mnist.py", arg, f"--out_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_train_set_size_beyond_the_file_is_named(tmp_path):
    write_fake_mnist(tmp_path / "data", n_train=120, n_test=30)
    proc = run_script("mnist.py", f"--data_dir={tmp_path / 'data'}", "--verify_checksums=False",
                      "--train_set_size=500", f"--out_dir={tmp_path / 'run'}", "--device=cpu",
                      check=False)
    # A data error ends the script as a mistaken value does (errors.py): one line, exit status 2.
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "train_set_size must be in 1..120" in proc.stderr
    assert "500" in proc.stderr


def test_an_out_dir_that_cannot_be_written_ends_as_a_mistaken_value_does(tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    proc = run_script("mnist.py", f"--out_dir={out}", "--device=cpu", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: cannot write to out_dir {out}: Not a directory\n"


def test_missing_mnist_says_where_and_what(tmp_path):
    # no network is needed: an unreachable mirror stands for an offline machine
    proc = subprocess.run(
        [sys.executable, "-c",
         "import bc_datasets as d; d.load_mnist(%r, mirrors=('http://127.0.0.1:9/',))"
         % str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    for word in [str(tmp_path / "nowhere"), "train-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"]:
        assert word in proc.stderr


def test_cifar10_end_to_end(tmp_path):
    write_fake_cifar10(tmp_path / "data", n_per_batch=40, n_test=60, as_tar=True)
    out = tmp_path / "run"
    proc = run_script("cifar10.py", f"--data_dir={tmp_path / 'data'}", "--verify_checksums=False",
                      "--train_set_size=100", "--num_epochs=1", f"--out_dir={out}",
                      "--device=cpu", "--compile=false")
    lines = check_report(proc.stdout, 1)
    assert "Loading CIFAR-10 dataset..." in lines and "Building the CNN..." in lines
    # nine binary layers: 6 conv + 3 dense, with the §1.3 CIFAR-10 scales
    scales = [float(l.split("= ")[1]) for l in lines if l.startswith("W_LR_scale = ")
              and l != "W_LR_scale = Glorot"]
    np.testing.assert_allclose(scales, [28.036, 39.192, 48.0, 55.426, 67.882, 78.384, 78.384,
                                        36.950, 26.255], atol=1e-3)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["epoch"] == 1 and metrics[0]["LR"] == 0.003


def test_svhn_preprocessing_then_svhn(tmp_path):
    write_fake_svhn_mat(tmp_path / "mat", n_train=120, n_test=60, n_extra=80)
    local = tmp_path / "preprocessed"
    run_script("svhn_preprocessing.py", f"--data_dir={tmp_path / 'mat'}",
               "--verify_checksums=False", "--n_valid_train=3", "--n_valid_extra=2",
               env={"SVHN_LOCAL_PATH": str(local)})
    for name in ("splitted_train", "valid", "test"):
        assert (local / f"{name}_X.npy").exists() and (local / f"{name}_y.npy").exists()
    out = tmp_path / "run"
    proc = run_script("svhn.py", "--num_epochs=1", f"--out_dir={out}", "--device=cpu",
                      "--compile=false", env={"SVHN_LOCAL_PATH": str(local)})
    lines = check_report(proc.stdout, 1)
    assert "Loading SVHN dataset" in lines
    scales = [float(l.split("= ")[1]) for l in lines if l.startswith("W_LR_scale = ")
              and l != "W_LR_scale = Glorot"]
    np.testing.assert_allclose(scales, [20.050, 27.713, 33.941, 39.192, 48.0, 55.426, 58.424,
                                        36.950, 26.255], atol=1e-3)


def test_batch_larger_than_a_split_is_refused(tmp_path):
    write_fake_mnist(tmp_path / "data", n_train=120, n_test=30)
    proc = run_script("mnist.py", f"--data_dir={tmp_path / 'data'}", "--verify_checksums=False",
                      "--train_set_size=100", "--num_units=8", "--batch_size=40",
                      f"--out_dir={tmp_path / 'run'}", "--device=cpu", check=False)
    assert proc.returncode == 2
    assert "validation set has 20 examples, fewer than batch_size=40" in proc.stderr


def test_svhn_without_preprocessing_says_what_to_run(tmp_path):
    proc = run_script("svhn.py", f"--SVHN_LOCAL_PATH={tmp_path / 'none'}",
                      f"--out_dir={tmp_path / 'run'}", "--device=cpu", check=False)
    assert proc.returncode != 0
    assert "svhn_preprocessing.py" in proc.stderr and str(tmp_path / "none") in proc.stderr
    assert "Traceback" not in proc.stderr
