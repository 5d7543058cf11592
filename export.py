"""Export a trained BinaryConnect network as a real 1-bit model: an .npz that infer.py runs with
numpy alone.

    python export.py RUN_DIR_OR_CHECKPOINT OUT.npz [--checkpoint=best|last] [--data_dir=...]

What the file holds:
  - each binary layer's weights as bits (1 = +H, 0 = -H), packed 8 per byte (np.packbits, C order
    of the torch weight: (out, in) for dense, (C_out, C_in, k, k) for conv), with its H and shape;
  - each batch norm folded into a per-unit scale a and shift, with the preceding layer's bias
    folded in too: BN(Wx + b) = a*(Wx) + (beta + a*(b - mean)) (through a max-pool as well, which
    commutes with adding a per-channel constant);
  - everything else in float32, and the architecture as JSON ("model.json"): the layer sequence
    (flatten, dense/conv with shapes, padding 1 and stride 1, max-pool 2x2 stride 2, affine with
    relu or identity), the preprocessing of the inputs, and where the model came from.

A deterministic-BC network is exported exactly as it evaluates. A stochastic-BC network is exported
as the sign of W (W >= 0 -> +H), not the real-valued W that the paper evaluates it with: the file
says so, and `python evaluate.py RUN_DIR --modes=sign` gives that model's error. A binary=False
network has no binary weights to pack and is refused.

MNIST inputs: /255, then centred per pixel. The file stores the training file's pixel mean (what
new images should be centred with); the original centred the test set with its own mean (§6.1),
which infer.py does by default when it reads the test files. CIFAR-10 and SVHN inputs are the
preprocessed sets (GCN + ZCA, GCN + LCN): infer.py reads them as the training scripts do.
"""
import argparse
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic import atomic_write
from errors import UserError, print_error
from evaluate import load_trained
from infer import FORMAT, FORMAT_VERSION

INPUT_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "svhn": (3, 32, 32)}
STOCHASTIC_NOTE = ("stochastic BC network exported as the sign of its real-valued weights "
                   "(W >= 0 -> +H), the paper's test-time option (1); the paper reports stochastic "
                   "BC with the real-valued weights, so this model's error differs: `python "
                   "evaluate.py RUN_DIR --modes=sign` gives it")


def _nonlinearity(fn, where):
    if fn is None:
        return "identity"
    if fn in (F.relu, torch.relu) or getattr(fn, "__name__", "") == "relu":
        return "relu"
    raise UserError(f"{where}: nonlinearity {fn!r} has no 1-bit export (relu or identity only)")


