"""Prefetch ranking (policies/ranking.py), pure: dedup, budgets, in-flight cap, tier order, TierSets and tenants,
never evicting a more valuable expert, DRAM staging, latency budgets, determinism, window adaptation."""
import numpy as np
import pytest

from policies.hbm_cache import CacheIndex
from policies.predictors import Candidates
from policies.ranking import (DRAM, HBM, NVME, PEER, S3, AccessPolicy, ClusterView, PlannerConfig,
                              PrefetchPlanner, RequestView, TenantRule, TierCosts, WindowController)

L, E, W = 4, 8, 2
MB = 1 << 20


def cands(rows):
    """rows: (distance, layer, expert, prob)."""
    a = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return Candidates(a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2].astype(np.int64), a[:, 3])


def view(free=(8 * MB, 8 * MB), dram_free=(64 * MB,), store=(NVME, S3), **kw):
    owner = np.tile(np.arange(E) % W, (L, 1))                 # expert e lives on worker e % 2
    return ClusterView.empty(owner, np.full((L, E), MB), np.array(free), dram_free_bytes=np.array(dram_free),
                             store_tiers=store)


def keys(plan, target=None):
    return [(o.layer, o.expert) for o in plan.orders() if target is None or o.target == target]


def test_dedup_across_requests_and_combined_probability():
    p = PrefetchPlanner(PlannerConfig())
    r1 = RequestView("a", cands([(1, 1, 3, 0.5), (1, 1, 4, 0.2)]))
    r2 = RequestView("b", cands([(1, 1, 3, 0.5), (2, 2, 5, 0.9)]))
    plan = p.plan([r1, r2], view(), window=2)
    assert sorted(keys(plan)) == [(1, 3), (1, 4), (2, 5)]     # (1, 3) once, though both want it
    i = keys(plan).index((1, 3))
    assert plan.prob[i] == pytest.approx(1 - 0.5 * 0.5)       # 1 - prod(1 - p)
    assert plan.orders()[keys(plan).index((2, 5))].request == "b"
    assert all(o.worker == o.expert % W for o in plan.orders())   # issued to the owner


def test_resident_and_inflight_are_skipped_and_window_and_threshold_filter():
    v = view()
    v.present[HBM, 1, 3] = True
    v.inflight[1, 4] = True
    r = RequestView("a", cands([(1, 1, 3, 0.9), (1, 1, 4, 0.9), (1, 1, 5, 0.01), (3, 3, 6, 0.9), (2, 2, 7, 0.6)]))
    plan = PrefetchPlanner(PlannerConfig(threshold=0.05)).plan([r], v, window=2)
    assert keys(plan) == [(2, 7)]     # resident, in flight, below threshold, outside the window: all skipped


def test_worker_budget_never_exceeded_and_global_cap():
    rng = np.random.default_rng(0)
    for trial in range(50):
        free = rng.integers(0, 6, size=W) * MB
        cap = int(rng.integers(0, 10)) * MB
        rows = [(1 + rng.integers(0, 2), rng.integers(0, L), rng.integers(0, E), rng.uniform(0.06, 1))
                for _ in range(30)]
        v = view(free=free, dram_free=(0,))
        v.inflight_bytes = int(rng.integers(0, 3)) * MB
        plan = PrefetchPlanner(PlannerConfig(max_inflight_bytes=cap)).plan([RequestView("r", cands(rows))], v, 3)
        hbm = [o for o in plan.orders() if o.target == "hbm"]
        for w in range(W):
            assert sum(MB for o in hbm if o.worker == w) <= free[w], (trial, w)   # no residents: free bytes only
        assert plan.nbytes.sum() <= max(cap - v.inflight_bytes, 0)
        assert len(set(keys(plan))) == len(plan)


