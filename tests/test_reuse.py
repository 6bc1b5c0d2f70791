"""Residents valued by their learned reuse (policies/reuse.py) and what the planner does with it
(policies/ranking.py step 6): pure, no Ray."""
import numpy as np
import pytest

from policies.predictors import Candidates
from policies.ranking import HBM, NVME, ClusterView, PlannerConfig, PrefetchPlanner, RequestView
from policies.reuse import (PRIOR_FILE, MixedReuse, ReuseEstimator, TransitionReuse, load_routing_prior,
                            save_routing_prior, transition_counts)

L, E, K = 3, 8, 2
MB = 1 << 20


def test_learns_the_token_to_token_transition_per_expert():
    """Expert 0 at layer 1 comes back at the next token 90% of the time once used; the others are drawn at random.
    The estimate converges to the generating probabilities (a wrong update rule would not)."""
    rng = np.random.default_rng(0)
    est = ReuseEstimator(L, E, K, half_life=1e9)
    prev0 = False
    for t in range(4000):
        for l in range(L):
            if l == 1:
                first = 0 if (prev0 and rng.random() < 0.9) or (not prev0 and rng.random() < 0.2) else \
                    int(rng.integers(1, E))
                other = int(rng.choice([e for e in range(1, E) if e != first]))
                ids = [first, other]
                prev0 = first == 0
            else:
                ids = rng.choice(E, size=K, replace=False).tolist()
            est.observe("r", l, ids)
    p11, p01 = est.p_next()
    assert p11[1, 0] == pytest.approx(0.9, abs=0.03), f"p11 {p11[1, 0]}"
    assert p01[1, 0] == pytest.approx(0.2, abs=0.03), f"p01 {p01[1, 0]}"
    # uniform experts: no memory, P = K / E either way
    assert np.allclose(p11[0], K / E, atol=0.05) and np.allclose(p01[2], K / E, atol=0.05)


def test_reuse_combines_live_requests_and_forgets_ended_ones():
    est = ReuseEstimator(L, E, K)
    est.n11[:] = 0.5 * est.n1        # p11 = 0.5 everywhere
    est.n01[:] = 0.1 * est.n0        # p01 = 0.1
    est.refresh()
    est.observe("a", 0, [3, 4])
    est.observe("b", 0, [3, 5])
    r = est.reuse()
    assert r[0, 3] == pytest.approx(1 - 0.5 * 0.5)           # both used it
    assert r[0, 4] == pytest.approx(1 - 0.5 * 0.9)           # a used it, b did not
    assert r[0, 0] == pytest.approx(1 - 0.9 * 0.9)           # nobody did
    assert r[1, 4] == pytest.approx(1 - 0.9 * 0.9)           # a layer not seen yet: "not used"
    assert est.reuse(["a", "nobody"])[0, 4] == pytest.approx(0.5)
    est.end("a")
    est.end("b")
    assert not est.last and not est.seen                     # bounded: nothing kept for ended requests
    assert not est.reuse().any()


def test_unknown_expert_ids_are_ignored():
    est = ReuseEstimator(L, E, K)
    est.observe("a", 0, [-1, 2])
    assert est.last["a"][0].tolist() == [e == 2 for e in range(E)]


def _view():
    owner = np.zeros((L, E), np.int64)                       # one worker owns everything
    v = ClusterView.empty(owner, np.full((L, E), MB), np.array([0]), dram_free_bytes=np.array([0]),
                          store_tiers=(NVME,))
    v.present[HBM, 0, 1] = True                              # the worker is full: (0, 1) and (0, 2) resident
    v.present[HBM, 0, 2] = True
    return v


def test_a_prediction_does_not_displace_a_resident_the_next_token_is_likelier_to_reuse():
    planner = PrefetchPlanner(PlannerConfig(hbm_confirm_prob=0.5, stage_to_dram=False))
    req = [RequestView("r", Candidates(np.array([1]), np.array([1]), np.array([5]), np.array([0.6])))]
    v = _view()
    plan = planner.plan(req, v, window=2)                    # no reuse known: residents are worth 0
    assert [(o.layer, o.expert) for o in plan.orders()] == [(1, 5)]
    assert plan.victims[0] in ([(0, 1)], [(0, 2)])
    v = _view()
    v.reuse = np.zeros((L, E))
    v.reuse[0, 1] = v.reuse[0, 2] = 0.8                      # both will likely be used by the next token
    assert len(planner.plan(req, v, window=2)) == 0
    v.reuse[0, 2] = 0.3                                      # (0, 2) is less likely than the prediction: it goes
    plan = planner.plan(req, v, window=2)
    assert [(o.layer, o.expert) for o in plan.orders()] == [(1, 5)] and plan.victims[0] == [(0, 2)]
    # Plan.keep: what the workers evict by on a demand miss: the likelier reuse is worth more
    # (only residents' and in-flight entries are ever sent to a worker)
    assert plan.keep.shape == (L, E) and plan.keep[0, 1] == pytest.approx(plan.keep[0, 2] * 0.8 / 0.3)


