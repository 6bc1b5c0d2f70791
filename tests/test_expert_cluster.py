"""The cluster end to end on a real single-node Ray: every family's float32 logits match transformers within 1e-4
on prefill and 16 decode steps, and greedy tokens are identical — with experts spread over two workers whose HBM
caches are so small that experts are evicted and re-read mid-run. Plus re-placement when workers join/leave."""

import json
import os

import numpy as np
import pytest
import ray
import torch

from conftest import convert_checkpoint
import hf_models
from cluster.config import ClusterConfig
from cluster.expert_cluster import ExpertCluster
from policies.reuse import PRIOR_FILE, save_routing_prior

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="test-cluster", object_store_memory=256 << 20,
             logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """family -> (Tiny, store dir, manifest)."""
    d = tmp_path_factory.mktemp("cluster")
    out = {}
    for f in hf_models.FAMILIES:
        t = hf_models.build(f, str(d))
        store = str(d / f"{f}-store")
        man = convert_checkpoint(t.path, "file://" + store)
        out[f] = (t, store, man)
    return out


def cluster_cfg(store: str, namespace: str, hbm_bytes: int, workers: int = 2, dispatch: str = "plain",
                placement: str = "balanced", prefetch: dict | None = None) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "ray": {"namespace": namespace},
        "workers": {"count": workers, "hbm_budget_bytes": hbm_bytes, "dispatch": dispatch, "placement": placement},
        "tiers": [{"kind": "dram", "budget_bytes": 64 << 20}, {"kind": "nvme", "path": store}],
        "prefetch": prefetch or {}})


def assert_greedy_equals_hf(c, t, label: str, new_tokens: int) -> None:
    """The cluster's greedy tokens for hf_models' seed-3 prompts equal transformers' generate()."""
    prompts = hf_models.prompts(c.model.args.vocab_size, seed=3)
    got = c.generate(prompts, max_new_tokens=new_tokens)
    for b, p in enumerate(prompts):
        ref = t.model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=new_tokens,
                               pad_token_id=c.model.args.pad_token_id or 0)[0, len(p):].tolist()
        assert got[b] == ref, f"{label} request {b}: cluster {got[b]} != transformers {ref}"


def layer_owners(c) -> dict[int, set[int]]:
    """MoE layer -> the workers owning its experts."""
    out: dict[int, set[int]] = {}
    for (layer, e) in c.sizes:
        out.setdefault(layer, set()).add(c.experts.placement.owner((layer, e)))
    return out


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_logits_and_greedy_tokens_match_transformers(ray_local, stores, family):
    t, store, man = stores[family]
    n_experts = len(man.blobs)
    # two workers, each caching at most 2 experts while owning ~half of them: evictions and re-reads guaranteed
    with ExpertCluster(cluster_cfg(store, f"c-{family}", 2 * man.expert_bytes)) as c:
        owners = {c.experts.placement.owner(k) for k in c.sizes}
        assert owners == {0, 1}, "experts must be spread over both workers"
        prompts = hf_models.prompts(c.model.args.vocab_size)
        err = hf_models.check_against_hf(c.model, t.model, prompts, family)
        assert err < hf_models.TOL
        assert_greedy_equals_hf(c, t, family, 16)
        st = c.stats()
        for w in st["workers"]:
            assert w["used_bytes"] <= w["budget_bytes"] and w["peak_used_bytes"] <= w["budget_bytes"]
            assert w["evictions"] > 0
        assert st["misses"] > n_experts  # experts were evicted and read again
        d = st["dispatch"]
        assert d["calls"] <= 2 * d["moe_layers"]  # at most one call per worker per MoE layer
        # policy on_demand: no coordinator, but the caches evicted by the runtime's next-token reuse values
        # (prefetch.reuse_values, the default): every expert a worker holds got one
        assert c.coordinator is None and c.publisher is not None and c.publisher.reuse is not None
        assert st["prefetch"]["reuse_values"]["memory"] is False, "no routing prior: the fast table alone"
        held = {w: sum(1 for k in c.sizes if c.experts.placement.owner(k) == w) for w in c.workers}
        assert {w["worker_id"]: w["eviction_values"] for w in st["workers"]} == held


