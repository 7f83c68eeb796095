"""Load a training checkpoint for evaluation, sampling or a notebook: only its path is needed.

A checkpoint is plain data, read with ``weights_only=True`` (docs/reliability.md, Untrusted
checkpoints): Lightning's state plus ``config`` (the resolved run config as a dict), ``tokenizer``
(its JSON), ``tokens_seen``, ``rng_states`` and ``nonfinite_skips``.
"""

import pickle
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from minillm.model import Transformer, build_model


class LoadedCheckpoint(NamedTuple):
    """A model in eval mode, its tokenizer and the run config it was trained with."""

    model: Transformer
    tokenizer: Tokenizer
    cfg: DictConfig


def load_plain(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)``: never runs code from the file. ValueError says
    whether the file is missing, holds Python objects (refused) or is truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ckpt_path={str(path)!r}: no such file (train.py writes "
                         "<run dir>/checkpoints/last.ckpt and best.ckpt)")
    mmap = mmap and zipfile.is_zipfile(path)  # torch.load maps only zip-format files
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if "weights only" not in str(e).lower() or not found:  # a damaged pickle, not a crafted one
            raise ValueError(_corrupt(path, e)) from None
        raise ValueError(
            f"ckpt_path={str(path)!r}: refused: the file holds Python objects, not only tensors and "
            f"plain data, and unpickling them could run code from it ({found[0]}); minillm "
            "checkpoints never need that. Load it only if you trust its origin "
            "(torch.load(..., weights_only=False))") from None
    except Exception as e:  # zip/pickle/storage errors of a damaged file come in many types
        raise ValueError(_corrupt(path, e)) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"ckpt_path={str(path)!r} is not a checkpoint: it holds a "
                         f"{type(checkpoint).__name__}, not a dict")
    return checkpoint


def _corrupt(path: Path, e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return (f"ckpt_path={str(path)!r} is not a readable checkpoint (truncated, corrupt or not a "
            f"torch file): {type(e).__name__}: {first[:200]}")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The raw minillm checkpoint dict, read with ``weights_only=True``; ValueError names what is wrong."""
    checkpoint = load_plain(path, map_location, mmap)
    missing = [k for k in ("state_dict", "config", "tokenizer") if k not in checkpoint]
    if missing:
        raise ValueError(f"ckpt_path={str(path)!r} is not a minillm training checkpoint "
                         f"(missing {missing})")
    return checkpoint


def model_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``Transformer``'s weights from a LightningModule state dict (``model.`` prefix and
    torch.compile's ``_orig_mod.`` removed)."""
    return {key.replace("_orig_mod.", "").removeprefix("model."): value for key, value in state_dict.items()}


def match_state_dict_keys(state_dict: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` renamed to ``module``'s own keys, adding or removing torch.compile's
    ``_orig_mod.`` segments: a compiled run's checkpoint loads into an eager model and back."""
    canonical = {key.replace("_orig_mod.", ""): key for key in module.state_dict()}
    return {canonical.get(key.replace("_orig_mod.", ""), key): value for key, value in state_dict.items()}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """``(model, tokenizer, cfg)`` from a checkpoint path; the model is in eval mode."""
    return unpack_checkpoint(read_checkpoint(path, map_location), map_location)


def unpack_checkpoint(checkpoint: dict, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """``(model, tokenizer, cfg)`` from a checkpoint dict read by ``read_checkpoint``."""
    cfg = OmegaConf.create(checkpoint["config"])
    model = checkpoint_model(checkpoint, map_location)
    # Tokenizer.from_str is minillm.data.load_tokenizer, without importing Lightning for a notebook.
    return LoadedCheckpoint(model, Tokenizer.from_str(checkpoint["tokenizer"]), cfg)


def checkpoint_model(checkpoint: dict, map_location: str | torch.device = "cpu", **changes: dict) -> Transformer:
    """The checkpoint's model with its weights, in eval mode; ``changes`` update groups of its model
    config first (``attention={"backend": "math"}``): the same weights under another kernel or scaling."""
    model = build_model(OmegaConf.merge(checkpoint["config"]["model"], changes))
    model.load_state_dict(model_state_dict(checkpoint["state_dict"]))
    return model.to(map_location).eval()
