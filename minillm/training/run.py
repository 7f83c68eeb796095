"""Assemble a run from its composed config (model, data, optimizer, scheduler, trainer, loggers,
callbacks) and hand it to Lightning. ``train.py`` is the command-line wrapper."""

import netrc
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from minillm.model import build_model
from minillm.training.checkpoint_io import AtomicCheckpointIO
from minillm.training.loggers import wandb_resume
from minillm.training.module import LanguageModel
from minillm.training.sweep import wandb_grouping


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as ``cfg`` says; return the final logged metrics (floats)."""
    run_dir = resolve_run_dir(cfg)
    ckpt_path = resume_path(cfg.ckpt_path, run_dir)
    if cfg.trainer.get("accelerator") in ("gpu", "cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for the fp32 parts
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = build_model(cfg.model)
    with open_dict(cfg):
        cfg.num_params = model.num_params()
        cfg.num_params_active = model.num_params(active=True)
    rank_zero_info(f"Model: {cfg.num_params:,} parameters ({cfg.num_params_active:,} active per token)")
    rank_zero_info(f"Run directory: {run_dir}")
    config = OmegaConf.to_container(cfg, resolve=True)
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, run_dir / "config.yaml")
    if _compile(cfg):
        model.compile()  # in place: parameter names (and checkpoints) stay those of the eager model
    optimizer, scheduler = instantiate(cfg.optimizer), instantiate(cfg.scheduler)
    # Dry run on a throwaway parameter: a bad schedule fails now, not after data preparation.
    scheduler(optimizer([torch.zeros(1, requires_grad=True)]))
    nonfinite = cfg.get("nonfinite", {})
    module = LanguageModel(model, optimizer, scheduler, config,
                           max_nonfinite_skips=nonfinite.get("max_skips", 0),
                           nonfinite_check=nonfinite.get("check", "auto"))
    loggers = _loggers(cfg.logger, run_dir, resuming=ckpt_path is not None)
    # AtomicCheckpointIO: checkpoints are written atomically and read with weights_only=True,
    # the resume below included.
    trainer = instantiate(cfg.trainer, callbacks=[instantiate(c) for c in cfg.callbacks.values()],
                          logger=loggers or False, default_root_dir=str(run_dir),
                          plugins=[AtomicCheckpointIO()])
    for logger in loggers:
        logger.log_hyperparams(config)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        _finish_wandb(loggers)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``cfg.run_dir`` if set, else Hydra's run directory; written back so configs can refer to it."""
    if cfg.get("run_dir") is None:
        if not HydraConfig.initialized():
            raise ValueError("run_dir=null outside a Hydra app: set run_dir=DIR")
        with open_dict(cfg):
            cfg.run_dir = HydraConfig.get().runtime.output_dir
    return Path(cfg.run_dir).absolute()


def resume_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """The checkpoint to resume from: a path, ``last`` for <run_dir>/checkpoints/last.ckpt, or
    ``auto`` for that file if it exists, else none (a fresh start: what a job that a cluster may
    requeue passes)."""
    if ckpt_path is None:
        return None
    last = run_dir / "checkpoints" / "last.ckpt"
    if ckpt_path == "auto":
        return str(last) if last.is_file() else None
    path = last if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        hint = " (pass hydra.run.dir=<the run's directory> with ckpt_path=last)" if ckpt_path == "last" else ""
        raise ValueError(f"ckpt_path={ckpt_path}: no checkpoint file at {path}{hint}")
    return str(path)


def _compile(cfg: DictConfig) -> bool:
    """``compile``: true, false, or auto (on when training on a GPU)."""
    value = cfg.get("compile", False)
    if value == "auto":
        return cfg.trainer.get("accelerator") in ("gpu", "cuda")
    if not isinstance(value, bool):
        raise ValueError(f"compile={value}: must be true, false or auto (on for a GPU trainer)")
    return value


def _loggers(logger_cfg: DictConfig | None, run_dir: Path, resuming: bool) -> list[Any]:
    """Instantiate each configured logger; W&B goes offline unless the user is logged in, groups
    the runs of a sweep (``minillm.training.sweep.wandb_grouping``) and continues the run of
    ``run_dir`` when resuming (``minillm.training.loggers.wandb_resume``)."""
    logger_cfg = logger_cfg or {}
    if any("WandbLogger" in str(c.get("_target_", "")) for c in logger_cfg.values()) and \
            "WANDB_MODE" not in os.environ and not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"  # never prompt for a login
    return [instantiate(c, **wandb_grouping(c), **wandb_resume(c, run_dir, resuming))
            for c in logger_cfg.values()]


def _finish_wandb(loggers: list[Any]) -> None:
    """Close the W&B run, else the next run of a multirun would log into it."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False
