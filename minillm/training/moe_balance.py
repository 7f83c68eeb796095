"""Auxiliary-loss-free expert balancing during training (Wang et al. 2024; DeepSeek-V3)."""

import lightning as L
from torch import nn

from minillm.model.moe import MoE


def moe_layers(module: nn.Module) -> list[MoE]:
    """Every MoE layer inside ``module``, in module order (layer i = the i-th MoE layer)."""
    return [m for m in module.modules() if isinstance(m, MoE)]


class ExpertBiasUpdate(L.Callback):
    """Call ``update_bias()`` on every MoE layer once after each optimizer step.

    A no-op for dense models and for MoE layers without aux-free balancing. With gradient
    accumulation the loads of all micro-batches of the step are used, since the layer sums them.
    """

    def __init__(self) -> None:
        self._step: int | None = None
        self._layers: list[MoE] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._layers = [m for m in moe_layers(pl_module) if m.router.expert_bias is not None]
        self._step = trainer.global_step  # also right after resuming from a checkpoint

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not self._layers or trainer.global_step == self._step:  # no optimizer step on this batch
            return
        self._step = trainer.global_step
        for layer in self._layers:
            layer.update_bias()
