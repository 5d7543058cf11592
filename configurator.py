"""nanoGPT's configurator, with checks: `python mnist.py [config.py ...] [--key=value ...]`.

The hyperparameters are the plain assignments at the top of a script (ints, floats, bools, strs).
A config file is a Python file of such assignments, applied first; `--key=value` overrides are
then parsed to the type of the default, and every value is checked against CHECKS. A mistake stops
the script before it writes or loads anything, with one line naming the key, the value and what is
accepted, and exit status 2 (errors.py's rule for every user error). `--help` (or `-h`) prints
the script's docstring and its hyperparameters with their defaults and comments, read from its
source. select_device makes the checked device setting a torch.device, for the scripts and for the
tools that take --device.
"""
import ast
import contextlib
import inspect
import io
import re
import sys
import textwrap
import tokenize
import traceback
from pathlib import Path

import errors
from errors import UserError
from runfiles import read_record, require_checkpoint

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_bool(text):
    """True or False from their spellings (true/false, 1/0, yes/no, on/off, any case); else
    ValueError."""
    text = str(text).lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError(f"{text!r} is not a bool (true/false)")


WIDTH = 99  # --help fits a 100-column terminal


class ConfigError(UserError):
    """A mistaken setting: the message names the key, the value and what is accepted."""


def _a(kind):
    return ("an " if kind.__name__[0] in "aeiou" else "a ") + kind.__name__


def _listing(words, conjunction):
    return " ".join([", ".join(words[:-1]), conjunction, words[-1]]) if words[1:] else words[0]


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError):
        return None


# CHECKS maps a key to (check, what is accepted). A check returns the value, normalised, or raises
# ValueError; the error's text, when it has one, replaces "<key> <what is accepted>".

def _ints(low, high=None):
    def check(v):
        if type(v) is int and v >= low and (high is None or v < high):
            return v
        raise ValueError
    return check


def _floats(ok):
    def check(v):
        if type(v) in (int, float) and ok(v):
            return float(v)
        raise ValueError
    return check


def _one_of(*names):
    def check(v):
        if v in names:
            return v
        raise ValueError
    return check, "must be " + _listing(names, "or")


def _glorot_or_positive(v):
    if v == "Glorot":
        return v
    return _floats(lambda x: x > 0)(_literal(v) if type(v) is str else v)


def _auto_or_bool(v):
    text = str(v).lower()  # a bool from a config file reads as "true" / "false"
    if text == "auto":
        return text
    if text in _TRUE | _FALSE:
        return "true" if text in _TRUE else "false"
    raise ValueError


def _device(v):
    if re.fullmatch(r"auto|cpu|mps|cuda(?::\d+)?", v):
        return v
    raise ValueError


def _check_device_here(v):
    """ValueError unless this machine has the device `v` names (a checked spelling)."""
    if v in ("auto", "cpu"):
        return
    import torch  # takes a second or two: only when a device may be missing
    if v == "mps":
        if torch.backends.mps.is_available():
            return
        raise ValueError("MPS is not available on this machine (try auto or cpu)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(v.partition(":")[2] or 0) < count:
        return
    if count == 0:
        raise ValueError("CUDA is not available on this machine (try auto or cpu)")
    raise ValueError(f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def select_device(name):
    """The torch.device of a device setting, checked as configure() checks it (so the tools that
    take --device say the same); auto is CUDA when present, else the CPU."""
    import torch
    check, accepted = CHECKS["device"]
    try:
        name = check(name)
        _check_device_here(name)
    except ValueError as e:
        raise ConfigError(f"device={name!r}: {str(e) or 'device ' + accepted}") from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device):
    """The device as the report and hparams.json give it: with the GPU's name on CUDA."""
    import torch
    return str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                          else "")


def _channels(v):  # svhn_preprocessing.parse_channels' rule
    try:
        channels = [int(c) for c in v.split(",")]
    except ValueError:
        channels = [None]
    if len(set(channels)) == len(channels) and set(channels) <= {0, 1, 2}:
        return v
    raise ValueError


