"""--help for every script, and bad hyperparameter values stopped before anything is written or
loaded: one line on stderr naming the key, the value and what is accepted, exit status 2."""
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

import configurator

SCRIPTS = ["mnist.py", "cifar10.py", "svhn.py", "svhn_preprocessing.py"]


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT,
                          capture_output=True, text=True)


def defaults(script):
    """The script's hyperparameters, as configure() sees them (its __main__ block not run)."""
    return configurator.hyperparameters(runpy.run_path(str(ROOT / script), run_name="defaults"))


def source_comments(script):
    """{name: trailing comment} of the top-level assignments, and the section comment lines."""
    comments, headings = {}, []
    for line in (ROOT / script).read_text().splitlines():
        if m := re.fullmatch(r"(\w+) = .*?(?:  # (.*))?", line):
            comments.setdefault(m[1], m[2] or "")
        elif line.startswith("# "):
            headings.append(line[2:])
    return comments, headings


# --help ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_hyperparameter_with_default_and_comment(script, flag):
    proc = run(script, "--num_units=not-checked", flag)  # help wins wherever it is
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout
    doc = runpy.run_path(str(ROOT / script), run_name="defaults")["__doc__"]
    assert out.startswith(doc.strip().splitlines()[0])
    assert "config files" in out.lower() and "--key=value" in out
    assert ("--resume=RUN_DIR" in out) == (script != "svhn_preprocessing.py")
    flat = " ".join(out.split())  # comments may be wrapped onto several lines
    comments, headings = source_comments(script)
    hparams = defaults(script)
    assert hparams
    for name, value in hparams.items():
        assert re.search(rf"^  {name} +{re.escape(repr(value))}( |$)", out, re.M), name
        assert comments[name] in flat, name
    for heading in headings:
        assert f"\n{heading}\n" in out, heading
    assert max(len(line) for line in out.splitlines()) <= 100


