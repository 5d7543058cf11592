"""Evaluate a trained BinaryConnect model on the validation and test sets of its own run, under the
paper's test-time choices (paper section 2, §8.2):

  real      the real-valued weights W: what the paper reports for stochastic BC (its default here)
  sign      the deterministic sign of W (W >= 0 -> +H): deterministic BC's own rule, and what
            export.py packs into a 1-bit model
  ensemble  the mean output of K binary networks sampled with the stochastic rule (--samples=K,
            seeded by --seed), then the argmax

    python evaluate.py RUN_DIR_OR_CHECKPOINT [--checkpoint=best|last] [--modes=real,sign,ensemble]
                       [--samples=10] [--seed=1234] [--data_dir=...] [--SVHN_LOCAL_PATH=...]

Defaults: stochastic BC gets all three modes side by side, deterministic BC its sign, a binary=False
network its real weights; best.pt, or last.pt (with a note) for a run that has evaluated no epoch
yet. The network is rebuilt as its run built it (the script named in the run's hparams.json), the
data read from the run's paths (a relative one from the directory the run was started in) unless
--data_dir / --SVHN_LOCAL_PATH say where it is now. Errors and losses follow the training report's
rules (full batches of the run's batch_size, the last partial batch dropped; §5).
"""
import argparse
import copy
import importlib
import sys
from pathlib import Path

import numpy as np
import torch

from checkpoints import read_checkpoint
from errors import UserError, print_error
from runfiles import read_record, resolve_data_paths

ROOT = Path(__file__).resolve().parent
SCRIPTS = ("mnist", "cifar10", "svhn")
TEST_MODES = ("real", "sign", "ensemble")
MODE_TITLES = {
    "real": "real-valued weights W",
    "sign": "sign of W (W >= 0 -> +H)",
    "ensemble": "mean output of {samples} sampled binary network{s} (seed {seed})",
}


def load_trained(path, checkpoint=None, script=None, overrides=None):
    """Rebuild a run's network and load its weights (checkpoints.read_checkpoint: best.pt, or last.pt
    where no epoch has been evaluated yet, unless `checkpoint` says which).

    Returns (model in eval mode on the CPU, hparams with `overrides` applied, script name, the
    checkpoint dict, the checkpoint's path)."""
    ckpt, ckpt_path = read_checkpoint(path, checkpoint)
    run_dir = ckpt_path.parent
    record = read_record(run_dir) if (run_dir / "hparams.json").is_file() else {}
    script = script or record.get("script")
    if script is None:
        raise UserError(f"{ckpt_path}: no hparams.json beside it to say which script built the "
                        f"network; pass --script={'|'.join(SCRIPTS)}")
    if script not in SCRIPTS:
        raise UserError(f"{run_dir / 'hparams.json'}: script {script!r} is not one of "
                        f"{', '.join(SCRIPTS)}")
    # the data paths as the run meant them, wherever this runs; then what the user says
    hp = resolve_data_paths(run_dir, ckpt["hparams"])
    hp.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    mod = importlib.import_module(script)
    # Building draws the initial weights from numpy's global RNG; keep the caller's stream.
    state = np.random.get_state()
    try:
        model = mod.build_model(hp)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{ckpt_path}: its hyperparameters do not build a {script} network "
                        f"({type(e).__name__}: {e})") from None
    finally:
        np.random.set_state(state)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        # torch's first line only says "Error(s) in loading state_dict"; the keys follow.
        detail = " ".join(l.strip() for l in str(e).splitlines()[1:]) or str(e)
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise UserError(f"{ckpt_path}: its weights do not fit the {script} network its "
                        f"hyperparameters describe ({detail})") from None
    model.eval()
    return model, hp, script, ckpt, ckpt_path


def binarized_copy(model, rule, generator=None):
    """A copy of `model` whose binary layers compute with fixed weights, as given.

    rule "sign": the deterministic rule (W >= 0 -> +H); "sample": one draw of the stochastic rule
    from `generator`, layer after layer in module order; "real": the real-valued W itself."""
    from binary_connect import binarization, binary_layers
    net = copy.deepcopy(model)
    with torch.no_grad():
        for layer in binary_layers(net):
            if not layer.binary:
                continue
            if rule != "real":
                layer.weight.copy_(binarization(layer.weight, layer.H, binary=True,
                                                deterministic=False,
                                                stochastic=(rule == "sample"),
                                                stream=generator))
            layer.binary = False  # its forward now uses layer.weight as it is
    return net.eval()


def ensemble(model, samples, generator):
    """The mean output of `samples` binary networks sampled from `model` with the stochastic
    rule: a forward function for training.evaluate, which scores it as it scores any network."""
    nets = [binarized_copy(model, "sample", generator) for _ in range(samples)]

    def forward(x):
        return sum(net(x) for net in nets) / samples
    return forward


def default_modes(hp):
    if not hp.get("binary", True):
        return ["real"]
    return list(TEST_MODES) if hp.get("stochastic", True) else ["sign"]


