"""Data pipeline: synthetic corpus, tokenizer, token cache (reuse, rebuild, atomicity), batches."""

import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from minillm.data import (
    EOT,
    DataUnavailableError,
    TokenDataModule,
    generate_stories,
    load_tokenizer,
    train_tokenizer,
)
from minillm.data import cache as cache_mod
from minillm.data import sources as sources_mod
from minillm.data.cache import read_manifest
from tests.conftest import compose_cfg

datasets.disable_progress_bars()
VOCAB = 320
SEQ = 16


def write_text_copy(folder: Path, train: list[str], val: list[str],
                    names=("train.txt", "validation.txt")) -> Path:
    """A local copy in TinyStories text format: each story followed by an <|endoftext|> line."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, stories in zip(names, (train, val)):
        (folder / name).write_text("".join(f"{s}\n{EOT}\n" for s in stories), encoding="utf-8")
    return folder


def make_dm(path=None, cache=None, **kw) -> TokenDataModule:
    args = dict(source="tinystories" if path else "synthetic", path=None if path is None else str(path),
                vocab_size=VOCAB, seq_len=SEQ, batch_size=4, num_workers=0, num_proc=1,
                cache_dir=str(cache), val_tokens=None, seed=0, show_progress=False)
    if path is None:
        args["n_stories"] = 60
    args.update(kw)
    return TokenDataModule(**args)


@pytest.fixture(scope="module")
def stories():
    # A few unusual strings ride along: Unicode, a story with paragraphs, CRLF-free text.
    train = generate_stories(120, seed=3) + ["Zoë said “héllo” — 你好 🙂.\nA second line."]
    return train, generate_stories(15, seed=3, split="validation")


@pytest.fixture(scope="module")
def built(tmp_path_factory, stories):
    """One built cache from a local text copy, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("built")
    dm = make_dm(write_text_copy(root / "ts", *stories), root / "cache")
    dm.setup()
    return dm


def read_bin(dm, split):
    return np.fromfile(dm.folder / f"{split}.bin", dtype=dm.manifest["dtype"])


# ---- synthetic corpus and tokenizer ----
def test_synthetic_is_deterministic_per_seed():
    a, b = generate_stories(40, seed=7), generate_stories(40, seed=7)
    assert a == b
    assert a != generate_stories(40, seed=8)
    assert a != generate_stories(40, seed=7, split="validation")
    assert len(set(generate_stories(500, seed=0))) == 500  # no repeated stories


def test_tokenizer_round_trips_any_text(stories):
    tok = train_tokenizer(stories[0], VOCAB)
    assert tok.get_vocab_size() <= VOCAB
    texts = ["Once upon a time, Tom went home.", "  leading spaces\n\ttabs\r\nCRLF",
             "naïve café 😀 日本語 ∑ \x00\x7f", f"one story{EOT}the next", ""]
    again = load_tokenizer(tok.to_str())
    for t in texts:
        ids = tok.encode(t).ids
        assert tok.decode(ids, skip_special_tokens=False) == t
        assert again.encode(t).ids == ids
    assert tok.token_to_id(EOT) is not None and tok.encode(EOT).ids == [tok.token_to_id(EOT)]


def test_eot_is_one_token_after_every_story(built, stories):
    train, val = stories
    for split, texts in (("train", train), ("validation", val)):
        ids = read_bin(built, split)
        assert (ids == built.eot_id).sum() == len(texts)
        assert ids[-1] == built.eot_id
        assert built.decode(torch.from_numpy(ids.astype(np.int64))) == "".join(t + EOT for t in texts)
    m = built.manifest["splits"]
    assert m["train"]["stories"] == len(train)
    assert m["validation"]["bytes"] == sum(len(t.encode()) for t in val)
    n_val = len(read_bin(built, "validation"))
    assert built.bytes_per_token == pytest.approx(m["validation"]["bytes"] / n_val)
    assert built.encode("Tom") == built.tokenizer.encode("Tom").ids
    assert "val" in built.describe() and str(built.folder) in built.describe()


