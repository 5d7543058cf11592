"""What a sweep's job runs, wherever it runs (here, or on a Slurm node): its runs one after
another, each as the script a user would type, under the run's lock; and how each ended, for the
sweep to tell. sweep.py plans and submits the jobs; this is the job's side.

A run whose script fails leaves FAILED (failed.json) in its run directory: its exit status, its
last line on stderr (the script's one-line error, or a traceback's last line) and the files that
hold the rest. The job then goes on with its other runs, and ends with an error (RunsFailed), so
that Slurm marks it FAILED.
"""
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import submitit

from atomic import atomic_write
from runfiles import LOCK, LOCK_FD, RunError, is_finished, read_metrics, read_record


def shown(argv):
    """A run's command as a user would type it."""
    return shlex.join(["python", *argv[1:]])


def held(run_dir):
    """Is another process running this run? (It holds the run's lock; see Lane.run.)"""
    path = Path(run_dir) / LOCK
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def progress(run_dir):
    """start (no checkpoint), resume (a checkpoint, not finished) or done (its last epoch is in
    metrics.jsonl, with or without its checkpoint: results/ keeps none). A run whose records
    cannot be read is resumed: the resume rewrites metrics.jsonl, or names the damaged
    hparams.json."""
    try:
        finished = is_finished(read_record(run_dir)["hparams"], read_metrics(run_dir))
    except RunError:
        finished = False
    if finished:
        return "done"
    return "resume" if (Path(run_dir) / "last.pt").exists() else "start"


FAILED = "failed.json"  # in a run directory: the sweep's note of the run's last, failed attempt


def failure(run_dir):
    """The note a job left when the run failed (FAILED: rc, its error line, the files that hold
    the rest), or None. It stays until the run is started again (--retry_failed)."""
    path = Path(run_dir) / FAILED
    try:
        note = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return dict(rc=None, error=f"{path} cannot be read ({e}); delete it", more=[])
    return note if isinstance(note, dict) else dict(rc=None, error=f"{path} is damaged", more=[])


