"""The training loop of the original `binary_connect.train` (docs/original.md §5), plus what a
20-hour run needs: a run directory, atomic checkpoints written in the background, exact resume,
clean interrupts, and a fast training step built from the same modules.

Every experiment script runs `with start_run(...) as run:` right after its hyperparameters, then
loads its data, builds its network and calls `fit`.
"""
import contextlib
import copy
import datetime
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from atomic import atomic_write
from bc_datasets import DatasetError
from binary_connect import BinaryLayerMixin, binary_layers, lr_decay, make_optimizer, squared_hinge_loss
from configurator import CHECKS
from report import mean32, report, str2

# 2: optimizer state as tensors ("step"), the layers' draw counters in the model, the stream kind.
CHECKPOINT_VERSION = 2
# Rows per forward pass in evaluation: several of the original's batches at once.
EVAL_ROWS = 1000
# CPU runs with compile="auto" compile networks with at least this many binary weights (the
# paper's: 6.4 M to 14 M), where benchmark.py measured the compiled step about twice as fast;
# a tiny network would spend longer compiling than training.
AUTO_COMPILE_CPU_WEIGHTS = 1_000_000
WARMUP_STEPS = 3  # compiled steps run before a CUDA graph is captured
COMPILE_CACHE_ENTRIES = 64  # per compiled function, in one process (see _allow_recompiles)


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
            return False
        kept = self.path("last.pt").exists()
        if issubclass(kind, KeyboardInterrupt):
            message, code = ("interrupted; the last checkpoint is kept: resume with: python "
                             f"{self.script}.py --resume={self.out_dir}" if kept else
                             "interrupted before the first epoch ended; nothing was kept"), 130
        elif issubclass(kind, DatasetError):
            message, code = f"error: {value}", 1
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


def select_device(name):
    """The torch.device of a device setting, checked as the configurator checks it (so the
    tools that take --device say the same); auto is CUDA when present, else the CPU."""
    check, accepted = CHECKS["device"]
    try:
        name = check(name)
    except ValueError as e:
        raise SystemExit(f"error: device={name!r}: {str(e) or 'device ' + accepted}") from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device):
    return str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                          else "")


def atomic_write_bytes(path, data):
    with atomic_write(path) as f:
        f.write(data)


def atomic_torch_save(obj, path):
    with atomic_write(path) as f:
        torch.save(obj, f)


def start_run(script, config):
    """Seeds, device, run directory and log, then the original's start-up print of every
    hyperparameter. `config` must hold seed, device, out_dir and resume. Use it as a context
    (`with start_run(...) as run:`) around the rest of the script."""
    resume = config.get("resume", "")
    out = Path(resume or config.get("out_dir") or os.path.join(
        "runs", f"{script}-{datetime.datetime.now():%Y%m%d-%H%M%S}"))
    if resume and not (out / "last.pt").exists():
        raise SystemExit(f"error: --resume={resume}: no checkpoint {out / 'last.pt'} to resume")
    if not resume and (out / "last.pt").exists():
        raise SystemExit(f"error: {out} already holds a run; continue it with --resume={out} "
                         "or choose another --out_dir")
    device = select_device(config.get("device", "auto"))
    created = [p for p in [out, *out.parents] if not p.exists()]
    try:  # fail before any training if the records cannot be written
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / ".write_test", b"")
        (out / ".write_test").unlink()
    except OSError as e:
        for p in created:
            _rmdir_if_empty(p)
        raise SystemExit(f"error: cannot write to out_dir {out}: {e.strerror or e}") from None
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
                  started=datetime.datetime.now().isoformat(timespec="seconds"))
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


class Split:
    """A split kept where the model is: on the GPU when it fits (no loader, no per-step host
    copies, as in airbench), else on the host; a memory-mapped array stays on disk.
    y holds the hinge targets, -1 and +1."""

    def __init__(self, X, y, device):
        self.n = len(X)
        self.device = device
        on_disk = isinstance(X, np.memmap) or isinstance(getattr(X, "base", None), np.memmap)
        fits = device.type != "cuda" or X.nbytes < 0.6 * torch.cuda.mem_get_info(device)[0]
        if (on_disk and device.type == "cpu") or not fits:
            self.X = X
        elif device.type == "cpu":
            self.X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        else:
            # Copied in chunks, so a memory-mapped SVHN never needs a 7 GB host copy.
            self.X = torch.empty(X.shape, dtype=torch.float32, device=device)
            for s in range(0, self.n, 65536):
                self.X[s:s + 65536].copy_(torch.from_numpy(
                    np.ascontiguousarray(X[s:s + 65536], dtype=np.float32)))
        self.y = torch.as_tensor(np.ascontiguousarray(y, dtype=np.float32), device=device)
        self.on_device = torch.is_tensor(self.X)

    def rows(self, start, stop):
        x = self.X[start:stop]
        if isinstance(x, np.ndarray):  # a copy: memory-mapped rows are read-only
            x = torch.from_numpy(np.array(x, dtype=np.float32)).to(self.device)
        return x, self.y[start:stop]


