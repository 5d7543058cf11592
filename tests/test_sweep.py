"""sweep.py: a grid of runs through submitit's LocalExecutor on generated data, continued after a
real kill; results.py's table from it; the plan; and mistakes in the grid, named."""
import csv
import fcntl
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fake_data import write_fake_mnist

ROOT = Path(__file__).resolve().parents[1]

import jobs
import sweep

EPOCHS = 30  # enough epochs of tiny data for the kill to land in the middle of the first run
SEEDS = (1, 2)
VARIANTS = ("det_bc", "no_reg")


def run(script, *args, env=None):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                          text=True, env=env)


def without_slurm(tmp_path):
    """An environment whose PATH has no Slurm commands (sweep.py runs by absolute path), as on
    a laptop, even where CI runs a Slurm."""
    (tmp_path / "empty_bin").mkdir(exist_ok=True)
    return dict(os.environ, PATH=str(tmp_path / "empty_bin"))


def metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def epochs_checkpointed(run_dir):
    # metrics.jsonl is written after last.pt (checkpoints.CheckpointWriter)
    return len(metrics(run_dir)) if (Path(run_dir) / "last.pt").exists() else 0


@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory):
    """A 2 x 2 grid (2 variants x 2 seeds) of tiny MNIST runs on the CPU, killed with SIGKILL
    (sweep, submitit job and training script: a lost machine) after the first run's first
    checkpoint, then the same command twice more."""
    root = tmp_path_factory.mktemp("sweep")
    write_fake_mnist(root / "data", n_train=300, n_test=100)
    sweep_dir = root / "sweep"
    args = [str(sweep_dir), "--datasets=mnist", f"--variants={','.join(VARIANTS)}",
            f"--seeds={','.join(map(str, SEEDS))}", f"--data_dir={root / 'data'}",
            "--verify_checksums=False", "--train_set_size=200", "--num_units=8",
            "--batch_size=50", f"--num_epochs={EPOCHS}", "--device=cpu", "--compile=false"]
    first = sweep_dir / "mnist_det_bc" / "seed1"
    with open(root / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "sweep.py", *args], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while epochs_checkpointed(first) < 1:
        assert proc.poll() is None, (root / "first.log").read_text()
        assert time.time() < deadline, "the first run never checkpointed an epoch"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the sweep and all it started
    proc.wait()
    # last.pt may be an epoch ahead of metrics.jsonl (killed between the two writes): the
    # checkpoint is what a resume continues from.
    killed_at = torch.load(first / "last.pt", map_location="cpu", weights_only=False)["epoch"]
    assert 1 <= killed_at < EPOCHS, "the first run finished before the kill: raise EPOCHS"
    second = run("sweep.py", *args)
    jobs_before = sorted((sweep_dir / "submitit").iterdir())
    third = run("sweep.py", *args)
    jobs_after = sorted((sweep_dir / "submitit").iterdir())
    return SimpleNamespace(dir=sweep_dir, args=args, first=first, killed_at=killed_at,
                           second=second, third=third, new_jobs=len(jobs_after) - len(jobs_before))


@pytest.mark.slow
def test_rerun_resumes_the_killed_run_and_starts_the_others(killed_sweep):
    out = killed_sweep.second.stdout
    assert killed_sweep.second.returncode == 0, out + killed_sweep.second.stderr
    first = killed_sweep.first
    assert (f"  resume  python mnist.py config/mnist_det_bc.py --seed=1 --out_dir={first} "
            in out) and f"--resume={first}\n" in out
    assert "1 to resume" in out and "3 to start" in out and "0 already done" in out
    # a line as each run ends, in the order the one job runs them
    ended = [line for line in out.splitlines() if line.startswith("[")]
    names = [f"mnist_{variant}/seed{seed}" for variant in VARIANTS for seed in SEEDS]
    assert len(ended) == 4
    for i, (line, name) in enumerate(zip(ended, names), 1):
        assert line.startswith(f"[{i}/4] done {name}: test error "), line
        assert line.endswith(" s)") or line.endswith(" min)"), line
    for variant in VARIANTS:
        for seed in SEEDS:
            if (variant, seed) != ("det_bc", 1):
                assert (f"  start   python mnist.py config/mnist_{variant}.py --seed={seed} "
                        f"--out_dir={killed_sweep.dir / f'mnist_{variant}' / f'seed{seed}'} "
                        in out)