def test_cache_hints_order_eviction_lowest_value_first_unvalued_last_pinned_never():
    from policies.hbm_cache import CacheIndex, DoesNotFit, make_policy
    c = CacheIndex(4, make_policy("lru", 4))
    for k in "abcd":
        c.insert(k, 1)                                       # LRU order a, b, c, d
    assert c.plan_room(1) == ["a"]
    c.hints = {"a": 0.9, "b": 0.5, "c": 0.1}                 # d not valued (loaded since): goes last
    assert c.plan_room(3) == ["c", "b", "a"]
    c.pin("c")
    assert c.plan_room(2) == ["b", "a"]
    c.hints = {"a": 0.2, "b": 0.2, "c": 0.2}                 # ties keep the policy's (LRU) order
    assert c.plan_room(2) == ["a", "b"]
    c.hints = None
    assert c.plan_room(1) == ["a"]
    with pytest.raises(DoesNotFit):
        c.plan_room(5)


def test_observe_many_equals_row_by_row_for_distinct_requests_and_handles_prefill():
    rng = np.random.default_rng(1)
    a, b = ReuseEstimator(L, E, K, half_life=1e9), ReuseEstimator(L, E, K, half_life=1e9)
    for t in range(30):
        for l in range(L):
            reqs = ["x", "y", "z"] if t % 5 else ["x", "x", "w"]      # every 5th step: a prefill-like event
            ids = np.stack([rng.choice(E, K, replace=False) for _ in reqs])
            ids[0, 0] = -1 if t == 7 else ids[0, 0]                   # an unknown id is ignored
            a.observe_many(reqs, l, ids)
            for r, row in zip(reqs, ids):
                b.observe(r, l, row)
    for x, y in ((a.n1, b.n1), (a.n11, b.n11), (a.n0, b.n0), (a.n01, b.n01)):
        assert np.allclose(x, y)
    assert a.last.keys() == b.last.keys() and all(np.array_equal(a.last[r], b.last[r]) for r in a.last)


def test_reuse_of_all_live_requests_equals_the_direct_formula():
    """reuse() keeps a running count of the live requests' selections and the logs of p11 / p01: over observes,
    prefills and ends it equals, to the bit, the formula over a stack of every live request's last selection."""
    rng = np.random.default_rng(3)
    est = ReuseEstimator(L, E, K, half_life=50)
    live: set = set()
    checked = 0
    for t in range(60):
        for l in range(L):
            reqs = sorted(rng.choice(["a", "b", "c", "d", "e"], size=int(rng.integers(1, 4)), replace=False).tolist())
            if t % 7 == 3:
                reqs = reqs + reqs[:1]                              # a request twice: the row-by-row path
            est.observe_many(reqs, l, np.stack([rng.choice(E, K, replace=False) for _ in reqs]))
            live |= set(reqs)
            if rng.random() < 0.1 and live:                         # a request ends
                r = sorted(live)[0]
                est.end(r)
                live.discard(r)
            p11, p01 = est.p_next()

            def direct(reqs):
                n_used = np.stack([est.last[r] for r in reqs]).sum(0)
                return -np.expm1(n_used * np.log1p(-np.minimum(p11, 1 - 1e-12))
                                 + (len(reqs) - n_used) * np.log1p(-np.minimum(p01, 1 - 1e-12)))
            if live:
                assert np.array_equal(est.reuse(list(live)), direct(sorted(live))), (t, l)
                assert np.array_equal(est.n_used, np.stack([est.last[r] for r in live]).sum(0)), (t, l)
            if len(live) > 1:                                        # a subset: stacked, not the running count
                assert np.array_equal(est.reuse(sorted(live)[:1]), direct(sorted(live)[:1])), (t, l)
                # as many ids as live requests, one twice: not all of them, so not the running count either
                twice = sorted(live)[:-1] + sorted(live)[:1]
                assert np.array_equal(est.reuse(twice), direct(twice)), (t, l)
                checked += 1
    assert checked > 50


