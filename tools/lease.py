"""The lease plan: what a session lent a GPU runs, in one call of at most 9 minutes on a cold
machine, and what it brings back (docs/runs.md, "A lent GPU: the standing order").

    python3 tools/lease.py prepare        # here: data/ (MNIST, a CIFAR-10 part) and .whl/ to carry
    python3 tools/lease.py run            # there: the plan, its files into $OUT
    python3 tools/lease.py run --smoke    # here: the same plan on the CPU with tiny sizes (CI)
    python3 tools/lease.py unpack DIR     # here: what came back (DIR) into results/<lease>/

The plan's parts, most valuable first. Each runs under its own deadline (timeout -k: a part stuck
in a compile cannot overrun), never past the plan's end, and writes its verdict (PASS, FAIL or
SKIP, with its seconds) to $OUT/summary.txt as it ends. The deadlines are estimates for a cold
H200 (every compile cache empty; inductor takes tens of seconds per network, precision and
train/eval graph), each a multiple of the compiles it holds:
  preflight      20 s  versions; the imports of every script; a C compiler (triton builds its
                       launchers with it); one tiny torch.compile on CUDA. A missing piece is
                       named in one line, and the parts that need it are skipped.
  checks        180 s  the CUDA tests that matter most: a graph-mode run killed mid-epoch resumes
                       bit-exact (3 processes, the first compiling cold: ~80 s), graph = compiled
                       (one MLP: ~30 s; BinaryNet's MLP, whose graph path no GPU has run: ~30 s),
                       bf16 keeps float32 state (one CNN: ~40 s). The first queue item
                       (MNIST's 250 epochs, ~3 min) runs beside them, for at most 300 s: they
                       compile on the CPU, and the GPU would idle.
  bench-mnist   120 s  benchmark.py, MNIST at full size: plain, eager, fast fp32 and bf16, fp32
                       autotuned (3 compiles of ~35 s), projected minutes of a full run.
  bench-cifar10 150 s  the same for CIFAR-10 in fp32 and bf16 (2 CNN compiles of ~60 s, their
                       evaluation graphs). Both benchmarks wait for the queue item beside the
                       checks, so they time an idle GPU; a benchmark passed in an earlier lease
                       (results/*/summary.txt) is skipped, leaving its time to the queue.
  queue          the rest  tools/lease_queue.txt's items in order, each started when its
                       minutes are left, stopped at the plan's end (recorded as cut short).
The plan ends 540 s after it began, well inside the call's 10 minutes. Back in $OUT (7 files):
summary.txt, device.txt, checks.txt, bench-mnist.txt, bench-cifar10.txt, queue.txt (the items'
output) and results.tar: each run's small files (hparams.json, metrics.jsonl, log.txt,
resumes.jsonl, lease.json), never checkpoints, appended as each item ends.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as tools/lease.py: the project's modules beside it
from runfiles import RunError, is_finished, read_metrics, read_record  # noqa: E402 (no torch)

QUEUE = ROOT / "tools" / "lease_queue.txt"
PLAN_SECONDS = 540  # 9 minutes: one call of at most 10, with room for the start and the packing
BESIDE_SECONDS = 300  # the first queue item, beside the checks: MNIST's 250 epochs, ~3 min
KILL_AFTER = 10  # seconds between a deadline's SIGTERM (a checkpoint) and its SIGKILL
RUN_FILES = ("hparams.json", "metrics.jsonl", "log.txt", "resumes.jsonl")
# The parts (name, deadline in seconds, what they need from the preflight), most valuable first.
PARTS = [("checks", 180, ("torch", "cuda", "compile")),
         ("bench-mnist", 120, ("torch", "cuda", "compile")),
         ("bench-cifar10", 150, ("torch", "cuda", "compile"))]
ALL_PARTS = [name for name, _, _ in PARTS] + ["queue"]
CHECKS = ["tests/test_fast_step_cuda.py::test_killed_graph_mode_run_resumes_exactly",
          "tests/test_fast_step_cuda.py::test_graph_step_gives_the_compiled_step_and_the_eager_step"
          "[mlp-True]",
          "tests/test_fast_step_cuda.py::test_binarynet_graph_step_gives_the_compiled_step",
          "tests/test_fast_step_cuda.py::test_lower_precisions_train_with_float32_state[bf16]"]
BENCH = {"bench-mnist": ["--nets=mnist", "--steps=30", "--repeats=2", "--precisions=fp32,bf16",
                         "--autotune"],
         "bench-cifar10": ["--nets=cifar10", "--steps=20", "--repeats=2",
                           "--precisions=fp32,bf16"]}
SMOKE_BENCH = {"bench-mnist": ["--nets=mnist", "--steps=2", "--repeats=1", "--precisions=fp32",
                               "--device=cpu", "--set", "num_units=64", "--set",
                               "n_hidden_layers=1"]}
RESULTS = ROOT / "results"  # the earlier leases' runs (tools/lease.py unpack puts them there)
SMOKE_DEADLINE, SMOKE_SECONDS = 300, 1800  # the rehearsal's (a loaded 2-core CPU)
SCRATCH = Path(os.environ.get("LEASE_SCRATCH", "/tmp/lease"))  # the same path in every lease

PREFLIGHT = r'''
import importlib, json, os, platform, shutil, subprocess, sys, time
smoke = sys.argv[1] == "smoke"
have = {}
def say(ok, what, key=None):  # each line as it is found: a deadline keeps what came before
    print(("ok      " if ok else "MISSING ") + what)
    if key:
        have[key] = bool(ok)
    print("HAVE " + json.dumps(have), flush=True)
print(f"python {platform.python_version()} ({sys.executable}), {os.cpu_count()} CPUs")
try:
    import torch, numpy, scipy
    say(True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), numpy {numpy.__version__}, "
        f"scipy {scipy.__version__}", "torch")
except ImportError as e:
    say(False, f"torch, numpy or scipy: {e} (needed by every part)", "torch")
if have["torch"]:
    cuda = torch.cuda.is_available()
    say(cuda or smoke, (f"CUDA: {torch.cuda.get_device_name()}" if cuda else
                        "CUDA: none" + (" (the rehearsal runs on the CPU)" if smoke else
                                        " (needed by checks, benchmarks and the queue)")), "cuda")
missing = []
for name in ("mnist", "cifar10", "svhn", "training", "checkpoints", "bc_datasets", "benchmark",
             "submitit", "cloudpickle"):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
say(not missing, "imports of every script" + (": " + "; ".join(missing) if missing else ""),
    "imports")
cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
say(cc, f"C compiler: {cc}" if cc else "C compiler: none of cc, gcc, clang (triton and inductor's "
    "C++ need one: the compiled step)", "cc")
if have["torch"] and have["cc"] and have["cuda"]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.time()
    try:
        f = torch.compile(lambda x: (x * 2).sin().sum())
        f(torch.ones(64, device=device)).item()
        say(True, f"torch.compile on {device}: {time.time() - start:.1f} s", "compile")
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        say(False, f"torch.compile on {device}: {type(e).__name__}: {first}", "compile")
else:
    say(False, "torch.compile: not tried (torch, CUDA or a C compiler missing)", "compile")
'''


class Plan:
    def __init__(self, out, smoke, data, queue=QUEUE, plan_seconds=PLAN_SECONDS,
                 parts=None):
        self.parts = parts or ALL_PARTS
        self.out, self.smoke, self.data, self.queue_path = Path(out), smoke, Path(data), queue
        self.start = time.monotonic()
        self.end = self.start + plan_seconds
        self.out.mkdir(parents=True, exist_ok=True)
        self.summary = self.out / "summary.txt"
        self.have = {}
        self.failed = 0
        # the items' python3 is this one; the scripts' imports from the repository root
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT) + os.pathsep
                        + os.environ.get("PYTHONPATH", ""),
                        PATH=str(Path(sys.executable).parent) + os.pathsep
                        + os.environ.get("PATH", ""))
        self.card = "cpu"
        self.lease = None
        self.beside = None  # the queue item that runs beside the checks

    # -- bookkeeping ------------------------------------------------------------------------------
    def left(self):
        return self.end - time.monotonic()

    def note(self, text):
        print(text, flush=True)
        with open(self.summary, "a") as f:
            f.write(text + "\n")

    def verdict(self, word, part, seconds, what):
        self.failed += word == "FAIL"
        self.note(f"{word} {part} ({seconds:.0f} s): {what}")

    def command(self, argv, log, deadline, mode="w"):
        """argv under `timeout -k`, its output to log; (exit status, seconds, cut by deadline).
        The rehearsal's deadlines are longer: a CPU compiles slowly, and it checks the plumbing,
        not the times."""
        if self.smoke:
            deadline = max(deadline, SMOKE_DEADLINE)
        limit = max(1, int(min(deadline, self.left())))
        started = time.monotonic()
        with open(log, mode) as f:
            rc = subprocess.run(["timeout", "-k", str(KILL_AFTER), str(limit), *argv], cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT, env=self.env).returncode
        return rc, time.monotonic() - started, rc in (124, 137) or rc == -signal.SIGKILL

    def needs(self, part, wanted):
        missing = [w for w in wanted if not self.have.get(w)]
        if missing:
            self.verdict("SKIP", part, 0, "the preflight found no " + ", ".join(missing))
        return not missing

    # -- the parts --------------------------------------------------------------------------------
    def preflight(self):
        log = self.out / "device.txt"
        with open(log, "w") as f:
            f.write(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n")
            if shutil.which("nvidia-smi"):
                f.write(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
        rc, seconds, cut = self.command([sys.executable, "-c", PREFLIGHT,
                                         "smoke" if self.smoke else "run"], self.out / "pre.txt",
                                        20)
        text = (self.out / "pre.txt").read_text()
        (self.out / "pre.txt").unlink()
        with open(log, "a") as f:
            f.write("".join(line + "\n" for line in text.splitlines()
                            if not line.startswith("HAVE ")))
        found = re.findall(r"^HAVE (.*)$", text, re.M)
        self.have = json.loads(found[-1]) if found else {}
        if cut and "compile" not in self.have and all(
                self.have.get(k) for k in ("torch", "cuda", "cc")):
            # Only the tiny compile was slow: the parts go on (each has its deadline, and the
            # compiled step falls back loudly), rather than lose the lease.
            self.have["compile"] = True
            self.note("note: the tiny torch.compile did not end within the preflight's "
                      "deadline; the parts that compile go on")
        self.have["data"] = (self.data / "mnist").is_dir()
        gpu = re.search(r"^ok +CUDA: (?!none)(.*)$", text, re.M)
        self.card = gpu[1] if gpu else "cpu"
        torch = re.search(r"torch (\S+)", text)
        self.torch = torch[1] if torch else "?"
        missing = [line.strip() for line in text.splitlines() if line.startswith("MISSING")]
        if cut:
            said = [line for line in text.splitlines() if not line.startswith("HAVE ")]
            missing.append("the preflight did not end within its deadline, after: "
                           + (said[-1] if said else "nothing"))
        if not self.have["data"]:
            missing.append(f"MISSING data: no {self.data / 'mnist'} (run tools/lease.py prepare "
                           "here and carry data/; the queue is skipped)")
        word = "FAIL" if rc or not found or missing else "PASS"
        what = "; ".join(missing) if missing else (
            f"{self.card}, torch {self.torch}" + ("" if found else f" (exit {rc}: {text[-300:]})"))
        self.verdict(word, "preflight", seconds, what)
        slug = re.sub(r"[^a-z0-9]+", "-", self.card.lower().replace("nvidia", "")).strip("-")
        self.lease = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H%M}-"
                      f"{slug or 'cpu'}{'-smoke' if self.smoke else ''}")
        self.note(f"lease {self.lease}; commit {git_commit()}; plan of {self.end - self.start:.0f} "
                  "s from its start")

    def checks(self, deadline):
        if not self.needs("checks", ("torch", "cuda", "compile")):
            return
        tests = ["tests/test_fast_step_cuda.py"] if self.smoke else CHECKS
        rc, seconds, cut = self.command([sys.executable, "-m", "pytest", "-v", "-rA", "-p",
                                         "no:cacheprovider", *tests], self.out / "checks.txt",
                                        deadline)
        text = (self.out / "checks.txt").read_text()
        passed = len(re.findall(r"^PASSED ", text, re.M))
        skipped = len(re.findall(r"^SKIPPED ", text, re.M))
        said = f"{passed} of {len(tests)} CUDA checks passed" + (
            f"; cut at the {deadline} s deadline" if cut else "")
        if not rc and not passed and skipped:
            self.verdict("SKIP", "checks", seconds, f"{skipped} CUDA tests skipped (no CUDA)")
        else:
            self.verdict("PASS" if rc == 0 and not cut else "FAIL", "checks", seconds, said)
        for line in re.findall(r"^(?:PASSED|FAILED|ERROR) .*$", text, re.M):
            self.note("  " + line[:200])

    def bench(self, part, deadline):
        if not self.needs(part, ("torch", "cuda", "compile")):
            return
        args = (SMOKE_BENCH if self.smoke else BENCH).get(part)
        if args is None:
            return self.verdict("SKIP", part, 0, "the rehearsal benchmarks MNIST only (a CNN "
                                "compiles for minutes on a CPU)")
        if not self.smoke and (done := passed_before(part)):
            return self.verdict("SKIP", part, 0, f"passed in {done} (its summary.txt)")
        rc, seconds, cut = self.command([sys.executable, "benchmark.py", *args],
                                        self.out / f"{part}.txt", deadline)
        text = (self.out / f"{part}.txt").read_text()
        summary = re.findall(r"^SUMMARY .*$", text, re.M)
        slow = re.findall(r"ratio_(fast\w*)=([0-9.]+)", " ".join(summary))
        # on the GPU every fast step must beat the plain one; a tiny net on a busy CPU proves
        # nothing either way
        slow = [name for name, ratio in slow if float(ratio) <= 1 and not self.smoke]
        word = "PASS" if rc == 0 and summary and not slow else "FAIL"
        self.verdict(word, part, seconds, "benchmark.py, compiling included" + (
            f"; cut at the {deadline} s deadline" if cut else "")
            + (f"; not faster than plain: {', '.join(slow)}" if slow else ""))
        for line in re.findall(r"^(?:  \S+: \S+ warmed up in .*|  (?:plain|eager|fast)\S* .*|"
                               r"SUMMARY .*)$", text, re.M):
            self.note(line)

    # -- the queue --------------------------------------------------------------------------------
    def items(self):
        return read_queue(self.queue_path)

    def start_item(self, item, cap=None):
        """Starts a queue item (Popen under timeout -k); None if it is skipped."""
        name, minutes = item["name"], item["minutes"]
        if not self.have.get("data") or not self.have.get("torch"):
            self.verdict("SKIP", f"queue {name}", 0, "no data or no torch (the preflight)")
            return None
        absent = [d for d in re.findall(r"\$DATA/(\w+)", item["command"])
                  if not (self.data / d).is_dir()]
        if absent:
            self.verdict("SKIP", f"queue {name}", 0, f"no {self.data / absent[0]} (prepare)")
            return None
        if self.smoke and item["smoke"] == "-":
            self.verdict("SKIP", f"queue {name}", 0, "not rehearsed (its SMOKE is -)")
            return None
        done, finished = finished_before(name)
        if done and not item["sweep"]:
            self.verdict("SKIP", f"queue {name}", 0, f"finished in {done}")
            return None
        if self.left() < minutes * 60 and not self.smoke:
            self.verdict("SKIP", f"queue {name}", 0, f"needs {minutes} min, {self.left():.0f} s "
                         "left")
            return None
        run = SCRATCH / name
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(f"{run}-data", ignore_errors=True)
        for src in finished:  # a sweep's finished runs: sweep.py skips them
            dest = run / in_item(src, name)
            dest.mkdir(parents=True, exist_ok=True)
            for f in ("hparams.json", "metrics.jsonl"):
                shutil.copy(src / f, dest / f)
        run.parent.mkdir(parents=True, exist_ok=True)
        k = (SCRATCH / "k.txt").read_text().strip() if (SCRATCH / "k.txt").exists() else \
            str(measured_k() or 1)
        line = item["command"] + (" " + item["smoke"] if self.smoke else "")
        env = dict(self.env, RUN=str(run), DATA=str(self.data), K=k,
                   DEVICE="cpu" if self.smoke else "cuda", LEASE_SCRATCH=str(SCRATCH))
        limit = max(1, int(min(self.left(), cap or self.left())))
        log = open(self.out / "queue.txt", "a")
        log.write(f"\n=== {name}: {line}\n")
        log.flush()
        proc = subprocess.Popen(["timeout", "-k", str(KILL_AFTER), str(limit), "bash", "-c", line],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        return dict(item, proc=proc, log=log, run=run, started=time.monotonic(), line=line,
                    seeded=[Path(p) for p in finished])

    def finish_item(self, job):
        rc = job["proc"].wait()
        job["log"].close()
        seconds = time.monotonic() - job["started"]
        cut = rc in (124, 137, 128 + signal.SIGTERM) or self.left() <= 1
        runs = [p.parent for p in sorted(job["run"].rglob("hparams.json"))] \
            if job["run"].exists() else []
        counts = {"finished": 0, "cut short": 0, "failed": 0, "copied": 0}
        staging = SCRATCH / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        errors = []  # the finished runs' test errors at their best validation epoch
        for run_dir in runs:
            rel = run_dir.relative_to(job["run"])
            if any(rel == in_item(s, job["name"]) for s in job["seeded"]):
                counts["copied"] += 1  # finished in an earlier lease: not sent again
                continue
            status = run_status(run_dir, rc, cut)
            counts[status] += 1
            dest = staging / self.lease / job["name"] / rel
            dest.mkdir(parents=True, exist_ok=True)
            for f in RUN_FILES:
                if (run_dir / f).exists():
                    shutil.copy(run_dir / f, dest / f)
            self.record(dest, job, rc, seconds, status=status,
                        data=describe_data(self.data, job["command"]))
            if status == "finished":
                errors.append(read_metrics(run_dir)[-1].get("test_err"))
        if not runs and rc == 0:  # an item without runs (a benchmark, probe-k): its record alone
            k = job["run"] / "k.txt"
            self.record(staging / self.lease / job["name"], job, rc, seconds, status="finished",
                        k=int(k.read_text()) if k.exists() else None)
        if staging.exists():
            with tarfile.open(self.out / "results.tar", "a") as tar:
                tar.add(staging / self.lease, arcname=self.lease)
        if job["name"] == "k-probe" and (job["run"] / "k.txt").exists():
            shutil.copy(job["run"] / "k.txt", SCRATCH / "k.txt")
        # A sweep stopped by the plan's end continues in the next lease: its finished runs
        # count. Any other item stopped short, or a failed run, is a FAIL.
        ok = not counts["failed"] and (rc == 0 or cut and job["sweep"] and counts["finished"])
        said = ", ".join(f"{n} {what}" for what, n in counts.items() if n) or "no run directories"
        if errors:
            said += "; test error % at the best validation epoch: " + ", ".join(
                f"{e:.2f}" if isinstance(e, (int, float)) else "?" for e in errors[:8])
        self.verdict("PASS" if ok else "FAIL", f"queue {job['name']}", seconds,
                     said + (f"; exit {rc}" if rc else "") + ("; stopped at the plan's end"
                                                            if cut else ""))

    def record(self, dest, job, rc, seconds, **fields):
        """lease.json: what the ledger (results.py --ledger) says of a run besides its files."""
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "lease.json").write_text(json.dumps(dict(
            lease=self.lease, item=job["name"], command=job["line"], exit_status=rc,
            item_seconds=round(seconds, 1), card=self.card, torch=self.torch,
            commit=git_commit(), smoke=self.smoke, **fields), indent=1) + "\n")

    # -- the whole plan ---------------------------------------------------------------------------
    def run(self):
        self.note(f"tools/lease.py run{' --smoke' if self.smoke else ''}: plan of "
                  f"{self.end - self.start:.0f} s")
        self.wheels()
        self.preflight()
        items = self.items() if "queue" in self.parts else []
        queue_ok = self.have.get("data") and self.have.get("torch") and (
            self.smoke or self.have.get("cuda") and self.have.get("compile"))
        if items and queue_ok:
            # beside the checks, and no longer than they and the benchmarks can wait for it
            self.beside = self.start_item(items.pop(0), cap=BESIDE_SECONDS)
        for part, deadline, _ in PARTS:
            if part not in self.parts:
                continue
            if self.left() < 5:
                self.verdict("SKIP", part, 0, "the plan's time is spent")
                continue
            if part == "checks":
                self.checks(deadline)
            else:
                self.wait_beside()
                self.bench(part, deadline)
        self.wait_beside()
        for item in items if queue_ok else []:
            if self.left() < 5:
                self.verdict("SKIP", f"queue {item['name']}", 0, "the plan's time is spent")
                continue
            job = self.start_item(item)
            if job:
                self.finish_item(job)
        if not queue_ok and "queue" in self.parts:
            self.note("queue: skipped (the preflight found no data, torch, CUDA or compile)")
        self.note(f"lease.py: {self.failed} part(s) failed; {time.monotonic() - self.start:.0f} s; "
                  f"outputs in {self.out}")
        return 1 if self.failed else 0

    def wheels(self):
        """The carried wheels (.whl/, tools/lease.py prepare) of what the machine lacks."""
        import importlib.util
        wheels = sorted((ROOT / ".whl").glob("*.whl"))
        if not wheels or importlib.util.find_spec("submitit"):
            return
        site = SCRATCH / "site"
        p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                            "--no-compile", "--target", str(site), *map(str, wheels)],
                           capture_output=True, text=True)
        self.note(f"wheels: {', '.join(w.name for w in wheels)} "
                  + ("installed" if p.returncode == 0 else f"not installed: {p.stderr[-300:]}"))
        self.env["PYTHONPATH"] += os.pathsep + str(site)

    def wait_beside(self):
        if self.beside is not None:
            job, self.beside = self.beside, None
            self.finish_item(job)


# ------------------------------------------------------------------------------------------------
# The queue, the runs' status, the earlier leases in results/

def read_queue(path):
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split(" | ")]
        if len(fields) != 4 or not re.fullmatch(r"[A-Za-z0-9_-]+", fields[0]) or \
                not fields[1].isdigit():
            raise SystemExit(f"error: {path}, line {n}: expected NAME | MINUTES | COMMAND | SMOKE "
                             f"(NAME of letters, digits, '-', '_'; MINUTES an int), got {line!r}")
        items.append(dict(name=fields[0], minutes=int(fields[1]), command=fields[2],
                          smoke=fields[3], sweep="sweep.py" in fields[2]))
    return items


def run_status(run_dir, rc, cut):
    """finished (its last epoch in metrics.jsonl), cut short (stopped by the plan's deadline) or
    failed (it ended otherwise)."""
    try:
        if is_finished(read_record(run_dir)["hparams"], read_metrics(run_dir)):
            return "finished"
    except RunError:
        pass
    return "cut short" if cut else "failed"




def in_item(run_dir, name):
    """A run's path inside its item's folder: results/<lease>/<name>/<this>."""
    for parent in run_dir.parents:
        if parent.name == name:
            return run_dir.relative_to(parent)
    raise ValueError(f"{run_dir} is not below a folder {name}")


def finished_before(name):
    """(the lease that finished the item, [its finished runs]) from results/*/<name>/: the lease
    is None unless every run there is finished."""
    finished, leases, unfinished = [], set(), 0
    for record in sorted(RESULTS.glob(f"*/{name}/**/lease.json")):
        status = json.loads(record.read_text()).get("status")
        if status == "finished":
            finished.append(record.parent)
            leases.add(record.relative_to(RESULTS).parts[0])
        else:
            unfinished += 1
    done = ", ".join(sorted(leases)) if finished and not unfinished else None
    return done, finished


def measured_k():
    """The K that an earlier lease's k-probe measured (the latest), or None."""
    for record in sorted(RESULTS.glob("*/k-probe/lease.json"), reverse=True):
        k = json.loads(record.read_text()).get("k")
        if k:
            return k
    return None


def passed_before(part):
    for summary in sorted(RESULTS.glob("*/summary.txt")):
        if "-smoke" not in summary.parent.name and \
                re.search(rf"^PASS {re.escape(part)} ", summary.read_text(), re.M):
            return f"results/{summary.parent.name}"
    return None


def describe_data(data, command):
    """What the item's data is, for the ledger: the MNIST files' image counts (their headers)."""
    import gzip
    said = []
    if "$DATA/mnist" in command:
        counts = {}
        for f in sorted((Path(data) / "mnist").glob("*images*.gz")):
            with gzip.open(f) as g:
                counts["test" if f.name.startswith("t10k") else "training"] = \
                    int.from_bytes(g.read(8)[4:], "big")
        said.append(f"MNIST files of {counts.get('training')} training and "
                    f"{counts.get('test')} test images")
    if "$DATA/cifar10" in command:
        said.append("CIFAR-10: data_batch_1 (10000 images) and the first 2000 test images")
    return "; ".join(said)


COMMIT_FILE = ROOT / "data" / "lease_commit.txt"  # prepare's record: the lent machine has no .git


def git_commit():
    """The commit of the tree the plan runs: git's where there is a .git, else the one prepare
    recorded beside the data (with "+ changes" when the tree differed from it)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    if not commit and COMMIT_FILE.exists():
        return COMMIT_FILE.read_text().strip() + " (as prepare recorded it)"
    return commit or "no git"


# ------------------------------------------------------------------------------------------------
# probe-k (a queue item): K runs side by side against one

def probe_k(argv):
    """Runs the script's config K at a time for --epochs epochs, for each K of --ks, and writes
    the K of the most epochs per second in all to $RUN/k.txt (the seconds of the first evaluated
    epochs, which compile, left out)."""
    p = argparse.ArgumentParser(prog="lease.py probe-k")
    p.add_argument("--ks", default="1,4,8")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--script", default="mnist.py")
    args, script_args = p.parse_known_args(argv)
    out = Path(os.environ.get("RUN", SCRATCH / "k-probe"))
    runs = SCRATCH / "k-probe-runs"  # not under $RUN: short runs, no results
    shutil.rmtree(runs, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    rates = {}
    for k in map(int, args.ks.split(",")):
        procs = []
        (runs / f"k{k}").mkdir(parents=True)
        for i in range(k):
            d = runs / f"k{k}" / f"run{i}"
            with open(f"{d}.out", "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, args.script, *script_args, f"--num_epochs={args.epochs}",
                     f"--seed={i + 1}", f"--out_dir={d}"], cwd=ROOT, stdout=log,
                    stderr=subprocess.STDOUT))
        if any(pr.wait() for pr in procs):
            failed = next(f for f in sorted((runs / f"k{k}").glob("*.out")))
            raise SystemExit(f"probe-k: a run of K={k} failed; {failed} ends:\n"
                             + "".join(failed.read_text().splitlines(True)[-5:]))
        per_run = []
        for i in range(k):
            rows = [json.loads(line) for line in
                    (runs / f"k{k}" / f"run{i}" / "metrics.jsonl").read_text().splitlines()]
            first = rows[0]["epoch"]  # its seconds hold the compile
            timed = rows[1:] or rows
            per_run.append(sum(r["seconds"] for r in timed)
                           / (timed[-1]["epoch"] - (first if rows[1:] else 0)))
        rates[k] = k / max(per_run)  # epochs per second, all K runs together
        print(f"K={k}: {max(per_run):.3f} s per epoch per run, {rates[k]:.2f} epochs/s in all "
              f"({rates[k] / rates[min(rates)]:.2f}x K={min(rates)})", flush=True)
    best = max(rates, key=rates.get)
    (out / "k.txt").write_text(f"{best}\n")
    print(f"K={best}: the most epochs per second ({rates[best]:.2f})")


# ------------------------------------------------------------------------------------------------
# prepare (here, before the call) and unpack (here, after it)

def prepare(args):
    """data/mnist (the real files, 11 MB), data/cifar10 (data_batch_1.npz and the first 2000 test
    images, 34 MB), data/lease_commit.txt (the commit, for the records: the machine gets no .git)
    and .whl/ (submitit, which the lent machine lacks), all git-ignored: carry data and .whl.
    Run it after the last commit before the call."""
    src = Path(args.shared)
    mnist, cifar = ROOT / "data" / "mnist", ROOT / "data" / "cifar10"
    mnist.mkdir(parents=True, exist_ok=True)
    files = sorted((src / "mnist").glob("*.gz"))
    if len(files) != 4:
        raise SystemExit(f"error: expected the 4 MNIST .gz files in {src / 'mnist'}, found "
                         f"{len(files)}")
    for f in files:
        shutil.copyfile(f, mnist / f.name)
    if (src / "cifar10" / "data_batch_1.npz").exists() and not args.no_cifar:
        import numpy as np
        cifar.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "cifar10" / "data_batch_1.npz", cifar / "data_batch_1.npz")
        with np.load(src / "cifar10" / "test_batch_8000.npz") as f:
            np.savez_compressed(cifar / "test_batch_2000.npz", images=f["images"][:2000],
                                labels=f["labels"][:2000])
    git = [subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
           for a in (["rev-parse", "--short=10", "HEAD"], ["status", "--porcelain", "-uno"])]
    COMMIT_FILE.write_text(git[0] + (" + changes" if git[1] else "") + "\n")
    if not args.no_wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "-d", str(ROOT / ".whl"), "submitit"], check=True)
    sizes = subprocess.run(["du", "-sh", "data", ".whl"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    print(sizes + "carry: data, .whl (the tree that travels must stay under 64 MiB)")


def unpack(args):
    """The returned files (FOLDER) into results/<lease>/: results.tar's runs, summary.txt and
    the benchmarks' output. Returns the lease folder."""
    src = Path(args.folder)
    tar_path = src / "results.tar"
    summary = (src / "summary.txt").read_text()
    lease = re.search(r"^lease (\S+);", summary, re.M)
    if not lease:
        raise SystemExit(f"error: {src / 'summary.txt'} names no lease (did the preflight run?)")
    dest = Path(args.into) / lease[1]
    dest.mkdir(parents=True, exist_ok=True)
    if tar_path.exists():
        with tarfile.open(tar_path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(lease[1])
                       and ".." not in Path(m.name).parts and not m.name.endswith(".pt")]
            tar.extractall(args.into, members=members, filter="data")
    for name in ("summary.txt", "device.txt", "checks.txt", "bench-mnist.txt",
                 "bench-cifar10.txt", "queue.txt"):
        if (src / name).exists():
            shutil.copy(src / name, dest / name)
    print(f"{dest}: " + ", ".join(sorted(p.name for p in dest.iterdir())))
    return dest


def main(argv=None):
    global RESULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run", help="the plan (on the lent machine), its files into $OUT")
    r.add_argument("--smoke", action="store_true", help="the CPU rehearsal with tiny sizes")
    r.add_argument("--out", default=os.environ.get("OUT", "lease_out"))
    r.add_argument("--data", default=str(ROOT / "data"))
    r.add_argument("--queue", default=str(QUEUE))
    r.add_argument("--seconds", type=int, default=None, help=argparse.SUPPRESS)
    r.add_argument("--parts", default=",".join(ALL_PARTS),
                   help="comma-separated, among " + ", ".join(ALL_PARTS) + " (the preflight "
                        "always runs)")
    r.add_argument("--results", default=str(RESULTS),
                   help="the earlier leases (finished items are skipped, a sweep's finished "
                        "runs are not run again)")
    pr = sub.add_parser("prepare", help="data/ and .whl/ to carry (here)")
    pr.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    pr.add_argument("--no-cifar", action="store_true")
    pr.add_argument("--no-wheels", action="store_true")
    u = sub.add_parser("unpack", help="the files that came back into results/<lease>/")
    u.add_argument("folder")
    u.add_argument("--into", default=str(ROOT / "results"))
    sub.add_parser("probe-k", help="(a queue item) K runs side by side against one",
                   add_help=False)
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["probe-k"]:
        return probe_k(argv[1:])
    args = p.parse_args(argv)
    if args.verb == "run":
        RESULTS = Path(args.results)
        parts = args.parts.split(",")
        if unknown := [x for x in parts if x not in ALL_PARTS]:
            p.error(f"--parts: unknown {', '.join(unknown)}; the parts are {', '.join(ALL_PARTS)}")
        seconds = args.seconds or (SMOKE_SECONDS if args.smoke else PLAN_SECONDS)
        sys.exit(Plan(args.out, args.smoke, args.data, args.queue, seconds, parts).run())
    if args.verb == "prepare":
        return prepare(args)
    unpack(args)


if __name__ == "__main__":
    main()
