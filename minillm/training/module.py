"""The LightningModule: next-token cross-entropy plus the model's auxiliary losses.

Logs train/loss, train/ppl, train/aux/<name>, train/lr and train/tokens at log steps, and after each
validation val/loss, val/ppl and val/bpb (with ``data.document_mask``, as trained, plus
val/loss_unmasked and val/bpb_unmasked without the mask); docs/training.md. A non-finite loss stops
the run before any update, naming the step, or skips the batch (``nonfinite``; docs/reliability.md).
No device value is read on the host between log steps: nothing is logged with ``prog_bar=True``
during training (Lightning would read it after every batch); ``callbacks.ProgressBar`` shows the
loss as read at log steps. Checkpoints carry the RNG states, restored at the first batch after a
resume, so an interrupted run replays the uninterrupted one exactly.
"""

import math
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from minillm.checkpoint import match_state_dict_keys
from minillm.config import check_int
from minillm.model import Transformer
from minillm.training.optimizers import build_optimizer
from minillm.training.rng import get_rng_states, set_rng_states

NONFINITE_CHECKS = ("auto", "step", "log")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or weights; the last good checkpoint is kept."""


def check_nonfinite(max_skips: int, check: str) -> None:
    """``nonfinite.max_skips`` (>= 0) and ``nonfinite.check`` (auto, step or log; log cannot skip)."""
    check_int(max_skips, "nonfinite.max_skips", minimum=0)
    if check not in NONFINITE_CHECKS:
        raise ValueError(f"nonfinite.check={check!r} must be one of {', '.join(NONFINITE_CHECKS)}")
    if check == "log" and max_skips:
        raise ValueError(f"nonfinite.check=log cannot skip batches (nonfinite.max_skips={max_skips}): "
                         "skipping needs every batch checked; use nonfinite.check=step or auto")


class LanguageModel(L.LightningModule):
    """Trains a ``Transformer``; checkpoints carry the resolved config and the tokenizer JSON."""

    def __init__(self, model: Transformer, optimizer: Callable, scheduler: Callable,
                 config: dict[str, Any], max_nonfinite_skips: int = 0,
                 nonfinite_check: str = "auto") -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.config = config  # plain, resolved: stored in every checkpoint
        self.tokens_seen = 0  # all ranks; ThroughputMonitor reads it
        self.max_nonfinite_skips, self.nonfinite_skips = max_nonfinite_skips, 0
        check_nonfinite(max_nonfinite_skips, nonfinite_check)
        self.nonfinite_check = nonfinite_check
        self._nonfinite: Tensor | None = None  # device-side flag since the last check (GPU)
        self._pending_rng: dict[str, Any] | None = None  # restored at the first batch after a resume
        self._progress_step = -1
        # Token-weighted means of the validation loss; compute() sums over ranks. NaN propagates
        # (the default would drop it with a warning and hide a diverged model). With document masks,
        # the same windows are scored without them too (val/loss_unmasked).
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.val_loss_unmasked = MeanMetric(nan_strategy="disable")

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y, *documents = batch  # (B, T) each; documents (B, T) with data.document_mask
        # The loss inside the (compiled) forward, fused with the head; the aux losses of this forward.
        loss, aux = self.model(x, targets=y, **_documents(documents))
        total = loss + sum(aux.values()) if aux else loss
        self.tokens_seen += y.numel() * self.trainer.world_size
        if not self._finite(total):
            return self._skip_or_stop(total, batch_idx)
        self.log("train/loss", loss.detach())
        self.log("train/ppl", loss.detach().exp())
        for name, value in aux.items():
            self.log(f"train/aux/{name}", value.detach())
        if self._log_step():
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
            self.log("train/tokens", float(self.tokens_seen))
        return total

    def _finite(self, total: Tensor) -> bool:
        """Whether the loss is finite on every rank: a host sync per micro-batch, except when checked
        at log steps (``nonfinite_check``: log, or auto on a GPU without skips), where a device-side
        flag collects the micro-batches and is read at log steps only (Lightning syncs there
        anyway), so the loop never waits for the device."""
        bad = ~torch.isfinite(total.detach())
        if self._check_at_log_steps():
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
            if (self.global_step + 1) % self.trainer.log_every_n_steps:
                return True
            bad, self._nonfinite = self._nonfinite, None
        finite = not bool(bad.item())
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite and self._check_at_log_steps():
            raise NonFiniteError(
                f"non-finite training loss at or before step {self.global_step} (checked every "
                "trainer.log_every_n_steps steps); the last checkpoint is kept (lower optimizer.lr; "
                "nonfinite.check=step stops at the very step, nonfinite.max_skips=N skips such batches)")
        return finite

    def _check_at_log_steps(self) -> bool:
        if self.nonfinite_check == "auto":
            return self.device.type == "cuda" and not self.max_nonfinite_skips
        return self.nonfinite_check == "log"

    def _skip_or_stop(self, total: Tensor, batch_idx: int) -> None:
        """Skip this batch (no backward: no gradient from it) while skips remain, else raise
        ``NonFiniteError``."""
        self.nonfinite_skips += 1
        where = f"step {self.global_step} (micro-batch {batch_idx})"
        if self.nonfinite_skips > self.max_nonfinite_skips:
            raise NonFiniteError(
                f"non-finite training loss ({total.item()}) at {where}: run stopped before updating "
                f"the weights; the last checkpoint is kept ({self.max_nonfinite_skips} skips allowed: "
                "lower optimizer.lr, or raise nonfinite.max_skips to skip such batches)")
        rank_zero_warn(f"non-finite training loss ({total.item()}) at {where}: batch skipped "
                       f"({self.nonfinite_skips}/{self.max_nonfinite_skips} of nonfinite.max_skips)")
        self.log("train/nonfinite_skips", float(self.nonfinite_skips))
        return None  # Lightning then skips backward and the update; the step still counts

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            set_rng_states(self._pending_rng)
            self._pending_rng = None

    def _log_step(self) -> bool:
        """True once per optimizer step that Lightning's logger writes out (host-side check only)."""
        every, step = self.trainer.log_every_n_steps, self.global_step
        if not every or (step + 1) % every or step == self._progress_step:
            return False
        self._progress_step = step
        return True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Stopping through ``should_stop`` makes Lightning validate (and so checkpoint) the final
        # step too, which reaching max_steps alone does not do with an endless training stream.
        if 0 < self.trainer.max_steps <= self.global_step:
            self.trainer.should_stop = True

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y, *documents = batch
        self.val_loss.update(self.model(x, targets=y, **_documents(documents)).loss, weight=y.numel())
        if documents:
            self.val_loss_unmasked.update(self.model(x, targets=y).loss, weight=y.numel())

    def on_validation_epoch_end(self) -> None:
        bytes_per_token = getattr(self.trainer.datamodule, "bytes_per_token", None)
        for suffix, metric in (("", self.val_loss), ("_unmasked", self.val_loss_unmasked)):
            if suffix and not metric.update_called:  # scored without the mask only with documents
                continue
            loss = metric.compute()
            metric.reset()
            self.log(f"val/loss{suffix}", loss, prog_bar=not suffix)
            if not suffix:
                self.log("val/ppl", loss.exp())
            if bytes_per_token:
                self.log(f"val/bpb{suffix}", loss / math.log(2) / bytes_per_token)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the model's parameters where they are now (fused on a GPU)."""
        return build_optimizer(self.optimizer_factory, self.model, fused=self.device.type == "cuda")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer()
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        """Clip by global norm; also with a fused optimizer (bf16) and under FSDP (sharded norm)."""
        if not gradient_clip_val or gradient_clip_algorithm not in (None, "norm"):
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        wrapped = self.trainer.strategy.model
        if hasattr(wrapped, "clip_grad_norm_"):  # FSDP: the norm must be summed over the shards
            wrapped.clip_grad_norm_(gradient_clip_val)
        elif getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            # fp16 with a GradScaler: Lightning unscales first (and refuses a fused optimizer)
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        else:
            # Lightning refuses any fused optimizer here, but without a scaler the gradients are
            # already unscaled, so clipping them directly is exact.
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    def on_fit_start(self) -> None:
        # The data is ready by now: only a run that can start creates logger files (a W&B run).
        for logger in self.loggers:
            logger.log_hyperparams(self.config)
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "describe"):
            rank_zero_info(datamodule.describe())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite(checkpoint["state_dict"], self.global_step)
        checkpoint["config"] = self.config
        checkpoint["tokenizer"] = self.trainer.datamodule.tokenizer_json
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["nonfinite_skips"] = self.nonfinite_skips
        checkpoint["rng_states"] = get_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before Lightning loads the weights: match the keys to this module (compiled or eager).
        checkpoint["state_dict"] = match_state_dict_keys(checkpoint["state_dict"], self)
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        self.nonfinite_skips = int(checkpoint.get("nonfinite_skips", 0))
        self._pending_rng = checkpoint.get("rng_states")


def _documents(documents: list[Tensor]) -> dict[str, Tensor]:
    """The model's ``documents=`` keyword when the batch carries document ids, else nothing, so the
    default path calls the model exactly as before."""
    return {"documents": documents[0]} if documents else {}


def check_finite(state_dict: dict[str, Tensor], step: int) -> None:
    """Raise ``NonFiniteError`` naming the first non-finite floating-point tensor of ``state_dict``."""
    floats = [(k, v) for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not floats:
        return
    finite = torch.stack([torch.isfinite(v).all() for _, v in floats]).tolist()  # one host sync
    bad = [k for (k, _), ok in zip(floats, finite) if not ok]
    if bad:
        raise NonFiniteError(f"non-finite weights at step {step} ({bad[0]}"
                             f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): run stopped "
                             "without writing a checkpoint; the last one is kept (lower optimizer.lr)")
