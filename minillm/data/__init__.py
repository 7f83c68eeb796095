"""Data: TinyStories (Hub or local copy) or a generated corpus, a byte-level BPE, a token cache.

The tokenizer names load eagerly (they need only ``tokenizers``); the rest on first use, so that
interop and checkpoint reading import neither Lightning nor ``datasets``.
"""

from importlib import import_module
from typing import Any

from minillm.data.tokenizer import EOT, load_tokenizer, train_tokenizer

_LAZY = {"TokenDataModule": "minillm.data.datamodule", "DataUnavailableError": "minillm.data.sources",
         "generate_stories": "minillm.data.synthetic"}

__all__ = ["EOT", "DataUnavailableError", "TokenDataModule", "generate_stories", "load_tokenizer",
           "train_tokenizer"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minillm.data' has no attribute {name!r}")
