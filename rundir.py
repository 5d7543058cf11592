"""The run directory, written: with checkpoints.py, the only code that writes a run's files.

    hparams.json   the script, its hyperparameters, git commit, versions, working directory
                   (as the run began)
    resumes.jsonl  one such record per resume
    log.txt        the printed report, line for line
    metrics.jsonl  one line per evaluated epoch, rewritten from the checkpoint's history
    last.pt        everything a resume needs: model, optimizer, random streams, loop state
    best.pt        the model of the best-validation epoch (§5's "best")
    .lock          held while a script trains in it

Every script starts with `with start_run(script, config) as run:`. The tools (evaluate, export,
plot, results, sweep) read runs through runfiles.py; the checkpoints, last.pt and best.pt, are
checkpoints.py's.
"""
import datetime
import fcntl
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import errors
from atomic import atomic_write
from binary_connect import lr_decay
from configurator import device_name, select_device
from errors import UserError
from report import str2
from runfiles import LOCK, LOCK_FD, RunError, require_checkpoint


class Tee(io.TextIOBase):
    """The original printed its report; we also keep it, line for line, in log.txt."""

    def __init__(self, stream, path, mode="a"):
        self.stream = stream
        self.file = open(path, mode, buffering=1)

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def isatty(self):
        return self.stream.isatty()


class Run:
    """Where a run keeps its records: hparams.json, log.txt, metrics.jsonl, last.pt, best.pt,
    resumes.jsonl.

    Also the context the script's work runs in: an error, or Ctrl-C, ends the script with one
    line (also written at the end of log.txt), and a run that ends before its first checkpoint
    leaves nothing behind (the directories start_run created are removed).
    """

    def __init__(self, script, config, out_dir, device, resume, created=()):
        self.script = script
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = device
        self.resume = resume
        self.created = list(created)  # directories start_run made, innermost first

    def path(self, name):
        return self.out_dir / name

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            unlock(self.out_dir)
            return False
        kept = self.path("last.pt").exists()
        if issubclass(kind, KeyboardInterrupt):
            message, code = ("interrupted; the last checkpoint is kept: resume with: python "
                             f"{self.script}.py --resume={self.out_dir}" if kept else
                             "interrupted before the first epoch ended; nothing was kept"), 130
        elif issubclass(kind, UserError):
            message, code = errors.line(value), errors.EXIT_STATUS
        elif issubclass(kind, SystemExit):
            message = value.code if isinstance(value.code, str) else None
            code = 1 if message else value.code
        else:  # a bug: Python prints the traceback once we return
            message, code = None, None
        self._log_end(message or (f"exit status {code}" if code is not None else
                                  f"error: {kind.__name__}: {value}"))
        if message:
            print(message, file=sys.stderr)
        if not kept:
            self._remove_debris()
        unlock(self.out_dir, remove=not kept and not self.resume)
        if code is None:
            return False
        raise SystemExit(code) from None

    def _log_end(self, line):
        out = sys.stdout
        if isinstance(out, Tee):
            out.file.write(line + "\n")
            out.file.flush()

    def _remove_debris(self):
        if isinstance(sys.stdout, Tee):
            sys.stdout.file.close()
            sys.stdout = sys.stdout.stream
        if self.resume:
            return
        if self.out_dir in self.created:
            shutil.rmtree(self.out_dir, ignore_errors=True)
        else:  # a directory that was there before: only the files this start wrote go
            for name in ("hparams.json", "log.txt", "metrics.jsonl"):
                self.path(name).unlink(missing_ok=True)
        for directory in self.created[1:]:
            _rmdir_if_empty(directory)


def _rmdir_if_empty(path):
    try:
        path.rmdir()
    except OSError:
        pass


def _git_info():
    here = Path(__file__).resolve().parent
    def git(*args):
        p = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 else None
    try:
        commit = git("rev-parse", "--verify", "HEAD")  # None outside a repo or before a commit
        status = git("status", "--porcelain") if commit else None
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, (None if status is None else bool(status))


def atomic_write_bytes(path, data):
    with atomic_write(path) as f:
        f.write(data)


def atomic_torch_save(obj, path):
    with atomic_write(path) as f:
        torch.save(obj, f)


_locks = {}  # run directory -> its open lock file, held by this process


