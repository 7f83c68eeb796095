"""Greedy generation with a KV cache against full recomputation, on the llama2.c 15M shape.

    PYTHONPATH=. python bench/generate.py [--device cuda] [--quick]

Model: ``configs/model/llama.yaml`` with MHA (d_model 288, 6 layers, 6 heads, vocab 4096, context
256), random weights. Generates ``--new`` tokens after a ``--prompt``-token prompt at batch 1 both
ways, asserts the tokens are identical and prints the speed-up (goal: at least 5x). Past the
256-token context both paths slide the window the same way (see ``minillm/generation.py``).
"""

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from minillm import build_model, generate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--backend", default="sdpa", help="model.attention.backend")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy CPU)")
    ap.add_argument("--quick", action="store_true", help="64 new tokens, no 5x check")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    new = 64 if args.quick else args.new
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=["model=llama", "model/attention=mha", "data=synthetic",
                                          "data.vocab_size=4096",
                                          f"model.attention.backend={args.backend}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(args.device).eval()
    prompt = [torch.randint(0, 4096, (args.prompt,)).tolist()]
    generate(model, prompt, 4, temperature=0)  # warm-up
    wall, cpu, tokens = {}, {}, {}
    for use_cache in (True, False):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        tokens[use_cache] = generate(model, prompt, new, temperature=0, use_cache=use_cache)
        if args.device == "cuda":
            torch.cuda.synchronize()
        wall[use_cache], cpu[use_cache] = time.perf_counter() - t, time.process_time() - c
    assert tokens[True] == tokens[False], "cached and recomputed greedy tokens differ"
    print(f"{model.num_params() / 1e6:.1f}M params, {args.device}, {torch.get_num_threads()} threads, "
          f"prompt {args.prompt}, {new} new tokens, batch 1, identical greedy tokens")
    for name, t in [("wall", wall), ("process CPU", cpu)]:
        print(f"  {name:>11} time: KV cache {t[True]:6.2f} s ({new / t[True]:5.0f} tok/s), recompute "
              f"{t[False]:6.2f} s ({new / t[False]:5.0f} tok/s): {t[False] / t[True]:.1f}x faster")
    # the goal is checked on wall time on CUDA, on process CPU time on a CPU that other jobs share
    speedup = (wall if args.device == "cuda" else cpu)
    speedup = speedup[False] / speedup[True]
    assert args.quick or speedup >= 5, f"KV cache only {speedup:.1f}x faster than recomputation (goal 5x)"


if __name__ == "__main__":
    main()
