"""One assembly of a training run: every object built once from the composed config, checked, and
handed to Lightning by ``train``.

``assemble(cfg)`` reports the first configuration error as a ``ValueError`` naming the key, its value
and what would be valid, before any data is read or compute is spent: settings that need no object
first (``checks``), then each object as it is built (its constructor checks its own keys), then the
checks between objects. It returns what the run uses: the data module (not yet prepared), the model
(real, on the CPU, built once) and the ``LanguageModel`` holding it, whose ``configure_optimizers``
is also the optimizer check: Lightning calls it again once the strategy has placed (under FSDP,
sharded) the parameters, which is when a run's optimizer must be built (fused on a GPU).
"""

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf, open_dict

from minillm.config import instantiate_checked, root_cause
from minillm.data import TokenDataModule
from minillm.model import build_model
from minillm.training.checks import check_compile, check_context, check_resume, check_trainer, check_vocab
from minillm.training.module import LanguageModel


@dataclass
class Run:
    """The checked objects of one training run and where it writes."""

    cfg: DictConfig
    run_dir: Path
    ckpt_path: str | None  # the checkpoint to resume from, if any
    datamodule: TokenDataModule
    module: LanguageModel
    compile: bool


def assemble(cfg: DictConfig) -> Run:
    """Build and check every object of the run ``cfg`` describes (see the module docstring)."""
    check_trainer(cfg.trainer)
    compile_model = check_compile(cfg.get("compile", False), cfg.trainer)
    nonfinite = cfg.get("nonfinite") or {}
    datamodule = instantiate_checked(cfg.data)  # checks data.* (no data is read)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before the weights are drawn
    model = build_model(cfg.model)
    check_vocab(model, datamodule)
    check_context(model, datamodule.seq_len)
    run_dir = resolve_run_dir(cfg)
    ckpt_path = resume_path(cfg.get("ckpt_path"), run_dir)
    if ckpt_path is not None:  # ckpt_path=auto with no checkpoint yet: a fresh start
        check_resume(ckpt_path, model, cfg.model)
    with open_dict(cfg):
        cfg.num_params = model.num_params()
        cfg.num_params_active = model.num_params(active=True)
    module = LanguageModel(model, instantiate_checked(cfg.optimizer), instantiate_checked(cfg.scheduler),
                           OmegaConf.to_container(cfg, resolve=True),
                           max_nonfinite_skips=nonfinite.get("max_skips", 0),
                           nonfinite_check=nonfinite.get("check", "auto"))
    check_optimization(module, cfg.optimizer)
    rank_zero_info(f"Model: {cfg.num_params:,} parameters ({cfg.num_params_active:,} active per token)")
    return Run(cfg, run_dir, ckpt_path, datamodule, module, compile_model)


def check_optimization(module: LanguageModel, optimizer_cfg: DictConfig) -> None:
    """The optimizer and scheduler the run will build, built once now: their constructors' checks."""
    try:
        optimizer = module.build_optimizer()
    except ValueError as e:  # torch's messages do not name the config keys: show them
        options = {k: v for k, v in OmegaConf.to_container(optimizer_cfg).items() if k[0] != "_"}
        raise ValueError(f"optimizer: {e} (optimizer settings: {options})") from None
    try:
        module.scheduler_factory(optimizer)
    except Exception as e:  # Hydra wraps a partial's call errors too
        raise root_cause(e) from None


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
