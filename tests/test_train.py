"""Training end to end on CPU: checkpoints, logs, resume, schedule, weight-decay groups, errors."""

import csv
import json
import math
import os
import re
import traceback

import lightning as L
import pytest
import torch
from conftest import TINY_TRAIN, compose_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

import train
from minillm.data import generate_stories, load_tokenizer
from minillm.model import build_model
from minillm.training.loggers import wandb_resume
from minillm.training.optimizers import param_groups
from minillm.training.schedule import warmup_cosine, warmup_cosine_lr


def _train(run_dir, *overrides, cache=None):
    """TINY_TRAIN into ``run_dir``; with ``data=tinystories`` among ``overrides``, on that instead."""
    cache = cache or run_dir.parent / "data_cache"
    return train.main(compose_cfg(TINY_TRAIN + [f"run_dir={run_dir}", f"data.cache_dir={cache}", *overrides]))


def test_run_writes_plain_data_checkpoints_and_history(tiny_run):
    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (tiny_run / "checkpoints" / "best.ckpt").is_file()
    assert ckpt["global_step"] == 4
    assert ckpt["tokens_seen"] == 4 * 4 * 32  # steps * batch * seq_len
    cfg = OmegaConf.create(ckpt["config"])
    model = build_model(cfg.model)
    assert cfg.num_params == model.num_params() and cfg.num_params_active == model.num_params(True)
    tokenizer = load_tokenizer(ckpt["tokenizer"])
    assert tokenizer.decode(tokenizer.encode("Once upon a time").ids) == "Once upon a time"
    history = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]
    assert [h["tokens"] for h in history] == [2 * 128, 4 * 128]
    for h in history:
        assert math.isfinite(h["val_loss"]) and h["val_bpb"] > 0 and h["tokens_per_sec"] > 0
    best = torch.load(tiny_run / "checkpoints" / "best.ckpt", weights_only=True)
    best_score = min(h["val_loss"] for h in history)
    assert best["global_step"] == [h["step"] for h in history if h["val_loss"] == best_score][0]
    assert (tiny_run / "csv" / "metrics.csv").is_file()
    assert OmegaConf.load(tiny_run / "config.yaml").num_params == cfg.num_params


def _csv_header(run_dir) -> list[str]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return next(csv.reader(f))


def _csv_rows(run_dir) -> list[tuple]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return [(int(r["step"]), r["train/loss"] and round(float(r["train/loss"]), 4),
                 r["val/loss"] and round(float(r["val/loss"]), 4)) for r in csv.DictReader(f)]


def test_resume_equals_an_uninterrupted_run(tiny_run, tmp_path):
    run_dir = tmp_path / "resumed"
    # ckpt_path=auto: a fresh start (no checkpoint yet), then a resume (as a requeued cluster job)
    _train(run_dir, "trainer.max_steps=2", "scheduler.max_steps=4", "ckpt_path=auto",
           cache=tiny_run.parent.parent / "data_cache")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    with (run_dir / "csv" / "metrics.csv").open("a") as f:  # as if killed after logging step 3
        f.write(",".join("3" if key == "step" else "9.9" for key in _csv_header(run_dir)) + "\n")
    with (run_dir / "samples.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "prompt": "", "sample": 0, "text": "killed"}) + "\n{\"step\": 3, \"pro")
    _train(run_dir, "ckpt_path=auto", cache=tiny_run.parent.parent / "data_cache")
    # The CSV log goes on: the rows before the checkpoint kept, those after it replaced.
    assert _csv_rows(run_dir) == _csv_rows(tiny_run)
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    straight = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["tokens_seen"] == straight["tokens_seen"]
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    # The text samples too: the killed run's lines (one cut short) dropped; the same texts.
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 4]
    assert (run_dir / "samples.jsonl").read_text() == (tiny_run / "samples.jsonl").read_text()
    assert resumed["callbacks"]["SampleText"] == {"validations": 2}  # counted on from the checkpoint


def test_local_tinystories_copy_trains(tmp_path):
    data = tmp_path / "stories"
    data.mkdir()
    for split, n in (("train", 40), ("validation", 10)):  # generated text in TinyStories' file format
        text = "".join(f"{s}\n<|endoftext|>\n" for s in generate_stories(n, 1, split))
        (data / f"{split}.txt").write_text(text)
    run_dir = tmp_path / "run"
    _train(run_dir, "data=tinystories", f"data.path={data}", "trainer.max_steps=3", "logger=none")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["config"]["data"]["path"] == str(data)
    # Validation every 2 steps, and at the last step (3) though it is off that grid.
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3]


