"""PrefetchCoordinator: one central async actor that turns the routing events of every runtime into prefetches.

Runtimes publish batches of routing events without waiting (`publish.remote(batch)` through a RouteOutbox: a
few calls outstanding per runtime, routing flushed meanwhile goes together in the next; the actor is created with
`max_pending_calls`, so a call past it fails at once and its routing is dropped — counted — instead of queueing
without bound or blocking the decode loop). Per batch the actor:
  1. marks prefetches used and feeds the events to the predictor (policies/registry.py, chosen by
     `prefetch.policy`): a decode step's rows at once (`observe_many`), a prefill's row by row;
  2. predicts each live request's next `window` MoE layers (positions wrap into the next tokens), all at once
     (`predict_many`);
  3. asks the planner (policies/ranking.py) for orders against its view of the cluster — which worker owns
     what, what is resident / in flight / staged where, free bytes — and issues them: `prefetch` orders for the
     owning ExpertWorkers (HBM; each order names the only residents it may displace), returned in publish's
     reply for the runtime to carry with its compute calls (`orders_out`, prefetch.orders_ride) or sent to each
     worker, and `stage` to the owner node's StorageActor (DRAM), fire-and-forget;
  4. cancels in-flight orders no request predicts any more, and everything of requests that ended;
  5. every `adapt_every` steps adapts the window (WindowController) from the wasted fraction and stall deltas;
  6. once the orders are out, scores the predictions made earlier against the true routing (telemetry: recall@k
     and precision per layer distance, timely recall) and records this step's for scoring.
Its view is refreshed from the workers' and storage actors' `snapshot()` every `refresh_s` in the background,
and kept current between refreshes from what it ordered and what the routing says was just used.

Telemetry (policies/telemetry.py) is returned by `stats()` and exported with ray.util.metrics (names in
docs/coordinator.md). All decisions are a deterministic function of the events, the view, the policy and its
seed; the clock is read only to time the actor itself and to pace the background refresh.

If the actor dies, runtimes go on serving on demand (their publishes fail silently); Ray restarts it
(`max_restarts`) with the same constructor arguments and it resumes from fresh state and a fresh view.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque

import numpy as np
import ray

from policies.predictors import RoutingEvent
from policies.ranking import (DRAM, HBM, NUM_TIERS, NVME, PEER, S3, TARGET_HBM, AccessDenied,
                              AccessPolicy, ClusterView, PlannerConfig, PrefetchPlanner, RequestView, TenantRule,
                              TierCosts, WindowController)
from policies.reuse import ReuseEstimator
from policies.telemetry import MISS_CAUSES, Telemetry


MAX_LIVE_REQUESTS = 4096   # requests tracked at once (the oldest is forgotten beyond: bounded memory)


def make_predictor(name: str, **kw):
    from policies.registry import make_predictor as mk
    return mk(name, **kw)


class _Metrics:
    """ray.util.metrics instruments (Prometheus through each node's metrics agent; the Ray dashboard's
    Metrics view shows them). Counters are advanced by deltas of the telemetry totals."""

    def __init__(self, policy: str):
        from ray.util import metrics as m
        tags = {"policy": policy}
        self.tags = tags
        c = lambda n, d, keys=(): m.Counter(n, description=d, tag_keys=("policy",) + keys)  # noqa: E731
        g = lambda n, d, keys=(): m.Gauge(n, description=d, tag_keys=("policy",) + keys)    # noqa: E731
        self.counters = {
            "hits": c("moe_expert_hits", "expert uses that found the expert in its worker's HBM cache"),
            "misses": c("moe_expert_misses", "expert uses that had to load the expert"),
            "stall_s": c("moe_expert_stall_seconds", "seconds computes waited on expert loads"),
            "issued": c("moe_prefetch_issued", "HBM prefetch orders issued"),
            "used": c("moe_prefetch_used", "prefetches whose expert was routed to before expiring"),
            "wasted": c("moe_prefetch_wasted", "prefetches that expired unused"),
            "cancelled": c("moe_prefetch_cancelled", "prefetches cancelled before use"),
            "staged": c("moe_prefetch_staged", "DRAM stagings issued"),
            "dropped": c("moe_routing_batches_dropped", "routing batches runtimes dropped (coordinator behind)"),
            "fast_path_orders": c("moe_fast_path_orders", "prefetch orders the runtimes' fast paths sent"),
            "fast_path_superseded": c("moe_fast_path_superseded",
                                      "fast-path orders cancelled: a nearer prediction no longer wanted them"),
            "fast_path_refuted": c("moe_fast_path_refuted", "fast-path orders the router then did not select"),
        }
        self.hook_s = c("moe_routing_hook_seconds", "seconds of the runtimes' routing hook (fast path, reuse values, "
                        "publishing), by part: loop (the decode loop waited) or deferred (while compute calls flew)",
                        ("part",))
        self.tier_bytes = c("moe_expert_bytes_loaded", "bytes loaded into worker caches, by source tier", ("tier",))
        self.miss_causes = c("moe_expert_misses_by_cause",
                             "expert misses by why they missed: " + ", ".join(MISS_CAUSES), ("cause",))
        self.window = g("moe_prefetch_window_layers", "current lookahead window (MoE layers)")
        self.recall = g("moe_predictor_recall_at_k", "recall@k of the predictor by layer distance", ("distance",))
        self.precision = g("moe_predictor_precision", "precision of above-threshold predictions by distance",
                           ("distance",))
        self.timely = g("moe_prefetch_timely_recall", "fraction of routed experts predicted and resident in time")
        self.served = g("moe_served_by_prefetch", "fraction of routed experts a prefetch made resident in time")
        self.step = m.Histogram("moe_coordinator_step_seconds", description="coordinator handling per batch",
                                boundaries=[1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2],
                                tag_keys=("policy",))
        self.last: dict = {}

    def export(self, snap: dict, staged: int, dropped: int) -> None:
        p = snap["prefetches"]
        totals = {"hits": snap["hits"], "misses": snap["misses"], "stall_s": snap["stall_s"],
                  "issued": p["issued"], "used": p["used"], "wasted": p["wasted"], "cancelled": p["cancelled"],
                  "staged": staged, "dropped": dropped,
                  **{"fast_path_" + k: v for k, v in snap["fast_path"].items()}}
        for k, v in totals.items():
            d = v - self.last.get(k, 0)
            if d > 0:
                self.counters[k].inc(d, tags=self.tags)
            self.last[k] = v
        for t, v in snap["bytes_by_tier"].items():
            d = v - self.last.get(("tier", t), 0)
            if d > 0:
                self.tier_bytes.inc(d, tags={**self.tags, "tier": t})
            self.last[("tier", t)] = v
        for part in ("loop", "deferred"):
            v = snap["hook"][part + "_s"]
            d = v - self.last.get(("hook", part), 0.0)
            if d > 0:
                self.hook_s.inc(d, tags={**self.tags, "part": part})
            self.last[("hook", part)] = v
        for k, v in snap["miss_causes"].items():
            d = v - self.last.get(("cause", k), 0)
            if d > 0:
                self.miss_causes.inc(d, tags={**self.tags, "cause": k})
            self.last[("cause", k)] = v
        if snap["window"] is not None:
            self.window.set(snap["window"], tags=self.tags)
        for d, r in snap["recall_at_k"].items():
            self.recall.set(r, tags={**self.tags, "distance": str(d)})
        for d, r in snap["precision_by_distance"].items():
            if r is not None:
                self.precision.set(r, tags={**self.tags, "distance": str(d)})
        if snap["timely_recall"] is not None:
            self.timely.set(snap["timely_recall"], tags=self.tags)
        self.served.set(snap["served_by_prefetch"], tags=self.tags)


def planner_config(pf, model: str | None = None, tier_kinds: dict | None = None) -> PlannerConfig:
    """The planner's settings from the cluster config's `prefetch:` section (cluster/config.py PrefetchConfig);
    tier_kinds {tier name: kind}: the config's tiers, which TierSets name."""
    lat, bw = list(TierCosts().latency_s), list(TierCosts().bandwidth_Bps)
    names = ("hbm", "peer", "dram", "nvme", "s3")
    for name, c in (pf.tier_costs or {}).items():
        i = names.index(name)
        lat[i], bw[i] = float(c["latency_s"]), float(c["bandwidth_Bps"])
    return PlannerConfig(threshold=pf.threshold, hbm_confirm_prob=pf.hbm_confirm_prob,
                         max_inflight_bytes=int(pf.max_inflight_bytes), layer_time_s=pf.layer_time_s,
                         latency_ref_s=pf.latency_ref_s, costs=TierCosts(tuple(lat), tuple(bw)),
                         stage_to_dram=pf.stage_to_dram, model=model, tier_kinds=dict(tier_kinds or {}),
                         engine=pf.planner_engine)


