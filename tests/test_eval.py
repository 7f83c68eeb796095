"""eval.py end to end on CPU: metrics, unigram baseline, sampling, checkpoint loading, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, ROOT, compose_cfg, options

import eval as eval_script
from minillm import load_checkpoint
from minillm.cli import composition_errors
from minillm.evaluation import MODES
from minillm.evaluation.command_line import prepare
from minillm.evaluation.loss import unigram_log_probs


def _eval(*overrides):
    return eval_script.main(compose_cfg(list(overrides), "eval"))


def _eval_cli(*args):
    """eval.py as its command line runs it: arguments prepared, composed, errors as one line."""
    with composition_errors():
        cfg = compose_cfg(prepare(list(args), CONFIGS), "eval")
    return eval_script.main(cfg)


def _run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def _sample(ckpt, *overrides):
    return _eval(f"ckpt_path={ckpt}", "mode=sample", "max_new_tokens=12", "num_samples=2",
                 *overrides)["samples"]


def test_loss_matches_training_validation(tiny_run):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    # The training validation saw the first 2 batches of 4 windows of 32 tokens: evaluate exactly those.
    result = _eval(f"ckpt_path={ckpt}", "batch_size=4", f"val_tokens={8 * 32 + 1}")
    history = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert result["val_tokens"] == 8 * 32 and result["step"] == 4
    assert result["val_loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-5)
    assert result["val_bpb"] == pytest.approx(history[-1]["val_bpb"], rel=1e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["val_bpb"] == pytest.approx(
        result["val_loss"] / math.log(2) / result["bytes_per_token"])
    assert math.isfinite(result["unigram_bpb"]) and result["unigram_bpb"] > 0
    assert json.loads((ckpt.parent / "eval.json").read_text()) == result


def test_unigram_is_add_one_smoothed():
    log_probs = unigram_log_probs(np.array([0, 0, 2], dtype=np.uint16), vocab_size=3, chunk=2)
    torch.testing.assert_close(log_probs.exp(), torch.tensor([3 / 6, 1 / 6, 2 / 6], dtype=torch.float64))


def test_sampling_is_deterministic_per_seed(tiny_run):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    first = _sample(ckpt, "seed=0", "temperature=1.0", "top_k=null", "top_p=null")
    assert first == _sample(ckpt, "seed=0", "temperature=1.0", "top_k=null", "top_p=null")
    assert first != _sample(ckpt, "seed=1", "temperature=1.0", "top_k=null", "top_p=null")
    assert all(text.startswith("Once upon a time") for text in first)
    greedy = _sample(ckpt, "temperature=0", "seed=3")
    assert greedy == _sample(ckpt, "temperature=0", "seed=4", "use_cache=false")
    assert greedy[0] == greedy[1]


@pytest.mark.parametrize("prompt", ["", "Zoë saw a 🦄 naïvely"])
def test_sampling_odd_prompts_and_long_outputs(tiny_run, prompt, capsys):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    # Up to 80 new tokens > the 32-token context: the window slides (a row may end earlier at EOT).
    texts = _eval(f"ckpt_path={ckpt}", "mode=sample", f"prompt='{prompt}'", "max_new_tokens=80",
                  "num_samples=1", "temperature=0")["samples"]
    assert texts[0].startswith(prompt)
    assert capsys.readouterr().out.strip() == texts[0].strip()  # streamed text == returned text


def test_load_checkpoint_in_eval_mode_and_from_compiled_keys(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    model, tokenizer, cfg = load_checkpoint(ckpt)
    assert not model.training and cfg.model.d_model == 32 and tokenizer.get_vocab_size() <= 512
    raw = torch.load(ckpt, weights_only=True)
    raw["state_dict"] = {k.replace("model.", "model._orig_mod.", 1): v for k, v in raw["state_dict"].items()}
    torch.save(raw, tmp_path / "compiled.ckpt")
    compiled = load_checkpoint(tmp_path / "compiled.ckpt").model
    idx = torch.randint(0, 100, (1, 16))
    torch.testing.assert_close(compiled(idx), model(idx))


def test_bad_checkpoints_and_settings_exit_with_one_line(tiny_run, tmp_path, capsys):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((tiny_run / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    cases = [([f"ckpt_path={tmp_path / 'missing.ckpt'}"], "no such file"),
             ([f"ckpt_path={truncated}"], "not a readable checkpoint"),
             ([f"ckpt_path={garbage}"], "not a readable checkpoint"),
             ([], "ckpt_path is required"),
             ([f"ckpt_path={ckpt}", "mode=nope"], "mode='nope'"),
             ([f"ckpt_path={ckpt}", "mode=sample", "temperature=-1"], "temperature=-1"),
             ([f"ckpt_path={ckpt}", "mode=sample", "top_p=0"], "top_p=0")]
    for overrides, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            _eval_cli(*overrides)  # mode=nope: refused before composition, as configs/mode/ has no nope
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err
        assert "\n" not in err


def test_cli_samples(tiny_run):
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "eval.py", f"ckpt_path={ckpt}", "mode=sample",
                          "prompt=Once upon", "max_new_tokens=8", "num_samples=2", "seed=0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Once upon") == 2 and "sample 2/2" in out.stdout
    assert not Path(ROOT / "outputs").exists()


def test_each_mode_is_one_file_of_the_mode_group_showing_only_its_settings(capsys):
    assert options("mode") == sorted(MODES)
    for mode in MODES:
        assert compose_cfg([f"mode={mode}"], "eval").mode == mode
    sample, report = compose_cfg(["mode=sample"], "eval"), compose_cfg(["mode=report"], "eval")
    assert "prompt" in sample and "sweep_dir" not in sample and "factors" not in sample
    assert {"sweep_dir", "factors", "rope_scaling"} <= set(report) and "prompt" not in report
    out = _run_cli("mode=sample", "--cfg", "job")
    assert out.returncode == 0 and "prompt: Once upon a time" in out.stdout and "sweep_dir" not in out.stdout
    with pytest.raises(SystemExit) as exit_info:  # a setting of another mode, named with its mode
        _eval_cli("mode=sample", "sweep_dir=multirun/x")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err.startswith("error: sweep_dir is a setting of mode=report, not of mode=sample;")


@pytest.mark.parametrize("prompt", ["Tom and 猫", "Tom, the cat! (really) [x] {y}", "Don't", 'say "hi"',
                                    "a=b: c", "${oc.env:HOME} \\${x}", "back\\slash\\", "two\nlines", ""])
def test_a_prompt_needs_no_hydra_quoting(prompt):
    """Unquoted for Hydra, such prompts used to end in LexerNoViableAltException."""
    for key in ("prompt", "++prompt"):  # the value composes back to exactly the text typed
        assert compose_cfg(prepare(["mode=sample", f"{key}={prompt}"], CONFIGS), "eval").prompt == prompt


def test_words_the_shell_split_off_a_prompt_are_named_with_the_quoting_that_works(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _eval_cli("mode=sample", "prompt=Tom", "and", "猫", "seed=1")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err.startswith("error: prompt: ") and "'prompt=Tom and 猫'" in err and "prompt_file=PATH" in err


def test_prompt_file_and_a_punctuated_prompt_from_the_shell(tiny_run, tmp_path, capsys):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    text = 'Tom and 猫 said: "hi, you!"\nThen {they} left.'
    (tmp_path / "prompt.txt").write_text(text + "\n", encoding="utf-8")
    texts = _sample(ckpt, f"prompt_file={tmp_path / 'prompt.txt'}", "prompt=ignored")
    assert all(t.startswith(text) for t in texts)  # the file's text, less its final newline
    with pytest.raises(SystemExit):
        _sample(ckpt, f"prompt_file={tmp_path / 'missing.txt'}")
    assert capsys.readouterr().err.startswith(f"error: prompt_file='{tmp_path / 'missing.txt'}': cannot read")
    out = _run_cli(f"ckpt_path={ckpt}", "mode=sample", "prompt=Tom, the 猫!", "max_new_tokens=4",
                   "num_samples=1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Tom, the 猫!")
