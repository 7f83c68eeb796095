"""Ablation sweeps: presets, a real two-member multirun, the report (statuses included), length
extrapolation and attention maps."""

import csv
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import CONFIGS, ROOT, TINY_TRAIN, compose_cfg, options
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

import eval as eval_script
from minillm.evaluation.attention import math_model
from minillm.evaluation.extrapolate import extrapolate
from minillm.model import build_model
from minillm.training.loggers import wandb_grouping
from minillm.training.sweep import RunStatus

STEPS, BATCH, SEQ = 6, 4, 32
SWEEP = TINY_TRAIN + [
    f"trainer.max_steps={STEPS}", "trainer.val_check_interval=3", "logger=none"]


def _eval(*overrides):
    return eval_script.main(compose_cfg(list(overrides), "eval"))


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished ``train.py -m experiment=ablate_position`` over learned and RoPE, tiny sizes."""
    root = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, "train.py", "-m", "experiment=ablate_position", "model/position=learned,rope",
           *SWEEP, f"data.cache_dir={tmp_path_factory.getbasetemp() / 'data_cache'}",
           f"hydra.sweep.dir={root / 'sweep'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "sweep"


@pytest.mark.parametrize("name", [n for n in options("experiment") if n.startswith("ablate_")])
def test_presets_give_every_member_the_same_budget(name):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    axis = next(k for k in params if k != "seed")
    if axis == "ablate/recipe" and not ("relu2" in options("model/ffn") and "local_global" in options("model/attention")):
        pytest.skip("ablate_recipe needs the parts and masks branches (relu2, local_global)")
    assert len(params[axis]) >= 3 and "seed" in params
    members = [compose_cfg([f"experiment={name}", f"{axis}={value}"]) for value in params[axis]]
    budgets = {(c.trainer.max_steps, c.data.batch_size, c.data.seq_len) for c in members}
    assert len(budgets) == 1 and members[0].trainer.accelerator == "cpu"
    models = [build_model(c.model) for c in members]
    for model in models:  # every member's model runs
        assert torch.isfinite(model(torch.randint(0, 100, (1, 16)))).all()
    if name == "ablate_ffn":  # equal active weights; MoE adds only its router (C x E per layer)
        active = [m.num_params(active=True) for m in models]
        router = members[0].model.n_layers * members[0].model.d_model * 8
        assert active[0] == active[1] and 0 < active[2] - active[0] <= router
        assert models[2].num_params() > 3 * models[0].num_params() // 2
    if axis == "ablate/recipe":  # model parts, data.document_mask, optimizer=muon: each config differs
        kinds = {json.dumps(OmegaConf.to_container(c, resolve=True), sort_keys=True) for c in members}
        assert len(kinds) == len(members)
        return
    kinds = {type(getattr(m, "position")).__name__ if axis.endswith("position") else
             repr(m.blocks[0].attn.n_kv_heads) if axis.endswith("attention") else
             type(m.blocks[0].ffn).__name__ for m in models}
    assert len(kinds) == len(models)  # the axis really changes the model


def test_sweep_members_write_what_the_report_reads(sweep):
    for n, position in enumerate(["learned", "rope"]):
        run = sweep / str(n)
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        assert f"model/position={position}" in overrides and "experiment=ablate_position" in overrides
        assert json.loads((run / "status.json").read_text())["status"] == "completed"
        assert (run / "checkpoints" / "last.ckpt").is_file()
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [3, 6]


def test_report_tables_and_plots(sweep):
    result = _eval("mode=report", f"sweep_dir={sweep}", "extrapolate=false")
    rows = _csv(sweep / "report.csv")
    assert [r["model/position"] for r in rows] == ["learned", "rope"]
    for row, n in zip(rows, ["0", "1"]):
        history = [json.loads(line) for line in (sweep / n / "metrics.jsonl").read_text().splitlines()]
        config = yaml.safe_load((sweep / n / "config.yaml").read_text())
        assert row["status"] == "ok" and row["seeds"] == "0" and row["runs"] == "1"
        assert float(row["val_loss_mean"]) == pytest.approx(history[-1]["val_loss"])
        assert float(row["val_ppl_mean"]) == pytest.approx(math.exp(history[-1]["val_loss"]))
        assert float(row["val_bpb_mean"]) == pytest.approx(history[-1]["val_bpb"])
        assert int(row["tokens"]) == STEPS * BATCH * SEQ
        assert int(row["params"]) == config["num_params"] == int(row["active_params"])
        assert int(row["flops_per_token"]) >= 6 * config["num_params"] - 6 * 32 * 32  # less the learned table
        assert float(row["tokens_per_sec_mean"]) > 0 and float(row["peak_memory_mb_mean"]) > 0
    assert int(rows[0]["params"]) == int(rows[1]["params"]) + SEQ * 32  # the learned table
    assert rows[0]["flops_per_token"] == rows[1]["flops_per_token"]  # a table lookup costs no FLOPs
    text = (sweep / "report.md").read_text()
    assert "| learned | ok | 0 |" in text and "| rope | ok | 0 |" in text
    assert f"Every ok member trained on {STEPS * BATCH * SEQ:,} tokens" in text
    for png in ("val_loss.png", "bpb.png"):
        assert (sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["members"]) == 2


def _member(root, name, source, overrides, status=None, history=None):
    """A hand-built run directory: ``source``'s config, the given overrides, status and history."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    shutil.copy(source / "config.yaml", run / "config.yaml")
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if status:
        (run / "status.json").write_text(json.dumps(status))
    if history is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))