def test_help_reads_comments_and_headings_from_the_source(tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text('"""Trains nothing."""\nimport os\n\n# Group one\n# continues here\n'
                      'a = 1  # the first\nb = (2,\n     3)\nc = "x"\n\n# Group two\n'
                      'd = 4.  # ' + "a long comment " * 12 + '\n\n# not a heading\ndef f():\n'
                      '    e = 5  # inside a function\n')
    g = runpy.run_path(str(script), run_name="tiny")
    text = configurator.help_text(g)
    assert text.startswith("Trains nothing.\n")
    assert "\nGroup one continues here\n  a  1    the first\n  c  'x'\n\nGroup two\n" in text
    assert "not a heading" not in text and "inside a function" not in text
    wrapped = text[text.index("  d  4.0"):].splitlines()
    assert len(wrapped) > 1 and all(len(line) <= 99 for line in wrapped)
    assert all(line.startswith(" " * 10 + "a long") for line in wrapped[1:])


# Bad values --------------------------------------------------------------------------------------

BAD = [  # (script, argument, what the message must say)
    ("mnist.py", "--W_LR_scale=abc", 'W_LR_scale takes "Glorot" or a number > 0'),
    ("mnist.py", "--W_LR_scale=0", 'W_LR_scale takes "Glorot" or a number > 0'),
    ("mnist.py", "--num_units=0", "num_units must be a positive int (>= 1)"),
    ("mnist.py", "--num_units=-5", "num_units must be a positive int (>= 1)"),
    ("mnist.py", "--num_units=many", "num_units takes an int"),
    ("mnist.py", "--batch_size=0", "batch_size must be a positive int"),
    ("mnist.py", "--num_epochs=0", "num_epochs must be a positive int"),
    ("mnist.py", "--monitor_step=0", "monitor_step must be a positive int"),
    ("mnist.py", "--train_set_size=0", "train_set_size must be a positive int"),
    ("mnist.py", "--n_hidden_layers=-1", "n_hidden_layers must be an int >= 0"),
    ("mnist.py", "--seed=-1", "seed must be an int from 0 to 2**32 - 1"),
    ("mnist.py", "--seed=4294967296", "seed must be an int from 0 to 2**32 - 1"),
    ("mnist.py", "--dropout_in=1.5", "dropout_in must be in [0, 1)"),
    ("mnist.py", "--dropout_hidden=1", "dropout_hidden must be in [0, 1)"),
    ("mnist.py", "--H=-1", 'H takes "Glorot" or a number > 0'),
    ("mnist.py", "--H=glorot", 'H takes "Glorot" or a number > 0'),
    ("mnist.py", "--alpha=2", "alpha must be in (0, 1]"),
    ("mnist.py", "--alpha=0", "alpha must be in (0, 1]"),
    ("mnist.py", "--epsilon=0", "epsilon must be a number > 0"),
    ("mnist.py", "--LR_start=0", "LR_start must be a number > 0"),
    ("mnist.py", "--LR_fin=-1e-6", "LR_fin must be a number > 0"),
    ("mnist.py", "--init_range=0", "init_range must be a number > 0"),
    ("mnist.py", "--optimizer=adamw", "optimizer must be adam or sgd"),
    ("mnist.py", "--bn_form=variance", "bn_form must be std or var"),
    ("mnist.py", "--bn_stats=running", "bn_stats must be ema or recompute"),
    ("mnist.py", "--loss_reduction=sum", "loss_reduction must be mean or sum_classes"),
    ("mnist.py", "--precision=fp16", "precision must be fp32, tf32 or bf16"),
    ("mnist.py", "--compile=maybe", "compile takes auto, true or false"),
    ("mnist.py", "--device=tpu", "device takes auto, cpu, cuda, cuda:N or mps"),
    ("mnist.py", "--device=cuda:99", "CUDA"),
    pytest.param("mnist.py", "--device=mps", "MPS is not available",
                 marks=pytest.mark.skipif(sys.platform == "darwin", reason="MPS may be here")),
    ("cifar10.py", "--alpha=2", "alpha must be in (0, 1]"),
    ("cifar10.py", "--H=-1", 'H takes "Glorot" or a number > 0'),
    ("cifar10.py", "--train_set_size=0", "train_set_size must be a positive int"),
    ("svhn.py", "--W_LR_scale=abc", 'W_LR_scale takes "Glorot" or a number > 0'),
    ("svhn.py", "--seed=-1", "seed must be an int from 0 to 2**32 - 1"),
    ("svhn.py", "--batch_size=0", "batch_size must be a positive int"),
    ("svhn_preprocessing.py", "--lcn_channels=0,0", "lcn_channels takes distinct channels"),
    ("svhn_preprocessing.py", "--lcn_channels=3", "lcn_channels takes distinct channels"),
    ("svhn_preprocessing.py", "--chunk_size=0", "chunk_size must be a positive int"),
    ("svhn_preprocessing.py", "--n_valid_train=0", "n_valid_train must be a positive int"),
    ("svhn_preprocessing.py", "--n_valid_extra=-1", "n_valid_extra must be an int >= 0"),
    ("svhn_preprocessing.py", "--seed=-1", "seed must be an int from 0 to 2**32 - 1"),
]


def check_refused(tmp_path, script, args, *words):
    """The script stops with status 2 and one line naming the mistake, having written nothing."""
    written = tmp_path / "run"
    where = ([f"--SVHN_LOCAL_PATH={written}", f"--data_dir={tmp_path / 'data'}"]
             if script == "svhn_preprocessing.py" else
             [f"--out_dir={written}", f"--data_dir={tmp_path / 'data'}"] if script != "svhn.py"
             else [f"--out_dir={written}", f"--SVHN_LOCAL_PATH={tmp_path / 'data'}"])
    proc = run(script, *where, *args)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)
    assert not written.exists() and not (tmp_path / "data").exists()
    return proc.stderr


@pytest.mark.parametrize("script, arg, says", BAD)
def test_bad_value_is_refused_before_anything_runs(tmp_path, script, arg, says):
    stderr = check_refused(tmp_path, script, [arg], says)
    assert stderr.startswith(f"error: {arg}: "), stderr  # the key and the value as typed


