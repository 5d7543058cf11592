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
from pathlib import Path

import numpy as np
import torch

from binary_connect import binary_layers
from fast_step import to_host
from rundir import RUN_FILES, RunError, atomic_torch_save, log_metrics

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


def load_checkpoint(run, model, optimizer, n_train):
    path = run.path("last.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path}: {e}") from None
    if checkpoint.get("version") not in (1, CHECKPOINT_VERSION):
        raise SystemExit(f"error: {path} is a version {checkpoint.get('version')} checkpoint; "
                         f"this code reads versions 1 and {CHECKPOINT_VERSION}")
    if checkpoint["version"] == 1:
        checkpoint = _upgrade(checkpoint, model)
    if len(checkpoint["order"]) != n_train:  # the shuffle order indexes the training set
        raise SystemExit(f"error: {path} was trained on {len(checkpoint['order'])} training "
                         f"examples, but the data now gives {n_train}: resume with the same data")
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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{ckpt_path}: not a checkpoint of this project (expected best.pt or "
                       f"last.pt from a training run; torch.load says: {first})") from None
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