def test_report_marks_failed_unfinished_and_diverged_members(sweep, tmp_path):
    source = sweep / "1"
    full = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines()]
    second = [dict(h, val_loss=h["val_loss"] + 0.5, val_bpb=h["val_bpb"] + 0.25) for h in full]
    nan = [full[0], dict(full[1], val_loss=float("nan"), train_loss=float("nan"))]
    root = tmp_path / "bad"
    rope, alibi = "model/position=rope", "model/position=alibi"
    _member(root, "0", source, [rope, "seed=0"], {"status": "completed"}, full)
    _member(root, "1", source, [rope, "seed=1"], None, second)  # no status file: judged by its steps
    _member(root, "2", source, [rope, "seed=2"], {"status": "failed", "error": "RuntimeError: boom"}, full[:1])
    _member(root, "3", source, [alibi, "seed=0"], {"status": "running"}, full[:1])
    _member(root, "4", source, [alibi, "seed=1"], {"status": "completed"}, nan)
    _member(root, "5", source, ["model/position=none", "seed=0"], {"status": "running"}, None)
    result = _eval("mode=report", f"sweep_dir={root}", "extrapolate=false")
    members = {r["run"]: r for r in _csv(root / "members.csv")}
    assert {k: r["status"] for k, r in members.items()} == {
        "0": "ok", "1": "ok", "2": "failed", "3": "unfinished", "4": "diverged", "5": "unfinished"}
    assert "boom" in members["2"]["note"] and members["4"]["val_loss"] == "nan"
    rows = {r["model/position"]: r for r in _csv(root / "report.csv")}
    assert rows["rope"]["status"] == "ok 2, failed 1" and rows["rope"]["seeds"] == "0 1 2"
    losses = [full[-1]["val_loss"], second[-1]["val_loss"]]  # mean and std over the ok seeds only
    assert float(rows["rope"]["val_loss_mean"]) == pytest.approx(np.mean(losses))
    assert float(rows["rope"]["val_loss_std"]) == pytest.approx(np.std(losses, ddof=1))
    assert rows["alibi"]["status"] == "unfinished 1, diverged 1" and rows["alibi"]["val_loss_mean"] == ""
    assert rows["none"]["status"] == "unfinished" and rows["none"]["params"] != ""
    text = (root / "report.md").read_text()
    assert "| 4 | alibi | 1 | diverged | nan |" in text and "loss not finite from step 6" in text
    assert (root / "bpb.png").is_file() and (root / "val_loss.png").is_file()
    assert len(result["rows"]) == 3


