"""The options behind the paper's own MNIST protocol (docs/original.md §9), against numpy: SGD
without momentum, the batch norm's variance form and its statistics recomputed as averages over
minibatches, the loss summed over the classes, the initialisation range, and evaluation every
monitor_step epochs."""
import contextlib
import io
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
from batch_norm import BatchNormLayer

CPU = torch.device("cpu")


def test_sgd_is_plain_sgd_with_scale_and_clip():
    rng = np.random.RandomState(0)
    W0, b0 = rng.uniform(-1, 1, 6), rng.uniform(-1, 1, 3)
    W0[0] = 0.999
    W = nn.Parameter(torch.tensor(W0))
    b = nn.Parameter(torch.tensor(b0))
    LR, scale, H = 0.3, 2.0, 1.0
    opt = bc.SGD([dict(params=[W], W_LR_scale=scale, H=H), dict(params=[b])], LR=LR)
    for _ in range(2):
        gW, gb = rng.randn(6), rng.randn(3)
        gW[0] = -1.  # a step past the bound: clipped
        W.grad, b.grad = torch.tensor(gW), torch.tensor(gb)
        opt.step()
        W0 = np.clip(W0 - LR * scale * gW, -H, H)
        b0 = b0 - LR * gb  # the second group: no scale, no clip
        np.testing.assert_allclose(W.detach().numpy(), W0, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(b.detach().numpy(), b0, rtol=1e-12, atol=1e-15)
    assert W0[0] == 1. and opt.state[W]["step"] == 2
    opt.set_learning_rate(0.1)
    W.grad = torch.ones(6, dtype=torch.float64)
    before = W.detach().clone()
    opt.step()
    np.testing.assert_allclose(W.detach().numpy(), np.clip(before.numpy() - 0.1 * scale, -H, H))


def test_make_optimizer_sgd_keeps_the_groups():
    np.random.seed(1)
    model = models.mlp(num_units=8, n_hidden_layers=1, n_inputs=6, W_LR_scale=1.)
    with contextlib.redirect_stdout(io.StringIO()):
        opt = bc.make_optimizer(model, 0.3, "sgd")
    assert isinstance(opt, bc.SGD)
    assert [g["W_LR_scale"] for g in opt.param_groups] == [1., 1., 1.]
    assert [g["H"] for g in opt.param_groups] == [1., 1., None]


@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 5, 6)])
def test_variance_form_batch_norm(shape):
    """§9: y = (x - mean) / sqrt(var + eps) * gamma + beta with the biased variance; eval uses
    sqrt(std_run**2 + eps)."""
    rng = np.random.RandomState(2)
    x = rng.randn(*shape) * 3 + 1
    eps, alpha = 1e-2, 0.2
    bn = BatchNormLayer(shape[1], epsilon=eps, alpha=alpha, form="var").double()
    gamma, beta = rng.uniform(0.5, 2, shape[1]), rng.uniform(-1, 1, shape[1])
    with torch.no_grad():
        bn.gamma.copy_(torch.tensor(gamma))
        bn.beta.copy_(torch.tensor(beta))
    axes = (0,) + tuple(range(2, len(shape)))
    view = [1, -1] + [1] * (len(shape) - 2)
    mean, var = x.mean(axes), x.var(axes)
    expected = (x - mean.reshape(view)) / np.sqrt(var + eps).reshape(view) \
        * gamma.reshape(view) + beta.reshape(view)
    bn.train()
    np.testing.assert_allclose(bn(torch.tensor(x)).detach().numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(bn.std.numpy(), (1 - alpha) + alpha * np.sqrt(var), rtol=1e-12)
    bn.eval()
    std = bn.std.numpy()
    expected = (x - bn.mean.numpy().reshape(view)) / np.sqrt(std ** 2 + eps).reshape(view) \
        * gamma.reshape(view) + beta.reshape(view)
    np.testing.assert_allclose(bn(torch.tensor(x)).detach().numpy(), expected, rtol=1e-10)
    scale, shift = bn.scale_shift()
    np.testing.assert_allclose(scale.detach().numpy(), gamma / np.sqrt(std ** 2 + eps))


@pytest.mark.parametrize("form", ["std", "var"])
def test_recomputed_statistics_are_averages_over_the_batches(form):
    """§9: the inference statistics become the averages of the batches' statistics over
    train + valid (the variance averaged in the variance form), the network in eval mode."""
    np.random.seed(3)
    model = models.mlp(num_units=6, n_hidden_layers=1, n_inputs=5, bn_form=form, stochastic=True)
    rng = np.random.RandomState(4)
    splits = [rng.randn(40, 5).astype(np.float32), rng.randn(20, 5).astype(np.float32)]
    batch = 10
    dense, bn = model[1], model[2]
    training.recompute_bn_statistics(
        model, [fast_step.Split(X, np.zeros((len(X), 10), np.float32), CPU) for X in splits], batch)
    means, stats = [], []
    W, b = dense.weight.detach().numpy(), dense.bias.detach().numpy()  # eval: the real W (stoch.)
    for X in splits:
        for i in range(len(X) // batch):
            h = X[i * batch:(i + 1) * batch].astype(np.float64) @ W.T + b
            means.append(h.mean(0))
            stats.append(h.var(0) if form == "var" else h.std(0))
    np.testing.assert_allclose(bn.mean.numpy(), np.mean(means, 0), rtol=1e-5, atol=1e-6)
    expected = np.sqrt(np.mean(stats, 0)) if form == "var" else np.mean(stats, 0)
    np.testing.assert_allclose(bn.std.numpy(), expected, rtol=1e-5)
    assert bn.collecting is None and not model.training


def test_loss_summed_over_the_classes():
    rng = np.random.RandomState(5)
    y, t = rng.randn(7, 10), 2. * np.eye(10)[rng.randint(0, 10, 7)] - 1.
    hinge = np.maximum(0., 1. - t * y) ** 2
    got = bc.squared_hinge_loss(torch.tensor(y), torch.tensor(t), "sum_classes")
    assert float(got) == pytest.approx(hinge.sum(1).mean(), rel=1e-12)
    assert float(bc.squared_hinge_loss(torch.tensor(y), torch.tensor(t))) == pytest.approx(
        hinge.mean(), rel=1e-12)
    # batched: one loss per batch
    batched = bc.squared_hinge_loss(torch.tensor(np.stack([y, 2 * y])),
                                    torch.tensor(np.stack([t, t])), "sum_classes")
    assert batched.shape == (2,) and float(batched[0]) == pytest.approx(float(got))


def test_init_range_and_glorot_H():
    """§9 drew W ~ U(-2 W0, 2 W0) with W0 the Glorot H: init_range = 2, H = "Glorot"."""
    rng = np.random.RandomState(6)
    layer = bc.DenseLayer(400, 300, H="Glorot", init_range=2., rng=rng)
    W0 = np.float32(np.sqrt(1.5 / 700))
    assert layer.H == pytest.approx(W0)
    w = layer.weight.detach().numpy()
    assert np.abs(w).max() <= 2 * W0 and np.abs(w).max() > 1.9 * W0
    assert (np.abs(w) > W0).mean() == pytest.approx(0.5, abs=0.02)


def test_monitor_step_evaluates_and_reshuffles_every_k_epochs(tmp_path):
    rng = np.random.RandomState(7)
    X = rng.randn(40, 6).astype(np.float32)
    t = (2. * np.eye(10)[rng.randint(0, 10, 40)] - 1.).astype(np.float32)
    np.random.seed(0)
    model = models.mlp(num_units=8, n_hidden_layers=1, n_inputs=6)
    orders = []
    saved = sys.stdout
    try:
        run = rundir.start_run("mnist", script_config(
            seed=1, device="cpu", resume="", out_dir=str(tmp_path / "run"), batch_size=10,
            LR_start=0.01, LR_fin=0.01, num_epochs=5, monitor_step=2, bn_stats="recompute"))
        real_start = fast_step.TrainStep.start_epoch

        def record(self, order, *args):
            orders.append(np.array(order))
            return real_start(self, order, *args)
        fast_step.TrainStep.start_epoch = record
        history = training.train(model, ((X, (t + 1) / 2),) * 3, run)
    finally:
        fast_step.TrainStep.start_epoch = real_start
        if sys.stdout is not saved:
            sys.stdout.file.close()
            sys.stdout = saved
    assert [h["epoch"] for h in history] == [2, 4, 5]  # every 2 epochs, and the last
    # the seconds of metrics.jsonl add up to the run's: a line counts the epochs since the last
    log = (tmp_path / "run" / "log.txt").read_text()
    import re
    took = [float(x) for x in re.findall(r"^Epoch \d+ of 5 took ([0-9.e-]+)s", log, re.M)]
    assert len(took) == 5
    assert [h["seconds"] for h in history] == pytest.approx(
        [took[0] + took[1], took[2] + took[3], took[4]], rel=1e-6)
    # the order changes only after an evaluated epoch
    same = [np.array_equal(a, b) for a, b in zip(orders, orders[1:])]
    assert same == [True, False, True, False]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "Epoch 1 of 5 took" in log and "evaluated every 2 epochs" in log
