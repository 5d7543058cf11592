"""runfiles.py's readers, what every tool reads runs with: hparams.json, metrics.jsonl (a cut last
line left out with one warning, a damaged earlier line an error), resumes.jsonl, the run
directories below a path, the data paths of a run started elsewhere, and the checkpoint a tool
reads."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

import configurator
import checkpoints
import rundir
import runfiles
from runfiles import RunError

ROOT = Path(__file__).resolve().parents[1]


def write_run(run_dir, hparams=None, metrics=(), cwd=None, written=("best", "last")):
    """A run directory as the scripts leave it, with a tiny model in its checkpoints."""
    run_dir.mkdir(parents=True)
    hp = dict(num_epochs=2, data_dir="data/mnist", seed=1, **(hparams or {}))
    record = dict(script="mnist", hparams=hp, git_commit=None, git_dirty=None, versions={},
                  device="cpu", started="2026-01-01T00:00:00")
    if cwd:
        record["cwd"] = str(cwd)
    (run_dir / "hparams.json").write_text(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    for i, name in enumerate(written):
        torch.save(dict(version=checkpoints.CHECKPOINT_VERSION, model={"0.weight": torch.ones(2, 2)},
                        epoch=1 + i, batch=0, hparams=hp), run_dir / f"{name}.pt")
    return run_dir


# hparams.json ---------------------------------------------------------------------------------

def test_read_record(tmp_path):
    run_dir = write_run(tmp_path / "run")
    record = runfiles.read_record(run_dir)
    assert record["script"] == "mnist" and record["hparams"]["num_epochs"] == 2


@pytest.mark.parametrize("text, says", [
    (None, "missing; {dir} is not a run directory written by mnist.py"),
    ("{", "not valid JSON"),
    ("[1, 2]", "not the record a training run writes"),
    ('{"script": "mnist"}', "not the record a training run writes"),
])
def test_a_bad_record_names_the_file(tmp_path, text, says):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if text is not None:
        (run_dir / "hparams.json").write_text(text)
    with pytest.raises(RunError) as e:
        runfiles.read_record(run_dir)
    assert str(e.value).startswith(f"{run_dir / 'hparams.json'}: " + says.format(dir=run_dir))


def test_resume_reads_the_record_through_runfiles(tmp_path, capsys):
    """configurator's --resume reads hparams.json with read_record: its errors name the file."""
    run_dir = write_run(tmp_path / "run")
    (run_dir / "hparams.json").write_text("{")
    defaults = runpy.run_path(str(ROOT / "mnist.py"), run_name="mnist")
    with pytest.raises(SystemExit):
        configurator.configure(defaults, [f"--resume={run_dir}"])
    assert capsys.readouterr().err.startswith(
        f"error: --resume={run_dir}: {run_dir / 'hparams.json'}: not valid JSON")


def test_start_run_records_its_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stdout = sys.stdout
    try:
        with rundir.start_run("mnist", dict(seed=1, device="cpu", out_dir="run", resume="")):
            record = runfiles.read_record("run")
    finally:
        if isinstance(sys.stdout, rundir.Tee):
            sys.stdout.file.close()
        sys.stdout = stdout
    assert record["cwd"] == str(tmp_path) and record["hparams"]["out_dir"] == "run"


# metrics.jsonl and resumes.jsonl ---------------------------------------------------------------

def test_read_metrics(tmp_path):
    run_dir = write_run(tmp_path / "run", metrics=[dict(epoch=1), dict(epoch=2)])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("\n")  # blank lines are no lines
    assert runfiles.read_metrics(run_dir) == [dict(epoch=1), dict(epoch=2)]
    (run_dir / "metrics.jsonl").unlink()
    assert runfiles.read_metrics(run_dir) == []  # no epoch done yet
    assert runfiles.read_resumes(run_dir) == []  # never resumed


