"""The one kind of error a user can act on, and the one way a script ends on it.

A UserError is a mistake the user can fix: a value, a path, a data file, a run directory. Its
message names what is wrong and what to do. Each kind of input has its own subclass (ConfigError
in configurator.py, DatasetError in dataset_files.py, RunError in runfiles.py, ModelError in
infer.py), and every script and tool ends on any of them the same way (print_error, exit):
`error: <message>` on one line of stderr, and exit status 2, argparse's status for a usage error,
whatever the input was. Other endings keep their own statuses: a run stopped by a signal 128 + its
number (130 for Ctrl-C, 143 for SIGTERM); a run that fails for another reason (a full disk, a
failed GPU check) 1, with its one line; a bug 1, with Python's traceback.
"""
import sys

EXIT_STATUS = 2


class UserError(Exception):
    """A mistake the user can fix; the message says which, where it looked and what is accepted."""


def line(error):
    """What the user reads: `error: <message>`, on one line."""
    return "error: " + " ".join(str(error).split("\n"))


def print_error(error):
    """Print the error's line to stderr; returns EXIT_STATUS, for a main() to return."""
    print(line(error), file=sys.stderr, flush=True)
    return EXIT_STATUS


def exit(error):
    """print_error(error), and the SystemExit that ends the script with its status."""
    return SystemExit(print_error(error))
