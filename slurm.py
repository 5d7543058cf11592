"""What sweep.py asks Slurm: what its partitions offer, so that a request no node can satisfy is
refused before it waits in the queue forever; and which runs of a sweep are in its queue, so that
they are not submitted twice.

A sweep's submissions are recorded in SWEEP_DIR/submitit/slurm_jobs.jsonl, one line per run:
its Slurm job id (ARRAY_TASK, e.g. 1234_5) and its run directory. squeue also names each job's
batch script, which submitit writes in SWEEP_DIR/submitit: that tells this sweep's jobs from
another's that got the same id (a restarted cluster counts from 1 again).
"""
import contextlib
import json
import re
import shutil
import subprocess
from pathlib import Path

RECORD = "slurm_jobs.jsonl"
# squeue's states of a job that has started; the others in its queue wait (and start on their own)
RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}


# SlurmExecutor's parameters that sweep.py's own options set
OPTIONS = dict(partition="--partition", gpus_per_node="--gpus_per_job",
               cpus_per_task="--cpus_per_job", time="--time")


class Unreachable(Exception):
    """No Slurm here, or its controller does not answer."""


def ask(*argv):
    if shutil.which(argv[0]) is None:
        raise Unreachable(f"no {argv[0]} on this machine's PATH")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise Unreachable(f"{argv[0]} did not answer in 60 s") from None
    if proc.returncode:
        raise Unreachable(f"{argv[0]}: {' '.join(proc.stderr.split()) or 'failed'}")
    return proc.stdout


def minutes(limit):
    """sinfo's time limit, [days-][hours:]minutes:seconds or 'infinite', in minutes (None: none)."""
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, mins, secs = parts
    return (int(days or 0) * 24 + hours) * 60 + mins + secs / 60


def gpus(gres):
    """GPUs a node has, from sinfo's gres, e.g. 'gpu:a100:4(S:0-1),nic:1' -> 4."""
    count = 0
    for item in gres.split(","):
        item = re.sub(r"\(.*\)", "", item)
        fields = item.split(":")
        if fields[0] == "gpu":
            count += int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
    return count


def partitions():
    """{partition: dict(cpus, gpus: the most that a node of it has; minutes: its time limit or
    None; default)}, from sinfo's line per node and partition."""
    offer = {}
    for line in ask("sinfo", "--noheader", "--Node", "--format=%P|%c|%G|%l").splitlines():
        name, cpus, gres, limit = line.strip().split("|")
        default = name.endswith("*")
        part = offer.setdefault(name.rstrip("*"), dict(cpus=0, gpus=0, minutes=None,
                                                        default=default))
        part["cpus"] = max(part["cpus"], int(cpus.rstrip("+")))
        part["gpus"] = max(part["gpus"], gpus(gres))
        part["minutes"] = minutes(limit)
    return offer


def refusals(request, set_by_slurm=(), offer=None):
    """What in `request` (SlurmExecutor's parameters) no node of the partition can give, one
    message per option: sweep.py's, or --slurm=KEY for the keys in set_by_slurm. `offer`:
    partitions(), asked if not given."""
    offer = partitions() if offer is None else offer
    options = {key: f"--slurm={key}" if key in set_by_slurm else option
               for key, option in OPTIONS.items()}
    named = request.get("partition")
    if named:
        unknown = [p for p in named.split(",") if p not in offer]
        if unknown:
            return [f"{options['partition']}={named}: no partition {', '.join(unknown)} on this "
                    f"cluster; sinfo lists {', '.join(sorted(offer))}"]
        parts = named.split(",")
    else:
        parts = [p for p, o in offer.items() if o["default"]]
        if not parts:
            return [f"this cluster has no default partition; choose one of "
                    f"{', '.join(sorted(offer))} with {options['partition']}=NAME"]
    where = f"partition {','.join(parts)}"
    messages = []
    gpu = int(request.get("gpus_per_node") or 0)
    most = max(offer[p]["gpus"] for p in parts)
    if gpu > most:
        messages.append(f"{options['gpus_per_node']}={gpu}: the nodes of {where} have "
                        + (f"at most {most} GPU(s)" if most else "no GPUs (no gres gpu)")
                        + "; ask for fewer (0 with --device=cpu), or another partition")
    cpu = int(request.get("cpus_per_task") or 1)
    most = max(offer[p]["cpus"] for p in parts)
    if cpu > most:
        messages.append(f"{options['cpus_per_task']}={cpu}: the nodes of {where} have at most "
                        f"{most} CPUs; the job would wait in the queue forever")
    limits = [offer[p]["minutes"] for p in parts]
    # a --slurm=time=D-HH:MM is left to sbatch
    if (all(m is not None for m in limits) and str(request["time"]).isdigit()
            and int(request["time"]) > max(limits)):
        messages.append(f"{options['time']}={request['time']}: {where} allows at most "
                        f"{max(limits):g} minutes a job; a task that reaches it is requeued and "
                        "continues, so a shorter --time loses nothing")
    return messages


@contextlib.contextmanager
def nothing_left_on_error(folder):
    """A submission that sbatch refuses leaves its batch script and pickles in `folder`: they
    go, and so do the folders it made if they are empty (nothing was queued)."""
    made = [p for p in (folder, folder.parent) if not p.exists()]
    before = set(folder.iterdir()) if folder.exists() else set()
    try:
        yield
    except BaseException:
        for path in set(folder.iterdir()) - before if folder.exists() else ():
            if path.is_file() or path.is_symlink():
                path.unlink()
        for path in made:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def one_line(error):
    """submitit's error from sbatch, down to sbatch's own words."""
    lines = [" ".join(line.split()) for line in str(error).splitlines() if "error:" in line]
    if lines:
        return "Slurm refused the jobs, nothing was queued: " + "; ".join(dict.fromkeys(lines))
    return str(error).strip().splitlines()[0]


def record(folder, jobs, runs):
    """After a submission: its jobs (submitit's) beside the runs they run."""
    with open(Path(folder) / RECORD, "a") as f:
        for job, run in zip(jobs, runs):
            f.write(json.dumps(dict(job=job.job_id, run=str(Path(run.dir).resolve()))) + "\n")


def in_queue(folder):
    """{run directory (resolved): ("queued" or "running", "Slurm job ID, STATE: REASON")} for
    this sweep's runs whose job is still in Slurm's queue; {} if none was ever submitted."""
    path = Path(folder) / RECORD
    if not path.exists():
        return {}
    recorded = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        recorded[entry["job"]] = entry["run"]
    try:
        lines = ask("squeue", "--noheader", "--array", "--format=%i|%T|%r|%o").splitlines()
    except Unreachable as e:
        print(f"note: Slurm's queue cannot be read ({e}): a run of this sweep still queued "
              "there would be submitted again")
        return {}
    queue = {}
    for line in lines:
        job, state, reason, script = line.strip().split("|", 3)
        # submitit's batch scripts are written in the sweep's submitit folder
        if job in recorded and Path(script).parent.resolve() == Path(folder).resolve():
            queue[recorded[job]] = ("running" if state in RUNNING else "queued",
                                    f"Slurm job {job}, {state}"
                                    + (f": {reason}" if reason not in ("None", "") else ""))
    return queue
