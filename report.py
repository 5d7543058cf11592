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


def mean32(values):
    """The original's `err += new_err` over Theano's float32 results, then `/ n_batches`: a
    float32 running sum in batch order (np.cumsum adds sequentially; np.sum would not). The
    report's errors and losses are means of per-batch values taken this way (§5)."""
    values = np.asarray(values, dtype=np.float32)
    return np.float32(np.cumsum(values, dtype=np.float32)[-1] / np.float32(len(values)))


def report_line(label, value):
    """§5: two spaces and the label, padded to 33 characters, then the value."""
    return ("  " + label).ljust(33) + value


# §5's report rows in its order: (metrics key, label, unit). Every tool that prints a metric in
# the report's style takes its row from here.
ROWS = (("LR", "LR:", ""), ("train_loss", "training loss:", ""),
        ("val_loss", "validation loss:", ""), ("val_err", "validation error rate:", "%"),
        ("best_epoch", "best epoch:", ""), ("best_val_err", "best validation error rate:", "%"),
        ("test_loss", "test loss:", ""), ("test_err", "test error rate:", "%"))


def report_lines(m):
    """The report's rows of the metrics that `m` holds, in the report's order."""
    return [report_line(label, str2(m[key]) + unit) for key, label, unit in ROWS if key in m]


def report(epoch, num_epochs, seconds, m):
    """§5: the original's nine-line report."""
    return "\n".join([f"Epoch {epoch} of {num_epochs} took {str2(seconds)}s"] + report_lines(m))
