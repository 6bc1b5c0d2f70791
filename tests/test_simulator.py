"""The discrete-event simulator (policies/simulator.py) against independent references: the LRU replay of
policies/replay.py, counts taken straight from the trace, byte conservation, the oracle as an upper bound, and
determinism for a seed. No Ray."""
from dataclasses import replace

import numpy as np
import pytest

from policies import profiles as P
from policies.registry import make_predictor
from policies.replay import access_sequence, cache_hit_rate
from policies.simulator import SimConfig, Simulator, add_relative
from policies.traces import synthetic_trace

HW = P.hardware("rtx3090")
NVME = P.storage("nvme-gen4")


def _model(tr, inter=512):
    return P.Model("t", tr.num_layers, tr.num_experts, tr.top_k, 512, inter, 2.0)


def _run(tr, policy, cfg=SimConfig(), hw=HW, store=NVME, model=None):
    pred = make_predictor(policy, num_layers=tr.num_layers, num_experts=tr.num_experts, top_k=tr.top_k,
                          trace=tr if policy == "oracle" else None)
    sim = Simulator(hw, model or _model(tr), store, cfg, tr, pred)
    return sim, sim.run()


def _strip(m):
    m = dict(m)
    m["planner"] = {k: v for k, v in m["planner"].items() if not k.startswith("wall")}
    return m


def test_deterministic_for_a_seed():
    tr = synthetic_trace(300, 4, 16, 2, correlation=0.7, num_requests=6, seed=3)
    cfg = SimConfig(batch=3)
    a = _run(tr, "cross_layer", cfg)[1]
    b = _run(tr, "cross_layer", cfg)[1]
    assert _strip(a) == _strip(b)
    c = _run(synthetic_trace(300, 4, 16, 2, correlation=0.7, num_requests=6, seed=4), "cross_layer", cfg)[1]
    assert _strip(a) != _strip(c), "a different routing must give a different run"


@pytest.mark.parametrize("top_k", [1, 2])
def test_on_demand_hit_rate_equals_lru_replay(top_k):
    """Batch 1, one worker, on_demand: the cache sees the trace's accesses in routing order, as the replay's LRU.
    Top-1: identical. Top-2: the simulator pins a layer's experts while it computes (a layer's second expert cannot
    evict its first, which the sequential replay allows), so it may only hit slightly more."""
    tr = synthetic_trace(600, 6, 16, top_k, correlation=0.6, num_requests=8, seed=1)
    for frac in (0.25, 0.5):
        ref = cache_hit_rate(tr, frac, "lru")
        _, m = _run(tr, "on_demand", SimConfig(cache_fraction=frac, eviction="lru"))
        assert m["uses"] == ref.accesses == len(access_sequence(tr))
        if top_k == 1:
            assert m["hits"] == ref.hits, (m["hits"], ref.hits)
        else:
            assert ref.hits <= m["hits"] <= ref.hits + 0.02 * ref.accesses, (m["hits"], ref.hits)


def test_reuse_values_evict_as_a_replay_that_applies_them_one_layer_later():
    """SimConfig.reuse_values: the runtime's TransitionReuse values of each routed layer reach the cache with the next
    layer's call (the hook computes them while the layer's own call is in flight) and it evicts the lowest first.
    Batch 1, one worker, top-1, on_demand: the hits are exactly those of a CacheIndex replay doing the same, and
    differ from LRU's."""
    from policies.hbm_cache import CacheIndex
    from policies.reuse import TransitionReuse
    tr = synthetic_trace(600, 6, 16, 1, correlation=0.6, num_requests=8, seed=1)
    L, E = tr.num_layers, tr.num_experts
    idx, reuse, hits, pending = CacheIndex(budget=int(0.25 * L * E)), TransitionReuse(L, E, 1), 0, None
    for r in range(tr.num_requests):
        for t, row in enumerate(range(tr.offsets[r], tr.offsets[r + 1])):
            for l in range(L):
                e = int(tr.experts[row, l, 0])
                if pending is not None:
                    idx.update_hints(pending)
                v = reuse.observe(l, [0], [[e]], pos=[t]).astype(np.float32)
                pending = {(l, x): float(v[x]) for x in range(E)}
                if idx.access((l, e)):
                    hits += 1
                else:
                    idx.insert((l, e), 1)
    _, m = _run(tr, "on_demand", SimConfig(cache_fraction=0.25, eviction="lru", reuse_values=True))
    assert m["hits"] == hits, (m["hits"], hits)
    assert hits != cache_hit_rate(tr, 0.25, "lru").hits, "the trace should tell value eviction from LRU apart"