def evaluate(model, split, batch_size, loss_reduction="mean", forward=None):
    """§5 val_epoch: a deterministic pass; error = the mean of the per-batch error fractions
    * 100, loss = the mean of the per-batch losses, both summed in float32 as the original did
    (ties in "best" depend on it); the partial batch is dropped, as its integer division did.

    An eval-mode output does not depend on the rest of its batch, so several of the original's
    batches go through one forward pass and are then split back: the same per-batch numbers.
    `forward` is the (possibly compiled) model to call.
    """
    forward = forward or model
    model.eval()
    n_batches = split.n // batch_size
    if n_batches == 0:
        raise ValueError(f"a split of {split.n} examples has no full batch of {batch_size}")
    k = max(d for d in range(1, n_batches + 1)
            if n_batches % d == 0 and d * batch_size <= max(EVAL_ROWS, batch_size))
    errors, losses = [], []
    with torch.no_grad():
        for first in range(0, n_batches, k):
            x, t = split.rows(first * batch_size, (first + k) * batch_size)
            y = forward(x).float().view(k, batch_size, -1)
            t = t.view(k, batch_size, -1)
            errors.append((y.argmax(-1) != t.argmax(-1)).float().mean(-1))
            losses.append(squared_hinge_loss(y, t, loss_reduction))
    errors, losses = torch.cat(errors).cpu().numpy(), torch.cat(losses).cpu().numpy()
    return float(mean32(errors) * np.float32(100)), float(mean32(losses))