def test_bad_value_in_a_config_file_names_the_file(tmp_path):
    config = tmp_path / "my.py"
    config.write_text("num_units = 8\nalpha = 2\n")
    stderr = check_refused(tmp_path, "mnist.py", [str(config)])
    assert stderr == f"error: {config}: alpha = 2.0: alpha must be in (0, 1]\n"


def test_a_later_override_fixes_a_config_value(tmp_path):
    config = tmp_path / "my.py"
    config.write_text("alpha = 2\n")
    g = runpy.run_path(str(ROOT / "mnist.py"), run_name="x")
    assert configurator.configure(g, [str(config), "--alpha=0.5"])["alpha"] == 0.5


def test_config_syntax_error_names_file_and_line(tmp_path):
    config = tmp_path / "my_config.py"
    config.write_text("num_units = 8\nalpha = 0.1\nnum_epochs = = 3\n")
    stderr = check_refused(tmp_path, "mnist.py", [str(config)])
    assert stderr.startswith(f"error: {config}, line 3: invalid syntax"), stderr
    assert "num_epochs = = 3" in stderr


def test_config_that_raises_names_file_line_and_exception(tmp_path):
    config = tmp_path / "raises.py"
    config.write_text("num_units = 8\nnum_epochs = undefined_name\n")
    stderr = check_refused(tmp_path, "cifar10.py", [str(config)])
    assert stderr.startswith(f"error: {config}, line 2: NameError: "), stderr
    assert "undefined_name" in stderr


def test_bad_type_message_reads_as_english(tmp_path):
    config = tmp_path / "typed.py"
    config.write_text("num_units = 'many'\n")
    stderr = check_refused(tmp_path, "mnist.py", [str(config)])
    assert "num_units takes an int (its default is 2048)" in stderr


def test_configure_prints_the_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as excinfo:
        configurator.configure(dict(alpha=.1), ["--alpha=3"])
    assert excinfo.value.code == 2
    assert capsys.readouterr().err == "error: --alpha=3: alpha must be in (0, 1]\n"


# Values that must be accepted ------------------------------------------------------------------

def mnist_config(argv):
    return configurator.configure(runpy.run_path(str(ROOT / "mnist.py"), run_name="x"), argv)


def test_H_takes_Glorot_from_the_command_line_and_config_files(tmp_path):
    assert mnist_config(["--H=Glorot"])["H"] == "Glorot"
    config = tmp_path / "glorot.py"
    config.write_text('H = "Glorot"\nW_LR_scale = 2\n')
    c = mnist_config([str(config)])
    assert c["H"] == "Glorot"
    assert c["W_LR_scale"] == 2.0 and type(c["W_LR_scale"]) is float
    c = mnist_config(["--H=0.5", "--W_LR_scale=3"])
    assert (c["H"], c["W_LR_scale"]) == (0.5, 3.0) and type(c["H"]) is float


@pytest.mark.parametrize("text, value", [("AUTO", "auto"), ("True", "true"), ("1", "true"),
                                         ("yes", "true"), ("on", "true"), ("False", "false"),
                                         ("0", "false"), ("no", "false"), ("OFF", "false")])
def test_compile_spellings_are_normalised(text, value):
    assert mnist_config([f"--compile={text}"])["compile"] == value


def test_edges_are_accepted():
    c = mnist_config(["--seed=0", "--dropout_in=0", "--alpha=1", "--n_hidden_layers=0",
                      "--device=cpu", "--optimizer=sgd", "--bn_stats=recompute"])
    assert (c["seed"], c["dropout_in"], c["alpha"], c["n_hidden_layers"]) == (0, 0., 1., 0)
    assert mnist_config([f"--seed={2**32 - 1}"])["seed"] == 2**32 - 1


# Resume ----------------------------------------------------------------------------------------

def stored_run(tmp_path, **hparams):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"")
    stored = {**defaults("mnist.py"), "out_dir": str(run_dir), **hparams}
    (run_dir / "hparams.json").write_text(json.dumps({"hparams": stored}))
    return run_dir


