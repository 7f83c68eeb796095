"""Train a model: ``python train.py model=llama data=tinystories trainer=gpu`` (see configs/train.yaml)."""

import hydra
from omegaconf import DictConfig

from minillm.cli import composition_errors, config_errors
from minillm.training import assemble, train


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Build and check the run, then train it; return the final validation loss (Hydra sweepers read it)."""
    with config_errors():
        return train(assemble(cfg)).get("val/loss")


if __name__ == "__main__":
    with composition_errors():
        main()
