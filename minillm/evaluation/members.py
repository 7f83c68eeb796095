"""Read a sweep directory (``python train.py -m ...``) into one ``Member`` per run; docs/sweeps.md
lists the files each run writes (``.hydra/overrides.yaml`` makes a directory a member) and says
when a member is ok, unfinished, failed or diverged.
"""

import functools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from minillm.model import build_model
from minillm.training.callbacks import read_json_lines
from minillm.training.throughput import flops_per_token

STATUSES = ("ok", "unfinished", "failed", "diverged")


@dataclass
class Member:
    """One run of a sweep: its overrides, status, validation history and size figures."""

    path: Path
    name: str
    overrides: dict[str, str]
    status: str = "ok"
    note: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None
    params: int | None = None
    active_params: int | None = None
    flops_per_token: float | None = None

    @property
    def checkpoint(self) -> Path | None:
        """``checkpoints/last.ckpt`` (the weights at the end of the budget), if written."""
        path = self.path / "checkpoints" / "last.ckpt"
        return path if path.is_file() else None

    @property
    def seed(self) -> str | None:
        """The member's seed as its override says, else as its config says."""
        if "seed" in self.overrides:
            return self.overrides["seed"]
        return None if self.config is None else str(self.config.get("seed"))

    def final(self, key: str) -> float | None:
        """``key`` of the last validation record (NaN stays NaN: a diverged run shows it)."""
        value = self.history[-1].get(key) if self.history else None
        return None if value is None else float(value)

    def summary(self) -> dict[str, float | None]:
        """Final val loss, ppl, bpb and tokens; median tokens/s; peak memory over the run."""
        speeds = [h["tokens_per_sec"] for h in self.history if h.get("tokens_per_sec")]
        memory = [h["peak_memory_mb"] for h in self.history if h.get("peak_memory_mb")]
        loss = self.final("val_loss")
        return {
            "val_loss": loss,
            "val_ppl": None if loss is None else (math.exp(loss) if loss < 700 else math.inf),
            "val_bpb": self.final("val_bpb"),
            "tokens": self.final("tokens"),
            "params": self.params,
            "active_params": self.active_params,
            "flops_per_token": self.flops_per_token,
            "tokens_per_sec": statistics.median(speeds) if speeds else None,
            "peak_memory_mb": max(memory) if memory else None,
        }


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """``["model/position=rope", "+x=1"]`` -> ``{"model/position": "rope", "x": "1"}``."""
    return {key.lstrip("+~"): value for key, _, value in (str(line).partition("=") for line in lines)}


def _read_config(run: Path) -> dict[str, Any] | None:
    """``config.yaml`` (resolved by train.py), else Hydra's composed ``.hydra/config.yaml``."""
    for path in (run / "config.yaml", run / ".hydra" / "config.yaml"):
        if path.is_file():
            cfg = OmegaConf.load(path)
            try:
                return OmegaConf.to_container(cfg, resolve=True)
            except Exception:  # interpolations that need Hydra (run_dir, hydra:...): keep them raw
                return OmegaConf.to_container(cfg, resolve=False)
    return None


@functools.lru_cache
def model_sizes(model_json: str, seq_len: int | None) -> tuple[int, int, float]:
    """(parameters, active parameters, training FLOPs per token) of a model config given as JSON
    (hashable: a sweep builds each distinct model once) at ``seq_len`` (None: its ``max_seq_len``)."""
    model_cfg = json.loads(model_json)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(model_cfg)
    seq_len = int(seq_len or model_cfg["max_seq_len"])
    return model.num_params(), model.num_params(active=True), flops_per_token(model, seq_len)


def _status(member: Member) -> tuple[str, str]:
    status_file = member.path / "status.json"
    job = json.loads(status_file.read_text()) if status_file.is_file() else {}
    bad = [h["step"] for h in member.history
           if any(h.get(k) is not None and not math.isfinite(h[k]) for k in ("val_loss", "train_loss"))]
    if bad:
        return "diverged", f"loss not finite from step {bad[0]}"
    if job.get("status") == "failed":
        return "failed", job.get("error", "")
    if not member.history:
        if job.get("status") == "completed":
            return "failed", "completed without a validation (trainer.val_check_interval > max_steps?)"
        return "unfinished", "no validation recorded yet"
    max_steps = ((member.config or {}).get("trainer") or {}).get("max_steps")
    last = member.history[-1].get("step", 0)
    if job.get("status") == "completed" or (not job and isinstance(max_steps, int) and last >= max_steps):
        return "ok", ""
    return "unfinished", f"stopped at step {last}" + (f" of {max_steps}" if max_steps else "")


def _sort_key(path: Path) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def read_sweep(sweep_dir: str | Path) -> list[Member]:
    """Every run under ``sweep_dir`` (a directory holding ``.hydra/overrides.yaml``), in job order."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"sweep_dir={str(sweep_dir)!r} is not a directory (python train.py -m ... "
                         "writes one under multirun/)")
    runs = sorted((p.parent.parent for p in root.rglob(".hydra/overrides.yaml")),
                  key=lambda p: _sort_key(p.relative_to(root)))
    if not runs:
        raise ValueError(f"sweep_dir={str(sweep_dir)!r} holds no runs (each run of a sweep has "
                         "<sweep_dir>/<n>/.hydra/overrides.yaml)")
    members = []
    for run in runs:
        overrides = parse_overrides(yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or [])
        member = Member(run, str(run.relative_to(root)), overrides,
                        history=read_json_lines(run / "metrics.jsonl"), config=_read_config(run))
        if member.config is not None:
            member.params = member.config.get("num_params")
            member.active_params = member.config.get("num_params_active")
            try:
                model_json = json.dumps(member.config["model"], sort_keys=True, default=str)
                sizes = model_sizes(model_json, member.config["data"].get("seq_len"))
                member.params, member.active_params, member.flops_per_token = sizes
            except Exception as e:  # an unbuildable model (the reason it failed, perhaps): no sizes
                member.note = f"model not buildable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        status, note = _status(member)
        member.status, member.note = status, "; ".join(n for n in (note, member.note) if n)
        members.append(member)
    return members


def swept_keys(members: list[Member], sweep_dir: str | Path) -> list[str]:
    """The keys the sweep varies, without ``seed``: those in ``hydra.sweeper.params`` of
    ``multirun.yaml``, then any other override whose value differs between members."""
    keys: list[str] = []
    multirun = Path(sweep_dir) / "multirun.yaml"
    if multirun.is_file():
        params = OmegaConf.select(OmegaConf.load(multirun), "hydra.sweeper.params") or {}
        keys += [str(k).lstrip("+~") for k in params]
    keys += [key for member in members for key in member.overrides
             if len({m.overrides.get(key) for m in members}) > 1]
    return [k for k in dict.fromkeys(keys) if k != "seed"]
