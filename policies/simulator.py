"""Discrete-event simulator of the expert-serving cluster on a virtual clock: N GPU workers with HBM expert caches,
each node's DRAM tier, a storage tier, and the links between them, decoding batches of requests whose routing comes
from a RoutingTrace (real, or policies/synthetic.py's generator). Pure: no Ray, no wall clock in any decision.

It drives the project's real policy code, not a copy: predictors from policies/registry.py (observe / predict on
every routing event), the cluster-wide PrefetchPlanner of policies/ranking.py (one `plan` per MoE layer step,
fed a ClusterView of the simulated state), each worker's CacheIndex with its eviction policy
(policies/hbm_cache.py), the DRAM tier's ByteBudgetLRU (policies/eviction.py) and the placement of experts on
workers (policies/placement.py).

Model of one decode step (every active request advances one token; a finished request's slot takes the next
request of the trace: continuous batching):
  per MoE layer l:  dense part (attention, norms, shared experts)            dense_s
                    router -> routing events; the coordinator observes them, predicts and plans; its orders
                    are issued `decision_latency` later (virtual; the planner's real wall cost is measured
                    separately and reported, it does not enter the clock, so runs are deterministic)
                    each distinct expert of the batch: resident in its owner's cache (hit, pinned), in flight
                    (late: a queued transfer is promoted to demand priority) or missing (demand load)
                    each worker computes its experts in the order they become available; the layer ends when
                    the slowest worker is done (+ the per-layer dispatch overhead, + the activations' network
                    hop when a worker sits on another node than the runtime)
Links: every worker has a host->HBM link (`h2d_channels` transfers at once, each at h2d_bw, + latency); every node
a storage link (`channels` reads at once, each at bw_per_channel, + first-byte latency) and a NIC (peer copies,
activations). A transfer waits in a priority queue per link: demand loads before prefetches, prefetches by the
planner's priority; transfers in service are never preempted. A transfer over several links is store-and-forward.
Optional worker limits (SimConfig): `prefetch_concurrency` prefetch loads in flight per worker (the rest wait at the
worker by priority), `promote_queued=False` (a late prefetch keeps its place in a link's queue),
`compute_after_loads` (a worker computes once all its misses landed).

Counting: an expert use = one distinct (layer, expert) a batch step needs (per slot at batch 1, so hit rates match
the LRU replay of policies/replay.py); hit = resident when the router asks. Bytes per link are counted when a
transfer starts on it. docs/simulator.md states the assumptions.
"""
from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from .eviction import ByteBudgetLRU
from .hbm_cache import CacheIndex, DoesNotFit, make_policy
from .placement import place
from .predictors import Predictor, RoutingEvent
from .profiles import Hardware, Model, Storage
from .reuse import ReuseEstimator, make_reuse_values
from .traces import RoutingTrace, TraceSlots

DEMAND = -math.inf  # link priority of a demand load: before every prefetch


# -- the event engine ------------------------------------------------------------------------------------------
class Clock:
    """Virtual time and a heap of (time, seq, fn, args); seq keeps equal-time events in scheduling order."""

    def __init__(self):
        self.now = 0.0
        self._q: list = []
        self._seq = itertools.count()

    def at(self, t: float, fn, *args) -> None:
        assert t >= self.now - 1e-12, f"event scheduled in the past: {t} < {self.now}"
        heapq.heappush(self._q, (t, next(self._seq), fn, args))

    def run_until(self, t: float) -> None:
        """Process every event up to time t, then stand at t."""
        while self._q and self._q[0][0] <= t:
            te, _, fn, args = heapq.heappop(self._q)
            self.now = max(self.now, te)
            fn(*args)
        self.now = max(self.now, t)

    def run_while(self, cond) -> None:
        """Process events one by one while cond() holds."""
        while cond():
            assert self._q, "simulator deadlock: waiting with no event pending"
            te, _, fn, args = heapq.heappop(self._q)
            self.now = max(self.now, te)
            fn(*args)


@dataclass(eq=False)
class Transfer:
    worker: int
    layer: int
    expert: int
    nbytes: int
    hops: list                  # links still to cross, in order
    target: str                 # "hbm" (into the worker's cache) or "dram" (stage into its node's DRAM tier)
    demand: bool
    prio: float
    version: int = 0            # bumped on promotion: older heap entries are skipped
    queued_on: "Link | Gate | None" = None
    slot: bool = False          # holds one of its worker's prefetch slots (released when it lands)
    t0: float = math.nan        # when its first hop was asked (past the worker's prefetch slots): load time from here


def _next_queued(q: list, owner) -> "Transfer | None":
    """Pop the next live transfer of `owner`'s priority queue: entries left behind by a promotion (an older
    version, or now queued elsewhere) are skipped. The transfer leaves the queue (queued_on None)."""
    while q:
        _, _, ver, tr = heapq.heappop(q)
        if ver == tr.version and tr.queued_on is owner:
            tr.queued_on = None
            return tr
    return None