def test_on_demand_same_with_prefetch_aware_eviction():
    """With no prefetched entries the prefetch-aware order is LRU: the default policy must match lru exactly."""
    tr = synthetic_trace(500, 4, 16, 1, correlation=0.5, num_requests=5, seed=2)
    a = _run(tr, "on_demand", SimConfig(eviction="lru"))[1]
    b = _run(tr, "on_demand", SimConfig(eviction="prefetch_aware"))[1]
    assert (a["hits"], a["virtual_s"]) == (b["hits"], b["virtual_s"])


def test_conservation_of_uses_and_bytes():
    tr = synthetic_trace(200, 4, 16, 2, correlation=0.8, num_requests=8, unknown_fraction=0.05, seed=5)
    model = _model(tr)
    for policy in ("on_demand", "cross_layer", "oracle"):
        for dram in (1.0, 0.5):
            cfg = SimConfig(batch=4, workers=2, dram_fraction=dram)
            sim, m = _run(tr, policy, cfg, model=model)
            assert m["hits"] + m["misses"] == m["uses"]
            # uses: distinct experts per (batch step, layer), counted from the trace itself
            assert m["tokens"] == tr.num_tokens
            # bytes moved into HBM == loads x expert size; every load is a demand load or a landed/dropped prefetch
            eb = model.expert_bytes
            assert m["bytes_per_link"]["h2d"] == m["hbm_loads"] * eb
            assert m["hbm_loads"] == m["demand_loads"] + m["prefetch_issued"]
            assert m["prefetch_done"] + m["prefetch_dropped"] <= m["prefetch_issued"]
            assert m["bytes_per_link"]["storage"] % eb == 0
            if dram == 1.0:
                assert m["bytes_per_link"]["storage"] == 0, "everything sits in DRAM: no storage reads"
            # every cache stays within its budget
            assert all(c.used <= c.budget for c in sim.caches)
            assert m["memory_mb_peak"] <= m["hbm_budget_mb"] + 1e-9


def test_uses_match_distinct_experts_of_each_step():
    tr = synthetic_trace(240, 3, 8, 2, correlation=0.5, num_requests=4, seed=6)   # 4 requests of 60 rows
    B = 4
    _, m = _run(tr, "on_demand", SimConfig(batch=B))
    # independent count: the 4 requests run in lock step (equal-length requests are not guaranteed: recount)
    offs = tr.offsets
    lens = np.diff(offs)
    uses = 0
    for t in range(lens.max()):
        live = [r for r in range(tr.num_requests) if t < lens[r]]
        for l in range(tr.num_layers):
            uses += len(np.unique(np.concatenate([tr.experts[offs[r] + t, l] for r in live])))
    if tr.num_requests <= B:
        assert m["uses"] == uses


def test_oracle_is_an_upper_bound_and_prefetching_helps():
    tr = synthetic_trace(360, 6, 16, 2, correlation=0.9, num_requests=6, seed=7)
    cfg = SimConfig(batch=2, confirm_prob=0.2)
    res = {p: _run(tr, p, cfg)[1] for p in ("on_demand", "oracle", "cross_layer", "previous_token",
                                             "topk_frequency")}
    add_relative(res)
    for p, m in res.items():
        assert m["tokens_per_s"] <= res["oracle"]["tokens_per_s"] * (1 + 1e-9), p
        assert m["fraction_of_oracle"] <= 1 + 1e-9
    assert res["oracle"]["speedup"] > 1.05
    assert res["oracle"]["prefetch_precision"] == pytest.approx(1.0)
    assert res["cross_layer"]["hit_rate"] > res["on_demand"]["hit_rate"], "a 0.9-correlated trace is predictable"


def test_workers_nodes_and_links():
    tr = synthetic_trace(200, 4, 32, 2, correlation=0.5, num_requests=8, seed=8)
    hw = replace(HW, gpus_per_node=2)
    _, one = _run(tr, "on_demand", SimConfig(batch=4, workers=1), hw=hw)
    _, four = _run(tr, "on_demand", SimConfig(batch=4, workers=4), hw=hw)
    assert one["bytes_per_link"]["net_activations"] == 0
    assert four["bytes_per_link"]["net_activations"] > 0, "workers on node 1 receive activations over the network"
    assert four["hbm_budget_mb"] == pytest.approx(one["hbm_budget_mb"], rel=1e-6), "same total cache"
    assert four["tokens_per_s"] > one["tokens_per_s"], "four host links load in parallel"


