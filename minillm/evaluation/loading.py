"""What every evaluation mode starts from: the checkpoint on a device, and its data."""

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from minillm.checkpoint import LoadedCheckpoint, read_checkpoint, unpack_checkpoint


def pick_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name}: no CUDA device is available; use device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a torch device (try auto, cpu, cuda)") from None


def load(cfg: DictConfig) -> tuple[LoadedCheckpoint, dict[str, Any]]:
    """The checkpoint named by ``cfg.ckpt_path`` on ``cfg.device``, and its raw dict."""
    if not cfg.get("ckpt_path"):
        raise ValueError("ckpt_path is required, e.g. "
                         "python eval.py ckpt_path=runs/DATE/TIME/checkpoints/best.ckpt")
    device = pick_device(cfg.get("device", "auto"))
    checkpoint = read_checkpoint(cfg.ckpt_path, device)
    return unpack_checkpoint(checkpoint, device), checkpoint


def checkpoint_datamodule(run_cfg: DictConfig, **overrides: Any):
    """The run's datamodule, set up for evaluation; ``None`` overrides keep the run's value."""
    data_cfg = run_cfg.data.copy()
    for key, value in overrides.items():
        if value is not None:
            data_cfg[key] = value
    if data_cfg.get("document_mask"):  # evaluation calls the model on whole windows: (x, y) batches
        data_cfg.document_mask = False
    datamodule = instantiate(data_cfg)
    datamodule.setup("validate")
    return datamodule
