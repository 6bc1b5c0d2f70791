"""The ensemble that learns which predictor to trust (policies/ensemble.py) and the registry (policies/registry.py),
no Ray: on a synthetic trace where one member is perfect (the Oracle) and the others random, the ensemble's weights
and predictions converge to the perfect one; per-member scores() match a direct count; deterministic; bounded
memory; members that need hidden states skip events without them."""
import numpy as np
import pytest

from policies.ensemble import Ensemble
from policies.predictors import Candidates, Oracle, Predictor, RoutingEvent
from policies.registry import PREDICTOR_NAMES, available_names, make_predictor
from policies.replay import recall_at_k
from policies.traces import synthetic_trace

L, E, K = 4, 12, 2


class RandomGuess(Predictor):
    """K uniformly random experts per distance, from its own seeded generator (a member with no skill)."""
    name = "random"

    def __init__(self, *a, seed=0, **kw):
        super().__init__(*a, **kw)
        self.rng = np.random.default_rng(seed)

    def _predict(self, request, st, tokens, layers):
        D = len(layers)
        ex = np.argsort(self.rng.random((D, self.E)), -1)[:, :self.K]
        d = np.repeat(np.arange(1, D + 1), self.K)
        return Candidates(d, np.repeat(layers, self.K).astype(np.int64), ex.reshape(-1), np.full(D * self.K, 0.9))


def build(tr, **kw):
    members = {"random_a": RandomGuess(L, E, K, seed=1), "oracle": Oracle(tr), "random_b": RandomGuess(L, E, K, seed=2)}
    return Ensemble(members, L, E, K, horizon=3, **kw)


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(300, L, E, K, correlation=0.0, num_requests=6, seed=5)


@pytest.mark.parametrize("mode", ["mix", "pick"])
def test_converges_to_the_perfect_member(trace, mode):
    ens = build(trace, mode=mode)
    r = recall_at_k(ens, trace, 1, wrap=True)
    w = ens.weights()                                               # [G, C, M]
    assert (w[..., 1] > 0.99).all(), w
    s = ens.scores()
    assert s["members"]["oracle"]["recall_at_k"] == [1.0, 1.0, 1.0]
    for name in ("random_a", "random_b"):
        assert all(abs(x - K / E) < 0.05 for x in s["members"][name]["recall_at_k"]), s["members"][name]
        assert s["members"][name]["weight"][0] < 0.01
    assert s["ensemble"]["recall_at_k"][0] > 0.97
    assert r.overall > 0.97                                         # the random members cost only the first steps
    assert s["members"]["oracle"]["precision"] == [1.0, 1.0, 1.0]  # P = 1 on exactly the true experts


def test_scores_match_a_direct_count(trace):
    """Decay off: the member recall in scores() equals recall_at_k of the same member replayed alone."""
    tr = trace.head(300)
    ens = Ensemble({"oracle": Oracle(tr), "rnd": RandomGuess(L, E, K, seed=7)}, L, E, K, horizon=2, half_life=None)
    recall_at_k(ens, tr, 1, wrap=True)
    alone = recall_at_k(RandomGuess(L, E, K, seed=7), tr, 2, wrap=True)
    # the ensemble asks its members for horizon 2 after every event, so the random member's draws are the same
    # as when replay asks predict(request, 2) after every event whose distance-2 target exists; compare counts
    s = ens.scores()["members"]["rnd"]
    assert s["scored"][1] == alone.targets.sum()
    assert s["recall_at_k"][1] == pytest.approx(alone.overall, abs=0.03)


def test_deterministic(trace):
    a, b = build(trace), build(trace)
    ra, rb = recall_at_k(a, trace.head(400), 1), recall_at_k(b, trace.head(400), 1)
    np.testing.assert_array_equal(ra.hits, rb.hits)
    assert a.scores() == b.scores()


def test_bounded_memory_and_hidden_members(trace):
    from policies.speculation import NextGateSpeculation
    rng = np.random.default_rng(0)
    gates = {l: rng.standard_normal((E, 8)).astype(np.float32) for l in range(L)}
    from policies.predictors import CrossLayerTransition
    ens = Ensemble({"spec": NextGateSpeculation(gates, K), "cl": CrossLayerTransition(L, E, K, max_requests=4)},
                   L, E, K, max_requests=4)
    for r in range(50):  # requests never ended; events without hidden states: the speculation member skips them
        ens.observe(RoutingEvent(r, 0, 0, trace.experts[r, 0]))
    assert len(ens._reqs) == 4 and len(ens.members[0]._reqs) == 0
    one = ens._req_nbytes(ens._reqs[49])
    assert ens.state_nbytes() <= ens.members[0].state_nbytes() + ens.members[1].state_nbytes() + 4 * (one + 64 + 8 * K) \
        + sum(a.nbytes for a in ens._arrays())


# -- the registry -----------------------------------------------------------------------------------------------

