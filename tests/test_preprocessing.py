"""preprocessing.py against references written here from §6.2 / 6.3 (loops, explicit sums)."""
import math

import numpy as np
import pytest

import preprocessing as pp


# ------------------------------------------------------------------------------------------ GCN

def gcn_reference(row, scale=1., subtract_mean=True, use_std=False, sqrt_bias=0., min_divisor=1e-8):
    row = [float(v) for v in row]
    mean = sum(row) / len(row)
    if subtract_mean:
        row = [v - mean for v in row]
    if use_std:
        m = sum(row) / len(row)
        ddof = 1 if len(row) > 1 else 0
        var = sum((v - m) ** 2 for v in row) / (len(row) - ddof)
        divisor = math.sqrt(sqrt_bias + var) / scale
    else:
        divisor = math.sqrt(sqrt_bias + sum(v * v for v in row)) / scale
    if divisor < min_divisor:
        divisor = 1.
    return [v / divisor for v in row]


@pytest.mark.parametrize("kwargs", [
    {},
    {"scale": 55.},
    {"use_std": True, "sqrt_bias": 10.},
    {"subtract_mean": False, "scale": 3.},
])
def test_gcn_matches_reference(kwargs):
    X = np.random.default_rng(0).integers(0, 256, (6, 48)).astype(np.float32)
    got = pp.global_contrast_normalize(X, **kwargs)
    assert got.dtype == np.float32 and got.shape == X.shape
    want = np.array([gcn_reference(r, **kwargs) for r in X])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_gcn_scale_one_gives_unit_norm_and_zero_mean():
    X = np.random.default_rng(1).integers(0, 256, (5, 3072)).astype(np.float32)
    got = pp.global_contrast_normalize(X).astype(np.float64)
    np.testing.assert_allclose(np.sqrt((got ** 2).sum(axis=1)), 1., rtol=1e-6)
    np.testing.assert_allclose(got.mean(axis=1), 0., atol=1e-8)


