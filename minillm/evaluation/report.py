"""``mode=report``: a sweep directory's tables and plots, one row per setting (the swept values
without the seed), figures as mean and std over its ``ok`` members. See docs/sweeps.md (The report).
"""

import csv
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from minillm.evaluation.extrapolate import check_options, extrapolate, plot_extrapolation
from minillm.evaluation.loading import required
from minillm.evaluation.members import STATUSES, Member, read_sweep, swept_keys
from minillm.evaluation.output import markdown_table, save_figure, subplots

STATS = ("val_loss", "val_ppl", "val_bpb", "tokens_per_sec", "peak_memory_mb")  # mean and std over seeds
SIZES = ("tokens", "params", "active_params", "flops_per_token")  # the same for every seed


def group_members(members: list[Member], keys: list[str]) -> dict[tuple[str, ...], list[Member]]:
    """Members keyed by their values of ``keys`` (the seed left out), in first-seen order."""
    groups: dict[tuple[str, ...], list[Member]] = {}
    for member in members:
        groups.setdefault(tuple(member.overrides.get(k, "") for k in keys), []).append(member)
    return groups


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _counts(members: list[Member]) -> str:
    """Members per status, in ``STATUSES`` order: ``ok 2, failed 1``."""
    counts = Counter(m.status for m in members)
    return ", ".join(f"{s} {counts[s]}" for s in STATUSES if counts[s])


def group_rows(groups: dict[tuple[str, ...], list[Member]], keys: list[str]) -> list[dict[str, Any]]:
    """One row per group: swept values, status, seeds and mean/std of each metric over ok members."""
    rows = []
    for values, members in groups.items():
        ok = [m for m in members if m.status == "ok"]
        row: dict[str, Any] = dict(zip(keys, values))
        status = _counts(members) if len({m.status for m in members}) > 1 else members[0].status
        row.update(status=status, runs=len(members), ok=len(ok),
                   seeds=" ".join(str(m.seed) for m in members))
        summaries = [m.summary() for m in ok]
        for metric in SIZES:  # from the ok members; sizes from any member, so failed rows show them
            found = [s[metric] for s in (summaries if metric == "tokens" else map(Member.summary, members))]
            row[metric] = next((int(v) for v in found if v is not None and math.isfinite(v)), None)
        for metric in STATS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([s[metric] for s in summaries])
        rows.append(row)
    return rows


def member_rows(members: list[Member], keys: list[str]) -> list[dict[str, Any]]:
    """One row per run: its directory, swept values, seed, status, note and final figures."""
    return [{"run": m.name, **{k: m.overrides.get(k, "") for k in keys}, "seed": m.seed,
             "status": m.status, **m.summary(), "note": m.note} for m in members]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan / inf: a diverged run shows it
    if isinstance(value, float) and value.is_integer() and digits == 4 and abs(value) >= 100:
        value = int(value)  # token counts read from JSON as floats
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def _pm(row: dict[str, Any], metric: str, digits: int = 4) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if mean is None:
        return ""
    return _fmt(mean, digits) if not std else f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as CSV, columns in first-seen order; None (and a missing key) as an empty cell."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)  # csv writes None as an empty string


def _label(values: tuple[str, ...]) -> str:
    return ", ".join(values) if values else "all runs"


def plot_curves(groups: dict[tuple[str, ...], list[Member]], keys: list[str], path: Path) -> None:
    """Validation loss against tokens, one line per member, one colour per group."""
    fig, ax = subplots(figsize=(7, 4.5))
    for i, (values, members) in enumerate(groups.items()):
        for j, m in enumerate(members):
            points = [(h["tokens"], h["val_loss"]) for h in m.history
                      if h.get("tokens") is not None and h.get("val_loss") is not None
                      and math.isfinite(h["val_loss"])]
            if points:
                ax.plot(*zip(*points), color=f"C{i % 10}", marker=".", alpha=0.85,
                        linestyle="-" if m.status == "ok" else "--",
                        label=_label(values) if j == 0 else None)
    ax.set(xlabel="training tokens", ylabel="validation loss (nats/token)",
           title="Validation loss (dashed: not ok)")
    ax.grid(alpha=0.3)
    ax.legend(title=", ".join(keys) or None, fontsize=8)
    save_figure(fig, path)


