"""Prefetch ranking: which experts to move where, now, across the whole cluster. Pure numpy: no Ray, no clock
reads (times are passed in), deterministic (every sort has an explicit tie-break), so the simulator drives the
very same code as the PrefetchCoordinator actor.

    planner = PrefetchPlanner(PlannerConfig(max_inflight_bytes=256 << 20), access=AccessPolicy({...}))
    plan = planner.plan([RequestView("r1", cands, tiers=("dram", "nvme"))], view, window=2.0)
    for o in plan.orders(): ...   # Order(worker, layer, expert, priority, request, source, target)

Inputs
  RequestView   one live request: its Candidates (policies/predictors.py: distance, layer, expert, prob), its
                TierSet (tier names it may read from; None: all), its tenant and its latency budget.
  ClusterView   what the coordinator believes about the cluster: the owner worker of each (layer, expert), the
                node of each worker, where copies are (`present[tier, layer, expert]`, tiers relative to the owner:
                hbm = in the owner's cache; peer = in another worker's cache or another node's DRAM tier; dram =
                in the owner's node's DRAM tier; nvme / s3 = in the store), HBM loads and DRAM stagings in flight,
                bytes per expert, each worker's free HBM bytes, each node's free DRAM bytes, bytes in flight.

How it ranks (one call = one decision step)
  1. Access: a request whose tenant may not use the model or one of its TierSet's tiers is denied (Plan.denied
     names the tenant and what), and contributes nothing: no order is ever made on its behalf.
  2. Per request, keep candidates within its window (distance <= window * m) and above its threshold
     (prob >= threshold / m), m = the latency-budget factor: a tight budget (small latency_budget_s) widens the
     window and lowers the threshold (aggressive), a loose one narrows and raises them (conservative).
  3. Source tier of each candidate: the fastest tier holding a copy that the request's TierSet allows (never a
     tier outside it); already in the owner's HBM or in flight there: nothing to do.
  4. Deduplicate across requests and workers: one row per (layer, expert); P(used within the window) =
     1 - prod_r (1 - p_r) over the requests that predict it (independent requests), distance = the nearest.
  5. Value = P x the stall a miss would cost from its source tier (latency + bytes / bandwidth), capped by the
     time until it is needed (distance x layer_time_s, when given: a transfer cannot hide more than the lead
     time), per byte moved.
  6. Per worker, in decreasing value: HBM orders fill the free bytes; beyond them an order may displace
     resident experts only when every one it displaces has a lower value than it (resident values come from the
     same predictions, or, when the view carries `reuse`, from P(used again at the next token) x the stall its
     miss would cost, whichever is higher; without `reuse` a resident nobody predicts is worth 0) AND its
     probability has reached
     `hbm_confirm_prob` (the router is close to confirming it). Once a candidate can do neither, the rest of that
     worker's list stops going to HBM (what was planned must really fit).
  7. Candidates not sent to HBM whose copy is colder than DRAM are staged into the owner's node DRAM tier (if the
     TierSet allows dram, within each node's free DRAM bytes): a prediction waits one hop away without evicting
     anything from HBM.
  8. A global cap on bytes in flight (`max_inflight_bytes` minus what is already in flight) keeps the best orders.
  9. Issue order: warm before cold (shorter transfers first: peer, dram, nvme, s3), then earliest deadline first
     within a tier (the nearest distance: an order needed next layer must not queue behind one needed in ten, or
     both arrive late), then value. The `priority` handed to the workers encodes the same order:
     (number of tiers - source) + 0.998 / (1 + distance) + a value tie-break below the step between the plan's
     two farthest distances.

Plan.keep carries step 6's resident values (and keep_used, their worth once used): with `eviction_hints` the
coordinator hands each worker its residents' values so that a demand miss evicts the resident least likely to be
used soon (predicted or reused), not merely the least recent (opt-in: measured worse than LRU on the embedded model).

WindowController adapts the base window between decision steps: shrink when the wasted fraction of prefetches
rises above `waste_high`, grow when stall time per step rises (or prefetches keep arriving late), within [min, max];
a growth that does not cut stall per step in the next period is undone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, NamedTuple, Sequence

import numpy as np

from .predictors import Candidates

TIER_NAMES = ("hbm", "peer", "dram", "nvme", "s3")   # fastest first; indices below
HBM, PEER, DRAM, NVME, S3 = range(5)
NUM_TIERS = len(TIER_NAMES)
TARGETS = ("hbm", "dram")                            # where an order puts the expert
CONFIRM_SLACK = 1e-9                                 # P within this of hbm_confirm_prob has reached it
TARGET_HBM, TARGET_DRAM = 0, 1


class AccessDenied(PermissionError):
    """A tenant asked for a model or tier it is not allowed; the message names tenant and what was refused."""


@dataclass(frozen=True)
class TenantRule:
    models: frozenset[str] | None = None   # None: every model
    tiers: frozenset[str] | None = None    # None: every tier


@dataclass(frozen=True)
class AccessPolicy:
    """tenant -> what it may use. Unknown tenants are denied unless `default` is given. A request without a
    tenant (None) is the cluster's own (allowed)."""
    tenants: dict[str, TenantRule] = field(default_factory=dict)
    default: TenantRule | None = None

    def check(self, tenant: str | None, model: str | None, tiers: Sequence[str]) -> None:
        """Raise AccessDenied unless `tenant` may use `model` from every tier in `tiers`."""
        if tenant is None:
            return
        rule = self.tenants.get(tenant, self.default)
        if rule is None:
            raise AccessDenied(f"tenant {tenant!r} is not allowed to use this cluster (known tenants: "
                               f"{sorted(self.tenants)})")
        if model is not None and rule.models is not None and model not in rule.models:
            raise AccessDenied(f"tenant {tenant!r} is not allowed model {model!r} (allowed: {sorted(rule.models)})")
        if rule.tiers is not None:
            bad = [t for t in tiers if t != "hbm" and t not in rule.tiers]
            if bad:
                raise AccessDenied(f"tenant {tenant!r} is not allowed tiers {bad} of its TierSet "
                                   f"(allowed: {sorted(rule.tiers)})")


