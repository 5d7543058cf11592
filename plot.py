"""Plots of BinaryConnect runs, after the paper's figures (§8.5).

    python plot.py RUN_DIR [RUN_DIR ...] [--out=DIR] [--layer=0] [--checkpoint=best|last]
    python plot.py --figures RUN_DIR [RUN_DIR ...] [--out=DIR] [--units=36]

A RUN_DIR may be a folder above run directories (a sweep directory): every run below it is drawn.
Per run (the first form):
  curves.png                training loss (dotted, log scale, top panel) and validation error
                            (solid, bottom panel) per epoch, one colour per run;
  weights_hist_<run>.png    the histogram of one binary layer's real-valued weights (best.pt, or
                            last.pt while no epoch has been evaluated); <run> is the run's path
                            below the runs' common folder, e.g. mnist_det_bc-seed1 in a sweep.

The paper's figures (--figures), one panel or one colour per variant (No regularizer, 50% Dropout,
BinaryConnect (det.), BinaryConnect (stoch.): results.variant, from each run's hyperparameters):
  figure1_features.png      Figure 1: some first-layer units of the MNIST MLP, each unit's 784
                            weights drawn as a 28x28 image (MNIST runs);
  figure2_histograms.png    Figure 2: histograms of the MNIST first layer's real-valued weights;
  figure3_curves.png        Figure 3: CIFAR-10 training cost (dotted) and validation error
                            (solid) per epoch (CIFAR-10 runs).
"""
import argparse
import os
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # a tool for headless machines: never needs a display
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from atomic import atomic_write
from results import variant
from checkpoints import checkpoint_path, read_checkpoint
from errors import UserError, print_error
from runfiles import RunError, find_runs, read_metrics, read_record

# Below this many epochs every point gets a marker: a one-epoch curve is a single point, which a
# line alone does not draw.
MARKER_EPOCHS = 30


def curve_metrics(run_dir):
    """The run's metrics.jsonl lines (runfiles.read_metrics), each holding what a curve needs."""
    path = Path(run_dir) / "metrics.jsonl"
    metrics = read_metrics(run_dir)
    if not metrics:
        raise RunError(f"{path}: " + ("no epochs recorded yet" if path.exists() else
                                      "missing: the run has finished no epoch yet"))
    for i, m in enumerate(metrics):
        lacking = [k for k in ("epoch", "train_loss", "val_err") if k not in m]
        if lacking:
            raise RunError(f"{path}: line {i + 1} lacks {', '.join(lacking)}")
    return metrics


def run_names(run_dirs):
    """A name for each run, no two alike: its path below the runs' common folder, '/' as '-'
    (a sweep's mnist_det_bc/seed1 is mnist_det_bc-seed1); one run alone, its folder's name."""
    full = [Path(d).resolve() for d in run_dirs]
    common = Path(os.path.commonpath(full)) if len(full) > 1 else None
    names = []
    for d in full:
        name = "-".join(d.relative_to(common).parts) if common else ""
        name = name or d.name
        while name in names:  # a folder named "a-b" beside a/b
            name += "_"
        names.append(name)
    return names


def _labels(runs):
    """Variant names, with the run's name (run_names) added where two runs share a variant."""
    names = [variant(record) for _, record in runs]
    return [name + (f" ({short})" if names.count(name) > 1 else "")
            for name, short in zip(names, run_names([d for d, _ in runs]))]


def _save(fig, out_path):
    with atomic_write(out_path) as f:
        # "tight" keeps a legend placed outside the axes inside the image.
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Curves (Figure 3)

