"""Tiny models assembled straight from the component YAML files, for fast CPU tests."""

from functools import lru_cache

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from conftest import compose_cfg
from minillm.model import Transformer


@lru_cache(maxsize=None)
def _composed(group: str, name: str) -> DictConfig:
    """``configs/model/<group>/<name>.yaml`` as Hydra composes it (its own defaults included)."""
    return compose_cfg([f"model/{group}={name}", "data.vocab_size=64"]).model[group]


def component(group: str, name: str, **overrides):
    """The ``_partial_`` factory that ``configs/model/<group>/<name>.yaml`` describes."""
    return instantiate(OmegaConf.merge(_composed(group, name), overrides))


def tiny_model(attention: str = "gqa", position: str = "rope", ffn: str = "swiglu",
               norm: str = "rmsnorm", backend: str | None = None, d_model: int = 32,
               n_layers: int = 2, n_heads: int = 4, vocab_size: int = 64,
               max_seq_len: int = 32, **attention_options) -> Transformer:
    """A small (~50K-parameter dense) ``Transformer`` from one option per component group;
    ``attention_options`` override the attention YAML (e.g. ``window=8``)."""
    attn = attention_options if backend is None else {**attention_options, "backend": backend}
    return Transformer(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       max_seq_len=max_seq_len, attention=component("attention", attention, **attn),
                       position=component("position", position), ffn=component("ffn", ffn),
                       norm=component("norm", norm)).eval()
