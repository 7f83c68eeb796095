"""Mixture-of-Experts feed-forward layer (Shazeer et al. 2017; Fedus et al. 2022, Switch).

Token-choice top-k routing (``router.py``) over routed SwiGLU experts (``experts.py``), plus
optional always-active shared experts (DeepSeekMoE, Dai et al. 2024) and fine-grained experts
(``d_expert`` set independently of ``d_model``). Dropless by default: tokens are sorted by expert
and each expert runs on one contiguous slice (``dispatch``). With ``capacity_factor`` each expert
takes at most ``ceil(capacity_factor * N * K / E)`` assignments of the batch; earlier positions
have priority (then earlier sequences, then a token's better choices), so routing never depends on
later positions and the layer stays causal (GShard's "first choices first" would not be). The
overflow is dropped (its gate is zeroed, the token keeps its residual) and counted in
``stats["dropped"]``. Capacity applies while training only: evaluation and KV-cache decoding are
dropless.

Auxiliary losses (the ``model/ffn`` contract in ``ffn.py``), present only when their coefficient
is non-zero: ``aux_losses["load_balance"] = aux_loss_coef * balance_loss`` (Mixtral's form for this
layer, k at balance; see ``router.py``) and ``aux_losses["z_loss"] = z_loss_coef * z_loss``.
``Transformer.forward(idx, targets=y).aux`` averages each over MoE layers. Hugging Face instead pools every
layer's logits before taking one product f.P; per-layer means and the pooled value differ.

``stats`` holds detached device tensors from the latest forward, read only when logging:
tokens_per_expert (E,), imbalance (max/mean load), entropy (mean routing entropy, nats),
dropped (assignments), balance_loss and z_loss (unweighted).

Notation: N tokens (B*T), E n_experts, K top_k, C d_model, F d_expert.
"""

import math

import torch
from torch import Tensor, nn

from minillm.model.experts import Experts
from minillm.model.ffn import SwiGLU, swiglu_hidden
from minillm.model.router import Routing, TopKRouter, balance_loss, z_loss


