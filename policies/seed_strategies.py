"""The seed's history strategies (../shared/seeds/expert-prefetching-strategies.md), fixed: Multi-Look-Ahead (§4,
strategy C) and Intelligent Adaptive (§6, strategy E). Top-K Frequency (§5, strategy D) is predictors.TopKFrequency
with the seed's decay (SEED_TOPK_HALF_LIFE); On-Demand and Oracle (§2, §3) are in predictors.py. What was wrong in
the seed's code and what is done instead: docs/policies.md.

MultiLookAhead. History = the request's routing events in order (layer after layer, token after token); target =
the position d = 1..D events ahead, layer m = (l + d) mod L. Per target it combines, coarse to fine, by Dirichlet
back-off (each finer estimate is its counts plus `alpha` pseudo-observations of the coarser one, so it dominates
only once it has evidence, and a never-seen context falls back smoothly):
  frequency     per-layer decayed counts F [L, E]                               (replaces the seed's "temporal"
                                                                                 token % 64 table)
  cooccurrence  direct d-hop counts C [D, L, E, E]: experts at layer l -> experts d positions later (the seed's
                "co-occurrence" and A -> C "multi-hop chains" measured directly for every distance, not composed)
  pattern       hashed n-gram tables: the last 1..n expert sets of the request (ending at the source) -> the
                experts d positions later; fixed [D, n, B, E] tables, a bucket holds one context (its key is
                kept; a different context hashing there replaces it), so memory is bounded and stale contexts
                are overwritten (the seed's unbounded dicts, recounted from the whole history at every token)
Distances past D chain the 1-hop co-occurrence (multi-hop chain). P(e) = K * (slot distribution), clipped to 1.

IntelligentAdaptive. Components transition (direct d-hop co-occurrence), frequency (TopKFrequency), recency (the
request's most recent uses of each expert at the target layer, exponentially aged) and pattern (n-gram tables), each
a Predictor; fused by the ensemble machinery (policies/ensemble.py): every component's past prediction for a
position is scored against the truth when it arrives, and Hedge weights per (layer group, distance) mix them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .ensemble import Ensemble
from .predictors import (Candidates, Predictor, TopKFrequency, _decay_factor, _dense32, _from_dense, _from_dense_many,
                         _Req, _targets)

SEED_TOPK_HALF_LIFE = math.log(0.5) / math.log(0.999)  # §5: counts *= 0.999 per token -> half-life ~693 tokens
COMPONENTS = ("frequency", "cooccurrence", "pattern")
_MASK = (1 << 61) - 1


@dataclass
class _MLAReq(_Req):
    codes: list | None = None        # the last n expert-set codes (python ints), oldest first; adjacency-broken: reset
    keys: np.ndarray | None = None   # int64 [D, n]: pattern keys of the positions in the ring [pos % D, length - 1]
    ex: np.ndarray | None = None     # int64 [D, K]: their experts
    lay: np.ndarray | None = None    # int64 [D]: their layers
    pos: np.ndarray | None = None    # int64 [D]: their positions, -1 none
    nkeys: np.ndarray | None = None  # int64 [D]: how many pattern lengths are valid for them


class MultiLookAhead(Predictor):
    """Seed strategy C, fixed (module docstring). horizon D: distances with direct tables; pattern_length n;
    buckets B per (distance, length); alpha: back-off strength in pseudo-observations (the seed's
    min_pattern_frequency = 3); half_life of frequency and co-occurrence counts (in observations of the layer)."""
    name = "multi_lookahead"

    def __init__(self, num_layers, num_experts, top_k, *, horizon: int = 4, pattern_length: int = 3,
                 buckets: int = 2048, alpha: float = 3.0, half_life: float | None = 8192.0,
                 components: tuple[str, ...] = COMPONENTS, max_requests: int = 4096):
        super().__init__(num_layers, num_experts, top_k, max_requests=max_requests)
        bad = set(components) - set(COMPONENTS)
        assert components and not bad, f"components must be a non-empty subset of {COMPONENTS}, got {components}"
        assert horizon >= 1 and pattern_length >= 1 and buckets >= 1 and alpha > 0, \
            f"bad horizon={horizon} pattern_length={pattern_length} buckets={buckets} alpha={alpha}"
        L, E = num_layers, num_experts
        self.D, self.n, self.B, self.alpha = int(horizon), int(pattern_length), int(buckets), float(alpha)
        self.use = set(components)
        self.decay = _decay_factor(half_life)
        self.freq = np.zeros((L, E))                                   # [L, E] decayed counts
        self.nfreq = np.zeros(L)
        use_co = "cooccurrence" in self.use
        self.co = np.zeros((self.D, L, E, E) if use_co else (0,), np.float32)   # [D, L, E, E]
        self.rowsum = np.zeros((self.D, L, E) if use_co else (0,), np.float32)  # [D, L, E]
        use_pat = "pattern" in self.use
        shape = (self.D, self.n, self.B) if use_pat else (0,)
        self.pkey = np.full(shape, -1, np.int64)                       # [D, n, B] the context held by each bucket
        self.pcount = np.zeros(shape + ((E,) if use_pat else ()), np.float32)  # [D, n, B, E]
        self.ptotal = np.zeros(shape, np.float32)                      # [D, n, B] observations of the context

    def _new_request(self):
        D, K = self.D, self.K
        return _MLAReq(codes=[], keys=np.full((D, self.n), -1, np.int64), ex=np.zeros((D, K), np.int64),
                       lay=np.zeros(D, np.int64), pos=np.full(D, -1, np.int64), nkeys=np.zeros(D, np.int64))

    def _observe(self, st: _MLAReq, ev, experts, adjacent):
        L, D, K = self.L, self.D, self.K
        q = ev.token * L + ev.layer
        l = ev.layer
        # frequency of this layer
        if self.decay != 1.0:
            self.freq[l] *= self.decay
            self.nfreq[l] *= self.decay
        self.freq[l, experts] += 1.0
        self.nfreq[l] += 1.0
        # the sources d = 1..D positions back that are still in the ring learn that `experts` followed them
        d = np.arange(1, D + 1)
        slot = (q - d) % D
        ok = (st.pos[slot] == q - d) & (q - d >= 0)   # an empty ring entry holds -1, which q - d reaches at q < D
        if ok.any():
            d, slot = d[ok], slot[ok]
            src, ls = st.ex[slot], st.lay[slot]                        # [n, K], [n]
            if self.co.size:
                if self.decay != 1.0:
                    self.co[d - 1, ls] *= self.decay
                    self.rowsum[d - 1, ls] *= self.decay
                self.co[(d - 1)[:, None, None], ls[:, None, None], src[:, :, None], experts[None, None, :]] += 1.0
                self.rowsum[(d - 1)[:, None], ls[:, None], src] += K
            if self.pkey.size:
                dd, mm = np.nonzero(np.arange(self.n)[None, :] < st.nkeys[slot][:, None])   # valid (d, length)
                key = st.keys[slot[dd], mm]
                dd = d[dd] - 1
                b = key % self.B
                stale = self.pkey[dd, mm, b] != key
                if stale.any():  # another context held the bucket: it is replaced
                    self.pcount[dd[stale], mm[stale], b[stale]] = 0.0
                    self.ptotal[dd[stale], mm[stale], b[stale]] = 0.0
                    self.pkey[dd[stale], mm[stale], b[stale]] = key[stale]
                self.pcount[dd[:, None], mm[:, None], b[:, None], experts[None, :]] += 1.0
                self.ptotal[dd, mm, b] += 1.0
        self._push(st, experts, l, q, adjacent)

    def _push(self, st: _MLAReq, experts: np.ndarray, l: int, q: int, adjacent: bool) -> None:
        """Position q (layer l) enters the request's ring, with its pattern keys: (its layer, the last 1..n
        expert-set codes; a gap starts them over)."""
        if not adjacent:
            st.codes = []
        st.codes = (st.codes + [hash(tuple(np.sort(experts).tolist()))])[-self.n:]
        s = q % self.D
        nk = len(st.codes)
        st.keys[s] = -1
        st.keys[s, :nk] = [hash((l, i) + tuple(st.codes[-i:])) & _MASK for i in range(1, nk + 1)]
        st.nkeys[s], st.ex[s], st.lay[s], st.pos[s] = nk, experts, l, q

    def observe_many(self, requests, tokens, layer, experts, probs=None, hidden=None):
        """One layer event's rows at once: the same tables as observe() row by row (the decayed counts up to
        rounding, the pattern buckets exactly, a bucket two rows' contexts fight over included) and the same
        per-request state. A prefill (a request twice) or rows that would push a request out go row by row."""
        N, L, D, K, l = len(requests), self.L, self.D, self.K, int(layer)
        ex = self._distinct_rows(requests, l, experts)                     # [N, K]
        if ex is None or len(self._reqs) + sum(r not in self._reqs for r in requests) > self.max_requests:
            return super().observe_many(requests, tokens, layer, experts, probs, hidden)
        toks = np.asarray(tokens, np.int64)
        q = toks * L + l                                                   # [N] positions
        sts = [self._track(r) for r in requests]
        adj = [self._adjacent(st, t, l) for st, t in zip(sts, toks.tolist())]
        dec = self.decay
        # frequency: row n's observation is decayed by the N-1-n rows after it
        w = dec ** np.arange(N - 1, -1, -1) if dec != 1.0 else np.ones(N)
        self.freq[l] *= dec ** N
        self.nfreq[l] = self.nfreq[l] * dec ** N + w.sum()
        np.add.at(self.freq[l], ex.reshape(-1), np.repeat(w, K))
        # each row's ring: which of d = 1..D positions back it still holds (their layer is (l - d) mod L)
        d = np.arange(1, D + 1)
        slot = (q[:, None] - d[None, :]) % D                               # [N, D]
        pos = np.stack([st.pos for st in sts])                             # [N, D]
        back = q[:, None] - d[None, :]
        ok = (pos[np.arange(N)[:, None], slot] == back) & (back >= 0)
        rows, di = np.nonzero(ok)                                          # valid (row, distance - 1), row order
        if len(rows):
            sl = slot[rows, di]
            src = np.stack([st.ex for st in sts])[rows, sl]                  # [n, K] the sources' experts
            ls = np.stack([st.lay for st in sts])[rows, sl]                  # [n] and layers
            cur = ex[rows]                                                   # [n, K]
            if self.co.size:
                # per distance, the m rows that count decay its source layer's table m times, the j-th row's
                # counts by the m-1-j rows after it
                wd = np.ones(len(rows))
                if dec != 1.0:
                    later = np.triu(di[:, None] == di[None, :], 1).sum(1)
                    wd = dec ** later
                    for dd in np.unique(di).tolist():
                        m = di == dd
                        f = dec ** int(m.sum())
                        self.co[dd, ls[m][0]] *= f
                        self.rowsum[dd, ls[m][0]] *= f
                wd = wd.astype(np.float32)
                np.add.at(self.co, (di[:, None, None], ls[:, None, None], src[:, :, None], cur[:, None, :]),
                          np.broadcast_to(wd[:, None, None], (len(rows), K, K)))
                np.add.at(self.rowsum, (di[:, None], ls[:, None], src), np.broadcast_to(K * wd[:, None], src.shape))
            if self.pkey.size:
                self._pattern_many(np.stack([st.keys for st in sts])[rows, sl],     # [n, n_len] pattern keys
                                   np.stack([st.nkeys for st in sts])[rows, sl], di, cur)
        # each row's position enters its own ring
        for n, (st, a) in enumerate(zip(sts, adj)):
            self._push(st, ex[n], l, int(q[n]), a)
            st.token, st.layer, st.experts = int(toks[n]), l, ex[n]

    def _pattern_many(self, keys: np.ndarray, nkeys: np.ndarray, di: np.ndarray, cur: np.ndarray) -> None:
        """The pattern buckets' updates of several (row, distance) sources (keys int64 [n, pattern_length] and how
        many are valid [n], distance - 1 di [n], the experts that followed cur [n, K]), as row by row: where rows
        with different contexts hit one bucket, the last context's rows since the last change of context are what
        it holds."""
        j, mm = np.nonzero(np.arange(keys.shape[1])[None, :] < nkeys[:, None])   # row order, then length
        if not len(j):
            return
        key = keys[j, mm]
        dd, b = di[j], key % self.B
        cell = (dd * self.n + mm) * self.B + b                             # contributions in row order
        order = np.lexsort((np.arange(len(cell)), cell))                   # by cell, then row order
        c_s, k_s = cell[order], key[order]
        first = np.r_[True, c_s[1:] != c_s[:-1]]
        grp = np.cumsum(first) - 1
        last_i = np.r_[np.flatnonzero(first)[1:], len(c_s)] - 1           # each cell's last contribution
        last_key = k_s[last_i][grp]
        # the final run: contributions after the cell's last one of another context
        diff = k_s != last_key
        pos_in = np.arange(len(c_s))
        last_diff = np.full(grp.max() + 1, -1)
        np.maximum.at(last_diff, grp[diff], pos_in[diff])
        in_run = pos_in > last_diff[grp]
        cd, cm, cb = dd[order][last_i], mm[order][last_i], b[order][last_i]
        replace = (last_diff >= 0) | (self.pkey[cd, cm, cb] != k_s[last_i])
        self.pcount[cd[replace], cm[replace], cb[replace]] = 0.0
        self.ptotal[cd[replace], cm[replace], cb[replace]] = 0.0
        self.pkey[cd, cm, cb] = k_s[last_i]
        sel = order[in_run]
        ex = cur[j[sel]]                                                   # [n', K]
        np.add.at(self.pcount, (dd[sel][:, None], mm[sel][:, None], b[sel][:, None], ex), 1.0)
        np.add.at(self.ptotal, (dd[sel], mm[sel], b[sel]), 1.0)

    def _slot_dist(self, st: _MLAReq, layers: np.ndarray) -> np.ndarray:
        """[D', E] slot distributions (rows sum to 1, or 0 without evidence) for distances 1..D' <= D."""
        Dp, E, K, a = len(layers), self.E, self.K, self.alpha
        p = np.zeros((Dp, E))
        if "frequency" in self.use:
            n = self.nfreq[layers]
            p = np.where(n[:, None] > 0, self.freq[layers] / np.maximum(n, 1e-300)[:, None] / K, 0.0)
        here = st.token * self.L + st.layer
        s = here % self.D
        if st.pos[s] != here:
            return p
        l, x = int(st.lay[s]), st.ex[s]
        dd = np.arange(Dp)
        prior = p.sum(1, keepdims=True) > 0
        if self.co.size:
            c = self.co[dd[:, None], l, x[None, :]].sum(1)             # [D', E]
            n = self.rowsum[dd[:, None], l, x[None, :]].sum(1)[:, None]
            w = a * K * K                                              # alpha events, in slot units
            p = np.where(prior, (c + w * p) / np.maximum(n + w, 1e-12), c / np.maximum(n, 1e-12))
            prior = prior | (n > 0)
        if self.pkey.size:
            for i in range(int(st.nkeys[s])):                          # coarse (length 1) to fine (length n)
                key = st.keys[s, i]
                b = key % self.B
                hit = self.pkey[dd, i, b] == key                       # [D']
                c = np.where(hit[:, None], self.pcount[dd, i, b], 0.0)
                n = np.where(hit, self.ptotal[dd, i, b], 0.0)[:, None] * K
                w = a * K
                p = np.where(prior, (c + w * p) / np.maximum(n + w, 1e-12), c / np.maximum(n, 1e-12))
                prior = prior | (n > 0)
        return p

    def _predict(self, request, st, tokens, layers) -> Candidates:
        if getattr(st, "pos", None) is None and "frequency" not in self.use:
            return Candidates.empty()
        if getattr(st, "pos", None) is None:  # nothing observed for this request: layer frequencies
            st = self._new_request()
        D = len(layers)
        Dp = min(D, self.D)
        p = self._slot_dist(st, layers[:Dp])
        if D > Dp and self.co.size:  # multi-hop chain: compose the 1-hop co-occurrence from the last direct row
            rows = [p]
            q = p[-1]
            for i in range(Dp, D):
                src = layers[i - 1]
                rs = self.rowsum[0, src]
                q = q @ (self.co[0, src] / np.where(rs > 0, rs, 1.0)[:, None])
                rows.append(q[None])
            p = np.concatenate(rows)
            return _from_dense(np.minimum(self.K * p, 1.0), layers[:len(p)])
        return _from_dense(np.minimum(self.K * p, 1.0), layers[:Dp])

    def predict_many(self, requests: list, horizons: list[int]) -> list[Candidates]:
        """predict() of each request, with the tables read for all of them at once (the per-distance estimates do
        not depend on the horizon, so one pass at the largest serves all). Horizons past D (the chained
        co-occurrence) go request by request."""
        if len(requests) <= 1 or max(horizons) > self.D:
            return super().predict_many(requests, horizons)
        assert min(horizons) >= 1, f"horizons must be >= 1, got {horizons}"
        P, layers = self._dense_rows(requests, max(horizons))
        return _from_dense_many(P, layers, horizons)

    def predict_dense_many(self, requests, horizon):
        if len(requests) <= 1 or horizon > self.D:   # as predict_many: row by row
            return super().predict_dense_many(requests, horizon)
        return _dense32(self._dense_rows(requests, horizon)[0])

    def _dense_rows(self, requests: list, Dp: int) -> tuple[np.ndarray, np.ndarray]:
        """min(K x P, 1) float64 [R, Dp, E] of distances 1..Dp <= D, and the target layers [R, Dp]."""
        E, K, a = self.E, self.K, self.alpha
        sts, here, layers = _targets(self, requests, Dp)                   # [R, Dp] target layers
        p = np.zeros((len(requests), Dp, E))
        if "frequency" in self.use:
            n = self.nfreq[layers]
            p = np.where(n[..., None] > 0, self.freq[layers] / np.maximum(n, 1e-300)[..., None] / K, 0.0)
        # the requests whose last event is still in their ring: the co-occurrence and pattern back-off
        ring = [(i, here[i] % self.D) for i, st in enumerate(sts)
                if getattr(st, "pos", None) is not None and st.pos[here[i] % self.D] == here[i]]
        if ring:
            A = np.array([i for i, _ in ring])
            l = np.array([sts[i].lay[s] for i, s in ring])                  # [A] source layers
            x = np.stack([sts[i].ex[s] for i, s in ring])                   # [A, K] source experts
            dd = np.arange(Dp)
            pa = p[A]
            prior = pa.sum(-1, keepdims=True) > 0                           # [A, Dp, 1]
            if self.co.size:
                c = self.co[dd[None, :, None], l[:, None, None], x[:, None, :]].sum(2)             # [A, Dp, E]
                n = self.rowsum[dd[None, :, None], l[:, None, None], x[:, None, :]].sum(2)[..., None]
                w = a * K * K
                pa = np.where(prior, (c + w * pa) / np.maximum(n + w, 1e-12), c / np.maximum(n, 1e-12))
                prior = prior | (n > 0)
            if self.pkey.size:
                keys = np.stack([sts[i].keys[s] for i, s in ring])          # [A, n]
                nk = np.array([sts[i].nkeys[s] for i, s in ring])
                w = a * K
                for j in range(int(nk.max())):                              # coarse (length 1) to fine (length n)
                    on = (nk > j)[:, None, None]
                    key = keys[:, j]
                    b = key % self.B
                    hit = self.pkey[dd[None, :], j, b[:, None]] == key[:, None]                      # [A, Dp]
                    c = np.where(hit[..., None], self.pcount[dd[None, :], j, b[:, None]], 0.0)
                    n = np.where(hit, self.ptotal[dd[None, :], j, b[:, None]], 0.0)[..., None] * K
                    pa = np.where(on, np.where(prior, (c + w * pa) / np.maximum(n + w, 1e-12),
                                               c / np.maximum(n, 1e-12)), pa)
                    prior = prior | (on & (n > 0))
            p[A] = pa
        return np.minimum(K * p, 1.0), layers

    def _arrays(self):
        return [self.freq, self.nfreq, self.co, self.rowsum, self.pkey, self.pcount, self.ptotal]

    def _req_nbytes(self, st):
        return 8 * len(st.codes or []) + sum(a.nbytes for a in (st.keys, st.ex, st.lay, st.pos, st.nkeys))


@dataclass
class _RecReq(_Req):
    last: np.ndarray | None = None   # int32 [L, E]: token of the latest use of each (layer, expert), -1 never


class Recency(Predictor):
    """The request's own recent experts at the target layer: score 2^(-(age - 1) / half_life_tokens) with age the
    tokens between the latest use and the target; P = K * normalised score (clipped to 1)."""
    name = "recency"

    def __init__(self, num_layers, num_experts, top_k, *, half_life_tokens: float = 2.0, max_requests: int = 4096):
        super().__init__(num_layers, num_experts, top_k, max_requests=max_requests)
        assert half_life_tokens > 0, f"half_life_tokens must be positive, got {half_life_tokens}"
        self.h = float(half_life_tokens)

    def _new_request(self):
        return _RecReq(last=np.full((self.L, self.E), -1, np.int32))

    def _observe(self, st, ev, experts, adjacent):
        st.last[ev.layer, experts] = ev.token

    def _observe_rows(self, sts, tokens, layer, ex):
        for st, t, x in zip(sts, tokens, ex):
            st.last[layer, x] = t

    def _predict(self, request, st, tokens, layers):
        if getattr(st, "last", None) is None:
            return Candidates.empty()
        return _from_dense(self._dense(st.last[layers], tokens), layers)

    def _dense(self, last: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """last int32 [..., D, E] (each target's latest uses), tokens [..., D] the targets' tokens -> P [..., D, E]."""
        age = tokens[..., None] - last
        s = np.where(last >= 0, np.exp2(-(np.maximum(age, 1) - 1) / self.h), 0.0)
        tot = s.sum(-1, keepdims=True)
        return np.minimum(self.K * s / np.where(tot > 0, tot, 1.0), 1.0)

    def predict_many(self, requests, horizons):
        """predict() of each request, the observed ones from one gather over all of them."""
        assert min(horizons, default=1) >= 1, f"horizons must be >= 1, got {horizons}"
        sts, here, layers = _targets(self, requests, max(horizons, default=1))
        known = [i for i, st in enumerate(sts) if st is not None]
        out = [Candidates.empty()] * len(requests)
        if known:
            lay = layers[known]                                             # [R', D]
            toks = (here[known][:, None] + np.arange(1, lay.shape[1] + 1)) // self.L
            P = self._dense(np.stack([sts[i].last[l] for i, l in zip(known, lay)]), toks)   # from [R', D, E]
            for i, c in zip(known, _from_dense_many(P, lay, [horizons[i] for i in known])):
                out[i] = c
        return out

    def _req_nbytes(self, st):
        return st.last.nbytes


class IntelligentAdaptive(Ensemble):
    """Seed strategy E, fixed (module docstring): transition, frequency, recency and pattern components fused
    with Hedge weights adapted online from each component's scored predictions."""
    name = "intelligent_adaptive"

    def __init__(self, num_layers, num_experts, top_k, *, horizon: int = 4, pattern_length: int = 2,
                 buckets: int = 2048, half_life: float | None = 8192.0, eta: float = 1.0,
                 max_requests: int = 1024, **kw):
        geo = (num_layers, num_experts, top_k)
        cap = dict(max_requests=max_requests)
        members = {
            "transition": MultiLookAhead(*geo, horizon=horizon, half_life=half_life, components=("cooccurrence",),
                                         **cap),
            "frequency": TopKFrequency(*geo, half_life=SEED_TOPK_HALF_LIFE, **cap),
            "recency": Recency(*geo, **cap),
            "pattern": MultiLookAhead(*geo, horizon=horizon, pattern_length=pattern_length, buckets=buckets,
                                      half_life=half_life, components=("pattern",), **cap),
        }
        super().__init__(members, *geo, horizon=horizon, eta=eta, max_requests=max_requests, **kw)
