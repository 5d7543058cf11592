"""binary_connect.py against §1-2 and §4.1: binarization, layers, init, straight-through
gradient, Lasagne Adam with W_LR_scale and clipping, squared hinge, LR decay.

Every expected number is computed here in numpy (float64) from the formulas of docs/original.md.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
from numpy.lib.stride_tricks import sliding_window_view


import binary_connect as bc
import models
from batch_norm import BatchNormLayer


def np_hard_sigmoid(x):
    return np.clip((x + 1.) / 2., 0., 1.)


def np_sign_H(W, H):
    # §1.1: round(hard_sigmoid(W/H)) half away from zero -> +H for W >= 0, else -H.
    return np.where(W >= 0, H, -H)


# ---------------------------------------------------------------------------------------------
# §1.1 binarization
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("H", [1., 0.25, 3.])
def test_deterministic_binarization_sign_rule(H):
    W = np.array([0., 0.3, -0.3, 1e-3, -1e-3, 5., -5., H, -H, 0.5 * H, -0.5 * H],
                 dtype=np.float32)
    for test_time in (False, True):  # deterministic BC binarizes the same way at test time
        Wb = bc.binarization(torch.from_numpy(W), H, binary=True, deterministic=test_time,
                             stochastic=False)
        assert Wb.dtype == torch.float32
        np.testing.assert_array_equal(Wb.numpy(), np_sign_H(W, H).astype(np.float32))
    # W = 0 exactly gives +H (Theano's round of 0.5 was half away from zero)
    zero = bc.binarization(torch.zeros(3), H, binary=True, deterministic=False, stochastic=False)
    np.testing.assert_array_equal(zero.numpy(), np.full(3, H, dtype=np.float32))


def test_binary_false_returns_real_weights():
    W = torch.tensor([0.3, -0.7, 2.5, 0.])
    for deterministic in (False, True):
        for stochastic in (False, True):
            out = bc.binarization(W, 1., binary=False, deterministic=deterministic,
                                  stochastic=stochastic)
            assert torch.equal(out, W)


def test_stochastic_test_time_returns_real_weights():
    # §1.1 / §8.2: stochastic BC evaluates with the real-valued W (no sampling, no rounding)
    W = torch.tensor([0.3, -0.7, 0.999, -0.01, 0.])
    out = bc.binarization(W, 1., binary=True, deterministic=True, stochastic=True,
                          stream=torch.Generator().manual_seed(0))
    assert torch.equal(out, W)


@pytest.mark.parametrize("H", [1., 2.])
def test_stochastic_frequency_matches_hard_sigmoid(H):
    w_values = np.array([-1.5, -1., -0.6, -0.2, 0., 0.1, 0.45, 0.8, 1., 1.7]) * H
    n = 40000
    W = torch.from_numpy(np.repeat(w_values[:, None], n, axis=1).astype(np.float32))
    gen = torch.Generator().manual_seed(1234)
    Wb = bc.binarization(W, H, binary=True, deterministic=False, stochastic=True,
                         stream=gen).numpy()
    assert set(np.unique(Wb).tolist()) <= {H, -H}
    freq = (Wb == np.float32(H)).mean(axis=1)
    p = np_hard_sigmoid(w_values / H)
    for w, f, pi in zip(w_values, freq, p):
        if pi in (0., 1.):  # u < p with u in [0, 1): never / always
            assert f == pi, (w, f, pi)
        else:
            sigma = np.sqrt(pi * (1 - pi) / n)
            assert abs(f - pi) < 5 * sigma, (w, f, pi, sigma)


def test_stochastic_binarization_is_reproducible_with_a_seeded_generator():
    W = torch.linspace(-1, 1, 1000)
    a = bc.binarization(W, 1., stochastic=True, stream=torch.Generator().manual_seed(7))
    b = bc.binarization(W, 1., stochastic=True, stream=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_hard_sigmoid():
    x = np.array([-3., -1., -0.5, 0., 0.25, 1., 4.], dtype=np.float32)
    np.testing.assert_allclose(bc.hard_sigmoid(torch.from_numpy(x)).numpy(), np_hard_sigmoid(x),
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# §1.2-1.3 Glorot H and W_LR_scale
# ---------------------------------------------------------------------------------------------

SCALE_TABLE = {  # §1.3, printed to 3 decimals
    "mnist": [43.451, 52.256, 52.256, 37.041],
    "mnist_test_time": [37.094, 41.312, 41.312, 29.326],
    "cifar10": [28.036, 39.192, 48.0, 55.426, 67.882, 78.384, 78.384, 36.950, 26.255],
    "svhn": [20.050, 27.713, 33.941, 39.192, 48.0, 55.426, 58.424, 36.950, 26.255],
}


@pytest.mark.parametrize("name,build", [
    ("mnist", lambda: models.mlp(num_units=2048, n_hidden_layers=3)),
    ("mnist_test_time", lambda: models.mlp(num_units=1280, n_hidden_layers=3)),
    ("cifar10", lambda: models.cnn(widths=(128, 256, 512), fc_units=1024)),
    ("svhn", lambda: models.cnn(widths=(64, 128, 256), fc_units=1024)),
])
def test_W_LR_scale_reproduces_spec_table(name, build):
    np.random.seed(0)
    layers = bc.binary_layers(build())
    scales = [m.W_LR_scale for m in layers]
    assert len(scales) == len(SCALE_TABLE[name])
    for got, want in zip(scales, SCALE_TABLE[name]):
        assert type(got) is float
        assert abs(got - want) < 5e-4, (got, want)
    for m in layers:  # all scripts use H = 1
        assert type(m.H) is float and m.H == 1.


@pytest.mark.parametrize("fan_in,fan_out", [(784, 2048), (2048, 10), (5, 3)])
def test_dense_glorot_H_and_scale(fan_in, fan_out):
    coeff = np.sqrt(1.5 / (fan_in + fan_out))
    layer = bc.DenseLayer(fan_in, fan_out, H="Glorot", rng=np.random.RandomState(0))
    assert type(layer.H) is float and type(layer.W_LR_scale) is float
    assert layer.H == pytest.approx(coeff, rel=1e-6)
    assert layer.W_LR_scale == pytest.approx(1. / coeff, rel=1e-6)
    # W_LR_scale is the inverse Glorot coefficient whatever H is (§1.3)
    layer1 = bc.DenseLayer(fan_in, fan_out, H=1., rng=np.random.RandomState(0))
    assert layer1.H == 1. and layer1.W_LR_scale == pytest.approx(1. / coeff, rel=1e-6)
    # an explicit W_LR_scale is kept
    layer2 = bc.DenseLayer(fan_in, fan_out, H=1., W_LR_scale=1., rng=np.random.RandomState(0))
    assert type(layer2.W_LR_scale) is float and layer2.W_LR_scale == 1.


@pytest.mark.parametrize("c_in,c_out", [(3, 128), (128, 256), (3, 4)])
def test_conv_glorot_H_and_scale(c_in, c_out):
    coeff = np.sqrt(1.5 / (9 * c_in + 9 * c_out))  # fans times k*k (§1.2)
    layer = bc.Conv2DLayer(c_in, c_out, 3, padding=1, H="Glorot", rng=np.random.RandomState(0))
    assert type(layer.H) is float and type(layer.W_LR_scale) is float
    assert layer.H == pytest.approx(coeff, rel=1e-6)
    assert layer.W_LR_scale == pytest.approx(1. / coeff, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# §1.4 initialisation
# ---------------------------------------------------------------------------------------------

def check_uniform(W, bound):
    W = np.asarray(W, dtype=np.float64).ravel()
    n = W.size
    assert np.all(W >= -bound) and np.all(W <= bound)
    assert W.max() > 0.99 * bound and W.min() < -0.99 * bound
    # moments of U(-a, a): mean 0 (sd a/sqrt(3n)), E[W^2] = a^2/3 (sd a^2 sqrt(4/45/n))
    assert abs(W.mean()) < 5 * bound / np.sqrt(3 * n)
    assert abs((W ** 2).mean() - bound ** 2 / 3) < 5 * bound ** 2 * np.sqrt(4 / 45 / n)


@pytest.mark.parametrize("H", [1., 0.5, "Glorot"])
def test_binary_init_uniform_minus_H_H_and_zero_biases(H):
    dense = bc.DenseLayer(300, 200, H=H, rng=np.random.RandomState(1))
    conv = bc.Conv2DLayer(32, 64, 3, padding=1, H=H, rng=np.random.RandomState(2))
    for layer, fan_in, fan_out in ((dense, 300, 200), (conv, 9 * 32, 9 * 64)):
        bound = np.sqrt(1.5 / (fan_in + fan_out)) if H == "Glorot" else H
        check_uniform(layer.weight.detach().numpy(), bound * (1 + 1e-6))
        assert layer.bias is not None
        assert isinstance(layer.bias, nn.Parameter) and layer.bias.requires_grad
        assert torch.count_nonzero(layer.bias) == 0
    assert dense.bias.shape == (200,) and conv.bias.shape == (64,)


def test_non_binary_init_is_glorot_uniform():
    dense = bc.DenseLayer(300, 200, binary=False, rng=np.random.RandomState(1))
    check_uniform(dense.weight.detach().numpy(), np.sqrt(6. / 500) * (1 + 1e-6))
    conv = bc.Conv2DLayer(32, 64, 3, padding=1, binary=False, rng=np.random.RandomState(2))
    check_uniform(conv.weight.detach().numpy(), np.sqrt(6. / (9 * (32 + 64))) * (1 + 1e-6))


def test_rng_consumption_order_seed_then_weights():
    # §4.5: each binary layer draws its stream's seed, then its W (Lasagne's (n_in, n_out) for
    # dense), from the numpy RNG in construction order.
    rs = np.random.RandomState(21)
    seed = rs.randint(1, 2147462579)
    W_lasagne = rs.uniform(-1., 1., (6, 4))
    layer = bc.DenseLayer(6, 4, H=1., rng=np.random.RandomState(21))
    assert layer.seed == seed
    np.testing.assert_array_equal(layer.weight.detach().numpy(), W_lasagne.T.astype(np.float32))
    # conv: Lasagne's W is (C_out, C_in, k, k) used as a true convolution (flip_filters=True);
    # torch correlates, so the same function needs the spatially flipped filters
    rs = np.random.RandomState(22)
    seed = rs.randint(1, 2147462579)
    W_lasagne = rs.uniform(-1., 1., (3, 2, 3, 3))
    conv = bc.Conv2DLayer(2, 3, 3, padding=1, H=1., rng=np.random.RandomState(22))
    assert conv.seed == seed
    np.testing.assert_array_equal(conv.weight.detach().numpy(),
                                  W_lasagne[:, :, ::-1, ::-1].astype(np.float32))


def test_mlp_draws_dropout_seeds_and_layer_seeds_from_the_global_rng():
    # §4.5 (MNIST): input DropoutLayer seed, then per hidden layer: BC seed, W, dropout seed
    rs = np.random.RandomState(1234)
    rs.randint(1, 2147462579)  # input dropout
    expected = []
    for n_in, n_out in ((6, 5), (5, 5), (5, 10)):
        expected.append((rs.randint(1, 2147462579), rs.uniform(-1., 1., (n_in, n_out))))
        if n_out == 5:
            rs.randint(1, 2147462579)  # hidden dropout
    np.random.seed(1234)
    model = models.mlp(num_units=5, n_hidden_layers=2, n_inputs=6)
    layers = bc.binary_layers(model)
    assert len(layers) == 3
    for layer, (seed, W) in zip(layers, expected):
        assert layer.seed == seed
        np.testing.assert_array_equal(layer.weight.detach().numpy(), W.T.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# §1.1 forward weights and §2.1 straight-through gradient
# ---------------------------------------------------------------------------------------------

def set_params(layer, W, b):
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.asarray(W, dtype=np.float32)))
        layer.bias.copy_(torch.from_numpy(np.asarray(b, dtype=np.float32)))


def np_dense(x, W, b):
    return x.reshape(len(x), -1) @ W.T + b  # torch layout: W is (out, in)


def np_conv(x, W, b):
    """Cross-correlation (torch's convention), stride 1, zero padding 1, 3x3."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = sliding_window_view(xp, (3, 3), axis=(2, 3))  # (N, C, H, W, 3, 3)
    return np.einsum("nchwij,ocij->nohw", win, W) + b[None, :, None, None], win


DENSE_W = np.array([[0.3, -0.7, 1.5, -2.0, 0.],
                    [-0.2, 0.9, -1.2, 0.05, 3.0],
                    [0.6, -0.4, 0.1, -0.8, -1.0]])


@pytest.mark.parametrize("stochastic", [False, True])
def test_dense_forward_weights_train_and_eval(stochastic):
    rng = np.random.RandomState(3)
    layer = bc.DenseLayer(5, 3, stochastic=stochastic, H=1., rng=rng)
    b = np.array([0.1, -0.2, 0.3])
    x = rng.randn(4, 5)
    # saturated weights (|W| >= H) make the stochastic sample certain: +-H = sign
    W_train = DENSE_W if not stochastic else np.where(DENSE_W >= 0, 1.5, -1.5) * (
        1 + np.abs(DENSE_W))
    set_params(layer, W_train, b)
    layer.train()
    out = layer(torch.from_numpy(x.astype(np.float32))).detach().numpy()
    np.testing.assert_allclose(out, np_dense(x, np_sign_H(W_train, 1.), b), rtol=1e-5,
                               atol=1e-5)

    set_params(layer, DENSE_W, b)
    layer.eval()
    out = layer(torch.from_numpy(x.astype(np.float32))).detach().numpy()
    W_eval = DENSE_W if stochastic else np_sign_H(DENSE_W, 1.)  # §1.1 table
    np.testing.assert_allclose(out, np_dense(x, W_eval, b), rtol=1e-5, atol=1e-5)


def test_dense_flattens_inputs_in_C_order():
    rng = np.random.RandomState(4)
    layer = bc.DenseLayer(12, 3, stochastic=False, rng=rng)
    W = rng.uniform(-1, 1, (3, 12))
    b = np.zeros(3)
    set_params(layer, W, b)
    x = rng.randn(2, 3, 2, 2)
    out = layer(torch.from_numpy(x.astype(np.float32))).detach().numpy()
    np.testing.assert_allclose(out, np_dense(x, np_sign_H(W, 1.), b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stochastic", [False, True])
def test_conv_forward_weights_train_and_eval(stochastic):
    rng = np.random.RandomState(5)
    layer = bc.Conv2DLayer(3, 4, 3, padding=1, stochastic=stochastic, H=1., rng=rng)
    W = rng.uniform(-1, 1, (4, 3, 3, 3))
    W[0, 0, 0, 0], W[1, 2, 1, 2] = 0., 1.8  # W = 0 -> +1; |W| > 1 allowed before the clip
    b = rng.randn(4)
    x = rng.randn(2, 3, 5, 6)

    W_train = W if not stochastic else np.where(W >= 0, 1., -1.) * (1 + np.abs(W))
    set_params(layer, W_train, b)
    layer.train()
    out = layer(torch.from_numpy(x.astype(np.float32))).detach().numpy()
    np.testing.assert_allclose(out, np_conv(x, np_sign_H(W_train, 1.), b)[0], rtol=1e-5,
                               atol=1e-5)

    set_params(layer, W, b)
    layer.eval()
    out = layer(torch.from_numpy(x.astype(np.float32))).detach().numpy()
    W_eval = W if stochastic else np_sign_H(W, 1.)
    np.testing.assert_allclose(out, np_conv(x, W_eval, b)[0], rtol=1e-5, atol=1e-5)


def test_dense_straight_through_gradient_has_no_mask():
    rng = np.random.RandomState(6)
    layer = bc.DenseLayer(5, 3, stochastic=False, H=1., rng=rng)
    b = np.array([0.05, -0.1, 0.2])
    set_params(layer, DENSE_W, b)  # several |W| > 1
    layer.train()
    x = rng.randn(4, 5)
    target = rng.randn(4, 3)
    xt = torch.from_numpy(x.astype(np.float32)).requires_grad_()
    out = layer(xt)
    loss = 0.5 * ((out - torch.from_numpy(target.astype(np.float32))) ** 2).sum()
    loss.backward()

    Wb = np_sign_H(DENSE_W, 1.)
    g = np_dense(x, Wb, b) - target  # dL/dout, depends on the Wb used in the forward
    np.testing.assert_allclose(layer.weight.grad.numpy(), g.T @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.bias.grad.numpy(), g.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xt.grad.numpy(), g @ Wb, rtol=1e-5, atol=1e-5)
    outside = np.abs(DENSE_W) > 1
    assert outside.any() and np.all(np.abs(layer.weight.grad.numpy()[outside]) > 1e-3)


def test_stochastic_dense_shares_one_sample_per_minibatch_and_gradient_uses_it():
    rng = np.random.RandomState(7)
    layer = bc.DenseLayer(5, 3, stochastic=True, H=1., rng=rng)
    W = rng.uniform(-0.9, 0.9, (3, 5))
    W[0, 0], W[2, 4] = 1.4, -2.2  # outside [-1, 1]: certain sample, gradient still flows
    set_params(layer, W, np.zeros(3))
    layer.train()
    x = np.concatenate([np.eye(5), np.eye(5)])  # row n of out reads column n of Wb
    out = layer(torch.from_numpy(x.astype(np.float32)))
    o = out.detach().numpy()
    np.testing.assert_array_equal(o[:5], o[5:])  # the whole minibatch shares one Wb
    Wb = o[:5].T
    assert set(np.unique(Wb).tolist()) <= {-1., 1.}
    assert Wb[0, 0] == 1. and Wb[2, 4] == -1.
    G = rng.randn(10, 3)
    (out ** 2 * torch.from_numpy(G.astype(np.float32))).sum().backward()
    g = 2 * o * G  # dL/dout with the sampled Wb
    np.testing.assert_allclose(layer.weight.grad.numpy(), g.T @ x, rtol=1e-5, atol=1e-5)
    # a fresh sample on the next training forward (60 interior weights: all equal is ~1e-17)
    layer2 = bc.DenseLayer(30, 2, stochastic=True, rng=np.random.RandomState(8))
    with torch.no_grad():
        layer2.weight.zero_()
    e = torch.eye(30)
    assert not torch.equal(layer2(e), layer2(e))


def test_conv_straight_through_gradient_has_no_mask():
    rng = np.random.RandomState(9)
    layer = bc.Conv2DLayer(2, 3, 3, padding=1, stochastic=False, H=1., rng=rng)
    W = rng.uniform(-2, 2, (3, 2, 3, 3))
    b = rng.randn(3)
    set_params(layer, W, b)
    layer.train()
    x = rng.randn(2, 2, 4, 5)
    target = rng.randn(2, 3, 4, 5)
    out = layer(torch.from_numpy(x.astype(np.float32)))
    (0.5 * ((out - torch.from_numpy(target.astype(np.float32))) ** 2).sum()).backward()
    y, win = np_conv(x, np_sign_H(W, 1.), b)
    g = y - target
    dW = np.einsum("nohw,nchwij->ocij", g, win)
    np.testing.assert_allclose(layer.weight.grad.numpy(), dW, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(layer.bias.grad.numpy(), g.sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    outside = np.abs(W) > 1
    assert outside.any() and np.all(layer.weight.grad.numpy()[outside] != 0)


# ---------------------------------------------------------------------------------------------
# §2.2-2.3 Lasagne Adam, W_LR_scale, clipping; a whole update of a tiny network
# ---------------------------------------------------------------------------------------------

B1, B2, EPS = 0.9, 0.999, 1e-8


class NpAdam:
    """Lasagne's Adam (§2.2): epsilon on the uncorrected sqrt(v), correction folded into a_t."""

    def __init__(self):
        self.m, self.v, self.t = {}, {}, {}

    def step(self, key, theta, g, LR, scale=1., H=None):
        m = B1 * self.m.get(key, 0.) + (1 - B1) * g
        v = B2 * self.v.get(key, 0.) + (1 - B2) * g ** 2
        t = self.t.get(key, 0) + 1
        self.m[key], self.v[key], self.t[key] = m, v, t
        a_t = LR * np.sqrt(1 - B2 ** t) / (1 - B1 ** t)
        new = theta - scale * a_t * m / (np.sqrt(v) + EPS)
        self.unclipped = new
        return new if H is None else np.clip(new, -H, H)


@pytest.mark.parametrize("H", [1., 0.25])  # H="Glorot" gives H < 1 (the paper's MNIST rows)
def test_adam_is_lasagnes_form_with_scale_and_clip(H):
    # tiny gradients, where epsilon's placement matters: torch.optim.Adam's form differs a lot
    grads = [np.array([1e-8, -3e-9, 2e-8, 0.5, -0.2, 1e-9]),
             np.array([-2e-8, 1e-9, 3e-8, 0.1, 0.4, -1e-9])]
    theta0 = np.array([0.1, -0.2, 0.995, 0.3, -0.999, 1.7]) * H
    LR, scale = 0.01, 3.0
    p = nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    q = nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    opt = bc.Adam([dict(params=[p], W_LR_scale=scale, H=H), dict(params=[q])], LR=LR)
    ref = NpAdam()
    P, Q = theta0.copy(), theta0.copy()
    for t, g in enumerate(grads, 1):
        p.grad = torch.tensor(g)
        q.grad = torch.tensor(g)
        opt.step()
        P = ref.step("p", P, g, LR, scale, H)
        Q = ref.step("q", Q, g, LR)
        np.testing.assert_allclose(p.detach().numpy(), P, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(q.detach().numpy(), Q, rtol=1e-12, atol=1e-15)
    # the unscaled group is not clipped: 1.7 H stays above H
    assert Q[-1] > 1.5 * H and P[-1] == H
    # sanity: torch.optim.Adam's epsilon placement gives visibly different numbers here
    tq = nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    topt = torch.optim.Adam([tq], lr=LR, betas=(B1, B2), eps=EPS)
    for g in grads:
        tq.grad = torch.tensor(g)
        topt.step()
    assert np.max(np.abs(tq.detach().numpy() - Q)) > 1e-4


def test_step_without_a_gradient_leaves_that_parameter_and_scales_the_others_by_their_own():
    """step() skips a parameter whose .grad is None; each other parameter still gets its own
    group's W_LR_scale and H (not the one of the parameter at its place in the shorter list)."""
    theta0 = np.array([0.1, -0.2, 0.3])
    g = np.array([0.5, -0.2, 0.1])
    LR = 0.01
    p, q, r = (nn.Parameter(torch.tensor(theta0, dtype=torch.float64)) for _ in range(3))
    opt = bc.Adam([dict(params=[p], W_LR_scale=2., H=1.), dict(params=[q], W_LR_scale=5., H=1.),
                   dict(params=[r])], LR=LR)
    q.grad, r.grad = torch.tensor(g), torch.tensor(g)
    opt.step()
    ref = NpAdam()
    np.testing.assert_array_equal(p.detach().numpy(), theta0)
    np.testing.assert_allclose(q.detach().numpy(), ref.step("q", theta0, g, LR, 5., 1.),
                               rtol=1e-12)
    np.testing.assert_allclose(r.detach().numpy(), ref.step("r", theta0, g, LR), rtol=1e-12)
    assert float(opt.state[p]["step"]) == 0 and float(opt.state[q]["step"]) == 1


def np_chain_step(layers, x, t):
    """Forward + analytic backward of a Dense/BN(train mode) chain and the squared hinge."""
    caches, h = [], x
    for L in layers:
        if L["kind"] == "dense":
            Wb = np_sign_H(L["W"], L["H"])  # deterministic BC, training forward
            caches.append((h, Wb))
            h = h @ Wb.T + L["b"]
        else:
            mu = h.mean(0)
            xc = h - mu
            s = np.sqrt((xc ** 2).mean(0))  # biased std (§3)
            d = s + L["eps"]  # epsilon added to the std
            caches.append((xc, s, d))
            L["batch_stats"] = (mu, s)
            h = xc * L["gamma"] / d + L["beta"]
    N, K = h.shape
    hinge = np.maximum(0., 1. - t * h)
    loss = (hinge ** 2).mean()  # mean over N*K (§4.1)
    g = -2. * t * hinge / (N * K)
    grads = [None] * len(layers)
    for i in reversed(range(len(layers))):
        L = layers[i]
        if L["kind"] == "dense":
            hin, Wb = caches[i]
            grads[i] = dict(W=g.T @ hin, b=g.sum(0))  # straight-through: dL/dWb for W
            g = g @ Wb
        else:
            xc, s, d = caches[i]
            grads[i] = dict(gamma=(g * xc / d).sum(0), beta=g.sum(0))
            dxc = g * L["gamma"] / d
            dd = -(g * L["gamma"] * xc).sum(0) / d ** 2
            dxc = dxc + dd * xc / (N * s)
            g = dxc - dxc.mean(0)
    return loss, grads


def np_train_step(layers, x, t, adam, LR, alpha):
    loss, grads = np_chain_step(layers, x, t)
    clipped = 0
    for i, (L, G) in enumerate(zip(layers, grads)):
        if L["kind"] == "dense":
            W_old = L["W"]
            L["W"] = adam.step((i, "W"), L["W"], G["W"], LR, L["scale"], L["H"])
            # count clips caused by the step itself (W was inside the bounds before it)
            clipped += int(np.sum((np.abs(adam.unclipped) > L["H"]) & (np.abs(W_old) <= L["H"])))
            L["b"] = adam.step((i, "b"), L["b"], G["b"], LR)
        else:
            L["gamma"] = adam.step((i, "gamma"), L["gamma"], G["gamma"], LR)
            L["beta"] = adam.step((i, "beta"), L["beta"], G["beta"], LR)
            mu, s = L["batch_stats"]
            L["mean"] = (1 - alpha) * L["mean"] + alpha * mu
            L["std"] = (1 - alpha) * L["std"] + alpha * s  # without epsilon
    return loss, clipped


LR_NET = 0.03


def _run_two_steps(order, dtype, sync_bias=False, mode=None):
    """Two training steps of torch vs numpy. sync_bias: the dense bias before a training-mode
    BN has a zero gradient up to rounding, so Adam's step on float32 noise is arbitrary; numpy
    then takes torch's bias after each step (it shifts only the BN running mean).
    mode: None calls the model and the optimizer directly; "eager" or "compiled" runs the steps
    through fast_step.TrainStep, the training loop's step."""
    rng = np.random.RandomState(11)
    N, n_in, n_out, eps, alpha, LR = 8, 5, 3, 1e-4, 0.15, LR_NET
    torch_layers, np_layers = [], []
    for kind in order:
        if kind == "dense":
            layer = bc.DenseLayer(n_in, n_out, stochastic=False, H=1., rng=rng)
            W = rng.uniform(0.3, 1.0, (n_out, n_in)) * rng.choice([-1., 1.], (n_out, n_in))
            W[0, :2] = [1.6, -1.3]  # outside [-H, H]: must come back to the bound
            W[1:, :] = 0.99 * np.sign(W[1:, :])  # near it: a step outward is clipped
            b = rng.uniform(-0.5, 0.5, n_out)
            set_params(layer, W, b)
            torch_layers.append(layer)
            np_layers.append(dict(kind="dense", W=W, b=b, H=1.,
                                  scale=float(np.float32(1. / np.sqrt(1.5 / (n_in + n_out))))))
        else:
            c = n_out if torch_layers else n_in
            layer = BatchNormLayer(c, epsilon=eps, alpha=alpha)
            gamma = rng.uniform(0.5, 2.0, c)
            beta = rng.uniform(-0.5, 0.5, c)
            beta[0] = 1.5  # outside [-1, 1]: the second group is never clipped
            with torch.no_grad():
                layer.gamma.copy_(torch.from_numpy(gamma.astype(np.float32)))
                layer.beta.copy_(torch.from_numpy(beta.astype(np.float32)))
            torch_layers.append(layer)
            np_layers.append(dict(kind="bn", gamma=gamma, beta=beta, eps=eps,
                                  mean=np.zeros(c), std=np.ones(c)))
    model = nn.Sequential(*torch_layers).to(dtype)
    for L in np_layers:  # start numpy from exactly the float32 values torch holds
        for k in ("W", "b", "gamma", "beta"):
            if k in L:
                L[k] = L[k].astype(np.float32).astype(np.float64)
    npdt = np.float32 if dtype == torch.float32 else np.float64
    opt = bc.make_optimizer(model, LR)
    adam = NpAdam()
    model.train()
    total_clipped = 0
    batches = []
    for step in range(2):  # t = 1 and t = 2
        x = rng.randn(N, n_in) * 2 + 0.5
        labels = rng.randint(0, n_out, N)
        batches.append((x, 2. * np.eye(n_out)[labels] - 1.))
    if mode is not None:
        import fast_step
        split = fast_step.Split(np.concatenate([x for x, _ in batches]).astype(npdt),
                                np.concatenate([t for _, t in batches]), torch.device("cpu"))
        split.y = split.y.to(dtype)
        train_step = fast_step.TrainStep(model, opt, split, N, mode=mode)
        train_step.start_epoch(np.arange(2 * N))
    for step, (x, t) in enumerate(batches):
        if mode is None:
            out = model(torch.from_numpy(x.astype(npdt)))
            loss = bc.squared_hinge_loss(out, torch.from_numpy(t.astype(npdt)))
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            train_step()
            loss = train_step.losses[step]
        np_loss, clipped = np_train_step(np_layers, x, t, adam, LR, alpha)
        total_clipped += clipped
        if sync_bias:
            for layer, L in zip(torch_layers, np_layers):
                if L["kind"] == "dense":
                    L["b"] = layer.bias.detach().double().numpy().copy()
        assert float(loss.detach()) == pytest.approx(np_loss, rel=1e-5)
    return torch_layers, np_layers, total_clipped


def _compare(torch_layers, np_layers, dtype, skip=()):
    # float64: the same arithmetic, so tight. float32: Adam divides by |g| (m/sqrt(v)), so a
    # gradient near 0 (they cancel through BN) turns float32 rounding of g into up to ~1e-4 of
    # one step; the tolerance is a small fraction of a step (LR, or LR*W_LR_scale for W).
    if dtype == torch.float64:
        rtol, atol = 1e-9, 1e-12
    else:
        rtol, atol = 1e-5, 5e-4 * LR_NET
    for layer, L in zip(torch_layers, np_layers):
        if L["kind"] == "dense":
            pairs = [("W", layer.weight), ("b", layer.bias)]
        else:
            pairs = [("gamma", layer.gamma), ("beta", layer.beta), ("mean", layer.mean),
                     ("std", layer.std)]
        for name, tensor in pairs:
            if name in skip:
                continue
            scale = L["scale"] if name == "W" else 1.
            np.testing.assert_allclose(tensor.detach().numpy(), L[name], rtol=rtol,
                                       atol=atol * scale, err_msg=f"{L['kind']}.{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_updates_of_dense_bn_net_match_numpy_spec(dtype):
    # the dense bias feeds a training-mode BN: its gradient is 0 up to rounding (§1.4), so
    # Adam's step on that noise is not comparable; the bias update is checked in the next test.
    torch_layers, np_layers, clipped = _run_two_steps(["dense", "bn"], dtype, sync_bias=True)
    _compare(torch_layers, np_layers, dtype, skip=("b",))
    assert clipped > 0  # the test exercises the clip to [-H, H] by a step
    assert np.all(np.abs(torch_layers[0].weight.detach().numpy()) <= 1.)
    assert torch_layers[1].beta[0] > 1.4  # not clipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_updates_of_bn_dense_net_match_numpy_spec(dtype):
    # BN first, so the dense bias has a real gradient: unscaled, unclipped LR (§2.3)
    torch_layers, np_layers, clipped = _run_two_steps(["bn", "dense"], dtype)
    _compare(torch_layers, np_layers, dtype)
    assert clipped > 0


@pytest.mark.slow  # compiles (about 20 s per network on 2 cores)
@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("order", [["dense", "bn"], ["bn", "dense"]])
def test_two_updates_through_the_training_step_match_numpy_spec(mode, order):
    # The same check through fast_step.TrainStep: the loop's step, eager and compiled.
    dense_first = order[0] == "dense"
    torch_layers, np_layers, clipped = _run_two_steps(order, torch.float32,
                                                      sync_bias=dense_first, mode=mode)
    _compare(torch_layers, np_layers, torch.float32, skip=("b",) if dense_first else ())
    assert clipped > 0


def test_make_optimizer_groups(capsys):
    rng = np.random.RandomState(12)
    d1 = bc.DenseLayer(4, 6, rng=rng)
    d2 = bc.DenseLayer(6, 3, H=0.5, rng=rng)
    bn1, bn2 = BatchNormLayer(6), BatchNormLayer(3)
    model = nn.Sequential(d1, bn1, d2, bn2)
    opt = bc.make_optimizer(model, 0.005)
    groups = opt.param_groups
    assert len(groups) == 3
    for layer in (d1, d2):
        (g,) = [g for g in groups if any(p is layer.weight for p in g["params"])]
        assert len(g["params"]) == 1
        assert g["W_LR_scale"] == layer.W_LR_scale and g["H"] == layer.H
    (other,) = [g for g in groups if not any(p is d1.weight or p is d2.weight
                                             for p in g["params"])]
    ids = {id(p) for p in other["params"]}
    assert ids == {id(p) for p in (d1.bias, d2.bias, bn1.beta, bn1.gamma, bn2.beta, bn2.gamma)}
    assert other["W_LR_scale"] == 1. and other["H"] is None and float(opt.LR) == 0.005
    for g in groups:  # Lasagne defaults (§2.2)
        assert (g["beta1"], g["beta2"], g["epsilon"]) == (B1, B2, EPS)
    # clipping_scaling's build-time print, one pair per binary layer (§1.3)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" = ")[0] for ln in lines] == ["W_LR_scale", "H"] * 2
    assert float(lines[0].split(" = ")[1]) == pytest.approx(1 / np.sqrt(1.5 / 10), rel=1e-6)
    assert float(lines[3].split(" = ")[1]) == 0.5

    opt.set_learning_rate(0.0025)
    assert float(opt.LR) == 0.0025


def test_make_optimizer_non_binary_model_has_one_unscaled_unclipped_group():
    rng = np.random.RandomState(13)
    model = nn.Sequential(bc.DenseLayer(4, 3, binary=False, rng=rng), BatchNormLayer(3))
    opt = bc.make_optimizer(model, 0.01)
    assert len(opt.param_groups) == 1
    (g,) = opt.param_groups
    assert len(g["params"]) == 4 and g["W_LR_scale"] == 1. and g["H"] is None


# ---------------------------------------------------------------------------------------------
# §4.1 loss and LR schedule
# ---------------------------------------------------------------------------------------------

def test_squared_hinge_loss_is_mean_over_N_times_10():
    rng = np.random.RandomState(14)
    y = rng.randn(7, 10) * 1.5
    t = 2. * np.eye(10)[rng.randint(0, 10, 7)] - 1.
    expected = np.mean(np.maximum(0., 1. - t * y) ** 2)
    got = bc.squared_hinge_loss(torch.from_numpy(y.astype(np.float32)),
                                torch.from_numpy(t.astype(np.float32)))
    assert got.dim() == 0
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # perfectly classified with margin: zero
    assert float(bc.squared_hinge_loss(torch.from_numpy(2 * t), torch.from_numpy(t))) == 0.


@pytest.mark.parametrize("start,fin,epochs,expected", [
    (0.001, 3e-6, 250, 0.977031),  # MNIST
    (0.003, 2e-6, 500, 0.985480),  # CIFAR-10
    (0.01, 3e-6, 200, 0.960253),  # SVHN
])
def test_lr_decay(start, fin, epochs, expected):
    decay = bc.lr_decay(start, fin, epochs)
    assert abs(decay - expected) < 5e-7
    assert decay == pytest.approx((fin / start) ** (1. / epochs), rel=1e-12)
    # LR_fin is reached only after the last epoch; the last epoch uses LR_start*decay^(E-1)
    assert start * decay ** epochs == pytest.approx(fin, rel=1e-9)
    if epochs == 250:
        assert start * decay ** (epochs - 1) == pytest.approx(3.07e-6, rel=2e-3)
