"""tools/lease.py, the plan a session lent a GPU runs in one call: its queue, the ledger's
bookkeeping (which runs are finished in results/, what comes back and how it is unpacked), and
the whole plan rehearsed on the CPU (--smoke) so that it does not rot between GPU sessions."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import lease  # noqa: E402
import sweep  # noqa: E402
from fake_data import write_fake_mnist  # noqa: E402


def plan(tmp_path, *args, results=None):
    env = dict(os.environ, LEASE_SCRATCH=str(tmp_path / "scratch"))
    return subprocess.run([sys.executable, str(REPO / "tools" / "lease.py"), "run", "--smoke",
                           f"--out={tmp_path / 'out'}", f"--data={tmp_path / 'data'}",
                           f"--results={results or tmp_path / 'results'}", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True)


def finished_run(run_dir, status="finished", num_epochs=2, **lease_fields):
    run_dir.mkdir(parents=True)
    (run_dir / "hparams.json").write_text(json.dumps(dict(script="mnist", hparams=dict(
        num_epochs=num_epochs, seed=1))))
    epochs = num_epochs if status == "finished" else num_epochs - 1
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps(dict(epoch=e, test_err=1.5, best_epoch=e, seconds=1.)) + "\n"
        for e in range(1, epochs + 1)))
    (run_dir / "lease.json").write_text(json.dumps(dict(status=status, **lease_fields)))


def test_the_queue_reads_and_a_bad_line_is_named(tmp_path):
    items = lease.read_queue(lease.QUEUE)
    assert [i["name"] for i in items][:4] == ["mnist-250", "bnn-mnist", "k-probe", "paper-mnist"]
    assert [i["sweep"] for i in items][:4] == [False, False, False, True]
    assert all(i["minutes"] > 0 and i["smoke"] for i in items)
    bad = tmp_path / "queue.txt"
    bad.write_text("# a comment\nmnist 250 | python3 mnist.py\n")
    with pytest.raises(SystemExit) as e:
        lease.read_queue(bad)
    assert "line 2: expected NAME | MINUTES | COMMAND | SMOKE" in str(e.value)


def test_finished_items_and_runs_in_earlier_leases(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(lease, "RESULTS", results)
    finished_run(results / "2026-12-05T1200-h200" / "mnist-250")
    sweep_dir = results / "2026-12-05T1200-h200" / "paper-mnist"
    finished_run(sweep_dir / "mnist_paper_det_bc" / "seed1")
    finished_run(sweep_dir / "mnist_paper_det_bc" / "seed2", status="cut short")
    assert lease.finished_before("mnist-250") == (
        "2026-12-05T1200-h200", [results / "2026-12-05T1200-h200" / "mnist-250"])
    done, runs = lease.finished_before("paper-mnist")
    assert done is None and runs == [sweep_dir / "mnist_paper_det_bc" / "seed1"]
    assert lease.in_item(runs[0], "paper-mnist") == Path("mnist_paper_det_bc/seed1")
    assert lease.finished_before("k-probe") == (None, []) and lease.measured_k() is None
    (results / "2026-12-05T1200-h200" / "k-probe").mkdir()
    (results / "2026-12-05T1200-h200" / "k-probe" / "lease.json").write_text(
        json.dumps(dict(status="finished", k=4)))
    assert lease.finished_before("k-probe")[0] == "2026-12-05T1200-h200"
    assert lease.measured_k() == 4


def test_sweep_skips_a_finished_run_without_its_checkpoint(tmp_path):
    """results/ keeps no checkpoints: a sweep seeded with a finished run's records skips it."""
    finished_run(tmp_path / "a")
    assert sweep.progress(tmp_path / "a") == "done"
    finished_run(tmp_path / "b", status="cut short")
    assert sweep.progress(tmp_path / "b") == "start"


def test_run_status(tmp_path):
    finished_run(tmp_path / "a")
    finished_run(tmp_path / "b", status="cut short")
    assert lease.run_status(tmp_path / "a", 124, True) == "finished"
    assert lease.run_status(tmp_path / "b", 124, True) == "cut short"
    assert lease.run_status(tmp_path / "b", 1, False) == "failed"


