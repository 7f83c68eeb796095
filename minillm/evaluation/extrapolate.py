"""``mode=extrapolate``: validation loss of a checkpoint at 1x, 2x, 4x, 8x its training context.

Every length reads the first N validation tokens, N a multiple of the longest length, so each length
predicts the same N targets. See docs/sweeps.md (Length extrapolation).
"""

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from minillm.checkpoint import checkpoint_model, read_checkpoint, unpack_checkpoint
from minillm.config import check_int
from minillm.data.datamodule import ValBatches
from minillm.evaluation.loading import checkpoint_datamodule, pick_device, required
from minillm.evaluation.loss import validation_nll
from minillm.evaluation.output import markdown_table, save_figure, subplots
from minillm.model.position import RoPE

SCALINGS = ("none", "linear", "ntk")


def check_options(factors: Any, n_tokens: Any, rope_scaling: str) -> list[int]:
    """The sorted distinct factors; ValueError naming the setting when any option is invalid."""
    factors = list(factors) if not isinstance(factors, (int, str)) else [factors]
    if not factors:
        raise ValueError(f"factors={factors!r} must be a list of integers >= 1, e.g. [1,2,4,8]")
    for k in factors:
        check_int(k, "factors", hint=", e.g. factors=[1,2,4,8]")
    check_int(n_tokens, "extrapolate_tokens")
    if rope_scaling not in SCALINGS:
        raise ValueError(f"rope_scaling={rope_scaling!r} is not one of {list(SCALINGS)}")
    return sorted(set(factors))


def extrapolate(ckpt_path: str | Path, factors: Any = (1, 2, 4, 8), n_tokens: int = 16384,
                rope_scaling: str = "none", device: str = "auto", write: bool = True) -> dict[str, Any]:
    """Validation loss of the checkpoint at each ``factor`` x its training context (see module doc)."""
    factors = check_options(factors, n_tokens, rope_scaling)
    device = pick_device(device)
    checkpoint = read_checkpoint(ckpt_path, device)
    model, _, cfg = unpack_checkpoint(checkpoint, device)
    if rope_scaling != "none" and not isinstance(model.position, RoPE):
        raise ValueError(f"rope_scaling={rope_scaling}: the checkpoint's model.position is "
                         f"{type(model.position).__name__}, not RoPE; use rope_scaling=none")
    datamodule = checkpoint_datamodule(cfg)
    train_len = int(cfg.data.seq_len)
    n_val = datamodule.manifest["splits"]["validation"]["tokens"]
    span = train_len * max(factors)
    n = min(n_tokens, n_val - 1) // span * span  # same N targets at every length
    if n == 0:
        raise ValueError(f"extrapolate_tokens={n_tokens}: the validation split has {n_val} tokens, "
                         f"fewer than one window of {span} (max factor x {train_len}) + 1")
    limit = model.position.max_len
    losses: dict[int, float | None] = dict.fromkeys(factors)  # None: longer than the scheme encodes
    for k in factors:
        length = train_len * k
        if limit is not None and length > limit:
            continue
        scaled = model if rope_scaling == "none" or k == 1 else checkpoint_model(
            checkpoint, device, position={"scaling": rope_scaling, "factor": float(k)})
        windows = ValBatches(str(datamodule.folder / "validation.bin"), datamodule.manifest["dtype"],
                             length, max(1, 16384 // length), 0, n // length)  # ~16k tokens a batch
        nll, n_targets, _ = validation_nll(scaled, windows, device, model.vocab_size)
        losses[k] = nll / n_targets
    stops_at = max((k for k in factors if losses[k] is not None), default=None)
    note = (f"{type(model.position).__name__} encodes at most {limit} positions: stops at {stops_at or 0}x"
            if None in losses.values() else "")
    result = {
        "ckpt_path": str(ckpt_path),
        "position": type(model.position).__name__,
        "rope_scaling": rope_scaling,
        "train_len": train_len,
        "tokens": n,
        "factors": factors,
        "lengths": [train_len * k for k in factors],
        "val_loss": [losses[k] for k in factors],
        "val_bpb": [None if losses[k] is None else losses[k] / math.log(2) / datamodule.bytes_per_token
                    for k in factors],
        "stops_at": stops_at,
        "note": note,
    }
    if write:
        result["files"] = _write(result, Path(ckpt_path).parent)
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown table: one row per length (loss, bpb, or where the scheme stops)."""
    rows = [[f"{k}x", str(length), *(("n/a", "n/a") if loss is None else (f"{loss:.4f}", f"{bpb:.4f}"))]
            for k, length, loss, bpb in zip(result["factors"], result["lengths"], result["val_loss"],
                                            result["val_bpb"])]
    return markdown_table(["factor", "length", "val loss", "val bpb"], rows)


def plot_extrapolation(lines: dict[str, list[tuple[int, float | None, float]]], factors: list[int],
                       path: Path) -> None:
    """Validation loss against length / training context, a line per label through (factor, mean, std)."""
    fig, ax = subplots(figsize=(6, 4))
    for i, (label, points) in enumerate(lines.items()):
        points = [p for p in points if p[1] is not None]
        if points:
            ax.errorbar(*zip(*points), marker="o", capsize=3, color=f"C{i % 10}", label=label)
    ax.axvline(1, color="grey", linestyle=":", label="training context")
    ax.set(xscale="log", xlabel="evaluation length / training context", title="Length extrapolation",
           ylabel="validation loss (nats/token)")
    ax.set_xticks(factors, [f"{k}x" for k in factors])
    ax.minorticks_off()  # log-scale minor labels (3x10^0) would clutter the axis
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _write(result: dict[str, Any], folder: Path) -> list[str]:
    scaling = result["rope_scaling"]
    stem = "extrapolation" + ("" if scaling == "none" else f"_{scaling}")
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    title = result["position"] + ("" if scaling == "none" else f" ({scaling} scaling)")
    text = (f"# Length extrapolation: {title}\n\n{result['ckpt_path']}, trained at {result['train_len']} "
            f"tokens; each length predicts the same {result['tokens']:,} validation tokens.\n\n"
            f"{table(result)}\n")
    if result["note"]:
        text += f"\n{result['note']}.\n"
    (folder / f"{stem}.md").write_text(text)
    label = f"{title}, trained at {result['train_len']} tokens"
    points = [(k, loss, 0.0) for k, loss in zip(result["factors"], result["val_loss"])]
    plot_extrapolation({label: points}, result["factors"], folder / f"{stem}.png")
    return [str(folder / f"{stem}.{ext}") for ext in ("json", "md", "png")]


def extrapolate_mode(cfg: DictConfig) -> dict[str, Any]:
    """``python eval.py ckpt_path=PATH mode=extrapolate [rope_scaling=linear|ntk]``."""
    result = extrapolate(required(cfg, "ckpt_path"), cfg.factors, cfg.extrapolate_tokens, cfg.rope_scaling,
                         cfg.device)
    print(Path(result["files"][1]).read_text())  # the .md written: header, table and note
    print(f"written: {', '.join(result['files'])}")
    return result
