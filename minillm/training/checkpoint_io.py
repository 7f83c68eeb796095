"""``AtomicCheckpointIO``, the Trainer's ``CheckpointIO`` plugin (docs/reliability.md): every
checkpoint Lightning writes is saved through ``minillm.files.atomic_write`` (a crash leaves the old
file or the new one, never a torn one), and every read, the resume included, is
``minillm.checkpoint.load_plain`` with ``weights_only=True`` whatever the caller asks.
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
