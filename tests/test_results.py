"""results.py on hand-written run directories: rows named and grouped by their hyperparameters,
mean ± sample std over seeds, unfinished runs listed and not averaged, the three formats."""
import contextlib
import csv
import io
import json
import runpy
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]

import configurator
import results as results_py


def defaults(script):
    return configurator.hyperparameters(runpy.run_path(str(ROOT / f"{script}.py"),
                                                       run_name="defaults"))


def write_run(run_dir, script="mnist", errors=(1.5,), seconds=10., device="cpu",
              commit="a" * 40, resumed_on=None, **hparams):
    """A run directory as training.py leaves it: one metrics line per epoch done (len(errors))."""
    run_dir.mkdir(parents=True)
    hp = {**defaults(script), "out_dir": str(run_dir), **hparams}
    record = dict(script=script, hparams=hp, git_commit=commit, git_dirty=False,
                  versions={}, device=device, started="2026-01-01T00:00:00")
    (run_dir / "hparams.json").write_text(json.dumps(record))
    lines = [dict(epoch=e, test_err=err, seconds=seconds) for e, err in enumerate(errors, 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if resumed_on:
        (run_dir / "resumes.jsonl").write_text(json.dumps({**record, "device": resumed_on}) + "\n")


def results(*args):
    """results.py's main in this process, as the command line runs it, with its exit status;
    test_no_runs_is_said runs the command itself."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = results_py.main([str(a) for a in args])
    return SimpleNamespace(stdout=out.getvalue(), stderr=err.getvalue(), returncode=status or 0)


def csv_rows(*args):
    proc = results(*args, "--format=csv")
    return list(csv.DictReader(io.StringIO(proc.stdout))), proc.stderr


def test_rows_mean_std_and_what_does_not_split_them(tmp_path):
    # Misleading directory names: the rows come from the hyperparameters.
    errs = {1: [3., 2.], 2: [2.5, 1.25], 3: [4., 1.5]}
    for seed, e in errs.items():
        write_run(tmp_path / "a" / f"mnist_stoch_bc{seed}", errors=e, seed=seed, num_epochs=2,
                  stochastic=False, device="cuda" if seed == 1 else "cpu",  # not in the key
                  data_dir=f"/data{seed}", compile="true" if seed == 2 else "auto")
    rows, notes = csv_rows(tmp_path)
    assert len(rows) == 1
    row = rows[0]
    final = [e[-1] for e in errs.values()]  # the best-validation epoch's test error
    assert row["method"] == "BinaryConnect (det.)" and row["dataset"] == "mnist"
    assert float(row["mean"]) == statistics.mean(final)
    assert float(row["std"]) == statistics.stdev(final)  # n - 1
    assert row["n"] == "3" and row["seeds"] == "1 2 3" and row["settings"] == "num_epochs=2"
    assert float(row["hours"]) == 6 * 10. / 3600
    assert "Unfinished" not in notes


def test_hyperparameters_and_precision_split_rows(tmp_path):
    write_run(tmp_path / "r1", seed=1, num_epochs=1)
    write_run(tmp_path / "r2", seed=2, num_epochs=1, precision="bf16")
    write_run(tmp_path / "r3", seed=3, num_epochs=1, LR_start=0.003)
    rows, _ = csv_rows(tmp_path)
    assert sorted(r["settings"] for r in rows) == [
        "num_epochs=1", "num_epochs=1, LR_start=0.003", "num_epochs=1, precision=bf16"]
    assert all(r["n"] == "1" and r["std"] == "" for r in rows)


def test_unfinished_runs_are_listed_not_averaged(tmp_path):
    write_run(tmp_path / "done1", errors=[2., 1.], seed=1, num_epochs=2)
    write_run(tmp_path / "done2", errors=[2., 3.], seed=2, num_epochs=2)
    write_run(tmp_path / "half", errors=[0.5], seed=3, num_epochs=2)
    rows, notes = csv_rows(tmp_path)
    assert len(rows) == 1 and float(rows[0]["mean"]) == 2. and rows[0]["n"] == "2"
    assert f"Unfinished (not averaged): {tmp_path / 'half'} (epoch 1 of 2" in notes
    table = results(tmp_path).stdout
    assert "| 2.00 ± 1.41 | 2 | 1,2 |" in table and "Unfinished" in table


def test_variants_protocols_and_the_papers_numbers(tmp_path):
    scope = {}
    exec((ROOT / "config" / "mnist_paper_stoch_bc.py").read_text(), {}, scope)
    paper = configurator.hyperparameters(scope)
    write_run(tmp_path / "1", seed=1, **{**paper, "num_epochs": 1})
    write_run(tmp_path / "2", seed=1, num_epochs=1, binary=False, dropout_hidden=.5)
    write_run(tmp_path / "3", seed=1, num_epochs=1, binary=False)
    write_run(tmp_path / "4", script="cifar10", seed=1, num_epochs=1, stochastic=False)
    write_run(tmp_path / "5", script="svhn", seed=1, num_epochs=1, binary=False)
    rows, notes = csv_rows(tmp_path)
    got = [(r["dataset"], r["protocol"], r["method"], r["settings"], r["paper"]) for r in rows]
    assert got == [
        ("mnist", "paper §9", "BinaryConnect (stoch.)", "num_epochs=1",
         "1.18 ± 0.04 (1.18 C, ± R)"),
        ("mnist", "lasagne", "No regularizer", "num_epochs=1", "1.30 ± 0.04 (R)"),
        ("mnist", "lasagne", "50% Dropout", "num_epochs=1", "1.01 ± 0.04 (R)"),
        ("cifar10", "lasagne", "BinaryConnect (det.)", "num_epochs=1", "9.90 (C)"),
        ("svhn", "lasagne", "No regularizer", "num_epochs=1", "2.44 (R)")]
    table = results(tmp_path).stdout
    # the lasagne MNIST rows are marked: the paper's MNIST numbers came from its own protocol
    assert "| 1.30 ± 0.04 (R) † |" in table and "| 1.18 ± 0.04 (1.18 C, ± R) |" in table


def test_binarynet_rows(tmp_path):
    """BinaryNet's runs (§13): the row "BinaryNet", its protocol config/<dataset>_binarynet.py's,
    every difference from it a setting (its weights' and dropout's too), the README's number."""
    for dataset in ("mnist", "cifar10"):
        scope = {}
        exec((ROOT / "config" / f"{dataset}_binarynet.py").read_text(), {}, scope)
        protocol = configurator.hyperparameters(scope)
        write_run(tmp_path / dataset, script=dataset, seed=1, **{**protocol, "num_epochs": 1})
    write_run(tmp_path / "stoch", seed=1, **{**protocol, "num_epochs": 1, "stochastic": True},
              script="cifar10")
    rows, notes = csv_rows(tmp_path)
    got = [(r["dataset"], r["protocol"], r["method"], r["settings"], r["paper"]) for r in rows]
    assert got == [("mnist", "BinaryNet", "BinaryNet", "num_epochs=1", "0.96 (C)"),
                   ("cifar10", "BinaryNet", "BinaryNet", "num_epochs=1", "11.40 (C)"),
                   ("cifar10", "BinaryNet", "BinaryNet", "num_epochs=1, stochastic=True",
                    "11.40 (C)")]
    assert "BinaryNet: its Train-time README." in results(tmp_path).stdout


def test_runs_from_before_a_hyperparameter_existed_take_its_default(tmp_path):
    write_run(tmp_path / "new", seed=1, num_epochs=1)
    write_run(tmp_path / "old", seed=2, num_epochs=1)
    record = json.loads((tmp_path / "old" / "hparams.json").read_text())
    del record["hparams"]["optimizer"], record["hparams"]["bn_form"]
    (tmp_path / "old" / "hparams.json").write_text(json.dumps(record))
    rows, _ = csv_rows(tmp_path)
    assert len(rows) == 1 and rows[0]["n"] == "2"


def test_devices_commits_and_hours(tmp_path):
    write_run(tmp_path / "a", seed=1, num_epochs=1, seconds=1800., device="cuda (NVIDIA H200)",
              commit="b" * 40)
    write_run(tmp_path / "b", seed=2, num_epochs=1, seconds=3600., device="cpu",
              resumed_on="cuda (NVIDIA H200)")
    table = results(tmp_path).stdout
    assert "| 1.500 |" in table  # hours of the row
    # a run resumed on another device is labelled with both
    assert ("1.500 h in all (1.000 h on cpu + cuda (NVIDIA H200); 0.500 h on cuda (NVIDIA H200))"
            in table)
    assert "Code: aaaaaaaaaa, bbbbbbbbbb." in table


def test_a_sweep_directory_and_its_runs_count_once(tmp_path):
    write_run(tmp_path / "sweep" / "x" / "seed1", seed=1, num_epochs=1)
    rows, _ = csv_rows(tmp_path / "sweep", tmp_path / "sweep" / "x" / "seed1")
    assert rows[0]["n"] == "1"


def test_the_same_seed_in_two_directories_counts_once(tmp_path):
    # a sweep and a copy of one of its runs, given together: the copy is no second sample
    write_run(tmp_path / "sweep" / "seed1", errors=[1.], seed=1, num_epochs=1)
    write_run(tmp_path / "sweep" / "seed2", errors=[2.], seed=2, num_epochs=1)
    write_run(tmp_path / "copy" / "seed1", errors=[1.], seed=1, num_epochs=1)
    rows, notes = csv_rows(tmp_path / "sweep", tmp_path / "copy")
    assert len(rows) == 1 and rows[0]["n"] == "2" and rows[0]["seeds"] == "1 2"
    assert float(rows[0]["mean"]) == 1.5 and float(rows[0]["std"]) == statistics.stdev([1., 2.])
    assert (f"Counted once: seed 1 of MNIST BinaryConnect (stoch.) is in "
            f"{(tmp_path / 'sweep' / 'seed1').resolve()} and in "
            f"{(tmp_path / 'copy' / 'seed1').resolve()}, which is left out.\n") in notes
    # the same seed run twice, to another result: the first directory given is kept, and told
    write_run(tmp_path / "again" / "seed1", errors=[4.], seed=1, num_epochs=1)
    rows, notes = csv_rows(tmp_path / "again", tmp_path / "sweep")
    assert rows[0]["n"] == "2" and float(rows[0]["mean"]) == 3.
    assert "which is left out (its test error differs: 1.0 against 4.0)." in notes
    # another row (other settings) with the same seed is not a copy
    write_run(tmp_path / "other" / "seed1", errors=[3.], seed=1, num_epochs=1, LR_start=0.003)
    rows, notes = csv_rows(tmp_path / "sweep", tmp_path / "other")
    assert sorted(r["n"] for r in rows) == ["1", "2"] and "Counted once" not in notes


def test_latex(tmp_path):
    write_run(tmp_path / "a", errors=[1.], seed=1, num_epochs=1)
    write_run(tmp_path / "b", errors=[2.], seed=2, num_epochs=1)
    tex = results(tmp_path, "--format=latex").stdout
    assert "\\begin{tabular}" in tex and "\\end{tabular}" in tex
    assert ("MNIST & lasagne & BinaryConnect (stoch.) & num\\_epochs=1 & 1.50 $\\pm$ 0.71 & 2 & "
            "1.18 $\\pm$ 0.04 (1.18 C, $\\pm$ R) $^\\dagger$ \\\\") in tex


def test_no_runs_is_said(tmp_path):
    proc = subprocess.run([sys.executable, "results.py", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no run directories" in proc.stderr


def test_a_cut_last_line(tmp_path, capsys):
    """Issue 15: given a run whose last metrics line is cut, results.py said 'no run
    directories'. The line is left out, with a warning, and the run is tabled as it stands."""
    write_run(tmp_path / "done", errors=[2., 1.], seed=1, num_epochs=2)
    write_run(tmp_path / "cut", errors=[3., 2.], seed=2, num_epochs=2)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "test_e')  # a copy cut short
    rows, notes = csv_rows(tmp_path)
    assert rows[0]["n"] == "2" and float(rows[0]["mean"]) == 1.5
    assert notes.startswith(f"warning: {tmp_path / 'cut' / 'metrics.jsonl'}: line 3, the last, "
                            "is cut short")
    # the same run with only its first line and the cut one: unfinished, and said so
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "cut" / "metrics.jsonl").write_text(lines[0] + "\n" + lines[2])
    table = results(tmp_path).stdout
    assert f"Unfinished (not averaged): {tmp_path / 'cut'} (epoch 1 of 2, " in table


def test_a_damaged_run_is_named_and_left_out(tmp_path):
    write_run(tmp_path / "good", seed=1, num_epochs=1)
    write_run(tmp_path / "bad", seed=2, num_epochs=1)
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"epo\n{"epoch": 1, "test_err": 1.0}\n')
    table = results(tmp_path).stdout
    assert (f"Skipped {tmp_path / 'bad'}: unreadable ({tmp_path / 'bad' / 'metrics.jsonl'}: "
            "line 1 of 2 is not a JSON object; only a cut last line is left out: repair or "
            "delete that line).") in table
    assert "| 1.50 | 1 | 1 |" in table
    # nothing readable: the reasons, then the end
    (tmp_path / "good" / "hparams.json").write_text("{")
    proc = results(tmp_path)
    message = proc.stderr
    assert proc.returncode == 2
    assert f"Skipped {tmp_path / 'good'}: unreadable ({tmp_path / 'good' / 'hparams.json'}: " \
           "not valid JSON" in message
    assert message.endswith(f"\nerror: no readable run directories under {tmp_path}\n")


def test_the_ledger_states_what_was_run_and_a_cut_run_is_no_result(tmp_path):
    """results.py --ledger on what tools/lease.py unpack leaves: a finished run with its test
    error, card, torch and commit; a run cut short by the lease's deadline as cut short, with
    the epoch it reached and no error; only the finished one in the table below."""
    lease = dict(card="NVIDIA H200", torch="2.11.0+cu130", commit="abc1234567",
                 data="MNIST: 60000 training, 8000 test images")
    done = tmp_path / "2026-12-05T1200-h200" / "mnist-250"
    write_run(done, errors=[1.3, 1.2], num_epochs=2, seed=1234)
    rows = [json.loads(line) for line in (done / "metrics.jsonl").read_text().splitlines()]
    (done / "metrics.jsonl").write_text("".join(json.dumps({**r, "best_epoch": 2}) + "\n"
                                                for r in rows))
    (done / "lease.json").write_text(json.dumps({**lease, "status": "finished"}))
    cut = tmp_path / "2026-12-05T1200-h200" / "paper-mnist" / "mnist_paper_det_bc" / "seed1"
    write_run(cut, errors=[1.9, 1.8, 1.7], **{**_paper("det_bc"), "seed": 1})
    (cut / "lease.json").write_text(json.dumps({**lease, "status": "cut short"}))
    out = results(tmp_path, "--ledger").stdout
    line = next(x for x in out.splitlines() if "mnist-250" in x)
    assert "mnist.py, lasagne, BinaryConnect (stoch.), num_epochs=2" in line
    assert "data: MNIST: 60000 training, 8000 test images" in line
    assert "| finished | 1.20 (epoch 2) | NVIDIA H200 | 2.11.0+cu130 | abc1234567 |" in line
    line = next(x for x in out.splitlines() if "seed1" in x)
    assert "mnist.py, paper §9, BinaryConnect (det.)" in line
    assert "| cut short at epoch 3 of 1000 | — |" in line and "1.70" not in line
    table = out.split("\n\n", 1)[1]
    assert "| MNIST | lasagne | BinaryConnect (stoch.) | num_epochs=2 | 1.20 | 1 |" in table
    assert "Unfinished (not averaged)" in table and "paper §9" not in table.split("\n\n")[0]


def _paper(name):
    scope = {}
    exec((ROOT / "config" / f"mnist_paper_{name}.py").read_text(), {}, scope)
    return configurator.hyperparameters(scope)
