"""``mode=sample``: print ``num_samples`` continuations of ``prompt`` (or ``prompt_file``) from a checkpoint.

See docs/training.md (Evaluation and sampling).
"""

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tokenizers.decoders import DecodeStream

from minillm.evaluation.loading import load
from minillm.generation import check_sampling, continuations


def prompt_text(cfg: DictConfig) -> str:
    """The prompt: ``prompt_file``'s text (less one final newline) when set, else ``prompt``."""
    path = cfg.get("prompt_file")
    if path is not None:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"prompt_file={path!r}: cannot read it as UTF-8 text ({e})") from None
        return text.removesuffix("\n")
    if not isinstance(cfg.prompt, str):
        raise ValueError(f"prompt={cfg.prompt!r} must be a string (quote it for the shell: "
                         "\"prompt=Tom, the cat\", or use prompt_file=PATH)")
    return cfg.prompt


def _printer(tokenizer, prompt: str):
    """Print ``prompt``, then stream one row's new text to stdout; ``DecodeStream`` holds back a
    character not yet complete."""
    print(prompt, end="", flush=True)
    stream = DecodeStream(ids=tokenizer.encode(prompt).ids, skip_special_tokens=True)
    return lambda row, token_id: print(stream.step(tokenizer, token_id) or "", end="", flush=True)


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Print samples; return ``{"samples": [text, ...]}`` (prompt included, EOT excluded)."""
    check_sampling("", cfg.max_new_tokens, cfg.num_samples, cfg.temperature, cfg.top_k, cfg.top_p)
    prompt = prompt_text(cfg)  # both checked before the checkpoint is read
    (model, tokenizer, _), _ = load(cfg)
    streaming = bool(cfg.get("stream", False)) and cfg.num_samples == 1
    printer = _printer(tokenizer, prompt) if streaming else None
    texts = continuations(model, tokenizer, prompt, cfg.num_samples, cfg.max_new_tokens,
                          temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed,
                          use_cache=cfg.use_cache, stream=printer)
    if streaming:
        print()
    else:
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1}/{len(texts)} ---\n{text}")
    return {"samples": texts}