# -- TransitionReuse: the runtime's eviction values (prefetch.reuse_values) ------------------------------------------
def test_transition_reuse_learns_where_the_next_token_goes():
    """A sequence cycles 0 -> 3 -> 5 -> 0 at layer 1 (top-1). Once learned, the value after 3 is ~1 for 5 and ~0 for
    the rest: the next token's expert, not the one just used (LRU keeps that one) nor the most frequent."""
    tr = TransitionReuse(L, E, 1, half_life=1e9, prior=0.01)
    cyc = [0, 3, 5]
    for t in range(301):
        v = tr.observe(1, [0], [[cyc[t % 3]]], pos=[t])
    assert v.argmax() == 3 and v[3] > 0.98, v   # the last token used 0: after 0 comes 3
    v = tr.observe(1, [0], [[3]], pos=[301])
    assert v[5] > 0.98 and v[3] < 0.01 and v[0] < 0.01, v
    assert np.all(tr.C[0] == 0.01) and np.all(tr.C[2] == 0.01), "other layers learned nothing"


def test_transition_reuse_new_sequences_slots_and_prefill():
    tr = TransitionReuse(L, E, K, half_life=1e9, prior=0.01)
    tr.observe(0, [2], [[1, 2]], pos=[5])
    before = tr.C[0].copy()
    # the slot's position went back: a new request there, so no 1,2 -> 6,7 transition is learned
    tr.observe(0, [2], [[6, 7]], pos=[0])
    assert np.array_equal(tr.C[0], before)
    tr.observe(0, [2], [[1, 2]], pos=[1])     # 6,7 -> 1,2 is
    assert np.allclose((tr.C[0] - before)[[6, 6, 7, 7], [1, 2, 1, 2]], 1.0)
    before = tr.C[0].copy()
    # prefill: a slot's rows are chained in position order (given out of order), 1,2 -> 3,4 -> 5,0
    v = tr.observe(0, [2, 2], [[5, 0], [3, 4]], pos=[3, 2])
    learned = tr.C[0] - before
    assert np.allclose(learned[[1, 2, 3, 4], [3, 4, 5, 0]], 1.0)
    assert learned.sum() == pytest.approx(8.0), "each of the two transitions adds K x K pairs"
    assert list(tr.last[2, 0]) == [5, 0] and tr.pos[2, 0] == 3
    # the value is predicted from the slot's newest token (5, 0): nothing learned from there yet, so the prior
    assert np.allclose(v, K / E)
    tr.reset([2])
    assert list(tr.last[2, 0]) == [-1, -1]


def test_transition_reuse_combines_slots_and_ignores_unknown_ids():
    tr = TransitionReuse(L, E, K, half_life=1e9, prior=1e-6)
    for t in range(50):               # slot 0: 1,2 -> 1,2 ; slot 1: 3,4 -> 3,4
        tr.observe(2, [0, 1], [[1, 2], [3, 4]], pos=[t, t])
    v = tr.observe(2, [0, 1], [[1, 2], [3, 4]], pos=[50, 50])
    assert np.allclose(v[[1, 2, 3, 4]], 1.0, atol=1e-3) and np.all(v[[0, 5, 6, 7]] < 1e-3), v
    # after 0, slot 0 goes to 6 and slot 1 to 7: P(6 | 0) = P(7 | 0) = 0.5, and over two slots now both at 0,
    # P(any selects 6) = 1 - 0.5 * 0.5
    tr2 = TransitionReuse(L, E, 1, half_life=1e9, prior=1e-9)
    for t in range(40):
        tr2.observe(0, [0, 1], [[0], [0]], pos=[2 * t, 2 * t])
        tr2.observe(0, [0, 1], [[6], [7]], pos=[2 * t + 1, 2 * t + 1])
    v2 = tr2.observe(0, [0, 1], [[0], [0]], pos=[100, 100])
    assert v2[6] == pytest.approx(0.75, abs=0.02) and v2[7] == pytest.approx(0.75, abs=0.02), v2
    before = tr.C.copy()
    v3 = tr.observe(1, [0], [[-1, 99]], pos=[0])   # nothing known: nothing learned, nothing predicted
    assert np.array_equal(tr.C, before) and not v3.any()
    # a half-known row predicts from its known expert alone: after 1 came 1 and 2, never 3 or 4
    v4 = tr.observe(2, [5], [[1, -1]], pos=[0])
    assert np.allclose(v4[[1, 2]], 1.0, atol=1e-3) and v4[[3, 4]].max() < 1e-3, v4


