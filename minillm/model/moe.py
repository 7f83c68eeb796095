"""Mixture-of-Experts feed-forward layer (Shazeer et al. 2017; Fedus et al. 2022, Switch).

Token-choice top-k routing with softmax gates renormalised over the chosen experts. Each expert is
a SwiGLU. Tokens are sorted by expert and every expert runs on one contiguous slice.

Auxiliary loss (the ``model/ffn`` contract in ``ffn.py``): ``aux_losses["load_balance"]`` is
``aux_loss_coef * E * sum_e f_e * P_e`` with f_e the fraction of tokens whose top-k choices include
expert e (summed over the k slots) and P_e the mean router probability of expert e: exactly the
Hugging Face Mixtral ``load_balancing_loss_func`` on this layer's router logits, so its value is k
(not 1) under perfect balance. The model averages it over MoE layers.

Notation: N tokens (B*T), E experts, K top_k, C d_model, F expert hidden size.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.model.ffn import swiglu_hidden


class MoE(nn.Module):
    """Top-k routed SwiGLU experts with a Switch-Transformer load-balancing loss."""

    def __init__(self, d_model: int, n_experts: int = 8, top_k: int = 2, d_expert: int | None = None,
                 aux_loss_coef: float = 0.01) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"model.ffn.n_experts={n_experts} must be >= 1")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"model.ffn.top_k={top_k} must be between 1 and "
                             f"model.ffn.n_experts={n_experts}")
        d_expert = d_expert or swiglu_hidden(d_model)
        self.n_experts, self.top_k, self.aux_loss_coef = n_experts, top_k, aux_loss_coef
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, d_model, 2 * d_expert))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        nn.init.normal_(self.w_gate_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02)
        self.aux_losses: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        logits = self.router(x)  # (N, E)
        probs = logits.float().softmax(dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)  # (N, K)
        gates = (gates / gates.sum(dim=-1, keepdim=True)).to(x.dtype)
        self.aux_losses = {"load_balance": self.aux_loss_coef * self.balance_loss(probs, experts)}

        flat = experts.flatten()  # (N*K,) expert of each assignment
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()  # one host sync
        token = order // self.top_k
        out = torch.empty(order.shape[0], shape[-1], dtype=x.dtype, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                idx = order[start:start + n]
                gate, up = (x[token[start:start + n]] @ self.w_gate_up[e]).chunk(2, dim=-1)
                out[idx] = (F.silu(gate) * up) @ self.w_down[e]
            start += n
        out = (out.view(-1, self.top_k, shape[-1]) * gates[..., None]).sum(dim=1)  # (N, C)
        return out.view(shape)

    def balance_loss(self, probs: Tensor, experts: Tensor) -> Tensor:
        """E * sum_e f_e * P_e, f counted over all K slots (Mixtral's form; k at balance)."""
        f = F.one_hot(experts, self.n_experts).float().mean(dim=0)  # (K, E)
        p = probs.mean(dim=0)  # (E,)
        return self.n_experts * (f * p).sum()
