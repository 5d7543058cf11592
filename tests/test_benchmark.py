"""benchmark.py's arithmetic: each variant compiles and captures in its own precision (a CUDA
graph keeps the arithmetic it was captured in), not in the one set last."""

import pytest
import torch


import benchmark
import fast_step
import training


def test_each_fast_step_is_warmed_up_and_timed_in_its_own_precision(monkeypatch, capsys):
    seen = []

    def call(self):  # records instead of training: compiling is not what is tested
        seen.append((self.precision, torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.allow_tf32))
        self.steps += 1
    monkeypatch.setattr(fast_step.TrainStep, "__call__", call)
    monkeypatch.setattr(training, "evaluate", lambda *args, **kwargs: (0., 0.))
    try:
        benchmark.benchmark("mnist", torch.device("cpu"), steps=1, repeats=1,
                            precisions=["tf32", "fp32", "bf16"])
    finally:
        fast_step.set_precision("fp32", torch.device("cpu"))
    assert {p for p, _, _ in seen} == {"fp32", "tf32", "bf16"}
    # warm-up (2 runs) and timing (1) of each, the eager variant among the fp32 ones
    assert len(seen) == 3 * 4
    for precision, matmul, cudnn in seen:
        assert matmul == cudnn == (precision == "tf32"), seen
    assert "SUMMARY net=mnist device=cpu" in capsys.readouterr().out


def test_set_changes_a_scripts_hyperparameter_typed_as_its_command_line(capsys):
    assert benchmark.net_config("mnist", ["num_units=64", "stochastic=False"])["num_units"] == 64
    assert benchmark.net_config("mnist", ["stochastic=False"])["stochastic"] is False
    for bad, said in [("nosuch=1", "--set nosuch=1: mnist.py has no hyperparameter 'nosuch'"),
                      ("num_units=abc", "num_units takes an int (its default is 2048)")]:
        with pytest.raises(SystemExit) as e:
            benchmark.main(["--nets=mnist", "--device=cpu", "--set", bad])
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_dynamo_is_reset_before_each_variant_which_is_timed_before_the_next(monkeypatch):
    """Dynamo's guards do not cover inductor's settings (the deterministic mode that
    fast_fp32_autotuned turns off): without a reset, a variant could run the code compiled for
    the one before it. Each variant's warm-up, timing and evaluation come after a reset of its
    own and before the next."""
    events = []

    def call(self):
        events.append(("step", self.precision))
        self.steps += 1
    monkeypatch.setattr(fast_step.TrainStep, "__call__", call)
    monkeypatch.setattr(training, "evaluate",
                        lambda *args, **kwargs: events.append(("evaluate",)) or (0., 0.))
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append(("reset",)))
    try:
        benchmark.benchmark("mnist", torch.device("cpu"), steps=1, repeats=2,
                            precisions=["fp32", "bf16"], settings=["num_units=64"])
    finally:
        fast_step.set_precision("fp32", torch.device("cpu"))
    blocks = []
    for event in events:
        if event == ("reset",):
            blocks.append([])
        else:
            blocks[-1].append(event)
    # plain (its own step function), eager, fast_fp32, fast_bf16: four resets
    assert len(blocks) == 4 and blocks[0] == []
    for block, precision in zip(blocks[1:], ["fp32", "fp32", "bf16"]):
        # warm-up (2 runs), 2 timings, then the evaluation (a warm-up pass and a timed one)
        assert block == [("step", precision)] * 4 + [("evaluate",)] * 2, block
