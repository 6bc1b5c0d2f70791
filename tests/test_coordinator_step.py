"""The PrefetchCoordinator's step in process, without Ray (its worker and storage handles are recorders): orders
held behind an outstanding call keep the later word on each key, telemetry scores a request's predictions once per
position, registrations that never route stay bounded, tiers named otherwise than their kinds are planned, and
requests whose end never arrives are forgotten."""
import asyncio

import numpy as np
import pytest

from actors.prefetch_coordinator import MAX_LIVE_REQUESTS, PrefetchCoordinator
from cluster.config import PrefetchConfig
from jobs.bench_coordinator import _Handle   # an actor handle whose every `.remote` does nothing
from policies.predictors import Candidates

L, E, K = 4, 8, 1


class _Prefetch:
    """A worker's `prefetch` whose calls stay outstanding until the test acknowledges them."""
    def __init__(self):
        self.calls, self.futs = [], []

    def remote(self, items, cancel, keep):
        self.calls.append(([(i[0], i[1]) for i in items], [tuple(c) for c in cancel or []]))
        f = asyncio.get_running_loop().create_future()
        self.futs.append(f)
        return f


class _Worker(_Handle):
    def __init__(self):
        self.prefetch = _Prefetch()


class _Scripted:
    """A predictor that predicts, after each event at layer l, the (layer, expert) the test scripted for l."""
    def __init__(self, script):
        self.script, self.last = script, None

    def observe(self, ev):
        self.last = ev.layer

    def predict(self, request, horizon):
        if self.last is None:
            return Candidates.empty()
        l, e = self.script[self.last]
        return Candidates(np.array([1]), np.array([l]), np.array([e]), np.array([0.9]))

    def end(self, request):
        pass

    def state_nbytes(self):
        return 0


def coordinator(workers, tier_set=("nvme",), tier_kinds=None, orders_out=False, **pf):
    geo = {"moe_layers": list(range(L)), "num_experts": E, "top_k": K, "nbytes": np.full((L, E), 1 << 20),
           "store_tiers": {"nvme": np.ones((L, E), bool)}, "tier_set": list(tier_set)}
    if tier_kinds is not None:
        geo["tier_kinds"] = tier_kinds
    cfg = dict(policy="cross_layer", lookahead_layers=1, lookahead_tokens=1, refresh_s=1e9, value_residents=False)
    cfg.update(pf)
    c = PrefetchCoordinator(PrefetchConfig(**cfg), geo, workers, {w: "n0" for w in workers},
                            np.zeros((L, E), np.int64), {"n0": [_Handle()]}, orders_out=orders_out)
    c.metrics = None
    c._polled = True
    c.budget[:] = 8 << 20
    c._maybe_poll = lambda: None
    return c


def event(layer, expert, pos=0, row=0):
    return {"layer": layer, "rows": np.array([row]), "pos": np.array([pos]), "ids": np.array([[expert]]),
            "w": np.ones((1, 1), np.float32), "hidden": None}


def test_an_order_cancelled_while_held_is_not_sent_and_a_reorder_lifts_its_cancel():
    w = _Worker()
    c = coordinator({0: w})
    c.predictor = _Scripted({0: (1, 3), 1: (2, 5), 2: (3, 6), 3: (2, 5)})

    async def run():
        await c.publish({"runtime": "a", "requests": ["r"], "layers": [event(0, 0)]})   # orders (1, 3): outstanding
        await c.publish({"runtime": "a", "requests": ["r"], "layers": [event(1, 0)]})   # (1, 3) refuted; (2, 5)
        await c.publish({"runtime": "a", "requests": ["r"], "layers": [event(2, 1)]})   # (2, 5) refuted; (3, 6)
        assert len(w.prefetch.calls) == 1
        w.prefetch.futs[0].set_result(1)
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(w.prefetch.calls) == 2
        items, cancel = w.prefetch.calls[1]
        assert items == [(3, 6)], items                 # (2, 5) was cancelled after it was held: never sent
        assert (2, 5) in cancel and (1, 3) in cancel
        # ordered again after a cancel that is still held: the order wins, the cancel does not travel
        await c.publish({"runtime": "a", "requests": ["r"], "layers": [event(3, 0)]})   # (3, 6) refuted; (2, 5)
        c._send(0, [(2, 5, 1.0, "r", [], None)], [])
        w.prefetch.futs[1].set_result(1)
        for _ in range(3):
            await asyncio.sleep(0)
        items, cancel = w.prefetch.calls[2]
        assert (2, 5) in items and (2, 5) not in cancel and (3, 6) in cancel, (items, cancel)

    asyncio.run(run())
    assert c.inflight[2, 5] and not c.inflight[3, 6]


