"""Request-level prediction (policies/request_level.py), no Ray: past requests of a few kinds, each kind with its
own per-layer expert map; a new request's prompt signature (an embedding mean, or its own first tokens' routing)
finds past requests of its kind, and its whole-request map predicts its experts before it decodes."""
import numpy as np
import pytest

from policies.predictors import RoutingEvent, TopKFrequency
from policies.request_level import RequestLevel

L, E, K, KINDS, S = 4, 16, 2, 4, 32


def kinds(seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((KINDS, S)).astype(np.float32)     # prompt embedding means per kind
    favourite = np.stack([np.stack([rng.choice(E, 4, replace=False) for _ in range(L)]) for _ in range(KINDS)])
    return rng, centres, favourite                                    # favourite [KINDS, L, 4]


def run_request(p, rng, fav, rid, tokens=20, signature=None):
    """Each token picks K of its kind's 4 favourite experts at every layer."""
    if signature is not None:
        p.begin(rid, signature)
    for t in range(tokens):
        for l in range(L):
            p.observe(RoutingEvent(rid, t, l, rng.choice(fav[l], K, replace=False)))


def test_finds_the_right_past_requests_by_embedding():
    rng, centres, fav = kinds()
    p = RequestLevel(L, E, K, neighbours=4, capacity=64)
    for i in range(24):
        k = i % KINDS
        run_request(p, rng, fav[k], ("past", i, k), signature=centres[k] + 0.3 * rng.standard_normal(S))
        p.end(("past", i, k))
    for k in range(KINDS):
        rid = ("new", k)
        p.begin(rid, centres[k] + 0.3 * rng.standard_normal(S))
        nb = p.neighbours(rid)
        assert len(nb) == 4 and all(n[0][2] == k for n in nb), nb
        assert all(a[1] >= b[1] for a, b in zip(nb, nb[1:]))        # most similar first
        m = p.request_map(rid)                                        # [L, E] before any token of it ran
        for l in range(L):
            assert set(np.argsort(-m[l])[:4].tolist()) == set(fav[k, l].tolist())
        # predict() before the first event: the map's rows for token 0's layers, top-k within the favourites
        c = p.predict(rid, L)
        for d in range(1, L + 1):
            assert set(c.at(d).top(K).tolist()) <= set(fav[k, d - 1].tolist())


def test_routing_signature_without_begin_and_beats_frequency():
    rng, _, fav = kinds(1)
    p = RequestLevel(L, E, K, signature_tokens=4, capacity=64)
    f = TopKFrequency(L, E, K)
    hits_p = hits_f = n = 0
    for i in range(40):
        k = i % KINDS
        rid = i
        for t in range(12):
            for l in range(L):
                ex = rng.choice(fav[k, l], K, replace=False)
                if t >= 4 and i >= 8:  # score once the signature exists (and the store has every kind)
                    cp, cf = p.predict(rid, 1), f.predict(rid, 1)
                    hits_p += len(set(cp.at(1).top(K).tolist()) & set(ex.tolist()))
                    hits_f += len(set(cf.at(1).top(K).tolist()) & set(ex.tolist()))
                    n += K
                ev = RoutingEvent(rid, t, l, ex)
                p.observe(ev)
                f.observe(ev)
        if i >= 8:
            assert all(rid_ % KINDS == k for rid_, _ in p.neighbours(rid)[:2]), p.neighbours(rid)
        p.end(rid)
        f.end(rid)
    # ceiling: K of the kind's 4 favourites drawn uniformly, so knowing the kind gives recall K/4 = 0.5
    assert hits_p / n > 0.45 and hits_p / n > hits_f / n + 0.15, (hits_p / n, hits_f / n)


def test_bounded_memory_and_signature_length():
    rng, centres, fav = kinds(2)
    p = RequestLevel(L, E, K, capacity=8, max_requests=4)
    for i in range(100):
        run_request(p, rng, fav[i % KINDS], i, tokens=2, signature=centres[i % KINDS])
        if i % 2:
            p.end(i)                                                  # half are never ended
    assert p.filled == 8 and len(p._reqs) <= 4
    assert p.state_nbytes() <= 8 * (S * 4 + L * E * 4) + 4 * (64 + 8 * K + 2 * (L * E + L + S) * 4) + 4096
    with pytest.raises(ValueError, match="signature has 3 values"):
        p.begin("x", np.ones(3))
