"""Plots of BinaryConnect runs, after the paper's figures (SPEC section 8.5).

    python plot.py RUN_DIR [RUN_DIR ...] [--out=DIR] [--layer=0] [--checkpoint=best|last]

curves.png: Fig. 3 style, training loss dotted and validation error solid, one colour per run.
weights_hist_<run>.png: Fig. 2 style histogram of one binary layer's real-valued weights.
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # a tool for headless machines: never needs a display
import matplotlib.pyplot as plt
import numpy as np

from atomic import atomic_write


class RunError(Exception):
    """A problem with a run directory that the user can fix; main() prints it and exits 2."""


def load_run(run_dir):
    """Return (hparams.json dict, list of per-epoch metric dicts) of a run directory."""
    run_dir = Path(run_dir)
    missing = [n for n in ("hparams.json", "metrics.jsonl") if not (run_dir / n).is_file()]
    if missing:
        raise RunError(f"{run_dir}: missing {', '.join(missing)}; expected a run directory written "
                       "by the training scripts (hparams.json, metrics.jsonl, last.pt, best.pt)")
    try:
        hparams = json.loads((run_dir / "hparams.json").read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{run_dir / 'hparams.json'}: not valid JSON ({e})") from None
    lines = [l for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    metrics = []
    for i, line in enumerate(lines):
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a run still training may be half-way through writing this line
                break
            raise RunError(f"{run_dir / 'metrics.jsonl'}: line {i + 1} is not valid JSON") from None
    if not metrics:
        raise RunError(f"{run_dir / 'metrics.jsonl'}: no epochs recorded yet")
    for i, m in enumerate(metrics):
        lacking = [k for k in ("epoch", "train_loss", "val_err") if k not in m]
        if lacking:
            raise RunError(f"{run_dir / 'metrics.jsonl'}: line {i + 1} lacks {', '.join(lacking)}")
    return hparams, metrics


def variant(hparams):
    hp = hparams.get("hparams", {})
    if not hp.get("binary", True):
        return "no binarization"
    return "stochastic BC" if hp.get("stochastic", True) else "deterministic BC"


def _save(fig, out_path):
    with atomic_write(out_path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def plot_curves(run_dirs, out_path):
    runs = [(Path(d), *load_run(d)) for d in run_dirs]
    variants = [variant(hp) for _, hp, _ in runs]
    fig, ax_loss = plt.subplots(figsize=(8, 5))
    ax_err = ax_loss.twinx()
    for i, (d, hp, metrics) in enumerate(runs):
        label = variants[i]
        if variants.count(label) > 1:
            label += f" ({d.resolve().name})"
        epochs = [m["epoch"] for m in metrics]
        color = f"C{i % 10}"
        ax_loss.plot(epochs, [m["train_loss"] for m in metrics], ":", color=color, lw=1.5)
        ax_err.plot(epochs, [m["val_err"] for m in metrics], "-", color=color, lw=1.5, label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (dotted)")
    ax_err.set_ylabel("validation error % (solid)")
    scripts = sorted({hp.get("script", "?") for _, hp, _ in runs})
    ax_loss.set_title(f"{'/'.join(scripts)}: training loss (dotted) and validation error (solid)")
    ax_err.legend(loc="upper right")
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out_path)


def plot_weight_histogram(run_dir, out_path, layer=0, checkpoint="best"):
    import torch  # imported here: curves alone should not pay torch's import time
    run_dir = Path(run_dir)
    hparams, _ = load_run(run_dir)
    path = run_dir / f"{checkpoint}.pt"
    if not path.is_file():
        raise RunError(f"{run_dir}: no {path.name} (checkpoints are written by the training scripts)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RunError(f"{path}: cannot be loaded as a torch checkpoint ({type(e).__name__}: {e})") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise RunError(f"{path}: expected a dict with a 'model' state_dict")
    # The dense/conv layers are the only ones with a >= 2-D ".weight" (BN has beta/gamma/mean/std).
    layers = [(k, v) for k, v in state.items()
              if k.endswith(".weight") and torch.is_tensor(v) and v.ndim >= 2]
    if not 0 <= layer < len(layers):
        raise RunError(f"{path}: --layer={layer} out of range; layers: "
                       + ", ".join(f"{i}={k} {tuple(v.shape)}" for i, (k, v) in enumerate(layers)))
    key, w = layers[layer]
    shape = tuple(w.shape)
    w = w.detach().float().numpy().ravel()
    H = hparams.get("hparams", {}).get("H", 1.0)
    binary = hparams.get("hparams", {}).get("binary", True)
    # Binary weights are clipped to [-H, H] (SPEC 2.3); otherwise (or H="Glorot") use the data's range.
    span = float(H) if binary and isinstance(H, (int, float)) else float(np.abs(w).max() or 1.0)
    lim = 1.1 * span
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.hist(np.clip(w, -lim, lim), bins=200, range=(-lim, lim), color="C0")
    if binary:
        for x in (-span, span):
            ax.axvline(x, color="gray", ls="--", lw=1)
    ax.set_xlim(-lim, lim)
    ax.set_xlabel("real-valued weight")
    ax.set_ylabel("count")
    ax.set_title(f"{variant(hparams)}: {key} {shape} "
                 f"({checkpoint}.pt, {run_dir.resolve().name})")
    fig.tight_layout()
    _save(fig, out_path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output directory (default: the first RUN_DIR)")
    p.add_argument("--layer", type=int, default=0, help="which binary layer to histogram (0 = first)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    args = p.parse_args(argv)
    out = Path(args.out or args.run_dirs[0])
    try:
        for d in args.run_dirs:
            load_run(d)  # check every directory before writing anything
        out.mkdir(parents=True, exist_ok=True)
        plot_curves(args.run_dirs, out / "curves.png")
        print(out / "curves.png")
        used = set()
        for d in args.run_dirs:
            if not (Path(d) / f"{args.checkpoint}.pt").is_file():
                print(f"note: {d}: no {args.checkpoint}.pt, no weight histogram", file=sys.stderr)
                continue
            name = Path(d).resolve().name
            while name in used:  # two runs named alike in different parents
                name += "_"
            used.add(name)
            path = out / f"weights_hist_{name}.png"
            plot_weight_histogram(d, path, layer=args.layer, checkpoint=args.checkpoint)
            print(path)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