# ---- cache: reuse, rebuild, atomic writes ----
def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_cache_is_reused_then_rebuilt_when_source_changes(tmp_path, stories, monkeypatch):
    train, val = stories
    src = write_text_copy(tmp_path / "ts", train[:40], val,
                          names=("TinyStories-train.txt", "TinyStories-valid.txt"))
    dm = make_dm(src, tmp_path / "cache")
    dm.prepare_data()
    before, manifest = mtimes(dm.folder), dm.manifest

    def no_training(*a, **k):
        raise AssertionError("the cache was rebuilt")

    with monkeypatch.context() as m:
        m.setattr(cache_mod, "train_tokenizer", no_training)
        again = make_dm(src, tmp_path / "cache")
        again.setup()
    assert mtimes(dm.folder) == before and again.manifest == manifest
    assert sorted(before) == ["manifest.json", "tokenizer.json", "train.bin", "validation.bin"]

    write_text_copy(src, train[:41], val, names=("TinyStories-train.txt", "TinyStories-valid.txt"))
    changed = make_dm(src, tmp_path / "cache")
    changed.setup()
    assert changed.manifest["splits"]["train"]["stories"] == 41
    assert changed.manifest["source_fingerprint"] != manifest["source_fingerprint"]
    assert (read_bin(changed, "train") == changed.eot_id).sum() == 41

    other_vocab = make_dm(src, tmp_path / "cache", vocab_size=VOCAB + 20)
    assert other_vocab.folder != changed.folder  # vocab sizes never share a cache


def test_interrupted_write_leaves_no_trusted_cache(tmp_path, stories, monkeypatch):
    train, val = stories
    src = write_text_copy(tmp_path / "ts", train[:30], val)
    dm = make_dm(src, tmp_path / "cache")
    dm.prepare_data()
    good = {s: read_bin(dm, s) for s in ("train", "validation")}
    write_text_copy(src, train[:31], val)  # the source changed: the next run must rebuild

    real = cache_mod._write_tokens

    def crash_mid_write(fh, ds, dtype):
        fh.write(b"\x01\x02" * 10)  # a partial file...
        raise KeyboardInterrupt  # ...then the run dies

    with monkeypatch.context() as m:
        m.setattr(cache_mod, "_write_tokens", crash_mid_write)
        with pytest.raises(KeyboardInterrupt):
            make_dm(src, tmp_path / "cache").prepare_data()
    assert read_manifest(dm.folder) is None
    left = sorted(p.name for p in dm.folder.iterdir())  # no temp files, no manifest
    assert left == ["tokenizer.json", "train.bin", "validation.bin"]
    assert np.array_equal(read_bin(dm, "train"), good["train"])  # old file untouched, not overwritten

    with pytest.raises(RuntimeError, match="prepare_data"):  # a trainer-driven setup won't trust it
        half = make_dm(src, tmp_path / "cache")
        half.trainer = SimpleNamespace()
        half.setup()
    assert real is cache_mod._write_tokens
    fresh = make_dm(src, tmp_path / "cache")
    fresh.setup()
    assert fresh.manifest["splits"]["train"]["stories"] == 31


def test_text_parquet_and_jsonl_copies_give_the_same_tokens(tmp_path, stories, built, monkeypatch):
    train, val = stories
    pq = tmp_path / "pq" / "data"
    pq.mkdir(parents=True)
    datasets.Dataset.from_dict({"text": train}).to_parquet(pq / "train-00000-of-00001.parquet")
    datasets.Dataset.from_dict({"text": val}).to_parquet(pq / "validation-00000-of-00001.parquet")
    js = tmp_path / "js"
    js.mkdir()
    for name, texts in (("train.jsonl", train), ("validation.jsonl", val)):
        rows = (json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
        (js / name).write_text("".join(rows))
    monkeypatch.setattr(cache_mod, "ROWS_PER_PROC", 50)  # tokenize the parquet copy in 2 processes
    for root, num_proc in ((tmp_path / "pq", 2), (js, 1)):
        dm = make_dm(root, tmp_path / "cache", num_proc=num_proc)
        dm.setup()
        assert dm.tokenizer_json == built.tokenizer_json
        for split in ("train", "validation"):
            assert np.array_equal(read_bin(dm, split), read_bin(built, split))


# ---- batches ----
def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_train_batches_are_a_pure_function_of_seed_index_rank(built):
    tokens = read_bin(built, "train")
    stream = built.train_stream()
    ref = take(stream, 6)
    for x, y in ref:
        assert x.shape == y.shape == (4, SEQ) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):  # each row is a real window of the token file
            o = np.flatnonzero(tokens[: len(tokens) - SEQ] == row_x[0].item())
            assert any(np.array_equal(tokens[i : i + SEQ + 1], torch.cat([row_x, row_y[-1:]]).numpy())
                       for i in o)
    two_workers = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    for (a, b), (c, d) in zip(ref, take(two_workers, 6)):
        assert torch.equal(a, c) and torch.equal(b, d)

    built.start_batch = 3  # resume: the stream continues exactly where it stopped
    try:
        resumed = take(built.train_dataloader(), 3)
    finally:
        built.start_batch = 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ref[3:], resumed))

    s = built.train_stream()
    for rank in (0, 1):  # rank r's batch n is global block 2n + r: ranks never repeat each other
        s.rank, s.world_size = rank, 2
        for n in range(3):
            x, _ = s.batch(tokens, n)
            assert torch.equal(x, ref[2 * n + rank][0])
    s.seed, s.rank, s.world_size = 1, 0, 1
    assert not torch.equal(s.batch(tokens, 0)[0], ref[0][0])