class MoE(nn.Module):
    """Top-k routed SwiGLU experts with optional shared experts, capacity and aux-free balancing."""

    def __init__(self, d_model: int, n_experts: int = 8, top_k: int = 2, d_expert: int | None = None,
                 n_shared: int = 0, d_shared: int | None = None, gate: str = "softmax",
                 renormalize: bool = True, router_jitter: float = 0.0, aux_loss_coef: float = 0.01,
                 z_loss_coef: float = 0.0, bias_update_rate: float = 0.0,
                 capacity_factor: float | None = None, dispatch: str = "auto") -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"model.ffn.n_experts={n_experts} must be >= 1")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"model.ffn.top_k={top_k} must be between 1 and "
                             f"model.ffn.n_experts={n_experts}")
        for key, value in [("d_expert", d_expert), ("d_shared", d_shared)]:
            if value is not None and value < 1:
                raise ValueError(f"model.ffn.{key}={value} must be >= 1 (or null for the default)")
        if n_shared < 0:
            raise ValueError(f"model.ffn.n_shared={n_shared} must be >= 0")
        for key, value in [("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)]:
            if value < 0:
                raise ValueError(f"model.ffn.{key}={value} must be >= 0")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"model.ffn.capacity_factor={capacity_factor} must be > 0 "
                             "(or null for dropless routing)")
        d_expert = d_expert or swiglu_hidden(d_model)
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router = TopKRouter(d_model, n_experts, top_k, gate, renormalize, router_jitter,
                                 bias_update_rate)
        self.experts = Experts(d_model, n_experts, d_expert, dispatch)
        # n_shared experts of width d_shared always run: one SwiGLU of width n_shared * d_shared.
        self.shared = SwiGLU(d_model, n_shared * (d_shared or d_expert)) if n_shared else None
        self.combine = self._dropless if capacity_factor is None else self._capacity
        self.aux_losses: dict[str, Tensor] = {}
        self.stats: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        r = self.router(x)
        flat = r.experts.flatten()  # (N*K,) expert of each assignment, token-major
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))  # (E,) on device: no host sync
        self.router.record_load(counts)
        batch = shape[0] if len(shape) == 3 else 1  # B of (B, T, C): capacity priority is by position
        # Capacity is a training-time budget: evaluation and KV-cache decoding (one token per step,
        # so no competition for slots) run dropless, which keeps cached and full decoding equal.
        combine = self.combine if self.training else self._dropless
        out, dropped = combine(x, r, flat, counts, batch)
        if self.shared is not None:
            out = out + self.shared(x)
        self._losses_and_stats(r, counts, dropped)
        return out.view(shape)

    def _dropless(self, x: Tensor, r: Routing, flat: Tensor, counts: Tensor,
                  batch: int) -> tuple[Tensor, Tensor]:
        order = flat.argsort(stable=True)  # (N*K,) assignments grouped by expert
        y = self.experts(x[order // self.top_k], counts)  # (N*K, C) in expert order
        out = torch.empty_like(y)
        out[order] = y  # back to token-major order
        out = out.view(-1, self.top_k, x.shape[-1]) * r.gates.to(y.dtype)[..., None]  # (N, K, C)
        return out.sum(dim=1), torch.zeros((), dtype=torch.long, device=x.device)

    def _capacity(self, x: Tensor, r: Routing, flat: Tensor, counts: Tensor,
                  batch: int) -> tuple[Tensor, Tensor]:
        n, c, e, k = x.shape[0], x.shape[-1], self.n_experts, self.top_k
        cap = math.ceil(self.capacity_factor * n * k / e)
        # Priority: earlier positions first, then earlier sequences, then better choices, so that
        # no token's routing depends on a later position (the layer stays causal).
        prio = torch.arange(n * k, device=x.device).view(batch, -1, k).transpose(0, 1).flatten()
        order = flat[prio].argsort(stable=True)  # priority-ordered assignments grouped by expert
        starts = counts.cumsum(0) - counts  # (E,) first sorted row of each expert
        pos = torch.empty_like(flat)  # rank of each assignment within its expert's queue
        pos[prio[order]] = torch.arange(n * k, device=x.device) - starts[flat[prio[order]]]
        keep = pos < cap  # (N*K,) token-major, like flat
        # Row of each assignment in the (E * cap) buffer; the dropped all go to a spare last row.
        row = torch.where(keep, flat * cap + pos, e * cap)
        buf = x.new_zeros(e * cap + 1, c).index_put((row,), x.repeat_interleave(k, dim=0))
        y = self.experts.padded(buf[:-1].view(e, cap, c)).view(e * cap, c)
        y = torch.cat([y, y.new_zeros(1, c)])  # the spare row reads as zero output
        gates = (r.gates.flatten() * keep).to(y.dtype)  # (N*K,) dropped gates are 0
        out = (y[row] * gates[:, None]).view(n, k, c).sum(dim=1)  # (N, C)
        return out, (~keep).sum()

    def _losses_and_stats(self, r: Routing, counts: Tensor, dropped: Tensor) -> None:
        balance = balance_loss(r.probs, r.experts, self.n_experts)
        z = z_loss(r.logits)
        self.aux_losses = {}
        if self.aux_loss_coef:
            self.aux_losses["load_balance"] = self.aux_loss_coef * balance
        if self.z_loss_coef:
            self.aux_losses["z_loss"] = self.z_loss_coef * z
        with torch.no_grad():
            load = counts.float()
            probs = r.probs.detach()
            self.stats = {
                "tokens_per_expert": load, "imbalance": load.max() / load.mean(),
                "entropy": -torch.xlogy(probs, probs).sum(dim=-1).mean(),
                "dropped": dropped.float(), "balance_loss": balance.detach(), "z_loss": z.detach()}

    def residual_out(self) -> list[Tensor]:
        """The experts' down projections (and the shared experts'), which write into the residual."""
        return [self.experts.w_down] + (self.shared.residual_out() if self.shared is not None else [])

    def update_bias(self) -> None:
        """Auxiliary-loss-free balancing step (after each optimizer step); no-op when disabled."""
        self.router.update_bias()

    def inactive_params(self) -> int:
        """Routed-expert parameters a token does not use: (E - K) / E of the expert bank."""
        bank = sum(p.numel() for p in self.experts.parameters())
        return bank * (self.n_experts - self.top_k) // self.n_experts