def shown_path(path):
    """A path as the user gave it: relative when below this directory."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def why(rc, error=None, more=(), took=""):
    """How a failed run ended, to follow an opening parenthesis, then its own error line, whole:
    "exit status 1, 3 s; more in SWEEP/submitit/5366/5366_0_log.err): error: MNIST: ..."."""
    how = ("exit status unknown" if rc is None else
           f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}")
    files = " and ".join(shown_path(f) for f in more)
    return (how + (f", {took}" if took else "") + (f"; more in {files}" if files else "") + ")"
            + (f": {error}" if error else ""))


def why_note(note):
    """why() for a FAILED note."""
    return why(note.get("rc"), note.get("error"), note.get("more", ()))


def _ignore_usr2():
    # Slurm's time-limit signal (USR2) goes to every process of the job; USR2 would end the
    # script without a checkpoint. The job (Lane.checkpoint) sends it SIGTERM instead.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _relay(stream, last):
    """The script's stderr, passed on line by line to the job's; `last` gets its last line
    (the script's one-line error, or a traceback's last line)."""
    for raw in stream:
        line = raw.decode(errors="replace")
        sys.stderr.write(line)
        sys.stderr.flush()
        if line.strip():
            last[:] = [line.strip()]


def _job_log():
    """The job's stderr file, which holds the scripts' stderr (None outside a submitit job)."""
    try:
        return str(submitit.JobEnvironment().paths.stderr)
    except (RuntimeError, KeyError):
        return None


class RunsFailed(Exception):
    """Raised by a job at its end when some of its runs failed."""


class Lane(submitit.helpers.Checkpointable):
    """One submitit job: some runs, one after another, each as its own subprocess. With
    `events` (a local sweep), a line there as each run ends, which the waiting sweep prints."""

    def __init__(self, runs, cwd, threads=None, events=None):
        self.runs, self.cwd, self.threads, self.events = runs, cwd, threads, events
        self.child = None

    def __call__(self):
        exit_statuses, failed = [], []
        for run in self.runs:
            started = time.time()
            rc, note = self.run(run)  # rc None: it was done already
            self.tell(run, rc, time.time() - started)
            exit_statuses.append((run.dir, rc or 0))
            if rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):
                break  # stopped at a checkpoint: the sweep is being stopped
            if note:
                failed.append(f"{run.dir} ({why_note(note)}")
        if failed:
            # Raised, not returned: the job then ends with a non-zero status, which Slurm marks
            # FAILED (submitit logs a returned value as "Job completed successfully").
            raise RunsFailed(f"{len(failed)} of {len(self.runs)} run(s) failed:\n"
                             + "\n".join(failed))
        return exit_statuses

    def tell(self, run, rc, seconds):
        if not self.events:
            return
        line = (json.dumps(dict(dir=run.dir, rc=rc, seconds=seconds)) + "\n").encode()
        try:  # one short write in append mode: whole, beside other lanes'; not once the sweep
            fd = os.open(self.events, os.O_WRONLY | os.O_APPEND)  # has gone (no O_CREAT)
        except FileNotFoundError:
            return
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def run(self, run):
        """Runs it as it stands (start, resume or skip), under its lock; returns its exit status
        (None: done already) and, when it failed, the note written to its FAILED."""
        Path(run.dir).mkdir(parents=True, exist_ok=True)
        with open(Path(run.dir) / LOCK, "w") as lock:
            # Waits while another process runs it, e.g. the script of this job before a requeue,
            # still writing its checkpoint; then starts, resumes or skips it as it then stands.
            fcntl.flock(lock, fcntl.LOCK_EX)
            status = progress(run.dir)
            if status == "done":
                print(f"done: {run.dir}", flush=True)
                return None, None
            (Path(run.dir) / FAILED).unlink(missing_ok=True)  # this attempt has its own end
            argv = run.argv(resume=status == "resume")
            print("+ " + shown(argv), flush=True)
            # The script finds the lock it inherits by this fd (rundir.lock).
            env = dict(os.environ, PYTHONUNBUFFERED="1", **{LOCK_FD: str(lock.fileno())})
            if self.threads:
                env["OMP_NUM_THREADS"] = str(self.threads)
            # The child inherits the lock, which so lasts as long as either process does.
            self.child = subprocess.Popen(argv, cwd=self.cwd, env=env, pass_fds=[lock.fileno()],
                                          stderr=subprocess.PIPE, preexec_fn=_ignore_usr2)
            last = []
            relay = threading.Thread(target=_relay, args=(self.child.stderr, last), daemon=True)
            relay.start()
            rc = self.child.wait()
            relay.join(10)  # a process the script started may hold its stderr open: not for ever
            if rc in (0, 128 + signal.SIGINT, 128 + signal.SIGTERM):
                return rc, None
            more = [path for path in (_job_log(), Path(run.dir).resolve() / "log.txt")
                    if path and Path(path).exists()]
            note = dict(rc=rc, error=last[0] if last and rc > 0 else None,
                        more=[str(path) for path in more])
            with atomic_write(Path(run.dir) / FAILED, "w") as f:
                f.write(json.dumps(note) + "\n")
            return rc, note

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on the time-limit or pre-emption signal: the script stops at a
        checkpoint on SIGTERM, then the requeued job resumes it."""
        if self.child is not None and self.child.returncode is None:
            os.kill(self.child.pid, signal.SIGTERM)
            for _ in range(240):  # WNOWAIT: look, without reaping what Popen.wait is waiting for
                try:
                    if os.waitid(os.P_PID, self.child.pid,
                                 os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.5)
        return submitit.helpers.DelayedSubmission(Lane(self.runs, self.cwd, self.threads,
                                                       self.events))

    __submitit_checkpoint__ = checkpoint  # the name submitit's newer documentation gives it
