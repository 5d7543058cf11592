"""training.train / evaluate / report / str2 against §4.1 (LR schedule) and §5 (loop, model
selection, dropped partial batches, the nine-line report), on tiny models and data."""
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn


import binary_connect as bc
import models
import fast_step
import rundir
import training
from fake_data import script_config

LABELS = ["LR:", "training loss:", "validation loss:", "validation error rate:", "best epoch:",
          "best validation error rate:", "test loss:", "test error rate:"]
PERCENT = {"validation error rate:", "best validation error rate:", "test error rate:"}


@pytest.fixture
def new_run(tmp_path):
    """Makes a Run in tmp_path. start_run tees sys.stdout into the run's log.txt; it must be
    called inside the test (pytest re-installs its own sys.stdout between setup and call), and
    the original stdout comes back afterwards."""
    saved = []

    def make(**hparams):
        saved.append(sys.stdout)
        return rundir.start_run("mnist", script_config(
            seed=1234, device="cpu", out_dir=str(tmp_path / "run"), resume="", **hparams))
    yield make
    if saved:
        tee, sys.stdout = sys.stdout, saved[0]
        if tee is not saved[0] and hasattr(tee, "file"):
            tee.file.close()


def one_hot(hinge):
    """{-1, +1} targets back to the one-hot {0, 1} labels that training.train takes."""
    return (np.asarray(hinge) + 1) / 2


def hinge_targets(labels, k=10):
    return (2. * np.eye(k)[labels] - 1.).astype(np.float32)


def tiny_data(rng, n, n_in=6):
    return rng.randn(n, n_in).astype(np.float32), hinge_targets(rng.randint(0, 10, n))


def tiny_mlp():
    return models.mlp(num_units=8, n_hidden_layers=1, n_inputs=6, alpha=0.15, epsilon=1e-4)


def parse_reports(text):
    """The per-epoch blocks of the log: {epoch: {label: value string}}, checking the layout."""
    lines = text.splitlines()
    blocks = {}
    for i, line in enumerate(lines):
        if line.startswith("Epoch ") and " took " in line:
            head = line.split()
            assert head[2] == "of" and head[4] == "took" and head[5].endswith("s")
            float(head[5][:-1])
            values = {}
            for label, row in zip(LABELS, lines[i + 1:i + 9]):
                # two spaces, the label, padded to 33 characters, then the value
                assert row[:33] == ("  " + label).ljust(33), row
                assert row[33] != " "
                values[label] = row[33:]
                assert values[label].endswith("%") == (label in PERCENT), row
            blocks[int(head[1])] = values
    return blocks


# ---------------------------------------------------------------------------------------------
# §5 report format and Python 2 str()
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    (0.1 + 0.2, "0.3"), (1.0, "1.0"), (100.0, "100.0"), (-3.0, "-3.0"), (0.0, "0.0"),
    (-0.0, "-0.0"), (1e-05, "1e-05"), (2.5e-7, "2.5e-07"), (1 / 3, "0.333333333333"),
    (2 / 3, "0.666666666667"), (123456789012.0, "123456789012.0"),
    (1234567890123.0, "1.23456789012e+12"), (1e16, "1e+16"), (3.0700000000000002e-06, "3.07e-06"),
    (0.01 * 0.9, "0.009"), (np.float64(0.1), "0.1"), (7, "7"), (np.int64(12), "12"),
    (float("inf"), "inf"), (float("nan"), "nan"), (1.2300000000000002, "1.23"),
])
def test_str2_is_python2_str_of_float(value, expected):
    assert training.str2(value) == expected


def test_report_nine_line_format():
    m = dict(LR=0.001, train_loss=0.1234567890123456, val_loss=0.5, val_err=1.23,
             best_epoch=7, best_val_err=1.0, test_loss=2 / 3, test_err=1.2300000000000002)
    expected = "\n".join([
        "Epoch 7 of 250 took 12.5s",
        "  LR:                            0.001",
        "  training loss:                 0.123456789012",
        "  validation loss:               0.5",
        "  validation error rate:         1.23%",
        "  best epoch:                    7",
        "  best validation error rate:    1.0%",
        "  test loss:                     0.666666666667",
        "  test error rate:               1.23%",
    ])
    for line in expected.splitlines()[1:]:  # guard the literal itself: values at column 33
        assert line[32] == " " and line[33] != " "
    assert training.report(7, 250, 12.5, m) == expected


