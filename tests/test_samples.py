"""Text samples written during training (``SampleText``): what is written, when, by which rank, and
that training is unchanged by it."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_TRAIN, compose_cfg
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from torch._dynamo.testing import CompileCounter

import eval as eval_script
import train
from minillm import load_checkpoint
from minillm.generation import continuations
from minillm.training.callbacks import SampleText


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same(a, b) -> bool:
    """Equal nested containers of tensors and plain values (the RNG states in a checkpoint)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


class TableLogger(WandbLogger):
    """A W&B logger that only records the tables it is given (no W&B run)."""

    def __init__(self) -> None:
        self.tables = []

    def log_text(self, key, columns=None, data=None, dataframe=None, step=None) -> None:
        self.tables.append({"key": key, "columns": columns, "data": data, "step": step})


def _trainer(tiny_run, **fields) -> SimpleNamespace:
    """What ``SampleText`` reads of a Trainer: rank 0, CPU fp32, the tiny run's tokenizer."""
    tokenizer_json = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)["tokenizer"]
    return SimpleNamespace(**{"sanity_checking": False, "is_global_zero": True, "global_step": 4,
                              "loggers": [], "precision": "32-true", "strategy": None,
                              "datamodule": SimpleNamespace(tokenizer_json=tokenizer_json), **fields})


def test_the_run_samples_what_eval_py_samples_at_each_validation(tiny_run):
    samples, history = _lines(tiny_run / "samples.jsonl"), _lines(tiny_run / "metrics.jsonl")
    cfg = compose_cfg(["run_dir=."]).callbacks.samples  # the defaults: 1 prompt, 1 sample
    assert [s["step"] for s in samples] == [h["step"] for h in history] == [2, 4]
    assert all(s["prompt"] == cfg.prompts[0] and s["sample"] == 0 for s in samples)
    assert all(s["text"].startswith(cfg.prompts[0]) and len(s["text"]) > len(s["prompt"]) for s in samples)
    # The last one is the text eval.py prints for the last checkpoint with the same settings.
    printed = eval_script.main(compose_cfg([
        f"ckpt_path={tiny_run / 'checkpoints' / 'last.ckpt'}", "mode=sample", f"prompt='{cfg.prompts[0]}'",
        f"num_samples={cfg.num_samples}", f"max_new_tokens={cfg.max_new_tokens}",
        f"temperature={cfg.temperature}", f"top_k={cfg.top_k}", "top_p=null", f"seed={cfg.seed}"], "eval"))
    assert printed["samples"] == [samples[-1]["text"]]


def test_training_is_the_same_without_the_samples(tiny_run, tmp_path):
    run_dir = tmp_path / "no_samples"
    train.main(compose_cfg(TINY_TRAIN + [f"run_dir={run_dir}", "~callbacks.samples",
                                         f"data.cache_dir={tiny_run.parent.parent / 'data_cache'}"]))
    assert not (run_dir / "samples.jsonl").exists()
    without = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    sampled = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert without["state_dict"].keys() == sampled["state_dict"].keys()
    for key, value in without["state_dict"].items():
        assert torch.equal(sampled["state_dict"][key], value), key  # bit-identical
    # The global generators a later step would draw from (dropout, data) are where they were too.
    assert _same(sampled["rng_states"], without["rng_states"])


