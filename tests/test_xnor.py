"""BinaryNet's 1-bit inference (packed.c's bc_xnor, packed.py, export.thresholds, infer.py's sign
and xnor layers): every kernel path gives the same integers; the folded thresholds reproduce the
float model's sign(BN(x)) bit for bit, gamma < 0, gamma = 0, biases and max-pools included; real
MNIST gets the float model's predictions."""
import json
import os

import numpy as np
import pytest
import torch

import export
import infer
import models
import packed
from binary_net import BinaryTanh, binary_tanh_unit
from test_packed import MNIST, with_data_statistics

LIB = packed.kernel()
needs_kernel = pytest.mark.skipif(LIB is None, reason="no C compiler for packed.c")


def paths():
    """Every path, each skipped with its reason where this CPU cannot run it."""
    have = packed.xnor_paths(LIB) if LIB is not None else []
    return [pytest.param(p, marks=pytest.mark.skipif(
        p not in have, reason=f"this CPU has no {p} path (it runs {', '.join(have) or 'none'})"))
        for p in packed.XNOR_PATHS]


def randomize(model, seed):
    """Batch norms with every sign of gamma (a third negative, three units 0), means and shifts
    that put the thresholds inside [-n, n]; biases of the binary layers nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "inv_std"):
                n = m.num_features
                m.gamma.copy_(torch.randn(n, generator=g))
                m.gamma[:n // 3] = -m.gamma[:n // 3].abs()
                m.gamma[n // 3:n // 3 + 3] = 0.
                m.beta.copy_(torch.randn(n, generator=g))
                m.mean.copy_(torch.randn(n, generator=g) * 4)
                m.inv_std.copy_(torch.rand(n, generator=g) + 0.05)
            elif getattr(m, "bias", None) is not None and hasattr(m, "H"):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


def torch_activations(model, X):
    """The float model's binary_tanh_unit outputs, layer by layer, and its scores."""
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o.numpy().copy()))
             for m in model.modules() if isinstance(m, BinaryTanh)]
    with torch.no_grad():
        scores = model(torch.from_numpy(X)).numpy()
    for h in hooks:
        h.remove()
    return acts, scores


def our_activations(m, X):
    """infer.predict up to each binary activation, as +-1 in torch's layout (bits unpacked)."""
    acts = []
    for k, op in enumerate(m.layers):
        if op["op"] == "sign" or "threshold" in op:
            y = infer.predict(infer.Model(m.meta, m.layers[:k + 1], None, m.path), X)
            if y.dtype == np.uint64:  # (N, words) or (N, H, W, words): -1 where a bit is set
                C = op["shape"][0] if op["op"] == "xnor" else m.layers[k - 2]["shape"][0]
                neg = np.unpackbits(y.view(np.uint8), axis=-1, bitorder="little")[..., :C]
                y = 1 - 2 * (neg.transpose(0, 3, 1, 2) if y.ndim == 4 else neg).astype(np.float32)
            acts.append(y)
    return acts


@needs_kernel
@pytest.mark.parametrize("path", paths())
def test_counts_and_thresholds_every_path(path, monkeypatch):
    """popcount(x XOR w) against numpy's +-1 products for rows 1-9 (both tiles and their
    remainders), outputs not a multiple of 4 or 8, inputs not whole words or 8-word steps; and
    the output bits of random thresholds in both directions, out-of-range (constant) ones
    included. Mutants caught: a tile's remainder skipped, a wrong tail mask, bits of a row
    written in the wrong order."""
    monkeypatch.setenv("BC_XNOR_PATH", path)
    rng = np.random.default_rng(5)
    for n_in, n_out in [(13, 5), (64, 70), (600, 131)]:
        W = rng.integers(0, 2, (n_out, n_in)).astype(np.uint8)  # export.py's bits: 1 = +H
        op = dict(kind="dense", shape=[n_out, n_in], in_shape=[n_in], H=1.)
        op["xbits"] = packed.pack_xnor(op, np.packbits(W.ravel()))
        for rows in range(1, 10):
            x = np.where(rng.random((rows, n_in)) < .5, np.float32(-1), np.float32(1))
            s = x @ (2. * W - 1).T
            np.testing.assert_array_equal(packed.xnor_dense(LIB, packed.sign_bits(x), op), s)
            T = rng.integers(-n_in - 2, n_in + 3, n_out)
            direction = rng.choice([-1, 1], n_out).astype(np.int8)
            pos = np.where(direction > 0, s >= T, s <= T)
            got = packed.xnor_dense(LIB, packed.sign_bits(x), dict(op, T=T, direction=direction))
            np.testing.assert_array_equal(got, packed.pack_bits(~pos))


