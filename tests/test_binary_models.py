"""evaluate.py (the paper's test-time modes), export.py (1-bit .npz) and infer.py (numpy inference):
trained tiny networks made by the scripts themselves, on tiny data in the official layouts."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fake_data import write_fake_mnist

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"

import evaluate
import export
import infer
import models
import fast_step
import checkpoints
import training
from binary_connect import binary_layers
from configurator import hyperparameters


def run(*args, check=True, cwd=ROOT):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def train_mnist(data, out, stochastic, *extra):
    run(ROOT / "mnist.py", f"--data_dir={data}", "--verify_checksums=False",
        "--train_set_size=200", "--num_units=16", "--num_epochs=2", "--batch_size=50",
        f"--stochastic={stochastic}", "--device=cpu", "--compile=false", f"--out_dir={out}",
        *extra)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A deterministic-BC and a stochastic-BC run of mnist.py on 300 + 100 fake images."""
    base = tmp_path_factory.mktemp("runs")
    write_fake_mnist(base / "data", n_train=300, n_test=100)
    return dict(data=base / "data", det=train_mnist(base / "data", base / "det", False),
                stoch=train_mnist(base / "data", base / "stoch", True))


def one_line_error(proc, *words):
    """A user error: exit 2, one line on stderr naming what is wrong, no traceback."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert str(word) in lines[0], (word, lines[0])


def report_value(stdout, label, which=0):
    """The value of the `which`-th `  <label>` line of a report-style printout."""
    lines = [l for l in stdout.splitlines() if l[:33] == ("  " + label).ljust(33)]
    return float(lines[which][33:].rstrip("%"))


def torch_logits(model, X):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(np.ascontiguousarray(X, np.float32))).numpy()


def check_identity(model, npz, X):
    """The 1-bit numpy model predicts what the torch model does in eval mode."""
    ours = infer.predict(infer.load(npz), X)
    theirs = torch_logits(model, X)
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    return ours


# ---------------------------------------------------------------------------------------------
# export -> infer

def test_export_then_infer_equals_torch_mlp(runs, tmp_path):
    npz = tmp_path / "det.npz"
    proc = run(ROOT / "export.py", runs["det"], npz)
    assert "smaller" in proc.stdout and "note:" not in proc.stdout
    model, hp, *_ = evaluate.load_trained(runs["det"])
    import mnist
    _, _, (X_test, y_test) = mnist.load_data(hp)
    check_identity(model, npz, X_test)

    # the CLI reads the test files itself and prints the training report's test error
    proc = run(ROOT / "infer.py", npz)
    history = [json.loads(l) for l in (runs["det"] / "metrics.jsonl").read_text().splitlines()]
    assert math.isclose(report_value(proc.stdout, "test error rate:"), history[-1]["test_err"],
                        abs_tol=1e-4)
    # --center=train uses the stored training mean; the model file holds it
    mean = infer.load(npz).input_mean
    train_images = np.asarray(write_fake_mnist(tmp_path / "again", 300, 100)["train_images"])
    np.testing.assert_allclose(mean[0], (train_images / np.float32(255)).mean(0), atol=1e-6)


def test_export_then_infer_equals_torch_cnn(tmp_path):
    """conv -> BN, conv -> max-pool -> BN, flatten, dense: a small CNN of models.cnn trained a
    few steps, with non-zero biases to fold through the max-pool."""
    from binary_connect import make_optimizer, squared_hinge_loss
    from models import cnn
    np.random.seed(5)
    torch.manual_seed(5)
    model = cnn(widths=(4, 8, 16), fc_units=32, stochastic=False)
    optimizer = make_optimizer(model, 0.01)
    X = torch.randn(40, 3, 32, 32)
    t = 2 * torch.eye(10)[torch.arange(40) % 10] - 1
    for _ in range(3):
        model.train()
        loss = squared_hinge_loss(model(X), t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for layer in binary_layers(model):
            layer.bias.uniform_(-0.5, 0.5)
        # Running statistics of the data itself (alpha = 1: one batch's), as a trained network
        # has: three steps leave them near their initial 0 and 1, and the eval-mode activations
        # then grow to 1e5, where float32 rounding alone moves the logits by 1e-2.
        bns = [m for m in model.modules() if hasattr(m, "scale_shift")]
        for bn in bns:
            bn.alpha = 1.
        model.train()(X)
    npz = tmp_path / "cnn.npz"
    export.save_npz(npz, export.export_arrays(model, (3, 32, 32), dict(dataset="cifar10")))
    ops = [op["op"] for op in infer.load(npz).meta["layers"]]
    assert ops == ["conv", "affine", "conv", "maxpool", "affine"] * 3 + [
        "flatten", "dense", "affine", "dense", "affine", "dense", "affine"]
    check_identity(model, npz, X.numpy() + 0.1)


def test_packed_bits_are_the_signs(runs, tmp_path):
    npz = tmp_path / "det.npz"
    run(ROOT / "export.py", runs["det"], npz)
    model, *_ = evaluate.load_trained(runs["det"])
    layers = binary_layers(model)
    with np.load(npz) as f:
        meta = json.loads(str(f["model.json"]))
        binary = [op for op in meta["layers"] if op["op"] in ("dense", "conv")]
        assert len(binary) == len(layers)
        for op, layer in zip(binary, layers):
            n = layer.weight.numel()
            packed = f[op["signs"]]
            assert packed.dtype == np.uint8 and packed.size == math.ceil(n / 8)
            assert op["shape"] == list(layer.weight.shape) and op["H"] == layer.H
            bits = np.unpackbits(packed, count=n).reshape(op["shape"])
            np.testing.assert_array_equal(bits, (layer.weight >= 0).numpy())
        # beside the bits: float32 scale and shift per unit, and the 784 pixel means
        floats = sum(f[k].size for k in f.files if f[k].dtype == np.float32)
        units = sum(op["shape"][0] for op in binary)
        assert floats == 2 * units + 784
    n_bits = sum(l.weight.numel() for l in layers)
    assert os.path.getsize(npz) < n_bits / 8 + 4 * (2 * units + 784) + 4000


def test_full_size_exports_are_at_least_25x_smaller(tmp_path):
    """The paper's MNIST and CIFAR-10 networks, freshly built (no training needed)."""
    import cifar10
    import mnist
    for mod, name in ((mnist, "mnist"), (cifar10, "cifar10")):
        np.random.seed(1234)
        model = mod.build_model(hyperparameters(vars(mod)))
        arrays = export.export_arrays(model, export.INPUT_SHAPES[name], dict(dataset=name))
        arrays["input_mean"] = np.zeros((1, 28, 28), np.float32)
        export.save_npz(tmp_path / f"{name}.npz", arrays)
        size = os.path.getsize(tmp_path / f"{name}.npz")
        assert export.state_dict_bytes(model) >= 25 * size, (name, size)
        n_bits = sum(l.weight.numel() for l in binary_layers(model))
        assert size < 1.01 * n_bits / 8, (name, size, n_bits)