def test_rejects_mismatched_geometry():
    tr = synthetic_trace(50, 4, 16, 2, seed=0)
    pred = make_predictor("on_demand", num_layers=4, num_experts=16, top_k=2)
    with pytest.raises(ValueError, match="model m is L=5"):
        Simulator(HW, P.Model("m", 5, 16, 2, 64, 64, 2.0), NVME, SimConfig(), tr, pred)


def test_profiles_geometry():
    assert P.model("mixtral-8x7b").expert_bytes == 3 * 4096 * 14336 * 2
    assert P.model("deepseek-v3").total_experts == 58 * 256
    assert HW.h2d_bw * 0.85e-3 == pytest.approx(28.5e6), "the seed's calibration: 0.85 ms per 28.5 MB expert"
    with pytest.raises(ValueError, match="needs the calibration JSON"):
        P.hardware("local")


# -- the `local` profile of a --tier link run (jobs.benchmark calibrate) -----------------------------------------
LINK = {"latency_s": 0.01, "bandwidth_Bps": 100e6, "channels": 8}


def _link_calib(**kw):
    c = {"load_s_per_expert": 0.03, "expert_bytes": 500_000, "expert_s": 1e-4, "layer_overhead_s": 2e-3,
         "concurrent_loads": 8, "link": dict(LINK), "handoff_s": 4e-3, "load_cpu_s": 0.0}
    c.update(kw)
    return c


def test_local_profile_from_a_link_calibration():
    cal = _link_calib(load_cpu_s=1e-3)
    st = P.local_storage(cal)
    assert (st.first_byte, st.bw_per_channel, st.channels) == (0.01, 100e6, 8), "the emulated link's own model"
    hw = P.local_hardware(cal)
    assert hw.h2d_latency == 4e-3 and hw.h2d_bw >= 1e14, "the h2d hop is the measured hand-off, not a bandwidth"
    assert (hw.h2d_channels, hw.load_cpu_s, hw.expert_s_override) == (8, 1e-3, 1e-4)
    dram = P.local_hardware({k: v for k, v in cal.items() if k not in ("link", "handoff_s")})
    assert dram.h2d_bw == pytest.approx(500_000 / 0.03) and dram.h2d_latency == 0, "--tier dram: unchanged"
    with pytest.raises(ValueError, match="--tier link calibration"):
        P.local_storage({k: v for k, v in cal.items() if k != "link"})


def _cycling_trace(tokens: int, L: int, E: int):
    """Top-1, one request: token t uses expert t % E at every layer (never the same expert twice in a row)."""
    from policies.traces import RoutingTrace
    x = (np.arange(tokens)[:, None, None] % E) * np.ones((1, L, 1), np.int64)    # [T, L, 1]
    return RoutingTrace(x, np.ones(x.shape, np.float32), np.array([0, tokens]), L, E, 1)


def test_on_demand_stall_is_the_link_model_per_miss():
    """A one-expert cache and a trace that never reuses an expert: every use misses, one per layer, and each miss
    waits exactly latency + bytes / bandwidth on the storage link plus the hand-off; nothing else stalls."""
    T, L, E = 24, 3, 8
    tr = _cycling_trace(T, L, E)
    cal = _link_calib()
    model = P.Model("t", L, E, 1, 64, 64, 2.0, blob_bytes=cal["expert_bytes"])
    cfg = SimConfig(batch=1, hbm_bytes_per_worker=cal["expert_bytes"], dram_fraction=0.0, compute_after_loads=True,
                    decision_latency=0.0)
    _, m = _run(tr, "on_demand", cfg, hw=P.local_hardware(cal), store=P.local_storage(cal), model=model)
    per_miss = LINK["latency_s"] + cal["expert_bytes"] / LINK["bandwidth_Bps"] + cal["handoff_s"]   # 19 ms
    assert m["hits"] == 0 and m["demand_loads"] == T * L
    # (the h2d hop's 1e15 B/s adds 0.5 ns per load)
    assert m["stall_s"] == pytest.approx(T * L * per_miss, rel=1e-6)
    assert m["load_ms_per_load"] == pytest.approx(1e3 * per_miss, rel=1e-6)
    assert m["virtual_s"] == pytest.approx(T * L * (per_miss + cal["expert_s"] + cal["layer_overhead_s"]), rel=1e-6)
    assert m["bytes_per_link"]["storage"] == T * L * cal["expert_bytes"], "every load crossed the storage link"


