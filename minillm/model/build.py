"""Build a model from its composed Hydra ``model`` config node."""

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from minillm.model.transformer import Transformer


def build_model(model_cfg: DictConfig | dict[str, Any]) -> Transformer:
    """Instantiate the ``Transformer`` described by ``model_cfg`` (the ``model`` group).

    Construction errors keep their message: each names the config key, its value and what is valid.
    """
    if isinstance(model_cfg, dict):
        model_cfg = OmegaConf.create(model_cfg)
    return instantiate_checked(model_cfg)


def instantiate_checked(node: DictConfig) -> Any:
    """Hydra's ``instantiate``, with a constructor's ValueError re-raised as itself (Hydra wraps it
    in an InstantiationException whose message buries the one line that names the setting)."""
    try:
        return instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ValueError):
            raise ValueError(str(cause)) from None
        raise