# ---------------------------------------------------------------------------------------------
# §4.1 LR schedule through a real (tiny) training run
# ---------------------------------------------------------------------------------------------

def test_lr_of_epoch_e_is_start_times_decay_to_e_minus_1(new_run, monkeypatch):
    LR_start, decay, epochs, batch = 0.01, 0.9, 3, 10
    run = new_run(batch_size=batch, LR_start=LR_start, LR_fin=LR_start * decay ** epochs,
                  num_epochs=epochs)
    rng = np.random.RandomState(0)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = (tiny_data(rng, n) for n in (40, 20, 20))
    model = tiny_mlp()
    opt = bc.make_optimizer(model, LR_start)
    monkeypatch.setattr(training, "make_optimizer", lambda *args: opt)
    seen = []
    update = opt.update

    def recording_update(grads):
        seen.append([float(opt.LR)])
        update(grads)
    opt.update = recording_update

    history = training.train(model, ((Xtr, one_hot(ytr)), (Xva, one_hot(yva)),
                                     (Xte, one_hot(yte))), run)
    assert len(history) == epochs and len(seen) == epochs * 4
    for e in range(1, epochs + 1):
        want = LR_start * decay ** (e - 1)
        assert history[e - 1]["epoch"] == e
        assert history[e - 1]["LR"] == pytest.approx(want, rel=1e-12)
        for lrs in seen[(e - 1) * 4:e * 4]:  # every group, every step of the epoch
            assert lrs == pytest.approx([want] * len(lrs), rel=1e-12)
    blocks = parse_reports(run.path("log.txt").read_text())
    assert sorted(blocks) == [1, 2, 3]
    assert [blocks[e]["LR:"] for e in (1, 2, 3)] == ["0.01", "0.009", "0.0081"]
    for e in (1, 2, 3):
        assert float(blocks[e]["best epoch:"]) == history[e - 1]["best_epoch"]
        assert float(blocks[e]["validation error rate:"][:-1]) == pytest.approx(
            history[e - 1]["val_err"], rel=1e-11)


# ---------------------------------------------------------------------------------------------
# §5 model selection: test evaluated only when val_err <= best (ties count)
# ---------------------------------------------------------------------------------------------

def test_test_set_evaluated_only_when_validation_ties_or_improves(new_run, monkeypatch):
    val_errs = [100.0, 60.0, 60.0, 70.0, 50.0, 50.0, 55.0]  # 100 ties the initial best
    run = new_run(batch_size=10, LR_start=0.001, LR_fin=0.001, num_epochs=len(val_errs))
    rng = np.random.RandomState(1)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = (tiny_data(rng, n) for n in (20, 20, 30))
    model = tiny_mlp()
    opt = bc.make_optimizer(model, 0.001)
    monkeypatch.setattr(training, "make_optimizer", lambda *args: opt)
    state = dict(trained=False, epoch=0)
    test_calls = []
    update = opt.update

    def marking_update(grads):
        state["trained"] = True
        update(grads)
    opt.update = marking_update

    def fake_evaluate(model_, split, batch_size, *args, **kwargs):
        assert model_ is model and batch_size == 10
        if state["trained"]:  # the first evaluation after a training pass: validation
            state["trained"] = False
            state["epoch"] += 1
            e = state["epoch"]
            return val_errs[e - 1], 0.5 + e
        e = state["epoch"]
        test_calls.append(e)
        return 200. + e, 10. + e

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    history = training.train(model, ((Xtr, one_hot(ytr)), (Xva, one_hot(yva)),
                                     (Xte, one_hot(yte))), run)
    assert test_calls == [1, 2, 3, 5, 6]
    best_epoch = [1, 2, 3, 3, 5, 6, 6]
    best_val = [100.0, 60.0, 60.0, 60.0, 50.0, 50.0, 50.0]
    for e, h in enumerate(history, 1):
        assert h["val_err"] == val_errs[e - 1] and h["val_loss"] == 0.5 + e
        assert h["best_epoch"] == best_epoch[e - 1]
        assert h["best_val_err"] == best_val[e - 1]
        assert h["test_err"] == 200. + best_epoch[e - 1]
        assert h["test_loss"] == 10. + best_epoch[e - 1]
    blocks = parse_reports(run.path("log.txt").read_text())
    for e in range(1, 8):
        b = blocks[e]
        assert b["best epoch:"] == str(best_epoch[e - 1])
        assert b["best validation error rate:"] == "%.1f%%" % best_val[e - 1]
        assert b["test error rate:"] == "%.1f%%" % (200. + best_epoch[e - 1])
        assert b["test loss:"] == "%.1f" % (10. + best_epoch[e - 1])
        assert b["validation error rate:"] == "%.1f%%" % val_errs[e - 1]


