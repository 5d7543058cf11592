"""configurator.configure: typed --key=value overrides, config files, errors naming the key."""

import pytest


import configurator


def script_globals():
    """Like the top of mnist.py: plain hyperparameters, plus things that are not ones."""
    return dict(batch_size=100, alpha=.15, LR_start=.001, binary=True, stochastic=True,
                W_LR_scale="Glorot", data_dir="data/mnist", out_dir="",
                _private=3, configurator=configurator, helper=len, shape=(1, 2))


def message(excinfo, capsys):
    """The one line configure() prints to stderr; the exit status is 2."""
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_no_arguments_keeps_defaults():
    g = script_globals()
    config = configurator.configure(g, [])
    assert config == dict(batch_size=100, alpha=.15, LR_start=.001, binary=True,
                          stochastic=True, W_LR_scale="Glorot", data_dir="data/mnist",
                          out_dir="")
    assert list(config) == ["batch_size", "alpha", "LR_start", "binary", "stochastic",
                            "W_LR_scale", "data_dir", "out_dir"]  # definition order


def test_typed_overrides_update_the_globals():
    g = script_globals()
    config = configurator.configure(g, ["--batch_size=50", "--alpha=0.2", "--LR_start=3e-3",
                                        "--binary=False", "--stochastic=false",
                                        "--data_dir=/tmp/x=y", "--out_dir="])
    expected = dict(batch_size=50, alpha=0.2, LR_start=0.003, binary=False, stochastic=False,
                    data_dir="/tmp/x=y", out_dir="")
    for key, value in expected.items():
        assert g[key] == value and type(g[key]) is type(value), key
        assert config[key] == value and type(config[key]) is type(value), key
    assert g["W_LR_scale"] == "Glorot" and g["_private"] == 3


@pytest.mark.parametrize("text,value", [("True", True), ("true", True), ("1", True),
                                        ("False", False), ("false", False), ("0", False)])
def test_bool_spellings(text, value):
    g = script_globals()
    configurator.configure(g, [f"--binary={text}"])
    assert g["binary"] is value


def test_int_accepted_for_a_float_key():
    g = script_globals()
    configurator.configure(g, ["--alpha=1"])
    assert g["alpha"] == 1.0 and type(g["alpha"]) is float


def test_str_key_takes_the_text_verbatim():
    g = script_globals()
    configurator.configure(g, ["--data_dir= a b,c "])
    assert g["data_dir"] == " a b,c "


def test_W_LR_scale_takes_Glorot_or_a_number():
    g = script_globals()
    configurator.configure(g, ["--W_LR_scale=1.5"])
    assert g["W_LR_scale"] == 1.5 and type(g["W_LR_scale"]) is float
    configurator.configure(g, ["--W_LR_scale=Glorot"])
    assert g["W_LR_scale"] == "Glorot"


def test_unknown_key_names_it_and_lists_valid_names(capsys):
    g = script_globals()
    with pytest.raises(SystemExit) as excinfo:
        configurator.configure(g, ["--batchsize=50"])
    text = message(excinfo, capsys)
    assert "batchsize" in text
    for name in ("batch_size", "alpha", "LR_start", "binary", "stochastic", "W_LR_scale",
                 "data_dir", "out_dir"):
        assert name in text
    assert "_private" not in text and "configurator" not in text
    assert g["batch_size"] == 100


@pytest.mark.parametrize("arg,key,kind", [
    ("--batch_size=abc", "batch_size", "int"),
    ("--batch_size=1.5", "batch_size", "int"),
    ("--batch_size=True", "batch_size", "int"),
    ("--alpha=abc", "alpha", "float"),
    ("--alpha=", "alpha", "float"),
    ("--LR_start=[1]", "LR_start", "float"),
    ("--binary=maybe", "binary", "bool"),
    ("--binary=2", "binary", "bool"),
])
def test_bad_value_names_the_key_and_the_type(arg, key, kind, capsys):
    g = script_globals()
    with pytest.raises(SystemExit) as excinfo:
        configurator.configure(g, [arg])
    text = message(excinfo, capsys)
    assert key in text and kind in text
    assert excinfo.value.code != 0


def test_override_without_value_is_an_error_naming_the_key(capsys):
    with pytest.raises(SystemExit) as excinfo:
        configurator.configure(script_globals(), ["--batch_size"])
    assert "batch_size" in message(excinfo, capsys)


def test_config_file_applied_before_overrides(tmp_path):
    cfg = tmp_path / "small.py"
    cfg.write_text("batch_size = 20\nalpha = 1\nbinary = False\n_scratch = 5\n")
    g = script_globals()
    config = configurator.configure(g, [str(cfg), "--batch_size=30"])
    assert g["batch_size"] == 30 and config["batch_size"] == 30  # the override wins
    assert g["alpha"] == 1.0 and type(g["alpha"]) is float  # int accepted for a float key
    assert g["binary"] is False
    assert "_scratch" not in config


def test_config_file_errors_name_the_key_and_the_file(tmp_path, capsys):
    bad_key = tmp_path / "bad_key.py"
    bad_key.write_text("batchsize = 20\n")
    with pytest.raises(SystemExit) as excinfo:
        configurator.configure(script_globals(), [str(bad_key)])
    text = message(excinfo, capsys)
    assert "batchsize" in text and "bad_key.py" in text
    assert "batch_size" in text  # the valid names

    bad_type = tmp_path / "bad_type.py"
    bad_type.write_text("batch_size = 'many'\n")
    with pytest.raises(SystemExit) as excinfo:
        configurator.configure(script_globals(), [str(bad_type)])
    text = message(excinfo, capsys)
    assert "batch_size" in text and "int" in text

    missing = tmp_path / "missing.py"
    with pytest.raises(SystemExit) as excinfo:
        configurator.configure(script_globals(), [str(missing)])
    assert "missing.py" in message(excinfo, capsys)