_POSITIVE_INT = (_ints(1), "must be a positive int (>= 1)")
_POSITIVE = (_floats(lambda x: x > 0), "must be a number > 0")
CHECKS = {
    **dict.fromkeys(["batch_size", "num_units", "num_epochs", "monitor_step", "chunk_size",
                     "train_set_size", "n_valid_train", "checkpoint_every"], _POSITIVE_INT),
    **dict.fromkeys(["n_hidden_layers", "n_valid_extra"], (_ints(0), "must be an int >= 0")),
    "seed": (_ints(0, 2**32), "must be an int from 0 to 2**32 - 1 (numpy's limit)"),
    "alpha": (_floats(lambda x: 0 < x <= 1), "must be in (0, 1]"),
    **dict.fromkeys(["epsilon", "LR_start", "LR_fin", "init_range"], _POSITIVE),
    **dict.fromkeys(["dropout_in", "dropout_hidden"],
                    (_floats(lambda x: 0 <= x < 1), "must be in [0, 1)")),
    **dict.fromkeys(["H", "W_LR_scale"], (_glorot_or_positive, 'takes "Glorot" or a number > 0')),
    "optimizer": _one_of("adam", "sgd"),
    "network": _one_of("binaryconnect", "binarynet"),
    "inputs": _one_of("binaryconnect", "binarynet"),
    "bn_form": _one_of("std", "var"),
    "bn_stats": _one_of("ema", "recompute"),
    "loss_reduction": _one_of("mean", "sum_classes"),
    "precision": _one_of("fp32", "tf32", "bf16"),
    "compile": (_auto_or_bool, "takes auto, true or false (also 1/0, yes/no, on/off)"),
    "device": (_device, "takes auto, cpu, cuda, cuda:N or mps"),
    "lcn_channels": (_channels, "takes distinct channels among 0, 1, 2 separated by commas, "
                                "e.g. 0 or 0,1,2"),
}
# Typed by their check rather than by their default: H's default is a number and W_LR_scale's the
# str "Glorot", but each takes either; compile takes bool spellings.
_LOOSE = {"H", "W_LR_scale", "compile"}


def hyperparameters(globals_dict):
    """The script's hyperparameters: every public global of a plain type, in definition order."""
    return {k: v for k, v in globals_dict.items()
            if not k.startswith("_") and type(v) in (int, float, bool, str)}


def parse_value(key, text, default):
    kind = type(default)
    if key in _LOOSE:
        return text
    if kind is bool:
        with contextlib.suppress(ValueError):
            return parse_bool(text)
    elif kind is str:
        return text
    else:
        value = _literal(text)
        if kind is float and type(value) in (int, float):
            return float(value)
        if kind is int and type(value) is int:
            return value
    raise ConfigError(f"--{key}={text}: {key} takes {_a(kind)} (its default is {default!r})")


def _check_key(key, config, source):
    if key not in config:
        raise ConfigError(f"unknown hyperparameter {key!r} in {source}; valid names: "
                          + ", ".join(config))


def _check_values(config, keys, origin):
    for key in keys:
        if key in CHECKS:
            check, accepted = CHECKS[key]
            try:
                config[key] = check(config[key])
            except ValueError as e:
                raise ConfigError(f"{origin[key]}: {str(e) or key + ' ' + accepted}") from None


def _read_config_file(path):
    """The hyperparameters a config file assigns; its mistakes are named by file and line."""
    try:
        with open(path) as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', '') or e}") \
            from None
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        text = (e.text or "").strip()
        raise ConfigError(f"{path}, line {e.lineno}: {e.msg}" + (f" ({text})" if text else "")) \
            from None
    scope = {}
    try:
        exec(code, {}, scope)
    except Exception as e:
        lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__)
                 if frame.filename == path]
        where = f", line {lines[-1]}" if lines else ""
        raise ConfigError(f"{path}{where}: {type(e).__name__}: {e}") from None
    return hyperparameters(scope)


# What may differ when a run is resumed: where things are, not what is computed.
# compile too: it changes how the step runs, and a run that has to leave its fast step (a GPU
# check that failed) can; the layers' random streams then change kind, as the resume says.
# checkpoint_every: how often it is written, not what is computed.
RESUME_MAY_CHANGE = ("resume", "out_dir", "device", "data_dir", "SVHN_LOCAL_PATH", "compile",
                     "checkpoint_every")


def resume_may_change(config):
    """The settings a resume of a run with `config` may be given, as prose ("device, data_dir,
    compile and checkpoint_every"): --help and the checkpoint's refusal say the same."""
    return _listing([k for k in RESUME_MAY_CHANGE if k in config
                     and k not in ("resume", "out_dir")], "and")


def changed(settings, stored):
    """The keys of settings that a resume of the run whose hyperparameters are `stored` may not
    change, and that differ from them: the one rule for --resume, the checkpoint's own record
    and the sweep's kept runs."""
    return [k for k in settings
            if k in stored and k not in RESUME_MAY_CHANGE and settings[k] != stored[k]]


# Why a finished run is not extended: the schedule is a function of num_epochs (§4.1).
_LONGER = ("num_epochs sets the run's LR schedule (LR_decay = (LR_fin/LR_start)**(1/num_epochs)), "
           "so a longer run is a new run: start one with --num_epochs=N (the same seed draws the "
           "same initial weights)")


