"""Reading run directories: what the tools use. No torch: results.py and sweep.py start without it.

evaluate, export, plot, results and sweep, and the configurator (for --resume), read run
directories through these functions alone: one reader per kind of file, one shape, one rule for a
damaged file. A problem the user can fix raises RunError, whose message names the file. rundir.py
writes what these read (hparams.json, resumes.jsonl, metrics.jsonl, the lock); checkpoints.py
owns last.pt and best.pt.
"""
import json
import os
import sys
from pathlib import Path

from errors import UserError

LOCK = ".lock"  # held while a script trains in a run directory (rundir.lock)
LOCK_FD = "BINARYCONNECT_LOCK_FD"  # sweep.py holds the lock for the script it starts


class RunError(UserError):
    """A run file that is missing or damaged; the message names it and says what to do."""


RUN_FILES = ("written by mnist.py, cifar10.py or svhn.py (hparams.json, metrics.jsonl, last.pt, "
             "best.pt)")
DATA_PATHS = ("data_dir", "SVHN_LOCAL_PATH")  # relative to the directory the run was started in


def read_record(run_dir):
    """hparams.json: {"script", "hparams", "git_commit", "git_dirty", "versions", "device",
    "started", "cwd"}, as the run began (cwd: since the record had it)."""
    path = Path(run_dir) / "hparams.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RunError(f"{path}: missing; {run_dir} is not a run directory {RUN_FILES}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    try:
        record = json.loads(text)
    except ValueError as e:
        raise RunError(f"{path}: not valid JSON ({e}); a training run writes it when it "
                       "starts") from None
    if not isinstance(record, dict) or not isinstance(record.get("hparams"), dict):
        raise RunError(f"{path}: not the record a training run writes (a JSON object with the "
                       "run's \"script\" and \"hparams\")")
    return record


def require_checkpoint(resume):
    """--resume=RUN_DIR needs the run's last.pt: a RunError if it is not there."""
    path = Path(resume) / "last.pt"
    if not path.exists():
        raise RunError(f"--resume={resume}: no checkpoint {path} to resume")


def read_resumes(run_dir):
    """resumes.jsonl: one record like hparams.json's per resume ([] for a run never resumed)."""
    return _read_jsonl(Path(run_dir) / "resumes.jsonl")


def read_metrics(run_dir):
    """metrics.jsonl: one dict per evaluated epoch, [] before the first. A last line cut short
    (a copy cut short, a run killed while writing it) is left out with one warning line on
    stderr; a damaged line before the last is an error."""
    return _read_jsonl(Path(run_dir) / "metrics.jsonl")


_warned = set()  # (file, line number, text): a tool that reads a run twice warns once


def _read_jsonl(path):
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise RunError(f"{path}: cannot be read ({e.strerror or e})") from None
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    rows = []
    for i, line in numbered:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif i == numbered[-1][0]:
            key = (str(path.resolve()), i, line)
            if key not in _warned:
                _warned.add(key)
                print(f"warning: {path}: line {i}, the last, is cut short or not a JSON object "
                      "(a copy cut short, or a run killed while writing it); it is left out",
                      file=sys.stderr, flush=True)
        else:
            raise RunError(f"{path}: line {i} of {len(lines)} is not a JSON object; only a cut "
                           "last line is left out: repair or delete that line")
    return rows


def is_finished(hparams, metrics):
    """Has the run trained its last epoch? Its metrics.jsonl has the line of its num_epochs."""
    return any(m.get("epoch") == hparams.get("num_epochs") for m in metrics)


def find_runs(*paths):
    """The run directories at or below each path (a run directory, or a sweep directory above
    some): every directory holding an hparams.json, each once (as the first path reached it), in
    the order of the paths, sorted below each."""
    found = {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise RunError(f"{path}: " + ("not a directory; give run directories or a sweep "
                                          "directory above some" if path.exists() else
                                          "no such directory"))
        runs = sorted(p.parent for p in path.rglob("hparams.json"))
        if not runs:
            raise RunError(f"{path}: no run directories (with an hparams.json) at or below it; "
                           f"expected run directories {RUN_FILES}, or a sweep directory")
        for run in runs:
            found.setdefault(run.resolve(), run)
    return list(found.values())


def resolve_data_paths(run_dir, hparams):
    """hparams, its relative data paths (data_dir, SVHN_LOCAL_PATH) made absolute against the
    directory that the run was started or resumed in (the records' cwd), so that a tool finds
    the data from anywhere. Runs recorded before the cwd was: relative to this directory."""
    hparams = dict(hparams)
    run_dir = Path(run_dir)
    if not (run_dir / "hparams.json").is_file():
        return hparams
    records = [read_record(run_dir), *read_resumes(run_dir)]
    for key in DATA_PATHS:
        value = hparams.get(key)
        if not isinstance(value, str) or not value or os.path.isabs(value) or value[0] == "~":
            continue
        # the last start or resume that set this value (a resume may give new data paths)
        cwd = next((r["cwd"] for r in reversed(records) if r.get("cwd")
                    and r.get("hparams", {}).get(key) == value), None)
        if cwd:
            hparams[key] = os.path.join(cwd, value)
    return hparams
