"""The runtime's fast path (policies/fast_path.py), no Ray: the batched per-row speculator gives exactly what the
per-request predictors it mirrors give for the same events (learned, next-gate, pre-gated), across interleaved
rows, a row reused by a new request, and a prefill; the order filter keeps each row's likely top experts."""
import numpy as np
import pytest

from policies.fast_path import NextLayerSpeculator, likely_experts, order_filter
from policies.learned import LearnedPredictor, PreGated
from policies.predictors import CrossLayerTransition, RoutingEvent
from policies.speculation import NextGateSpeculation
from policies.traces import synthetic_trace

L, E, K, H, R, D, U = 4, 8, 2, 16, 6, 2, 12


def random_learned_d(d: int, seed=0, rank: int = R) -> LearnedPredictor:
    """random_learned with horizon d (the speculator splits w1 by distance: a distance of L targets layer l itself)
    and compression rank (rank >= H: the speculator folds the compression into its product)"""
    rng = np.random.default_rng(seed)
    F = 2 * rank + 2 * E
    h = H if rank else 0   # rank 0: a routing-only predictor (no hidden state)
    w = {"mean": rng.normal(size=h), "proj": rng.normal(size=(h, rank)) * 0.3,
         "w1": rng.normal(size=(L, d, F, U)) * 0.3, "b1": rng.normal(size=(L, d, U)) * 0.1,
         "w2": rng.normal(size=(L, d, U, E)) * 0.3, "b2": rng.normal(size=(L, d, E)) * 0.1}
    return LearnedPredictor({k: v.astype(np.float32) for k, v in w.items()}, K, finetune=False)


def random_learned(seed=0) -> LearnedPredictor:
    return random_learned_d(D, seed)


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(120, L, E, K, correlation=0.5, num_requests=6, hidden_dim=H, seed=3)


def dense(c, depth: int) -> np.ndarray:
    """Candidates -> [depth, E] probabilities (0 where not predicted)."""
    P = np.zeros((depth, E))
    P[c.distance - 1, c.expert] = c.prob
    return P


def decode_batches(trace, rows: int):
    """Requests in `rows` decode slots, a new request taking a slot as soon as its last one ends (what the
    engine does): yields per step (slot rows [n], requests [n], token positions [n])."""
    nxt, slot_req, slot_tok = 0, [-1] * rows, [0] * rows
    while True:
        for s in range(rows):
            if slot_req[s] < 0 and nxt < trace.num_requests:
                slot_req[s], slot_tok[s], nxt = nxt, 0, nxt + 1
        live = [s for s in range(rows) if slot_req[s] >= 0]
        if not live:
            return
        yield np.array(live), np.array([slot_req[s] for s in live]), np.array([slot_tok[s] for s in live])
        for s in live:
            slot_tok[s] += 1
            r = slot_req[s]
            if slot_tok[s] >= trace.offsets[r + 1] - trace.offsets[r]:
                slot_req[s] = -1


@pytest.mark.parametrize("depth,absorb,rank,ascending", [(D, False, R, False), (L, True, R, False),
                                                         (L, False, R, False), (1, True, R, False),
                                                         (L, True, H, True), (D, False, H + 2, False)])
