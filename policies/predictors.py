"""History-based expert predictors: which experts the next MoE layers of a request will select.

The interface (every predictor):
  observe(event)              one routed (request, token, layer), in the order the runtime routes them: per request,
                              token after token and layer after layer (requests may interleave). Unknown
                              (unrecorded) positions are simply not observed.
  predict(request, horizon)   -> Candidates for the `horizon` layers after the request's last observed event:
                              distance d = 1..horizon is layer (l + d) mod L of token t + (l + d) // L, so a
                              prediction made at the last layer wraps into the next token's first layers. Before
                              the first event, the "last event" is (token -1, layer L-1): the next layers are
                              token 0's first ones.
  observe_many(requests, tokens, layer, experts, probs, hidden)
                              one layer's routing of several requests (rows in routing order): the same as
                              observe() of each row in row order; the coordinator calls it once per layer event.
  predict_many(requests, horizons)
                              -> [Candidates], the same as predict() of each; the coordinator's per-step call.
                              The base class loops; a predictor whose tables allow it vectorizes both over the
                              requests (CrossLayerTransition does), so a layer step costs about one request's.
  end(request)                the request finished: drop its per-request state (shared tables stay).
  state_nbytes()              bytes of state held (shared tables + live requests); what the bounded-memory
                              tests watch.

Candidates are flat arrays over (distance, expert) pairs with a positive probability, each expert at most once per
distance; `prob` estimates P(expert is among the top-k selected at that position) and lies in (0, 1], so
predictors can be compared and ranked on one scale (a consumer takes the top-k per distance, or thresholds).

Memory is bounded: shared state is fixed-size numpy tables ([L, E] or [L, E, E]) whose values may decay; per-request
state is O(L * K) and dropped by `end`; and in case a caller never calls `end`, at most `max_requests` requests
are tracked (the least recently observed is forgotten first).

Predictors here: OnDemand (nothing), Oracle (the future from a RoutingTrace: upper bounds only), TopKFrequency
(per-layer counts), CrossLayerTransition (P(expert at the next layer | experts at this layer), chained for
distance > 1), PreviousToken (the same layer's experts of the request's previous token).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import numpy as np

from .traces import RoutingTrace


@dataclass(frozen=True)
class RoutingEvent:
    request: Hashable           # request id (replay uses the trace's request index)
    token: int                  # token position within the request, 0-based
    layer: int                  # MoE layer index, 0-based
    experts: np.ndarray         # int [K]: the selected experts (any order)
    probs: np.ndarray | None = None   # float [K]: router weights of `experts`, same order; None if not recorded
    hidden: np.ndarray | None = None  # float [H]: the hidden state entering this layer's router; None if absent


@dataclass(frozen=True)
class Candidates:
    distance: np.ndarray  # int64 [N]: layers ahead of the last observed event, 1..horizon
    layer: np.ndarray     # int64 [N]: the target MoE layer, (last layer + distance) mod L
    expert: np.ndarray    # int64 [N]
    prob: np.ndarray      # float64 [N]: estimated P(selected), in (0, 1]

    def __len__(self) -> int:
        return len(self.expert)

    @staticmethod
    def empty() -> "Candidates":
        z = np.zeros(0, np.int64)
        return Candidates(z, z, z, np.zeros(0))

    def at(self, distance: int) -> "Candidates":
        m = self.distance == distance
        return Candidates(self.distance[m], self.layer[m], self.expert[m], self.prob[m])

    def top(self, k: int) -> np.ndarray:
        """int64 [<=k]: the k most probable experts among these (ties: lower expert id); use on one distance."""
        order = np.lexsort((self.expert, -self.prob))[:k]
        return self.expert[order]


def _from_dense(P: np.ndarray, layers: np.ndarray) -> Candidates:
    """P [D, E] (row d-1 = distance d), layers [D] -> Candidates of the positive entries."""
    d, e = np.nonzero(P > 0)
    return Candidates(d + 1, layers[d].astype(np.int64), e.astype(np.int64), np.minimum(P[d, e], 1.0))


def _from_dense_many(P: np.ndarray, layers: np.ndarray, horizons) -> list[Candidates]:
    """P [R, D, E], layers [R, D], horizons [R] -> [_from_dense(P[r, :h_r], layers[r, :h_r]) for each r], from one
    nonzero over all of them."""
    r, d, e = np.nonzero((P > 0) & _within(horizons, P.shape[1])[..., None])
    return _split_rows(r, len(P), d + 1, layers[r, d].astype(np.int64), e.astype(np.int64),
                       np.minimum(P[r, d, e], 1.0))


def _dense32(P: np.ndarray) -> np.ndarray:
    """Dense probabilities as their candidates carry them: min(P, 1) where P > 0, else 0; float32."""
    return np.where(P > 0, np.minimum(P, 1.0), 0.0).astype(np.float32)


def _within(horizons, D: int) -> np.ndarray:
    """bool [R, D]: distance d + 1 is within request r's horizon."""
    return np.arange(D)[None, :] < np.asarray(horizons)[:, None]


