"""ExpertCluster: the whole serving cluster from one `ray_config.yaml` — storage actors on every node, ExpertWorkers
with their HBM caches, the expert placement, and the model runtime whose MoE layers dispatch to the workers.

    with ExpertCluster(load_config("ray_config.yaml")) as c:
        print(c.generate([[1, 2, 3]], max_new_tokens=16))

`ClusterExperts` is the runtime's ExpertBackend: per MoE layer it groups the batch's (token, expert) pairs by
expert, sends each worker one call carrying all the tokens of the experts it owns — every call in flight at
once — and combines the results with the router weights. Placement (policies/placement.py) decides the owners and
is re-run when workers join or leave. Its `counters` (hits, misses, stall seconds, bytes loaded per tier) add up
what every worker's compute reply carries.

With `prefetch.policy` other than on_demand, a PrefetchCoordinator actor is started and `RoutePublisher` is
installed as the model's on_route hook: it sends routing events to the coordinator without waiting (see
actors/prefetch_coordinator.py). Serving never depends on the coordinator: if it is gone, experts load on demand.
With `prefetch.reuse_values` (the default) the hook also values each routed layer's experts by P(the request's
next token selects them there) and the workers' caches evict the lowest first (policies/reuse.py TransitionReuse,
mixed with a long-memory table when the store has a routing prior: MixedReuse, prefetch.reuse_memory);
under policy on_demand it does only that, with no coordinator. Of the hook, only the fast path's orders run
before a layer's compute calls leave; the reuse values and the coordinator's batch run while they are in flight
(ClusterExperts.deferred), and its cost is counted (counters hook_s, hook_deferred_s, hook_layers).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np
import ray
import torch

from actors.expert_worker import (SMALL_PAYLOAD, ExpertWorker, pack_call, pack_orders, pack_rows, unpack_reply,
                                  unpack_rows)
from actors.prefetch_coordinator import PrefetchCoordinator, access_policy, held_orders, merge_orders
from policies.fast_path import NextLayerSpeculator, likely_experts, order_filter
from policies.learned import is_routing_only
from policies.ranking import AccessDenied
from policies.reuse import PRIOR_FILE, MixedReuse, load_routing_prior, make_reuse_values
from policies.placement import Placement, place
from storage_adapters.manifest import Manifest

from . import ray_compat
from .config import ClusterConfig, apply_log_level
from .model import MoEModel, generate, load_dense_from_bytes
from .storage_tier import start_storage_actors

log = logging.getLogger(__name__)

# policies the runtime speculates for by default (RoutePublisher's fast path): those whose predictor reads hidden
# states. For the others it speculates only when told a source (prefetch.speculate_source: transition): on the
# shared Mixtral trace the transition counts' orders (precision ~0.3) cost more than they saved (docs/benchmarks.md)
SPECULATING_POLICIES = ("next_gate", "learned", "pre_gated", "ensemble")
STALE_RIDERS_MAX = 256   # refuted fast-path orders held per worker until a compute call to it carries them
CONTROL_BACKLOG = 4096   # register / end calls held while the coordinator lags, before the oldest are dropped


@dataclass
class DispatchStats:
    calls: int = 0              # worker calls made
    plain_calls: int = 0        # of which through plain actor calls (the rest: the compiled graph)
    layers: int = 0             # MoE layer dispatches
    pairs: int = 0              # (token, expert) pairs sent


class _WorkersLost(Exception):
    def __init__(self, errors: dict[int, Exception]):
        self.errors = errors


class ClusterExperts:
    """ExpertBackend over ExpertWorker actors (see cluster/model.py ExpertBackend for the contract)."""

    def __init__(self, workers: dict[int, "ray.actor.ActorHandle"], placement: Placement, num_experts: int,
                 on_worker_lost=None, dispatch: str = "plain", fits=None):
        """on_worker_lost(worker_id, error): called when a worker's call fails because the actor died; it must
        re-place (publish) without that worker, after which the layer is retried once.
        fits(placement) -> bool: whether every worker's cache holds all the experts it owns (then, once each has
        computed once, nothing can miss again and prediction has nothing left to do: `warm`)."""
        self.workers = workers
        self.num_experts = num_experts
        self.on_worker_lost = on_worker_lost
        assert dispatch in ("plain", "compiled"), f"dispatch must be 'plain' or 'compiled', got {dispatch!r}"
        self.dispatch = dispatch
        self._graph = None          # compiled graph over _graph_wids, built on first use
        self._graph_wids: list[int] = []
        self.stats = DispatchStats()
        self.tiers: list[str] | None = None   # TierSet of the current step's requests (the engine sets it)
        # cumulative, from every worker's compute reply (no extra round trip): what a serving engine reads to
        # attribute hits and misses to requests, and what the coordinator's telemetry reports
        self.counters = {"hits": 0, "misses": 0, "prefetch_hits": 0, "stall_s": 0.0, "bytes_by_tier": {},
                         "miss_causes": {},
                         # the routing hook's own time (RoutePublisher): seconds the decode loop waited on it before
                         # a layer's calls left, seconds of its work deferred into the wait for their replies, and
                         # the MoE layers it saw
                         "hook_s": 0.0, "hook_deferred_s": 0.0, "hook_layers": 0}
        # work the routing hook hands over (RoutePublisher: the reuse values, the coordinator's batch): run once the
        # layer's compute calls are in flight, while the decode loop would only wait for their replies anyway
        self.deferred: list = []
        self._load_counts: dict[int, np.ndarray] = {}  # layer -> pairs routed to each expert
        # worker -> prefetch orders that ride with the next layer's compute call to it (the fast path's: no Ray call
        # of their own); a worker the layer does not call gets them in a `prefetch` call
        self.riders: dict[int, list] = {}
        self.cancel_riders: dict[int, list] = {}   # worker -> (layer, expert) fast-path orders to cancel, alike
        # worker -> {(layer, expert): None} fast-path predictions the router has just refuted: cancelled like the
        # above, but never in a Ray call of their own (a worker this layer does not call gets them with its next
        # call); ordered again meanwhile, an expert leaves this list
        self.stale_riders: dict[int, dict] = {}
        # worker -> {layer: (experts int [n], P float [n])}: the fast path's latest predictions of the worker's
        # experts (prefetch.speculate_values), its cache's eviction values; they ride with the worker's next compute
        # call (never a call of their own), a layer's newer values replacing the older
        self.value_riders: dict[int, dict] = {}   # (publish() below resets it with the placement)
        # worker -> ([prefetch items], [cancel (layer, expert)], [keep] or []): the coordinator's orders from its
        # publish replies (prefetch.orders_ride), merged by merge_orders; they ride with the worker's next compute
        # call in the tuple form (they name requests, victims and TierSets), or go in a prefetch call of their own
        # when the layer does not call the worker
        self.coord_riders: dict[int, tuple] = {}
        self._fits = fits
        self.publish(placement)

    @property
    def measured_load(self) -> dict[tuple[int, int], int]:
        """(layer, expert) -> (token, expert) pairs routed to it so far: placement balances by this."""
        return {(l, int(e)): int(c[e]) for l, c in self._load_counts.items() for e in np.flatnonzero(c)}

    def _run_deferred(self) -> Exception | None:
        """Run the routing hook's deferred work (self.deferred), timed into counters["hook_deferred_s"]. Returns
        the first exception instead of raising it, so that the caller collects its calls' replies first."""
        if not self.deferred:
            return None
        work, self.deferred = self.deferred, []
        err = None
        t0 = time.perf_counter()
        for fn in work:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - handed back to _moe, which raises it after the replies
                err = err or e
        self.counters["hook_deferred_s"] += time.perf_counter() - t0
        return err

    def publish(self, placement: Placement) -> None:
        """Adopt a placement: per layer, a table expert -> primary owner, and the replicas of replicated ones."""
        if self._graph is not None and sorted(self.workers) != self._graph_wids:
            self.close_graph()  # the set of workers changed: the graph is rebuilt on next use
        self.placement = placement
        # experts computed since this placement: with `fits_all`, each stays resident once computed
        self.fits_all = bool(self._fits(placement)) if self._fits is not None else False
        self._seen = {layer: np.zeros(self.num_experts, bool) for layer in {k[0] for k in placement.owners}}
        self._unseen = len(placement.owners)
        self.warm = False   # fits_all and every expert computed: nothing can miss any more
        self._owner_np: dict[int, np.ndarray] = {}
        self._replicas: dict[tuple[int, int], tuple[int, ...]] = {}
        for (layer, e), ws in placement.owners.items():
            t = self._owner_np.setdefault(layer, np.full(self.num_experts, -1, dtype=np.int64))
            t[e] = ws[0]
            if len(ws) > 1:
                self._replicas[(layer, e)] = ws
            self._load_counts.setdefault(layer, np.zeros(self.num_experts, dtype=np.int64))
        # layer -> [(worker, experts int [n])]: whose cache each expert's eviction value goes to (every worker that
        # may hold it: its owner and its replicas); values built under the previous placement are dropped
        self.value_groups: dict[int, list] = {}
        for layer, t in self._owner_np.items():
            holders: dict[int, list] = {}
            for e, w in enumerate(t.tolist()):
                for h in (self._replicas.get((layer, e)) or (w,)):
                    if h >= 0:
                        holders.setdefault(int(h), []).append(e)
            self.value_groups[layer] = [(w, np.array(es, np.int64)) for w, es in sorted(holders.items())]
        self.value_riders = {}
        self.coord_riders = {}

    def moe(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        try:
            return self._moe(layer, x, topk_ids, topk_w)
        except _WorkersLost as lost:
            if self.on_worker_lost is None:
                raise RuntimeError(f"layer {layer}: expert workers {sorted(lost.errors)} died: "
                                   f"{next(iter(lost.errors.values()))}") from None
            for wid, err in lost.errors.items():
                self.on_worker_lost(wid, err)  # re-place their experts on the survivors
            try:
                return self._moe(layer, x, topk_ids, topk_w)
            except _WorkersLost as again:
                raise RuntimeError(f"layer {layer}: expert workers {sorted(again.errors)} died again after "
                                   f"re-placement: {next(iter(again.errors.values()))}") from None

    def _moe(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        # numpy on the host: for a decode step's handful of rows its small ops cost half of torch's
        N, k = topk_ids.shape
        if N == 0:
            self._run_deferred()
            return torch.zeros_like(x)
        flat = topk_ids.detach().cpu().numpy().reshape(-1)                # [N*k]
        order = np.argsort(flat, kind="stable")                          # pairs grouped by expert, token order kept
        per_e = np.bincount(flat, minlength=self.num_experts)            # [E] (np.unique costs 10x more)
        eids = np.flatnonzero(per_e)                                     # [U] distinct experts, ascending
        counts = per_e[eids]                                             # [U] pairs of each
        tok = order // k                                                 # [N*k] token of each pair
        xs = x.detach().to("cpu", torch.float32).numpy()[tok]           # [N*k, H] grouped by expert
        owner = self._owner_np[layer][eids]                              # [U] worker per distinct expert
        if self._replicas:  # spread replicated experts over their replicas by pairs already assigned this call
            owner = owner.copy()
            assigned: dict[int, int] = {}
            for u, (e, n) in enumerate(zip(eids.tolist(), counts.tolist())):
                ws = self._replicas.get((layer, e))
                if ws:
                    owner[u] = min(ws, key=lambda w: (assigned.get(w, 0), w))
                assigned[int(owner[u])] = assigned.get(int(owner[u]), 0) + n
        assert (owner >= 0).all(), f"layer {layer}: experts {eids[owner < 0].tolist()} have no owner"
        payloads, masks, rows, nexp = {}, {}, {}, {}
        # a decode step's small call travels as one bytes object each way (pack_call: ~0.2 ms less per call than
        # a tuple); prefill's large activations go as arrays (zero-copy through the object store), and a call
        # that carries a TierSet goes the tuple way too
        small = xs.nbytes < SMALL_PAYLOAD and self.tiers is None
        owners = sorted(set(owner.tolist()))
        if len(owners) == 1:  # one worker owns the whole layer's experts: every row goes, in order
            parts = {owners[0]: (eids, counts, xs, slice(None))}
        else:
            pair_owner = np.repeat(owner, counts)                        # [N*k]
            parts = {}
            for w in owners:
                sel = owner == w
                mask = pair_owner == w
                parts[w] = (eids[sel], counts[sel], xs[mask], mask)
        riders, self.riders = self.riders, {}
        cancels, self.cancel_riders = self.cancel_riders, {}
        coord, self.coord_riders = self.coord_riders, {}
        stale, values = self.stale_riders, self.value_riders
        for w, (e, cnt, xw, mask) in parts.items():
            ride, drop = riders.pop(w, None) or [], cancels.pop(w, None) or []
            if w in stale:
                drop = drop + list(stale.pop(w))
            vals = _flat_values(values.pop(w, None))
            co = coord.pop(w, None)
            extra = (ride, drop, vals) if (ride or drop or vals or co) else ()
            if co is not None:   # the coordinator's: applied before the fast path's (ExpertWorker._riders)
                extra += (held_orders(co),)
            payloads[w] = (pack_call(layer, e, cnt, xw) + (pack_orders(*extra) if extra else b"")) \
                if small and co is None else (layer, e.tolist(), cnt.tolist(), pack_rows(xw)) + extra
            masks[w], rows[w], nexp[w] = mask, int(xw.shape[0]), len(e)
        for w in set(riders) | set(cancels):   # workers this layer does not call: refutations go along (before
            h = self.workers.get(w)             # the orders, as in a compute call) now that a call goes anyway
            if h is not None:
                drop = (cancels.get(w) or []) + list(stale.pop(w, ()))   # and the values, which these loads
                h.prefetch.remote(riders.get(w, []), drop or None, None, True,   # then evict by
                                  _flat_values(values.pop(w, None)))
        for w, buf in coord.items():   # the coordinator's, likewise
            h = self.workers.get(w)
            if h is not None:
                items, cancel, keep = held_orders(buf)
                h.prefetch.remote(items, cancel or None, keep)
        ys = np.empty_like(xs)
        todo = dict(payloads)
        c = self.counters
        if self.dispatch == "compiled":
            for w, y in self._run_graph(payloads).items():
                ys[masks[w]] = unpack_rows(y, rows[w])
                c["hits"] += nexp[w]   # the graph computes only when every expert is resident
                del todo[w]
        tiers = self.tiers
        # all in flight at once
        calls = {w: (self.workers[w].compute_packed.remote(p) if isinstance(p, bytes)
                     else self.workers[w].compute_call.remote((*p[:4], tiers, *p[4:]))) for w, p in todo.items()}
        lost: dict[int, Exception] = {}
        late = self._run_deferred()   # the calls are on their way: the hook's deferred work costs no latency now
        try:
            results = dict(zip(calls, ray.get(list(calls.values())))) if calls else {}
        except ray.exceptions.RayActorError:  # find out which workers died; the others' results still count
            results = {}
            for w, call in calls.items():
                try:
                    results[w] = ray.get(call)
                except ray.exceptions.RayActorError as e:
                    if isinstance(e, ray.exceptions.RayTaskError):
                        raise  # the worker is alive; its compute failed (e.g. every storage tier): not a death
                    lost[w] = e
        if lost:
            raise _WorkersLost(lost)
        tb, mc = c["bytes_by_tier"], c["miss_causes"]
        for w, r in results.items():
            y, hits, misses, phits, stall, tier_bytes, why = unpack_reply(r, rows[w])
            ys[masks[w]] = y
            c["hits"] += hits
            c["misses"] += misses
            c["prefetch_hits"] += phits
            c["stall_s"] += stall
            for t, b in tier_bytes.items():
                tb[t] = tb.get(t, 0) + b
            for cause, n in why.items():
                mc[cause] = mc.get(cause, 0) + n
        ys *= topk_w.detach().to("cpu", torch.float32).numpy().reshape(-1)[order][:, None]
        out = np.zeros((N, xs.shape[1]), np.float32)
        np.add.at(out, tok, ys)                                          # combine the k pairs of each token
        st = self.stats
        st.calls += len(payloads)
        st.plain_calls += len(calls)
        st.layers += 1
        st.pairs += N * k
        self._load_counts[layer][eids] += counts                         # measured load, for re-placement
        if self.fits_all and not self.warm:
            seen = self._seen[layer]
            self._unseen -= int(np.count_nonzero(~seen[eids]))
            seen[eids] = True
            self.warm = self._unseen == 0
        if late is not None:   # the hook failed: raised only now, with the layer's replies in and counted
            raise late
        return torch.from_numpy(out).to(x.device, x.dtype)

    # -- compiled graph ---------------------------------------------------------------------------------------------
    def _run_graph(self, payloads: dict) -> dict:
        """Run one layer through the compiled graph; returns {worker: result} for workers that computed (those that
        missed an expert are left to the plain path). On any graph failure the graph is dropped and every worker
        goes the plain way, which also handles dead workers."""
        from actors.expert_worker import MISS
        try:
            if self._graph is None:
                from ray.dag import InputNode, MultiOutputNode
                self._graph_wids = sorted(self.workers)
                with InputNode() as inp:
                    dag = MultiOutputNode([self.workers[w].compute_resident.bind(inp[i])
                                           for i, w in enumerate(self._graph_wids)])
                self._graph = dag.experimental_compile()
            outs = ray.get(self._graph.execute(*[payloads.get(w) for w in self._graph_wids]))
        except Exception as e:  # noqa: BLE001 - fall back to plain calls, which report what is wrong
            log.warning("compiled dispatch failed (%s: %s); using plain calls", type(e).__name__, e)
            self.close_graph()
            return {}
        # copy out now: results are views of the graph's channel buffers, reused by the next execution
        got = {w: (y if isinstance(y, bytes) else np.array(y)) for w, y in zip(self._graph_wids, outs)
               if y is not None and not (isinstance(y, str) and y == MISS)}
        del outs
        return got

    def close_graph(self) -> None:
        if self._graph is not None:
            try:
                self._graph.teardown()
            except Exception:  # noqa: BLE001 - a dead actor makes teardown complain; nothing left to free
                pass
            self._graph = None


class RouteOutbox:
    """Routing batches to the coordinator with at most `inflight` publish calls outstanding per runtime. Layers
    flushed while that many are outstanding are held, and go together in the next call (rows renumbered into one
    request table), so a coordinator that lags gets fewer, larger calls instead of losing routing. Each call costs
    the actor's process ~0.4-0.6 ms of CPU in Ray's own threads, and while a burst of them is received its step
    slows 3-5x (docs/benchmarks.md, session 21). Past `backlog` held layer events the oldest are dropped and
    counted; so is a batch the pending-calls cap refuses. Thread-safe: the engine's thread flushes, and
    ExpertCluster.end_requests drains from whichever thread ends a request.

    send(table, layers) -> ObjectRef | None builds the batch and makes the call. on_reply(value): given each
    finished call's reply (the coordinator's orders with orders_out), from `poll` and `put` (not a forced one, so
    that it runs in the thread that flushes)."""

    def __init__(self, send, inflight: int = 2, backlog: int = 256, on_reply=None):
        assert inflight >= 1 and backlog >= 1, f"inflight {inflight} and backlog {backlog} must be >= 1"
        self.send, self.inflight, self.backlog, self.on_reply = send, inflight, backlog, on_reply
        self._calls: list = []                 # (future, layer events) of the outstanding calls, in call order
        self._held: deque = deque()            # (request table, [layer event]) in flush order
        self._held_layers = 0
        self._lock = threading.Lock()
        self.sent = self.dropped = 0           # calls made; layer events dropped (backlog full or call refused)
        self.coalesced = 0                     # flushes that went in a later flush's call
        self.bad_replies = 0                   # replies on_reply raised on (their orders lost)

    def put(self, table: list, layers: list, force: bool = False) -> None:
        """Queue one flush's layers (their rows index `table`) and send what is held if a call may go (force: now,
        whatever is outstanding: before a request's end, so its last routing does not arrive after it)."""
        with self._lock:
            if layers:
                self._held.append((table, layers))
                self._held_layers += len(layers)
                while self._held_layers > self.backlog and len(self._held) > 1:
                    n = len(self._held.popleft()[1])
                    self._held_layers -= n
                    self.dropped += n
            if not force:
                self._poll()
            if not self._held or (len(self._calls) >= self.inflight and not force):
                return
            table, layers = merge_batches(self._held)
            self.coalesced += len(self._held) - 1
            self._held.clear()
            self._held_layers = 0
            try:
                ref = self.send(table, layers)
            except Exception:  # noqa: BLE001 - coordinator behind its pending-calls cap or gone: serve on demand
                self.dropped += len(layers)
                return
            self.sent += 1
            if ref is not None:
                self._calls.append((ref.future(), len(layers)))

    def poll(self) -> None:
        """Hand finished calls' replies to on_reply (cheap when none finished: a done() per outstanding call)."""
        with self._lock:
            self._poll()

    def _poll(self) -> None:
        n = 0   # the finished calls at the front only: replies are taken in call order, so a later word wins
        while n < len(self._calls) and self._calls[n][0].done():
            n += 1
        if not n:
            return
        done, self._calls = self._calls[:n], self._calls[n:]
        for f, layers in done:
            try:
                reply = f.result()
            except Exception:  # noqa: BLE001 - a call that failed (coordinator gone or restarting): its routing
                self.dropped += layers   # is lost, and it has no orders
                continue
            if reply is not None and self.on_reply is not None:
                try:
                    self.on_reply(reply)
                except Exception:  # noqa: BLE001 - a malformed reply must not fail the forward pass it runs in
                    self.bad_replies += 1

    @property
    def outstanding(self) -> int:
        return sum(not f.done() for f, _ in self._calls)


def merge_batches(groups) -> tuple[list, list]:
    """[(table, layers)] -> one (table, layers): the layer events in order, each's `rows` renumbered into a table
    that holds every group's requests (the latest group's order first: cache rows are reassigned as requests come
    and go, so two flushes' tables may differ)."""
    groups = list(groups)
    if len(groups) == 1:
        return groups[0]
    table = list(groups[-1][0])
    index = {r: i for i, r in enumerate(table)}
    out = []
    for t, layers in groups:
        if t == table:
            out.extend(layers)
            continue
        for r in t:
            if r not in index:
                index[r] = len(table)
                table.append(r)
        remap = np.fromiter((index[r] for r in t), np.int64, len(t))
        out.extend({**ev, "rows": remap[ev["rows"]]} for ev in layers)
    return table, out


class RoutePublisher:
    """The model's on_route hook: buffers each MoE layer's routing (numpy copies of the router's top-k, the rows'
    positions, optionally the hidden states) and sends a batch to the PrefetchCoordinator every
    `publish_every_layers` MoE layers and at the last MoE layer of each forward, through a RouteOutbox: at most
    `publish_inflight` calls outstanding, what is flushed meanwhile goes together in the next call. The decode loop
    never waits on it; layers past the outbox's backlog, or refused by the actor's max_pending_calls, are dropped
    and counted (`dropped`, in layer events, also in the experts' counters as publish_dropped).

    Who each routed row is: `model.route_rows[n]` is a KV-cache row; its request id is `cache.requests[row]` when
    an engine bound its cache (`publisher.cache = cache`), else `row_requests[row]` (ExpertCluster.generate sets
    them), else the row number itself.

    The fast path (`speculator`, policies/fast_path.py; `prefetch.speculate_*`): before the layer computes, the
    next layers' likely experts are predicted here from the router input and ordered straight from their owner
    workers: the orders ride with the layer's compute call to each owner (ClusterExperts.riders: no Ray call of
    their own; an owner the layer does not call gets one `prefetch`), above any coordinator order in priority,
    within the step's TierSet, never for a request in `denied` (ExpertCluster.register_request). With `values`
    (prefetch.speculate_values) every expert's latest P at each predicted layer goes to its owner the same way, as
    the value its cache evicts by (lowest first)."""

    def __init__(self, coordinator, model: MoEModel, experts: ClusterExperts, *, every: int = 1,
                 hidden: bool = False, runtime: str | None = None, speculator=None, threshold: float | None = None,
                 fanout: int | None = None, values: bool = False, reuse=None, inflight: int = 2,
                 backlog: int = 256, seq=None):
        self.coordinator, self.model, self.experts = coordinator, model, experts
        self.speculator, self.values = speculator, values
        # unset: the source's default order filter (policies/fast_path.py order_filter)
        t, f = order_filter(speculator.source if speculator is not None else None, model.args.top_k)
        self.threshold = t if threshold is None else threshold
        self.reuse = reuse   # TransitionReuse, MixedReuse or None (prefetch.reuse_values)
        self.fanout = fanout or f
        self.moe_layers = list(model.args.moe_layers)
        self._moe_index = {l: i for i, l in enumerate(self.moe_layers)}
        self.denied: set = set()          # requests refused by access control: no fast-path order for them
        # registered requests' rules (tiers, tenant, latency budget, call number): they ride on the request's
        # routing batches, as Ray may run a batch before the register_request call sent ahead of it
        self.rules: dict = {}
        self.speculated = 0               # fast-path orders sent (experts x owners; the workers skip residents)
        # the fast path's learned copy follows the coordinator's online fine-tuning: every `sync_every` batches
        # sent, its output layer is asked for; it is copied in when the reply is there (never waited for)
        self.sync_every = 64              # flushes
        self._head_ref = None
        self.head_updates = 0             # the coordinator's online updates in the head last copied in
        self._ordered: dict[int, np.ndarray] = {}   # MoE layer -> bool [E] what the fast path last ordered for it
        self.superseded = 0               # fast-path orders cancelled: a nearer prediction no longer wanted them
        self.refuted = 0                  # fast-path orders the router then did not select (marked stale)
        # runtimes are told apart by this id (the coordinator sums their cumulative counters)
        self.every, self.hidden = every, hidden
        self.runtime = runtime or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.cache = None
        self.row_requests: list | None = None
        self.last_layer = model.args.moe_layers[-1] if model.args.moe_layers else -1
        self._buf: list[dict] = []
        # the coordinator's replies (its orders, with prefetch.orders_ride) ride with the next compute calls
        self.outbox = RouteOutbox(self._call, inflight, backlog, on_reply=self._orders)
        # numbers a routing call in the sequence of the register / end calls (ExpertCluster._coord_seq): the
        # coordinator skips a request's routing numbered below its end, should Ray run it after the end
        self.seq = seq
        self._counter_calls = self._counter_dropped = 0   # counters-only calls (warm experts), outside the outbox
        self._flushes = 0
        self.coordinator_orders = 0       # the coordinator's orders that came back in its replies to ride along
        self._ended: OrderedDict = OrderedDict()   # requests ended lately (bounded): no order rides for them
        self._ended_new: deque = deque()           # appended by any thread, taken by the engine's
        self._quiet = 0   # MoE layers not published because the experts were warm

    def __call__(self, layer: int, topk_ids: torch.Tensor, topk_w: torch.Tensor, x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        try:
            self._route(layer, topk_ids, topk_w, x)
        finally:   # what the decode loop waited on here (the deferred part is timed where it runs: hook_deferred_s)
            c = self.experts.counters
            c["hook_s"] += time.perf_counter() - t0
            c["hook_layers"] += 1

    def _route(self, layer: int, topk_ids: torch.Tensor, topk_w: torch.Tensor, x: torch.Tensor) -> None:
        if self.coordinator is not None:   # orders that came back since: they go with this layer's calls
            self._take_ended()
            self.outbox.poll()
        if self.experts.warm:
            # every expert fits its owner's cache and is resident: nothing can miss, so routing is not sent (each
            # publish costs the decode loop a Ray submit and the coordinator CPU). Counters still go every 256 layers.
            self._quiet += 1
            self._ordered.clear()   # nothing is ordered meanwhile: no later routing refutes these
            if self._quiet % 256 == 0 and self.coordinator is not None:
                self._buf = []
                self._send([])
            return
        m = self.model
        rows, pos, ids = m.route_rows.cpu().numpy(), m.route_pos.cpu().numpy(), topk_ids.cpu().numpy()
        xh = x.float().cpu().numpy() if (self.hidden or (self.speculator is not None and self.speculator.hidden)) \
            else None
        # only the fast path's orders must leave with this layer's compute calls; the reuse values and the
        # coordinator's batch are computed and sent while those calls are in flight (ClusterExperts.deferred)
        if self.speculator is not None:
            self._speculate(layer, rows, pos, ids, xh)
            if self.speculator.learned is not None:   # its state for later layers: computed in the wait too
                self.experts.deferred.append(self.speculator.absorb)
        if self.reuse is not None and not self.experts.fits_all and not self._values_wrap():
            self.experts.deferred.append(functools.partial(self._reuse, layer, rows, pos, ids))
        if self.coordinator is None:   # the reuse values alone (policy on_demand): nothing to publish
            return
        self._buf.append({"layer": layer, "rows": rows, "pos": pos, "ids": ids, "w": topk_w.float().cpu().numpy(),
                          "hidden": xh if self.hidden else None})
        if len(self._buf) >= self.every or layer == self.last_layer:
            self.experts.deferred.append(self.flush)

    def _values_wrap(self) -> bool:
        """Whether the fast path's values already cover the layer that routes now (a depth of L wraps onto its
        next token): they are the better prediction of the same thing, so the reuse values are not needed."""
        sp = self.speculator
        return sp is not None and self.values and sp.depth >= len(self.moe_layers)

    def _table(self, rows: np.ndarray) -> list:
        if self.cache is not None:
            return list(self.cache.requests)
        if self.row_requests is not None:
            return list(self.row_requests)
        return list(range(int(rows.max(initial=0)) + 1))

    def _reuse(self, layer: int, rows: np.ndarray, pos: np.ndarray, ids: np.ndarray) -> None:
        """The layer's experts valued by P(the next token selects them here) (prefetch.reuse_values): to their
        holders with the next calls to them, as eviction values. Deferred into the wait for the layer's replies;
        skipped where the fast path's values cover the layer (`_values_wrap`)."""
        li = self._moe_index.get(layer)
        if li is None or not len(rows):
            return
        v = self.reuse.observe(li, rows, ids, pos)                 # float64 [E]
        vr = self.experts.value_riders
        for w, sel in self.experts.value_groups.get(layer, ()):
            vr.setdefault(w, {})[layer] = (sel, v[sel])

    def _speculate(self, layer: int, rows: np.ndarray, pos: np.ndarray, ids: np.ndarray, xh: np.ndarray) -> None:
        """The fast path: P at the next layers for every row, the likely experts ordered from their owners."""
        li = self._moe_index.get(layer)
        if li is None or not len(rows):
            return
        urows, P = self.speculator.step(li, rows, pos, ids, xh)
        if self.denied:   # access control: a refused request gets no read on its behalf
            table = self._table(urows)
            ok = np.array([table[r] not in self.denied if r < len(table) else True for r in urows.tolist()], bool)
            P = P[:, ok]
        L = len(self.moe_layers)
        tiers = list(self.experts.tiers) if self.experts.tiers is not None else None
        spent = self._ordered.pop(li, None)   # this layer routes now: what was ordered for it is spent
        # every expert's latest P at each layer predicted: its holders' eviction value (none when every expert fits:
        # nothing is ever evicted, and the values would only cost the decode loop)
        send_values = self.values and not self.experts.fits_all and P.shape[1] > 0
        wants = likely_experts(P, self.threshold, self.fanout)          # [depth, E]
        pmax = (P[:, 0] if P.shape[1] == 1 else P.max(1)) if P.shape[1] else None   # [depth, E] best row's
        for d in range(P.shape[0]):
            m = (li + d + 1) % L
            want = wants[d]
            dl = self.moe_layers[m]
            if send_values:
                pv, vr = pmax[d], self.experts.value_riders
                for w, sel in self.experts.value_groups.get(dl, ()):
                    vr.setdefault(w, {})[dl] = (sel, pv[sel])
            prev = self._ordered.get(m)
            if prev is not None:          # ordered one layer earlier, from farther away, and no longer predicted:
                gone = np.flatnonzero(prev & ~want)   # cancel where still queued (a loaded one goes first)
                if len(gone):
                    cr = self.experts.cancel_riders
                    for w, e in zip(self.experts._owner_np[dl][gone].tolist(), gone.tolist()):
                        cr.setdefault(w, []).append((dl, e))
                    self.superseded += len(gone)
            self._ordered[m] = want
            es = np.flatnonzero(want)
            if not len(es):
                continue
            owner = self.experts._owner_np[dl][es]
            # above every coordinator order (priorities < NUM_TIERS + 1), the nearer distance first
            pri = 16.0 - d + pmax[d, es]
            riders, st = self.experts.riders, self.experts.stale_riders   # they ride with this layer's compute calls
            for w, e, p in zip(owner.tolist(), es.tolist(), pri.tolist()):  # (ClusterExperts._moe)
                riders.setdefault(w, []).append((dl, e, p, None, None, tiers))
                if w in st:
                    st[w].pop((dl, e), None)   # wanted again: no longer refuted
            self.speculated += len(es)
        if spent is not None:   # what no row selected was a misprediction, unless ordered again just now (a depth
            spent[ids.reshape(-1)] = False                          # of L wraps onto this layer's next token)
            again = self._ordered.get(li)
            wrong = np.flatnonzero(spent if again is None else spent & ~again)
            if len(wrong):      # cancelled where still queued, first to evict where loaded
                dl, st = self.moe_layers[li], self.experts.stale_riders
                for w, e in zip(self.experts._owner_np[dl][wrong].tolist(), wrong.tolist()):
                    marks = st.setdefault(w, {})
                    marks[(dl, e)] = None
                    if len(marks) > STALE_RIDERS_MAX:   # a worker no layer calls for long: keep the latest
                        del marks[next(iter(marks))]
                self.refuted += len(wrong)

    @property
    def sent(self) -> int:
        return self.outbox.sent + self._counter_calls

    @property
    def dropped(self) -> int:
        return self.outbox.dropped + self._counter_dropped

    def flush(self) -> None:
        if not self._buf or self.coordinator is None:
            return
        table = self._table(np.array([int(ev["rows"].max(initial=0)) for ev in self._buf]))
        layers, self._buf = self._buf, []
        self.outbox.put(table, layers)
        self._flushes += 1
        if self.speculator is not None and self.speculator.learned is not None:
            self._sync_head()

    def _orders(self, reply: dict) -> None:
        """A publish reply's orders ({worker id: (items, cancel, keep)}) for ClusterExperts.coord_riders; orders
        for a request that has ended are dropped (the coordinator's cancel for it has gone to the workers)."""
        self._take_ended()
        cr, ended = self.experts.coord_riders, self._ended
        for w, (items, cancel, keep) in reply.items():
            if ended:
                items = [it for it in items if it[3] not in ended]
            merge_orders(cr.setdefault(w, ([], [], [])), items, cancel, keep)
            self.coordinator_orders += len(items)

    def ended(self, request_ids) -> None:
        """Requests that ended (ExpertCluster.end_requests, from any thread): the coordinator's orders for them
        that still wait to ride, or come back later, are dropped in the engine's thread (`_take_ended`)."""
        self._ended_new.extend(request_ids)

    def _take_ended(self) -> None:
        if not self._ended_new:
            return
        gone = set()
        while self._ended_new:
            r = self._ended_new.popleft()
            gone.add(r)
            self._ended[r] = None
        while len(self._ended) > CONTROL_BACKLOG:
            self._ended.popitem(last=False)
        for items, _, _ in self.experts.coord_riders.values():
            items[:] = [it for it in items if it[3] not in gone]

    def registered(self, request) -> None:
        """A request id registered (again): its orders are wanted."""
        self._ended.pop(request, None)

    def drain(self) -> None:
        """Send the held layers now, whatever is outstanding (before the end of the requests they route)."""
        if self.coordinator is not None:
            self.outbox.put([], [], force=True)

    def _send(self, table: list, layers: list | None = None) -> None:
        """A counters-only call (the experts are warm: no routing), fire-and-forget."""
        try:
            self._call(table, layers)
            self._counter_calls += 1
        except Exception:  # noqa: BLE001 - coordinator behind (pending-calls limit) or gone
            self._counter_dropped += 1

    def _call(self, table: list, layers: list | None = None):
        c = self.experts.counters
        batch = {"runtime": self.runtime, "requests": table, "layers": layers or [],
                 "counters": {**c, "bytes_by_tier": dict(c["bytes_by_tier"]), "miss_causes": dict(c["miss_causes"]),
                              "publish_dropped": self.dropped,
                              # the fast path's orders never pass the coordinator: its telemetry reports them
                              "fast_path_orders": self.speculated, "fast_path_superseded": self.superseded,
                              "fast_path_refuted": self.refuted}}
        if self.seq is not None and layers:
            batch["seq"] = self.seq()
        if self.rules and layers:   # one .get each: end_requests may drop a rule meanwhile (another thread)
            rules = {r: v for r in set(table) if (v := self.rules.get(r)) is not None}
            if rules:
                batch["rules"] = rules
        return self.coordinator.publish.remote(batch)

    def _sync_head(self) -> None:
        """Copy the coordinator's fine-tuned output layer into the fast path's learned copy once it has arrived."""
        if self._head_ref is not None:
            ready, _ = ray.wait([self._head_ref], timeout=0)
            if not ready:
                return
            ref, self._head_ref = self._head_ref, None
            try:
                head = ray.get(ref)
            except Exception:  # noqa: BLE001 - coordinator gone or restarting: keep the weights we have
                return
            if head is not None:
                n, w2, b2 = head
                w = self.speculator.w
                if n > self.head_updates and w2.shape == w["w2"].shape and b2.shape == w["b2"].shape:
                    np.copyto(w["w2"], w2)
                    np.copyto(w["b2"], b2)
                    self.head_updates = n
        elif self._flushes % self.sync_every == 0:
            try:
                self._head_ref = self.coordinator.learned_head.remote()
            except Exception:  # noqa: BLE001 - coordinator behind or gone: try again later
                self._head_ref = None


def check_store_matches_model(manifest: Manifest, args) -> None:
    """The store's manifest and the runtime's reading of its config must describe the same model; a store
    converted from another checkpoint (or edited) fails here, before a token is computed with wrong weights."""
    m = manifest.model
    wrong = [f"{what}: runtime {a} vs store {b}" for what, a, b in (
        ("num_experts", args.num_experts, m.num_experts),
        ("hidden_size", args.hidden_size, m.hidden_size),
        ("expert intermediate size", args.moe_intermediate_size, m.intermediate_size),
        ("MoE layers", tuple(args.moe_layers), tuple(m.moe_layers))) if a != b]
    held = {(b.layer, b.expert) for b in manifest.blobs}
    need = {(l, e) for l in args.moe_layers for e in range(args.num_experts)}
    if need - held:
        wrong.append(f"store lacks expert blobs {sorted(need - held)[:4]}")
    if wrong:
        raise ValueError(f"the store at {sorted(manifest.locations.values())} does not match its model config "
                         f"({m.family}): " + "; ".join(wrong))


class ExpertCluster:
    def __init__(self, cfg: ClusterConfig, *, endpoint_overrides: dict[str, str] | None = None,
                 policy: str = "lru", replicate_top: int = 0):
        self.cfg, self.endpoint_overrides = cfg, endpoint_overrides or {}
        self.policy, self.replicate_top = policy, replicate_top
        self._started_ray = False
        self.storage: dict[str, list] = {}
        self.workers: dict[int, ray.actor.ActorHandle] = {}
        self._next_worker = 0
        self.lost_workers: list[int] = []
        self.coordinator = None
        self._coord_seq = itertools.count()   # numbers register/end calls: the coordinator runs them out of order
        self._coord_backlog: deque = deque()  # register/end calls the coordinator's pending-calls cap refused
        self._coord_lock = threading.Lock()   # the Serve handler registers, the engine's thread ends
        self.control_calls_dropped = 0
        self.publisher: RoutePublisher | None = None
        self.routing_prior_meta: dict | None = None   # the routing prior the runtime started from, if any
        self._access = access_policy(cfg.prefetch)   # tenants' rules (None: no access control)
        self._gen_ids = itertools.count()

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> "ExpertCluster":
        """Start the storage actors, workers, model and prefetching; on any failure what was started is stopped
        again (the actors killed, Ray shut down if this started it) before the error propagates."""
        try:
            return self._start()
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> "ExpertCluster":
        apply_log_level(self.cfg.telemetry)
        if not ray.is_initialized():
            ray_compat.init_ray(self.cfg)
            self._started_ray = True
        self.storage = start_storage_actors(self.cfg, self.endpoint_overrides)
        any_storage = next(iter(self.storage.values()))[0]
        self.manifest = Manifest.from_json(ray.get(any_storage.manifest_json.remote()), "storage actor")
        m = self.manifest
        self.sizes = {(b.layer, b.expert): b.size for b in m.blobs}
        for _ in range(self.cfg.workers.count):
            self._spawn_worker()
        ray.get([w.ping.remote() for w in self.workers.values()])  # budget and device errors surface here
        first = place(self.sizes, sorted(self.workers), replicate_top=self.replicate_top,
                      by_layer=self.cfg.workers.placement == "by_layer")
        self.experts = ClusterExperts(self.workers, first, m.model.num_experts, fits=self._fits,
                                      on_worker_lost=self._worker_lost, dispatch=self.cfg.workers.dispatch)
        [dref] = ray.get(any_storage.dense.remote())
        dense = load_dense_from_bytes(ray.get(dref))
        dtype = torch.float32  # activations in f32; experts compute in their stored dtype on the workers
        self.model = MoEModel.from_dense(m.model.config, dense, self.experts, dtype=dtype,
                                         weight_prefetch=self.cfg.weight_prefetch_config)   # dense_offload
        check_store_matches_model(m, self.model.args)
        pf = self.cfg.prefetch
        reuse = self._reuse_values() if pf.reuse_values and not pf.eviction_hints else None
        if pf.policy != "on_demand":
            self._start_coordinator(dense, reuse)
        elif pf.speculate_layers > 0 and pf.speculate_source != "auto":
            # the fast path alone: the runtime predicts and orders the next layers itself, with no coordinator (on a
            # CPU-only node the coordinator's steps compete with the workers for the cores; docs/coordinator.md)
            spec = self._speculator(_router_weights(dense))
            if spec is None:
                raise ValueError(f"prefetch.speculate_source {pf.speculate_source!r} with policy on_demand: this store "
                                 "has no such source (learned: run python -m jobs.train_predictor to put a trained "
                                 "predictor beside it; pre_gated: the checkpoint has no pre_gate weights)")
            self._publish(None, spec, reuse)
        elif reuse is not None:
            # no prediction, but the caches evict by the next token's reuse: the routing hook without a coordinator
            self._publish(None, None, reuse)
        return self

    # -- prefetching --------------------------------------------------------------------------------------------
    def _owners(self) -> np.ndarray:
        """[L, E] primary owner worker of each (MoE layer, expert)."""
        a = self.model.args
        return np.array([[self.experts.placement.owner((l, e)) for e in range(a.num_experts)]
                         for l in a.moe_layers], np.int64)

    def _worker_nodes(self) -> dict:
        return dict(zip(self.workers, ray.get([w.stats.remote() for w in self.workers.values()])))

    def _start_coordinator(self, dense: dict, reuse=None) -> None:
        pf, a = self.cfg.prefetch, self.model.args
        L, E = len(a.moe_layers), a.num_experts
        nbytes = np.array([[self.sizes[(l, e)] for e in range(E)] for l in a.moe_layers], np.int64)
        store_tiers: dict[str, np.ndarray] = {}
        held = {(b.layer, b.expert): set(b.tiers) for b in self.manifest.blobs}
        for t in self.cfg.storage_tiers:
            mask = np.array([[t.name in held[(l, e)] for e in range(E)] for l in a.moe_layers], bool)
            store_tiers[t.kind] = store_tiers.get(t.kind, np.zeros((L, E), bool)) | mask
        geometry = {"moe_layers": list(a.moe_layers), "num_experts": E, "top_k": a.top_k, "nbytes": nbytes,
                    "store_tiers": store_tiers, "tier_set": self.cfg.active_tiers,
                    "tier_kinds": {t.name: t.kind for t in self.cfg.tiers}}
        router = _router_weights(dense) if pf.policy in ("next_gate", "pre_gated", "ensemble", "learned") else None
        nvme = self._nvme_path()
        nodes = {w: s["node_id"] for w, s in self._worker_nodes().items()}
        self.coordinator = ray.remote(PrefetchCoordinator).options(
            name="prefetch-coordinator", namespace=self.cfg.ray.namespace, num_cpus=0,
            max_restarts=pf.max_restarts, max_task_retries=0, max_pending_calls=pf.max_pending_batches,
        ).remote(pf, geometry, dict(self.workers), nodes, self._owners(), self.storage, router_weights=router,
                 store_dir=nvme, model=self.manifest.model.family, orders_out=pf.orders_ride)
        ray.get(self.coordinator.ping.remote())   # a bad policy / missing weights fail here, at start
        spec = None
        if pf.speculate_layers > 0 and (pf.policy in SPECULATING_POLICIES or pf.speculate_source != "auto"):
            spec = self._speculator(router)
        # the coordinator's predictor reads hidden states, unless it is a routing-only learned one: then none is sent
        hidden = router is not None and not (pf.policy == "learned" and is_routing_only(nvme))
        self._publish(self.coordinator, spec, reuse, hidden=pf.publish_hidden and hidden)

    def _publish(self, coordinator, spec: NextLayerSpeculator | None, reuse, hidden: bool = False) -> None:
        """Install the routing hook (RoutePublisher) with the prefetch settings, to `coordinator` (or none)."""
        pf = self.cfg.prefetch
        self.publisher = RoutePublisher(coordinator, self.model, self.experts, every=pf.publish_every_layers,
                                        hidden=hidden, speculator=spec, threshold=pf.speculate_threshold,
                                        fanout=pf.speculate_fanout,
                                        values=pf.speculate_values and not pf.eviction_hints, reuse=reuse,
                                        inflight=pf.publish_inflight, backlog=pf.publish_backlog_layers,
                                        seq=lambda: next(self._coord_seq))
        self.model.on_route = self.publisher

    def _reuse_values(self):
        """The runtime's reuse values (prefetch.reuse_values / reuse_memory / routing_prior). The routing prior
        (prefetch.routing_prior, else the store's routing_prior.npz when there) is read here unless reuse_memory is
        off; a malformed one or one of another model's geometry is an error naming the file."""
        pf, a = self.cfg.prefetch, self.model.args
        L, E, K = len(a.moe_layers), a.num_experts, a.top_k
        path = pf.routing_prior
        if path is None and pf.reuse_memory is not False and self._nvme_path() is not None:
            found = os.path.join(self._nvme_path(), PRIOR_FILE)
            path = found if os.path.exists(found) else None
        prior = None
        if path is not None:
            prior, self.routing_prior_meta = load_routing_prior(path, L, E, K)
        return make_reuse_values(L, E, K, memory=pf.reuse_memory, prior=prior)

    def _nvme_path(self) -> str | None:
        return next((t.path for t in self.cfg.storage_tiers if t.kind == "nvme"), None)

    def _speculator(self, router: dict | None) -> NextLayerSpeculator | None:
        """The runtime's fast path (prefetch.speculate_*): its best available source, or None."""
        pf, a = self.cfg.prefetch, self.model.args
        prefer = pf.speculate_source if pf.speculate_source != "auto" else \
            (pf.policy if pf.policy in ("next_gate", "learned", "pre_gated") else "auto")
        return NextLayerSpeculator.from_sources(len(a.moe_layers), a.num_experts, a.top_k, store_dir=self._nvme_path(),
                                                dense=router, depth=pf.speculate_layers, prefer=prefer)

    def register_request(self, request, tenant: str | None = None, tiers: list[str] | None = None,
                         latency_budget_s: float | None = None) -> None:
        """Before a request's first token: its tenant, TierSet and latency budget go to the coordinator (its
        orders honour them). Raises AccessDenied, naming tenant and what, if the tenant may not use the model or
        those tiers; the runtime's fast path then orders nothing for it either."""
        if self.coordinator is not None:
            seq = self._to_coordinator("register_request", request, tenant, None if tiers is None else list(tiers),
                                       latency_budget_s)
            if self.publisher is not None:
                self.publisher.registered(request)
                rules = self.publisher.rules
                rules[request] = (None if tiers is None else list(tiers), tenant, latency_budget_s, seq)
                while len(rules) > CONTROL_BACKLOG:   # requests never ended (a caller's leak): the oldest go
                    del rules[next(iter(rules))]
        if self._access is not None:   # checked here too when no coordinator runs (on_demand, the fast path alone)
            try:
                self._access.check(tenant, self.manifest.model.family,
                                   list(tiers) if tiers is not None else self.cfg.active_tiers)
            except AccessDenied:
                if self.publisher is not None:
                    self.publisher.denied.add(request)
                raise

    def end_requests(self, request_ids) -> None:
        """Requests finished: the coordinator drops their state and cancels their queued prefetches."""
        if self.publisher is not None and self.publisher.denied:
            self.publisher.denied.difference_update(request_ids)
        if self.publisher is not None and self.publisher.rules:
            for r in request_ids:
                self.publisher.rules.pop(r, None)
        if self.coordinator is not None:
            if self.publisher is not None:   # their last routing goes ahead of their end; their orders stay
                self.publisher.drain()       # behind
                self.publisher.ended(request_ids)
            self._to_coordinator("end_request", list(request_ids))

    def _to_coordinator(self, method: str, *args) -> int:
        """A register / end call, numbered (the coordinator runs calls out of order and sorts these by number).
        One refused because the coordinator lags (its pending-calls cap, which the routing batches share) waits
        here and goes before the next one, so a request's end is not lost and its registration does not leak;
        past CONTROL_BACKLOG waiting calls the oldest are dropped (counted: a coordinator that is gone)."""
        with self._coord_lock:
            seq = next(self._coord_seq)
            self._coord_backlog.append((method, args, seq))
            while self._coord_backlog:
                m, a, seq = self._coord_backlog[0]
                try:
                    getattr(self.coordinator, m).remote(*a, seq=seq)
                except Exception:  # noqa: BLE001 - behind (pending-calls cap) or gone: kept for the next call
                    break
                self._coord_backlog.popleft()
            while len(self._coord_backlog) > CONTROL_BACKLOG:
                self._coord_backlog.popleft()
                self.control_calls_dropped += 1
        return seq

    def _spawn_worker(self) -> int:
        w = self.cfg.workers
        wid = self._next_worker
        self._next_worker += 1
        cls = ray.remote(ExpertWorker)
        # GPU workers go where the GPUs are. CPU-only workers are dealt round-robin over the storage nodes: Ray's
        # "SPREAD" is best-effort and may pack them onto one node, and so did soft node affinity in CI; the node
        # list holds only nodes whose storage actors are alive (dead nodes are forgotten in _worker_lost).
        if w.num_gpus_per_worker:
            strategy = "DEFAULT"
        else:
            nodes = sorted(self.storage)
            strategy = ray_compat.pin_to_node(nodes[wid % len(nodes)])
        self.workers[wid] = cls.options(
            num_gpus=w.num_gpus_per_worker, num_cpus=0, max_concurrency=16, name=f"expert-worker-{wid}",
            namespace=self.cfg.ray.namespace, scheduling_strategy=strategy,
        ).remote(wid, self.manifest.to_json(), int(w.hbm_budget_bytes), self.storage, device=w.device,
                 policy=self.policy, miss_rates=w.miss_rates.model_dump() if w.miss_rates else None,
                 prefetch_concurrency=w.prefetch_concurrency,
                 h2d={"chunk_bytes": int(w.h2d_chunk_bytes), "copy_threads": w.h2d_copy_threads},
                 # passed down, not asked of a storage actor: a worker must start even where its node's one is gone
                 weight_prefetch=self.cfg.weight_prefetch_config.model_dump())
        return wid

    def shutdown(self) -> None:
        path = self.cfg.telemetry.stats_path
        if path and getattr(self, "model", None) is not None and self.workers:
            self._write_stats(path)
        if getattr(self, "experts", None) is not None:
            self.experts.close_graph()
        if self.coordinator is not None:
            try:
                ray.kill(self.coordinator)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.coordinator = None
        killed = 0
        for h in list(self.workers.values()) + [h for hs in self.storage.values() for h in hs]:
            try:
                ray.kill(h)
                killed += 1
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.workers.clear()
        self.storage.clear()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
        elif killed and ray.is_initialized():   # gone before we return: a start in this namespace reuses names
            try:
                if not ray_compat.wait_named_actors_gone(self.cfg.ray.namespace,
                                                         ("prefetch-coordinator", "expert-worker-", "storage-")):
                    log.warning("namespace %s: killed actors still listed after 10 s", self.cfg.ray.namespace)
            except Exception as e:  # noqa: BLE001 - shutting down must go on
                log.warning("namespace %s: could not list named actors: %s", self.cfg.ray.namespace, e)

    def _write_stats(self, path: str) -> None:
        """telemetry.stats_path: stats() as JSON, written whole (a temporary file renamed) or not at all."""
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            st = self.stats()
            with open(tmp, "w") as f:
                json.dump(st, f, indent=1, default=str)
            os.replace(tmp, path)
        except Exception as e:  # noqa: BLE001 - the stats are a by-product: shutting down must go on
            log.warning("telemetry.stats_path %s: stats not written: %s: %s", path, type(e).__name__, e)
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    def _fits(self, placement: Placement) -> bool:
        """Every worker's HBM budget holds all the experts it owns (replicas included)."""
        budget = int(self.cfg.workers.hbm_budget_bytes)
        return all(b <= budget for b in placement.bytes_of(self.sizes).values())

    # -- membership ---------------------------------------------------------------------------------------------
    def _replace(self) -> int:
        """Re-place over the current workers, using measured load; returns how many holdings moved."""
        old = self.experts.placement
        new = place(self.sizes, sorted(self.workers), self.experts.measured_load or None,
                    replicate_top=self.replicate_top, previous=old,
                    by_layer=self.cfg.workers.placement == "by_layer")
        for wid, h in self.workers.items():
            gone = [k for k in old.experts_of(wid) if wid not in new.replicas(k)]
            if gone:
                h.drop.remote(gone)
        self.experts.publish(new)
        if self.coordinator is not None:
            try:
                self.coordinator.set_placement.remote(dict(self.workers), {w: s["node_id"] for w, s in
                                                                           self._worker_nodes().items()},
                                                      self._owners())
            except Exception:  # noqa: BLE001 - the coordinator catches up on restart
                pass
        return new.moved_from(old)

    def add_worker(self) -> int:
        wid = self._spawn_worker()
        ray.get(self.workers[wid].ping.remote())
        self._replace()
        return wid

    def _worker_lost(self, wid: int, err: Exception) -> None:
        """A worker died: forget it and re-place its experts on the survivors (they reload them on demand)."""
        log.warning("expert worker %d lost (%s); re-placing its experts on %s", wid, type(err).__name__,
                    sorted(set(self.workers) - {wid}))
        self.workers.pop(wid, None)
        if not self.workers:
            raise RuntimeError(f"every expert worker is gone (last: worker {wid}: {err})")
        self.lost_workers.append(wid)
        alive = set(ray_compat.alive_node_ids())
        for node in [n for n in self.storage if n not in alive]:  # its node is gone (removed, crashed)
            log.warning("node %s is gone: forgetting its storage actors", node)
            self.storage.pop(node)
        self._replace()

    def remove_worker(self, wid: int) -> None:
        h = self.workers.pop(wid)
        self._replace()
        ray.kill(h)

    # -- use ----------------------------------------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int, **kw) -> list[list[int]]:
        if self.publisher is None:
            return generate(self.model, prompts, max_new_tokens, **kw)
        gen = next(self._gen_ids)
        ids = [f"g{gen}-{b}" for b in range(len(prompts))]   # cache row b of this generation
        self.publisher.row_requests = ids
        try:
            return generate(self.model, prompts, max_new_tokens, **kw)
        finally:
            self.publisher.flush()
            self.publisher.row_requests = None
            self.end_requests(ids)

    def coordinator_stats(self, timeout_s: float = 30.0) -> dict | None:
        """The coordinator's stats (telemetry), None without one, {"error": ...} if it cannot answer."""
        if self.coordinator is None:
            return None
        try:
            return ray.get(self.coordinator.stats.remote(), timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - dead or restarting: serving goes on without it
            return {"error": f"{type(e).__name__}: {e}"}

    def stats(self) -> dict:
        ws = ray.get([w.stats.remote() for w in self.workers.values()])
        ss = []
        for h in [h for hs in self.storage.values() for h in hs]:
            try:
                ss.append(ray.get(h.stats.remote()))
            except ray.exceptions.RayActorError as e:  # dead for good (restarts spent): the others still report
                ss.append({"error": f"{type(e).__name__}"})
        d = self.experts.stats
        c = self.experts.counters
        pub = self.publisher
        spec = pub.speculator if pub is not None else None
        # the runtime's fast path, from its own counters (with a coordinator its telemetry adds them up too)
        fast = None if spec is None else {"source": spec.source, "depth": spec.depth, "orders": pub.speculated,
                                          "superseded": pub.superseded, "refuted": pub.refuted}
        rv = pub.reuse if pub is not None else None
        # the reuse values: which table they trust per MoE layer (MixedReuse), and the prior it started from
        mixed = isinstance(rv, MixedReuse)
        reuse = None if rv is None else {
            "memory": mixed, "weight_memory": rv.weight_slow.round(4).tolist() if mixed else None,
            "scored_steps": int(rv.scored.sum()) if mixed else None, "prior": self.routing_prior_meta}
        return {"workers": ws, "storage": ss,
                "dispatch": {"calls": d.calls, "plain_calls": d.plain_calls, "moe_layers": d.layers,
                             "pairs": d.pairs, "mode": self.experts.dispatch},
                "hits": sum(w["hits"] for w in ws), "misses": sum(w["misses"] for w in ws),
                "bytes_by_tier": _sum_dicts(s.get("tier_bytes", {}) for s in ss),
                "runtime": {**c, "bytes_by_tier": dict(c["bytes_by_tier"]), "miss_causes": dict(c["miss_causes"]),
                            "dense_offload": self.model.dense_offload_stats()},
                "prefetch": {"policy": self.cfg.prefetch.policy, "coordinator": self.coordinator_stats(),
                             "published": self.publisher.sent if self.publisher else 0,
                             "dropped": self.publisher.dropped if self.publisher else 0,
                             "coalesced": self.publisher.outbox.coalesced if self.publisher else 0,
                             "coordinator_orders_ridden": self.publisher.coordinator_orders if self.publisher else 0,
                             "control_calls_waiting": len(self._coord_backlog),
                             "control_calls_dropped": self.control_calls_dropped, "fast_path": fast,
                             "reuse_values": reuse}}


def _router_weights(dense: dict) -> dict:
    """The dense tensors next-gate and pre-gated speculation read (routers, pre-gates, the norms before them)."""
    return {k: v.float().numpy() for k, v in dense.items()
            if ".gate." in k or "pre_gate" in k or "post_attention_layernorm" in k}


def _flat_values(vals: dict | None) -> dict | None:
    """{layer: (experts int [n], P float [n])} (ClusterExperts.value_riders of one worker) -> {(layer, expert): P}."""
    if not vals:
        return None
    return {(dl, ex): p for dl, (es, ps) in vals.items() for ex, p in zip(es.tolist(), ps.tolist())}


def _sum_dicts(ds) -> dict:
    out: dict = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out
