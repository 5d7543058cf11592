"""errors.py: one base for every error a user can fix, and one way a script ends on it."""
import pytest

import errors
from configurator import ConfigError
from dataset_files import DatasetError
from infer import ModelError
from runfiles import RunError


@pytest.mark.parametrize("kind", [ConfigError, DatasetError, RunError, ModelError])
def test_every_user_error_is_a_UserError_and_not_a_SystemExit(kind):
    assert issubclass(kind, errors.UserError) and not issubclass(kind, SystemExit)


def test_exit_prints_one_line_and_ends_with_status_2(capsys):
    ended = errors.exit(RunError("a/b: line 1\nline 2"))
    assert isinstance(ended, SystemExit) and ended.code == errors.EXIT_STATUS == 2
    assert capsys.readouterr().err == "error: a/b: line 1 line 2\n"