def _split_rows(r: np.ndarray, R: int, dist, lay, ex, prob) -> list[Candidates]:
    """Flat candidate columns sorted by request row r -> one Candidates per request 0..R-1."""
    cut = np.searchsorted(r, np.arange(R + 1)).tolist()
    return [Candidates(dist[a:b], lay[a:b], ex[a:b], prob[a:b]) for a, b in zip(cut[:-1], cut[1:])]


def _targets(p: "Predictor", requests: list, horizon: int) -> tuple[list, np.ndarray, np.ndarray]:
    """The requests' states (None: unknown), their last positions [R] (token * L + layer; -1 before the first
    event) and their next `horizon` target layers [R, horizon], as predict() counts them."""
    sts = [p._reqs.get(r) for r in requests]
    here = np.array([-1 if st is None or st.experts is None else st.token * p.L + st.layer for st in sts])
    return sts, here, (here[:, None] + np.arange(1, horizon + 1)) % p.L


@dataclass
class _Req:
    token: int = -1
    layer: int = -1
    experts: np.ndarray | None = None  # int [K] of the last observed event
    last: np.ndarray | None = None     # PreviousToken: int [L, K] most recent experts per layer, -1 none yet


class Predictor:
    """Base: per-request position tracking, the request cap and the empty prediction. Subclasses override
    `_observe` / `_predict` and report their arrays in `_arrays` for state_nbytes."""
    name = "base"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, max_requests: int = 4096):
        assert num_layers >= 1 and num_experts >= 1 and 1 <= top_k <= num_experts, \
            f"bad geometry L={num_layers} E={num_experts} K={top_k}"
        self.L, self.E, self.K = num_layers, num_experts, top_k
        self.max_requests = max_requests
        self._reqs: OrderedDict[Hashable, _Req] = OrderedDict()

    # -- the interface -----------------------------------------------------------------------------------------
    def observe(self, event: RoutingEvent) -> None:
        assert 0 <= event.layer < self.L, f"layer {event.layer} outside [0, {self.L})"
        ex = np.array(event.experts, dtype=np.int64)  # a copy: the caller may reuse its buffer
        assert ex.shape == (self.K,), f"expected {self.K} experts, got shape {ex.shape}"
        assert 0 <= ex.min() and ex.max() < self.E, f"expert ids {ex.tolist()} outside [0, {self.E})"
        st = self._track(event.request)
        self._observe(st, event, ex, self._adjacent(st, event.token, event.layer))
        st.token, st.layer, st.experts = event.token, event.layer, ex

    def observe_many(self, requests: list, tokens: np.ndarray, layer: int, experts: np.ndarray,
                     probs: np.ndarray | None = None, hidden: np.ndarray | None = None) -> None:
        """Rows of one layer's routing: requests [N], tokens int [N], experts int [N, K], probs float [N, K] or
        None, hidden float [N, H] or None. The same as observe() of each row, in row order. A subclass with
        `_observe_rows` gets the rows of distinct requests at once; others (and a prefill) go row by row."""
        ex = None if self._observe_rows is None else self._distinct_rows(requests, int(layer), experts)
        if ex is not None:
            toks = np.asarray(tokens, np.int64).tolist()   # ints, as observe() keeps them
            sts = [self._track(r) for r in requests]
            self._observe_rows(sts, toks, int(layer), ex)
            self._moved_to(sts, toks, int(layer), ex)
            return
        for n, req in enumerate(requests):
            self.observe(RoutingEvent(req, int(tokens[n]), int(layer), experts[n],
                                      None if probs is None else probs[n], None if hidden is None else hidden[n]))

    def _distinct_rows(self, requests: list, layer: int, experts) -> np.ndarray | None:
        """A batched observe_many's entry: the rows' experts int64 [N, K] (a copy: the caller may reuse its buffer),
        checked as observe() checks one row; None where the rows must go row by row: fewer than two, or a request
        twice (a prefill: its rows chain into each other)."""
        N = len(requests)
        if N < 2 or len(set(requests)) < N:
            return None
        assert 0 <= layer < self.L, f"layer {layer} outside [0, {self.L})"
        ex = np.array(experts, dtype=np.int64)
        assert ex.shape == (N, self.K), f"expected [{N}, {self.K}] experts, got shape {ex.shape}"
        assert 0 <= ex.min() and ex.max() < self.E, f"expert ids outside [0, {self.E}) at layer {layer}"
        return ex

    # _observe_rows(sts, tokens, layer, ex): the rows of distinct requests (states sts, already tracked; tokens
    # list[int]; experts int64 [N, K]), to leave the tables as _observe of each row in row order would; the
    # requests' positions move after it. None: no batched form (observe_many goes row by row)
    _observe_rows = None

    @staticmethod
    def _moved_to(sts: list, tokens: list, layer: int, ex: np.ndarray) -> None:
        """The rows' requests (states sts) are now at (token, layer), having selected ex [N, K]."""
        for st, t, x in zip(sts, tokens, ex):
            st.token, st.layer, st.experts = t, layer, x

    def predict(self, request: Hashable, horizon: int = 1) -> Candidates:
        assert horizon >= 1, f"horizon must be >= 1, got {horizon}"
        st = self._reqs.get(request) or _Req()
        # target positions for distance 1..horizon as flat indices token * L + layer; nothing observed yet is
        # position -1 (token -1, layer L-1), so the targets are token 0's first layers
        here = st.token * self.L + st.layer if st.experts is not None else -1
        pos = here + np.arange(1, horizon + 1)
        return self._predict(request, st, pos // self.L, pos % self.L)

    def predict_many(self, requests: list, horizons: list[int]) -> list[Candidates]:
        """predict(requests[i], horizons[i]) for every i."""
        return [self.predict(r, h) for r, h in zip(requests, horizons)]

    def predict_dense_many(self, requests: list, horizon: int) -> np.ndarray:
        """float32 [R, horizon, E]: predict_many(requests, [horizon] * R) as dense rows (row d-1 = distance d, 0
        where no candidate), what the ensemble mixes. Predictors whose predict_many starts from dense rows override
        it with those rows, skipping the candidates and the scatter back."""
        R = len(requests)
        P = np.zeros((R, horizon, self.E), np.float32)
        cs = self.predict_many(requests, [horizon] * R)
        if not any(len(c) for c in cs):
            return P
        rows = np.repeat(np.arange(R), [len(c) for c in cs])
        dist = np.concatenate([c.distance for c in cs])
        m = dist <= horizon
        P[rows[m], dist[m] - 1, np.concatenate([c.expert for c in cs])[m]] = np.concatenate([c.prob for c in cs])[m]
        return P

    def end(self, request: Hashable) -> None:
        self._reqs.pop(request, None)

    def state_nbytes(self) -> int:
        per_req = sum(64 + (0 if s.experts is None else s.experts.nbytes) + self._req_nbytes(s)
                      for s in self._reqs.values())
        return sum(a.nbytes for a in self._arrays()) + per_req

    # -- for subclasses ----------------------------------------------------------------------------------------
    def _track(self, request: Hashable) -> _Req:
        """The request's state, created if new (the least recently observed forgotten past max_requests), and
        marked most recently observed."""
        st = self._reqs.get(request)
        if st is None:
            st = self._reqs[request] = self._new_request()
            while len(self._reqs) > self.max_requests:  # a caller that never calls end() cannot grow us
                self._forget(self._reqs.popitem(last=False)[0])
        else:
            self._reqs.move_to_end(request)
        return st

    def _adjacent(self, st: _Req, token: int, layer: int) -> bool:
        """(token, layer) directly follows the request's previous event (no unknown position between)."""
        return (st.experts is not None and
                (token, layer) == ((st.token, st.layer + 1) if st.layer + 1 < self.L else (st.token + 1, 0)))

    def _new_request(self) -> _Req:
        return _Req()

    def _forget(self, request: Hashable) -> None:
        """`request` was dropped by the request cap (its caller never ended it)."""

    def _observe(self, st: _Req, ev: RoutingEvent, experts: np.ndarray, adjacent: bool) -> None:
        pass

    def _predict(self, request, st: _Req, tokens: np.ndarray, layers: np.ndarray) -> Candidates:
        return Candidates.empty()

    def _arrays(self) -> list[np.ndarray]:
        return []

    def _req_nbytes(self, st: _Req) -> int:
        return 0


def _decay_factor(half_life: float | None) -> float:
    assert half_life is None or half_life > 0, f"half_life must be positive or None, got {half_life}"
    return 1.0 if half_life is None else 0.5 ** (1.0 / half_life)


class OnDemand(Predictor):
    """Predicts nothing: the baseline where every expert is fetched when routed to."""
    name = "on_demand"


class Oracle(Predictor):
    """The true future from `trace`, probability 1: an upper bound, not a policy. Request ids must be the trace's
    request indices (as replay uses); unknown future positions are not predicted."""
    name = "oracle"

    def __init__(self, trace: RoutingTrace, **kw):
        super().__init__(trace.num_layers, trace.num_experts, trace.top_k, **kw)
        self.trace = trace

    def _predict(self, request, st, tokens, layers):
        assert isinstance(request, (int, np.integer)) and 0 <= request < self.trace.num_requests, \
            f"Oracle request ids are trace request indices [0, {self.trace.num_requests}), got {request!r}"
        a, b = self.trace.offsets[request], self.trace.offsets[request + 1]
        ok = tokens < b - a
        rows = self.trace.experts[a + tokens[ok], layers[ok]]            # [D', K]
        known = rows[:, 0] >= 0
        d = np.nonzero(ok)[0][known] + 1                                 # distances (1-based) of known targets
        n = len(d)
        return Candidates(np.repeat(d, self.K), np.repeat(layers[d - 1], self.K),
                          rows[known].reshape(-1).astype(np.int64), np.ones(n * self.K))


class TopKFrequency(Predictor):
    """Per-layer selection counts F [L, E], shared by all requests, each layer's row decayed by 2^(-1/half_life)
    per observation of that layer (half_life None: plain cumulative counts). P(e at layer l) = F[l, e] / n[l],
    n[l] the (decayed) number of observations of layer l. The prediction ignores the request's own routing.

    The README's "frequency" orientation column is half_life=None, counted online from an empty table over the
    whole trace (no per-request reset)."""
    name = "frequency"

    def __init__(self, num_layers, num_experts, top_k, *, half_life: float | None = 1024.0, **kw):
        super().__init__(num_layers, num_experts, top_k, **kw)
        self.decay = _decay_factor(half_life)
        self.counts = np.zeros((num_layers, num_experts))  # [L, E]
        self.n = np.zeros(num_layers)                      # [L] decayed observation count

    def _observe(self, st, ev, experts, adjacent):
        l = ev.layer
        if self.decay != 1.0:
            self.counts[l] *= self.decay
            self.n[l] *= self.decay
        self.counts[l, experts] += 1.0
        self.n[l] += 1.0

    def _observe_rows(self, sts, tokens, layer, ex):
        c, n = self.counts[layer], self.n        # c: a view of the layer's row
        for x in ex:   # each row decays the row first, as observe() does: bit-for-bit its tables, ~5x cheaper
            if self.decay != 1.0:
                c *= self.decay
                n[layer] *= self.decay
            c[x] += 1.0
            n[layer] += 1.0

    def _predict(self, request, st, tokens, layers):
        P = self.counts[layers] / np.maximum(self.n[layers], 1e-300)[:, None]  # [D, E]
        return _from_dense(P, layers)

    def predict_many(self, requests, horizons):
        if len(requests) <= 1:
            return super().predict_many(requests, horizons)
        assert min(horizons) >= 1, f"horizons must be >= 1, got {horizons}"
        _, _, layers = _targets(self, requests, max(horizons))
        return _from_dense_many(self._dense_rows(layers), layers, horizons)

    def _dense_rows(self, layers: np.ndarray) -> np.ndarray:
        return self.counts[layers] / np.maximum(self.n[layers], 1e-300)[..., None]   # [R, D, E]

    def predict_dense_many(self, requests, horizon):
        if len(requests) <= 1:   # as predict_many: row by row
            return super().predict_dense_many(requests, horizon)
        return _dense32(self._dense_rows(_targets(self, requests, horizon)[2]))

    def _arrays(self):
        return [self.counts, self.n]


class CrossLayerTransition(Predictor):
    """Online counts C [L, E, E]: C[l, a, b] = how often expert b was selected at the position after layer l of a
    token that selected a at layer l — layer l+1 of the same token, or, for l = L-1, layer 0 of the request's next
    token. Counts come from adjacent observed events of one request (an unknown position between breaks the
    pair); the table is shared by all requests; half_life (in observations of the source layer) decays it.

    Distance 1 pools the rows of all K experts just selected: P(b) = K * sum_a C[l,a,b] / sum_a rowsum(C[l,a]),
    which weighs each source expert by its evidence (a rarely seen expert cannot dominate) and is <= 1. Distance
    d > 1 chains the row-normalised matrices: a per-slot distribution p (sums to 1) moves as p <- p @ C[l]/rowsum,
    and P = K * p. Rows without evidence contribute nothing, so with an empty table nothing is predicted.

    The README's "cross-layer transition" column is this at distance 1 with half_life=None, online from an empty
    table over the whole trace (no per-request reset)."""
    name = "transition"
    chunk = 1 << 22   # predict_many: (request, distance, expert) numbers at once at most

    def __init__(self, num_layers, num_experts, top_k, *, half_life: float | None = None, **kw):
        super().__init__(num_layers, num_experts, top_k, **kw)
        self.decay = _decay_factor(half_life)
        self.counts = np.zeros((num_layers, num_experts, num_experts))  # [L, E, E]
        self.rowsum = np.zeros((num_layers, num_experts))                # [L, E] = counts.sum(-1)

    def _observe(self, st, ev, experts, adjacent):
        if not adjacent:
            return
        l = st.layer  # the source layer: the previous event's
        if self.decay != 1.0:
            self.counts[l] *= self.decay
            self.rowsum[l] *= self.decay
        self.counts[l, st.experts[:, None], experts[None, :]] += 1.0  # experts are distinct: no add.at needed
        self.rowsum[l, st.experts] += self.K

    def _predict(self, request, st, tokens, layers):
        if st.experts is None:
            return Candidates.empty()
        D = len(layers)
        P = np.zeros((D, self.E))
        src = st.layer
        n = self.rowsum[src, st.experts].sum()
        if n <= 0:
            return Candidates.empty()
        p = self.counts[src, st.experts].sum(0) / n  # [E] slot distribution at distance 1
        P[0] = self.K * p
        for d in range(1, D):
            l = layers[d - 1]  # the source layer of this hop
            rs = self.rowsum[l]
            p = (p / np.where(rs > 0, rs, 1.0)) @ self.counts[l]  # p @ the row-normalised C[l] (rows: 1 or 0)
            P[d] = self.K * p
        return _from_dense(P, layers)

    # -- the coordinator's batched calls: one layer event's requests at once ---------------------------------------
    def observe_many(self, requests, tokens, layer, experts, probs=None, hidden=None):
        layer = int(layer)
        ex = self._distinct_rows(requests, layer, experts)   # [N, K]; None: a prefill (its rows chain) or one row
        if ex is None:
            return super().observe_many(requests, tokens, layer, experts, probs, hidden)
        src, prev, rows = [], [], []
        for n, (req, tok) in enumerate(zip(requests, np.asarray(tokens).tolist())):
            st = self._track(req)
            if self._adjacent(st, tok, layer):
                src.append(st.layer)
                prev.append(st.experts)
                rows.append(n)
            st.token, st.layer, st.experts = tok, layer, ex[n]
        if rows:
            self._count(np.array(src, np.int64), np.stack(prev), ex[rows])

    def _count(self, src: np.ndarray, prev: np.ndarray, cur: np.ndarray) -> None:
        """Transitions prev [n, K] at source layers src [n] -> cur [n, K], as n row-by-row _observe calls."""
        E, K = self.E, self.K
        w = np.ones(len(src))
        if self.decay != 1.0:
            # row by row, every observation of a source layer first decays that layer's rows: so the table is
            # decayed once per observation here, and the i-th of them once per later one of the same layer
            later = np.triu(src[:, None] == src[None, :], 1).sum(1)
            w = self.decay ** later
            ls, n = np.unique(src, return_counts=True)
            f = self.decay ** n
            self.counts[ls] *= f[:, None, None]
            self.rowsum[ls] *= f[:, None]
        cell = ((src[:, None, None] * E + prev[:, :, None]) * E + cur[:, None, :]).reshape(-1)   # [n * K * K]
        np.add.at(self.counts.reshape(-1), cell, np.repeat(w, K * K))
        np.add.at(self.rowsum.reshape(-1), (src[:, None] * E + prev).reshape(-1), np.repeat(w * K, K))

    def predict_many(self, requests, horizons):
        assert min(horizons, default=1) >= 1, f"horizons must be >= 1, got {horizons}"
        out = [Candidates.empty()] * len(requests)
        for where, sts in self._known_chunks(requests, horizons):
            self._predict_rows(sts, [horizons[i] for i in where], where, out)
        return out

    def _known_chunks(self, requests: list, horizons: list):
        """(indexes, states) of the requests with a last event, in chunks of at most ~`chunk` (request, distance,
        expert) numbers at their largest horizon: bounded memory at any batch."""
        sts = [self._reqs.get(r) for r in requests]
        idx = [i for i, st in enumerate(sts) if st is not None and st.experts is not None]
        step = max(1, self.chunk // (self.E * max(horizons[i] for i in idx))) if idx else 1
        for a in range(0, len(idx), step):
            yield idx[a:a + step], [sts[i] for i in idx[a:a + step]]

    def _predict_rows(self, sts: list, horizons: list, where: list, out: list) -> None:
        """predict() of requests with a last event (states sts), into out[where[j]]."""
        R, hs = len(sts), np.array(horizons)
        H = int(hs.max())
        P, layers = self._dense_rows(sts, H)
        P[np.arange(H)[None, :] >= hs[:, None]] = 0.0                                # past each request's horizon
        r, d, e = np.nonzero(P > 0)
        cut = np.searchsorted(r, np.arange(R + 1))
        dist, lay, prob = d + 1, layers[r, d], np.minimum(P[r, d, e], 1.0)
        for j, i in enumerate(where):
            a, b = cut[j], cut[j + 1]
            out[i] = Candidates(dist[a:b], lay[a:b], e[a:b], prob[a:b])

    def predict_dense_many(self, requests, horizon):
        out = np.zeros((len(requests), horizon, self.E), np.float32)
        for where, sts in self._known_chunks(requests, [horizon] * len(requests)):
            out[where] = _dense32(self._dense_rows(sts, horizon)[0])
        return out

    def _dense_rows(self, sts: list, H: int) -> tuple[np.ndarray, np.ndarray]:
        """P float64 [R, H, E] for distances 1..H of requests with a last event (states sts), and the target
        layers [R, H]."""
        L, E, K = self.L, self.E, self.K
        R = len(sts)
        src = np.array([st.layer for st in sts], np.int64)                           # [R]
        prev = np.stack([st.experts for st in sts])                                  # [R, K]
        here = np.array([st.token * L + st.layer for st in sts], np.int64)
        layers = (here[:, None] + np.arange(1, H + 1)) % L                           # [R, H] target layers
        n = self.rowsum[src[:, None], prev].sum(1)                                   # [R]
        p = self.counts[src[:, None], prev].sum(1) / np.where(n > 0, n, 1.0)[:, None]   # [R, E]; 0: no evidence
        P = np.empty((R, H, E))
        P[:, 0] = K * p
        for d in range(1, H):
            # p @ (C / rowsum) with the division on p's side ([R, E] numbers instead of an [E, E] matrix), one
            # product per source layer of the hop: a decode step's requests share one; requests at other layers
            # (another runtime, one that skipped a step) make a few more
            a = layers[:, d - 1]
            if (a == a[0]).all():
                rs = self.rowsum[a[0]]
                p = (p / np.where(rs > 0, rs, 1.0)) @ self.counts[a[0]]
            else:
                q = np.empty_like(p)
                for l in np.unique(a).tolist():
                    m = a == l
                    rs = self.rowsum[l]
                    q[m] = (p[m] / np.where(rs > 0, rs, 1.0)) @ self.counts[l]
                p = q
            P[:, d] = K * p
        return P, layers


class PreviousToken(Predictor):
    """For a target layer, the experts the request selected at that layer most recently — the previous token's
    for the layers still ahead in this token, this token's once the prediction wraps into the next one. Their
    probability is a per-layer, decayed estimate of how often a token reuses its predecessor's experts there
    (prior K/E), so it is on the same scale as the other predictors'. Per-request state: last [L, K].

    The README's "previous token, same layer" column is this at distance 1."""
    name = "previous_token"

    def __init__(self, num_layers, num_experts, top_k, *, half_life: float | None = 4096.0, **kw):
        super().__init__(num_layers, num_experts, top_k, **kw)
        self.decay = _decay_factor(half_life)
        self.reuse = np.full(num_layers, top_k / num_experts)  # [L] P(a predecessor's expert is reused)
        self.n = np.ones(num_layers)                           # [L] pseudo-count behind `reuse`

    def _new_request(self):
        return _Req(last=np.full((self.L, self.K), -1, np.int64))

    def _observe(self, st, ev, experts, adjacent):
        l = ev.layer
        prev = st.last[l]
        if prev[0] >= 0:  # update the reuse rate with this layer's outcome
            hit = (experts[:, None] == prev[None, :]).any(1).sum() / self.K  # (np.isin is 10x slower here)
            self.n[l] = self.n[l] * self.decay + 1.0
            self.reuse[l] += (hit - self.reuse[l]) / self.n[l]
        st.last[l] = experts

    def _observe_rows(self, sts, tokens, layer, ex):
        prev = np.stack([st.last[layer] for st in sts])                      # [N, K]
        hits = (ex[:, :, None] == prev[:, None, :]).any(2).sum(1) / self.K    # [N] as _observe's, row by row
        n, u = self.n[layer], self.reuse[layer]
        for h in hits[prev[:, 0] >= 0].tolist():   # the running estimate: the same operations in the same order
            n = n * self.decay + 1.0
            u += (h - u) / n
        self.n[layer], self.reuse[layer] = n, u
        for st, x in zip(sts, ex):
            st.last[layer] = x

    def _predict(self, request, st, tokens, layers):
        if st.last is None:
            return Candidates.empty()
        rows = st.last[layers]                   # [D, K]
        d, s = np.nonzero(rows >= 0)
        p = np.maximum(self.reuse[layers[d]], 1e-9)
        return Candidates(d + 1, layers[d].astype(np.int64), rows[d, s], p)

    def predict_many(self, requests, horizons):
        if len(requests) <= 1:
            return super().predict_many(requests, horizons)
        assert min(horizons) >= 1, f"horizons must be >= 1, got {horizons}"
        R = len(requests)
        rows, layers = self._last_rows(requests, max(horizons))
        r, d, s = np.nonzero((rows >= 0) & _within(horizons, layers.shape[1])[..., None])
        return _split_rows(r, R, d + 1, layers[r, d].astype(np.int64), rows[r, d, s],
                           np.maximum(self.reuse[layers[r, d]], 1e-9))

    def _last_rows(self, requests: list, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """The requests' latest experts at their next `horizon` target layers int [R, horizon, K] (-1: none), and
        those layers [R, horizon]."""
        sts, _, layers = _targets(self, requests, horizon)
        none = np.full((self.L, self.K), -1, np.int64)
        last = np.stack([none if st is None or st.last is None else st.last for st in sts])   # [R, L, K]
        return last[np.arange(len(requests))[:, None], layers], layers                      # [R, D, K]

    def predict_dense_many(self, requests, horizon):
        if len(requests) <= 1:   # as predict_many: row by row
            return super().predict_dense_many(requests, horizon)
        rows, layers = self._last_rows(requests, horizon)
        r, d, s = np.nonzero(rows >= 0)
        P = np.zeros((len(requests), horizon, self.E), np.float32)
        P[r, d, rows[r, d, s]] = np.maximum(self.reuse[layers[r, d]], 1e-9)
        return P

    def _arrays(self):
        return [self.reuse, self.n]

    def _req_nbytes(self, st):
        return st.last.nbytes
