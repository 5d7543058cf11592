"""Run a 1-bit BinaryConnect model (export.py's .npz) from its packed bits (packed.c), or with numpy
alone where no C compiler is found: no torch anywhere.

    python infer.py MODEL.npz [--data_dir=...] [--all] [--center=own|train]

Reads the test set of the model's dataset (the MNIST idx files, the CIFAR-10 files or their
preprocessed cache, the SVHN sets of svhn_preprocessing.py) from --data_dir (default: where the run
read it) and prints the test loss and error in the training report's style. As the report does,
it scores full batches of the run's batch_size and drops the last partial one; --all scores every
image.

From Python:
    import infer
    model = infer.load("model.npz")
    logits = infer.predict(model, X)   # X: preprocessed inputs, (N, C, H, W) or (N, C*H*W) float32
    X = infer.preprocess(model, images)  # MNIST: uint8 (N, 28, 28) -> centred with the stored mean

MNIST test images are centred with the test file's own per-pixel mean by default, as the original
evaluated them (§6.1), so the numbers match the training report; --center=train uses the
training file's mean stored in the model, which is what a single new image gets.
"""
import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

import packed
from errors import UserError, print_error
from report import mean32, report_lines

FORMAT = "binaryconnect-1bit"
FORMAT_VERSION = 2  # 2 added BinaryNet's "sign" and "xnor" layers; version 1 files read as before
READ_VERSIONS = (1, 2)


class ModelError(UserError):
    """An unreadable model or data file; main() prints it on one line and exits 2."""


class Model:
    """A loaded 1-bit model: `meta` (model.json), `layers` (ops with their arrays: the sign bits
    kept packed for packed.c, or, on the numpy path, unpacked to float32 +-1 matrices),
    `input_mean` (MNIST) or None."""

    def __init__(self, meta, layers, input_mean, path):
        self.meta, self.layers, self.input_mean, self.path = meta, layers, input_mean, path

    @property
    def input_shape(self):
        return tuple(self.meta["input_shape"])


def load(path):
    """Read and check an export.py file. The sign bits stay packed (one bit per weight) when
    packed.c's kernel is available; without it they are unpacked once, here, for numpy."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays.pop("model.json")))
    except KeyError:
        raise ModelError(f"{path}: an .npz without model.json, not a model written by "
                         "export.py") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ModelError(f"{path}: not a readable .npz written by export.py "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{path}: not a {FORMAT} model written by export.py")
    if meta.get("version") not in READ_VERSIONS:
        raise ModelError(f"{path}: format version {meta.get('version')}; this infer.py reads "
                         f"versions {', '.join(map(str, READ_VERSIONS))}")
    try:
        lib = packed.kernel()
        if lib is not None and any(op.get("op") == "xnor" for op in meta["layers"]):
            packed.xnor_path(lib)  # a BC_XNOR_PATH this CPU cannot run: said here, once
    except ValueError as e:
        raise ModelError(str(e)) from None
    try:
        layers = [_unpack(op, arrays, lib is not None) for op in meta["layers"]]
        mean = arrays.get(meta.get("preprocessing", {}).get("mean", ""), None)
    except (KeyError, ValueError, TypeError) as e:
        raise ModelError(f"{path}: inconsistent model file ({type(e).__name__}: {e}); "
                         "export it again") from None
    return Model(meta, layers, mean, path)


def float_model(model):
    """The same model on the numpy float32 path: +-1 matrices on numpy's BLAS. The reference
    that the packed path is tested against, and the fallback without a compiler."""
    layers = [dict(op) for op in model.layers]
    for op in layers:
        if "bits" in op:
            op["W"] = packed.unpack(op)
            del op["bits"]
        elif op["op"] == "xnor" and "xbits" in op:
            del op["xbits"]
            op["W"] = _xnor_float(op)
        elif op["op"] == "sign":
            op["packed"] = False
    return Model(model.meta, layers, model.input_mean, model.path)


def _signs(op, arrays):
    """A binary layer's packed sign bits, checked to hold its shape's count; op's H as a float."""
    n = int(np.prod(op["shape"]))
    signs = arrays[op["signs"]]
    if signs.dtype != np.uint8 or signs.ndim != 1 or signs.size * 8 < n:
        raise ValueError(f"{op['signs']} holds fewer than {n} bits")
    op["H"] = float(op["H"])
    return signs


