"""Runs that survive 20 hours (rundir.start_run / training.train, issue 4): exact resume after a kill,
a mid-epoch SIGINT/SIGTERM checkpoint, atomic checkpoints on a full disk, NaN stops, unwritable or
reused run directories, and the records (metrics.jsonl, log.txt, hparams.json) of a run.

Everything runs mnist.py on the CPU with a tiny fake MNIST. Failures are injected deterministically:
tests/ writes a small runner script that patches the loss (or os.replace) to kill or signal its own
process at a given batch of a given epoch, then runs mnist.py with runpy. No sleeps, no timeouts.
"""
import ast
import errno
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

import fast_step
import models
import checkpoints
import rundir
from runfiles import RunError
import training
from fake_data import script_config, write_fake_mnist

# The tiny configuration: 5 training batches of 20 per epoch, 3 validation and 3 test batches.
TINY = dict(num_units=32, n_hidden_layers=1, num_epochs=4, batch_size=20, train_set_size=100,
            verify_checksums=False, device="cpu")
N_BATCHES = 100 // 20
N_TRAIN, N_TEST = 160, 60

# BC_TEST_HOOK (JSON) says what to inject:
#   {"action": "SIGKILL"|"SIGINT"|"SIGTERM"|"nan", "at": k}: at the k-th training loss (counted over
#       the whole process: epoch e, batch b is k = (e-1)*N_BATCHES + b), signal this process or make
#       that loss NaN. Training losses are the ones computed with autograd on.
#   with "phase": "eval", the signal comes at the first evaluation loss after the k-th training loss.
#   {"action": "kill_on_replace", "at": k}: SIGKILL this process just before the k-th os.replace onto
#       last.pt, i.e. between writing the temporary file and renaming it.
#   with "sync": true, checkpoints are written in the training thread, so a kill finds each one
#       written (no background write still under way).
RUNNER = r'''
import json, os, runpy, signal, sys
repo, script, *args = sys.argv[1:]
sys.path.insert(0, repo)
hook = json.loads(os.environ.get("BC_TEST_HOOK") or "null")
if hook:
    import torch, binary_connect, checkpoints, fast_step, training
    if hook.get("sync"):
        checkpoints.CheckpointWriter.save = lambda self, checkpoint, best=None: \
            checkpoints.write_checkpoint(self.run, checkpoint, best)
    count = [0]
    if hook["action"] == "kill_on_replace":
        real_replace = os.replace
        def replace(src, dst, *a, **k):
            if os.path.basename(os.fspath(dst)) == "last.pt":
                count[0] += 1
                if count[0] == hook["at"]:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *a, **k)
        os.replace = replace
    else:
        real_loss = binary_connect.squared_hinge_loss
        def loss(output, target, *args):
            value = real_loss(output, target, *args)
            if hook.get("phase") == "eval":  # the first evaluation loss after the at-th training loss
                count[0] += torch.is_grad_enabled()
                if count[0] == hook["at"] and not torch.is_grad_enabled():
                    count[0] += 1
                    os.kill(os.getpid(), getattr(signal, hook["action"]))
            elif torch.is_grad_enabled():
                count[0] += 1
                if count[0] == hook["at"]:
                    if hook["action"] == "nan":
                        value = value * float("nan")
                    else:
                        os.kill(os.getpid(), getattr(signal, hook["action"]))
            return value
        binary_connect.squared_hinge_loss = fast_step.squared_hinge_loss = training.squared_hinge_loss = loss
sys.argv = [script] + args
runpy.run_path(script, run_name="__main__")
'''


def at(epoch, batch):
    return (epoch - 1) * N_BATCHES + batch


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    (root / "runner.py").write_text(RUNNER)
    write_fake_mnist(root / "data" / "mnist", n_train=N_TRAIN, n_test=N_TEST, seed=0)
    return root


def run_mnist(work, out, hook=None, resume=False, **overrides):
    config = {**TINY, "data_dir": str(work / "data" / "mnist"), "out_dir": str(out), **overrides}
    args = [f"--{k}={v}" for k, v in config.items()]
    if resume:
        args.append(f"--resume={out}")
    env = dict(os.environ, BC_TEST_HOOK=json.dumps(hook) if hook else "")
    return subprocess.run([sys.executable, str(work / "runner.py"), str(REPO), str(REPO / "mnist.py"),
                           *args], cwd=work, env=env, capture_output=True, text=True)


def check_ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def reference(work):
    """The uninterrupted run, one per BC variant (run once, shared; tests copy before mutating)."""
    _references = {}

    def get(stochastic=True):
        if stochastic not in _references:
            out = work / f"reference-{stochastic}"
            p = run_mnist(work, out, stochastic=stochastic)
            check_ok(p)
            rows = metrics(out)
            assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
            _references[stochastic] = (out, p, rows)
        return _references[stochastic]
    return get


