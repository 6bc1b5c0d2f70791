"""Coordinator decision time per layer step (issue #4 target: p99 <= 1 ms with 32 layers x 64 experts x 8 workers).

    python -m jobs.bench_coordinator [--layers 32 --experts 64 --workers 8 --top-k 8 --requests 8 --steps 2000]
                                     [--policy cross_layer] [--planner-engine compiled|numpy] [--runtimes 1]
                                     [--no-actor] [--step-gap-ms 0]
                                     [--inflight 2 --layer-ms 5 --compute-calls 1 --orders-ride 1]
                                     [--pin-coordinator CORE] --json OUT

Three measurements on the same synthetic routing (a per-layer Markov chain over experts, so predictors have
something to predict; a 25% HBM cache; every expert in NVMe and S3):
  planner   policies/ranking.PrefetchPlanner.plan alone (pure numpy) on the candidates of `requests` live
            requests, each predicting `window` layers ahead with the policy's predictor
  step      the coordinator's whole per-batch handling (observe + predict + plan + issue + score) in process,
            with in-process worker handles: orders apply to a 25% cache after the step (as the actor run's
            sinks), which the coordinator polls between steps, so it plans against full caches as in serving; no
            Ray submission cost. Split into step_predictor (the predictor's observe + predict),
            step_excl_predictor (the rest), step_scoring (scoring predictions, after the orders are out) and
            step_decision (routing in -> orders out: the step less the scoring). Steps run back to back, caches
            warm; --step-gap-ms G sleeps G ms before each, as a paced decode leaves the coordinator idle, and the
            same step then costs 1.7-1.9x (docs/benchmarks.md, session 22)
  actor     the real PrefetchCoordinator actor fed a batch per layer step through each runtime's RouteOutbox (as
            RoutePublisher sends: at most --inflight calls outstanding, layers flushed meanwhile go together),
            one layer step every --layer-ms (a decode's pace; 5 ms: a 32-layer model at ~6 tokens/s, the
            offloading regime), with sink worker / storage actors (prefetched experts become resident in a
            25% cache). Each layer step also makes the runtime's compute calls (--compute-calls 1: one per worker
            owning a routed expert, waited for; the computed experts become resident), and with
            prefetch.orders_ride the coordinator's orders ride with them. --inflight 0: the pacing before
            session 21 (32 batches sent at once, then waited for, a burst: calls received while a step runs slow
            it 3-5x, docs/benchmarks.md session 21). Its own
            per-batch timing, split into actor_decision (routing in -> orders out, less submitting them; also
            without the predictor), actor_submit (the `.remote()` calls: one per worker with orders or
            cancellations) and actor_scoring (after the orders are out)
`*_cpu` rows are the thread's CPU time for the same calls (time.thread_time): on a shared, overloaded machine
wall-clock percentiles mostly measure preemption, CPU time what the code costs. actor_decision_cpu is the
actor's decision in thread CPU; its wall time also holds waits for the GIL and the cores, which Ray's own threads
in the actor's process take while calls arrive (docs/benchmarks.md, session 21), and the cores it shares with the
sinks, the driver and Ray's daemons: --pin-coordinator CORE gives the actor's process that core alone and
everything else the others (session 22). The actor row also reports process_cpu_ms_per_call: the actor process's
CPU per call, every thread.
With --embedded, instead: the embedded model (jobs/embedded_model) served by a local ExpertCluster (2 workers whose
caches hold 25% of the experts, experts on local disk) for each of --policies (on_demand first: the baseline),
the same prompts, greedy: tokens/s, hits, misses, stall seconds, prefetches issued/used, timely recall; the tokens
of every policy must equal on_demand's.
Prints a table and writes JSON: {"planner"|"step"|"actor"|"actor_decision"|"actor_submit": {"p50_ms", "p99_ms",
"mean_ms", "n"}, "config": ...}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time

import numpy as np

from cluster.config import PrefetchConfig
from actors.prefetch_coordinator import held_orders, merge_orders
from cluster.expert_cluster import RouteOutbox
from policies.ranking import ClusterView, HBM, NUM_TIERS, NVME, PlannerConfig, PrefetchPlanner, RequestView, S3
from policies.registry import make_predictor
from policies.predictors import RoutingEvent


def routing(L: int, E: int, K: int, B: int, tokens: int, seed: int = 0) -> np.ndarray:
    """int64 [tokens, L, B, K]: each layer's experts drawn from a sparse transition of the previous layer's."""
    rng = np.random.default_rng(seed)
    T = rng.dirichlet(np.full(E, 0.05), size=(L, E))         # [L, E, E] peaked rows
    out = np.zeros((tokens, L, B, K), np.int64)
    prev = rng.integers(0, E, size=B)
    for t in range(tokens):
        for l in range(L):
            for b in range(B):
                p = T[l, prev[b]]
                ch = rng.choice(E, size=K, replace=False, p=p)
                out[t, l, b] = ch
                prev[b] = ch[0]
    return out


def pct(xs) -> dict:
    a = np.asarray(xs) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": len(a)}


class _Nop:
    def remote(self, *a, **k):
        return None


class _Handle:
    """In-process stand-in for an actor handle: every method's `.remote` does nothing."""
    def __getattr__(self, name):
        return _Nop()