def _resume(config, explicit, origin, script):
    """--resume=RUN_DIR continues that run with ITS hyperparameters (hparams.json); an explicit
    setting that contradicts them would silently change the experiment, so it is refused, and so
    is a run that another script made (its data and network are another experiment's)."""
    run_dir = Path(config["resume"])
    require_checkpoint(config["resume"])
    path = run_dir / "hparams.json"
    try:
        record = read_record(run_dir)
    except UserError as e:
        raise ConfigError(f"--resume={config['resume']}: {e}") from None
    stored = record["hparams"]
    made_by = record.get("script")
    if made_by and made_by != script:
        raise ConfigError(f"--resume={config['resume']}: that run was made by {made_by}.py; "
                          f"continue it with: python {made_by}.py --resume={config['resume']}")
    conflicts = changed(explicit, stored)
    if conflicts:
        raise ConfigError("a resumed run keeps its hyperparameters; drop " + ", ".join(
            f"{k}={explicit[k]!r} (the run has {stored[k]!r})" for k in conflicts)
            + ", or start a new run without --resume"
            + (". " + _LONGER if "num_epochs" in conflicts else ""))
    for key, value in stored.items():
        if key in config and key not in explicit:
            config[key] = value
            origin[key] = f"{path}: {key} = {value!r}"
    # A run directory may have been moved, but a resumed run writes where it is resumed from.
    if "out_dir" in explicit and Path(explicit["out_dir"]).resolve() != run_dir.resolve():
        raise ConfigError(f"--out_dir={explicit['out_dir']} and --resume={run_dir} name different "
                          "directories; a resumed run continues in its own directory")
    config["out_dir"] = str(run_dir)


