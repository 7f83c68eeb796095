"""Data: TinyStories (Hub or local copy) or a generated corpus, a byte-level BPE, a token cache."""

from minillm.data.datamodule import TokenDataModule
from minillm.data.sources import DataUnavailableError
from minillm.data.synthetic import generate_stories
from minillm.data.tokenizer import EOT, load_tokenizer, train_tokenizer

__all__ = [
    "EOT",
    "DataUnavailableError",
    "TokenDataModule",
    "generate_stories",
    "load_tokenizer",
    "train_tokenizer",
]
