"""The fast training step (fast_step.TrainStep compiled, issue 7) against the eager modules, the
counter streams the compiled step samples from, evaluation's float32 sums, the resume rules for
random streams, and what the loop says about itself. The numpy checks of docs/original.md of a whole step
through TrainStep are in test_binary_connect.py (test_two_updates_through_the_training_step_*).
"""
import contextlib
import io
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn


import binary_connect as bc
import models
import fast_step
import checkpoints
import rundir
import training
from fake_data import script_config
from cuda_standin import StandIn

CPU = torch.device("cpu")


def quiet(f, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return f(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# The compiled step against the eager modules, one step from the same state (fp32, CPU)
# ---------------------------------------------------------------------------------------------

def _network(kind, stochastic):
    np.random.seed(3)
    if kind == "binarynet_mlp":  # binary activations, Lasagne's BN, dropout (§13)
        # no dropout: the compiled step draws its masks from inductor's generator
        return models.binarynet_mlp(num_units=32, n_hidden_layers=2, n_inputs=64, dropout_in=0.,
                                    dropout_hidden=0., stochastic=stochastic), (64,)
    if kind.startswith("mlp"):
        dropout = dict(dropout_in=0.2, dropout_hidden=0.5) if kind == "mlp_dropout" else {}
        model = models.mlp(num_units=32, n_hidden_layers=2, n_inputs=64, stochastic=stochastic,
                           **dropout)
        shape = (64,)
    else:
        model = models.cnn(widths=(4, 8, 8), fc_units=16, image_size=8, stochastic=stochastic)
        shape = (3, 8, 8)
    return model, shape


def _state(model, optimizer):
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(optimizer._all):
        for k, v in optimizer.state[p].items():
            out[f"opt.{i}.{k}"] = v.clone()
    return out


def _run(kind, stochastic, mode, steps=2, device=CPU, precision="fp32", after_epoch=None):
    model, shape = _network(kind, stochastic)
    model.to(device)
    optimizer = quiet(bc.make_optimizer, model, 0.01)
    rng = np.random.RandomState(5)
    n, batch = 40, 20
    X = rng.randn(n, *shape).astype(np.float32)
    t = (2. * np.eye(10)[rng.randint(0, 10, n)] - 1.).astype(np.float32)
    fast_step.set_stream_kind(model, "counter")  # both paths draw the same numbers
    fast_step.set_precision(precision, device)
    step = fast_step.TrainStep(model, optimizer, fast_step.Split(X, t, device), batch, mode=mode,
                              precision=precision)
    model.train()
    losses = []
    for epoch in range(-(-steps // (n // batch))):  # several epochs: the order changes
        optimizer.set_learning_rate(0.01 * 0.5 ** epoch)
        step.start_epoch(np.random.RandomState(epoch).permutation(n))
        for _ in range(min(n // batch, steps - epoch * (n // batch))):
            step()
        losses.append(step.losses.clone())
        if after_epoch:
            after_epoch(model, step)
    return torch.cat(losses).cpu(), {k: v.cpu() for k, v in _state(model, optimizer).items()}, \
        step.mode


@pytest.mark.slow  # compiles
@pytest.mark.parametrize("kind, stochastic", [("mlp", True), ("cnn", False), ("cnn", True),
                                              ("binarynet_mlp", False)])
def test_compiled_step_gives_the_eager_step(kind, stochastic):
    """Loss, weights, biases, BN parameters and statistics, Adam's moments and step counts, and
    the layers' draw counters after two steps, compiled against eager, to float tolerance."""
    eager_losses, eager, _ = _run(kind, stochastic, "eager")
    fast_losses, fast, mode = _run(kind, stochastic, "compiled")
    assert mode == "compiled"  # no fallback happened
    torch.testing.assert_close(fast_losses, eager_losses, rtol=1e-5, atol=1e-6)
    assert fast.keys() == eager.keys()
    worst = []
    for k in eager:
        if eager[k].dtype in (torch.int64, torch.float64):  # counters and step counts: exact
            assert torch.equal(fast[k], eager[k]), k
        elif k.startswith("model.") and k.endswith((".bias", ".mean")):
            # A bias before a training-mode BN has a gradient of pure rounding noise (§1.4),
            # which Adam turns into steps of up to LR either way; the BN running mean carries
            # that bias. Bounded, not compared.
            assert (fast[k] - eager[k]).abs().max() <= 2 * 0.01 * 1.001, k
        else:
            # Adam's m/sqrt(v) magnifies rounding where a gradient is near 0: up to a fraction
            # of a step for such an element (LR * W_LR_scale is 0.2 to 0.8 here) ...
            torch.testing.assert_close(fast[k], eager[k], rtol=1e-4, atol=1e-3, msg=k)
            worst.append(float((fast[k] - eager[k]).abs().max()))
    # ... while nearly everything agrees to float32 rounding
    assert np.median(worst) < 1e-5


def test_compile_failure_falls_back_to_the_eager_modules(monkeypatch, capsys):
    """A compiler that fails: the step says why, restores the state it started from, and runs
    the eager modules with the same (counter) streams: the same numbers as eager from the start."""
    def broken_compile(f, **kwargs):
        def run(*args, **kw):
            f(*args, **kw)  # half of the work happens, then the failure
            raise RuntimeError("no C++ compiler found\nsecond line")
        return run
    eager_losses, eager, _ = _run("mlp", True, "eager")
    monkeypatch.setattr(torch, "compile", broken_compile)
    losses, state, mode = _run("mlp", True, "compiled")
    assert mode == "eager"
    out = capsys.readouterr().out
    assert "warning: torch.compile failed (RuntimeError: no C++ compiler found)" in out
    assert "second line" not in out
    torch.testing.assert_close(losses, eager_losses, rtol=0, atol=0)
    for k in eager:
        assert torch.equal(state[k], eager[k]), k


@pytest.mark.slow  # compiles
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_compiled_step_compiles_once_for_every_epoch(kind):
    """One captured CUDA graph serves every epoch only if nothing the step reads is a Python
    value baked into the compiled code: once the first epoch has compiled the step and the
    evaluation, later epochs (a new learning rate, order and draw counters each) compile
    nothing (dynamo would recompile for a changed Python value it had specialised on), and the
    forward and the update compile whole, without graph breaks."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    graphs = []

    def after_epoch(model, step):
        training.evaluate(model, step.data, step.batch_size, forward=step.forward)
        model.train()
        graphs.append(counters["stats"]["unique_graphs"])
    _, _, mode = _run(kind, True, "compiled", steps=8, after_epoch=after_epoch)
    assert mode == "compiled"
    assert len(graphs) == 4 and graphs[0] > 0 and graphs == graphs[:1] * 4, graphs
    # and nothing left the graphs (a .item() or a data-dependent branch would: a host sync)
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow  # compiles
def test_many_compiled_steps_in_one_process_stay_compiled():
    """Each new optimizer recompiles its update; dynamo's default limit (8 per function) would
    make the ninth and later steps of a process (benchmark.py builds nine on CUDA) run it
    eagerly, quietly, with other numbers. All twelve here give the first one's numbers."""
    torch._dynamo.reset()  # whatever the tests before this one compiled
    first_losses, first, _ = _run("mlp", True, "compiled", steps=2)
    for _ in range(11):
        losses, state, mode = _run("mlp", True, "compiled", steps=2)
        assert mode == "compiled" and torch.equal(losses, first_losses)
        for k in first:
            assert torch.equal(state[k], first[k]), k


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """torch.cuda's streams and graphs stood in for on the CPU (tests/cuda_standin.py)."""
    return StandIn(monkeypatch)


@pytest.mark.slow  # compiles
def test_graph_mode_schedule_gives_the_compiled_step(fake_cuda_graphs, capsys):
    """"graph": WARMUP_STEPS compiled steps, then one capture that serves every later step of
    every epoch, with exactly the compiled step's numbers; a capture that fails says why and
    goes on with the compiled step, the same numbers again."""
    compiled_losses, compiled, _ = _run("mlp", True, "compiled", steps=8)
    graph_losses, graph, mode = _run("mlp", True, "graph", steps=8)
    assert mode == "graph"
    assert fake_cuda_graphs.captures == 1
    assert fake_cuda_graphs.replays == 8 - fast_step.WARMUP_STEPS  # the first one checked
    assert torch.equal(graph_losses, compiled_losses)
    for k in compiled:
        assert torch.equal(graph[k], compiled[k]), k

    fake_cuda_graphs.fail = True
    failed_losses, failed, mode = _run("mlp", True, "graph", steps=8)
    assert mode == "compiled"
    out = capsys.readouterr().out
    assert ("warning: CUDA graph capture failed (RuntimeError: operation not permitted when "
            "stream is capturing); continuing with the compiled step without a graph") in out
    assert torch.equal(failed_losses, compiled_losses)
    for k in compiled:
        assert torch.equal(failed[k], compiled[k]), k


def test_step_mode_for_compile_settings():
    np.random.seed(0)
    small = models.mlp(num_units=8, n_hidden_layers=1)
    big = models.mlp(num_units=2048, n_hidden_layers=1)  # 784*2048 + 2048*10 > 1e6 weights
    cuda = torch.device("cuda")
    assert fast_step.step_mode("false", CPU, big, True) == "eager"
    assert fast_step.step_mode("auto", CPU, small, True) == "eager"
    assert fast_step.step_mode("auto", CPU, big, True) == "compiled"
    assert fast_step.step_mode("true", CPU, small, True) == "compiled"
    assert fast_step.step_mode("auto", cuda, small, True) == "graph"
    assert fast_step.step_mode("auto", cuda, small, False) == "compiled"  # memory-mapped data
    assert fast_step.step_mode("auto", torch.device("mps"), big, True) == "eager"


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------

def test_bf16_products_keep_float32_statistics_weights_and_moments():
    model, shape = _network("cnn", True)
    optimizer = quiet(bc.make_optimizer, model, 0.01)
    rng = np.random.RandomState(5)
    X = rng.randn(40, *shape).astype(np.float32)
    t = (2. * np.eye(10)[rng.randint(0, 10, 40)] - 1.).astype(np.float32)
    step = fast_step.TrainStep(model, optimizer, fast_step.Split(X, t, CPU), 20, precision="bf16")
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model.train()
    step.start_epoch(np.arange(40))
    step()
    step()
    assert seen[:2] == [torch.bfloat16, torch.float32]  # the conv in bf16, its BN in float32
    assert torch.isfinite(step.losses).all() and step.losses.dtype == torch.float32
    for p in optimizer._all:
        assert p.dtype == torch.float32
        assert optimizer.state[p]["m"].dtype == torch.float32
    assert model[1].std.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Evaluation: float32 sums, as the original's numpy float32 accumulations (§5)
# ---------------------------------------------------------------------------------------------

class Passthrough(nn.Module):
    def forward(self, x):
        return x


def test_evaluation_sums_in_float32_in_batch_order():
    # 30 batches of 10, each with 1 error: fractions 0.1 (not exact in float32); the float32
    # running sum differs from the float64 one, and ties in "best" depend on which is used.
    batch, n_batches = 10, 30
    X = np.tile(np.eye(10, dtype=np.float32), (n_batches, 1))
    labels = np.tile(np.arange(10), n_batches)
    labels[::batch] = (labels[::batch] + 1) % 10  # the first row of each batch is wrong
    t = (2. * np.eye(10)[labels] - 1.).astype(np.float32)
    err, loss = training.evaluate(Passthrough(), fast_step.Split(X, t, CPU), batch)
    acc = np.float32(0)
    for _ in range(n_batches):
        acc = np.float32(acc + np.float32(0.1))
    expected = acc / np.float32(n_batches) * np.float32(100)
    assert err == float(expected)
    assert err != 0.1 * n_batches / n_batches * 100  # the float64 result is another number
    # chunked or not, the per-batch numbers are the same
    saved = training.EVAL_ROWS
    try:
        training.EVAL_ROWS = batch
        assert training.evaluate(Passthrough(), fast_step.Split(X, t, CPU), batch) == (err, loss)
    finally:
        training.EVAL_ROWS = saved


# ---------------------------------------------------------------------------------------------
# Random streams across a resume
# ---------------------------------------------------------------------------------------------

def test_generator_streams_from_another_device_continue_with_a_new_stream(capsys):
    np.random.seed(0)
    model = models.mlp(num_units=8, n_hidden_layers=1, n_inputs=6)
    layers = bc.binary_layers(model)
    for m in layers:
        m.draws.fill_(5)
    states = checkpoints.rng_states(model, CPU)
    states["device"] = "cuda"  # as if saved by a CUDA run
    checkpoints.set_rng_states(model, states, CPU)
    out = capsys.readouterr().out
    assert "cannot continue" in out and "new stream" in out
    for m in layers:
        expected = torch.Generator().manual_seed(
            int(np.random.SeedSequence([m.seed, 5]).generate_state(1)[0]))
        assert torch.equal(m.generator.get_state(), expected.get_state())
    # a state of the same kind and device is simply restored, silently
    states = checkpoints.rng_states(model, CPU)
    before = torch.rand(3, generator=layers[0].generator)
    checkpoints.set_rng_states(model, states, CPU)
    assert capsys.readouterr().out == ""
    assert torch.equal(torch.rand(3, generator=layers[0].generator), before)


def test_counter_streams_continue_on_any_device_and_say_so_when_switching_kind(capsys):
    np.random.seed(0)
    model = models.mlp(num_units=8, n_hidden_layers=1, n_inputs=6)
    states = checkpoints.rng_states(model, CPU)  # generator streams
    fast_step.set_stream_kind(model, "counter")
    checkpoints.set_rng_states(model, states, CPU)
    assert "counter streams" in capsys.readouterr().out
    states = checkpoints.rng_states(model, CPU)
    states["device"] = "cuda"
    checkpoints.set_rng_states(model, states, CPU)  # counter to counter: nothing to say
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# The report's note on huge validation losses
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("huge", ["validation", "test"])
def test_huge_validation_loss_is_explained_in_the_report(tmp_path, capsys, huge):
    rng = np.random.RandomState(0)
    X = (rng.randn(40, 10) * 100).astype(np.float32)
    t = (2. * np.eye(10)[rng.randint(0, 10, 40)] - 1.).astype(np.float32)
    small = (X / 1000, t)  # a loss near 1
    data = ((X, t), (X, t), (X, t)) if huge == "validation" else ((X, t), small, (X, t))

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return x + 0. * self.p
    saved = sys.stdout
    try:
        run = rundir.start_run("mnist", script_config(
            seed=1, device="cpu", resume="", out_dir=str(tmp_path / "run"), batch_size=20,
            LR_start=0.001, LR_fin=0.001, num_epochs=1))
        model = Scaled()
        training.train(model, [(X, (t + 1) / 2) for X, t in data], run)
    finally:
        if sys.stdout is not saved:
            sys.stdout.file.close()
            sys.stdout = saved
    log = (tmp_path / "run" / "log.txt").read_text()
    assert training.BIG_LOSS_NOTE in log