def configure(globals_dict, argv=None, runs_here=True):
    """Apply config files and --key=value overrides from argv (sys.argv[1:]) to the script's
    globals; returns the dict of hyperparameters after overrides. With --resume=RUN_DIR the
    run's stored hyperparameters replace the script's defaults. --help or -h prints the help and
    exits 0; a mistake ends the script by errors.py's rule (one line, exit status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text(globals_dict))
        raise SystemExit(0)
    try:
        config = parse(globals_dict, argv, runs_here)
    except UserError as e:
        raise errors.exit(e) from None
    globals_dict.update(config)
    return config


def parse(globals_dict, argv, runs_here=True):
    """configure()'s work, without --help or the exit: the hyperparameters after argv's config
    files and overrides, or a UserError (a ConfigError; a RunError for a run that cannot be
    resumed). runs_here=False checks a command that will run on another machine (sweep.py
    --cluster=slurm on a login node): a --device it names need only be spelled right."""
    config = hyperparameters(globals_dict)
    script = Path(globals_dict.get("__file__", "the script")).name
    origin = {k: f"{script}: {k} = {v!r}" for k, v in config.items()}  # where each value came from
    explicit = {}
    for arg in argv:
        if not arg.startswith("--"):
            for key, value in _read_config_file(arg).items():
                _check_key(key, config, arg)
                default = config[key]
                if key not in _LOOSE:
                    if type(value) is not type(default) and not (
                            type(default) is float and type(value) is int):
                        raise ConfigError(f"{arg}: {key} = {value!r}: {key} takes "
                                          f"{_a(type(default))} (its default is {default!r})")
                    value = type(default)(value)
                config[key] = explicit[key] = value
                origin[key] = f"{arg}: {key} = {value!r}"
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"{arg}: write overrides as --{key}=value")
            _check_key(key, config, "the command line")
            config[key] = explicit[key] = parse_value(key, text, config[key])
            origin[key] = arg
    # Checked before resuming too, so that a resume compares normalised values with the stored ones.
    _check_values(config, explicit, origin)
    explicit = {k: config[k] for k in explicit}
    if config.get("resume"):
        _resume(config, explicit, origin, Path(script).stem)
    _check_values(config, config, origin)
    if runs_here and "device" in config:
        try:
            _check_device_here(config["device"])
        except ValueError as e:
            raise ConfigError(f"{origin['device']}: {e}") from None
    if config.get("LR_fin", 0) > config.get("LR_start", float("inf")):
        raise ConfigError(f"{origin['LR_fin']}: LR_fin must not be above LR_start "
                          f"({config['LR_start']}): the learning rate would grow every epoch")
    _check_sizes(config, origin, Path(script).stem)
    if config.get("network") == "binarynet":  # BinaryNet's BN is Lasagne's (§13.4), not §3's
        for key, default in (("bn_form", "std"), ("bn_stats", "ema")):
            if config.get(key, default) != default:
                raise ConfigError(f"{origin[key]}: {key} is an option of BinaryConnect's batch "
                                  f"norm; network=binarynet uses Lasagne's (give {key}={default})")
    return config


# The official files' sizes (training, test): a batch_size or train_set_size they cannot hold
# is refused here, before anything is loaded. Smaller files (subsets) are checked once loaded.
OFFICIAL_SIZES = {"mnist": (60000, 10000), "cifar10": (50000, 10000)}


def _check_sizes(config, origin, script):
    """Every split needs a full batch (§5 drops partial ones)."""
    batch_size, n = config.get("batch_size"), config.get("train_set_size")
    if batch_size is None or n is None:
        return
    if batch_size > n:
        raise ConfigError(f"{origin['batch_size']}: batch_size must not be above train_set_size "
                          f"({n}): the training set would have no full batch")
    if script not in OFFICIAL_SIZES:
        return
    train_file, test_file = OFFICIAL_SIZES[script]
    if train_file - n < batch_size:
        raise ConfigError(f"{origin['train_set_size']}: the validation set is the rest of the "
                          f"{train_file}-image training file, so train_set_size must be at most "
                          f"{train_file - batch_size} with batch_size={batch_size}")
    if batch_size > test_file:
        raise ConfigError(f"{origin['batch_size']}: batch_size must be at most {test_file}, the "
                          f"size of the test set")


def _source_comments(path, names):
    """From the script's source: the trailing comment of each top-level assignment to one of
    `names`, and the column-0 comment lines between it and the statement before (its heading)."""
    try:
        with tokenize.open(path) as f:
            source = f.read()
        body = ast.parse(source).body
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, SyntaxError, tokenize.TokenError):
        return {}, {}
    trailing, whole = {}, {}  # line number -> comment text
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.line[:tok.start[1]].strip():
                trailing[tok.start[0]] = text
            elif tok.start[1] == 0:
                whole[tok.start[0]] = text
    comments, headings, end = {}, {}, 0
    for stmt in body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else ()
        assigned = [t.id for t in targets if isinstance(t, ast.Name) and t.id in names]
        above = [whole[n] for n in range(end + 1, stmt.lineno) if n in whole]
        for name in assigned:
            comments.setdefault(name, " ".join(
                trailing[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in trailing))
        if assigned and above:
            headings.setdefault(assigned[0], " ".join(above))
        end = stmt.end_lineno
    return comments, headings


def help_text(globals_dict):
    """What the script does (its docstring), how to set its hyperparameters, and each one with
    its default and the comment beside it in the script, under the script's section comments."""
    config = hyperparameters(globals_dict)
    path = globals_dict.get("__file__")
    comments, headings = _source_comments(path, config) if path else ({}, {})
    script = Path(path).name if path else "script.py"

    def fill(text):
        return textwrap.fill(text, WIDTH, break_long_words=False, break_on_hyphens=False)

    resume = "resume" in config
    how = ("Config files (Python files of assignments like those below) are applied first, in "
           "the order given, then the --key=value overrides. A value takes the type of its "
           "default: a bool is true/false, 1/0, yes/no or on/off; a str is the text as written"
           + ('; H and W_LR_scale take "Glorot" or a number' if "H" in config else "") + ".")
    if resume:
        how += (" --resume=RUN_DIR continues the run in RUN_DIR with the hyperparameters stored "
                f"in its hparams.json; with it only {resume_may_change(config)} may be given "
                "(where things are, not what is computed)"
                + (", and out_dir only as RUN_DIR itself" if "out_dir" in config else "")
                + (". " + _LONGER if "num_epochs" in config else "") + ".")
    parts = [inspect.cleandoc(globals_dict.get("__doc__") or ""),
             f"usage: python {script} [config.py ...] [--key=value ...]"
             + (" [--resume=RUN_DIR]" if resume else "") + " [--help]",
             fill(how), "Hyperparameters (name, default, what it is):"]

    values = {k: repr(v) for k, v in config.items()}
    name_w = max(map(len, values), default=0) + 2
    value_w = min(max(map(len, values.values()), default=0), 14) + 2  # longer: comment below
    indent = 2 + name_w + value_w
    lines = []
    for key, value in values.items():
        if key in headings:
            lines += ["", fill(headings[key])]
        head = f"  {key:<{name_w}}{value:<{value_w}}"
        comment = textwrap.wrap(comments.get(key, ""), WIDTH - indent, break_long_words=False,
                                break_on_hyphens=False) or [""]
        if len(head) > indent:  # a long default: its comment starts on the next line
            lines.append(head.rstrip())
            head = " " * indent
        lines.append((head + comment[0]).rstrip())
        lines += [" " * indent + c for c in comment[1:]]
    return "\n\n".join(p for p in parts if p) + "\n" + "\n".join(lines)
