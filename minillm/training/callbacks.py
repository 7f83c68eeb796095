"""Callbacks that record a run's validation history whatever logger is chosen."""

import json
import resource
import time
from pathlib import Path

import lightning as L
import torch

from minillm.data.cache import atomic_write


class MetricsHistory(L.Callback):
    """Append one JSON line per validation to ``path``: step, tokens, val loss/bpb, speed, memory.

    At the start of training, lines past the current step are dropped: a resumed run rewrites the
    history the interrupted one wrote after its last checkpoint, so the file reads as one run.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if _step(line) is not None and _step(line) <= trainer.global_step]
        if len(kept) != len(lines):
            atomic_write(self.path, lambda fh: fh.write("".join(line + "\n" for line in kept)), mode="w")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        record = {
            "step": trainer.global_step,
            "tokens": getattr(pl_module, "tokens_seen", None),
            "val_loss": _float(metrics.get("val/loss")),
            "val_ppl": _float(metrics.get("val/ppl")),
            "val_bpb": _float(metrics.get("val/bpb")),
            "train_loss": _float(metrics.get("train/loss")),
            "tokens_per_sec": getattr(pl_module, "tokens_per_sec", None),
            "mfu": getattr(pl_module, "mfu", None),
            "peak_memory_mb": _peak_memory_mb(pl_module.device),
            "elapsed_s": round(time.perf_counter() - self.start, 3),
        }
        self._append(record)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A run stopped by a non-finite loss ends its history with that loss, so a sweep report
        shows it as diverged rather than unfinished."""
        from minillm.training.module import NonFiniteError

        if isinstance(exception, NonFiniteError) and trainer.is_global_zero:
            self._append({"step": trainer.global_step, "tokens": getattr(pl_module, "tokens_seen", None),
                          "train_loss": float("nan"), "stopped": str(exception).split(":")[0]})

    def _append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _step(line: str) -> int | None:
    """The step of a history line; None for a line a kill cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _float(value) -> float | None:
    return None if value is None else float(value)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated by tensors on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1)  # KiB on Linux