def test_state_dict_counts_micro_batches_and_resumes(built):
    built.trainer = SimpleNamespace(global_step=5, accumulate_grad_batches=4, global_rank=0, world_size=1)
    try:
        state = built.state_dict()
    finally:
        built.trainer = None
    assert state == {"start_batch": 20}
    dm = make_dm(cache=built.folder.parent, path=Path(built.source.root))
    dm.load_state_dict(state)
    x, _ = next(iter(dm.train_dataloader()))
    assert torch.equal(x, built.train_stream().batch(read_bin(built, "train"), 20)[0])


def test_val_windows_are_deterministic_and_split_across_ranks(built):
    tokens = read_bin(built, "validation")
    xs = torch.cat([x for x, _ in built.val_dataloader()])
    ys = torch.cat([y for _, y in built.val_dataloader()])
    n = (len(tokens) - 1) // SEQ
    assert xs.shape == (n, SEQ)
    assert np.array_equal(xs.flatten().numpy(), tokens[: n * SEQ])  # non-overlapping, in order
    assert np.array_equal(ys.flatten().numpy(), tokens[1 : n * SEQ + 1])
    shares = []
    for rank in (0, 1):
        built.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        try:
            shares.append(torch.cat([x for x, _ in built.val_dataloader()]))
        finally:
            built.trainer = None
    assert len(shares[0]) == len(shares[1]) == n // 2
    assert torch.equal(torch.cat(shares), xs[: 2 * (n // 2)])
    capped = make_dm(Path(built.source.root), built.folder.parent, val_tokens=3 * SEQ + 1)
    assert capped.val_dataset().n_windows == 3
    with_workers = torch.utils.data.DataLoader(built.val_dataset(), batch_size=None, num_workers=2)
    assert torch.equal(torch.cat([x for x, _ in with_workers]), xs)


# ---- bad input and configs ----
def test_bad_input_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match="data.path.*not a directory"):
        make_dm(tmp_path / "missing", tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="data.path.*no recognised.*train.txt.*parquet"):
        make_dm(tmp_path / "empty", tmp_path)
    for bad in (100, 2**32 + 1, 4096.0):
        with pytest.raises(ValueError, match="data.vocab_size"):
            make_dm(cache=tmp_path, vocab_size=bad)
    with pytest.raises(ValueError, match="data.source"):
        make_dm(cache=tmp_path, source="wikipedia")
    with pytest.raises(ValueError, match="data=synthetic takes no path"):
        make_dm(cache=tmp_path, source="synthetic", path=str(tmp_path))
    with pytest.raises(ValueError, match="data.val_tokens"):
        make_dm(cache=tmp_path, val_tokens=SEQ)


def _write_parquet_without_rows(folder: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in ("train.parquet", "valid.parquet"):
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), folder / name)


@pytest.mark.parametrize("kind, found", [
    ("empty text", "train.txt is empty (0 bytes)"),
    ("separators only", f"train.txt (30 bytes) holds no story, only blank and {EOT} lines"),
    ("empty jsonl", "train.jsonl is empty (0 bytes)"),
    ("parquet without rows", "train.parquet has 0 rows"),
])
def test_local_copy_without_stories_is_one_line_naming_the_path(tmp_path, kind, found):
    """Such a folder used to end in a datasets traceback (SchemaInferenceError) at load time."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("train.txt", "validation.txt") if "text" in kind or "separators" in kind else ():
        (folder / name).write_text(f"{EOT}\n\n{EOT}\n\n" if kind == "separators only" else "")
    if kind == "empty jsonl":
        (folder / "train.jsonl").write_text("")
        (folder / "valid.jsonl").write_text('{"text": "One story."}\n')
    if kind == "parquet without rows":
        _write_parquet_without_rows(folder)
    with pytest.raises(ValueError) as info:
        make_dm(folder, cache=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith(f"data.path={str(folder)!r}: {found}") and "\n" not in message
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_hub_unreachable_says_what_to_do(tmp_path, monkeypatch):
    def offline(*a, **k):  # stands in for load_dataset: tests never call the Hub
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub")

    monkeypatch.setattr(sources_mod, "load_dataset", offline)
    dm = TokenDataModule(source="tinystories", path=None, vocab_size=VOCAB, seq_len=SEQ,
                         cache_dir=str(tmp_path), show_progress=False)
    with pytest.raises(DataUnavailableError, match=r"data\.path=DIR.*data=synthetic"):
        dm.setup()
    assert not any(tmp_path.rglob("manifest.json"))


def test_hub_source_builds_and_survives_going_offline(tmp_path, monkeypatch, stories, built):
    train, val = stories
    fake_hub = datasets.DatasetDict({  # stands in for the Hub's DatasetDict
        "train": datasets.Dataset.from_dict({"text": train, "id": list(range(len(train)))}),
        "validation": datasets.Dataset.from_dict({"text": val}),
    })
    monkeypatch.setattr(sources_mod, "load_dataset", lambda *a, **k: fake_hub)
    dm = TokenDataModule(source="tinystories", path=None, vocab_size=VOCAB, seq_len=SEQ,
                         cache_dir=str(tmp_path), show_progress=False)
    dm.setup()
    assert "roneneldan/TinyStories" in dm.describe()
    assert np.array_equal(read_bin(dm, "train"), read_bin(built, "train"))  # same code as a local copy

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(sources_mod, "load_dataset", offline)
    later = TokenDataModule(source="tinystories", path=None, vocab_size=VOCAB, seq_len=SEQ,
                            cache_dir=str(tmp_path), show_progress=False)
    with pytest.warns(UserWarning, match="data=synthetic.*Using the complete token cache"):
        later.setup()
    assert later.manifest == dm.manifest


def test_synthetic_source_builds_and_data_configs_compose(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    dm = instantiate(compose_cfg(["data=synthetic", "data.vocab_size=300", "data.n_stories=60",
                                  "data.num_workers=0", "+data.show_progress=false"]).data)
    assert isinstance(dm, TokenDataModule) and dm.seq_len == 256 and dm.folder.parent == tmp_path
    dm.setup()
    assert "synthetic" in dm.describe() and dm.manifest["splits"]["train"]["stories"] == 60
    cfg = compose_cfg(["data=tinystories", "model=tiny"])
    assert cfg.data.source == "tinystories" and cfg.model.vocab_size == cfg.data.vocab_size
    assert isinstance(instantiate(cfg.data), TokenDataModule)  # construction alone touches no network


def test_python_api_reads_minillm_cache_as_the_yaml_does(tmp_path, monkeypatch):
    """``TokenDataModule(...)`` without ``cache_dir`` used to write to ./data_cache whatever the env."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "shared"))
    assert TokenDataModule(source="synthetic").folder.parent == tmp_path / "shared"
    assert TokenDataModule(source="synthetic", cache_dir="mine").folder.parent == tmp_path / "mine"
    assert instantiate(compose_cfg(["data=synthetic"]).data).folder.parent == tmp_path / "shared"
    monkeypatch.delenv("MINILLM_CACHE")
    assert TokenDataModule(source="synthetic").folder.parent == tmp_path / "data_cache"


def test_lightning_checkpoint_resumes_the_stream_exactly(tmp_path, built):
    import lightning as L

    class Recorder(L.LightningModule):  # a one-weight model that remembers the batches it saw
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, i):
            self.seen.append(batch[0])
            return self.w * batch[0].float().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(steps, ckpt=None):
        model, dm = Recorder(), make_dm(Path(built.source.root), built.folder.parent)
        trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=2, limit_val_batches=0,
                            accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        return trainer, model

    trainer, first = fit(3)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    _, resumed = fit(5, str(tmp_path / "a.ckpt"))
    stream, tokens = built.train_stream(), read_bin(built, "train")
    expected = [stream.batch(tokens, n)[0] for n in range(10)]
    assert len(first.seen) == 6 and len(resumed.seen) == 4
    assert all(torch.equal(a, b) for a, b in zip(first.seen + resumed.seen, expected))
