"""sweep.py --cluster=slurm on a real Slurm: a small grid submitted, finished, tabled and skipped
when run again; a task signalled as Slurm signals one near its time limit, checkpointed, requeued
and finished with the metrics of an uninterrupted run; the requeue cap; a queued task not
submitted twice; and requests the cluster cannot satisfy, refused before anything is queued.

Needs a running Slurm whose jobs may run on this machine: .ci/run starts one with
tools/slurm_local.sh (`tools/slurm_local.sh start`, then `export SLURM_CONF=...` as it prints).
Without one these tests are skipped, with the reason."""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fake_data import write_fake_mnist

ROOT = Path(__file__).resolve().parents[1]

import slurm

EPOCHS = 20  # the signals land in epochs 2 and 3
WAIT = 600  # s: the longest any one step may take on a loaded machine before the test gives up
RUN_ARGS = ["--datasets=mnist", "--seeds=1", "--verify_checksums=False", "--train_set_size=200",
            "--num_units=8", "--batch_size=50", f"--num_epochs={EPOCHS}", "--device=cpu",
            "--compile=false"]
SLURM_ARGS = ["--cluster=slurm", "--gpus_per_job=0", "--cpus_per_job=1"]


def unreachable():
    """Why no test can run on Slurm here, or None."""
    if shutil.which("sinfo") is None:
        return ("no sinfo: Slurm is not installed here (tools/slurm_local.sh install, then "
                "start, runs a single-node one)")
    proc = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True)
    if proc.returncode:
        return (f"no Slurm controller answers (sinfo: {' '.join(proc.stderr.split())}); "
                "tools/slurm_local.sh start runs one, and prints the SLURM_CONF to export")
    states = proc.stdout.split()
    if not any(s.rstrip("*~#") in ("idle", "mix", "mixed", "alloc", "allocated")
               for s in states):
        return f"no node of this Slurm is up (sinfo: {' '.join(states) or 'no nodes'})"
    return None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    reason = unreachable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    write_fake_mnist(root / "data", n_train=300, n_test=100)
    return root


def sweep(*args):
    return subprocess.run([sys.executable, "sweep.py", *args], cwd=ROOT, capture_output=True,
                          text=True)


def metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def jobs_of(sweep_dir):
    path = Path(sweep_dir) / "submitit" / slurm.RECORD
    return [json.loads(line)["job"] for line in path.read_text().splitlines()]


def state(job):
    """The job's state in squeue, or None once it has left the queue."""
    out = slurm.ask("squeue", "--noheader", "--array", "--format=%i %T")
    return dict(line.split() for line in out.splitlines()).get(job)


def wait(what, condition):
    deadline = time.time() + WAIT
    while not condition():
        assert time.time() < deadline, f"waited {WAIT} s for {what}"
        time.sleep(0.1)


# The parsing of Slurm's answers, and what is refused: no Slurm needed ----------------------

def test_time_limits_and_gpus_as_sinfo_writes_them():
    assert slurm.minutes("infinite") is None and slurm.minutes("UNLIMITED") is None
    assert slurm.minutes("10:00") == 10 and slurm.minutes("2:00:00") == 120
    assert slurm.minutes("1-00:00:00") == 1440 and slurm.minutes("0:30") == 0.5
    assert slurm.gpus("(null)") == 0 and slurm.gpus("gpu:2") == 2 and slurm.gpus("gpu") == 1
    assert slurm.gpus("gpu:a100:4(S:0-1),nic:1") == 4 and slurm.gpus("nic:1") == 0


OFFER = {"cpu": dict(cpus=2, gpus=0, minutes=None, default=True),
         "gpu": dict(cpus=32, gpus=4, minutes=2880, default=False)}


def test_refusals_name_the_option_that_asked():
    request = dict(time=1440, gpus_per_node=1, cpus_per_task=8)
    got = slurm.refusals(request, offer=OFFER)
    assert len(got) == 2 and got[0].startswith("--gpus_per_job=1: the nodes of partition cpu "
                                               "have no GPUs")
    assert got[1].startswith("--cpus_per_job=8: the nodes of partition cpu have at most 2 CPUs")
    assert slurm.refusals(request, {"cpus_per_task"}, OFFER)[1].startswith(
        "--slurm=cpus_per_task=8: ")
    assert slurm.refusals({**request, "partition": "gpu"}, offer=OFFER) == []
    got = slurm.refusals(dict(request, partition="gpu", gpus_per_node=8, time=3000), offer=OFFER)
    assert [m.split(":")[0] for m in got] == ["--gpus_per_job=8", "--time=3000"]
    assert slurm.refusals(dict(request, partition="gpu", time="3-00:00"), offer=OFFER) == []
    assert "at most 4 GPU(s)" in got[0] and "at most 2880 minutes" in got[1]
    assert slurm.refusals(dict(request, partition="cpu,gpu"), offer=OFFER) == []
    assert slurm.refusals(dict(request, partition="gpus"), offer=OFFER) == [
        "--partition=gpus: no partition gpus on this cluster; sinfo lists cpu, gpu"]


