"""The compiled planner (policies/rank_kernel.py) against its numpy reference (ranking._rank_numpy): the same
orders, in the same issue order, to the same owners and targets, with the same victims and resident values, on
randomized clusters covering every step of the ranking (TierSets, budgets, residents, in-flight loads, staging,
reuse, displacement, the in-flight cap). P comes from libm's log1p / expm1 in one and numpy's SIMD loops in the
other: equal to ~1 ulp, and so every float derived from it."""
import numpy as np
import pytest

from policies.predictors import Candidates
from policies.ranking import HBM, NVME, PEER, S3, ClusterView, PlannerConfig, PrefetchPlanner, RequestView

TIERSETS = [None, ("dram", "nvme"), ("nvme",), ("peer", "dram", "nvme", "s3"), ("s3",), ("dram",)]


def random_case(rng):
    L, E = int(rng.integers(1, 7)), int(rng.integers(2, 17))
    W = int(rng.integers(1, 5))
    nodes = int(rng.integers(1, 3))
    owner = rng.integers(0, W, size=(L, E))
    nbytes = rng.choice([1, 2, 3, 4], size=(L, E)) << 20
    present = np.stack([rng.random((L, E)) < q for q in (0.3, 0.2, 0.3, 0.9, 0.9)])
    present[S3] |= ~present[NVME] & (rng.random((L, E)) < 0.8)   # most experts have a store copy
    node_of = rng.integers(0, nodes, size=W)
    view = ClusterView(owner, node_of, present, nbytes, rng.integers(0, 8, size=W) << 20,
                       rng.integers(0, 10, size=nodes) << 20, rng.random((L, E)) < 0.1, rng.random((L, E)) < 0.1,
                       int(rng.integers(0, 4)) << 20)
    if rng.random() < 0.6:
        view.reuse = rng.random((L, E))
        if rng.random() < 0.5:
            view.reuse_used = rng.random((L, E))
    reqs = []
    for r in range(int(rng.integers(1, 6))):
        n = int(rng.integers(0, 25))
        d = rng.integers(1, 6, size=n)
        # probabilities repeat now and then: equal values must tie-break alike in both engines
        p = rng.choice(np.r_[rng.random(6), 0.5, 1.0], size=n)
        reqs.append(RequestView(f"r{r}", Candidates(d, rng.integers(0, L, size=n), rng.integers(0, E, size=n), p),
                                TIERSETS[int(rng.integers(0, len(TIERSETS)))], None,
                                None if rng.random() < 0.5 else float(rng.choice([0.01, 0.05, 0.1, 1.0]))))
    cfg = dict(threshold=float(rng.choice([0.02, 0.05, 0.2])), hbm_confirm_prob=float(rng.choice([0.3, 0.5, 0.9])),
               max_inflight_bytes=int(rng.integers(0, 40)) << 20,
               layer_time_s=None if rng.random() < 0.5 else float(rng.choice([0.0, 1e-4, 1e-3])),
               stage_to_dram=bool(rng.random() < 0.8))
    return reqs, view, float(rng.choice([1.0, 2.0, 3.5])), cfg


def plans(seed):
    rng = np.random.default_rng(seed)
    reqs, view, window, cfg = random_case(rng)
    a = PrefetchPlanner(PlannerConfig(engine="numpy", **cfg)).plan(reqs, view, window)
    b = PrefetchPlanner(PlannerConfig(engine="compiled", **cfg)).plan(reqs, view, window)
    return a, b