def test_stochastic_export_is_the_sign_and_says_so(runs, tmp_path):
    npz = tmp_path / "stoch.npz"
    proc = run(ROOT / "export.py", runs["stoch"], npz)
    assert "note: stochastic BC" in proc.stdout and "sign" in proc.stdout
    meta = infer.load(npz).meta
    assert "stochastic BC" in meta["weights"]
    assert "sign of its real-valued weights" in meta["weights"]
    # the exported model is evaluate.py's sign mode
    ev = run(ROOT / "evaluate.py", runs["stoch"], "--modes=sign")
    inf = run(ROOT / "infer.py", npz)
    assert math.isclose(report_value(ev.stdout, "test error rate:"),
                        report_value(inf.stdout, "test error rate:"), abs_tol=1e-4)


def test_binary_false_is_refused(tmp_path):
    import mnist
    hp = dict(hyperparameters(vars(mnist)), num_units=8, binary=False)
    run_dir = fake_run(tmp_path / "run", "mnist", hp)
    proc = run(ROOT / "export.py", run_dir, tmp_path / "x.npz", check=False)
    one_line_error(proc, run_dir / "best.pt", "binary=False")
    assert not (tmp_path / "x.npz").exists()


def fake_run(run_dir, script, hp):
    """A run directory holding an untrained network's best.pt, as the scripts write it."""
    import importlib
    mod = importlib.import_module(script)
    run_dir.mkdir(parents=True)
    np.random.seed(0)
    model = mod.build_model(hp)
    torch.save(dict(version=checkpoints.CHECKPOINT_VERSION, model=model.state_dict(), epoch=1,
                    hparams=hp), run_dir / "best.pt")
    (run_dir / "hparams.json").write_text(json.dumps(dict(script=script, hparams=hp)))
    return run_dir