# -- MixedReuse and routing priors (prefetch.reuse_memory / routing_prior) ---------------------------------------------
def _markov(perm: np.ndarray, tokens: int, seed: int, noise: float = 0.1) -> np.ndarray:
    """int [tokens, L, 1]: at every layer the next token's expert is perm[l, this one], else (prob `noise`) a random
    one: a workload whose token-to-token routing is shared by every request."""
    rng = np.random.default_rng(seed)
    x = np.zeros((tokens, L, 1), np.int64)
    x[0, :, 0] = rng.integers(0, E, L)
    for t in range(1, tokens):
        nxt = perm[np.arange(L), x[t - 1, :, 0]]
        x[t, :, 0] = np.where(rng.random(L) < noise, rng.integers(0, E, L), nxt)
    return x


def _replay(reuse, x: np.ndarray, layer: int = 1) -> float:
    """Mean P the estimator gave the expert the next token then selected, at `layer` (one sequence, slot 0)."""
    got, v = [], None
    for t in range(len(x)):
        if v is not None:
            got.append(v[x[t, layer, 0]])
        v = reuse.observe(layer, [0], x[t, layer], pos=[t])
    return float(np.mean(got))


def test_transition_counts_are_the_pairs_transition_reuse_learns():
    rng = np.random.default_rng(0)
    x = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(30)])
    x[5, 1, 0] = -1                            # unknown ids add no pair
    offs = np.array([0, 10, 18, 30])          # no pair across a sequence's boundary
    ref = TransitionReuse(L, E, K, half_life=1e12)
    for r in range(3):
        ref.reset([0])
        for l in range(L):
            seq = x[offs[r]:offs[r + 1], l]
            ref.observe(l, np.zeros(len(seq), np.int64), seq, pos=np.arange(len(seq)))
    c = transition_counts(x, offs, E)
    assert np.allclose(c, ref.counts()) and c.sum() == 3 * 27 * K * K - 2 * K
    warm = TransitionReuse(L, E, K)
    warm.add_counts(c)
    assert np.allclose(warm.counts(), c)


def test_mixed_reuse_trusts_a_right_prior_and_leaves_a_wrong_one():
    """The workload's routing is a shared Markov chain. A prior counted from other requests of it predicts a new
    request from its first token, where the request's own table still knows nothing: the mix follows the prior and
    predicts better than the fast table alone. A prior of another workload (another chain) is left within a few
    tokens, down to the floor, and the mix predicts about as well as the fast table alone."""
    rng = np.random.default_rng(1)
    perm = np.stack([rng.permutation(E) for _ in range(L)])
    other = np.stack([rng.permutation(E) for _ in range(L)])
    past = np.concatenate([_markov(perm, 200, s) for s in range(5)])
    right = transition_counts(past, np.arange(0, 1001, 200), E)
    wrong = transition_counts(np.concatenate([_markov(other, 200, s) for s in range(5)]), np.arange(0, 1001, 200), E)
    x = _markov(perm, 60, seed=9)
    fast = _replay(TransitionReuse(L, E, 1), x)
    good = MixedReuse(L, E, 1, prior=right)
    p_good = _replay(good, x)
    assert p_good > fast + 0.2 and good.weight_slow[1] > 0.99, (p_good, fast, good.weight_slow)
    assert good.scored[1] == 59 and good.scored[0] == 0, "only the layer observed is scored, every decode step"
    bad = MixedReuse(L, E, 1, prior=wrong)
    p_bad = _replay(bad, x)
    assert abs(p_bad - fast) < 0.05 and bad.weight_slow[1] < 1e-3, (p_bad, fast, bad.weight_slow)
    assert bad.weight_slow[1] >= 1 / (1 + np.exp(bad.floor)) - 1e-12, "never below the floor: it can come back"
    # no prior: the long-memory table learns the chain too, and the mix is no worse than the fast table
    assert _replay(MixedReuse(L, E, 1), x) > fast - 0.02


