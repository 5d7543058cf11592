"""The training loop of the original `binary_connect.train` (docs/original.md §5): epochs,
evaluation, the best-epoch rule and the per-epoch report. The training step is fast_step.py's;
the run's files are rundir.py's (records, log, lock) and checkpoints.py's (last.pt, best.pt).

Every experiment script runs `with start_run(...) as run:` right after its hyperparameters, then
loads its data, builds its network and calls `train(model, data, run)`.
"""
import sys
import time

import numpy as np
import torch

from binary_connect import lr_decay, make_optimizer, squared_hinge_loss
from checkpoints import (CheckpointWriter, Progress, load_checkpoint, save_checkpoint,
                         take_best, take_checkpoint)
from configurator import ConfigError, device_name
from fast_step import (STEP_MODES, Split, TrainStep, autocast, miscounted, set_precision,
                       set_stream_kind, step_mode)
from report import mean32, report, str2
from rundir import Interrupt, log_metrics, stop

# Rows per forward pass in evaluation: several of the original's batches at once.
EVAL_ROWS = 1000


def evaluate(model, split, batch_size, loss_reduction="mean", forward=None):
    """§5 val_epoch: a deterministic pass; error = the mean of the per-batch error fractions
    * 100, loss = the mean of the per-batch losses, both summed in float32 as the original did
    (ties in "best" depend on it); the partial batch is dropped, as its integer division did.

    An eval-mode output does not depend on the rest of its batch, so several of the original's
    batches go through one forward pass and are then split back: the same per-batch numbers.
    `forward` is the (possibly compiled) model to call.
    """
    forward = forward or model
    model.eval()
    n_batches = split.n // batch_size
    if n_batches == 0:
        raise ValueError(f"a split of {split.n} examples has no full batch of {batch_size}")
    k = max(d for d in range(1, n_batches + 1)
            if n_batches % d == 0 and d * batch_size <= max(EVAL_ROWS, batch_size))
    errors, losses = [], []
    with torch.no_grad():
        for first in range(0, n_batches, k):
            x, t = split.rows(first * batch_size, (first + k) * batch_size)
            y = forward(x).float().view(k, batch_size, -1)
            t = t.view(k, batch_size, -1)
            errors.append((y.argmax(-1) != t.argmax(-1)).float().mean(-1))
            losses.append(squared_hinge_loss(y, t, loss_reduction))
    errors, losses = torch.cat(errors).cpu().numpy(), torch.cat(losses).cpu().numpy()
    return float(mean32(errors) * np.float32(100)), float(mean32(losses))


