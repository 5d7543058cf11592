"""plot.py on fake run directories: files written, valid non-blank PNGs, errors with exit code 2."""
import json
import subprocess
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(path, binary=True, stochastic=True, epochs=5, checkpoints=("last", "best"), seed=0,
             script="mnist", first_layer=(4, 3), dropout=0.):
    """A run directory shaped like the training scripts' output (hparams.json, metrics.jsonl, *.pt)."""
    path.mkdir(parents=True)
    hp = {"binary": binary, "stochastic": stochastic, "H": 1.0, "LR_start": 0.003,
          "num_epochs": epochs, "dropout_hidden": dropout}
    (path / "hparams.json").write_text(json.dumps(
        {"script": script, "hparams": hp, "git_commit": None, "git_dirty": None,
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
    units = first_layer[0]
    state = {  # dense (out, in), BN, conv (out, in, k, k): the layers of an nn.Sequential
        "0.weight": torch.rand(*first_layer, generator=g) * 2 - 1, "0.b": torch.zeros(units),
        "0.draws": torch.zeros((), dtype=torch.int64),  # a binary layer's stream counter
        "1.beta": torch.zeros(units), "1.gamma": torch.ones(units), "1.mean": torch.zeros(units),
        "1.std": torch.ones(units),
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


def _import_plot():
    sys.path.insert(0, str(REPO))
    try:
        import plot
    finally:
        sys.path.remove(str(REPO))
    return plot


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_visible()]


@pytest.mark.parametrize("epochs, markers", [(1, True), (2, True), (60, False)])
def test_curves_two_panels_markers_and_legend_outside(tmp_path, epochs, markers):
    """Issue 10: a one-epoch run is drawn (markers), the loss and the error have panels of their
    own (the loss on a log axis), and the one legend lies outside both."""
    plot = _import_plot()
    runs = [make_run(tmp_path / "s", epochs=epochs, seed=1),
            make_run(tmp_path / "d", stochastic=False, epochs=epochs, seed=2)]
    fig = plot.curves_figure(runs)
    ax_loss, ax_err = _panels(fig)
    assert ax_loss.get_yscale() == "log" and ax_err.get_yscale() == "linear"
    assert "training cost" in ax_loss.get_ylabel() and "validation error" in ax_err.get_ylabel()
    assert ax_err.get_xlabel() == "epoch"
    assert [l.get_linestyle() for l in ax_loss.lines] == [":", ":"]
    assert [l.get_linestyle() for l in ax_err.lines] == ["-", "-"]
    for line in ax_loss.lines + ax_err.lines:
        assert (line.get_marker() not in ("None", None, "")) == markers
    assert len(fig.legends) == 1 and not ax_loss.get_legend() and not ax_err.get_legend()
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert legend.x0 >= max(ax.get_window_extent().x1 for ax in (ax_loss, ax_err))
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["BinaryConnect (stoch.)", "BinaryConnect (det.)", "training cost",
                     "validation error"]
    if epochs == 1:
        low, high = ax_err.get_xlim()
        assert [t for t in ax_err.get_xticks() if low <= t <= high] == [1]
    import matplotlib.pyplot as plt
    plt.close(fig)
    plot.plot_curves(runs, tmp_path / "c.png")
    check_png(tmp_path / "c.png")


def test_variant_names():
    plot = _import_plot()
    for hp, name in [({"binary": False}, "No regularizer"),
                     ({"binary": False, "dropout_hidden": 0.5}, "50% Dropout"),
                     ({"binary": True, "stochastic": False}, "BinaryConnect (det.)"),
                     ({"binary": True, "stochastic": True, "dropout_in": 0.2},
                      "BinaryConnect (stoch.) + 20% input Dropout"),
                     ({}, "BinaryConnect (stoch.)")]:
        assert plot.variant({"hparams": hp}) == name
        assert plot.variant(hp) == name


def paper_runs(tmp_path):
    mnist = [make_run(tmp_path / "m_noreg", binary=False, first_layer=(40, 784), seed=1),
             make_run(tmp_path / "m_dropout", binary=False, dropout=0.5, first_layer=(40, 784)),
             make_run(tmp_path / "m_det", stochastic=False, first_layer=(40, 784), seed=2),
             make_run(tmp_path / "m_stoch", first_layer=(40, 784), seed=3)]
    cifar = [make_run(tmp_path / f"c_{v}", stochastic=v == "stoch", script="cifar10", epochs=30,
                      seed=i) for i, v in enumerate(("stoch", "det"))]
    return mnist, cifar


def test_paper_figures(tmp_path):
    mnist, cifar = paper_runs(tmp_path)
    out = tmp_path / "figs"
    r = run_plot("--figures", *mnist, *cifar, f"--out={out}", "--units=25")
    assert r.returncode == 0, r.stderr
    names = ["figure1_features.png", "figure2_histograms.png", "figure3_curves.png"]
    assert r.stdout.split() == [str(out / n) for n in names]
    for n in names:
        check_png(out / n)

    plot = _import_plot()
    fig1 = plot.features_figure(mnist, units=25)
    assert [ax.get_title() for ax in _panels(fig1)] == [
        "No regularizer", "50% Dropout", "BinaryConnect (det.)", "BinaryConnect (stoch.)"]
    image = _panels(fig1)[0].get_images()[0].get_array()
    assert image.shape == (5 * 29 - 1, 5 * 29 - 1)  # 5 x 5 units of 28 x 28, 1-pixel gaps
    fig2 = plot.histograms_figure(mnist)
    assert len(_panels(fig2)) == 4 and len(fig2.legends) == 1
    fig3 = plot.curves_figure(cifar)
    assert len(_panels(fig3)) == 2


def test_paper_figures_need_the_right_runs(tmp_path):
    mnist, cifar = paper_runs(tmp_path)
    r = run_plot("--figures", *cifar, f"--out={tmp_path / 'only3'}")
    assert r.returncode == 0 and "no MNIST run" in r.stderr
    assert [p.name for p in (tmp_path / "only3").iterdir()] == ["figure3_curves.png"]
    # Figure 1 needs the MNIST MLP's 784-wide first layer
    odd = make_run(tmp_path / "odd", first_layer=(4, 3))
    r = run_plot("--figures", odd, f"--out={tmp_path / 'none'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(odd) in r.stderr
    assert "784" in r.stderr and not (tmp_path / "none").exists()