def plot_bpb(rows: list[dict[str, Any]], keys: list[str], path: Path) -> None:
    """Final bits per byte per group: mean over ok seeds, std as error bars; no bar where none is ok."""
    labels = [_label(tuple(r[k] for k in keys)) for r in rows]
    means = [r["val_bpb_mean"] or 0.0 for r in rows]
    stds = [r["val_bpb_std"] or 0.0 for r in rows]
    fig, ax = subplots(figsize=(max(4, 1.1 * len(rows) + 2), 4))
    bars = ax.bar(range(len(rows)), means, yerr=stds, capsize=4,
                  color=[f"C{i % 10}" for i in range(len(rows))])
    for bar, row in zip(bars, rows):
        if row["val_bpb_mean"] is None:
            ax.text(bar.get_x() + bar.get_width() / 2, 0.03, row["status"], ha="center", va="bottom",
                    rotation=90, fontsize=8, transform=ax.get_xaxis_transform())  # y in axes units
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
    shown = [(m - s, m + s) for m, s, r in zip(means, stds, rows) if r["val_bpb_mean"] is not None]
    if shown:  # zoom in: the differences are small next to the absolute value
        low, top = min(lo for lo, _ in shown), max(hi for _, hi in shown)
        ax.set_ylim(max(0.0, low - 0.1 * (top - low + 1e-3)), top + 0.05 * (top + 1e-3))
    ax.set(ylabel="validation bits per byte", title="Final bits per byte (mean ± std over seeds)")
    save_figure(fig, path)


def _uses_rope(member: Member) -> bool:
    position = ((member.config or {}).get("model") or {}).get("position") or {}
    return str(position.get("_target_", "")).endswith(".RoPE")


