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


def required(cfg: DictConfig, key: str, example: str = "ckpt_path=runs/DATE/TIME/checkpoints/last.ckpt"):
    """``cfg[key]``; ValueError with an example command of ``cfg.mode`` when it is not set."""
    if not cfg.get(key):
        raise ValueError(f"{key} is required, e.g. python eval.py mode={cfg.mode} {example}")
    return cfg[key]


def read(cfg: DictConfig) -> tuple[dict[str, Any], torch.device]:
    """The raw checkpoint dict named by ``cfg.ckpt_path``, read onto ``cfg.device``, and that device."""
    path = required(cfg, "ckpt_path")
    device = pick_device(cfg.get("device", "auto"))
    return read_checkpoint(path, device), device


def load(cfg: DictConfig) -> tuple[LoadedCheckpoint, dict[str, Any]]:
    """The checkpoint named by ``cfg.ckpt_path`` on ``cfg.device``, and its raw dict."""
    checkpoint, device = read(cfg)
    return unpack_checkpoint(checkpoint, device), checkpoint


def checkpoint_datamodule(run_cfg: DictConfig, cfg: DictConfig | None = None):
    """The run's datamodule, set up for evaluation; the mode's ``batch_size``, ``val_tokens`` and
    ``num_workers`` replace the run's where ``cfg`` sets them."""
    overrides = {k: cfg.get(k) for k in ("batch_size", "val_tokens", "num_workers")} if cfg else {}
    # document_mask off: evaluation calls the model on whole windows, (x, y) batches
    datamodule = instantiate(run_cfg.data, **{k: v for k, v in overrides.items() if v is not None},
                             document_mask=False)
    datamodule.setup("validate")
    return datamodule
