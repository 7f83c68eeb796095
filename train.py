"""Train a model: ``python train.py model=llama data=tinystories trainer=gpu`` (see configs/train.yaml)."""

import hydra
from omegaconf import DictConfig

from minillm.cli import composition_errors, config_errors
from minillm.training import train
from minillm.validation import validate


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Check the config, then train; return the final validation loss (Hydra sweepers read it)."""
    with config_errors():
        validate(cfg)
        return train(cfg).get("val/loss")


if __name__ == "__main__":
    with composition_errors():
        main()
