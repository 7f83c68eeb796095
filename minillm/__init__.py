"""minillm: small decoder-only language models, assembled from pluggable parts."""

from minillm import generate  # a callable module: minillm.generate(model, prompt_ids, ...)
from minillm.model import KVCache, Transformer, build_model

__all__ = ["KVCache", "LoadedCheckpoint", "Transformer", "build_model", "generate",
           "load_checkpoint"]


def __getattr__(name: str):
    # Lazy: checkpoint loading is not needed to build a model, so `import minillm` stays light.
    if name in ("load_checkpoint", "LoadedCheckpoint"):
        from minillm import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module 'minillm' has no attribute {name!r}")
