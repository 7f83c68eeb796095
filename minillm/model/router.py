"""Token-choice top-k router of a Mixture-of-Experts layer and the losses that balance it.

Routing (``TopKRouter``): logits = x W_r; scores = softmax(logits) (Shazeer et al. 2017; Mixtral)
or sigmoid(logits) (DeepSeek-V3); each token picks the top-k experts by score (plus a per-expert
bias in auxiliary-loss-free mode) and its gates are the chosen *unbiased* scores, renormalised to
sum to 1 unless ``renormalize`` is false.

Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3): ``expert_bias`` is added to the
scores for selection only; after every optimizer step ``update_bias()`` moves it by
``bias_update_rate * sign(mean load - load_i)`` using the loads recorded since the last update.
The bias is a persistent buffer (saved in checkpoints) and receives no gradient by design.

Losses, written for one layer's logits (N, E):

* ``balance_loss``: ``E * sum_e f_e * P_e`` with f_e the fraction of tokens whose top-k includes
  expert e (summed over the k slots, so sum_e f_e = k) and P_e the mean routing probability;
  this is Hugging Face Mixtral's ``load_balancing_loss_func`` for one layer: k at perfect
  balance (Switch Transformer's form is the k = 1 case, 1 at balance).
* ``z_loss`` (Zoph et al. 2022, ST-MoE): mean over tokens of logsumexp(logits)^2.

Notation: N tokens, E n_experts, K top_k.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

GATES = {"softmax": lambda logits: logits.softmax(dim=-1), "sigmoid": torch.sigmoid}


class Routing(NamedTuple):
    """One forward's routing decision; logits and probs in float32."""

    logits: Tensor  # (N, E)
    probs: Tensor  # (N, E) routing probabilities, each row sums to 1
    gates: Tensor  # (N, K) weights of the chosen experts
    experts: Tensor  # (N, K) indices of the chosen experts


def balance_loss(probs: Tensor, experts: Tensor, n_experts: int) -> Tensor:
    """Mixtral / Switch load-balancing loss ``E * sum_e f_e * P_e`` of one layer (k at balance)."""
    counts = torch.zeros(n_experts, device=probs.device).index_add_(
        0, experts.flatten(), torch.ones(experts.numel(), device=probs.device))
    return n_experts * (counts / experts.shape[0] * probs.mean(dim=0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return logits.float().logsumexp(dim=-1).square().mean()


class TopKRouter(nn.Module):
    """Linear router choosing ``top_k`` of ``n_experts`` per token; optional aux-free bias."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, gate: str = "softmax",
                 renormalize: bool = True, jitter: float = 0.0, bias_update_rate: float = 0.0) -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"model.ffn.gate={gate!r} is not one of {sorted(GATES)}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"model.ffn.router_jitter={jitter} must be in [0, 1)")
        if bias_update_rate < 0:
            raise ValueError(f"model.ffn.bias_update_rate={bias_update_rate} must be >= 0 "
                             "(0 disables auxiliary-loss-free balancing)")
        self.top_k, self.jitter, self.bias_update_rate = top_k, jitter, bias_update_rate
        self.proj = nn.Linear(d_model, n_experts, bias=False)
        self.gate, self.score = gate, GATES[gate]
        # Sigmoid scores are independent per expert; normalise them for the loss and entropy.
        self.to_probs = (lambda s: s) if gate == "softmax" else (lambda s: s / s.sum(-1, keepdim=True))
        self.renormalize = renormalize
        on = bias_update_rate > 0  # the bias is a persistent buffer; the load since the last step is not
        self.register_buffer("expert_bias", torch.zeros(n_experts) if on else None)
        self.register_buffer("load", torch.zeros(n_experts) if on else None, persistent=False)

    def forward(self, x: Tensor) -> Routing:
        if self.training and self.jitter:  # Switch: multiplicative input noise while training
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.proj(x).float()  # (N, E)
        scores = self.score(logits)
        select = scores if self.expert_bias is None else scores + self.expert_bias
        experts = select.topk(self.top_k, dim=-1).indices  # (N, K)
        gates = scores.gather(-1, experts)
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return Routing(logits, self.to_probs(scores), gates, experts)

    @torch.no_grad()
    def record_load(self, counts: Tensor) -> None:
        """Add one forward's tokens per expert (E,) to the load used by the next ``update_bias``."""
        if self.expert_bias is not None and self.training:
            self.load += counts

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3 bias step: lower overloaded experts, raise underloaded ones; reset the load."""
        if self.expert_bias is None:
            return
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.load)  # every rank must take the same step
        self.expert_bias += self.bias_update_rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()
