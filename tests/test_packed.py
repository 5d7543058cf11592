"""packed.c / packed.py: infer.py's products from the packed sign bits agree with the numpy float32
path (infer.float_model) and with torch, on real MNIST and on exported CNNs; the layout, the
threads, the portable C and the fallback without a compiler."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"

import export
import infer
import packed

needs_kernel = pytest.mark.skipif(packed.kernel() is None, reason="no C compiler for packed.c")


def run(code, **env):
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc


def with_data_statistics(model, X):
    """Batch-norm statistics of X itself (alpha = 1), as a trained network has: an untrained
    one's are 0 and 1, and its activations grow to 1e6."""
    bns = [m for m in model.modules() if hasattr(m, "scale_shift")]
    for bn in bns:
        bn.alpha = 1.
    with torch.no_grad():
        model.train()(torch.from_numpy(X))
    return model.eval()


def exported(model, input_shape, path, **meta):
    arrays = export.export_arrays(model, input_shape, meta)
    if input_shape == (1, 28, 28):
        arrays["input_mean"] = np.zeros(input_shape, np.float32)
    export.save_npz(path, arrays)
    return infer.load(path)


def agree(m, X, model=None):
    """packed == float path: every argmax, logits to float32 rounding; and both == torch."""
    assert all("bits" in op and "W" not in op for op in m.layers if op["op"] in ("dense", "conv"))
    ours = infer.predict(m, X)
    ref = infer.predict(infer.float_model(m), X)
    assert (ours.argmax(1) == ref.argmax(1)).all()
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * scale)
    if model is not None:
        with torch.no_grad():
            theirs = model(torch.from_numpy(X.reshape((len(X),) + m.input_shape))).numpy()
        assert (ours.argmax(1) == theirs.argmax(1)).all()
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale)
    return ours, ref


