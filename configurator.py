"""nanoGPT's configurator, with type checks: `python mnist.py [config.py ...] [--key=value ...]`.

The hyperparameters are the plain assignments at the top of a script (ints, floats, bools, strs).
A config file is a Python file of such assignments, applied first; `--key=value` overrides are
then parsed to the type of the default. Mistakes stop the run with a message naming the key.
"""
import ast
import json
import sys
from pathlib import Path

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(SystemExit):
    def __init__(self, message):
        super().__init__("error: " + message)


def hyperparameters(globals_dict):
    """The script's hyperparameters: every public global of a plain type, in definition order."""
    return {k: v for k, v in globals_dict.items()
            if not k.startswith("_") and type(v) in (int, float, bool, str)}


def parse_value(key, text, default):
    kind = type(default)
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
    elif kind is str:
        return text
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if kind is float and type(value) in (int, float):
            return float(value)
        if kind is int and type(value) is int:
            return value
    raise ConfigError(f"--{key}={text}: {key} takes a {kind.__name__} "
                      f"(its default is {default!r})")


def _check_key(key, config, source):
    if key not in config:
        raise ConfigError(f"unknown hyperparameter {key!r} in {source}; valid names: "
                          + ", ".join(config))


# What may differ when a run is resumed: where things are, not what is computed.
RESUME_MAY_CHANGE = ("resume", "out_dir", "device", "data_dir", "SVHN_LOCAL_PATH")


def _resume(config, explicit):
    """--resume=RUN_DIR continues that run with ITS hyperparameters (hparams.json); an explicit
    setting that contradicts them would silently change the experiment, so it is refused."""
    run_dir = Path(config["resume"])
    if not (run_dir / "last.pt").exists():
        raise ConfigError(f"--resume={run_dir}: no checkpoint {run_dir / 'last.pt'} to resume")
    path = run_dir / "hparams.json"
    try:
        stored = json.loads(path.read_text())["hparams"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--resume={config['resume']}: cannot read {path} ({e})") from None
    conflicts = [f"{k}={explicit[k]!r} (the run has {stored[k]!r})" for k in explicit
                 if k in stored and k not in RESUME_MAY_CHANGE and explicit[k] != stored[k]]
    if conflicts:
        raise ConfigError("a resumed run keeps its hyperparameters; drop " + ", ".join(conflicts)
                          + ", or start a new run without --resume")
    for key, value in stored.items():
        if key in config and key not in explicit:
            config[key] = value
    # A run directory may have been moved, but a resumed run writes where it is resumed from.
    if "out_dir" in explicit and Path(explicit["out_dir"]).resolve() != run_dir.resolve():
        raise ConfigError(f"--out_dir={explicit['out_dir']} and --resume={run_dir} name different "
                          "directories; a resumed run continues in its own directory")
    config["out_dir"] = str(run_dir)


def configure(globals_dict, argv=None):
    """Apply config files and --key=value overrides from argv (sys.argv[1:]) to the script's
    globals; returns the dict of hyperparameters after overrides. With --resume=RUN_DIR the
    run's stored hyperparameters replace the script's defaults."""
    config = hyperparameters(globals_dict)
    argv = sys.argv[1:] if argv is None else argv
    explicit = {}
    for arg in argv:
        if not arg.startswith("--"):
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise ConfigError(f"cannot read config file {arg}: {e.strerror}") from None
            scope = {}
            exec(compile(source, arg, "exec"), {}, scope)
            for key, value in hyperparameters(scope).items():
                _check_key(key, config, arg)
                default = config[key]
                if type(value) is not type(default) and not (
                        type(default) is float and type(value) is int):
                    raise ConfigError(f"{arg}: {key} = {value!r}: {key} takes a "
                                      f"{type(default).__name__} (its default is {default!r})")
                config[key] = explicit[key] = type(default)(value)
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"{arg}: write overrides as --{key}=value")
            _check_key(key, config, "the command line")
            config[key] = explicit[key] = parse_value(key, text, config[key])
    if config.get("resume"):
        _resume(config, explicit)
    globals_dict.update(config)
    return config