def parse_modes(text, hp):
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in TEST_MODES]
    if bad or not modes:
        raise UserError(f"--modes={text}: choose from {', '.join(TEST_MODES)} (comma-separated)")
    if not hp.get("binary", True) and modes != ["real"]:
        raise UserError(f"--modes={text}: a binary=False network has only real weights; "
                        "use --modes=real")
    return modes


def mode_title(mode, hp, samples, seed):
    title = MODE_TITLES[mode].format(samples=samples, seed=seed, s="" if samples == 1 else "s")
    binary, stochastic = hp.get("binary", True), hp.get("stochastic", True)
    if mode == "real" and binary and stochastic:
        title += ": the paper's choice for stochastic BC"
    if mode == "sign" and binary and not stochastic:
        title += ": deterministic BC's own test-time rule"
    return title


def evaluate_modes(model, hp, modes, val_set, test_set, batch_size, samples=10, seed=1234):
    """{mode: {"val_err", "val_loss", "test_err", "test_loss"}} for each requested mode."""
    import training
    device = val_set.device
    reduction = hp.get("loss_reduction", "mean")
    out = {}
    for mode in modes:
        forward = None
        if mode == "ensemble":
            net = model
            forward = ensemble(model, samples, torch.Generator(device=device).manual_seed(seed))
        else:
            # "real" is the model's own eval for stochastic BC and for binary=False; for
            # deterministic BC the model already evaluates with the sign, so "real" needs W as is.
            net = binarized_copy(model, mode)
        val_err, val_loss = training.evaluate(net, val_set, batch_size, reduction, forward)
        test_err, test_loss = training.evaluate(net, test_set, batch_size, reduction, forward)
        out[mode] = dict(val_err=val_err, val_loss=val_loss, test_err=test_err,
                         test_loss=test_loss)
    return out


def format_block(title, m):
    from report import report_lines
    return "\n".join([f"Test-time mode: {title}"] + report_lines(m))


def _bool(text):
    from configurator import parse_bool
    try:
        return parse_bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--checkpoint", choices=("best", "last"),
                   help="for a RUN_DIR: best.pt (the best validation epoch) or last.pt (default: "
                        "best.pt, or last.pt while no epoch has been evaluated, with a note)")
    p.add_argument("--modes", help="comma-separated, from real, sign, ensemble (default: all three "
                                   "for stochastic BC, sign for deterministic BC, real otherwise)")
    p.add_argument("--samples", type=int, default=10, help="K for the ensemble mode (default 10)")
    p.add_argument("--seed", type=int, default=1234, help="seeds the ensemble's samples")
    p.add_argument("--data_dir",
                   help="where the MNIST / CIFAR-10 files are now (default: the run's)")
    p.add_argument("--SVHN_LOCAL_PATH", help="where svhn_preprocessing.py's output is now (SVHN)")
    p.add_argument("--verify_checksums", type=_bool, help="default: the run's setting")
    p.add_argument("--script", choices=SCRIPTS,
                   help="the script that trained it, when no hparams.json lies beside "
                        "the checkpoint")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu; the "
                                                    "default), cpu or cuda")
    args = p.parse_args(argv)
    try:
        if args.samples < 1:
            raise UserError(f"--samples={args.samples}: must be at least 1")
        from configurator import select_device
        device = select_device(args.device)
        overrides = dict(data_dir=args.data_dir, SVHN_LOCAL_PATH=args.SVHN_LOCAL_PATH,
                         verify_checksums=args.verify_checksums)
        model, hp, script, ckpt, ckpt_path = load_trained(args.path, args.checkpoint, args.script,
                                                          overrides)
        modes = default_modes(hp) if args.modes is None else parse_modes(args.modes, hp)
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 arithmetic of training
        torch.backends.cudnn.allow_tf32 = False
        mod = importlib.import_module(script)
        from dataset_files import DatasetError
        try:
            _, (X_val, y_val), (X_test, y_test) = mod.load_data(hp)
        except DatasetError as e:
            raise UserError(f"{e} (the data paths come from the run's hparams; "
                            "--data_dir= or --SVHN_LOCAL_PATH= points elsewhere)") from None
        import fast_step
        batch_size = hp["batch_size"]
        for name, X in (("validation", X_val), ("test", X_test)):
            if len(X) < batch_size:
                raise UserError(f"the {name} set has {len(X)} examples, fewer than the run's "
                                f"batch_size={batch_size}: no full batch to evaluate")
        val_set = fast_step.Split(X_val, 2 * np.asarray(y_val, np.float32) - 1, device)
        test_set = fast_step.Split(X_test, 2 * np.asarray(y_test, np.float32) - 1, device)
        model.to(device)
        from results import variant
        print(f"{ckpt_path}: {script}, {variant(hp)}, epoch {ckpt.get('epoch', '?')}; "
              f"{val_set.n // batch_size * batch_size} validation and "
              f"{test_set.n // batch_size * batch_size} test examples (full batches of "
              f"{batch_size})")
        results = evaluate_modes(model, hp, modes, val_set, test_set, batch_size,
                                 args.samples, args.seed)
        for mode in modes:
            print(format_block(mode_title(mode, hp, args.samples, args.seed), results[mode]))
    except UserError as e:
        return print_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
