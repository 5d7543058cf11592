"""The training loop of the original `binary_connect.train` (§5 of ../shared/SPEC.md), plus what a
20-hour run needs: a run directory, atomic checkpoints, exact resume, clean interrupts.

Every experiment script calls `start_run` right after its hyperparameters, then `train`.
"""
import datetime
import io
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from atomic import atomic_write
from bc_datasets import DatasetError
from binary_connect import (binary_layers, lr_decay, make_optimizer, set_learning_rate,
                            squared_hinge_loss)

CHECKPOINT_VERSION = 1


class Tee(io.TextIOBase):
    """The original printed its report; we also keep it, line for line, in log.txt."""

    def __init__(self, stream, path, mode="a"):
        self.stream = stream
        self.file = open(path, mode, buffering=1)

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def isatty(self):
        return self.stream.isatty()


class Run:
    """Where a run keeps its records: hparams.json, log.txt, metrics.jsonl, last.pt, best.pt.

    Also a context manager around the script's work (see start_run)."""

    def __init__(self, script, config, out_dir, device, resume):
        self.script = script
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = device
        self.resume = resume

    def path(self, name):
        return self.out_dir / name

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return False


def str2(x):
    """Python 2's str() of a float (12 significant digits), which the original's report used."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(x)
    s = "%.12g" % x
    if s.lstrip("-").isdigit():
        s += ".0"
    return s


def _git_info():
    here = Path(__file__).resolve().parent
    def git(*args):
        p = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 else None
    try:
        commit = git("rev-parse", "--verify", "HEAD")  # None outside a repo or before a commit
        status = git("status", "--porcelain") if commit else None
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, (None if status is None else bool(status))


def _select_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: device={name!r} is not a torch device (try auto, cpu, cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: device={name!r} but CUDA is not available here")
    return device


def atomic_write_bytes(path, data):
    with atomic_write(path) as f:
        f.write(data)


def atomic_torch_save(obj, path):
    with atomic_write(path) as f:
        torch.save(obj, f)


def _report_user_errors(kind, value, traceback):
    """A missing or corrupt dataset (bc_datasets.DatasetError) ends the script with its message,
    which says what to do, rather than with a traceback."""
    if issubclass(kind, DatasetError):
        print(f"error: {value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, traceback)


def start_run(script, config):
    """Seeds, device, run directory and log, then the original's start-up print of every
    hyperparameter. `config` must hold seed, device, out_dir and resume."""
    for key in ("batch_size", "num_epochs", "LR_start", "LR_fin"):
        if key in config and not config[key] > 0:
            raise SystemExit(f"error: {key}={config[key]}: must be positive")
    resume = config.get("resume", "")
    out_dir = resume or config.get("out_dir") or os.path.join(
        "runs", f"{script}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out = Path(out_dir)
    if resume and not (out / "last.pt").exists():
        raise SystemExit(f"error: --resume={resume}: no checkpoint {out / 'last.pt'} to resume")
    if not resume and (out / "last.pt").exists():
        raise SystemExit(f"error: {out} already holds a run; continue it with --resume={out} "
                         "or choose another --out_dir")
    try:  # fail before any training if the records cannot be written
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / ".write_test", b"")
        (out / ".write_test").unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write to out_dir {out}: {e.strerror or e}") from None

    np.random.seed(config["seed"])  # §4.1: np.random.seed(1234) at import
    torch.manual_seed(config["seed"])
    device = _select_device(config.get("device", "auto"))
    # Same float32 math as the original: no TF32 shortcuts in matmuls or convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    commit, dirty = _git_info()
    record = dict(script=script, hparams=config, git_commit=commit, git_dirty=dirty,
                  versions=dict(python=platform.python_version(), torch=torch.__version__,
                                numpy=np.__version__),
                  device=str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                        if device.type == "cuda" else ""),
                  started=datetime.datetime.now().isoformat(timespec="seconds"))
    if resume:  # hparams.json stays as the run began; each resume adds a line here
        with open(out / "resumes.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    else:
        atomic_write_bytes(out / "hparams.json", (json.dumps(record, indent=1) + "\n").encode())
    # A fresh start in a directory with no checkpoint (a run that failed before its first
    # epoch) rewrites its log; a resumed run appends to it.
    sys.stdout = Tee(sys.stdout, out / "log.txt", mode="a" if resume else "w")
    sys.excepthook = _report_user_errors
    if resume:
        print(f"Resuming the run in {out}")
    for key, value in config.items():
        print(key + " = " + str(value))
    if all(k in config for k in ("LR_start", "LR_fin", "num_epochs")):
        print("LR_decay = " + str2(lr_decay(config["LR_start"], config["LR_fin"],
                                             config["num_epochs"])))
    return Run(script, config, out, device, bool(resume))


class Split:
    """A split kept where the model is: on the GPU when it fits (no loader, no per-step host
    copies, as in airbench), else on the host; a memory-mapped array stays on disk."""

    def __init__(self, X, y, device):
        self.n = len(X)
        self.device = device
        on_disk = isinstance(X, np.memmap) or isinstance(getattr(X, "base", None), np.memmap)
        fits = device.type != "cuda" or X.nbytes < 0.6 * torch.cuda.mem_get_info(device)[0]
        if (on_disk and device.type == "cpu") or not fits:
            self.X = X
        elif device.type == "cpu":
            self.X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        else:
            # Copied in chunks, so a memory-mapped SVHN never needs a 7 GB host copy.
            self.X = torch.empty(X.shape, dtype=torch.float32, device=device)
            for s in range(0, self.n, 65536):
                self.X[s:s + 65536].copy_(torch.from_numpy(
                    np.ascontiguousarray(X[s:s + 65536], dtype=np.float32)))
        self.y = torch.as_tensor(np.ascontiguousarray(y, dtype=np.float32), device=device)

    def rows(self, start, stop):
        x = self.X[start:stop]
        if isinstance(x, np.ndarray):  # a copy: memory-mapped rows are read-only
            x = torch.from_numpy(np.array(x, dtype=np.float32)).to(self.device)
        return x, self.y[start:stop]

    def gather(self, idx, idx_dev):
        """idx: this minibatch's indices in numpy; idx_dev: the same already on the device, so
        no host-to-device copy (and no sync) is needed per step when X lives there."""
        if isinstance(self.X, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(self.X[idx])).to(self.device)
        else:
            x = self.X[idx_dev]
        return x, self.y[idx_dev]


def evaluate(model, split, batch_size):
    """§5 val_epoch: deterministic pass; error = mean of per-batch error fractions * 100;
    partial batches dropped, as the original's integer division did."""
    model.eval()
    n_batches = split.n // batch_size
    loss = torch.zeros((), dtype=torch.float64, device=split.device)
    err = torch.zeros((), dtype=torch.float64, device=split.device)
    with torch.no_grad():
        for i in range(n_batches):
            x, t = split.rows(i * batch_size, (i + 1) * batch_size)
            y = model(x)
            loss += squared_hinge_loss(y, t)
            err += (y.argmax(1) != t.argmax(1)).float().mean()
    return float(err) / n_batches * 100, float(loss) / n_batches