def test_reuse_values_off_leaves_lru_and_the_same_tokens(ray_local, stores, tmp_path):
    t, store, man = stores["mixtral"]
    cfg = cluster_cfg(store, "c-noreuse", 2 * man.expert_bytes, prefetch={"reuse_values": False})
    path = tmp_path / "stats.json"
    cfg = cfg.model_copy(update={"telemetry": cfg.telemetry.model_copy(update={"stats_path": str(path)})})
    with ExpertCluster(cfg) as c:
        assert c.publisher is None and c.model.on_route is None
        assert_greedy_equals_hf(c, t, "mixtral, LRU caches", 8)
        st = c.stats()
        assert all(w["eviction_values"] == 0 and w["evictions"] > 0 for w in st["workers"])
        assert not path.exists()
    # telemetry.stats_path: the stats as they stood at shutdown
    written = json.loads(path.read_text())
    assert written["hits"] >= st["hits"] and written["misses"] >= st["misses"] and len(written["workers"]) == 2
    assert not list(tmp_path.glob("stats.json.tmp*"))


def test_reuse_values_start_from_the_stores_routing_prior(ray_local, stores):
    """A routing_prior.npz beside the store (python -m jobs.train_predictor --routing-prior) warm-starts the reuse
    values' long-memory table (prefetch.reuse_memory): it holds the prior's counts before any routing, the stats name
    the file, and the tokens are still transformers'. A prior of another geometry is an error naming the file at
    start, and the failed start stops what it had started."""
    t, store, man = stores["mixtral"]
    hf = t.model.config
    L, E, K = hf.num_hidden_layers, hf.num_local_experts, hf.num_experts_per_tok
    path = os.path.join(store, PRIOR_FILE)
    counts = np.random.default_rng(0).integers(0, 50, (L, E, E)).astype(np.float64)
    try:
        save_routing_prior(path, counts, top_k=K, source="test", rows=10, requests=1)
        with ExpertCluster(cluster_cfg(store, "c-prior", 2 * man.expert_bytes)) as c:
            assert np.allclose(c.publisher.reuse.slow.counts(), counts)
            assert_greedy_equals_hf(c, t, "mixtral, reuse values from a routing prior", 8)
            rv = c.stats()["prefetch"]["reuse_values"]
            assert rv["memory"] and rv["prior"]["path"] == path and rv["prior"]["rows"] == 10
            assert rv["scored_steps"] > 0 and len(rv["weight_memory"]) == L
        save_routing_prior(path, counts[:, 1:, 1:], top_k=K, source="test", rows=10, requests=1)
        bad = ExpertCluster(cluster_cfg(store, "c-prior-bad", 2 * man.expert_bytes))
        with pytest.raises(ValueError, match=f"routing prior {path}: same_layer \\({L}, {E - 1}, {E - 1}\\)"):
            bad.start()
        assert not bad.workers and not bad.storage
    finally:
        os.remove(path)


def test_workers_join_and_leave(ray_local, stores):
    t, store, man = stores["mixtral"]
    with ExpertCluster(cluster_cfg(store, "c-membership", 64 * man.expert_bytes)) as c:
        prompts = hf_models.prompts(c.model.args.vocab_size, seed=5)
        before = c.generate(prompts, max_new_tokens=8)
        wid = c.add_worker()
        assert wid in {c.experts.placement.owner(k) for k in c.sizes}  # the newcomer owns experts
        assert c.generate(prompts, max_new_tokens=8) == before
        c.remove_worker(0)
        assert 0 not in {c.experts.placement.owner(k) for k in c.sizes}
        assert c.generate(prompts, max_new_tokens=8) == before


def test_a_dead_worker_is_replaced_and_requests_go_on(ray_local, stores):
    t, store, man = stores["qwen3_moe"]
    with ExpertCluster(cluster_cfg(store, "c-fault", 64 * man.expert_bytes, workers=3)) as c:
        prompts = hf_models.prompts(c.model.args.vocab_size, seed=7)
        before = c.generate(prompts, max_new_tokens=8)
        victim = c.experts.placement.owner(next(iter(c.sizes)))
        ray.kill(c.workers[victim])
        assert c.generate(prompts, max_new_tokens=8) == before  # the request that found it dead went on
        assert c.lost_workers == [victim] and victim not in c.workers
        assert victim not in {c.experts.placement.owner(k) for k in c.sizes}


@pytest.mark.parametrize("cache_experts", [2, 64])
def test_compiled_graph_dispatch_matches_and_falls_back_on_misses(ray_local, stores, cache_experts):
    t, store, man = stores["olmoe"]
    cfg = cluster_cfg(store, f"c-compiled-{cache_experts}", cache_experts * man.expert_bytes, dispatch="compiled")
    with ExpertCluster(cfg) as c:
        prompts = hf_models.prompts(c.model.args.vocab_size)
        assert hf_models.check_against_hf(c.model, t.model, prompts, "olmoe") < hf_models.TOL
        d = c.stats()["dispatch"]
        assert d["mode"] == "compiled" and d["calls"] > 0
        if cache_experts == 64:   # everything resident after the first touch: the graph carries the decode steps
            assert d["plain_calls"] < d["calls"] / 2, d
        else:                     # constant misses: the workers answer MISS and plain calls load
            assert d["plain_calls"] > 0, d


