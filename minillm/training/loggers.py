"""Loggers that carry on where a resumed run stopped.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when a run starts in a directory that has one, so
resuming with ``ckpt_path=last`` lost the history before the checkpoint; ``CSVLogger`` here keeps it.
A W&B run resumed the same way gets the id of the run it continues (``wandb_run_id``), so its
curves go on in one W&B run instead of starting a new one.
"""

import csv
import secrets
import string
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from minillm.files import atomic_write

WANDB_ID_FILE = "wandb_id"


class _ResumingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv``; rows it has at or after the step of this run's first row
    are dropped then (the interrupted run logged them after its last checkpoint; this run logs them
    again), so the file reads as one run."""

    def _check_log_dir_exists(self) -> None:
        self._earlier: list[dict[str, str]] | None = None
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                self._earlier = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if self._earlier is not None and step is not None:
            kept = [row for row in self._earlier if _step(row) is not None and _step(row) < step]
            keys = self.metrics_keys

            def write(f) -> None:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)

            atomic_write(Path(self.metrics_file_path), write, mode="w")
            self._earlier = None
        super().log_metrics(metrics_dict, step)


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row["step"]))
    except (KeyError, TypeError, ValueError):
        return None


class CSVLogger(LightningCSVLogger):
    """``<save_dir>/<name>/<version>/metrics.csv`` (and ``hparams.yaml``), continued on resume."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id of ``run_dir``: when resuming, the one in ``<run_dir>/wandb_id``; else (or
    when there is none) a new one, written there by global rank 0 (other ranks log nothing to W&B)."""
    path = Path(run_dir) / WANDB_ID_FILE
    if resuming and path.is_file():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(run_id + "\n"), mode="w")
    return run_id


def wandb_resume(logger_cfg: Any, run_dir: Path, resuming: bool) -> dict[str, Any]:
    """``id`` and ``resume`` for a W&B logger config that sets no id: the run directory's own."""
    if "Wandb" not in str(logger_cfg.get("_target_", "")) or logger_cfg.get("id") is not None:
        return {}
    return {"id": wandb_run_id(run_dir, resuming), "resume": "allow"}