def extrapolation_rows(groups: dict[tuple[str, ...], list[Member]], keys: list[str], factors: list[int],
                       n_tokens: int, rope_scaling: str,
                       device: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Per group, mean and std over its ok members with a checkpoint of the loss at each factor; notes."""
    rows, notes = [], []
    for values, members in groups.items():
        results = [extrapolate(m.checkpoint, factors, n_tokens, rope_scaling if _uses_rope(m) else "none",
                               device) for m in members if m.status == "ok" and m.checkpoint is not None]
        if not results:
            continue
        row: dict[str, Any] = {**dict(zip(keys, values)), "runs": len(results),
                               "train_len": results[0]["train_len"], "tokens": results[0]["tokens"]}
        for j, k in enumerate(results[0]["factors"]):
            row[f"loss_{k}x_mean"], row[f"loss_{k}x_std"] = _mean_std([r["val_loss"][j] for r in results])
        rows.append(row)
        if results[0]["note"]:
            notes.append(f"{_label(values)}: {results[0]['note']}")
    return rows, notes


def extrapolation_markdown(rows: list[dict[str, Any]], notes: list[str], keys: list[str],
                           factors: list[int], rope_scaling: str) -> str:
    """The report's length-extrapolation section."""
    header = keys + ["context"] + [f"{k}x" for k in factors]
    body = [[str(r[k]) for k in keys] + [str(r["train_len"])]
            + [_pm(r, f"loss_{k}x") or "n/a" for k in factors] for r in rows]
    scaling = "" if rope_scaling == "none" else \
        f" RoPE members use `{rope_scaling}` scaling (factor = evaluation length / context)."
    return (f"## Length extrapolation\n\nValidation loss (nats/token) at multiples of the training "
            f"context, on the same {rows[0]['tokens']:,} validation tokens at every length "
            f"(checkpoints/last.ckpt of each ok member, mean ± std over seeds).{scaling} n/a: the "
            f"position scheme cannot encode that length.\n\n{markdown_table(header, body)}\n\n"
            + "".join(f"- {note}\n" for note in notes) + "\n![extrapolation](extrapolation.png)\n")


def build_report(sweep_dir: str | Path, extrapolation: bool | None = None, factors: Any = (1, 2, 4, 8),
                 n_tokens: int = 16384, rope_scaling: str = "none", device: str = "auto") -> dict[str, Any]:
    """Write the report files into ``sweep_dir``; return the group rows, member rows and file paths."""
    factors = check_options(factors, n_tokens, rope_scaling)
    folder = Path(sweep_dir)
    members = read_sweep(folder)
    keys = swept_keys(members, folder)
    groups = group_members(members, keys)
    rows, runs = group_rows(groups, keys), member_rows(members, keys)
    write_csv(folder / "report.csv", rows)
    write_csv(folder / "members.csv", runs)
    plot_curves(groups, keys, folder / "val_loss.png")
    plot_bpb(rows, keys, folder / "bpb.png")
    files = [str(folder / f) for f in ("report.md", "report.csv", "members.csv", "val_loss.png", "bpb.png")]
    extra_text, extra_rows = "", []
    if extrapolation or (extrapolation is None and any("position" in k for k in keys)):
        extra_rows, notes = extrapolation_rows(groups, keys, factors, n_tokens, rope_scaling, device)
        if extra_rows:
            write_csv(folder / "extrapolation.csv", extra_rows)
            lines = {_label(tuple(r[k] for k in keys)): [(f, r[f"loss_{f}x_mean"], r[f"loss_{f}x_std"])
                                                         for f in factors] for r in extra_rows}
            plot_extrapolation(lines, factors, folder / "extrapolation.png")
            extra_text = extrapolation_markdown(extra_rows, notes, keys, factors, rope_scaling)
            files += [str(folder / "extrapolation.csv"), str(folder / "extrapolation.png")]
    (folder / "report.md").write_text(_markdown(folder, members, keys, rows, runs) + extra_text)
    return {"rows": rows, "members": runs, "extrapolation": extra_rows, "files": files}


def _markdown(folder: Path, members: list[Member], keys: list[str], rows: list[dict[str, Any]],
              runs: list[dict[str, Any]]) -> str:
    budgets = sorted({int(r["tokens"]) for r in runs if r["status"] == "ok" and r["tokens"] is not None})
    budget = (f"Every ok member trained on {budgets[0]:,} tokens." if len(budgets) == 1 else
              f"**Unequal budgets**: ok members trained on {', '.join(f'{b:,}' for b in budgets)} tokens."
              if budgets else "No member finished.")
    header = keys + ["status", "seeds", "val loss", "ppl", "bpb", "tokens", "params", "active params",
                     "FLOPs/token", "tokens/s", "peak MiB"]
    body = [[str(r[k]) for k in keys] + [
        r["status"], r["seeds"], _pm(r, "val_loss"), _pm(r, "val_ppl", 2), _pm(r, "val_bpb"),
        _fmt(r["tokens"]), _fmt(r["params"]), _fmt(r["active_params"]), _fmt(r["flops_per_token"]),
        _pm(r, "tokens_per_sec", 0), _fmt(r["peak_memory_mb_mean"], 0)] for r in rows]
    member_header = ["run"] + keys + ["seed", "status", "val loss", "bpb", "tokens", "note"]
    member_body = [[r["run"]] + [str(r[k]) for k in keys] + [
        str(r["seed"]), r["status"], _fmt(r["val_loss"]), _fmt(r["val_bpb"]), _fmt(r["tokens"]), r["note"]]
        for r in runs]
    return (f"# Sweep report: {folder.name}\n\n{len(members)} runs ({_counts(members)}), swept over "
            f"{', '.join(f'`{k}`' for k in keys) or 'nothing but the seed'}. {budget} "
            "Figures are the mean ± std over each setting's ok seeds, at the last validation; "
            "FLOPs/token counts forward + backward (6N + 12 L H D T, active parameters). "
            "tokens/s is the median training throughput, peak MiB the peak memory (CUDA allocated, "
            "or on CPU the process's peak RSS, which later members of a one-process sweep inherit).\n\n"
            f"{markdown_table(header, body)}\n\n![validation loss](val_loss.png)\n\n"
            f"![bits per byte](bpb.png)\n\n## Runs\n\n{markdown_table(member_header, member_body)}\n\n")


def report(cfg: DictConfig) -> dict[str, Any]:
    """``python eval.py mode=report sweep_dir=DIR [extrapolate=true] [rope_scaling=linear]``."""
    sweep_dir = required(cfg, "sweep_dir", "sweep_dir=multirun/ablate_position_DATE_TIME")
    result = build_report(sweep_dir, cfg.get("extrapolate"), cfg.factors, cfg.extrapolate_tokens,
                          cfg.rope_scaling, cfg.device)
    print((Path(sweep_dir) / "report.md").read_text().split("![validation loss]")[0])
    print("written: " + ", ".join(result["files"]))
    return result