# 1. Exact resume ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stochastic", [True, False])
def test_resume_after_sigkill_mid_epoch_is_exact(work, reference, tmp_path, stochastic):
    _, _, expected = reference(stochastic)
    out = tmp_path / "b"
    p = run_mnist(work, out, hook=dict(action="SIGKILL", at=at(3, 2)), stochastic=stochastic)
    assert p.returncode == -signal.SIGKILL, p.stderr
    # Epoch 2's checkpoint is written in the background: the kill may come before it is done.
    # Either way metrics.jsonl never holds an epoch that last.pt lacks (a resume would repeat it);
    # it may lack last.pt's newest epoch (killed between the two writes), which the resume adds.
    done = load(out / "last.pt")["epoch"]
    logged = [r["epoch"] for r in metrics(out)]
    assert done in (1, 2) and logged in (list(range(1, done + 1)), list(range(1, done)))
    p = run_mnist(work, out, resume=True, stochastic=stochastic)
    check_ok(p)
    got = metrics(out)
    assert without_seconds(got) == without_seconds(expected)
    # log.txt keeps both processes' reports; the resumed one's agree with metrics.jsonl.
    reports = parse_reports((out / "log.txt").read_text())
    assert [r["epoch"] for r in reports][-(4 - done):] == list(range(done + 1, 5))
    for report, row in zip(reports[-(4 - done):], got[done:]):
        check_report(report, row)


@pytest.fixture(scope="module")
def interrupted(work):
    """A run stopped by a signal at (epoch, batch), made once; tests resume copies of it."""
    _interrupted = {}

    def get(signame, epoch, batch):
        key = (signame, epoch, batch)
        if key not in _interrupted:
            out = work / f"interrupted-{signame}-{epoch}-{batch}"
            p = run_mnist(work, out, hook=dict(action=signame, at=at(epoch, batch)))
            _interrupted[key] = (out, p)
        return _interrupted[key]
    return get


def resumable_copy(source, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(source, out)
    return out


@pytest.mark.parametrize("signame, epoch, batch", [("SIGINT", 3, 2), ("SIGTERM", 2, N_BATCHES),
                                                    ("SIGINT", 1, 1)])
def test_signal_checkpoints_mid_epoch_and_resume_is_exact(work, reference, interrupted, tmp_path,
                                                          signame, epoch, batch):
    _, _, expected = reference(True)
    source, p = interrupted(signame, epoch, batch)
    signum = getattr(signal, signame)
    assert p.returncode == 128 + signum, (p.returncode, p.stdout, p.stderr)
    assert f"--resume={source}" in p.stdout, p.stdout
    assert signame in p.stdout and f"epoch {epoch}" in p.stdout
    assert f"Epoch {epoch} of" not in p.stdout
    checkpoint = load(source / "last.pt")
    assert (checkpoint["epoch"], checkpoint["batch"]) == (epoch - 1, batch)  # a mid-epoch checkpoint
    assert [r["epoch"] for r in metrics(source)] == list(range(1, epoch))
    out = resumable_copy(source, tmp_path)
    p = run_mnist(work, out, resume=True)
    check_ok(p)
    assert without_seconds(metrics(out)) == without_seconds(expected)


def test_a_resumed_epoch_reports_the_time_of_the_whole_epoch(work, interrupted, tmp_path):
    source, _ = interrupted("SIGINT", 3, 2)
    elapsed = load(source / "last.pt")["elapsed"]  # epoch 3's part before the signal
    assert elapsed > 0
    out = resumable_copy(source, tmp_path)
    check_ok(run_mnist(work, out, resume=True))
    assert metrics(out)[2]["seconds"] >= elapsed


def test_signal_during_evaluation_stops_after_the_epoch_checkpoint(work, reference, tmp_path):
    _, _, expected = reference(True)
    out = tmp_path / "b"
    p = run_mnist(work, out, hook=dict(action="SIGTERM", at=at(2, N_BATCHES), phase="eval"))
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, p.stdout, p.stderr)
    assert "SIGTERM received at the end of epoch 2" in p.stdout and f"--resume={out}" in p.stdout
    assert "Epoch 3 of" not in p.stdout
    checkpoint = load(out / "last.pt")
    assert (checkpoint["epoch"], checkpoint["batch"]) == (2, 0)
    p = run_mnist(work, out, resume=True)
    check_ok(p)
    assert without_seconds(metrics(out)) == without_seconds(expected)