def test_unpack_puts_the_runs_and_the_summary_under_results(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.txt").write_text("PASS preflight (9 s): NVIDIA H200\n"
                                     "lease 2026-12-05T1200-h200; commit abc\n")
    (out / "bench-mnist.txt").write_text("SUMMARY net=mnist\n")
    staging = tmp_path / "staging" / "2026-12-05T1200-h200" / "mnist-250"
    finished_run(staging)
    (staging / "last.pt").write_bytes(b"never sent back, never unpacked")
    with tarfile.open(out / "results.tar", "a") as tar:
        tar.add(staging.parent, arcname="2026-12-05T1200-h200")
    results = tmp_path / "results"
    lease.main(["unpack", str(out), f"--into={results}"])
    dest = results / "2026-12-05T1200-h200"
    assert sorted(p.name for p in dest.iterdir()) == ["bench-mnist.txt", "mnist-250",
                                                       "summary.txt"]
    assert sorted(p.name for p in (dest / "mnist-250").iterdir()) == [
        "hparams.json", "lease.json", "metrics.jsonl"]


@pytest.mark.slow  # a preflight: torch imported and a tiny compile, about 30 s on 2 cores
def test_a_missing_piece_is_named_and_what_needs_it_skipped(tmp_path):
    """No data where the plan looks: the preflight FAILs naming it; the queue is skipped."""
    p = plan(tmp_path, "--parts=queue")
    assert p.returncode == 1, p.stdout + p.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "FAIL preflight (" in summary and f"no {tmp_path / 'data' / 'mnist'}" in summary
    assert "queue: skipped" in summary and "lease.py: 1 part(s) failed" in summary


@pytest.mark.slow  # about a minute on 2 cores (3.5 when busy): a benchmark compiles, 5 tiny runs
def test_smoke_rehearsal_runs_the_whole_plan_on_the_cpu(tmp_path):
    write_fake_mnist(tmp_path / "data" / "mnist", n_train=600, n_test=100)
    p = plan(tmp_path)
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert p.returncode == 0, summary + p.stdout[-3000:] + p.stderr[-3000:]
    assert "PASS preflight (" in summary and "SKIP checks (" in summary  # no CUDA here
    assert "PASS bench-mnist (" in summary and "SUMMARY net=mnist device=cpu" in summary
    assert "SKIP bench-cifar10 (" in summary
    assert "PASS queue mnist-250 (" in summary and "1 finished" in summary
    assert "PASS queue k-probe (" in summary and "PASS queue paper-mnist (" in summary
    assert "SKIP queue cifar10-real (0 s): no " in summary
    assert "SKIP queue bench-svhn (0 s): not rehearsed" in summary
    assert "FAIL" not in summary
    lease_name = re.search(r"^lease (\S+);", summary, re.M)[1]
    assert lease_name.endswith("-cpu-smoke")
    with tarfile.open(out / "results.tar") as tar:
        names = sorted(tar.getnames())
    assert f"{lease_name}/mnist-250/metrics.jsonl" in names
    assert f"{lease_name}/paper-mnist/mnist_paper_stoch_bc/seed1/lease.json" in names
    assert not any(n.endswith(".pt") for n in names)
    assert [n for n in names if "k-probe" in n] == [f"{lease_name}/k-probe",
                                                   f"{lease_name}/k-probe/lease.json"]
    assert len(list(out.iterdir())) <= 8  # what a lent machine sends back
    record = json.loads(tarfile.open(out / "results.tar").extractfile(
        f"{lease_name}/mnist-250/lease.json").read())
    assert record["status"] == "finished" and record["card"] == "cpu"
    assert "600 training and 100 test images" in record["data"]


def test_sweep_compares_a_kept_finished_run_with_the_command(tmp_path, capsys):
    """A finished run copied from results/ (no last.pt) is skipped only if it is the run the
    sweep asks for: its hparams.json against the command, as a resume compares them."""
    import configurator
    import runpy
    run = sweep.RunSpec("mnist", "paper_stoch_bc", 1, str(tmp_path / "seed1"),
                        ("--num_epochs=2", "--checkpoint_every=5"))
    defaults = runpy.run_path(str(REPO / "mnist.py"), run_name="mnist")
    config = configurator.configure(defaults, run.argv()[2:])
    finished_run(tmp_path / "seed1")
    (tmp_path / "seed1" / "hparams.json").write_text(json.dumps(dict(script="mnist",
                                                                     hparams=config)))
    sweep.check(run, resume=True)  # the same run (checkpoint_every may differ)
    sweep.check(run._replace(overrides=("--num_epochs=2", "--checkpoint_every=1")), resume=True)
    with pytest.raises(SystemExit):
        sweep.check(run._replace(overrides=("--num_epochs=3",)), resume=True)
    err = capsys.readouterr().err
    assert "holds a run with other settings" in err and "(num_epochs=2 there, 3 here)" in err
