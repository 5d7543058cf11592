"""The paper's Table 2 rebuilt from finished runs: test error, mean ± std over seeds.

    python results.py runs/table2 [RUN_DIR ...] [--format=markdown|csv|latex]
    python results.py --ledger results        # README's results: every run a lent GPU sent back

Each argument is a run directory or any folder above some (a sweep directory); every folder with
an hparams.json below it is a run. A run is finished when its metrics.jsonl has the line of its
last epoch (num_epochs); its test error is the one at the best-validation epoch (the "test_err"
of that last line, as the script's report gives it). Runs are grouped by their hyperparameters
other than the seed and where things are (NOT_IN_ROW); each group is one row: the mean, the
sample std (n - 1) and n, beside the paper's number. The row is named by what its hyperparameters
make it (binary, stochastic, dropout; the MNIST protocol), not by its directory names. Unfinished
runs are listed under the table, not averaged. A seed counts once in a row: a second directory
with the same run (a copy) is named under the table and left out. The runs are read by rundir's
readers, as every tool reads them: a metrics.jsonl whose last line is cut short (a copy cut short)
is read without that line, with a warning; a run that cannot be read is named under the table.

--ledger lists every run below the folders (results/, where tools/lease.py unpack puts what a lent
GPU sent back) one per line, stating what was run: the script, its protocol, variant, settings
departing from the protocol, seed, the data, the card, torch, the commit and the time; a run cut
short by a lease's deadline is recorded as cut short (its epochs done), never with a test error.
The Table 2 rows of the finished runs follow.
"""
import argparse
import csv
import io
import json
import runpy
import statistics
import sys
from pathlib import Path

from configurator import hyperparameters
from errors import UserError, print_error
from runfiles import RunError, find_runs, is_finished, read_metrics, read_record, read_resumes

ROOT = Path(__file__).resolve().parent
DATASETS = {"mnist": "MNIST", "cifar10": "CIFAR-10", "svhn": "SVHN"}
VARIANTS = ["No regularizer", "BinaryConnect (det.)", "BinaryConnect (stoch.)", "50% Dropout",
            "BinaryNet"]

# The paper's Table 2 (§8.4), with its marks: (C) corroborated, (R) recalled, not yet checked
# against the PDF. The MNIST numbers come from the paper's own protocol (config/mnist_paper_*.py).
PAPER = {
    ("mnist", "No regularizer"): "1.30 ± 0.04 (R)",
    ("mnist", "BinaryConnect (det.)"): "1.29 ± 0.08 (C)",
    ("mnist", "BinaryConnect (stoch.)"): "1.18 ± 0.04 (1.18 C, ± R)",
    ("mnist", "50% Dropout"): "1.01 ± 0.04 (R)",
    ("cifar10", "No regularizer"): "10.64 (C)",
    ("cifar10", "BinaryConnect (det.)"): "9.90 (C)",
    ("cifar10", "BinaryConnect (stoch.)"): "8.27 (C)",
    ("svhn", "No regularizer"): "2.44 (R)",
    ("svhn", "BinaryConnect (det.)"): "2.30 (C)",
    ("svhn", "BinaryConnect (stoch.)"): "2.15 (C)",
    # BinaryNet's Train-time README (§13.5), the numbers of the BinaryNet paper's Table 1
    ("mnist", "BinaryNet"): "0.96 (C)",
    ("cifar10", "BinaryNet"): "11.40 (C)",
    ("svhn", "BinaryNet"): "2.80 (C)",
}

# These do not split a row: where things are (paths, device), the seed that the row averages over,
# and settings that do not change what is computed: verify_checksums only checks the files, and
# compile runs the same float32 math (at most in another rounding order). precision does change
# the arithmetic (bf16 products), so it stays in the row's key.
NOT_IN_ROW = {"seed", "out_dir", "resume", "data_dir", "SVHN_LOCAL_PATH", "device", "compile",
              "verify_checksums", "checkpoint_every"}
# These name the row (its variant); the others that differ from the protocol are listed beside it.
VARIANT_KEYS = {"binary", "stochastic", "dropout_in", "dropout_hidden"}
# The paper's MNIST protocol is these settings of config/mnist_paper_stoch_bc.py.
PAPER_MNIST = ROOT / "config" / "mnist_paper_stoch_bc.py"