def report(epoch, num_epochs, seconds, m):
    """§5: the original's nine-line report, labels padded to 33 characters."""
    rows = [("LR:", str2(m["LR"])), ("training loss:", str2(m["train_loss"])),
            ("validation loss:", str2(m["val_loss"])),
            ("validation error rate:", str2(m["val_err"]) + "%"),
            ("best epoch:", str(m["best_epoch"])),
            ("best validation error rate:", str2(m["best_val_err"]) + "%"),
            ("test loss:", str2(m["test_loss"])), ("test error rate:", str2(m["test_err"]) + "%")]
    lines = [f"Epoch {epoch} of {num_epochs} took {str2(seconds)}s"]
    lines += [("  " + label).ljust(33) + value for label, value in rows]
    return "\n".join(lines)


class _Interrupt:
    """SIGINT/SIGTERM set a flag; the loop stops between steps and checkpoints."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: the user insists
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def _rng_states(model, device):
    # The run's own GPU only: a resume on a machine with fewer GPUs must still work.
    return dict(numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                layers=[m.generator.get_state() for m in binary_layers(model)])


def _set_rng_states(model, states, device):
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    for m, s in zip(binary_layers(model), states["layers"]):
        try:
            m.generator.set_state(s)
        except RuntimeError:
            # A generator state from another device kind cannot be restored: reseed, and say so.
            print(f"warning: layer generator state not restorable on {m.weight.device}; reseeded")


def train(model, optimizer, batch_size, LR_start, LR_decay, num_epochs,
          X_train, y_train, X_val, y_val, X_test, y_test, run):
    """§5: shuffle (numpy), train with partial batches dropped, validate every epoch, evaluate
    test only when validation error <= the best so far, print the original's report."""
    device = run.device
    model.to(device)
    train_set = Split(X_train, y_train, device)
    val_set = Split(X_val, y_val, device)
    test_set = Split(X_test, y_test, device)
    for name, split in (("training", train_set), ("validation", val_set), ("test", test_set)):
        if split.n < batch_size:  # it would have no full batch (§5 drops partial ones)
            raise SystemExit(f"error: the {name} set has {split.n} examples, fewer than "
                             f"batch_size={batch_size}")
    n_batches = train_set.n // batch_size

    state = dict(epoch=0, batch=0, LR=LR_start, best_val_err=100., best_epoch=1,
                 test_err=None, test_loss=None, history=[], losses=None,
                 order=np.arange(train_set.n))
    if run.resume:
        state = _load_checkpoint(run, model, optimizer, train_set.n)
    else:
        # §5: the train set is shuffled once before epoch 1 ...
        np.random.shuffle(state["order"])
    log_metrics(run, state["history"])

    with _Interrupt() as interrupt:
        for epoch in range(state["epoch"] + 1, num_epochs + 1):
            start_time = time.time()
            LR = state["LR"]
            set_learning_rate(optimizer, LR)
            model.train()
            losses = torch.zeros(n_batches, dtype=torch.float32, device=device)
            if state["losses"] is not None:  # resuming mid-epoch
                losses[:len(state["losses"])] = torch.as_tensor(state["losses"]).to(device)
            order = state["order"]
            order_dev = torch.as_tensor(order, device=device)
            batches = range(state["batch"], n_batches)
            if sys.stderr.isatty() and sys.stdout.isatty():
                from tqdm import tqdm
                batches = tqdm(batches, desc=f"epoch {epoch}", leave=False,
                               initial=state["batch"], total=n_batches)
            for i in batches:
                batch = slice(i * batch_size, (i + 1) * batch_size)
                x, t = train_set.gather(order[batch], order_dev[batch])
                output = model(x)
                loss = squared_hinge_loss(output, t)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses[i] = loss.detach()  # no host sync per step; checked once per epoch
                if interrupt.signum is not None:
                    _check_finite(losses[:i + 1], epoch)
                    state.update(epoch=epoch - 1, batch=i + 1, losses=losses[:i + 1].cpu())
                    _save_checkpoint(run, model, optimizer, state)
                    _stop(run, interrupt.signum, f"during epoch {epoch} (after batch {i + 1} "
                                                 f"of {n_batches})")
            _check_finite(losses, epoch)
            train_loss = float(losses.double().sum()) / n_batches
            # ... and again after each epoch's training pass (a composed permutation, exactly
            # as the original's shuffle of the arrays).
            perm = np.arange(train_set.n)
            np.random.shuffle(perm)
            state["order"] = order[perm]

            val_err, val_loss = evaluate(model, val_set, batch_size)
            improved = val_err <= state["best_val_err"]  # ties count (§5)
            if improved:
                state["best_val_err"], state["best_epoch"] = val_err, epoch
                state["test_err"], state["test_loss"] = evaluate(model, test_set, batch_size)
            seconds = time.time() - start_time
            metrics = dict(epoch=epoch, LR=LR, train_loss=train_loss, val_loss=val_loss,
                           val_err=val_err, best_epoch=state["best_epoch"],
                           best_val_err=state["best_val_err"], test_loss=state["test_loss"],
                           test_err=state["test_err"], seconds=seconds)
            print(report(epoch, num_epochs, seconds, metrics))
            sys.stdout.flush()
            state["history"].append(metrics)
            state.update(epoch=epoch, batch=0, losses=None, LR=LR * LR_decay)  # §4.1
            _save_checkpoint(run, model, optimizer, state, best=improved)
            log_metrics(run, state["history"])
            if interrupt.signum is not None and epoch < num_epochs:  # it came during evaluation
                _stop(run, interrupt.signum, f"at the end of epoch {epoch}")
    best = state["history"][-1] if state["history"] else None
    if best:
        print(f"Best validation error rate {str2(best['best_val_err'])}% at epoch "
              f"{best['best_epoch']}; test error rate there: {str2(best['test_err'])}%")
    return state["history"]