def test_split_link_reads_take_the_idle_channels():
    """The storage link with split_min_bytes (storage_adapters/emulated.py's split reads): a lone miss on an idle
    link runs in parts over the free channels, so it waits latency + bytes / (parts * bandwidth); all channels
    come back. Same trace and cache as above, one miss per layer: every miss finds the link idle."""
    T, L, E = 24, 3, 8
    tr = _cycling_trace(T, L, E)
    cal = _link_calib(link=dict(LINK, split_min_bytes=125_000))          # 500 kB -> 4 parts
    st = P.local_storage(cal)
    assert st.split_min_bytes == 125_000, "local_storage carries the link's split"
    model = P.Model("t", L, E, 1, 64, 64, 2.0, blob_bytes=cal["expert_bytes"])
    cfg = SimConfig(batch=1, hbm_bytes_per_worker=cal["expert_bytes"], dram_fraction=0.0, compute_after_loads=True,
                    decision_latency=0.0)
    sim, m = _run(tr, "on_demand", cfg, hw=P.local_hardware(cal), store=st, model=model)
    per_miss = LINK["latency_s"] + cal["expert_bytes"] / (4 * LINK["bandwidth_Bps"]) + cal["handoff_s"]  # 15.25 ms
    assert m["demand_loads"] == T * L
    assert m["stall_s"] == pytest.approx(T * L * per_miss, rel=1e-6)
    assert all(lk.free == LINK["channels"] for lk in sim.sto), "every channel a split read took is back"


def test_prefetch_slots_and_cpu_cost_of_prefetches():
    """prefetch_concurrency bounds the prefetches in flight per worker (every slot is back at the end); with a
    latency-bound link, more slots hide more; load_cpu_s charges each landed prefetch to the layers, exactly."""
    tr = synthetic_trace(240, 4, 16, 2, correlation=0.9, num_requests=4, seed=5)
    cal = _link_calib()
    hw, st = P.local_hardware(cal), P.local_storage(cal)
    model = P.Model("t", 4, 16, 2, 64, 64, 2.0, blob_bytes=cal["expert_bytes"])
    base = SimConfig(batch=2, cache_fraction=0.5, dram_fraction=0.0, window=3, decision_latency=0.0)
    runs = {}
    for pc in (1, 4):
        sim, runs[pc] = _run(tr, "oracle", replace(base, prefetch_concurrency=pc), hw=hw, store=st, model=model)
        assert all(g.free == pc for g in sim.gates), "every prefetch slot is released when its load lands"
    assert runs[4]["hit_rate"] > runs[1]["hit_rate"], "one slot serializes the 14 ms prefetches: fewer are timely"
    c = 2e-3
    sim, m = _run(tr, "oracle", replace(base, prefetch_concurrency=4), hw=replace(hw, load_cpu_s=c), store=st,
                  model=model)
    landed = sim.c.loads - m["demand_loads"]                 # landed loads that were prefetches
    assert m["cpu_contention_ms_per_token"] * m["tokens"] == pytest.approx(1e3 * c * landed, rel=1e-9)
    assert m["tokens_per_s"] < runs[4]["tokens_per_s"]


def test_coordinator_cpu_is_charged_to_each_layer_that_publishes():
    """coordinator_cpu_s (a CPU-only machine: the coordinator shares the decode loop's cores) costs every layer step
    exactly that much of its critical path, once per decision step (slower layers also give prefetches more lead
    time, so the hit rate may move; the tokens/s must fall)."""
    tr = synthetic_trace(120, 4, 16, 2, correlation=0.9, num_requests=2, seed=3)
    base = SimConfig(batch=2, cache_fraction=0.5, window=2)
    _, m0 = _run(tr, "cross_layer", base)
    c = 1.5e-3
    sim, m1 = _run(tr, "cross_layer", replace(base, coordinator_cpu_s=c))
    assert m1["cpu_contention_ms_per_token"] * m1["tokens"] == pytest.approx(1e3 * c * sim.c.planner_calls, rel=1e-9)
    assert m0["cpu_contention_ms_per_token"] == 0 and m1["tokens_per_s"] < m0["tokens_per_s"]