def test_infer_imports_no_torch(runs, tmp_path):
    npz = tmp_path / "det.npz"
    run(ROOT / "export.py", runs["det"], npz)
    code = ("import sys, numpy as np, infer\n"
            f"m = infer.load({str(npz)!r})\n"
            "assert infer.predict(m, np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)\n"
            f"assert infer.main([{str(npz)!r}]) == 0\n"
            "assert 'torch' not in sys.modules, 'infer imported torch'\n")
    proc = run("-c", code)
    assert "test error rate:" in proc.stdout


@pytest.mark.slow
def test_real_mnist_export_infer_identity(tmp_path):
    """A deterministic-BC MLP trained one epoch on the real MNIST; the 1-bit numpy model and the
    torch model agree on every one of the 8,000 test images of ../shared/data/mnist."""
    if not MNIST.is_dir():
        pytest.skip(f"{MNIST} is absent")
    data = tmp_path / "mnist"
    data.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        os.symlink(MNIST / name, data / name)
    for kind in ("images-idx3", "labels-idx1"):
        os.symlink(MNIST / f"t10k-8000-{kind}-ubyte.gz", data / f"t10k-{kind}-ubyte.gz")
    out = tmp_path / "run"
    run(ROOT / "mnist.py", f"--data_dir={data}", "--verify_checksums=False", "--num_units=128",
        "--num_epochs=1", "--stochastic=False", "--device=cpu", "--compile=false",
        f"--out_dir={out}")
    npz = tmp_path / "det.npz"
    run(ROOT / "export.py", out, npz)
    model, hp, *_ = evaluate.load_trained(out)
    import mnist
    _, _, (X_test, _) = mnist.load_data(hp)
    assert len(X_test) == 8000
    check_identity(model, npz, X_test)
    # infer.py finds the shared folder's t10k-8000-* files itself
    proc = run(ROOT / "infer.py", npz, f"--data_dir={MNIST}")
    history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert "8000 of 8000 test images" in proc.stdout
    assert math.isclose(report_value(proc.stdout, "test error rate:"), history[-1]["test_err"],
                        abs_tol=1e-4)


@pytest.mark.slow
def test_cifar10_run_export_infer(tmp_path):
    """cifar10.py's full-size CNN, one epoch on 100 fake images: infer.py reads the CIFAR-10
    files (through the preprocessed cache) and agrees with the torch model and with evaluate.py."""
    from fake_data import write_fake_cifar10
    write_fake_cifar10(tmp_path / "data", n_per_batch=40, n_test=60)
    out = tmp_path / "run"
    run(ROOT / "cifar10.py", f"--data_dir={tmp_path / 'data'}", "--verify_checksums=False",
        "--train_set_size=150", "--num_epochs=1", "--stochastic=False", "--device=cpu",
        "--compile=false", f"--out_dir={out}")
    npz = tmp_path / "cnn.npz"
    proc = run(ROOT / "export.py", out, npz)
    assert "smaller" in proc.stdout
    model, hp, *_ = evaluate.load_trained(out)
    import cifar10
    _, _, (X_test, _) = cifar10.load_data(hp)
    check_identity(model, npz, X_test)
    ev = run(ROOT / "evaluate.py", out)
    inf = run(ROOT / "infer.py", npz)
    assert "50 of 60 test images" in inf.stdout  # the report's full batches of 50
    assert math.isclose(report_value(ev.stdout, "test error rate:"),
                        report_value(inf.stdout, "test error rate:"), abs_tol=1e-4)


