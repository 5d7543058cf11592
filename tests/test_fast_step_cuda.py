"""What only a GPU can check (skipped without CUDA; tools/lease.py runs three on a lent GPU):
a killed graph-mode run resumes exactly (first: it matters most), the counter streams give the
CPU's numbers, the captured CUDA-graph step gives the compiled step's numbers with no guard
firing, seeded runs repeat bit for bit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


import streams
from fake_data import write_fake_mnist
from test_fast_step import _run

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPU = torch.device("cuda")
REPO = Path(__file__).resolve().parents[1]


def _mnist(tmp_path, out, *extra, hook=None):
    args = [f"--data_dir={tmp_path / 'mnist'}", "--verify_checksums=False", "--num_units=64",
            "--n_hidden_layers=2", "--num_epochs=3", "--batch_size=20", "--train_set_size=200",
            "--device=cuda", "--compile=true", f"--out_dir={out}", *extra]
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import os, runpy, signal, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "at = int(os.environ.get('KILL_AT') or 0)\n"
        "if at:\n"
        "    import fast_step\n"
        "    call = fast_step.TrainStep.__call__\n"
        "    def counted(self, n=[0]):\n"
        "        n[0] += 1\n"
        "        if n[0] == at:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return call(self)\n"
        "    fast_step.TrainStep.__call__ = counted\n"
        "sys.argv = sys.argv[2:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return subprocess.run([sys.executable, str(runner), str(REPO), str(REPO / "mnist.py"), *args],
                          cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, KILL_AT=str(hook or "")))


def test_killed_graph_mode_run_resumes_exactly(tmp_path):
    """First, as it matters most: a run in graph mode killed mid-epoch (epoch 3, batch 5 of 10,
    after the capture) resumes from the end of epoch 2; the resumed process captures again
    (Adam's step counts must be on the GPU for that) and ends with the uninterrupted run's
    numbers, with no guard firing in either."""
    write_fake_mnist(tmp_path / "mnist", n_train=260, n_test=60)
    p = _mnist(tmp_path, tmp_path / "reference")
    assert p.returncode == 0, p.stderr
    assert "graph" in p.stdout and "warning" not in p.stdout, p.stdout
    p = _mnist(tmp_path, tmp_path / "b", hook=25)
    assert p.returncode == -9, p.stderr
    p = _mnist(tmp_path, tmp_path / "b", f"--resume={tmp_path / 'b'}")
    assert p.returncode == 0, p.stderr
    assert "warning" not in p.stdout, p.stdout

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows(tmp_path / "b") == rows(tmp_path / "reference")


def test_counter_stream_is_the_same_on_cpu_and_gpu():
    for counter in (0, 5, 2 ** 33 + 1):
        c = torch.tensor(counter, dtype=torch.int64)
        cpu = streams.counter_uniform(1234, c, (1 << 16,), torch.device("cpu"))
        gpu = streams.counter_uniform(1234, c.to(GPU), (1 << 16,), GPU)
        assert torch.equal(cpu, gpu.cpu())


def _assert_replays_the_compiled_step(graph_losses, graph, compiled_losses, compiled):
    """The replayed kernels are the compiled step's: to test_fast_step's tolerance, counters
    exact."""
    torch.testing.assert_close(graph_losses, compiled_losses, rtol=1e-5, atol=1e-6)
    for k in compiled:
        if compiled[k].dtype in (torch.int64, torch.float64):
            assert torch.equal(graph[k], compiled[k]), k
        else:
            torch.testing.assert_close(graph[k], compiled[k], rtol=1e-4, atol=1e-3, msg=k)


@pytest.mark.parametrize("kind, stochastic", [("mlp", True), ("cnn", False), ("cnn", True)])
def test_graph_step_gives_the_compiled_step_and_the_eager_step(kind, stochastic):
    # 9 steps over 5 epochs of 2 steps: the capture (after 3 steps) and replays across epochs,
    # new orders and learning rates
    eager_losses, eager, _ = _run(kind, stochastic, "eager", steps=9, device=GPU)
    compiled_losses, compiled, mode_c = _run(kind, stochastic, "compiled", steps=9, device=GPU)
    graph_losses, graph, mode_g = _run(kind, stochastic, "graph", steps=9, device=GPU)
    assert (mode_c, mode_g) == ("compiled", "graph")  # no guard fired
    _assert_replays_the_compiled_step(graph_losses, graph, compiled_losses, compiled)
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for k in eager:
        if eager[k].dtype in (torch.int64, torch.float64):
            assert torch.equal(graph[k], eager[k]), k
        elif not (k.startswith("model.") and k.endswith((".bias", ".mean"))):  # see test_fast_step
            torch.testing.assert_close(graph[k], eager[k], rtol=1e-3, atol=1e-3, msg=k)


def test_binarynet_graph_step_gives_the_compiled_step():
    """BinaryNet's modules (binary_tanh_unit's autograd.Function, Lasagne's BN and its in-place
    running averages) captured once and replayed across epochs: the compiled step's numbers."""
    compiled_losses, compiled, mode_c = _run("binarynet_mlp", False, "compiled", steps=9,
                                             device=GPU)
    graph_losses, graph, mode_g = _run("binarynet_mlp", False, "graph", steps=9, device=GPU)
    assert (mode_c, mode_g) == ("compiled", "graph")  # no guard fired
    _assert_replays_the_compiled_step(graph_losses, graph, compiled_losses, compiled)


def test_graph_mode_with_dropout_passes_its_first_replay_check():
    """Dropout draws from CUDA's default generator; the check after the capture restores its
    state before comparing the replay with the compiled step."""
    losses, state, mode = _run("mlp_dropout", True, "graph", steps=9, device=GPU)
    assert mode == "graph" and torch.isfinite(losses).all()


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