def test_schedule_follows_warmup_then_cosine():
    lr, min_lr, warmup, total = 1e-3, 1e-4, 10, 110
    at = lambda s: warmup_cosine_lr(s, lr, warmup, total, min_lr)  # noqa: E731
    assert at(0) == pytest.approx(lr / 11) and at(9) == pytest.approx(lr * 10 / 11)
    assert at(10) == pytest.approx(lr) and at(60) == pytest.approx((lr + min_lr) / 2)
    assert at(110) == pytest.approx(min_lr) and at(500) == min_lr
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = warmup_cosine(optimizer, warmup, total, min_lr)
    for step in range(30):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(at(step))
        optimizer.step()
        scheduler.step()
    assert scheduler.state_dict()["lr_lambdas"] == [None]  # nothing callable in checkpoints
    with pytest.raises(ValueError, match="scheduler.max_steps"):
        warmup_cosine(optimizer, warmup, -1, min_lr)
    with pytest.raises(ValueError, match="scheduler.min_lr"):
        warmup_cosine(optimizer, warmup, total, 1.0)


def test_default_warmup_follows_the_run_length_and_a_set_one_is_checked():
    """`model=moe_rope trainer=cpu trainer.max_steps=30` used to stop on warmup_steps=100."""
    def first_lr(*overrides):  # lr of step 0 is lr / (warmup + 1)
        cfg = compose_cfg(["model=moe_rope", *overrides])
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        instantiate(cfg.scheduler)(optimizer)
        return optimizer.param_groups[0]["lr"]

    assert first_lr("trainer=cpu", "trainer.max_steps=30") == pytest.approx(1 / 4)  # 3 steps
    assert first_lr("trainer=cpu", "trainer.max_steps=1") == 1.0  # no warmup at all
    # The default runs keep their 100 steps; an ablation's explicit 20 stays 20.
    assert first_lr("trainer=cpu") == first_lr("trainer=gpu") == pytest.approx(1 / 101)
    assert first_lr("experiment=ablate_position") == pytest.approx(1 / 21)
    assert first_lr("experiment=demo") == pytest.approx(1 / 31)
    with pytest.raises(ValueError, match=re.escape("scheduler.warmup_steps=100 must be in [0, "
                                                   "scheduler.max_steps=30)")):
        first_lr("trainer=cpu", "trainer.max_steps=30", "scheduler.warmup_steps=100")
    with pytest.raises(ValueError, match="scheduler.warmup_steps='soon' must be an integer .* or auto"):
        first_lr("scheduler.warmup_steps=soon")


def test_no_weight_decay_on_norms_biases_embeddings():
    cfg = compose_cfg(["model=gpt2", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                       "model/position=learned", "model.attention.bias=true"])
    model = build_model(cfg.model)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert len(decayed) + len(kept) == len(names) and not decayed & kept
    assert {"tok_emb.weight", "position.table.weight"} <= kept
    assert all(n.endswith(".weight") and "norm" not in n for n in decayed)
    assert any(n.endswith(".bias") for n in kept) and any("norm" in n for n in kept)
    assert any(n.startswith("blocks.0.attn") for n in decayed)


@pytest.mark.parametrize("override, message", [
    ("trainer=gpu", "trainer=cpu"),
    ("data.path=/no/such/dir", "data.path"),
    ("ckpt_path=last", "ckpt_path=last"),
    ("model.n_heads=3", "model.n_heads=3"),
    ("scheduler.warmup_steps=10", "scheduler.warmup_steps=10"),
    ("compile=maybe", "compile=maybe"),
    ("callbacks.throughput.peak_flops=-1", "callbacks.throughput.peak_flops=-1"),
    ("callbacks.samples.top_p=0", "callbacks.samples.top_p=0"),
])
def test_bad_config_exits_with_one_line(tmp_path, capsys, override, message):
    if override == "trainer=gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    overrides = (["data=tinystories"] if "data.path" in override else []) + [override]
    with pytest.raises(SystemExit) as exit_info:
        _train(tmp_path / "run", *overrides)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("group", ["trainer", "logger", "callbacks"])
