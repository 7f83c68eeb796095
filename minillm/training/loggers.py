"""The run's loggers (``make_loggers``), and loggers that carry on where a resumed run stopped.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when a run starts in a directory that has one, so
resuming with ``ckpt_path=last`` lost the history before the checkpoint; ``CSVLogger`` here keeps it.
A W&B run resumed the same way gets the id of the run it continues (``wandb_run_id``), so its
curves go on in one W&B run instead of starting a new one; the runs of one sweep share a W&B group
and are tagged with their overrides (``wandb_grouping``).
"""

import csv
import netrc
import os
import secrets
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from minillm.files import atomic_write

WANDB_ID_FILE = "wandb_id"
MAX_TAG_LEN = 64  # W&B rejects longer tags


class _ResumingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv``; rows it has at or after the step of this run's first row
    are dropped then (the interrupted run logged them after its last checkpoint; this run logs them
    again), so the file reads as one run."""

    def _check_log_dir_exists(self) -> None:
        self._resuming = Path(self.metrics_file_path).is_file()

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if self._resuming and step is not None:
            self._resuming = False
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                kept = [row for row in reader if _step(row) is not None and _step(row) < step]
            self.metrics_keys = sorted(reader.fieldnames or [])

            def write(f) -> None:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)

            atomic_write(Path(self.metrics_file_path), write, mode="w")
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
    run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(run_id + "\n"), mode="w")
    return run_id


def is_wandb(logger_cfg: Any) -> bool:
    """Whether a logger config node builds Lightning's ``WandbLogger``."""
    return "WandbLogger" in str(logger_cfg.get("_target_", ""))


def wandb_resume(logger_cfg: Any, run_dir: Path, resuming: bool) -> dict[str, Any]:
    """``id`` and ``resume`` for a W&B logger config that sets no id: the run directory's own."""
    if not is_wandb(logger_cfg) or logger_cfg.get("id") is not None:
        return {}
    return {"id": wandb_run_id(run_dir, resuming), "resume": "allow"}


def wandb_grouping(logger_cfg: Any) -> dict[str, Any]:
    """``group`` and ``tags`` for a W&B logger config inside a multirun (where it sets neither)."""
    if not is_wandb(logger_cfg) or not HydraConfig.initialized() or \
            HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra_cfg = HydraConfig.get()
    extra = {"group": Path(hydra_cfg.sweep.dir).name,
             "tags": [o for o in hydra_cfg.overrides.task if len(o) <= MAX_TAG_LEN]}
    return {key: value for key, value in extra.items() if logger_cfg.get(key) is None}


def make_loggers(logger_cfg: Any, run_dir: Path, resuming: bool) -> list[Any]:
    """Instantiate each configured logger; W&B goes offline unless the user is logged in, groups
    the runs of a sweep (``wandb_grouping``) and continues the run of
    ``run_dir`` when resuming (``wandb_resume``). A ``WandbLogger`` starts its W&B run only when
    first written to (``LanguageModel.on_fit_start``, once the data is ready)."""
    logger_cfg = logger_cfg or {}
    if any(is_wandb(c) for c in logger_cfg.values()) and "WANDB_MODE" not in os.environ and \
            not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"  # never prompt for a login
    return [instantiate(c, **wandb_grouping(c), **wandb_resume(c, run_dir, resuming))
            for c in logger_cfg.values()]


def finish_loggers(loggers: list[Any]) -> None:
    """Close the W&B run, else the next run of a multirun would log into it."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False
