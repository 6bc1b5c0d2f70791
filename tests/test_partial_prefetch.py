"""Partial prefetch (weight_prefetch_config, docs/weight_prefetch.md) on a real single-node Ray: a prefetch moves
exactly the ratio's (4 KiB-aligned) share of gate+up rows; the expert, completed when routed, computes outputs equal
to the reference bit-for-bit at ratios 0.25/0.5/0.8; the HBM budget is never exceeded (partial entries count their
real bytes, completions grow them within the budget); a corrupted tail is caught by the per-tensor checksum and the
output still comes from verified weights; the per-layer cap bounds a layer's partial bytes; and a whole cluster with
partial prefetch generates the reference's tokens and logits exactly."""
import os
import shutil
import time

import numpy as np
import pytest
import ray
import torch
from safetensors.numpy import load_file

from conftest import convert_checkpoint, tiny_store
from actors.expert_worker import ExpertWorker, expert_ffn
from cluster.config import ClusterConfig, WeightPrefetchConfig
from cluster.storage_tier import start_storage_actors

pytestmark = pytest.mark.ray

EMBEDDED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "embedded_model")


@pytest.fixture(scope="module")
def env(tmp_path_factory, moto_server, s3_bucket):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pp")
    ckpt, man = tiny_store(root, f"file://{root}/nvme", f"s3://{s3_bucket}/partial",
                           endpoint_url=moto_server.endpoint_url)
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="test-pp", object_store_memory=256 << 20,
             logging_level="ERROR", runtime_env={"env_vars": {k: os.environ[k] for k in
                                                              ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                               "NO_PROXY")}})
    yield {"root": root, "manifest": man, "weights": load_file(os.path.join(ckpt, "model.safetensors")),
           "s3": moto_server.endpoint_url}
    ray.shutdown()


def wp(ratio, cap="18MiB", enabled=True):
    """The validated section as workers receive it (cluster/config.py WeightPrefetchConfig)."""
    return WeightPrefetchConfig.model_validate({"enabled": enabled, "prefetch_ratio": {"moe": {"gate_up": ratio}},
                                                "max_prefetch_bytes_per_layer": cap}).model_dump()


def storage(env, name, nvme=None, tiers=("dram", "nvme")):
    cfg = ClusterConfig.model_validate({
        "ray": {"namespace": f"test-pp-{name}"},
        "tiers": [{"kind": "dram", "budget_bytes": 1 << 30}, {"kind": "nvme", "path": str(nvme or env["root"] / "nvme")},
                  {"kind": "s3", "uri": "s3://experts/partial"}],
        "tier_sets": {"default": list(tiers)}})
    return start_storage_actors(cfg, {"s3": env["s3"]})


def worker(env, name, budget_bytes, weight_prefetch, sto=None):
    """A worker of its own (fresh cache) over the module's shared storage actor unless `sto` is given."""
    if sto is None:
        sto = env.get("storage") or env.setdefault("storage", storage(env, "shared"))
    W = ray.remote(ExpertWorker)
    return W.options(max_concurrency=16).remote(0, env["manifest"].to_json(), int(budget_bytes), sto,
                                                 weight_prefetch=weight_prefetch)


def reference(env, layer, expert, x):
    w = env["weights"]
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    return expert_ffn(torch.from_numpy(x), *(torch.from_numpy(w[f"{p}.{n}.weight"]) for n in ("w1", "w3", "w2")))


def aligned_rows(I, row_bytes, ratio):
    """The ratio's share of rows, rounded down to whole 4 KiB of row bytes (computed here independently)."""
    unit = 1
    while (unit * row_bytes) % 4096:
        unit += 1
    return int(ratio * I) // unit * unit


