"""Model FLOPs per token and model FLOPs utilisation (MFU).

FLOPs per token, forward plus backward (PaLM appendix B, as in nanoGPT's ``estimate_mfu``):
``6 * N + 12 * n_layers * n_heads * head_dim * seq_len`` where N counts the parameters a token
multiplies with: the active parameters (MoE: top-k experts only), without the learned position
table, which is looked up rather than multiplied. MFU divides achieved FLOP/s by the chip's dense
bf16 peak, taken from the detected device (``PEAK_FLOPS``) or given explicitly
(``callbacks.throughput.peak_flops``).

Why our own table and not ``lightning.fabric.utilities.throughput.get_available_flops``: as of
Lightning 2.6 it returns None for "NVIDIA H200" and "NVIDIA H200 NVL" (the names torch reports; its
table's keys are "h200 sxm1" and "h200 nvl1"), reads "NVIDIA L40S" as an L4 (121 instead of 362
TFLOP/s), returns None for "NVIDIA GH200 480GB", and knows no B200 or AMD chip
(``test_peak_lookup_...`` in tests/test_distributed.py pins these names).
"""

import torch

# Dense bf16 tensor-core peak FLOP/s (no sparsity), matched by substring of the device name.
PEAK_FLOPS = {
    "H200": 989e12, "H200 NVL": 836e12, "H100 PCIe": 756e12, "H100 NVL": 836e12, "H100": 989e12,
    "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10G": 70e12, "A10": 125e12, "A6000": 155e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
    "V100": 125e12, "T4": 65e12, "MI300X": 1307e12, "MI250X": 383e12,
}


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of ``model`` at context ``seq_len``."""
    n = model.num_params(active=True)
    table = getattr(model.position, "table", None)
    if isinstance(table, torch.nn.Embedding):
        n -= table.weight.numel()
    attn = model.blocks[0].attn
    return 6 * n + 12 * model.n_layers * attn.n_heads * attn.head_dim * seq_len


def peak_flops(device: torch.device | str | None = None, override: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of ``device`` (``override`` wins); None when unknown (e.g. CPU)."""
    if override:
        return float(override)
    if not torch.cuda.is_available() or torch.device(device or "cuda").type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_FLOPS[key]
    return None


def mfu(tokens_per_second: float, flops_token: float, peak: float | None) -> float | None:
    """Fraction of the peak achieved; None when the peak is unknown."""
    return None if not peak else tokens_per_second * flops_token / peak