def test_compiled_planner_matches_the_numpy_reference():
    seen = {"orders": 0, "hbm": 0, "dram": 0, "victims": 0, "several_workers": 0, "reuse": 0}
    for seed in range(400):
        a, b = plans(seed)
        for f in ("worker", "layer", "expert", "source", "target", "nbytes"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), f"seed {seed}: {f} differs"
            assert getattr(b, f).dtype == np.int64, f"seed {seed}: {f} is {getattr(b, f).dtype}"
        for f in ("prob", "value", "priority"):
            np.testing.assert_allclose(getattr(b, f), getattr(a, f), rtol=1e-13, atol=0, err_msg=f"seed {seed}: {f}")
        assert a.request == b.request and a.victims == b.victims and a.denied == b.denied, f"seed {seed}"
        assert (a.wanted is None) == (b.wanted is None) and np.array_equal(a.wanted, b.wanted), f"seed {seed}"
        for f in ("keep", "keep_used"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None), f"seed {seed}: {f} present in one engine only"
            if x is not None:
                np.testing.assert_allclose(y, x, rtol=1e-13, atol=0, err_msg=f"seed {seed}: {f}")
        seen["orders"] += len(a) > 0
        seen["hbm"] += int((a.target == 0).sum())
        seen["dram"] += int((a.target == 1).sum())
        seen["victims"] += any(a.victims)
        seen["several_workers"] += len(set(a.worker.tolist())) > 1
        seen["reuse"] += a.keep_used is not None
    # the cases reach every part of the ranking, not only the empty plan
    assert seen["orders"] > 200 and seen["hbm"] > 300 and seen["dram"] > 50, seen
    assert seen["victims"] > 20 and seen["several_workers"] > 50 and seen["reuse"] > 50, seen


def test_both_engines_on_a_case_worked_by_hand():
    """One free MiB on the only worker: the costliest miss (an S3 copy) takes it; the peer copy can neither go to
    HBM (nothing cheaper to displace) nor be staged (it is already one hop away); the rest stage into DRAM. Issue
    order: warm before cold (nvme before s3)."""
    L, E = 3, 4
    view = ClusterView.empty(np.zeros((L, E), np.int64), np.full((L, E), 1 << 20), np.array([1 << 20]),
                             dram_free_bytes=np.array([8 << 20]), store_tiers=(NVME, S3))
    view.present[PEER, 2, 0] = True
    view.present[NVME, 1, 1] = view.present[NVME, 1, 2] = False   # S3 only
    c = Candidates(np.array([2, 1, 1, 2]), np.array([2, 1, 1, 2]), np.array([0, 1, 2, 3]),
                   np.array([0.9, 0.8, 0.3, 0.7]))
    for engine in ("numpy", "compiled"):
        plan = PrefetchPlanner(PlannerConfig(engine=engine)).plan([RequestView("r", c)], view, 2.0)
        got = [(o.layer, o.expert, o.source, o.target) for o in plan.orders()]
        assert got == [(2, 3, "nvme", "dram"), (1, 1, "s3", "hbm"), (1, 2, "s3", "dram")], (engine, got)
        assert plan.prob[1] == 0.8 and plan.value[1] > plan.value[2] > plan.value[0], engine


def test_unknown_engine_is_refused():
    with pytest.raises(AssertionError, match="engine"):
        PlannerConfig(engine="fast")


def test_warm_up_loads_the_kernel_and_read_only_views_reuse_it():
    """After warm_up the kernel is specialised for the planner's argument types; a view of read-only arrays (as Ray
    hands them over) is converted, not compiled for: no second specialisation mid-decision."""
    from policies.rank_kernel import rank
    planner = PrefetchPlanner(PlannerConfig())
    planner.warm_up()
    n = len(rank.signatures)
    assert n >= 1
    rng = np.random.default_rng(5)
    reqs, view, window, cfg = random_case(rng)
    for a in (view.owner, view.node_of, view.present, view.nbytes, view.free_bytes, view.dram_free_bytes,
              view.inflight, view.staging):
        a.flags.writeable = False
    a = PrefetchPlanner(PlannerConfig(engine="numpy", **cfg)).plan(reqs, view, window)
    b = PrefetchPlanner(PlannerConfig(**cfg)).plan(reqs, view, window)
    assert len(rank.signatures) == n, rank.signatures
    assert a.request == b.request and np.array_equal(a.layer, b.layer) and np.array_equal(a.expert, b.expert)


