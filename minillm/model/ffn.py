"""Dense feed-forward layers.

Contract of the ``model/ffn`` group: ``FFN(d_model=..., **yaml_options)`` maps (B, T, C) -> (B, T, C).
A layer with an auxiliary loss (Mixture of Experts) sets ``aux_losses: dict[str, Tensor]`` in each
forward, already weighted by its coefficient. Only its parent reads it, within the same forward:
``Transformer.forward(idx, targets=y)`` averages each loss over the layers and returns it in its
result (``LossOutput.aux``), which training adds to the language-model loss; nothing outside the
model's forward reads the attribute. Dense layers have no ``aux_losses``.
Every FFN names the weights that write into the residual stream with ``residual_out()``; the model
gives exactly those its residual init (``model.init``).
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

    def residual_out(self) -> list[Tensor]:
        """The output projection, which writes into the residual stream."""
        return [self.down.weight]


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

    def residual_out(self) -> list[Tensor]:
        """The output projection, which writes into the residual stream."""
        return [self.down.weight]


class ReLU2(MLP):
    """Squared-ReLU MLP of Primer (So et al. 2021), ``down(relu(up(x))^2)``; ``d_hidden`` default 4C.

    modded-nanogpt's choice: as cheap as GPT-2's MLP (two matrices, no gate) and sparse activations.
    The Hugging Face exporters compare exact classes, so this subclass never exports as GPT-2's MLP.
    """

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.relu(self.up(x)).square())
