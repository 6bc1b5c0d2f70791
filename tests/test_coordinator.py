"""The PrefetchCoordinator on a real single-node Ray with the embedded model: generation with the coordinator on
gives exactly the reference tokens (the model in one process) and its prefetches get used (more cache hits than
on-demand at the same cache budget, from the stats); stats are consistent; a tenant that is denied gets a clear
error and no prefetch is made for it; killing the coordinator mid-generation changes no token, Ray restarts it and
it resumes."""
import os
import socket
import time
import urllib.request

import pytest
import ray
import torch

from conftest import convert_checkpoint
from cluster.config import ClusterConfig
from cluster.expert_cluster import ExpertCluster
from cluster.model import LocalExperts, MoEModel, generate, load_checkpoint
from policies.ranking import AccessDenied

pytestmark = pytest.mark.ray

EMBEDDED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "embedded_model")
TEXTS = ["def ", "import os\n", "class Foo(object):\n    def __init__(self", "    for i in range("]
NEW = 24


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("coord")
    store = str(d / "store")
    man = convert_checkpoint(EMBEDDED, "file://" + store)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(EMBEDDED, "tokenizer.json"))
    prompts = [tok.encode(t).ids for t in TEXTS]
    config, dense, experts = load_checkpoint(EMBEDDED)
    ref = generate(MoEModel.from_dense(config, dense, LocalExperts(experts)), prompts, NEW)
    with socket.socket() as sock:   # a free port for Ray's Prometheus endpoint
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="test-coord", object_store_memory=256 << 20,
             logging_level="ERROR", _metrics_export_port=port)
    yield {"store": store, "man": man, "prompts": prompts, "ref": ref, "metrics_port": port}
    ray.shutdown()


def cfg(env, policy, ns, names=("dram", "nvme"), **prefetch):
    return ClusterConfig.model_validate({
        "ray": {"namespace": ns},
        # 2 workers x 8 experts = 25% of the 64 experts: I/O-bound, as offloading users run
        "workers": {"count": 2, "hbm_budget_bytes": 8 * env["man"].expert_bytes},
        "tiers": [{"kind": "dram", "name": names[0], "budget_bytes": 64 << 20},
                  {"kind": "nvme", "name": names[1], "path": env["store"]}],
        "prefetch": {"policy": policy, **prefetch}})


@pytest.fixture(scope="module")
def on_demand(env):
    """The baseline: no prediction, LRU caches (reuse_values off)."""
    with ExpertCluster(cfg(env, "on_demand", "coord-od", reuse_values=False)) as c:
        out = c.generate(env["prompts"], NEW)
        yield c, out, c.stats()


@pytest.fixture(scope="module")
def prefetching(env):
    # the DRAM tier named otherwise than its kind, as a config may (the store's manifest names the NVMe tier):
    # TierSets and tenants name it, the planner reads its kind
    c = ExpertCluster(cfg(env, "next_gate", "coord-ng", names=("ram", "nvme"),
                          tenants={"alice": {"models": ["mixtral"], "tiers": ["ram", "nvme"]}})).start()
    try:
        out = c.generate(env["prompts"], NEW)
        time.sleep(0.3)   # let the last batches and the end of the requests reach the coordinator
        yield c, out, c.stats()
    finally:
        c.shutdown()


def test_on_demand_has_no_coordinator_and_matches_reference(env, on_demand):
    c, out, st = on_demand
    assert out == env["ref"]
    assert c.coordinator is None and c.model.on_route is None
    assert st["prefetch"]["coordinator"] is None and st["prefetch"]["published"] == 0
    assert sum(w["prefetch_loads"] for w in st["workers"]) == 0


