"""Evaluate or sample a checkpoint: ``python eval.py ckpt_path=PATH [mode=sample]`` (configs/eval.yaml,
each mode's settings in configs/mode/)."""

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from minillm.cli import composition_errors, config_errors
from minillm.evaluation import run
from minillm.evaluation.command_line import prepare

CONFIGS = Path(__file__).resolve().parent / "configs"


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation mode ``cfg.mode`` on ``cfg.ckpt_path``."""
    with config_errors():
        return run(cfg)


if __name__ == "__main__":
    with composition_errors():
        sys.argv[1:] = prepare(sys.argv[1:], CONFIGS)  # free-text prompts quoted for Hydra
        main()
