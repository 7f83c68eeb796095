"""``MuonAdamW``: ``torch.optim.Muon`` for the hidden matrices, ``torch.optim.AdamW`` for the rest,
behind the one ``torch.optim.Optimizer`` that Lightning, the schedule and checkpoints see.

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is scalable for LLM training") orthogonalizes the
momentum of a 2-D weight, so it takes the ``nn.Linear`` weights inside ``model.blocks`` only; MoE
routers, 3-D expert banks, an untied head, embeddings, norms and biases stay with AdamW
(``MuonAdamW.param_groups_of``). Fused ``qkv`` and ``gate_up`` are orthogonalized whole, keeping
Muon on real leaf parameters. docs/recipe.md gives the split, the learning rates (``muon_lr`` 0.02,
``adjust_lr_fn="original"``, measured against ``match_rms_adamw``) and why.
"""

import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import AdamW, Muon, Optimizer

from minillm.config import is_int

ADJUST_LR_FNS = ("original", "match_rms_adamw")


def _hidden_matrices(model: nn.Module) -> set[int]:
    """ids of the weights that Muon updates: 2-D ``nn.Linear`` weights in ``model.blocks``, routers excluded."""
    from minillm.model.router import TopKRouter  # the model package stays free of training imports

    routers = {id(p) for m in model.modules() if isinstance(m, TopKRouter) for p in m.parameters()}
    blocks = getattr(model, "blocks", nn.ModuleList())
    return {id(m.weight) for m in blocks.modules()
            if isinstance(m, nn.Linear) and m.weight.dim() == 2 and id(m.weight) not in routers}