@dataclass(frozen=True)
class TierCosts:
    """Per source tier (TIER_NAMES order): first-byte latency and bandwidth of moving an expert up from it."""
    latency_s: tuple[float, ...] = (0.0, 50e-6, 20e-6, 200e-6, 30e-3)
    bandwidth_Bps: tuple[float, ...] = (float("inf"), 10e9, 20e9, 3e9, 0.5e9)

    def __post_init__(self):
        assert len(self.latency_s) == NUM_TIERS == len(self.bandwidth_Bps), \
            f"TierCosts needs {NUM_TIERS} latencies and bandwidths ({TIER_NAMES})"
        assert all(b > 0 for b in self.bandwidth_Bps), f"bandwidths must be > 0, got {self.bandwidth_Bps}"


@dataclass(frozen=True)
class PlannerConfig:
    threshold: float = 0.05            # minimum P(selected) of a candidate (scaled by the latency-budget factor)
    hbm_confirm_prob: float = 0.5      # below it a prediction never displaces a resident expert (stage instead)
    max_inflight_bytes: int = 256 << 20
    layer_time_s: float | None = None  # time per MoE layer step: caps the stall a prefetch can hide
    latency_ref_s: float = 0.1         # a request's latency budget equal to this: factor 1
    budget_factor_range: tuple[float, float] = (0.5, 2.0)
    costs: TierCosts = TierCosts()
    stage_to_dram: bool = True
    model: str | None = None           # the model name tenants are checked against
    # a TierSet names the cluster config's tiers, which may be called anything ("local-nvme", "archive"): each
    # name's kind (dram / nvme / s3) is its place in TIER_NAMES; names that are kinds themselves need no entry
    tier_kinds: dict[str, str] = field(default_factory=dict)
    # "compiled": steps 2-9 in one numba call (rank_kernel.py); "numpy": the reference, ~120 numpy calls a step
    engine: str = "compiled"

    def __post_init__(self):
        assert self.engine in ("compiled", "numpy"), f"planner engine: 'compiled' or 'numpy', not {self.engine!r}"
        assert 0 < self.threshold <= 1 and 0 < self.hbm_confirm_prob <= 1, "probabilities must lie in (0, 1]"
        assert self.max_inflight_bytes >= 0, "max_inflight_bytes must be >= 0"


