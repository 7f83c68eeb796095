"""The checks of a training run, each a pure function of the config or of one object the run will
use, raising a ``ValueError`` that names the key, its value and what would be valid; ``assemble``
calls them in order (see ``minillm.training.assembly``).
"""

import typing

import torch
from omegaconf import DictConfig, OmegaConf

from minillm.checkpoint import model_state_dict, read_checkpoint
from minillm.config import check_int
from minillm.model import Transformer

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_compile(value, trainer: DictConfig) -> bool:
    """``compile``: true, false, or auto (on when training on a GPU); whether to compile."""
    if value == "auto":
        return trainer.get("accelerator") in ("gpu", "cuda")
    if not isinstance(value, bool):
        raise ValueError(f"compile={value}: must be true, false or auto (on for a GPU trainer)")
    return value


def _precisions() -> list[str]:
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT  # a Union of Literals

    kinds = typing.get_args(_PRECISION_INPUT)
    return list(dict.fromkeys(str(p) for kind in kinds for p in typing.get_args(kind)))


def check_trainer(trainer: DictConfig) -> None:
    """Accelerator and devices that exist, a known precision, and accumulation that keeps
    validation (and so checkpoints) on optimizer-step boundaries."""
    accelerator = trainer.get("accelerator", "auto")
    if accelerator not in ACCELERATORS:
        raise ValueError(f"trainer.accelerator={accelerator!r} is not one of {list(ACCELERATORS)}")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"trainer.accelerator={accelerator} but no CUDA device is available; "
                             "use trainer=cpu")
        devices = trainer.get("devices", 1)
        if isinstance(devices, int) and devices > torch.cuda.device_count():
            raise ValueError(f"trainer.devices={devices} but only {torch.cuda.device_count()} CUDA "
                             f"device(s) are available; valid: 1..{torch.cuda.device_count()} or -1")
    precision = str(trainer.get("precision", "32-true"))
    if precision not in _precisions():
        raise ValueError(f"trainer.precision={precision!r} is not one of {_precisions()}")
    for key in ("max_steps", "accumulate_grad_batches", "log_every_n_steps"):
        check_int(trainer.get(key, 1), f"trainer.{key}")
    accumulate, interval = trainer.get("accumulate_grad_batches", 1), trainer.get("val_check_interval")
    check_int(interval, "trainer.val_check_interval")  # micro-batches: the training stream is endless
    if interval % accumulate:
        multiples = [accumulate * i for i in range(1, 4)]
        raise ValueError(
            f"trainer.val_check_interval={interval} is not a multiple of "
            f"trainer.accumulate_grad_batches={accumulate}: validation and checkpoints would fall "
            f"inside an accumulation window, which a resume cannot replay; valid: {multiples}, ...")


def check_vocab(model: Transformer, datamodule) -> None:
    """The embedding table must hold every id the tokenizer can emit (it has at most data.vocab_size)."""
    if model.vocab_size < datamodule.vocab_size:
        raise ValueError(f"model.vocab_size={model.vocab_size} is smaller than data.vocab_size="
                         f"{datamodule.vocab_size}: token ids up to {datamodule.vocab_size - 1} would "
                         "have no embedding; valid: model.vocab_size >= data.vocab_size "
                         "(the default is ${data.vocab_size})")


def check_context(model: Transformer, seq_len: int) -> None:
    """Training windows must fit a position scheme that has a length limit (a learned table)."""
    max_len = model.position.max_len
    if max_len is not None and seq_len > max_len:
        raise ValueError(f"data.seq_len={seq_len} is longer than the {type(model.position).__name__} "
                         f"position table (model.max_seq_len={max_len}); valid: data.seq_len <= "
                         f"{max_len}, or raise model.max_seq_len")


def check_resume(path: str, model: Transformer, model_cfg: DictConfig) -> None:
    """The checkpoint must be a full training checkpoint whose weights fit this model."""
    checkpoint = read_checkpoint(path, mmap=True)  # memory-mapped: reading it costs no copy
    if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
        raise ValueError(f"ckpt_path={path!r} holds weights only (no optimizer or loop state): "
                         "training cannot resume from it")
    saved = {k: tuple(v.shape) for k, v in model_state_dict(checkpoint["state_dict"]).items()}
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mismatch = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    if mismatch:
        key = mismatch[0]
        differs = _differences(checkpoint["config"].get("model", {}),
                               OmegaConf.to_container(model_cfg, resolve=True))
        raise ValueError(f"ckpt_path={path!r} does not fit the configured model: {key} is "
                         f"{saved.get(key, 'missing')} in the checkpoint, {wanted.get(key, 'absent')} "
                         f"here ({len(mismatch)} tensors differ); config differences: "
                         f"{differs or 'none found'}")


def _differences(saved: dict, wanted: dict, prefix: str = "model.") -> list[str]:
    """``key: saved -> configured`` for the first few differing leaves of two config dicts."""
    out = []
    for key in sorted(saved.keys() | wanted.keys()):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out[:5]
