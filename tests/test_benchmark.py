"""`python -m jobs.benchmark policies` on a tiny trace, end to end through the real cluster (one Ray instance for
the module, started and stopped by the benchmark itself): its counts against references computed from the trace
alone — the LRU replay of policies/replay.py for the workers' caches, the number of expert uses, bytes = loads x
blob size — and the simulator's prediction of the same run sitting beside the measurement."""
import json

import numpy as np
import pytest

from jobs.benchmark import (cut_trace, fast_path_source, main, predictor_from_trace, prior_from_trace,
                            routing_only_predictor)
from policies.hbm_cache import CacheIndex
from policies.replay import access_sequence, cache_hit_rate
from policies.reuse import MixedReuse, TransitionReuse, load_routing_prior, transition_counts
from policies.traces import synthetic_trace

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    # top-1: replay order is exact. 5 requests: the run replays the first 3, and its reuse values' long-memory table
    # starts from the transitions of the other 2 (--routing-prior-from-trace)
    tr = synthetic_trace(120, 3, 8, 1, correlation=0.8, num_requests=5, seed=17)
    path = str(d / "tiny.npz")
    tr.save_npz(path)
    out = str(d / "out.json")
    assert main(["policies", "--trace", path, "--expert-mib", "0.03", "--policies",
                 "on_demand,oracle,resident,cross_layer,on_demand+reuse,on_demand+reuse_fast,fast_path",
                 "--workers", "1", "--batch", "1", "--routing-prior-from-trace",
                 "--requests", "3", "--tokens", "72", "--work", str(d / "work"), "--json", out]) == 0
    with open(out) as f:
        # the benchmark replays the first 3 requests, at most 72 // 3 rows each: the references use that piece
        return cut_trace(tr, None, 72, 3), json.load(f), d, tr


def test_on_demand_matches_the_lru_replay(run):
    tr, res, *_ = run
    m = res["policies"]["on_demand"]
    ref = cache_hit_rate(tr, 0.25, "lru")
    assert m["uses"] == ref.accesses == len(access_sequence(tr))
    assert m["hits"] == ref.hits, "one worker, batch 1, top-1: the worker's LRU cache is the replay's"
    assert m["loads"] == m["misses"] == ref.accesses - ref.hits
    # no prefetching: a miss is an expert's first use, or a use after LRU evicted it
    first = len(np.unique(access_sequence(tr)))
    assert sum(m["miss_causes"].values()) == m["misses"]
    assert (m["miss_causes"]["not_ordered"], m["miss_causes"]["evicted"]) == (first, m["misses"] - first)
    assert m["bytes_moved"] == m["loads"] * res["expert_bytes"]
    assert m["tokens"] == tr.num_tokens


@pytest.mark.parametrize("policy", ["on_demand+reuse", "on_demand+reuse_fast"])
def test_reuse_values_match_a_replay_that_evicts_by_them(run, policy):
    """NAME+reuse: the runtime's reuse values ride to the worker and its cache evicts the lowest first. One worker,
    batch 1, top-1: the run's hits are those of a replay of the same sequence through a CacheIndex whose values come
    from the same estimator fed the same routing, each layer's values applied at the next call (the hook computes
    them while the layer's own call is in flight). on_demand+reuse: MixedReuse, its long-memory table warm-started
    from the transitions of the 2 requests the run does not replay; +reuse_fast: TransitionReuse alone. Plain
    on_demand sends none."""
    tr, res, _, full = run
    pol = res["policies"]
    m, base = pol[policy], pol["on_demand"]
    assert m["reuse_values"] is True and base["reuse_values"] is False
    L, E = tr.num_layers, tr.num_experts
    cap = max(1, int(round(0.25 * L * E)))

    def replay(reuse) -> int:
        idx, hits = CacheIndex(budget=cap), 0
        pending = None   # the values of the layer before: computed while its call was in flight (deferred)
        for r in range(tr.num_requests):
            for t, row in enumerate(range(tr.offsets[r], tr.offsets[r + 1])):
                for l in range(L):
                    e = int(tr.experts[row, l, 0])
                    if e < 0:
                        continue
                    if pending is not None:                              # they ride with the next compute call,
                        idx.update_hints(pending)                        # applied before it computes
                    v = reuse.observe(l, [0], [[e]], pos=[t]).astype(np.float32)   # float32 on the wire
                    pending = {(l, x): float(v[x]) for x in range(E)}
                    if idx.access((l, e)):
                        hits += 1
                    else:
                        idx.insert((l, e), 1)
        return hits

    if policy == "on_demand+reuse":
        o = full.offsets
        prior = transition_counts(full.experts[o[3]:], o[3:] - o[3], E)
        assert prior.sum() > 0 and res["routing_prior"]["requests"] == 2
        assert np.array_equal(load_routing_prior(res["planner"]["routing_prior"], L, E, tr.top_k)[0], prior)
        reuse = MixedReuse(L, E, tr.top_k, prior=prior)
        assert len(m["reuse_weight_memory"]) == L
        # the prior is what makes these hits: without it, or without the long-memory table, they differ
        others = {replay(MixedReuse(L, E, tr.top_k)), replay(TransitionReuse(L, E, tr.top_k))}
    else:
        reuse = TransitionReuse(L, E, tr.top_k)
        assert "reuse_weight_memory" not in m
        others = set()
    hits = replay(reuse)
    assert m["uses"] == base["uses"] and m["hits"] == hits, (m["hits"], hits, base["hits"])
    assert hits != base["hits"], "the trace should tell value eviction from LRU apart"
    assert hits not in others, "the trace should tell the estimators apart"
    # the simulator sends the same values with the same timing (SimConfig.reuse_values): the same hits again
    assert res["simulated"]["policies"][policy]["hit_rate"] == pytest.approx(hits / m["uses"])
    if policy == "on_demand+reuse":
        assert reuse.weight_slow.round(4).tolist() == m["reuse_weight_memory"]


