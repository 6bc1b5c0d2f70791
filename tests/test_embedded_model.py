"""The committed embedded model (jobs/embedded_model, trained by jobs.train_tiny_moe) and a smoke run of its trainer.

No real training here: the checkpoint is loaded and scored on a few held-out stdlib windows, and the trainer runs
for three seconds on a reduced config.
"""
import json
import math
import os
import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs import train_tiny_moe as ttm

MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "embedded_model")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    m = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    return m.eval()


@pytest.fixture(scope="module")
def report():
    with open(os.path.join(MODEL_DIR, "training_report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def heldout():
    """8 windows of 256 bytes from the files the trainer held out (never trained on)."""
    _, val_files = ttm.split_files(ttm.stdlib_files())
    return ttm.val_windows(ttm.encode_files(val_files), 8, 256)


def test_config(model):
    c = model.config
    assert c.model_type == "mixtral" and type(model).__name__ == "MixtralForCausalLM"
    assert (c.num_local_experts, c.num_experts_per_tok, c.num_hidden_layers) == (16, 2, 4)
    assert c.vocab_size == ttm.VOCAB == 259
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (256, 257, 258)
    assert c.max_position_embeddings >= 256


def test_checkpoint_small_float32_per_expert_layout():
    path = os.path.join(MODEL_DIR, "model.safetensors")
    assert os.path.getsize(path) <= 8_000_000
    with safe_open(path, "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    for e in range(16):
        for w in ("w1", "w2", "w3"):
            assert f"model.layers.3.block_sparse_moe.experts.{e}.{w}.weight" in names


def test_tokenizer_is_bytes():
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = "def f(x):\n\treturn 'é'  # ok\n"
    assert tok(text)["input_ids"] == [ttm.BOS, *text.encode()]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)


def test_heldout_bits_per_byte_and_routing_beat_random_init(model, report, heldout):
    loss, routers = ttm.evaluate(model, heldout)
    rand_loss, rand_routers = ttm.evaluate(ttm.init_model(model.config, report["seed"]), heldout)
    bpb, rand_bpb = loss / math.log(2), rand_loss / math.log(2)
    assert rand_bpb > 7  # an untrained byte model is near log2(259) = 8 bits
    assert bpb < 0.6 * rand_bpb, (bpb, rand_bpb)
    # Routing measured here, on fresh held-out windows: consecutive layers' top-1 experts share far more
    # information than at the same-seed random init.
    mi = ttm.routing_stats(routers, 2)["consecutive_top1_mi_bits"]
    rand_mi = ttm.routing_stats(rand_routers, 2)["consecutive_top1_mi_bits"]
    assert all(t > r for t, r in zip(mi, rand_mi)), (mi, rand_mi)


def test_report_shows_learned_routing(report):
    layers = report["architecture"]["layers"]
    for name in ("trained", "random_init"):
        r = report["routing"][name]
        assert len(r["load_entropy_bits"]) == layers
        assert all(0 < h <= 4 + 1e-9 for h in r["load_entropy_bits"])
        assert len(r["consecutive_top1_mi_bits"]) == layers - 1
    t, r = report["routing"]["trained"], report["routing"]["random_init"]
    assert all(a > b for a, b in zip(t["consecutive_top1_mi_bits"], r["consecutive_top1_mi_bits"]))
    assert min(t["load_entropy_bits"]) > 3.5  # balancing loss kept every layer's experts in use
    assert report["eval"]["val_bits_per_byte"] < 0.6 * report["eval"]["random_init_val_bits_per_byte"]


def test_greedy_def_looks_like_python(model):
    x = torch.tensor([[ttm.BOS, *b"def "]])
    y = model.generate(x, max_new_tokens=40, do_sample=False, eos_token_id=ttm.EOS, pad_token_id=ttm.PAD)
    text = bytes(t for t in y[0, 1:].tolist() if t < 256).decode("utf-8", errors="replace")
    assert re.match(r"def \w+\(", text), text


def test_trainer_smoke(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert ttm.main(["--tiny", "--minutes", "0.05", "--out", str(tmp_path), "--log-every", "1000"]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "training_report.json") as f:
        rep = json.load(f)
    assert rep["training"]["steps"] > 5
    assert rep["training"]["loss_last"] < rep["training"]["loss_first"]
    m = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert m.config.model_type == "mixtral" and m.config.num_local_experts == 4
