"""torch.compile: the training forward is one graph and agrees with eager; compiled generation too.

Compilation takes tens of seconds on a small CPU, so there is one compiled model per test and the
generation test runs only with MINILLM_SLOW_TESTS=1.
"""

import os

import pytest
import torch

from conftest import compose_cfg
from minillm import build_model
from minillm.generation import generate


def tiny_preset():
    cfg = compose_cfg(["model=tiny", "data=synthetic", "data.vocab_size=64", "model.d_model=32",
                       "model.n_layers=2", "model.max_seq_len=32"])
    return build_model(cfg.model)


def test_compiled_training_forward_is_one_graph_and_matches_eager():
    """What training runs: the forward with the loss inside (fused with the head when compiled)."""
    model = tiny_preset()
    compiled = torch.compile(model, fullgraph=True)  # fails on any graph break
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    loss, ref = compiled(idx, targets=targets), model(idx, targets=targets)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not os.environ.get("MINILLM_SLOW_TESTS"), reason="set MINILLM_SLOW_TESTS=1 (minutes)")
def test_compiled_generation_matches_eager():
    model = tiny_preset().eval()
    prompts = [[1, 2, 3], [4]]
    assert generate(torch.compile(model), prompts, 8, temperature=0) == \
        generate(model, prompts, 8, temperature=0)