@dataclass
class RequestView:
    request: Hashable
    cands: Candidates
    tiers: Sequence[str] | None = None      # the request's TierSet; None: every tier
    tenant: str | None = None
    latency_budget_s: float | None = None   # None: the reference budget (factor 1)


@dataclass
class ClusterView:
    owner: np.ndarray          # int64 [L, E] owning worker index (0..W-1)
    node_of: np.ndarray        # int64 [W] node index (0..N-1) of each worker
    present: np.ndarray        # bool [NUM_TIERS, L, E] copies, relative to the owner (module docstring)
    nbytes: np.ndarray         # int64 [L, E] bytes of each expert
    free_bytes: np.ndarray     # int64 [W] free HBM bytes per worker
    dram_free_bytes: np.ndarray  # int64 [N] free DRAM-tier bytes per node
    inflight: np.ndarray | None = None   # bool [L, E] HBM load pending at the owner
    staging: np.ndarray | None = None    # bool [L, E] DRAM staging pending
    inflight_bytes: int = 0
    reuse: np.ndarray | None = None      # float [L, E] P(a resident is used again at the next token) (reuse.py)
    reuse_used: np.ndarray | None = None  # float [L, E] the same for an expert just used (Plan.keep_used)

    def __post_init__(self):
        L, E = self.owner.shape
        assert self.present.shape == (NUM_TIERS, L, E), f"present must be [{NUM_TIERS}, {L}, {E}]"
        assert self.nbytes.shape == (L, E), f"nbytes must be [{L}, {E}]"
        assert self.owner.min() >= 0 and self.owner.max() < len(self.node_of), "owner outside the workers"
        assert len(self.free_bytes) == len(self.node_of), "free_bytes needs one entry per worker"
        assert len(self.node_of) == 0 or (self.node_of.min() >= 0 and self.node_of.max() < len(self.dram_free_bytes)), \
            f"node_of {self.node_of.tolist()} names nodes outside dram_free_bytes' {len(self.dram_free_bytes)}"
        if self.inflight is None:
            self.inflight = np.zeros((L, E), bool)
        if self.staging is None:
            self.staging = np.zeros((L, E), bool)

    @classmethod
    def empty(cls, owner: np.ndarray, nbytes: np.ndarray, free_bytes, node_of=None, dram_free_bytes=None,
              store_tiers=(NVME,)) -> "ClusterView":
        """Nothing cached anywhere; every expert in the given store tiers."""
        L, E = owner.shape
        W = len(free_bytes)
        present = np.zeros((NUM_TIERS, L, E), bool)
        for t in store_tiers:
            present[t] = True
        node_of = np.zeros(W, np.int64) if node_of is None else np.asarray(node_of, np.int64)
        dram = np.zeros(int(node_of.max()) + 1, np.int64) if dram_free_bytes is None else dram_free_bytes
        return cls(np.asarray(owner, np.int64), node_of, present, np.asarray(nbytes, np.int64),
                   np.asarray(free_bytes, np.int64), np.asarray(dram, np.int64))


class Order(NamedTuple):
    worker: int        # owning worker (the target's node for a DRAM staging: node_of[worker])
    layer: int
    expert: int
    priority: float    # larger first (see module docstring, step 9)
    request: Hashable  # the request that needs it soonest (ties: the highest probability, then the first)
    source: str        # tier it is expected to come from
    target: str        # "hbm": load into the worker's cache; "dram": stage into the node's DRAM tier
    value: float       # expected stall saved per byte (s / B)


