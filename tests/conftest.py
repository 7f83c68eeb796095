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
    """Names of the YAML files in a config group folder, e.g. ``options("model/position")``; a
    leading underscore marks a base that options inherit from (``model/_base.yaml``), not an option."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if not p.stem.startswith("_"))


def compose_cfg(overrides: list[str] = (), config_name: str = "train", return_hydra_config: bool = False):
    """Compose ``configs/<config_name>.yaml`` with command-line style overrides."""
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A few-second training run on CPU (configs/debug/fast.yaml: 1-layer d_model 32 model, 32-token
# windows, a 50-story corpus); command-line overrides after it win, groups and values alike.
TINY_TRAIN = ["debug=fast"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """Run directory of a finished TINY_TRAIN run (checkpoints/, metrics.jsonl, config.yaml)."""
    import train

    run_dir = tmp_path_factory.mktemp("tiny_run")
    cache = tmp_path_factory.getbasetemp() / "data_cache"
    train.main(compose_cfg(TINY_TRAIN + [f"run_dir={run_dir}", f"data.cache_dir={cache}"]))
    return run_dir
