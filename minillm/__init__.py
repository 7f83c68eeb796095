"""minillm: small decoder-only language models, assembled from pluggable parts."""

from minillm.generation import generate
from minillm.model import KVCache, Transformer, build_model

__all__ = ["KVCache", "LoadedCheckpoint", "Transformer", "build_model", "export_hf", "from_hf",
           "generate", "load_checkpoint"]


def __getattr__(name: str):
    # Lazy: checkpoint loading and Hugging Face interop are not needed to build a model, so
    # `import minillm` stays light.
    if name in ("load_checkpoint", "LoadedCheckpoint"):
        from minillm import checkpoint
        return getattr(checkpoint, name)
    if name in ("export_hf", "from_hf"):
        from minillm import interop
        return getattr(interop, name)
    raise AttributeError(f"module 'minillm' has no attribute {name!r}")