def fit(model, data, run):
    """What every script does once its data and network are built: hinge targets, the two
    Adams (§2.2), then the loop. Hyperparameters come from run.config."""
    c = run.config
    train_set, valid_set, test_set = data
    batch_size, LR_start, num_epochs = c["batch_size"], c["LR_start"], c["num_epochs"]
    LR_decay = lr_decay(LR_start, c["LR_fin"], num_epochs)
    # for the hinge loss: one-hot {0, 1} -> {-1, +1}
    (X_train, y_train), (X_val, y_val), (X_test, y_test) = [
        (X, 2 * np.asarray(y, dtype=np.float32) - 1.) for X, y in (train_set, valid_set, test_set)]
    optimizer = make_optimizer(model, LR_start)
    print('Training...')
    return train(model, optimizer, batch_size, LR_start, LR_decay, num_epochs,
                 X_train, y_train, X_val, y_val, X_test, y_test, run)


def _stop(run, signum, where):
    print(f"\n{signal.Signals(signum).name} received {where}; checkpoint written to "
          f"{run.path('last.pt')}.\nResume with: python {run.script}.py --resume={run.out_dir}")
    sys.stdout.flush()
    raise SystemExit(128 + signum)


def _check_finite(losses, epoch):
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        raise SystemExit(f"error: the training loss became {float(losses[bad[0, 0]])} at epoch "
                         f"{epoch}, batch {int(bad[0, 0]) + 1}; stopping. The last good "
                         "checkpoint (end of the previous epoch) is kept.")


