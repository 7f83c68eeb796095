"""``TokenDataModule``: the token cache served as Lightning dataloaders (docs/data.md: Batches,
Document masks, Bits per byte).

Micro-batch ``n`` on rank ``r`` of ``w`` draws its offsets from a generator seeded with
``(seed, n * w + r)``, so it does not depend on the DataLoader worker count, and resuming at
``start_batch = n`` replays the stream exactly from batch ``n``.
"""

import hashlib
import math
import multiprocessing
import os
import struct
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from minillm.config import check_int
from minillm.data.cache import build_cache, read_manifest
from minillm.data.sources import make_source
from minillm.data.tokenizer import EOT, check_vocab_size, load_tokenizer


def batch_seed(seed: int, block: int) -> int:
    """A 63-bit generator seed for sample block ``block``; hashing keeps (seed, block) pairs apart."""
    digest = hashlib.blake2b(struct.pack("<qq", seed, block), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def has_story_boundary(tokens: np.ndarray, eot_id: int, chunk: int = 1 << 20) -> bool:
    """Whether ``<|endoftext|>`` occurs before the last token (it ends every story, so a one-story
    corpus has it last only); chunked with an early exit, so real data costs one chunk."""
    body = tokens[:-1]
    return any(bool((body[i:i + chunk] == eot_id).any()) for i in range(0, len(body), chunk))


class _Windows(IterableDataset):
    """Batches of token windows from a memmap that each worker opens (it is never pickled); a
    subclass sets ``path``, ``dtype``, ``seq_len``, ``eot_id`` (set: batches carry document ids) and
    says which batch numbers a DataLoader worker yields (``numbers``) and what each is (``batch``)."""

    def windows(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(x, y[, documents]) of the windows at ``starts``, each (B, seq_len) int64."""
        idx = starts[:, None] + np.arange(self.seq_len + 1)  # (B, T+1)
        window = torch.from_numpy(tokens[idx].astype(np.int64))
        x, y = window[:, :-1], window[:, 1:]
        return (x, y) if self.eot_id is None else (x, y, torch.cumsum(x == self.eot_id, dim=1))

    def __iter__(self):
        tokens = np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r")
        info = get_worker_info()  # None in the main process
        for n in self.numbers(*((info.id, info.num_workers) if info else (0, 1))):
            yield self.batch(tokens, n)


class TrainStream(_Windows):
    """Endless micro-batches of random windows."""

    def __init__(self, path: str, dtype: str, seq_len: int, batch_size: int, seed: int,
                 start_batch: int = 0, rank: int = 0, world_size: int = 1,
                 eot_id: int | None = None) -> None:
        self.path, self.dtype, self.seq_len, self.batch_size = path, dtype, seq_len, batch_size
        self.seed, self.start_batch, self.rank, self.world_size = seed, start_batch, rank, world_size
        self.eot_id = eot_id

    def batch(self, tokens: np.ndarray, n: int) -> tuple[torch.Tensor, ...]:
        """Micro-batch ``n`` of this rank: (x, y[, documents]), each (batch_size, seq_len) int64."""
        gen = torch.Generator().manual_seed(batch_seed(self.seed, n * self.world_size + self.rank))
        starts = torch.randint(0, len(tokens) - self.seq_len, (self.batch_size,), generator=gen)
        return self.windows(tokens, starts.numpy())

    def numbers(self, worker: int, n_workers: int) -> Iterator[int]:
        return count(self.start_batch + worker, n_workers)


class ValBatches(_Windows):
    """Batches of the non-overlapping windows ``lo + [i*T, i*T + T]``, i < n_windows, in order.

    Iterable rather than map-style so Lightning never adds a DistributedSampler on top of the
    per-rank share this already is.
    """

    def __init__(self, path: str, dtype: str, seq_len: int, batch_size: int, lo: int,
                 n_windows: int, eot_id: int | None = None) -> None:
        self.path, self.dtype, self.seq_len, self.batch_size = path, dtype, seq_len, batch_size
        self.lo, self.n_windows, self.eot_id = lo, n_windows, eot_id

    def __len__(self) -> int:
        return math.ceil(self.n_windows / self.batch_size)

    def batch(self, tokens: np.ndarray, i: int) -> tuple[torch.Tensor, ...]:
        """Batch ``i``: (x, y[, documents]), each (<= batch_size, seq_len) int64."""
        first = np.arange(i * self.batch_size, min((i + 1) * self.batch_size, self.n_windows))
        return self.windows(tokens, self.lo + first * self.seq_len)

    def numbers(self, worker: int, n_workers: int) -> Iterator[int]:
        return iter(range(worker, len(self), n_workers))


def worker_start_method(num_workers: int) -> str | None:
    """The start method for DataLoader workers: ``None`` (torch's default) unless the process-wide
    default is not one of the platform's own, then the platform's default named explicitly.

    joblib's loky processes (``hydra/launcher=joblib``) set the default to ``loky``, whose launcher
    can start only its own process class: DataLoader's plain ``Process`` then fails to start (torch
    reports it as a pickle error), so every member of a joblib sweep with ``data.num_workers > 0`` died.
    """
    method = multiprocessing.get_start_method(allow_none=True)
    platform = multiprocessing.get_all_start_methods()
    return None if num_workers == 0 or method in (None, *platform) else platform[0]


class TokenDataModule(L.LightningDataModule):
    """TinyStories (Hub or local copy) or the synthetic corpus, tokenized once and cached."""

    def __init__(
        self,
        source: str = "tinystories",
        path: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 32,
        num_workers: int = 2,
        num_proc: int = 4,
        cache_dir: str | None = None,
        val_tokens: int | None = None,
        seed: int = 0,
        n_stories: int = 4000,
        corpus_seed: int = 0,
        show_progress: bool = True,
        document_mask: bool = False,
    ) -> None:
        super().__init__()
        check_vocab_size(vocab_size)
        for key, value, minimum in [("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                    ("num_workers", num_workers, 0), ("num_proc", num_proc, 1)]:
            check_int(value, f"data.{key}", minimum)
        if val_tokens is not None:
            check_int(val_tokens, "data.val_tokens", seq_len + 1)
        check_int(seed, "seed", -2**63 + 1, 2**63 - 1)
        if not isinstance(document_mask, bool):
            raise ValueError(f"data.document_mask={document_mask!r}: must be true or false")
        self.document_mask = document_mask
        self.source = make_source(source, path, n_stories, corpus_seed)
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.num_workers, self.num_proc, self.val_tokens = num_workers, num_proc, val_tokens
        self.seed, self.show_progress = seed, show_progress
        self.folder = _resolve(cache_dir) / f"{self.source.key}-v{vocab_size}"
        self.start_batch = 0
        self.manifest: dict | None = None
        self._tokenizer = None

    # ---- preparing and opening the cache ----
    def prepare_data(self) -> None:
        """Load the text, train the tokenizer and tokenize both splits into the cache (or reuse it)."""
        if self.manifest is None:  # once: checking the source hashes all of it
            self.manifest = build_cache(self.source, self.folder, self.vocab_size, self.num_proc,
                                        self.show_progress)

    def setup(self, stage: str | None = None) -> None:
        """Open the cache; without a trainer (eval.py, notebooks) prepare it first if needed."""
        if self._tokenizer is not None:
            return
        if self.trainer is None:
            self.prepare_data()
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise RuntimeError(f"no complete token cache in {self.folder}: run prepare_data() first")
        for split in ("train", "validation"):
            if manifest["splits"][split]["tokens"] <= self.seq_len:
                raise ValueError(
                    f"data.seq_len={self.seq_len}: the {split} split has only "
                    f"{manifest['splits'][split]['tokens']} tokens; it needs more than seq_len"
                )
        tokenizer_json = (self.folder / "tokenizer.json").read_text()
        tokenizer = load_tokenizer(tokenizer_json)
        train = np.memmap(self.folder / "train.bin", dtype=np.dtype(manifest["dtype"]), mode="r")
        if self.document_mask and not has_story_boundary(train, tokenizer.token_to_id(EOT)):
            raise ValueError(
                f"data.document_mask=true: the training tokens of {self.source.describe} hold one "
                f"story (no {EOT} before the last token), so there is no document boundary to "
                "mask; valid: data.document_mask=false, or data with stories separated by "
                f"{EOT} lines")
        self.manifest, self._tokenizer_json, self._tokenizer = manifest, tokenizer_json, tokenizer

    def _ready(self) -> dict:
        self.setup()  # returns at once when set up already
        return self.manifest

    # ---- tokenizer ----
    @property
    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` of this cache."""
        self._ready()
        return self._tokenizer

    @property
    def tokenizer_json(self) -> str:
        """The serialized tokenizer (stored in checkpoints; rebuild it with ``load_tokenizer``)."""
        self._ready()
        return self._tokenizer_json

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>``, which follows every story."""
        return self.tokenizer.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOT appended)."""
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        """Text of ``ids``, EOT tokens kept as ``<|endoftext|>``."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors and arrays too
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of the validation stories per validation token (EOT tokens included)."""
        val = self._ready()["splits"]["validation"]
        return val["bytes"] / val["tokens"]

    def describe(self) -> str:
        """One line saying what the run trains on."""
        m = self._ready()
        vocab = f"vocab {self.vocab_size}"
        if m["tokenizer_vocab_size"] != self.vocab_size:
            vocab += f" ({m['tokenizer_vocab_size']} used: the corpus ran out of merges)"
        return (
            f"data: {m['source']}, train {m['splits']['train']['tokens']:,} tokens, "
            f"val {m['splits']['validation']['tokens']:,} tokens, {vocab}, "
            f"{self.bytes_per_token:.3f} bytes/token, cache {self.folder}"
        )

    # ---- dataloaders ----
    def _rank(self) -> tuple[int, int]:
        return (0, 1) if self.trainer is None else (self.trainer.global_rank, self.trainer.world_size)

    def _bin(self, split: str) -> tuple[str, str]:
        return str(self.folder / f"{split}.bin"), self._ready()["dtype"]

    def train_stream(self) -> TrainStream:
        """The endless training stream of this rank, starting at ``self.start_batch``."""
        rank, world = self._rank()
        return TrainStream(*self._bin("train"), self.seq_len, self.batch_size, self.seed,
                           self.start_batch, rank, world, self._document_eot())

    def train_dataloader(self) -> DataLoader:
        """Endless (x, y) micro-batches; batch n is a pure function of (seed, n, rank, world_size)."""
        return self._loader(self.train_stream())

    def val_dataset(self) -> ValBatches:
        """This rank's contiguous share of the validation windows (equal shares across ranks)."""
        rank, world = self._rank()
        n_tokens = min(self._ready()["splits"]["validation"]["tokens"], self.val_tokens or math.inf)
        per_rank = (n_tokens - 1) // self.seq_len // world
        if per_rank == 0:
            raise ValueError(
                f"data.val_tokens={self.val_tokens}: {n_tokens} validation tokens give no window of "
                f"seq_len={self.seq_len} per rank on {world} ranks"
            )
        return ValBatches(*self._bin("validation"), self.seq_len, self.batch_size,
                          rank * per_rank * self.seq_len, per_rank, self._document_eot())

    def _document_eot(self) -> int | None:
        """The id that opens a document, when batches carry document ids (``document_mask``)."""
        return self.eot_id if self.document_mask else None

    def val_dataloader(self) -> DataLoader:
        """Deterministic, non-overlapping validation windows, in order."""
        return self._loader(self.val_dataset())

    def _loader(self, batches: IterableDataset) -> DataLoader:
        # batch_size=None: the datasets yield whole batches, interleaved over the workers in order
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers,
                          multiprocessing_context=worker_start_method(self.num_workers),
                          pin_memory=torch.cuda.is_available())

    # ---- resume ----
    def state_dict(self) -> dict[str, int]:
        """Micro-batches consumed so far (saved in checkpoints at optimizer-step boundaries)."""
        if self.trainer is None:
            return {"start_batch": self.start_batch}
        return {"start_batch": self.trainer.global_step * self.trainer.accumulate_grad_batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the training stream where the checkpoint left it."""
        self.start_batch = int(state_dict["start_batch"])


def _resolve(cache_dir: str | None) -> Path:
    """``cache_dir`` (None: ``$MINILLM_CACHE``, else ``data_cache``) made absolute against the launch
    directory (Hydra may chdir into outputs/). The one place this default lives: YAML and Python API."""
    if cache_dir is None:
        cache_dir = os.environ.get("MINILLM_CACHE") or "data_cache"
    path = Path(str(cache_dir)).expanduser()
    if path.is_absolute():
        return path
    return Path(get_original_cwd()) / path if HydraConfig.initialized() else path.resolve()