def test_gcn_min_divisor_rule():
    constant = np.full(3072, 17., dtype=np.float32)          # centred -> all zeros, norm 0
    tiny = np.tile([1e-10, -1e-10], 1536).astype(np.float64)  # norm ~5.5e-9 < 1e-8: divisor -> 1
    small = np.tile([1e-9, -1e-9], 1536).astype(np.float64)   # norm ~5.5e-8 > 1e-8: divided
    X = np.stack([constant, tiny, small])
    got = pp.global_contrast_normalize(X)
    assert np.all(got[0] == 0) and np.all(np.isfinite(got))
    np.testing.assert_allclose(got[1], tiny.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(got[2], small / np.sqrt(3072 * 1e-18), rtol=1e-6)


def test_gcn_does_not_modify_input_and_rejects_non_2d():
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    before = X.copy()
    pp.global_contrast_normalize(X)
    np.testing.assert_array_equal(X, before)
    with pytest.raises(ValueError):
        pp.global_contrast_normalize(X.reshape(3, 2, 2))


# ------------------------------------------------------------------------------------------ ZCA

def test_zca_matches_formula_and_predicted_covariance(monkeypatch):
    rng = np.random.default_rng(2)
    n, dim = 700, 24
    A = rng.standard_normal((dim, dim)) * rng.uniform(0.05, 2., dim)
    X = (rng.standard_normal((n, dim)) @ A + rng.uniform(-3, 3, dim)).astype(np.float32)
    monkeypatch.setattr(pp, "_BLOCK_ROWS", 128)  # several row blocks in the accumulation

    mean, P = pp.zca_fit(X, filter_bias=0.1)
    Xd = X.astype(np.float64)
    mu = Xd.sum(axis=0) / n
    cov = sum(np.outer(r - mu, r - mu) for r in Xd) / n
    lam, V = np.linalg.eigh(cov)
    np.testing.assert_allclose(mean, mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(P, V @ np.diag(1 / np.sqrt(lam + 0.1)) @ V.T, rtol=1e-8, atol=1e-10)

    white = pp.zca_apply(X, mean, P)
    assert white.dtype == np.float32 and white.shape == X.shape
    W = white.astype(np.float64)
    np.testing.assert_allclose(W.mean(axis=0), 0., atol=1e-5)
    got_cov = (W - W.mean(axis=0)).T @ (W - W.mean(axis=0)) / n
    # P Cov P with P = V diag(1/sqrt(lam+b)) V^T: V diag(lam / (lam + b)) V^T, close to I only where
    # lam >> filter_bias
    predicted = V @ np.diag(lam / (lam + 0.1)) @ V.T
    np.testing.assert_allclose(got_cov, predicted, atol=2e-5)
    assert np.abs(predicted - np.eye(dim)).max() > 0.05  # the bias visibly matters here

    np.testing.assert_allclose(white[:5], ((Xd[:5] - mu) @ P).astype(np.float32), rtol=1e-5, atol=1e-5)


def test_zca_rejects_singular_without_bias():
    X = np.zeros((10, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="positive definite"):
        pp.zca_fit(X, filter_bias=0.)


# ------------------------------------------------------------------------------------------ LCN

def kernel_reference(k=7, sigma=2.):
    mid = k // 2
    K = [[math.exp(-((i - mid) ** 2 + (j - mid) ** 2) / (2 * sigma ** 2)) / (2 * math.pi * sigma ** 2)
          for j in range(k)] for i in range(k)]
    total = sum(map(sum, K))
    return np.array([[v / total for v in row] for row in K])


def test_gaussian_filter_values():
    K = pp.gaussian_filter(7, 2.0)
    np.testing.assert_allclose(K, kernel_reference(), rtol=1e-12)
    assert K.shape == (7, 7) and abs(K.sum() - 1) < 1e-12
    assert np.unravel_index(K.argmax(), K.shape) == (3, 3)
    np.testing.assert_allclose(K, K.T)
    np.testing.assert_allclose(K, K[::-1, ::-1])  # symmetric: convolution == correlation
    # centre weight = 1 / (sum_i exp(-i^2/8))^2 over i = -3..3
    assert abs(K[3, 3] - 1 / (1 + 2 * (math.exp(-1 / 8) + math.exp(-1 / 2) + math.exp(-9 / 8))) ** 2) < 1e-12
    assert abs(K[3, 3] - 0.0467) < 1e-4


def full_conv_cropped(x, K):
    """Theano conv2d(border_mode='full') of one image with K (a true convolution), cropped by k//2."""
    k = K.shape[0]
    h, w = x.shape
    full = np.zeros((h + k - 1, w + k - 1))
    for m1 in range(h):
        for m2 in range(w):
            full[m1:m1 + k, m2:m2 + k] += x[m1, m2] * K  # full[n] = sum_m x[m] K[n - m]
    mid = k // 2
    return full[mid:-mid, mid:-mid]


def lcn_reference(img, threshold=1e-4):
    """pylearn2's lecun_lcn on one single-channel image, literally: §6.3."""
    K = kernel_reference()
    x = img.astype(np.float64)
    centred = x - full_conv_cropped(x, K)
    d = np.sqrt(full_conv_cropped(x ** 2, K))
    m = d.mean()
    divisor = np.maximum(np.maximum(m, d), threshold)
    return centred / divisor


def lcn_test_images():
    rng = np.random.default_rng(3)
    X = rng.normal(0, 0.02, (3, 3, 32, 32))
    X[0, :, :, 16:] *= 20           # a high-contrast half: d > m there, d < m in the other half
    X[1, 0, 5:9, 20:30] = 0.5       # a bright patch touching nothing else; borders stay zero-padded
    X[2, 0] = rng.normal(0, 1e-6, (32, 32))  # tiny values: divisor = threshold everywhere
    X[2, 1] = 0.
    return X.astype(np.float32)


def test_lcn_default_normalises_channel_0_only():
    X = lcn_test_images()
    got = pp.lecun_lcn(X)
    assert got.dtype == np.float32 and got.shape == X.shape
    for n in range(len(X)):
        np.testing.assert_allclose(got[n, 0], lcn_reference(X[n, 0]), rtol=2e-5, atol=1e-6)
        np.testing.assert_array_equal(got[n, 1:], X[n, 1:])  # the original's quirk (§6.3)
    # the threshold branch: every divisor is 1e-4, so the output is the centred image * 1e4
    K = kernel_reference()
    x = X[2, 0].astype(np.float64)
    np.testing.assert_allclose(got[2, 0], (x - full_conv_cropped(x, K)) / 1e-4, rtol=2e-5, atol=1e-9)


def test_lcn_all_channels_option():
    X = lcn_test_images()
    got = pp.lecun_lcn(X, channels=(0, 1, 2))
    for n in range(len(X)):
        for c in range(3):
            np.testing.assert_allclose(got[n, c], lcn_reference(X[n, c]), rtol=2e-5, atol=1e-6)
    assert np.all(got[2, 1] == 0)  # an all-zero channel stays zero (divisor = threshold)


def test_lcn_borders_and_other_shapes():
    img = np.random.default_rng(4).uniform(0, 1, (1, 1, 9, 13)).astype(np.float32)
    got = pp.lecun_lcn(img)
    np.testing.assert_allclose(got[0, 0], lcn_reference(img[0, 0]), rtol=2e-5, atol=1e-6)


def test_lcn_does_not_modify_input_and_checks_arguments():
    X = lcn_test_images()
    before = X.copy()
    pp.lecun_lcn(X, channels=(0, 1, 2))
    np.testing.assert_array_equal(X, before)
    with pytest.raises(ValueError):
        pp.lecun_lcn(X, channels=(3,))
    with pytest.raises(ValueError):
        pp.lecun_lcn(X, kernel_size=6)


def test_svhn_gcn_lcn_is_gcn_then_lcn():
    X = np.random.default_rng(5).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    got = pp.svhn_gcn_lcn(X)
    for n in range(2):
        g = np.array(gcn_reference(X[n].ravel()), dtype=np.float32).reshape(3, 32, 32)
        np.testing.assert_allclose(got[n, 0], lcn_reference(g[0]), rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(got[n, 1:], g[1:], rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------- split

def split_reference(train_labels, extra_labels, seed, k_train, k_extra):
    """§6.3 written out: per label 1..10 shuffle that label's indices and take the first k, train
    then extra with one rng; rows in sorted order; then one permutation per set, both drawn from the
    state the split left (pylearn2 rebuilt RandomState(seed) for each set)."""
    rng = np.random.RandomState(seed)
    valid, rest = [], []
    for s, (labels, k) in enumerate(((train_labels, k_train), (extra_labels, k_extra))):
        taken = set()
        for label in range(1, 11):
            index = [i for i in range(len(labels)) if labels[i] == label]
            index = np.array(index, dtype=np.int64)
            rng.shuffle(index)
            taken.update(int(i) for i in index[:k])
        valid += [(s, i) for i in sorted(taken)]
        rest += [(s, i) for i in range(len(labels)) if i not in taken]
    state = rng.get_state()
    order = list(range(len(rest)))
    rng.shuffle(order)  # pylearn2: rng.shuffle(range(n)) on a Python-2 list
    train = [rest[i] for i in order]
    rng.set_state(state)
    order = list(range(len(valid)))
    rng.shuffle(order)
    return train, [valid[i] for i in order]


def synthetic_labels(rng, n):
    return rng.integers(1, 11, n).astype(np.uint8)


def test_split_default_counts_and_exact_order():
    rng = np.random.default_rng(6)
    train_labels = synthetic_labels(rng, 5000)  # ~500 per label >= 400
    extra_labels = synthetic_labels(rng, 2600)  # ~260 per label >= 200
    ts, ti, vs, vi = pp.split_train_valid(train_labels, extra_labels)
    assert len(vi) == 6000 and len(ti) == 5000 + 2600 - 6000
    labels = (train_labels, extra_labels)
    valid_label = np.array([labels[s][i] for s, i in zip(vs, vi)])
    for label in range(1, 11):
        assert np.sum((vs == 0) & (valid_label == label)) == 400
        assert np.sum((vs == 1) & (valid_label == label)) == 200
    train_ref, valid_ref = split_reference(train_labels, extra_labels, 322, 400, 200)
    assert list(zip(ts.tolist(), ti.tolist())) == train_ref
    assert list(zip(vs.tolist(), vi.tolist())) == valid_ref


@pytest.mark.parametrize("k_train,k_extra,seed", [(5, 3, 322), (2, 0, 7), (0, 4, 1)])
def test_split_partition_small(k_train, k_extra, seed):
    rng = np.random.default_rng(seed)
    train_labels = synthetic_labels(rng, 230)
    train_labels[:10] = np.arange(1, 11)  # every label at least present
    extra_labels = synthetic_labels(rng, 170)
    extra_labels[:10] = np.arange(1, 11)
    ts, ti, vs, vi = pp.split_train_valid(train_labels, extra_labels, seed=seed,
                                          n_valid_train=k_train, n_valid_extra=k_extra)
    train_pairs = set(zip(ts.tolist(), ti.tolist()))
    valid_pairs = set(zip(vs.tolist(), vi.tolist()))
    assert len(train_pairs) == len(ts) and len(valid_pairs) == len(vs)  # no duplicates
    assert not train_pairs & valid_pairs                                  # no overlap
    everything = {(0, i) for i in range(230)} | {(1, i) for i in range(170)}
    assert train_pairs | valid_pairs == everything                        # nothing lost
    assert len(vs) == 10 * (k_train + k_extra)
    assert ti.dtype == np.int64 and ts.dtype == np.uint8
    train_ref, valid_ref = split_reference(train_labels, extra_labels, seed, k_train, k_extra)
    assert list(zip(ts.tolist(), ti.tolist())) == train_ref
    assert list(zip(vs.tolist(), vi.tolist())) == valid_ref


def test_split_is_deterministic_per_seed():
    rng = np.random.default_rng(8)
    a, b = synthetic_labels(rng, 300), synthetic_labels(rng, 200)
    a[:10] = b[:10] = np.arange(1, 11)
    first = pp.split_train_valid(a, b, n_valid_train=4, n_valid_extra=2)
    again = pp.split_train_valid(a, b, n_valid_train=4, n_valid_extra=2)
    other = pp.split_train_valid(a, b, seed=323, n_valid_train=4, n_valid_extra=2)
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(first[1], other[1])


def test_split_too_few_of_a_label():
    labels = np.repeat(np.arange(1, 11), 3)
    with pytest.raises(ValueError, match="label"):
        pp.split_train_valid(labels, labels, n_valid_train=4, n_valid_extra=1)


def test_shuffle_order_is_pylearn2_list_shuffle():
    order = list(range(1000))
    np.random.RandomState(322).shuffle(order)
    np.testing.assert_array_equal(pp.shuffle_order(1000, seed=322), order)