def test_registry_builds_every_name_and_refuses_bad_input(trace):
    geo = dict(num_layers=L, num_experts=E, top_k=K)
    with pytest.raises(ValueError, match="valid names: on_demand, oracle"):
        make_predictor("lru", **geo)
    with pytest.raises(ValueError, match="needs trace"):
        make_predictor("oracle", **geo)
    with pytest.raises(ValueError, match="router_weights"):
        make_predictor("next_gate", **geo)
    with pytest.raises(ValueError, match="store_dir"):
        make_predictor("learned", **geo)
    rng = np.random.default_rng(0)
    gates = {l: rng.standard_normal((E, 8)).astype(np.float32) for l in range(L)}
    assert set(available_names(trace=trace, router_weights=gates, practical=False)) == \
        set(PREDICTOR_NAMES) - {"learned", "pre_gated", "ensemble"}
    ev = RoutingEvent(0, 0, 0, trace.experts[0, 0], None, rng.standard_normal(8).astype(np.float32))
    for name in available_names(trace=trace, router_weights=gates, practical=False) + ("ensemble",):
        p = make_predictor(name, **geo, trace=trace, router_weights=gates)
        assert (p.L, p.E, p.K) == (L, E, K)
        p.observe(ev)
        c = p.predict(0, 2)
        assert ((c.prob > 0) & (c.prob <= 1)).all() and set(c.distance.tolist()) <= {1, 2}
    ens = make_predictor("ensemble", **geo, trace=trace, router_weights=gates)
    assert "next_gate" in ens.names and "oracle" not in ens.names and "on_demand" not in ens.names
    # not the whole-request warm-up, nor the seed's own mixture of what the other members give (half the cost)
    assert "request_level" not in ens.names and "intelligent_adaptive" not in ens.names, ens.names
    assert {"multi_lookahead", "cross_layer", "topk_frequency", "previous_token"} <= set(ens.names), ens.names
    ens = make_predictor("ensemble", **geo, members=["cross_layer", "previous_token"])
    assert ens.names == ["cross_layer", "previous_token"]
    with pytest.raises(ValueError, match="ensemble members"):
        make_predictor("ensemble", **geo, members=["ensemble"])


def test_a_request_the_ensemble_drops_at_its_cap_is_dropped_by_its_members_too():
    """Past `max_requests` live requests the ensemble forgets the oldest; its members forget it with it, so that
    nobody predicts for it from a position the ensemble no longer knows (their layers would be mislabelled)."""
    L, E, K = 8, 8, 2
    ens = make_predictor("ensemble", num_layers=L, num_experts=E, top_k=K, members=["previous_token"])
    ens.max_requests = 3
    for r in range(4):   # each at token 1, layer 4
        for t, n in ((0, L), (1, 5)):
            for l in range(n):
                ens.observe(RoutingEvent(r, t, l, np.array([l, l + 1]) % E))
    m = ens.members[0]
    assert 0 not in m._reqs and 3 in m._reqs
    assert sorted(set(ens.predict(3, 2).layer.tolist())) == [5, 6]      # a request it keeps: the next layers
    assert sorted(set(ens.predict(0, 2).layer.tolist())) == sorted(set(m.predict(0, 2).layer.tolist()))


def _layer_events(n_tokens, reqs, seed, prefill_every=0):
    """One layer event after another: (requests, tokens, layer, experts [R, K]), requests joining at different
    tokens; every `prefill_every`-th event repeats its first request's next token (a prefill)."""
    rng = np.random.default_rng(seed)
    start = {r: i for i, r in enumerate(reqs)}
    out = []
    for t in range(n_tokens):
        for l in range(L):
            rows = [r for r in reqs if rng.random() < 0.9]
            toks = [start[r] + t for r in rows]
            if prefill_every and len(out) % prefill_every == 0 and rows:
                rows, toks = rows + [rows[0]], toks + [toks[0] + 1]
            if rows:
                ids = np.stack([np.sort(rng.choice(E, K, replace=False)) if rng.random() < 0.6 else
                                (np.arange(K) + l) % E for _ in rows])
                out.append((rows, np.array(toks), l, ids))
    return out


def _state(e: Ensemble):
    return [e.logw, e.hits, e.n, e.sel, e.selhit] + [a for st in e._reqs.values()
                                                      for a in (st.P, st.top, st.sel, st.ppos)]


@pytest.mark.parametrize("prefill_every", [0, 5])
def test_batched_observe_equals_row_by_row_where_no_row_sees_another(prefill_every):
    """Ensemble.observe_many scores every row, lets the members observe them all, then records their predictions
    for every row. With members whose predictions read only the request's own history (previous_token, and the
    next-gate-like hidden-only member below reads nothing) and one mixing weight, no row's prediction can see
    another row: the whole state, the scores and every prediction must be bit-for-bit those of observe() row by
    row, prefills (a request twice in an event: row by row) included."""
    def make():
        return Ensemble({"previous_token": make_predictor("previous_token", num_layers=L, num_experts=E, top_k=K)},
                        L, E, K, horizon=3)
    a, b = make(), make()
    batched = 0
    for rows, toks, l, ids in _layer_events(40, ["r0", "r1", "r2"], seed=2, prefill_every=prefill_every):
        for r, t, x in zip(rows, toks, ids):
            a.observe(RoutingEvent(r, int(t), l, x))
        b.observe_many(rows, toks, l, ids)
        batched += len(set(rows)) == len(rows) > 1
        for r in ["r0", "r1", "r2", "never-seen"]:
            x, y = a.predict(r, 3), b.predict(r, 3)
            assert np.array_equal(x.expert, y.expert) and np.array_equal(x.prob, y.prob), r
    assert batched > 60, "the batched path was hardly exercised"
    b.observe_many([], np.zeros(0, np.int64), 0, np.zeros((0, K), np.int64))   # an empty event changes nothing
    for x, y in zip(_state(a), _state(b)):
        assert np.array_equal(x, y)
    assert a.scores() == b.scores() and a.scores()["members"]["previous_token"]["scored"][0] > 300


