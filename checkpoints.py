"""Checkpoints: last.pt (everything a resume needs) and best.pt (the best-validation model), the
only code that writes or reads them. A checkpoint (every `checkpoint_every` epochs, the last epoch
and a signal's moment) is taken to host memory at once and written by a background thread; every
write is atomic, best.pt first, then last.pt, then metrics.jsonl, so metrics.jsonl never holds an
epoch that a resume would repeat. Between checkpoints, an improving epoch's model waits in host
memory (take_best) for the next checkpoint to write it as best.pt.
"""
import dataclasses
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import torch

from binary_connect import binary_layers
from configurator import changed, resume_may_change
from fast_step import to_host
from rundir import atomic_torch_save, log_metrics
from runfiles import RUN_FILES, RunError

# 2: optimizer state as tensors ("step"), the layers' draw counters in the model, the stream kind.
CHECKPOINT_VERSION = 2

# ------------------------------------------------------------------------------------------------
# Random-stream state: numpy's, torch's, CUDA's and each stochastic layer's

def rng_states(model, device):
    # The run's own GPU only: a resume on a machine with fewer GPUs must still work.
    layers = binary_layers(model)
    kind = layers[0].stream_kind if layers else "generator"
    return dict(numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                kind=kind, device=device.type,
                layers=[m.generator.get_state() for m in layers] if kind == "generator" else None)


def set_rng_states(model, states, device):
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    layers = binary_layers(model)
    kind = layers[0].stream_kind if layers else "generator"
    saved_kind = states.get("kind", "generator")
    if kind == "counter":
        if saved_kind != "counter" and any(m.stochastic for m in layers):
            print("note: this run sampled its binary weights from torch.Generator streams (the "
                  "eager modules); the compiled step samples from counter streams: from here on "
                  "each layer draws from its counter stream, a new stream, not a repeat")
        return
    restored = saved_kind == "generator" and states.get("device", device.type) == device.type
    for m, s in zip(layers, states["layers"] if restored else [None] * len(layers)):
        if s is not None:
            m.generator.set_state(s)
        else:
            # A stream from another device kind (or a counter stream) cannot continue here:
            # a new seed derived from (seed, draws so far) gives a stream that does not repeat it.
            seed = np.random.SeedSequence([m.seed, int(m.draws)]).generate_state(1)[0]
            m.generator.manual_seed(int(seed))
    if not restored and any(m.stochastic for m in layers):
        print(f"note: the layers' random streams were saved as {saved_kind} streams on "
              f"{states.get('device')} and cannot continue as torch.Generator streams on "
              f"{device.type}: each layer continues with a new stream seeded from (its seed, its "
              "draws so far), which does not repeat the old one")


# ------------------------------------------------------------------------------------------------
# Checkpoints: taken to host memory at the end of an epoch, written by a background thread

class CheckpointWriter:
    """Writes each checkpoint (best.pt, then last.pt, then metrics.jsonl, each atomic)
    in a background thread from a host-memory snapshot, so a 2-second epoch does not wait for
    150 MB to reach the disk. One write at a time: the next snapshot waits for the previous
    write. metrics.jsonl is written after last.pt, so it never holds an epoch that a resume
    would repeat."""

    def __init__(self, run):
        self.run = run
        self.thread = None
        self.error = None

    def save(self, checkpoint, best=None):
        self.wait()
        self.thread = threading.Thread(target=self._write, args=(checkpoint, best))
        self.thread.start()

    def _write(self, checkpoint, best):
        try:
            write_checkpoint(self.run, checkpoint, best)
        except BaseException as e:  # raised in the training thread at its next wait()
            self.error = e

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


@dataclasses.dataclass
class Progress:
    """Where the training loop stands: what a checkpoint holds besides the model, the optimizer
    and the random streams. batch, losses and elapsed describe an epoch stopped part-way."""
    order: np.ndarray  # the training set's shuffle (§5)
    LR: float  # the next epoch's learning rate
    epoch: int = 0  # epochs done
    batch: int = 0  # batches done of the next epoch
    losses: np.ndarray | None = None  # their training losses
    elapsed: float = 0.  # their seconds
    best_val_err: float = 100.
    best_epoch: int = 1
    test_err: float | None = None  # at best_epoch
    test_loss: float | None = None
    history: list = dataclasses.field(default_factory=list)  # the evaluated epochs' metrics
    unreported: float = 0.  # seconds of the epochs since the last evaluated one (monitor_step)


