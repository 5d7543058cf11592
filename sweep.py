"""Run a grid of experiments (configs x seeds) as independent submitit jobs, and continue it.

    python sweep.py runs/table2                      # Table 2's ten rows, seeds 1-6, here
    python sweep.py runs/mnist --datasets=mnist --variants=det_bc,stoch_bc,no_reg --seeds=1-3 \\
        --num_epochs=5                               # any --key=value goes to every run
    python sweep.py runs/table2 --cluster=slurm --partition=gpu --time=1440
    python sweep.py @grid.txt                        # arguments read from a file (# comments)

The grid is a list of config/<dataset>_<variant>.py files times seeds. By default it is Table 2's
rows: MNIST with the paper's own protocol (config/mnist_paper_*.py), CIFAR-10 and SVHN with the
lasagne scripts; --datasets keeps those of some datasets, --variants gives the variants instead
(`ls config/` lists them). Each run is what a user would type by hand, in its own directory:

    python <dataset>.py config/<dataset>_<variant>.py --seed=S \\
        --out_dir=SWEEP_DIR/<dataset>_<variant>/seedS [--key=value ...]

Running the same command again continues the sweep: finished runs are skipped, a run with a
checkpoint (last.pt) is continued with --resume (a killed or pre-empted run), the others are
started. A run whose last attempt failed (its job left its error line in SWEEP_DIR/.../failed.json)
is listed as failed, with that line, and run again only with --retry_failed. A run that another
process is running (it holds SWEEP_DIR/.../.lock) is left alone. A --data_dir that is not a
folder here is refused; on Slurm, --data_on_nodes says it exists on the compute nodes only.

Jobs go through submitit. --cluster=local (the default) runs them on this machine: one job per GPU
(or --parallel jobs on the CPU), each running its share of the runs one after another; this command
waits for them, printing a line as each run ends (Ctrl-C stops them at a checkpoint);
--runs_per_gpu=K runs K jobs side by side on each GPU. --cluster=slurm submits one Slurm array job,
one task per run, and returns; a task that reaches its time limit or is pre-empted checkpoints and
is requeued (a time limit at most --max_timeouts times). A request that no node of the partition
can satisfy is refused before anything is queued; a run whose job is still in Slurm's queue is
shown as queued or running and not submitted again. The job logs are in SWEEP_DIR/submitit/; a
job whose run failed ends with an error, so Slurm marks it FAILED.
"""
import argparse
import contextlib
import io
import json
import os
import runpy
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import cloudpickle
import submitit

import atomic
import configurator
import errors
import jobs
import runfiles
import slurm
from errors import UserError
from jobs import Lane, RunsFailed, failure, held, progress, shown, shown_path, why, why_note
from runfiles import DATA_PATHS, RunError, read_metrics, read_record

# A job unpickles its Lane wherever it runs, maybe not in this directory: the code of jobs.py and
# of what it uses (it reads the run's records and writes its FAILED note) travels inside the
# pickle rather than by module name.
for module in (jobs, runfiles, errors, atomic):
    cloudpickle.register_pickle_by_value(module)

ROOT = Path(__file__).resolve().parent
DATASETS = ("mnist", "cifar10", "svhn")
TABLE2 = {"mnist": ["paper_no_reg", "paper_det_bc", "paper_stoch_bc", "paper_dropout"],
          "cifar10": ["no_reg", "det_bc", "stoch_bc"],
          "svhn": ["no_reg", "det_bc", "stoch_bc"]}
PER_RUN = ("seed", "out_dir", "resume")  # set by the sweep for each run, not by the user


class RunSpec(NamedTuple):
    """One run of the grid: what to run and where (rundir.Run is the run directory itself)."""
    dataset: str
    variant: str
    seed: int
    dir: str
    overrides: tuple

    def argv(self, resume=False):
        """The command, as typed in this directory (the scripts by relative path when below it)."""
        def here(path):
            rel = os.path.relpath(path)
            return str(path) if rel.startswith("..") else rel
        return ([sys.executable, here(ROOT / f"{self.dataset}.py"),
                 here(ROOT / "config" / f"{self.dataset}_{self.variant}.py"),
                 f"--seed={self.seed}", f"--out_dir={self.dir}", *self.overrides]
                + ([f"--resume={self.dir}"] if resume else []))


def fail(message):
    print(f"sweep.py: {message}", file=sys.stderr)
    sys.exit(2)