def test_store_that_disagrees_with_its_config_is_refused(stores):
    from cluster.expert_cluster import check_store_matches_model
    from cluster.model import ModelArgs
    t, store, man = stores["mixtral"]
    args = ModelArgs.from_config(man.model.config)
    check_store_matches_model(man, args)  # consistent: no error
    bad = man.model_copy(update={"model": man.model.model_copy(update={"num_experts": args.num_experts + 1}),
                                 "blobs": man.blobs[:-1]})
    with pytest.raises(ValueError, match=r"num_experts: runtime 8 vs store 9.*lacks expert blobs \[\(1, 7\)\]"):
        check_store_matches_model(bad, args)


def test_hot_experts_replicated_over_workers(ray_local, stores):
    t, store, man = stores["qwen2_moe"]
    with ExpertCluster(cluster_cfg(store, "c-replicas", 64 * man.expert_bytes, workers=3), replicate_top=4) as c:
        replicated = [k for k in c.sizes if len(c.experts.placement.replicas(k)) == 2]
        assert len(replicated) == 4
        assert hf_models.check_against_hf(c.model, t.model, hf_models.prompts(c.model.args.vocab_size),
                                          "qwen2_moe") < hf_models.TOL


@pytest.mark.parametrize("dispatch", ["plain", "compiled"])
def test_by_layer_placement_makes_one_call_per_moe_layer(ray_local, stores, dispatch):
    """workers.placement=by_layer: each worker owns whole layers, so every MoE layer is exactly one worker call
    (the cheaper decode path, docs/benchmarks.md), and outputs still match transformers bit for bit in tokens —
    with caches small enough that experts are evicted and re-read."""
    t, store, man = stores["mixtral"]
    cfg = cluster_cfg(store, f"c-by-layer-{dispatch}", 3 * man.expert_bytes, dispatch=dispatch, placement="by_layer")
    with ExpertCluster(cfg) as c:
        layers = layer_owners(c)
        assert all(len(ws) == 1 for ws in layers.values()), f"a layer spans workers: {layers}"
        assert {w for ws in layers.values() for w in ws} == {0, 1}, "both workers own layers"
        prompts = hf_models.prompts(c.model.args.vocab_size)
        assert hf_models.check_against_hf(c.model, t.model, prompts, "mixtral") < hf_models.TOL
        assert_greedy_equals_hf(c, t, "mixtral by_layer", 12)
        st = c.stats()
        d = st["dispatch"]
        assert d["calls"] == d["moe_layers"], f"by_layer must make one call per MoE layer: {d}"
        assert st["misses"] > len(man.blobs)   # evicted and re-read
        for w in st["workers"]:
            assert w["peak_used_bytes"] <= w["budget_bytes"]
        before = c.generate(prompts, max_new_tokens=6)
        c.add_worker()        # membership changes move whole layers, and outputs do not change
        c.remove_worker(0)
        owners = layer_owners(c)
        assert all(len(ws) == 1 for ws in owners.values()) and all(0 not in ws for ws in owners.values()), owners
        assert c.generate(prompts, max_new_tokens=6) == before


def test_eviction_values_go_to_every_worker_that_may_hold_the_expert():
    """The fast path's eviction values (prefetch.speculate_values) go to each worker that may cache an expert: its
    owner and its replicas (a replica left unvalued would be evicted last); a new placement drops the values still
    waiting that were built under the old one."""
    import numpy as np
    from cluster.expert_cluster import ClusterExperts
    from policies.placement import Placement
    owners = {(0, e): (e % 2,) for e in range(4)}
    owners[(0, 3)] = (1, 0)                       # replicated: primary 1, replica 0
    ce = ClusterExperts({0: None, 1: None}, Placement((0, 1), owners), num_experts=4)
    assert {w: sel.tolist() for w, sel in ce.value_groups[0]} == {0: [0, 2, 3], 1: [1, 3]}
    ce.value_riders[0] = {0: (np.array([0]), np.array([0.5], np.float32))}
    ce.publish(Placement((0, 1), {(0, e): (0,) for e in range(4)}))
    assert ce.value_riders == {}
    assert {w: sel.tolist() for w, sel in ce.value_groups[0]} == {0: [0, 1, 2, 3]}
