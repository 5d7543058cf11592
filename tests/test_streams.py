"""The counter streams (streams.py) that stochastic binarization draws from in the compiled step:
a pure function of (seed, draw counter, index), uniform on float32's 24-bit grid, all of it."""
import numpy as np
import pytest
import torch

import binary_connect as bc
import streams

CPU = torch.device("cpu")



def draw(seed, counter, n):
    return streams.counter_uniform(seed, torch.tensor(counter, dtype=torch.int64), (n,), CPU)


def test_counter_stream_is_a_function_of_seed_counter_and_index():
    a, b = draw(1234, 7, 1000), draw(1234, 7, 1000)
    assert torch.equal(a, b)
    assert torch.equal(draw(1234, 7, 10), a[:10])  # element i does not depend on the size
    assert (draw(1234, 8, 1000) != a).float().mean() > 0.99
    assert (draw(1235, 7, 1000) != a).float().mean() > 0.99
    # counters beyond 32 bits are distinct draws too
    assert (draw(1234, 7 + 2 ** 32, 1000) != a).float().mean() > 0.99


def test_counter_stream_is_uniform_on_a_24_bit_grid_and_uncorrelated():
    n = 1 << 20
    u = draw(99, 3, n).double().numpy()
    assert u.min() >= 0. and u.max() < 1.
    np.testing.assert_array_equal(u * 2 ** 24, np.floor(u * 2 ** 24))  # float32's resolution
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)
    hist = np.histogram(u, bins=64, range=(0, 1))[0]
    chi2 = ((hist - n / 64) ** 2 / (n / 64)).sum()
    assert chi2 < 120  # 63 degrees of freedom: P(chi2 > 120) < 1e-5
    bound = 5 / np.sqrt(n)
    c = u - 0.5
    assert abs(np.mean(c[1:] * c[:-1])) * 12 < bound  # neighbouring weights
    v = draw(99, 4, n).double().numpy() - 0.5
    assert abs(np.mean(c * v)) * 12 < bound  # the same weight at the next step
    w = draw(100, 3, n).double().numpy() - 0.5
    assert abs(np.mean(c * w)) * 12 < bound  # the same weight in another layer


@pytest.mark.parametrize("H", [1., 0.5])
def test_counter_stream_binarization_frequency_is_hard_sigmoid(H):
    # §1.1: P(Wb = +H) = hard_sigmoid(W/H), here with the counter stream
    values = np.array([-1.2, -0.9, -0.5, 0., 0.3, 0.8, 1.5]) * H
    n = 40000
    W = torch.tensor(np.repeat(values, n), dtype=torch.float32)
    Wb = bc.binarization(W, H, binary=True, deterministic=False, stochastic=True,
                         stream=(7, torch.tensor(0)))
    freq = (Wb.view(len(values), n) > 0).float().mean(1).numpy()
    p = np.clip((values / H + 1) / 2, 0, 1)
    np.testing.assert_allclose(freq, p, atol=5 * np.sqrt(0.25 / n))
    assert set(np.unique(Wb.numpy())) <= {-H, H}


def test_layer_draw_counter_counts_training_samples_only():
    np.random.seed(0)
    stochastic = bc.DenseLayer(5, 4, stochastic=True)
    deterministic = bc.DenseLayer(5, 4, stochastic=False)
    x = torch.randn(3, 5)
    for layer in (stochastic, deterministic):
        layer.stream_kind = "counter"
        layer.train()
        a, b = layer(x), layer(x)
        layer.eval()
        layer(x)
    assert int(stochastic.draws) == 2 and int(deterministic.draws) == 0
    # the counter stream's sample of draw k is (seed, k): a second layer with the same seed and
    # counter reproduces it
    twin = bc.DenseLayer(5, 4, stochastic=True, rng=np.random.RandomState(0))
    twin.seed, twin.stream_kind = stochastic.seed, "counter"
    twin.weight.data.copy_(stochastic.weight.data)
    twin.bias.data.copy_(stochastic.bias.data)
    twin.draws.fill_(1)
    stochastic.train(), twin.train()
    stochastic.draws.fill_(1)
    assert torch.equal(stochastic(x), twin(x))


@pytest.mark.parametrize("seed, counter", [(99, 3), (1234, 2 ** 32 + 5)])
def test_counter_draws_have_all_24_bits(seed, counter):
    n = 1 << 20
    u = streams.counter_uniform(seed, torch.tensor(counter, dtype=torch.int64), (n,), CPU)
    assert u.dtype == torch.float32 and u.shape == (n,)
    k = u.double().numpy() * 2 ** 24
    np.testing.assert_array_equal(k, np.floor(k))  # on the 24-bit grid ...
    k = k.astype(np.int64)
    assert k.min() >= 0 and k.max() < 2 ** 24
    # ... and using all of it: each of the 24 bits, the lowest included, is set in about half
    # of the draws (a draw cut to 23 bits, or with its low bit masked, never sets bit 0)
    sigma = np.sqrt(0.25 / n)
    for bit in range(24):
        frac = ((k >> bit) & 1).mean()
        assert abs(frac - 0.5) < 6 * sigma, (bit, frac)
    # not confined to the 23-bit grid: about half the draws are odd multiples of 2**-24
    assert (k % 2 == 1).sum() > 0.49 * n
    # the top of the range is reached: max about 1 - 2**-20 for 2**20 draws, not below 1 - 2**-16
    assert u.max().item() > 1 - 2 ** -16 and u.max().item() <= 1 - 2 ** -24
    assert u.min().item() < 2 ** -16
    # distinct values: about n - n**2 / 2**25 of them on a 24-bit grid (1015808), fewer on 23
    assert len(np.unique(k)) > n - 1.2 * n * n / 2 ** 25
    assert abs(u.double().mean().item() - 0.5) < 5 * np.sqrt(1 / 12 / n)
