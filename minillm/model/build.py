"""Build a model from its composed Hydra ``model`` config node."""

from typing import Any

from omegaconf import DictConfig, OmegaConf

from minillm.config import instantiate_checked
from minillm.model.transformer import Transformer


def build_model(model_cfg: DictConfig | dict[str, Any]) -> Transformer:
    """Instantiate the ``Transformer`` described by ``model_cfg`` (the ``model`` group).

    Construction errors keep their message: each names the config key, its value and what is valid.
    """
    if isinstance(model_cfg, dict):
        model_cfg = OmegaConf.create(model_cfg)
    return instantiate_checked(model_cfg)
