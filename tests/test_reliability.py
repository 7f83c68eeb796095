"""Reliability: exact resume after SIGKILL, atomic checkpoints, config errors before any work,
non-finite losses, untrusted checkpoint files, compiled <-> eager checkpoints."""

import itertools
import json
import math
import os
import pickle
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_TRAIN, compose_cfg, options
from hydra.core.global_hydra import GlobalHydra

import train
from minillm import load_checkpoint
from minillm.checkpoint import read_checkpoint
from minillm.model import Transformer, build_model
from minillm.files import partial_path
from minillm.training import assemble, assembly, checkpoint_io
from minillm.training.checkpoint_io import AtomicCheckpointIO
from minillm.training.module import LanguageModel, NonFiniteError, check_finite

# 12 steps of the tiny model, a checkpoint every 3; dropout so that the RNG state matters on resume.
RUN = TINY_TRAIN + ["trainer.max_steps=12", "trainer.val_check_interval=3",
                    "trainer.limit_val_batches=1", "model.dropout=0.1", "logger=none"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The synthetic token cache shared with the other test files (same TINY_TRAIN data)."""
    return tmp_path_factory.getbasetemp() / "data_cache"


def _overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return RUN + [f"run_dir={run_dir}", f"data.cache_dir={cache}", *extra]


def _train(run_dir: Path, cache: Path, *extra: str):
    return train.main(compose_cfg(_overrides(run_dir, cache, *extra)))


def _history(run_dir: Path) -> list[dict]:
    keys = ("step", "tokens", "val_loss", "train_loss")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(line).get(k) for k in keys} for line in lines]


def _ckpt(run_dir: Path, name: str = "last") -> dict:
    return torch.load(run_dir / "checkpoints" / f"{name}.ckpt", weights_only=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache) -> Path:
    """An uninterrupted 12-step run."""
    run_dir = tmp_path_factory.mktemp("straight")
    _train(run_dir, cache)
    return run_dir


# ---- resume ----

KILLED_CHILD = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
real_save = torch.save

def save(obj, f, *args, **kwargs):  # SIGKILL halfway through writing the step-9 checkpoint
    if isinstance(obj, dict) and obj.get("global_step") == 9:
        f.write(b"PK\\x03\\x04 the first bytes of a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.argv = ["train.py", *{overrides!r}]
import runpy
runpy.run_path({train_py!r}, run_name="__main__")
"""


def test_sigkilled_run_resumes_bit_identically(straight, cache, tmp_path):
    run_dir = tmp_path / "killed"
    overrides = _overrides(run_dir, cache, f"hydra.run.dir={run_dir}")
    script = KILLED_CHILD.format(root=str(ROOT), threads=torch.get_num_threads(), overrides=overrides,
                                 train_py=str(ROOT / "train.py"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # The kill tore the step-9 file; the step-6 checkpoint is whole and the history ran ahead of it.
    assert _ckpt(run_dir)["global_step"] == 6
    assert [h["step"] for h in _history(run_dir)] == [3, 6, 9]

    _train(run_dir, cache, "ckpt_path=last")
    assert _history(run_dir) == _history(straight)  # same loss curve, bit for bit
    resumed, reference = _ckpt(run_dir), _ckpt(straight)
    assert resumed["global_step"] == 12 and resumed["tokens_seen"] == reference["tokens_seen"]
    assert resumed["TokenDataModule"] == reference["TokenDataModule"] == {"start_batch": 12}
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for a, b in zip(resumed["optimizer_states"][0]["state"].values(),
                    reference["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(1000.0)}, path)
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half of the new file is on disk when the "disk" fails
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    old = io.load_checkpoint(path)
    assert old["step"] == 1 and torch.equal(old["w"], torch.arange(1000.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left over
    io.save_checkpoint({"step": 3}, path)
    assert io.load_checkpoint(path)["step"] == 3


# ---- configuration errors: one message naming key, value and what is valid, before any work ----

@pytest.mark.parametrize("overrides, message", [
    (["model/attention=mha", "model.d_model=30", "model.n_heads=4"], "model.n_heads=4 must divide model.d_model=30"),
    (["model.attention.n_kv_heads=3", "model.n_heads=4", "model.d_model=32"], "model.attention.n_kv_heads=3"),
    (["model/position=learned", "data.seq_len=64"], "data.seq_len=64 is longer than the Learned position table (model.max_seq_len=32)"),
    (["model/ffn=moe", "model.ffn.n_experts=4", "model.ffn.top_k=5"], "model.ffn.top_k=5"),
    (["model.vocab_size=300"], "model.vocab_size=300 is smaller than data.vocab_size=512"),
    (["trainer.accumulate_grad_batches=2"], "trainer.val_check_interval=3 is not a multiple of trainer.accumulate_grad_batches=2"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 must be an integer >= 1"),
    (["trainer.precision=8"], "trainer.precision='8' is not one of"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["optimizer.lr=-1"], "Invalid learning rate: -1"),
    (["scheduler.warmup_steps=12"], "scheduler.warmup_steps=12 must be in [0, scheduler.max_steps=12)"),
    (["nonfinite.max_skips=-1"], "nonfinite.max_skips=-1"),
    (["nonfinite.check=often"], "nonfinite.check='often' must be one of auto, step, log"),
    (["nonfinite.check=log", "nonfinite.max_skips=2"], "nonfinite.check=log cannot skip batches (nonfinite.max_skips=2)"),
    (["ckpt_path=last"], "ckpt_path=last: no checkpoint file"),
])
def test_validate_names_the_key_value_and_valid_choices(overrides, message, cache, tmp_path):
    with pytest.raises(ValueError) as info:
        assemble(compose_cfg(_overrides(tmp_path, cache, *overrides)))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_validate_refuses_gpu_without_cuda(cache, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="trainer.accelerator=gpu but no CUDA device"):
        assemble(compose_cfg(_overrides(tmp_path, cache, "trainer=gpu")))


def test_resume_into_a_different_model_is_refused(straight, cache, tmp_path):
    cfg = compose_cfg(_overrides(tmp_path, cache, "model.d_model=64",
                                 f"ckpt_path={straight / 'checkpoints' / 'last.ckpt'}"))
    with pytest.raises(ValueError, match=r"does not fit the configured model.*model.d_model: 32 -> 64"):
        assemble(cfg)


def test_train_validates_before_preparing_data(tmp_path, capsys):
    cache = tmp_path / "fresh_cache"
    with pytest.raises(SystemExit) as info:
        _train(tmp_path / "run", cache, "model.n_heads=5")
    assert info.value.code == 2 and "model.n_heads=5" in capsys.readouterr().err
    assert not cache.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, group", [("model=nope", "model"), ("model/position=nope", "model/position")])
def test_unknown_component_is_one_line_listing_the_options(override, group, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py", override])
    try:
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")  # as `python train.py`
    finally:
        GlobalHydra.instance().clear()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err
    assert err == f"error: {override}: no such option; valid: {', '.join(options(group))}"


# ---- non-finite losses ----

def _nan_forward_at(monkeypatch, calls: set[int]) -> None:
    """Make the training forwards numbered ``calls`` (0-based) return a NaN loss (or logits)."""
    real, counter = Transformer.forward, itertools.count()

    def forward(self, idx, cache=None, targets=None):
        out = real(self, idx, cache, targets)
        if not (self.training and next(counter) in calls):
            return out
        return out * float("nan") if targets is None else out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(Transformer, "forward", forward)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(cache, tmp_path, monkeypatch, capsys):
    _nan_forward_at(monkeypatch, {7})
    with pytest.raises(SystemExit) as info:
        _train(tmp_path, cache)
    err = capsys.readouterr().err
    assert info.value.code == 1 and "non-finite training loss (nan) at step 7" in err
    last = _ckpt(tmp_path)
    assert last["global_step"] == 6
    check_finite(last["state_dict"], 6)
    history = _history(tmp_path)  # two validations, then the stop (so a sweep report says diverged)
    assert [h["step"] for h in history[:2]] == [3, 6] and len(history) == 3
    assert history[2]["val_loss"] is None and math.isnan(history[2]["train_loss"])


def test_skipped_nonfinite_batches_make_no_update(cache, tmp_path, monkeypatch):
    _nan_forward_at(monkeypatch, {3, 4, 5})  # steps 4-6 skipped: weights stay those of step 3
    _train(tmp_path, cache, "trainer.max_steps=6", "nonfinite.max_skips=3")
    last, best = _ckpt(tmp_path), _ckpt(tmp_path, "best")
    assert last["global_step"] == 6 and best["global_step"] == 3 and last["nonfinite_skips"] == 3
    assert last["TokenDataModule"] == {"start_batch": 6}  # the skipped batches were consumed
    for key, value in best["state_dict"].items():
        assert torch.equal(last["state_dict"][key], value), key


def test_skips_run_out(cache, tmp_path, monkeypatch, capsys):
    _nan_forward_at(monkeypatch, {1, 4})
    with pytest.raises(SystemExit):
        _train(tmp_path, cache, "trainer.max_steps=6", "nonfinite.max_skips=1")
    assert "at step 4" in capsys.readouterr().err and _ckpt(tmp_path)["global_step"] == 3


def test_no_checkpoint_is_written_from_nonfinite_weights(cache, tmp_path, monkeypatch, capsys):
    real_step, calls = torch.optim.AdamW.step, itertools.count(1)

    def step(self, *args, **kwargs):  # the 6th update overflows a weight; losses stay finite until then
        out = real_step(self, *args, **kwargs)
        if next(calls) == 6:
            self.param_groups[0]["params"][0].data[0, 0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(SystemExit) as info:
        _train(tmp_path, cache)
    assert info.value.code == 1 and "non-finite weights at step 6" in capsys.readouterr().err
    for name in ("last", "best"):
        checkpoint = _ckpt(tmp_path, name)
        assert checkpoint["global_step"] == 3
        check_finite(checkpoint["state_dict"], 3)
    with pytest.raises(NonFiniteError, match=r"non-finite weights at step 5 \(b\)"):
        check_finite({"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")])}, 5)


# ---- untrusted and damaged files ----

class _Payload:
    """Unpickling this runs ``open(marker, "w")``: the attack a checkpoint must not be able to make."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_checkpoint_never_runs_code(straight, cache, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = read_checkpoint(straight / "checkpoints" / "last.ckpt")
    evil["callbacks"] = _Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(evil, path)
    with pytest.raises(ValueError, match=r"refused: .*could run code.*GLOBAL .*open"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="refused"):  # train.py's check
        assemble(compose_cfg(_overrides(tmp_path / "run", cache, f"ckpt_path={path}")))
    # Lightning's own resume path, without the assembly's check
    monkeypatch.setattr(assembly, "check_resume", lambda *args: None)
    run = assemble(compose_cfg(_overrides(tmp_path / "run", cache, f"ckpt_path={path}")))
    monkeypatch.undo()
    from minillm.training import train as train_run

    with pytest.raises(ValueError, match="refused"):
        train_run(run)
    pickled = tmp_path / "pickled.ckpt"  # a bare pickle of the payload, not even a torch file
    pickled.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="not a torch file"):
        load_checkpoint(pickled)
    assert not marker.exists()


def test_truncated_checkpoint_is_reported(straight, tmp_path):
    data = (straight / "checkpoints" / "last.ckpt").read_bytes()
    for name, content in [("truncated", data[: len(data) // 2]), ("garbage", b"\x00not a checkpoint" * 9)]:
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=r"is not a readable checkpoint \(truncated, corrupt"):
            load_checkpoint(path)
        with pytest.raises(ValueError, match=r"is not a readable checkpoint \(truncated, corrupt"):
            AtomicCheckpointIO().load_checkpoint(path)


def test_whole_checkpoint_is_plain_data(straight):
    ckpt = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "rng_states",
            "TokenDataModule", "config", "tokenizer", "nonfinite_skips"} <= ckpt.keys()
    assert not partial_path(straight / "checkpoints" / "last.ckpt").exists()


# ---- compiled <-> eager ----

class _Compiled(torch.nn.Module):
    """Names weights as ``torch.compile``'s OptimizedModule does (``_orig_mod.``), without compiling."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = model


def test_compiled_and_eager_checkpoints_load_into_each_other(straight, tmp_path):
    cfg = compose_cfg(RUN)
    eager = LanguageModel(build_model(cfg.model), None, None, {})
    compiled = LanguageModel(_Compiled(build_model(cfg.model)), None, None, {})
    assert all("_orig_mod." in k for k in compiled.state_dict())
    for source, target in [(eager, compiled), (compiled, eager)]:
        checkpoint = {"state_dict": {k: v + 1 for k, v in source.state_dict().items()}}
        target.on_load_checkpoint(checkpoint)  # Lightning calls it before loading the weights
        target.load_state_dict(checkpoint["state_dict"])  # strict
        for a, b in zip(source.state_dict().values(), target.state_dict().values()):
            assert torch.equal(a + 1, b)
    # A compiled run's checkpoint file, read by minillm.load_checkpoint into an eager model.
    checkpoint = read_checkpoint(straight / "checkpoints" / "last.ckpt")
    checkpoint["state_dict"] = {k.replace("model.", "model._orig_mod.", 1): v
                                for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, tmp_path / "compiled.ckpt")
    model = load_checkpoint(tmp_path / "compiled.ckpt").model
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][f"model._orig_mod.{key}"]), key


@pytest.mark.parametrize("preset", options("model"))
def test_every_preset_round_trips_through_a_checkpoint(preset, tmp_path):
    """Weights and persistent buffers (e.g. MoE balancing state) survive save + weights_only load."""
    cfg = compose_cfg([f"model={preset}", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                       "model.max_seq_len=32", "data.vocab_size=512"])
    saved = LanguageModel(build_model(cfg.model), None, None, {})
    for value in saved.state_dict().values():  # every entry, buffers included, off its init value
        if value.is_floating_point():
            value.add_(torch.rand_like(value))
    AtomicCheckpointIO().save_checkpoint({"state_dict": saved.state_dict()}, tmp_path / "m.ckpt")
    checkpoint = AtomicCheckpointIO().load_checkpoint(tmp_path / "m.ckpt")
    loaded = LanguageModel(build_model(cfg.model), None, None, {})
    loaded.on_load_checkpoint(checkpoint)
    loaded.load_state_dict(checkpoint["state_dict"])  # strict: no key missing or left over
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