def test_forcing_a_path_this_cpu_lacks_is_refused(monkeypatch, tmp_path):
    """The kernel refuses it, and infer.load says so as a ModelError (one line from infer.py)."""
    if LIB is None:
        pytest.skip("no C compiler for packed.c")
    np.random.seed(0)
    path = tmp_path / "tiny.npz"
    exported(models.binarynet_mlp(num_units=8, n_hidden_layers=2), (1, 28, 28), path)
    monkeypatch.setenv("BC_XNOR_PATH", "avx1024")
    with pytest.raises(ValueError, match="BC_XNOR_PATH=avx1024: this CPU runs portable"):
        packed.xnor_path(LIB)
    with pytest.raises(infer.ModelError, match="BC_XNOR_PATH=avx1024"):
        infer.load(path)


def test_sign_is_binary_tanh_unit_at_the_edges():
    """sign(0) = +1, -0 too, and the float32 rounding just below 0 that binary_tanh_unit has."""
    x = np.array([-1., -1e-3, -2 ** -24, -2 ** -25, -2 ** -26, -0., 0., 2 ** -30, 1.], np.float32)
    want = binary_tanh_unit(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(np.where(packed.negative(x), -1., 1.), want)
    assert want[-4:].tolist() == [1., 1., 1., 1.]


class _Layer(torch.nn.Module):
    def __init__(self, n, bias):
        super().__init__()
        self.weight, self.bias, self.H = torch.zeros(len(bias), n), torch.tensor(bias), 1.


def test_thresholds_fold_gamma_sign_zero_and_ties():
    """One unit per case, n = 10 inputs, s in -10..10: T and the direction against what each
    case must give. Mutants caught: gamma < 0 compared the same way (direction), a tie at
    BN(x) = 0 sent to -1 (sign(0) = +1), the bias or inv_std left out."""
    from batch_norm import LasagneBatchNormLayer
    bn = LasagneBatchNormLayer(6)
    with torch.no_grad():
        bn.gamma.copy_(torch.tensor([1., -1., 0., 0., 2., 1.]))
        bn.beta.copy_(torch.tensor([0., 0., 0.5, -0.5, 0., 0.]))
        bn.mean.copy_(torch.tensor([3., 3., 0., 0., 2.5, 100.]))
        bn.inv_std.copy_(torch.tensor([1., 1., 1., 1., 4., 1.]))
    T, direction = export.thresholds(_Layer(10, [0., 0., 0., 0., 0.25, 0.]), bn,
                                     binary_tanh_unit)
    # unit 0: s - 3 >= 0 from s = 3 (the tie at 3 is +1); unit 1: -(s - 3) >= 0 up to s = 3;
    # 2: always +1 (T below the range); 3: never (T above it); 4: 8 * (s + 0.25 - 2.5) >= 0 from
    # s = 3 (bias and inv_std counted); 5: never within [-10, 10]
    assert T.tolist() == [3, 3, -10, 11, 3, 11]
    assert direction.tolist() == [1, -1, 1, 1, 1, 1]


def exported(model, input_shape, path):
    arrays = export.export_arrays(model, input_shape, dict(dataset="test"))
    if input_shape == (1, 28, 28):
        arrays["input_mean"] = np.zeros(input_shape, np.float32)
    export.save_npz(path, arrays)
    return infer.load(path)


@needs_kernel
@pytest.mark.parametrize("path", paths())
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_hidden_bits_equal_the_float_model(tmp_path, net, path, monkeypatch):
    """Random data, random batch norms (gamma of every sign, biases): every hidden activation of
    the packed path, and of the numpy path, equals the torch model's bit for bit; the scores to
    float32 rounding. The CNN: its first conv on 27 real columns, the zero padding's border
    classes, max-pools before negative-gamma batch norms (AND, not OR), 70 channels (words
    partly used), the flatten in (H, W, C) order. Mutants caught: the pool as OR for every unit,
    the padding counted as +1, thresholds off by one."""
    monkeypatch.setenv("BC_XNOR_PATH", path)
    np.random.seed(1)
    torch.manual_seed(1)
    if net == "mlp":
        model, shape = models.binarynet_mlp(num_units=100, n_hidden_layers=3), (1, 28, 28)
        X = np.random.randn(37, 784).astype(np.float32)
    else:
        model, shape = models.binarynet_cnn(widths=(8, 70, 16), fc_units=40), (3, 32, 32)
        X = np.random.randn(3, 3, 32, 32).astype(np.float32)
    randomize(model, 2)
    m = exported(model, shape, tmp_path / f"{net}.npz")
    assert any("pool" in op for op in m.layers) == (net == "cnn")
    theirs, scores = torch_activations(model, X)
    for ours in (our_activations(m, X), our_activations(infer.float_model(m), X)):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)
            assert 0.05 < (a > 0).mean() < 0.95  # not a constant layer
    got = infer.predict(m, X)
    np.testing.assert_allclose(got, scores, rtol=1e-5, atol=1e-5 * np.abs(scores).max())
    assert (got.argmax(1) == scores.argmax(1)).all()


