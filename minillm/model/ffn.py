"""Dense feed-forward layers.

Contract of the ``model/ffn`` group: ``FFN(d_model=..., **yaml_options)`` maps (B, T, C) -> (B, T, C).
A layer with an auxiliary loss (Mixture of Experts) sets ``aux_losses: dict[str, Tensor]`` in each
forward, already weighted by its coefficient. Only its parent reads it, within the same forward:
``Transformer.forward(idx, targets=y)`` averages each loss over the layers and returns it in its
result (``LossOutput.aux``), which training adds to the language-model loss; nothing outside the
model's forward reads the attribute. Dense layers have no ``aux_losses``.
"""

import torch.nn.functional as F
from torch import Tensor, nn


def swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    """Llama's SwiGLU width: 2/3 of 4 * d_model, rounded up to ``multiple_of``."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class MLP(nn.Module):
    """Two-layer GELU MLP of GPT-2 (Radford et al. 2019), hidden size ``d_hidden`` (default 4C)."""

    def __init__(self, d_model: int, d_hidden: int | None = None, bias: bool = False) -> None:
        super().__init__()
        d_hidden = d_hidden or 4 * d_model
        self.up = nn.Linear(d_model, d_hidden, bias=bias)
        self.down = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """Gated linear unit with SiLU (Shazeer 2020), as in Llama; ``d_hidden`` defaults to ~8C/3."""

    def __init__(self, d_model: int, d_hidden: int | None = None, bias: bool = False) -> None:
        super().__init__()
        d_hidden = d_hidden or swiglu_hidden(d_model)
        self.gate_up = nn.Linear(d_model, 2 * d_hidden, bias=bias)  # gate and up fused
        self.down = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
