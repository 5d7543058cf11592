"""Atomic file writes for checkpoints, records, downloads and preprocessed data: a crash, a kill or a
full disk never leaves a truncated file under the final name; the previous file, if any, stays."""
import os
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path):
    """Makes a rename into directory `path` durable, not just the renamed file's data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path, mode="wb"):
    """Yields a file open on `.<name>.tmp` beside `path`; a clean exit flushes, fsyncs and renames it
    onto `path`, any exception (KeyboardInterrupt too) deletes it. The fixed name means a killed
    writer's leftover is overwritten by the next write instead of piling up."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    f = open(tmp, mode)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the new file is complete under its name by now; a directory that refuses fsync is no error
        fsync_dir(path.parent)
    except OSError:
        pass