def test_learned_rows_match_the_per_request_predictor(trace, depth, absorb, rank, ascending):
    """Depths short of L and equal to it (the last distance wraps onto layer l itself; LearnedPredictor allows no
    more than L), with the state absorbed between steps (as the runtime defers it) or left to the next step; a
    compression narrower than the router input, and one as wide or wider (folded into the step's product); rows
    in any order, or ascending (a decode step's: the step skips its sort)."""
    ref = random_learned_d(depth, rank=rank)
    spec = NextLayerSpeculator(L, E, K, depth=depth, learned=random_learned_d(depth, rank=rank), rows=1)
    assert spec._folded == (rank >= H)
    checked = 0
    for rows, reqs, toks in decode_batches(trace, 3):       # 6 requests through 3 rows: every row is reused
        at = trace.offsets[reqs] + toks
        for l in range(L):
            ids, hid = trace.experts[at, l].astype(np.int64), trace.hidden[at, l].astype(np.float32)
            o = slice(None) if ascending else slice(None, None, -1)
            urows, P = spec.step(l, rows[o], toks[o], ids[o], hid[o])
            if absorb:
                spec.absorb()
            assert urows.tolist() == sorted(rows.tolist()) and P.shape == (depth, len(rows), E)
            for n, r in enumerate(reqs.tolist()):
                ref.observe(RoutingEvent(r, int(toks[n]), l, ids[n], None, hid[n]))
            for n, r in enumerate(reqs.tolist()):
                want = dense(ref.predict(r, depth), depth)
                got = P[:, urows.tolist().index(int(rows[n]))]
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
                checked += 1
        for r, s, t in zip(reqs.tolist(), rows.tolist(), toks.tolist()):
            if t + 1 >= trace.offsets[r + 1] - trace.offsets[r]:
                ref.end(r)
    assert checked == trace.num_tokens * L


@pytest.mark.parametrize("depth,absorb", [(D, False), (L, True)])
def test_routing_only_learned_rows_match_the_per_request_predictor(trace, depth, absorb):
    """A routing-only learned predictor (R = H = 0, jobs.train_predictor --routing-only) on the fast path: no hidden
    state is read (the step is given None), and each row's P equals the per-request predictor's, fed no hidden
    state either."""
    ref = random_learned_d(depth, 5, rank=0)
    spec = NextLayerSpeculator(L, E, K, depth=depth, learned=random_learned_d(depth, 5, rank=0), rows=1)
    assert not ref.needs_hidden and not spec.hidden
    checked = 0
    for rows, reqs, toks in decode_batches(trace, 3):
        at = trace.offsets[reqs] + toks
        for l in range(L):
            ids = trace.experts[at, l].astype(np.int64)
            urows, P = spec.step(l, rows[::-1], toks[::-1], ids[::-1], None)
            if absorb:
                spec.absorb()
            for n, r in enumerate(reqs.tolist()):
                ref.observe(RoutingEvent(r, int(toks[n]), l, ids[n]))
            for n, r in enumerate(reqs.tolist()):
                got = P[:, urows.tolist().index(int(rows[n]))]
                np.testing.assert_allclose(got, dense(ref.predict(r, depth), depth), rtol=2e-5, atol=2e-6)
                checked += 1
        for r, t in zip(reqs.tolist(), toks.tolist()):
            if t + 1 >= trace.offsets[r + 1] - trace.offsets[r]:
                ref.end(r)
    assert checked == trace.num_tokens * L
    # what it predicts depends on the routing: another layer-0 selection gives other probabilities
    a = NextLayerSpeculator(L, E, K, depth=1, learned=random_learned_d(1, 5, rank=0))
    p0 = a.step(0, np.array([0]), np.array([0]), np.array([[0, 1]]), None)[1]
    p1 = a.step(0, np.array([1]), np.array([0]), np.array([[2, 3]]), None)[1]
    assert not np.allclose(p0, p1)


@pytest.mark.parametrize("reused,rank", [(False, R), (True, R), (True, H)])
def test_prefill_predicts_the_rows_last_position(trace, reused, rank):
    """A prefill routes every prompt position of a row at once: the prediction is its last position's, equal to
    the per-request predictor fed the prefill layer by layer (as the runtime routes it). A row an earlier request
    used starts afresh at the prefill."""
    ref = random_learned_d(D, 1, rank)
    spec = NextLayerSpeculator(L, E, K, depth=D, learned=random_learned_d(D, 1, rank))
    n = 5
    if reused:   # an earlier request decoded 3 tokens on row 0
        for t in range(3):
            for l in range(L):
                at = 60 + t
                spec.step(l, np.zeros(1, np.int64), np.array([t]), trace.experts[at:at + 1, l].astype(np.int64),
                          trace.hidden[at:at + 1, l].astype(np.float32))
    rows, toks = np.zeros(n, np.int64), np.arange(n)
    for l in range(L):
        ids, hid = trace.experts[:n, l].astype(np.int64), trace.hidden[:n, l].astype(np.float32)
        urows, P = spec.step(l, rows, toks, ids, hid)
        for t in range(n):
            ref.observe(RoutingEvent("p", t, l, ids[t], None, hid[t]))
        assert urows.tolist() == [0]
        np.testing.assert_allclose(P[:, 0], dense(ref.predict("p", D), D), rtol=2e-5, atol=2e-6)


