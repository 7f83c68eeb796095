"""One training step (forward, backward, AdamW) of minillm's presets against minimal models.

The configurable model should cost nothing over a minimal hand-written PyTorch model of the same
shapes and math. Both run in this process, interleaved, and the script prints the ratio of median
step times (minillm / minimal; goal <= 1.00).

    python bench/train_step.py                 # gpt2 and llama at d 256, 4 layers, 8 heads, T 256, B 8
    python bench/train_step.py --steps 30 --presets llama
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minillm import build_model  # noqa: E402


class RMSNorm(nn.Module):
    """llama2.c's RMSNorm."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class MinimalBlock(nn.Module):
    """nanoGPT-style block written out by hand; ``llama`` switches RMSNorm/RoPE/SwiGLU/GQA on."""

    def __init__(self, d: int, h: int, h_kv: int, hidden: int, llama: bool) -> None:
        super().__init__()
        Norm = RMSNorm if llama else nn.LayerNorm
        self.h, self.h_kv, self.hd, self.llama = h, h_kv, d // h, llama
        self.n1, self.n2 = Norm(d), Norm(d)
        self.qkv = nn.Linear(d, (h + 2 * h_kv) * self.hd, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, (2 if llama else 1) * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.n1(x)).split([self.h * self.hd, self.h_kv * self.hd,
                                              self.h_kv * self.hd], dim=-1)
        q = q.view(B, T, self.h, self.hd).transpose(1, 2)
        k = k.view(B, T, self.h_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.h_kv, self.hd).transpose(1, 2)
        if self.llama:
            q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.h_kv != self.h)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        u = self.up(self.n2(x))
        if self.llama:
            g, u = u.chunk(2, dim=-1)
            u = F.silu(g) * u
        else:
            u = F.gelu(u, approximate="tanh")
        return x + self.down(u)


class MinimalLM(nn.Module):
    """The smallest GPT-2 / Llama language model with the same shapes as the preset."""

    def __init__(self, vocab: int, d: int, layers: int, h: int, h_kv: int, hidden: int, T: int,
                 llama: bool) -> None:
        super().__init__()
        self.llama = llama
        self.emb = nn.Embedding(vocab, d)
        self.pos = None if llama else nn.Embedding(T, d)
        self.blocks = nn.ModuleList(MinimalBlock(d, h, h_kv, hidden, llama) for _ in range(layers))
        self.norm = RMSNorm(d) if llama else nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        hd = d // h
        inv = 10000.0 ** (-torch.arange(0, hd, 2).float() / hd)
        ang = torch.arange(T).float()[:, None] * inv
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.emb(idx)
        if self.pos is not None:
            x = x + self.pos.weight[:T]
        for b in self.blocks:
            x = b(x, self.cos[:T], self.sin[:T])
        return self.head(self.norm(x))


def step_fn(model: nn.Module, idx: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def median_times(fns: dict, steps: int, warmup: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):  # interleaved, so machine noise hits both sides alike
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["gpt2", "llama"])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d, layers, heads, vocab, T = 256, 4, 8, 4096, args.seq_len
    print(f"one training step, d {d}, {layers} layers, {heads} heads, T {T}, batch {args.batch}, "
          f"vocab {vocab}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for preset in args.presets:
        with initialize_config_dir(str(ROOT / "configs"), version_base=None):
            cfg = compose("train", [f"model={preset}", f"data.vocab_size={vocab}", f"model.d_model={d}",
                                    f"model.n_layers={layers}", f"model.n_heads={heads}",
                                    f"model.max_seq_len={T}"])
        torch.manual_seed(0)
        ours = build_model(cfg.model)
        block = ours.blocks[0]
        llama = hasattr(block.ffn, "gate_up")
        hidden = block.ffn.down.in_features
        minimal = MinimalLM(vocab, d, layers, heads, block.attn.n_kv_heads, hidden, T, llama)
        assert ours.num_params() == minimal.num_params(), "the two models differ in shape"
        idx = torch.randint(0, vocab, (args.batch, T + 1))
        t = median_times({"minillm": step_fn(ours, idx), "minimal": step_fn(minimal, idx)},
                         args.steps, args.warmup)
        print(f"{preset:6s} minillm {t['minillm'] * 1e3:7.1f} ms   minimal {t['minimal'] * 1e3:7.1f} ms"
              f"   ratio {t['minillm'] / t['minimal']:.3f} (goal <= 1.00)")

if __name__ == "__main__":
    main()