def normal(value):
    """One spelling per value: "1" from a command line and 1.0 from a config file are one value."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def defaults(script, cache={}):
    """The script's hyperparameters as it defines them: runs recorded before a hyperparameter
    existed are read as having its default."""
    if script not in cache:
        path = ROOT / f"{script}.py"
        cache[script] = hyperparameters(runpy.run_path(str(path), run_name=script))
    return cache[script]


def protocol_of(script, config_path):
    """The script's hyperparameters with a config file's applied: what a protocol sets."""
    scope = {}
    exec(Path(config_path).read_text(), {}, scope)
    return {**defaults(script), **hyperparameters(scope)}


def paper_mnist_protocol():
    return protocol_of("mnist", PAPER_MNIST)


def run_summary(run_dir):
    """What the table needs of one run, read through rundir: its hyperparameters (the script's
    defaults filled in), its metrics, whether it finished, its hours, devices and code."""
    record = read_record(run_dir)
    hp = {**defaults(record["script"]), **record["hparams"]}
    metrics = read_metrics(run_dir)
    records = [record] + read_resumes(run_dir)  # one per start or resume
    return dict(dir=run_dir, script=record["script"], hparams=hp, metrics=metrics,
                finished=is_finished(hp, metrics),
                hours=sum(m["seconds"] for m in metrics) / 3600,
                # a run resumed elsewhere: its epochs' devices are not recorded one by one
                devices=" + ".join(sorted({r.get("device") or "?" for r in records})),
                commits=sorted({(r.get("git_commit") or "no git")[:10]
                                + (" (dirty)" if r.get("git_dirty") else "") for r in records}))


def variant(hp):
    """The Table 2 row these hyperparameters make (a hparams.json record or the hyperparameters
    themselves): the one name of a run's variant, in tables, plots and exports."""
    hp = hp["hparams"] if isinstance(hp.get("hparams"), dict) else hp
    if hp.get("network") == "binarynet":  # its weights and dropout are settings (§13.5)
        return "BinaryNet"
    hidden, inputs = hp.get("dropout_hidden", 0), hp.get("dropout_in", 0)
    dropout = f"{hidden:.0%} Dropout" if hidden else ""
    if inputs:
        dropout = f"{dropout} (inputs {inputs:.0%})" if hidden else f"{inputs:.0%} input Dropout"
    if not hp.get("binary", True):
        return dropout or "No regularizer"
    bc = "BinaryConnect (stoch.)" if hp.get("stochastic", True) else "BinaryConnect (det.)"
    return bc + (f" + {dropout}" if dropout else "")


def protocol_and_settings(script, hp):
    """Which protocol the run follows (for MNIST: the lasagne script's or the paper's, §9;
    BinaryNet's, §13) and the hyperparameters in which it departs from it, e.g. a reduced
    num_epochs."""
    def departures(base, named=VARIANT_KEYS):
        return {k: v for k, v in hp.items() if k not in NOT_IN_ROW | named
                and normal(v) != normal(base.get(k))}
    if hp.get("network") == "binarynet":  # BinaryNet's script: config/<dataset>_binarynet.py
        return "BinaryNet", departures(protocol_of(script, ROOT / "config" /
                                                   f"{script}_binarynet.py"), named=set())
    lasagne = departures(defaults(script))
    if script == "mnist":
        paper = departures(paper_mnist_protocol())
        if len(paper) < len(lasagne):
            return "paper §9", paper
    return "lasagne", lasagne


def once_per_seed(members):
    """One run per seed in a row: a second directory with the same seed of the same row (a copy,
    or the run done twice) is no second sample, and counting it would shrink the std. The first
    found (in the order of the arguments) is kept; the others are named under the table."""
    kept, copies = {}, []
    for run in members:
        seed = normal(run["hparams"]["seed"])
        if seed in kept:
            copies.append((kept[seed], run))
        else:
            kept[seed] = run
    return list(kept.values()), copies