def access_policy(pf) -> AccessPolicy | None:
    if pf.tenants is None:
        return None
    rules = {t: TenantRule(models=frozenset(r["models"]) if r.get("models") is not None else None,
                           tiers=frozenset(r["tiers"]) if r.get("tiers") is not None else None)
             for t, r in pf.tenants.items()}
    return AccessPolicy(rules)


RIDE_MARGIN_STEPS = 4


def merge_orders(buf: tuple[list, list, list], items: list, cancel: list, keep: list | None = None) -> None:
    """Add a worker's later orders to ones not yet sent, buf = ([prefetch items], [cancel (layer, expert)], [keep]
    or []), the later word on a key winning: a worker applies a call's cancellations before its orders, so both
    must not travel for one key. keep (the residents' values) replaces the earlier."""
    if cancel:
        gone = {(int(a), int(b)) for a, b in cancel}
        buf[0][:] = [it for it in buf[0] if (it[0], it[1]) not in gone]
    if items:
        again = {(it[0], it[1]) for it in items}
        buf[1][:] = [k for k in buf[1] if (int(k[0]), int(k[1])) not in again]
    buf[0].extend(items)
    buf[1].extend(cancel)
    if keep is not None:
        buf[2][:] = [keep]


def held_orders(buf: tuple[list, list, list]) -> tuple[list, list, list | None]:
    """A merge_orders buffer as a `prefetch` call's (items, cancel, keep)."""
    return buf[0], buf[1], buf[2][0] if buf[2] else None


