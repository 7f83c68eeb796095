"""Evaluation modes of ``eval.py``: ``MODES`` maps a mode name to a function(cfg) -> dict.

A mode is one module here, one entry below, and one ``configs/mode/NAME.yaml`` (``# @package
_global_``) that sets ``mode: NAME`` and only the settings the mode reads (``ckpt_path`` and
``device`` are shared: ``configs/eval.yaml``); it reads the checkpoint with ``loading.load``.
"""

from typing import Any, Callable

from omegaconf import DictConfig

from minillm.evaluation.attention import attention
from minillm.evaluation.experts import expert_load
from minillm.evaluation.export import export
from minillm.evaluation.extrapolate import extrapolate_mode
from minillm.evaluation.loss import evaluate_loss
from minillm.evaluation.report import report
from minillm.evaluation.sample import sample

MODES: dict[str, Callable[[DictConfig], dict[str, Any]]] = {
    "loss": evaluate_loss,
    "sample": sample,
    "report": report,
    "extrapolate": extrapolate_mode,
    "attention": attention,
    "experts": expert_load,
    "export": export,
}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the mode ``cfg.mode`` names."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r} is not an evaluation mode; valid: {sorted(MODES)}")
    return MODES[cfg.mode](cfg)
