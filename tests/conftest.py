"""Shared fixtures: compose configs from ``configs/`` and discover components by globbing it."""

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def options(group: str) -> list[str]:
    """Names of the YAML files in a config group folder, e.g. ``options("model/position")``."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_cfg(overrides: list[str] = (), config_name: str = "train"):
    """Compose ``configs/<config_name>.yaml`` with command-line style overrides."""
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return compose(config_name, overrides=list(overrides))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