def recompute_bn_statistics(model, splits, batch_size):
    """§9: the inference statistics of every BN layer become the averages of the batch
    statistics over the full batches of `splits` (train and valid), the network in eval mode."""
    bns = [m for m in model.modules() if hasattr(m, "collect_statistics")]
    model.eval()
    for bn in bns:
        bn.collect_statistics(True)
    with torch.no_grad():
        for split in splits:
            for i in range(split.n // batch_size):
                model(split.rows(i * batch_size, (i + 1) * batch_size)[0])
    for bn in bns:
        bn.collect_statistics(False)


def _not_finite(losses, epoch):
    """The error for a NaN or infinite training loss, or None."""
    bad = np.nonzero(~np.isfinite(losses))[0]
    if len(bad):
        return (f"error: the training loss became {float(losses[bad[0]])} at epoch {epoch}, "
                f"batch {int(bad[0]) + 1}; stopping.")
    return None


def _give_up(run, writer, error, option=""):
    """Ends the run with `error` and what is left of it: once the previous epoch's checkpoint
    is on disk, a resume command (with `option`); before the first one, nothing is kept."""
    writer.wait()
    if run.path("last.pt").exists():
        raise SystemExit(f"{error} The last good checkpoint is kept: resume with: python "
                         f"{run.script}.py --resume={run.out_dir}{option}")
    raise SystemExit(f"{error} Nothing was kept: no epoch had ended."
                     + (f" Run it again with{option}." if option else ""))


BIG_LOSS_NOTE = ("  (a validation or test loss this large is expected early in stochastic BC on "
                 "small networks: the BN statistics were gathered with sampled +-H weights, the "
                 "evaluation uses the real-valued ones; docs/original.md §3)")
# A squared hinge loss above 1000 in training means outputs beyond +-30: the run diverges (a NaN
# would stop it; this only warns, since it may recover).
DIVERGING_NOTE = ("  (warning: a training loss this large means the run is diverging; the learning "
                  "rate of this epoch was {LR}: a smaller LR_start may be needed)")


def train(model, data, run):
    """§5: shuffle (numpy), train with partial batches dropped, validate every epoch (every
    monitor_step epochs, §9), evaluate test only when validation error <= the best so far, print
    the original's report. data: ((X, y), (X, y), (X, y)) for train, valid, test, y one-hot;
    the hyperparameters are run.config's. Returns the metrics of the evaluated epochs.

    The reported seconds of an epoch count its training steps, the reshuffle and the evaluation
    (for a resumed epoch, its part before the interruption too); the checkpoint is written in
    the background and not counted. A checkpoint is taken every checkpoint_every epochs (and at
    the last epoch, and when a signal stops the run); metrics.jsonl is written with it, so a run
    killed between checkpoints resumes from the last one and redoes the same epochs exactly.
    """
    c = run.config
    batch_size, num_epochs, LR_start = c["batch_size"], c["num_epochs"], c["LR_start"]
    LR_decay = lr_decay(LR_start, c["LR_fin"], num_epochs)
    precision, loss_reduction = c["precision"], c["loss_reduction"]
    monitor_step, bn_stats = c["monitor_step"], c["bn_stats"]
    sampled = c["binary"] and c["stochastic"]  # BIG_LOSS_NOTE's case
    checkpoint_every = c["checkpoint_every"]
    model.to(run.device)
    optimizer = make_optimizer(model, LR_start, c["optimizer"])  # §2.2
    print('Training...')
    # for the hinge loss: one-hot {0, 1} -> {-1, +1}
    data = [(X, 2 * np.asarray(y, dtype=np.float32) - 1.) for X, y in data]
    device = run.device
    train_set, val_set, test_set = (Split(X, y, device) for X, y in data)
    for name, split in (("training", train_set), ("validation", val_set), ("test", test_set)):
        if split.n < batch_size:  # it would have no full batch (§5 drops partial ones)
            raise ConfigError(f"the {name} set has {split.n} examples, fewer than "
                              f"batch_size={batch_size}")
    n_batches = train_set.n // batch_size
    mode = step_mode(str(c["compile"]).lower(), device, model, train_set.on_device)
    # The stream is a function of the configuration, not of whether compiling succeeds: a
    # compiled step that falls back to the eager modules keeps drawing from the same streams.
    set_stream_kind(model, "generator" if mode == "eager" else "counter")
    set_precision(precision, device)
    print(f"Training step: {STEP_MODES[mode]}, {precision}, on {device_name(device)}"
          + ("" if mode == "eager" else " (compiled during the first step: up to a few minutes "
                                        "on a CPU; --compile=false skips it)"), flush=True)
    step = TrainStep(model, optimizer, train_set, batch_size, loss_reduction, mode, precision)

    if run.resume:
        p = load_checkpoint(run, model, optimizer, train_set.n)
    else:
        # §5: the train set is shuffled once before epoch 1 ...
        p = Progress(order=np.arange(train_set.n), LR=LR_start)
        np.random.shuffle(p.order)
    log_metrics(run, p.history)

    def train_epoch(epoch, start_time):
        """The epoch's training steps (the rest of it, after a resume); its mean loss."""
        optimizer.set_learning_rate(p.LR)
        model.train()
        step.start_epoch(p.order, p.batch, p.losses)
        counts = step.counts()
        batches = range(p.batch, n_batches)
        if sys.stderr.isatty() and sys.stdout.isatty():
            from tqdm import tqdm
            batches = tqdm(batches, desc=f"epoch {epoch}", leave=False, initial=p.batch,
                           total=n_batches)
        for i in batches:
            step()
            if interrupt.signum is not None:  # a checkpoint of the epoch so far, then stop
                losses = step.losses[:i + 1].cpu().numpy()
                if error := _not_finite(losses, epoch):
                    _give_up(run, writer, error)
                p.epoch, p.batch, p.losses = epoch - 1, i + 1, losses
                p.elapsed = time.time() - start_time
                writer.wait()
                save_checkpoint(run, model, optimizer, p, best=pending_best)
                stop(run, interrupt.signum, f"during epoch {epoch} (after batch {i + 1} of "
                                            f"{n_batches})")
        losses = step.losses[:n_batches].cpu().numpy()  # the epoch's one host sync
        if error := miscounted(step, counts, n_batches - p.batch, epoch):
            _give_up(run, writer, error, " --compile=false")
        if error := _not_finite(losses, epoch):
            _give_up(run, writer, error)
        return float(mean32(losses))

    def val_epoch(split):
        with autocast(precision, device):
            return evaluate(model, split, batch_size, loss_reduction, forward=step.forward)

    writer = CheckpointWriter(run)
    # An improving epoch's model while its checkpoint is still to come (checkpoint_every > 1).
    pending_best = None
    try:
        with Interrupt() as interrupt:
            for epoch in range(p.epoch + 1, num_epochs + 1):
                start_time = time.time() - p.elapsed
                LR = p.LR
                train_loss = train_epoch(epoch, start_time)
                improved = False
                if epoch % monitor_step == 0 or epoch == num_epochs:
                    # ... and again after each epoch's training pass (a composed permutation,
                    # exactly as the original's shuffle of the arrays).
                    perm = np.arange(train_set.n)
                    np.random.shuffle(perm)
                    p.order = p.order[perm]
                    if bn_stats == "recompute":
                        recompute_bn_statistics(model, (train_set, val_set), batch_size)
                    val_err, val_loss = val_epoch(val_set)
                    improved = val_err <= p.best_val_err  # ties count (§5)
                    if improved:
                        p.best_val_err, p.best_epoch = val_err, epoch
                        p.test_err, p.test_loss = val_epoch(test_set)
                    seconds = time.time() - start_time
                    # metrics.jsonl's seconds also count the epochs since its previous line
                    # (monitor_step > 1), so that they add up to the run's time
                    metrics = dict(epoch=epoch, LR=LR, train_loss=train_loss, val_loss=val_loss,
                                   val_err=val_err, best_epoch=p.best_epoch,
                                   best_val_err=p.best_val_err, test_loss=p.test_loss,
                                   test_err=p.test_err, seconds=seconds + p.unreported)
                    p.unreported = 0.
                    print(report(epoch, num_epochs, seconds, metrics))
                    if train_loss > 1000:
                        print(DIVERGING_NOTE.format(LR=str2(LR)))
                    if sampled and (val_loss > 1000 or improved and p.test_loss > 1000):
                        print(BIG_LOSS_NOTE)
                    p.history.append(metrics)
                else:
                    seconds = time.time() - start_time
                    p.unreported += seconds
                    print(f"Epoch {epoch} of {num_epochs} took {str2(seconds)}s (training "
                          f"loss {str2(train_loss)}; evaluated every {monitor_step} epochs)")
                    if train_loss > 1000:
                        print(DIVERGING_NOTE.format(LR=str2(LR)))
                sys.stdout.flush()
                p.epoch, p.batch, p.losses, p.elapsed = epoch, 0, None, 0.
                p.LR = LR * LR_decay  # §4.1
                if (epoch % checkpoint_every == 0 or epoch == num_epochs
                        or interrupt.signum is not None):
                    writer.save(take_checkpoint(run, model, optimizer, p),
                                best=True if improved else pending_best)
                    pending_best = None
                elif improved:
                    pending_best = take_best(model, epoch)
                if interrupt.signum is not None and epoch < num_epochs:  # during evaluation
                    writer.wait()
                    stop(run, interrupt.signum, f"at the end of epoch {epoch}")
    finally:
        writer.wait()
    if p.history:
        print(f"Best validation error rate {str2(p.best_val_err)}% at epoch {p.best_epoch}; "
              f"test error rate there: {str2(p.test_err)}%")
    return p.history
