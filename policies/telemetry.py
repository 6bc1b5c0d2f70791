"""Prefetch telemetry, pure (no Ray, no clock: steps and seconds are passed in). The PrefetchCoordinator feeds it
and exports `snapshot()` through `stats()` and ray.util.metrics; the simulator feeds it the same way.

What it keeps
  runtime     hits, misses, prefetch hits, stall seconds, bytes loaded per tier: cumulative counters reported by
              each runtime (ClusterExperts.counters), summed over runtimes; `served_by_prefetch` = prefetch hits /
              expert uses. With them each runtime's fast path (cluster/expert_cluster.py RoutePublisher): its
              orders, those superseded by a nearer prediction, and those the router then refuted. Those orders
              never pass the coordinator, so the prefetch and timely-recall figures below do not count them.
              `miss_causes`: the misses by why they missed (MISS_CAUSES), as the workers found them. `hook`: the
              runtimes' routing hook's cost (the fast path, the reuse values, publishing): `loop_s` the decode loop
              waited on it, `deferred_s` it ran while the layers' compute calls were in flight, over `layers`.
  prefetches  issued / used / wasted / cancelled. An issued prefetch of (layer, expert) is *used* when the router
              selects that expert (any request) before it expires (`expiry` decision steps after issue), *wasted*
              when it expires unused or is issued again (it was evicted unused), *cancelled* when the coordinator
              cancels it first. issued = used + wasted + cancelled + pending, always.
  predictor   per layer distance d: recall@k = |top-k predicted ∩ selected| / k, averaged over scored
              (position, distance) pairs; precision = |predicted above threshold ∩ selected| / |predicted above
              threshold|. Timely recall = of the experts selected, the fraction that were predicted (top-k or above
              threshold, at any distance) AND resident at the owner before the layer ran.
  window      (step, window) samples, the last `history` of them.
Memory is bounded: pending predictions per request cover at most `max_distance` positions ahead and are dropped
when scored or when the request ends; pending prefetches are one [L, E] table.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

import numpy as np

FAST_PATH_COUNTERS = ("orders", "superseded", "refuted")   # a runtime reports them as fast_path_<name>
# why a routed expert missed its worker's cache (actors/expert_worker.py ExpertWorker._miss_cause): its load was on
# the wire (predicted, too late), queued behind other loads, a prefetch loaded it and it was evicted unused, it had
# been resident and was evicted, or it was never resident and nothing ordered it
MISS_CAUSES = ("in_flight", "queued", "evicted_unused", "evicted", "not_ordered")


@dataclass
class _Pending:
    """Predictions of one request waiting for the truth: target position (token * L + layer) -> per distance
    (distance, top-k mask bool [E], above-threshold mask bool [E], how many above threshold)."""
    by_pos: dict[int, list[tuple]] = field(default_factory=dict)


class Telemetry:
    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, max_distance: int = 16,
                 expiry: int = 64, history: int = 512):
        self.L, self.E, self.K, self.D = num_layers, num_experts, top_k, max_distance
        self.expiry = expiry
        # prefetches
        self.issued = self.used = self.wasted = self.cancelled = 0
        self._expire = np.full((num_layers, num_experts), -1, np.int64)   # [L, E] decision step; -1: none pending
        # predictor quality, index = distance (0 unused)
        self.recall_sum = np.zeros(max_distance + 1)
        self.recall_n = np.zeros(max_distance + 1, np.int64)
        self.tp = np.zeros(max_distance + 1, np.int64)
        self.predicted = np.zeros(max_distance + 1, np.int64)
        self.timely = 0
        self.selected = 0
        self._pending: dict[Hashable, _Pending] = {}
        # runtime counters per runtime id (cumulative), and windows
        self._runtime: dict[Hashable, dict] = {}
        self.windows: deque = deque(maxlen=history)
        self.steps = 0
        self.events = 0

    # -- predictions and truth ---------------------------------------------------------------------------------
    def record_prediction(self, request: Hashable, pos: int, distance: np.ndarray, layer: np.ndarray,
                          expert: np.ndarray, prob: np.ndarray, threshold: float) -> None:
        """Candidates predicted for `request` whose last observed position is `pos` (token * L + layer)."""
        self.record_predictions([(request, pos, distance, expert, prob)], threshold)

    def record_predictions(self, items: list, threshold: float) -> None:
        """Several requests' candidates at once: items of (request, pos, distance [n], expert [n], prob [n]).
        Stores, per (request, target position, distance), bool [E] masks of the top-k and of the experts above
        `threshold` (scoring then is a lookup)."""
        items = [it for it in items if len(it[2])]
        if not items:
            return
        D, E = self.D + 2, self.E
        lens = [len(it[2]) for it in items]
        rq = np.repeat(np.arange(len(items)), lens)
        dist = np.concatenate([it[2] for it in items])
        ex = np.concatenate([it[3] for it in items])
        pr = np.concatenate([it[4] for it in items])
        grp = rq * D + np.minimum(dist, D - 1)                    # (request, distance) groups
        o = np.argsort(grp * 2.0 - pr, kind="stable")            # by group, then prob desc (prob in (0, 1])
        g, e, p_ = grp[o], ex[o], pr[o]
        start = np.empty(len(g), bool)
        start[0] = True
        np.not_equal(g[1:], g[:-1], out=start[1:])
        first = np.flatnonzero(start)
        rank = np.arange(len(g)) - np.repeat(first, np.diff(np.append(first, len(g))))
        gi = np.cumsum(start) - 1                                 # group index per row
        top = np.zeros((len(first), E), bool)
        thr = np.zeros((len(first), E), bool)
        k = rank < self.K
        top[gi[k], e[k]] = True
        t = p_ >= threshold
        thr[gi[t], e[t]] = True
        nthr = thr.sum(1)
        for j, row in enumerate(first.tolist()):
            d = int(dist[o[row]])
            if d > self.D:
                continue
            r = int(rq[o[row]])
            req, pos = items[r][0], items[r][1]
            pend = self._pending.get(req)
            if pend is None:
                pend = self._pending[req] = _Pending()
            pend.by_pos.setdefault(pos + d, []).append((d, top[j], thr[j], int(nthr[j])))

    def record_truth(self, request: Hashable, pos: int, experts: np.ndarray, resident: np.ndarray) -> None:
        """The router selected `experts` [K] at position `pos` of `request`; `resident` [K] bool: each was in its
        owner's cache before the layer ran (as the coordinator knew it)."""
        self.events += 1
        self.selected += len(experts)
        preds = self._take(request, pos)
        if not preds:
            return
        predicted = np.zeros(len(experts), bool)
        for d, top, thr, nthr in preds:
            hit_top, hit_thr = top[experts], thr[experts]
            self.recall_sum[d] += hit_top.sum() / self.K
            self.recall_n[d] += 1
            self.tp[d] += int(hit_thr.sum())      # experts are distinct: hits among thr = thr ∩ selected
            self.predicted[d] += nthr
            predicted |= hit_top | hit_thr
        self.timely += int((predicted & resident).sum())

    def record_truth_many(self, requests: list, pos: np.ndarray, experts: np.ndarray,
                          resident: np.ndarray) -> None:
        """record_truth of each row in row order (requests [N], pos int [N], experts int [N, K], resident bool
        [N, K]): the pending lookups per row, the scoring of every matched prediction at once."""
        N, K = experts.shape
        self.events += N
        self.selected += N * K
        rows, ds, tops, thrs, nthrs = [], [], [], [], []
        for n, (req, q) in enumerate(zip(requests, np.asarray(pos).tolist())):
            for d, top, thr, nthr in self._take(req, q):
                rows.append(n)
                ds.append(d)
                tops.append(top)
                thrs.append(thr)
                nthrs.append(nthr)
        if not rows:
            return
        r, d = np.array(rows), np.array(ds)
        ex = experts[r]                                            # [M, K] the truth each prediction is scored on
        i = np.arange(len(r))[:, None]
        hit_top, hit_thr = np.stack(tops)[i, ex], np.stack(thrs)[i, ex]   # [M, K]
        np.add.at(self.recall_sum, d, hit_top.sum(1) / self.K)
        np.add.at(self.recall_n, d, 1)
        np.add.at(self.tp, d, hit_thr.sum(1))       # experts are distinct: hits among thr = thr ∩ selected
        np.add.at(self.predicted, d, np.array(nthrs))
        predicted = np.zeros((N, K), np.int64)
        np.add.at(predicted, r, hit_top | hit_thr)
        self.timely += int(((predicted > 0) & resident).sum())

    def _take(self, request: Hashable, pos: int) -> list:
        """The request's predictions for position `pos`, removed with every older one (no longer scorable)."""
        p = self._pending.get(request)
        if p is None or not p.by_pos:
            return []
        preds = p.by_pos.pop(pos, None) or []
        if p.by_pos:
            for old in [q for q in p.by_pos if q < pos]:
                del p.by_pos[old]
        return preds

    def end_request(self, request: Hashable) -> None:
        self._pending.pop(request, None)

    # -- prefetches ----------------------------------------------------------------------------------------------
    def record_issue(self, layer: np.ndarray, expert: np.ndarray, step: int) -> None:
        again = self._expire[layer, expert] >= 0
        self.wasted += int(again.sum())          # issued again while pending: the earlier copy went unused
        self.issued += len(layer)
        self._expire[layer, expert] = step + self.expiry

    def record_use(self, layer: int, experts: np.ndarray) -> int:
        """The router selected `experts` at `layer`: pending prefetches of them are used. Returns how many."""
        hit = self._expire[layer, experts] >= 0
        n = int(hit.sum())
        self.used += n
        self._expire[layer, experts[hit]] = -1
        return n

    def record_cancel(self, layer: np.ndarray, expert: np.ndarray) -> int:
        live = self._expire[layer, expert] >= 0
        n = int(live.sum())
        self.cancelled += n
        self._expire[layer[live], expert[live]] = -1
        return n

    def expire(self, step: int) -> int:
        """Pending prefetches past their expiry step are wasted."""
        old = (self._expire >= 0) & (self._expire < step)
        n = int(old.sum())
        self.wasted += n
        self._expire[old] = -1
        return n

    @property
    def pending(self) -> int:
        return int((self._expire >= 0).sum())

    # -- runtime counters and windows -----------------------------------------------------------------------------
    def record_runtime(self, runtime: Hashable, counters: dict) -> None:
        """Cumulative counters of one runtime (hits, misses, stall_s, bytes_by_tier: {tier: bytes})."""
        self._runtime[runtime] = counters

    def record_window(self, step: int, window: float) -> None:
        self.steps = step
        self.windows.append((step, float(window)))

    def runtime_totals(self) -> dict:
        out = {"hits": 0, "misses": 0, "prefetch_hits": 0, "stall_s": 0.0, "bytes_by_tier": {},
               "fast_path": dict.fromkeys(FAST_PATH_COUNTERS, 0), "miss_causes": dict.fromkeys(MISS_CAUSES, 0),
               "hook": {"loop_s": 0.0, "deferred_s": 0.0, "layers": 0}}
        for c in self._runtime.values():
            for k in ("hits", "misses", "prefetch_hits"):
                out[k] += int(c.get(k, 0))
            for k in FAST_PATH_COUNTERS:
                out["fast_path"][k] += int(c.get("fast_path_" + k, 0))
            out["stall_s"] += float(c.get("stall_s", 0.0))
            out["hook"]["loop_s"] += float(c.get("hook_s", 0.0))
            out["hook"]["deferred_s"] += float(c.get("hook_deferred_s", 0.0))
            out["hook"]["layers"] += int(c.get("hook_layers", 0))
            for t, b in (c.get("bytes_by_tier") or {}).items():
                out["bytes_by_tier"][t] = out["bytes_by_tier"].get(t, 0) + int(b)
            for k, n in (c.get("miss_causes") or {}).items():
                out["miss_causes"][k] = out["miss_causes"].get(k, 0) + int(n)
        return out

    # -- the summary ---------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        rt = self.runtime_totals()
        dist = np.flatnonzero(self.recall_n)
        resolved = self.used + self.wasted
        return {
            **rt,
            "hit_rate": rt["hits"] / max(rt["hits"] + rt["misses"], 1),
            # routed experts a prefetch (this coordinator's or a runtime's fast path) had made resident in time:
            # the workers' own timely recall, where timely_recall below scores only this coordinator's predictions
            "served_by_prefetch": rt["prefetch_hits"] / max(rt["hits"] + rt["misses"], 1),
            "prefetches": {"issued": self.issued, "used": self.used, "wasted": self.wasted,
                           "cancelled": self.cancelled, "pending": self.pending,
                           "precision": self.used / resolved if resolved else None},
            "recall_at_k": {int(d): float(self.recall_sum[d] / self.recall_n[d]) for d in dist},
            "precision_by_distance": {int(d): (float(self.tp[d] / self.predicted[d]) if self.predicted[d] else None)
                                      for d in dist},
            "scored_predictions": {int(d): int(self.recall_n[d]) for d in dist},
            "timely_recall": self.timely / self.selected if self.selected else None,
            "routing_events": self.events,
            "window": self.windows[-1][1] if self.windows else None,
            "window_history": list(self.windows),
        }