@dataclass
class Plan:
    """Orders as parallel arrays, already in issue order (warm before cold, by value)."""
    worker: np.ndarray   # int64 [M]
    layer: np.ndarray    # int64 [M]
    expert: np.ndarray   # int64 [M]
    source: np.ndarray   # int64 [M] tier index
    target: np.ndarray   # int64 [M] TARGET_HBM / TARGET_DRAM
    prob: np.ndarray     # float64 [M] aggregated P(used within the window)
    value: np.ndarray    # float64 [M] s / B
    priority: np.ndarray  # float64 [M]
    nbytes: np.ndarray   # int64 [M]
    request: list        # [M] attributed request
    denied: dict = field(default_factory=dict)   # request -> AccessDenied message
    wanted: np.ndarray | None = None   # bool [L, E]: every (layer, expert) some request predicts in its window
    victims: list | None = None        # [M] per order, the residents (layer, expert) it may displace (HBM only):
                                       # all its worker's plan displaces, lowest value first, each worth less
                                       # than every HBM order of that worker
    keep: np.ndarray | None = None     # float64 [L, E] what keeping each resident / in-flight expert is worth (s/B,
                                       # step 6's resident value): the workers evict lowest first on a demand miss
    keep_used: np.ndarray | None = None  # float64 [L, E] its worth once used (its prediction is spent: what is
                                         # left is its reuse), which a worker switches to at the expert's next use

    def __len__(self) -> int:
        return len(self.layer)

    def orders(self) -> list[Order]:
        return [Order(int(w), int(l), int(e), float(p), r, TIER_NAMES[s], TARGETS[t], float(v))
                for w, l, e, p, r, s, t, v in zip(self.worker, self.layer, self.expert, self.priority,
                                                   self.request, self.source, self.target, self.value)]

    def bytes_by_target(self) -> dict[str, int]:
        return {name: int(self.nbytes[self.target == i].sum()) for i, name in enumerate(TARGETS)}


def _empty_plan(denied: dict, wanted) -> Plan:
    z = np.zeros(0, np.int64)
    return Plan(z, z, z, z, z, np.zeros(0), np.zeros(0), np.zeros(0), z, [], denied, wanted, [])


def _starts(seg: np.ndarray) -> np.ndarray:
    """bool [n]: where a run of equal values begins (seg grouped); np.r_ costs ~30 us a call, this ~2."""
    out = np.empty(len(seg), bool)
    if len(seg):
        out[0] = True
        np.not_equal(seg[1:], seg[:-1], out=out[1:])
    return out