def test_mixed_reuse_scores_decode_steps_of_the_same_slots_only():
    m = MixedReuse(L, E, K)
    m.observe(0, [3, 3, 3], [[0, 1], [2, 3], [4, 5]], pos=[0, 1, 2])   # a prefill: not a step to score from
    m.observe(0, [3], [[1, 2]], pos=[3])
    assert m.scored[0] == 0
    m.observe(0, [3], [[1, 2]], pos=[4])                                 # the same slot's next token
    assert m.scored[0] == 1
    m.observe(0, [3, 4], [[1, 2], [5, 6]], pos=[5, 0])                  # another slot joined: not comparable
    assert m.scored[0] == 1
    w = m.observe(0, [3, 4], [[1, 2], [5, 6]], pos=[6, 1])
    assert m.scored[0] == 2 and w.shape == (E,) and np.all((w >= 0) & (w <= 1))


def test_routing_prior_file_round_trip_geometry_errors_and_atomic_writes(tmp_path):
    x = _markov(np.stack([np.arange(E)] * L), 50, 0)
    c = transition_counts(x, [0, 50], E)
    path = str(tmp_path / PRIOR_FILE)
    save_routing_prior(path, c, top_k=1, source="unit", rows=50, requests=1)
    got, meta = load_routing_prior(path, L, E, 1)
    assert np.array_equal(got, c)
    assert meta == {"top_k": 1, "rows": 50, "requests": 1, "source": "unit", "path": path}
    with pytest.raises(ValueError, match=rf"routing prior {path}: same_layer \(3, 8, 8\) with top_k 1 .* \(4, 8, 8\)"):
        load_routing_prior(path, L + 1, E, 1)
    with pytest.raises(ValueError, match="top_k 1 do not match .* top_k 2"):
        load_routing_prior(path, L, E, 2)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=f"routing prior {junk}: not a routing prior file"):
        load_routing_prior(str(junk), L, E, 1)
    half = tmp_path / "half.npz"          # the table missing
    np.savez(str(half), counts=c, top_k=1, rows=1, requests=1, source="x")
    with pytest.raises(ValueError, match="not a routing prior file .*same_layer"):
        load_routing_prior(str(half), L, E, 1)
    # a write that fails leaves the earlier prior whole and no temporary file behind
    with pytest.raises(TypeError):
        save_routing_prior(path, 2 * c, top_k=1, source="unit", rows=object(), requests=1)
    assert np.array_equal(load_routing_prior(path, L, E, 1)[0], c)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PRIOR_FILE, "junk.npz", "half.npz"])
    with pytest.raises(ValueError, match=f"routing prior {path}: same_layer counts must be finite and >= 0"):
        save_routing_prior(path, np.full((L, E, E), np.nan), top_k=1, source="u", rows=1, requests=1)
    with pytest.raises(ValueError, match=r"same_layer must be counts \[L, E, E\], got shape \(3, 8\)"):
        save_routing_prior(path, np.ones((L, E)), top_k=1, source="u", rows=1, requests=1)
    assert np.array_equal(load_routing_prior(path, L, E, 1)[0], c)
    np.savez(str(tmp_path / "neg.npz"), same_layer=-c, top_k=1, rows=1, requests=1, source="x")
    with pytest.raises(ValueError, match="same_layer counts must be finite and >= 0"):
        load_routing_prior(str(tmp_path / "neg.npz"), L, E, 1)
    for bad, why in [(dict(top_k=np.array([1, 1])), r"top_k must be an integer scalar, got int64 \(2,\)"),
                     (dict(top_k=1.7), r"top_k must be an integer scalar, got float64"),   # not read as 1
                     (dict(same_layer=c.astype(np.complex64)), "same_layer must hold real counts")]:
        bad_path = tmp_path / "meta.npz"
        np.savez(str(bad_path), **{**dict(same_layer=c, top_k=1, rows=1, requests=1, source="x"), **bad})
        with pytest.raises(ValueError, match=f"routing prior {bad_path}: not a routing prior file .*{why}"):
            load_routing_prior(str(bad_path), L, E, 1)


def test_positions_are_required_and_must_match_the_slots():
    """Without positions a slot's token never moves on, and nothing would be learned: they are required."""
    tr = TransitionReuse(L, E, 1)
    with pytest.raises(TypeError):
        tr.observe(0, [0], [[1]])
    with pytest.raises(AssertionError, match="2 slots but 1 positions"):
        tr.observe(0, [0, 1], [[1], [2]], pos=[0])
