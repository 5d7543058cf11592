"""The "graph" mode of the training step (a compiled step captured as a CUDA graph) on the CPU,
through the stand-in of tests/cuda_standin.py: what a reading found it would get wrong on a GPU
(issue 14), the stand-in's own freezing, and the run-time guards (before the capture, after it,
every epoch). What only a GPU can show is tests/test_fast_step_cuda.py's."""
import functools
import types

import numpy as np
import pytest
import torch


import binary_connect as bc
import models
import fast_step
import checkpoints
import training
from cuda_standin import StandIn, emulated_resume
from test_fast_step import _network, _run, _state, quiet
from test_training import new_run, one_hot, tiny_data, tiny_mlp  # noqa: F401 (a fixture)

CPU = torch.device("cpu")
N, BATCH = 40, 20  # two steps an epoch


@pytest.fixture
def standin(monkeypatch):
    return StandIn(monkeypatch)


def _data():
    rng = np.random.RandomState(5)
    X = rng.randn(N, 64).astype(np.float32)
    t = (2. * np.eye(10)[rng.randint(0, 10, N)] - 1.).astype(np.float32)
    return fast_step.Split(X, t, CPU)


def _epochs(step, optimizer, epochs):
    """Epochs of _run's schedule (LR halved each epoch, a new order each), from `epochs[0]`."""
    losses = []
    for epoch in epochs:
        optimizer.set_learning_rate(0.01 * 0.5 ** epoch)
        step.start_epoch(np.random.RandomState(epoch).permutation(N))
        for _ in range(N // BATCH):
            step()
        losses.append(step.losses.clone())
    return torch.cat(losses)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    """_run's 8 compiled steps (4 epochs), compiled once for the tests that compare with it."""
    return _run("mlp", True, "compiled", steps=8)


def _fresh(mode):
    model, _ = _network("mlp", True)
    optimizer = quiet(bc.make_optimizer, model, 0.01)
    fast_step.set_stream_kind(model, "counter")
    model.train()
    return model, optimizer, fast_step.TrainStep(model, optimizer, _data(), BATCH, mode=mode)


# ---------------------------------------------------------------------------------------------
# Fault 1: a resume puts the optimizer's state where its parameters are
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_loaded_optimizer_state_is_on_the_parameters_device(optimizer):
    """Parameters on torch's meta device stand in for CUDA: every state tensor, "step"
    included, goes to its parameter's device, its dtype kept (torch leaves "step" where it was
    loaded, on the CPU after map_location="cpu")."""
    np.random.seed(0)
    model = models.mlp(num_units=8, n_hidden_layers=1)
    saved = quiet(bc.make_optimizer, model, 0.01, optimizer).state_dict()
    np.random.seed(0)
    meta = models.mlp(num_units=8, n_hidden_layers=1).to("meta")
    loaded = quiet(bc.make_optimizer, meta, 0.01, optimizer)
    loaded.load_state_dict(saved)
    for p in loaded._all:
        assert loaded.state[p]["step"].dtype == torch.float64
        for k, v in loaded.state[p].items():
            assert v.device.type == "meta", k


@pytest.mark.slow  # compiles
def test_graph_mode_after_a_resume_continues_as_the_compiled_step(standin, tmp_path, capsys):
    """Two epochs compiled, a checkpoint, a resume as on a GPU (what torch.load brings is in host
    memory), then four epochs in graph mode: the same numbers as six compiled epochs in a row.
    Without the fix above, Adam's step count stays a host tensor, which the graph freezes."""
    model, optimizer, step = _fresh("compiled")
    reference = _epochs(step, optimizer, range(6))
    expected = _state(model, optimizer)

    model, optimizer, step = _fresh("compiled")
    _epochs(step, optimizer, range(2))
    run = types.SimpleNamespace(path=lambda name: tmp_path / name, config={}, device=CPU,
                                script="mnist", out_dir=tmp_path)
    progress = checkpoints.Progress(order=np.arange(N), LR=0.0025, epoch=2)
    checkpoints.save_checkpoint(run, model, optimizer, progress)

    model, optimizer, _ = _fresh("compiled")
    with emulated_resume(standin.host):
        quiet(checkpoints.load_checkpoint, run, model, optimizer, N)
    step = fast_step.TrainStep(model, optimizer, _data(), BATCH, mode="graph")
    losses = _epochs(step, optimizer, range(2, 6))
    assert "warning" not in capsys.readouterr().out
    assert step.mode == "graph" and standin.captures == 1
    assert torch.equal(losses, reference[2 * (N // BATCH):])
    state = _state(model, optimizer)
    for k in expected:
        assert torch.equal(state[k], expected[k]), k


# ---------------------------------------------------------------------------------------------
# The stand-in fails where a real graph fails: host values are frozen at capture
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # compiles
def test_standin_freezes_a_host_tensor_the_step_reads(standin):
    """The learning rate left in host memory: a graph bakes the value it had at capture, so
    the epochs after it train with the first epoch's LR."""
    compiled_losses, compiled, _ = _compiled_reference()
    model, optimizer, step = _fresh("graph")
    standin.host.mark(optimizer.LR)
    losses = _epochs(step, optimizer, range(4))
    assert step.mode == "graph"
    # the first two epochs (one LR) agree; after them, the frozen LR shows
    assert torch.equal(losses[:4], compiled_losses[:4])
    assert not torch.equal(losses[4:], compiled_losses[4:])
    assert float(optimizer.LR) == 0.01 * 0.5 ** 3  # set on the host, never read by the graph


@pytest.mark.slow  # compiles
def test_standin_refuses_a_python_number_the_compiled_step_read(standin, monkeypatch):
    """The LR read as a Python number inside the compiled update is a constant of the captured
    kernels; a replay after it changed (epoch 2) would need a recompile: the stand-in raises."""
    real_direction, real_set = bc.Adam._direction, bc.Adam.set_learning_rate

    def set_learning_rate(self, LR):
        real_set(self, LR)
        self.host_LR = LR

    def direction(self, grads, state, t):
        size, numerator, denominator = real_direction(self, grads, state, t)
        return size * (1. + 0. * self.host_LR), numerator, denominator
    monkeypatch.setattr(bc.Adam, "set_learning_rate", set_learning_rate)
    monkeypatch.setattr(bc.Adam, "_direction", direction)
    torch._dynamo.reset()
    model, optimizer, step = _fresh("graph")
    with pytest.raises(RuntimeError, match="a replay recompiled the step"):
        _epochs(step, optimizer, range(3))


# ---------------------------------------------------------------------------------------------
# The guards: before the capture, after it, every epoch
# ---------------------------------------------------------------------------------------------

def test_a_tensor_off_the_device_is_named():
    model, optimizer, step = _fresh("graph")
    assert step._misplaced() is None
    p = optimizer._all[0]
    optimizer.state[p]["step"] = torch.zeros((), dtype=torch.float64, device="meta")
    assert step._misplaced() == "optimizer state 'step' of 1.weight is on meta"


def test_the_runs_device_is_compared_with_its_index(monkeypatch):
    """A run on "cuda" makes its tensors on cuda:N; torch.device("cuda") != torch.device("cuda:0"),
    so the placement check compares with the index filled in."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert fast_step.full_device(torch.device("cuda")) == torch.device("cuda", 2)
    assert fast_step.full_device(torch.device("cuda:1")) == torch.device("cuda", 1)
    assert fast_step.full_device(CPU) == CPU


@pytest.mark.slow  # compiles
def test_no_capture_while_a_tensor_is_off_the_device(standin, monkeypatch, capsys):
    compiled_losses, compiled, _ = _compiled_reference()
    monkeypatch.setattr(fast_step.TrainStep, "_misplaced",
                        lambda self: "optimizer state 'step' of 0.weight is on cpu")
    losses, state, mode = _run("mlp", True, "graph", steps=8)
    assert mode == "compiled" and standin.captures == 0
    assert ("warning: not capturing a CUDA graph: optimizer state 'step' of 0.weight is on cpu, "
            "not cpu (a graph would freeze its value); continuing with the compiled step "
            "without a graph") in capsys.readouterr().out
    assert torch.equal(losses, compiled_losses)
    for k in compiled:
        assert torch.equal(state[k], compiled[k]), k


# The guards in the contributors' loop (-m "not slow"): compiling is left out (the "compiled"
# step runs the modules as they are), which the schedule and the checks do not see.

@pytest.fixture
def uncompiled(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda f, **kwargs: f)


def test_graph_schedule_gives_the_compiled_step_without_compiling(standin, uncompiled, capsys):
    """One capture after WARMUP_STEPS, then replays for every later step of every epoch, the
    first replay checked from the state before it: exactly the compiled step's numbers."""
    compiled_losses, compiled, _ = _run("mlp", True, "compiled", steps=8)
    losses, state, mode = _run("mlp", True, "graph", steps=8)
    assert "warning" not in capsys.readouterr().out
    assert mode == "graph" and standin.captures == 1
    assert standin.replays == 8 - fast_step.WARMUP_STEPS
    assert torch.equal(losses, compiled_losses)
    for k in compiled:
        assert torch.equal(state[k], compiled[k]), k


def test_a_first_replay_that_differs_drops_the_graph_without_compiling(standin, uncompiled,
                                                                       capsys):
    """A graph that does nothing (one captured on another device's stream): the check after
    the capture names what differs, and the run goes on with the compiled step's numbers."""
    compiled_losses, compiled, _ = _run("mlp", True, "compiled", steps=8)
    standin.replay_does_nothing = True
    losses, state, mode = _run("mlp", True, "graph", steps=8)
    assert mode == "compiled" and standin.captures == 1 and standin.replays == 1
    assert ("warning: the CUDA graph's first replay differs from the compiled step (the losses, "
            "the batch counter, optimizer state 'step' of 1.weight and ") in capsys.readouterr().out
    assert torch.equal(losses, compiled_losses)
    for k in compiled:
        assert torch.equal(state[k], compiled[k]), k


def test_the_first_replay_check_sees_a_fraction_of_a_step():
    """A replay that gives weights off by a tenth of a step (LR * W_LR_scale is 0.01 to 1 in
    the paper's networks) is a wrong graph; float32 rounding is not. Counters are exact."""
    w = torch.linspace(-1, 1, 101)
    assert fast_step._same(w, w * (1 + 1e-6))
    assert not fast_step._same(w, w + 1e-2)
    assert not fast_step._same(w, w.clone().index_fill_(0, torch.tensor([7]), 0.))
    counter = torch.tensor(5, dtype=torch.int64)
    assert not fast_step._same(counter, counter + 1)
    step = torch.tensor(5., dtype=torch.float64)
    assert not fast_step._same(step, step + 1e-9)


def test_the_update_reads_the_learning_rate_from_its_tensor_on_the_device():
    """A captured graph reads the LR at a fixed address every epoch: it must be a tensor on the
    parameters' device (meta stands in for CUDA), changed in place, and the one value the
    update reads (a Python copy of it would be baked into the compiled code)."""
    np.random.seed(0)
    meta = models.mlp(num_units=8, n_hidden_layers=1).to("meta")
    optimizer = quiet(bc.make_optimizer, meta, 0.01)
    assert optimizer.LR.device.type == "meta" and optimizer._scale.device.type == "meta"
    LR = optimizer.LR
    optimizer.set_learning_rate(0.005)
    assert optimizer.LR is LR

    def updated(LR_tensor_value):
        model, optimizer, step = _fresh("eager")
        optimizer.set_learning_rate(0.01)
        optimizer.LR.fill_(LR_tensor_value)  # only the tensor: what a graph's replay reads
        _epochs_at_LR(step)
        return _state(model, optimizer)
    half, full = updated(0.005), updated(0.01)
    model, optimizer, step = _fresh("eager")
    optimizer.set_learning_rate(0.005)
    _epochs_at_LR(step)
    expected = _state(model, optimizer)
    for k in expected:
        assert torch.equal(half[k], expected[k]), k
    assert not torch.equal(half["model.1.weight"], full["model.1.weight"])


def _epochs_at_LR(step):
    step.start_epoch(np.arange(N))
    for _ in range(N // BATCH):
        step()


def _tiny_run(new_run, epochs=2):
    return new_run(batch_size=10, LR_start=0.01, LR_fin=0.01 * 0.5 ** epochs, num_epochs=epochs)


def _train_tiny(run):
    rng = np.random.RandomState(0)
    data = [(X, one_hot(t)) for X, t in (tiny_data(rng, n) for n in (40, 20, 20))]
    return training.train(tiny_mlp(), data, run)


def test_an_epoch_whose_steps_did_not_all_run_stops_the_run(new_run, monkeypatch):
    """Adam's step count must move by the number of batches: a step that silently does nothing
    (after the first two) stops the run at the end of the epoch."""
    real_call = fast_step.TrainStep.__call__

    def call(self):
        if self.steps >= 2:
            self.steps += 1
            return
        real_call(self)
    monkeypatch.setattr(fast_step.TrainStep, "__call__", call)
    run = _tiny_run(new_run)
    with pytest.raises(SystemExit) as e:
        _train_tiny(run)
    assert str(e.value) == (
        "error: in epoch 1, the optimizer's step count of 1.weight moved by 2 in 4 training "
        "steps instead of 4: the training step (the eager modules) did not run as it should; "
        "stopping. Nothing was kept: no epoch had ended. Run it again with --compile=false.")


def test_a_frozen_draw_counter_stops_the_run(new_run, monkeypatch):
    """Each stochastic layer draws once a step; a counter that does not move (a graph that
    baked it in) would repeat the same weights: stop, naming the layer and the resume."""
    real_step = fast_step.TrainStep._step

    def step(self):
        real_step(self)
        if self.steps >= 4:  # epoch 2 of 4 steps an epoch
            self.model[4].draws.sub_(1)
    monkeypatch.setattr(fast_step.TrainStep, "_step", step)
    run = _tiny_run(new_run, epochs=3)
    with pytest.raises(SystemExit) as e:
        _train_tiny(run)
    message = str(e.value)
    assert message.startswith("error: in epoch 2, the draw counter of layer 4 moved by 0 in 4 "
                              "training steps instead of 4: the training step")
    assert message.endswith(f"The last good checkpoint is kept: resume with: python mnist.py "
                            f"--resume={run.out_dir} --compile=false")


# ---------------------------------------------------------------------------------------------
# Fault 3: a run on cuda:N captures on cuda:N; fault 4: a failed capture leaves torch clean
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # compiles
def test_capture_happens_under_the_runs_device(standin, monkeypatch):
    model, optimizer, step = _fresh("graph")
    step.device = torch.device("cuda", 1)  # only the capture's bookkeeping reads it here
    monkeypatch.setattr(fast_step.TrainStep, "_misplaced", lambda self: None)
    _epochs(step, optimizer, range(3))
    assert step.mode == "graph"
    assert standin.capture_devices == [torch.device("cuda", 1)]


@pytest.mark.slow  # compiles
def test_a_failed_capture_puts_the_cuda_generator_back(standin):
    standin.fail = True
    standin.rng_state = torch.arange(16, dtype=torch.uint8)
    model, optimizer, step = _fresh("graph")
    quiet(_epochs, step, optimizer, range(3))
    assert step.mode == "compiled"
    assert len(standin.rng_restored) == 1
    assert torch.equal(standin.rng_restored[0], torch.arange(16, dtype=torch.uint8))


@pytest.mark.slow  # compiles
def test_a_capture_that_breaks_cuda_stops_with_a_message(standin, monkeypatch):
    standin.fail = True

    def broken(state, device=None):
        raise RuntimeError("Offset increment outside graph capture encountered unexpectedly.")
    monkeypatch.setattr(torch.cuda, "set_rng_state", broken)
    model, optimizer, step = _fresh("graph")
    with pytest.raises(SystemExit) as e:
        quiet(_epochs, step, optimizer, range(3))
    assert str(e.value) == (
        "error: a failed CUDA graph capture (RuntimeError: operation not permitted when stream "
        "is capturing) left CUDA unusable in this process (RuntimeError: Offset increment "
        "outside graph capture encountered unexpectedly.); run it again with --compile=false "
        "(a resume may add it too)")


def test_a_failed_capture_does_not_move_the_dropout_stream(standin, monkeypatch):
    """After a failed capture the run goes on as the compiled step would have: no extra draw
    from the generator that dropout draws from (here the CPU's, standing in for CUDA's). The
    step runs uncompiled (torch.compile as the identity): what is tested is the capture's
    bookkeeping, not inductor."""
    monkeypatch.setattr(torch, "compile", lambda f, **kwargs: f)
    standin.fail = True
    runs = []
    for mode in ("graph", "compiled"):
        model, _ = _network("mlp_dropout", True)
        optimizer = quiet(bc.make_optimizer, model, 0.01)
        fast_step.set_stream_kind(model, "counter")
        model.train()
        step = fast_step.TrainStep(model, optimizer, _data(), BATCH, mode=mode)
        torch.manual_seed(7)
        losses = quiet(_epochs, step, optimizer, range(3))  # the capture fails at step 4
        runs.append((step.mode, losses, torch.get_rng_state()))
    (mode, losses, rng), (_, losses_compiled, rng_compiled) = runs
    assert mode == "compiled" and standin.captures == 0 and len(standin.rng_restored) == 1
    assert torch.equal(rng, rng_compiled)  # before the fix: a draw more (torch.rand(1))
    assert torch.equal(losses, losses_compiled)