def test_with_orders_out_the_same_orders_come_back_in_the_reply_and_no_worker_is_called():
    """prefetch.orders_ride: publish returns the step's orders ({worker id: (items, cancel, keep)}) for the runtime
    to carry with its compute calls; they are the prefetch calls the coordinator would have made (each
    acknowledged at once here, so that none is held), and no worker is called. The runtime merges replies as held
    orders are merged: a later cancel drops an earlier order of the key, a later order lifts its cancel."""
    from types import SimpleNamespace

    from cluster.expert_cluster import RoutePublisher
    script = {0: (1, 3), 1: (2, 5), 2: (3, 6), 3: (2, 5)}
    direct, out = _Worker(), _Worker()
    a, b = coordinator({0: direct}), coordinator({0: out}, orders_out=True)
    a.predictor, b.predictor = _Scripted(script), _Scripted(script)

    async def run():
        replies = []
        for layer, e in [(0, 0), (1, 0), (2, 1), (3, 0)]:
            batch = {"runtime": "a", "requests": ["r"], "layers": [event(layer, e)]}
            await a.publish(batch)
            for f in direct.prefetch.futs:
                if not f.done():
                    f.set_result(1)
            for _ in range(3):
                await asyncio.sleep(0)
            replies.append(await b.publish(batch))
        return replies

    replies = asyncio.run(run())
    assert out.prefetch.calls == [] and len(direct.prefetch.calls) == 4, direct.prefetch.calls
    got = [([(i[0], i[1]) for i in r[0][0]], [tuple(c) for c in r[0][1]]) for r in replies]
    assert got == direct.prefetch.calls and all(r[0][2] is None for r in replies), (got, direct.prefetch.calls)
    assert np.array_equal(a.inflight, b.inflight)
    pub = SimpleNamespace(experts=SimpleNamespace(coord_riders={}), coordinator_orders=0, _ended={},
                          _take_ended=lambda: None)
    for r in replies[:3]:   # (1, 3), then (2, 5) and (1, 3)'s cancel, then (3, 6) and (2, 5)'s cancel
        RoutePublisher._orders(pub, r)
    items, cancel, keep = pub.experts.coord_riders[0]
    assert [(i[0], i[1]) for i in items] == [(3, 6)] and {(1, 3), (2, 5)} <= set(cancel) and keep == []
    RoutePublisher._orders(pub, replies[3])   # (2, 5) ordered again: its cancel no longer travels
    items, cancel, _ = pub.experts.coord_riders[0]
    assert (2, 5) in [(i[0], i[1]) for i in items] and (2, 5) not in cancel and (3, 6) in cancel
    assert pub.coordinator_orders == 4   # every order that came back, cancelled later or not


def test_with_orders_out_a_snapshot_soon_after_an_order_does_not_count_it_landed():
    """A riding order reaches its worker only after the runtime takes the reply and calls the worker again: a
    snapshot taken within RIDE_MARGIN_STEPS of it, not listing it, must leave it in flight (else the coordinator
    would order it again, or free its bytes in its view). Without riding the next snapshot settles it."""
    from actors.prefetch_coordinator import RIDE_MARGIN_STEPS

    class _Snapshotting(_Handle):
        def __init__(self):
            def snap():
                f = asyncio.get_running_loop().create_future()
                f.set_result(([], [], 0, 8 << 20))       # nothing resident, nothing pending
                return f
            self.snapshot = type("M", (), {"remote": staticmethod(snap)})()

    def run(orders_out):
        c = coordinator({0: _Snapshotting()}, orders_out=orders_out)
        c.storage = {}                                      # no storage actor to poll
        c.predictor = _Scripted({l: (3, 6) for l in range(L)})
        seen = []

        async def go():
            await c.publish({"runtime": "a", "requests": ["r"], "layers": [event(0, 0)]})   # orders (3, 6)
            for pos in range(1, RIDE_MARGIN_STEPS + 2):
                await c.publish({"runtime": "a", "requests": ["r"], "layers": [event(0, 0, pos=pos)]})
                await c._poll()
                seen.append(bool(c.inflight[3, 6]))
        asyncio.run(go())
        return seen

    assert run(False)[0] is False       # settled by the first snapshot after it (then ordered again: it is wanted)
    assert run(True) == [True] * RIDE_MARGIN_STEPS + [False], run(True)