def test_exactly_what_a_node_has_is_granted():
    request = dict(time=2880, gpus_per_node=4, cpus_per_task=32, partition="gpu")
    assert slurm.refusals(request, offer=OFFER) == []
    assert slurm.refusals(dict(request, cpus_per_task=2, gpus_per_node=0, partition="cpu"),
                          offer=OFFER) == []


def fake_command(tmp_path, monkeypatch, name, output):
    """A stand-in for a Slurm command, first on PATH, that prints what a real one printed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}EOF\n")
    (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_a_partition_offers_what_its_largest_node_has(tmp_path, monkeypatch):
    """sinfo --Node prints a line per node and partition, in no order of size: the partition
    offers the most CPUs and GPUs of any of its nodes, not the last node's."""
    fake_command(tmp_path, monkeypatch, "sinfo",
                 "big|64|gpu:a100:8(S:0-1)|2-00:00:00\n"
                 "small|16+|gpu:a100:2|2-00:00:00\n"
                 "cpu1|4|(null)|infinite\n"
                 "cpu1|8|(null)|infinite\n".replace("big", "gpu").replace("small", "gpu")
                 .replace("cpu1", "cpu*"))
    assert slurm.partitions() == {
        "gpu": dict(cpus=64, gpus=8, minutes=2880, default=False),
        "cpu": dict(cpus=8, gpus=0, minutes=None, default=True)}


def test_the_queue_is_matched_to_this_sweeps_runs(tmp_path, monkeypatch):
    """squeue, as a stand-in that prints the answer of a real one: job 7_0 of this sweep is
    pending, 7_1 runs; 8_0 is another sweep's job (its batch script is elsewhere), and a job id
    that another sweep got too does not count."""
    folder = tmp_path / "sweep" / "submitit"
    folder.mkdir(parents=True)
    (folder / slurm.RECORD).write_text("".join(
        json.dumps(dict(job=job, run=f"/runs/{job}")) + "\n" for job in ("7_0", "7_1", "8_0")))
    script = folder / ".submission_file_0.sh"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(
        "#!/bin/sh\n"
        f"echo '7_0|PENDING|BeginTime|{script}'\n"
        f"echo '7_1|RUNNING|None|{script}'\n"
        f"echo '8_0|RUNNING|None|{tmp_path / 'other' / 'submitit' / 'x.sh'}'\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert slurm.in_queue(folder) == {
        "/runs/7_0": ("queued", "Slurm job 7_0, PENDING: BeginTime"),
        "/runs/7_1": ("running", "Slurm job 7_1, RUNNING")}
    assert slurm.in_queue(tmp_path) == {}  # no submission recorded: squeue is not asked


# On Slurm -------------------------------------------------------------------------------------

def job_state(job):
    """Slurm's state of a one-task array job that may have left the queue (kept for MinJobAge,
    300 s); by the array's id: a while after its end, scontrol no longer knows the task's."""
    out = slurm.ask("scontrol", "show", "job", job.split("_")[0])
    return out.split("JobState=")[1].split()[0]


@pytest.mark.slow
def test_a_task_whose_run_failed_is_failed_and_the_sweep_says_why(data):
    """Issue 25: tasks whose runs stopped with "error: MNIST: ..." exited 0 (COMPLETED, "Job
    completed successfully"), and the sweep planned them as new starts. The fake files fail the
    official MD5s (verify_checksums is on), at once."""
    sweep_dir = data / "failing"
    args = [str(sweep_dir), "--variants=det_bc",
            *[a for a in RUN_ARGS if not a.startswith("--verify_checksums")],
            f"--data_dir={data / 'data'}", *SLURM_ARGS, "--time=60"]
    assert sweep(*args).returncode == 0
    [job] = jobs_of(sweep_dir)
    wait("the failing task", lambda: state(job) is None)
    assert job_state(job) == "FAILED"
    log = (sweep_dir / "submitit" / job / f"{job}_0_log.err").read_text()
    assert "error: corrupt: " in log and "Job completed successfully" not in log
    again = sweep(*args, "--dry_run")
    run_dir = sweep_dir / "mnist_det_bc" / "seed1"
    assert f"  failed  {run_dir}  (exit status " in again.stdout, again.stdout
    assert (f"; more in {sweep_dir / 'submitit' / job / f'{job}_0_log.err'}): error: corrupt: "
            in again.stdout), again.stdout
    assert again.stdout.endswith(", 1 failed (run again with --retry_failed).\n")
    assert "  retry   python mnist.py" in sweep(*args, "--retry_failed", "--dry_run").stdout


