"""tools/gpu_check.sh, the one script a session with a lent GPU runs, rehearsed on the CPU with
tiny sizes (--smoke) so that it does not rot between GPU sessions. The rehearsal needs the real
data of ../shared/data (skipped when absent)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SCRIPT = REPO / "tools" / "gpu_check.sh"


def gpu_check(tmp_path, *args):
    env = dict(os.environ, PYTHON=sys.executable, DATA=str(tmp_path / "data"),
               OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), SHARED_DATA=str(SHARED_DATA))
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


def test_help_and_an_unknown_part(tmp_path):
    p = gpu_check(tmp_path, "--smoke", "tests", "benchmark")
    assert p.returncode == 2
    assert "unknown part 'benchmark'; the parts are tests, bench, mnist, cifar" in p.stdout
    assert not (tmp_path / "out").exists()  # refused before anything ran
    p = gpu_check(tmp_path, "--help")
    assert p.returncode == 0 and p.stdout.startswith("Every check of this project that needs")
    assert "  bench  (110 s) benchmark.py for MNIST" in p.stdout and "set -u" not in p.stdout


@pytest.mark.slow  # about two minutes (the benchmark compiles)
@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir() or not (SHARED_DATA / "cifar10").is_dir(),
                    reason="needs ../shared/data/mnist and ../shared/data/cifar10")
def test_smoke_rehearsal_runs_every_part_on_the_cpu(tmp_path):
    p = gpu_check(tmp_path, "--prepare")
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(list((tmp_path / "data" / "mnist").glob("*.gz"))) == 4
    # two calls, as on a lent GPU, into one folder
    p = gpu_check(tmp_path, "--smoke", "tests", "bench")
    assert p.returncode == 0, p.stdout + p.stderr
    p = gpu_check(tmp_path, "--smoke", "mnist", "cifar")
    assert p.returncode == 0, p.stdout + p.stderr
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert "PASS tests (" in summary and "skipped" in summary  # no CUDA here
    assert "PASS bench (" in summary
    assert "SUMMARY net=mnist device=cpu" in summary and "fast_fp32_ms=" in summary
    assert "PASS mnist (" in summary and "mnist.py, 2 epochs" in summary
    assert "2 of 2 epochs; best epoch" in summary
    assert "PASS cifar-fp32 (" in summary and "1 of 1 epochs" in summary
    log = (out / "cifar10_fp32.txt").read_text()
    assert "fp32, on cpu" in log and "Best validation error rate" in log, log[-2000:]
    assert "FAIL" not in summary and summary.count("gpu_check: 0 check(s) failed") == 2


def test_a_check_that_falls_short_fails(tmp_path):
    """No data where the MNIST check looks: FAIL with what it found, and a failing exit."""
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    p = gpu_check(tmp_path, "--smoke", "mnist")
    assert p.returncode == 1, p.stdout + p.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "FAIL mnist (" in summary and "no metrics.jsonl" in summary
    assert "gpu_check: 1 check(s) failed" in summary