def test_the_runtime_takes_replies_in_order_and_drops_orders_of_ended_requests():
    """RouteOutbox hands replies over in call order (a later reply that finished first waits: its word must win),
    counts a failed call's layers as dropped and survives a reply that on_reply cannot take; RoutePublisher drops
    the coordinator's orders for a request that ended, both those waiting to ride and those that come back later,
    until the id is registered again."""
    from collections import OrderedDict, deque
    from concurrent.futures import Future
    from types import SimpleNamespace

    from cluster.expert_cluster import RouteOutbox, RoutePublisher

    futs, got = [], []

    class Ref:
        def __init__(self):
            self.f = Future()
            futs.append(self.f)

        def future(self):
            return self.f

    def on_reply(reply):
        if reply == "bad":
            raise ValueError("malformed")
        got.append(reply)

    ev = {"layer": 0, "rows": np.array([0])}
    box = RouteOutbox(lambda table, layers: Ref(), inflight=3, on_reply=on_reply)
    for _ in range(4):
        box.put(["r"], [ev, ev])          # 3 calls, the 4th flush held
    futs[1].set_result("second")
    box.poll()
    assert got == [] and box.outstanding == 2      # the first has not finished: nothing taken
    futs[0].set_result("bad")
    futs[2].set_exception(RuntimeError("coordinator died"))
    box.poll()
    assert got == ["second"] and box.bad_replies == 1 and box.dropped == 2 and box.outstanding == 0

    pub = SimpleNamespace(experts=SimpleNamespace(coord_riders={}), coordinator_orders=0, _ended=OrderedDict(),
                          _ended_new=deque())
    pub._take_ended = lambda: RoutePublisher._take_ended(pub)
    reply = {0: ([(1, 2, 3.0, "a", [], None), (1, 3, 3.0, "b", [], None)], [], None)}
    RoutePublisher._orders(pub, reply)
    RoutePublisher.ended(pub, ["a"])                # from another thread: taken at the next layer
    pub._take_ended()
    assert [it[3] for it in pub.experts.coord_riders[0][0]] == ["b"]
    RoutePublisher._orders(pub, {0: ([(2, 2, 3.0, "a", [], None)], [(5, 5)], None)})   # a late reply
    items, cancel, _ = pub.experts.coord_riders[0]
    assert [it[3] for it in items] == ["b"] and cancel == [(5, 5)]
    RoutePublisher.registered(pub, "a")             # the id reused by a new request
    RoutePublisher._orders(pub, {0: ([(2, 2, 3.0, "a", [], None)], [], None)})
    assert [it[3] for it in pub.experts.coord_riders[0][0]] == ["b", "a"]


def test_an_idle_requests_predictions_are_scored_once_per_position():
    c = coordinator({0: _Handle(), 1: _Handle()}, lookahead_layers=4, lookahead_tokens=2)
    c.owner[:] = np.tile(np.arange(E) % 2, (L, 1))
    c.budget = np.full(2, 4 << 20)
    rng = np.random.default_rng(0)

    def ev(layer, rows, pos):
        ids = rng.choice(E, (len(rows), 1))
        return {"layer": layer, "rows": np.asarray(rows), "pos": np.asarray(pos), "ids": ids,
                "w": np.ones(ids.shape, np.float32), "hidden": None}

    async def run():
        for t in range(3):
            for l in range(L):
                await c.publish({"runtime": "a", "requests": ["r0", "r1"], "layers": [ev(l, [0, 1], [t, t])]})
        pending = sum(len(v) for v in c.tel._pending["r1"].by_pos.values())
        assert pending > 0
        for t in range(3, 30):   # r1 stays live but idle (its end was lost); r0 decodes on
            for l in range(L):
                await c.publish({"runtime": "a", "requests": ["r0"], "layers": [ev(l, [0], [t])]})
        assert sum(len(v) for v in c.tel._pending["r1"].by_pos.values()) == pending
        before = c.tel.recall_n.copy()
        await c.publish({"runtime": "a", "requests": ["r1"], "layers": [ev(0, [0], [3])]})
        # one event of r1 scores one prediction per distance that reached its position, not one per idle step
        assert (c.tel.recall_n - before).max() <= 1, c.tel.recall_n - before

    asyncio.run(run())


