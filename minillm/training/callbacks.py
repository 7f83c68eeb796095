"""Callbacks that record a run's validation history whatever logger is chosen."""

import json
import resource
import time
from pathlib import Path

import lightning as L
import torch


class MetricsHistory(L.Callback):
    """Append one JSON line per validation to ``path``: step, tokens, val loss/bpb, speed, memory."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.start = time.perf_counter()

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _float(value) -> float | None:
    return None if value is None else float(value)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated by tensors on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1)  # KiB on Linux
