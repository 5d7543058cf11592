"""A CPU stand-in for torch.cuda's streams and CUDA graphs, to run fast_step.TrainStep's "graph"
mode (warm-up, one capture, replays across epochs) without a GPU, and to fail where a real graph
would fail.

What a real capture does, and the stand-in with it:
- a capture records the device kernels without running them: the stand-in runs the step and
  puts every device tensor back as it was;
- host-side work runs once, at capture, and is never replayed; a host value that a kernel reads
  (a 0-dim CPU tensor handed to a CUDA kernel as a scalar) is baked into the graph: the stand-in
  snapshots every tensor it counts as host memory after the capture and puts those values in
  place for every replay, so a replay reads the captured values; after it, each host tensor is
  as it was before the replay (the replay's host-side writes vanish);
- a Python number that the compiled step read is a constant in the captured kernels: if a replay
  would recompile (dynamo specialised on a value that has changed since), the stand-in raises.

On this machine every tensor is on the CPU, so the tensors that a CUDA run would hold in host
memory are marked: `host.mark(t)`, or `emulated_resume` for what a resume loads with
torch.load(map_location="cpu"), where a `.to(device)` then stands for a copy to the GPU.
What this cannot show (the kernels' fixed addresses, no host syncs inside a capture) is
tests/test_fast_step_cuda.py's, on a GPU.
"""
import contextlib
import weakref

import torch
from torch.overrides import TorchFunctionMode


import fast_step


class HostMemory:
    """The tensors that a CUDA run would hold in host memory (weakly: they may go away)."""

    def __init__(self):
        self.refs = {}

    def mark(self, t):
        self.refs[id(t)] = weakref.ref(t)

    def __contains__(self, t):
        ref = self.refs.get(id(t))
        return ref is not None and ref() is t

    def live(self):
        return [t for t in (r() for r in self.refs.values()) if t is not None]


def _tensors_in(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


class _CopyToDevice(TorchFunctionMode):
    """t.to(<a device>) of a host tensor stands for a host-to-device copy: a new, unmarked
    tensor (on a CPU-only machine, torch returns t itself)."""

    def __init__(self, host):
        super().__init__()
        self.host = host

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.to and args and args[0] in self.host and out is args[0]:
            to_device = "device" in kwargs or any(
                isinstance(a, (torch.device, str)) or torch.is_tensor(a) for a in args[1:])
            if to_device:
                out = out.clone()
        return out


@contextlib.contextmanager
def emulated_resume(host):
    """While active, torch.load marks what it loads as host memory (map_location="cpu" on a
    CUDA machine), and .to(device) of it makes a device copy."""
    real_load = torch.load

    def load(*args, **kwargs):
        obj = real_load(*args, **kwargs)
        for t in _tensors_in(obj):
            host.mark(t)
        return obj
    torch.load = load
    try:
        with _CopyToDevice(host):
            yield
    finally:
        torch.load = real_load


def _unique_graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


class StandIn:
    """Installs the stand-in (see the module's docstring) with pytest's monkeypatch; counts the
    captures and replays; `fail` makes the next captures raise as a failing capture does, and
    `replay_does_nothing` makes replays do nothing, as a graph captured on another device's
    stream does."""

    def __init__(self, monkeypatch):
        self.host = HostMemory()
        self.captures = self.replays = 0
        self.fail = False
        self.replay_does_nothing = False  # a graph that recorded nothing
        self.capture_devices = []  # the current device when each capture began
        self.rng_restored = []
        self.current_device = None
        self.rng_state = torch.zeros(16, dtype=torch.uint8)
        self._pending = None
        real_step = fast_step.TrainStep._step
        standin = self

        class Graph:
            step = frozen = None

            def replay(self):
                standin.replays += 1
                if standin.replay_does_nothing:
                    return
                graphs = _unique_graphs()
                outside = [(t, t.clone()) for t, _ in self.frozen]  # what the host set since
                standin._put_back(self.frozen)
                real_step(self.step)
                standin._put_back(outside)
                if _unique_graphs() != graphs:
                    raise RuntimeError(
                        "stand-in CUDA graph: a replay recompiled the step, so it read a Python "
                        "value that has changed since the capture; a real graph replays the "
                        "captured value")

        @contextlib.contextmanager
        def capture(graph, stream=None, **kwargs):
            standin.capture_devices.append(standin.current_device)
            if standin.fail:
                raise RuntimeError("operation not permitted when stream is capturing\nmore")
            standin.captures += 1
            standin._pending = graph
            yield

        def step(self):
            graph, standin._pending = standin._pending, None
            if graph is None:
                return real_step(self)
            graph.step = self
            device = [t for _, t in self.written() if t not in standin.host]
            saved = [t.clone() for t in device]
            real_step(self)
            with torch.no_grad():
                for t, s in zip(device, saved):
                    t.copy_(s)
            graph.frozen = [(t, t.clone()) for t in standin.host.live()]

        @contextlib.contextmanager
        def on_device(device):
            previous, standin.current_device = standin.current_device, torch.device(device)
            try:
                yield
            finally:
                standin.current_device = previous

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        def set_rng_state(state, device=None):
            standin.rng_restored.append(state)
            standin.rng_state = state.clone()

        monkeypatch.setattr(fast_step.TrainStep, "_step", step)
        for name, value in dict(
                CUDAGraph=Graph, graph=capture, Stream=Stream, device=on_device,
                stream=lambda s: contextlib.nullcontext(),
                current_stream=lambda device=None: Stream(),
                synchronize=lambda device=None: None,
                get_rng_state=lambda device=None: standin.rng_state.clone(),
                set_rng_state=set_rng_state).items():
            monkeypatch.setattr(torch.cuda, name, value)

    def _put_back(self, frozen):
        with torch.no_grad():
            for t, value in frozen:
                t.copy_(value)
