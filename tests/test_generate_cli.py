"""`python -m jobs.generate` as a user runs it: its own local cluster over a store, greedy tokens equal to the
runtime's in-process reference on the same checkpoint, and clear errors for bad prompts."""
import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_store
from cluster.model import LocalExperts, MoEModel, generate, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    ckpt, _ = tiny_store(d, f"file://{d}/store", seed=3)
    return ckpt, f"file://{d}/store", d


def run(args, d):
    p = subprocess.run([sys.executable, "-m", "jobs.generate", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    return p


def test_generate_matches_in_process_reference(store):
    ckpt, uri, d = store
    out = d / "gen.json"
    p = run(["--store", uri, "--prompt-ids", "5,6,7,8", "--max-tokens", "12", "--greedy", "--workers", "2",
             "--hbm-budget", "256KiB", "--json", str(out)], d)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(out.read_text())
    config, dense, experts = load_checkpoint(ckpt)
    model = MoEModel.from_dense(config, dense, LocalExperts(experts))
    ref = generate(model, [[5, 6, 7, 8]], 12, eos_token_id=None)[0]
    assert got["token_ids"] == ref
    assert got["misses"] > 0 and got["bytes_by_tier"]["nvme"] > 0 and got["text"] is None


def test_bad_prompts_are_clear_errors(store):
    _, uri, d = store
    p = run(["--store", uri, "--prompt", "hello", "--max-tokens", "2"], d)
    assert p.returncode == 2 and "no tokenizer.json" in p.stderr
    p = run(["--store", uri, "--prompt-ids", "1,x", "--max-tokens", "2"], d)
    assert p.returncode == 2 and "expected integers" in p.stderr