def test_within_a_tier_the_nearest_deadline_goes_first():
    """A far-ahead order worth more must not queue ahead of the next layer's: both would arrive late."""
    r = RequestView("a", cands([(4, 3, 0, 0.95), (1, 0, 2, 0.6), (2, 1, 4, 0.9), (1, 0, 6, 0.7)]))
    plan = PrefetchPlanner().plan([r], view(), 4)
    assert [(o.layer, o.expert) for o in plan.orders()] == [(0, 6), (0, 2), (1, 4), (3, 0)]
    assert list(plan.priority) == sorted(plan.priority, reverse=True)
    assert plan.value[3] > plan.value[0]   # the last one is worth the most, and still waits for its deadline


def test_warm_before_cold_and_priority_follows_issue_order():
    v = view(store=(S3,))
    v.present[DRAM, 0, 0] = True
    v.present[NVME, 0, 2] = True
    v.present[PEER, 0, 4] = True
    r = RequestView("a", cands([(1, 0, 0, 0.3), (1, 0, 2, 0.3), (1, 0, 4, 0.3), (1, 0, 6, 0.9)]))
    plan = PrefetchPlanner().plan([r], v, 2)
    assert [o.source for o in plan.orders()] == ["peer", "dram", "nvme", "s3"]
    assert list(plan.priority) == sorted(plan.priority, reverse=True)
    # the value is P x stall per byte: the colder source is worth more to hide
    assert plan.value[3] > plan.value[2] > plan.value[1]


def test_priority_puts_the_nearer_order_first_however_far_the_window_reaches():
    """A window of tens of layers (Mixtral's 32 layers x a few tokens ahead): a likelier expert one layer farther
    still goes after the nearer one, as the plan issues them."""
    Lw = 64
    v = ClusterView.empty(np.zeros((Lw, E), np.int64), np.full((Lw, E), MB), np.array([1 << 30]),
                          dram_free_bytes=np.array([0]))
    for d in (1, 40, 60):
        r = RequestView("r", cands([(d, 0, 1, 0.06), (d + 1, 1, 2, 0.99)]))
        plan = PrefetchPlanner(PlannerConfig(max_inflight_bytes=1 << 30)).plan([r], v, 64)
        assert list(zip(plan.layer, plan.expert)) == [(0, 1), (1, 2)]
        assert plan.priority[0] > plan.priority[1], (d, plan.priority)


def test_value_capped_by_lead_time():
    costs = TierCosts()
    v = view(store=(S3,))
    r = RequestView("a", cands([(1, 0, 0, 0.5), (4, 3, 0, 0.5)]))
    plan = PrefetchPlanner(PlannerConfig(layer_time_s=1e-3, costs=costs)).plan([r], v, 4)
    by = {(o.layer, o.expert): o.value for o in plan.orders()}
    assert by[(0, 0)] == pytest.approx(0.5 * 1e-3 / MB)        # S3 takes ~32 ms; only 1 ms can be hidden
    assert by[(3, 0)] == pytest.approx(0.5 * 4e-3 / MB)


def test_tierset_is_honoured_and_no_order_reads_outside_it():
    v = view(store=(NVME, S3))
    v.present[DRAM, 0, 1] = True
    r_cold = RequestView("cold", cands([(1, 0, 1, 0.9), (1, 0, 3, 0.9)]), tiers=("s3",))
    plan = PrefetchPlanner().plan([r_cold], v, 2)
    assert {o.source for o in plan.orders()} == {"s3"}        # the DRAM / NVMe copies are outside its TierSet
    assert all(o.target == "hbm" for o in plan.orders())      # never staged into DRAM (not in its TierSet)
    r_none = RequestView("dram-only", cands([(1, 0, 5, 0.9)]), tiers=("dram",))
    assert len(PrefetchPlanner().plan([r_none], v, 2)) == 0   # nowhere allowed holds it: nothing