class _SinkCache:
    """A worker's cache bookkeeping without bytes (as the actor run's Sink): prefetched experts become resident,
    named victims out first, then the oldest past `cap` experts; so after warm-up the coordinator plans against a
    full 25% cache, as in serving."""
    def __init__(self, cap: int, nbytes: int):
        self.cap, self.nbytes, self.res = cap, nbytes, {}

    def prefetch(self, items, cancel=None, keep=None):
        for it in items:
            for v in (it[4] if len(it) > 4 and it[4] else ()):
                self.res.pop(tuple(v), None)
            self.res[(it[0], it[1])] = True
            while len(self.res) > self.cap:
                self.res.pop(next(iter(self.res)))

    def snapshot(self):
        return list(self.res), [], len(self.res) * self.nbytes, self.cap * self.nbytes


class _Call:
    def __init__(self, fn, done: bool):
        self.fn, self.done = fn, done

    def remote(self, *a, **k):
        loop = asyncio.get_running_loop()
        if not self.done:   # applied after the step, as a worker would: not the coordinator's time; nothing
            loop.call_soon(lambda: self.fn(*a, **k))   # to wait for (the coordinator holds nothing back)
            return None
        f = loop.create_future()
        f.set_result(self.fn(*a, **k))
        return f


class _InProcessWorker:
    """A handle whose prefetch applies to a _SinkCache right after the step and whose snapshot answers an
    already-done future, so the coordinator's own poll (refresh_s) reads the caches as it reads real workers'."""
    def __init__(self, sink):
        self.prefetch = _Call(sink.prefetch, False)
        self.snapshot = _Call(sink.snapshot, True)
        self.cancel = self.stage = _Call(lambda *a, **k: 0, False)


class _InProcessStorage:
    """A node's storage handle: stages nothing, and its DRAM tier is empty with 64 MiB free."""
    def __init__(self):
        self.stage = _Call(lambda *a, **k: 0, False)
        self.snapshot = _Call(lambda: ([], [], 0, 64 << 20), True)


def geometry(L, E, W, nbytes):
    owner = np.tile(np.arange(E) % W, (L, 1))
    return {"moe_layers": list(range(L)), "num_experts": E, "top_k": 0, "nbytes": np.full((L, E), nbytes),
            "store_tiers": {"nvme": np.ones((L, E), bool), "s3": np.ones((L, E), bool)},
            "tier_set": ["dram", "nvme", "s3"]}, owner


