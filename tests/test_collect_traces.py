"""jobs.collect_traces on the embedded model: the recorded routing equals transformers' router on the same tokens,
and the recorded hidden states are the ones the router saw."""
import os

import numpy as np
import pytest
import torch

from cluster.model import LocalExperts, MoEModel, generate, load_checkpoint
from jobs.collect_traces import EMBEDDED, held_out_prompts, main
from policies.traces import load


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("traces") / "embedded.npz"
    assert main(["--requests", "3", "--prompt-bytes", "40", "--max-tokens", "12", "--hidden", "--out", str(out)]) == 0
    return load(out)


def test_shape_and_weights(trace):
    assert trace.num_requests == 3 and trace.num_tokens == 3 * (40 + 12 - 1)
    assert trace.experts.shape == (trace.num_tokens, 4, 2) and trace.hidden.shape == (trace.num_tokens, 4, 128)
    assert trace.known.all()
    np.testing.assert_allclose(trace.weights.sum(-1), 1.0, atol=2e-3)  # Mixtral renormalises its top-2


def test_routing_equals_transformers_router(trace):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(EMBEDDED, dtype=torch.float32).eval()
    prompts = held_out_prompts(3, 40, seed=0)
    config, dense, experts = load_checkpoint(EMBEDDED)
    for r, req in enumerate(trace.requests()):
        # the request's token sequence: its prompt, then the generated tokens that were fed back
        model = MoEModel.from_dense(config, dense, LocalExperts(experts), dtype=torch.float32)
        gen = generate(model, [prompts[r]], 12, eos_token_id=None)[0]
        seq = torch.tensor([prompts[r] + gen[:-1]])
        with torch.no_grad():
            logits = hf(seq, output_router_logits=True).router_logits  # per layer [T, E]
        for l, lg in enumerate(logits):
            ref = torch.topk(lg.reshape(seq.shape[1], -1), 2, dim=-1).indices.numpy()
            got = req.experts[:, l]
            agree = np.mean(np.sort(ref, -1) == np.sort(got, -1))
            assert agree > 0.99, f"request {r} layer {l}: {agree:.3f} of top-2 choices agree with transformers"


def test_hidden_states_are_what_the_router_saw(trace):
    _, dense, _ = load_checkpoint(EMBEDDED)
    for l in range(4):
        gate = dense[f"model.layers.{l}.block_sparse_moe.gate.weight"].numpy()   # [E, H]
        logits = trace.hidden[:, l].astype(np.float32) @ gate.T                   # [T, E]
        top = np.sort(np.argsort(-logits, -1)[:, :2], -1)
        agree = np.mean(top == np.sort(trace.experts[:, l], -1))
        assert agree > 0.97, f"layer {l}: router on recorded hidden states agrees on {agree:.3f}"


def test_context_too_long_is_refused(tmp_path, capsys):
    assert main(["--prompt-bytes", "250", "--max-tokens", "64", "--out", str(tmp_path / "x.npz")]) == 2
    assert "exceeds the model's context of 256" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.npz")


def test_train_split_prompts_come_from_other_files():
    """--split train draws from the files the embedded model trained on; evaluation traces (--split heldout) from
    the others, so a learned predictor's training data does not overlap its evaluation (the stdlib repeats some
    boilerplate across files, so a few windows occur in both)."""
    from jobs.collect_traces import prompts_from
    from jobs.train_tiny_moe import split_files, stdlib_files
    _, val_files = split_files(stdlib_files())
    held = b"\0".join(f.read_bytes() for f in val_files)
    train = prompts_from("train", 20, 64, seed=3)
    assert sum(bytes(p) in held for p in train) <= 4
    assert all(bytes(p) in held for p in prompts_from("heldout", 5, 64, seed=3))
    assert held_out_prompts(3, 40, seed=0) == prompts_from("heldout", 3, 40, seed=0)
    assert len(prompts_from("heldout", len(val_files) + 5, 64, seed=1)) == len(val_files) + 5  # a second round
    with pytest.raises(ValueError, match="split"):
        prompts_from("test", 1, 8, seed=0)