@pytest.fixture(scope="module")
def grid(data):
    """A 2-run grid (det. BC and no regularizer, seed 1) submitted and left to run; beside it,
    a sweep of the det. BC run alone, signalled twice with a cap of one requeue after a time
    limit, then continued by the sweep command. Their outputs at each step."""
    out = SimpleNamespace()
    out.a, out.b = data / "a", data / "b"
    a_args = [str(out.a), "--variants=det_bc,no_reg", *RUN_ARGS, f"--data_dir={data / 'data'}",
              *SLURM_ARGS, "--time=60", "--parallel=1"]  # a CPU left for the other sweep
    # --time=5: under submitit's floor of 50 min any signal counts as the time limit
    b_args = [str(out.b), "--variants=det_bc", *RUN_ARGS, f"--data_dir={data / 'data'}",
              *SLURM_ARGS, "--time=5", "--max_timeouts=1"]
    out.a_args = a_args
    out.a_submit = sweep(*a_args)
    out.b_submit = sweep(*b_args)
    assert out.a_submit.returncode == 0 and out.b_submit.returncode == 0, (
        out.a_submit.stderr + out.b_submit.stderr)
    out.a_again = sweep(*a_args)  # at once: its tasks are pending or running
    out.a_jobs = jobs_of(out.a)

    run = out.b / "mnist_det_bc" / "seed1"
    [job] = jobs_of(out.b)
    wait("the first checkpoint", lambda: len(metrics(run)) >= 1)
    slurm.ask("scancel", "--signal=USR2", job)  # what Slurm sends near the time limit
    wait("the requeue", lambda: state(job) == "PENDING")
    slurm.ask("scontrol", "hold", job)  # so that it is still queued while the sweep looks
    out.stopped_at = len(metrics(run))
    out.b_held_dry = sweep(*b_args, "--dry_run")
    out.b_held = sweep(*b_args)
    out.b_jobs_while_held = jobs_of(out.b)
    slurm.ask("scontrol", "release", job)
    wait("the resumed run's next epoch", lambda: len(metrics(run)) > out.stopped_at
         and (run / "resumes.jsonl").exists())
    slurm.ask("scancel", "--signal=USR2", job)  # a second time limit: past the cap of one
    wait("the end of the task", lambda: state(job) is None)
    out.log = "".join(p.read_text() for p in (out.b / "submitit").glob(f"{job}/*_log.*"))
    out.capped_at = len(metrics(run))
    out.b_after_cap = sweep(*b_args, "--dry_run")
    out.b_continue = sweep(*b_args)
    assert out.b_continue.returncode == 0, out.b_continue.stderr
    out.b_jobs = jobs_of(out.b)
    wait("the continued run", lambda: state(out.b_jobs[-1]) is None)
    wait("the grid", lambda: all(state(j) is None for j in out.a_jobs))
    out.b_run = run
    out.a_rerun = sweep(*a_args)
    out.table = subprocess.run([sys.executable, "results.py", str(out.a), "--format=csv"],
                               cwd=ROOT, capture_output=True, text=True)
    return out


@pytest.mark.slow
def test_the_grid_is_one_array_job_that_finishes(grid):
    out = grid.a_submit.stdout
    assert "Submitted Slurm array job" in out and "(2 tasks)" in out
    assert len(grid.a_jobs) == 2 and grid.a_jobs[0].split("_")[0] == grid.a_jobs[1].split("_")[0]
    for variant in ("det_bc", "no_reg"):
        assert [m["epoch"] for m in metrics(grid.a / f"mnist_{variant}" / "seed1")] == list(
            range(1, EPOCHS + 1))


@pytest.mark.slow
def test_queued_or_running_tasks_are_not_submitted_again(grid):
    out = grid.a_again.stdout
    assert grid.a_again.returncode == 0, grid.a_again.stderr
    assert "0 to start, 0 to resume, 0 already done" in out and "Submitted" not in out
    for job in grid.a_jobs:
        assert f"(Slurm job {job}, " in out


@pytest.mark.slow
def test_a_requeued_task_waiting_in_the_queue_is_shown_queued_not_resumed(grid):
    [job] = grid.b_jobs_while_held
    out = grid.b_held_dry.stdout
    assert (f"  queued  {grid.b / 'mnist_det_bc' / 'seed1'}  (Slurm job {job}, PENDING: "
            in out)
    assert "0 to start, 0 to resume, 0 already done, 0 running elsewhere, 1 queued on Slurm." \
        in out
    assert grid.b_held.returncode == 0 and "Submitted" not in grid.b_held.stdout