@pytest.mark.slow
def test_every_run_finished_with_its_own_seed_and_variant(killed_sweep):
    for variant in VARIANTS:
        for seed in SEEDS:
            run_dir = killed_sweep.dir / f"mnist_{variant}" / f"seed{seed}"
            assert [m["epoch"] for m in metrics(run_dir)] == list(range(1, EPOCHS + 1))
            hparams = json.loads((run_dir / "hparams.json").read_text())["hparams"]
            assert hparams["seed"] == seed and hparams["out_dir"] == str(run_dir)
            assert hparams["binary"] is (variant == "det_bc") and hparams["num_units"] == 8


@pytest.mark.slow
def test_killed_run_was_continued_not_restarted(killed_sweep):
    resumes = (killed_sweep.first / "resumes.jsonl").read_text().splitlines()
    assert len(resumes) == 1 and json.loads(resumes[0])["hparams"]["resume"] == str(
        killed_sweep.first)
    log = (killed_sweep.first / "log.txt").read_text()
    assert f"Resumed from {killed_sweep.first / 'last.pt'}: epoch {killed_sweep.killed_at} done" \
        in log
    for run_dir in killed_sweep.dir.glob("mnist_*/seed*"):
        if run_dir != killed_sweep.first:
            assert not (run_dir / "resumes.jsonl").exists()


@pytest.mark.slow
def test_a_finished_sweep_has_nothing_to_do(killed_sweep):
    out = killed_sweep.third.stdout
    assert killed_sweep.third.returncode == 0
    assert "0 to start, 0 to resume, 4 already done, 0 running elsewhere." in out
    assert killed_sweep.new_jobs == 0


@pytest.mark.slow
def test_changed_settings_in_a_finished_sweep_are_refused(killed_sweep):
    args = [a for a in killed_sweep.args if not a.startswith("--num_epochs=")]
    proc = run("sweep.py", *args, f"--num_epochs={EPOCHS + 5}", "--dry_run")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "holds a run with other settings" in proc.stderr and "num_epochs" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_results_table_from_the_sweep(killed_sweep):
    proc = run("results.py", str(killed_sweep.dir), "--format=csv")
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(proc.stdout))}
    assert set(rows) == {"BinaryConnect (det.)", "No regularizer"}
    for variant, method in (("det_bc", "BinaryConnect (det.)"), ("no_reg", "No regularizer")):
        errors = [metrics(killed_sweep.dir / f"mnist_{variant}" / f"seed{s}")[-1]["test_err"]
                  for s in SEEDS]
        row = rows[method]
        assert float(row["mean"]) == pytest.approx(statistics.mean(errors), abs=1e-12)
        assert float(row["std"]) == pytest.approx(statistics.stdev(errors), abs=1e-12)
        assert row["n"] == "2" and row["seeds"] == "1 2" and row["devices"] == "cpu"
        assert row["protocol"] == "lasagne" and f"num_epochs={EPOCHS}" in row["settings"]
    table = run("results.py", str(killed_sweep.dir)).stdout
    det = [line for line in table.splitlines() if "| BinaryConnect (det.) |" in line][0]
    assert f"{float(rows['BinaryConnect (det.)']['mean']):.2f} ± " in det
    assert "| 1.29 ± 0.08 (C) † |" in det
    assert "Unfinished" not in table


# The plan and its mistakes: fast, nothing is trained ---------------------------------------

