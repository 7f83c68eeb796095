"""What each run of a Hydra sweep (``python train.py -m ...``) leaves for ``eval.py mode=report``.

* ``RunStatus`` (a Hydra callback, ``hydra.callbacks.run_status`` in configs/train.yaml) writes
  ``<run dir>/status.json``: ``running`` when the job starts, ``completed`` or ``failed`` (with the
  error) when it ends. A run killed in between stays ``running``, which the report shows as
  unfinished.
* ``wandb_grouping`` puts the runs of one sweep into one W&B group (the sweep directory's name)
  and tags each with its overrides (``model/position=rope``, ``seed=1``).
"""

import json
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

STATUS_FILE = "status.json"
MAX_TAG_LEN = 64  # W&B rejects longer tags


def _run_dir(config: DictConfig) -> Path:
    return Path(config.get("run_dir") or config.hydra.runtime.output_dir)


def write_status(run_dir: str | Path, status: str, **extra: Any) -> None:
    """Write ``{"status": status, "time": ..., **extra}`` to ``<run_dir>/status.json``."""
    path = Path(run_dir) / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"status": status, "time": time.time(), **extra}) + "\n")


class RunStatus(Callback):
    """Hydra callback: record whether each job is running, completed or failed."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        write_status(_run_dir(config), "running")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if job_return.status.name == "FAILED":
            error = job_return._return_value  # the ``return_value`` property would re-raise it
            message = (str(error).splitlines() or [""])[0]
            write_status(_run_dir(config), "failed", error=f"{type(error).__name__}: {message}")
        else:
            write_status(_run_dir(config), "completed")


def wandb_grouping(logger_cfg: DictConfig) -> dict[str, Any]:
    """``group`` and ``tags`` for a W&B logger config inside a multirun (where it sets neither)."""
    if "Wandb" not in str(logger_cfg.get("_target_", "")) or not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {}
    extra: dict[str, Any] = {}
    if logger_cfg.get("group") is None:
        extra["group"] = Path(hydra_cfg.sweep.dir).name
    if logger_cfg.get("tags") is None:
        extra["tags"] = [o for o in hydra_cfg.overrides.task if len(o) <= MAX_TAG_LEN]
    return extra