def bench_planner(args, routes) -> dict:
    L, E, W, K, B = args.layers, args.experts, args.workers, args.top_k, args.requests
    pred = make_predictor(args.policy, num_layers=L, num_experts=E, top_k=K)
    nbytes = 1 << 20
    owner = np.tile(np.arange(E) % W, (L, 1))
    rng = np.random.default_rng(1)
    engine = getattr(args, "planner_engine", "compiled")
    planner = PrefetchPlanner(PlannerConfig(max_inflight_bytes=64 * nbytes, engine=engine))
    times, cpu = [], []
    steps = 0
    for t in range(routes.shape[0]):
        for l in range(L):
            for b in range(B):
                pred.observe(RoutingEvent(b, t, l, routes[t, l, b]))
            present = np.zeros((NUM_TIERS, L, E), bool)
            present[HBM] = rng.random((L, E)) < 0.25
            present[NVME] = present[S3] = True
            cap = E * L // 4 // W * nbytes
            used = np.bincount(owner[present[HBM]], minlength=W) * nbytes
            view = ClusterView(owner, np.zeros(W, np.int64), present, np.full((L, E), nbytes),
                               np.maximum(cap - used, 0), np.array([64 * nbytes]))
            reqs = [RequestView(b, pred.predict(b, args.window)) for b in range(B)]
            t0, c0 = time.perf_counter(), time.thread_time()
            planner.plan(reqs, view, args.window)
            times.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
            steps += 1
            if steps >= args.steps:
                break
        if steps >= args.steps:
            break
    return {"planner": pct(times[args.warmup:]), "planner_cpu": pct(cpu[args.warmup:])}