def recompute_bn_statistics(model, splits, batch_size):
    """§9: the inference statistics of every BN layer become the averages of the batch
    statistics over the full batches of `splits` (train and valid), the network in eval mode."""
    bns = [m for m in model.modules() if hasattr(m, "collect_statistics")]
    model.eval()
    for bn in bns:
        bn.collect_statistics(True)
    with torch.no_grad():
        for split in splits:
            for i in range(split.n // batch_size):
                model(split.rows(i * batch_size, (i + 1) * batch_size)[0])
    for bn in bns:
        bn.collect_statistics(False)


class _Interrupt:
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


# ------------------------------------------------------------------------------------------------
# The training step: one copy of the math, run eagerly, compiled, or captured as a CUDA graph

MODES = dict(eager="the eager modules", compiled="compiled (torch.compile)",
             graph="compiled and captured as a CUDA graph")


def step_mode(compile, device, model, data_on_device):
    """What `compile` ("auto", "true", "false") means on this device for this network:
    "eager", "compiled" (torch.compile) or "graph" (compiled, then captured as a CUDA graph,
    which needs the training set on the GPU)."""
    if compile == "false":
        return "eager"
    n_weights = sum(m.weight.numel() for m in binary_layers(model))
    if compile == "auto" and (device.type not in ("cuda", "cpu")
                              or device.type == "cpu" and n_weights < AUTO_COMPILE_CPU_WEIGHTS):
        return "eager"
    return "graph" if device.type == "cuda" and data_on_device else "compiled"


def _allow_recompiles():
    """Each network, precision and optimizer that one process compiles (benchmark.py's nine fast
    steps, a test suite, a notebook that trains several runs) adds an entry to the same
    functions' compile caches (Sequential's forward, the optimizer's update); past dynamo's
    default limit of 8 entries it would quietly run those functions eagerly from then on."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), COMPILE_CACHE_ENTRIES))


def autocast(precision, device):
    """bf16: the products (matmuls, convolutions) in bfloat16; the batch norm statistics, the
    loss, the real-valued weights and Adam's moments stay float32. fp32 and tf32: none."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def set_precision(precision, device, deterministic=True):
    """fp32: the original's float32 arithmetic; tf32: TF32 matmuls and convolutions on GPUs
    that have them. On CUDA also, unless deterministic=False (benchmark.py's comparison):
    cuDNN's deterministic algorithms, and inductor's deterministic mode, which picks its kernels'
    block sizes by rule instead of by timing them (timing on another node, or with a cold cache
    after a requeue, could pick another order of summation). A seeded run then repeats exactly,
    and a resumed one continues exactly, wherever it runs (README, "What is bit-exact where")."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = False
        import torch._inductor.config as inductor
        if hasattr(inductor, "deterministic"):  # torch >= 2.6
            inductor.deterministic = deterministic


def full_device(device):
    """torch.device("cuda") with its index: tensors made on it say cuda:N, and a device
    without an index compares unequal to every one with an index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class TrainStep:
    """One training step (§5, §2): the minibatch order[i*B:(i+1)*B] gathered from the training
    set, Wb drawn, the forward pass, the loss, the straight-through backward and the optimizer's
    update; the loss goes to losses[i] and i moves on, all on the device, so no step waits for
    the host.

    mode "eager" runs the modules as they are; "compiled" runs them (forward, backward and the
    optimizer's update) through torch.compile; "graph" captures the compiled step once as a
    CUDA graph, after WARMUP_STEPS real steps, and replays it for every later step of every
    epoch (the epoch's order, the LR and i are tensors it reads). Every mode runs `_step`.
    When compiling or capturing fails, the step says why and goes on with the eager modules.
    """

    def __init__(self, model, optimizer, train_set, batch_size, loss_reduction="mean",
                 mode="eager", precision="fp32"):
        self.model, self.optimizer, self.data = model, optimizer, train_set
        self.batch_size = batch_size
        self.n_batches = train_set.n // batch_size
        self.loss_reduction = loss_reduction
        self.precision = precision
        device = train_set.device
        self.order = torch.zeros(train_set.n, dtype=torch.long, device=device)
        self.order_host = np.arange(train_set.n)
        self.i = torch.zeros((), dtype=torch.long, device=device)
        self.i_host = 0
        self.losses = torch.zeros(max(self.n_batches, 1), dtype=torch.float32, device=device)
        self.offsets = torch.arange(batch_size, device=device)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.names = {id(p): n for n, p in model.named_parameters()}  # for the guards' messages
        self.device = full_device(device)
        self.graph = None
        self.steps = 0
        self._use(mode)

    def _use(self, mode):
        self.mode = mode
        if mode == "eager":
            self.forward, self.update = self.model, self.optimizer.update
        else:
            _allow_recompiles()
            self.forward = torch.compile(self.model, dynamic=False)
            self.update = torch.compile(self.optimizer.update, dynamic=False)

    def start_epoch(self, order, batch=0, losses=None):
        self.order_host = np.asarray(order)
        self.order.copy_(torch.from_numpy(self.order_host))
        self.i.fill_(batch)
        self.i_host = batch
        self.losses.zero_()
        if losses is not None and len(losses):
            self.losses[:len(losses)] = torch.as_tensor(losses).to(self.losses.device)

    def counters(self):
        """(name, tensor, how much one training step moves it): each optimizer step count, and
        each binary layer's draw counter (a stochastic layer draws once per step)."""
        out = [(f"the optimizer's step count of {self.names.get(id(p), '?')}",
                self.optimizer.state[p]["step"], 1) for p in self.params]
        return out + [(f"the draw counter of layer {n}", m.draws, int(m.binary and m.stochastic))
                      for n, m in self.model.named_modules() if isinstance(m, BinaryLayerMixin)]

    def counts(self):
        """The counters' values, with one host sync."""
        return torch.stack([t.to(self.device, torch.float64)
                            for _, t, _ in self.counters()]).tolist()

    def _step(self):
        if self.data.on_device:
            idx = self.order.index_select(0, self.i * self.batch_size + self.offsets)
            x, t = self.data.X.index_select(0, idx), self.data.y.index_select(0, idx)
        else:  # a memory-mapped set: gathered on the host, outside any graph
            idx = self.order_host[self.i_host * self.batch_size:(self.i_host + 1) * self.batch_size]
            x = torch.from_numpy(np.ascontiguousarray(self.data.X[idx], dtype=np.float32))
            x, t = x.to(self.data.device), self.data.y[torch.from_numpy(idx).to(self.data.device)]
        with autocast(self.precision, self.data.device):
            output = self.forward(x)
        loss = squared_hinge_loss(output.float(), t, self.loss_reduction)
        grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():  # one grad mode at every call: no recompiling for it
            self.update(grads)
        self.losses.index_copy_(0, self.i.view(1), loss.detach().view(1))
        self.i += 1

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
        elif self.mode != "eager" and self.steps == 0:
            self._first_compiled_step()
        elif self.mode == "graph" and self.steps >= WARMUP_STEPS:
            self._capture()  # and this step, one way or another
        elif self.mode == "graph":
            self._side_stream_step()
        else:
            self._step()
        self.i_host += 1
        self.steps += 1

    def _first_compiled_step(self):
        """Compilation happens here; if it fails, the state before it comes back and the step
        runs eagerly (the layers keep their counter streams, so the run stays the same run)."""
        saved = _snapshot(self.model, self.optimizer), self.i.clone(), self.losses.clone()
        try:
            if self.mode == "graph":
                self._side_stream_step()
            else:
                self._step()
        except Exception as e:  # dynamo, inductor and the C++/Triton compilers raise many kinds
            _restore(self.model, self.optimizer, saved[0])
            self.i.copy_(saved[1])
            self.losses.copy_(saved[2])
            print(f"warning: torch.compile failed ({_first_line(e)}); continuing with the eager "
                  "modules (slower; --compile=false skips this)")
            self._use("eager")
            self._step()

    def _side_stream_step(self):
        # CUDA graphs want the steps before a capture on a side stream, of the run's GPU.
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._step()
            torch.cuda.current_stream(self.device).wait_stream(stream)

    def written(self):
        """(name, tensor) for every tensor the step writes, the most telling first: the losses,
        the batch counter, the optimizer's state (its step counts), the network's parameters
        and buffers (the draw counters among them)."""
        named = [("the losses", self.losses), ("the batch counter", self.i)]
        named += [(f"optimizer state {k!r} of {self.names.get(id(p), '?')}", v)
                  for p in self.params for k, v in self.optimizer.state[p].items()
                  if torch.is_tensor(v)]
        named += [(f"parameter {n}", t) for n, t in self.model.named_parameters()]
        return named + [(f"buffer {n}", t) for n, t in self.model.named_buffers()]

    def tensors(self):
        """(name, tensor) for every tensor the step reads: what a CUDA graph reads at fixed
        addresses, so all of it must be on the run's device (a CPU tensor becomes a scalar baked
        in at capture)."""
        return self.written() + [
            ("the learning rate", self.optimizer.LR), ("the W_LR_scales", self.optimizer._scale),
            ("the epoch's order", self.order), ("the batch offsets", self.offsets),
            ("the training inputs", self.data.X), ("the training targets", self.data.y)]

    def _misplaced(self):
        """The first tensor the step reads that is not on the run's device, or None."""
        for name, t in self.tensors():
            if t.device != self.device:
                return f"{name} is on {t.device}"
        return None

    def _capture(self):
        """Checks before and after the capture (what a graph would silently get wrong): every
        tensor on the device, else no graph; the first replay equal to the compiled step from
        the same state, else no graph. Any failure: the compiled step without a graph."""
        misplaced = self._misplaced()
        if misplaced:
            return self._without_graph(f"not capturing a CUDA graph: {misplaced}, not "
                                       f"{self.device} (a graph would freeze its value)")
        rng = torch.cuda.get_rng_state(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            # On the run's device: torch.cuda.graph's default stream is one of the device that
            # was current at its first use, which is 0 for a run on cuda:1.
            with torch.cuda.device(self.device), \
                    torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
                self._step()  # recorded, not run: the step it records runs at replay
        except Exception as e:
            self._clean_up_after_capture(rng, e)
            return self._without_graph(f"CUDA graph capture failed ({_first_line(e)})")
        self.graph = graph
        differs = self._check_first_replay()
        if differs:
            self.graph = None
            self.mode = "compiled"
            print(f"warning: the CUDA graph's first replay differs from the compiled step "
                  f"({differs}); continuing with the compiled step without a graph")

    def _without_graph(self, why):
        print(f"warning: {why}; continuing with the compiled step without a graph")
        self.mode = "compiled"
        self._step()

    def _clean_up_after_capture(self, rng, error):
        """A failed capture can leave CUDA's default generator in capture state (seen on an
        H100: "Offset increment outside graph capture"), which dropout would hit later: its
        state goes back to the one before the capture, and a draw checks it."""
        try:
            torch.cuda.synchronize(self.device)
            torch.cuda.set_rng_state(rng, self.device)
            torch.rand(1, device=self.device)
            torch.cuda.synchronize(self.device)
        except Exception as e:
            raise SystemExit(f"error: a failed CUDA graph capture ({_first_line(error)}) left "
                             f"CUDA unusable in this process ({_first_line(e)}); run it again "
                             "with --compile=false (a resume may add it too)") from None

    def _check_first_replay(self):
        """The replay against the compiled step from the same state: the loss, every parameter,
        buffer and optimizer state (Adam's step count, the draw counters exactly). Returns what
        differed, or None."""
        written = self.written()
        before = [t.clone() for _, t in written]
        rng = torch.cuda.get_rng_state(self.device)  # dropout draws the same in both
        self._step()
        compiled = [t.clone() for _, t in written]
        _copy_all([t for _, t in written], before)
        torch.cuda.set_rng_state(rng, self.device)
        self.graph.replay()
        differs = [n for (n, t), c in zip(written, compiled) if not _same(t, c)]
        if differs:  # the run goes on from the compiled step's result
            _copy_all([t for _, t in written], compiled)
            return ", ".join(differs[:3]) + (f" and {len(differs) - 3} more"
                                             if len(differs) > 3 else "")
        return None


def _first_line(e):
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:300]


def _copy_all(targets, sources):
    with torch.no_grad():
        for t, s in zip(targets, sources):
            t.copy_(s)


def _same(a, b):
    """Counters and step counts exactly; float32 values to the tolerance between the compiled
    and the eager step (tests/test_fast_step.py): a replay runs the compiled kernels."""
    if not a.is_floating_point() or a.dtype == torch.float64:
        return torch.equal(a, b)
    return torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-3)