@needs_kernel
@pytest.mark.parametrize("n_in,n_out", [(13, 5), (16, 9), (784, 2048), (27, 128)])
def test_dense_products_from_bits(n_in, n_out):
    """Every tile shape and its remainders: rows 1-9, outputs not a multiple of 2 or 8, inputs
    ending mid-byte; against the bits unpacked by numpy, not by packed.py."""
    rng = np.random.default_rng(n_in)
    signs01 = rng.integers(0, 2, (n_out, n_in)).astype(np.uint8)
    bits, n_groups, row_bytes = packed.pack(np.packbits(signs01.ravel()), (n_out, n_in))
    assert bits.dtype == np.uint8 and bits.nbytes == n_out * row_bytes + 4
    assert row_bytes < n_in / 8 + 5  # one bit per weight, a few bytes of padding per row
    op = dict(shape=[n_out, n_in], bits=bits, n_groups=n_groups, row_bytes=row_bytes, H=0.25)
    W = (2. * signs01 - 1.) * 0.25
    np.testing.assert_array_equal(packed.unpack(op) * 0.25, W)
    for rows in range(1, 10):
        x = rng.standard_normal((rows, n_in)).astype(np.float32)
        y = packed.dense(packed.kernel(), x, op)
        np.testing.assert_allclose(y, x.astype(np.float64) @ W.T, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_threads_give_the_same_bits_of_result():
    """Each output's sum runs on one thread in one order: 1 and 3 threads agree exactly."""
    rng = np.random.default_rng(0)
    bits, ng, rb = packed.pack(np.packbits(rng.integers(0, 2, 300 * 1000).astype(np.uint8)),
                               (300, 1000))
    x = rng.standard_normal((37, 1000)).astype(np.float32)
    x = np.pad(x, ((0, 0), (0, 8 * ng - 1000)))
    out = []
    for threads in (1, 3):
        y = np.empty((37, 300), np.float32)
        packed.kernel().bc_dense(x.ctypes.data, 37, x.shape[1], bits.ctypes.data, 300, rb, ng, 1.,
                                 y.ctypes.data, 300, threads)
        out.append(y)
    np.testing.assert_array_equal(out[0], out[1])


@needs_kernel
@pytest.mark.skipif(not MNIST.is_dir(), reason=f"{MNIST} is absent")
def test_real_mnist_packed_equals_float_path(tmp_path):
    """The paper's 3x2048 MLP (deterministic BC, untrained weights, batch-norm statistics of the
    real training images) on the 8,000 real test images of ../shared/data/mnist."""
    import mnist
    from bc_datasets import mnist_split
    from configurator import hyperparameters
    X_train, _ = mnist_split(MNIST / "train-images-idx3-ubyte.gz",
                             MNIST / "train-labels-idx1-ubyte.gz")
    X, _ = mnist_split(MNIST / "t10k-8000-images-idx3-ubyte.gz",
                       MNIST / "t10k-8000-labels-idx1-ubyte.gz")
    assert len(X) == 8000
    np.random.seed(3)
    model = mnist.build_model(dict(hyperparameters(vars(mnist)), stochastic=False))
    model = with_data_statistics(model, X_train[:2000].reshape(2000, -1))
    m = exported(model, (1, 28, 28), tmp_path / "mnist.npz", dataset="mnist")
    ours, ref = agree(m, X.reshape(len(X), -1), model)
    # not a degenerate network: its predictions vary and it has no near-ties to hide behind
    assert len(np.unique(ours.argmax(1))) >= 5
    top2 = np.sort(ref, 1)[:, -2:]
    print(f"8000 images: max |packed - float| = {np.abs(ours - ref).max():.2e} "
          f"(logits up to {np.abs(ref).max():.1f}); smallest top-2 margin "
          f"{(top2[:, 1] - top2[:, 0]).min():.2e}")


@needs_kernel
@pytest.mark.parametrize("widths", [(4, 8, 16), (8, 8, 16)])
def test_exported_cnn_packed_equals_float_path(tmp_path, widths):
    """conv (27 columns: not whole bytes; and 72) -> BN, conv -> max-pool -> BN, ..., dense."""
    from models import cnn
    np.random.seed(7)
    torch.manual_seed(7)
    model = cnn(widths=widths, fc_units=32, stochastic=False)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None and hasattr(m, "H"):
                m.bias.uniform_(-0.5, 0.5)
    X = torch.randn(24, 3, 32, 32).numpy()
    model = with_data_statistics(model, X)
    m = exported(model, (3, 32, 32), tmp_path / "cnn.npz", dataset="cifar10")
    ours, _ = agree(m, X + 0.1, model)
    assert len(np.unique(ours.argmax(1))) >= 2


def test_without_a_compiler_the_numpy_path_runs_and_says_so(tmp_path):
    """CC names no compiler and the cache is empty: one KernelWarning, float matrices, the same
    predictions."""
    code = ("import warnings, numpy as np, infer, packed\n"
            "from test_packed_helpers import small_npz\n"
            f"path = small_npz({str(tmp_path)!r})\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    m = infer.load(path)\n"
            "    infer.load(path)\n"
            "assert [x.category for x in w] == [packed.KernelWarning], w\n"
            "assert 'no C compiler' in str(w[0].message) and 'numpy' in str(w[0].message)\n"
            "assert all('W' in op for op in m.layers if op['op'] == 'dense')\n"
            "np.save(path + '.logits.npy', infer.predict(m, np.ones((3, 784), np.float32)))\n")
    env = dict(CC=str(tmp_path / "no-such-cc"), BC_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    run(code, **env)
    assert not any((tmp_path / "cache").glob("*.so"))
    from test_packed_helpers import small_npz
    path = small_npz(tmp_path)
    if packed.kernel() is not None:
        np.testing.assert_allclose(infer.predict(infer.load(path), np.ones((3, 784), np.float32)),
                                   np.load(path + ".logits.npy"), rtol=1e-5, atol=1e-4)
    # BC_INFER_KERNEL=numpy asks for the numpy path outright, without a warning
    proc = run("import infer, warnings\nwarnings.simplefilter('error')\n"
               f"m = infer.load({path!r})\nassert all('W' in op for op in m.layers "
               "if op['op'] == 'dense')\n", BC_INFER_KERNEL="numpy",
               PYTHONPATH=str(ROOT))
    assert proc.stderr == ""


@needs_kernel
def test_portable_c_without_avx2(tmp_path):
    """packed.c's plain-C loops (a CPU or compiler without AVX2) give the same products."""
    code = ("import numpy as np, packed\n"
            "packed.FLAGS.append('-mno-avx2')\n"
            "lib = packed.kernel()\n"
            "assert lib.bc_avx2() == 0\n"
            "rng = np.random.default_rng(1)\n"
            "s = rng.integers(0, 2, (11, 21)).astype(np.uint8)\n"
            "bits, ng, rb = packed.pack(np.packbits(s.ravel()), (11, 21))\n"
            "op = dict(shape=[11, 21], bits=bits, n_groups=ng, row_bytes=rb, H=2.)\n"
            "x = rng.standard_normal((6, 21)).astype(np.float32)\n"
            "np.testing.assert_allclose(packed.dense(lib, x, op), 2 * x @ (2. * s - 1).T,\n"
            "                           rtol=1e-5, atol=1e-5)\n")
    run(code, BC_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    assert len(list((tmp_path / "cache").glob("packed-*.so"))) == 1


@needs_kernel
def test_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
    monkeypatch.setenv("BC_CACHE_DIR", str(tmp_path))
    first = packed.build()
    assert packed.build() == first and first.parent == tmp_path
    changed = tmp_path / "packed.c"
    changed.write_text(packed.SOURCE.read_text() + "\n/* another version */\n")
    monkeypatch.setattr(packed, "SOURCE", changed)
    assert packed.build() != first and len(list(tmp_path.glob("packed-*.so"))) == 2


@needs_kernel
def test_benchmark_prints_one_parseable_line_per_case(capsys):
    import benchmark_inference
    assert benchmark_inference.main(["--nets=mnist1024", "--batches=1,3", "--repeats=1",
                                     "--budget=0.001", "--threads=1"]) == 0
    out = capsys.readouterr().out
    lines = [dict(f.split("=", 1) for f in l.split()[1:]) for l in out.splitlines()
             if l.startswith("INFER ")]
    assert [(l["net"], l["batch"]) for l in lines] == [("mnist1024", "1"), ("mnist1024", "3")]
    for l in lines:
        assert l["argmax_agrees"] == "True"
        for key in ("packed_ms", "numpy_ms", "torch_f32_ms", "torch_bf16_ms", "floor_ms"):
            assert float(l[key]) > 0
        assert int(l["weight_bytes"]) < (784 * 1024 + 2 * 1024 ** 2 + 10240) / 8 + 40000