def curves_figure(run_dirs, title=None):
    """Two panels over the epochs: the training loss (squared hinge, log scale, dotted) above and
    the validation error (%, solid) below, one colour per run, one legend outside the data."""
    loaded = [(Path(d), read_record(d), curve_metrics(d)) for d in run_dirs]
    labels = _labels([(d, hp) for d, hp, _ in loaded])
    fig, (ax_loss, ax_err) = plt.subplots(2, 1, sharex=True, figsize=(8, 6.5),
                                          gridspec_kw=dict(height_ratios=(1, 1)))
    handles = []
    all_positive = True
    few = max(len(metrics) for _, _, metrics in loaded) <= MARKER_EPOCHS
    for i, ((d, hp, metrics), label) in enumerate(zip(loaded, labels)):
        epochs = [m["epoch"] for m in metrics]
        loss = [m["train_loss"] for m in metrics]
        all_positive &= all(v is not None and v > 0 for v in loss)
        style = dict(color=f"C{i % 10}", lw=1.5)
        if few:
            style.update(marker="o", markersize=4)
        ax_loss.plot(epochs, loss, ":", **style)
        ax_err.plot(epochs, [m["val_err"] for m in metrics], "-", **style)
        handles.append(Line2D([], [], ls="-", label=label, **style))
    if all_positive:
        ax_loss.set_yscale("log")
        # Plain numbers (0.5, not 5x10^-1); the minor ticks are labelled too when the range is
        # under a decade (a few epochs), where there may be no major tick at all.
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax_loss.yaxis.set_major_formatter(plain)
        low, high = ax_loss.get_ylim()
        ax_loss.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())
    if few:  # whole epochs only, with room around a single point
        last = max(m["epoch"] for _, _, metrics in loaded for m in metrics)
        first = min(m["epoch"] for _, _, metrics in loaded for m in metrics)
        ax_err.set_xlim(first - 0.5, last + 0.5)
    ax_loss.set_ylabel("training cost\n(squared hinge, dotted)")
    ax_err.set_ylabel("validation error %\n(solid)")
    ax_err.set_xlabel("epoch")
    ax_err.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3, which="both" if ax is ax_err else "major")
    handles += [Line2D([], [], color="k", ls=":", label="training cost"),
                Line2D([], [], color="k", ls="-", label="validation error")]
    if title is None:
        scripts = sorted({hp.get("script", "?") for _, hp, _ in loaded})
        title = f"{'/'.join(scripts)}: training cost and validation error"
    ax_loss.set_title(title)
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False)
    return fig


def plot_curves(run_dirs, out_path, title=None):
    _save(curves_figure(run_dirs, title), out_path)


# ---------------------------------------------------------------------------------------------
# First-layer weights (Figures 1 and 2, and one run's histogram)

def layer_weights(run_dir, layer=0, checkpoint=None):
    """(name, shape, real-valued weights as a float32 array, the checkpoint's file name) of a
    run's `layer`-th dense/conv layer in its checkpoint (checkpoints.read_checkpoint: best.pt, or
    last.pt where no epoch has been evaluated yet, unless `checkpoint` says which)."""
    ckpt, path = read_checkpoint(run_dir, checkpoint)
    state = ckpt["model"]
    # The dense/conv layers are the only ones with a >= 2-D floating ".weight" (BN has
    # beta/gamma/mean/std, a binary layer's stream buffers are not floating).
    layers = [(k, v) for k, v in state.items() if k.endswith(".weight") and torch.is_tensor(v)
              and v.ndim >= 2 and v.is_floating_point()]
    if not 0 <= layer < len(layers):
        raise RunError(f"{path}: --layer={layer} out of range; layers: "
                       + ", ".join(f"{i}={k} {tuple(v.shape)}" for i, (k, v) in enumerate(layers)))
    key, w = layers[layer]
    return key, tuple(w.shape), w.detach().float().numpy(), path.name


def _span(hparams, w):
    """Binary weights are clipped to [-H, H] (§2.3); otherwise (or H="Glorot") the data's range."""
    hp = hparams.get("hparams", {})
    H = hp.get("H", 1.0)
    if hp.get("binary", True) and isinstance(H, (int, float)):
        return float(H)
    return float(np.abs(w).max() or 1.0)


