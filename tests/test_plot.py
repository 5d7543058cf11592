"""plot.py on fake run directories: files written, valid non-blank PNGs, errors with exit code 2."""
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib
matplotlib.use("Agg")
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

import plot

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
        torch.save({"model": state, "epoch": epochs, "hparams": hp, "optimizer": {}},
                   path / f"{name}.pt")
    return path


def run_plot_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "plot.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def run_plot(*args):
    """plot.py's main in this process, as the command line runs it (a subprocess spends its
    seconds importing torch and matplotlib; run_plot_cli is one)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = plot.main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


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
    r = run_plot_cli(a, b, f"--out={out}")
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
    bad = make_run(tmp_path / "bad")
    (bad / "metrics.jsonl").unlink()
    r = run_plot(good, bad)
    assert r.returncode == 2
    assert r.stderr == (f"error: {bad / 'metrics.jsonl'}: missing: the run has finished no "
                        "epoch yet\n")
    assert not (good / "curves.png").exists()  # nothing written when an input is bad

    (bad / "hparams.json").write_text("{}")
    r = run_plot(good, bad)
    assert r.returncode == 2 and str(bad / "hparams.json") in r.stderr
    assert "not the record a training run writes" in r.stderr

    r = run_plot(tmp_path / "does_not_exist")
    assert r.returncode == 2
    assert r.stderr == f"error: {tmp_path / 'does_not_exist'}: no such directory\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_plot(empty)
    assert r.returncode == 2 and "no run directories" in r.stderr and "metrics.jsonl" in r.stderr


def test_layer_out_of_range_lists_layers(tmp_path):
    a = make_run(tmp_path / "a")
    r = run_plot(a, "--layer=2")
    assert r.returncode == 2
    assert "0.weight (4, 3)" in r.stderr and "3.weight (8, 4, 3, 3)" in r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_checkpoint_names_the_file_and_nothing_is_written(tmp_path):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    (b / "best.pt").write_bytes(b"not a checkpoint")
    r = run_plot(a, b, f"--out={tmp_path / 'plots'}")
    assert r.returncode == 2 and str(b / "best.pt") in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == "" and not (tmp_path / "plots").exists()  # checked first, then drawn


def test_importable_functions_and_partial_last_line(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", seed=3)  # same variant as a: labels get the directory names
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 6, "train_lo')  # a copy cut short
    plot.plot_curves([a, b], tmp_path / "c.png")
    check_png(tmp_path / "c.png")
    plot.plot_weight_histogram(a, tmp_path / "h.png", layer=1, checkpoint="last")
    check_png(tmp_path / "h.png")
    assert [m["epoch"] for m in plot.curve_metrics(b)] == [1, 2, 3, 4, 5]
    assert capsys.readouterr().err.count("line 6, the last, is cut short") == 1


def test_a_cut_last_line_is_said_not_dropped_silently(tmp_path):
    """Issue 15: plot.py silently dropped the epoch of a cut last line."""
    a = make_run(tmp_path / "a")
    with open(a / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 6, "train_lo')
    r = run_plot(a)
    assert r.returncode == 0, r.stderr
    assert r.stderr == (f"warning: {a / 'metrics.jsonl'}: line 6, the last, is cut short or not a "
                        "JSON object (a copy cut short, or a run killed while writing it); it is "
                        "left out\n")  # once, though the run is read more than once
    check_png(a / "curves.png")
    # a damaged line before the last is an error, naming it
    (a / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1, "val_err": 2}\n{"epo\n'
                                     '{"epoch": 3, "train_loss": 1, "val_err": 2}\n')
    r = run_plot(a)
    assert r.returncode == 2 and str(a / "metrics.jsonl") in r.stderr and "line 2 of 3" in r.stderr


def test_a_sweep_directory_and_histograms_that_do_not_collide(tmp_path):
    """Issue 15: plot.py refused a sweep directory that results.py takes, and named two runs'
    histograms seed1.png and seed1_.png."""
    sweep = tmp_path / "sweep"
    runs = [make_run(sweep / "mnist_det_bc" / "seed1", stochastic=False, seed=1),
            make_run(sweep / "mnist_det_bc" / "seed2", stochastic=False, seed=2),
            make_run(sweep / "mnist_stoch_bc" / "seed1", seed=3)]
    (sweep / "submitit").mkdir()  # the sweep's job logs: no run
    r = run_plot(sweep)
    assert r.returncode == 0, r.stderr
    expected = [sweep / "curves.png"] + [sweep / f"weights_hist_{name}.png" for name in (
        "mnist_det_bc-seed1", "mnist_det_bc-seed2", "mnist_stoch_bc-seed1")]
    assert r.stdout.split() == [str(p) for p in expected]
    for p in expected:
        check_png(p)
    fig = plot.curves_figure(runs)
    assert [t.get_text() for t in fig.legends[0].get_texts()][:3] == [
        "BinaryConnect (det.) (mnist_det_bc-seed1)", "BinaryConnect (det.) (mnist_det_bc-seed2)",
        "BinaryConnect (stoch.)"]
    # a run and the sweep it is in: each run once
    r = run_plot(sweep, runs[0], f"--out={tmp_path / 'again'}")
    assert r.returncode == 0 and len(list((tmp_path / "again").glob("weights_hist_*"))) == 3


def test_a_run_with_only_last_pt(tmp_path):
    """A run stopped before its first evaluation has last.pt and no best.pt: its histogram is
    last.pt's, and said; --checkpoint=best asks for best.pt and says how to get last.pt's."""
    a = make_run(tmp_path / "a", checkpoints=("last",))
    r = run_plot(a)
    assert r.returncode == 0, r.stderr
    assert r.stderr == (f"note: {a} has no best.pt yet (no epoch evaluated): reading last.pt, its "
                        "last checkpoint (5 epochs done)\n")
    check_png(a / "weights_hist_a.png")
    r = run_plot(a, "--checkpoint=best")
    assert r.returncode == 0
    assert "--checkpoint=last reads last.pt" in r.stderr and "no weight histogram" in r.stderr


def test_metrics_line_without_needed_keys(tmp_path):
    a = make_run(tmp_path / "a")
    with open(a / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 6, "LR": 0.001}) + "\n" + json.dumps({"epoch": 7}) + "\n")
    r = run_plot(a)
    assert r.returncode == 2 and "line 6" in r.stderr and "train_loss" in r.stderr
    assert "Traceback" not in r.stderr


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_visible()]


@pytest.mark.parametrize("epochs, markers", [(1, True), (2, True), (60, False)])
def test_curves_two_panels_markers_and_legend_outside(tmp_path, epochs, markers):
    """Issue 10: a one-epoch run is drawn (markers), the loss and the error have panels of their
    own (the loss on a log axis), and the one legend lies outside both."""
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
    plot.plt.close(fig)
    plot.plot_curves(runs, tmp_path / "c.png")
    check_png(tmp_path / "c.png")


def test_variant_names():
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

    fig1 = plot.features_figure(mnist, units=25)
    assert [ax.get_title() for ax in _panels(fig1)] == [
        "No regularizer", "50% Dropout", "BinaryConnect (det.)", "BinaryConnect (stoch.)"]
    image = _panels(fig1)[0].get_images()[0].get_array()
    assert image.shape == (5 * 29 - 1, 5 * 29 - 1)  # 5 x 5 units of 28 x 28, 1-pixel gaps
    fig2 = plot.histograms_figure(mnist)
    assert len(_panels(fig2)) == 4 and len(fig2.legends) == 1
    fig3 = plot.curves_figure(cifar)
    assert len(_panels(fig3)) == 2


@pytest.mark.parametrize("span", [0.0917, 0.617, 2.1])
def test_figure2_tick_labels_do_not_overlap(tmp_path, span):
    """A real-valued layer's span gave nine labels like -0.075 on a 4.4-inch panel, drawn into
    each other; every panel's labels keep apart, whatever the span."""
    runs = [make_run(tmp_path / "noreg", binary=False, first_layer=(40, 784), seed=1),
            make_run(tmp_path / "det", stochastic=False, first_layer=(40, 784), seed=2)]
    w = torch.randn(40, 784, generator=torch.Generator().manual_seed(0)) * span / 4
    w[0, 0] = span
    ckpt = torch.load(runs[0] / "best.pt", weights_only=False)
    ckpt["model"]["0.weight"] = w.clamp(-span, span)
    torch.save(ckpt, runs[0] / "best.pt")
    fig = plot.histograms_figure(runs)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        boxes = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels()
                        if t.get_text() and low <= t.get_position()[0] <= high),
                       key=lambda b: b.x0)
        assert len(boxes) >= 3
        for left, right in zip(boxes, boxes[1:]):
            assert left.x1 + 5 < right.x0, (ax.get_title(), [t.get_text() for t in
                                                             ax.get_xticklabels()])
    plot.plt.close(fig)


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