def test_resume_compares_normalised_values(tmp_path):
    run_dir = stored_run(tmp_path, compile="true", H="Glorot")
    c = mnist_config([f"--resume={run_dir}", "--compile=1", "--H=Glorot"])
    assert (c["compile"], c["H"], c["out_dir"]) == ("true", "Glorot", str(run_dir))


def test_resume_checks_the_stored_values(tmp_path, capsys):
    run_dir = stored_run(tmp_path, alpha=5.0)
    with pytest.raises(SystemExit) as excinfo:
        mnist_config([f"--resume={run_dir}"])
    assert excinfo.value.code == 2
    assert capsys.readouterr().err == (f"error: {run_dir / 'hparams.json'}: alpha = 5.0: "
                                       "alpha must be in (0, 1]\n")


def test_resume_of_another_scripts_run_is_refused(tmp_path, capsys):
    run_dir = stored_run(tmp_path)
    record = json.loads((run_dir / "hparams.json").read_text())
    (run_dir / "hparams.json").write_text(json.dumps(dict(record, script="cifar10")))
    with pytest.raises(SystemExit) as excinfo:
        mnist_config([f"--resume={run_dir}"])
    assert excinfo.value.code == 2
    assert capsys.readouterr().err == (f"error: --resume={run_dir}: that run was made by "
                                       f"cifar10.py; continue it with: python cifar10.py "
                                       f"--resume={run_dir}\n")


def test_a_resume_may_change_compile(tmp_path):
    """A run whose fast step failed a check continues with the eager modules."""
    run_dir = stored_run(tmp_path, compile="true")
    assert mnist_config([f"--resume={run_dir}", "--compile=false"])["compile"] == "false"


def test_help_says_what_a_resume_may_change_and_how_to_train_longer():
    text = " ".join(configurator.help_text(runpy.run_path(str(ROOT / "mnist.py"),
                                                          run_name="x")).split())
    assert ("with it only device, data_dir, compile and checkpoint_every may be given (where "
            "things are, not what is computed), and out_dir only as RUN_DIR itself.") in text
    assert "so a longer run is a new run: start one with --num_epochs=N" in text


def test_a_longer_resume_is_refused_saying_why(tmp_path, capsys):
    run_dir = stored_run(tmp_path, num_epochs=3)
    with pytest.raises(SystemExit):
        mnist_config([f"--resume={run_dir}", "--num_epochs=6"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop num_epochs=6 (the run has 3)" in err
    assert "num_epochs sets the run's LR schedule" in err


def test_LR_fin_above_LR_start_is_refused(capsys):
    with pytest.raises(SystemExit) as excinfo:
        mnist_config(["--LR_fin=0.01"])
    assert excinfo.value.code == 2
    assert capsys.readouterr().err == ("error: --LR_fin=0.01: LR_fin must not be above LR_start "
                                       "(0.001): the learning rate would grow every epoch\n")
    assert mnist_config(["--LR_fin=0.001"])["LR_fin"] == 0.001  # a constant LR is fine


def test_sizes_the_official_files_cannot_hold_are_refused_before_loading(capsys):
    """mnist.py's validation set is the rest of the 60000-image training file and its test set
    has 10000 images: a size they cannot hold is refused here, not after loading (or on a Slurm
    node)."""
    assert mnist_config(["--train_set_size=59900"])["train_set_size"] == 59900  # 100 left
    for argv, says in ((["--train_set_size=59950"], "train_set_size must be at most 59900 with "
                                                    "batch_size=100"),
                       (["--batch_size=20000", "--train_set_size=40000"],
                        "batch_size must be at most 10000, the size of the test set")):
        with pytest.raises(SystemExit) as excinfo:
            mnist_config(argv)
        assert excinfo.value.code == 2
        assert says in capsys.readouterr().err


def test_help_and_errors_stay_fast_without_torch():
    """torch is imported only to ask whether a named accelerator exists."""
    code = ("import sys, runpy, configurator as c\n"
            "g = runpy.run_path('mnist.py', run_name='x')\n"
            "c.help_text(g)\n"
            "c.configure(g, ['--device=cpu', '--num_units=4'])\n"
            "assert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
