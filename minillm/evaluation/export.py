"""``mode=export``: write the checkpoint as a Hugging Face model folder at ``out=DIR``.

Thin on purpose: ``minillm.interop.export_hf`` does the work (docs/interop.md).
"""

from typing import Any

from omegaconf import DictConfig

from minillm.evaluation.loading import load, required
from minillm.interop import export_hf, hf_family


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path`` to ``cfg.out``; return ``{"out": DIR, "architecture": NAME}``."""
    out = required(cfg, "out", "ckpt_path=PATH out=hf_model")
    (model, tokenizer, _), _ = load(cfg)
    architecture = hf_family(model).architecture
    folder = export_hf(model, out, tokenizer)
    print(f"wrote {architecture} to {folder}: load it with "
          f"AutoModelForCausalLM.from_pretrained({str(folder)!r})")
    return {"out": str(folder), "architecture": architecture}