@pytest.mark.parametrize("last", ['{"epoch": 3, "val_e', "[3]", "\x00\x00\x00", "{}}"])
def test_a_cut_last_line_is_left_out_with_one_warning(tmp_path, capsys, last):
    run_dir = write_run(tmp_path / "run", metrics=[dict(epoch=1), dict(epoch=2)])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(last)
    for _ in range(3):  # a tool that reads the run three times warns once
        assert runfiles.read_metrics(run_dir) == [dict(epoch=1), dict(epoch=2)]
    assert capsys.readouterr().err == (
        f"warning: {run_dir / 'metrics.jsonl'}: line 3, the last, is cut short or not a JSON "
        "object (a copy cut short, or a run killed while writing it); it is left out\n")


def test_a_damaged_line_before_the_last_is_an_error(tmp_path):
    run_dir = write_run(tmp_path / "run", metrics=[dict(epoch=1)])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "val\n{"epoch": 3}\n')
    with pytest.raises(RunError) as e:
        runfiles.read_metrics(run_dir)
    assert str(e.value) == (f"{run_dir / 'metrics.jsonl'}: line 2 of 3 is not a JSON object; "
                            "only a cut last line is left out: repair or delete that line")
    (run_dir / "resumes.jsonl").write_text("{\n{}\n")  # one rule for every .jsonl
    with pytest.raises(RunError, match="resumes.jsonl: line 1 of 2"):
        runfiles.read_resumes(run_dir)


def test_is_finished():
    assert runfiles.is_finished(dict(num_epochs=2), [dict(epoch=1), dict(epoch=2)])
    assert not runfiles.is_finished(dict(num_epochs=3), [dict(epoch=1), dict(epoch=2)])
    assert not runfiles.is_finished(dict(num_epochs=3), [])


# The runs below a path -------------------------------------------------------------------------

def test_find_runs(tmp_path):
    sweep = tmp_path / "sweep"
    runs = [write_run(sweep / "mnist_det_bc" / f"seed{s}") for s in (1, 2)]
    (sweep / "submitit" / "123").mkdir(parents=True)  # no hparams.json: no run
    other = write_run(tmp_path / "other")
    assert runfiles.find_runs(sweep) == runs
    assert runfiles.find_runs(runs[1]) == [runs[1]]
    # each run once, in the order of the paths
    assert runfiles.find_runs(other, runs[1], sweep) == [other, runs[1], runs[0]]