def group(runs):
    """Rows: runs with the same script and hyperparameters but for NOT_IN_ROW, a seed once."""
    rows = {}
    for run in runs:
        hp = run["hparams"]
        key = (run["script"], tuple(sorted((k, repr(normal(v))) for k, v in hp.items()
                                           if k not in NOT_IN_ROW)))
        rows.setdefault(key, []).append(run)
    table = []
    for (script, _), members in rows.items():
        members, copies = once_per_seed(members)
        hp = members[0]["hparams"]
        protocol, settings = protocol_and_settings(script, hp)
        errors = [r["metrics"][-1]["test_err"] for r in members]
        name = variant(hp)
        table.append(dict(
            dataset=script, protocol=protocol, variant=name,
            settings=", ".join(f"{k}={v}" for k, v in settings.items()),
            mean=statistics.mean(errors),
            std=statistics.stdev(errors) if len(errors) > 1 else None,
            n=len(errors), seeds=sorted(r["hparams"]["seed"] for r in members),
            paper=PAPER.get((script, name), "—"),
            # the paper's MNIST numbers came from its own protocol, not from the lasagne script
            paper_note=script == "mnist" and protocol == "lasagne" and (script, name) in PAPER,
            hours=sum(r["hours"] for r in members), run_hours=[r["hours"] for r in members],
            monitor_step=hp.get("monitor_step", 1),
            devices=[r["devices"] for r in members], copies=copies,
            commits=sorted({c for r in members for c in r["commits"]})))
    order = list(DATASETS)
    table.sort(key=lambda r: (order.index(r["dataset"]) if r["dataset"] in order else 9,
                              r["protocol"] != "paper §9",
                              VARIANTS.index(r["variant"]) if r["variant"] in VARIANTS else 9,
                              r["variant"], r["settings"]))
    return table


def read_runs(paths):
    """The runs at or below `paths` (runfiles.find_runs), each read once; an unreadable one is
    left out and named in the notes."""
    runs, notes = [], []
    for run_dir in find_runs(*paths):
        try:
            runs.append(run_summary(run_dir))
        except (RunError, OSError, ValueError, KeyError) as e:
            why = str(e) if isinstance(e, RunError) else f"{type(e).__name__}: {e}"
            notes.append(f"Skipped {run_dir}: unreadable ({why}).")
    return runs, notes


def error_text(row):
    if row["std"] is None:
        return f"{row['mean']:.2f}"
    return f"{row['mean']:.2f} ± {row['std']:.2f}"


def paper(row):
    return row["paper"] + (" †" if row["paper_note"] else "")


def notes_for(rows, unfinished, notes):
    lines = []
    if rows:
        by_device = {}
        for row in rows:
            for devices, hours in zip(row["devices"], row["run_hours"]):
                by_device[devices] = by_device.get(devices, 0) + hours
        lines.append(f"Training time (the epochs' seconds, summed): {sum(by_device.values()):.3f} "
                     "h in all (" + "; ".join(f"{h:.3f} h on {d}" for d, h in
                                              sorted(by_device.items())) + ").")
        lines.append("Code: " + ", ".join(sorted({c for r in rows for c in r["commits"]})) + ".")
    if any(row["monitor_step"] > 1 for row in rows):
        lines.append("metrics.jsonl has a line only for the evaluated epochs (monitor_step > 1), "
                     "so the time of the others is missing from these hours.")
    for row in rows:
        for kept, copy in row["copies"]:
            errors = [r["metrics"][-1]["test_err"] for r in (kept, copy)]
            lines.append(f"Counted once: seed {kept['hparams']['seed']} of "
                         f"{DATASETS.get(row['dataset'], row['dataset'])} {row['variant']} is in "
                         f"{kept['dir']} and in {copy['dir']}, which is left out"
                         + (f" (its test error differs: {errors[1]} against {errors[0]})"
                            if errors[0] != errors[1] else "") + ".")
    if any(row["paper_note"] for row in rows):
        lines.append("†: Table 2's MNIST numbers come from the paper's own protocol "
                     "(config/mnist_paper_*.py, §9); for its mnist.py with stoch. BC the "
                     "lasagne branch's README gives ~1.15 %.")
    lines.append("Test error (%) at the best-validation epoch; mean ± sample std (n - 1) over "
                 "seeds. Paper: Table 2 (C: corroborated; R: recalled, not checked against the "
                 "PDF)" + ("; BinaryNet: its Train-time README." if any(
                     row["variant"] == "BinaryNet" for row in rows) else "."))
    for run in unfinished:
        done = run["metrics"][-1]["epoch"] if run["metrics"] else 0
        lines.append(f"Unfinished (not averaged): {run['dir']} (epoch {done} of "
                     f"{run['hparams']['num_epochs']}, {variant(run['hparams'])})")
    return lines + notes


def markdown(rows, lines):
    out = ["| dataset | protocol | method | settings | test error % | n | seeds | paper % "
           "| hours |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {DATASETS.get(r['dataset'], r['dataset'])} | {r['protocol']} | "
                   f"{r['variant']} | {r['settings'] or '—'} | {error_text(r)} | {r['n']} | "
                   f"{','.join(map(str, r['seeds']))} | {paper(r)} | {r['hours']:.3f} |")
    return "\n".join(out + [""] + lines) + "\n"