def batches(args, routes):
    """One routing batch per layer step of each runtime. With --runtimes R the requests are split over R runtimes
    whose decode steps are L / R layers apart, so a step predicts for requests at R different layers."""
    L, B, R = args.layers, args.requests, getattr(args, "runtimes", 1)
    groups = [np.arange(j, B, R) for j in range(R)]   # the requests' rows of each runtime
    for t in range(routes.shape[0]):
        for l in range(L):
            for j, g in enumerate(groups):
                q = t * L + l - j * (L // R)                # runtime j is j * L / R layers behind
                if q < 0 or not len(g):
                    continue
                tq, lq = divmod(q, L)
                ids = routes[tq, lq, g]
                yield {"runtime": f"bench{j}", "requests": [f"r{b}" for b in g], "counters": {},
                       "layers": [{"layer": lq, "rows": np.arange(len(g)), "pos": np.full(len(g), tq), "ids": ids,
                                   "w": np.full(ids.shape, 1.0 / args.top_k, np.float32), "hidden": None}]}


def coordinator_args(args):
    L, E, W = args.layers, args.experts, args.workers
    geo, owner = geometry(L, E, W, 1 << 20)
    geo["top_k"] = args.top_k
    pf = PrefetchConfig(policy=args.policy, lookahead_layers=args.window, lookahead_tokens=1,
                        max_inflight_bytes=64 << 20, refresh_s=1e9,
                        planner_engine=getattr(args, "planner_engine", "compiled"))
    return pf, geo, owner


def bench_step(args, routes) -> dict:
    from actors.prefetch_coordinator import PrefetchCoordinator
    pf, geo, owner = coordinator_args(args)
    pf = pf.model_copy(update={"refresh_s": 1e-9})   # poll the caches as often as the loop lets a poll finish
    W = args.workers
    cap = args.layers * args.experts // 4 // W      # experts per worker: a 25% cache
    sinks = [_SinkCache(cap, 1 << 20) for _ in range(W)]
    c = PrefetchCoordinator(pf, geo, {w: _InProcessWorker(sinks[w]) for w in range(W)}, {w: "n0" for w in range(W)},
                            owner, {"n0": [_InProcessStorage()]})
    c.metrics = None

    cpu = []

    gap = getattr(args, "step_gap_ms", 0.0) / 1e3

    async def run():
        n = 0
        for b in batches(args, routes):
            if gap:   # the core idles between steps, as a paced decode leaves the coordinator's (see --step-gap-ms)
                time.sleep(gap)
            c0 = time.thread_time()
            await c.publish(b)
            cpu.append(time.thread_time() - c0)
            await asyncio.sleep(0)      # the poll task runs between steps, as on the actor's event loop
            await asyncio.sleep(0)
            n += 1
            if n >= args.steps:
                break
    asyncio.run(run())
    resident = sum(len(s.res) for s in sinks)
    assert resident >= 0.9 * cap * W, f"the caches hold {resident} experts, expected about {cap * W} (full)"
    t = np.array(list(c.step_times)[args.warmup:])
    p = np.array(list(c.predictor_times)[args.warmup:])
    sc = np.array(list(c.scoring_times)[args.warmup:])
    sub = np.array(list(c.submit_times)[args.warmup:])
    return {"step": pct(t), "step_cpu": pct(cpu[args.warmup:]), "step_predictor": pct(p),
            "step_excl_predictor": pct(t - p), "step_scoring": pct(sc), "step_decision": pct(t - sc - sub)}


def _pin_process(_self, core: int) -> list:
    """Runs in the coordinator actor: every thread of its process onto `core` (Linux affinity is per thread; a
    thread started meanwhile by one not yet moved is caught by the next pass, one that ended is skipped)."""
    done: set = set()
    while True:
        tids = {int(t) for t in os.listdir("/proc/self/task")} - done
        if not tids:
            return sorted(done)
        for t in tids:
            try:
                os.sched_setaffinity(t, {core})
                done.add(t)
            except ProcessLookupError:   # the thread ended
                done.add(t)


def bench_actor(args, routes) -> dict:
    import ray

    from actors.prefetch_coordinator import PrefetchCoordinator

    cap = args.layers * args.experts // 4 // args.workers     # experts per worker: a 25% cache

    @ray.remote(num_cpus=0)
    class Sink:
        """A _SinkCache behind a Ray actor: the coordinator sees a full cache after warm-up, as in serving."""
        def __init__(self):
            self.cache = _SinkCache(cap, 1 << 20)

        def prefetch(self, items, cancel=None, keep=None):
            self.cache.prefetch(items, cancel, keep)
            return len(items)

        def compute(self, layer, experts, coordinator=None):
            """A layer's compute call from the runtime (--compute-calls): the coordinator's orders riding with it
            are applied first; the computed experts are then resident (a demand load evicts the oldest)."""
            if coordinator is not None:
                self.cache.prefetch(*coordinator)
            self.cache.prefetch([(layer, e) for e in experts])
            return len(experts)

        def cancel(self, request=None, items=None, requests=None):
            return 0

        def stage(self, items, tiers=None):
            return 0

        def snapshot(self):
            return self.cache.snapshot()

    pf, geo, owner = coordinator_args(args)
    pf = pf.model_copy(update={"refresh_s": args.refresh_s})
    W = args.workers
    pin, cores = getattr(args, "pin_coordinator", None), os.sched_getaffinity(0)
    try:
        if pin is not None:   # everything Ray starts from here inherits the driver's cores: all but the coordinator's
            os.sched_setaffinity(0, cores - {pin})
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR",
                 namespace="bench-coordinator")
        sinks = {w: Sink.remote() for w in range(W)}
        store = Sink.remote()
        ride = bool(args.inflight) and args.orders_ride
        coord = ray.remote(PrefetchCoordinator).options(num_cpus=0, max_pending_calls=64).remote(
            pf, geo, sinks, {w: "n0" for w in range(W)}, owner, {"n0": [store]}, orders_out=ride)
        ray.get(coord.ping.remote())
        if pin is not None:
            ray.get(coord.__ray_call__.remote(_pin_process, pin))
        cpu0 = ray.get(coord.stats.remote())["process_cpu_s"]
        n, dropped = 0, 0
        if args.inflight:   # each runtime sends through its RouteOutbox, as RoutePublisher does
            boxes = {}

            def call(rt):
                return lambda table, evs: coord.publish.remote({"runtime": rt, "requests": table, "counters": {},
                                                                "layers": evs})

            riders: dict = {}

            def orders(reply):   # the runtime carries them to the workers: with its next compute call to each
                for w, (items, cancel, keep) in reply.items():   # (--compute-calls), else in a call of their own
                    if args.compute_calls:
                        merge_orders(riders.setdefault(w, ([], [], [])), items, cancel, keep)
                    else:
                        sinks[w].prefetch.remote(items, cancel or None, keep)
            t_next = time.perf_counter()
            for b in batches(args, routes):
                rt = b["runtime"]
                box = boxes.get(rt) or boxes.setdefault(rt, RouteOutbox(call(rt), args.inflight, 1 << 20,
                                                                        on_reply=orders))
                if args.layer_ms:        # one layer step of every runtime per --layer-ms: a decode's pace
                    t_next += args.layer_ms / 1e3 / args.runtimes
                    while time.perf_counter() < t_next:
                        time.sleep(5e-5)
                if args.compute_calls:   # the layer's compute calls, one per owner of a routed expert, riders along;
                    ev = b["layers"][0]                  # the batch is flushed while they are out (as the runtime's
                    ids = np.unique(ev["ids"])           # deferred work), then the layer waits for them
                    ws = owner[ev["layer"], ids]
                    refs = []
                    for w in np.unique(ws).tolist():
                        r = riders.pop(w, None)
                        refs.append(sinks[w].compute.remote(ev["layer"], ids[ws == w].tolist(),
                                                            None if r is None else held_orders(r)))
                    for w in list(riders):               # workers this layer does not call: a call of their own
                        it, ca, kp = held_orders(riders.pop(w))
                        sinks[w].prefetch.remote(it, ca or None, kp)
                    box.put(b["requests"], b["layers"])
                    ray.get(refs)
                else:
                    box.put(b["requests"], b["layers"])
                n += 1
                if n >= args.steps:
                    break
            for box in boxes.values():
                while box.outstanding:
                    time.sleep(1e-4)
                box.put([], [], force=True)
            ray.get(coord.ping.remote())   # an actor call queued after the last publish (ping is one)
            dropped = sum(b.dropped for b in boxes.values())
        else:                # the old pacing: 32 batches sent at once, then waited for (a burst)
            pending = []
            for b in batches(args, routes):
                try:
                    pending.append(coord.publish.remote(b))
                except Exception:  # noqa: BLE001 - pending-calls limit: the runtime drops, as in serving
                    dropped += 1
                n += 1
                if len(pending) >= 32:
                    ray.get(pending)
                    pending = []
                if n >= args.steps:
                    break
            ray.get(pending)
        s = ray.get(coord.stats.remote())
        times, submit, pred, scoring, dcpu = ray.get(coord.step_breakdown_s.remote())
        w0 = min(args.warmup, len(times) // 10)   # coalesced calls: fewer steps than batches
        t, sub, pr, sc = (np.array(a[w0:]) for a in (times, submit, pred, scoring))
        out = {"actor": pct(t), "actor_decision": pct(t - sub - sc),
               "actor_decision_excl_predictor": pct(t - sub - sc - pr), "actor_submit": pct(sub),
               "actor_scoring": pct(sc), "actor_decision_cpu": pct(dcpu[w0:])}
        out["actor"].update(dropped=dropped, issued=s["prefetches"]["issued"], calls=s["steps"],
                            # the actor process's CPU per call, all threads (Ray's receive, reply, submits)
                            process_cpu_ms_per_call=(s["process_cpu_s"] - cpu0) * 1e3 / max(s["steps"], 1),
                            layers_per_call=n / max(s["steps"], 1),
                            orders_per_step=s["prefetches"]["issued"] / max(s["steps"], 1),
                            recall_at_1=s["recall_at_k"].get(1))
        return out
    finally:
        try:
            ray.shutdown()
        finally:
            os.sched_setaffinity(0, cores)


EMBEDDED_PROMPTS = ["def ", "import os\n", "class Foo(object):\n    def __init__(self", "    for i in range(",
                    "x = ", "return ", "# Copyright", "if __name__ == '__main__':\n    "]


def bench_embedded(args) -> dict:
    import tempfile

    import ray
    import torch
    from tokenizers import Tokenizer

    from cluster.config import ClusterConfig
    from cluster.expert_cluster import ExpertCluster
    from storage_adapters.converter import convert, open_target, plan_conversion
    import asyncio
    torch.set_num_threads(1)
    emb = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded_model")
    tok = Tokenizer.from_file(os.path.join(emb, "tokenizer.json"))
    prompts = [tok.encode(t).ids for t in EMBEDDED_PROMPTS[:args.batch]]
    out: dict = {"policies": {}}
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        man = asyncio.run(convert(plan_conversion(emb), [open_target("file://" + store)], progress=False)).manifest
        budget = max(1, len(man.blobs) // 4 // 2) * man.expert_bytes      # 25% of the experts over 2 workers
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR",
                 namespace="bench-coordinator-embedded", object_store_memory=256 << 20)
        try:
            base = None
            for pol in args.policies.split(","):
                cfg = ClusterConfig.model_validate({
                    "ray": {"namespace": f"bench-{pol}"}, "workers": {"count": 2, "hbm_budget_bytes": budget},
                    "tiers": [{"kind": "dram", "budget_bytes": 64 << 20}, {"kind": "nvme", "path": store}],
                    "prefetch": {"policy": pol, "publish_every_layers": args.publish_every,
                                 "lookahead_layers": args.lookahead_layers}})
                with ExpertCluster(cfg) as c:
                    c.generate(prompts, 2)                              # warm-up (first touches)
                    t0 = time.perf_counter()
                    toks = c.generate(prompts, args.new_tokens)
                    dt = time.perf_counter() - t0
                    time.sleep(0.3)
                    st = c.stats()
                    if base is None:
                        base = toks
                    assert toks == base, f"{pol}: tokens differ from {args.policies.split(',')[0]}"
                    rt, cs = st["runtime"], st["prefetch"]["coordinator"] or {}
                    out["policies"][pol] = {
                        "tokens_per_s": sum(len(t) for t in toks) / dt, "hits": rt["hits"], "misses": rt["misses"],
                        "hit_rate": rt["hits"] / max(rt["hits"] + rt["misses"], 1), "stall_s": rt["stall_s"],
                        "prefetch_issued": cs.get("prefetches", {}).get("issued", 0),
                        "prefetch_used": cs.get("prefetches", {}).get("used", 0),
                        "timely_recall": cs.get("timely_recall"), "recall_at_k_d1": cs.get("recall_at_k", {}).get(1),
                        "decision_ms_p50": cs.get("decision_ms_p50"), "decision_ms_p99": cs.get("decision_ms_p99")}
        finally:
            ray.shutdown()
    b = out["policies"][args.policies.split(",")[0]]
    print(f"embedded model, {len(prompts)} requests x {args.new_tokens} tokens, 25% cache, 2 workers "
          f"(ratios vs {args.policies.split(',')[0]})")
    print(f"{'policy':<22}{'tok/s':>8}{'x':>6}{'hit rate':>10}{'stall s':>9}{'issued':>8}{'used':>7}{'timely':>8}")
    for pol, r in out["policies"].items():
        tr = r["timely_recall"]
        print(f"{pol:<22}{r['tokens_per_s']:>8.1f}{r['tokens_per_s'] / b['tokens_per_s']:>6.2f}{r['hit_rate']:>10.3f}"
              f"{r['stall_s']:>9.2f}{r['prefetch_issued']:>8}{r['prefetch_used']:>7}"
              f"{(f'{tr:.3f}' if tr is not None else '-'):>8}")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--runtimes", type=int, default=1,
                    help="split the requests over this many runtimes, L / runtimes layers apart (the step and actor "
                         "runs; so a step predicts for requests at several layers)")
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--policy", default="cross_layer")
    ap.add_argument("--planner-engine", choices=("compiled", "numpy"), default="compiled",
                    help="the planner's ranking: one numba call, or its numpy reference (prefetch.planner_engine)")
    ap.add_argument("--no-actor", action="store_true")
    ap.add_argument("--step-gap-ms", type=float, default=0.0,
                    help="in-process step: the thread sleeps this long before each step, as the coordinator idles "
                         "between a paced decode's layer steps (0: back to back, caches warm)")
    ap.add_argument("--pin-coordinator", type=int, default=None, metavar="CORE",
                    help="the coordinator actor's process on this core alone, everything else on the others "
                         "(the coordinator on a core of its own, as on a head node)")
    ap.add_argument("--inflight", type=int, default=PrefetchConfig().publish_inflight,
                    help="actor run: publish calls outstanding per runtime (RouteOutbox; 0: the old pacing, 32 "
                         "batches at once then waited for)")
    ap.add_argument("--layer-ms", type=float, default=5.0,
                    help="actor run with --inflight: a layer step of every runtime every this many ms (0: as fast "
                         "as the driver goes, which coalesces everything into a few huge calls)")
    ap.add_argument("--refresh-s", type=float, default=PrefetchConfig().refresh_s,
                    help="actor run: prefetch.refresh_s, how often the actor polls the sinks' snapshots")
    ap.add_argument("--compute-calls", type=int, choices=(0, 1), default=1,
                    help="actor run with --inflight: 1: each layer step also makes the runtime's compute calls (one "
                         "per worker owning a routed expert, waited for), and the coordinator's orders ride with "
                         "them as in serving; 0: no compute calls")
    ap.add_argument("--orders-ride", type=int, default=int(PrefetchConfig().orders_ride),
                    help="actor run with --inflight: 1: the orders come back in the publish replies "
                         "(prefetch.orders_ride; the driver then sends them to the sinks), 0: the coordinator calls "
                         "each worker")
    ap.add_argument("--embedded", action="store_true", help="policies on the embedded model instead (see above)")
    ap.add_argument("--policies", default="on_demand,cross_layer,next_gate")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--publish-every", type=int, default=1, help="--embedded: MoE layers per routing batch")
    ap.add_argument("--lookahead-layers", type=int, default=2, help="--embedded: initial window")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if args.pin_coordinator is not None and (args.pin_coordinator not in cores or len(cores) < 2):
        ap.error(f"--pin-coordinator {args.pin_coordinator}: this process may run on cores {cores}; the coordinator "
                 f"needs one of them to itself and the rest of Ray at least one other")
    if not (math.isfinite(args.step_gap_ms) and args.step_gap_ms >= 0):
        ap.error(f"--step-gap-ms {args.step_gap_ms}: must be a finite number >= 0")
    if args.pin_coordinator is not None and (args.no_actor or args.embedded):
        ap.error(f"--pin-coordinator {args.pin_coordinator}: pins the actor run's coordinator, which "
                 f"{'--no-actor' if args.no_actor else '--embedded'} does not start")
    if not 1 <= args.runtimes <= args.requests:
        ap.error(f"--runtimes {args.runtimes}: must be between 1 and --requests ({args.requests})")
    if args.embedded:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        res = {"config": vars(args), **bench_embedded(args)}
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        return res
    tokens = args.steps // args.layers + 2
    routes = routing(args.layers, args.experts, args.top_k, args.requests, tokens)
    res = {"config": vars(args), **bench_planner(args, routes), **bench_step(args, routes)}
    if not args.no_actor:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        res.update(bench_actor(args, routes))
    print(f"coordinator decision time per layer step: L={args.layers} E={args.experts} W={args.workers} "
          f"k={args.top_k} requests={args.requests} window={args.window} policy={args.policy} "
          f"planner_engine={args.planner_engine}")
    print(f"{'what':<32}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'n':>8}")
    for k in ("planner", "planner_cpu", "step", "step_cpu", "step_predictor", "step_excl_predictor", "step_scoring",
              "step_decision", "actor", "actor_decision", "actor_decision_cpu", "actor_decision_excl_predictor",
              "actor_submit", "actor_scoring"):
        if k in res:
            r = res[k]
            print(f"{k:<32}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}{r['mean_ms']:>10.3f}{r['n']:>8}")
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