def _unpack(op, arrays, keep_packed):
    op = dict(op)
    if op["op"] in ("dense", "conv"):
        shape = tuple(op["shape"])
        n = int(np.prod(shape))
        signs = _signs(op, arrays)
        if op.get("bias"):
            op["b"] = arrays[op["bias"]].astype(np.float32)
        if keep_packed:
            op["bits"], op["n_groups"], op["row_bytes"] = packed.pack(signs, shape)
            return op
        bits = np.unpackbits(signs, count=n)
        # +-1 as float32, laid out as a matrix (out, in) or (C_out, C_in*k*k): the products then
        # run on numpy's BLAS; H multiplies the result once.
        op["W"] = (bits.astype(np.float32) * 2 - 1).reshape(shape[0], -1)
    elif op["op"] == "affine":
        op["a"] = arrays[op["scale"]].astype(np.float32)
        op["c"] = arrays[op["shift"]].astype(np.float32)
    elif op["op"] == "xnor":  # BinaryNet: +-1 inputs, and a threshold unless it is the last layer
        signs = _signs(op, arrays)
        if op.get("threshold"):
            op["T"] = arrays[op["threshold"]].astype(np.int64)
            op["direction"] = arrays[op["direction"]].astype(np.int8)
        op["signs_bits"] = signs
        if keep_packed:
            op["xbits"] = packed.pack_xnor(op, signs)
            return op
        op["W"] = _xnor_float(op)
    elif op["op"] == "sign":
        op["packed"] = keep_packed
    elif op["op"] not in ("flatten", "maxpool"):
        raise ValueError(f"unknown layer {op['op']!r}")
    return op


def _xnor_float(op):
    """An xnor layer's +-1 matrix (out, in) for the numpy path, in torch's order."""
    W = np.unpackbits(op["signs_bits"], count=int(np.prod(op["shape"]))).astype(np.float32)
    return (2 * W - 1).reshape(op["shape"][0], -1)


