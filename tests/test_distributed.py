"""Distributed training on CPU (2 processes, gloo) and throughput accounting.

DDP rank r's micro-batch n is single-rank micro-batch 2n + r, so a 2-process run accumulating 2
micro-batches must equal one process accumulating 4: same weights, same validation losses, also
when stopped and resumed (each rank continues its own slice). MFU accounting is checked against
the formula worked by hand.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY_TRAIN, compose_cfg
from hydra.utils import instantiate

import train
from minillm.data.datamodule import TrainStream
from minillm.model import build_model
from minillm.training.throughput import PEAK_FLOPS, flops_per_token, mfu, peak_flops

# TINY_TRAIN with 16 validation windows (8 per rank) all evaluated, so both runs see the same ones.
DDP_TRAIN = TINY_TRAIN + [
    "trainer.max_steps=4", "scheduler.max_steps=4", "trainer.limit_val_batches=4",
    f"data.val_tokens={16 * 32 + 1}",
]


def _train_py(run_dir, cache, *overrides) -> None:
    """``python train.py`` in a subprocess (DDP re-launches the script for rank 1)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), *DDP_TRAIN, f"hydra.run.dir={run_dir}",
           f"data.cache_dir={cache}", *overrides]
    result = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ddp_with_accumulation_stopped_and_resumed_equals_one_process(tmp_path):
    """2 ranks x 2 accumulated micro-batches == one process accumulating 4 (the same global batch),
    also when the DDP run stops at step 2 and resumes from its checkpoint to step 4."""
    cache = tmp_path / "data_cache"
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # val_check_interval counts micro-batches per rank: both runs validate every 2 steps.
    train.main(compose_cfg(DDP_TRAIN + [f"run_dir={single}", f"data.cache_dir={cache}",
                                        "trainer.accumulate_grad_batches=4", "trainer.val_check_interval=8"]))
    ddp_run = ("trainer.devices=2", "trainer.strategy=ddp", "trainer.accumulate_grad_batches=2",
               "trainer.val_check_interval=4")
    _train_py(ddp, cache, *ddp_run, "trainer.max_steps=2")
    assert torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    _train_py(ddp, cache, *ddp_run, "ckpt_path=last")

    one = torch.load(single / "checkpoints" / "last.ckpt", weights_only=True)
    two = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=True)
    assert one["global_step"] == two["global_step"] == 4
    assert one["tokens_seen"] == two["tokens_seen"] == 4 * 4 * 4 * 32  # steps * micro-batches * B * T
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    first, second = _history(single), _history(ddp)
    assert [h["step"] for h in first] == [h["step"] for h in second] == [2, 4]  # rank 0 alone writes
    samples = [[json.loads(line)["step"] for line in (run / "samples.jsonl").read_text().splitlines()]
               for run in (single, ddp)]
    assert samples[0] == samples[1] == [2, 4]  # one prompt, one sample, rank 0 alone
    for a, b in zip(first, second):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
        assert b["tokens"] == a["tokens"]
    # Only rank 0 writes run files: the same files as one process, besides Hydra's (the in-process
    # run has none), whose log file for rank 1 stays empty.
    hydra_files = {".hydra", "train.log", "train_ddp_process_1.log", "status.json"}
    assert {p.name for p in ddp.iterdir()} == {p.name for p in single.iterdir()} | hydra_files
    assert (ddp / "train_ddp_process_1.log").stat().st_size == 0
    assert json.loads((ddp / "status.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (ddp / "csv").iterdir()) == ["hparams.yaml", "metrics.csv"]


def test_ranks_read_distinct_slices_and_resume_on_their_own(tmp_path):
    tokens = torch.randint(0, 512, (5000,), dtype=torch.int32).numpy()
    tokens.tofile(tmp_path / "train.bin")

    def batches(rank, world, start, n):
        stream = TrainStream(str(tmp_path / "train.bin"), "int32", 8, 3, 0, start, rank, world)
        it = iter(stream)
        return [next(it)[0] for _ in range(n)]

    single = batches(0, 1, 0, 8)
    ranks = [batches(r, 2, 0, 4) for r in (0, 1)]
    for n in range(4):  # rank r, batch n == single batch 2n + r; so the two ranks never coincide
        for r in (0, 1):
            assert torch.equal(ranks[r][n], single[2 * n + r])
        assert not torch.equal(ranks[0][n], ranks[1][n])
    # Resumed after 3 steps (start_batch = global_step * accumulate_grad_batches = 3): batch 3 onward.
    for r in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(batches(r, 2, 3, 1), ranks[r][3:]))


def test_flops_per_token_and_mfu_match_the_formula_by_hand():
    # Dense: d 32, 2 layers, 2 heads, SwiGLU hidden from the preset, learned positions (not counted).
    cfg = compose_cfg(["model=gpt2", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                       "model.max_seq_len=16", "data.vocab_size=512"])
    model = build_model(cfg.model)
    by_name = dict(model.named_parameters())
    n_matmul = sum(p.numel() for name, p in by_name.items() if not name.startswith("position."))
    assert n_matmul == model.num_params() - 16 * 32  # the 16 x 32 position table is looked up
    expected = 6 * n_matmul + 12 * 2 * 2 * 16 * 16  # 6N + 12 * layers * heads * head_dim * T
    assert flops_per_token(model, 16) == expected
    assert mfu(1000.0, expected, 1e9) == pytest.approx(1000 * expected / 1e9)
    assert mfu(1000.0, expected, None) is None

    # MoE: only the top-k of n_experts expert weights count per token.
    cfg = compose_cfg(["model=moe_rope", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                       "model.max_seq_len=16", "data.vocab_size=512"])
    moe = build_model(cfg.model)
    ffn = moe.blocks[0].ffn
    expert = sum(p.numel() for p in ffn.experts.parameters()) // ffn.n_experts  # one routed expert
    active = moe.num_params() - 2 * (ffn.n_experts - ffn.top_k) * expert
    assert moe.num_params(active=True) == active
    assert flops_per_token(moe, 16) == 6 * active + 12 * 2 * 2 * 16 * 16


def test_peak_lookup_prefers_the_longest_name_and_honours_the_override(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    names = {"NVIDIA H100 PCIe": PEAK_FLOPS["H100 PCIe"], "NVIDIA H100 80GB HBM3": PEAK_FLOPS["H100"],
             "NVIDIA H100 NVL": 836e12, "NVIDIA H200": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA GH200 480GB": PEAK_FLOPS["GH200"],
             "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12, "Some Future GPU": None}
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops("cuda") == peak, name
        assert peak_flops("cuda", override=123e12) == 123e12
    assert PEAK_FLOPS["H100 PCIe"] != PEAK_FLOPS["H100"]
    assert peak_flops("cpu") is None and peak_flops("cpu", override=5e12) == 5e12


def test_throughput_monitor_logs_mfu_against_the_configured_peak():
    from minillm.training.callbacks import ThroughputMonitor

    with pytest.raises(ValueError, match="callbacks.throughput.peak_flops"):
        ThroughputMonitor(peak_flops=-1)
    model = build_model(compose_cfg(["model=tiny", "model.d_model=32", "model.n_layers=1",
                                     "model.n_heads=2", "model.max_seq_len=32"]).model)
    logged = {}
    module = SimpleNamespace(model=model, device=torch.device("cpu"), tokens_seen=0,
                             log=lambda name, value: logged.__setitem__(name, value))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(seq_len=32), world_size=2,
                              global_step=0, log_every_n_steps=2)
    monitor = ThroughputMonitor(peak_flops=1e12)
    monitor.on_fit_start(trainer, module)
    assert monitor.peak == 2e12 and monitor.flops_per_token == flops_per_token(model, 32)
    monitor.on_train_start(trainer, module)
    for step in (1, 2, 2):  # step 2 twice: a micro-batch that did not step logs nothing again
        trainer.global_step, module.tokens_seen = step, step * 1000
        monitor.on_train_batch_end(trainer, module, None, None, 0)
        if step == 1:
            assert not logged
    tps = logged["train/tokens_per_sec"]
    assert tps == monitor.tokens_per_sec > 0 and logged["train/peak_memory_mb"] > 0
    assert logged["train/mfu"] == pytest.approx(tps * monitor.flops_per_token / 2e12)


def test_throughput_excludes_validation_and_what_follows_it(monkeypatch):
    from minillm.training import callbacks

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    module = SimpleNamespace(device=torch.device("cpu"), tokens_seen=0, log=lambda name, value: None)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=1)
    monitor = callbacks.ThroughputMonitor()
    monitor.on_train_start(trainer, module)
    # 1000 tokens a second; validations (3 s) and what follows them up to the next batch (10 s,
    # 5 s: checkpoints and text samples are written in later on_validation_end hooks) are not.
    for step, (validation, after) in enumerate([(0, 0), (3, 10), (0, 0), (3, 5)], 1):
        monitor.on_train_batch_start(trainer, module, None, 0)
        clock[0] += 1
        module.tokens_seen += 1000
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, module, None, None, 0)
        assert monitor.tokens_per_sec == pytest.approx(1000.0), step
        if validation:
            clock[0] += validation
            monitor.on_validation_end(trainer, module)
            clock[0] += after