# ---------------------------------------------------------------------------------------------
# evaluate.py

def test_evaluate_three_modes_for_stochastic_bc(runs):
    proc = run(ROOT / "evaluate.py", runs["stoch"], "--samples=3")
    titles = [l for l in proc.stdout.splitlines() if l.startswith("Test-time mode: ")]
    assert len(titles) == 3
    assert "real-valued" in titles[0] and "sign of W" in titles[1] and "3 sampled" in titles[2]
    for which in range(3):
        for label in ("validation loss:", "validation error rate:", "test loss:",
                      "test error rate:"):
            report_value(proc.stdout, label, which)  # present, padded to 33 characters
    # the default mode is what training reported at the best epoch
    best = json.loads((runs["stoch"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isclose(report_value(proc.stdout, "validation error rate:"), best["best_val_err"],
                        abs_tol=1e-4)
    assert math.isclose(report_value(proc.stdout, "test error rate:"), best["test_err"],
                        abs_tol=1e-4)
    # the same seed gives the same ensemble
    again = run(ROOT / "evaluate.py", runs["stoch"], "--samples=3", "--modes=ensemble")
    assert report_value(again.stdout, "test loss:") == report_value(proc.stdout, "test loss:", 2)


def test_evaluate_deterministic_bc_is_its_report(runs, capsys):
    proc = run(ROOT / "evaluate.py", runs["det"] / "best.pt")
    assert proc.stdout.count("Test-time mode: ") == 1 and "sign of W" in proc.stdout
    best = json.loads((runs["det"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isclose(report_value(proc.stdout, "test error rate:"), best["test_err"],
                        abs_tol=1e-4)
    # last.pt (it also holds the RNG states) loads too; it is the last epoch's model
    assert evaluate.main([str(runs["det"]), "--checkpoint=last", "--device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "last.pt: mnist, BinaryConnect (det.), epoch 2;" in out
    last = json.loads((runs["det"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isclose(report_value(out, "validation error rate:"), last["val_err"],
                        abs_tol=1e-4)


def test_ensemble_of_one_is_one_sampled_network(runs):
    model, hp, *_ = evaluate.load_trained(runs["stoch"])
    import mnist
    _, (X, y), _ = mnist.load_data(hp)
    split = fast_step.Split(X, 2 * y - 1, torch.device("cpu"))
    forward = evaluate.ensemble(model, 1, torch.Generator().manual_seed(7))
    err, loss = training.evaluate(model, split, 50, forward=forward)
    net = evaluate.binarized_copy(model, "sample", torch.Generator().manual_seed(7))
    for layer in binary_layers(net):
        assert set(layer.weight.unique().tolist()) <= {-layer.H, layer.H} and not layer.binary
    assert (err, loss) == training.evaluate(net, split, 50)
    # the copies leave the model itself alone: real-valued, binarized in its forward
    assert all(layer.binary and len(layer.weight.unique()) > 2 for layer in binary_layers(model))


def test_evaluate_data_dir_override(runs, tmp_path):
    moved = tmp_path / "moved"
    write_fake_mnist(moved, n_train=300, n_test=100)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("best.pt", "hparams.json"):
        (run_dir / name).write_bytes((runs["det"] / name).read_bytes())
    hp = json.loads((run_dir / "hparams.json").read_text())
    hp["hparams"]["data_dir"] = str(tmp_path / "gone")
    (run_dir / "hparams.json").write_text(json.dumps(hp))
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    ckpt["hparams"]["data_dir"] = str(tmp_path / "gone")
    torch.save(ckpt, run_dir / "best.pt")
    # the run's data_dir no longer exists; --data_dir says where the files are now
    proc = run(ROOT / "evaluate.py", run_dir, f"--data_dir={moved}")
    assert "test error rate:" in proc.stdout


@pytest.mark.parametrize("tool", ["evaluate.py", "export.py", "infer.py"])
def test_help(tool):
    proc = run(ROOT / tool, "--help")
    assert "usage:" in proc.stdout


def test_bad_inputs_end_with_one_line(runs, tmp_path):
    """One subprocess per tool (what a user sees); the rest through main() in this process."""
    missing = tmp_path / "nowhere"
    one_line_error(run(ROOT / "evaluate.py", missing, check=False), missing)
    one_line_error(run(ROOT / "export.py", missing, tmp_path / "a.npz", check=False), missing)
    one_line_error(run(ROOT / "infer.py", tmp_path / "none.npz", check=False), "none.npz")


def test_bad_inputs_in_process(runs, tmp_path, capsys):
    def fails(tool, *args):
        assert tool.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    # checkpoints of the wrong kind: an npz, a bare state dict, a run directory without best.pt
    npz = tmp_path / "det.npz"
    assert export.main([str(runs["det"]), str(npz)]) == 0
    assert str(npz) in fails(evaluate, npz) and "not a checkpoint" in fails(evaluate, npz)
    bare = tmp_path / "bare" / "best.pt"
    bare.parent.mkdir()
    torch.save(torch.load(runs["det"] / "best.pt", weights_only=True)["model"], bare)
    assert str(bare) in fails(export, bare, tmp_path / "b.npz")
    assert "best.pt" in fails(evaluate, tmp_path / "bare" / "..")
    # a checkpoint whose weights do not fit its hyperparameters
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "hparams.json").write_text((runs["det"] / "hparams.json").read_text())
    ckpt = torch.load(runs["det"] / "best.pt", weights_only=True)
    ckpt["hparams"]["num_units"] = 32
    torch.save(ckpt, odd / "best.pt")
    assert "do not fit" in fails(evaluate, odd)

    # model files of the wrong kind: a checkpoint, a corrupt npz, an npz without model.json
    assert "best.pt" in fails(infer, runs["det"] / "best.pt")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(npz.read_bytes()[:len(npz.read_bytes()) // 2])
    assert str(corrupt) in fails(infer, corrupt)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    assert "model.json" in fails(infer, other)
    # missing data for a good model; an output name that is not .npz; an unknown mode
    missing = tmp_path / "nowhere"
    assert str(missing) in fails(infer, npz, f"--data_dir={missing}")
    assert ".npz" in fails(export, runs["det"], tmp_path / "x.bin")
    assert "--modes=best" in fails(evaluate, runs["det"], "--modes=best")
    assert "--modes=: choose from real, sign, ensemble" in fails(evaluate, runs["det"], "--modes=")


def test_a_run_with_only_last_pt(runs, tmp_path, capsys):
    """Issue 15: a run stopped before its first evaluation (only last.pt): evaluate.py and
    export.py read last.pt, each saying so in the same note; --checkpoint=best, asked for,
    says how to read last.pt."""
    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    for name in ("hparams.json", "last.pt"):
        (run_dir / name).write_bytes((runs["det"] / name).read_bytes())
    note = (f"note: {run_dir} has no best.pt yet (no epoch evaluated): reading last.pt, its last "
            "checkpoint (2 epochs done)\n")
    assert evaluate.main([str(run_dir), "--device=cpu"]) == 0
    out, err = capsys.readouterr()
    assert err == note and out.startswith(f"{run_dir / 'last.pt'}: mnist, ")
    assert export.main([str(run_dir), str(tmp_path / "m.npz")]) == 0
    out, err = capsys.readouterr()
    assert err == note and "smaller" in out
    assert infer.load(tmp_path / "m.npz").meta["source"]["checkpoint"] == str(run_dir / "last.pt")
    for tool, args in ((evaluate, []), (export, [str(tmp_path / "n.npz")])):
        assert tool.main([str(run_dir), *args, "--checkpoint=best"]) == 2
        assert capsys.readouterr().err == (f"error: {run_dir}: no best.pt yet (no epoch "
                                           "evaluated); --checkpoint=last reads last.pt, the "
                                           "run's last checkpoint\n")


def test_a_relative_data_dir_from_another_directory(tmp_path):
    """Issue 15: a run trained with a relative --data_dir could not be evaluated or inferred
    from another directory. Its record keeps the directory it was started in (cwd), and the
    tools read the data from there."""
    work = tmp_path / "work"
    write_fake_mnist(work / "data", n_train=300, n_test=100)
    run(ROOT / "mnist.py", "--data_dir=data", "--verify_checksums=False", "--train_set_size=200",
        "--num_units=16", "--num_epochs=1", "--batch_size=50", "--device=cpu", "--compile=false",
        "--out_dir=run", cwd=work)
    run_dir = work / "run"
    record = json.loads((run_dir / "hparams.json").read_text())
    assert record["cwd"] == str(work) and record["hparams"]["data_dir"] == "data"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run(ROOT / "evaluate.py", run_dir, cwd=elsewhere)
    test_err = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    test_err = test_err["test_err"]
    assert math.isclose(report_value(proc.stdout, "test error rate:"), test_err, abs_tol=1e-4)
    run(ROOT / "export.py", run_dir, "m.npz", cwd=elsewhere)
    assert infer.load(elsewhere / "m.npz").meta["data"]["data_dir"] == str(work / "data")
    proc = run(ROOT / "infer.py", "elsewhere/m.npz", cwd=tmp_path)  # no data/ here either
    assert math.isclose(report_value(proc.stdout, "test error rate:"), test_err, abs_tol=1e-4)


def test_export_checks_the_output_name_before_reading_the_run(tmp_path):
    proc = run(ROOT / "export.py", tmp_path / "no_such_run", tmp_path / "model.txt", check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'model.txt'}: the output name must end in .npz\n"


# An ensemble of K sampled networks is K distinct samples, averaged (a one-line bug once used one
# sample K times and passed the suite) --------------------------------------------------------

def stochastic_model():
    np.random.seed(3)
    model = models.mlp(num_units=16, n_hidden_layers=1, n_inputs=6, stochastic=True)
    return model.eval()


def test_ensemble_averages_k_distinct_sampled_networks():
    model, K = stochastic_model(), 4
    x = torch.from_numpy(np.random.RandomState(1).randn(40, 6).astype(np.float32))
    forward = evaluate.ensemble(model, K, torch.Generator().manual_seed(7))
    # the reference: K networks drawn one after the other from the same generator
    g = torch.Generator().manual_seed(7)
    nets = [evaluate.binarized_copy(model, "sample", g) for _ in range(K)]
    samples = [[layer.weight for layer in binary_layers(net)] for net in nets]
    for a in range(K):  # K distinct binary networks
        for b in range(a):
            assert any(not torch.equal(wa, wb) for wa, wb in zip(samples[a], samples[b])), (a, b)
    with torch.no_grad():
        outs = [net(x) for net in nets]
        got = forward(x)
        one = evaluate.ensemble(model, 1, torch.Generator().manual_seed(7))(x)
    torch.testing.assert_close(one, outs[0], rtol=0, atol=0)
    # one sample used K times would give that sample's output (up to rounding)
    for i, out in enumerate(outs):
        assert float((got - out).abs().max()) > 1e-2, f"the ensemble of {K} is sample {i} alone"
    torch.testing.assert_close(got, sum(outs) / K, rtol=1e-6, atol=1e-6,
                               msg=lambda m: f"not the mean of {K} distinct samples: {m}")
    # the same holds through evaluate_modes' scoring
    split = fast_step.Split(x.numpy(), 2. * np.eye(10, dtype=np.float32)[np.arange(40) % 10] - 1., torch.device("cpu"))
    scores = {k: evaluate.evaluate_modes(model, {}, ["ensemble"], split, split, 20,
                                         samples=k, seed=7)["ensemble"] for k in (1, K)}
    ref = training.evaluate(model, split, 20, forward=lambda x: sum(n(x) for n in nets) / K)
    assert scores[K]["val_loss"] == pytest.approx(ref[1], rel=1e-5)
    assert scores[K]["val_loss"] != pytest.approx(scores[1]["val_loss"], rel=1e-3)
