"""Callbacks: training throughput (tokens/s, MFU, peak memory) and the validation history, both
recorded whatever logger is chosen, and a progress bar that never waits for the device."""

import json
import resource
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from minillm.data.cache import atomic_write
from minillm.training.throughput import flops_per_token, peak_flops


class ThroughputMonitor(L.Callback):
    """Log train/tokens_per_sec, train/mfu and train/peak_memory_mb every ``log_every_n_steps``.

    Reads only host-side state (tokens counted by the module, wall clock, the CUDA allocator's
    peak), so it adds no device sync. Tokens and FLOPs are those of all ranks; MFU divides by the
    peak of one device (``peak_flops``, else looked up from the device name) times the world size
    and is not logged when that peak is unknown (CPU, an unlisted GPU). Validation time is excluded.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"callbacks.throughput.peak_flops={peak_flops!r}: must be a positive "
                             "FLOP/s figure (e.g. 989e12) or null to look it up from the device")
        self.peak_flops_override = peak_flops
        self.flops_per_token = 0.0
        self.peak: float | None = None  # FLOP/s of all ranks together
        self.tokens_per_sec: float | None = None
        self.mfu: float | None = None
        self._window = (0, time.perf_counter())  # (tokens seen, time) at the last reading
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        seq_len = getattr(trainer.datamodule, "seq_len", model.max_seq_len)
        self.flops_per_token = flops_per_token(model, seq_len)
        peak = peak_flops(pl_module.device, self.peak_flops_override)
        self.peak = peak * trainer.world_size if peak else None
        where = (f"MFU against {peak / 1e12:.0f} TFLOP/s per device" if peak else
                 "no MFU: peak unknown for this device (set callbacks.throughput.peak_flops)")
        rank_zero_info(f"Throughput: {self.flops_per_token / 1e6:.1f} MFLOPs per token; {where}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs,
                           batch, batch_idx: int) -> None:
        step, every = trainer.global_step, trainer.log_every_n_steps
        # Once per optimizer step that the logger writes (global_step has just been incremented).
        if not every or step % every or step == self._last_step:
            return
        self._last_step = step
        tokens, start = self._window
        now = time.perf_counter()
        if pl_module.tokens_seen > tokens and now > start:
            self.tokens_per_sec = (pl_module.tokens_seen - tokens) / (now - start)
            pl_module.log("train/tokens_per_sec", self.tokens_per_sec)
            if self.peak:
                self.mfu = self.tokens_per_sec * self.flops_per_token / self.peak
                pl_module.log("train/mfu", self.mfu)
        pl_module.log("train/peak_memory_mb", peak_memory_mb(pl_module.device))
        self._window = (pl_module.tokens_seen, now)

    def _restart(self, pl_module: L.LightningModule) -> None:
        self._window = (pl_module.tokens_seen, time.perf_counter())



class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing train/loss and train/lr as read at log steps only.

    Lightning turns every metric logged with ``prog_bar=True`` into a Python number after every
    batch: on a GPU, a host-device sync per step. So the training module logs nothing with
    ``prog_bar``; this bar reads ``SHOWN`` from the logged metrics once per optimizer step that the
    logger writes (every ``trainer.log_every_n_steps``, when Lightning reads them anyway) and shows
    those numbers until the next log step, however often it redraws.
    """

    SHOWN = ("train/loss", "train/lr")

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._shown: dict[str, float] = {}
        self._read_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step, every = trainer.global_step, trainer.log_every_n_steps
        if self.is_enabled and every and step and step % every == 0 and step != self._read_step:
            self._read_step = step
            metrics = trainer.callback_metrics
            self._shown = {k: float(metrics[k]) for k in self.SHOWN if k in metrics}
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return {**super().get_metrics(trainer, pl_module), **self._shown}


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
            # from ThroughputMonitor, when it is among the callbacks
            "tokens_per_sec": _float(metrics.get("train/tokens_per_sec")),
            "mfu": _float(metrics.get("train/mfu")),
            "peak_memory_mb": _float(metrics.get("train/peak_memory_mb")),
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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated by tensors on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1)  # KiB on Linux