def test_tenant_denied_gets_clear_error_and_no_orders():
    acc = AccessPolicy({"alice": TenantRule(models=frozenset({"m"}), tiers=frozenset({"dram", "nvme"})),
                        "bob": TenantRule(models=frozenset({"other"}))})
    p = PrefetchPlanner(PlannerConfig(model="m"), access=acc)
    c = cands([(1, 0, 1, 0.9), (1, 0, 3, 0.9)])
    plan = p.plan([RequestView("a1", c, tiers=("dram", "nvme"), tenant="alice"),
                   RequestView("a2", c, tiers=("dram", "nvme", "s3"), tenant="alice"),
                   RequestView("b1", cands([(1, 2, 2, 0.9)]), tenant="bob"),
                   RequestView("m1", cands([(1, 2, 4, 0.9)]), tenant="mallory")], view(), 2)
    assert set(plan.denied) == {"a2", "b1", "m1"}
    assert "tiers ['s3']" in plan.denied["a2"] and "model 'm'" in plan.denied["b1"]
    assert "'mallory' is not allowed" in plan.denied["m1"]
    assert set(plan.request) == {"a1"} and sorted(keys(plan)) == [(0, 1), (0, 3)]


def test_never_displaces_a_more_valuable_resident_and_stages_instead():
    v = view(free=(0, 0))
    v.present[HBM, 0, 0] = True                 # worker 0 holds (0, 0) and (0, 2)
    v.present[HBM, 0, 2] = True
    reqs = [RequestView("a", cands([(1, 0, 0, 0.8),             # resident, valuable
                                    (1, 1, 4, 0.9),             # more valuable than (0, 2) (worth 0): displaces it
                                    (1, 1, 6, 0.7),             # would have to displace (0, 0) (0.8): not allowed
                                    (1, 2, 0, 0.3)]))]          # low probability: staged, not into HBM
    plan = PrefetchPlanner(PlannerConfig(hbm_confirm_prob=0.5)).plan(reqs, v, 2)
    assert keys(plan, "hbm") == [(1, 4)]
    assert sorted(keys(plan, "dram")) == [(1, 6), (2, 0)]


def test_low_probability_never_displaces_even_a_worthless_resident():
    v = view(free=(0, 0))
    v.present[HBM, 0, 2] = True
    r = RequestView("a", cands([(1, 1, 4, 0.3)]))
    plan = PrefetchPlanner(PlannerConfig(hbm_confirm_prob=0.5, stage_to_dram=False)).plan([r], v, 2)
    assert len(plan) == 0
    plan = PrefetchPlanner(PlannerConfig(hbm_confirm_prob=0.25, stage_to_dram=False)).plan([r], v, 2)
    assert keys(plan, "hbm") == [(1, 4)]


def test_dram_staging_respects_node_budget_and_skips_staged():
    v = view(free=(0, 0), dram_free=(2 * MB,))
    v.staging[0, 1] = True
    r = RequestView("a", cands([(1, 0, e, 0.9 - e / 100) for e in range(6)]))
    plan = PrefetchPlanner().plan([r], v, 2)
    assert keys(plan, "dram") == [(0, 0), (0, 2)]   # (0, 1) is being staged; then 2 MB of room


def test_tight_latency_budget_is_more_aggressive():
    c = cands([(1, 0, 0, 0.9), (3, 1, 1, 0.9), (1, 0, 2, 0.03)])
    p = PrefetchPlanner(PlannerConfig(threshold=0.05, latency_ref_s=0.1))
    normal = p.plan([RequestView("a", c)], view(), 2)
    tight = p.plan([RequestView("a", c, latency_budget_s=0.05)], view(), 2)
    loose = p.plan([RequestView("a", c, latency_budget_s=1.0)], view(), 2)
    assert sorted(keys(normal)) == [(0, 0)]
    assert sorted(keys(tight)) == [(0, 0), (0, 2), (1, 1)]   # window 4, threshold 0.025
    assert sorted(keys(loose)) == [(0, 0)] and p.budget_factor(1.0) == 0.5


