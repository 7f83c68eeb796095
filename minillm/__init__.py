"""minillm: small decoder-only language models, assembled from pluggable parts."""

from minillm import generate  # a callable module: minillm.generate(model, prompt_ids, ...)
from minillm.model import KVCache, Transformer, build_model

__all__ = ["KVCache", "Transformer", "build_model", "generate"]
