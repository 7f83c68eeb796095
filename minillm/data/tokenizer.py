"""Byte-level BPE tokenizer (GPT-2 style) trained with Hugging Face ``tokenizers``.

Byte-level pre-tokenization maps every UTF-8 byte to a symbol of a 256-letter alphabet, and the
trainer starts from that whole alphabet, so every Unicode string is encodable with no unknown token.
``<|endoftext|>`` is the one special token; the data pipeline puts it after every story.
"""

import hashlib
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minillm.config import check_int

EOT = "<|endoftext|>"
MIN_VOCAB = 256 + 1  # the byte alphabet plus <|endoftext|>
MAX_VOCAB = 2**32  # token ids are stored as uint32 at most


def check_vocab_size(vocab_size: int) -> None:
    """Raise ValueError naming ``data.vocab_size`` unless it is an int in [257, 2**32]."""
    check_int(vocab_size, "data.vocab_size", MIN_VOCAB, MAX_VOCAB, f" (256 byte tokens + {EOT})")


def train_tokenizer(
    texts: Iterable[list[str]] | Iterable[str], vocab_size: int, show_progress: bool = False
) -> Tokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens (fewer if merges run out: docs/data.md)."""
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)  # streams strings or lists of them
    return tok


def load_tokenizer(json_str: str) -> Tokenizer:
    """The tokenizer serialized in ``json_str`` (``Tokenizer.to_str()``, as stored in checkpoints)."""
    return Tokenizer.from_str(json_str)


def tokenizer_hash(json_str: str) -> str:
    """SHA-256 of a serialized tokenizer: the cache manifest's record of which tokenizer made it."""
    return hashlib.sha256(json_str.encode()).hexdigest()
