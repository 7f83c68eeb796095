"""Where the stories come from: the Hugging Face Hub, a local copy of TinyStories, or the generator.

Every source answers the same questions: ``key`` (a short name for the cache folder, stable for one
location), ``describe`` (what the run trains on), ``fingerprint()`` (changes when the content does, so
the cache is rebuilt) and ``load(work_dir)`` (a ``DatasetDict`` with ``train`` and ``validation``
splits and one ``text`` column, one story per row). After ``load`` all sources go through the same
tokenizer and cache code (``clean_story`` included).
"""

import hashlib
import json
import re
from functools import cached_property
from itertools import groupby
from pathlib import Path

import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, load_dataset

from minillm.config import check_int

from minillm.data.synthetic import generate_stories
from minillm.data.tokenizer import EOT

HUB_ID = "roneneldan/TinyStories"
SPLITS = ("train", "validation")
RECOGNISED = (
    "text files train.txt + validation.txt (or TinyStories-train.txt + TinyStories-valid.txt), "
    f"stories separated by {EOT} lines; or parquet / json / jsonl files with a 'text' column whose "
    "names start with train and valid (e.g. data/train-00000-of-00004.parquet)"
)


class DataUnavailableError(RuntimeError):
    """The data set cannot be loaded (Hub unreachable and no local copy)."""


def clean_story(text: str) -> str:
    """One story as it enters the token stream: LF line endings, no surrounding whitespace."""
    return text.replace("\r\n", "\n").strip()


def read_story_file(path: str | Path) -> list[str]:
    """Stories of a TinyStories text file: the text between lines that read exactly ``EOT``."""
    with open(path, encoding="utf-8") as fh:
        runs = groupby(fh, key=lambda line: line.strip() == EOT)  # separator lines, story lines, ...
        stories = ("".join(lines) for separator, lines in runs if not separator)
        return [s for s in stories if s.strip()]


def _story_rows(paths: list[str]):
    """Rows for ``Dataset.from_generator`` (its cache is the fresh work dir, so content needs no key)."""
    for p in paths:
        for story in read_story_file(p):
            yield {"text": story}


