"""Load a training checkpoint for evaluation, sampling or a notebook: only its path is needed.

A checkpoint (``train.py`` writes ``<run dir>/checkpoints/{last,best}.ckpt``) is plain data, so
``torch.load(path, weights_only=True)`` reads it: Lightning's state plus ``config`` (the resolved
run config as a dict), ``tokenizer`` (the tokenizer JSON) and ``tokens_seen``.
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


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The raw checkpoint dict, read with ``weights_only=True``; ValueError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ckpt_path={str(path)!r}: no such file (train.py writes "
                         "<run dir>/checkpoints/last.ckpt and best.ckpt)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise ValueError(f"ckpt_path={str(path)!r} is not a readable checkpoint (truncated, corrupt "
                         f"or not a torch file): {str(e).splitlines()[0]}") from None
    missing = [k for k in ("state_dict", "config", "tokenizer") if k not in checkpoint]
    if not isinstance(checkpoint, dict) or missing:
        raise ValueError(f"ckpt_path={str(path)!r} is not a minillm training checkpoint "
                         f"(missing {missing or 'everything'})")
    return checkpoint


def model_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``Transformer``'s weights from a LightningModule state dict (``model.`` prefix and
    torch.compile's ``_orig_mod.`` removed)."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("_orig_mod.", "")
        out[key.removeprefix("model.")] = value
    return out


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """``(model, tokenizer, cfg)`` from a checkpoint path; the model is in eval mode."""
    return unpack_checkpoint(read_checkpoint(path, map_location), map_location)


def unpack_checkpoint(checkpoint: dict, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """``(model, tokenizer, cfg)`` from a checkpoint dict read by ``read_checkpoint``."""
    cfg = OmegaConf.create(checkpoint["config"])
    model = build_model(cfg.model)
    model.load_state_dict(model_state_dict(checkpoint["state_dict"]))
    model.to(map_location).eval()
    # Tokenizer.from_str is minillm.data.load_tokenizer, without importing Lightning for a notebook.
    return LoadedCheckpoint(model, Tokenizer.from_str(checkpoint["tokenizer"]), cfg)