def variants_of(dataset):
    return sorted(p.stem[len(dataset) + 1:] for p in (ROOT / "config").glob(f"{dataset}_*.py"))


def parse_seeds(text):
    seeds = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not (low.isdigit() and (high.isdigit() or not dash)) or int(high or low) < int(low):
            fail(f"bad --seeds={text}: {part!r} is not a seed or a range of seeds; "
                 "e.g. --seeds=1-6 or 1,2,5")
        seeds += range(int(low), int(high or low) + 1)
    return sorted(set(seeds))


def grid(datasets, variants):
    """The (dataset, variant) pairs: Table 2's rows, or datasets x variants that have a config."""
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        fail(f"unknown dataset {', '.join(unknown)}; the datasets are {', '.join(DATASETS)}")
    if not variants:
        return [(d, v) for d in datasets for v in TABLE2[d]]
    unknown = [v for v in variants if not any(v in variants_of(d) for d in datasets)]
    if unknown:
        known = sorted({v for d in datasets for v in variants_of(d)})
        fail(f"unknown variant {', '.join(unknown)} for {', '.join(datasets)}; the variants are "
             f"{', '.join(known)} (config/<dataset>_<variant>.py)")
    pairs = []
    for d in datasets:
        for v in variants:
            if v in variants_of(d):
                pairs.append((d, v))
            else:
                print(f"note: no config/{d}_{v}.py, so no {d} {v} runs")
    return pairs


def has_checkpoint(run):
    """Is the run started with --resume? (progress: "start" when there is no last.pt)"""
    return (Path(run.dir) / "last.pt").exists()


def check(run, resume, runs_here=True):
    """The script's own configurator reads the command before anything is submitted: it names
    unknown keys and bad values, and, for a run to resume or skip, a setting that differs from the
    run's stored one (a sweep directory holds one experiment; use another for a new one). A run
    submitted to Slurm (runs_here False) may name a device that this login node lacks."""
    defaults = runpy.run_path(str(ROOT / f"{run.dataset}.py"), run_name=run.dataset)
    # A finished run kept without its checkpoint (results/ keeps none): its settings are
    # compared here, as a resume would compare them.
    kept = resume and not (Path(run.dir) / "last.pt").exists()
    try:
        config = configurator.parse(defaults, run.argv(resume and not kept)[2:],
                                    runs_here=runs_here)
        if kept:
            stored = read_record(run.dir)["hparams"]
            differs = [f"{k}={stored[k]!r} there, {config[k]!r} here"
                       for k in configurator.changed(config, stored)]
            if differs:
                raise configurator.ConfigError(", ".join(differs))
    except UserError as e:
        message = str(e)
        if resume:  # the directory holds a run already
            fail(f"{run.dir} holds a run with other settings; a new experiment needs another "
                 f"SWEEP_DIR ({message})")
        fail(f"{run.dir}: {message}")


def check_data_paths(overrides, args):
    """A data path given that is not a folder here: every run would fail on it. On Slurm it may
    exist on the compute nodes only (--data_on_nodes)."""
    if args.data_on_nodes and args.cluster != "slurm":
        fail("--data_on_nodes is for --cluster=slurm: local runs read their data here")
    for item in overrides:
        key, _, value = item[2:].partition("=")
        if key not in DATA_PATHS or args.data_on_nodes or not value:
            continue
        path = Path(value).expanduser()
        if not path.exists():
            where = "" if path.is_absolute() else f" in {os.getcwd()}"
            fail(f"{item}: no such folder{where} on this machine"
                 + ("; if it exists on the compute nodes only, add --data_on_nodes"
                    if args.cluster == "slurm" else ""))
        if not path.is_dir():
            fail(f"{item}: not a folder; give the folder that holds the dataset's files")


def gpu_count():
    import torch  # only here: it takes a second or two to import
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def slurm_parameters(args):
    """SlurmExecutor's names (submitit/slurm/slurm.py _make_sbatch_string)."""
    params = dict(job_name="binaryconnect", time=args.time or 24 * 60,
                  gpus_per_node=args.gpus_per_job, cpus_per_task=args.cpus_per_job,
                  signal_delay_s=120)  # time enough to write a CIFAR-10 checkpoint
    if args.partition:
        params["partition"] = args.partition
    if args.parallel:
        params["array_parallelism"] = args.parallel
    for item in args.slurm:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--slurm={item}: write --slurm=KEY=VALUE, e.g. --slurm=account=myaccount")
        params[key] = value
    return params