def test_on_demand_with_reuse_values_evicts_by_them_without_a_coordinator(env, on_demand):
    """policy on_demand, reuse_values on (the default): the routing hook runs without a coordinator, only to value
    each routed layer's experts by the next token's reuse; the caches then keep more of what comes back than LRU
    (the loop pathology: 4 MoE layers, each worker caching a quarter of its experts)."""
    with ExpertCluster(cfg(env, "on_demand", "coord-od-reuse")) as c:
        out = c.generate(env["prompts"], NEW)
        st = c.stats()
        assert out == env["ref"]
        assert c.coordinator is None and c.model.on_route is c.publisher and c.publisher.reuse is not None
        assert st["prefetch"]["published"] == 0 and sum(w["prefetch_loads"] for w in st["workers"]) == 0
        assert all(w["eviction_values"] > 0 for w in st["workers"])
        base = on_demand[2]["runtime"]
        assert st["runtime"]["hits"] + st["runtime"]["misses"] == base["hits"] + base["misses"]
        assert st["runtime"]["hits"] > base["hits"], (st["runtime"]["hits"], base["hits"])
        # the hook's cost: every MoE layer of every forward passed it; its reuse values were computed while the
        # layers' calls were in flight
        rt = st["runtime"]
        assert rt["hook_layers"] == st["dispatch"]["moe_layers"] > 0, (rt["hook_layers"], st["dispatch"])
        assert rt["hook_deferred_s"] > 0 and rt["hook_s"] > 0

        # one more layer by hand: the hook hands the values over instead of computing them on the decode loop ...
        pub, ex, a = c.publisher, c.experts, c.model.args
        l0 = a.moe_layers[1]
        owner = int(ex._owner_np[l0][0])
        ex.value_riders.clear()
        c.model.route_rows, c.model.route_pos = torch.arange(2), torch.tensor([NEW + 5, NEW + 5])
        ids = torch.tensor([[0, 1], [0, 2]])
        w = torch.full((2, a.top_k), 0.5)
        x = torch.randn(2, a.hidden_size, generator=torch.Generator().manual_seed(3))
        pub(l0, ids, w, x)
        assert len(ex.deferred) == 1 and not ex.value_riders
        # ... and they are there once the layer's calls left, for the next calls to carry
        ref = LocalExperts(load_checkpoint(EMBEDDED)[2])
        y = ex.moe(l0, x, ids, w)
        assert torch.allclose(y, ref.moe(l0, x, ids, w), atol=1e-5)
        assert not ex.deferred and l0 in ex.value_riders.get(owner, {}), ex.value_riders
        # deferred work that fails is raised after the layer's replies are in: the next layer computes as usual
        ex.deferred.append(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            ex.moe(l0, x, ids, w)
        assert not ex.deferred
        assert torch.allclose(ex.moe(l0, x, ids, w), ref.moe(l0, x, ids, w), atol=1e-5)


def test_fast_path_alone_runs_without_a_coordinator(env, on_demand):
    """policy on_demand with prefetch.speculate_source: the runtime's fast path predicts and orders the next layers
    itself and no coordinator is started. Outputs stay the reference's; the orders load experts that then hit;
    access control still refuses a tenant (checked by the runtime alone). A source the store lacks is a clear
    error at start, and nothing is left running."""
    with ExpertCluster(cfg(env, "on_demand", "coord-fp", speculate_source="next_gate",
                           tenants={"alice": {"models": ["mixtral"], "tiers": ["dram", "nvme"]}})) as c:
        out = c.generate(env["prompts"], NEW)
        st = c.stats()
        assert out == env["ref"]
        assert c.coordinator is None and c.model.on_route is c.publisher
        assert c.publisher.speculator.source == "next_gate" and c.publisher.speculated > 0
        assert st["prefetch"]["coordinator"] is None and st["prefetch"]["published"] == 0
        fp = st["prefetch"]["fast_path"]
        assert (fp["source"], fp["orders"]) == ("next_gate", c.publisher.speculated) and fp["depth"] == 4
        assert sum(w["prefetch_hits"] for w in st["workers"]) > 0
        with pytest.raises(AccessDenied, match="tenant 'mallory' is not allowed to use this cluster"):
            c.register_request("m-1", tenant="mallory")
        assert c.publisher.denied == {"m-1"}
        c.register_request("a-1", tenant="alice")
    before = len(ray.util.list_named_actors(all_namespaces=True))
    with pytest.raises(ValueError, match="speculate_source 'learned' with policy on_demand: this store has no"):
        ExpertCluster(cfg(env, "on_demand", "coord-fp-bad", speculate_source="learned")).start()
    assert len(ray.util.list_named_actors(all_namespaces=True)) == before, "a failed start leaves no actor behind"


def test_prefetching_matches_reference_and_raises_hits(env, on_demand, prefetching):
    c, out, st = prefetching
    assert out == env["ref"], "the coordinator must never change a token"
    base = on_demand[2]["runtime"]
    rt = st["runtime"]
    # the same routing, the same cache budget: every expert use is a hit or a miss in both runs
    assert rt["hits"] + rt["misses"] == base["hits"] + base["misses"]
    assert rt["hits"] > base["hits"], (rt, base)
    assert rt["prefetch_hits"] > 0
    cs = st["prefetch"]["coordinator"]
    assert cs["prefetches"]["used"] > 0 and cs["batches"] > 0
    assert sum(w["prefetch_loads"] for w in st["workers"]) > 0


def test_stats_are_consistent(env, prefetching):
    c, out, st = prefetching
    cs = st["prefetch"]["coordinator"]
    p = cs["prefetches"]
    assert p["issued"] == p["used"] + p["wasted"] + p["cancelled"] + p["pending"]
    assert p["issued"] >= p["used"] + p["wasted"] + p["cancelled"]
    assert 0 < p["precision"] <= 1
    # the runtime's counters come from the compute replies: they equal the workers' own
    rt = st["runtime"]
    assert rt["hits"] == sum(w["hits"] for w in st["workers"])
    assert rt["misses"] == sum(w["misses"] for w in st["workers"])
    for tier, b in rt["bytes_by_tier"].items():   # demand loads are part of everything the workers loaded
        assert 0 < b <= sum(w["tier_bytes"].get(tier, 0) for w in st["workers"])
    # the coordinator saw the same counters (piggybacked on the routing batches)
    assert cs["hits"] <= rt["hits"] and cs["misses"] <= rt["misses"]
    n_events = len(env["prompts"]) * 0 + cs["routing_events"]
    assert n_events == sum(len(p) + NEW - 1 for p in env["prompts"]) * len(c.model.args.moe_layers)
    assert set(cs["recall_at_k"]) >= {1, 2} and all(0 <= r <= 1 for r in cs["recall_at_k"].values())
    assert 0 <= cs["timely_recall"] <= 1
    # what prefetches served, in the workers' own count; and the fast path's orders, which bypass the coordinator
    # (next_gate speculates 3 layers ahead by default): the runtime's own counts, as of its last routing batch
    assert 0 < cs["prefetch_hits"] <= rt["prefetch_hits"] == sum(w["prefetch_hits"] for w in st["workers"])
    assert cs["served_by_prefetch"] == cs["prefetch_hits"] / (cs["hits"] + cs["misses"])
    # every miss has one cause, in the workers' count, the runtime's (from the replies) and the coordinator's
    mc = rt["miss_causes"]
    assert sum(mc.values()) == rt["misses"] and mc.get("not_ordered", 0) > 0   # the first tokens' experts
    by_workers = {k: sum(w["miss_causes"][k] for w in st["workers"]) for k in st["workers"][0]["miss_causes"]}
    assert mc == {k: n for k, n in by_workers.items() if n}
    assert sum(cs["miss_causes"].values()) == cs["misses"]
    # the fast path's P values reached the workers' caches (prefetch.speculate_values, on by default)
    assert all(w["eviction_values"] > 0 for w in st["workers"]), [w["eviction_values"] for w in st["workers"]]
    assert all(cs["miss_causes"][k] <= mc.get(k, 0) for k in cs["miss_causes"])
    fp, pub = cs["fast_path"], c.publisher
    assert 0 < fp["orders"] <= pub.speculated and fp["superseded"] <= pub.superseded
    assert 0 < fp["refuted"] <= pub.refuted and fp["refuted"] + fp["superseded"] <= fp["orders"]
    assert cs["window"] is not None and cs["window_history"]
    assert cs["live_requests"] == 0   # every request of the generation ended
    # the routing hook's cost, as the runtime counted it and as its batches told the coordinator: the fast path on
    # the decode loop, the publishing deferred into the wait for the replies
    assert rt["hook_layers"] > 0 and rt["hook_s"] > 0 and rt["hook_deferred_s"] > 0
    assert 0 < cs["hook"]["layers"] <= rt["hook_layers"] and 0 < cs["hook"]["deferred_s"] <= rt["hook_deferred_s"]
    assert st["prefetch"]["dropped"] == 0 and cs["dropped_batches"] == 0


def test_metrics_reach_prometheus(env, prefetching):
    """ray.util.metrics from the actor, scraped from Ray's Prometheus endpoint as a Prometheus server would."""
    c, _, _ = prefetching
    cs = c.coordinator_stats()   # stats() exports the current totals
    want = {"ray_moe_prefetch_issued_total": cs["prefetches"]["issued"],
            "ray_moe_expert_misses_total": cs["misses"],
            "ray_moe_fast_path_orders_total": cs["fast_path"]["orders"],
            'ray_moe_expert_misses_by_cause_total{cause="not_ordered"}': cs["miss_causes"]["not_ordered"]}
    assert cs["fast_path"]["orders"] > 0
    seen: dict = {}
    deadline = time.time() + 40
    while time.time() < deadline and set(seen) != set(want):
        time.sleep(2)
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{env['metrics_port']}/metrics", timeout=5).read()
        except OSError:
            continue
        for line in text.decode().splitlines():
            name = line.split("{")[0]
            if 'cause="' in line:   # one series per cause
                name += "{" + next(t for t in line.split("{", 1)[1].split("}")[0].split(",") if t.startswith("cause="))
                name += "}"
            if name in want and 'policy="next_gate"' in line:
                seen[name] = float(line.rsplit(" ", 1)[1])
    assert seen == {k: float(v) for k, v in want.items()}, (seen, want)


def test_denied_tenant_gets_clear_error_and_no_prefetch(env, prefetching):
    c, _, _ = prefetching
    ids = [f"evil-{b}" for b in range(len(env["prompts"]))]
    for r in ids:   # refused by the runtime (its fast path) and by the coordinator, each with the reason
        with pytest.raises(AccessDenied, match="tenant 'mallory' is not allowed to use this cluster"):
            c.register_request(r, tenant="mallory")
        with pytest.raises(AccessDenied, match="tenant 'mallory' is not allowed to use this cluster"):
            ray.get(c.coordinator.register_request.remote(r, tenant="mallory"))
    with pytest.raises(AccessDenied, match=r"tenant 'alice' is not allowed tiers \['s3'\]"):
        c.register_request("alice-1", tenant="alice", tiers=["ram", "nvme", "s3"])
    c.register_request("alice-2", tenant="alice", tiers=["ram", "nvme"])   # allowed
    assert set(ids) | {"alice-1"} == c.publisher.denied
    time.sleep(0.3)
    before = ray.get(c.coordinator.stats.remote())
    loads = sum(w["prefetch_loads"] + w["queued_prefetches"] for w in c.stats()["workers"])
    c.publisher.row_requests = ids
    try:
        assert generate(c.model, env["prompts"], 8) == [r[:8] for r in env["ref"]]
    finally:
        c.publisher.flush()
        c.publisher.row_requests = None
    time.sleep(0.3)
    after = ray.get(c.coordinator.stats.remote())
    assert after["batches"] > before["batches"]                 # its routing arrived ...
    assert after["prefetches"]["issued"] == before["prefetches"]["issued"]   # ... and nothing was ordered for it
    assert after["staged"] == before["staged"]
    assert sum(w["prefetch_loads"] + w["queued_prefetches"] for w in c.stats()["workers"]) == loads
    assert set(ids) <= set(after["denied"])
    c.end_requests(ids)


def test_fast_path_orders_the_next_layers_likely_experts_from_their_owners(env, prefetching, monkeypatch):
    """The runtime's own speculation (policies/fast_path.py): one routed layer, and the next two layers' likely
    experts (next-gate at tau 1, each row's top-k + 1 above the threshold: the reference below) ride with that layer's
    compute calls and are loaded by their owner workers, with the coordinator never hearing of it (nothing is
    flushed to it here); the layer's output is still exact."""
    import numpy as np
    from policies.fast_path import likely_experts
    from policies.speculation import NextGateSpeculation, gates_from_dense
    c, _, _ = prefetching
    pub, a = c.publisher, c.model.args
    spec = pub.speculator
    assert spec is not None and spec.source == "next_gate" and spec.depth == 4   # the default speculate_layers
    assert (pub.threshold, pub.fanout) == (0.35, a.top_k + 1)   # a hidden-state source's default order filter
    # the router inputs below are random: next-gate's P rarely reaches the default 0.35, so a lower bar here
    monkeypatch.setattr(pub, "threshold", 0.2)
    # and top-k per row (not the default top-k + 1): the two inputs' orders below must fit the 8-expert caches
    monkeypatch.setattr(pub, "fanout", a.top_k)
    _, dense, experts = load_checkpoint(EMBEDDED)
    gates, _ = gates_from_dense(dense)
    ng = NextGateSpeculation(gates, a.top_k, temperature=1.0)
    x = torch.randn(3, a.hidden_size, generator=torch.Generator().manual_seed(7))
    D = 2      # two layers ahead here: their orders fit the 8-expert caches, so all of them must become resident
    P = ng.probs(ng.logits(x.numpy(), 0, list(range(1, D + 1))))                      # [3, D, E] layers 1..D
    want = sorted((a.moe_layers[d + 1], int(e)) for d in range(D)
                  for e in np.flatnonzero(likely_experts(P[:, d], pub.threshold, pub.fanout)))
    assert len({l for l, _ in want}) == D, "the reference must order something at each distance"
    owner = {(l, e): int(c.experts._owner_np[l][e]) for l, e in want}
    ray.get([h.drop.remote([(a.moe_layers[d], e) for d in range(1, D + 1) for e in range(a.num_experts)])
             for h in c.workers.values()])
    # the orders, not the eviction values, are under test here: the generation's values cleared (keep=[]) and
    # none sent, so the caches evict in LRU order and the orders fit
    monkeypatch.setattr(pub, "values", False)
    c.experts.value_riders.clear()   # values still waiting for a worker the generation's last layers did not call
    pub._ordered.clear()   # and what the generation's last steps ordered (earlier tests leave more or less of it)
    ray.get([h.prefetch.remote([], None, []) for h in c.workers.values()])
    before, every = pub.speculated, pub.every
    c.model.route_rows, c.model.route_pos = torch.arange(3), torch.full((3,), 5)
    ids = torch.arange(a.top_k).repeat(3, 1)
    w = torch.ones(3, a.top_k) / a.top_k
    pub.every = 10 ** 9                                  # keep the batch from the coordinator: only the fast path
    spec.depth = D
    try:
        pub(a.moe_layers[0], ids, w, x)
    finally:
        pub.every, pub._buf, spec.depth = every, [], 4   # the default speculate_layers
    assert pub.speculated - before == len(want)
    riders = c.experts.riders
    assert sorted((wid, (l, e)) for wid, items in riders.items() for l, e, *_ in items) == \
        sorted((owner[k], k) for k in want)
    y = c.experts.moe(a.moe_layers[0], x, ids, w)       # the orders go with these calls
    assert c.experts.riders == {}
    ref = LocalExperts(experts).moe(a.moe_layers[0], x, ids, w)
    assert torch.allclose(y, ref, atol=1e-5), (y - ref).abs().max()
    deadline = time.time() + 20
    while True:
        res = {wid: set(map(tuple, ray.get(h.resident.remote()))) for wid, h in c.workers.items()}
        if all(k in res[owner[k]] for k in want) or time.time() > deadline:
            break
        time.sleep(0.05)
    assert all(k in res[owner[k]] for k in want), (want, res)
    # the same layer again from another router input: what the new prediction no longer wants is cancelled, riding
    # the same way (a nearer prediction supersedes a farther one; here the distances are equal, the rule the same)
    x2 = torch.randn(3, a.hidden_size, generator=torch.Generator().manual_seed(8))
    P2 = ng.probs(ng.logits(x2.numpy(), 0, list(range(1, D + 1))))
    want2 = {(a.moe_layers[d + 1], int(e)) for d in range(D)
             for e in np.flatnonzero(likely_experts(P2[:, d], pub.threshold, pub.fanout))}
    gone = sorted(set(want) - want2)
    assert gone, "the two inputs must differ in what they predict for the test to mean anything"
    sup, spec.depth, pub.every = pub.superseded, D, 10 ** 9
    try:
        pub(a.moe_layers[0], ids, w, x2)
    finally:
        pub.every, pub._buf, spec.depth = every, [], 4   # the default speculate_layers
    assert pub.superseded - sup == len(gone)
    assert sorted((wid, k) for wid, ks in c.experts.cancel_riders.items() for k in ks) == \
        sorted((int(c.experts._owner_np[l][e]), (l, e)) for l, e in gone)
    c.experts.moe(a.moe_layers[0], x2, ids, w)
    assert c.experts.cancel_riders == {} and c.experts.riders == {}
    # then layer 1 routes: what the fast path ordered for it and no row selected was a misprediction. It rides
    # with layer 1's compute calls as a cancel, and each owner marks those it loaded stale (first to evict); an
    # owner layer 1 does not call keeps them waiting for a later call rather than get a Ray call of their own
    l1 = a.moe_layers[1]
    ordered = np.flatnonzero(pub._ordered[1]).tolist()
    assert len(ordered) >= 2, ordered
    sel = [ordered[0]] + [e for e in range(a.num_experts) if e not in ordered][:a.top_k - 1]
    wrong = sorted(set(ordered) - set(sel))
    own1 = c.experts._owner_np[l1]
    deadline = time.time() + 20
    while True:   # every layer-1 order resident at its owner (loaded after the previous calls)
        res = {wid: set(map(tuple, ray.get(h.resident.remote()))) for wid, h in c.workers.items()}
        if all((l1, e) in res[int(own1[e])] for e in ordered) or time.time() > deadline:
            break
        time.sleep(0.05)
    assert all((l1, e) in res[int(own1[e])] for e in ordered), (ordered, res)
    marked0 = {wid: ray.get(h.stats.remote())["stale_marked"] for wid, h in c.workers.items()}
    ref0, ids1 = pub.refuted, torch.tensor(sel).repeat(3, 1)
    # a refutation still waiting for its worker is dropped when the expert is ordered again (layer 2 below: the
    # same router input predicts the same experts there): a late mark must not cancel the newer order
    l2 = a.moe_layers[2]
    again = min(e for l, e in want2 if l == l2)
    c.experts.stale_riders.setdefault(int(c.experts._owner_np[l2][again]), {})[(l2, again)] = None
    spec.depth, pub.every = D, 10 ** 9
    try:
        pub(l1, ids1, w, x2)
    finally:
        pub.every, pub._buf, spec.depth = every, [], 4   # the default speculate_layers
    assert pub.refuted - ref0 == len(wrong)
    assert sorted((wid, k) for wid, ks in c.experts.stale_riders.items() for k in ks) == \
        sorted((int(own1[e]), (l1, e)) for e in wrong)
    # next-gate's layer-2 prediction from x2 is the one made at layer 0: nothing superseded, so the only marks
    # below are the refutations
    assert c.experts.cancel_riders == {}
    # a worker layer 1 calls gets them with its compute call; one it does not call, with the prefetch call its
    # new orders need anyway; one that gets neither keeps them for later
    called = {int(own1[e]) for e in sel} | set(c.experts.riders)
    y1 = c.experts.moe(l1, x2, ids1, w)
    ref1 = LocalExperts(experts).moe(l1, x2, ids1, w)
    assert torch.allclose(y1, ref1, atol=1e-5), (y1 - ref1).abs().max()
    assert sorted((wid, k) for wid, ks in c.experts.stale_riders.items() for k in ks) == \
        sorted((int(own1[e]), (l1, e)) for e in wrong if int(own1[e]) not in called)
    expect = {wid: sum(int(own1[e]) == wid for e in wrong) if wid in called else 0 for wid in c.workers}
    deadline = time.time() + 20   # a prefetch call is not waited for
    while True:
        marked = {wid: ray.get(h.stats.remote())["stale_marked"] - marked0[wid] for wid, h in c.workers.items()}
        if marked == expect or time.time() > deadline:
            break
        time.sleep(0.05)
    assert marked == expect
    c.experts.stale_riders.clear()


@pytest.mark.parametrize("routing_only", [False, True])
def test_fast_path_follows_the_coordinators_online_fine_tuning(env, routing_only):
    """policy learned: the runtime's copy of the predictor (the fast path's) takes the output layer the coordinator
    fine-tunes online, while generation goes on, and the tokens stay the reference's. A routing-only predictor
    (jobs.train_predictor --routing-only) does the same with no hidden state read or sent to the coordinator."""
    import numpy as np
    from policies.learned import PREDICTOR_FILE, PREDICTOR_META, LearnedPredictor
    man = env["man"]
    L, E, H = len(man.model.moe_layers), man.model.num_experts, man.model.hidden_size
    R = 0 if routing_only else 8
    H = H if R else 0
    D, U, F = 2, 16, 2 * R + 2 * E
    rng = np.random.default_rng(0)
    w = {"mean": np.zeros(H), "proj": rng.normal(size=(H, R)) * 0.1, "w1": rng.normal(size=(L, D, F, U)) * 0.3,
         "b1": np.zeros((L, D, U)), "w2": rng.normal(size=(L, D, U, E)) * 0.3, "b2": np.zeros((L, D, E))}
    LearnedPredictor({k: v.astype(np.float32) for k, v in w.items()}, 2).save(env["store"])   # top-2 model
    try:
        with ExpertCluster(cfg(env, "learned", "coord-learned", publish_every_layers=1)) as c:
            pub = c.publisher
            assert pub.speculator.source == "learned" and pub.speculator.depth == D
            assert pub.hidden is not routing_only and pub.speculator.hidden is not routing_only
            start = pub.speculator.w["w2"].copy()
            pub.sync_every = 4
            assert c.generate(env["prompts"], NEW) == env["ref"]
            # the last step's state was absorbed in the wait for its layer's replies (nothing else absorbs it)
            assert pub.speculator._pending is None and pub.speculator.hist.any()
            updates, w2, _ = ray.get(c.coordinator.learned_head.remote())
            assert pub.head_updates > 0 and updates >= pub.head_updates, (pub.head_updates, updates)
            assert not np.array_equal(pub.speculator.w["w2"], start), "the copy took the fine-tuned head"
            assert not np.array_equal(w2, start)
    finally:
        for f in (PREDICTOR_FILE, PREDICTOR_META):
            os.remove(os.path.join(env["store"], f))


def test_coordinator_killed_mid_generation_changes_nothing_and_restarts(env, prefetching):
    c, _, _ = prefetching
    pub = c.model.on_route
    calls = {"n": 0}

    def hook(*a):
        calls["n"] += 1
        if calls["n"] == 20:
            ray.kill(c.coordinator, no_restart=False)   # a crash: Ray restarts it (max_restarts)
        pub(*a)

    c.model.on_route = hook
    try:
        assert c.generate(env["prompts"], NEW) == env["ref"]
    finally:
        c.model.on_route = pub
    deadline = time.time() + 60
    st = c.coordinator_stats(timeout_s=5)
    while ("error" in st or not st.get("restarted")) and time.time() < deadline:
        time.sleep(0.5)
        st = c.coordinator_stats(timeout_s=5)
    assert st.get("restarted") is True, st
    before = st["batches"]
    assert c.generate(env["prompts"], NEW) == env["ref"]
    time.sleep(0.3)
    after = c.coordinator_stats()
    assert after["batches"] > before and after["prefetches"]["issued"] > 0   # it resumed prefetching


def test_warm_cluster_stops_publishing_routing(env):
    """Every expert fits its owner's cache: once each has computed once nothing can miss, so the runtime stops
    sending routing to the coordinator (the overhead of prediction with nothing to predict), tokens unchanged.
    With the 25% cache of the other tests it never goes quiet."""
    man = env["man"]
    raw = cfg(env, "next_gate", "coord-warm").model_dump()
    raw["workers"]["hbm_budget_bytes"] = 64 * man.expert_bytes   # each worker could hold every expert
    with ExpertCluster(ClusterConfig.model_validate(raw)) as c:
        assert c.experts.fits_all and not c.experts.warm
        out = c.generate(env["prompts"], NEW)
        assert out == env["ref"]
        if not c.experts.warm:   # the prompts may not touch every expert: the rest compute here
            for layer in c.model.args.moe_layers:
                ids = torch.arange(man.model.num_experts).reshape(-1, 1)
                c.experts.moe(layer, torch.zeros(len(ids), man.model.hidden_size), ids, torch.ones(len(ids), 1))
        assert c.experts.warm
        sent = c.publisher.sent
        misses = c.stats()["misses"]
        assert c.generate(env["prompts"], NEW) == env["ref"]
        assert c.publisher.sent <= sent + 1, "a warm runtime publishes counters at most every 256 layers"
        assert c.stats()["misses"] == misses, "warm means nothing misses"
        # nothing is ever evicted here: the fast path sends no eviction values (they would only cost the loop)
        assert c.experts.value_riders == {} and all(w["eviction_values"] == 0 for w in c.stats()["workers"])
    with ExpertCluster(cfg(env, "next_gate", "coord-cold")) as c:
        assert not c.experts.fits_all
        c.generate(env["prompts"], 4)
        assert not c.experts.warm and c.publisher.sent > 0


def test_a_lagging_coordinator_gets_fewer_larger_calls_and_loses_no_routing(env):
    """RouteOutbox over real Ray calls to an actor that takes 50 ms per batch: at most `inflight` calls are ever
    running at once, the layers flushed meanwhile arrive together, every one exactly once."""
    import asyncio

    import numpy as np

    from cluster.expert_cluster import RouteOutbox

    @ray.remote(num_cpus=0)
    class Slow:
        def __init__(self):
            self.got, self.running, self.most = [], 0, 0

        async def publish(self, batch):
            self.running += 1
            self.most = max(self.most, self.running)
            await asyncio.sleep(0.05)
            self.got.extend((ev["layer"], [batch["requests"][r] for r in ev["rows"].tolist()])
                            for ev in batch["layers"])
            self.running -= 1

        async def seen(self):
            return self.got, self.most

    a = Slow.remote()
    box = RouteOutbox(lambda table, layers: a.publish.remote({"requests": table, "layers": layers}), inflight=2)
    want = []
    for l in range(40):
        table = [f"r{(l // 8 + i) % 5}" for i in range(3)]   # rows reassigned every 8 layers
        box.put(table, [{"layer": l, "rows": np.array([0, 2])}])
        want.append((l, [table[0], table[2]]))
        time.sleep(0.005)
    while box.outstanding:
        time.sleep(0.01)
    box.put([], [], force=True)
    while box.outstanding:
        time.sleep(0.01)
    got, most = ray.get(a.seen.remote())
    # Ray may start the two outstanding calls in either order: each layer once, naming its rows' requests
    assert sorted(got, key=lambda g: g[0]) == want and len(got) == 40 and most <= 2, (got[:5], most)
    assert box.sent < 20 and box.sent + box.coalesced == 40 and box.dropped == 0, (box.sent, box.coalesced)
    ray.kill(a)


def test_the_coordinators_orders_ride_with_the_compute_calls_and_get_used(env, on_demand):
    """prefetch.orders_ride (the default): a policy without the runtime's fast path (cross_layer), so every prefetch
    a worker makes is the coordinator's. Its orders come back in the publish replies and go with the runtime's
    compute calls, and the workers load them; the tokens are the reference's. (Its orders are few and rarely hit
    here: cross_layer predicts this model poorly.)"""
    with ExpertCluster(cfg(env, "cross_layer", "coord-ride")) as c:
        assert c.publisher.speculator is None
        assert c.generate(env["prompts"], NEW) == env["ref"]
        st = c.stats()
    p = st["prefetch"]
    assert p["coordinator_orders_ridden"] > 0 and p["fast_path"] is None
    assert sum(w["prefetch_loads"] for w in st["workers"]) > 0, [w["prefetch_loads"] for w in st["workers"]]
    assert p["dropped"] == 0
