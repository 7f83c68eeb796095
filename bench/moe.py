"""Benchmark one MoE layer's forward+backward against a naive mask loop and an equal-active dense FFN.

    PYTHONPATH=. python bench/moe.py                       # CPU: d 256, 8 experts, top-2, F 512
    PYTHONPATH=. python bench/moe.py --device cuda --dtype bf16 --d-model 768 --tokens 16384

Compared, on the same input in one process (median of timed repeats after warmup):
  moe[grouped] / moe[sorted]: minillm.model.moe.MoE with each dispatch kernel;
  naive: the same weights run by a per-expert boolean-mask loop (``mask.any()`` syncs per expert);
  dense: a SwiGLU of hidden top_k * d_expert, the same active parameters per token.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.model.experts import HAS_GROUPED_MM
from minillm.model.ffn import SwiGLU
from minillm.model.moe import MoE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def naive_moe(moe: MoE, x: Tensor) -> Tensor:
    """Per-expert boolean masks over all tokens, as in early Mixtral ports: the slow baseline."""
    x = x.reshape(-1, x.shape[-1])  # (N, C)
    probs = moe.router.proj(x).float().softmax(dim=-1)
    gates, experts = probs.topk(moe.top_k, dim=-1)  # (N, K)
    gates = (gates / gates.sum(dim=-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    for e in range(moe.n_experts):
        mask = experts == e  # (N, K)
        if not mask.any():  # host sync
            continue
        tokens = mask.any(dim=-1)  # (N,)
        gate, up = (x[tokens] @ moe.experts.w_gate_up[e]).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ moe.experts.w_down[e]
        out[tokens] += y * (gates * mask)[tokens].sum(dim=-1, keepdim=True)
    return out


def timed(fn, x: Tensor, warmup: int, repeats: int, device: str) -> float:
    """Median seconds of forward+backward of ``fn(x)`` over ``repeats`` runs after ``warmup``."""
    grad = torch.randn_like(x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        fn(x).backward(grad)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Parse arguments, build the layers, print times and ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--n-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--d-expert", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, dev = DTYPES[args.dtype], torch.device(args.device)
    kernels = ["grouped", "sorted"] if HAS_GROUPED_MM else ["sorted"]
    moes = {k: MoE(args.d_model, args.n_experts, args.top_k, args.d_expert, dispatch=k) for k in kernels}
    for m in moes.values():
        m.load_state_dict(moes[kernels[0]].state_dict())
        m.to(dev, dtype)
    dense = SwiGLU(args.d_model, args.top_k * args.d_expert).to(dev, dtype)
    x = torch.randn(args.tokens, args.d_model, device=dev, dtype=dtype, requires_grad=True)
    ref = moes[kernels[0]]
    with torch.no_grad():
        err = (ref(x) - naive_moe(ref, x)).abs().max().item()
    fns = {f"moe[{k}]": m for k, m in moes.items()}
    fns |= {"naive": lambda t: naive_moe(ref, t), "dense": dense}
    print(f"device {args.device} {args.dtype} threads {torch.get_num_threads()} | N {args.tokens} "
          f"C {args.d_model} E {args.n_experts} K {args.top_k} F {args.d_expert} | "
          f"max |moe - naive| {err:.2e}")
    # Interleave rounds so that load from other processes hits every variant alike.
    runs = {name: [] for name in fns}
    for _ in range(3):
        for name, fn in fns.items():
            runs[name].append(timed(fn, x, args.warmup, args.repeats // 3 or 1, args.device))
    t = {name: statistics.median(v) for name, v in runs.items()}
    for name in fns:
        print(f"{name:14s} {1e3 * t[name]:9.2f} ms  naive/this {t['naive'] / t[name]:5.2f}x  "
              f"this/dense {t[name] / t['dense']:5.2f}x")


if __name__ == "__main__":
    main()