# ---------------------------------------------------------------------------------------------
# §5 partial batches dropped, shuffles, per-batch averaging
# ---------------------------------------------------------------------------------------------

def test_partial_batches_are_dropped_in_training_and_evaluation(new_run):
    run = new_run(batch_size=50, LR_start=0.001, LR_fin=0.001, num_epochs=2)
    rng = np.random.RandomState(2)
    Xtr, ytr = tiny_data(rng, 105)
    Xva, yva = tiny_data(rng, 105)
    Xte, yte = tiny_data(rng, 73)
    model = tiny_mlp()
    calls = []
    model.register_forward_pre_hook(
        lambda mod, args: calls.append((mod.training, args[0].detach().cpu().numpy().copy())))
    history = training.train(model, ((Xtr, one_hot(ytr)), (Xva, one_hot(yva)),
                                     (Xte, one_hot(yte))), run)
    assert len(history) == 2
    per_epoch = []
    i = 0
    for e in range(2):
        train_x = []
        while calls[i][0]:
            train_x.append(calls[i][1])
            i += 1
        evals = []
        while i < len(calls) and not calls[i][0]:
            evals.append(calls[i][1])
            i += 1
        # 105 // 50 = 2 training steps; validation 2 batches; test (evaluated in epoch 1, since
        # val <= 100 always) 73 // 50 = 1 batch; every batch full. Evaluation passes whole
        # batches, several at a time (here the 2 validation batches in one pass).
        assert [len(x) for x in train_x] == [50, 50]
        n_test = 1 if history[e]["best_epoch"] == e + 1 else 0
        assert [len(x) for x in evals] == [100] + [50] * n_test
        per_epoch.append(np.concatenate(train_x))
        # evaluation reads the splits in file order, the tail dropped
        np.testing.assert_array_equal(evals[0], Xva[:100])
        if n_test:
            np.testing.assert_array_equal(evals[1], Xte[:50])
    assert i == len(calls)
    for x in per_epoch:  # 100 distinct training rows per epoch (a permutation, tail dropped)
        rows = {r.tobytes() for r in x}
        assert len(rows) == 100 and rows <= {r.tobytes() for r in Xtr}
    # shuffled before epoch 1 and reshuffled after it
    assert not np.array_equal(per_epoch[0], Xtr[:100])
    assert not np.array_equal(per_epoch[0], per_epoch[1])


