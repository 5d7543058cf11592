"""BinaryNet's math (docs/original.md §13) pinned: binary_tanh_unit forward and backward as
Theano computed them, Lasagne's batch norm against numpy, and the networks' shape (the first
layer's input real, deterministic binary weights, BN alone at the output). Each test names the
mistake (mutant) it catches."""
import numpy as np
import pytest
import torch

import models
from batch_norm import LasagneBatchNormLayer
from binary_connect import BinaryLayerMixin, DenseLayer
from binary_net import BinaryTanh, binary_tanh_unit

F32 = np.float32
BELOW_MINUS_1 = float(np.nextafter(F32(-1), F32(-2)))  # -1 - 2**-23
ABOVE_1 = float(np.nextafter(F32(1), F32(2)))  # 1 + 2**-23


def test_binary_tanh_unit_forward_is_sign_with_sign_0_plus_1():
    """Catches: torch.round (half to even) for round3, or `> 0.5`: sign(0) = -1; a forward of
    `x >= 0`: -2**-25 gives -1, where Theano's float32 (x + 1) / 2 rounded to 0.5, so +1."""
    x = torch.tensor([-3., -1., -0.5, -2.**-24, -2.**-25, 0., 2.**-30, 0.5, 1., 7.])
    expected = torch.tensor([-1., -1., -1., -1., 1., 1., 1., 1., 1., 1.])
    assert torch.equal(binary_tanh_unit(x), expected)
    assert torch.equal(BinaryTanh()(x), expected)


def test_binary_tanh_unit_gradient_is_hard_tanhs_with_the_ends_included():
    """Theano's clip passed the gradient where min <= x <= max (theano/scalar/basic.py Clip.grad),
    so hard_sigmoid's does where 0 <= (x + 1) / 2 <= 1 in float32: at x = +-1 too, and at the
    float just above 1, whose (x + 1) / 2 rounds to 1. Catches: the mask |x| < 1 (0 at +-1), no
    mask at all (BinaryConnect's straight-through: 1 at +-1.5), a gradient scaled by 2 or 1/2."""
    x = torch.tensor([-1.5, BELOW_MINUS_1, -1., -0.5, 0., 0.5, 1., ABOVE_1, 1. + 2.**-22, 1.5],
                     requires_grad=True)
    mask = torch.tensor([0., 0., 1., 1., 1., 1., 1., 1., 0., 0.])
    g = torch.linspace(-2., 3., len(x))  # the incoming gradient, passed unchanged where it passes
    binary_tanh_unit(x).backward(g)
    assert torch.equal(x.grad, g * mask)


# ---------------------------------------------------------------------------------------------
# Lasagne's BatchNormLayer (lasagne/layers/normalization.py), against numpy in float64
# ---------------------------------------------------------------------------------------------

def np_lasagne_bn(x, gamma, beta, eps, mean=None, inv_std=None):
    """y = (x - mean) * (gamma * inv_std) + beta; with mean=None the batch's mean and
    1 / sqrt(var + eps), var biased, over every axis but 1. Returns y, mean, inv_std."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if mean is None:
        mean = x.mean(axis=axes)
        inv_std = 1. / np.sqrt(x.var(axis=axes, ddof=0) + eps)
    y = (x - mean.reshape(shape)) * (gamma * inv_std).reshape(shape) + beta.reshape(shape)
    return y, mean, inv_std


@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 5, 6)])
def test_lasagne_batch_norm_formula_and_running_averages(shape):
    """Training output, two steps of running averages of mean and inv_std (alpha 0.3), and the
    eval output with them, against numpy. A large epsilon (0.5) and a small batch tell the forms
    apart. Catches: epsilon on the std (BinaryConnect's §3 form); the unbiased variance; a
    running variance (or std) averaged instead of inv_std; alpha on the old value instead of
    the new; eval with the batch's statistics."""
    rng = np.random.RandomState(0)
    c, eps, alpha = shape[1], 0.5, 0.3
    layer = LasagneBatchNormLayer(c, epsilon=eps, alpha=alpha)
    gamma, beta = rng.uniform(-2., 2., c), rng.uniform(-1., 1., c)
    with torch.no_grad():
        layer.gamma.copy_(torch.tensor(gamma))
        layer.beta.copy_(torch.tensor(beta))
    gamma, beta = gamma.astype(F32).astype(np.float64), beta.astype(F32).astype(np.float64)
    run_mean, run_inv_std = np.zeros(c), np.ones(c)  # Lasagne's initial mean and inv_std
    layer.train()
    for step in range(2):
        x = (rng.randn(*shape) * 3. + 1.).astype(F32)
        y = layer(torch.from_numpy(x)).detach().numpy()
        want, mean, inv_std = np_lasagne_bn(x.astype(np.float64), gamma, beta, eps)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        run_mean = (1 - alpha) * run_mean + alpha * mean
        run_inv_std = (1 - alpha) * run_inv_std + alpha * inv_std
        np.testing.assert_allclose(layer.mean.numpy(), run_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.inv_std.numpy(), run_inv_std, rtol=1e-5, atol=1e-6)
    layer.eval()
    x = rng.randn(*shape).astype(F32)
    y = layer(torch.from_numpy(x)).detach().numpy()
    want, _, _ = np_lasagne_bn(x.astype(np.float64), gamma, beta, eps, run_mean, run_inv_std)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.inv_std.numpy(), run_inv_std, rtol=1e-5)  # eval: unmoved