def _xnor_numpy(x, op):
    """The numpy path of an xnor layer: s, the +-1 dot product, in float32 (exact: integers below
    2^24), then op's threshold (+-1 out, max-pooled) or, for the last layer, H * s."""
    s = _conv(x, op) if op["kind"] == "conv" else x @ op["W"].T
    if "T" not in op:
        return s * np.float32(op["H"])
    shape = (1, -1) + (1,) * (s.ndim - 2)
    up = (op["direction"] > 0).reshape(shape)
    T = op["T"].reshape(shape)
    y = np.where(np.where(up, s >= T, s <= T), np.float32(1), np.float32(-1))
    if op.get("pool"):  # max of the pre-activations: OR of the +1s where up, AND where down
        N, C, H, W = y.shape
        q = y[:, :, :H // 2 * 2, :W // 2 * 2].reshape(N, C, H // 2, 2, W // 2, 2)
        y = np.where(up, q.max((3, 5)), q.min((3, 5)))
    return y


def _conv(x, op):
    """Zero-padded 2-D correlation (what torch's conv2d computes) by im2col and one matrix
    product: x (N, C, H, W), W (C_out, C*k*k) in torch's (C_in, kh, kw) order."""
    C_out, C_in, kh, kw = op["shape"]
    ph, pw = op["padding"]
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    N, _, Ho, Wo = win.shape[:4]
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(N * Ho * Wo, C_in * kh * kw)
    y = (cols @ op["W"].T).reshape(N, Ho, Wo, C_out).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(y)


def predict(model, X):
    """The logits (N, 10), float32, of preprocessed inputs X: (N, C, H, W), or (N, C*H*W)."""
    x = np.asarray(X, dtype=np.float32)
    if x.ndim == 2:
        x = x.reshape((len(x),) + model.input_shape)
    if x.shape[1:] != model.input_shape:
        raise ValueError(f"inputs of shape {x.shape[1:]}; the model takes {model.input_shape}")
    for op in model.layers:
        kind = op["op"]
        if kind == "flatten":
            x = x.reshape(len(x), -1)  # C order, as torch's flatten
        elif kind == "dense" and "bits" in op:
            x = packed.dense(packed.kernel(), x, op)  # H applied inside
            if "b" in op:
                x = x + op["b"]
        elif kind == "conv" and "bits" in op:
            x = packed.conv(packed.kernel(), x, op)
            if "b" in op:
                x = x + op["b"][:, None, None]
        elif kind == "dense":
            x = (x @ op["W"].T) * np.float32(op["H"])
            if "b" in op:
                x = x + op["b"]
        elif kind == "conv":
            x = _conv(x, op) * np.float32(op["H"])
            if "b" in op:
                x = x + op["b"][:, None, None]
        elif kind == "sign":  # binary_tanh_unit's forward: sign, sign(0) = +1 (BinaryNet)
            x = packed.sign_bits(x) if op["packed"] else np.where(packed.negative(x),
                                                                  np.float32(-1), np.float32(1))
        elif kind == "xnor" and "xbits" in op:
            x = (packed.xnor_conv if op["kind"] == "conv" else packed.xnor_dense)(
                packed.kernel(), x, op)
        elif kind == "xnor":
            x = _xnor_numpy(x, op)
        elif kind == "maxpool":
            N, C, H, W = x.shape
            x = x[:, :, :H // 2 * 2, :W // 2 * 2].reshape(N, C, H // 2, 2, W // 2, 2).max((3, 5))
        elif kind == "affine":
            shape = (1, -1) + (1,) * (x.ndim - 2)
            x = x * op["a"].reshape(shape) + op["c"].reshape(shape)
            if op["nonlinearity"] == "relu":
                x = np.maximum(x, np.float32(0))
    return x


def predict_batches(model, X, batch_size=None):
    """predict() on slices of X, so a large (or memory-mapped) set needs little memory; by default
    slices whose largest im2col matrix stays near 64 MB."""
    batch_size = batch_size or _chunk(model)
    return np.concatenate([predict(model, X[i:i + batch_size])
                           for i in range(0, len(X), batch_size)])


def _chunk(model, budget=64 << 20):
    C, H, W = model.input_shape
    largest = C * H * W
    for op in model.layers:
        if op["op"] == "conv" or op.get("kind") == "conv":
            C_out, C_in, kh, kw = op["shape"]
            H, W = H + 2 * op["padding"][0] - kh + 1, W + 2 * op["padding"][1] - kw + 1
            largest = max(largest, H * W * C_in * kh * kw)
            C = C_out
            if op.get("pool"):
                H, W = H // 2, W // 2
        elif op["op"] == "maxpool":
            H, W = H // 2, W // 2
        elif op["op"] == "dense" or op.get("kind") == "dense":
            largest = max(largest, op["shape"][1])
    return max(1, min(1000, budget // (4 * largest)))


def preprocess(model, images):
    """Raw MNIST images (N, 28, 28) uint8 -> the model's inputs, centred with the stored training
    mean. CIFAR-10 and SVHN inputs are the preprocessed sets themselves."""
    if model.meta.get("preprocessing", {}).get("kind") == "mnist_binarynet":
        from bc_datasets import mnist_pixels  # BinaryNet's mnist.py: 2x - 1, not centred
        return (2 * mnist_pixels(images) - 1.).reshape((len(images),) + model.input_shape)
    if model.input_mean is None:
        raise ValueError(f"{model.path}: this model stores no pixel mean (its inputs are the "
                         f"preprocessed {model.meta.get('dataset')} sets)")
    from bc_datasets import mnist_pixels  # §6.1, as training read the pixels
    X = mnist_pixels(images)
    return X.reshape((len(X),) + model.input_shape) - model.input_mean


def load_test_set(model, data_dir=None, center="own"):
    """(X preprocessed float32, labels int) of the model's dataset's test set."""
    from dataset_files import DatasetError  # numpy and scipy only, like this file
    dataset, data = model.meta.get("dataset"), model.meta.get("data", {})
    binarynet = model.meta.get("preprocessing", {}).get("kind", "").endswith("_binarynet")
    try:
        if dataset == "mnist":
            from bc_datasets import mnist_split, read_idx
            from dataset_files import mnist_files
            d = Path(data_dir or data.get("data_dir", "data/mnist"))
            names = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
            paths = mnist_files(d, names, verify_checksums=False, download=False)
            if binarynet:  # as BinaryNet's mnist.py read them: pixels / 255, then 2x - 1
                X, y = mnist_split(*(paths[n] for n in names), center=False)
                return 2 * X - 1., y.argmax(1)
            X, y = mnist_split(*(paths[n] for n in names))  # centred with its own mean (§6.1)
            if center == "train":
                X = preprocess(model, read_idx(paths[names[0]]))
            return X, y.argmax(1)
        if dataset == "cifar10":
            from bc_datasets import load_cifar10
            d = data_dir or data.get("data_dir", "data/cifar10")
            _, _, (X, y) = load_cifar10(d, train_set_size=data.get("train_set_size", 45000),
                                        verify_checksums=data.get("verify_checksums", True),
                                        download=False,
                                        **(dict(gcn_zca=False) if binarynet else {}))
            return X, y.argmax(1)
        if dataset == "svhn":
            from bc_datasets import load_svhn
            _, _, (X, y) = load_svhn(data_dir or data.get("SVHN_LOCAL_PATH",
                                                          "data/svhn/preprocessed"))
            return X, y.argmax(1)
    except DatasetError as e:
        raise ModelError(f"{e} (infer.py --data_dir= names the folder)") from None
    raise ModelError(f"{model.path}: unknown dataset {dataset!r}")


def score(logits, labels, batch_size=None, loss_reduction="mean"):
    """(error %, squared hinge loss, examples scored) by the training report's rules: full batches
    of batch_size only; error = mean of the per-batch error fractions * 100; loss = mean of the
    per-batch means over B x 10 of max(0, 1 - t*y)^2 with t = +-1 (loss_reduction "sum_classes":
    summed over the outputs, §9); the means of per-batch values summed in float32 as the report
    sums them. batch_size None scores every example as one batch."""
    n = len(logits) if batch_size is None else len(logits) // batch_size * batch_size
    if n == 0:
        return float("nan"), float("nan"), 0
    size = batch_size or n
    y = logits[:n].astype(np.float64)
    t = 2. * np.eye(y.shape[1])[labels[:n]] - 1.
    wrong = (y.argmax(1) != labels[:n]).reshape(-1, size).mean(1)
    hinge = np.square(np.maximum(1. - t * y, 0.)).reshape(-1, size, y.shape[1])
    losses = hinge.sum(2).mean(1) if loss_reduction == "sum_classes" else hinge.mean((1, 2))
    return float(mean32(wrong) * np.float32(100)), float(mean32(losses)), n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.npz")
    p.add_argument("--data_dir", help="the dataset's folder (SVHN: svhn_preprocessing.py's "
                                      "output); default: where the run read it")
    p.add_argument("--SVHN_LOCAL_PATH", help="the same as --data_dir, for SVHN models")
    p.add_argument("--all", action="store_true",
                   help="score every test image, not only the report's full batches")
    p.add_argument("--center", choices=("own", "train"), default="own",
                   help="MNIST: centre the test set with its own mean (the original's, default) "
                        "or with the stored training mean")
    p.add_argument("--batch_size", type=int, help="default: the run's batch_size")
    args = p.parse_args(argv)
    try:
        model = load(args.model)
        data = model.meta.get("data", {})
        batch_size = args.batch_size or data.get("batch_size", 100)
        if batch_size < 1:
            raise ModelError(f"--batch_size={batch_size}: must be positive")
        X, labels = load_test_set(model, args.data_dir or args.SVHN_LOCAL_PATH, args.center)
        logits = predict_batches(model, X)
        reduction = model.meta.get("source", {}).get("hparams", {}).get("loss_reduction", "mean")
        err, loss, n = score(logits, labels, None if args.all else batch_size, reduction)
        if n == 0:
            raise ModelError(f"the test set has {len(labels)} examples, fewer than "
                             f"batch_size={batch_size}; use --all")
        print(f"{model.path}: {model.meta.get('dataset')}, {model.meta.get('variant')}, "
              + ("1-bit weights and activations" if any(op["op"] == "xnor" for op in model.layers)
                 else "1-bit weights") + f"; {n} of {len(labels)} test images"
              + ("" if args.all else f" (full batches of {batch_size}, as the report counts)"))
        print("\n".join(report_lines(dict(test_loss=loss, test_err=err))))
    except UserError as e:
        return print_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