def test_find_runs_refuses_what_holds_no_run(tmp_path):
    with pytest.raises(RunError, match="no such directory"):
        runfiles.find_runs(tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError, match="not a directory"):
        runfiles.find_runs(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no run directories .* at or below it"):
        runfiles.find_runs(tmp_path / "empty")


# The data paths of a run started elsewhere -----------------------------------------------------

def test_relative_data_paths_are_relative_to_where_the_run_started(tmp_path):
    run_dir = write_run(tmp_path / "run", cwd=tmp_path / "work")
    hp = runfiles.read_record(run_dir)["hparams"]
    resolved = runfiles.resolve_data_paths(run_dir, hp)
    assert resolved["data_dir"] == str(tmp_path / "work" / "data" / "mnist")
    assert hp["data_dir"] == "data/mnist"  # the caller's dict is left alone
    # absolute paths stay; a run recorded before the cwd was: relative to here, as before
    assert runfiles.resolve_data_paths(run_dir, dict(hp, data_dir="/d"))["data_dir"] == "/d"
    old = write_run(tmp_path / "old")
    assert runfiles.resolve_data_paths(old, hp)["data_dir"] == "data/mnist"
    # no hparams.json (a checkpoint file alone): nothing to resolve against
    assert runfiles.resolve_data_paths(tmp_path, hp) == hp


def test_a_resume_that_gave_new_data_paths(tmp_path):
    run_dir = write_run(tmp_path / "run", cwd=tmp_path / "first")
    record = runfiles.read_record(run_dir)
    resumed = dict(record, cwd=str(tmp_path / "second"),
                   hparams=dict(record["hparams"], data_dir="moved"))
    (run_dir / "resumes.jsonl").write_text(json.dumps(resumed) + "\n")
    resolve = runfiles.resolve_data_paths
    assert resolve(run_dir, resumed["hparams"])["data_dir"] == str(tmp_path / "second" / "moved")
    assert resolve(run_dir, record["hparams"])["data_dir"] == str(tmp_path / "first" / "data" /
                                                                  "mnist")
    # the same relative path given again in a later resume: the latest start's directory
    again = dict(record, cwd=str(tmp_path / "third"))
    with open(run_dir / "resumes.jsonl", "a") as f:
        f.write(json.dumps(again) + "\n")
    assert resolve(run_dir, record["hparams"])["data_dir"] == str(tmp_path / "third" / "data" /
                                                                  "mnist")


# The checkpoint a tool reads -------------------------------------------------------------------

def test_read_checkpoint(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    ckpt, path = checkpoints.read_checkpoint(run_dir)
    assert path == run_dir / "best.pt" and ckpt["epoch"] == 1
    ckpt, path = checkpoints.read_checkpoint(run_dir, "last")
    assert path == run_dir / "last.pt" and ckpt["epoch"] == 2
    ckpt, path = checkpoints.read_checkpoint(run_dir / "last.pt", "best")  # a file is taken as it is
    assert path == run_dir / "last.pt"
    assert capsys.readouterr().err == ""


def test_only_last_pt(tmp_path, capsys):
    """A run stopped before its first evaluation: by default last.pt, said in one line; asked
    for best.pt, an error that says how to read last.pt."""
    run_dir = write_run(tmp_path / "run", written=("last",))
    ckpt = torch.load(run_dir / "last.pt")
    torch.save(dict(ckpt, epoch=0, batch=3), run_dir / "last.pt")  # 3 batches into epoch 1
    ckpt, path = checkpoints.read_checkpoint(run_dir)
    assert path == run_dir / "last.pt"
    assert capsys.readouterr().err == (f"note: {run_dir} has no best.pt yet (no epoch evaluated): "
                                       "reading last.pt, its last checkpoint (0 epochs done, 3 "
                                       "batches into epoch 1)\n")
    with pytest.raises(RunError) as e:
        checkpoints.read_checkpoint(run_dir, "best")
    assert str(e.value) == (f"{run_dir}: no best.pt yet (no epoch evaluated); --checkpoint=last "
                            "reads last.pt, the run's last checkpoint")


def test_no_checkpoint_or_not_a_checkpoint(tmp_path):
    run_dir = write_run(tmp_path / "run", written=())
    with pytest.raises(RunError, match="no best.pt or last.pt: the run has written no checkpoint"):
        checkpoints.read_checkpoint(run_dir)
    with pytest.raises(RunError, match="no such file or directory"):
        checkpoints.read_checkpoint(tmp_path / "nowhere")
    with pytest.raises(RunError, match="no best.pt in this directory; expected a run directory"):
        checkpoints.read_checkpoint(tmp_path)
    (run_dir / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="best.pt: not a checkpoint of this project"):
        checkpoints.read_checkpoint(run_dir)
    torch.save(dict(model={}, hparams={}), run_dir / "best.pt")
    data = (run_dir / "best.pt").read_bytes()
    (run_dir / "best.pt").write_bytes(data[:len(data) // 2])  # a copy cut short: damaged
    with pytest.raises(RunError) as e:
        checkpoints.read_checkpoint(run_dir)
    assert str(e.value) == (f"{run_dir / 'best.pt'} is cut short ({len(data) // 2} bytes, its "
                            "end missing: a copy or a disk that failed): a checkpoint whose "
                            "writing did not finish; the run that wrote it keeps its other "
                            "records")
    torch.save({"0.weight": torch.ones(2)}, run_dir / "best.pt")  # a bare state dict
    with pytest.raises(RunError, match="best.pt: a torch file, but not a training checkpoint"):
        checkpoints.read_checkpoint(run_dir)


def test_the_checkpoint_loads_no_code(tmp_path):
    """weights_only=True: a pickle that would run code is refused, not run."""
    run_dir = write_run(tmp_path / "run", written=())
    torch.save(dict(model={}, hparams={}, evil=Path("x")), run_dir / "best.pt")
    with pytest.raises(RunError, match="not a checkpoint of this project"):
        checkpoints.read_checkpoint(run_dir)