def _to_host(obj):
    """A copy in host memory of tensors in (nested) dicts, lists and tuples: what a checkpoint
    holds, taken at once so that training can go on while it is written."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    return copy.copy(obj)


def _snapshot(model, optimizer):
    return _to_host(dict(model=model.state_dict(), optimizer=optimizer.state_dict()))


def _restore(model, optimizer, snapshot):
    model.load_state_dict(snapshot["model"])
    optimizer.load_state_dict(snapshot["optimizer"])


# ------------------------------------------------------------------------------------------------
# Random streams: the stochastic layers sample from counter streams in a compiled step and from
# torch.Generators in the eager modules (binary_connect.BinaryLayerMixin.stream).

def set_stream_kind(model, kind):
    for m in binary_layers(model):
        m.rng = kind


def _rng_states(model, device):
    # The run's own GPU only: a resume on a machine with fewer GPUs must still work.
    layers = binary_layers(model)
    kind = layers[0].rng if layers else "generator"
    return dict(numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                kind=kind, device=device.type,
                layers=[m.generator.get_state() for m in layers] if kind == "generator" else None)


def _set_rng_states(model, states, device):
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    layers = binary_layers(model)
    kind = layers[0].rng if layers else "generator"
    saved_kind = states.get("kind", "generator")
    if kind == "counter":
        if saved_kind != "counter" and any(m.stochastic for m in layers):
            print("note: this run sampled its binary weights from torch.Generator streams (the "
                  "eager modules); the compiled step samples from counter streams: from here on "
                  "each layer draws from its counter stream, a new stream, not a repeat")
        return
    restored = saved_kind == "generator" and states.get("device", device.type) == device.type
    for m, s in zip(layers, states["layers"] if restored else [None] * len(layers)):
        if s is not None:
            m.generator.set_state(s)
        else:
            # A stream from another device kind (or a counter stream) cannot continue here:
            # a new seed derived from (seed, draws so far) gives a stream that does not repeat it.
            seed = np.random.SeedSequence([m.seed, int(m.draws)]).generate_state(1)[0]
            m.generator.manual_seed(int(seed))
    if not restored and any(m.stochastic for m in layers):
        print(f"note: the layers' random streams were saved as {saved_kind} streams on "
              f"{states.get('device')} and cannot continue as torch.Generator streams on "
              f"{device.type}: each layer continues with a new stream seeded from (its seed, its "
              "draws so far), which does not repeat the old one")


# ------------------------------------------------------------------------------------------------
# Checkpoints: taken to host memory at the end of an epoch, written by a background thread

class CheckpointWriter:
    """Writes each epoch's checkpoint (best.pt, then last.pt, then metrics.jsonl, each atomic)
    in a background thread from a host-memory snapshot, so a 2-second epoch does not wait for
    150 MB to reach the disk. One write at a time: the next snapshot waits for the previous
    write. metrics.jsonl is written after last.pt, so it never holds an epoch that a resume
    would repeat."""

    def __init__(self, run):
        self.run = run
        self.thread = None
        self.error = None

    def save(self, checkpoint, best):
        self.wait()
        self.thread = threading.Thread(target=self._write, args=(checkpoint, best))
        self.thread.start()

    def _write(self, checkpoint, best):
        try:
            _write_checkpoint(self.run, checkpoint, best)
        except BaseException as e:  # raised in the training thread at its next wait()
            self.error = e

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _checkpoint(run, model, optimizer, state):
    return _to_host(dict(version=CHECKPOINT_VERSION, model=model.state_dict(),
                         optimizer=optimizer.state_dict(), rng=_rng_states(model, run.device),
                         hparams=run.config, **state))


def _write_checkpoint(run, checkpoint, best=False):
    try:
        # best.pt first: if it fails, last.pt still holds the previous epoch, which a resume
        # then redoes, best.pt included.
        if best:
            atomic_torch_save(dict(version=CHECKPOINT_VERSION, model=checkpoint["model"],
                                   epoch=checkpoint["epoch"], hparams=run.config),
                              run.path("best.pt"))
        atomic_torch_save(checkpoint, run.path("last.pt"))
        log_metrics(run, checkpoint["history"])
    except OSError as e:
        raise SystemExit(f"error: could not write a checkpoint in {run.out_dir} "
                         f"({e.strerror or e}); the previous one is intact. Free some space, "
                         f"then resume with: python {run.script}.py --resume={run.out_dir}")


def _save_checkpoint(run, model, optimizer, state, best=False):
    """The checkpoint of this moment, written before returning."""
    _write_checkpoint(run, _checkpoint(run, model, optimizer, state), best)


def log_metrics(run, history):
    """metrics.jsonl is rewritten from the checkpointed history, so a run killed between the
    report and the checkpoint never keeps a line that its resume would repeat."""
    text = "".join(json.dumps(m) + "\n" for m in history)
    atomic_write_bytes(run.path("metrics.jsonl"), text.encode())


def _upgrade(checkpoint, model):
    """A version 1 checkpoint (optimizer steps as ints, no draw counters, generator streams)
    read as version 2: every stochastic layer had drawn once per step taken."""
    state = checkpoint["optimizer"]["state"]
    steps = 0
    for s in state.values():
        steps = s.pop("t")
        s["step"] = torch.tensor(float(steps), dtype=torch.float64)
    for name, m in model.named_modules():
        if m in binary_layers(model):
            checkpoint["model"][f"{name}.draws"] = torch.tensor(
                steps if m.binary and m.stochastic else 0, dtype=torch.int64)
    checkpoint["rng"]["kind"], checkpoint["rng"]["device"] = "generator", None
    checkpoint.setdefault("elapsed", 0.)
    return checkpoint


def _load_checkpoint(run, model, optimizer, n_train):
    path = run.path("last.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path}: {e}") from None
    if checkpoint.get("version") not in (1, CHECKPOINT_VERSION):
        raise SystemExit(f"error: {path} is a version {checkpoint.get('version')} checkpoint; "
                         f"this code reads versions 1 and {CHECKPOINT_VERSION}")
    if checkpoint["version"] == 1:
        checkpoint = _upgrade(checkpoint, model)
    if len(checkpoint["order"]) != n_train:  # the shuffle order indexes the training set
        raise SystemExit(f"error: {path} was trained on {len(checkpoint['order'])} training "
                         f"examples, but the data now gives {n_train}: resume with the same data")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    _set_rng_states(model, checkpoint["rng"], run.device)
    state = {k: checkpoint[k] for k in ("epoch", "batch", "LR", "best_val_err", "best_epoch",
                                         "test_err", "test_loss", "history", "losses", "order")}
    state["elapsed"] = checkpoint.get("elapsed", 0.)
    state["unreported"] = checkpoint.get("unreported", 0.)
    print(f"Resumed from {path}: epoch {state['epoch']} done"
          + (f", {state['batch']} batches into epoch {state['epoch'] + 1}" if state["batch"]
             else ""))
    return state


# ------------------------------------------------------------------------------------------------
# The loop

def _stop(run, signum, where):
    print(f"\n{signal.Signals(signum).name} received {where}; checkpoint written to "
          f"{run.path('last.pt')}.\nResume with: python {run.script}.py --resume={run.out_dir}")
    sys.stdout.flush()
    raise SystemExit(128 + signum)


def _not_finite(losses, epoch):
    """The error for a NaN or infinite training loss, or None."""
    bad = np.nonzero(~np.isfinite(losses))[0]
    if len(bad):
        return (f"error: the training loss became {float(losses[bad[0]])} at epoch {epoch}, "
                f"batch {int(bad[0]) + 1}; stopping.")
    return None


def _give_up(run, writer, error, option=""):
    """Ends the run with `error` and what is left of it: once the previous epoch's checkpoint
    is on disk, a resume command (with `option`); before the first one, nothing is kept."""
    writer.wait()
    if run.path("last.pt").exists():
        raise SystemExit(f"{error} The last good checkpoint is kept: resume with: python "
                         f"{run.script}.py --resume={run.out_dir}{option}")
    raise SystemExit(f"{error} Nothing was kept: no epoch had ended."
                     + (f" Run it again with{option}." if option else ""))


def _miscounted(step, before, n, epoch):
    """After each epoch: every optimizer step count has moved by the n steps taken, and every
    stochastic layer's draw counter by its n draws. A CUDA graph that replays nothing, or not
    the step it should, fails this while its loss may still look fine. The error, or None."""
    for (name, _, per_step), b, a in zip(step.counters(), before, step.counts()):
        if a - b != n * per_step:
            return (f"error: in epoch {epoch}, {name} moved by {a - b:g} in {n} training steps "
                    f"instead of {n * per_step}: the training step ({MODES[step.mode]}) did not "
                    "run as it should; stopping.")
    return None


BIG_LOSS_NOTE = ("  (a validation or test loss this large is expected early in stochastic BC on "
                 "small networks: the BN statistics were gathered with sampled +-H weights, the "
                 "evaluation uses the real-valued ones; docs/original.md §3)")


def train(model, optimizer, data, run, batch_size, LR_start, LR_decay, num_epochs,
          compile="false", precision="fp32", loss_reduction="mean", monitor_step=1,
          bn_stats="ema"):
    """§5: shuffle (numpy), train with partial batches dropped, validate every epoch (every
    monitor_step epochs, §9), evaluate test only when validation error <= the best so far, print
    the original's report. data: ((X, t), (X, t), (X, t)) for train, valid, test, t in {-1, +1}.

    The reported seconds of an epoch count its training steps, the reshuffle and the evaluation
    (for a resumed epoch, its part before the interruption too); the checkpoint is written in
    the background and not counted.
    """
    device = run.device
    train_set, val_set, test_set = (Split(X, y, device) for X, y in data)
    for name, split in (("training", train_set), ("validation", val_set), ("test", test_set)):
        if split.n < batch_size:  # it would have no full batch (§5 drops partial ones)
            raise SystemExit(f"error: the {name} set has {split.n} examples, fewer than "
                             f"batch_size={batch_size}")
    n_batches = train_set.n // batch_size
    mode = step_mode(str(compile).lower(), device, model, train_set.on_device)
    # The stream is a function of the configuration, not of whether compiling succeeds: a
    # compiled step that falls back to the eager modules keeps drawing from the same streams.
    set_stream_kind(model, "generator" if mode == "eager" else "counter")
    set_precision(precision, device)
    print(f"Training step: {MODES[mode]}, {precision}, on {device_name(device)}"
          + ("" if mode == "eager" else " (compiled during the first step: up to a few minutes "
                                        "on a CPU; --compile=false skips it)"), flush=True)
    step = TrainStep(model, optimizer, train_set, batch_size, loss_reduction, mode, precision)

    state = dict(epoch=0, batch=0, LR=LR_start, best_val_err=100., best_epoch=1,
                 test_err=None, test_loss=None, history=[], losses=None, elapsed=0., unreported=0.,
                 order=np.arange(train_set.n))
    if run.resume:
        state = _load_checkpoint(run, model, optimizer, train_set.n)
    else:
        # §5: the train set is shuffled once before epoch 1 ...
        np.random.shuffle(state["order"])
    log_metrics(run, state["history"])

    def evaluation(split):
        with autocast(precision, device):
            return evaluate(model, split, batch_size, loss_reduction, forward=step.forward)

    writer = CheckpointWriter(run)
    try:
        with _Interrupt() as interrupt:
            for epoch in range(state["epoch"] + 1, num_epochs + 1):
                start_time = time.time() - state["elapsed"]
                LR = state["LR"]
                optimizer.set_learning_rate(LR)
                model.train()
                step.start_epoch(state["order"], state["batch"], state["losses"])
                counts = step.counts()
                batches = range(state["batch"], n_batches)
                if sys.stderr.isatty() and sys.stdout.isatty():
                    from tqdm import tqdm
                    batches = tqdm(batches, desc=f"epoch {epoch}", leave=False,
                                   initial=state["batch"], total=n_batches)
                for i in batches:
                    step()
                    if interrupt.signum is not None:
                        losses = step.losses[:i + 1].cpu().numpy()
                        if error := _not_finite(losses, epoch):
                            _give_up(run, writer, error)
                        state.update(epoch=epoch - 1, batch=i + 1, losses=losses,
                                     elapsed=time.time() - start_time)
                        writer.wait()
                        _save_checkpoint(run, model, optimizer, state)
                        _stop(run, interrupt.signum, f"during epoch {epoch} (after batch "
                                                     f"{i + 1} of {n_batches})")
                losses = step.losses[:n_batches].cpu().numpy()  # the epoch's one host sync
                if error := _miscounted(step, counts, n_batches - state["batch"], epoch):
                    _give_up(run, writer, error, " --compile=false")
                if error := _not_finite(losses, epoch):
                    _give_up(run, writer, error)
                train_loss = float(mean32(losses))
                monitor = epoch % monitor_step == 0 or epoch == num_epochs
                improved = False
                if monitor:
                    # ... and again after each epoch's training pass (a composed permutation,
                    # exactly as the original's shuffle of the arrays).
                    perm = np.arange(train_set.n)
                    np.random.shuffle(perm)
                    state["order"] = state["order"][perm]
                    if bn_stats == "recompute":
                        recompute_bn_statistics(model, (train_set, val_set), batch_size)
                    val_err, val_loss = evaluation(val_set)
                    improved = val_err <= state["best_val_err"]  # ties count (§5)
                    if improved:
                        state["best_val_err"], state["best_epoch"] = val_err, epoch
                        state["test_err"], state["test_loss"] = evaluation(test_set)
                    seconds = time.time() - start_time
                    # metrics.jsonl's seconds also count the epochs since its previous line
                    # (monitor_step > 1), so that they add up to the run's time
                    metrics = dict(epoch=epoch, LR=LR, train_loss=train_loss, val_loss=val_loss,
                                   val_err=val_err, best_epoch=state["best_epoch"],
                                   best_val_err=state["best_val_err"],
                                   test_loss=state["test_loss"], test_err=state["test_err"],
                                   seconds=seconds + state["unreported"])
                    state["unreported"] = 0.
                    print(report(epoch, num_epochs, seconds, metrics))
                    if val_loss > 1000 or improved and state["test_loss"] > 1000:
                        print(BIG_LOSS_NOTE)
                    state["history"].append(metrics)
                else:
                    seconds = time.time() - start_time
                    state["unreported"] += seconds
                    print(f"Epoch {epoch} of {num_epochs} took {str2(seconds)}s (training "
                          f"loss {str2(train_loss)}; evaluated every {monitor_step} epochs)")
                sys.stdout.flush()
                state.update(epoch=epoch, batch=0, losses=None, elapsed=0.,
                             LR=LR * LR_decay)  # §4.1
                writer.save(_checkpoint(run, model, optimizer, state), best=improved)
                if interrupt.signum is not None and epoch < num_epochs:  # during evaluation
                    writer.wait()
                    _stop(run, interrupt.signum, f"at the end of epoch {epoch}")
    finally:
        writer.wait()
    best = state["history"][-1] if state["history"] else None
    if best:
        print(f"Best validation error rate {str2(best['best_val_err'])}% at epoch "
              f"{best['best_epoch']}; test error rate there: {str2(best['test_err'])}%")
    return state["history"]


def fit(model, data, run):
    """What every script does once its data and network are built: hinge targets, the
    optimizer (§2.2), then the loop, with the training step its `compile` and `precision` ask
    for. Hyperparameters come from run.config."""
    c = run.config
    model.to(run.device)
    # for the hinge loss: one-hot {0, 1} -> {-1, +1}
    data = [(X, 2 * np.asarray(y, dtype=np.float32) - 1.) for X, y in data]
    optimizer = make_optimizer(model, c["LR_start"], c.get("optimizer", "adam"))
    print('Training...')
    return train(model, optimizer, data, run, c["batch_size"], c["LR_start"],
                 lr_decay(c["LR_start"], c["LR_fin"], c["num_epochs"]), c["num_epochs"],
                 compile=c.get("compile", "false"), precision=c.get("precision", "fp32"),
                 loss_reduction=c.get("loss_reduction", "mean"),
                 monitor_step=c.get("monitor_step", 1), bn_stats=c.get("bn_stats", "ema"))