def test_registrations_that_never_route_stay_bounded_and_live_requests_keep_their_rules():
    c = coordinator({0: _Handle()}, tier_set=("dram", "nvme"),
                    tenants={"ok": {"tiers": ["dram", "nvme"]}, "narrow": {"tiers": ["nvme"]}})

    async def run():
        await c.register_request("live", "narrow", ["nvme"])
        await c.publish({"runtime": "a", "requests": ["live"], "layers": [event(0, 1)]})
        for i in range(3 * MAX_LIVE_REQUESTS):   # refused by the engine before they ever ran, ends never sent
            await c.register_request(f"cmpl-{i}", "ok")

    asyncio.run(run())
    assert len(c.meta) <= 2 * MAX_LIVE_REQUESTS
    assert c.meta["live"] == (["nvme"], "narrow", None)        # the live request's TierSet and tenant stay
    assert f"cmpl-{3 * MAX_LIVE_REQUESTS - 1}" in c.meta       # the newest registrations stay


def test_tiers_named_otherwise_than_their_kinds_are_planned():
    w = _Worker()
    c = coordinator({0: w}, tier_set=("ram", "local-nvme"), tier_kinds={"ram": "dram", "local-nvme": "nvme"})
    c.predictor = _Scripted({0: (1, 3)})

    async def run():
        await c.publish({"runtime": "a", "requests": ["r"], "layers": [event(0, 0)]})

    asyncio.run(run())
    assert w.prefetch.calls and w.prefetch.calls[0][0] == [(1, 3)]


class _Cancels:
    def __init__(self):
        self.requests = []

    def remote(self, requests=None, items=None, **kw):
        self.requests += list(requests or [])


def test_requests_whose_end_never_arrives_are_forgotten_after_their_runtime_moves_on_without_them():
    w = _Worker()
    w.cancel = _Cancels()
    c = coordinator({0: w}, request_idle_batches=8)
    ended = []
    c.predictor.end = ended.append

    async def batch(rt, reqs):
        await c.publish({"runtime": rt, "requests": reqs, "layers": [event(0, 1, row=i) for i in range(len(reqs))]})

    async def run():
        await c.register_request("lost", "t")
        await batch("a", ["r", "lost"])   # runtime a: batch 1, step 1
        await batch("b", ["crash"])       # runtime b: its only batch, step 2 (then it crashes)
        for _ in range(8):                # a's batches 2..9: "lost" missed 8 of them, the limit
            await batch("a", ["r"])
        c._expire_idle()
        assert set(c.requests) == {"r", "lost", "crash"}
        await batch("a", ["r"])           # a's batch 10: 9 missed
        c._expire_idle()
        assert set(c.requests) == {"r", "crash"}, c.requests
        assert "lost" in w.cancel.requests and "lost" in ended    # its queued orders cancelled, its state ended
        assert c.meta["lost"][1] == "t"                           # its rules stay should it route again
        while c.step < 18:               # b silent for 16 steps (8 batches x 2 runtimes heard of): not yet
            await batch("a", ["r"])
        c._expire_idle()
        assert "crash" in c.requests
        await batch("a", ["r"])           # 17 steps
        c._expire_idle()
        assert set(c.requests) == {"r"}
        await batch("a", ["r", "lost"])   # it routes again: tracked afresh
        assert set(c.requests) == {"r", "lost"}
        return await c.stats()

    st = asyncio.run(run())
    assert st["expired_requests"] == 2 and st["live_requests"] == 2, st


class _RecordingCache:
    """A worker's 25% cache (jobs.bench_coordinator's sink: victims out, then the oldest) whose prefetch calls are
    recorded: (orders (layer, expert, request, victims), their priorities, cancellations)."""
    def __init__(self, cap):
        from jobs.bench_coordinator import _SinkCache
        self.sink, self.calls = _SinkCache(cap, 1 << 20), []

    def prefetch(self, items, cancel=None, keep=None):
        self.calls.append(([(i[0], i[1], i[3], tuple(map(tuple, i[4]))) for i in items], [i[2] for i in items],
                           sorted(map(tuple, cancel or []))))
        self.sink.prefetch(items, cancel, keep)

    def snapshot(self):
        return self.sink.snapshot()