def test_batched_observe_keeps_the_default_ensembles_recall():
    """The default members (their predictions do read other requests' rows through shared tables): taking a
    layer's predictions after the whole layer, not mid-layer, leaves every member's and the mix's recall@k within
    0.01 of row by row, and the members' own predictions equal up to float32 rounding (each observes the rows in
    the same order; Multi-Look-Ahead's batched decay rounds differently)."""
    a, b = (make_predictor("ensemble", num_layers=L, num_experts=E, top_k=K) for _ in range(2))
    reqs = list(range(4))
    events = _layer_events(60, reqs, seed=3)
    for rows, toks, l, ids in events:
        for r, t, x in zip(rows, toks, ids):
            a.observe(RoutingEvent(r, int(t), l, x))
        b.observe_many(rows, toks, l, ids)
    sa, sb = a.scores(), b.scores()
    for name in list(sa["members"]) + ["ensemble"]:
        x = sa["members"][name] if name in sa["members"] else sa["ensemble"]
        y = sb["members"][name] if name in sb["members"] else sb["ensemble"]
        assert x["scored"] == y["scored"], name
        for d in range(3):
            assert abs(x["recall_at_k"][d] - y["recall_at_k"][d]) <= 0.01, (name, d, x, y)
    assert sa["ensemble"]["recall_at_k"][0] > 0.4, "the events gave the members nothing to learn (chance: 1/6)"
    for m1, m2 in zip(a.members, b.members):
        for r in reqs:
            x, y = m1.predict(r, 2), m2.predict(r, 2)
            assert np.array_equal(x.expert, y.expert), m1.name
            np.testing.assert_allclose(y.prob, x.prob, rtol=1e-5, err_msg=m1.name)


def test_predict_many_equals_predict():
    """The coordinator's per-step call mixes every observed request at once: bit-for-bit (values and dtypes)
    predict() of each, for horizons below, at and past the ensemble's C, requests at different positions and one
    never seen (asked of the members directly)."""
    p = make_predictor("ensemble", num_layers=L, num_experts=E, top_k=K)
    rng, compared = np.random.default_rng(8), 0
    for i, (rows, toks, l, ids) in enumerate(_layer_events(30, ["a", "b", "c"], seed=4)):
        p.observe_many(rows, toks, l, ids)
        if i % 3 == 0:
            asked = ["a", "b", "c", "never-seen"]
            hs = [int(h) for h in rng.integers(1, p.C + 3, len(asked))]
            for r, h, got in zip(asked, hs, p.predict_many(asked, hs)):
                want = p.predict(r, h)
                for f in ("distance", "layer", "expert", "prob"):
                    x, y = getattr(want, f), getattr(got, f)
                    assert x.dtype == y.dtype and np.array_equal(x, y), (i, r, h, f)
                compared += len(want)
    assert compared > 500, "too few candidates were compared"


def test_a_position_routed_twice_is_scored_once():
    """A layer event delivered twice (a runtime's retry) scores the predictions made for it once: the second
    delivery finds them spent, whether it comes batched or row by row."""
    p = make_predictor("ensemble", num_layers=L, num_experts=E, top_k=K)
    events = _layer_events(6, ["a", "b"], seed=5)
    for rows, toks, l, ids in events:
        p.observe_many(rows, toks, l, ids)
    rows, toks, l, ids = events[-1]
    scored = [s["scored"] for s in p.scores()["members"].values()]
    p.observe_many(rows, toks, l, ids)
    p.observe(RoutingEvent(rows[0], int(toks[0]), l, ids[0]))
    assert [s["scored"] for s in p.scores()["members"].values()] == scored and scored[0][0] > 0


def test_a_copied_ensemble_keeps_scoring():
    """A deep copy and an unpickled copy score what they observe next exactly as the original does (the decayed
    sums are one array; scores() must read the one the scoring moves, in a copy too)."""
    import copy
    import pickle
    p = make_predictor("ensemble", num_layers=L, num_experts=E, top_k=K)
    events = _layer_events(20, ["a", "b"], seed=6)
    for rows, toks, l, ids in events[:40]:
        p.observe_many(rows, toks, l, ids)
    copies = [copy.deepcopy(p), pickle.loads(pickle.dumps(p))]
    for rows, toks, l, ids in events[40:]:
        for q in [p] + copies:
            q.observe_many(rows, toks, l, ids)
    assert p.scores()["ensemble"]["scored"][0] > 40
    assert all(q.scores() == p.scores() for q in copies)