def test_lasagne_batch_norm_names_and_gradient():
    """Lasagne's names (beta, gamma trainable; mean, inv_std saved), its initial values, and the
    gradient through the batch's mean and inv_std (Theano differentiated through both), checked
    by finite differences. Catches: detached batch statistics."""
    layer = LasagneBatchNormLayer(3).double()
    assert set(dict(layer.named_parameters())) == {"beta", "gamma"}
    assert set(layer.state_dict()) == {"beta", "gamma", "mean", "inv_std"}
    assert torch.equal(layer.inv_std, torch.ones(3, dtype=torch.float64))
    assert (layer.epsilon, layer.alpha) == (1e-4, 0.1)  # Lasagne's defaults, BinaryNet's values
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: layer(x) * torch.arange(1., 4., dtype=torch.float64), x)


# ---------------------------------------------------------------------------------------------
# The networks
# ---------------------------------------------------------------------------------------------

def _inputs_of(model, kind):
    seen = []
    for m in model:
        if isinstance(m, kind):
            m.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("build", ["mlp", "cnn"])
def test_first_layer_input_stays_real_hidden_ones_are_binary_output_is_bn(build):
    """The first binary layer gets the input as it is (real-valued); every later one gets +-1;
    the last module is Lasagne's BN with nothing after it. Catches: a binary_tanh_unit before
    the first layer (a binarized input), a missing one in a hidden layer, an activation after
    the output BN (the hinge loss would see +-1)."""
    np.random.seed(1)
    if build == "mlp":
        model, x = models.binarynet_mlp(num_units=16, n_inputs=12), torch.randn(8, 12)
    else:
        model = models.binarynet_cnn(widths=(4, 4, 8), fc_units=8, image_size=8)
        x = torch.randn(8, 3, 8, 8)
    model.eval()  # dropout off: the first layer sees exactly x
    seen = _inputs_of(model, BinaryLayerMixin)
    y = model(x)
    assert torch.equal(seen[0].flatten(1), x.flatten(1))
    assert len(seen) == (4 if build == "mlp" else 9)
    for h in seen[1:]:
        assert torch.equal(h.abs(), torch.ones_like(h))
    assert isinstance(model[-1], LasagneBatchNormLayer)
    assert not torch.equal(y.abs(), torch.ones_like(y))


def test_binarynet_weights_are_deterministic():
    """stochastic=False, as in all three scripts: in training Wb = +H where W >= 0, else -H, the
    same in every pass and at test time; no layer draws. Catches: stochastic binarization."""
    np.random.seed(2)
    model = models.binarynet_mlp(num_units=16, n_inputs=12)
    layers = [m for m in model if isinstance(m, DenseLayer)]
    model.train()
    for m in layers:
        assert not m.stochastic
        Wb = m.binary_weight()
        assert torch.equal(Wb, torch.where(m.weight >= 0, m.H, -m.H))
        assert torch.equal(m.binary_weight(), Wb)
        m.eval()
        assert torch.equal(m.binary_weight(), Wb)
        assert int(m.draws) == 0


# ---------------------------------------------------------------------------------------------
# The inputs of BinaryNet's scripts (§13.5)
# ---------------------------------------------------------------------------------------------

def test_binarynet_inputs(tmp_path):
    """MNIST: pylearn2's center=False pixels / 255, then 2x - 1 (not centred); CIFAR-10 and
    SVHN: 2/255 * pixels - 1 (no GCN, ZCA or LCN); all in [-1, 1], 0 -> -1 and 255 -> +1.
    Catches: the BinaryConnect preprocessing left on, or pixels / 255 left unscaled."""
    import runpy
    import bc_datasets
    import svhn_preprocessing
    from fake_data import write_fake_cifar10, write_fake_mnist
    mnist = runpy.run_path("mnist.py", run_name="defaults")
    raw = write_fake_mnist(tmp_path / "mnist", n_train=30, n_test=10)
    (X, _), (X_valid, _), (X_test, _) = mnist["load_data"](dict(
        data_dir=str(tmp_path / "mnist"), train_set_size=20, verify_checksums=False,
        inputs="binarynet"))
    want = 2 * (raw["test_images"].astype(F32) / F32(255)) - 1.
    np.testing.assert_array_equal(X_test.reshape(-1, 28, 28), want)
    np.testing.assert_array_equal(X_valid.reshape(-1, 28, 28),
                                  2 * (raw["train_images"][20:].astype(F32) / F32(255)) - 1.)

    raw = write_fake_cifar10(tmp_path / "cifar10", n_per_batch=4, n_test=4)
    (X, _), _, (X_test, _) = bc_datasets.load_cifar10(tmp_path / "cifar10", train_set_size=16,
                                                      verify_checksums=False, gcn_zca=False)
    np.testing.assert_array_equal(X_test.reshape(4, -1),
                                  raw["test_data"].astype(F32) * F32(2. / 255.) - F32(1.))
    assert X.dtype == np.float32 and not (tmp_path / "cifar10" / "cache").exists()

    pixels = np.arange(256, dtype=np.uint8).repeat(12)[:3 * 32 * 32].reshape(32, 32, 3, 1)
    svhn_preprocessing.write_set("valid", str(tmp_path), (pixels,), (np.array([3]),),
                                 np.zeros(1, np.uint8), np.zeros(1, int), (0,), 1, "binarynet")
    got = np.load(tmp_path / "valid_X.npy")
    np.testing.assert_array_equal(got, bc_datasets.scale_pixels(pixels.transpose(3, 2, 0, 1)))
    assert got.min() == -1. and got.max() == 1.