@pytest.mark.slow
def test_the_signalled_task_checkpointed_and_was_requeued(grid):
    assert 1 <= grid.stopped_at < EPOCHS
    resumes = (grid.b_run / "resumes.jsonl").read_text().splitlines()
    assert len(resumes) == 2  # after the requeue, and after the sweep command past the cap
    assert "Requeued job" in grid.log and "SIGTERM received" in (grid.b_run / "log.txt").read_text()


@pytest.mark.slow
def test_past_the_requeue_cap_the_task_ends_and_the_sweep_continues_it(grid):
    assert "Job not requeued because: timed-out too many times" in grid.log
    assert grid.stopped_at < grid.capped_at < EPOCHS
    assert (f"  resume  python mnist.py config/mnist_det_bc.py --seed=1 --out_dir={grid.b_run} "
            in grid.b_after_cap.stdout)
    assert "Submitted Slurm array job" in grid.b_continue.stdout and len(grid.b_jobs) == 2


@pytest.mark.slow
def test_the_interrupted_run_has_the_metrics_of_the_uninterrupted_one(grid):
    def without_seconds(run_dir):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics(run_dir)]
    uninterrupted = without_seconds(grid.a / "mnist_det_bc" / "seed1")
    assert len(uninterrupted) == EPOCHS and without_seconds(grid.b_run) == uninterrupted


@pytest.mark.slow
def test_results_and_the_rerun_that_skips(grid):
    assert grid.table.returncode == 0, grid.table.stderr
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(grid.table.stdout))}
    assert set(rows) == {"BinaryConnect (det.)", "No regularizer"}
    for variant, method in (("det_bc", "BinaryConnect (det.)"), ("no_reg", "No regularizer")):
        error = metrics(grid.a / f"mnist_{variant}" / "seed1")[-1]["test_err"]
        assert rows[method]["n"] == "1" and float(rows[method]["mean"]) == error
    assert grid.a_rerun.returncode == 0
    assert "0 to start, 0 to resume, 2 already done, 0 running elsewhere." in grid.a_rerun.stdout
    assert jobs_of(grid.a) == grid.a_jobs


# Requests the cluster cannot satisfy: refused before anything is queued --------------------

def refused(data, tmp_path, *args):
    sweep_dir = tmp_path / "sweep"
    proc = sweep(str(sweep_dir), "--variants=det_bc", *RUN_ARGS, f"--data_dir={data / 'data'}",
                 "--cluster=slurm", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("sweep.py: ") and "Submitted" not in proc.stdout
    assert not sweep_dir.exists()  # no batch script, no pickle, nothing recorded
    return proc.stderr


@pytest.mark.slow
def test_requests_no_node_can_satisfy_are_refused_naming_the_option(data, tmp_path):
    offer = slurm.partitions()
    default = [p for p, o in offer.items() if o["default"]][0]
    most = offer[default]["cpus"]
    err = refused(data, tmp_path, "--gpus_per_job=0", f"--cpus_per_job={most + 1}")
    assert len(err.strip().splitlines()) == 1
    assert f"--cpus_per_job={most + 1}" in err and f"at most {most} CPUs" in err
    if offer[default]["gpus"] == 0:  # the default --gpus_per_job=1, on a cluster without GPUs
        err = refused(data, tmp_path, "--cpus_per_job=1")
        assert "--gpus_per_job=1" in err and "no GPUs" in err
    limited = [p for p, o in offer.items() if o["minutes"] is not None]
    if limited:
        limit = offer[limited[0]]["minutes"]
        err = refused(data, tmp_path, "--gpus_per_job=0", "--cpus_per_job=1",
                      f"--partition={limited[0]}", f"--time={int(limit) + 1}")
        assert f"--time={int(limit) + 1}" in err and f"at most {limit:g} minutes" in err
    err = refused(data, tmp_path, "--gpus_per_job=0", "--cpus_per_job=1", "--partition=no_such")
    assert "--partition=no_such" in err and default in err


@pytest.mark.slow
def test_a_submission_sbatch_refuses_is_one_line_and_leaves_nothing(data, tmp_path):
    err = refused(data, tmp_path, *SLURM_ARGS, "--slurm=constraint=no_such_feature")
    assert len(err.strip().splitlines()) == 1
    assert "Slurm refused the jobs, nothing was queued: sbatch: error:" in err
    assert "Invalid feature specification" in err