def wait_prefetched(w, n, timeout=30):
    deadline = time.time() + timeout
    while True:
        st = ray.get(w.stats.remote())
        if st["prefetch_loads"] + st["prefetch_dropped"] >= n:
            return st
        assert time.time() < deadline, st
        time.sleep(0.02)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_partial_prefetch_bytes_exact_outputs_and_budget(env, ratio):
    man = env["manifest"]
    g = man.blob(0, 0).tensors["gate"]
    I, H = g.shape
    rb = g.length // I
    rows = aligned_rows(I, rb, ratio)
    assert 0 < rows < I
    # room for 2 whole experts: 4 partial prefetches fit, but completing 3 at once does not -> one serves uncached
    budget = 2 * man.expert_bytes
    w = worker(env, f"r{ratio}", budget, wp(ratio))
    keys = [(1, e) for e in range(4)]
    ray.get(w.prefetch.remote([(l, e, 1.0, "req") for l, e in keys]))
    st = wait_prefetched(w, len(keys))
    assert st["partial_prefetches"] == st["prefetch_loads"] >= 1
    # bytes moved per prefetch: exactly the aligned share of gate + up, nothing of down
    assert st["partial_bytes"] == st["bytes_loaded"] == st["partial_prefetches"] * 2 * rows * rb
    assert st["used_bytes"] == st["partial_prefetches"] * 2 * rows * rb <= st["budget_bytes"]
    rng = np.random.default_rng(int(ratio * 100))
    for step, experts in enumerate([[0, 1, 2], [3], [1, 2, 0, 3], [2]]):
        counts = [int(c) for c in rng.integers(1, 5, size=len(experts))]
        x = rng.standard_normal((sum(counts), H)).astype(np.float32)
        y = ray.get(w.compute.remote(1, experts, counts, x))
        start = 0
        for e, n in zip(experts, counts):   # bit-for-bit: the completed expert is the whole blob
            assert torch.equal(torch.from_numpy(np.array(y[start:start + n])), reference(env, 1, e, x[start:start + n]))
            start += n
        st = ray.get(w.stats.remote())
        assert st["used_bytes"] <= st["budget_bytes"] and st["peak_used_bytes"] <= st["budget_bytes"], st
    assert st["partial_completions"] >= st["partial_prefetches"], st
    assert st["partial_verify_failures"] == 0
    # every partial was completed with exactly its missing bytes: per expert, blob tensors minus the prefix
    down = man.blob(1, 0).tensors["down"].length
    tensors = 2 * I * rb + down
    assert st["bytes_loaded"] >= st["partial_prefetches"] * tensors


def test_disabled_is_whole_expert_prefetch(env):
    man = env["manifest"]
    w = worker(env, "off", 4 * man.expert_bytes, wp(0.5, enabled=False))
    ray.get(w.prefetch.remote([(0, 1, 1.0, None)]))
    st = wait_prefetched(w, 1)
    assert st["partial_prefetches"] == 0 and st["bytes_loaded"] == man.blob(0, 1).size


def test_layer_cap_bounds_partial_bytes(env):
    man = env["manifest"]
    g = man.blob(0, 0).tensors["gate"]
    rb = g.length // g.shape[0]
    rows = aligned_rows(g.shape[0], rb, 0.5)
    cap = 2 * (2 * rows * rb) + 4096          # two experts' prefixes (and a bit): the third of layer 0 is capped
    w = worker(env, "cap", 8 * man.expert_bytes, wp(0.5, cap))
    ray.get(w.prefetch.remote([(0, e, 1.0, None) for e in range(4)] + [(1, 0, 0.5, None)]))
    st = wait_prefetched(w, 5)
    per_layer = {}
    for k in ray.get(w.resident.remote()):
        per_layer[k[0]] = per_layer.get(k[0], 0) + 1
    assert st["used_bytes"] <= 3 * 2 * rows * rb
    assert per_layer.get(0, 0) * 2 * rows * rb <= cap and per_layer.get(1) == 1, (per_layer, st)
    assert st["partial_capped"] >= 1


