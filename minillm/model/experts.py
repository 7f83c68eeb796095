"""A bank of SwiGLU experts stored as stacked weights, and the kernels that run it.

``Experts`` takes token rows already sorted by expert with their per-expert ``counts`` (E,) and
returns the expert outputs in the same order. Two interchangeable kernels, picked at construction:

* ``grouped``: one ``torch._grouped_mm`` per projection over all experts (fused on Hopper; a
  per-group loop inside ATen elsewhere). It needs no host sync: offsets stay on the device.
  ``auto`` picks it when torch has it and both widths are multiples of 8 (16-byte rows). Inputs
  that are not bf16 (after autocast) take the sorted loop on CUDA and under ``torch.compile``,
  whose ``_grouped_mm`` accepts bf16 only; eager CPU runs any float dtype.
* ``sorted``: a Python loop over contiguous slices, one matmul per expert; one host sync per
  layer to read the split sizes.

``padded`` runs fixed-size per-expert buffers (E, capacity, C) with one batched matmul, for
capacity-limited routing.

Notation: M sorted rows, E n_experts, C d_model, F d_expert.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
DISPATCH = ("auto", "grouped", "sorted")


class Experts(nn.Module):
    """``n_experts`` SwiGLU experts of hidden size ``d_expert``, weights (E, C, 2F) and (E, F, C)."""

    def __init__(self, d_model: int, n_experts: int, d_expert: int, dispatch: str = "auto") -> None:
        super().__init__()
        if dispatch not in DISPATCH:
            raise ValueError(f"model.ffn.dispatch={dispatch!r} is not one of {list(DISPATCH)}")
        # _grouped_mm wants 16-byte aligned rows: widths that are multiples of 8 suit every dtype.
        aligned = d_model % 8 == 0 and d_expert % 8 == 0
        if dispatch == "grouped" and not (HAS_GROUPED_MM and aligned):
            raise ValueError(f"model.ffn.dispatch='grouped' needs torch._grouped_mm (torch "
                             f"{torch.__version__}: {HAS_GROUPED_MM}) and d_model={d_model}, "
                             f"d_expert={d_expert} multiples of 8; use 'sorted' or 'auto'")
        if dispatch == "auto":
            dispatch = "grouped" if HAS_GROUPED_MM and aligned else "sorted"
        self.dispatch = dispatch
        self.run = self._grouped if dispatch == "grouped" else self._sorted
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, d_model, 2 * d_expert))  # gate, up fused
        self.w_down = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        nn.init.normal_(self.w_gate_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02)

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """Expert outputs (M, C) for rows ``x`` (M, C) sorted by expert, ``counts`` (E,) per expert."""
        return self.run(x, counts)

    def _grouped(self, x: Tensor, counts: Tensor) -> Tensor:
        offs = counts.cumsum(0, dtype=torch.int32)  # (E,) end row of each expert's group
        if torch.is_autocast_enabled(x.device.type):  # autocast does not cover _grouped_mm
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if x.dtype != torch.bfloat16 and (x.device.type != "cpu" or torch.compiler.is_compiling()):
            return self._sorted(x, counts)  # torch.compile's and CUDA's _grouped_mm take bf16 only
        w_gate_up, w_down = self.w_gate_up.to(x.dtype), self.w_down.to(x.dtype)
        gate, up = torch._grouped_mm(x, w_gate_up, offs=offs).chunk(2, dim=-1)  # (M, F) each
        return torch._grouped_mm(F.silu(gate) * up, w_down, offs=offs)  # (M, C)

    def _sorted(self, x: Tensor, counts: Tensor) -> Tensor:
        sizes = counts.tolist()  # the one host sync of this path
        out = [self._expert(e, rows) for e, rows in enumerate(x.split(sizes)) if sizes[e]]
        return torch.cat(out) if out else x.new_zeros(0, x.shape[-1])

    def _expert(self, e: int, x: Tensor) -> Tensor:
        gate, up = (x @ self.w_gate_up[e].to(x.dtype)).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_down[e].to(x.dtype)

    def padded(self, x: Tensor) -> Tensor:
        """Expert e applied to every row of ``x[e]``; x (E, capacity, C) -> (E, capacity, C)."""
        gate, up = torch.bmm(x, self.w_gate_up.to(x.dtype)).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.w_down.to(x.dtype))