class SyntheticSource:
    """The generated corpus of :mod:`minillm.data.synthetic`; validation has a tenth as many stories."""

    def __init__(self, n_stories: int, corpus_seed: int) -> None:
        check_int(n_stories, "data.n_stories", 10)
        self.n_stories, self.corpus_seed = n_stories, corpus_seed
        self.key = f"synthetic-n{n_stories}-s{corpus_seed}"
        self.describe = f"synthetic stories ({n_stories:,} train, corpus seed {corpus_seed})"

    def _stories(self) -> dict[str, list[str]]:
        n = {"train": self.n_stories, "validation": self.n_stories // 10}
        return {s: generate_stories(n[s], self.corpus_seed, s) for s in SPLITS}

    def fingerprint(self) -> str:
        """Hash of the generated text itself, so a change to the generator rebuilds the cache."""
        return hashlib.sha256(json.dumps(self._stories()).encode()).hexdigest()

    def load(self, work_dir: Path) -> DatasetDict:
        """The stories as a ``DatasetDict`` (small enough to keep in memory)."""
        return DatasetDict({s: Dataset.from_dict({"text": t}) for s, t in self._stories().items()})


class LocalSource:
    """A local copy of TinyStories under ``data.path``: its text files, or parquet / json(l) files."""

    def __init__(self, path: str) -> None:
        self.root = Path(path).expanduser().resolve()
        if not self.root.is_dir():
            raise ValueError(f"data.path={path!r} is not a directory; it must hold {RECOGNISED}")
        self.format, self.files = _find_files(self.root, path)
        _check_not_empty(self.format, self.files, path)
        self.key = f"tinystories-local-{hashlib.sha256(str(self.root).encode()).hexdigest()[:10]}"
        self.describe = f"TinyStories (local copy {self.root}, {self.format})"

    def fingerprint(self) -> str:
        """SHA-256 over split names, file names, sizes and contents."""
        h = hashlib.sha256()
        for split in SPLITS:
            for f in self.files[split]:
                h.update(f"{split}:{f.name}:{f.stat().st_size}\n".encode())
                with open(f, "rb") as fh:
                    while chunk := fh.read(1 << 24):
                        h.update(chunk)
        return h.hexdigest()

    def load(self, work_dir: Path) -> DatasetDict:
        """Parse the files into a ``DatasetDict`` (Arrow files under ``work_dir``)."""
        files = {s: [str(f) for f in self.files[s]] for s in SPLITS}
        if self.format == "text":
            return DatasetDict({
                s: Dataset.from_generator(_story_rows, cache_dir=str(work_dir), split=s,
                                          gen_kwargs={"paths": files[s]})
                for s in SPLITS
            })
        ds = load_dataset(self.format, data_files=files, cache_dir=str(work_dir))
        for split in SPLITS:
            if "text" not in ds[split].column_names:
                raise ValueError(
                    f"data.path={str(self.root)!r}: {self.format} files need a 'text' column, "
                    f"found {ds[split].column_names}"
                )
            if ds[split].num_rows == 0:
                names = ", ".join(f.name for f in self.files[split])
                raise ValueError(f"data.path={str(self.root)!r}: {names} has 0 rows; expected {RECOGNISED}")
        return DatasetDict({s: ds[s].select_columns(["text"]) for s in SPLITS})


def _find_files(root: Path, path: str) -> tuple[str, dict[str, list[Path]]]:
    """The first format with both splits present: text files, then parquet, then json / jsonl."""
    patterns = {"train": r"(^|[-_])train\.txt$", "validation": r"(^|[-_])valid(ation)?\.txt$"}
    text = {s: [p for p in root.glob("*.txt") if re.search(patterns[s], p.name)] for s in SPLITS}
    if text["train"] and text["validation"]:
        # Shortest name first: train.txt, then TinyStories-train.txt, then TinyStoriesV2-GPT4-train.txt.
        return "text", {s: [min(text[s], key=lambda p: (len(p.name), p.name))] for s in SPLITS}
    for fmt, exts in (("parquet", ("parquet",)), ("json", ("jsonl", "json"))):
        found = {s: sorted(p for e in exts for p in root.rglob(f"{prefix}*.{e}"))
                 for s, prefix in zip(SPLITS, ("train", "valid"))}
        if found["train"] and found["validation"]:
            return fmt, found
    raise ValueError(f"data.path={path!r} has no recognised TinyStories files; expected {RECOGNISED}")


def _check_not_empty(fmt: str, files: dict[str, list[Path]], path: str) -> None:
    """Refuse a split whose files hold nothing (``datasets`` would fail later with a schema error)."""
    for split in SPLITS:
        size = sum(f.stat().st_size for f in files[split])
        names = ", ".join(f.name for f in files[split])
        if size == 0:
            raise ValueError(f"data.path={path!r}: {names} is empty (0 bytes); expected {RECOGNISED}")
        if fmt == "text" and not _has_story(files[split][0]):
            raise ValueError(f"data.path={path!r}: {names} ({size:,} bytes) holds no story, only "
                             f"blank and {EOT} lines; expected stories separated by {EOT} lines")
        if fmt == "parquet" and sum(pq.ParquetFile(f).metadata.num_rows for f in files[split]) == 0:
            raise ValueError(f"data.path={path!r}: {names} has 0 rows; expected {RECOGNISED}")


def _has_story(path: Path) -> bool:
    with open(path, encoding="utf-8") as fh:
        return any(line.strip() not in ("", EOT) for line in fh)


class HubSource:
    """``roneneldan/TinyStories`` through ``datasets.load_dataset`` (downloaded once, then cached)."""

    key = "tinystories-hub"
    describe = f"TinyStories (Hugging Face {HUB_ID})"

    @cached_property
    def _ds(self) -> DatasetDict:
        try:
            ds = load_dataset(HUB_ID)
        except Exception as e:  # noqa: BLE001 - each datasets version raises its own type offline
            raise DataUnavailableError(
                f"cannot load {HUB_ID} from the Hugging Face Hub ({type(e).__name__}: {e}). "
                f"Point data.path=DIR at a local copy ({RECOGNISED}), or train on the offline "
                "corpus with data=synthetic."
            ) from e
        return DatasetDict({s: ds[s].select_columns(["text"]) for s in SPLITS})

    def fingerprint(self) -> str:
        """The ``datasets`` fingerprints of both splits (they follow the cached revision)."""
        return "+".join(self._ds[s]._fingerprint for s in SPLITS)

    def load(self, work_dir: Path) -> DatasetDict:
        """The cached Hub data set."""
        return self._ds


def make_source(source: str, path: str | None, n_stories: int, corpus_seed: int):
    """The source object for ``data.source`` / ``data.path`` (validated here, cheaply)."""
    if source == "synthetic":
        if path is not None:
            raise ValueError(f"data.path={path!r} is for data=tinystories; data=synthetic takes no path")
        return SyntheticSource(n_stories, corpus_seed)
    if source == "tinystories":
        return HubSource() if path is None else LocalSource(str(path))
    raise ValueError(f"data.source={source!r}: must be 'tinystories' or 'synthetic'")