def slurm_request(args):
    """slurm_parameters, refused here when no node of the partition can satisfy them: Slurm
    would queue such a job and leave it pending for ever (Reason=PartitionConfig)."""
    params = slurm_parameters(args)
    try:
        problems = slurm.refusals(params, {item.partition("=")[0] for item in args.slurm})
    except slurm.Unreachable as e:
        if args.dry_run or shutil.which("sinfo") is None:  # without Slurm submitit says so
            print(f"note: the Slurm request is not checked against the cluster ({e})")
            return params
        fail(f"cannot ask Slurm what its partitions offer ({e})")
    if problems:
        fail("\nsweep.py: ".join(problems))
    return params


def submit_slurm(runs, args, folder, params):
    try:
        # submitit prints sbatch's complaint itself, over several lines: ours is one.
        with slurm.nothing_left_on_error(folder.parent), contextlib.redirect_stderr(io.StringIO()):
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_timeouts)
            executor.update_parameters(**params)
            with executor.batch():  # one array job: a task per run
                jobs = [executor.submit(Lane([run], os.getcwd())) for run in runs]
    except (RuntimeError, ValueError, OSError) as e:
        fail(slurm.one_line(e))
    slurm.record(folder.parent, jobs, runs)
    print(f"Submitted Slurm array job {jobs[0].job_id.split('_')[0]} ({len(jobs)} tasks); logs in "
          f"{folder.parent}. Run this command again to see where the sweep stands.")


def lane_gpus(n_runs, gpus, runs_per_gpu=1, parallel=0):
    """The GPU of each local job (None on the CPU): runs_per_gpu jobs per GPU (the MNIST net
    uses a small part of one; the paper's MNIST column is 4 rows x several seeds), or
    --parallel jobs; never more jobs than runs. Jobs go round the GPUs, so a sweep of fewer
    runs than places still spreads over every GPU."""
    lanes = min(parallel or max(gpus * runs_per_gpu, 1), n_runs)
    return [i % gpus if gpus else None for i in range(lanes)]