class Passthrough(nn.Module):
    """Outputs its input (N, 10): lets the test choose every prediction. Its one parameter has
    zero gradient, so Adam leaves it at 0."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + 0. * self.p


def scripted_split(rng, n_rows, wrong_rows):
    X = rng.randn(n_rows, 10).astype(np.float32)
    labels = X.argmax(1)
    for r in wrong_rows:
        labels[r] = (labels[r] + 1 + rng.randint(0, 9)) % 10
    return X, hinge_targets(labels)


def np_eval(X, y, batch):
    n = len(X) // batch
    errs, losses = [], []
    for i in range(n):
        out, t = X[i * batch:(i + 1) * batch].astype(np.float64), y[i * batch:(i + 1) * batch]
        errs.append(np.mean(out.argmax(1) != t.argmax(1)))
        losses.append(np.mean(np.maximum(0., 1. - t * out) ** 2))
    return np.mean(errs) * 100, np.mean(losses)


def test_error_is_mean_of_batch_fractions_without_the_tail(new_run):
    run = new_run(batch_size=50, LR_start=0.001, LR_fin=0.001, num_epochs=1)
    rng = np.random.RandomState(3)
    # validation: 10 wrong of 50, 5 wrong of 50, and a 5-row tail all wrong (never counted)
    Xva, yva = scripted_split(rng, 105, list(range(10)) + list(range(50, 55))
                              + list(range(100, 105)))
    # test: 7 wrong of 50, then a 23-row tail all wrong (never counted)
    Xte, yte = scripted_split(rng, 73, list(range(7)) + list(range(50, 73)))
    row = rng.randn(1, 10).astype(np.float32)
    Xtr = np.repeat(row, 120, axis=0)  # identical rows: the training loss is order-free
    ytr = np.repeat(hinge_targets([3]), 120, axis=0)
    model = Passthrough()
    history = training.train(model, ((Xtr, one_hot(ytr)), (Xva, one_hot(yva)),
                                     (Xte, one_hot(yte))), run)
    (h,) = history
    # per-batch fractions are float32, as Theano's floatX mean was: rel 1e-6
    assert h["val_err"] == pytest.approx(15.0, rel=1e-6)  # (10/50 + 5/50) / 2 * 100
    assert h["test_err"] == pytest.approx(14.0, rel=1e-6)  # 7/50
    assert h["val_loss"] == pytest.approx(np_eval(Xva, yva, 50)[1], rel=1e-6)
    assert h["test_loss"] == pytest.approx(np_eval(Xte, yte, 50)[1], rel=1e-6)
    # the training loss: the mean over batches of each batch's loss
    assert h["train_loss"] == pytest.approx(np.mean(np.maximum(0., 1. - ytr[0] * row[0]) ** 2),
                                            rel=1e-6)


def test_a_nan_loss_in_epoch_1_says_nothing_was_kept(new_run, monkeypatch):
    """Before the first checkpoint there is nothing to resume: the message says so (the run
    directory is then removed) instead of promising a checkpoint."""
    real_step = fast_step.TrainStep._step

    def step(self):
        real_step(self)
        if self.steps == 1:
            self.losses[1] = float("nan")
    monkeypatch.setattr(fast_step.TrainStep, "_step", step)
    run = new_run(batch_size=10, LR_start=0.01, LR_fin=0.0025, num_epochs=2)
    rng = np.random.RandomState(0)
    data = [(X, one_hot(t)) for X, t in (tiny_data(rng, n) for n in (40, 20, 20))]
    model = tiny_mlp()
    with pytest.raises(SystemExit) as e:
        training.train(model, data, run)
    assert str(e.value) == ("error: the training loss became nan at epoch 1, batch 2; stopping. "
                            "Nothing was kept: no epoch had ended.")


def test_a_diverging_training_loss_is_named(new_run):
    """A training loss of 1e6 (outputs far beyond +-1: --LR_start=1e4 gives such) is not a NaN,
    so the run goes on; the report says it is diverging and what the LR was."""
    run = new_run(batch_size=10, LR_start=0.001, LR_fin=0.001, num_epochs=1)
    rng = np.random.RandomState(5)
    X, t = tiny_data(rng, 20, n_in=10)
    model = Passthrough()
    training.train(model, ((X * 1000, one_hot(t)), (X / 1000, one_hot(t)), (X, one_hot(t))), run)
    log = run.path("log.txt").read_text()
    assert "warning: a training loss this large means the run is diverging; the learning rate of " \
           "this epoch was 0.001: a smaller LR_start may be needed" in log
    assert training.BIG_LOSS_NOTE not in log  # the validation loss is small