def test_a_run_that_really_diverges_is_reported_as_diverged(tmp_path):
    import train

    run = tmp_path / "sweep" / "0"
    with pytest.raises(SystemExit) as stopped:  # the non-finite loss stops the run (exit code 1)
        train.main(compose_cfg(SWEEP + [f"run_dir={run}", f"data.cache_dir={tmp_path.parent / 'data_cache'}",
                                        "optimizer.lr=1e6", "scheduler.min_lr=1e5",
                                        "trainer.gradient_clip_val=null",
                                        "callbacks.progress_bar.refresh_rate=0"]))  # no bar left open
    assert stopped.value.code == 1
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["optimizer.lr=1e6"]))
    result = _eval("mode=report", f"sweep_dir={run.parent}", "extrapolate=false")
    assert [r["status"] for r in result["members"]] == ["diverged"]
    val_loss = result["members"][0]["val_loss"]  # stopped before its first validation
    assert val_loss is None or math.isnan(val_loss)


def test_extrapolation_stops_where_the_scheme_does(sweep, tmp_path):
    learned = extrapolate(sweep / "0" / "checkpoints" / "last.ckpt", n_tokens=2048)
    assert learned["lengths"] == [SEQ, 2 * SEQ, 4 * SEQ, 8 * SEQ] and learned["stops_at"] == 1
    assert learned["val_loss"][1:] == [None, None, None] and "stops at 1x" in learned["note"]
    rope_ckpt = sweep / "1" / "checkpoints" / "last.ckpt"
    rope = extrapolate(rope_ckpt, n_tokens=2048)
    assert rope["stops_at"] == 8 and all(math.isfinite(x) for x in rope["val_loss"])
    assert rope["tokens"] % (8 * SEQ) == 0
    # 1x reads the same windows as mode=loss over the first tokens + 1 validation tokens.
    loss = _eval(f"ckpt_path={rope_ckpt}", f"val_tokens={rope['tokens'] + 1}", "batch_size=8")
    assert rope["val_loss"][0] == pytest.approx(loss["val_loss"], rel=1e-5)
    # An ALiBi model: RoPE and ALiBi have no weights of their own, so the same state dict serves.
    checkpoint = torch.load(rope_ckpt, weights_only=True)
    checkpoint["config"]["model"]["position"] = {"_target_": "minillm.model.position.ALiBi", "_partial_": True}
    torch.save(checkpoint, tmp_path / "alibi.ckpt")
    alibi = extrapolate(tmp_path / "alibi.ckpt", n_tokens=2048)
    assert alibi["stops_at"] == 8 and all(math.isfinite(x) for x in alibi["val_loss"])
    assert alibi["val_loss"] != rope["val_loss"]
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"extrapolation.{ext}").is_file()
    assert "| 8x | 256 |" in (tmp_path / "extrapolation.md").read_text()


def test_rope_scaling_changes_only_the_longer_lengths(sweep):
    ckpt = sweep / "1" / "checkpoints" / "last.ckpt"
    plain = _eval(f"ckpt_path={ckpt}", "mode=extrapolate", "extrapolate_tokens=1024")
    linear = _eval(f"ckpt_path={ckpt}", "mode=extrapolate", "extrapolate_tokens=1024", "rope_scaling=linear")
    assert linear["val_loss"][0] == pytest.approx(plain["val_loss"][0])
    assert all(a != b for a, b in zip(linear["val_loss"][1:], plain["val_loss"][1:]))
    assert (ckpt.parent / "extrapolation_linear.png").is_file()
    with pytest.raises(SystemExit):  # learned positions cannot be rescaled: one line, exit 2
        _eval(f"ckpt_path={sweep / '0' / 'checkpoints' / 'last.ckpt'}", "mode=extrapolate",
              "rope_scaling=linear")


