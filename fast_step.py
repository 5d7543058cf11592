"""The fast training step: the same modules and the same update as the eager step, run so that
no step waits for the host. Each trick, and why:

 1. The data lives on the device (Split): no loader and no host-to-device copy per step, as in
    airbench; a memory-mapped set too large for the GPU stays on the host.
 2. The step is one function (TrainStep._step): gather the minibatch by index from the epoch's
    order, forward, squared hinge loss, straight-through backward, the optimizer's update; the
    loss goes to losses[i] and i moves on, on the device. The epoch syncs with the host once.
 3. torch.compile fuses the forward pass and the foreach update (binary_connect._Optimizer), so
    a pass over the 10 M weights (draw, binarization, Adam, the clip) is a few kernels.
 4. The stochastic layers draw from counter streams (streams.py) in a compiled step: a pure
    function of (seed, draw count, index) fuses into the kernels and needs no generator state
    registered in a CUDA graph.
 5. On CUDA, the compiled step is captured once as a CUDA graph after WARMUP_STEPS steps and
    replayed for every later step of every epoch: the LR, the order and i are tensors it reads.
 6. Precision: fp32 is the original's float32 (TF32 off); tf32; bf16 autocasts the products only
    (weights, Adam's moments, the BN statistics and the loss stay float32).
 7. Determinism on CUDA: cuDNN's deterministic algorithms and inductor's deterministic mode, so a
    seeded run repeats and a resume continues exactly (docs/runs.md).
 8. Guards, because a wrong graph is silent: before capture every tensor the step reads must be
    on the device; the first replay must equal the compiled step; every epoch each step count
    and draw counter must have moved by the steps taken. Any failure falls back loudly.
 9. If compiling fails, the step says why and runs the eager modules, from the same state.
"""
import contextlib
import copy

import numpy as np
import torch

from binary_connect import BinaryLayerMixin, binary_layers, squared_hinge_loss

# CPU runs with compile="auto" compile networks with at least this many binary weights (the
# paper's: 6.4 M to 14 M), where benchmark.py measured the compiled step about twice as fast;
# a tiny network would spend longer compiling than training.
AUTO_COMPILE_CPU_WEIGHTS = 1_000_000
WARMUP_STEPS = 3  # compiled steps run before a CUDA graph is captured
COMPILE_CACHE_ENTRIES = 64  # per compiled function, in one process (see _allow_recompiles)


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


STEP_MODES = dict(eager="the eager modules", compiled="compiled (torch.compile)",
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
    and a resumed one continues exactly, wherever it runs (docs/runs.md, "What is bit-exact where")."""
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
        state goes back to the one before the capture. No probe draw after it: torch >= 2.11
        keeps a generator state per capture, and a draw would move a dropout run's stream."""
        try:
            torch.cuda.synchronize(self.device)
            torch.cuda.set_rng_state(rng, self.device)
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


def to_host(obj):
    """A copy in host memory of tensors in (nested) dicts, lists and tuples: what a checkpoint
    holds, taken at once so that training can go on while it is written."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    return copy.copy(obj)


def _snapshot(model, optimizer):
    return to_host(dict(model=model.state_dict(), optimizer=optimizer.state_dict()))


def _restore(model, optimizer, snapshot):
    model.load_state_dict(snapshot["model"])
    optimizer.load_state_dict(snapshot["optimizer"])


def set_stream_kind(model, kind):
    for m in binary_layers(model):
        m.stream_kind = kind


def miscounted(step, before, n, epoch):
    """After each epoch: every optimizer step count has moved by the n steps taken, and every
    stochastic layer's draw counter by its n draws. A CUDA graph that replays nothing, or not
    the step it should, fails this while its loss may still look fine. The error, or None."""
    for (name, _, per_step), b, a in zip(step.counters(), before, step.counts()):
        if a - b != n * per_step:
            return (f"error: in epoch {epoch}, {name} moved by {a - b:g} in {n} training steps "
                    f"instead of {n * per_step}: the training step ({STEP_MODES[step.mode]}) did not "
                    "run as it should; stopping.")
    return None