def test_following_the_printed_resume_hint_continues_the_run(work, reference, interrupted, tmp_path):
    """The hint says `python mnist.py --resume=DIR`, nothing else: the run's own hyperparameters
    (saved in DIR) must be the ones used, not mnist.py's defaults."""
    _, _, expected = reference(True)
    source, p = interrupted("SIGINT", 3, 2)
    hint = re.search(r"Resume with: python (\S+) (.*)$", p.stdout, re.M)
    assert hint and Path(hint[1]).name == "mnist.py", p.stdout
    out = resumable_copy(source, tmp_path)
    args = [a.replace(str(source), str(out)) for a in hint[2].split()]
    # cwd holds data/mnist (fake, failing the official checksums) so a resume that falls back to
    # the defaults fails at once instead of trying to download MNIST.
    p = subprocess.run([sys.executable, str(work / "runner.py"), str(REPO), str(REPO / "mnist.py"),
                        *args], cwd=work, env=dict(os.environ, BC_TEST_HOOK=""),
                       capture_output=True, text=True)
    check_ok(p)
    assert without_seconds(metrics(out)) == without_seconds(expected)


def test_kill_between_checkpoint_write_and_rename(work, reference, tmp_path):
    _, _, expected = reference(True)
    out = tmp_path / "b"
    p = run_mnist(work, out, hook=dict(action="kill_on_replace", at=3))  # epoch 3's last.pt
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert load(out / "last.pt")["epoch"] == 2
    assert [r["epoch"] for r in metrics(out)] == [1, 2]
    p = run_mnist(work, out, resume=True)
    check_ok(p)
    assert without_seconds(metrics(out)) == without_seconds(expected)
    assert not list(out.glob("*.tmp"))


# 2. Atomic checkpoints ---------------------------------------------------------------------------------

def tiny_training_state(tmp_path):
    import rundir
    from binary_connect import make_optimizer
    from models import mlp
    np.random.seed(0)
    model = mlp(num_units=8, n_hidden_layers=1, n_inputs=4)
    optimizer = make_optimizer(model, 1e-3)
    x, t = torch.randn(6, 4), torch.sign(torch.randn(6, 10))
    torch.square(torch.clamp(1 - t * model(x), min=0)).mean().backward()
    optimizer.step()
    run = rundir.Run("mnist", dict(seed=0), tmp_path, torch.device("cpu"), resume=False)
    state = checkpoints.Progress(order=np.arange(6), LR=1e-3, epoch=1, best_val_err=50., test_err=40.,
                            test_loss=0.5, history=[dict(epoch=1)])
    return run, model, optimizer, state


def test_atomic_write_keeps_old_file_when_rename_or_fsync_fails(tmp_path, monkeypatch):
    import rundir
    path = tmp_path / "last.pt"
    rundir.atomic_write_bytes(path, b"old")
    for name in ("replace", "fsync"):
        def fail(*args, **kwargs):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        with monkeypatch.context() as m:
            m.setattr(os, name, fail)
            with pytest.raises(OSError):
                rundir.atomic_write_bytes(path, b"new" * 1000)
        assert path.read_bytes() == b"old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


