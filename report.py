"""The original's report format (docs/original.md §5), in a module of its own so that the tools
that must not import torch (infer.py) print exactly as training does."""
import numpy as np


def str2(x):
    """Python 2's str() of a float (12 significant digits), which the original's report used."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(x)
    s = "%.12g" % x
    if s.lstrip("-").isdigit():
        s += ".0"
    return s


def report_line(label, value):
    """§5: two spaces and the label, padded to 33 characters, then the value."""
    return ("  " + label).ljust(33) + value


def report(epoch, num_epochs, seconds, m):
    """§5: the original's nine-line report."""
    rows = [("LR:", str2(m["LR"])), ("training loss:", str2(m["train_loss"])),
            ("validation loss:", str2(m["val_loss"])),
            ("validation error rate:", str2(m["val_err"]) + "%"),
            ("best epoch:", str(m["best_epoch"])),
            ("best validation error rate:", str2(m["best_val_err"]) + "%"),
            ("test loss:", str2(m["test_loss"])), ("test error rate:", str2(m["test_err"]) + "%")]
    lines = [f"Epoch {epoch} of {num_epochs} took {str2(seconds)}s"]
    lines += [report_line(label, value) for label, value in rows]
    return "\n".join(lines)