def test_absorb_after_an_empty_step():
    """A step that routed no rows leaves nothing to absorb wrongly (the runtime skips such steps; a direct
    caller may not)."""
    spec = NextLayerSpeculator(L, E, K, depth=D, learned=random_learned())
    before = spec.hist.copy()   # every row at its start state (the input layer's constants)
    urows, P = spec.step(1, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, K), np.int64),
                         np.zeros((0, H), np.float32))
    assert len(urows) == 0 and P.shape == (D, 0, E)
    spec.absorb()
    np.testing.assert_array_equal(spec.hist, before)


def test_next_gate_and_pre_gates_match_their_predictors(trace):
    rng = np.random.default_rng(0)
    gates = rng.normal(size=(L, E, H)).astype(np.float32)
    ng = NextGateSpeculation({l: gates[l] for l in range(L)}, K, temperature=1.0)
    spec = NextLayerSpeculator(L, E, K, depth=2, gates=gates)
    pre = {m: rng.normal(size=(E, H)).astype(np.float32) for m in (1, 3)}   # layers 0 and 2 have none
    pg = PreGated(pre, L, K)
    pspec = NextLayerSpeculator(L, E, K, pre_gates=pre)
    assert (spec.source, spec.depth, pspec.source, pspec.depth) == ("next_gate", 2, "pre_gated", 1)
    for t in range(6):
        for l in range(L):
            ids, hid = trace.experts[t, l].astype(np.int64), trace.hidden[t, l].astype(np.float32)
            ev = RoutingEvent("r", t, l, ids, None, hid)
            ng.observe(ev)
            pg.observe(ev)
            _, P = spec.step(l, np.array([0]), np.array([t]), ids[None], hid[None])
            np.testing.assert_allclose(P[:, 0], dense(ng.predict("r", 2), 2), rtol=1e-5, atol=1e-7)
            _, P = pspec.step(l, np.array([0]), np.array([t]), ids[None], hid[None])
            np.testing.assert_allclose(P[:, 0], dense(pg.predict("r", 1), 1), rtol=1e-5, atol=1e-7)
            assert P.any() == ((l + 1) % L in pre)


def test_transition_rows_match_the_cross_layer_predictor(trace):
    """Routing only (no hidden state): the runtime's transition counts, learned from each row's consecutive
    layers across interleaved and reused rows, give CrossLayerTransition's prediction at distances 1 and 2."""
    ref, spec = CrossLayerTransition(L, E, K), NextLayerSpeculator(L, E, K, depth=2, transition=True, rows=1)
    assert not spec.hidden
    checked = 0
    for rows, reqs, toks in decode_batches(trace, 3):
        at = trace.offsets[reqs] + toks
        for l in range(L):
            ids = trace.experts[at, l].astype(np.int64)
            urows, P = spec.step(l, rows, toks, ids, None)
            for n, r in enumerate(reqs.tolist()):
                ref.observe(RoutingEvent(r, int(toks[n]), l, ids[n]))
            for n, r in enumerate(reqs.tolist()):
                np.testing.assert_allclose(P[:, urows.tolist().index(int(rows[n]))], dense(ref.predict(r, 2), 2),
                                           rtol=1e-5, atol=1e-7)
                checked += 1
        for r, t in zip(reqs.tolist(), toks.tolist()):
            if t + 1 >= trace.offsets[r + 1] - trace.offsets[r]:
                ref.end(r)
    assert checked == trace.num_tokens * L and spec.counts.sum() > 0