def latex(rows, lines):
    def tex(s):
        return s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%") \
            .replace("&", "\\&").replace("#", "\\#").replace("±", "$\\pm$") \
            .replace("†", "$^\\dagger$")
    out = ["\\begin{tabular}{lllllrl}", "\\hline",
           "Dataset & Protocol & Method & Settings & Test error (\\%) & $n$ & Paper (\\%) \\\\",
           "\\hline"]
    for r in rows:
        cells = [DATASETS.get(r["dataset"], r["dataset"]), r["protocol"], r["variant"],
                 r["settings"] or "---", error_text(r), str(r["n"]),
                 paper(r)]
        out.append(" & ".join(tex(c) for c in cells) + " \\\\")
    out += ["\\hline", "\\end{tabular}"]
    return "\n".join(out + ["% " + line for line in lines]) + "\n"


def csv_text(rows, lines):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "protocol", "method", "settings", "mean", "std", "n", "seeds",
                     "paper", "hours", "devices", "commits"])
    for r in rows:
        writer.writerow([r["dataset"], r["protocol"], r["variant"], r["settings"], repr(r["mean"]),
                         "" if r["std"] is None else repr(r["std"]), r["n"],
                         " ".join(map(str, r["seeds"])), r["paper"], repr(r["hours"]),
                         "; ".join(sorted(set(r["devices"]))), "; ".join(r["commits"])])
    for line in lines:  # stdout stays a plain CSV; the notes go to stderr
        print(line, file=sys.stderr)
    return buffer.getvalue()


def lease_record(run_dir):
    """lease.json, which tools/lease.py writes beside a run it sends back ({} for other runs)."""
    try:
        return json.loads((Path(run_dir) / "lease.json").read_text())
    except (OSError, ValueError):
        return {}


def ledger(runs):
    """One line per run: what was run and how it ended (finished with its test error, or cut
    short, or failed, at the epoch it reached)."""
    out = ["| run | what was run | seed | status | test error % (at best val.) | card | torch "
           "| commit | epochs' time |", "|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: str(r["dir"])):
        hp, lease = run["hparams"], lease_record(run["dir"])
        protocol, settings = protocol_and_settings(run["script"], hp)
        what = (f"{run['script']}.py, {protocol}, {variant(hp)}"
                + "".join(f", {k}={v}" for k, v in settings.items())
                + (f"; data: {lease['data']}" if lease.get("data") else ""))
        done = run["metrics"][-1]["epoch"] if run["metrics"] else 0
        status = lease.get("status") or ("finished" if run["finished"] else "unfinished")
        if run["finished"]:
            status, error = "finished", (f"{run['metrics'][-1]['test_err']:.2f} (epoch "
                                         f"{run['metrics'][-1]['best_epoch']})")
        else:  # never a result: where it stopped
            status, error = f"{status} at epoch {done} of {hp['num_epochs']}", "—"
        versions = lease.get("torch") or "?"
        out.append(f"| {run['dir']} | {what} | {hp['seed']} | {status} | {error} | "
                   f"{lease.get('card') or run['devices']} | {versions} | "
                   f"{lease.get('commit') or ', '.join(run['commits'])} | "
                   f"{run['hours'] * 60:.1f} min |")
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories, or folders above them (sweep directories)")
    parser.add_argument("--format", choices=["markdown", "csv", "latex"], default="markdown")
    parser.add_argument("--ledger", action="store_true",
                        help="every run, one a line (what was run, how it ended), then the table")
    args = parser.parse_args(argv)
    try:
        runs, notes = read_runs(args.run_dirs)
        if not runs:
            print("\n".join(notes), file=sys.stderr)
            raise RunError("no readable run directories under " + " ".join(args.run_dirs))
        if args.ledger:  # a CPU rehearsal of the lease plan (lease.py run --smoke) is no result
            rehearsals = [r for r in runs if lease_record(r["dir"]).get("smoke")]
            runs = [r for r in runs if r not in rehearsals]
            notes += [f"Left out: {r['dir']}, a CPU rehearsal (tools/lease.py run --smoke)."
                      for r in rehearsals]
    except UserError as e:
        return print_error(e)
    done = [r for r in runs if r["finished"]]
    rows = group(done)
    lines = notes_for(rows, [r for r in runs if not r["finished"]], notes)
    if args.ledger:
        print(ledger(runs) + "\n" + markdown(rows, lines), end="")
        return
    print({"markdown": markdown, "csv": csv_text, "latex": latex}[args.format](rows, lines),
          end="")


if __name__ == "__main__":
    sys.exit(main())
