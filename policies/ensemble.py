"""Ensemble that learns which predictor to trust, from the truth that arrives at every layer.

Every member observes every event. Right after an event at position q (token * L + layer) the ensemble asks every
member for distances 1..C and keeps, per request, what each said about each target position. When the target's
routing arrives, each member is scored before anything else happens: recall@k (the member's top-k against the
true k experts) and precision (of the experts it gave P >= 0.5) per distance, decayed with `half_life`.

Mixing: Hedge (multiplicative weights) per (target layer group, distance): log w[g, d, m] -= eta * (1 - recall@k of
member m on that target), and the ensemble's P = sum_m softmax(log w)[m] * P_m (a mixture of probabilities, so
still in [0, 1]); mode="pick" uses only the member of largest weight (ties: the earlier member). Log-weights are
kept relative to their maximum and clipped at -`floor`, so a member that was bad once can recover after a workload
change. Everything is a deterministic function of the events (no randomness).

observe_many (the coordinator's call: one layer event's rows, distinct requests) scores every row, lets each member
observe them all in one observe_many, then takes every row's predictions in one predict_many per member: a row's
recorded predictions (and the weights they are mixed with) come after the whole layer rather than mid-layer, as the
coordinator's own predict_many does. Members' tables end the same either way up to rounding (each sees the rows
in order; a member's own batched observe_many may round its decays differently).

Members whose class sets `needs_hidden` (next-gate, learned, pre-gated) skip events without a hidden state. A
member with `begin(request, ...)` (request-level) gets the ensemble's begin() calls.

scores() -> plain dict for telemetry: per member and for the ensemble itself, recall@k and precision per distance,
the number of scored targets, and the members' mean weight per distance.

Memory: the weights [G, C, M]; the four score sums [4, M + 1, C]; per request the members' latest dense predictions
[C, M, E] float32 and the pending top-k [C, C, M + 1, K] int16 and P >= 0.5 masks [C, C, M + 1, E] bool; end() drops
them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping

import numpy as np

from .predictors import (Candidates, Predictor, RoutingEvent, _decay_factor, _from_dense, _from_dense_many, _Req,
                         _targets)


def dense(c: Candidates, D: int, E: int) -> np.ndarray:
    """Candidates -> float32 [D, E] (row d-1 = distance d; distances past D dropped)."""
    P = np.zeros((D, E), np.float32)
    m = c.distance <= D
    P[c.distance[m] - 1, c.expert[m]] = c.prob[m]
    return P


def topk_rows(P: np.ndarray, k: int) -> np.ndarray:
    """int64 [..., k]: the k largest of each row (ties: lower id, as Candidates.top), -1 where P is 0."""
    idx = np.argsort(-P, axis=-1, kind="stable")[..., :k]
    return np.where(np.take_along_axis(P, idx, -1) > 0, idx, -1)


@dataclass
class _EReq(_Req):
    P: np.ndarray | None = None       # float32 [C, M, E]: members' predictions from the last event
    top: np.ndarray | None = None     # int16 [C, C, M+1, K]: pending top-k, [target % C, distance - 1]
    sel: np.ndarray | None = None     # bool [C, C, M+1, E]: pending P >= 0.5
    ppos: np.ndarray | None = None    # int64 [C, C]: target position of each pending slot, -1 none


class Ensemble(Predictor):
    """members {name: Predictor} (same geometry). horizon C: distances scored and mixed. groups: layer groups."""
    name = "ensemble"

    def __init__(self, members: Mapping[str, Predictor], num_layers: int, num_experts: int, top_k: int, *,
                 horizon: int = 4, groups: int = 4, eta: float = 2.0, floor: float = 20.0, mode: str = "mix",
                 half_life: float | None = 4096.0, max_requests: int = 1024):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        bad = {n: (p.L, p.E, p.K) for n, p in members.items() if (p.L, p.E, p.K) != (num_layers, num_experts, top_k)}
        if bad:
            raise ValueError(f"members {bad} do not have the ensemble's geometry L={num_layers} E={num_experts} "
                             f"K={top_k}")
        if mode not in ("mix", "pick"):
            raise ValueError(f"mode must be 'mix' or 'pick', got {mode!r}")
        super().__init__(num_layers, num_experts, top_k, max_requests=max_requests)
        self.names = list(members)
        self.members = [members[n] for n in self.names]
        self.hidden_only = np.array([getattr(p, "needs_hidden", False) for p in self.members])
        M, self.C, self.G = len(self.members), int(horizon), max(1, min(int(groups), num_layers))
        assert self.C >= 1, f"horizon must be >= 1, got {horizon}"
        self.eta, self.floor, self.mode = float(eta), float(floor), mode
        self.decay = _decay_factor(half_life)
        self.logw = np.zeros((self.G, self.C, M))       # Hedge log-weights per (layer group, distance, member)
        self.group = (np.arange(num_layers) * self.G) // num_layers   # [L] layer -> group
        # decayed score sums per (member, or M = the ensemble itself; distance) in one array, so that a scored row
        # moves all four in one operation: hits, n, sel, selhit (the properties below) are its rows
        self._acc = np.zeros((4, M + 1, self.C))

    # views of _acc taken when asked for (not kept as attributes: a copied or unpickled ensemble would keep
    # separate arrays that its scoring no longer moves)
    @property
    def hits(self) -> np.ndarray:
        return self._acc[0]    # [M+1, C] true experts in the top-k

    @property
    def n(self) -> np.ndarray:
        return self._acc[1]    # [M+1, C] scored targets

    @property
    def sel(self) -> np.ndarray:
        return self._acc[2]    # [M+1, C] experts given P >= 0.5

    @property
    def selhit(self) -> np.ndarray:
        return self._acc[3]    # [M+1, C] ... of which true

    # -- the interface -----------------------------------------------------------------------------------------
    def begin(self, request: Hashable, *args, **kw) -> None:
        """Forward to members that implement begin() (request-level prediction before the first decode step)."""
        for p in self.members:
            if hasattr(p, "begin"):
                p.begin(request, *args, **kw)

    def observe(self, event: RoutingEvent) -> None:
        has_h = event.hidden is not None
        for p, h in zip(self.members, self.hidden_only):
            if has_h or not h:
                p.observe(event)
        super().observe(event)

    def end(self, request: Hashable) -> None:
        for p in self.members:
            p.end(request)
        super().end(request)

    def weights(self) -> np.ndarray:
        """float [G, C, M]: current mixing weights."""
        w = np.exp(self.logw - self.logw.max(-1, keepdims=True))
        return w / w.sum(-1, keepdims=True)

    def scores(self) -> dict:
        with np.errstate(invalid="ignore", divide="ignore"):
            rec = self.hits / (self.n * self.K)
            prec = self.selhit / self.sel
        wmean = self.weights().mean(0)                     # [C, M]

        def row(i):
            return {"recall_at_k": _list(rec[i]), "precision": _list(prec[i]), "scored": _list(self.n[i])}
        out = {"k": self.K, "distances": list(range(1, self.C + 1)), "mode": self.mode,
               "members": {n: dict(row(i), weight=_list(wmean[:, i])) for i, n in enumerate(self.names)},
               "ensemble": row(len(self.names))}
        return out

    # -- Predictor hooks -----------------------------------------------------------------------------------------
    def _new_request(self) -> _EReq:
        C, M, E, K = self.C, len(self.members), self.E, self.K
        return _EReq(P=np.zeros((C, M, E), np.float32), top=np.full((C, C, M + 1, K), -1, np.int16),
                     sel=np.zeros((C, C, M + 1, E), bool), ppos=np.full((C, C), -1, np.int64))

    def observe_many(self, requests: list, tokens: np.ndarray, layer: int, experts: np.ndarray,
                     probs: np.ndarray | None = None, hidden: np.ndarray | None = None) -> None:
        """One layer's routing of distinct requests at once: every row is scored, the members observe all rows
        (their own observe_many: vectorized where they have one), then their predictions for every row are
        taken in one predict_many each and recorded. The one difference from observe() row by row: a row's
        recorded predictions (and the mixing weights they were mixed with) are taken after the whole layer, as
        the coordinator's predict_many is. A prefill (a request twice) or rows that would push out a live request
        go row by row."""
        if not len(requests):
            return
        assert np.ndim(experts) == 2, f"experts must be [rows, k], got shape {np.shape(experts)}"
        ids = np.array(experts, dtype=np.int64)   # a copy: the caller may reuse its buffer
        new = sum(r not in self._reqs for r in requests)
        if len(set(requests)) < len(requests) or len(self._reqs) + new > self.max_requests:
            return super().observe_many(requests, tokens, layer, ids, probs, hidden)
        assert 0 <= layer < self.L, f"layer {layer} outside [0, {self.L})"
        assert ids.shape[1] == self.K, f"expected {self.K} experts per row, got shape {ids.shape}"
        assert 0 <= ids.min() and ids.max() < self.E, f"expert ids outside [0, {self.E})"
        for p, h in zip(self.members, self.hidden_only):
            if hidden is not None or not h:
                p.observe_many(requests, tokens, layer, ids, probs, hidden)
        toks = np.asarray(tokens, np.int64)
        qs = toks * self.L + int(layer)
        sts = [self._track(r) for r in requests]
        self._score(sts, qs, int(layer), ids)
        self._record(sts, qs, self._member_predictions(requests))
        self._moved_to(sts, toks.tolist(), int(layer), ids)

    def _observe(self, st: _EReq, ev: RoutingEvent, experts: np.ndarray, adjacent: bool) -> None:
        q = ev.token * self.L + ev.layer
        self._score([st], np.array([q]), ev.layer, experts[None])
        self._record([st], np.array([q]), self._member_predictions([ev.request]))

    def _score(self, sts: list, qs: np.ndarray, layer: int, ids: np.ndarray) -> None:
        """The routing of one layer at positions qs [R] (ids [R, K]; distinct requests, states sts) scores every
        pending prediction made for it (members' and the mix's). What each row scores is gathered for all rows at
        once; the decayed sums and the Hedge weights then move row by row, in row order: the clip at -floor is not
        linear, so rows folded into one update would weigh differently from the same rows one at a time."""
        C, M, E = self.C, len(self.members), self.E
        slot = (qs % C).tolist()
        pend = np.stack([st.ppos[s] for st, s in zip(sts, slot)]) == np.asarray(qs)[:, None]   # [R, C] distances
        rows = np.flatnonzero(pend.any(1))                                  # with a prediction for the row's q
        if not len(rows):
            return
        n = len(rows)
        top = np.stack([sts[r].top[slot[r]] for r in rows.tolist()])        # [n, C, M+1, K] int16, -1: none
        sel = np.stack([sts[r].sel[slot[r]] for r in rows.tolist()])        # [n, C, M+1, E] P >= 0.5
        ex = ids[rows]                                                      # [n, K]
        truth = np.zeros((n, E + 1), bool)                                  # index E: the -1 (no prediction) slot
        truth[np.arange(n)[:, None], ex] = True
        hit = truth[np.arange(n)[:, None, None, None], top].sum(-1)         # [n, C, M+1] true experts in the top-k
        upd = np.stack([hit, np.ones_like(hit), sel.sum(-1),                # [4, n, C, M+1]: what _acc's four sums
                        np.take_along_axis(sel, ex[:, None, None, :], -1).sum(-1)]).astype(np.float64)   # gain
        loss = self.eta * (1.0 - hit[..., :M] / self.K)                     # [n, C, M] Hedge on 1 - recall@k
        g = self.group[layer]
        for i, r in enumerate(rows.tolist()):
            d = np.flatnonzero(pend[r])                                     # distance - 1
            self._acc[:, :, d] = self._acc[:, :, d] * self.decay + upd[:, i, d].transpose(0, 2, 1)
            lw = self.logw[g, d] - loss[i, d]                               # [nd, M]
            lw -= lw.max(-1, keepdims=True)
            self.logw[g, d] = np.maximum(lw, -self.floor)
            sts[r].ppos[slot[r], d] = -1

    def _member_predictions(self, requests: list) -> np.ndarray:
        """float32 [R, C, M, E]: every member's prediction for distances 1..C after each request's last event."""
        P = np.empty((len(requests), self.C, len(self.members), self.E), np.float32)
        for i, p in enumerate(self.members):
            P[:, :, i] = p.predict_dense_many(requests, self.C)   # dense rows where the member has them
        return P

    def _record(self, sts: list, qs: np.ndarray, P: np.ndarray) -> None:
        """Keep the members' predictions P [R, C, M, E] made at positions qs [R] (for predict()), and their top-k
        and P >= 0.5 sets and the mix's, pending until their targets' routing arrives."""
        C = self.C
        tgt = qs[:, None] + np.arange(1, C + 1)                             # [R, C] target positions
        both = np.concatenate([P, self._mix(P, tgt % self.L)[:, :, None]], 2)   # [R, C, M+1, E]: members, mix
        top, sel = topk_rows(both, self.K), both >= 0.5                     # [R, C, M+1, K], [R, C, M+1, E]
        s, dd = tgt % C, np.arange(C)
        for n, st in enumerate(sts):
            st.P[:] = P[n]
            st.top[s[n], dd] = top[n]
            st.sel[s[n], dd] = sel[n]
            st.ppos[s[n], dd] = tgt[n]

    def _mix(self, P: np.ndarray, layers: np.ndarray) -> np.ndarray:
        """P [..., D, M, E] members' predictions for target layers [..., D] (D <= C) -> [..., D, E]."""
        w = self.weights()[self.group[layers], np.arange(layers.shape[-1])]  # [..., D, M]
        if self.mode == "pick":
            w = np.eye(w.shape[-1])[np.argmax(w, -1)]
        return np.einsum("...dm,...dme->...de", w.astype(np.float32), P)

    def predict_many(self, requests: list, horizons: list[int]) -> list[Candidates]:
        """predict() of each request; those observed mixed at once (one weights() and one mix for all)."""
        assert len(horizons) == len(requests), f"{len(requests)} requests but {len(horizons)} horizons"
        assert min(horizons, default=1) >= 1, f"horizons must be >= 1, got {horizons}"
        sts, _, layers = _targets(self, requests, self.C)
        known = [i for i, st in enumerate(sts) if st is not None]
        out = [None if st is not None else self.predict(r, h) for r, h, st in zip(requests, horizons, sts)]
        if known:
            mixed = self._mix(np.stack([sts[i].P for i in known]), layers[known])     # [R', C, E]
            hs = [min(horizons[i], self.C) for i in known]
            for i, c in zip(known, _from_dense_many(mixed, layers[known], hs)):
                out[i] = c
        return out

    def _predict(self, request, st, tokens, layers) -> Candidates:
        if getattr(st, "P", None) is None:  # nothing observed: ask the members directly (e.g. request-level)
            D = min(len(layers), self.C)
            P = np.stack([dense(p.predict(request, D), D, self.E) for p in self.members], 1)
            return _from_dense(self._mix(P, layers[:D]), layers[:D])
        D = min(len(layers), self.C)
        return _from_dense(self._mix(st.P[:D], layers[:D]), layers[:D])

    def _forget(self, request) -> None:
        # the members forget it too: a member still tracking it would predict from its position while the
        # ensemble labels the result with layers counted from the start
        for p in self.members:
            p.end(request)

    def _arrays(self):
        return [self.logw, self._acc]

    def _req_nbytes(self, st: _EReq) -> int:
        return sum(a.nbytes for a in (st.P, st.top, st.sel, st.ppos) if a is not None)

    def state_nbytes(self) -> int:
        return super().state_nbytes() + sum(p.state_nbytes() for p in self.members)


def _list(a: np.ndarray) -> list:
    return [None if not np.isfinite(x) else round(float(x), 6) for x in a]
