"""BatchNormLayer against §3, with a numpy reference written here (float64)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


from batch_norm import BatchNormLayer


def axes_and_shape(x):
    axes = (0,) + tuple(range(2, x.ndim))  # every axis but 1
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return axes, shape


def np_bn_train(x, gamma, beta, eps):
    axes, shape = axes_and_shape(x)
    mu = x.mean(axis=axes)
    std = np.sqrt(((x - mu.reshape(shape)) ** 2).mean(axis=axes))  # biased (ddof = 0)
    y = (x - mu.reshape(shape)) * (gamma / (std + eps)).reshape(shape) + beta.reshape(shape)
    return y, mu, std


def np_bn_eval(x, gamma, beta, eps, mean, std):
    _, shape = axes_and_shape(x)
    return (x - mean.reshape(shape)) * (gamma / (std + eps)).reshape(shape) + beta.reshape(shape)


def t32(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def make_layer(c, eps, alpha, rng, nonlinearity=None):
    layer = BatchNormLayer(c, epsilon=eps, alpha=alpha, nonlinearity=nonlinearity)
    gamma = rng.uniform(0.5, 2., c)
    beta = rng.uniform(-1., 1., c)
    with torch.no_grad():
        layer.gamma.copy_(t32(gamma))
        layer.beta.copy_(t32(beta))
    return layer, gamma.astype(np.float32).astype(np.float64), \
        beta.astype(np.float32).astype(np.float64)


def test_initial_state_and_parameter_kinds():
    layer = BatchNormLayer(6, epsilon=1e-4, alpha=0.15)
    params = dict(layer.named_parameters())
    assert set(params) == {"beta", "gamma"}  # trainable: beta, gamma
    assert torch.equal(layer.beta.detach(), torch.zeros(6))
    assert torch.equal(layer.gamma.detach(), torch.ones(6))
    buffers = dict(layer.named_buffers())  # running statistics: not trainable, but saved
    assert torch.equal(buffers["mean"], torch.zeros(6))
    assert torch.equal(buffers["std"], torch.ones(6))
    assert {"mean", "std", "beta", "gamma"} <= set(layer.state_dict())


# (N, C) and (N, C, H, W); a large epsilon makes "eps on the std" differ from sqrt(var + eps)
@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 5, 6)])
@pytest.mark.parametrize("eps,alpha", [(1e-4, 0.15), (0.5, 0.1)])
def test_train_and_eval_outputs_and_running_statistics(shape, eps, alpha):
    rng = np.random.RandomState(0)
    c = shape[1]
    layer, gamma, beta = make_layer(c, eps, alpha, rng)
    run_mean, run_std = np.zeros(c), np.ones(c)

    layer.train()
    for step in range(3):
        x = rng.randn(*shape) * rng.uniform(0.5, 3., c).reshape((1, -1) + (1,) * (len(shape) - 2)) \
            + rng.uniform(-2, 2)
        x = x.astype(np.float32).astype(np.float64)
        y = layer(t32(x)).detach().numpy()
        y_ref, mu, std = np_bn_train(x, gamma, beta, eps)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        run_mean = (1 - alpha) * run_mean + alpha * mu
        run_std = (1 - alpha) * run_std + alpha * std  # stored without epsilon
        np.testing.assert_allclose(layer.mean.numpy(), run_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.std.numpy(), run_std, rtol=1e-5, atol=1e-6)

    if eps == 0.5:  # the test can tell the two forms apart
        axes, shp = axes_and_shape(x)
        var = ((x - x.mean(axis=axes).reshape(shp)) ** 2).mean(axis=axes)
        y_var_form = (x - x.mean(axis=axes).reshape(shp)) * (
            gamma / np.sqrt(var + eps)).reshape(shp) + beta.reshape(shp)
        assert np.max(np.abs(y_var_form - y_ref)) > 1e-2

    layer.eval()
    mean_before, std_before = layer.mean.clone(), layer.std.clone()
    for _ in range(2):
        x = rng.randn(*shape) * 2 + 1
        y = layer(t32(x)).detach().numpy()
        np.testing.assert_allclose(y, np_bn_eval(x.astype(np.float32), gamma, beta, eps,
                                                 run_mean, run_std), rtol=1e-5, atol=1e-5)
    # validation/test calls never change the running statistics
    assert torch.equal(layer.mean, mean_before) and torch.equal(layer.std, std_before)


@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 5, 6)])
def test_nonlinearity_applied_after_the_affine_step(shape):
    rng = np.random.RandomState(1)
    layer, gamma, beta = make_layer(shape[1], 1e-4, 0.1, rng, nonlinearity=F.relu)
    x = rng.randn(*shape).astype(np.float32).astype(np.float64)
    layer.train()
    y = layer(t32(x)).detach().numpy()
    y_ref, _, _ = np_bn_train(x, gamma, beta, 1e-4)
    assert (y_ref < 0).any() and (y_ref > 0).any()
    np.testing.assert_allclose(y, np.maximum(y_ref, 0.), rtol=1e-5, atol=1e-5)
    layer.eval()
    y = layer(t32(x)).detach().numpy()
    np.testing.assert_allclose(y, np.maximum(np_bn_eval(x, gamma, beta, 1e-4, layer.mean.numpy(),
                                                        layer.std.numpy()), 0.),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 4), (3, 2, 4, 5)])
def test_training_gradients_flow_through_batch_statistics(shape):
    rng = np.random.RandomState(2)
    eps = 0.05
    c = shape[1]
    layer, gamma, beta = make_layer(c, eps, 0.1, rng)
    layer = layer.double()
    x = rng.randn(*shape) * 1.7 + 0.3
    G = rng.randn(*shape)
    xt = torch.from_numpy(x).requires_grad_()
    layer.train()
    (layer(xt) * torch.from_numpy(G)).sum().backward()

    axes, shp = axes_and_shape(x)
    n = x.size // c
    mu = x.mean(axis=axes).reshape(shp)
    xc = x - mu
    s = np.sqrt((xc ** 2).mean(axis=axes)).reshape(shp)
    d = s + eps
    g_r = gamma.reshape(shp)
    dgamma = (G * xc / d).sum(axis=axes)
    dbeta = G.sum(axis=axes)
    dxc = G * g_r / d
    dd = -(G * g_r * xc).sum(axis=axes).reshape(shp) / d ** 2
    dxc = dxc + dd * xc / (n * s)
    dx = dxc - dxc.mean(axis=axes).reshape(shp)
    np.testing.assert_allclose(xt.grad.numpy(), dx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.gamma.grad.numpy(), dgamma, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.beta.grad.numpy(), dbeta, rtol=1e-9, atol=1e-12)


def test_running_statistics_are_not_gradients_targets_and_eval_has_no_batch_dependence():
    rng = np.random.RandomState(3)
    layer, gamma, beta = make_layer(4, 1e-4, 0.15, rng)
    layer.eval()
    x = rng.randn(6, 4)
    y_all = layer(t32(x)).detach().numpy()
    y_one = layer(t32(x[:1])).detach().numpy()
    np.testing.assert_allclose(y_one, y_all[:1], rtol=1e-6, atol=1e-6)
    assert not layer.mean.requires_grad and not layer.std.requires_grad
    assert isinstance(layer.gamma, nn.Parameter) and isinstance(layer.beta, nn.Parameter)
