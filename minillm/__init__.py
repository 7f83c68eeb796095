"""minillm: small decoder-only language models, assembled from pluggable parts."""

from minillm.interop import export_hf, from_hf
from minillm.model import KVCache, Transformer, build_model

__all__ = ["KVCache", "Transformer", "build_model", "export_hf", "from_hf"]