def test_likely_experts_keeps_each_rows_top_above_the_threshold():
    P = np.array([[0.9, 0.5, 0.3, 0.1], [0.1, 0.2, 0.6, 0.05]], np.float32)
    assert np.flatnonzero(likely_experts(P, 0.25, 2)).tolist() == [0, 1, 2]   # row 1's 0.2 is below 0.25
    assert np.flatnonzero(likely_experts(P, 0.25, 1)).tolist() == [0, 2]      # one per row
    assert np.flatnonzero(likely_experts(P, 0.95, 4)).tolist() == []
    assert not likely_experts(np.zeros((0, 4), np.float32), 0.1, 2).any()
    # stacked distances [D, n, E]: each slice as alone
    S = np.stack([P, P[::-1] * 0.5, np.zeros_like(P)])
    got = likely_experts(S, 0.25, 2)
    assert got.shape == (3, 4)
    for d in range(3):
        assert got[d].tolist() == likely_experts(S[d], 0.25, 2).tolist()
    assert got[1].tolist() == likely_experts(P * 0.5, 0.25, 2).tolist() and not got[2].any()
    assert likely_experts(np.zeros((2, 0, 4), np.float32), 0.1, 2).shape == (2, 4)


@pytest.mark.parametrize("rows", [1, 3])
def test_likely_experts_per_distance_equals_each_rows_ranking(rows):
    """[depth, n, E] at once (one row: the decode step's shorter path) against ranking each row by hand, ties
    included (an expert tied with the fanout-th largest goes too)."""
    rng = np.random.default_rng(rows)
    P = rng.choice(np.linspace(0.0, 1.0, 9), size=(3, rows, E)).astype(np.float32)   # coarse: ties happen
    got = likely_experts(P, 0.3, 3)
    assert got.shape == (3, E)
    for d in range(3):
        want = np.zeros(E, bool)
        for n in range(rows):
            kth = sorted(P[d, n].tolist(), reverse=True)[2]
            want |= (P[d, n] >= kth) & (P[d, n] >= 0.3)
        assert got[d].tolist() == want.tolist()


def test_from_sources_prefers_a_trained_predictor(tmp_path):
    rng = np.random.default_rng(0)
    dense_t = {f"model.layers.{l}.block_sparse_moe.gate.weight": rng.normal(size=(E, H)).astype(np.float32)
               for l in range(L)}
    assert NextLayerSpeculator.from_sources(L, E, K, store_dir=str(tmp_path), dense=None) is None
    assert NextLayerSpeculator.from_sources(L, E, K, store_dir=str(tmp_path), dense=dense_t).source == "next_gate"
    random_learned().save(tmp_path)
    s = NextLayerSpeculator.from_sources(L, E, K, store_dir=str(tmp_path), dense=dense_t, depth=3)
    assert (s.source, s.depth) == ("learned", D)          # depth capped by the predictor's horizon
    s = NextLayerSpeculator.from_sources(L, E, K, store_dir=str(tmp_path), dense=dense_t, prefer="next_gate")
    assert s.source == "next_gate"
    with pytest.raises(AssertionError, match="exactly one"):
        NextLayerSpeculator(L, E, K)


def test_order_filter_defaults_by_source():
    """Unset speculate_threshold / speculate_fanout: hidden-state sources order P >= 0.35 up to top-k + 1 per row,
    the transition counts (which spread P thinner) P >= 0.5 up to top-k."""
    for src in ("learned", "next_gate", "pre_gated"):
        assert order_filter(src, 2) == (0.35, 3)
    assert order_filter("transition", 2) == (0.5, 2) and order_filter("transition", 6) == (0.5, 6)