def test_prior_from_trace_needs_requests_the_run_does_not_replay(tmp_path):
    tr = synthetic_trace(60, 3, 8, 1, num_requests=3, seed=2)
    with pytest.raises(ValueError, match="has 3 requests and the replay uses all of them"):
        prior_from_trace(tr, cut_trace(tr, None, 60, 3), str(tmp_path))
    path, meta = prior_from_trace(tr, cut_trace(tr, 2, 60, 2), str(tmp_path))   # requests 0-1, first 2 layers
    o = tr.offsets
    counts = load_routing_prior(path, 2, 8, 1)[0]
    assert np.array_equal(counts, transition_counts(tr.experts[o[2]:, :2], o[2:] - o[2], 8))
    assert meta["requests"] == 1 and meta["rows"] == o[3] - o[2]


def test_predictor_from_trace_trains_on_the_requests_the_run_does_not_replay(tmp_path):
    """--predictor-from-trace: a routing-only learned predictor trained on the requests after the replayed ones,
    over the replayed layers (the weights are those of training on exactly that piece), reused when asked again
    alike; the fast path of a routing-only replay then reads it instead of the transition counts."""
    from argparse import Namespace

    from jobs.train_predictor import cut, train
    from policies.learned import LearnedPredictor
    tr = synthetic_trace(240, 3, 8, 2, correlation=0.9, num_requests=6, seed=5)
    with pytest.raises(ValueError, match="has 6 requests and the replay uses all of them"):
        predictor_from_trace(tr, cut_trace(tr, None, 240, 6), str(tmp_path))
    replayed = cut_trace(tr, 2, 80, 2)                                # requests 0-1, first 2 layers
    d = predictor_from_trace(tr, replayed, str(tmp_path), horizon=1)
    p = LearnedPredictor.load(d, finetune=False)
    assert (p.L, p.E, p.K, p.D, p.H) == (2, 8, 2, 1, 0)
    assert "requests 2..5" in p.meta["training"]["source"]
    ref = train(cut(tr, 2, 2), horizon=1, routing_only=True)
    for k, v in ref.items():
        np.testing.assert_array_equal(p.w[k], v, err_msg=k)
    stamp = (tmp_path / d.split("/")[-1] / "predictor.safetensors").stat().st_mtime_ns
    assert predictor_from_trace(tr, replayed, str(tmp_path), horizon=1) == d
    assert (tmp_path / d.split("/")[-1] / "predictor.safetensors").stat().st_mtime_ns == stamp   # not trained again
    # other routing after the replayed requests (the file rewritten): trained again, into another directory
    other = synthetic_trace(240, 3, 8, 2, correlation=0.9, num_requests=6, seed=5)
    other.experts[tr.offsets[2]:] = (other.experts[tr.offsets[2]:] + 1) % 8      # the same cut, other routing after
    assert predictor_from_trace(other, replayed, str(tmp_path), horizon=1) != d
    # an unreadable cached json: trained again, not an error
    (tmp_path / d.split("/")[-1] / "predictor.json").write_text("{cut short")
    assert predictor_from_trace(tr, replayed, str(tmp_path), horizon=1) == d
    assert LearnedPredictor.load(d).meta["training"]["horizon"] == 1
    # a replayed request with no known routing in the kept layers drops out of the cut, but is not trained on
    holes = synthetic_trace(240, 3, 8, 2, correlation=0.9, num_requests=6, seed=5)
    holes.experts[:holes.offsets[1], :2] = -1
    piece = cut_trace(holes, 2, 80, 2)
    assert piece.num_requests == 1
    p = LearnedPredictor.load(predictor_from_trace(holes, piece, str(tmp_path), horizon=1), finetune=False)
    assert "requests 2..5" in p.meta["training"]["source"]
    # the same routing read as another geometry (more experts) is another predictor
    wide = synthetic_trace(240, 3, 8, 2, correlation=0.9, num_requests=6, seed=5)
    wide.num_experts = 16
    assert LearnedPredictor.load(predictor_from_trace(wide, replayed, str(tmp_path), horizon=1)).E == 16
    a = Namespace(predictor_dir=d, model_dir=None)
    assert routing_only_predictor(a) and fast_path_source(replayed, a) == "learned"
    assert fast_path_source(replayed, Namespace(predictor_dir=None, model_dir=None)) == "transition"