def lock(out):
    """One process at a time trains in a run directory: two runs started on one --out_dir would
    overwrite each other's records (or one's clean-up delete the other's). The lock is an
    flock on out/.lock, released when the process ends, however it ends."""
    key = Path(out).resolve()
    if key in _locks:
        return
    path = key / LOCK
    inherited = os.environ.get(LOCK_FD)
    if inherited and path.exists():
        try:
            if os.path.samestat(os.fstat(int(inherited)), os.stat(path)):
                return  # held for us by the sweep that started this script
        except (OSError, ValueError):
            pass
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        who = f"another process (pid {holder})" if holder else "another process"
        raise RunError(f"{out} is in use: {who} is training in it; wait for it to end, or "
                       "choose another --out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _locks[key] = f


def unlock(out, remove=False):
    f = _locks.pop(Path(out).resolve(), None)
    if f is not None:
        if remove:
            Path(f.name).unlink(missing_ok=True)
        f.close()


def _holds_a_run(out):
    return RunError(f"{out} already holds a run; continue it with --resume={out} or choose "
                    "another --out_dir")


def start_run(script, config):
    """Seeds, device, run directory and log, then the original's start-up print of every
    hyperparameter. `config` must hold seed, device, out_dir and resume. Use it as a context
    (`with start_run(...) as run:`) around the rest of the script. A mistake (a run to resume
    that has no checkpoint, an out_dir that holds another run or cannot be written, a device
    this machine lacks) ends the script by errors.py's rule."""
    try:
        return _start_run(script, config)
    except UserError as e:
        raise errors.exit(e) from None


def _start_run(script, config):
    resume = config["resume"]
    out = Path(resume or config["out_dir"] or os.path.join(
        "runs", f"{script}-{datetime.datetime.now():%Y%m%d-%H%M%S}"))
    if resume:
        require_checkpoint(resume)
    if not resume and (out / "last.pt").exists():
        raise _holds_a_run(out)
    device = select_device(config["device"])
    created = [p for p in [out, *out.parents] if not p.exists()]
    try:  # fail before any training if the records cannot be written
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / ".write_test", b"")
        (out / ".write_test").unlink()
    except OSError as e:
        for p in created:
            _rmdir_if_empty(p)
        raise RunError(f"cannot write to out_dir {out}: {e.strerror or e}") from None
    try:
        lock(out)
        if not resume and (out / "last.pt").exists():  # again under the lock: no race
            raise _holds_a_run(out)
    except UserError:
        unlock(out, remove=bool(created))
        for p in created:
            _rmdir_if_empty(p)
        raise
    config["out_dir"] = str(out)

    np.random.seed(config["seed"])  # §4.1: np.random.seed(1234) at import
    torch.manual_seed(config["seed"])
    if device.type == "cuda":
        # cuBLAS is deterministic with a fixed workspace; it must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if device.index is not None:
            # What torch makes without naming a device (streams, graphs) goes to this one.
            torch.cuda.set_device(device)

    commit, dirty = _git_info()
    record = dict(script=script, hparams=config, git_commit=commit, git_dirty=dirty,
                  versions=dict(python=platform.python_version(), torch=torch.__version__,
                                numpy=np.__version__),
                  device=device_name(device),
                  started=datetime.datetime.now().isoformat(timespec="seconds"),
                  cwd=os.getcwd())  # what relative paths (data_dir) are relative to
    if resume:  # hparams.json stays as the run began; each resume adds a line here
        with open(out / "resumes.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    else:
        atomic_write_bytes(out / "hparams.json", (json.dumps(record, indent=1) + "\n").encode())
    # A fresh start in a directory with no checkpoint (a run that failed before its first
    # epoch) rewrites its log; a resumed run appends to it.
    sys.stdout = Tee(sys.stdout, out / "log.txt", mode="a" if resume else "w")
    if resume:
        print(f"Resuming the run in {out}")
    for key, value in config.items():
        shown = f"{value} ({device_name(device)})" if key == "device" and value == "auto" else value
        print(key + " = " + str(shown))
    if all(k in config for k in ("LR_start", "LR_fin", "num_epochs")):
        print("LR_decay = " + str2(lr_decay(config["LR_start"], config["LR_fin"],
                                             config["num_epochs"])))
    return Run(script, config, out, device, bool(resume), created)


class Interrupt:
    """SIGINT/SIGTERM set a flag; the loop stops between steps and checkpoints."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: the user insists
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def stop(run, signum, where):
    print(f"\n{signal.Signals(signum).name} received {where}; checkpoint written to "
          f"{run.path('last.pt')}.\nResume with: python {run.script}.py --resume={run.out_dir}")
    sys.stdout.flush()
    raise SystemExit(128 + signum)


def log_metrics(run, history):
    """metrics.jsonl is rewritten from the checkpointed history, so a run killed between the
    report and the checkpoint never keeps a line that its resume would repeat."""
    text = "".join(json.dumps(m) + "\n" for m in history)
    atomic_write_bytes(run.path("metrics.jsonl"), text.encode())