def test_a_decode_steps_rows_handled_at_once_decide_as_row_by_row():
    """A decode step's rows go to the predictor and the telemetry at once (observe_many, predict_many,
    record_truth_many) and the scoring waits until the orders are out: the orders, their victims, cancellations
    and the telemetry are those of the row-by-row calls, over requests that drift apart, skip steps (gaps), end,
    join, and one that prefills (its rows twice in an event: the row-by-row path)."""
    from policies.predictors import CrossLayerTransition, Predictor
    from policies.telemetry import Telemetry

    class RowByRow(CrossLayerTransition):
        observe_many = Predictor.observe_many
        predict_many = Predictor.predict_many

    class RowByRowTelemetry(Telemetry):
        def record_truth_many(self, requests, pos, experts, resident):
            for r, q, x, z in zip(requests, pos, experts, resident):
                self.record_truth(r, int(q), x, z)

    from jobs.bench_coordinator import _InProcessStorage, _InProcessWorker

    def make(row_by_row):
        caches = [_RecordingCache(4), _RecordingCache(4)]          # 8 of the 32 experts
        ws = {0: _InProcessWorker(caches[0]), 1: _InProcessWorker(caches[1])}
        geo = {"moe_layers": list(range(L)), "num_experts": E, "top_k": K, "nbytes": np.full((L, E), 1 << 20),
               "store_tiers": {"nvme": np.ones((L, E), bool)}, "tier_set": ["nvme"]}
        # a window of one layer, kept (adapt_every past the run): the batched and the row-by-row predictions are
        # then equal to the bit (a hop's matrix product may round differently, and an exact tie of two orders'
        # priorities flipped by 1e-16 would send them in the other order: tests/test_predictors.py compares hops)
        pf = PrefetchConfig(policy="cross_layer", lookahead_layers=1, lookahead_tokens=1, refresh_s=1e-9,
                            threshold=0.05, adapt_every=10_000)
        c = PrefetchCoordinator(pf, geo, ws, {0: "n0", 1: "n0"}, np.tile(np.arange(E) % 2, (L, 1)),
                                {"n0": [_InProcessStorage()]})
        c.metrics = None
        if row_by_row:
            c.batched = False   # the coordinator's row-by-row path, as it was before the batched one
            c.predictor = RowByRow(L, E, K)
            tel = RowByRowTelemetry(L, E, K, max_distance=c.tel.D, expiry=c.tel.expiry)
            c.tel = tel
        return c, caches

    rng = np.random.default_rng(7)
    script = []
    first = {"r0": 0, "r1": 2, "r2": 5, "r3": 1}
    for step in range(160):
        layer = step % L
        live = [r for r in ("r0", "r1", "r2", "r3") if (r != "r2" or step < 90) and (r != "r3" or step >= 40)]
        rows = [r for r in live if rng.random() < 0.9]
        toks = [first[r] + step // L for r in rows]
        if step == 120:
            rows, toks = rows + [rows[0]], toks + [toks[0] + 1]   # a prefill row: the row-by-row path
        script.append((layer, rows, toks, rng.integers(0, E, (len(rows), K)), step == 90))
    out = []
    for row_by_row in (False, True):
        c, ws = make(row_by_row)

        async def run():
            held = []   # every 10th batch carries two layers (publish_every_layers 2); 119 + 120: then a prefill
            for step, (layer, rows, toks, ids, end_r2) in enumerate(script):
                if end_r2:
                    await c.end_request(["r2"])
                if rows:   # one table of rows per batch: the union of its events' requests
                    held.append((layer, rows, toks, ids))
                if step % 10 == 9 or not held:
                    continue
                table = sorted({r for _, rs, _, _ in held for r in rs})
                await c.publish({"runtime": "a", "requests": table, "layers": [
                    {"layer": l, "rows": np.array([table.index(r) for r in rs]), "pos": np.array(ts), "ids": x,
                     "w": np.ones(x.shape, np.float32), "hidden": None} for l, rs, ts, x in held]})
                held = []
                for _ in range(3):          # the orders land and the poll reads the caches between steps
                    await asyncio.sleep(0)
            return await c.stats()

        out.append((asyncio.run(run()), [w.calls for w in ws]))
    (fast, fast_calls), (slow, slow_calls) = out
    n_orders = sum(len(items) for calls in slow_calls for items, _, _ in calls)
    assert n_orders > 40, f"only {n_orders} orders: the comparison says little"
    for a, b in zip(fast_calls, slow_calls):
        assert [(items, cancel) for items, _, cancel in a] == [(items, cancel) for items, _, cancel in b]
        np.testing.assert_allclose(np.concatenate([p for _, p, _ in a]), np.concatenate([p for _, p, _ in b]),
                                   rtol=1e-9)
    for key in ("recall_at_k", "precision_by_distance"):
        assert fast[key].keys() == slow[key].keys() and fast[key], key
        for d in fast[key]:
            assert fast[key][d] == pytest.approx(slow[key][d], rel=1e-9), (key, d)
    assert fast["timely_recall"] == pytest.approx(slow["timely_recall"], rel=1e-12)
    assert fast["prefetches"] == slow["prefetches"]
    assert 0 < fast["decision_ms_p50"] <= fast["step_ms_p50"]


def test_the_benchmarks_runtimes_route_layers_apart_and_its_step_plans_against_full_caches():
    """jobs.bench_coordinator: with --runtimes 2 each runtime's requests route L / 2 layers apart, token after token;
    its in-process step fills the 25% caches (its own assert) and reports the decision within the step."""
    from types import SimpleNamespace

    from jobs.bench_coordinator import batches, bench_step, routing
    args = SimpleNamespace(layers=4, experts=16, workers=2, top_k=2, requests=4, window=2, steps=300, warmup=20,
                           policy="cross_layer", runtimes=2)
    routes = routing(4, 16, 2, 4, 300 // 4 + 2)
    seen = {}
    for n, b in enumerate(batches(args, routes)):
        (ev,) = b["layers"]
        assert b["requests"] == (["r0", "r2"] if b["runtime"] == "bench0" else ["r1", "r3"]), b
        want = seen.get(b["runtime"], (-1, 3))          # the runtime's next position after its last one
        want = (want[0] + (want[1] == 3), (want[1] + 1) % 4)
        assert (int(ev["pos"][0]), ev["layer"]) == want, (b["runtime"], ev["pos"], ev["layer"], want)
        assert np.array_equal(ev["ids"], routes[want[0], want[1], [0, 2] if b["runtime"] == "bench0" else [1, 3]])
        seen[b["runtime"]] = want
        if b["runtime"] == "bench1":   # both have routed this step: runtime 1 is 2 layers behind
            assert (seen["bench0"][0] * 4 + seen["bench0"][1]) - (want[0] * 4 + want[1]) == 2, seen
        if n == 60:
            break
    res = bench_step(args, routes)
    assert res["step"]["n"] == 280 and 0 < res["step_decision"]["p50_ms"] <= res["step"]["p50_ms"], res


def test_a_registration_that_runs_after_its_end_is_dropped_and_a_reused_id_keeps_its_new_rules():
    """Ray runs an async actor's calls out of order: a request the engine refused right after registering it can
    have its end_request run first. The caller numbers both calls; a registration numbered below the end is
    stale (it would never be ended), while a later registration of the same id (a reused id) survives the old
    end arriving late."""
    c = coordinator({0: _Handle()}, tier_set=("dram", "nvme"), tenants={"ok": {"tiers": ["dram", "nvme"]}})

    async def run():
        await c.end_request(["refused"], seq=2)                 # the end ran first
        await c.register_request("refused", "ok", seq=1)        # then its registration: stale
        await c.register_request("reused", "ok", ["nvme"], seq=5)
        await c.end_request(["reused"], seq=3)                  # the previous request of that id ends late
        await c.register_request("plain", "ok", seq=6)
        await c.end_request(["plain"], seq=7)                   # in order: forgotten as before
        await c.register_request("unnumbered", "ok")            # callers that do not number: as before
        await c.end_request(["unnumbered"])

    asyncio.run(run())
    assert "refused" not in c.meta and "plain" not in c.meta and "unnumbered" not in c.meta, c.meta
    assert c.meta["reused"] == (["nvme"], "ok", None), c.meta
    assert len(c.meta) == 1 and len(c._meta_seq) == 1, (c.meta, c._meta_seq)


def test_register_and_end_calls_refused_by_a_lagging_coordinator_wait_and_go_with_the_next_one():
    """The coordinator's pending-calls cap (shared with the routing batches) makes `.remote()` raise while it lags.
    A refused register / end call used to be dropped: an end lost leaks its registration, a registration lost
    leaves the request planned with the default TierSet. Now it waits in the cluster and goes, numbered, before
    the next call; the coordinator then sorts them out by number (the test above)."""
    from types import SimpleNamespace

    from cluster.config import ClusterConfig
    from cluster.expert_cluster import CONTROL_BACKLOG, ExpertCluster

    class Lagging:
        def __init__(self):
            self.refuse, self.got = 0, []

        def __getattr__(self, method):
            outer = self

            class M:
                def remote(self, *a, seq=None):
                    if outer.refuse:
                        outer.refuse -= 1
                        raise RuntimeError("PendingCallsLimitExceeded")
                    outer.got.append((method, a[0], seq))
            return M()

    c = ExpertCluster(ClusterConfig.model_validate({"tiers": [{"kind": "nvme", "path": "/nonexistent"}]}))
    c.coordinator = lag = Lagging()
    c.publisher = SimpleNamespace(rules={}, denied=set(), drain=lambda: None, ended=lambda ids: None,
                                  registered=lambda r: None)
    lag.refuse = 2
    c.register_request("a", "t")            # refused: waits
    assert c.publisher.rules == {"a": (None, "t", None, 0)}   # its rules ride on its routing batches meanwhile
    c.end_requests(["a"])                   # refused: waits
    assert c.publisher.rules == {}
    c.register_request("b", "t")            # goes, after the two waiting ones, in their order
    assert lag.got == [("register_request", "a", 0), ("end_request", ["a"], 1), ("register_request", "b", 2)]
    assert len(c._coord_backlog) == 0 and c.control_calls_dropped == 0
    lag.refuse = 10 ** 9                    # a coordinator that is gone: the backlog stays bounded
    for i in range(CONTROL_BACKLOG + 5):
        c.end_requests([f"x{i}"])
    assert len(c._coord_backlog) == CONTROL_BACKLOG and c.control_calls_dropped == 5
    for i in range(CONTROL_BACKLOG + 3):    # registered, never ended: the rules kept for batches stay bounded
        c.register_request(f"y{i}", "t")
    assert len(c.publisher.rules) == CONTROL_BACKLOG and f"y{CONTROL_BACKLOG + 2}" in c.publisher.rules


def test_a_routing_batch_that_runs_before_its_registration_is_planned_under_the_requests_rules():
    """The rules of a registered request ride on its routing batches: a batch Ray runs before the register call
    sent ahead of it is planned under them (a tenant refused there gets no order), and a batch of a request that
    already ended does not bring its rules back."""
    w = _Worker()
    c = coordinator({0: w}, tier_set=("nvme",), tenants={"ok": {"tiers": ["nvme"]}})
    c.predictor = _Scripted({0: (1, 3)})

    async def evil():
        await c.publish({"runtime": "a", "requests": ["evil"], "layers": [event(0, 0)],
                         "rules": {"evil": (None, "mallory", None, 4)}})

    async def gone():
        await c.end_request(["gone"], seq=9)
        await c.publish({"runtime": "a", "requests": ["gone"], "layers": [event(0, 0, pos=1)],
                         "rules": {"gone": (None, "ok", None, 8)}})

    asyncio.run(evil())
    assert c.meta["evil"] == (["nvme"], "mallory", None) and "mallory" in c.denied["evil"], c.denied
    assert w.prefetch.calls == [], "a refused tenant's request got a prefetch"
    asyncio.run(gone())
    assert "gone" not in c.meta


def test_the_publisher_sends_a_registered_requests_rules_with_its_routing():
    from types import SimpleNamespace

    from cluster.expert_cluster import RoutePublisher
    got = []
    pub = SimpleNamespace(experts=SimpleNamespace(counters={"bytes_by_tier": {}, "miss_causes": {}}), runtime="rt",
                          dropped=0, speculated=0, superseded=0, refuted=0, sent=0, speculator=None, seq=None,
                          rules={"a": (["nvme"], "t", None, 3), "z": (None, "u", 1.0, 4)},
                          coordinator=SimpleNamespace(publish=SimpleNamespace(remote=got.append)))
    RoutePublisher._call(pub, ["a", "b"], [{"layer": 0}])
    RoutePublisher._call(pub, ["a"], None)          # counters only: nothing to plan, no rules
    assert got[0]["rules"] == {"a": (["nvme"], "t", None, 3)} and "rules" not in got[1]


def test_a_worker_applies_the_coordinators_riding_orders_before_the_fast_paths():
    """Both ride with one compute call: the fast path's come from the routing of this very layer, the coordinator's
    from a reply to an earlier batch. Applied first, a stale coordinator cancel cannot undo a fresher fast-path
    order of the same expert (the fast path's own cancels never touch the coordinator's orders)."""
    from types import SimpleNamespace

    from actors.expert_worker import ExpertWorker
    calls = []
    w = SimpleNamespace(prefetch=lambda items, cancel=None, keep=None: calls.append(("prefetch", items, cancel)),
                        cancel=lambda items=None, fast_path=False: calls.append(("cancel", items, fast_path)))
    ExpertWorker._riders(w, [(1, 3, 16.0, None, None, None)], [(2, 4)], None,
                         ([(2, 5, 1.0, "r", [], None)], [(1, 3)], None))
    assert calls == [("prefetch", [(2, 5, 1.0, "r", [], None)], [(1, 3)]), ("cancel", [(2, 4)], True),
                     ("prefetch", [(1, 3, 16.0, None, None, None)], None)], calls


def test_routing_numbered_before_its_requests_end_but_run_after_it_is_skipped():
    """The runtime numbers its routing calls in the sequence of its register / end calls. Ray may run a request's
    last routing after its end: the coordinator skips those rows (the request stays ended instead of living on
    until it idles out), still counts the experts they used as resident, and takes the id's routing numbered
    after the end (a reused id). Unnumbered routing is taken as before."""
    w = _Worker()
    c = coordinator({0: w})
    c.predictor = _Scripted({l: (3, 6) for l in range(L)})

    def batch(seq, reqs, e=0, pos=0):
        ev = {"layer": 0, "rows": np.arange(len(reqs)), "pos": np.full(len(reqs), pos),
              "ids": np.full((len(reqs), 1), e), "w": np.ones((len(reqs), 1), np.float32), "hidden": None}
        out = {"runtime": "a", "requests": list(reqs), "layers": [ev]}
        if seq is not None:
            out["seq"] = seq
        return out

    async def run():
        await c.end_request(["a"], seq=5)
        await c.publish(batch(4, ["a", "b"], e=2))     # sent before a's end: a's row skipped, b's taken
        assert "a" not in c.requests and "b" in c.requests and c.late_routing == 1
        assert c.resident[:, 0, 2].any()                 # the layer did compute expert 2
        await c.publish(batch(3, ["a"], e=4))            # nothing but a's stale row
        assert "a" not in c.requests and c.late_routing == 2 and c.resident[:, 0, 4].any()
        await c.publish(batch(7, ["a"], pos=1))          # numbered after the end: the id is in use again
        assert "a" in c.requests
        await c.end_request(["a"], seq=8)
        await c.publish(batch(None, ["a"], pos=2))       # unnumbered: taken
        assert "a" in c.requests and c.late_routing == 2

    asyncio.run(run())


def test_the_publisher_numbers_its_routing_calls():
    from types import SimpleNamespace

    from cluster.expert_cluster import RoutePublisher
    got, n = [], iter(range(10, 20))
    pub = SimpleNamespace(experts=SimpleNamespace(counters={"bytes_by_tier": {}, "miss_causes": {}}), runtime="rt",
                          dropped=0, speculated=0, superseded=0, refuted=0, rules={}, seq=lambda: next(n),
                          coordinator=SimpleNamespace(publish=SimpleNamespace(remote=got.append)))
    RoutePublisher._call(pub, ["a"], [{"layer": 0}])
    RoutePublisher._call(pub, ["a"], None)           # counters only: no number taken
    RoutePublisher._call(pub, ["a"], [{"layer": 1}])
    assert [b.get("seq") for b in got] == [10, None, 11]


def test_the_view_follows_a_re_placement_and_storage_only_nodes():
    """view() gathers each expert's copy at its owner (HBM) and at its owner's node (DRAM) with flat indexes made
    when the workers are set: after a re-placement that moves experts and nodes, with a storage-only node among
    the nodes, it equals the direct fancy index."""
    rng = np.random.default_rng(2)
    c = coordinator({0: _Worker(), 1: _Worker()})

    def check():
        ll, ee = np.meshgrid(np.arange(L), np.arange(E), indexing="ij")
        c.resident[:] = rng.random(c.resident.shape) < 0.4
        c.dram[:] = rng.random(c.dram.shape) < 0.4
        v = c.view()
        assert np.array_equal(v.present[0], c.resident[c.owner, ll, ee])
        assert np.array_equal(v.present[2], c.dram[c.node_of[c.owner], ll, ee])
        return v

    check()
    c.storage = {"n0": [_Handle()], "a-storage-only": [_Handle()], "z-storage-only": [_Handle()]}
    owners = np.where(rng.random((L, E)) < 0.5, 2, 1)
    c._set_workers({1: _Worker(), 2: _Worker()}, {1: "z-storage-only", 2: "n9"}, owners)
    assert c.nodes == ["a-storage-only", "n0", "n9", "z-storage-only"] and c.node_of.tolist() == [3, 2]
    v = check()
    assert v.present[0].any() and v.present[2].any()