def test_adaptive_window_is_the_coordinators_controller():
    tr = synthetic_trace(240, 4, 16, 2, correlation=0.8, num_requests=4, seed=2)
    cfg = SimConfig(batch=2, window=2, adapt_every=8, max_window=6)
    sim, m = _run(tr, "cross_layer", cfg)
    assert len(sim.windows) == (sim.c.layer_steps - 1) // 8 + 1, "one adaptation every 8 layer steps, from step 0"
    assert all(1.0 <= w <= 6.0 for w in sim.windows), sim.windows
    assert len(set(sim.windows)) > 1, "the window moved"
    _, fixed = _run(tr, "cross_layer", SimConfig(batch=2, window=2))
    assert fixed["window_final"] == 2.0 and fixed["window_mean"] == 2.0
    assert _strip(_run(tr, "cross_layer", cfg)[1]) == _strip(m), "deterministic"


def test_routing_batches_decide_once_per_batch():
    """publish_every: the runtime sends one routing batch per that many MoE layers and at each token's last, and
    the coordinator decides once per batch on all its events (prefetch.publish_every_layers), so a 6-layer model
    at 4 makes two decisions a token (after layers 3 and 5), and the CPU each costs is charged that often."""
    tr = synthetic_trace(60, 6, 16, 2, correlation=0.9, num_requests=1, seed=4)
    base = SimConfig(batch=1, cache_fraction=0.5, window=3, coordinator_cpu_s=1e-3)
    s1, m1 = _run(tr, "cross_layer", base)
    s4, m4 = _run(tr, "cross_layer", replace(base, publish_every=4))
    assert s1.c.planner_calls == s1.c.layer_steps == 60 * 6
    assert s4.c.planner_calls == 60 * 2, s4.c.planner_calls
    assert m4["cpu_contention_ms_per_token"] == pytest.approx(2 * 1.0, rel=1e-9)   # 2 decisions x 1 ms a token
    assert s4.c.orders > 0 and m4["hit_rate"] > 0
    assert _strip(_run(tr, "cross_layer", replace(base, publish_every=4))[1]) == _strip(m4), "deterministic"


@pytest.mark.parametrize("by,shards", [("request", 1), ("request", 2), ("layer", 2)])
def test_planner_cost_times_the_coordinators_batched_calls(by, shards):
    """jobs.simulate's planner-cost study times what the coordinator runs per layer step: one observe_many of the
    layer's rows and one predict_many of all requests per shard (not a call per request), then one plan; the
    fresh requests it times are ended after. Engines: both planners give a decision."""
    from jobs.simulate import planner_cost
    tr = synthetic_trace(200, 4, 16, 2, correlation=0.7, num_requests=4, seed=1)
    for engine in ("compiled", "numpy"):
        sim, _ = _run(tr, "cross_layer", SimConfig(batch=4, workers=2, planner_engine=engine))
        calls = {"observe_many": 0, "predict_many": 0, "observe": 0, "predict": 0, "plan": 0}
        for name in ("observe_many", "predict_many", "observe", "predict"):
            f = getattr(sim.pred, name)
            setattr(sim.pred, name,
                    lambda *a, _f=f, _n=name, **k: (calls.__setitem__(_n, calls[_n] + 1), _f(*a, **k))[1])
        plan = sim.planner.plan
        sim.planner.plan = lambda *a, **k: (calls.__setitem__("plan", calls["plan"] + 1), plan(*a, **k))[1]
        before = set(sim.pred._reqs)
        res = planner_cost(sim, 4, shards=shards, every=2, reps=6, by=by)
        assert res["call_ms_p50"] > 0 and res["per_layer_ms_p50"] == pytest.approx(res["call_ms_p50"] / 2)
        assert calls["predict_many"] == calls["plan"] and calls["plan"] >= 6, calls
        assert calls["predict"] == 0 and calls["observe"] == 0, f"a call per request: {calls}"
        assert 1 <= calls["observe_many"] <= calls["plan"], calls
        assert set(sim.pred._reqs) == before, "the timed requests were not ended"
        assert sim.planner.cfg.engine == engine