class Link:
    """`channels` transfers at once, each at `bw` bytes/s after `latency` s; queued by priority (lower first).
    With split_min_bytes > 0 a starting transfer also takes the channels free at that moment, one part per
    split_min_bytes at least, its parts in parallel (storage_adapters/emulated.py's split reads)."""

    def __init__(self, clock: Clock, name: str, kind: str, bw: float, latency: float, channels: int, on_hop,
                 split_min_bytes: int = 0):
        assert bw > 0 and channels >= 1, f"link {name}: bw {bw} and channels {channels} must be positive"
        self.clock, self.name, self.kind = clock, name, kind
        self.bw, self.latency, self.free, self.channels = bw, latency, channels, channels
        self.split_min_bytes = split_min_bytes
        self.on_hop = on_hop
        self._q: list = []
        self._seq = itertools.count()
        self.bytes = 0
        self.busy_s = 0.0

    def submit(self, tr: Transfer) -> None:
        tr.queued_on = self
        if math.isnan(tr.t0):
            tr.t0 = self.clock.now
        heapq.heappush(self._q, (tr.prio, next(self._seq), tr.version, tr))
        self._start()

    def promote(self, tr: Transfer) -> None:
        """A queued prefetch is needed now: give it demand priority (no-op once in service)."""
        if tr.queued_on is self and tr.prio != DEMAND:
            tr.version += 1
            tr.prio = DEMAND
            self.submit(tr)

    def _start(self) -> None:
        while self.free and (tr := _next_queued(self._q, self)) is not None:
            parts = 1
            if self.split_min_bytes and self.free > 1:
                want = min(self.channels, tr.nbytes // self.split_min_bytes)
                # extra channels only when nothing else is queued (the emulated link hands a freed one to a waiter)
                if want > 1 and not any(e[3].queued_on is self and e[2] == e[3].version for e in self._q):
                    parts = min(want, self.free)
            self.free -= parts
            dt = self.latency + tr.nbytes / (parts * self.bw)
            self.bytes += tr.nbytes
            self.busy_s += dt * parts
            self.clock.at(self.clock.now + dt, self._done, tr, parts)

    def _done(self, tr: Transfer, parts: int = 1) -> None:
        self.free += parts
        self.on_hop(self, tr)
        self._start()


class Gate:
    """A worker's prefetch slots: at most `slots` prefetch loads in flight (ExpertWorker runs
    workers.prefetch_concurrency prefetch threads, each doing one whole load at a time); further prefetch orders
    wait here by priority. A demand for a waiting one takes it out and issues it at demand priority, slot-free (the
    worker dequeues it and loads it on its I/O pool)."""

    def __init__(self, slots: int):
        assert slots >= 1, f"prefetch slots must be >= 1, got {slots}"
        self.free = slots
        self._q: list = []
        self._seq = itertools.count()

    def submit(self, tr: Transfer) -> None:
        tr.queued_on = self
        heapq.heappush(self._q, (tr.prio, next(self._seq), tr.version, tr))
        self._start()

    def promote(self, tr: Transfer) -> None:
        if tr.queued_on is self:
            tr.version += 1
            tr.queued_on = None
            tr.prio = DEMAND
            tr.hops[0].submit(tr)

    def release(self) -> None:
        self.free += 1
        self._start()

    def _start(self) -> None:
        while self.free and (tr := _next_queued(self._q, self)) is not None:
            tr.slot = True
            self.free -= 1
            tr.hops[0].submit(tr)


# -- configuration and results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimConfig:
    workers: int = 1
    batch: int = 1                    # concurrent requests (decode slots)
    cache_fraction: float = 0.25      # HBM expert budget over all workers, as a fraction of all experts' bytes
    dram_fraction: float = 1.0        # each node's DRAM tier holds this fraction of the experts its workers own
    window: float = 4.0               # the planner's lookahead window, in MoE layers
    threshold: float = 0.05           # the planner's minimum P(selected)
    confirm_prob: float = 0.5         # the planner's hbm_confirm_prob (cluster/config.py's default)
    max_inflight_bytes: int | None = None  # None: window * top_k * expert bytes * workers
    decision_latency: float = 20e-6   # s from a routing event to the planner's orders being issued
    eviction: str = "prefetch_aware"  # the workers' CacheIndex policy
    stale_after: int = 1              # layer steps past its target after which an unused prefetch is stale
    max_tokens: int | None = None     # stop after this many tokens (None: the whole trace)
    runtime_node: int = 0             # where the model runtime (attention, router) runs
    activation_bytes: int = 2         # bytes per activation element on the wire (bf16)
    hbm_bytes_per_worker: int | None = None  # overrides cache_fraction (a measured run's actual budget)
    prefetch_concurrency: int | None = None  # prefetch loads a worker has in flight at once (None: no limit)
    promote_queued: bool = True       # a late prefetch waiting on a link is raised to demand priority (the real
                                      # worker does not: a demand joins the prefetch's read where it queues)
    compute_after_loads: bool = False  # a worker computes once all its missing experts landed (the real
                                       # ExpertWorker.compute), not each as it lands
    adapt_every: int | None = None    # adapt the window every this many layer steps with the coordinator's
                                      # WindowController (policies/ranking.py); None: the window stays fixed
    max_window: float | None = None   # the controller's ceiling (the coordinator's: lookahead_tokens x layers)
    expiry_steps: int = 64            # an order unused this many layer steps counts as wasted (the controller's input)
    coordinator_cpu_s: float = 0.0    # s of the layer's critical path each coordinator step takes where the
                                      # coordinator shares the decode loop's cores (a CPU-only machine: the `local`
                                      # profile charges its measured step time; 0 where it has a core of its own)
    value_residents: bool = True      # the planner values residents by their learned reuse (policies/reuse.py),
                                      # as the coordinator does (prefetch.value_residents)
    eviction_hints: bool = False      # a worker that gets orders also gets the planner's resident values and
                                      # evicts by them on a miss (prefetch.eviction_hints)
    reuse_values: bool = False        # the runtime's reuse values (prefetch.reuse_values, policies/reuse.py
                                      # TransitionReuse): each layer's, computed while its calls are in flight, go
                                      # to the holders of its experts with the next layer's calls, and the caches
                                      # evict the lowest-valued first. The fast path (and its values) is not simulated
    reuse_memory: bool | None = None  # with reuse_values: the long-memory table mixed in (prefetch.reuse_memory,
                                      # MixedReuse; None: when reuse_prior is given), warm-started from reuse_prior's
                                      # counts float [L, E, E]
    reuse_prior: object = None
    planner_engine: str = "compiled"  # the planner's ranking: numba-compiled, or the numpy reference (same orders)
    publish_every: int = 1            # the runtime's routing batches: one per this many MoE layers and at each
                                      # token's last (prefetch.publish_every_layers); the coordinator decides once
                                      # per batch, on all its events

    def __post_init__(self):
        assert self.workers >= 1 and self.batch >= 1, "workers and batch must be >= 1"
        assert 0 < self.cache_fraction <= 1, f"cache_fraction must be in (0, 1], got {self.cache_fraction}"
        assert 0 <= self.dram_fraction <= 1, f"dram_fraction must be in [0, 1], got {self.dram_fraction}"


@dataclass
class Counters:
    uses: int = 0
    hits: int = 0
    prefetch_hits: int = 0      # hits on an expert a prefetch brought and nobody used before
    late: int = 0               # needed while its prefetch was still in flight (counted as a miss)
    misses: int = 0             # not resident when needed (late ones included)
    demand_loads: int = 0
    uncached: int = 0           # demand loads that found every byte pinned: used once, not cached
    prefetch_issued: int = 0    # HBM prefetch orders issued
    prefetch_done: int = 0      # of which landed in a cache
    prefetch_dropped: int = 0   # landed with no room (all pinned)
    prefetch_used: int = 0      # landed prefetches later used (timely or late)
    stage_issued: int = 0       # DRAM stagings issued
    stall_s: float = 0.0
    worker_stall_s: float = 0.0    # summed over workers: each one's wait for its misses (ExpertWorker stall_seconds)
    cpu_contention_s: float = 0.0  # layer time lost to prefetch hand-offs on shared cores (hw.load_cpu_s)
    loads: int = 0              # HBM loads landed, and their summed time from first hop asked to landing
    load_s: float = 0.0
    tokens: int = 0
    steps: int = 0
    layer_steps: int = 0
    planner_calls: int = 0
    orders: int = 0


class Simulator:
    def __init__(self, hw: Hardware, model: Model, store: Storage, cfg: SimConfig, trace: RoutingTrace,
                 predictor: Predictor, planner=None, *, tier: str = "nvme"):
        """tier: which ranking tier the storage profile stands for ("nvme" or "s3"). planner: a
        policies.ranking.PrefetchPlanner (default: one configured from the profiles)."""
        from . import ranking
        geo = (trace.num_layers, trace.num_experts, trace.top_k)
        if geo != (model.num_layers, model.num_experts, model.top_k):
            raise ValueError(f"trace {trace.origin} is L={geo[0]} x E={geo[1]}, top-{geo[2]} but model "
                             f"{model.name} is L={model.num_layers} x E={model.num_experts}, top-{model.top_k}")
        assert (predictor.L, predictor.E, predictor.K) == geo, "predictor geometry differs from the trace's"
        self.hw, self.model, self.store, self.cfg, self.trace, self.pred = hw, model, store, cfg, trace, predictor
        self._rk = ranking
        L, E, W = model.num_layers, model.num_experts, cfg.workers
        self.L, self.E, self.W = L, E, W
        self.eb = model.expert_bytes
        self.clock = Clock()
        self.c = Counters()
        # placement: every expert has one owner (the real placement code, uniform load)
        pl = place({(l, e): self.eb for l in range(L) for e in range(E)}, list(range(W)))
        self.owner = np.zeros((L, E), np.int64)
        for (l, e), ws in pl.owners.items():
            self.owner[l, e] = ws[0]
        self.node_of = np.arange(W) // hw.gpus_per_node
        self.nodes = int(self.node_of.max()) + 1
        # HBM caches: the budget split evenly, capped by the GPU's memory (90%: the dense weights and activations
        # need the rest)
        want = cfg.hbm_bytes_per_worker or cfg.cache_fraction * L * E * self.eb / W
        self.budget = int(min(want, 0.9 * hw.hbm_bytes))
        self.budget = max(self.budget, self.eb * model.top_k)  # at least one token's experts of a layer
        self.caches = [CacheIndex(self.budget, make_policy(cfg.eviction, self.budget)) for _ in range(W)]
        self.peak_used = np.zeros(W, np.int64)
        # DRAM tiers: each node holds its workers' experts (dram_fraction of them, capped by the node's DRAM)
        self.dram = []
        self.in_dram = np.zeros((self.nodes, L, E), bool)
        self.in_hbm = np.zeros((L, E), bool)           # in the owner's cache
        for n in range(self.nodes):
            mine = [(int(l), int(e)) for l, e in zip(*np.nonzero(self.node_of[self.owner] == n))]
            cap = int(min(cfg.dram_fraction * len(mine) * self.eb, 0.9 * hw.dram_bytes))
            lru = ByteBudgetLRU(cap)
            for k in mine:                              # warm: the DRAM tier starts full (model loaded in RAM)
                if lru.used + self.eb > cap:
                    break
                lru.admit(k, self.eb)
                self.in_dram[n][k] = True
            self.dram.append(lru)
        self.dram_pending = np.zeros((L, E), bool)
        # links
        ch = hw.h2d_channels
        self.h2d = [Link(self.clock, f"h2d{w}", "h2d", hw.h2d_bw, hw.h2d_latency, ch, self._hop) for w in range(W)]
        self.sto = [Link(self.clock, f"storage{n}", "storage", store.bw_per_channel, store.first_byte,
                         store.channels, self._hop, store.split_min_bytes) for n in range(self.nodes)]
        self.net = [Link(self.clock, f"net{n}", "net", hw.net_bw, hw.net_latency, 1, self._hop)
                    for n in range(self.nodes)]
        self.cpu_debt = 0.0                   # s of prefetch hand-off CPU work the runtime's layers have not paid yet
        pc = cfg.prefetch_concurrency
        self.gates = [Gate(pc) for _ in range(W)] if pc else None
        self.act_bytes = 0
        self.inflight: dict[tuple[int, int], Transfer] = {}   # HBM loads, by (layer, expert)
        self.inflight_pf_bytes = np.zeros(W, np.int64)
        self.pf_target: dict[tuple[int, int], int] = {}       # prefetched key -> target layer-step index
        self.stale_q: list = []
        self.need: list[dict] = [dict() for _ in range(W)]    # worker -> {key: avail time or None}
        self.pending = 0
        self.uncached_now: set = set()
        # the planner, configured from the profiles (tier costs as this hardware moves an expert up)
        self.tier = {"nvme": self._rk.NVME, "s3": self._rk.S3}[tier]
        sto_s = store.first_byte + self.eb / store.bw_per_channel
        h2d_s = hw.h2d_latency + self.eb / hw.h2d_bw
        net_s = hw.net_latency + self.eb / hw.net_bw
        lat = [0.0, 0.0, 0.0, 0.0, 0.0]
        bw = [float("inf")] * 5
        for t, s in ((self._rk.PEER, net_s + h2d_s), (self._rk.DRAM, h2d_s), (self._rk.NVME, sto_s + h2d_s),
                     (self._rk.S3, sto_s + h2d_s)):
            bw[t] = self.eb / s                  # folded into one effective rate per expert
        self.layer_time = self.dense_s(cfg.batch) + self.expert_s(cfg.batch) + hw.layer_overhead
        cap = cfg.max_inflight_bytes
        if cap is None:
            cap = int(max(1.0, cfg.window) * model.top_k * self.eb * W)
        self.planner = planner or self._rk.PrefetchPlanner(self._rk.PlannerConfig(
            threshold=cfg.threshold, hbm_confirm_prob=cfg.confirm_prob, max_inflight_bytes=int(cap), layer_time_s=self.layer_time,
            costs=self._rk.TierCosts(tuple(lat), tuple(bw)), stage_to_dram=cfg.dram_fraction < 1,
            engine=cfg.planner_engine))
        self.planner_wall: list[float] = []
        self._batch: list = []                # routing events not yet published (publish_every > 1)
        self._batched = 0                     # MoE layers in it
        self.reuse = ReuseEstimator(self.L, self.E, model.top_k) if cfg.value_residents else None
        self.values = make_reuse_values(self.L, self.E, model.top_k, memory=cfg.reuse_memory,
                                        prior=cfg.reuse_prior) if cfg.reuse_values else None
        self._values_pending: tuple | None = None   # (layer, float32 [E]): ride with the next layer's calls
        self.step_times: list[float] = []
        # the window: fixed, or adapted as the coordinator does (its telemetry: orders used / wasted by expiry)
        self.window = float(cfg.window)
        self.wc = None
        if cfg.adapt_every:
            self.wc = self._rk.WindowController(window=max(self.window, 1.0), min_window=1.0,
                                                max_window=float(cfg.max_window or max(self.window, 1.0)))
            self.window = self.wc.window
        self.order_expiry = np.full((L, E), -1, np.int64)   # [L, E] layer step an order expires at; -1: none
        self.orders_used = self.orders_wasted = 0
        self._adapt_mark = (0, 0, 0.0, 0, 0)
        self.windows: list[float] = []

    # -- cost model ----------------------------------------------------------------------------------------------
    def expert_s(self, rows) -> float | np.ndarray:
        """s to compute one expert on `rows` tokens: weights streamed from HBM or FLOP-bound, + a launch."""
        if self.hw.expert_s_override is not None:
            return self.hw.expert_s_override + 0.0 * np.asarray(rows, np.float64)
        m = self.model
        return np.maximum(m.expert_bytes / self.hw.hbm_bw, 2.0 * m.expert_params * np.asarray(rows, np.float64)
                          / self.hw.flops) + 5e-6

    def dense_s(self, rows: int) -> float:
        """Attention + norms + shared experts of one layer for `rows` tokens (memory-bound at decode sizes)."""
        m = self.model
        shared = m.shared_experts * float(self.expert_s(rows)) if m.shared_experts else 0.0
        return self.hw.dense_s_per_layer + shared

    # -- transfers ---------------------------------------------------------------------------------------------
    def _route(self, w: int, key) -> list:
        """Links from the nearest copy to worker w's HBM (DRAM of its node, a peer node's DRAM, storage)."""
        n = self.node_of[w]
        if self.in_dram[n][key]:
            self.dram[n].touch(key)
            return [self.h2d[w]]
        peers = np.flatnonzero(self.in_dram[:, key[0], key[1]])
        if len(peers):
            return [self.net[int(peers[0])], self.h2d[w]]
        return [self.sto[n], self.h2d[w]]

    def _issue(self, w: int, key, demand: bool, prio: float, target: str = "hbm") -> Transfer:
        hops = self._route(w, key) if target == "hbm" else [self.sto[self.node_of[w]]]
        tr = Transfer(w, key[0], key[1], self.eb, hops, target, demand, DEMAND if demand else prio)
        if target == "hbm":
            self.inflight[key] = tr
            self.in_hbm[key] = False
            if not demand:
                self.inflight_pf_bytes[w] += self.eb
        else:
            self.dram_pending[key] = True
        if self.gates is not None and target == "hbm" and not demand:
            self.gates[w].submit(tr)
        else:
            tr.hops[0].submit(tr)
        return tr

    def _hop(self, link: Link, tr: Transfer) -> None:
        key = (tr.layer, tr.expert)
        tr.hops.pop(0)
        if link.kind == "storage":                      # landed in the node's DRAM tier
            n = self.node_of[tr.worker]
            ok, ev = self.dram[n].admit(key, tr.nbytes)
            for v in ev:
                self.in_dram[n][v] = False
            self.in_dram[n][key] = ok
            if tr.target == "dram":
                self.dram_pending[key] = False
        if tr.hops:
            tr.hops[0].submit(tr)
        elif tr.target == "hbm":
            self._landed(tr, key)

    def _landed(self, tr: Transfer, key) -> None:
        w = tr.worker
        del self.inflight[key]
        if not tr.demand:
            self.inflight_pf_bytes[w] -= tr.nbytes
        if tr.slot:
            tr.slot = False
            self.gates[w].release()
        self.c.loads += 1
        self.c.load_s += self.clock.now - tr.t0
        if not tr.demand:                 # its hand-off ran on the cores that compute: the current layer pays it
            self.cpu_debt += self.hw.load_cpu_s
        cache = self.caches[w]
        needed = key in self.need[w]
        try:
            for v in cache.insert(key, tr.nbytes, prefetched=not tr.demand):
                self.in_hbm[v] = False
            self.in_hbm[key] = True
            if needed:
                cache.pin(key)
            if not tr.demand:
                self.c.prefetch_done += 1
                heapq.heappush(self.stale_q, (self.pf_target.get(key, self.c.layer_steps), w, key))
        except DoesNotFit:
            if tr.demand or needed:
                self.c.uncached += 1
                self.uncached_now.add(key)
            else:
                self.c.prefetch_dropped += 1
        self.peak_used[w] = max(self.peak_used[w], cache.used)
        if needed and self.need[w][key] is None:
            self.need[w][key] = self.clock.now
            self.pending -= 1

    # -- the coordinator ---------------------------------------------------------------------------------------
    def _view(self):
        rk = self._rk
        present = np.zeros((rk.NUM_TIERS, self.L, self.E), bool)
        present[rk.HBM] = self.in_hbm
        own_node = self.node_of[self.owner]                              # [L, E]
        dram_own = np.take_along_axis(self.in_dram, own_node[None], 0)[0]
        present[rk.DRAM] = dram_own
        present[rk.PEER] = self.in_dram.any(0) & ~dram_own
        present[self.tier] = True
        inflight = np.zeros((self.L, self.E), bool)
        if self.inflight:
            k = np.array(list(self.inflight), np.int64)
            inflight[k[:, 0], k[:, 1]] = True
        used = np.array([c.used for c in self.caches], np.int64)
        free = np.maximum(self.budget - used - self.inflight_pf_bytes, 0)
        dram_free = np.array([d.budget - d.used for d in self.dram], np.int64)
        return rk.ClusterView(self.owner, self.node_of, present, np.full((self.L, self.E), self.eb, np.int64),
                              free, dram_free, inflight, self.dram_pending.copy(),
                              int(self.inflight_pf_bytes.sum()))

    def plan_step(self, events: list[RoutingEvent], requests: list) -> object:
        """One coordinator decision step (the part whose wall cost is measured): observe the layer's routing
        events, predict for every live request, rank across the cluster. Returns the Plan."""
        for ev in events:
            self.pred.observe(ev)
        if self.reuse is not None and events:   # one update per routing event and layer, as the coordinator does
            layers = [ev.layer for ev in events]
            for l in dict.fromkeys(layers):
                evs = [ev for ev, el in zip(events, layers) if el == l]
                self.reuse.observe_many([ev.request for ev in evs], l, np.stack([ev.experts for ev in evs]))
        views = []
        for r in requests:
            cands = self.pred.predict(r, int(math.ceil(self.window)))
            if len(cands):
                views.append(self._rk.RequestView(r, cands))
        view = self._view()
        if self.reuse is not None:
            view.reuse = self.reuse.reuse(requests)
            if self.cfg.eviction_hints:   # what a used resident drops to: only the hints need it
                view.reuse_used = self.reuse.p_next()[0]
        return self.planner.plan(views, view, self.window)

    def _issue_plan(self, plan, step: int) -> None:
        rk = self._rk
        if self.cfg.eviction_hints and plan.keep is not None:   # as the coordinator's prefetch calls carry them
            for w in set(plan.worker[plan.target == rk.TARGET_HBM].tolist()):
                cache = self.caches[w]
                cache.set_hints({k: float(plan.keep[k]) for k in cache.entries},
                                None if plan.keep_used is None else
                                {k: float(plan.keep_used[k]) for k in cache.entries})
        for i in range(len(plan)):
            key = (int(plan.layer[i]), int(plan.expert[i]))
            w = int(plan.worker[i])
            if plan.target[i] == rk.TARGET_HBM:
                if self.in_hbm[key] or key in self.inflight:
                    continue
                self.c.prefetch_issued += 1
                self._record_order(key, step)
                # target layer step: the nearest position of this (layer) ahead of the current one
                d = (key[0] - step % self.L) % self.L or self.L
                self.pf_target[key] = step + d
                self._issue(w, key, False, -float(plan.priority[i]))
            else:
                if self.dram_pending[key] or self.in_dram[self.node_of[w]][key]:
                    continue
                self.c.stage_issued += 1
                self._issue(w, key, False, -float(plan.priority[i]), target="dram")

    def _record_order(self, key, step: int) -> None:
        if self.order_expiry[key] >= 0:          # ordered again while pending: the earlier order went unused
            self.orders_wasted += 1
        self.order_expiry[key] = step + self.cfg.expiry_steps

    def _adapt(self, step: int) -> None:
        """The coordinator's window adaptation (actors/prefetch_coordinator.py _adapt), on the simulated counters."""
        old = (self.order_expiry >= 0) & (self.order_expiry < step)
        self.orders_wasted += int(old.sum())
        self.order_expiry[old] = -1
        if self.wc is None or step % self.cfg.adapt_every:
            return
        u0, w0, s0, m0, st0 = self._adapt_mark
        c = self.c
        self.window = self.wc.update(wasted=self.orders_wasted - w0, used=self.orders_used - u0,
                                     stall_s=c.stall_s - s0, steps=step - st0, late=c.late - m0)
        self._adapt_mark = (self.orders_used, self.orders_wasted, c.stall_s, c.late, step)
        self.windows.append(self.window)

    def _expire(self, step: int) -> None:
        """Prefetched entries whose target passed unused become first to evict (the coordinator's cancel)."""
        while self.stale_q and self.stale_q[0][0] + self.cfg.stale_after <= step:
            _, w, key = heapq.heappop(self.stale_q)
            e = self.caches[w].entries.get(key)
            if e is not None and e.prefetched:
                e.stale = True

    # -- one MoE layer of one decode step ----------------------------------------------------------------------
    def _layer(self, l: int, reqs: np.ndarray, toks: np.ndarray, rows: np.ndarray,
               slots: np.ndarray | None = None) -> None:
        """reqs/toks/rows [B]: the live requests, their token positions and trace rows; slots [B] their decode
        slots (the runtime's cache rows; default 0..B-1)."""
        c, clock, hw = self.c, self.clock, self.hw
        step = c.layer_steps
        B = len(reqs)
        clock.run_until(clock.now + self.dense_s(B))
        t_route = clock.now
        x = self.trace.experts[rows, l].astype(np.int64)               # [B, K]
        known = x[:, 0] >= 0
        if self._values_pending is not None and known.any():   # the last routed layer's values: with these calls
            self._apply_values()
        self._expire(step)
        self._adapt(step)
        # routing events -> coordinator (measured wall cost; its orders land after decision_latency)
        w8 = self.trace.weights[rows, l]
        hid = self.trace.hidden
        events = [RoutingEvent(int(reqs[i]), int(toks[i]), l, x[i],
                               None if np.isnan(w8[i, 0]) else w8[i],
                               None if hid is None else hid[rows[i], l]) for i in np.flatnonzero(known)]
        self._batch.extend(events)
        self._batched += 1
        if self._batched >= self.cfg.publish_every or l == self.L - 1:   # the runtime publishes: one decision
            events, self._batch, self._batched = self._batch, [], 0
            t0 = time.perf_counter()
            plan = self.plan_step(events, [int(r) for r in reqs])
            self.planner_wall.append(time.perf_counter() - t0)
            self.cpu_debt += self.cfg.coordinator_cpu_s       # paid by this layer, as prefetch hand-offs are
            c.planner_calls += 1
            c.orders += len(plan)
            clock.at(t_route + self.cfg.decision_latency, self._issue_plan, plan, step)
        # the batch's experts: uses, hits, demand loads
        xs = x[known]
        used = np.unique(xs)
        pend = self.order_expiry[l, used] >= 0                       # pending orders of them: used
        self.orders_used += int(pend.sum())
        self.order_expiry[l, used[pend]] = -1
        if B == 1:
            uniq, counts = xs.reshape(-1), np.ones(xs.size, np.int64)    # per slot, in recorded order
        else:
            uniq, counts = np.unique(xs, return_counts=True)
        need_w: dict[int, list] = {}
        missed = []
        for e, n in zip(uniq.tolist(), counts.tolist()):
            key = (l, e)
            w = int(self.owner[l, e])
            cache = self.caches[w]
            c.uses += 1
            need_w.setdefault(w, []).append((key, n))
            if key in cache.entries:
                ent = cache.entries[key]
                c.hits += 1
                if ent.prefetched:
                    c.prefetch_hits += 1
                    c.prefetch_used += 1
                cache.access(key)
                cache.pin(key)
                self.need[w][key] = t_route
            else:
                c.misses += 1
                missed.append((w, key))
                self.need[w][key] = None
                self.pending += 1
                tr = self.inflight.get(key)
                if tr is not None:                                  # late prefetch: promote it
                    c.late += 1
                    c.prefetch_used += 1
                    q = tr.queued_on
                    if q is not None and (isinstance(q, Gate) or self.cfg.promote_queued):
                        q.promote(tr)
                else:
                    c.demand_loads += 1
                    self._issue(w, key, True, DEMAND)
        clock.run_while(lambda: self.pending > 0)
        # compute: each worker runs its experts as they become available
        finish, busiest = t_route, 0.0
        for w, items in need_w.items():
            cache = self.caches[w]
            avail = np.array([self.need[w][k] for k, _ in items])
            c.worker_stall_s += float(avail.max()) - t_route       # this worker's wait for its misses (its counter)
            comp = np.asarray(self.expert_s(np.array([n for _, n in items])), np.float64)
            if self.cfg.compute_after_loads:
                t = max(t_route, float(avail.max())) + float(comp.sum())
            else:
                o = np.argsort(avail, kind="stable")
                t = t_route
                for a, cs in zip(avail[o].tolist(), comp[o].tolist()):
                    t = max(t, a) + cs
            finish = max(finish, t)
            busiest = max(busiest, float(comp.sum()))
        for w, k in missed:                  # a demand-loaded or late entry: its first use
            if k in self.caches[w].entries:
                self.caches[w].access(k)
        # activations to workers on other nodes than the runtime's and back
        remote = [w for w in need_w if self.node_of[w] != self.cfg.runtime_node]
        net = 0.0
        if remote:
            rows_remote = sum(n for w in remote for _, n in need_w[w])
            nb = 2 * rows_remote * self.model.hidden * self.cfg.activation_bytes
            self.act_bytes += nb
            net = 2 * hw.net_latency + nb / hw.net_bw
        end = finish + net + hw.layer_overhead
        c.stall_s += max(0.0, end - (t_route + busiest + net + hw.layer_overhead))
        clock.run_until(end)
        while self.cpu_debt > 0:          # prefetches landing meanwhile add to it: pay until settled
            debt, self.cpu_debt = self.cpu_debt, 0.0
            c.cpu_contention_s += debt
            clock.run_until(clock.now + debt)
        for w, items in need_w.items():
            cache = self.caches[w]
            for k, _ in items:
                if k in cache.entries and cache.entries[k].pins:
                    cache.unpin(k)
            self.need[w].clear()
        self.uncached_now.clear()
        c.layer_steps += 1
        if self.values is not None and known.any():   # the routing hook's deferred work: sent with the next calls
            s = np.arange(B) if slots is None else np.asarray(slots)
            v = self.values.observe(l, s[known], x[known], toks[known])
            self._values_pending = (l, v.astype(np.float32))   # float32 on the wire (pack_orders)

    def _apply_values(self) -> None:
        l, v = self._values_pending
        self._values_pending = None
        own = self.owner[l]                                            # [E]
        for w in np.unique(own).tolist():
            es = np.flatnonzero(own == w)
            self.caches[w].update_hints({(l, e): float(p) for e, p in zip(es.tolist(), v[es].tolist())})

    # -- the run -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        tr, cfg = self.trace, self.cfg
        slots = TraceSlots(tr, cfg.batch)         # continuous batching: empty slots admit the next request
        limit = cfg.max_tokens or tr.num_tokens
        while True:
            live = slots.admit(room=limit - self.c.tokens - int((slots.req >= 0).sum()))
            if not len(live):
                break
            reqs, toks, rows = slots.req[live], slots.tok[live], slots.rows(live)
            t0 = self.clock.now
            for l in range(self.L):
                self._layer(l, reqs, toks, rows, live)
            self.step_times.append(self.clock.now - t0)
            self.c.tokens += len(live)
            self.c.steps += 1
            for r in slots.advance(live):
                self._end(r)
            if self.c.tokens >= limit:
                for r in slots.req[slots.req >= 0].tolist():
                    self._end(r)
                break
        return self.metrics()

    def _end(self, r) -> None:
        self.pred.end(r)
        if self.reuse is not None:
            self.reuse.end(r)

    def metrics(self) -> dict:
        c, T = self.c, self.clock.now
        links = {"h2d": sum(x.bytes for x in self.h2d), "storage": sum(x.bytes for x in self.sto),
                 "net_experts": sum(x.bytes for x in self.net), "net_activations": self.act_bytes}
        wall = np.array(self.planner_wall) if self.planner_wall else np.zeros(1)
        hbm_loads = sum(x.bytes for x in self.h2d) // max(self.eb, 1)
        return {
            "tokens": c.tokens, "steps": c.steps, "virtual_s": T,
            "tokens_per_s": c.tokens / T if T else float("nan"),
            "latency_ms_per_token": 1e3 * float(np.mean(self.step_times)) if self.step_times else float("nan"),
            "latency_ms_per_layer": 1e3 * T / max(c.layer_steps, 1),
            "hit_rate": c.hits / max(c.uses, 1), "uses": c.uses, "hits": c.hits, "misses": c.misses,
            "late_prefetches": c.late, "stall_s": c.stall_s, "stall_ms_per_token": 1e3 * c.stall_s / max(c.tokens, 1),
            "worker_stall_s": c.worker_stall_s,
            "cpu_contention_ms_per_token": 1e3 * c.cpu_contention_s / max(c.tokens, 1),
            "window_final": self.window, "window_mean": float(np.mean(self.windows)) if self.windows else self.window,
            "window_growths_undone": self.wc.undone if self.wc is not None else 0,
            "load_ms_per_load": 1e3 * c.load_s / c.loads if c.loads else float("nan"),
            "demand_loads": c.demand_loads, "uncached": c.uncached, "hbm_loads": int(hbm_loads),
            "prefetch_issued": c.prefetch_issued, "prefetch_done": c.prefetch_done,
            "prefetch_used": c.prefetch_used, "prefetch_dropped": c.prefetch_dropped,
            "dram_stagings": c.stage_issued,
            "prefetch_precision": c.prefetch_used / c.prefetch_issued if c.prefetch_issued else float("nan"),
            "prefetch_recall": c.prefetch_hits / max(c.prefetch_hits + c.misses, 1),
            "bytes_per_link": links,
            "memory_mb_peak": float(self.peak_used.sum()) / 1e6,
            "hbm_budget_mb": self.budget * self.W / 1e6,
            "expert_mb": self.eb / 1e6,
            "planner": {"calls": c.planner_calls, "orders": c.orders,
                        "wall_ms_mean": 1e3 * float(wall.mean()), "wall_ms_p99": 1e3 * float(np.percentile(wall, 99)),
                        "virtual_layer_ms": 1e3 * T / max(c.layer_steps, 1),
                        "decisions_per_virtual_s": c.planner_calls / T if T else float("nan"),
                        "orders_per_virtual_s": c.orders / T if T else float("nan")},
        }


def simulate(hw: Hardware, model: Model, store: Storage, cfg: SimConfig, trace: RoutingTrace, policy: str, *,
             tier: str = "nvme", **predictor_kw) -> dict:
    """One policy on one trace: build the predictor through the registry and run."""
    from .registry import make_predictor
    pred = make_predictor(policy, num_layers=trace.num_layers, num_experts=trace.num_experts, top_k=trace.top_k,
                          trace=trace if policy in ("oracle", "ensemble") else None, **predictor_kw)
    out = Simulator(hw, model, store, cfg, trace, pred, tier=tier).run()
    out["policy"] = policy
    return out


def add_relative(results: dict) -> dict:
    """speedup over on_demand and fraction_of_oracle = (speedup - ...) as the issue defines:
    (policy speedup over On-Demand) / (Oracle speedup over On-Demand)."""
    base = results.get("on_demand")
    orc = results.get("oracle")
    for name, m in results.items():
        if base:
            m["speedup"] = m["tokens_per_s"] / base["tokens_per_s"]
        if base and orc:
            m["fraction_of_oracle"] = m["speedup"] / (orc["tokens_per_s"] / base["tokens_per_s"])
    return results
