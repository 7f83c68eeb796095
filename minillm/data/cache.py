"""The token cache: a trained tokenizer and each split's tokens as a flat uint16/uint32 memmap file.

Layout, manifest and why an interrupted run leaves nothing a later run trusts: docs/data.md (Cache).
"""

import functools
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
from datasets import Features, Sequence, Value

from minillm.data.sources import SPLITS, DataUnavailableError, clean_story
from minillm.data.tokenizer import EOT, load_tokenizer, tokenizer_hash, train_tokenizer
from minillm.files import atomic_write

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the layout or the token stream changes, so old caches are rebuilt
MANIFEST = "manifest.json"
ROWS_PER_PROC = 1000  # tokenization starts another process only for this many more stories


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def read_manifest(folder: Path) -> dict | None:
    """The manifest of ``folder`` if it exists and its files are all there at the recorded sizes."""
    try:
        m = json.loads((folder / MANIFEST).read_text())
        itemsize = np.dtype(m["dtype"]).itemsize
        complete = (m.get("format") == FORMAT
                    and tokenizer_hash((folder / "tokenizer.json").read_text()) == m["tokenizer_sha256"]
                    and all((folder / f"{s}.bin").stat().st_size == m["splits"][s]["tokens"] * itemsize
                            for s in SPLITS))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return m if complete else None


def _encode_batch(batch: dict[str, list[str]], tokenizer_json: str) -> dict[str, list]:
    """``datasets.map`` function: each story's ids followed by the EOT id, and its UTF-8 byte count."""
    tok = _worker_tokenizer(tokenizer_json)
    eot = tok.token_to_id(EOT)
    texts = [clean_story(t) for t in batch["text"]]
    encoded = tok.encode_batch(texts)
    ids = [e.ids + [eot] if t else [] for t, e in zip(texts, encoded)]  # empty rows give nothing
    return {"ids": ids, "n_bytes": [len(t.encode()) for t in texts]}


@functools.lru_cache(maxsize=1)
def _worker_tokenizer(tokenizer_json: str):
    """One parsed tokenizer per process (``map`` calls the function once per 1000 stories)."""
    return load_tokenizer(tokenizer_json)


def _write_tokens(fh, ds, dtype: np.dtype) -> dict[str, int]:
    """Stream the ``ids`` column into ``fh`` chunk by chunk; return token, story and byte counts."""
    n_tokens = 0
    for chunk in ds.data.column("ids").chunks:
        arr = chunk.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        fh.write(arr.tobytes())
        n_tokens += len(arr)
    n_bytes = np.asarray(ds.data.column("n_bytes").to_numpy())
    return {"tokens": n_tokens, "stories": int((n_bytes > 0).sum()), "bytes": int(n_bytes.sum())}


def _tokenize_split(ds, split: str, tok_json: str, dtype: np.dtype, num_proc: int, folder: Path,
                    work: Path) -> dict[str, int]:
    n_proc = min(num_proc, len(ds) // ROWS_PER_PROC)
    encoded = ds.map(
        _encode_batch,
        batched=True,
        num_proc=n_proc if n_proc > 1 else None,
        fn_kwargs={"tokenizer_json": tok_json},
        remove_columns=ds.column_names,
        features=Features({"ids": Sequence(Value(dtype.name)), "n_bytes": Value("int64")}),
        cache_file_name=str(work / f"{split}-ids.arrow"),
        load_from_cache_file=False,
        new_fingerprint=f"{tokenizer_hash(tok_json)[:16]}-{split}",
        desc=f"tokenizing {split}",
    )
    counts: dict[str, int] = {}
    atomic_write(folder / f"{split}.bin", lambda fh: counts.update(_write_tokens(fh, encoded, dtype)))
    return counts


def build_cache(
    source, folder: Path, vocab_size: int, num_proc: int, show_progress: bool = True
) -> dict:
    """Make ``folder`` hold the tokenizer and token files of ``source`` and return the manifest.

    A complete cache is reused while its source's fingerprint is unchanged, or while the source
    cannot be reached (with a warning); docs/data.md (Cache).
    """
    manifest = read_manifest(folder)
    try:
        fingerprint = source.fingerprint()
    except DataUnavailableError as e:
        if manifest is None:
            raise
        warnings.warn(f"{e} Using the complete token cache {folder} built from it earlier.", stacklevel=2)
        return manifest
    if manifest is not None and manifest["source_fingerprint"] == fingerprint:
        return manifest
    log.info("building token cache %s for %s", folder, source.describe)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # from here on, nothing in folder is trusted
    work = folder / f".work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        ds = source.load(work)
        texts = (
            [clean_story(t) for t in b["text"]]
            for b in ds["train"].select_columns(["text"]).iter(batch_size=1000)
        )
        tok = train_tokenizer(texts, vocab_size, show_progress=show_progress)
        tok_json = tok.to_str()
        atomic_write(folder / "tokenizer.json", lambda fh: fh.write(tok_json), mode="w")
        dtype = token_dtype(vocab_size)
        if num_proc > 1:  # workers are forked after training used threads: keep them single-threaded
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        splits = {s: _tokenize_split(ds[s], s, tok_json, dtype, num_proc, folder, work) for s in SPLITS}
        manifest = {
            "format": FORMAT,
            "source": source.describe,
            "source_key": source.key,
            "source_fingerprint": fingerprint,
            "vocab_size": vocab_size,
            "tokenizer_vocab_size": tok.get_vocab_size(),
            "tokenizer_sha256": tokenizer_hash(tok_json),
            "eot_id": tok.token_to_id(EOT),
            "dtype": dtype.name,
            "splits": splits,
        }
        atomic_write(folder / MANIFEST, lambda fh: json.dump(manifest, fh, indent=2), mode="w")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest
