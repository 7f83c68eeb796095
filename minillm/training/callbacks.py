"""Callbacks: training throughput (tokens/s, MFU, peak memory), the validation history and text
samples, all recorded whatever logger is chosen, and a progress bar that never waits for the device."""

import contextlib
import json
import math
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from minillm.config import is_int
from minillm.data import load_tokenizer
from minillm.files import atomic_write
from minillm.generation import check_sampling, continuations
from minillm.training.throughput import flops_per_token, peak_flops


class ThroughputMonitor(L.Callback):
    """Log train/tokens_per_sec, train/mfu and train/peak_memory_mb every ``log_every_n_steps``.

    Reads host-side state only (tokens counted by the module, wall clock, the allocator's peak).
    MFU divides all ranks' FLOP/s by one device's peak (``peak_flops``, else looked up from the
    device name) times the world size; it is not logged when the peak is unknown (CPU). Validation,
    and what follows it up to the next training batch (checkpoints, text samples), is excluded.

    Lightning's own ``ThroughputMonitor`` does not do this job: it calls ``torch.cuda.synchronize()``
    after every batch (a host wait per step, which tests/test_train.py forbids), counts samples
    rather than tokens, and takes its peak from ``get_available_flops`` (see ``throughput.py``).
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
        self._after_validation = False

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
        # Restart at the next batch instead: the checkpoints and text samples written after a
        # validation (in later on_validation_end hooks) are not training time either.
        self._after_validation = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch,
                             batch_idx: int) -> None:
        if self._after_validation:
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
        self._after_validation = False


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing train/loss and train/lr as read at log steps only.

    Lightning turns every metric logged with ``prog_bar=True`` into a Python number after every
    batch: on a GPU, a host-device sync per step. So the training module logs nothing with
    ``prog_bar``; this bar reads ``SHOWN`` from the logged metrics once per optimizer step that the
    logger writes (every ``trainer.log_every_n_steps``, when Lightning reads them anyway) and shows
    those numbers until the next log step, however often it redraws.
    """

    SHOWN = ("train/loss", "train/lr")
    _shown: dict[str, float] = {}  # replaced, never mutated: a class default is safe
    _read_step = -1

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


class JsonLines(L.Callback):
    """Base of the callbacks that append JSON lines to ``path`` (global rank 0 writes).

    At the start of training, lines past the current step are dropped: a resumed run rewrites the
    lines the interrupted one wrote after its last checkpoint, so the file reads as one run.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.path.is_file():
            step = trainer.global_step
            kept = [r for r in read_json_lines(self.path) if r.get("step", math.inf) <= step]
            atomic_write(self.path, lambda fh: fh.writelines(json.dumps(r) + "\n" for r in kept), mode="w")

    def _append(self, *records: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write("".join(json.dumps(record) + "\n" for record in records))


class MetricsHistory(JsonLines):
    """Append one JSON line per validation to ``path``: step, tokens, val loss/bpb, speed, memory."""

    # record key -> logged metric; train/* from ThroughputMonitor, when it is among the callbacks
    FIELDS = {"val_loss": "val/loss", "val_ppl": "val/ppl", "val_bpb": "val/bpb",
              "val_loss_unmasked": "val/loss_unmasked", "val_bpb_unmasked": "val/bpb_unmasked",
              "train_loss": "train/loss", "tokens_per_sec": "train/tokens_per_sec", "mfu": "train/mfu",
              "peak_memory_mb": "train/peak_memory_mb"}

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        unmasked = "val/loss_unmasked" in metrics  # data.document_mask
        record = {"step": trainer.global_step, "tokens": getattr(pl_module, "tokens_seen", None),
                  **{key: float(metrics[name]) if name in metrics else None
                     for key, name in self.FIELDS.items() if unmasked or not key.endswith("_unmasked")},
                  "elapsed_s": round(time.perf_counter() - self.start, 3)}
        self._append(record)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A run stopped by a non-finite loss ends its history with that loss, so a sweep report
        shows it as diverged rather than unfinished."""
        from minillm.training.module import NonFiniteError

        if isinstance(exception, NonFiniteError) and trainer.is_global_zero:
            self._append({"step": trainer.global_step, "tokens": getattr(pl_module, "tokens_seen", None),
                          "train_loss": float("nan"), "stopped": str(exception).split(":")[0]})