class PrefetchCoordinator:
    def __init__(self, pf, geometry: dict, workers: dict, worker_node: dict, owners: np.ndarray, storage: dict,
                 *, router_weights=None, store_dir: str | None = None, model: str | None = None,
                 orders_out: bool = False):
        """pf: the config's PrefetchConfig. geometry: moe_layers (decoder layer of each MoE layer), num_experts,
        top_k, nbytes [L, E], store_tiers {tier kind: bool [L, E] held}, tier_set (active tier names), tier_kinds
        {tier name: kind} (the config's tiers: a TierSet names them).
        workers {wid: handle}, worker_node {wid: node id}, owners [L, E] primary owner wid per MoE layer,
        storage {node id: [StorageActor]}.
        orders_out: the workers' orders (prefetch items, cancellations, keep values) go back in publish's reply,
        {worker id: (items, cancel, keep)}, for the runtime to carry with its compute calls to those workers
        (ExpertCluster does: no Ray call of their own), instead of a `prefetch` call per worker from here. Each
        call costs this process ~0.3 ms to submit and more to take its reply (docs/benchmarks.md, session 21)."""
        self.pf = pf
        self.orders_out = orders_out
        # orders that ride reach their worker only once the runtime has taken the reply and calls the worker
        # again: a snapshot taken within this many steps of an order may not list it yet, and must not be read as
        # its having landed (or been dropped)
        self._ride_margin = RIDE_MARGIN_STEPS if orders_out else 0
        self._out: dict | None = None   # this publish's orders by worker id (orders_out)
        self.moe_layers = [int(x) for x in geometry["moe_layers"]]
        self.L, self.E, self.K = len(self.moe_layers), int(geometry["num_experts"]), int(geometry["top_k"])
        self.layer_idx = {d: i for i, d in enumerate(self.moe_layers)}   # decoder layer -> MoE layer
        self.nbytes = np.array(geometry["nbytes"], np.int64)              # [L, E] (a writable copy: see _arg)
        self.tier_set = list(geometry["tier_set"])
        st = geometry["store_tiers"]
        self.store = np.zeros((2, self.L, self.E), bool)                   # [nvme, s3] held by the store
        for kind, held in st.items():   # {"nvme" | "s3": bool [L, E]} within the active TierSet
            self.store[int(kind == "s3")] |= np.asarray(held, bool)
        self.planner = PrefetchPlanner(planner_config(pf, model, geometry.get("tier_kinds")), access_policy(pf))
        self.planner.warm_up()   # the compiled kernel loads here, not in the first decision
        self.model = model
        self.predictor = make_predictor(pf.policy, num_layers=self.L, num_experts=self.E, top_k=self.K,
                                        router_weights=router_weights, store_dir=store_dir)
        # P(a resident is reused at the next token), learned from the same events: guards residents nobody predicts
        self.reuse = ReuseEstimator(self.L, self.E, self.K) if getattr(pf, "value_residents", True) else None
        self.min_window = 1.0
        self.max_window = float(max(pf.lookahead_layers, pf.lookahead_tokens * self.L, 1))
        self.wc = WindowController(window=float(max(pf.lookahead_layers, 1)), min_window=self.min_window,
                                   max_window=self.max_window)
        self.tel = Telemetry(self.L, self.E, self.K, max_distance=int(math.ceil(self.max_window * 2)),
                             expiry=int(pf.expiry_steps))
        self.storage = storage
        self._set_workers(workers, worker_node, owners)
        self.requests: dict = {}        # live request -> (token, MoE layer) of its last event
        self._seen: dict = {}           # live request -> (its runtime, that runtime's batch count at its last event)
        self._rt_batches: dict = {}     # runtime -> routing batches with layers it sent
        self._rt_step: dict = {}        # runtime -> the decision step of its last such batch
        self.expired = 0                # live requests forgotten as idle (their end never reached us)
        self._moved: set = set()        # requests with an event since the last decision (their predictions scored)
        self.meta: dict = {}            # request -> (tiers, tenant, latency budget)
        self._meta_seq: dict = {}       # request -> the caller's number of its registration (when numbered)
        self._ended_seq: OrderedDict = OrderedDict()   # request -> the caller's number of its latest end (bounded)
        self.denied: dict = {}
        self.step = 0
        self.staged = self.dropped = self.batches = 0
        self.late_routing = 0           # routed rows of requests whose end had already run (skipped)
        self.step_times: deque = deque(maxlen=4096)     # seconds per batch, all of it
        self.submit_times: deque = deque(maxlen=4096)   # of which submitting the orders (Ray .remote calls)
        self.predictor_times: deque = deque(maxlen=4096)  # of which in the predictor (observe + predict)
        self.scoring_times: deque = deque(maxlen=4096)  # of which scoring predictions, after the orders are out
        # the decision's thread CPU seconds (routing in -> orders out, less submitting them): its wall time also
        # counts waits for the GIL and the cores, which Ray's own threads in this process take while calls arrive
        self.decision_cpu: deque = deque(maxlen=4096)
        self._submit_s = self._pred_s = self._submit_cpu = 0.0
        self._truths: list = []   # this batch's routing, scored against earlier predictions once orders are out
        self.batched = True       # a decode step's rows at once; False: always row by row (the tests' reference)
        self._scored: list = []   # this step's predictions, recorded for scoring at the same time
        self._adapt_mark = (0, 0, 0.0, 0, 0)   # used, wasted, stall_s, late, step at the last adaptation
        self.late = 0                          # routed experts whose prefetch was still in flight
        self._poll_task = None
        self._last_poll = 0.0
        self.restarted = False   # not running as an actor: benchmarks drive the class in process
        if ray.is_initialized():
            try:
                self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
            except Exception:  # noqa: BLE001
                pass
        try:
            self.metrics = _Metrics(pf.policy)
        except Exception:  # noqa: BLE001 - metrics are an export, never a reason to fail serving
            self.metrics = None

    # -- membership ---------------------------------------------------------------------------------------------
    def _set_workers(self, workers: dict, worker_node: dict, owners: np.ndarray) -> None:
        self.workers = dict(workers)
        self.wids = sorted(self.workers)
        widx = {w: i for i, w in enumerate(self.wids)}
        owners = np.asarray(owners, np.int64)
        assert owners.shape == (self.L, self.E), f"owners must be [{self.L}, {self.E}], got {owners.shape}"
        self.owner = np.vectorize(widx.__getitem__, otypes=[np.int64])(owners)   # [L, E] worker index
        self.nodes = sorted(set(worker_node.values()) | set(self.storage))
        nidx = {n: i for i, n in enumerate(self.nodes)}
        self.node_of = np.array([nidx[worker_node[w]] for w in self.wids], np.int64)  # [W]
        W, N = len(self.wids), len(self.nodes)
        self.resident = np.zeros((W, self.L, self.E), bool)
        self.dram = np.zeros((N, self.L, self.E), bool)
        self.used = np.zeros(W, np.int64)
        self.budget = np.zeros(W, np.int64)
        self.dram_used = np.zeros(N, np.int64)
        self.dram_budget = np.zeros(N, np.int64)
        self.inflight = np.zeros((self.L, self.E), bool)
        self.inflight_step = np.zeros((self.L, self.E), np.int64)
        self.staging = np.zeros((self.L, self.E), bool)
        self.order_req: dict = {}       # (MoE layer, expert) -> request of an in-flight HBM order
        self._held: dict[int, tuple[list, list]] = {}   # worker index -> orders held while a call is outstanding
        # flat positions of each (layer, expert) at its owner in resident [W, L, E] and at the owner's node in
        # dram [N, L, E]: one take instead of a three-array fancy index each step
        LE = self.L * self.E
        self.owner_node = self.node_of[self.owner]                                                      # [L, E]
        self._at_owner = (self.owner * LE + np.arange(LE).reshape(self.L, self.E)).reshape(-1)          # [LE]
        self._at_node = (self.owner_node * LE + np.arange(LE).reshape(self.L, self.E)).reshape(-1)
        self._polled = False

    async def set_placement(self, workers: dict, worker_node: dict, owners: np.ndarray) -> None:
        """Workers joined or left (re-placement): adopt the new owners; the view is rebuilt by the next refresh."""
        self._set_workers(workers, worker_node, owners)
        await self._poll()

    # -- the view -----------------------------------------------------------------------------------------------
    async def _poll(self) -> None:
        step0 = self.step
        wids, nodes = list(self.wids), list(self.nodes)
        try:
            ws = await asyncio.gather(*[self.workers[w].snapshot.remote() for w in wids], return_exceptions=True)
            ss = await asyncio.gather(*[self.storage[n][0].snapshot.remote() if n in self.storage else
                                        asyncio.sleep(0, result=None) for n in nodes], return_exceptions=True)
        finally:
            self._last_poll = time.monotonic()
        if wids != self.wids:   # placement changed meanwhile: the next poll catches up
            return
        for i, r in enumerate(ws):
            if isinstance(r, BaseException) or r is None:
                continue
            keys, pending, used, budget = r
            self.resident[i] = False
            for l, e in keys:
                li = self.layer_idx.get(int(l))
                if li is not None:
                    self.resident[i, li, int(e)] = True
            self.used[i], self.budget[i] = used, budget
            # in-flight orders of this worker issued before the poll: landed, still pending, or dropped
            pend = np.zeros((self.L, self.E), bool)
            for l, e in pending:
                li = self.layer_idx.get(int(l))
                if li is not None:
                    pend[li, int(e)] = True
            mine = self.inflight & (self.owner == i) & (self.inflight_step < step0 - self._ride_margin)
            done = mine & ~pend
            self.inflight[done] = False
        for j, r in enumerate(ss):
            if isinstance(r, BaseException) or r is None:
                continue
            keys, reading, used, budget = r
            self.dram[j] = False
            for l, e in keys:
                li = self.layer_idx.get(int(l))
                if li is not None:
                    self.dram[j, li, int(e)] = True
            self.dram_used[j], self.dram_budget[j] = used, budget
        self.staging[:] = False   # landed (in dram now) or dropped; either way no longer in flight
        self._polled = True

    def _maybe_poll(self) -> None:
        if (self._poll_task is None or self._poll_task.done()) and \
                time.monotonic() - self._last_poll >= self.pf.refresh_s:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll())

    def view(self) -> ClusterView:
        L, E = self.L, self.E
        own = self.owner
        present = np.zeros((NUM_TIERS, L, E), bool)
        present[HBM] = self.resident.reshape(-1).take(self._at_owner).reshape(L, E)
        owner_node = self.owner_node
        present[DRAM] = self.dram.reshape(-1).take(self._at_node).reshape(L, E) if len(self.nodes) else False
        present[PEER] = (self.resident.any(0) | self.dram.any(0)) & ~present[HBM] & ~present[DRAM]
        present[NVME], present[S3] = self.store[0], self.store[1]
        nb = self.nbytes
        infl_w = np.bincount(own[self.inflight], weights=nb[self.inflight], minlength=len(self.wids))
        stag_n = np.bincount(owner_node[self.staging], weights=nb[self.staging], minlength=len(self.nodes))
        free = np.maximum(self.budget - self.used - infl_w.astype(np.int64), 0)
        dram_free = np.maximum(self.dram_budget - self.dram_used - stag_n.astype(np.int64), 0)
        return ClusterView(own, self.node_of, present, nb, free, dram_free, self.inflight.copy(),
                           self.staging.copy(), int(nb[self.inflight].sum() + nb[self.staging].sum()))

    # -- requests -----------------------------------------------------------------------------------------------
    async def register_request(self, request, tenant: str | None = None, tiers: list[str] | None = None,
                               latency_budget_s: float | None = None, seq: int | None = None) -> None:
        """Optional, before a request's first event: its tenant, TierSet and latency budget. Raises
        AccessDenied (naming tenant and what) if the tenant may not use the model or those tiers.
        seq: the caller's number for this call, counted with its end_request calls. Ray runs an async actor's
        calls out of order, so a request refused right after registering can have its end run first; a
        registration numbered below the request's end is then stale and ignored (it would never be ended).
        The same rules also ride on the request's routing batches (publish's "rules"), so a batch that runs before
        this call is planned under them all the same."""
        err = self._register(request, tenant, tiers, latency_budget_s, seq)
        if err is not None:
            raise err

    def _register(self, request, tenant, tiers, latency_budget_s, seq) -> AccessDenied | None:
        if seq is not None and self._ended_seq.get(request, -1) > seq:
            return None
        tiers = list(tiers) if tiers is not None else list(self.tier_set)
        self.meta[request] = (tiers, tenant, latency_budget_s)   # a denied request stays known: no order for it
        if seq is not None:
            self._meta_seq[request] = seq
        if len(self.meta) > 2 * MAX_LIVE_REQUESTS:   # registered and never routed nor ended (a caller's leak):
            for r in [r for r in self.meta if r not in self.requests][:len(self.meta) - MAX_LIVE_REQUESTS]:
                self.meta.pop(r)                     # forget the oldest; a live request keeps its rules
                self.denied.pop(r, None)
                self._meta_seq.pop(r, None)
        if self.planner.access is not None:
            try:
                self.planner.access.check(tenant, self.model, tiers)
            except AccessDenied as e:
                self.denied[request] = str(e)
                return e
        return None

    async def end_request(self, requests: list, seq: int | None = None) -> None:
        """Requests that finished: forget them, cancel their queued prefetches everywhere. seq: as in
        register_request; a registration numbered above it (the id reused by a later request) keeps its rules."""
        requests = list(requests)
        if seq is not None:
            for r in requests:
                self._ended_seq[r] = seq
                self._ended_seq.move_to_end(r)
            while len(self._ended_seq) > 4 * MAX_LIVE_REQUESTS:   # late registrations come within moments
                self._ended_seq.popitem(last=False)
        self._end(requests, keep_meta_of={r for r in requests if self._meta_seq.get(r, -1) > seq}
                  if seq is not None else ())

    def _end(self, requests: list, keep_meta: bool = False, keep_meta_of=()) -> None:
        ended = set(requests)
        for r in requests:
            self.requests.pop(r, None)
            self._seen.pop(r, None)
            if not keep_meta and r not in keep_meta_of:
                self.meta.pop(r, None)
                self.denied.pop(r, None)
                self._meta_seq.pop(r, None)
            self.predictor.end(r)
            if self.reuse is not None:
                self.reuse.end(r)
            self.tel.end_request(r)
        keys = [k for k, r in self.order_req.items() if r in ended]
        if keys:
            a = np.array(keys, np.int64)
            self.tel.record_cancel(a[:, 0], a[:, 1])
            self.inflight[a[:, 0], a[:, 1]] = False
            for k in keys:
                del self.order_req[k]
        for h in self.workers.values():
            h.cancel.remote(requests=list(requests))

    # -- the step -----------------------------------------------------------------------------------------------
    async def publish(self, batch: dict) -> dict | None:
        """One batch of routing events from a runtime (cluster/expert_cluster.py RoutePublisher):
        {"runtime": id, "requests": [request id of each cache row], "counters": the runtime's cumulative
        counters, "layers": [{"layer": decoder layer, "rows": int64 [N] cache row, "pos": int64 [N] token
        position, "ids": int64 [N, k], "w": float32 [N, k], "hidden": float32 [N, H] or None}, ...]}. Returns the step's orders with orders_out ({worker id: (items,
        cancel, keep)}; None when there are none), else None."""
        t0, c0 = time.perf_counter(), time.thread_time()
        self.batches += 1
        self.tel.record_runtime(batch.get("runtime"), batch.get("counters") or {})
        self.dropped = max(self.dropped, int((batch.get("counters") or {}).get("publish_dropped", 0)))
        if not batch["layers"]:   # counters only (a runtime whose experts are all warm): nothing to plan
            return
        table = batch["requests"]
        for r, (tiers, tenant, budget, seq) in (batch.get("rules") or {}).items():
            if self._meta_seq.get(r, -1) < seq:   # its register_request has not run yet (out of order)
                self._register(r, tenant, tiers, budget, seq)
        self._submit_s = self._submit_cpu = 0.0
        self._pred_s = 0.0
        self._out = {} if self.orders_out else None
        rt = batch.get("runtime")
        self._rt_batches[rt] = self._rt_batches.get(rt, 0) + 1
        self._rt_step[rt] = self.step + 1
        mark = (rt, self._rt_batches[rt])
        for ev in batch["layers"]:
            self._observe(ev, table, mark, batch.get("seq"))
        self.step += 1
        if self.step % 16 == 0:
            self._expire_idle()
        try:
            self._decide()
        finally:
            # the telemetry's scoring waits until the orders are out: it changes no decision (it reads what the
            # predictor said and what the router chose), so it stays off the routing-in -> orders-out latency;
            # a step whose decision failed is scored all the same
            t1 = time.perf_counter()
            self.decision_cpu.append(time.thread_time() - c0 - self._submit_cpu)
            self._score()
            t2 = time.perf_counter()
        self.step_times.append(t2 - t0)
        self.submit_times.append(self._submit_s)
        self.predictor_times.append(self._pred_s)
        self.scoring_times.append(t2 - t1)
        if self.metrics is not None:
            self.metrics.step.observe(self.step_times[-1], tags=self.metrics.tags)
            if self.step % 256 == 0:   # Prometheus sees progress without anyone calling stats()
                self._export()
        self._maybe_poll()
        out, self._out = self._out, None
        return {w: held_orders(buf) for w, buf in out.items()} if out else None

    def _export(self, snap: dict | None = None) -> None:
        try:
            self.metrics.export(snap or self.tel.snapshot(), self.staged, self.dropped)
        except Exception:  # noqa: BLE001 - an export problem must not break serving
            pass

    def _score_truths(self) -> None:
        for t in self._truths:
            self.tel.record_truth_many(*t)
        self._truths = []

    def _score(self) -> None:
        """The routing observed this batch scores the predictions made for it, then this step's predictions are
        recorded (the order of the calls a step made before they were deferred)."""
        self._score_truths()
        if self._scored:
            self.tel.record_predictions(self._scored, self.planner.cfg.threshold)
            self._scored = []

    def _observe(self, ev: dict, table, mark: tuple, seq: int | None = None) -> None:
        li = self.layer_idx.get(int(ev["layer"]))
        if li is None:
            return
        rows, pos, ids, w = ev["rows"], ev["pos"], ev["ids"], ev["w"]
        hidden = ev.get("hidden")
        reqs = [table[r] for r in rows.tolist()]
        all_ids = ids
        if seq is not None and self._ended_seq:
            # routing sent before its request's end (numbered alike) but run after it (Ray runs an async actor's
            # calls out of order): the request is over, and must not come back as live until it idles out
            live = [self._ended_seq.get(r, -1) < seq for r in reqs]
            if not all(live):
                keep = np.flatnonzero(live)
                self.late_routing += len(reqs) - len(keep)
                rows, pos, ids, w = rows[keep], pos[keep], ids[keep], w[keep]
                hidden = hidden[keep] if hidden is not None else None
                reqs = [reqs[i] for i in keep.tolist()]
                if not reqs:
                    self._ran(li, all_ids)
                    return
        resident_before = self.resident[self.owner[li, ids], li, ids]          # [N, k] as known
        # ordered by us and still in flight as the layer ran: late (a longer window would have hidden them)
        self.late += int((self.inflight[li, ids] & ~resident_before).sum())
        toks = pos.tolist()
        new = sum(r not in self.requests for r in reqs)
        observe_many = getattr(self.predictor, "observe_many", None)   # an injected predictor may lack it
        if not self.batched or observe_many is None or len(set(reqs)) < len(reqs) or \
                len(self.requests) + new > MAX_LIVE_REQUESTS or any(
                t < self.requests[r][0] and li <= self.requests[r][1] for r, t in zip(reqs, toks)
                if r in self.requests):
            # a request twice in the event (a prefill), a forgotten one or a reused id: row by row, as each row's
            # ends must come between the rows around it (and after the truths of the events before)
            self._score_truths()
            for n, req in enumerate(reqs):
                tok = toks[n]
                last = self.requests.get(req)
                # a reused id starting over is a new request; a prefill goes token by token within each layer, so
                # an earlier token at a LATER layer is the same request
                if last is not None and tok < last[0] and li <= last[1]:
                    self._end([req], keep_meta=True)
                self.tel.record_truth(req, tok * self.L + li, ids[n], resident_before[n])
                tp = time.perf_counter()
                self.predictor.observe(RoutingEvent(req, tok, li, ids[n], w[n],
                                                    None if hidden is None else hidden[n]))
                self._pred_s += time.perf_counter() - tp
                if last is None and len(self.requests) >= MAX_LIVE_REQUESTS:   # a runtime that never ends
                    self._end([next(iter(self.requests))])                   # requests cannot grow us
                self.requests[req] = (tok, li)
                self._seen[req] = mark
                self._moved.add(req)
        else:   # the common case, a decode step: every row at once
            self._truths.append((reqs, pos * self.L + li, ids, resident_before))
            tp = time.perf_counter()
            observe_many(reqs, pos, li, ids, w, hidden)
            self._pred_s += time.perf_counter() - tp
            for req, tok in zip(reqs, toks):
                self.requests[req] = (tok, li)
                self._seen[req] = mark
            self._moved.update(reqs)
        if self.reuse is not None:
            self.reuse.observe_many(reqs, li, ids)
        self._ran(li, all_ids)   # every row's experts ran, an ended request's too

    def _ran(self, li: int, ids: np.ndarray) -> None:
        used = np.unique(ids)
        self.tel.record_use(li, used)
        # the layer ran: what it used is now in its owners' caches (demand loads), no longer in flight
        self.resident[self.owner[li, used], li, used] = True
        self.inflight[li, used] = False
        for e in used.tolist():
            self.order_req.pop((li, e), None)

    def _expire_idle(self) -> None:
        """Forget live requests whose end never reached us: ones their runtime has not routed for
        `request_idle_batches` of its batches, and every one of a runtime silent for that many batches per runtime
        heard of (a crashed replica). Counted in batches, not seconds: decisions stay a function of the inputs."""
        idle = int(self.pf.request_idle_batches)
        quiet = idle * len(self._rt_step)
        gone = {rt for rt, s in self._rt_step.items() if self.step - s > quiet}
        stale = [r for r, (rt, n) in self._seen.items() if rt in gone or self._rt_batches[rt] - n > idle]
        for rt in gone:
            del self._rt_step[rt], self._rt_batches[rt]
        if stale:
            self.expired += len(stale)
            self._end(stale, keep_meta=True)   # its rules stay (bounded by the meta cap) should it route again

    def _decide(self) -> None:
        self.tel.expire(self.step)
        if self.step % self.pf.adapt_every == 0:
            self._adapt()
        window = self.wc.window
        views, scored = [], []
        moved, self._moved = self._moved, set()
        reqs = list(self.requests)
        metas = [self.meta.get(req, (self.tier_set, None, None)) for req in reqs]
        # each request's horizon: the planner's own cut of the window for its latency budget
        horizons = [max(1, int(window * self.planner.budget_factor(m[2]))) for m in metas]
        tp = time.perf_counter()
        many = getattr(self.predictor, "predict_many", None)
        cands = many(reqs, horizons) if many is not None else [
            self.predictor.predict(r, h) for r, h in zip(reqs, horizons)]
        self._pred_s += time.perf_counter() - tp
        for req, c, (tiers, tenant, budget) in zip(reqs, cands, metas):
            if req in moved:   # scored once per position: a request that did not route since is not counted again
                tok, li = self.requests[req]
                scored.append((req, tok * self.L + li, c.distance, c.expert, c.prob))
            views.append(RequestView(req, c, tiers, tenant, budget))
        self._scored = scored   # recorded by _score once the orders are out (or the decision failed)
        if not views or not self._polled:
            return
        view = self.view()
        if self.reuse is not None:
            view.reuse = self.reuse.reuse(self.requests)
            if getattr(self.pf, "eviction_hints", False):   # what a used resident drops to: only the hints need it
                view.reuse_used = self.reuse.p_next()[0]
        plan = self.planner.plan(views, view, window)
        self.denied.update(plan.denied)
        cancels = self._cancel_unwanted(plan.wanted)
        self._issue(plan, cancels)

    def _issue(self, plan, cancels: dict[int, list]) -> None:
        """One `prefetch` call per worker that has orders or cancellations this step, one `stage` per node."""
        t0, c0 = time.perf_counter(), time.thread_time()
        dl = self.moe_layers
        hbm = plan.target == TARGET_HBM
        by_worker: dict[int, list] = {wi: [] for wi in cancels}
        hi = np.flatnonzero(hbm)
        named: dict[int, list] = {}   # a worker's orders share one victims list: converted once
        for i, w, l, e, pri in zip(hi.tolist(), plan.worker[hi].tolist(), plan.layer[hi].tolist(),
                                   plan.expert[hi].tolist(), plan.priority[hi].tolist()):
            req = plan.request[i]
            tiers = self.meta.get(req, (None,))[0]
            v = plan.victims[i]
            victims = named.get(id(v))
            if victims is None:
                victims = named[id(v)] = [(dl[a], b) for a, b in v]
            by_worker.setdefault(w, []).append((dl[l], e, pri, req, victims, tiers))
            self.order_req[(l, e)] = req
        keep = self._keep(plan, list(by_worker)) if by_worker else {}
        for wi, items in by_worker.items():
            self._send(wi, items, cancels.get(wi) or [], keep.get(wi))
        if hbm.any():
            self.inflight[plan.layer[hbm], plan.expert[hbm]] = True
            self.inflight_step[plan.layer[hbm], plan.expert[hbm]] = self.step
            self.tel.record_issue(plan.layer[hbm], plan.expert[hbm], self.step)
        st = ~hbm
        if st.any():
            by_node: dict[int, list] = {}
            for n, l, e in zip(self.node_of[plan.worker[st]].tolist(), plan.layer[st].tolist(),
                               plan.expert[st].tolist()):
                by_node.setdefault(n, []).append((dl[l], e))
            for ni, items in by_node.items():
                node = self.nodes[ni]
                if node in self.storage:
                    self.storage[node][0].stage.remote(items)
            self.staging[plan.layer[st], plan.expert[st]] = True
            self.staged += int(st.sum())
        self._submit_s = time.perf_counter() - t0
        self._submit_cpu = time.thread_time() - c0

    def _keep(self, plan, wis: list[int]) -> dict[int, list]:
        """Per worker index in `wis`: [(decoder layer, expert, value)] of its residents and in-flight loads as this
        step valued them (Plan.keep), which its cache then evicts lowest first (prefetch.eviction_hints)."""
        if plan.keep is None or not getattr(self.pf, "eviction_hints", False):
            return {}
        have = self.resident.reshape(-1).take(self._at_owner).reshape(self.L, self.E) | self.inflight   # [L, E]
        ls, es = np.nonzero(have)
        ws, vs = self.owner[ls, es], plan.keep[ls, es]
        vu = plan.keep_used[ls, es] if plan.keep_used is not None else None
        dl = np.asarray(self.moe_layers)[ls]
        out = {}
        for wi in wis:
            m = ws == wi
            cols = (dl[m].tolist(), es[m].tolist(), vs[m].tolist()) + (() if vu is None else (vu[m].tolist(),))
            out[wi] = list(zip(*cols))
        return out

    def _send(self, wi: int, items: list, cancel: list, keep: list | None = None) -> None:
        """At most one prefetch call per worker in flight: orders made while it is outstanding wait and go
        together when it is acknowledged — fewer, larger calls when the coordinator outpaces a worker (each
        `.remote()` costs the actor more than a step's decision). keep: the worker's residents' values (the
        latest step's win)."""
        if self._out is not None:   # orders_out: they leave with publish's reply
            merge_orders(self._out.setdefault(self.wids[wi], ([], [], [])), items, cancel, keep)
            return
        buf = self._held.get(wi)
        if buf is not None:   # a call is outstanding: hold
            merge_orders(buf, items, cancel, keep)
            return
        ref = self.workers[self.wids[wi]].prefetch.remote(items, cancel or None, keep)
        if ref is None:                     # in-process benchmark handles: nothing to wait for
            return
        self._held[wi] = ([], [], [])
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._held.pop(wi, None)
            return
        loop.create_task(self._ack(wi, ref, self.wids[wi]))

    async def _ack(self, wi: int, ref, wid: int) -> None:
        try:
            await ref
        except Exception:  # noqa: BLE001 - a dead or failing worker: its orders are lost, serving goes on
            pass
        items, cancel, keep = held_orders(self._held.pop(wi, ([], [], [])))
        if (items or cancel) and wi < len(self.wids) and self.wids[wi] == wid:
            self._send(wi, items, cancel, keep)

    def _cancel_unwanted(self, wanted: np.ndarray) -> dict[int, list]:
        """In-flight orders that no request predicts any more (the prediction changed): worker index -> the
        (decoder layer, expert) items to cancel where still queued (sent with this step's orders)."""
        stale = self.inflight & ~wanted & (self.inflight_step < self.step)
        if not stale.any():
            return {}
        l, e = np.nonzero(stale)
        dl = self.moe_layers
        out: dict[int, list] = {}
        for wi, a, b in zip(self.owner[l, e].tolist(), l.tolist(), e.tolist()):
            out.setdefault(wi, []).append((dl[a], b))
        self.tel.record_cancel(l, e)
        self.inflight[l, e] = False
        for k in zip(l.tolist(), e.tolist()):
            self.order_req.pop(k, None)
        return out

    def _adapt(self) -> None:
        rt = self.tel.runtime_totals()
        u0, w0, s0, l0, st0 = self._adapt_mark
        used, wasted = self.tel.used, self.tel.wasted
        self.wc.update(wasted=wasted - w0, used=used - u0, stall_s=rt["stall_s"] - s0,
                       steps=self.step - st0, late=self.late - l0)
        self._adapt_mark = (used, wasted, rt["stall_s"], self.late, self.step)
        self.tel.record_window(self.step, self.wc.window)

    # -- introspection ------------------------------------------------------------------------------------------
    async def stats(self) -> dict:
        snap = self.tel.snapshot()
        t = np.array(self.step_times) if self.step_times else np.zeros(1)
        # the decision: routing in -> orders out, less submitting them (Ray's cost) and less the scoring after
        dec = t - (np.array(self.submit_times) if self.submit_times else 0.0) - (
            np.array(self.scoring_times) if self.scoring_times else 0.0)
        snap.update(policy=self.pf.policy, steps=self.step, batches=self.batches, staged=self.staged,
                    dropped_batches=self.dropped, live_requests=len(self.requests), registered_requests=len(self.meta),
                    late_routing_rows=self.late_routing,
                    expired_requests=self.expired,
                    denied={str(k): v for k, v in self.denied.items()}, restarted=self.restarted,
                    inflight=int(self.inflight.sum()), staging=int(self.staging.sum()),
                    step_ms_p50=float(np.percentile(t, 50) * 1e3), step_ms_p99=float(np.percentile(t, 99) * 1e3),
                    decision_ms_p50=float(np.percentile(dec, 50) * 1e3),
                    decision_ms_p99=float(np.percentile(dec, 99) * 1e3),
                    predictor_state_bytes=int(self.predictor.state_nbytes()),
                    window_growths_undone=self.wc.undone,
                    # the actor process's CPU, every thread: Ray's receiving and replying included
                    process_cpu_s=time.process_time())
        if self.metrics is not None:
            self._export(snap)
        return snap

    async def step_times_s(self) -> list[float]:
        """Seconds spent handling each of the last batches (routing batch in -> orders out)."""
        return list(self.step_times)

    async def step_breakdown_s(self) -> tuple[list[float], ...]:
        """Per batch: total seconds, of which submitting the orders, of which in the predictor, of which scoring
        predictions after the orders were out; and the decision's thread CPU seconds (jobs.bench_coordinator
        reads them)."""
        return (list(self.step_times), list(self.submit_times), list(self.predictor_times),
                list(self.scoring_times), list(self.decision_cpu))

    async def learned_head(self) -> tuple[int, np.ndarray, np.ndarray] | None:
        """(online updates so far, w2, b2) of the learned predictor this actor fine-tunes (alone or as an ensemble
        member), or None: the runtime's fast path copies them into its own copy (RoutePublisher.sync_every)."""
        from policies.learned import LearnedPredictor
        p = self.predictor
        for q in [p] + list(getattr(p, "members", [])):
            if isinstance(q, LearnedPredictor):
                return q.updates, q.w["w2"].copy(), q.w["b2"].copy()   # a snapshot, not the live arrays
        return None

    async def ping(self) -> bool:
        return True