def log_metrics(run, history):
    """metrics.jsonl is rewritten from the checkpointed history, so a run killed between the
    report and the checkpoint never keeps a line that its resume would repeat."""
    text = "".join(json.dumps(m) + "\n" for m in history)
    atomic_write_bytes(run.path("metrics.jsonl"), text.encode())


def _save_checkpoint(run, model, optimizer, state, best=False):
    checkpoint = dict(version=CHECKPOINT_VERSION, model=model.state_dict(),
                      optimizer=optimizer.state_dict(), rng=_rng_states(model, run.device),
                      hparams=run.config, **state)
    try:
        # best.pt first: if it fails, last.pt still holds the previous epoch, which a resume
        # then redoes, best.pt included.
        if best:
            atomic_torch_save(dict(version=CHECKPOINT_VERSION, model=model.state_dict(),
                                   epoch=state["epoch"], hparams=run.config),
                              run.path("best.pt"))
        atomic_torch_save(checkpoint, run.path("last.pt"))
    except OSError as e:
        raise SystemExit(f"error: could not write a checkpoint in {run.out_dir} "
                         f"({e.strerror or e}); the previous one is intact. Free some space, "
                         f"then resume with: python {run.script}.py --resume={run.out_dir}")


def _load_checkpoint(run, model, optimizer, n_train):
    path = run.path("last.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path}: {e}") from None
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise SystemExit(f"error: {path} is a version {checkpoint.get('version')} checkpoint; "
                         f"this code reads version {CHECKPOINT_VERSION}")
    if len(checkpoint["order"]) != n_train:  # the shuffle order indexes the training set
        raise SystemExit(f"error: {path} was trained on {len(checkpoint['order'])} training "
                         f"examples, but the data now gives {n_train}: resume with the same data")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    _set_rng_states(model, checkpoint["rng"], run.device)
    state = {k: checkpoint[k] for k in ("epoch", "batch", "LR", "best_val_err", "best_epoch",
                                         "test_err", "test_loss", "history", "losses", "order")}
    print(f"Resumed from {path}: epoch {state['epoch']} done"
          + (f", {state['batch']} batches into epoch {state['epoch'] + 1}" if state["batch"]
             else ""))
    return state