def test_rank_zero_writes_each_nth_validation_and_a_wandb_table(tiny_run, tmp_path):
    model, tokenizer, _ = load_checkpoint(tiny_run / "checkpoints" / "last.ckpt")
    module = SimpleNamespace(model=model)
    prompts, settings = ["Once upon a time", ""], {"num_samples": 2, "max_new_tokens": 8, "seed": 3}
    callback = SampleText(str(tmp_path / "samples.jsonl"), prompts, every_n_validations=2, **settings)
    wandb = TableLogger()
    rank0, rank1 = _trainer(tiny_run, loggers=[wandb]), _trainer(tiny_run, is_global_zero=False)
    callback.on_fit_start(rank0, module)
    callback.on_validation_end(_trainer(tiny_run, sanity_checking=True), module)  # not counted
    callback.on_validation_end(rank0, module)  # the 1st: skipped
    assert not callback.path.exists() and callback.validations == 1
    callback.on_validation_end(rank0, module)
    samples = _lines(callback.path)
    assert [(s["step"], s["prompt"], s["sample"]) for s in samples] == \
        [(4, p, i) for p in prompts for i in range(2)]
    for prompt in prompts:
        expected = continuations(model, tokenizer, prompt, temperature=0.8, top_k=50, **settings)
        assert [s["text"] for s in samples if s["prompt"] == prompt] == expected
    assert wandb.tables == [{"key": "samples", "columns": ["step", "prompt", "sample", "text"],
                             "data": [list(s.values()) for s in samples], "step": 4}]
    # Other ranks count validations (their checkpoints agree) but never write.
    other = SampleText(str(tmp_path / "rank1.jsonl"), prompts, every_n_validations=1, **settings)
    other.on_validation_end(rank1, module)
    assert not other.path.exists() and other.validations == 1
    assert other.state_dict() == {"validations": 1}


def test_sampling_leaves_the_model_and_the_random_state_alone(tiny_run, tmp_path):
    model, _, _ = load_checkpoint(tiny_run / "checkpoints" / "last.ckpt")
    model.train()
    model.blocks[0].attn.eval()  # a submodule's own mode is restored too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiles = CompileCounter()
    model.compile(backend=compiles)  # in place, as train.py does on a GPU
    callback = SampleText(str(tmp_path / "samples.jsonl"), ["Once"], max_new_tokens=6, temperature=1.0)
    rng = torch.get_rng_state()
    callback.on_validation_end(_trainer(tiny_run), SimpleNamespace(model=model))
    assert torch.equal(torch.get_rng_state(), rng)
    assert compiles.frame_count == 0  # generated eagerly
    assert model.training and not model.blocks[0].attn.training and model.blocks[0].ffn.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model(torch.zeros(1, 4, dtype=torch.long))
    assert compiles.frame_count == 1  # while the model itself stays compiled


def test_no_samples_under_fsdp_with_one_warning(tiny_run, tmp_path):
    callback = SampleText(str(tmp_path / "samples.jsonl"))
    trainer = _trainer(tiny_run, strategy=FSDPStrategy())
    with pytest.warns(UserWarning, match="eval.py mode=sample ckpt_path="):
        callback.on_fit_start(trainer, None)
    callback.on_validation_end(trainer, None)  # the module is never touched
    assert not callback.path.exists() and callback.validations == 1


def test_no_samples_from_nonfinite_weights(tiny_run, tmp_path):
    model, _, _ = load_checkpoint(tiny_run / "checkpoints" / "last.ckpt")
    model.blocks[0].attn.qkv.weight.data[0, 0] = float("nan")
    callback = SampleText(str(tmp_path / "samples.jsonl"))
    with pytest.warns(UserWarning, match="no samples at step 4: non-finite weights"):
        callback.on_validation_end(_trainer(tiny_run), SimpleNamespace(model=model))
    assert not callback.path.exists()  # and no error: the checkpoint hook names the step


@pytest.mark.parametrize("key, value, valid", [
    ("prompts", [], "non-empty list of strings"),
    ("prompts", "Once upon a time", "non-empty list of strings"),
    ("max_new_tokens", 0, ">= 1"),
    ("num_samples", 0, ">= 1"),
    ("temperature", -0.5, ">= 0"),
    ("top_k", 0, ">= 1"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("seed", None, "integer"),
    ("every_n_validations", 0, ">= 1"),
])
def test_bad_sampling_settings_name_the_key(tmp_path, key, value, valid):
    with pytest.raises(ValueError) as error:
        SampleText(str(tmp_path / "samples.jsonl"), **{key: value})
    message = str(error.value)
    assert message.startswith(f"callbacks.samples.{key}={value!r}: ") and valid in message
    assert "\n" not in message
