"""What only a GPU can check (skipped without CUDA; tools/gpu_check.sh runs them on a lent GPU):
the counter streams give the CPU's numbers, the captured CUDA-graph step gives the eager step's
and exactly the compiled step's numbers, seeded runs repeat bit for bit, and a killed CUDA run
resumes exactly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import binary_connect as bc  # noqa: E402
from fake_data import write_fake_mnist  # noqa: E402
from test_fast_step import _run  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPU = torch.device("cuda")
REPO = Path(__file__).resolve().parents[1]


def test_counter_stream_is_the_same_on_cpu_and_gpu():
    for counter in (0, 5, 2 ** 33 + 1):
        c = torch.tensor(counter, dtype=torch.int64)
        cpu = bc.counter_uniform(1234, c, (1 << 16,), torch.device("cpu"))
        gpu = bc.counter_uniform(1234, c.to(GPU), (1 << 16,), GPU)
        assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("kind, stochastic", [("mlp", True), ("cnn", False), ("cnn", True)])
def test_graph_step_gives_the_eager_step_and_exactly_the_compiled_step(kind, stochastic):
    # 9 steps over 5 epochs of 2 steps: the capture (after 3 steps) and replays across epochs,
    # new orders and learning rates
    eager_losses, eager, _ = _run(kind, stochastic, "eager", steps=9, device=GPU)
    compiled_losses, compiled, mode_c = _run(kind, stochastic, "compiled", steps=9, device=GPU)
    graph_losses, graph, mode_g = _run(kind, stochastic, "graph", steps=9, device=GPU)
    assert (mode_c, mode_g) == ("compiled", "graph")
    assert torch.equal(graph_losses, compiled_losses)
    for k in compiled:
        assert torch.equal(graph[k], compiled[k]), k
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for k in eager:
        if eager[k].dtype in (torch.int64, torch.float64):
            assert torch.equal(graph[k], eager[k]), k
        elif not (k.startswith("model.") and k.endswith((".bias", ".mean"))):  # see test_fast_step
            torch.testing.assert_close(graph[k], eager[k], rtol=1e-3, atol=1e-3, msg=k)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_seeded_cnn_runs_repeat_bit_for_bit(mode):
    first = _run("cnn", True, mode, steps=30, device=GPU)
    second = _run("cnn", True, mode, steps=30, device=GPU)
    assert torch.equal(first[0], second[0])
    for k in first[1]:
        assert torch.equal(first[1][k], second[1][k]), k


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_lower_precisions_train_with_float32_state(precision):
    losses, state, mode = _run("cnn", True, "graph", steps=6, device=GPU, precision=precision)
    assert mode == "graph" and torch.isfinite(losses).all()
    assert all(v.dtype in (torch.float32, torch.float64, torch.int64) for v in state.values())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def _mnist(tmp_path, out, *extra, hook=None):
    args = [f"--data_dir={tmp_path / 'mnist'}", "--verify_checksums=False", "--num_units=64",
            "--n_hidden_layers=2", "--num_epochs=3", "--batch_size=20", "--train_set_size=100",
            "--device=cuda", "--compile=true", f"--out_dir={out}", *extra]
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import os, runpy, signal, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "at = int(os.environ.get('KILL_AT') or 0)\n"
        "if at:\n"
        "    import training\n"
        "    call = training.TrainStep.__call__\n"
        "    def counted(self, n=[0]):\n"
        "        n[0] += 1\n"
        "        if n[0] == at:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return call(self)\n"
        "    training.TrainStep.__call__ = counted\n"
        "sys.argv = sys.argv[2:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return subprocess.run([sys.executable, str(runner), str(REPO), str(REPO / "mnist.py"), *args],
                          cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, KILL_AT=str(hook or "")))


def test_killed_cuda_run_resumes_exactly(tmp_path):
    write_fake_mnist(tmp_path / "mnist", n_train=160, n_test=60)
    p = _mnist(tmp_path, tmp_path / "reference")
    assert p.returncode == 0, p.stderr
    p = _mnist(tmp_path, tmp_path / "b", hook=13)  # epoch 3, batch 3: after the capture
    assert p.returncode == -9, p.stderr
    p = _mnist(tmp_path, tmp_path / "b", f"--resume={tmp_path / 'b'}")
    assert p.returncode == 0, p.stderr

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows(tmp_path / "b") == rows(tmp_path / "reference")
