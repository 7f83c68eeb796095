"""Checkpoint files for Lightning: atomic writes and code-free reads.

``AtomicCheckpointIO`` is the Trainer's ``CheckpointIO`` plugin (``train`` wires it in), so every
checkpoint Lightning writes (``ModelCheckpoint``'s last.ckpt and best.ckpt) and the resume path of
``trainer.fit(ckpt_path=...)`` go through it:

* save: ``torch.save`` through ``minillm.files.atomic_write``: a crash or SIGKILL at any moment
  leaves either the old file or the new one, never a torn one.
* load: ``minillm.checkpoint.load_plain``, always ``weights_only=True``, whatever the caller asks,
  so a crafted file cannot run code, and a truncated one is reported as such.
"""

from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.plugins import CheckpointIO

from minillm.checkpoint import load_plain
from minillm.files import atomic_write


class AtomicCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO``: atomic local saves, ``weights_only=True`` loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda fh: torch.save(checkpoint, fh))

    def load_checkpoint(self, path: str | Path, map_location: Callable | str | None = "cpu",
                        weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is ignored on purpose: a checkpoint is plain data, never code.
        location = "cpu" if map_location is None or callable(map_location) else map_location
        return load_plain(path, location)

    def remove_checkpoint(self, path: str | Path) -> None:
        Path(path).unlink(missing_ok=True)
