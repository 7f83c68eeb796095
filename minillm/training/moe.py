"""Mixture-of-Experts callbacks: aux-loss-free balancing, and routing metrics with a heatmap.

``ExpertBiasUpdate`` calls ``update_bias()`` on every MoE layer after each optimizer step (Wang et
al. 2024; DeepSeek-V3). ``MoEMonitor`` logs ``moe/layer{i}/{imbalance,entropy,dropped,balance_loss,
z_loss,tokens_e{j}}`` every ``log_every_n_steps`` optimizer steps (docs/moe.md), reading the layers'
device ``stats`` only then (one host transfer; loads are summed on the device in between), and
writes ``expert_load.png`` into ``trainer.default_root_dir`` at the end of training.
"""

from pathlib import Path
from typing import Iterable

import lightning as L
import matplotlib
import torch
from torch import Tensor, nn

from minillm.config import check_int
from minillm.model.moe import MoE

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the headless backend)

SCALARS = ("imbalance", "entropy", "dropped", "balance_loss", "z_loss")


def moe_layers(module: nn.Module) -> list[MoE]:
    """Every MoE layer inside ``module``, in module order (layer i = the i-th MoE layer)."""
    return [m for m in module.modules() if isinstance(m, MoE)]


def draw_expert_load(loads: Tensor, xs: list[int], xlabel: str, path: str | Path) -> None:
    """Heatmap PNG of ``loads`` (S, L, E) tokens per expert: one panel per layer, experts x S."""
    share = loads / loads.sum(dim=-1, keepdim=True).clamp(min=1e-9) * loads.shape[-1]  # 1 = uniform
    n_layers = share.shape[1]
    fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.2 + 0.9 * n_layers), sharex=True,
                             squeeze=False)
    vmax = max(2.0, float(share.max()))
    for i, ax in enumerate(axes[:, 0]):
        im = ax.imshow(share[:, i].T.numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                       vmin=0.0, vmax=vmax, extent=(-0.5, len(xs) - 0.5, share.shape[-1] - 0.5, -0.5))
        ax.set_ylabel(f"layer {i}\nexpert")
    ticks = list(range(0, len(xs), max(1, len(xs) // 8)))
    axes[-1, 0].set_xticks(ticks, [str(xs[t]) for t in ticks])
    axes[-1, 0].set_xlabel(xlabel)
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="load x n_experts (1 = uniform)")
    fig.suptitle("Expert load")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_expert_load(model: nn.Module, batches: Iterable, path: str | Path) -> Tensor:
    """Run ``model`` on ``batches`` (token ids (B, T), or (x, y) pairs); draw and return loads (S, L, E)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("plot_expert_load: the model has no MoE layer (model.ffn is dense)")
    was_training = model.training
    model.eval()
    loads = []
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        model(x.to(next(model.parameters()).device))
        loads.append(torch.stack([m.stats["tokens_per_expert"] for m in layers]).cpu())  # (L, E)
    model.train(was_training)
    loads = torch.stack(loads)  # (S, L, E)
    draw_expert_load(loads, list(range(len(loads))), "batch", path)
    return loads


class _StepCallback(L.Callback):
    """The model's MoE layers (``layers``), and whether a training batch ended an optimizer step."""

    layers: list[MoE] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.layers = moe_layers(pl_module)
        self._step = trainer.global_step  # also right after resuming from a checkpoint

    def stepped(self, trainer: L.Trainer) -> bool:
        """False for a batch inside a gradient-accumulation window; True once per optimizer step."""
        if trainer.global_step == self._step:
            return False
        self._step = trainer.global_step
        return True


class ExpertBiasUpdate(_StepCallback):
    """Call ``update_bias()`` on every MoE layer with aux-free balancing once per optimizer step,
    with the loads of all its micro-batches (the layer sums them); a no-op for dense models."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.layers = [m for m in self.layers if m.router.expert_bias is not None]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.layers and self.stepped(trainer):
            for layer in self.layers:
                layer.update_bias()


class MoEMonitor(_StepCallback):
    """Log per-layer MoE routing metrics every ``log_every_n_steps``; heatmap at the end."""

    def __init__(self, log_every_n_steps: int = 50, filename: str = "expert_load.png") -> None:
        check_int(log_every_n_steps, "MoEMonitor.log_every_n_steps")
        self.every, self.filename = log_every_n_steps, filename
        self.steps: list[int] = []
        self.history: list[Tensor] = []  # (L, E) tokens per expert summed since the previous log
        self._load: Tensor | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        layers = self.layers
        if not layers:
            return
        load = torch.stack([m.stats["tokens_per_expert"] for m in layers])  # (L, E), on device
        self._load = load if self._load is None else self._load + load
        step = trainer.global_step
        if not self.stepped(trainer) or step % self.every:
            return
        scalars = torch.stack([torch.stack([m.stats[k] for k in SCALARS]) for m in layers])  # (L, S)
        host = torch.cat([scalars, load, self._load], dim=1).cpu()  # the one host transfer
        scalars, latest, summed = host.split([len(SCALARS), load.shape[1], load.shape[1]], dim=1)
        self._load = None
        self.steps.append(step)
        self.history.append(summed)
        metrics = {}
        for i, (values, tokens) in enumerate(zip(scalars.tolist(), latest.tolist())):
            metrics |= {f"moe/layer{i}/{k}": v for k, v in zip(SCALARS, values)}
            metrics |= {f"moe/layer{i}/tokens_e{j}": t for j, t in enumerate(tokens)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.history and trainer.is_global_zero:
            draw_expert_load(torch.stack(self.history), self.steps, "optimizer step",
                             Path(trainer.default_root_dir) / self.filename)
