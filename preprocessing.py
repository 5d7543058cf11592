"""pylearn2's preprocessing rebuilt in numpy/scipy: GCN, ZCA, LeCun LCN and the SVHN train/valid split.

Each function says which pylearn2 function it mirrors and which section of docs/original.md it
follows. pylearn2 computed in float32 (Theano floatX); here every reduction and convolution is done in
float64 and the result is rounded to float32 once, so results agree with pylearn2 to float32 rounding
(pylearn2 itself was not bit-reproducible across platforms, §6.2).
"""
import numpy as np
from scipy import ndimage

# Rows processed at once inside zca_fit / zca_apply / lecun_lcn: bounds the float64 temporaries.
_BLOCK_ROWS = 2048


def global_contrast_normalize(X, scale=1., subtract_mean=True, use_std=False, sqrt_bias=0.,
                              min_divisor=1e-8):
    """pylearn2.expr.preprocessing.global_contrast_normalize (§6.2 step 2, §6.3 step 1).

    X: 2-D design matrix (N, D). Per row: subtract the row mean (if subtract_mean), then divide by
    sqrt(sqrt_bias + sum of squares) / scale, or by sqrt(sqrt_bias + var(ddof=1)) / scale with
    use_std; divisors below min_divisor are replaced by 1. Returns a new float32 array.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"global_contrast_normalize needs a 2-D design matrix, got shape {X.shape}")
    scale = float(scale)
    if scale < min_divisor:  # pylearn2 asserts this
        raise ValueError(f"scale={scale} is below min_divisor={min_divisor}")
    X = X.astype(np.float64)  # a copy: the caller's array is never modified
    if subtract_mean:
        X -= X.mean(axis=1, keepdims=True)
    if use_std:
        # pylearn2: ddof=1 like MATLAB's var (Coates' code), ddof=0 for a single column
        ddof = 1 if X.shape[1] > 1 else 0
        normalizers = np.sqrt(sqrt_bias + X.var(axis=1, ddof=ddof)) / scale
    else:
        normalizers = np.sqrt(sqrt_bias + np.einsum("ij,ij->i", X, X)) / scale
    normalizers[normalizers < min_divisor] = 1.
    X /= normalizers[:, None]
    return X.astype(np.float32)


def zca_fit(X, filter_bias=0.1):
    """Fit pylearn2.datasets.preprocessing.ZCA (defaults: no component dropping), §6.2 step 3.

    mean = per-feature mean; C = (X-mean)^T (X-mean) / N + filter_bias*I, accumulated in float64 over
    row blocks (no float64 copy of X); C = V diag(lam) V^T (lam includes the bias);
    P = V diag(1/sqrt(lam)) V^T. Returns (mean, P) as float64.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"zca_fit needs a 2-D design matrix, got shape {X.shape}")
    n, dim = X.shape
    mean = np.zeros(dim)
    for a in range(0, n, _BLOCK_ROWS):
        mean += X[a:a + _BLOCK_ROWS].sum(axis=0, dtype=np.float64)
    mean /= n
    cov = np.zeros((dim, dim))
    for a in range(0, n, _BLOCK_ROWS):
        block = X[a:a + _BLOCK_ROWS].astype(np.float64) - mean
        cov += block.T @ block
    cov /= n
    cov[np.diag_indices(dim)] += filter_bias
    eigs, eigv = np.linalg.eigh(cov)
    if not eigs.min() > 0:  # pylearn2 asserts eigs.min() > 0
        raise ValueError(f"ZCA covariance is not positive definite (smallest eigenvalue "
                         f"{eigs.min():.3g}); use filter_bias > 0")
    P = (eigv / np.sqrt(eigs)) @ eigv.T
    return mean, P


def zca_apply(X, mean, P):
    """ZCA.apply: (X - mean) @ P, in float64 over row blocks; returns float32 (N, D)."""
    X = np.asarray(X)
    out = np.empty(X.shape, dtype=np.float32)
    for a in range(0, X.shape[0], _BLOCK_ROWS):
        out[a:a + _BLOCK_ROWS] = (X[a:a + _BLOCK_ROWS].astype(np.float64) - mean) @ P
    return out


def _gaussian_1d(kernel_size, sigma):
    # pylearn2 centres the kernel at floor(kernel_size / 2.)
    i = np.arange(kernel_size) - kernel_size // 2
    g = np.exp(-i.astype(np.float64) ** 2 / (2. * sigma ** 2))
    return g / g.sum()


def gaussian_filter(kernel_size=7, sigma=2.0):
    """pylearn2.datasets.preprocessing.gaussian_filter (§6.3): the 2-D Gaussian with the given
    sigma centred at (k//2, k//2), normalised to sum 1. float64 (pylearn2 rounded it to floatX)."""
    i = np.arange(kernel_size) - kernel_size // 2
    r2 = i[:, None] ** 2 + i[None, :] ** 2
    K = np.exp(-r2 / (2. * sigma ** 2)) / (2 * np.pi * sigma ** 2)
    return K / K.sum()


def _local_sum(x, g):
    # 'full' convolution with the 2-D kernel cropped by k//2 on each side == zero-padded 'same'
    # filtering. The normalised 2-D Gaussian is exactly outer(g, g) with g the normalised 1-D
    # Gaussian, so two 1-D passes give the same result (to rounding) at 2k instead of k^2 products.
    # scipy correlates and Theano convolves; the Gaussian is symmetric, so the two coincide.
    y = ndimage.correlate1d(x, g, axis=-1, mode="constant", cval=0.)
    return ndimage.correlate1d(y, g, axis=-2, mode="constant", cval=0.)


