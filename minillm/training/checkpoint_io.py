"""Checkpoint files for Lightning: atomic writes and code-free reads.

``AtomicCheckpointIO`` is the Trainer's ``CheckpointIO`` plugin (``train`` wires it in), so every
checkpoint Lightning writes (``ModelCheckpoint``'s last.ckpt and best.ckpt) and the resume path of
``trainer.fit(ckpt_path=...)`` go through it:

* save: ``torch.save`` into ``.<name>.partial`` in the target's directory, flush + fsync, then
  ``os.replace`` onto the target and fsync the directory. A crash or SIGKILL at any moment leaves
  either the old file or the new one, never a torn one; a stale ``.partial`` is overwritten next time.
* load: ``minillm.checkpoint.load_plain``, always ``weights_only=True``, whatever the caller asks,
  so a crafted file cannot run code, and a truncated one is reported as such.
"""

import os
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.plugins import CheckpointIO

from minillm.checkpoint import load_plain


def partial_path(path: Path) -> Path:
    """Where a checkpoint is written before it is moved onto ``path``."""
    return path.with_name(f".{path.name}.partial")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` that replaces ``path`` only once the new file is complete on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO``: atomic local saves, ``weights_only=True`` loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: str | Path, map_location: Callable | str | None = "cpu",
                        weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is ignored on purpose: a checkpoint is plain data, never code.
        location = "cpu" if map_location is None or callable(map_location) else map_location
        return load_plain(path, location)

    def remove_checkpoint(self, path: str | Path) -> None:
        Path(path).unlink(missing_ok=True)