def _seg_cumsum(x: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Cumulative sum of x restarting at every change of seg (seg sorted)."""
    c = np.cumsum(x)
    if len(x) == 0:
        return c
    start = _starts(seg)
    base = np.maximum.accumulate(np.where(start, np.arange(len(x)), 0))
    return c - (c[base] - x[base])


class PrefetchPlanner:
    def __init__(self, cfg: PlannerConfig = PlannerConfig(), access: AccessPolicy | None = None):
        self.cfg, self.access = cfg, access
        self._lat = np.asarray(cfg.costs.latency_s, np.float64)     # [T] s
        self._bw = np.asarray(cfg.costs.bandwidth_Bps, np.float64)  # [T] B/s

    def warm_up(self) -> None:
        """Plan one tiny step, so that the compiled kernel is loaded from numba's cache (or compiled, the first time
        on a machine: seconds) now rather than in the first decision of a live decode."""
        view = ClusterView.empty(np.zeros((1, 2), np.int64), np.ones((1, 2), np.int64), np.ones(1, np.int64))
        view.reuse = np.zeros((1, 2))
        self.plan([RequestView(None, Candidates(np.ones(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64),
                                                np.ones(1)))], view, 1.0)

    def budget_factor(self, latency_budget_s: float | None) -> float:
        """> 1 for a tight budget (aggressive), < 1 for a loose one (conservative)."""
        if latency_budget_s is None:
            return 1.0
        lo, hi = self.cfg.budget_factor_range
        return min(max(self.cfg.latency_ref_s / max(latency_budget_s, 1e-9), lo), hi)

    def plan(self, requests: Sequence[RequestView], view: ClusterView, window: float) -> Plan:
        """One decision step: the orders to issue now (module docstring). `window`: the base lookahead in layers.
        Vectorized over (layer, expert) as flat keys layer * E + expert; the per-request loop only filters."""
        cfg = self.cfg
        L, E = view.owner.shape
        LE = L * E
        denied: dict = {}
        groups: dict[tuple, int] = {}                            # TierSet -> group index
        masks: list[np.ndarray] = []                             # per group: bool [NUM_TIERS] allowed
        cands, ris, gids, ms = [], [], [], []
        for ri, rv in enumerate(requests):   # per request only bookkeeping; the rows are handled together below
            names = TIER_NAMES[1:] if rv.tiers is None else tuple(rv.tiers)
            g = groups.get(names)
            if g is None:
                kinds = [cfg.tier_kinds.get(t, t) for t in names]
                unknown = [t for t, k in zip(names, kinds) if k not in TIER_NAMES]
                if unknown:
                    raise ValueError(f"request {rv.request!r}: unknown tiers {unknown} in its TierSet "
                                     f"(known: {sorted(set(TIER_NAMES) | set(cfg.tier_kinds))})")
                allowed = np.zeros(NUM_TIERS, bool)
                allowed[[TIER_NAMES.index(k) for k in kinds]] = True
                g = groups[names] = len(masks)
                masks.append(allowed)
            if self.access is not None:
                try:
                    self.access.check(rv.tenant, cfg.model, names)
                except AccessDenied as e:
                    denied[rv.request] = str(e)
                    continue
            if len(rv.cands):
                cands.append(rv.cands)
                ris.append(ri)
                gids.append(g)
                ms.append(self.budget_factor(rv.latency_budget_s))
        if not cands:
            return _empty_plan(denied, np.zeros((L, E), bool))
        lens = np.array([len(c) for c in cands], np.int64)
        dist = np.concatenate([c.distance for c in cands]).astype(np.int64, copy=False)
        lay = np.concatenate([c.layer for c in cands]).astype(np.int64, copy=False)
        ex = np.concatenate([c.expert for c in cands]).astype(np.int64, copy=False)
        prob = np.concatenate([c.prob for c in cands]).astype(np.float64, copy=False)
        rank, bad_row = _compiled() if cfg.engine == "compiled" else (_rank_numpy, _bad_row)
        bad = bad_row(dist, lay, ex, L, E)
        if bad >= 0:
            ri = ris[int(np.searchsorted(np.cumsum(lens), bad, side="right"))]
            raise ValueError(f"request {requests[ri].request!r}: candidates outside layers [0, {L}) x experts "
                             f"[0, {E}), or at a negative distance")
        has_reuse = view.reuse is not None
        has_used = has_reuse and view.reuse_used is not None
        none = np.zeros(0)
        (nk, w, lay, ex, S, tgt, P, value, pri, nb, R, wanted, res_value, keep_used, rk, rstart, ndisp) = rank(
            lens, np.array(ris, np.int64), np.array(gids, np.int64), np.array(ms, np.float64), dist, lay, ex, prob,
            np.stack(masks), _arg(view.present, bool, NUM_TIERS, LE), _arg(view.inflight, bool, LE),
            _arg(view.staging, bool, LE), _arg(view.nbytes, np.int64, LE), _arg(view.owner, np.int64, LE),
            _arg(view.node_of, np.int64), _arg(view.free_bytes, np.int64), _arg(view.dram_free_bytes, np.int64),
            _arg(view.reuse, np.float64, LE) if has_reuse else none,
            _arg(view.reuse_used, np.float64, LE) if has_used else none, has_reuse, has_used,
            # P = 1 - prod(1 - p) comes back from logs a few ulp off p: a prediction exactly at hbm_confirm_prob (or
            # 1.0, capped at 1 - 1e-12) must count as having reached it, in either engine
            self._lat, self._bw, float(window), float(cfg.threshold), float(cfg.hbm_confirm_prob) - CONFIRM_SLACK,
            max(int(cfg.max_inflight_bytes) - int(view.inflight_bytes), 0),
            -1.0 if cfg.layer_time_s is None else float(cfg.layer_time_s), E, bool(cfg.stage_to_dram))
        if nk == 0:
            return _empty_plan(denied, np.zeros((L, E), bool))
        # victims: the residents the worker's plan displaces, lowest value first (the worker evicts only these).
        # The worker loads in priority order, not in value order, so a nearer order of lower value may take the
        # free bytes first: every HBM order of the worker names all of them, and whichever loads once the free
        # bytes are gone evicts from them. Each is worth less than the worker's lowest-valued HBM order (the one
        # that displaced the last of them), so no order can evict a resident worth more than itself
        displaced = {wi: [divmod(int(k), E) for k in rk[rstart[wi]:rstart[wi] + ndisp[wi]]]   # one list per worker,
                     for wi in np.flatnonzero(ndisp).tolist()}                             # shared by its orders
        victims: list = [displaced.get(wi, []) if t == TARGET_HBM else [] for wi, t in zip(w.tolist(), tgt.tolist())]
        return Plan(w, lay, ex, S, tgt, P, value, pri, nb, [requests[r].request for r in R.tolist()], denied,
                    wanted.reshape(L, E), victims, res_value.reshape(L, E),
                    keep_used.reshape(L, E) if has_used else None)


def _arg(a, dtype, *shape: int) -> np.ndarray:
    """a as a writable, C-contiguous array of dtype (reshaped to `shape` if given): the one array type the compiled
    kernel is specialised for. A read-only array (as Ray hands them over) would make numba compile, or load, a
    second specialisation in the middle of a decision."""
    a = np.ascontiguousarray(a, dtype)
    if not a.flags.writeable:
        a = a.copy()
    return a.reshape(shape) if shape else a


def _compiled():
    """The compiled ranking and row check (policies/rank_kernel.py), imported on first use: numba's import and
    cache load stay out of processes that never plan."""
    from .rank_kernel import bad_row, rank
    return rank, bad_row


def _bad_row(dist: np.ndarray, lay: np.ndarray, ex: np.ndarray, L: int, E: int) -> int:
    bad = np.flatnonzero((lay < 0) | (lay >= L) | (ex < 0) | (ex >= E) | (dist < 0))
    return int(bad[0]) if len(bad) else -1


def _rank_numpy(lens, ris, gids, ms, dist, lay, ex, prob, allowed, present, inflight, staging, nbytes, owner,
                node_of, free_bytes, dram_free, reuse, reuse_used, has_reuse, has_used, lat, bw, window, threshold,
                confirm, room, layer_time, E, stage_to_dram):
    """Steps 2-9 in numpy: the readable reference of policies/rank_kernel.rank (same arguments, same results;
    PlannerConfig(engine="numpy"))."""
    LE = len(owner)
    L = LE // E
    W = len(free_bytes)
    key = lay * E + ex
    m = np.repeat(ms, lens)
    gid = np.repeat(gids, lens)
    rid = np.repeat(ris, lens)
    # the source is the fastest allowed copy below HBM: for a resident expert, what a miss would cost once
    # evicted (its value guards it), for the others where the prefetch reads from; 5: nowhere allowed
    ok = present[1:][None] & allowed[:, 1:, None]                # [G, T-1, LE]
    tables = np.where(ok.any(1), 1 + ok.argmax(1), NUM_TIERS)   # [G, LE]
    src = tables[gid, key]
    keep = (dist <= window * m) & (prob >= threshold / m) & (src < NUM_TIERS)
    if not keep.any():
        z = np.zeros(0, np.int64)
        return (0,) + (z,) * 16
    key, src, dist, gid = key[keep], src[keep], dist[keep], gid[keep]
    prob = np.minimum(prob[keep], 1 - 1e-12)
    rid = rid[keep]

    # -- 4. dedup per (layer, expert): P = 1 - prod(1 - p), nearest distance, fastest allowed source ------------
    cnt = np.bincount(key, minlength=LE)
    wanted = cnt > 0
    uk = np.flatnonzero(wanted)                                  # sorted: ties below break by (layer, expert)
    P = -np.expm1(np.bincount(key, weights=np.log1p(-prob), minlength=LE)[uk])
    # one sort gives, per key, the nearest distance and the request to attribute the order to (the one that
    # needs it soonest; ties: the highest probability, then the earlier request); prob in (0, 1)
    o = np.argsort((key * (int(dist.max()) + 1) + dist) * 2.0 - prob, kind="stable")
    first = _starts(key[o])
    D = dist[o][first]
    R = rid[o][first]                                            # in uk order (keys ascending)
    Sd = np.full(LE, NUM_TIERS)
    np.minimum.at(Sd, key, src)
    S = Sd[uk]                                                   # several TierSets: the fastest any allows,
    SO = np.bincount(key, weights=allowed[gid, DRAM].astype(np.float64), minlength=LE)[uk] > 0   # staged if any
    nb = nbytes[uk]                                                                             # allows DRAM
    # -- 5. value --------------------------------------------------------------------------------------------
    stall = lat[S] + nb / bw[S]
    if layer_time >= 0:
        stall = np.minimum(stall, D * layer_time)
    value = P * stall / np.maximum(nb, 1)
    # resident / in flight: worth keeping (their value guards them from eviction) but nothing to fetch
    at_hbm = present[HBM][uk] | inflight[uk]
    res_value = np.zeros(LE)
    keep_used = np.zeros(0)
    if has_reuse:   # what keeping a resident is worth: its reuse at the next token (L layers on)
        # costed from the fastest copy any live request's TierSet allows (as the sources of step 4), so that
        # the plan does not depend on which request is listed first
        s_r = np.minimum(tables.min(0), NUM_TIERS - 1)
        stall_r = lat[s_r] + nbytes / bw[s_r]
        if layer_time >= 0:
            stall_r = np.minimum(stall_r, L * layer_time)
        per_b = stall_r / np.maximum(nbytes, 1)
        res_value = reuse * per_b
        if has_used:
            keep_used = reuse_used * per_b
    res_value[uk[at_hbm]] = np.maximum(res_value[uk[at_hbm]], value[at_hbm])
    todo = ~at_hbm
    uk, P, D, S, SO, R, nb, value = (a[todo] for a in (uk, P, D, S, SO, R, nb, value))
    w = owner[uk]

    # -- 6. HBM per worker: free bytes first, then displacement of strictly lower-valued residents -------------
    o = _order(w, -value)                                        # by worker, value desc, (layer, expert) for ties
    uk, P, D, S, SO, R, nb, value, w = (a[o] for a in (uk, P, D, S, SO, R, nb, value, w))
    cum = _seg_cumsum(nb, w)                                     # bytes needed up to and including each row
    fits = cum <= free_bytes[w]
    # residents per worker, lowest value first, as one flat array with per-worker offsets
    rk = np.flatnonzero(present[HBM])
    rw = owner[rk]
    rk = rk[_order(rw, res_value[rk])]
    rw = owner[rk]
    rv_ = res_value[rk]
    rcum = np.cumsum(nbytes[rk])                                 # flat, across workers
    rcount = np.bincount(rw, minlength=W)
    rend = np.cumsum(rcount)
    rstart = rend - rcount
    rbase = rcum[np.maximum(rstart - 1, 0)] * (rstart > 0) if len(rcum) else np.zeros(W, np.int64)
    #                                                            ^ resident bytes of the workers before
    extra = cum - free_bytes[w]                                  # bytes to displace
    j = np.searchsorted(rcum, rbase[w] + extra, side="left")     # last resident displaced (flat index)
    displace_ok = (j < rend[w]) & (P >= confirm)
    if len(rv_):
        displace_ok &= rv_[np.minimum(j, len(rv_) - 1)] < value
    else:
        displace_ok[:] = False
    good = fits | displace_ok
    to_hbm = _seg_cumsum((~good).astype(np.int64), w) == 0      # the worker's prefix that really fits
    jd = np.where(to_hbm & ~fits, j - rstart[w] + 1, 0)        # residents of its worker displaced up to here
    # -- 7. the rest: stage colder-than-DRAM copies into the owner's node DRAM ------------------------------
    node = node_of[w]
    stage = ~to_hbm & stage_to_dram & SO & (S > DRAM) & ~present[DRAM][uk] & ~staging[uk]
    if stage.any():
        sidx = np.flatnonzero(stage)
        sidx = sidx[_order(node[sidx], -value[sidx], uk[sidx])]
        sfit = _seg_cumsum(nb[sidx], node[sidx]) <= dram_free[node[sidx]]
        stage[:] = False
        stage[sidx[sfit]] = True
    # -- 8. global in-flight cap, best value first --------------------------------------------------------------
    idx = np.flatnonzero(to_hbm | stage)
    idx = idx[_order(-value[idx], uk[idx])]
    idx = idx[np.cumsum(nb[idx]) <= room]
    # -- 9. issue order: warm before cold, then earliest deadline (nearest distance), then value ---------------
    idx = idx[_order(S[idx], D[idx], -value[idx], uk[idx])]
    vmax = value[idx].max() if len(idx) else 1.0
    # the value tie-break stays below the smallest step between two distances of this plan, so that no value
    # puts a farther order before a nearer one, however far the window reaches
    dmax = float(D[idx].max()) if len(idx) else 0.0
    tie = 0.9 * 0.998 / ((1.0 + dmax) * (2.0 + dmax))
    pri = (NUM_TIERS - S[idx]) + 0.998 / (1.0 + D[idx]) + tie * value[idx] / max(vmax, 1e-300)
    tgt = np.where(to_hbm[idx], TARGET_HBM, TARGET_DRAM).astype(np.int64)
    hb = idx[to_hbm[idx]]
    ndisp = np.zeros(W, np.int64)                                # residents each worker's plan displaces
    np.maximum.at(ndisp, w[hb], jd[hb])
    return (int(wanted.sum()), w[idx], uk[idx] // E, uk[idx] % E, S[idx], tgt, P[idx], value[idx], pri,
            nb[idx], R[idx], wanted, res_value, keep_used, rk, rstart, ndisp)


def _order(*keys: np.ndarray) -> np.ndarray:
    """Indices sorting by keys[0], then keys[1], ...; remaining ties keep the current order (stable). Successive
    stable argsorts: much cheaper than np.lexsort for the few thousand rows of a step."""
    idx = np.arange(len(keys[0]))
    for k in reversed(keys):
        idx = idx[np.argsort(k[idx], kind="stable")]
    return idx


@dataclass
class WindowController:
    """The base lookahead window (in MoE layers), adapted between steps from telemetry deltas: shrink by `shrink`
    when the wasted fraction of recently resolved prefetches exceeds `waste_high`; otherwise grow by `grow` when
    stall time per layer step rose above its running average (by `stall_rise`), or when prefetches arrived late
    (ordered, still in flight when their layer ran: a longer lead would have hidden them) while prefetches are
    rarely wasted (below `waste_low`). Misses alone are no reason: at a small cache they never stop, and a window
    grown on them only adds loads.

    Every growth is judged by its effect: if over the next `judge` periods stall per step is not below its mean
    over the `judge` periods up to the growth by `gain` (a wider window that only adds loads, or a stall rise
    that was noise), the growth is undone and that width is out of reach for `block` updates. Means over several
    periods, because a growth triggered by a stall spike would otherwise look good next to the spike it followed.
    Without this, stall noise alone ratcheted the window to its ceiling (measured: 12 layers on the embedded
    model, where 4 was faster; docs/benchmarks.md). Deterministic: a function of the inputs only."""
    window: float = 2.0
    min_window: float = 1.0
    max_window: float = 8.0
    waste_high: float = 0.5
    waste_low: float = 0.2
    stall_rise: float = 1.1
    shrink: float = 0.8
    grow: float = 1.25
    gain: float = 0.05               # a growth is kept if it cut mean stall per step by at least this fraction
    judge: int = 2                   # periods a growth is judged over (and the baseline it is judged against)
    block: int = 16                  # updates an undone growth's width stays out of reach
    avg_stall: float | None = None   # EMA of stall seconds per step
    ema: float = 0.2
    recent: list = field(default_factory=list)   # stall per step of the last `judge` periods
    trial: list | None = None        # [window before the growth, baseline mean stall, stalls since]: on trial
    ceiling: float = float("inf")    # an undone growth's width: not reached again while blocked > 0
    blocked: int = 0
    undone: int = 0                  # growths undone so far (telemetry)

    def update(self, *, wasted: int, used: int, stall_s: float, steps: int, late: int = 0) -> float:
        """wasted/used: prefetches resolved since the last update; stall_s/late: over `steps` layer steps."""
        if steps <= 0:
            return self.window
        per = stall_s / steps
        resolved = wasted + used
        waste = wasted / resolved if resolved else 0.0
        self.recent = (self.recent + [per])[-self.judge:]
        self.blocked = max(0, self.blocked - 1)
        if self.blocked == 0:
            self.ceiling = float("inf")
        if waste > self.waste_high:
            self.window *= self.shrink
            self.trial = None
        elif self.trial is not None:
            before, base, since = self.trial
            since.append(per)
            if len(since) >= self.judge:
                self.trial = None
                if not sum(since) / len(since) < base * (1 - self.gain):   # the growth did not pay: undo it
                    self.ceiling, self.blocked = self.window, self.block
                    self.window = before
                    self.undone += 1
        elif (self.avg_stall is not None and per > self.avg_stall * self.stall_rise and per > 0) or \
                (late > 0 and waste < self.waste_low):
            grown = min(self.window * self.grow, self.max_window)
            if self.window < grown < self.ceiling:
                self.trial = [self.window, sum(self.recent) / len(self.recent), []]
                self.window = grown
        self.avg_stall = per if self.avg_stall is None else (1 - self.ema) * self.avg_stall + self.ema * per
        self.window = float(np.clip(self.window, self.min_window, self.max_window))
        return self.window