@pytest.mark.parametrize("role", ["gate", "down"])
def test_corrupted_tail_is_never_computed_with(env, tmp_path, role):
    """The tail of expert (1, 2)'s gate (or down) is corrupted on NVMe, after the prefetched rows: the prefix reads
    clean; completion hashes prefix + tail against the gate checksum (down: its own checksum, in the pipeline's second
    stage, after gate/up verified and computed), refuses it, and the whole blob is read verified (NVMe fails its
    checksum, S3 serves it): the output equals the reference, so the corrupted tensor was never computed with."""
    man = env["manifest"]
    bad = tmp_path / "nvme"
    shutil.copytree(env["root"] / "nvme", bad)
    b = man.blob(1, 2)
    g = b.tensors["gate"]
    t = b.tensors[role]
    with open(bad / b.key, "r+b") as f:
        f.seek(t.offset + t.length - 8)
        tail = f.read(8)
        f.seek(t.offset + t.length - 8)
        f.write(bytes(255 - c for c in tail))
    sto = storage(env, f"corrupt-{role}", nvme=bad, tiers=("dram", "nvme", "s3"))
    w = worker(env, f"corrupt-{role}", 4 * man.expert_bytes, wp(0.5), sto=sto)
    ray.get(w.prefetch.remote([(1, 2, 1.0, None)]))
    st = wait_prefetched(w, 1)
    assert st["partial_prefetches"] == 1 and st["tier_bytes"] == {"nvme": st["partial_bytes"]}
    x = np.random.default_rng(3).standard_normal((5, g.shape[1])).astype(np.float32)
    y = ray.get(w.compute.remote(1, [2], [5], x))
    assert torch.equal(torch.from_numpy(np.array(y)), reference(env, 1, 2, x))
    st = ray.get(w.stats.remote())
    assert st["partial_verify_failures"] == 1 and st["partial_completions"] == 0
    [h] = next(iter(sto.values()))
    sst = ray.get(h.stats.remote())
    assert sst["checksum_failures"].get("nvme", 0) >= 1 and sst["tier_reads"].get("s3") == 1, sst
    # the verified blob replaced the failed partial entry: the next use is a plain hit, still exact
    y = ray.get(w.compute.remote(1, [2], [5], x))
    assert torch.equal(torch.from_numpy(np.array(y)), reference(env, 1, 2, x))
    assert ray.get(w.stats.remote())["used_bytes"] == b.size