class SampleText(JsonLines):
    """After every ``every_n_validations``-th validation, append to ``path`` one JSON line
    ``{"step", "prompt", "sample", "text"}`` per continuation of each prompt (global rank 0; with a
    ``WandbLogger`` also a W&B table ``samples``): the texts ``eval.py mode=sample`` prints for that
    step's checkpoint (``minillm.generation.continuations``). Training is unchanged: sampling has
    its own generator seeded with ``seed``, runs in eval mode, eagerly under ``torch.compile``
    (varying shapes would recompile) and in bf16 when training is. Non-finite weights are not
    sampled; under FSDP (parameters sharded) nothing is, with a warning.
    """

    SHARDED = (FSDPStrategy, ModelParallelStrategy)

    def __init__(self, path: str, prompts: Sequence[str] = ("Once upon a time",), num_samples: int = 1,
                 max_new_tokens: int = 48, temperature: float = 0.8, top_k: int | None = 50,
                 top_p: float | None = None, seed: int = 0, every_n_validations: int = 1) -> None:
        super().__init__(path)
        _check_sampling(prompts, num_samples, max_new_tokens, temperature, top_k, top_p, seed,
                        every_n_validations)
        self.prompts = list(prompts)
        self.num_samples, self.max_new_tokens = num_samples, max_new_tokens
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.every = every_n_validations
        # Validations so far (sanity checks excluded), kept in checkpoints so that a resumed run
        # samples at the same ones; every instance counts the same, so one state key serves all.
        self.validations = 0
        self.sharded = False
        self._tokenizer = None

    def state_dict(self) -> dict[str, int]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.validations = state_dict["validations"]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sharded = isinstance(trainer.strategy, self.SHARDED)
        if self.sharded:
            rank_zero_warn(f"callbacks.samples: no text samples during training with "
                           f"{type(trainer.strategy).__name__} (parameters sharded across ranks); sample a "
                           "checkpoint with: python eval.py mode=sample ckpt_path=...")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1  # on every rank, so that every rank's checkpoint state agrees
        if self.sharded or not trainer.is_global_zero or self.validations % self.every:
            return
        from minillm.training.module import NonFiniteError, check_finite

        try:
            check_finite(pl_module.model.state_dict(), trainer.global_step)  # one host sync
        except NonFiniteError:
            # Sampling would fail on NaN probabilities; the checkpoint written next stops the run
            # naming the step (LanguageModel.on_save_checkpoint), as it does without samples.
            rank_zero_warn(f"callbacks.samples: no samples at step {trainer.global_step}: non-finite weights")
            return
        rows = [{"step": trainer.global_step, "prompt": prompt, "sample": i, "text": text}
                for prompt, texts in zip(self.prompts, self.generate(trainer, pl_module.model))
                for i, text in enumerate(texts)]
        self._append(*rows)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(key="samples", columns=list(rows[0]), data=[list(r.values()) for r in rows],
                                step=trainer.global_step)

    def generate(self, trainer: L.Trainer, model: nn.Module) -> list[list[str]]:
        """The texts of each prompt, generated by ``model`` as it is now; its train/eval modes kept."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(trainer.datamodule.tokenizer_json)
        device = next(model.parameters()).device
        bf16 = device.type == "cuda" and "bf16" in str(trainer.precision)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.compiler.set_stance("force_eager"), autocast:
                return [continuations(model, self._tokenizer, prompt, self.num_samples, self.max_new_tokens,
                                      temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                      seed=self.seed) for prompt in self.prompts]
        finally:
            for m, training in modes.items():
                m.training = training


def _check_sampling(prompts, num_samples, max_new_tokens, temperature, top_k, top_p, seed, every) -> None:
    """Reject bad ``callbacks.samples`` settings at construction, before any training."""
    listed = isinstance(prompts, Sequence) and not isinstance(prompts, str)
    for key, value, ok, valid in [
        ("prompts", prompts, listed and prompts and all(isinstance(p, str) for p in prompts),
         'must be a non-empty list of strings, e.g. ["Once upon a time"]'),
        ("seed", seed, is_int(seed, -2**63 + 1, 2**63 - 1), "must be an integer (sampling has its "
         "own generator: the training random state is never drawn from)"),
        ("every_n_validations", every, is_int(every), "must be an integer >= 1"),
    ]:
        if not ok:
            raise ValueError(f"callbacks.samples.{key}={value!r}: {valid}")
    check_sampling("callbacks.samples.", max_new_tokens, num_samples, temperature, top_k, top_p,
                   min_new_tokens=1)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (NaN and Infinity read as floats), less a line a kill cut short."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated by tensors on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1)  # KiB on Linux