@pytest.mark.parametrize("args, named", [
    (["--variants=det_bc,sotch_bc"], "sotch_bc"),
    (["--datasets=mnist,mnsit"], "mnsit"),
    (["--datasets=cifar10", "--variants=dropout"], "dropout"),
    (["--seeds=1-x"], "1-x"),
    (["--seeds=3-1"], "3-1"),
    (["--seed=3"], "--seeds"),
    (["--out_dir=elsewhere"], "--out_dir"),
    (["--num_epochs", "5"], "--key=value"),
    (["--datasets=mnist", "--variants=det_bc", "--num_unit=8"], "num_unit"),
    (["--datasets=mnist", "--variants=det_bc", "--num_epochs=0"], "num_epochs"),
    # fault 1 of issue 25: every run failed on it, on the nodes, one by one
    (["--datasets=mnist", "--data_dir=no_such_folder"], "--data_dir=no_such_folder: no such "
                                                       f"folder in {ROOT} on this machine"),
    (["--datasets=mnist", "--data_dir=README.md"], "--data_dir=README.md: not a folder"),
    (["--datasets=mnist", "--data_dir=x", "--data_on_nodes"], "--data_on_nodes is for "
                                                            "--cluster=slurm"),
])
def test_bad_grid_is_named(tmp_path, args, named):
    proc = run("sweep.py", str(tmp_path / "sweep"), *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("sweep.py: ") and named in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_default_grid_is_table2(tmp_path):
    proc = run("sweep.py", str(tmp_path / "sweep"), "--dry_run")
    assert proc.returncode == 0, proc.stderr
    assert "60 runs (10 config(s) x 6 seed(s))" in proc.stdout
    assert "60 to start, 0 to resume, 0 already done" in proc.stdout
    for config in ["mnist_paper_no_reg", "mnist_paper_det_bc", "mnist_paper_stoch_bc",
                   "mnist_paper_dropout", "cifar10_no_reg", "cifar10_det_bc", "cifar10_stoch_bc",
                   "svhn_no_reg", "svhn_det_bc", "svhn_stoch_bc"]:
        dataset = config.split("_")[0]
        assert (f"  start   python {dataset}.py config/{config}.py --seed=6 "
                f"--out_dir={tmp_path / 'sweep' / config / 'seed6'}\n") in proc.stdout
    assert not (tmp_path / "sweep").exists()


def test_grid_file(tmp_path):
    grid = tmp_path / "grid.txt"
    grid.write_text("# two MNIST variants, two seeds\n--datasets=mnist --variants=det_bc,stoch_bc\n"
                    "--seeds=1,2  # seeds\n\n--num_epochs=3\n")
    proc = run("sweep.py", str(tmp_path / "sweep"), f"@{grid}", "--dry_run")
    assert proc.returncode == 0, proc.stderr
    assert "4 runs (2 config(s) x 2 seed(s))" in proc.stdout
    assert (f"python mnist.py config/mnist_stoch_bc.py --seed=2 "
            f"--out_dir={tmp_path / 'sweep' / 'mnist_stoch_bc' / 'seed2'} --num_epochs=3\n"
            in proc.stdout)


def test_a_run_held_by_another_process_is_left_alone(tmp_path):
    run_dir = tmp_path / "sweep" / "mnist_det_bc" / "seed1"
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = run("sweep.py", str(tmp_path / "sweep"), "--datasets=mnist", "--variants=det_bc",
                   "--seeds=1,2", "--dry_run")
    assert proc.returncode == 0, proc.stderr
    assert f"  running {run_dir}  (another process is running it)" in proc.stdout
    assert "1 to start, 0 to resume, 0 already done, 1 running elsewhere." in proc.stdout


def test_slurm_parameters_make_a_valid_sbatch_file(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string
    args = SimpleNamespace(time=0, gpus_per_job=1, cpus_per_job=8, partition="gpu", parallel=4,
                           slurm=["account=abc", "qos=high"])
    text = _make_sbatch_string(command="true", folder=tmp_path / "%j", map_count=10,
                               **sweep.slurm_parameters(args))
    for line in ["--partition=gpu", "--time=1440", "--gpus-per-node=1", "--cpus-per-task=8",
                 "--array=0-9%4", "--account=abc", "--qos=high", "--signal=USR2@120"]:
        assert f"#SBATCH {line}\n" in text, line


def test_slurm_without_slurm_says_so(tmp_path):
    proc = run("sweep.py", str(tmp_path / "sweep"), "--cluster=slurm", "--datasets=mnist",
               "--variants=det_bc", "--seeds=1", env=without_slurm(tmp_path))
    assert proc.returncode == 2 and "srun" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_time_limit_checkpoints_the_run_and_the_requeued_job_continues_it(tmp_path):
    """What submitit does on Slurm's time-limit or pre-emption signal (USR2), step by step: the
    job's checkpoint() stops the script at a checkpoint (SIGTERM; the script itself ignores the
    USR2 that Slurm sends every process) and returns the job to requeue, which resumes the run."""
    import threading
    write_fake_mnist(tmp_path / "data", n_train=300, n_test=100)
    run_dir = tmp_path / "sweep" / "mnist_det_bc" / "seed1"
    job = sweep.RunSpec("mnist", "det_bc", 1, str(run_dir), (
        f"--data_dir={tmp_path / 'data'}", "--verify_checksums=False", "--train_set_size=200",
        "--num_units=8", "--batch_size=50", "--num_epochs=100", "--device=cpu",
        "--compile=false"))
    lane = jobs.Lane([job], str(ROOT))
    returned = []
    thread = threading.Thread(target=lambda: returned.extend(lane()))
    thread.start()
    deadline = time.time() + 600
    while epochs_checkpointed(run_dir) < 1:
        assert thread.is_alive() and time.time() < deadline
        time.sleep(0.02)
    os.kill(lane.child.pid, signal.SIGUSR2)
    time.sleep(0.5)
    assert lane.child.poll() is None  # USR2 did not end the script
    requeued = lane.checkpoint()
    thread.join()
    assert returned == [(str(run_dir), 128 + signal.SIGTERM)]
    stopped_at = epochs_checkpointed(run_dir)
    assert stopped_at < 100 and "SIGTERM received" in (run_dir / "log.txt").read_text()
    assert requeued.function is not lane and requeued.function.child is None
    assert requeued.result() == [(str(run_dir), 0)]  # the requeued job, run here
    assert [m["epoch"] for m in metrics(run_dir)] == list(range(1, 101))
    assert len((run_dir / "resumes.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_a_sweep_from_another_directory(tmp_path):
    """The job unpickles and runs outside the repository; the commands name the scripts by path."""
    write_fake_mnist(tmp_path / "data", n_train=300, n_test=100)
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "sweep", "--datasets=mnist",
                           "--variants=stoch_bc", "--seeds=7", "--data_dir=data",
                           "--verify_checksums=False", "--train_set_size=200", "--num_units=8",
                           "--batch_size=50", "--num_epochs=1", "--device=cpu",
                           "--compile=false"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (f"  start   python {ROOT / 'mnist.py'} {ROOT / 'config' / 'mnist_stoch_bc.py'} "
            "--seed=7 --out_dir=sweep/mnist_stoch_bc/seed7 --data_dir=data " in proc.stdout)
    last = metrics(tmp_path / "sweep" / "mnist_stoch_bc" / "seed7")[-1]
    assert last["epoch"] == 1
    assert f"[1/1] done mnist_stoch_bc/seed7: test error {last['test_err']:.2f} % (" in proc.stdout
    assert not list((tmp_path / "sweep" / "submitit").glob("ended-*"))


def test_a_slurm_sweep_may_name_a_gpu_this_login_node_lacks(tmp_path):
    args = [str(tmp_path / "sweep"), "--datasets=mnist", "--variants=det_bc", "--seeds=1",
            "--dry_run"]
    proc = run("sweep.py", *args, "--cluster=slurm", "--device=cuda", env=without_slurm(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "--device=cuda\n" in proc.stdout and "1 to start" in proc.stdout
    assert "note: the Slurm request is not checked against the cluster (no sinfo" in proc.stdout
    proc = run("sweep.py", *args, "--cluster=slurm", "--device=gpu",  # still spelled right
               env=without_slurm(tmp_path))
    assert proc.returncode == 2 and "device" in proc.stderr
    # a data folder that only the compute nodes have: refused unless said so
    proc = run("sweep.py", *args, "--cluster=slurm", "--data_dir=/on/the/nodes",
               env=without_slurm(tmp_path))
    assert proc.returncode == 2 and proc.stderr == (
        "sweep.py: --data_dir=/on/the/nodes: no such folder on this machine; if it exists on the "
        "compute nodes only, add --data_on_nodes\n")
    proc = run("sweep.py", *args, "--cluster=slurm", "--data_dir=/on/the/nodes",
               "--data_on_nodes", env=without_slurm(tmp_path))
    assert proc.returncode == 0 and "--data_dir=/on/the/nodes\n" in proc.stdout
    if not torch.cuda.is_available():  # on this machine it would not run
        proc = run("sweep.py", *args, "--device=cuda")
        assert proc.returncode == 2 and "CUDA is not available" in proc.stderr


@pytest.mark.parametrize("n_runs, gpus, per_gpu, parallel, expected", [
    (8, 2, 1, 0, [0, 1]),                  # one job per GPU
    (8, 2, 3, 0, [0, 1, 0, 1, 0, 1]),      # three side by side on each
    (3, 2, 3, 0, [0, 1, 0]),               # no more jobs than runs, spread over both GPUs
    (8, 0, 4, 0, [None]),                  # the CPU: one job ...
    (8, 0, 1, 3, [None, None, None]),      # ... or --parallel
    (8, 2, 4, 3, [0, 1, 0]),               # --parallel decides the count
])
def test_jobs_per_gpu(n_runs, gpus, per_gpu, parallel, expected):
    assert sweep.lane_gpus(n_runs, gpus, per_gpu, parallel) == expected


def test_runs_per_gpu_pins_each_local_job_to_its_gpu(tmp_path, monkeypatch, capsys):
    """run_local with 2 GPUs and --runs_per_gpu=2: four jobs, two pinned to each GPU, sharing
    the runs out in turn."""
    submitted = []

    class Executor:
        def __init__(self, folder):
            self.params = {}

        def update_parameters(self, **params):
            self.params = params

        def submit(self, lane):
            submitted.append((self.params["visible_gpus"], [r.seed for r in lane.runs]))
            return SimpleNamespace(done=lambda: True,
                                   result=lambda: [(r.dir, 0) for r in lane.runs])
    monkeypatch.setattr(sweep, "gpu_count", lambda: 2)
    monkeypatch.setattr(sweep.submitit, "LocalExecutor", Executor)
    runs = [sweep.RunSpec("mnist", "det_bc", s, str(tmp_path / f"seed{s}"), ())
            for s in range(1, 7)]
    args = SimpleNamespace(runs_per_gpu=2, parallel=0, time=0)
    sweep.run_local(runs, args, tmp_path / "submitit" / "%j")
    assert submitted == [((0,), [1, 5]), ((1,), [2, 6]), ((0,), [3]), ((1,), [4])]
    out = capsys.readouterr().out
    assert "Running 6 runs as 4 local job(s) on 2 GPU(s)" in out
    assert f"[6/6] done {tmp_path.name}/seed4\n" in out  # told by the job's result at least
    assert list((tmp_path / "submitit").iterdir()) == []  # the file of ended runs is gone


def test_each_run_is_told_as_it_ends(tmp_path, monkeypatch, capsys):
    """Issue 15: the sweep printed nothing until every run had ended. Now a line as each ends,
    with the count, the test error (at the best-validation epoch) and the time it took."""
    runs = [sweep.RunSpec("mnist", "stoch_bc", s, str(tmp_path / "sweep" / "mnist_stoch_bc" /
                                                    f"seed{s}"), ()) for s in (1, 2, 3)]
    Path(runs[0].dir).mkdir(parents=True)
    (Path(runs[0].dir) / "metrics.jsonl").write_text(json.dumps(dict(epoch=1, test_err=1.3249))
                                                     + "\n")
    events = tmp_path / "ended.jsonl"
    events.write_text("")
    lane = jobs.Lane(runs, str(tmp_path), events=str(events))  # what a job tells, as it tells
    job = SimpleNamespace(ended=False, result=lambda: [(r.dir, 0) for r in runs[:2]]
                          + [(runs[2].dir, 1)])
    job.done = lambda: job.ended
    printed = []

    def sleep(seconds):  # between two looks: the job goes on
        printed.append(capsys.readouterr().out)
        if len(printed) == 1:
            lane.tell(runs[0], 0, 41 * 60)
        else:
            lane.tell(runs[1], None, 0.5)  # it had finished before
            lane.tell(runs[2], 1, 30)
            job.ended = True
    monkeypatch.setattr(sweep.time, "sleep", sleep)
    assert sweep.wait_local([job], runs, events) == 1
    printed.append(capsys.readouterr().out)
    assert printed == [
        "",
        "[1/3] done mnist_stoch_bc/seed1: test error 1.32 % (41 min)\n",
        "[2/3] done mnist_stoch_bc/seed2 (finished before)\n"
        "[3/3] failed mnist_stoch_bc/seed3 (exit status 1, 30 s)\n"]


def test_a_failed_job_names_the_runs_it_did_not_run(tmp_path, capsys):
    import submitit
    runs = [sweep.RunSpec("mnist", "det_bc", s, str(tmp_path / "mnist_det_bc" / f"seed{s}"), ())
            for s in (1, 2)]
    events = tmp_path / "ended.jsonl"
    events.write_text("")
    jobs.Lane(runs, str(tmp_path), events=str(events)).tell(runs[0], -9, 5)
    def result():
        raise submitit.core.utils.UncompletedJobError("Job 7 (task: 0) with path x\nhas not "
                                                      "produced any output (state: FAILED)")
    job = SimpleNamespace(done=lambda: True, result=result, job_id="7",
                          paths=SimpleNamespace(stderr="x/7_0_log.err"))
    assert sweep.wait_local([job], runs, events) == 2
    assert capsys.readouterr().out == (
        "[1/2] failed mnist_det_bc/seed1 (killed by SIGKILL, 5 s)\n"
        "job 7 failed: has not produced any output (state: FAILED) (see x/7_0_log.err)\n"
        "[2/2] not run: mnist_det_bc/seed2\n")


def test_runs_per_gpu_below_one_is_refused(tmp_path):
    proc = run("sweep.py", str(tmp_path / "sweep"), "--datasets=mnist", "--runs_per_gpu=0",
               "--dry_run")
    assert proc.returncode == 2 and "--runs_per_gpu=0: give 1 or more" in proc.stderr


# A failed run says why (issue 25, fault 1) ----------------------------------------------------

def failing_run(run_dir, code="sys.exit('error: MNIST: missing in /no/such/folder: ...')"):
    """A stand-in for a RunSpec whose script prints a warning, then its error line, and fails."""
    script = f"import sys; print('a warning', file=sys.stderr); {code}"
    return SimpleNamespace(dir=str(run_dir), argv=lambda resume=False: [sys.executable, "-c",
                                                                        script])


def test_a_failed_run_leaves_its_error_line_and_its_job_fails(tmp_path, monkeypatch, capsys):
    """The job (Lane) passes on the script's stderr, keeps its last line in the run's FAILED note
    with the files that hold the rest, goes on with its other runs, then raises: a job that
    returned would end with status 0 ("Job completed successfully"), and Slurm would mark it
    COMPLETED."""
    job_log = tmp_path / "submitit" / "7" / "7_0_log.err"
    job_log.parent.mkdir(parents=True)
    job_log.write_text("")
    monkeypatch.setattr(jobs, "_job_log", lambda: str(job_log))
    failing = failing_run(tmp_path / "sweep" / "mnist_det_bc" / "seed1")
    fine = failing_run(tmp_path / "sweep" / "mnist_det_bc" / "seed2", code="pass")
    events = tmp_path / "ended.jsonl"
    events.write_text("")
    with pytest.raises(jobs.RunsFailed) as raised:
        jobs.Lane([failing, fine], str(tmp_path), events=str(events))()
    assert str(raised.value).splitlines() == [
        "1 of 2 run(s) failed:",
        f"{failing.dir} (exit status 1; more in {job_log}): error: MNIST: missing in "
        "/no/such/folder: ..."]
    assert "a warning\nerror: MNIST: missing in" in capsys.readouterr().err  # passed on
    note = json.loads((Path(failing.dir) / jobs.FAILED).read_text())
    assert note == dict(rc=1, error="error: MNIST: missing in /no/such/folder: ...",
                        more=[str(job_log)])  # no log.txt: the script left none
    assert not (Path(fine.dir) / jobs.FAILED).exists()
    told = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(e["dir"], e["rc"]) for e in told] == [(failing.dir, 1), (fine.dir, 0)]
    line = sweep.ended_line(failing.dir, 1, 3)
    assert line == (f"failed mnist_det_bc/seed1 (exit status 1, 3 s; more in {job_log}): "
                    "error: MNIST: missing in /no/such/folder: ...")
    # a run that kept its log.txt points to it too; a crash gives its traceback's last line
    (Path(failing.dir) / "log.txt").write_text("epoch 1 ...\n")
    crashing = failing_run(failing.dir, code="raise ValueError('a bug')")
    with pytest.raises(jobs.RunsFailed):
        jobs.Lane([crashing], str(tmp_path))()
    assert jobs.failure(failing.dir) == dict(rc=1, error="ValueError: a bug", more=[
        str(job_log), str(Path(failing.dir).resolve() / "log.txt")])
    # the next attempt starts without the note; one that ends well leaves none
    jobs.Lane([failing_run(failing.dir, code="pass")], str(tmp_path))()
    assert jobs.failure(failing.dir) is None


def test_a_failed_run_is_listed_with_its_error_and_run_again_only_when_asked(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    failed = sweep_dir / "mnist_det_bc" / "seed1"
    failed.mkdir(parents=True)
    job_log = sweep_dir / "submitit" / "7" / "7_0_log.err"
    (failed / jobs.FAILED).write_text(json.dumps(dict(
        rc=1, error="error: the training loss became nan at epoch 1, batch 2; stopping.",
        more=[str(job_log)])))
    args = [str(sweep_dir), "--datasets=mnist", "--variants=det_bc", "--seeds=1,2", "--dry_run"]
    sweep.main(args)
    out = capsys.readouterr().out
    why = (f"(exit status 1; more in {job_log}): error: the training loss became nan at epoch 1, "
           "batch 2; stopping.")
    assert f"  failed  {failed}  {why}\n" in out
    assert f"  start   python mnist.py config/mnist_det_bc.py --seed=2 " in out
    assert out.endswith("1 to start, 0 to resume, 0 already done, 0 running elsewhere, 1 failed "
                        "(run again with --retry_failed).\n")
    sweep.main([*args, "--retry_failed"])
    out = capsys.readouterr().out
    assert (f"  retry   python mnist.py config/mnist_det_bc.py --seed=1 --out_dir={failed}  "
            f"(it failed: {why[1:]}\n") in out
    assert out.endswith("1 to start, 0 to resume, 1 to retry (they failed), 0 already done, "
                        "0 running elsewhere.\n")


def test_the_sweep_skips_the_failures_its_jobs_raise_and_names_a_job_that_crashed(tmp_path,
                                                                                    capsys):
    import submitit
    runs = [sweep.RunSpec("mnist", "det_bc", s, str(tmp_path / "mnist_det_bc" / f"seed{s}"), ())
            for s in (1, 2)]
    events = tmp_path / "ended.jsonl"
    events.write_text("")
    jobs.Lane(runs, str(tmp_path), events=str(events)).tell(runs[0], 1, 5)

    def raised(error):
        def result():
            raise submitit.core.utils.FailedJobError(
                "Job (task=0) failed during processing with trace:\n----------------------\n"
                f"Traceback (most recent call last):\n  ...\n{error}\n"
                "----------------------\nYou can check full logs with ...\n  - x/7_0_log.err")
        return SimpleNamespace(done=lambda: True, result=result, job_id="7",
                               paths=SimpleNamespace(stderr="x/7_0_log.err"))
    assert sweep.wait_local([raised("RunsFailed: 1 of 1 run(s) failed:")], runs[:1], events) == 1
    assert capsys.readouterr().out == "[1/1] failed mnist_det_bc/seed1 (exit status 1, 5 s)\n"
    events.write_text("")
    assert sweep.wait_local([raised("MemoryError: out of memory")], runs[1:], events) == 1
    assert capsys.readouterr().out == ("job 7 failed: MemoryError: out of memory (see "
                                       "x/7_0_log.err)\n[1/1] not run: mnist_det_bc/seed2\n")


def test_no_stray_job_folder_is_left(tmp_path, monkeypatch, capsys):
    """submitit's local job controller makes the folder it is given, %j literally
    (local.py, Controller.start_tasks), beside the real ones."""
    class Executor:
        def __init__(self, folder):
            self.folder = folder

        def update_parameters(self, **params):
            pass

        def submit(self, lane):
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            return SimpleNamespace(done=lambda: True,
                                   result=lambda: [(r.dir, 0) for r in lane.runs])
    monkeypatch.setattr(sweep, "gpu_count", lambda: 0)
    monkeypatch.setattr(sweep.submitit, "LocalExecutor", Executor)
    runs = [sweep.RunSpec("mnist", "det_bc", 1, str(tmp_path / "seed1"), ())]
    sweep.run_local(runs, SimpleNamespace(runs_per_gpu=1, parallel=0, time=0),
                    tmp_path / "submitit" / "%j")
    assert list((tmp_path / "submitit").iterdir()) == []


@pytest.mark.slow
def test_a_sweep_whose_run_fails_says_why_and_fails(tmp_path):
    """The issue's case: a run that diverges to NaN in its first epoch (--H=1e30), through
    submitit's LocalExecutor."""
    write_fake_mnist(tmp_path / "data", n_train=300, n_test=100)
    sweep_dir = tmp_path / "sweep"
    args = [str(sweep_dir), "--datasets=mnist", "--variants=det_bc", "--seeds=1",
            f"--data_dir={tmp_path / 'data'}", "--verify_checksums=False", "--train_set_size=200",
            "--num_units=8", "--batch_size=50", "--num_epochs=2", "--device=cpu",
            "--compile=false", "--H=1e30"]
    proc = run("sweep.py", *args)
    assert proc.returncode == 1
    [job_dir] = [p for p in (sweep_dir / "submitit").iterdir() if p.is_dir()]  # no %j
    job_log = job_dir / f"{job_dir.name}_0_log.err"
    error = "error: the training loss became nan at epoch 1, batch 2; stopping."
    assert (f"[1/1] failed mnist_det_bc/seed1 (exit status 1, " in proc.stdout
            and f" s; more in {job_log}): {error}" in proc.stdout)
    log = job_log.read_text()
    assert error in log and "Submitted job triggered an exception" in log
    assert "Job completed successfully" not in log
    again = run("sweep.py", *args, "--dry_run")
    assert f"  failed  {sweep_dir / 'mnist_det_bc' / 'seed1'}  (exit status 1; more in " \
        in again.stdout and error in again.stdout


# What the sweep reads: pinned (issue 25, item 6) ----------------------------------------------

def test_a_run_whose_records_cannot_be_read_is_resumed_not_skipped(tmp_path):
    """A run with a checkpoint but a damaged hparams.json or metrics.jsonl is resumed (the resume
    rewrites metrics.jsonl, or names the damaged file), never counted as done and skipped."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert jobs.progress(run_dir) == "start"
    (run_dir / "last.pt").write_bytes(b"")
    (run_dir / "hparams.json").write_text(json.dumps(dict(hparams=dict(num_epochs=2))))
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    assert jobs.progress(run_dir) == "done"
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    assert jobs.progress(run_dir) == "resume"
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    (run_dir / "hparams.json").write_text('{"hparams": {"num_epo')
    assert jobs.progress(run_dir) == "resume"


def test_events_are_told_once_each_and_a_half_written_line_waits(tmp_path, monkeypatch, capsys):
    """wait_local reads the events file from where it stopped (the offset), over several looks;
    a line that a job is still writing (no newline yet) is read at the next look, whole."""
    runs = [sweep.RunSpec("mnist", "det_bc", s, str(tmp_path / "mnist_det_bc" / f"seed{s}"), ())
            for s in (1, 2, 3)]
    events = tmp_path / "ended.jsonl"
    events.write_text("")
    lines = [json.dumps(dict(dir=r.dir, rc=None, seconds=1)) + "\n" for r in runs]
    writes = [lines[0], lines[1][:20], lines[1][20:], "", lines[2]]  # one write per look
    job = SimpleNamespace(done=lambda: not writes, result=lambda: [(r.dir, 0) for r in runs])
    looks = []

    def sleep(seconds):
        looks.append(capsys.readouterr().out)
        with open(events, "a") as f:
            f.write(writes.pop(0))
    monkeypatch.setattr(sweep.time, "sleep", sleep)
    assert sweep.wait_local([job], runs, events) == 0
    looks.append(capsys.readouterr().out)
    assert looks == ["", "[1/3] done mnist_det_bc/seed1 (finished before)\n", "",
                     "[2/3] done mnist_det_bc/seed2 (finished before)\n", "",
                     "[3/3] done mnist_det_bc/seed3 (finished before)\n"]


def test_the_done_line_quotes_the_last_epochs_test_error(tmp_path):
    run_dir = tmp_path / "mnist_det_bc" / "seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(dict(epoch=e, test_err=err)) + "\n"
                for e, err in ((1, 9.87), (2, 3.21), (3, 1.234))))
    assert sweep.ended_line(str(run_dir), 0, 90) == (
        "done mnist_det_bc/seed1: test error 1.23 % (90 s)")
    assert sweep.ended_line(str(run_dir), None, 1) == (
        "done mnist_det_bc/seed1 (finished before): test error 1.23 %")


@pytest.mark.parametrize("rc, signal_name", [(143, "SIGTERM"), (130, "SIGINT")])
def test_a_run_stopped_by_a_signal_is_stopped_at_a_checkpoint_not_failed(tmp_path, rc,
                                                                         signal_name):
    """The script exits 128 + the signal after its checkpoint (rundir.stop): Ctrl-C, or SIGTERM
    from a job's time limit or pre-emption."""
    run_dir = tmp_path / "mnist_det_bc" / "seed1"
    assert sweep.ended_line(str(run_dir), rc, 30) == (
        f"stopped mnist_det_bc/seed1 at a checkpoint (exit status {rc}, 30 s)")
    assert getattr(signal, signal_name) == rc - 128
    job = jobs.Lane([failing_run(run_dir, code=f"sys.exit({rc})")], str(tmp_path))
    assert job() == [(str(run_dir), rc)]  # no RunsFailed
    assert jobs.failure(run_dir) is None