class MuonAdamW(Optimizer):
    """Muon for the hidden matrices, AdamW for everything else, as one optimizer.

    ``param_groups`` exposes both optimizers' groups (AdamW's first, so group 0 carries
    ``optimizer.lr``), the same dict objects the inner optimizers read, so a scheduler sets every
    group's lr; ``state_dict`` is the standard flat format over all groups; ``step(closure)`` calls
    the closure once. torch has no composite optimizer (``ZeroRedundancyOptimizer`` and the
    ``_NamedOptimizer`` wrappers hold one class), hence this small one.
    """

    def __init__(self, params: Iterable[dict[str, Any]] | Iterable[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, muon_lr: float | None = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5,
                 adjust_lr_fn: str = "original", fused: bool | None = None) -> None:
        muon_lr = lr if muon_lr is None else muon_lr
        _check(lr, muon_lr, betas, eps, weight_decay, momentum, nesterov, ns_steps, adjust_lr_fn)
        muon_groups, adamw_groups, params = [], [], list(params)
        if params and isinstance(params[0], Tensor):  # plain parameters: all AdamW's
            params = [{"params": params}]
        for group in params:
            group = dict(group)
            if group["params"]:  # empty groups (a model without routers) would only shift indices
                (muon_groups if group.pop("muon", False) else adamw_groups).append(group)
        self.optimizers: list[Optimizer] = [AdamW(adamw_groups, lr=lr, betas=tuple(betas), eps=eps,
                                                  weight_decay=weight_decay, fused=fused)]
        if muon_groups:
            self.optimizers.append(Muon(muon_groups, lr=muon_lr, weight_decay=weight_decay,
                                        momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                        adjust_lr_fn=adjust_lr_fn))
        super().__init__([g for o in self.optimizers for g in o.param_groups], {})
        self._share_state()

    def _share_state(self) -> None:
        """One per-parameter state dict for all: each optimizer touches only its own parameters'
        entries, and ``state_dict`` and Lightning's device moves see every entry."""
        self.state = defaultdict(dict)
        for optimizer in self.optimizers:
            self.state.update(optimizer.state)
            optimizer.state = self.state

    @staticmethod
    def param_groups_of(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Three groups: Muon's hidden matrices, then ``param_groups`` of the rest (AdamW's other
        matrices, decayed; its embeddings, norms and biases, not). ``build_optimizer`` calls this."""
        hidden = _hidden_matrices(model)
        muon = [p for p in model.parameters() if p.requires_grad and id(p) in hidden]
        return [{"params": muon, "weight_decay": weight_decay, "muon": True},
                *param_groups(model, weight_decay, skip=hidden)]

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every group; ``closure`` (Lightning's forward + backward) runs once."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of a ``MuonAdamW`` over the same groups, in order."""
        saved, state, start = state_dict["param_groups"], state_dict["state"], 0
        if len(saved) != len(self.param_groups):
            raise ValueError(f"the saved optimizer state has {len(saved)} parameter groups, this "
                             f"optimizer {len(self.param_groups)}: not a state of this model and optimizer")
        for optimizer in self.optimizers:
            part = saved[start:start + len(optimizer.param_groups)]
            ids = [i for g in part for i in g["params"]]
            optimizer.load_state_dict({"state": {i: state[i] for i in ids if i in state},
                                       "param_groups": part})
            start += len(part)
        # torch's load_state_dict gives each optimizer new group and state dicts: expose those
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self._share_state()


def _check(lr, muon_lr, betas, eps, weight_decay, momentum, nesterov, ns_steps, adjust_lr_fn) -> None:
    """The settings torch's Muon and AdamW reject (some only at the first step), as one line
    naming ``optimizer.<key>``, its value and what is valid."""
    def real(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    for key, value, ok, valid in [
        *((k, v, real(v) and v >= 0, "a number >= 0") for k, v in
          (("lr", lr), ("muon_lr", muon_lr), ("weight_decay", weight_decay))),
        ("eps", eps, isinstance(eps, (int, float)) and eps > 0, "a number > 0"),
        ("betas", list(betas), len(betas) == 2 and all(real(b) and 0 <= b < 1 for b in betas),
         "two numbers in [0, 1)"),
        ("momentum", momentum, real(momentum) and 0 <= momentum < 1, "in [0, 1)"),
        ("nesterov", nesterov, isinstance(nesterov, bool), "true or false"),
        ("ns_steps", ns_steps, is_int(ns_steps, 1, 99), "an integer in [1, 100)"),
        ("adjust_lr_fn", adjust_lr_fn, adjust_lr_fn in ADJUST_LR_FNS, f"one of {', '.join(ADJUST_LR_FNS)}"),
    ]:
        if not ok:
            raise ValueError(f"optimizer.{key}={value!r} must be {valid}")


def param_groups(model: nn.Module, weight_decay: float, skip: set[int] = frozenset()) -> list[dict[str, Any]]:
    """Two AdamW groups of the parameters not in ``skip`` (ids): matrices decay; norms, biases and
    embeddings (incl. tied head) do not."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights are yielded once
        if p.requires_grad and id(p) not in skip:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_param_groups(factory: Callable, model: nn.Module) -> list[dict[str, Any]]:
    """The groups the optimizer ``factory`` (a class or partial) takes: its class's own
    ``param_groups_of(model, weight_decay)`` (``MuonAdamW``), else ``param_groups``."""
    weight_decay = getattr(factory, "keywords", {}).get("weight_decay", 0.0)
    target = getattr(factory, "func", factory)
    return getattr(target, "param_groups_of", param_groups)(model, weight_decay)


def build_optimizer(factory: Callable, model: nn.Module, fused: bool) -> Optimizer:
    """``factory`` over ``optimizer_param_groups``; with ``fused`` (on a GPU) the fused kernel (one
    kernel for the whole update instead of a few per tensor) where it takes ``fused=`` and the
    config leaves it unset (AdamW, Adam, SGD)."""
    groups = optimizer_param_groups(factory, model)
    try:
        takes_fused = "fused" in inspect.signature(getattr(factory, "func", factory)).parameters
    except (TypeError, ValueError):
        takes_fused = False
    if fused and takes_fused and getattr(factory, "keywords", {}).get("fused") is None:
        return factory(groups, fused=True)
    return factory(groups)