def test_pipelined_completion_overlaps_down_read_and_is_exact(env, tmp_path):
    """A routed partial expert's two rest reads go out together; gate/up verify and compute while down is still on
    the wire (S3 behind a proxy capping each connection at 1 MB/s: the 256 KiB gate/up rest arrives in ~0.2 s, the
    512 KiB down in ~0.45 s), then down's GEMM runs. The output is the reference's bit-for-bit; the overlap counter
    is positive; and the compute waited less than the two reads took one after the other."""
    from jobs.make_checkpoint import Preset, write_checkpoint
    from storage_adapters.local_s3 import ShapingProxy
    root = tmp_path / "pipe"
    ckpt = write_checkpoint(str(root / "ckpt"), Preset(256, 64, 2048, 1, 2, 1, 2), seed=5)   # H 64, I 2048
    man = convert_checkpoint(ckpt, f"file://{root}/nvme", "s3://experts/pipe", endpoint_url=env["s3"])
    weights = load_file(os.path.join(ckpt, "model.safetensors"))
    with ShapingProxy(env["s3"], bandwidth_bps=1e6, first_byte_latency_s=0.02) as proxy:
        cfg = ClusterConfig.model_validate({
            "ray": {"namespace": "test-pp-pipe"},
            "tiers": [{"kind": "dram", "budget_bytes": 1 << 30}, {"kind": "nvme", "path": str(root / "nvme")},
                      {"kind": "s3", "uri": "s3://experts/pipe"}],
            "tier_sets": {"default": ["s3"]}})
        sto = start_storage_actors(cfg, {"s3": proxy.endpoint_url})
        W = ray.remote(ExpertWorker)
        w = W.options(max_concurrency=16).remote(0, man.to_json(), 2 * man.expert_bytes, sto,
                                                 weight_prefetch=wp(0.75))
        ray.get(w.prefetch.remote([(0, 1, 1.0, None)]))
        st = wait_prefetched(w, 1)
        assert st["partial_prefetches"] == 1 and st["tier_bytes"] == {"s3": st["partial_bytes"]}, st
        x = np.random.default_rng(5).standard_normal((2048, 64)).astype(np.float32)   # gate/up GEMMs of ~10 ms+
        y, (hits, misses, _, stall, _, _) = ray.get(w.compute.remote(0, [1], [2048], x, True))
    p = "model.layers.0.block_sparse_moe.experts.1"
    ref = expert_ffn(torch.from_numpy(x), *(torch.from_numpy(weights[f"{p}.{n}.weight"]) for n in ("w1", "w3", "w2")))
    assert torch.equal(torch.from_numpy(np.array(y)), ref)
    st = ray.get(w.stats.remote())
    assert hits == 1 and misses == 0 and st["partial_completions"] == 1 and st["partial_verify_failures"] == 0, st
    rest_s, down_s = st["partial_rest_read_s"], st["partial_down_read_s"]
    assert down_s > max(rest_s, 0.2) and rest_s > 0, st   # the shaped link: down (512 KiB) outlasts the rest
    assert st["partial_down_overlap_s"] > 0, st           # gate/up computed while down was in flight
    assert stall < rest_s + down_s, (stall, st)           # concurrent reads: not one after the other
    assert stall == pytest.approx(st["stall_seconds"])
    # the whole blob replaced the partial entry: the next use is a plain hit on the same bytes
    assert st["used_bytes"] == man.blob(0, 1).size <= st["budget_bytes"], st


def test_cluster_generation_tokens_and_logits_equal_reference(env, tmp_path):
    from tokenizers import Tokenizer

    from cluster.expert_cluster import ExpertCluster
    from cluster.model import LocalExperts, MoEModel, generate, load_checkpoint
    store = str(tmp_path / "store")
    man = convert_checkpoint(EMBEDDED, "file://" + store)
    tok = Tokenizer.from_file(os.path.join(EMBEDDED, "tokenizer.json"))
    prompts = [tok.encode(t).ids for t in ["def ", "import os\n", "class Foo(object):\n    def __init__(self"]]
    config, dense, experts = load_checkpoint(EMBEDDED)
    ref_model = MoEModel.from_dense(config, dense, LocalExperts(experts))
    new = 12
    ref = generate(ref_model, prompts, new)
    ref_logits = ref_model.prefill(ref_model.new_cache(len(prompts), 64), [p + r for p, r in zip(prompts, ref)])
    for ratio in (0.25, 0.5, 0.8):
        cfg = ClusterConfig.model_validate({
            "ray": {"namespace": f"test-pp-cluster-{ratio}"},
            "workers": {"count": 2, "hbm_budget_bytes": 8 * man.expert_bytes},
            "tiers": [{"kind": "dram", "budget_bytes": 64 << 20}, {"kind": "nvme", "path": store}],
            "prefetch": {"policy": "next_gate"},
            "weight_prefetch_config": wp(ratio)})
        with ExpertCluster(cfg) as c:
            assert c.generate(prompts, new) == ref, ratio
            m = c.model
            logits = m.prefill(m.new_cache(len(prompts), 64), [p + r for p, r in zip(prompts, ref)])
            assert torch.equal(logits, ref_logits), ratio
            st = c.stats()
        ws = st["workers"]
        assert sum(w["partial_prefetches"] for w in ws) > 0 and sum(w["partial_completions"] for w in ws) > 0, ratio
        assert all(w["peak_used_bytes"] <= w["budget_bytes"] for w in ws)
        assert sum(w["partial_verify_failures"] for w in ws) == 0