def thresholds(layer, bn, act):
    """BinaryNet's sign(BN(H*s + b)) as one integer threshold per unit on s, the +-1 dot product
    of a binary layer on binary inputs: (T, direction), the unit +1 iff s >= T (direction +1) or
    s <= T (direction -1). Found by running the float model's own modules (the bias, the batch
    norm, binary_tanh_unit) in eval mode on every integer s in [-n, n]: whatever gamma's sign
    (gamma < 0 flips the comparison, gamma = 0 makes the unit a constant), and the float32 ties
    fall where the float model puts them. Exact when H*s is (H = 1, BinaryNet's)."""
    n = int(np.prod(layer.weight.shape[1:]))
    units = layer.weight.shape[0]
    spatial = (1,) * (layer.weight.dim() - 2)
    b = torch.zeros(units) if layer.bias is None else layer.bias.detach().float().cpu()
    bn, s = copy.deepcopy(bn).cpu().float().eval(), torch.arange(-n, n + 1, dtype=torch.float32)
    with torch.no_grad():
        pos = torch.cat([act(bn((c[:, None] * layer.H + b).reshape(len(c), units, *spatial)))
                         .reshape(len(c), units) > 0 for c in s.split(max(1, (1 << 22) // units))])
    pos = pos.numpy()
    step = np.diff(pos.astype(np.int8), axis=0)
    up, down = (step >= 0).all(0), (step <= 0).all(0)
    if not (up | down).all():
        raise UserError(f"{type(bn).__name__} of {units} units: sign(BN(x)) is not monotone in x "
                        f"for unit {int(np.argmin(up | down))} (a NaN parameter?)")
    T = np.where(up, np.where(pos.any(0), pos.argmax(0) - n, n + 1), n - pos[::-1].argmax(0))
    return T.astype(np.int32), np.where(up, 1, -1).astype(np.int8)


def export_arrays(model, input_shape, meta=None):
    """The npz content of `model` (an nn.Module of binary layers, batch norms, max-pools, dropouts
    and binary_tanh_units in sequence): {name: array}, "model.json" holding the architecture and
    `meta`. A BinaryNet layer whose input is binary becomes an "xnor" layer: its max-pool, batch
    norm and binary_tanh_unit folded into integer thresholds (thresholds()), or, for the last
    layer, its batch norm an affine giving the scores."""
    from binary_connect import BinaryLayerMixin, Conv2DLayer, DenseLayer, binarization
    from binary_net import BinaryTanh
    model = model.eval()
    arrays, layers = {}, []
    pending = None  # the last binary layer whose bias has not yet been folded into a BN
    ndim = 1 + len(input_shape)
    shape = tuple(input_shape)  # of the activations, for an xnor dense layer's input order
    binary_in = False  # the activations are +-1 (after a binary_tanh_unit)
    xnor = None  # [op, layer, its batch norm]: an xnor layer waiting for its activation
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]

    def add_affine(bn, bias, nonlinearity):
        """A batch norm as y = a*x + shift, the preceding layer's bias (or None) folded in:
        BN(Wx + b) = a*(Wx) + (shift + a*b)."""
        a, shift = (t.double().cpu().numpy() for t in bn.scale_shift())
        if bias is not None:
            shift = shift + a * bias
        key = f"layer{len(layers)}"
        arrays[f"{key}.scale"] = a.astype(np.float32)
        arrays[f"{key}.shift"] = shift.astype(np.float32)
        layers.append(dict(op="affine", scale=f"{key}.scale", shift=f"{key}.shift",
                           nonlinearity=nonlinearity))

    def flush_xnor():  # an xnor layer with no binary_tanh_unit after it: the output layer
        nonlocal xnor, pending
        if xnor is not None and xnor[2] is not None:
            bias = xnor[1].bias
            add_affine(xnor[2], None if bias is None else bias.double().cpu().numpy(),
                       "identity")
            pending = None
        elif xnor is not None:
            raise UserError(f"{xnor[0]['kind']} layer {len(layers) - 1}: a binary layer on binary "
                            "inputs needs a batch norm after it to export")
        xnor = None

    with torch.no_grad():
        for name, m in leaves:
            where = f"layer {name} ({type(m).__name__})"
            if xnor is not None and not isinstance(m, (BinaryTanh, nn.Dropout, nn.MaxPool2d)) \
                    and not hasattr(m, "scale_shift"):
                flush_xnor()
            if isinstance(m, BinaryLayerMixin):
                if not m.binary:
                    raise UserError(f"{where} is not binary (binary=False): nothing to pack")
                _attach_bias(pending, arrays)
                key = f"layer{len(layers)}"
                if isinstance(m, DenseLayer):
                    if ndim != 2:  # DenseLayer flattens its input in C order
                        layers.append(dict(op="flatten"))
                        ndim = 2
                        key = f"layer{len(layers)}"
                    op = dict(op="dense", shape=list(m.weight.shape))
                elif isinstance(m, Conv2DLayer):
                    if (m.stride != (1, 1) or m.dilation != (1, 1) or m.groups != 1
                            or m.padding_mode != "zeros" or isinstance(m.padding, str)):
                        raise UserError(f"{where}: only stride 1, zero padding, no dilation or "
                                        "groups can be exported")
                    op = dict(op="conv", shape=list(m.weight.shape), padding=list(m.padding),
                              stride=[1, 1])
                else:
                    raise UserError(f"{where}: unknown binary layer type")
                # The layer's own deterministic rule, so ties (W = 0) go where they go in training.
                bits = binarization(m.weight, 1., binary=True, deterministic=False,
                                    stochastic=False) > 0
                arrays[f"{key}.signs"] = np.packbits(bits.cpu().numpy().ravel())
                op.update(H=float(m.H), signs=f"{key}.signs")
                if binary_in:  # BinaryNet: +-1 inputs, XNOR + popcount
                    op.update(op="xnor", kind=op["op"], in_shape=list(shape))
                    xnor = [op, m, None]
                layers.append(op)
                pending = (op, key, None if m.bias is None else m.bias.float().cpu().numpy())
                if op["op"] == "conv" or op.get("kind") == "conv":
                    k, p = m.weight.shape[2:], m.padding
                    shape = (m.weight.shape[0],) + tuple(
                        shape[1 + i] + 2 * p[i] - k[i] + 1 for i in range(2))
                else:
                    shape = (m.weight.shape[0],)
                binary_in = False
            elif isinstance(m, BinaryTanh):
                if xnor is not None and xnor[2] is not None:
                    op, layer = xnor[0], xnor[1]
                    key = op["signs"].split(".")[0]
                    T, direction = thresholds(layer, xnor[2], m)
                    arrays[f"{key}.threshold"], arrays[f"{key}.direction"] = T, direction
                    op.update(threshold=f"{key}.threshold", direction=f"{key}.direction")
                    xnor, pending = None, None
                elif xnor is None and layers and layers[-1]["op"] == "affine":
                    layers.append(dict(op="sign"))
                else:
                    raise UserError(f"{where}: a binary_tanh_unit exports only after a batch norm")
                binary_in = True
            elif xnor is not None and hasattr(m, "scale_shift"):
                xnor[2] = m  # its batch norm: a threshold or the scores, as what follows says
            elif hasattr(m, "scale_shift"):  # batch_norm.BatchNormLayer, LasagneBatchNormLayer
                add_affine(m, None if pending is None else pending[2],
                           _nonlinearity(getattr(m, "nonlinearity", None), where))
                pending = None
            elif isinstance(m, nn.MaxPool2d):
                k, s = m.kernel_size, m.stride
                if (k not in (2, (2, 2)) or s not in (2, (2, 2)) or m.padding not in (0, (0, 0))
                        or m.dilation not in (1, (1, 1)) or m.ceil_mode):
                    raise UserError(f"{where}: only 2x2 max-pools of stride 2 can be exported")
                shape = (shape[0], shape[1] // 2, shape[2] // 2)
                if xnor is not None and xnor[2] is None:  # before the BN: folded into the bits
                    xnor[0]["pool"] = True
                    continue
                if binary_in or xnor is not None:
                    raise UserError(f"{where}: a max-pool of binary activations, or after a "
                                    "batch norm, has no 1-bit export")
                layers.append(dict(op="maxpool", size=[2, 2], stride=[2, 2]))
            elif isinstance(m, nn.Dropout):
                continue  # the identity at test time
            else:
                raise UserError(f"{where}: no 1-bit export for this kind of layer")
        flush_xnor()
    if any(op.get("pool") and "threshold" not in op for op in layers):
        raise UserError("a max-pool after the output layer has no 1-bit export")
    _attach_bias(pending, arrays)
    if not any(op["op"] in ("dense", "conv") for op in layers):
        raise UserError("the network has no binary layer to export")
    record = dict(format=FORMAT, version=FORMAT_VERSION, input_shape=list(input_shape),
                  layers=layers, **(meta or {}))
    arrays["model.json"] = np.array(json.dumps(record))
    return arrays


def _attach_bias(pending, arrays):
    """A bias with no batch norm after it to fold into stays with its layer, in float32."""
    if pending is not None and pending[2] is not None:
        op, key, bias = pending
        arrays[f"{key}.bias"] = bias.astype(np.float32)
        op["bias"] = f"{key}.bias"


def mnist_pixel_mean(data_dir):
    """The training file's per-pixel mean, as bc_datasets centres the training split (§6.1)."""
    from bc_datasets import mnist_pixels, pixel_mean, read_idx
    from dataset_files import DatasetError, mnist_files
    name = "train-images-idx3-ubyte.gz"
    try:
        path = mnist_files(data_dir, names=(name,), verify_checksums=False, download=False)[name]
        return pixel_mean(mnist_pixels(read_idx(path))).reshape(1, 28, 28)
    except DatasetError as e:
        raise UserError(f"{e} (the export stores the training images' pixel mean; point "
                        "--data_dir= at the MNIST files)") from None


def preprocessing(script, hp, data_dir=None):
    """(json description, {name: array}) of the inputs the network expects."""
    if hp.get("inputs") == "binarynet":  # BinaryNet's scripts (§13.5): no centring, GCN or ZCA
        return (dict(kind=f"{script}_binarynet",
                     note="x = 2 * (uint8 pixels / 255) - 1 in float32 (MNIST), 2/255 * pixels - 1 "
                          "(CIFAR-10, SVHN): in [-1, 1], as BinaryNet's scripts read them; "
                          "(N, C, H, W) float32"), {})
    if script == "mnist":
        mean = mnist_pixel_mean(data_dir or hp["data_dir"])
        return (dict(kind="mnist", scale=1. / 255, mean="input_mean",
                     note="x = uint8 pixels / 255 (float32), minus a per-pixel mean. input_mean "
                          "is the mean of the whole training file, which centred the training and "
                          "validation sets; the original centred the test set with the test "
                          "file's own per-pixel mean (§6.1), as infer.py does by default "
                          "when it reads the test files. Centre new images with input_mean."),
                {"input_mean": mean})
    if script == "cifar10":
        return (dict(kind="cifar10_gcn_zca",
                     note="inputs are the preprocessed CIFAR-10 set: GCN (scale 55) then ZCA fit "
                          "on the 50,000 training images (§6.2), as bc_datasets.load_cifar10 "
                          "computes and caches it; (N, 3, 32, 32) float32"), {})
    return (dict(kind="svhn_gcn_lcn",
                 note="inputs are the preprocessed SVHN sets written by svhn_preprocessing.py "
                      "(GCN then LeCun LCN, §6.3); (N, 3, 32, 32) float32"), {})


def state_dict_bytes(model):
    """The float32 state dict's size: 4 bytes per floating-point value."""
    return sum(4 * t.numel() for t in model.state_dict().values() if t.is_floating_point())


def _check_name(path):
    if Path(path).suffix != ".npz":
        raise UserError(f"{path}: the output name must end in .npz")


def save_npz(path, arrays):
    path = Path(path)
    _check_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            np.savez_compressed(f, **arrays)
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror or e})") from None


def export(path, out, checkpoint=None, data_dir=None, script=None, log=print):
    """Export the run's checkpoint to `out`; returns (npz bytes, float32 state-dict bytes)."""
    from results import variant
    _check_name(out)  # before the checkpoint is read: that can take a while
    model, hp, script, ckpt, ckpt_path = load_trained(path, checkpoint, script)
    if not hp.get("binary", True):
        raise UserError(f"{ckpt_path}: a binary=False network has no binary weights to export; "
                        "export.py packs BinaryConnect networks (binary=True)")
    stochastic = bool(hp.get("stochastic", True))
    pre, extra = preprocessing(script, hp, data_dir)
    data = {k: hp[k] for k in ("data_dir", "SVHN_LOCAL_PATH", "train_set_size",
                               "verify_checksums", "batch_size") if k in hp}
    if data_dir is not None:  # absolute, like the run's own (runfiles.resolve_data_paths)
        data["data_dir" if script != "svhn" else "SVHN_LOCAL_PATH"] = os.path.abspath(data_dir)
    meta = dict(dataset=script, variant=variant(hp), preprocessing=pre, data=data,
                weights=STOCHASTIC_NOTE if stochastic else
                "deterministic BC: the sign of W (W >= 0 -> +H), as the network evaluates"
                + ("; BinaryNet: activations binary_tanh_unit(x), the hidden layers XNOR + "
                   "popcount with integer thresholds" if hp.get("network") == "binarynet" else ""),
                source=dict(checkpoint=str(ckpt_path), epoch=ckpt.get("epoch"),
                            hparams={k: v for k, v in hp.items()
                                     if isinstance(v, (int, float, str, bool))}))
    arrays = export_arrays(model, INPUT_SHAPES[script], meta)
    arrays.update(extra)
    if stochastic:
        log("note: " + STOCHASTIC_NOTE)
    save_npz(out, arrays)
    size, full = os.path.getsize(out), state_dict_bytes(model)
    log(f"{out}: {size:,} bytes; the float32 state dict: {full:,} bytes ({full / size:.1f}x "
        f"smaller)")
    return size, full


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("out", metavar="OUT.npz")
    p.add_argument("--checkpoint", choices=("best", "last"),
                   help="for a RUN_DIR: best.pt or last.pt (default: best.pt, or last.pt while "
                        "no epoch has been evaluated, with a note)")
    p.add_argument("--data_dir", help="MNIST: where the training file is now, for its pixel mean "
                                      "(default: the run's data_dir); stored as infer.py's default")
    p.add_argument("--script", choices=tuple(INPUT_SHAPES),
                   help="the script that trained it, when no hparams.json lies beside "
                        "the checkpoint")
    args = p.parse_args(argv)
    try:
        export(args.path, args.out, args.checkpoint, args.data_dir, args.script)
    except UserError as e:
        return print_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
