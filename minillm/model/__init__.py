"""Model components: attention, position encodings, feed-forward layers, the transformer."""

from minillm.model.build import build_model
from minillm.model.cache import KVCache
from minillm.model.transformer import Transformer

__all__ = ["KVCache", "Transformer", "build_model"]