def test_resident_oracle_and_coordinator(run):
    tr, res, *_ = run
    pol = res["policies"]
    assert pol["resident"]["hit_rate"] == 1.0 and pol["resident"]["loads"] == 0
    o = pol["oracle"]
    assert o["hits"] + o["misses"] == o["uses"] == pol["on_demand"]["uses"]
    assert o["prefetch_loads"] > 0 and o["prefetch_hits"] > 0
    assert o["bytes_moved"] == o["loads"] * res["expert_bytes"]
    c = pol["cross_layer"]
    assert "error" not in c, c.get("error")
    assert c["uses"] == pol["on_demand"]["uses"]
    assert c["coordinator"] and c["coordinator"]["steps"] > 0, "routing reached the PrefetchCoordinator"
    # a routing-only trace: the workers see random activations, so the hidden-state fast path is off
    assert res["planner"]["speculate_layers"] == 0 and c["fast_path_orders"] == 0
    # fast_path: the runtime's fast path alone (routing only here: its transition source), no coordinator
    f = pol["fast_path"]
    assert "error" not in f, f.get("error")
    assert f["uses"] == pol["on_demand"]["uses"] and f["coordinator"] is None
    assert f["fast_path_orders"] > 0 and f["prefetch_loads"] > 0 and f["reuse_values"] is True
    assert len(f["reuse_weight_memory"]) == tr.num_layers   # its reuse values mixed the long-memory table in
    assert "unavailable" in res["simulated"]["policies"]["fast_path"]
    for p, m in pol.items():
        assert m["speedup"] == pytest.approx(m["tokens_per_s"] / pol["on_demand"]["tokens_per_s"])


def test_calibration_and_simulated_prediction(run):
    tr, res, d, _ = run
    cal = res["calibration"]
    assert cal["load_s_per_expert"] > 0 and cal["expert_s"] > 0 and cal["expert_bytes"] == res["expert_bytes"]
    sim = res["simulated"]["policies"]
    # the simulator replays the same trace with the same cache: on_demand's hit rate is the same number
    assert sim["on_demand"]["hit_rate"] == pytest.approx(res["policies"]["on_demand"]["hit_rate"])
    assert set(res["simulated"]["ratio_sim_over_measured"]) >= {"on_demand", "oracle"}
    assert (d / "out.png").stat().st_size > 0


def test_cut_trace_keeps_requests_and_layers():
    tr = synthetic_trace(100, 4, 8, 2, num_requests=5, seed=1)
    c = cut_trace(tr, 2, 40, 4)
    assert (c.num_layers, c.num_requests) == (2, 4)
    lens = np.diff(c.offsets)
    assert (lens <= 10).all()
    for r in range(4):
        a = tr.offsets[r]
        assert np.array_equal(c.experts[c.offsets[r]:c.offsets[r + 1]], tr.experts[a:a + lens[r], :2])


def test_bench_load_cpu_finds_the_cost_of_a_load_in_the_right_processes(tmp_path):
    """jobs.bench_load_cpu on the embedded model: every expert is loaded into the workers' caches each round, and
    the CPU it reports for a load sits in the StorageActor and the workers (found by pid), on top of Ray's floor."""
    from jobs.bench_load_cpu import main as load_cpu
    out = str(tmp_path / "cpu.json")
    assert load_cpu(["--calls", "100", "--rounds", "2", "--work", str(tmp_path / "work"), "--json", out]) == 0
    with open(out) as f:
        r = json.load(f)
    assert r["experts"] == 64 and r["expert_bytes"] > 0
    assert r["ping"]["storage_cpu_ms"] > 0 and r["get_tiered"]["storage_cpu_ms"] > 0
    loads = r["worker_loads"]
    assert len(loads["rounds"]) == 2
    assert loads["storage_cpu_ms"] > 0 and loads["workers_cpu_ms"] > 0
    assert loads["total_cpu_ms"] == pytest.approx(sum(loads[k] for k in ("driver_cpu_ms", "storage_cpu_ms",
                                                                          "workers_cpu_ms")))
