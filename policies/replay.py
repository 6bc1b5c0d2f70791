"""Trace-driven evaluation without Ray: predictor recall and expert-cache hit rates on a RoutingTrace.

recall_at_k    feed a predictor the trace's events in routing order and score, before each target is revealed,
               how many of its true experts are among the predictor's top-k for it.
cache_hit_rate replay the trace's expert accesses through an LRU cache or Belady's offline optimum.

Both walk the trace in order: requests back to back, within one token after token, within a token layer after
layer. Unknown (token, layer) positions are skipped: never observed, never a target, never an access.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .predictors import Predictor, RoutingEvent
from .traces import RoutingTrace


@dataclass(frozen=True)
class Recall:
    overall: float          # sum(hits) / sum(targets * k)
    per_layer: np.ndarray   # float64 [L]: recall by target layer, NaN where a layer was never a target
    hits: np.ndarray        # int64 [L]: true experts found in the top-k, by target layer
    targets: np.ndarray     # int64 [L]: scored (token, layer) targets, by target layer
    k: int
    distance: int


def recall_at_k(predictor: Predictor, trace: RoutingTrace, distance: int = 1, *, k: int | None = None,
                wrap: bool = False) -> Recall:
    """Recall@k of `predictor` at `distance` layers ahead (k defaults to the trace's top_k).

    Definition: for every known (token t, layer l) of a request, in routing order: observe its event, then — if
    the position `distance` layers later (layer (l + d) mod L of token t + (l + d) // L) belongs to the same
    request and is known — ask predict(request, distance), take the top-k experts at that distance (ties: lower
    id) and count how many of the target's true experts are among them. recall = found / (targets * k). The
    predictor is fresh or warm as handed in (the README figures: fresh, i.e. online from empty tables over the
    whole trace, no per-request reset); end(request) is called after each request.

    wrap=False (the default) scores only targets in the same token as their source (l + d < L): "next-layer"
    recall as the README's orientation figures define it. wrap=True also scores targets in the request's next
    token (layer 0 predicted after layer L-1, ...), what a prefetcher crossing token boundaries meets; on the real
    traces that is about 0.01 lower for the cross-layer transition, whose (L-1 -> 0) step is the weakest.
    """
    assert distance >= 1, f"distance must be >= 1, got {distance}"
    assert (predictor.L, predictor.E) == (trace.num_layers, trace.num_experts), \
        f"predictor is for L={predictor.L} E={predictor.E}, trace has {trace.num_layers} x {trace.num_experts}"
    L = trace.num_layers
    k = trace.top_k if k is None else k
    hits = np.zeros(L, np.int64)
    targets = np.zeros(L, np.int64)
    for req in trace.requests():
        n = req.num_tokens * L
        xs = req.experts.reshape(n, trace.top_k).astype(np.int64)             # [n*L, K] flat positions
        ws = req.weights.reshape(n, trace.top_k)
        hs = None if req.hidden is None else req.hidden.reshape(n, -1)
        known = xs[:, 0] >= 0                                                 # [n*L]
        wknown = ~np.isnan(ws[:, 0])
        # which positions get scored: the target p + d exists, is known, and (wrap or same token)
        q = np.arange(n) + distance
        score = known & (q < n)
        score[score] = known[q[score]]
        if not wrap:
            score &= (np.arange(n) % L) + distance < L
        for p in np.flatnonzero(known).tolist():
            t, l = divmod(p, L)
            predictor.observe(RoutingEvent(req.index, t, l, xs[p], ws[p] if wknown[p] else None,
                                           None if hs is None else hs[p]))
            if score[p]:
                top = predictor.predict(req.index, distance).at(distance).top(k)
                tl = (p + distance) % L
                hits[tl] += int((xs[p + distance][:, None] == top[None, :]).any(1).sum())
                targets[tl] += 1
        predictor.end(req.index)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_layer = hits / (targets * k)
    overall = float(hits.sum() / max(targets.sum() * k, 1))
    return Recall(overall, per_layer, hits, targets, k, distance)


# -- expert cache replay ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheResult:
    hit_rate: float
    hits: int
    accesses: int
    capacity: int   # experts the cache holds
    policy: str


def access_sequence(trace: RoutingTrace) -> np.ndarray:
    """int64 [N]: expert keys layer * E + expert of every known slot, in routing order (slots as recorded)."""
    keys = np.arange(trace.num_layers)[None, :, None] * trace.num_experts + trace.experts.astype(np.int64)
    return keys.reshape(-1)[trace.experts.reshape(-1) >= 0]


def next_use(keys: np.ndarray) -> np.ndarray:
    """int64 [N]: for each access, the index of the next access to the same key, or N if none."""
    n = len(keys)
    nxt = np.full(n, n, np.int64)
    order = np.argsort(keys, kind="stable")  # accesses grouped by key, in time order within a key
    same = keys[order[1:]] == keys[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def cache_hit_rate(trace: RoutingTrace, capacity_fraction: float, policy: str = "lru") -> CacheResult:
    """Hit rate of one expert cache holding round(capacity_fraction * L * E) experts (at least 1), shared by all
    requests and layers, starting empty (compulsory misses count), fed every known (token, layer, slot) access
    in routing order. A miss always inserts the expert (demand fetch), evicting when full:
      lru     the least recently used expert
      belady  the resident expert whose next use is farthest in the future (Belady's MIN, the offline optimum
              for demand fetching; next uses are precomputed, so the loop is a heap push per access)
    """
    assert 0 < capacity_fraction <= 1, f"capacity_fraction must be in (0, 1], got {capacity_fraction}"
    cap = max(1, int(round(capacity_fraction * trace.num_layers * trace.num_experts)))
    keys = access_sequence(trace)
    if policy == "lru":
        hits = _lru_hits(keys, cap)
    elif policy == "belady":
        hits = _belady_hits(keys, cap, trace.num_layers * trace.num_experts)
    else:
        raise ValueError(f"unknown cache policy {policy!r}; supported: lru, belady")
    n = len(keys)
    return CacheResult(hits / n if n else float("nan"), hits, n, cap, policy)


def _lru_hits(keys: np.ndarray, cap: int) -> int:
    od: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for k in keys.tolist():
        if k in od:
            od.move_to_end(k)
            hits += 1
        else:
            od[k] = None
            if len(od) > cap:
                od.popitem(last=False)
    return hits


def _belady_hits(keys: np.ndarray, cap: int, num_keys: int) -> int:
    n = len(keys)
    nxt = next_use(keys).tolist()
    cur = [-1] * num_keys  # the resident key's next use, -1 if not resident
    # a max-heap on next use, entries encoded as one int -(next_use * num_keys + key) (cheaper than tuples);
    # entries go stale when their key is re-accessed or evicted and are skipped when popped
    heap: list[int] = []
    size = hits = 0
    for i, k in enumerate(keys.tolist()):
        if cur[k] >= 0:
            hits += 1
        elif size < cap:
            size += 1
        else:
            while True:
                nu, v = divmod(-heapq.heappop(heap), num_keys)
                if cur[v] == nu:
                    break
            cur[v] = -1
        nu = nxt[i]
        cur[k] = nu
        heapq.heappush(heap, -(nu * num_keys + k))
    assert n == 0 or size <= cap
    return hits