def test_deterministic_for_a_seed_and_independent_of_request_order():
    rng = np.random.default_rng(7)
    reqs = [RequestView(f"r{i}", cands([(rng.integers(1, 4), rng.integers(0, L), rng.integers(0, E),
                                         rng.uniform(0.05, 1)) for _ in range(20)])) for i in range(5)]
    p = PrefetchPlanner(PlannerConfig(max_inflight_bytes=12 * MB))
    a = p.plan(reqs, view(free=(3 * MB, 2 * MB)), 3).orders()
    b = p.plan(reqs, view(free=(3 * MB, 2 * MB)), 3).orders()
    c = p.plan(reqs[::-1], view(free=(3 * MB, 2 * MB)), 3).orders()
    assert a == b
    assert [(o.worker, o.layer, o.expert, o.target) for o in a] == [(o.worker, o.layer, o.expert, o.target)
                                                                    for o in c]


def test_a_residents_worth_does_not_depend_on_which_request_is_listed_first():
    """A resident's reuse is costed from the fastest copy any live request may read: the same requests in another
    order give the same plan (here: the order that displaces it)."""
    owner = np.zeros((2, 4), np.int64)
    present = np.zeros((5, 2, 4), bool)
    present[NVME] = present[S3] = True
    present[HBM, 0, 0] = True                      # the worker is full with (0, 0)
    reuse = np.zeros((2, 4))
    reuse[0, 0] = 0.5
    b = RequestView("B", cands([(1, 1, 2, 0.9)]), tiers=("nvme", "s3"))
    a = RequestView("A", Candidates.empty(), tiers=("s3",))   # live, nothing predicted, S3 only
    plans = []
    for reqs in ([b, a], [a, b]):
        v = ClusterView(owner, np.zeros(1, np.int64), present.copy(), np.full((2, 4), 4 * MB), np.array([0]),
                        np.array([0]), reuse=reuse)
        p = PrefetchPlanner(PlannerConfig(stage_to_dram=False)).plan(reqs, v, 2.0)
        plans.append(([(o.layer, o.expert, o.target) for o in p.orders()], p.victims))
    assert plans[0] == plans[1] == ([(1, 2, "hbm")], [[(0, 0)]])


def test_unknown_tier_is_a_clear_error():
    with pytest.raises(ValueError, match=r"request 'x': unknown tiers \['tape'\]"):
        PrefetchPlanner().plan([RequestView("x", cands([(1, 0, 0, 0.5)]), tiers=("tape",))], view(), 2)


def test_tiersets_name_the_configs_tiers_whatever_they_are_called():
    """A config may call its tiers anything (`local-nvme`, `archive`); the planner reads their kinds, and a
    TierSet of names still keeps every order inside it."""
    v = view(store=(NVME, S3))
    p = PrefetchPlanner(PlannerConfig(tier_kinds={"local-nvme": "nvme", "archive": "s3", "ram": "dram"}))
    plan = p.plan([RequestView("a", cands([(1, 0, 1, 0.9)]), tiers=("ram", "local-nvme"))], v, 2)
    assert [(o.layer, o.expert, o.source) for o in plan.orders()] == [(0, 1, "nvme")]
    plan = p.plan([RequestView("b", cands([(1, 0, 1, 0.9)]), tiers=("archive",))], v, 2)
    assert [o.source for o in plan.orders()] == ["s3"]                 # the NVMe copy is outside its TierSet
    with pytest.raises(ValueError, match=r"unknown tiers \['local-nvme'\]"):   # without the config's kinds
        PrefetchPlanner().plan([RequestView("a", cands([(1, 0, 1, 0.9)]), tiers=("local-nvme",))], v, 2)