def test_fused_adamw_on_cuda_and_clipping_works_with_it():
    from lightning.pytorch.plugins.precision import MixedPrecision

    from minillm.training.module import LanguageModel

    model = build_model(compose_cfg(["model=tiny", "model.d_model=32", "model.n_layers=1",
                                     "model.n_heads=2", "model.max_seq_len=32"]).model)
    optimizer_cfg = compose_cfg([]).optimizer
    assert optimizer_cfg.fused is None  # null: decided by the device
    module = LanguageModel(model, instantiate(optimizer_cfg), lambda opt: None, {})
    assert not module.configure_optimizers()["optimizer"].defaults["fused"]  # on CPU
    module._device = torch.device("cuda", 0)  # as on a GPU (CPU also has a fused AdamW to build)
    fused = module.configure_optimizers()["optimizer"]
    assert fused.defaults["fused"] is True

    bf16 = MixedPrecision("bf16-mixed", "cpu")  # no GradScaler: gradients are already unscaled
    with pytest.raises(RuntimeError, match="fused"):  # why LanguageModel clips on its own
        bf16.clip_gradients(fused, 1.0)
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(model=module), precision_plugin=bf16)
    for p in module.parameters():
        p.grad = torch.full_like(p, 3.0)
    module.configure_gradient_clipping(fused, 1.0, "norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))
    assert norm.item() == pytest.approx(1.0, rel=1e-4)


def test_nonfinite_check_on_gpu_reads_the_device_only_at_log_steps(monkeypatch):
    from minillm.training.module import LanguageModel, NonFiniteError

    model = build_model(compose_cfg(["model=tiny", "model.d_model=32", "model.n_layers=1",
                                     "model.n_heads=2", "model.max_seq_len=32"]).model)
    module = LanguageModel(model, None, None, {})
    module._device = torch.device("cuda", 0)  # the check only asks the device type
    module.trainer = SimpleNamespace(global_step=0, log_every_n_steps=3, world_size=1)
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(module.global_step) or item(t))
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    for step, total in ((0, nan), (1, one)):  # no read: the loop runs on
        module.trainer.global_step = step
        assert module._finite(total)
    module.trainer.global_step = 2  # a log step ((2 + 1) % 3 == 0): the NaN of step 0 is found
    with pytest.raises(NonFiniteError, match="at or before step 2"):
        module._finite(one)
    assert reads == [2]
    for step in (3, 4, 5):
        module.trainer.global_step = step
        assert module._finite(one)
    assert reads == [2, 5]
    module._device = torch.device("cpu")  # on CPU: every micro-batch, before its update
    assert not module._finite(nan) and reads == [2, 5, 5]
    module.nonfinite_check = "log"  # asked for: at log steps on CPU too
    module.trainer.global_step = 6
    assert module._finite(nan) and reads == [2, 5, 5]
    module._device, module.nonfinite_check = torch.device("cuda", 0), "step"  # every step on a GPU
    module._nonfinite = None
    assert module._finite(one) and reads == [2, 5, 5, 6]


@pytest.mark.parametrize("env, zero", [
    ({}, True), ({"LOCAL_RANK": "1"}, False), ({"RANK": "0", "LOCAL_RANK": "0"}, True),
    ({"SLURM_PROCID": "3"}, False), ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
])
def test_only_global_rank_zero_writes_the_run_status(monkeypatch, env, zero):
    from minillm.training.sweep import is_global_rank_zero

    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_global_rank_zero() is zero