def draw_histogram(ax, w, span, binary):
    lim = 1.1 * span
    ax.hist(np.clip(w.ravel(), -lim, lim), bins=200, range=(-lim, lim), color="C0")
    if binary:
        for x in (-span, span):
            ax.axvline(x, color="gray", ls="--", lw=1)
    ax.set_xlim(-lim, lim)
    # Five labels or so, symmetric about 0: a panel 4.4 inches wide holds them whatever the
    # span (a real-valued layer's 0.1 gave nine labels like -0.075, which ran into each other).
    ax.xaxis.set_major_locator(MaxNLocator(6, symmetric=True, steps=[1, 2, 5, 10]))
    ax.set_xlabel("real-valued weight")
    ax.set_ylabel("count")


def plot_weight_histogram(run_dir, out_path, layer=0, checkpoint=None, name=None, weights=None):
    """weights: layer_weights' result, when it was read before (main checks every checkpoint
    before it writes anything)."""
    run_dir = Path(run_dir)
    hparams = read_record(run_dir)
    key, shape, w, source = weights or layer_weights(run_dir, layer, checkpoint)
    binary = hparams.get("hparams", {}).get("binary", True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_histogram(ax, w, _span(hparams, w), binary)
    if binary:
        ax.legend(handles=[Line2D([], [], color="gray", ls="--", label="clip bounds -H, +H")],
                  loc="upper center")
    ax.set_title(f"{variant(hparams)}: {key} {shape} "
                 f"({source}, {name or run_dir.resolve().name})")
    fig.tight_layout()
    _save(fig, out_path)


def _panel_grid(n, width, height):
    """n panels in one row, or two rows from four on, so the figure stays readable; the unused
    cell of an odd count is hidden."""
    rows = 1 if n <= 3 else 2
    cols = -(-n // rows)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 0.8, height * rows),
                             squeeze=False)
    axes = list(axes.ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _first_layers(run_dirs, checkpoint):
    runs = [(Path(d), read_record(d)) for d in run_dirs]
    return [(d, hp, label, layer_weights(d, 0, checkpoint))
            for (d, hp), label in zip(runs, _labels(runs))]


def _sources(runs):
    """The checkpoint files the panels come from: best.pt, last.pt or both."""
    return "/".join(sorted({source for *_, (_, _, _, source) in runs}))


def histograms_figure(run_dirs, checkpoint=None):
    """Figure 2: one histogram panel per run of its first layer's real-valued weights."""
    runs = _first_layers(run_dirs, checkpoint)
    fig, axes = _panel_grid(len(runs), 4.4, 3.6)
    any_binary = False
    for ax, (d, hp, label, (key, shape, w, _)) in zip(axes, runs):
        binary = hp.get("hparams", {}).get("binary", True)
        any_binary |= bool(binary)
        draw_histogram(ax, w, _span(hp, w), binary)
        ax.set_title(label)
    fig.suptitle(f"Figure 2: first-layer weights ({shape[1]} inputs x {shape[0]} units, "
                 f"{_sources(runs)})")
    fig.tight_layout()
    if any_binary:
        fig.legend(handles=[Line2D([], [], color="gray", ls="--", label="clip bounds -H, +H")],
                   loc="upper left", bbox_to_anchor=(1.0, 0.9), frameon=False)
    return fig


def features_figure(run_dirs, units=36, checkpoint=None):
    """Figure 1: one panel per run, a mosaic of the first `units` first-layer units, each unit's
    784 real-valued weights as a 28x28 image (white positive, black negative), each panel on a
    symmetric scale of its own: [-H, H] for binary runs, the 99.5th percentile of |W| otherwise."""
    runs = _first_layers(run_dirs, checkpoint)
    for d, hp, label, (key, shape, w, _) in runs:
        if len(shape) != 2 or shape[1] != 784:
            raise RunError(f"{d}: its first layer {key} has shape {shape}; Figure 1 needs the "
                           "MNIST MLP's (units, 784)")
    n = min(units, min(shape[0] for *_, (_, shape, _, _) in runs))
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = _panel_grid(len(runs), 3.8, 3.9)
    for ax, (d, hp, label, (key, shape, w, _)) in zip(axes, runs):
        binary = hp.get("hparams", {}).get("binary", True)
        # Real-valued networks have no clip bound; a few large weights would wash out the rest.
        span = _span(hp, w[:n]) if binary else float(np.percentile(np.abs(w[:n]), 99.5) or 1.)
        # Tiles 28x28 with a one-pixel gap (NaN: drawn in the background colour).
        mosaic = np.full((rows * 29 - 1, cols * 29 - 1), np.nan, dtype=np.float32)
        for i in range(n):
            r, c = divmod(i, cols)
            mosaic[r * 29:r * 29 + 28, c * 29:c * 29 + 28] = w[i].reshape(28, 28)
        cmap = plt.get_cmap("gray").with_extremes(bad="#6a9fd4")
        im = ax.imshow(mosaic, cmap=cmap, vmin=-span, vmax=span, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label)
        ax.set_xlabel(f"units 0-{n - 1}, 28x28 weights each")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="weight")
    fig.suptitle(f"Figure 1: first-layer features of the MNIST MLP ({_sources(runs)})")
    fig.tight_layout()
    return fig


def paper_figures(run_dirs, out, units=36, checkpoint=None, log=print):
    """Writes Figures 1 and 2 from the MNIST runs and Figure 3 from the CIFAR-10 runs among
    `run_dirs`; returns the paths written."""
    out = Path(out)
    by_script = {}
    for d in run_dirs:
        by_script.setdefault(read_record(d).get("script"), []).append(d)
    others = sorted(str(s) for s in by_script if s not in ("mnist", "cifar10"))
    if others:
        log(f"note: runs of {', '.join(others)} are in no paper figure (Figures 1-2: mnist, "
            "Figure 3: cifar10)")
    jobs = []
    if "mnist" in by_script:
        mnist = by_script["mnist"]
        jobs += [("figure1_features.png", lambda: features_figure(mnist, units, checkpoint)),
                 ("figure2_histograms.png", lambda: histograms_figure(mnist, checkpoint))]
    else:
        log("note: no MNIST run given: no Figures 1 and 2")
    if "cifar10" in by_script:
        cifar = by_script["cifar10"]
        jobs.append(("figure3_curves.png", lambda: curves_figure(
            cifar, title="Figure 3: CIFAR-10 training cost and validation error")))
    else:
        log("note: no CIFAR-10 run given: no Figure 3")
    figures = [(name, make()) for name, make in jobs]  # every input checked before any write
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in figures:
        _save(fig, out / name)
    return [out / name for name, _ in figures]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories, or folders above them (sweep directories)")
    p.add_argument("--out", help="output directory (default: the first RUN_DIR)")
    p.add_argument("--layer", type=int, default=0, help="which binary layer to histogram (0 = first)")
    p.add_argument("--checkpoint", choices=("best", "last"),
                   help="the weights of best.pt or last.pt (default: best.pt, or last.pt while no "
                        "epoch has been evaluated, with a note)")
    p.add_argument("--figures", action="store_true",
                   help="draw the paper's Figures 1-3 instead of the per-run plots")
    p.add_argument("--units", type=int, default=36, help="Figure 1: units shown per variant")
    args = p.parse_args(argv)
    out = Path(args.out or args.run_dirs[0])
    try:
        runs = find_runs(*args.run_dirs)
        for d in runs:  # check every run before writing anything
            read_record(d)
            curve_metrics(d)
        if args.figures:
            if args.units < 1:
                raise RunError(f"--units={args.units}: must be at least 1")
            for path in paper_figures(runs, out, args.units, args.checkpoint,
                                      log=lambda s: print(s, file=sys.stderr)):
                print(path)
            return 0
        histograms = []  # every checkpoint read (a damaged one refused) before any write
        for d, name in zip(runs, run_names(runs)):
            try:
                checkpoint_path(d, args.checkpoint)
            except RunError as e:
                print(f"note: {e}; no weight histogram", file=sys.stderr)
                continue
            histograms.append((d, name, layer_weights(d, args.layer, args.checkpoint)))
        out.mkdir(parents=True, exist_ok=True)
        plot_curves(runs, out / "curves.png")
        print(out / "curves.png")
        for d, name, weights in histograms:
            path = out / f"weights_hist_{name}.png"
            plot_weight_histogram(d, path, name=name, weights=weights)
            print(path)
    except UserError as e:
        return print_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