def take_checkpoint(run, model, optimizer, progress):
    """A host-memory copy of everything a resume needs, taken at once: training can go on
    while it is written. (to_host makes the one copy: vars, not dataclasses.asdict, which
    would deep-copy the progress first.)"""
    return to_host(dict(version=CHECKPOINT_VERSION, model=model.state_dict(),
                         optimizer=optimizer.state_dict(), rng=rng_states(model, run.device),
                         hparams=run.config, **vars(progress)))


def take_best(model, epoch):
    """The best-validation model of an epoch with no checkpoint of its own (checkpoint_every >
    1), in host memory until the next checkpoint writes it as best.pt."""
    return dict(model=to_host(model.state_dict()), epoch=epoch)


def write_checkpoint(run, checkpoint, best=None):
    """best: None, True (best.pt is this checkpoint's model) or a take_best of an earlier epoch
    since the previous checkpoint."""
    try:
        # best.pt first: if it fails, last.pt still holds the previous epoch, which a resume
        # then redoes, best.pt included.
        if best:
            best = checkpoint if best is True else best
            atomic_torch_save(dict(version=CHECKPOINT_VERSION, model=best["model"],
                                   epoch=best["epoch"], hparams=run.config),
                              run.path("best.pt"))
        atomic_torch_save(checkpoint, run.path("last.pt"))
        log_metrics(run, checkpoint["history"])
    except OSError as e:
        raise SystemExit(f"error: could not write a checkpoint in {run.out_dir} "
                         f"({e.strerror or e}); the previous one is intact. Free some space, "
                         f"then resume with: python {run.script}.py --resume={run.out_dir}")


def save_checkpoint(run, model, optimizer, progress, best=None):
    """The checkpoint of this moment, written before returning."""
    write_checkpoint(run, take_checkpoint(run, model, optimizer, progress), best)


def _upgrade(checkpoint, model):
    """A version 1 checkpoint (optimizer steps as ints, no draw counters, generator streams)
    read as version 2: every stochastic layer had drawn once per step taken."""
    state = checkpoint["optimizer"]["state"]
    steps = 0
    for s in state.values():
        steps = s.pop("t")
        s["step"] = torch.tensor(float(steps), dtype=torch.float64)
    for name, m in model.named_modules():
        if m in binary_layers(model):
            checkpoint["model"][f"{name}.draws"] = torch.tensor(
                steps if m.binary and m.stochastic else 0, dtype=torch.int64)
    checkpoint["rng"]["kind"], checkpoint["rng"]["device"] = "generator", None
    checkpoint.setdefault("elapsed", 0.)
    return checkpoint