def test_position_sweep_report_includes_extrapolation(sweep, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("report*", "*.png", "*.csv"))
    _eval("mode=report", f"sweep_dir={copy}", "extrapolate_tokens=512")  # extrapolate=null: auto
    rows = {r["model/position"]: r for r in _csv(copy / "extrapolation.csv")}
    assert rows["learned"]["loss_1x_mean"] != "" and rows["learned"]["loss_2x_mean"] == ""
    assert rows["rope"]["loss_8x_mean"] != ""
    text = (copy / "report.md").read_text()
    assert "## Length extrapolation" in text and "| learned |" in text and "n/a" in text
    assert (copy / "extrapolation.png").is_file()


def test_attention_maps(sweep, tmp_path):
    ckpt = sweep / "1" / "checkpoints" / "last.ckpt"
    prompt = "The cat sat on the mat because it was tired"
    result = _eval(f"ckpt_path={ckpt}", "mode=attention", f"prompt='{prompt}'", f"out_dir={tmp_path}")
    weights, tokens = result["weights"], result["tokens"]
    t = len(tokens)
    assert weights.shape == (1, 2, t, t) and tokens[0] == "<|endoftext|>" and "".join(tokens[1:]) == prompt
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(weights, k=1) == 0)  # causal
    assert (tmp_path / "layer0.png").read_bytes()[:4] == b"\x89PNG"
    assert np.load(tmp_path / "weights.npz")["weights"].shape == weights.shape
    # The math model that drew the maps computes the same function as the trained (sdpa) model.
    checkpoint = torch.load(ckpt, weights_only=True)
    from minillm import load_checkpoint
    model = load_checkpoint(ckpt).model
    ids = torch.randint(0, 512, (1, 20))
    torch.testing.assert_close(math_model(checkpoint, torch.device("cpu"))(ids), model(ids), rtol=1e-4, atol=1e-5)


def test_bad_sweep_dir_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _eval("mode=report", f"sweep_dir={tmp_path}")
    assert "holds no runs" in capsys.readouterr().err


def test_wandb_groups_runs_of_a_sweep(tmp_path):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=["model/position=alibi", "seed=1"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path / "ablate_position_2026")
    HydraConfig.instance().set_config(cfg)
    try:
        extra = wandb_grouping(cfg.logger.wandb)
    finally:
        HydraConfig.instance().cfg = None
    assert extra == {"group": "ablate_position_2026", "tags": ["model/position=alibi", "seed=1"]}


def test_run_status_records_a_failed_job(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    config = OmegaConf.create({"run_dir": None, "hydra": {"runtime": {"output_dir": str(tmp_path)}}})
    RunStatus().on_job_start(config, task_function=None)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "running"
    failed = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("CUDA out of memory\nmore"))
    RunStatus().on_job_end(config, job_return=failed)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == "RuntimeError: CUDA out of memory"
    RunStatus().on_job_end(config, job_return=JobReturn(status=JobStatus.COMPLETED, _return_value=1.0))
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "completed"


def test_slurm_launcher_config_composes_over_the_submitit_plugin():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.submitit_folder.endswith("/.submitit/%j")  # inside the sweep directory


def test_joblib_launcher_runs_members_whose_loaders_have_workers(tmp_path_factory, tmp_path):
    """`hydra/launcher=joblib` used to fail every member with data.num_workers > 0: inside joblib's
    loky processes DataLoader could not start its workers ("Got pickle error ...")."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cmd = [sys.executable, "train.py", "-m", *TINY_TRAIN, "data.num_workers=1", "seed=0,1",
           "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           f"data.cache_dir={tmp_path_factory.getbasetemp() / 'data_cache'}", f"hydra.sweep.dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    for member in ("0", "1"):
        assert json.loads((tmp_path / member / "status.json").read_text())["status"] == "completed"
        assert torch.load(tmp_path / member / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