class _FullDisk:
    """open() for a file named *.tmp, whose write stores half the data then fails with ENOSPC, as a
    full disk would; or whose fsync fails (data buffered, then no room when flushed)."""

    def __init__(self, monkeypatch, target, where):
        self.real_open, self.target, self.where = io.open, target, where
        monkeypatch.setattr("builtins.open", self.open)
        monkeypatch.setattr(io, "open", self.open)
        if where == "fsync":
            real_fsync = os.fsync

            def fsync(fd):
                if os.readlink(f"/proc/self/fd/{fd}").endswith(self.target + ".tmp"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_fsync(fd)
            monkeypatch.setattr(os, "fsync", fsync)

    def open(self, file, mode="r", *args, **kwargs):
        f = self.real_open(file, mode, *args, **kwargs)
        if self.where == "write" and str(file).endswith(self.target + ".tmp") and "w" in mode:
            real_write = f.write

            def write(data):
                real_write(bytes(data)[:len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.write = write
        return f


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_during_checkpoint_exits_cleanly_and_keeps_previous(tmp_path, monkeypatch, where):
    if where == "fsync" and not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file is fsynced")
    run, model, optimizer, state = tiny_training_state(tmp_path)
    checkpoints.save_checkpoint(run, model, optimizer, state, best=True)
    before = (tmp_path / "last.pt").read_bytes()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.)
    state.epoch, state.history = 2, [dict(epoch=1), dict(epoch=2)]
    with monkeypatch.context() as m:
        _FullDisk(m, "last.pt", where)
        with pytest.raises(SystemExit) as e:
            checkpoints.save_checkpoint(run, model, optimizer, state, best=True)
    message = str(e.value.code)
    assert os.strerror(errno.ENOSPC) in message and str(tmp_path) in message
    assert f"--resume={tmp_path}" in message
    assert (tmp_path / "last.pt").read_bytes() == before
    checkpoint = load(tmp_path / "last.pt")
    assert checkpoint["epoch"] == 1 and checkpoint["history"] == [dict(epoch=1)]
    for k, v in weights.items():
        assert torch.equal(checkpoint["model"][k], v)
    assert not list(tmp_path.glob("*.tmp"))


def test_full_disk_on_best_checkpoint_does_not_advance_last(tmp_path, monkeypatch):
    """If best.pt cannot be written, last.pt must still be the previous epoch's (as the message says),
    so the resume redoes the epoch and writes best.pt; else best.pt would miss the best epoch."""
    run, model, optimizer, state = tiny_training_state(tmp_path)
    checkpoints.save_checkpoint(run, model, optimizer, state, best=True)
    state.epoch, state.best_epoch, state.history = 2, 2, [dict(epoch=1), dict(epoch=2)]
    with monkeypatch.context() as m:
        _FullDisk(m, "best.pt", "write")
        with pytest.raises(SystemExit):
            checkpoints.save_checkpoint(run, model, optimizer, state, best=True)
    assert load(tmp_path / "best.pt")["epoch"] == 1
    assert load(tmp_path / "last.pt")["epoch"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_full_disk_during_a_background_write_stops_the_run(tmp_path, monkeypatch):
    """Training writes its checkpoints with CheckpointWriter, in a thread: a write that fails
    there must stop the run at the next wait(), with the same message as a synchronous save,
    not vanish with the thread (the run would end with status 0, last.pt stale)."""
    run, model, optimizer, state = tiny_training_state(tmp_path)
    checkpoints.save_checkpoint(run, model, optimizer, state, best=True)
    before = (tmp_path / "last.pt").read_bytes()
    state.epoch, state.history = 2, [dict(epoch=1), dict(epoch=2)]
    writer = checkpoints.CheckpointWriter(run)
    with monkeypatch.context() as m:
        _FullDisk(m, "last.pt", "write")
        writer.save(checkpoints.take_checkpoint(run, model, optimizer, state), best=False)
        with pytest.raises(SystemExit) as e:
            writer.wait()
    assert os.strerror(errno.ENOSPC) in str(e.value.code)
    assert f"--resume={tmp_path}" in str(e.value.code)
    assert (tmp_path / "last.pt").read_bytes() == before
    writer.wait()  # raised once: the writer is usable again


def _version_1(checkpoint):
    """A version-2 checkpoint written as version 1 wrote it: Adam's step counts as ints under
    "t", no draw counters in the model, the random streams without their kind and device, no
    elapsed time."""
    checkpoint = dict(checkpoint, version=1)
    checkpoint["optimizer"]["state"] = {
        k: dict({n: v for n, v in s.items() if n != "step"}, t=int(s["step"]))
        for k, s in checkpoint["optimizer"]["state"].items()}
    checkpoint["model"] = {k: v for k, v in checkpoint["model"].items() if not k.endswith("draws")}
    checkpoint["rng"] = {k: v for k, v in checkpoint["rng"].items() if k not in ("kind", "device")}
    del checkpoint["elapsed"]
    return checkpoint


@pytest.mark.parametrize("stochastic", [True, False])
def test_a_version_1_checkpoint_resumes_with_its_draws_counted(tmp_path, capsys, stochastic):
    """Version 1 had no draw counters: every stochastic layer drew once per step taken, and a
    resume that counts them from 0 would start the counter streams over (the same draws
    again). Its step counts become version 2's float64 tensors."""
    import binary_connect as bc
    np.random.seed(0)
    model = models.mlp(num_units=8, n_hidden_layers=1, n_inputs=4, stochastic=stochastic)
    optimizer = bc.make_optimizer(model, 1e-3)
    x, t = torch.randn(6, 4), torch.sign(torch.randn(6, 10))
    steps = 3
    for _ in range(steps):
        optimizer.zero_grad()
        torch.square(torch.clamp(1 - t * model(x), min=0)).mean().backward()
        optimizer.step()
    run = rundir.Run("mnist", dict(seed=0), tmp_path, torch.device("cpu"), resume=True)
    state = checkpoints.Progress(order=np.arange(6), LR=1e-3, epoch=1, history=[dict(epoch=1)])
    torch.save(_version_1(checkpoints.take_checkpoint(run, model, optimizer, state)),
               tmp_path / "last.pt")
    np.random.seed(0)
    fresh = models.mlp(num_units=8, n_hidden_layers=1, n_inputs=4, stochastic=stochastic)
    fresh_optimizer = bc.make_optimizer(fresh, 1e-3)
    progress = checkpoints.load_checkpoint(run, fresh, fresh_optimizer, 6)
    assert progress.epoch == 1 and progress.elapsed == 0.
    for m in bc.binary_layers(fresh):
        assert int(m.draws) == (steps if stochastic else 0)
    for p in fresh_optimizer._all:
        step = fresh_optimizer.state[p]["step"]
        assert step.dtype == torch.float64 and float(step) == steps
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


# 3. NaN --------------------------------------------------------------------------------------------------

def test_nan_loss_stops_naming_epoch_and_batch(work, tmp_path):
    out = tmp_path / "b"
    p = run_mnist(work, out, hook=dict(action="nan", at=at(2, 3)))
    assert p.returncode != 0
    assert re.search(r"epoch 2\b.*batch 3\b", p.stderr), p.stderr
    assert "nan" in p.stderr.lower()
    assert "Epoch 2 of" not in p.stdout
    checkpoint = load(out / "last.pt")
    assert (checkpoint["epoch"], checkpoint["batch"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    assert [r["epoch"] for r in metrics(out)] == [1]
    # the error that ended the run closes its log
    last_line = (out / "log.txt").read_text().splitlines()[-1]
    assert last_line.startswith("error: the training loss became nan at epoch 2, batch 3")


def test_ctrl_c_while_loading_leaves_nothing(work, tmp_path):
    """Ctrl-C before the first epoch ends: one clean line, status 130, no run directory."""
    out = tmp_path / "runs" / "b"
    runner = tmp_path / "interrupt_loading.py"
    runner.write_text(
        "import runpy, sys, bc_datasets\n"
        "def load(*a, **k):\n"
        "    raise KeyboardInterrupt\n"
        "bc_datasets.load_mnist = load\n"
        f"sys.argv = ['mnist.py', '--out_dir={out}', '--device=cpu']\n"
        f"runpy.run_path({str(REPO / 'mnist.py')!r}, run_name='__main__')\n")
    p = subprocess.run([sys.executable, str(runner)], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 130, p.stderr
    assert p.stderr.strip().splitlines() == [
        "interrupted before the first epoch ended; nothing was kept"]
    assert not (tmp_path / "runs").exists()


# 4. Unwritable out_dir -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["under_a_file", "is_a_file"])
def test_unwritable_out_dir_stops_before_training(work, tmp_path, kind):
    # Tests may run as root, for whom chmod does not forbid writing: use a regular file in the way.
    (tmp_path / "afile").write_text("not a directory")
    out = tmp_path / "afile" / "run" if kind == "under_a_file" else tmp_path / "afile"
    p = run_mnist(work, out)
    assert p.returncode != 0
    assert str(out) in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert "Loading MNIST" not in p.stdout and "Training..." not in p.stdout
    assert (tmp_path / "afile").read_text() == "not a directory"


# 5. metrics.jsonl agrees with the printed report ---------------------------------------------------------

LABELS = [("LR:", "LR", ""), ("training loss:", "train_loss", ""), ("validation loss:", "val_loss", ""),
          ("validation error rate:", "val_err", "%"), ("best epoch:", "best_epoch", ""),
          ("best validation error rate:", "best_val_err", "%"), ("test loss:", "test_loss", ""),
          ("test error rate:", "test_err", "%")]


def py2_str(x):
    """Python 2's str() of a float: 12 significant digits, '.0' kept on integral values (§5)."""
    if isinstance(x, int):
        return str(x)
    s = "%.12g" % x
    return s if any(c in s for c in ".en") else s + ".0"


def parse_reports(text):
    """The nine-line blocks of §5: 'Epoch e of n took Ts', then 8 lines of a 33-wide label and a value."""
    lines = text.splitlines()
    reports = []
    for i, line in enumerate(lines):
        m = re.fullmatch(r"Epoch (\d+) of (\d+) took (.+)s", line)
        if m:
            report = dict(epoch=int(m[1]), of=int(m[2]), seconds=m[3])
            for (label, key, _), row in zip(LABELS, lines[i + 1:i + 9]):
                assert row[:33] == ("  " + label).ljust(33), row
                report[key] = row[33:]
            reports.append(report)
    return reports


def check_report(report, row):
    assert report["seconds"] == py2_str(row["seconds"])
    for _, key, suffix in LABELS:
        assert report[key] == py2_str(row[key]) + suffix, (key, report[key], row[key])


def test_metrics_agree_with_printed_report(reference):
    out, p, rows = reference(True)
    for text in (p.stdout, (out / "log.txt").read_text()):
        reports = parse_reports(text)
        assert [r["epoch"] for r in reports] == [1, 2, 3, 4]
        assert all(r["of"] == 4 for r in reports)
        for report, row in zip(reports, rows):
            check_report(report, row)
    # log.txt is the tee of stdout from start_run on, line for line.
    log = (out / "log.txt").read_text()
    assert "num_units = 32" in log and p.stdout.endswith(log)
    # The LR schedule of §4.1: LR_start * LR_decay**(e-1), LR_decay = (LR_fin/LR_start)**(1/num_epochs).
    decay = (0.000003 / .001) ** (1. / 4)
    lr = .001
    for row in rows:
        assert row["LR"] == lr
        lr *= decay


# 6. hparams.json -----------------------------------------------------------------------------------------

def script_defaults(path):
    """The hyperparameters a script declares: its top-level `name = constant` assignments."""
    defaults = {}
    for node in ast.parse(Path(path).read_text()).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Constant)):
            defaults[node.targets[0].id] = node.value.value
    return defaults


def test_hparams_json_records_everything(work, reference):
    out, _, _ = reference(True)
    record = json.loads((out / "hparams.json").read_text())
    expected = script_defaults(REPO / "mnist.py")
    expected.update(TINY, data_dir=str(work / "data" / "mnist"), out_dir=str(out))
    assert record["hparams"] == expected
    assert record["script"] == "mnist"
    assert record["device"] == "cpu"
    assert record["versions"]["python"] == platform.python_version()
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["numpy"] == np.__version__
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert "git_commit" in record and "git_dirty" in record
    if git.returncode == 0:
        assert record["git_commit"] == git.stdout.strip()
        assert isinstance(record["git_dirty"], bool)
    else:
        assert record["git_commit"] is None and record["git_dirty"] is None


# 7. An existing run is not overwritten -------------------------------------------------------------------

def test_a_directory_another_process_trains_in_is_refused_untouched(work, tmp_path):
    """Two runs started at once on one --out_dir: the second stops at once, naming the first's
    pid, and neither writes nor removes anything of the first's (issue 15: one's clean-up used
    to delete the other's hparams.json and log.txt). Once the first ends, the lock is free."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / "hparams.json").write_text('{"script": "mnist"}\n')  # the first run's, epoch 1
    (out / "log.txt").write_text("Loading MNIST dataset...\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # The first run's lock, as rundir.lock takes it (an flock on .lock holding the pid), in a
    # process that does not import torch: the test stays quick.
    first = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); f.write(f'{os.getpid()}\\n'); "
         "f.flush(); print('locked', flush=True); sys.stdin.read()", str(out / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        before[".lock"] = (out / ".lock").read_bytes()
        p = run_mnist(work, out)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().splitlines()[-1] == (
            f"error: {out} is in use: another process (pid {first.pid}) is training in it; wait "
            "for it to end, or choose another --out_dir")
        assert {q.name: q.read_bytes() for q in out.iterdir()} == before
    finally:
        first.stdin.close()
        first.wait()
    check_ok(run_mnist(work, out, num_epochs=1))  # the lock went with the process



def test_only_the_lock_file_itself_passes_as_an_inherited_lock(tmp_path, monkeypatch):
    """sweep.py holds the lock and passes its descriptor in LOCK_FD; any other descriptor there
    (a stale variable in the environment, another run's lock) must not let a process train
    without the lock."""
    import fcntl
    (tmp_path / rundir.LOCK).write_text("")
    holder = open(tmp_path / rundir.LOCK, "a+")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: another process's
    other = open(tmp_path / "other", "w")
    try:
        monkeypatch.setenv(rundir.LOCK_FD, str(other.fileno()))
        with pytest.raises(RunError, match="is in use"):
            rundir.lock(tmp_path)
        monkeypatch.setenv(rundir.LOCK_FD, str(holder.fileno()))
        rundir.lock(tmp_path)  # the lock held for it
        assert tmp_path.resolve() not in rundir._locks
    finally:
        holder.close()
        other.close()
    monkeypatch.setenv(rundir.LOCK_FD, "not a number")
    rundir.lock(tmp_path)  # free now: taken
    assert tmp_path.resolve() in rundir._locks
    rundir.unlock(tmp_path)


def test_existing_run_dir_without_resume_is_refused(work, reference, tmp_path):
    source, _, _ = reference(True)
    out = tmp_path / "existing"
    shutil.copytree(source, out)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    p = run_mnist(work, out)
    assert p.returncode != 0
    assert f"--resume={out}" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == digests


def test_resume_of_a_dir_without_checkpoint_is_refused(work, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    p = run_mnist(work, out, resume=True)
    assert p.returncode != 0
    assert str(out / "last.pt") in p.stderr and "Traceback" not in p.stderr


# 4. Resume guards and reuse of a directory without a checkpoint --------------------------------------

def test_resume_into_another_out_dir_is_refused(work, reference, tmp_path):
    source, _, _ = reference(True)
    p = run_mnist(work, source, resume=True, out_dir=str(tmp_path / "elsewhere"))
    assert p.returncode != 0
    assert "--out_dir" in p.stderr and "different directories" in p.stderr
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("edit", [dict(stochastic=False, LR_start=0.003), dict(num_units=64)])
def test_a_resume_of_an_edited_hparams_json_is_refused(work, reference, tmp_path, edit):
    """hparams.json is the run's record, not a control: edited, a resume would be half one run,
    half another (or a torch size-mismatch traceback); the checkpoint's own hyperparameters are
    compared, and the refusal names each key with both values, and what a resume may change."""
    source, _, _ = reference(True)
    run = tmp_path / "run"
    shutil.copytree(source, run)
    record = json.loads((run / "hparams.json").read_text())
    trained = {k: record["hparams"][k] for k in edit}
    record["hparams"].update(edit)
    (run / "hparams.json").write_text(json.dumps(record))
    before = (run / "last.pt").read_bytes()
    p = subprocess.run([sys.executable, str(work / "runner.py"), str(REPO), str(REPO / "mnist.py"),
                        f"--resume={run}"], cwd=work, capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"error: {run / 'hparams.json'} "
                                                               "does not match the checkpoint")
    for k, v in edit.items():
        assert f"{k} is {v!r} there but {trained[k]!r} in the checkpoint" in p.stderr
    assert "a resume may change only device, data_dir, compile and checkpoint_every" in p.stderr
    assert (run / "last.pt").read_bytes() == before


@pytest.mark.parametrize("damage", ["cut", "empty"])
def test_a_damaged_last_pt_says_what_is_damaged_and_what_to_do(tmp_path, damage):
    """torch's reader error alone left no way forward: the message says what is wrong with
    last.pt, that the records are kept, whether best.pt is sound, and how to start again."""
    run, model, optimizer, state = tiny_training_state(tmp_path)
    checkpoints.save_checkpoint(run, model, optimizer, state, best=True)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[:len(data) // 2] if damage == "cut" else b"")
    with pytest.raises(RunError) as e:
        checkpoints.load_checkpoint(run, model, optimizer, 6)
    message = str(e.value)
    assert message.startswith(f"the run's checkpoint {tmp_path / 'last.pt'} " + (
        f"is cut short ({len(data) // 2} bytes, its end missing" if damage == "cut" else
        "is empty (0 bytes), so the run cannot continue from it"))
    assert "best.pt is sound (the model of epoch 1" in message
    assert "no resume starts from it" in message
    assert message.endswith(f"start a new run with the hyperparameters of "
                            f"{tmp_path / 'hparams.json'} and another --out_dir (or move "
                            f"{tmp_path} aside first)")
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(RunError) as e:
        checkpoints.load_checkpoint(run, model, optimizer, 6)
    assert "best.pt" not in str(e.value)


def test_resume_with_another_training_set_is_refused(work, reference, tmp_path):
    """A resumed run must see the same training set: its checkpointed shuffle order indexes it."""
    import rundir
    source, _, _ = reference(True)
    run = rundir.Run("mnist", dict(TINY), source, torch.device("cpu"), resume=True)
    run_, model, optimizer, _ = tiny_training_state(tmp_path)
    with pytest.raises(checkpoints.RunError) as e:
        checkpoints.load_checkpoint(run, model, optimizer, n_train=90)
    assert "100 training examples" in str(e.value) and "90" in str(e.value)


def test_a_start_that_failed_before_its_first_checkpoint_can_be_rerun(work, reference, tmp_path):
    _, _, expected = reference(True)
    out = tmp_path / "b"
    p = run_mnist(work, out, data_dir=str(tmp_path / "no-data"))  # no MNIST there: stops early
    assert p.returncode != 0 and "t10k-images-idx3-ubyte.gz" in p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists()  # a start that failed before its first epoch leaves nothing behind
    out.mkdir()  # in a directory that was there before, only the files it wrote go
    (out / "notes.txt").write_text("mine")
    p = run_mnist(work, out, data_dir=str(tmp_path / "no-data"))
    assert p.returncode != 0 and sorted(q.name for q in out.iterdir()) == ["notes.txt"]
    p = run_mnist(work, out)
    check_ok(p)
    assert without_seconds(metrics(out)) == without_seconds(expected)
    assert (out / "log.txt").read_text().count("Loading MNIST dataset...") == 1

# 6. A mid-epoch resume with the training data kept on the host (memory-mapped, as SVHN is) ------

HOST_N, HOST_BATCH, HOST_EPOCHS, HOST_IN = 60, 10, 3, 6  # 6 batches an epoch


def one_hot_labels(rng, n):
    return np.eye(10, dtype=np.float32)[rng.randint(0, 10, n)]


def host_data(tmp_path):
    """A memory-mapped training set (a .npy opened with mmap_mode="r", as svhn.py reads SVHN),
    which Split keeps on the host on the CPU; small in-memory valid and test sets."""
    rng = np.random.RandomState(5)
    path = tmp_path / "train_X.npy"
    np.save(path, rng.randn(HOST_N, HOST_IN).astype(np.float32))
    Xtr = np.load(path, mmap_mode="r")
    assert isinstance(Xtr, np.memmap)
    ytr = one_hot_labels(rng, HOST_N)
    val = rng.randn(20, HOST_IN).astype(np.float32), one_hot_labels(rng, 20)
    test = rng.randn(20, HOST_IN).astype(np.float32), one_hot_labels(rng, 20)
    return (Xtr, ytr), val, test


def train_run(out, data, resume=False, stop_at=None):
    """training.train on a tiny stochastic-BC MLP in out; stop_at=k sends SIGINT (the real
    handler, in this process) during the k-th training step of this process. Returns (the
    history, the final state_dict, whether every step gathered its batch on the host)."""
    saved = sys.stdout
    steps, on_host = [0], []
    call = fast_step.TrainStep.__call__

    def counted(self):
        on_host.append(not self.data.on_device)
        steps[0] += 1
        if steps[0] == stop_at:
            signal.raise_signal(signal.SIGINT)
        return call(self)

    fast_step.TrainStep.__call__ = counted
    try:
        config = script_config(seed=1234, device="cpu", out_dir=str(out),
                               resume=str(out) if resume else "", batch_size=HOST_BATCH,
                               LR_start=0.01, LR_fin=0.01 * 0.8 ** HOST_EPOCHS,
                               num_epochs=HOST_EPOCHS)
        with rundir.start_run("mnist", config) as run:
            model = models.mlp(num_units=8, n_hidden_layers=1, n_inputs=HOST_IN, alpha=0.15,
                               epsilon=1e-4, dropout_hidden=0.2, stochastic=True)
            history = training.train(model, data, run)
        return history, {k: v.clone() for k, v in model.state_dict().items()}, on_host
    finally:
        fast_step.TrainStep.__call__ = call
        tee, sys.stdout = sys.stdout, saved
        if tee is not saved and hasattr(tee, "file"):
            tee.file.close()


@pytest.mark.parametrize("stop_at", [2, 6 + 4])  # epoch 1 after batch 2; epoch 2 after batch 4
def test_mid_epoch_resume_with_host_side_training_data_is_exact(tmp_path, stop_at):
    data = host_data(tmp_path)
    assert not fast_step.Split(*data[0], torch.device("cpu")).on_device  # the host branch of the training step
    history, weights, on_host = train_run(tmp_path / "whole", data)
    assert len(history) == HOST_EPOCHS and all(on_host) and len(on_host) == HOST_EPOCHS * 6

    out = tmp_path / "resumed"
    with pytest.raises(SystemExit) as stopped:
        train_run(out, data, stop_at=stop_at)
    assert stopped.value.code == 128 + signal.SIGINT
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["batch"]) == divmod(stop_at, 6)  # mid-epoch
    resumed, resumed_weights, on_host = train_run(out, data, resume=True)
    assert all(on_host) and len(on_host) == HOST_EPOCHS * 6 - stop_at  # only the steps left

    assert without_seconds(resumed) == without_seconds(history)  # every epoch's losses, errors
    assert resumed_weights.keys() == weights.keys()
    for name in weights:
        assert torch.equal(resumed_weights[name], weights[name]), name


# checkpoint_every: fewer checkpoints, the same exact resume ------------------------------------------

@pytest.fixture(scope="module")
def five_epochs(work):
    """The uninterrupted 5-epoch run, a checkpoint every epoch (the default)."""
    out = work / "five-epochs"
    check_ok(run_mnist(work, out, num_epochs=5))
    return out


def same_best(a, b):
    a, b = load(Path(a) / "best.pt"), load(Path(b) / "best.pt")
    assert a["epoch"] == b["epoch"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_checkpoint_every_kill_between_checkpoints_resumes_exactly(work, five_epochs, tmp_path):
    """Checkpoints after epochs 2, 4 and 5; killed in epoch 4, after epoch 3 was reported:
    metrics.jsonl holds no epoch past last.pt's (3 is not kept), and the resume redoes epoch 3
    to the numbers of the run that checkpointed every epoch, best.pt included. The checkpoints
    are written in the training thread here: in the background, epoch 2's may not have landed
    by the kill on a loaded machine (test_resume_after_sigkill_mid_epoch_is_exact covers that)."""
    out = tmp_path / "b"
    p = run_mnist(work, out, hook=dict(action="SIGKILL", at=at(4, 2), sync=True), num_epochs=5,
                  checkpoint_every=2)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "Epoch 3 of 5" in (out / "log.txt").read_text()
    assert load(out / "last.pt")["epoch"] == 2
    assert [r["epoch"] for r in metrics(out)] == [1, 2]
    check_ok(run_mnist(work, out, resume=True, num_epochs=5, checkpoint_every=2))
    assert without_seconds(metrics(out)) == without_seconds(metrics(five_epochs))
    same_best(out, five_epochs)


def test_checkpoint_every_signal_writes_the_pending_best(work, five_epochs, tmp_path):
    """A SIGTERM in epoch 3 with checkpoint_every=4 (no checkpoint yet): the checkpoint it
    writes carries the best model of epochs 1-2 as best.pt; the resume ends as the reference."""
    out = tmp_path / "b"
    p = run_mnist(work, out, hook=dict(action="SIGTERM", at=at(3, 2)), num_epochs=5,
                  checkpoint_every=4)
    assert p.returncode == 128 + signal.SIGTERM, p.stdout + p.stderr
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert load(out / "best.pt")["epoch"] == rows[-1]["best_epoch"]
    check_ok(run_mnist(work, out, resume=True, num_epochs=5, checkpoint_every=4))
    assert without_seconds(metrics(out)) == without_seconds(metrics(five_epochs))
    same_best(out, five_epochs)