def test_window_controller_shrinks_on_waste_grows_on_stalls_and_is_bounded():
    wc = WindowController(window=4, min_window=1, max_window=8)
    assert wc.update(wasted=8, used=2, stall_s=0.0, steps=10) == pytest.approx(3.2)    # 80% wasted: shrink
    assert wc.update(wasted=0, used=5, stall_s=0.0, steps=10) == pytest.approx(3.2)    # fine: hold
    assert wc.update(wasted=0, used=5, stall_s=1.0, steps=10) == pytest.approx(4.0)    # stalls rose: grow
    for _ in range(30):
        wc.update(wasted=10, used=0, stall_s=0, steps=1)
    assert wc.window == 1
    for _ in range(30):
        wc.update(wasted=0, used=3, stall_s=0, steps=1)             # misses alone (nothing late): hold
    assert wc.window == 1
    # prefetches arrive late, all used, and each growth cuts the stall: grow until it stops paying (4 layers here)
    wc = WindowController(window=1, min_window=1, max_window=8)
    for _ in range(60):
        w = wc.window
        wc.update(wasted=0, used=3, stall_s=max(0.0, 4.0 - w) * 0.01, steps=1, late=5 if w < 4 else 1)
    assert 3.5 <= wc.window <= 5.0 and wc.undone >= 1, (wc.window, wc.undone)
    assert wc.update(wasted=2, used=2, stall_s=0, steps=1, late=5) <= 5.0   # 50% wasted: hold (or shrink)


def test_window_growth_that_does_not_cut_stalls_is_undone():
    # stall per step that only alternates (noise, whatever the window): the old rule grew on every rise above the
    # running average and ratcheted to the ceiling; judged growth comes back each time
    wc = WindowController(window=4, min_window=1, max_window=12)
    for i in range(200):
        wc.update(wasted=4, used=6, stall_s=1.0 if i % 2 else 1.3, steps=1, late=3)
    assert wc.window <= 5.0 and wc.undone >= 5, (wc.window, wc.undone)
    # wider only costs (each layer more adds stall): the window never stays above where it started
    wc = WindowController(window=4, min_window=1, max_window=12)
    hist = []
    for i in range(200):
        wc.update(wasted=4, used=6, stall_s=0.1 * wc.window + (0.05 if i % 3 == 0 else 0.0), steps=1, late=3)
        hist.append(wc.window)
    assert max(hist[-50:]) <= 5.0 and sum(w > 4 for w in hist) <= len(hist) // 2, hist[-20:]
    again = WindowController(window=4)
    seq = [dict(wasted=3, used=1, stall_s=0.1, steps=4), dict(wasted=0, used=1, stall_s=0.5, steps=4)]
    assert [again.update(**s) for s in seq] == [WindowController(window=4).update(**seq[0]),
                                                pytest.approx(again.window)]


def test_victims_are_the_lowest_valued_residents_the_plan_displaces():
    v = view(free=(MB, 0))
    for e in (0, 2, 4):                             # worker 0 holds (0, 0), (0, 2), (0, 4)
        v.present[HBM, 0, e] = True
    r = RequestView("a", cands([(1, 0, 4, 0.6), (1, 0, 2, 0.55),          # residents, worth 0.6 / 0.55
                                (1, 1, 0, 0.95), (1, 1, 2, 0.9), (1, 1, 4, 0.8), (1, 1, 6, 0.7)]))
    plan = PrefetchPlanner(PlannerConfig(hbm_confirm_prob=0.5)).plan([r], v, 2)
    got = {(o.layer, o.expert): vic for o, vic in zip(plan.orders(), plan.victims) if o.target == "hbm"}
    # (1, 0) fits in the free MB; (1, 2) displaces (0, 0) (worth 0); (1, 4) displaces (0, 2) (0.55 < 0.8);
    # (1, 6) displaces (0, 4) (0.6 < 0.7). Each order may draw on all three: the worker loads in priority order
    assert got == {k: [(0, 0), (0, 2), (0, 4)] for k in [(1, 0), (1, 2), (1, 4), (1, 6)]}