def test_candidates_out_of_range_name_their_request():
    view = ClusterView.empty(np.zeros((2, 4), np.int64), np.ones((2, 4), np.int64), np.ones(1, np.int64))
    ok = Candidates(np.ones(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1))
    bad = Candidates(np.ones(2, np.int64), np.array([2, 1]), np.array([0, 1]), np.ones(2))   # layer 2 of 2
    for engine in ("numpy", "compiled"):
        with pytest.raises(ValueError, match=r"request 'second'.*outside layers \[0, 2\) x experts \[0, 4\)"):
            PrefetchPlanner(PlannerConfig(engine=engine)).plan(
                [RequestView("first", ok), RequestView("empty", Candidates.empty()), RequestView("second", bad)],
                view, 2.0)


@pytest.mark.parametrize("p", [0.228, 0.236, 0.45, 0.5, 0.67, 1.0])
def test_a_prediction_exactly_at_the_confirm_probability_displaces_in_both_engines(p):
    """P = 1 - prod(1 - p) comes back from logs a few ulp off p, differently in libm and numpy: a prediction at
    exactly hbm_confirm_prob (1.0 included, which the planner caps below 1) has reached it in both engines."""
    view = ClusterView.empty(np.zeros((1, 2), np.int64), np.ones((1, 2), np.int64), np.zeros(1, np.int64))
    view.present[HBM, 0, 1] = True                         # the one resident, which nobody predicts: value 0
    c = Candidates(np.ones(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([p]))
    for engine in ("numpy", "compiled"):
        plan = PrefetchPlanner(PlannerConfig(engine=engine, hbm_confirm_prob=p)).plan([RequestView("r", c)], view, 1.0)
        assert [(o.expert, o.target) for o in plan.orders()] == [(0, "hbm")], (engine, p)
        assert plan.victims == [[(0, 1)]], (engine, p)


def test_a_view_whose_workers_sit_on_nodes_without_dram_entries_is_refused():
    """The kernel indexes dram_free_bytes by node without bounds checks: such a view is refused where it is made."""
    with pytest.raises(AssertionError, match="node_of"):
        ClusterView.empty(np.zeros((1, 2), np.int64), np.ones((1, 2), np.int64), np.ones(2, np.int64),
                          node_of=[0, 1], dram_free_bytes=np.ones(1, np.int64))


def test_a_negative_distance_is_refused_with_its_request():
    view = ClusterView.empty(np.zeros((2, 4), np.int64), np.ones((2, 4), np.int64), np.ones(1, np.int64))
    bad = Candidates(np.array([-1]), np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1))
    for engine in ("numpy", "compiled"):
        with pytest.raises(ValueError, match="request 'neg'.*negative distance"):
            PrefetchPlanner(PlannerConfig(engine=engine)).plan([RequestView("neg", bad)], view, 2.0)


def test_the_config_picks_the_engine():
    from actors.prefetch_coordinator import planner_config
    from cluster.config import PrefetchConfig
    assert planner_config(PrefetchConfig()).engine == "compiled"
    assert planner_config(PrefetchConfig(planner_engine="numpy")).engine == "numpy"
    with pytest.raises(ValueError, match="planner_engine"):
        PrefetchConfig(planner_engine="fast")


def test_the_benchmark_flag_reaches_the_cluster_config():
    from types import SimpleNamespace
    from jobs.benchmark import cluster_config, planner_settings
    a = SimpleNamespace(threshold=None, hbm_confirm_prob=None, lookahead_tokens=None, tier="dram",
                        planner_engine="numpy")
    cfg = cluster_config("/tmp/none", workers=1, hbm=1 << 20, dram=1 << 20, policy="cross_layer", window=2, ns="t",
                         address=None, inflight=1 << 20, planner=planner_settings(a, 0))
    assert cfg.prefetch.planner_engine == "numpy"
    a.planner_engine = None   # not given: the config's default
    assert "planner_engine" not in planner_settings(a, 0)