def lecun_lcn(X, kernel_size=7, threshold=1e-4, channels=(0,)):
    """pylearn2.datasets.preprocessing.lecun_lcn applied by LeCunLCN.transform (§6.3).

    X: (N, C, H, W). For each listed channel of each image x:
    local mean = Gaussian(kernel_size, sigma=2) filter of x, zero-padded ('full' conv cropped);
    d = sqrt(same filter of x**2) -- x squared, not the centred x, as pylearn2 does;
    m = mean of d over the image; divisor = max(max(m, d), threshold); out = (x - local mean) / divisor.
    The other channels are copied unchanged. The default channels=(0,) is the original's quirk
    (LeCunLCN.transform returns inside its channel loop, so only channel 0 was normalised);
    channels=(0, 1, 2) normalises all three. Returns a new float32 array.
    """
    X = np.asarray(X)
    if X.ndim != 4:
        raise ValueError(f"lecun_lcn needs (N, C, H, W) images, got shape {X.shape}")
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd (pylearn2 crops k//2 each side), got {kernel_size}")
    channels = tuple(int(c) for c in channels)
    if any(not 0 <= c < X.shape[1] for c in channels):
        raise ValueError(f"channels {channels} out of range for {X.shape[1]} channels")
    g = _gaussian_1d(kernel_size, 2.0)
    out = X.astype(np.float32)  # a copy
    for a in range(0, X.shape[0], _BLOCK_ROWS):
        for c in channels:
            x = X[a:a + _BLOCK_ROWS, c].astype(np.float64)
            centred = x - _local_sum(x, g)
            d = np.sqrt(_local_sum(x * x, g))
            m = d.mean(axis=(1, 2), keepdims=True)
            divisor = np.maximum(np.maximum(m, d), threshold)
            out[a:a + _BLOCK_ROWS, c] = centred / divisor
    return out


def svhn_gcn_lcn(X, channels=(0,)):
    """The SVHN pipeline of the original svhn_preprocessing.py (§6.3): GCN (scale 1) of each
    3072-value image, stored as float32 (the h5 file held float32 between the two steps), then
    LeCunLCN((32, 32)) on `channels`. X: (N, 3, 32, 32) in [0, 255] (any dtype); returns float32."""
    X = np.asarray(X)
    gcn = global_contrast_normalize(X.reshape(X.shape[0], -1)).reshape(X.shape)
    return lecun_lcn(gcn, channels=channels)


def split_train_valid(train_labels, extra_labels, seed=322, n_valid_train=400, n_valid_extra=200):
    """pylearn2.datasets.svhn.SVHN.make_data's split_train_valid plus its final shuffle (§6.3).

    rng = RandomState(seed). For each label 1..10 in turn, shuffle the indices of that class in
    train and take the first n_valid_train for valid; then the same for extra with n_valid_extra,
    with the same rng. splitted_train = the remaining train rows, then the remaining extra rows;
    valid = the chosen train rows, then the chosen extra rows. Each set is then shuffled by
    rng.permutation from the state the split left: make_data ran once per set with a fresh
    RandomState(seed), so splitted_train and valid each got their permutation from that same state
    (rng.shuffle(range(n)) of a list draws exactly like rng.permutation(n)).

    pylearn2 went through Python 2 sets; here the rows are taken in sorted order. For splitted_train
    that is the same order: the remaining indices are below the set's table size, so CPython 2.7
    iterated them sorted. The valid rows' set order (mixed by hash collisions) is not reproduced, so
    valid holds the same 10 * (n_valid_train + n_valid_extra) images in another order.

    Returns (train_src, train_idx, valid_src, valid_idx): for each output row, its source
    (0 = train, 1 = extra; uint8) and its row in that source (int64).
    """
    rng = np.random.RandomState(seed)
    chosen, rest = [], []
    for labels, n_valid, name in ((train_labels, n_valid_train, "train"),
                                  (extra_labels, n_valid_extra, "extra")):
        labels = np.asarray(labels).ravel()
        picked = []
        for label in range(1, 11):
            index = np.nonzero(labels == label)[0]
            if len(index) < n_valid:
                raise ValueError(f"{name} has {len(index)} images of label {label}; the split takes "
                                 f"{n_valid} of each label for valid")
            rng.shuffle(index)
            picked.append(index[:n_valid])
        picked = np.sort(np.concatenate(picked))
        keep = np.ones(len(labels), dtype=bool)
        keep[picked] = False
        chosen.append(picked)
        rest.append(np.nonzero(keep)[0])

    def with_source(parts):
        src = np.concatenate([np.full(len(p), s, dtype=np.uint8) for s, p in enumerate(parts)])
        return src, np.concatenate(parts).astype(np.int64)

    train_src, train_idx = with_source(rest)
    valid_src, valid_idx = with_source(chosen)
    state = rng.get_state()
    perm = rng.permutation(len(train_idx))
    train_src, train_idx = train_src[perm], train_idx[perm]
    rng.set_state(state)
    perm = rng.permutation(len(valid_idx))
    valid_src, valid_idx = valid_src[perm], valid_idx[perm]
    return train_src, train_idx, valid_src, valid_idx


def shuffle_order(n, seed=322):
    """The row order pylearn2's SVHN.make_data gave a set it did not split (test): a fresh
    RandomState(seed) shuffles range(n) (§6.3). Output row i is source row order[i]."""
    return np.random.RandomState(seed).permutation(n)
