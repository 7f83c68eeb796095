"""Normalisation layers. Contract of the ``model/norm`` group: ``Norm(d_model, **yaml_options)``.

LayerNorm is ``torch.nn.LayerNorm`` (its fused kernel is fast everywhere); RMSNorm is written out
here because ``torch.nn.RMSNorm`` runs several times slower than this on CPU in eager mode.
"""

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 as in Llama."""

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight
