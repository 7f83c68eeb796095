"""``mode=experts``: expert-load heatmap of an MoE checkpoint on validation batches, and each MoE
layer's load imbalance (max/mean tokens per expert). See docs/moe.md (Observability).
"""

import itertools
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from minillm.config import check_int
from minillm.evaluation.loading import checkpoint_datamodule, load
from minillm.training.moe import plot_expert_load


def expert_load(cfg: DictConfig) -> dict[str, Any]:
    """Plot and summarise the expert load of ``cfg.ckpt_path`` on its validation split."""
    n_batches = cfg.get("expert_batches", 8)
    check_int(n_batches, "expert_batches")
    (model, _, run_cfg), checkpoint = load(cfg)
    datamodule = checkpoint_datamodule(run_cfg, cfg)
    path = Path(cfg.ckpt_path).parent / "expert_load.png"
    batches = itertools.islice(datamodule.val_dataloader(), n_batches)
    loads = plot_expert_load(model, batches, path)  # (S, L, E)
    total = loads.sum(dim=0)  # (L, E) tokens per expert over all batches
    imbalance = (total.max(dim=-1).values / total.mean(dim=-1)).tolist()
    result = {"ckpt_path": str(cfg.ckpt_path), "step": int(checkpoint.get("global_step", 0)),
              "batches": len(loads), "imbalance": imbalance, "figure": str(path)}
    print(f"{cfg.ckpt_path}: load imbalance (max/mean) per MoE layer over {len(loads)} validation "
          f"batches: {', '.join(f'{v:.2f}' for v in imbalance)}\n  heatmap written to {path}")
    return result
