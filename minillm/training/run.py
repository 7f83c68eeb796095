"""Hand an assembled run (``assembly.assemble``) to Lightning. ``train.py`` is the command-line
wrapper: ``train(assemble(cfg))``."""

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import OmegaConf

from minillm.config import instantiate_checked
from minillm.training.assembly import Run
from minillm.training.checkpoint_io import AtomicCheckpointIO
from minillm.training.loggers import finish_loggers, make_loggers


def train(run: Run) -> dict[str, float]:
    """Train the assembled ``run``; return the final logged metrics (floats).

    The loggers are built here but start nothing: a W&B run is created (and the hyperparameters
    logged) at fit start, once the data is prepared, so a run whose data cannot be read leaves no
    logger files behind.
    """
    cfg, module = run.cfg, run.module
    if cfg.trainer.get("accelerator") in ("gpu", "cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for the fp32 parts
    rank_zero_info(f"Run directory: {run.run_dir}")
    if rank_zero_only.rank == 0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(module.config, run.run_dir / "config.yaml")
    if run.compile:
        module.model.compile()  # in place: parameter names (and checkpoints) stay those of the eager model
    loggers = make_loggers(cfg.logger, run.run_dir, resuming=run.ckpt_path is not None)
    # AtomicCheckpointIO: checkpoints are written atomically and read with weights_only=True,
    # the resume below included.
    trainer: L.Trainer = instantiate_checked(
        cfg.trainer, callbacks=[instantiate_checked(c) for c in cfg.callbacks.values()],
        logger=loggers or False, default_root_dir=str(run.run_dir), plugins=[AtomicCheckpointIO()])
    try:
        trainer.fit(module, datamodule=run.datamodule, ckpt_path=run.ckpt_path, weights_only=True)
    finally:
        finish_loggers(loggers)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}