def test_every_option_instantiates(group, tmp_path):
    from conftest import options
    from hydra.utils import instantiate

    for option in options(group):
        cfg = compose_cfg([f"{group}={option}", f"run_dir={tmp_path}"])
        if group == "trainer":  # build each trainer on the CPU: the keys must all be Trainer arguments
            if "FSDPStrategy" in str(cfg.trainer.get("strategy")):  # needs CUDA: build the strategy alone
                assert instantiate(cfg.trainer.strategy).kwargs["auto_wrap_policy"] is not None
                cfg.trainer.strategy = "auto"
            trainer = instantiate(cfg.trainer, accelerator="cpu", precision="32-true", logger=False)
            assert trainer.max_steps == cfg.trainer.max_steps
        else:
            assert all(instantiate(c) is not None for c in cfg[group].values())


class HostReads(L.Callback):
    """Records, per micro-batch, whether a tensor value was read on the host (``item``, ``bool``,
    ``tolist``, ...): on a GPU each such read waits for the device. Reads inside the DataLoader
    are of host data by construction (the batch reaches the GPU by a non-blocking copy)."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}
    batches: set[int] = set()  # micro-batches (indices) during which a read happened

    def __init__(self) -> None:
        HostReads.batches = set()
        self.batch = -1
        callback = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in HostReads.READS and not any(
                        "torch/utils/data/" in f.filename for f in traceback.extract_stack()):
                    HostReads.batches.add(callback.batch)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def on_train_start(self, trainer, pl_module):
        self.mode.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch_idx

    def on_train_end(self, trainer, pl_module):
        self.mode.__exit__(None, None, None)


@pytest.mark.parametrize("model", [[], ["model/ffn=moe_auxfree"]], ids=["dense", "moe"])
def test_the_training_loop_reads_the_device_only_at_log_steps(tmp_path, model):
    # What trainer=gpu does on a GPU, asked for on CPU: the fused optimizer (on CPU, torch's
    # default AdamW reads its step count on the host) and the loss checked at log steps.
    _train(tmp_path / "run", "trainer.max_steps=12", "trainer.log_every_n_steps=4",
           "trainer.val_check_interval=8", "+optimizer.fused=true", "nonfinite.check=log",
           "+callbacks.host_reads._target_=test_train.HostReads", *model)
    # Micro-batches 3, 7 and 11 end log steps (7 also validates and saves, 11 ends the run); the
    # progress bar, the logged metrics, the throughput and MoE monitors read nothing in between.
    assert HostReads.batches == {3, 7, 11}


def test_a_resumed_run_goes_on_in_the_same_wandb_run(tmp_path):
    wandb = compose_cfg(["logger=wandb"]).logger.wandb
    first = wandb_resume(wandb, tmp_path, resuming=False)
    assert first["resume"] == "allow" and (tmp_path / "wandb_id").read_text().strip() == first["id"]
    assert wandb_resume(wandb, tmp_path, resuming=True) == first  # ckpt_path=last: the same run
    fresh = wandb_resume(wandb, tmp_path, resuming=False)  # a new run in the same directory
    assert fresh["id"] != first["id"] and wandb_resume(wandb, tmp_path, resuming=True) == fresh
    wandb.id = "mine"
    assert wandb_resume(wandb, tmp_path, resuming=True) == {}  # an explicit id is the user's
    assert wandb_resume(compose_cfg(["logger=csv"]).logger.csv, tmp_path, resuming=True) == {}


def test_debug_fast_runs_from_the_command_line(tmp_path):
    """``python train.py debug=fast``: the tests' tiny run, as a user types it."""
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "debug=fast", f"run_dir={tmp_path}",
                           f"data.cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]  # debug=fast: 4 steps, validating every 2
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_a_run_whose_data_cannot_be_read_leaves_no_wandb_run(tmp_path, monkeypatch, capsys):
    from minillm.data import DataUnavailableError, TokenDataModule

    def unreadable(self):
        raise DataUnavailableError("data.path=DIR: cannot read the stories")

    monkeypatch.setattr(TokenDataModule, "prepare_data", unreadable)
    with pytest.raises(SystemExit) as info:
        _train(tmp_path / "run", "logger=wandb")
    assert info.value.code == 2 and "cannot read the stories" in capsys.readouterr().err
    assert not list(tmp_path.rglob("wandb")) and not list(tmp_path.rglob("*.wandb"))