def test_a_nearer_order_of_lower_value_loading_first_drops_nothing():
    """The worker loads by priority (nearest first), not by value: a nearer order of lower value takes the free
    bytes, and the farther, likelier one still loads by evicting the resident nobody predicts."""
    v = view(free=(MB, MB))
    v.present[HBM, 0, 0] = True                     # worker 0: (0, 0), nobody predicts it, and one free MB
    r = RequestView("a", cands([(3, 3, 2, 0.9), (1, 1, 0, 0.6)]))
    plan = PrefetchPlanner(PlannerConfig(stage_to_dram=False, layer_time_s=1e-3)).plan([r], v, 4)
    assert plan.value[list(zip(plan.layer, plan.expert)).index((3, 2))] > \
        plan.value[list(zip(plan.layer, plan.expert)).index((1, 0))]
    cache = CacheIndex(budget=2 * MB)
    cache.insert((0, 0), MB)
    for o, vic in sorted(zip(plan.orders(), plan.victims), key=lambda x: -x[0].priority):
        cache.insert_evicting_only((o.layer, o.expert), MB, vic)   # DoesNotFit fails the test
    assert sorted(cache.keys()) == [(1, 0), (3, 2)]


def test_displacement_property_budget_victims_and_values():
    """Random views with residents: per worker, HBM orders never need more than free bytes plus their named
    victims; victims are distinct residents of that worker, each worth less than the order displacing it."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        v = view(free=rng.integers(0, 3, size=W) * MB, dram_free=(0,))
        v.present[HBM] = rng.random((L, E)) < 0.3
        rows = [(1 + rng.integers(0, 3), rng.integers(0, L), rng.integers(0, E), rng.uniform(0.06, 1))
                for _ in range(40)]
        plan = PrefetchPlanner(PlannerConfig(hbm_confirm_prob=0.3)).plan(
            [RequestView("r", cands(rows[:20])), RequestView("s", cands(rows[20:]))], v, 3)
        for w in range(W):
            mine = [(o, vic) for o, vic in zip(plan.orders(), plan.victims) if o.worker == w and o.target == "hbm"]
            victims = {x for _, vic in mine for x in vic}
            assert len(mine) * MB <= v.free_bytes[w] + len(victims) * MB, trial
            for o, vic in mine:
                assert len(set(vic)) == len(vic), trial
                for x in vic:
                    assert v.present[HBM][x] and v.owner[x] == w, (trial, x)
            # loaded in any order, the worker's orders all fit, evicting only named victims
            for perm in (mine, mine[::-1]):
                cache = CacheIndex(budget=int(v.free_bytes[w]) + int(v.present[HBM][v.owner == w].sum()) * MB)
                for x in zip(*np.nonzero(v.present[HBM] & (v.owner == w))):
                    cache.insert(tuple(int(a) for a in x), MB)
                for o, vic in perm:
                    gone = cache.insert_evicting_only((o.layer, o.expert), MB, vic)
                    assert all(plan.keep[g] < o.value for g in gone), (trial, gone)
        assert all(not v.present[HBM][o.layer, o.expert] for o in plan.orders())


def test_several_tiersets_fastest_allowed_source_and_staging_only_where_allowed():
    v = view(store=(NVME, S3))
    v.present[DRAM, 0, 1] = True
    r_cold = RequestView("cold", cands([(1, 0, 1, 0.9), (1, 0, 3, 0.4)]), tiers=("s3",))
    r_warm = RequestView("warm", cands([(1, 0, 1, 0.2), (1, 0, 5, 0.4)]), tiers=("dram", "nvme"))
    got = {(o.layer, o.expert): o for o in PrefetchPlanner().plan([r_cold, r_warm], v, 2).orders()}
    assert got[(0, 1)].source == "dram"           # the warm request allows the DRAM copy: the fastest allowed
    assert got[(0, 3)].source == "s3" and got[(0, 5)].source == "nvme"
    v = view(free=(0, 0), store=(NVME, S3))       # no HBM room: colder predictions are staged where allowed
    got = {(o.layer, o.expert): o for o in PrefetchPlanner().plan([r_cold, r_warm], v, 2).orders()}
    assert got[(0, 5)].target == "dram"           # the warm request's TierSet has dram
    assert (0, 3) not in got                      # the cold request's does not: never staged on its behalf
