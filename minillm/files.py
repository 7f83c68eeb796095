"""Atomic file writes: the one writer behind checkpoints, the token cache and the run's logs.

``atomic_write(path, write)`` calls ``write(file)`` on ``partial_path(path)`` in the same directory,
flushes and fsyncs it, moves it onto ``path`` with ``os.replace`` and fsyncs the directory. A crash
or SIGKILL at any moment leaves either the old file or the new one, never a torn one; the temporary
name carries the process id, so two processes writing the same file never share one.
"""

import os
from pathlib import Path
from typing import Any, Callable


def partial_path(path: Path) -> Path:
    """Where this process writes ``path`` before moving it into place."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