def run_local(runs, args, folder):
    """submitit's LocalExecutor starts every job it is given at once, each on the first
    gpus_per_node GPUs (local.py, _submit_command). So: --runs_per_gpu jobs per GPU, each pinned
    to its GPU with visible_gpus, or --parallel jobs on the CPU, each running its share of the
    runs in turn. Each run is told as it ends (wait_local)."""
    gpus = gpu_count()
    placed = lane_gpus(len(runs), gpus, args.runs_per_gpu, args.parallel)
    lanes = len(placed)
    threads = max(1, (os.cpu_count() or 1) // lanes) if not gpus and lanes > 1 else None
    folder.parent.mkdir(parents=True, exist_ok=True)
    events = (folder.parent / f"ended-{os.getpid()}.jsonl").resolve()
    events.write_text("")
    executor = submitit.LocalExecutor(folder=folder)
    jobs = []
    for i, gpu in enumerate(placed):
        if gpus:
            executor.update_parameters(timeout_min=args.time or 365 * 24 * 60, gpus_per_node=1,
                                       visible_gpus=(gpu,))
        else:
            executor.update_parameters(timeout_min=args.time or 365 * 24 * 60, gpus_per_node=0)
        jobs.append(executor.submit(Lane(runs[i::lanes], os.getcwd(), threads, str(events))))
    where = f"{gpus} GPU(s)" if gpus else "the CPU"
    print(f"Running {len(runs)} runs as {lanes} local job(s) on {where}; their output is in "
          f"{folder.parent}/<job>/<job>_0_log.out, and each run's in its log.txt.", flush=True)
    try:
        failed = wait_local(jobs, runs, events)
    except KeyboardInterrupt:
        print("\nInterrupted: the runs stop at a checkpoint. Run the same command to continue.")
        sys.exit(130)
    finally:
        events.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the literal %j folder that submitit's local jobs
            folder.rmdir()                   # make (local.py, Controller.start_tasks), empty
    if failed:
        print(f"{failed} run(s) did not finish. The same command continues the sweep; add "
              "--retry_failed to run the failed ones again.")
        sys.exit(1)


POLL_SECONDS = 1.0


def wait_local(jobs, runs, events):
    """Prints a line as each run ends ("[3/12] done mnist_stoch_bc/seed2: test error 1.32 % (41
    min)"), from the lines the jobs write to `events`, until every job has ended; returns how
    many runs did not finish."""
    told, failed, offset = set(), 0, 0

    def tell(run_dir, line):
        nonlocal failed
        told.add(run_dir)
        failed += not line.startswith("done ")
        print(f"[{len(told)}/{len(runs)}] {line}", flush=True)

    while True:
        ended = all(job.done() for job in jobs)  # before reading: no line comes after the end
        with open(events, "rb") as f:
            f.seek(offset)
            text = f.read()
        text = text[:text.rfind(b"\n") + 1]  # a line being written waits for the next look
        offset += len(text)
        for line in text.decode().splitlines():
            event = json.loads(line)
            tell(event["dir"], ended_line(event["dir"], event["rc"], event["seconds"]))
        if ended:
            break
        time.sleep(POLL_SECONDS)
    for job in jobs:
        try:
            for run_dir, rc in job.result():  # any run its job did not tell of as it ended
                if run_dir not in told:
                    tell(run_dir, ended_line(run_dir, rc, None))
        except submitit.core.utils.UncompletedJobError as e:  # FailedJobError too
            if f"{RunsFailed.__name__}: " not in str(e):  # not the failures told above
                print(f"job {job.job_id} failed: {_last_line(e)} (see "
                      f"{shown_path(job.paths.stderr)})", flush=True)
    for run in runs:
        if run.dir not in told:  # its job failed, or was stopped before reaching it
            tell(run.dir, f"not run: {run_name(run.dir)}")
    return failed


def _last_line(error):
    """submitit's error for a job: the traceback's last line (between its rules of dashes) for
    a job that raised, else its last line."""
    parts = str(error).split("-" * 22)
    text = parts[1] if len(parts) >= 3 and parts[1].strip() else str(error)
    return text.strip().splitlines()[-1]


def run_name(run_dir):
    """SWEEP_DIR/mnist_det_bc/seed1 -> mnist_det_bc/seed1"""
    return "/".join(Path(run_dir).parts[-2:])


def ended_line(run_dir, rc, seconds):
    """How a run ended (rc None: it had finished before), for wait_local."""
    name = run_name(run_dir)
    if rc is None:
        return f"done {name} (finished before)" + _test_error(run_dir)
    took = ("" if seconds is None else f"{seconds:.0f} s" if seconds < 120 else
            f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h")
    if rc == 0:
        return f"done {name}" + _test_error(run_dir) + (f" ({took})" if took else "")
    if rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        return f"stopped {name} at a checkpoint (exit status {rc}{', ' + took if took else ''})"
    note = failure(run_dir) or {}  # its error line and files, as its job wrote them
    return f"failed {name} (" + why(rc, note.get("error"), note.get("more", ()), took)


def _test_error(run_dir):
    """The test error at the best-validation epoch, as results.py tables it."""
    try:
        metrics = read_metrics(run_dir)
    except RunError:
        return ""
    err = metrics[-1].get("test_err") if metrics else None
    return f": test error {err:.2f} %" if isinstance(err, (int, float)) else ""


class _ArgumentParser(argparse.ArgumentParser):
    def convert_arg_line_to_args(self, line):  # @file: any number of arguments a line, # comments
        return shlex.split(line, comments=True)


def main(argv=None):
    parser = _ArgumentParser(description=__doc__, fromfile_prefix_chars="@", allow_abbrev=False,
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             usage="%(prog)s SWEEP_DIR [options] [--key=value ...]")
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="where the run directories go")
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help="comma-separated: mnist,cifar10,svhn (default: all three)")
    parser.add_argument("--variants", default="",
                        help="comma-separated variant names, e.g. det_bc,stoch_bc (default: "
                             "Table 2's rows of each dataset)")
    parser.add_argument("--seeds", default="1-6", help="e.g. 1-6 or 1,2,5 (default: 1-6)")
    parser.add_argument("--cluster", choices=["local", "slurm"], default="local")
    parser.add_argument("--parallel", type=int, default=0,
                        help="jobs at once: local, default one per GPU or 1 on the CPU; Slurm, "
                             "the array's parallelism (default: submitit's 256)")
    parser.add_argument("--runs_per_gpu", type=int, default=1,
                        help="local: jobs side by side on each GPU (default 1)")
    parser.add_argument("--time", type=int, default=0,
                        help="minutes per job before it is checkpointed and requeued (Slurm "
                             "default 1440; local default no limit)")
    parser.add_argument("--partition", default="", help="Slurm partition")
    parser.add_argument("--gpus_per_job", type=int, default=1, help="Slurm (default 1)")
    parser.add_argument("--cpus_per_job", type=int, default=8, help="Slurm (default 8)")
    parser.add_argument("--max_timeouts", type=int, default=3,
                        help="Slurm: times a task may reach its time limit and be requeued "
                             "(submitit's max_num_timeout; pre-emptions do not count). Past it "
                             "the task ends, its run checkpointed: this command continues it "
                             "(default 3)")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help="any other SlurmExecutor parameter, e.g. --slurm=account=abc "
                             "--slurm=qos=high --slurm=mem=32GB (repeatable)")
    parser.add_argument("--retry_failed", action="store_true",
                        help="run again the runs whose last attempt failed (by default they are "
                             "listed as failed, with their error, and left alone)")
    parser.add_argument("--data_on_nodes", action="store_true",
                        help="Slurm: the --data_dir (or --SVHN_LOCAL_PATH) given exists on the "
                             "compute nodes only, so it is not looked for here")
    parser.add_argument("--dry_run", action="store_true", help="print the plan; submit nothing")
    args, overrides = parser.parse_known_args(argv)
    if args.runs_per_gpu < 1:
        fail(f"--runs_per_gpu={args.runs_per_gpu}: give 1 or more")

    for item in overrides:
        key, sep, _ = item[2:].partition("=")
        if not (item.startswith("--") and sep):
            fail(f"unexpected argument {item!r}; hyperparameters for the runs are written "
                 "--key=value")
        if key in PER_RUN:
            fail(f"{item}: the sweep sets --{key} for each run (use --seeds for the seeds)")
    check_data_paths(overrides, args)
    pairs = grid([d for d in args.datasets.split(",") if d],
                 [v for v in args.variants.split(",") if v])
    seeds = parse_seeds(args.seeds)
    sweep_dir = Path(args.sweep_dir)
    runs = [RunSpec(d, v, s, str(sweep_dir / f"{d}_{v}" / f"seed{s}"), tuple(overrides))
            for d, v in pairs for s in seeds]

    params = slurm_request(args) if args.cluster == "slurm" else None
    queue = slurm.in_queue(sweep_dir / "submitit")
    jobs = {run: queue.get(str(Path(run.dir).resolve())) for run in runs}
    plan = []
    for run in runs:
        status = jobs[run][0] if jobs[run] else "running" if held(run.dir) else progress(run.dir)
        note = failure(run.dir) if status in ("start", "resume") else None
        if note:  # its last attempt failed: again only when asked
            status = "retry" if args.retry_failed else "failed"
        plan.append((run, status, note))
    for run, status, _ in plan:  # every command is checked before anything is printed or submitted
        if status not in ("running", "queued"):
            # a done run must be the run asked for, too
            check(run, resume=has_checkpoint(run) or status == "done",
                  runs_here=args.cluster == "local")
    print(f"Sweep {sweep_dir}: {len(runs)} runs ({len(pairs)} config(s) x {len(seeds)} seed(s))")
    for run, status, note in plan:
        if status in ("start", "resume", "retry"):
            print(f"  {status:<8}{shown(run.argv(resume=has_checkpoint(run)))}"
                  + (f"  (it failed: {why_note(note)}" if note else ""))
        elif status == "failed":
            print(f"  {status:<8}{run.dir}  ({why_note(note)}")
        else:
            why_not = jobs[run][1] if jobs[run] else (
                "another process is running it" if status == "running" else "")
            print(f"  {status:<8}{run.dir}" + (f"  ({why_not})" if why_not else ""))
    counts = {s: sum(status == s for _, status, _ in plan)
              for s in ("start", "resume", "retry", "done", "running", "queued", "failed")}
    print(f"{counts['start']} to start, {counts['resume']} to resume, "
          + (f"{counts['retry']} to retry (they failed), " if counts["retry"] else "")
          + f"{counts['done']} already done, {counts['running']} running elsewhere"
          + (f", {counts['queued']} queued on Slurm" if counts["queued"] else "")
          + (f", {counts['failed']} failed (run again with --retry_failed)" if counts["failed"]
             else "") + ".", flush=True)
    todo = [run for run, status, _ in plan if status in ("start", "resume", "retry")]
    if args.dry_run or not todo:
        return
    folder = sweep_dir / "submitit" / "%j"
    if args.cluster == "slurm":
        submit_slurm(todo, args, folder, params)
    else:
        run_local(todo, args, folder)


if __name__ == "__main__":
    main()
