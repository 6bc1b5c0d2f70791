"""The planner's ranking (policies/ranking.py steps 2-9) compiled with numba: one call per decision step instead of
~120 small numpy calls. Why: a paced decode leaves the coordinator idle between layer steps, and after an idle spell
each small numpy call costs 1.7-1.9x its warm cost, while compiled code costs ~1.2x (docs/benchmarks.md, sessions
22-23). Same inputs, same orders as `ranking._rank_numpy` (the readable reference, `PlannerConfig(engine="numpy")`),
to the last bit except P, whose log1p / expm1 come from libm here and from numpy's SIMD loops there (<= 1 ulp);
tests/test_rank_kernel.py checks the two agree on randomized clusters.

Plain loops over the rows (a few hundred candidates) and the flat (layer, expert) keys (a few thousand); the sorts
(one stable mergesort by value, counting sorts by worker, node, distance and tier) keep the reference's
tie-breaks. Compiled once per machine on first use and cached beside this file (numba's cache=True), so an actor
start costs a cache load, not a compile.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_T = 5          # tiers (ranking.TIER_NAMES): hbm, peer, dram, nvme, s3
_HBM, _DRAM = 0, 2


@njit(cache=True)
def _bucket(idx, k, nkeys):
    """idx stably re-ordered by k[idx], small ints in [0, nkeys) (a counting sort: O(n), where a comparison sort
    of a few hundred rows costs ~10 us)."""
    start = np.zeros(nkeys + 1, np.int64)
    for i in idx:
        start[k[i] + 1] += 1
    for b in range(nkeys):
        start[b + 1] += start[b]
    out = np.empty_like(idx)
    for i in idx:
        out[start[k[i]]] = i
        start[k[i]] += 1
    return out


@njit(cache=True)
def bad_row(dist, lay, ex, L, E):
    """The first candidate row outside layers [0, L) x experts [0, E) or at a negative distance; -1: none (the
    kernel has no bounds checks: it indexes with these)."""
    for i in range(len(lay)):
        if lay[i] < 0 or lay[i] >= L or ex[i] < 0 or ex[i] >= E or dist[i] < 0:
            return i
    return -1


@njit(cache=True)
def _src(present, allowed, g, k):
    """The fastest tier below HBM holding a copy of key k that TierSet group g allows; _T: none."""
    for t in range(1, _T):
        if allowed[g, t] and present[t, k]:
            return t
    return _T


@njit(cache=True)
def rank(lens, ris, gids, ms, dist, lay, ex, prob, allowed, present, inflight, staging, nbytes, owner, node_of,
         free_bytes, dram_free, reuse, reuse_used, has_reuse, has_used, lat, bw, window, threshold, confirm, room,
         layer_time, E, stage_to_dram):
    """Per live request j (of those with candidates): lens[j] rows, its index ris[j] among the planner's requests,
    its TierSet group gids[j] and latency-budget factor ms[j]. Rows (requests' candidates one after another, within
    range: bad_row): int64 dist / lay / ex, float64 prob. allowed bool [G, T]; present bool [T, LE]; inflight,
    staging bool [LE]; nbytes, owner int64 [LE]; node_of, free_bytes int64 [W]; dram_free int64 [N]; reuse,
    reuse_used float64 [LE] (read only when has_*); lat, bw float64 [T]; layer_time < 0: none.
    Returns (nk, w, lay, ex, S, tgt, P, value, pri, nb, R, wanted, res_value, keep_used, rk, rstart, ndisp): the
    orders' arrays in issue order (nk = 0: no candidate passed the filters) and what the victim lists are cut from.
    Per-key state lives in compact slots (a few hundred keys), not [LE] arrays: a step touches little memory."""
    LE = len(owner)
    L = LE // E
    W = len(free_bytes)
    G = allowed.shape[0]
    N = len(lay)
    # -- 2. each request's window and threshold; 3. a source tier below HBM its TierSet allows ------------------
    key = np.empty(N, np.int64)
    rid = np.empty(N, np.int64)
    gid = np.empty(N, np.int64)
    ok = np.zeros(N, np.bool_)
    dmax = 0
    i = 0
    for j in range(len(lens)):
        win, thr = window * ms[j], threshold / ms[j]
        for _ in range(lens[j]):
            k = lay[i] * E + ex[i]
            key[i], rid[i], gid[i] = k, ris[j], gids[j]
            if dist[i] <= win and prob[i] >= thr and _src(present, allowed, gids[j], k) < _T:
                ok[i] = True
                dmax = max(dmax, dist[i])
            i += 1
    # -- 4. dedup per key: P = 1 - prod(1 - p), the nearest row (then the likeliest, then the first), the fastest
    # source any of its requests' TierSets allows, staged if any allows DRAM --------------------------------------
    slot = np.full(LE, -1, np.int64)
    keys = np.empty(N, np.int64)
    acc = np.zeros(N)
    best = np.empty(N, np.int64)
    bestf = np.empty(N)
    Sd = np.empty(N, np.int64)
    SOd = np.zeros(N, np.bool_)
    nk = 0
    for i in range(N):
        if not ok[i]:
            continue
        k = key[i]
        s = slot[k]
        if s < 0:
            s = slot[k] = nk
            keys[s], best[s], Sd[s] = k, -1, _T
            nk += 1
        p = min(prob[i], 1 - 1e-12)
        acc[s] += math.log1p(-p)
        f = (k * (dmax + 1) + dist[i]) * 2.0 - p
        if best[s] < 0 or f < bestf[s]:
            best[s], bestf[s] = i, f
        Sd[s] = min(Sd[s], _src(present, allowed, gid[i], k))
        if allowed[gid[i], _DRAM]:
            SOd[s] = True
    wanted = slot >= 0
    res_value = np.zeros(LE)
    keep_used = np.zeros(LE if has_used else 0)
    if has_reuse:   # a resident's reuse at the next token, costed from the fastest copy any TierSet allows
        for k in range(LE):
            s = _T - 1
            for g in range(G):
                s = min(s, _src(present, allowed, g, k))
            st = lat[s] + nbytes[k] / bw[s]
            if layer_time >= 0:
                st = min(st, L * layer_time)
            per_b = st / max(nbytes[k], 1)
            res_value[k] = reuse[k] * per_b
            if has_used:
                keep_used[k] = reuse_used[k] * per_b
    # -- 5. value of the keys not already at the owner's HBM (resident or in flight), in key order --------------
    uk = np.empty(nk, np.int64)
    P = np.empty(nk)
    D = np.empty(nk, np.int64)
    S = np.empty(nk, np.int64)
    SO = np.empty(nk, np.bool_)
    R = np.empty(nk, np.int64)
    nb = np.empty(nk, np.int64)
    value = np.empty(nk)
    n = 0
    for s in np.argsort(keys[:nk]):
        k = keys[s]
        pk = -math.expm1(acc[s])
        b = best[s]
        st = lat[Sd[s]] + nbytes[k] / bw[Sd[s]]
        if layer_time >= 0:
            st = min(st, dist[b] * layer_time)
        v = pk * st / max(nbytes[k], 1)
        if present[_HBM, k] or inflight[k]:   # worth keeping, nothing to fetch
            res_value[k] = max(res_value[k], v)
            continue
        uk[n], P[n], D[n], S[n], SO[n], R[n], nb[n], value[n] = k, pk, dist[b], Sd[s], SOd[s], rid[b], nbytes[k], v
        n += 1
    uk, P, D, S, SO, R, nb, value = uk[:n], P[:n], D[:n], S[:n], SO[:n], R[:n], nb[:n], value[:n]
    w = owner[uk]
    node = node_of[w]
    # every order below is a lexicographic one ending in (-value, key): one stable sort by -value of the rows (in
    # key order), then stable counting sorts by the leading small-int keys (worker, node, distance, tier)
    g = np.argsort(-value, kind="mergesort")
    # -- 6. HBM per worker: free bytes first, then displacement of strictly lower-valued residents ----------------
    rk = np.flatnonzero(present[_HBM])                            # residents, by key
    nres = len(rk)
    rk = rk[_bucket(np.argsort(res_value[rk], kind="mergesort"), owner[rk], W)]   # per worker, lowest value first
    rv = res_value[rk]
    rcum = np.cumsum(nbytes[rk])                                  # flat, across workers
    rcount = np.zeros(W, np.int64)
    for k in rk:
        rcount[owner[k]] += 1
    rend = np.cumsum(rcount)
    rstart = rend - rcount
    to_hbm = np.zeros(n, np.bool_)
    jd = np.zeros(n, np.int64)
    cum = 0
    blocked = False
    prev = -1
    for i in _bucket(g, w, W):                                    # by worker, value desc, key
        x = w[i]
        if x != prev:
            cum, blocked, prev = 0, False, x
        cum += nb[i]                                              # bytes needed up to and including this row
        if blocked:
            continue
        fits = cum <= free_bytes[x]
        base = rcum[rstart[x] - 1] if rstart[x] > 0 else 0        # resident bytes of the workers before
        ji = np.searchsorted(rcum, base + cum - free_bytes[x])    # last resident displaced (flat index)
        disp = ji < rend[x] and P[i] >= confirm and nres > 0 and rv[min(ji, nres - 1)] < value[i]
        if fits or disp:
            to_hbm[i] = True
            if not fits:
                jd[i] = ji - rstart[x] + 1                        # residents of its worker displaced up to here
        else:
            blocked = True                                        # the worker's prefix that really fits ends here
    # -- 7. the rest: stage colder-than-DRAM copies into the owner's node DRAM ------------------------------------
    stage = np.zeros(n, np.bool_)
    if stage_to_dram:
        for i in range(n):
            stage[i] = not to_hbm[i] and SO[i] and S[i] > _DRAM and not present[_DRAM, uk[i]] and not staging[uk[i]]
        sidx = _bucket(g[stage[g]], node, len(dram_free))         # by node, value desc, key
        cum, prev = 0, -1
        for i in sidx:
            if node[i] != prev:
                cum, prev = 0, node[i]
            cum += nb[i]
            stage[i] = cum <= dram_free[node[i]]
    # -- 8. global in-flight cap, best value first ----------------------------------------------------------------
    idx = g[to_hbm[g] | stage[g]]
    tot = 0
    c = 0
    for q in range(len(idx)):
        tot += nb[idx[q]]
        if tot > room:
            break
        c += 1
    idx = idx[:c]
    # -- 9. issue order: warm before cold, earliest deadline, value ----------------------------------------------
    M = len(idx)
    vmax = 1.0
    dm = 0
    if M:
        vmax = value[idx].max()
        dm = D[idx].max()
    idx = _bucket(_bucket(idx, D, dm + 1), S, _T + 1)
    tie = 0.9 * 0.998 / ((1.0 + dm) * (2.0 + dm))
    pri = np.empty(M)
    tgt = np.empty(M, np.int64)
    ndisp = np.zeros(W, np.int64)
    for q in range(M):
        i = idx[q]
        pri[q] = (_T - S[i]) + 0.998 / (1.0 + D[i]) + tie * value[i] / max(vmax, 1e-300)
        tgt[q] = 0 if to_hbm[i] else 1
        if to_hbm[i] and jd[i] > ndisp[w[i]]:
            ndisp[w[i]] = jd[i]
    return (nk, w[idx], uk[idx] // E, uk[idx] % E, S[idx], tgt, P[idx], value[idx], pri, nb[idx], R[idx], wanted,
            res_value, keep_used, rk, rstart, ndisp)
