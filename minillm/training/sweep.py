"""``RunStatus``, a Hydra callback (``hydra.callbacks.run_status`` in configs/train.yaml), writes
``<run dir>/status.json`` for ``eval.py mode=report``: ``running`` when the job starts, ``completed``
or ``failed`` (with the error) when it ends; a run killed in between stays ``running`` (unfinished).
"""

import json
import os
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

STATUS_FILE = "status.json"


def _run_dir(config: DictConfig) -> Path:
    return Path(config.get("run_dir") or config.hydra.runtime.output_dir)


def write_status(run_dir: str | Path, status: str, **extra: Any) -> None:
    """Write ``{"status": status, "time": ..., **extra}`` to ``<run_dir>/status.json``."""
    path = Path(run_dir) / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"status": status, "time": time.time(), **extra}) + "\n")


def is_global_rank_zero() -> bool:
    """Whether this process is rank 0 of a distributed run (DDP child processes, SLURM, torchrun
    set these variables before Lightning starts), so that only it writes run files."""
    keys = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
    return all(os.environ.get(key, "0") == "0" for key in keys)


class RunStatus(Callback):
    """Hydra callback: record whether each job is running, completed or failed (rank 0 only)."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_global_rank_zero():
            write_status(_run_dir(config), "running")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not is_global_rank_zero():
            return
        if job_return.status.name == "FAILED":
            error = job_return._return_value  # the ``return_value`` property would re-raise it
            message = (str(error).splitlines() or [""])[0]
            write_status(_run_dir(config), "failed", error=f"{type(error).__name__}: {message}")
        else:
            write_status(_run_dir(config), "completed")