def test_format_1_files_still_load(tmp_path):
    """A BinaryConnect file written before BinaryNet's layers (version 1) reads as before."""
    from test_packed_helpers import small_npz
    path = small_npz(tmp_path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["model.json"]))
    assert meta["version"] == infer.FORMAT_VERSION == 2
    arrays["model.json"] = np.array(json.dumps(dict(meta, version=1)))
    export.save_npz(tmp_path / "v1.npz", arrays)
    X = np.random.default_rng(0).standard_normal((4, 784)).astype(np.float32)
    np.testing.assert_array_equal(infer.predict(infer.load(tmp_path / "v1.npz"), X),
                                  infer.predict(infer.load(path), X))


@pytest.mark.slow
@needs_kernel
@pytest.mark.skipif(not MNIST.is_dir(), reason=f"{MNIST} is absent")
def test_real_mnist_same_predictions_as_the_float_model(tmp_path):
    """BinaryNet's MLP, 784-3x512-10 (untrained binary weights; batch-norm statistics of 2,000
    real training images, gammas of random sign), on the 8,000 real test images: the packed
    path predicts what the torch model predicts, every image, and its hidden bits are the torch
    model's but for float ties of the first (real-input) layer."""
    from bc_datasets import mnist_split
    X_train, _ = mnist_split(MNIST / "train-images-idx3-ubyte.gz",
                             MNIST / "train-labels-idx1-ubyte.gz")
    X, _ = mnist_split(MNIST / "t10k-8000-images-idx3-ubyte.gz",
                       MNIST / "t10k-8000-labels-idx1-ubyte.gz")
    X, X_train = X.reshape(len(X), -1), X_train[:2000].reshape(2000, -1)
    np.random.seed(4)
    torch.manual_seed(4)
    model = models.binarynet_mlp(num_units=512)
    model = with_data_statistics(model, X_train)
    with torch.no_grad():
        for bn in model.modules():
            if hasattr(bn, "inv_std"):
                bn.gamma.mul_(torch.randint(0, 2, bn.gamma.shape) * 2 - 1)
    m = exported(model, (1, 28, 28), tmp_path / "mnist.npz")
    theirs, scores = torch_activations(model, X)
    ours = our_activations(m, X)
    got = infer.predict(m, X)
    assert (got.argmax(1) == scores.argmax(1)).all()
    assert len(np.unique(got.argmax(1))) >= 5
    flipped = [(a != b).mean() for a, b in zip(ours, theirs)]
    print(f"8000 images: hidden bits differing from torch per layer {flipped}; "
          f"max |scores - torch| {np.abs(got - scores).max():.2e}")
    assert max(flipped) < 1e-5


def test_export_and_infer_a_binarynet_run(tmp_path, capsys):
    """`python export.py RUN OUT.npz` and `python infer.py OUT.npz` on a BinaryNet run of
    mnist.py config/mnist_binarynet.py (a tiny one, on fake MNIST files): the file holds xnor
    layers, infer.py prints the training report's test error, and its scores are the torch
    model's."""
    import evaluate
    import mnist
    from fake_data import write_fake_mnist
    from test_binary_models import ROOT, report_value, run, torch_logits
    write_fake_mnist(tmp_path / "data", n_train=300, n_test=100)
    out, npz = tmp_path / "run", tmp_path / "bnn.npz"
    run(ROOT / "mnist.py", "config/mnist_binarynet.py", f"--data_dir={tmp_path / 'data'}",
        "--verify_checksums=False", "--train_set_size=200", "--num_units=70", "--num_epochs=1",
        "--batch_size=50", "--device=cpu", "--compile=false", f"--out_dir={out}")
    assert export.main([str(out), str(npz)]) == 0  # the command lines, in this process
    assert "smaller" in capsys.readouterr().out
    m = infer.load(npz)
    assert [op["op"] for op in m.layers].count("xnor") == 3
    assert m.meta["preprocessing"]["kind"] == "mnist_binarynet" and m.input_mean is None
    model, hp, *_ = evaluate.load_trained(out)
    _, _, (X_test, _) = mnist.load_data(hp)
    theirs = torch_logits(model, X_test)
    ours = infer.predict(m, X_test)
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
    assert infer.main([str(npz)]) == 0
    stdout = capsys.readouterr().out
    assert "1-bit weights and activations" in stdout
    history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(report_value(stdout, "test error rate:") - history[-1]["test_err"]) < 1e-4
