"""plot.py on fake run directories: files written, valid non-blank PNGs, errors with exit code 2."""
import json
import subprocess
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.image as mpimg
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(path, binary=True, stochastic=True, epochs=5, checkpoints=("last", "best"), seed=0):
    """A run directory shaped like the training scripts' output (hparams.json, metrics.jsonl, *.pt)."""
    path.mkdir(parents=True)
    hp = {"binary": binary, "stochastic": stochastic, "H": 1.0, "LR_start": 0.003, "num_epochs": epochs}
    (path / "hparams.json").write_text(json.dumps(
        {"script": "mnist", "hparams": hp, "git_commit": None, "git_dirty": None,
         "versions": {}, "device": "cpu"}))
    rng = np.random.default_rng(seed)
    with open(path / "metrics.jsonl", "w") as f:
        for e in range(1, epochs + 1):
            val_err = 10.0 / e + rng.uniform(0, 1)
            f.write(json.dumps({"epoch": e, "LR": 0.003 * 0.9 ** e, "train_loss": 1.0 / e,
                                "val_loss": 1.2 / e, "val_err": val_err, "best_epoch": e,
                                "best_val_err": val_err, "test_loss": 1.1 / e, "test_err": val_err,
                                "seconds": 1.0}) + "\n")
    g = torch.Generator().manual_seed(seed)
    state = {  # dense (out, in), BN, conv (out, in, k, k): the layers of an nn.Sequential
        "0.weight": torch.rand(4, 3, generator=g) * 2 - 1, "0.b": torch.zeros(4),
        "1.beta": torch.zeros(4), "1.gamma": torch.ones(4), "1.mean": torch.zeros(4),
        "1.std": torch.ones(4),
        "3.weight": (torch.rand(8, 4, 3, 3, generator=g) * 2 - 1).clamp(-0.9, 0.9),
    }
    for name in checkpoints:
        torch.save({"model": state, "epoch": epochs, "optimizer": {}}, path / f"{name}.pt")
    return path


def run_plot(*args):
    return subprocess.run([sys.executable, str(REPO / "plot.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, (path, len(data))
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].var()) > 0, f"{path} is blank"


def test_two_runs_write_curves_and_histograms(tmp_path):
    a = make_run(tmp_path / "stoch", stochastic=True, seed=1)
    b = make_run(tmp_path / "det", stochastic=False, seed=2)
    out = tmp_path / "figs"
    r = run_plot(a, b, f"--out={out}")
    assert r.returncode == 0, r.stderr
    expected = [out / "curves.png", out / "weights_hist_stoch.png", out / "weights_hist_det.png"]
    assert r.stdout.split() == [str(p) for p in expected]
    for p in expected:
        check_png(p)
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries behind


def test_default_out_is_first_run_and_last_checkpoint_and_layer(tmp_path):
    a = make_run(tmp_path / "a", binary=False)
    b = make_run(tmp_path / "b", checkpoints=("last",))
    r = run_plot(a, b, "--checkpoint=last", "--layer=1")
    assert r.returncode == 0, r.stderr
    for name in ("curves.png", "weights_hist_a.png", "weights_hist_b.png"):
        check_png(a / name)


def test_run_without_checkpoint_still_gets_curves(tmp_path):
    a = make_run(tmp_path / "a", checkpoints=())
    r = run_plot(a)
    assert r.returncode == 0, r.stderr
    check_png(a / "curves.png")
    assert not list(a.glob("weights_hist_*"))
    assert "best.pt" in r.stderr


def test_missing_metrics_is_a_clear_error(tmp_path):
    good = make_run(tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "hparams.json").write_text("{}")
    r = run_plot(good, bad)
    assert r.returncode == 2
    assert str(bad) in r.stderr and "metrics.jsonl" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (good / "curves.png").exists()  # nothing written when an input is bad

    r = run_plot(tmp_path / "does_not_exist")
    assert r.returncode == 2 and "does_not_exist" in r.stderr and "metrics.jsonl" in r.stderr


def test_layer_out_of_range_lists_layers(tmp_path):
    a = make_run(tmp_path / "a")
    r = run_plot(a, "--layer=2")
    assert r.returncode == 2
    assert "0.weight (4, 3)" in r.stderr and "3.weight (8, 4, 3, 3)" in r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_checkpoint_names_the_file(tmp_path):
    a = make_run(tmp_path / "a")
    (a / "best.pt").write_bytes(b"not a checkpoint")
    r = run_plot(a)
    assert r.returncode == 2 and str(a / "best.pt") in r.stderr
    assert "Traceback" not in r.stderr


def test_importable_functions_and_partial_last_line(tmp_path):
    sys.path.insert(0, str(REPO))
    try:
        import plot
    finally:
        sys.path.remove(str(REPO))
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", seed=3)  # same variant as a: labels get the directory names
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 6, "train_lo')  # a run still training, mid-write
    plot.plot_curves([a, b], tmp_path / "c.png")
    check_png(tmp_path / "c.png")
    plot.plot_weight_histogram(a, tmp_path / "h.png", layer=1, checkpoint="last")
    check_png(tmp_path / "h.png")
    _, metrics = plot.load_run(b)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]


def test_metrics_line_without_needed_keys(tmp_path):
    a = make_run(tmp_path / "a")
    with open(a / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 6, "LR": 0.001}) + "\n" + json.dumps({"epoch": 7}) + "\n")
    r = run_plot(a)
    assert r.returncode == 2 and "line 6" in r.stderr and "train_loss" in r.stderr
    assert "Traceback" not in r.stderr
