"""Time per training step of each `experiment=ablate_recipe` member against the baseline.

Each member (configs/ablate/recipe/) is composed through Hydra exactly as the sweep composes it,
built with its optimizer, and timed on the same random batch (forward with the loss, backward,
optimizer step); document-masked members get documents of ~``--story`` tokens. Members are timed
round-robin in one process, and the script prints each member's median step time and its ratio to
the baseline's (the recipe issue's goal: ``all`` <= 1.15x).

    python bench/recipe_step.py                                # context 128, batch 16, the sweep's shapes
    python bench/recipe_step.py --seq-len 256 --members baseline all --window 128
    python bench/recipe_step.py --members baseline all --override optimizer=adamw   # all but Muon
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minillm import build_model  # noqa: E402
from minillm.training.optimizers import optimizer_param_groups  # noqa: E402

MEMBERS = sorted(p.stem for p in (ROOT / "configs/ablate/recipe").glob("*.yaml"))


def member(name: str, seq_len: int, window: int | None, extra: list[str]):
    """(model, optimizer, uses documents) of one member, composed like the sweep composes it."""
    overrides = ["experiment=ablate_recipe", f"ablate/recipe={name}", f"model.max_seq_len={seq_len}",
                 "data.vocab_size=4096", *extra]
    if window is not None and name in ("window", "all"):
        overrides.append(f"model.attention.window={window}")
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        cfg = compose("train", overrides=overrides)
    model = build_model(cfg.model).train()
    factory = instantiate(cfg.optimizer)
    return model, factory(optimizer_param_groups(factory, model)), bool(cfg.data.get("document_mask"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", nargs="+", default=MEMBERS, choices=MEMBERS)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--window", type=int, default=None, help="window of the window/all members")
    ap.add_argument("--story", type=int, default=200, help="tokens per document (masked members)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--override", nargs="*", default=[], help="for every member, e.g. optimizer=adamw")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = ["baseline"] + [m for m in args.members if m != "baseline"]
    runs = {n: member(n, args.seq_len, args.window, args.override) for n in names}
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4096, (args.batch, args.seq_len + 1), generator=gen)
    idx, targets = x[:, :-1], x[:, 1:]
    documents = (torch.arange(args.seq_len) // args.story).expand(args.batch, -1)
    times = {n: [] for n in names}
    for step in range(args.warmup + args.steps):
        for n in names:  # round-robin: load on a shared machine hits every member alike
            model, optimizer, masked = runs[n]
            start = time.perf_counter()
            out = model(idx, targets=targets, documents=documents if masked else None)
            (out.loss + sum(out.aux.values())).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[n].append(time.perf_counter() - start)
    base = statistics.median(times["baseline"])
    print(f"batch {args.batch} x {args.seq_len} tokens, {args.threads} thread(s), median of {args.steps}")
    print(f"{'member':<15}{'ms/step':>10}{'x baseline':>12}")
    for n in names:
        t = statistics.median(times[n])
        print(f"{n:<15}{t * 1e3:>10.1f}{t / base:>12.2f}")


if __name__ == "__main__":
    main()