def _check_hparams(run, path, trained):
    """The checkpoint holds the hyperparameters it was trained with; a resume takes them from
    hparams.json, which can be edited: a run half one setting, half another, whose records
    would claim the edited one, is refused (the overrides a resume may change aside)."""
    if not isinstance(trained, dict):
        return
    differ = changed(run.config, trained)
    if differ:
        raise RunError(
            f"{run.path('hparams.json')} does not match the checkpoint {path}: "
            + ", ".join(f"{k} is {run.config[k]!r} there but {trained[k]!r} in the checkpoint"
                        for k in differ)
            + "; a resumed run keeps the hyperparameters it was trained with: put those values "
            f"back (a resume may change only {resume_may_change(run.config)}), or start a new "
            "run with the new ones (docs/runs.md, \"Changing a setting\")")


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _cut_short(path):
    """What is wrong with a checkpoint file torch.load could not read, when it is one that was
    not written to its end (empty, or a zip archive without its closing directory: torch.save
    writes zip archives); None otherwise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if size == 0:
        return "is empty (0 bytes)"
    if zip_start and not zipfile.is_zipfile(path):
        return f"is cut short ({size} bytes, its end missing: a copy or a disk that failed)"
    return None


def _damaged_last(run, path, error):
    """What a run whose last.pt cannot be read can do: its records stay; it can be trained
    again from scratch; best.pt, when sound, still holds its best model (not a resume point: it
    has no optimizer state, random streams or shuffle order, which a resume needs to be the same
    run)."""
    what = _cut_short(path) or f"cannot be read (torch.load says: {_first_line(error)})"
    best = run.path("best.pt")
    try:
        epoch = read_checkpoint(best)[0].get("epoch") if best.is_file() else None
    except RunError:
        epoch = None
    sound = (f"; best.pt is sound (the model of epoch {epoch}: evaluate.py and export.py read "
             "it), but it holds no optimizer state or random streams, so no resume starts "
             "from it") if epoch is not None else ""
    return (f"the run's checkpoint {path} {what}, so the run cannot continue from it. Its "
            f"records (hparams.json, log.txt, metrics.jsonl) are kept{sound}. To train it again "
            f"from scratch, start a new run with the hyperparameters of "
            f"{run.path('hparams.json')} and another --out_dir (or move {run.out_dir} aside "
            "first)")


def load_checkpoint(run, model, optimizer, n_train):
    path = run.path("last.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RunError(_damaged_last(run, path, e)) from None
    if checkpoint.get("version") not in (1, CHECKPOINT_VERSION):
        raise RunError(f"{path} is a version {checkpoint.get('version')} checkpoint; this code "
                       f"reads versions 1 and {CHECKPOINT_VERSION}")
    if checkpoint["version"] == 1:
        checkpoint = _upgrade(checkpoint, model)
    _check_hparams(run, path, checkpoint.get("hparams"))
    if len(checkpoint["order"]) != n_train:  # the shuffle order indexes the training set
        raise RunError(f"{path} was trained on {len(checkpoint['order'])} training examples, "
                       f"but the data now gives {n_train}: resume with the same data")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    set_rng_states(model, checkpoint["rng"], run.device)
    progress = Progress(**{f.name: checkpoint[f.name] for f in dataclasses.fields(Progress)
                           if f.name in checkpoint})
    print(f"Resumed from {path}: epoch {progress.epoch} done"
          + (f", {progress.batch} batches into epoch {progress.epoch + 1}" if progress.batch
             else ""))
    return progress


# ------------------------------------------------------------------------------------------------
# Reading checkpoints: what the tools use (evaluate, export, plot)

# A last.pt also holds numpy RNG states; these let it load with weights_only=True (no code runs).
NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype] + [
    getattr(np.dtypes, n) for n in ("UInt32DType", "Int64DType", "Int32DType", "Float64DType",
                                    "Float32DType", "UInt8DType", "BoolDType")]


def checkpoint_path(path, checkpoint=None):
    """The checkpoint a tool reads: PATH itself when it is a file; in a run directory
    <checkpoint>.pt. checkpoint None: best.pt, or last.pt where there is no best.pt yet (no
    epoch evaluated: a run stopped in its first epoch); returns (path, whether it fell back)."""
    path = Path(path)
    if path.is_file():
        return path, False
    if not path.exists():
        raise RunError(f"{path}: no such file or directory")
    wanted = path / f"{checkpoint or 'best'}.pt"
    if wanted.is_file():
        return wanted, False
    last = path / "last.pt"
    if checkpoint is None and last.is_file():
        return last, True
    if checkpoint == "best" and last.is_file():
        raise RunError(f"{path}: no best.pt yet (no epoch evaluated); --checkpoint=last reads "
                       "last.pt, the run's last checkpoint")
    if (path / "hparams.json").is_file():
        raise RunError(f"{path}: no {wanted.name}{'' if checkpoint else ' or last.pt'}: the run "
                       "has written no checkpoint yet")
    raise RunError(f"{path}: no {wanted.name} in this directory; expected a run directory "
                   f"{RUN_FILES}, or a checkpoint file")


def read_checkpoint(path, checkpoint=None):
    """(checkpoint dict, its path) of a run directory or checkpoint file, loaded with
    weights_only=True: no pickled code runs. See checkpoint_path for which file; a fall back to
    last.pt is said in one line on stderr."""
    ckpt_path, fell_back = checkpoint_path(path, checkpoint)
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:
        cut = _cut_short(ckpt_path)
        if cut:
            raise RunError(f"{ckpt_path} {cut}: a checkpoint whose writing did not finish; "
                           "the run that wrote it keeps its other records") from None
        raise RunError(f"{ckpt_path}: not a checkpoint of this project (expected best.pt or "
                       f"last.pt from a training run; torch.load says: {_first_line(e)})") \
            from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
            and isinstance(ckpt.get("hparams"), dict)):
        raise RunError(f"{ckpt_path}: a torch file, but not a training checkpoint of this project "
                       "(expected a dict with 'model' and 'hparams': best.pt or last.pt)")
    if fell_back:
        epoch, batch = ckpt.get("epoch"), ckpt.get("batch")
        print(f"note: {path} has no best.pt yet (no epoch evaluated): reading last.pt, its last "
              f"checkpoint ({epoch} epoch{'' if epoch == 1 else 's'} done"
              + (f", {batch} batch{'' if batch == 1 else 'es'} into epoch {epoch + 1}"
                 if batch and isinstance(epoch, int) else "") + ")", file=sys.stderr, flush=True)
    return ckpt, ckpt_path
