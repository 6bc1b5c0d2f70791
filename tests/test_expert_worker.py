"""ExpertWorker on a real single-node Ray: exact expert outputs, the HBM budget after every step, eviction and
pins, prefetch (priority, never blocking compute, cancel), and bad budgets."""
import os
import time

import numpy as np
import pytest
import ray
import torch
from safetensors.numpy import load_file

from conftest import expert_reference, tiny_store
from actors.expert_worker import (ExpertWorker, pack_call, pack_orders, pack_rows, unpack_call, unpack_orders,
                                  unpack_reply, unpack_rows)
from cluster.config import ClusterConfig
from cluster.storage_tier import start_storage_actors
from storage_adapters.local_s3 import ShapingProxy

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def env(tmp_path_factory, moto_server, s3_bucket):
    root = tmp_path_factory.mktemp("ew")
    ckpt, man = tiny_store(root, f"file://{root}/nvme", f"s3://{s3_bucket}/expert-worker",
                           endpoint_url=moto_server.endpoint_url)
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="test-ew", object_store_memory=256 << 20,
             logging_level="ERROR", runtime_env={"env_vars": {k: os.environ[k] for k in
                                                              ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                               "NO_PROXY")}})
    weights = load_file(os.path.join(ckpt, "model.safetensors"))
    yield {"root": root, "manifest": man, "weights": weights}
    ray.shutdown()


def storage(env, name, tiers=("dram", "nvme"), overrides=None):
    cfg = ClusterConfig.model_validate({
        "ray": {"namespace": f"test-ew-{name}"},
        "tiers": [{"kind": "dram", "budget_bytes": 1 << 30}, {"kind": "nvme", "path": str(env["root"] / "nvme")},
                  {"kind": "s3", "uri": "s3://experts/expert-worker"}],
        "tier_sets": {"default": list(tiers)}})
    return start_storage_actors(cfg, overrides)


def worker(env, name, budget_blobs, policy="lru", **kw):
    man = env["manifest"]
    W = ray.remote(ExpertWorker)
    return W.options(max_concurrency=16).remote(0, man.to_json(), budget_blobs * man.expert_bytes,
                                                 kw.pop("storage_by_node", None) or storage(env, name),
                                                 policy=policy, **kw)


def as_tensor(y):
    """Results arrive read-only (zero-copy from Ray); copy before handing them to torch."""
    return torch.from_numpy(np.array(y))


def reference(env, layer, expert, x):
    return expert_reference(env["weights"], layer, expert, x)


def test_compute_exact_and_budget_after_every_step(env):
    man = env["manifest"]
    w = worker(env, "exact", budget_blobs=3)
    rng = np.random.default_rng(0)
    H = man.model.hidden_size
    for step in range(6):
        layer = step % 2
        experts = [int(e) for e in rng.choice(4, size=3, replace=False)]
        counts = [int(c) for c in rng.integers(1, 5, size=3)]
        x = rng.standard_normal((sum(counts), H)).astype(np.float32)
        y = ray.get(w.compute.remote(layer, experts, counts, x))
        start = 0
        for e, n in zip(experts, counts):
            assert torch.equal(as_tensor(y[start:start + n]), reference(env, layer, e, x[start:start + n]))
            start += n
        st = ray.get(w.stats.remote())
        assert st["used_bytes"] <= st["budget_bytes"] == 3 * man.expert_bytes
        assert st["device_resident_bytes"] == st["used_bytes"], "the index's charge differs from the tensors held"
        assert st["resident"] <= 3 and st["device_allocated_bytes"] is None and st["pinned_staging_bytes"] == 0
    st = ray.get(w.stats.remote())
    assert st["misses"] == st["loads"] and st["evictions"] > 0 and st["hits"] + st["misses"] == 18


def test_prefetch_loads_in_priority_order_and_turns_misses_into_hits(env):
    w = worker(env, "prefetch", budget_blobs=8, prefetch_concurrency=1)
    items = [(1, e, float(e), "req-a") for e in range(4)]  # expert 3 has the highest priority
    assert ray.get(w.prefetch.remote(items)) == 4
    deadline = time.time() + 10
    while ray.get(w.stats.remote())["prefetch_loads"] < 4 and time.time() < deadline:
        time.sleep(0.02)
    assert [tuple(k) for k in ray.get(w.resident.remote())] == [(1, 3), (1, 2), (1, 1), (1, 0)]
    x = np.ones((2, env["manifest"].model.hidden_size), np.float32)
    ray.get(w.compute.remote(1, [0, 3], [1, 1], x))
    st = ray.get(w.stats.remote())
    assert st["hits"] == 2 and st["misses"] == 0 and st["prefetch_hits"] == 2


def test_prefetch_never_blocks_compute_and_cancel_drops_queue(env, moto_server):
    # slow tier: every S3 GET waits 0.4 s before its first byte; prefetches queue behind it
    with ShapingProxy(moto_server.endpoint_url, bandwidth_bps=None, first_byte_latency_s=0.4) as proxy:
        sbn = storage(env, "slow", tiers=("dram", "s3"), overrides={"s3": proxy.endpoint_url})
        w = worker(env, "slow", budget_blobs=8, storage_by_node=sbn, prefetch_concurrency=1)
        x = np.ones((1, env["manifest"].model.hidden_size), np.float32)
        ray.get(w.compute.remote(0, [0], [1], x))  # resident now
        assert ray.get(w.prefetch.remote([(1, e, 1.0, "req-b") for e in range(4)])) == 4
        t0 = time.perf_counter()
        ray.get(w.compute.remote(0, [0], [1], x))
        assert time.perf_counter() - t0 < 0.3, "a compute of a resident expert waited on prefetches"
        dropped = ray.get(w.cancel.remote("req-b"))
        assert dropped >= 2  # one may already be loading; the rest were still queued
        time.sleep(0.6)
        st = ray.get(w.stats.remote())
        assert st["queued_prefetches"] == 0 and st["prefetch_loads"] <= 2 and st["cancelled"] == dropped


def test_concurrent_computes_never_evict_pinned_and_stay_in_budget(env):
    w = worker(env, "pins", budget_blobs=2)
    H = env["manifest"].model.hidden_size
    rng = np.random.default_rng(1)
    calls, inputs = [], []
    for i in range(12):
        experts = [int(e) for e in rng.choice(4, size=2, replace=False)]
        x = rng.standard_normal((2, H)).astype(np.float32)
        inputs.append((i % 2, experts, x))
        calls.append(w.compute.remote(i % 2, experts, [1, 1], x))
    outs = ray.get(calls)
    for (layer, experts, x), y in zip(inputs, outs):
        for j, e in enumerate(experts):
            assert torch.equal(as_tensor(y[j:j + 1]), reference(env, layer, e, x[j:j + 1]))
    st = ray.get(w.stats.remote())
    assert st["used_bytes"] <= st["budget_bytes"] and st["peak_used_bytes"] <= st["budget_bytes"]


@pytest.mark.parametrize("policy", ["lfu", "slru", "prefetch_aware"])
def test_other_policies_run_exact(env, policy):
    w = worker(env, f"pol-{policy}", budget_blobs=2, policy=policy)
    x = np.full((1, env["manifest"].model.hidden_size), 0.5, np.float32)
    for e in (0, 1, 0, 2, 0, 3):
        y = ray.get(w.compute.remote(0, [e], [1], x))
        assert torch.equal(as_tensor(y), reference(env, 0, e, x))
    st = ray.get(w.stats.remote())
    assert st["policy"] == policy and st["used_bytes"] <= st["budget_bytes"]


def test_budget_smaller_than_one_expert_is_a_clear_error(env):
    man = env["manifest"]
    W = ray.remote(ExpertWorker)
    w = W.remote(0, man.to_json(), man.expert_bytes - 1, storage(env, "small"))
    with pytest.raises(ray.exceptions.RayActorError, match="smaller than one expert"):
        ray.get(w.ping.remote())


def _check_exact(env, y, layer, experts, counts, x):
    start = 0
    for e, n in zip(experts, counts):
        assert torch.equal(as_tensor(y[start:start + n]), reference(env, layer, e, x[start:start + n]))
        start += n


@pytest.mark.parametrize("cpu_wins", [True, False])
def test_cost_model_computes_misses_on_cpu_or_waits_from_configured_rates(env, cpu_wins):
    """Configured rates decide: a slow link and a fast host -> misses are computed from the DRAM tier in place
    (nothing cached); a fast link -> they wait for the load into the cache, as without a cost model."""
    rates = (dict(link_Bps=1e3, link_latency_s=0.0, device_flops=1e12, cpu_flops=1e12) if cpu_wins else
             dict(link_Bps=1e15, link_latency_s=0.0, device_flops=1e12, cpu_flops=1e6))
    w = worker(env, f"cost-{cpu_wins}", budget_blobs=4, miss_rates=rates)
    x = np.random.default_rng(1).standard_normal((3, env["manifest"].model.hidden_size)).astype(np.float32)
    y, (hits, misses, phits, stall, tier_bytes, why) = ray.get(w.compute.remote(0, [1, 2], [2, 1], x, True))
    _check_exact(env, y, 0, [1, 2], [2, 1], x)
    st = ray.get(w.stats.remote())
    assert (hits, misses) == (0, 2) and stall >= 0 and why == {"not_ordered": 2}
    if cpu_wins:
        assert st["cpu_computes"] == 2 and st["used_bytes"] == 0 and st["loads"] == 0
    else:
        assert st["cpu_computes"] == 0 and st["resident"] == 2 and st["loads"] == 2
        assert sum(tier_bytes.values()) == 2 * env["manifest"].expert_bytes   # the reply says what was loaded
    # the runtime's one-argument form (decode-sized rows travel as bytes): same rows, the same counters flat
    y2, hits2, misses2, _, stall2, tb2, _ = ray.get(w.compute_call.remote((0, [1, 2], [2, 1], pack_rows(x), None)))
    assert isinstance(y2, bytes)
    _check_exact(env, unpack_rows(y2, 3), 0, [1, 2], [2, 1], x)
    assert (hits2, misses2) == ((0, 2) if cpu_wins else (2, 0)) and stall2 >= 0
    assert cpu_wins or tb2 == {}   # both resident now: nothing loaded for this call
    # the decode path's bytes-in/bytes-out form: identical rows and counters
    r = ray.get(w.compute_packed.remote(pack_call(0, [1, 2], [2, 1], x)))
    y3, hits3, misses3, _, stall3, tb3, why3 = unpack_reply(r, 3)
    _check_exact(env, y3, 0, [1, 2], [2, 1], x)
    assert (hits3, misses3) == (hits2, misses2) and stall3 >= 0
    assert cpu_wins or (isinstance(r, bytes) and tb3 == why3 == {})   # no miss: the reply is one bytes object


def test_pack_call_round_trips_exactly():
    x = np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32)
    b = pack_call(7, np.array([3, 11]), np.array([2, 3]), x)
    layer, experts, counts, x2 = unpack_call(b)
    assert (layer, experts, counts) == (7, [3, 11], [2, 3]) and np.array_equal(x2, x)
    assert unpack_orders(b) == ([], [], {})
    # fast-path orders (and cancellations) riding behind the call: the call reads the same, the orders come back as
    # prefetch items, the cancellations as cancel items
    rode = b + pack_orders([(9, 4, 15.5, None, None, None), (9, 12, 14.25, None, None, None)], [(13, 2)])
    layer, experts, counts, x3 = unpack_call(rode)
    assert (layer, experts, counts) == (7, [3, 11], [2, 3]) and np.array_equal(x3, x)
    assert unpack_orders(rode) == ([(9, 4, 15.5, None), (9, 12, 14.25, None)], [(13, 2)], {})
    assert unpack_orders(b + pack_orders([], [(1, 5), (3, 0)])) == ([], [(1, 5), (3, 0)], {})
    # the fast path's eviction values ride the same way (float32: values exact in binary round-trip exactly)
    vals = {(9, 4): 0.75, (9, 5): 0.0, (13, 1): 0.125}
    assert unpack_orders(b + pack_orders([(9, 4, 15.5, None)], [(13, 2)], vals)) == \
        ([(9, 4, 15.5, None)], [(13, 2)], vals)
    assert unpack_orders(b + pack_orders([], [], vals)) == ([], [], vals)
    y = x * 2
    reply = np.array([2, 1, 1, 0.25], "<f8").tobytes() + y.tobytes()
    yy, hits, misses, phits, stall, tb, why = unpack_reply(reply, 5)
    assert np.array_equal(yy, y) and (hits, misses, phits, stall, tb, why) == (2, 1, 1, 0.25, {}, {})
    yy, *rest = unpack_reply((y.tobytes(), 0, 2, 0, 0.5, {"nvme": 10}, {"queued": 2}), 5)
    assert np.array_equal(yy, y) and rest == [0, 2, 0, 0.5, {"nvme": 10}, {"queued": 2}]


def test_named_victim_prefetch_never_evicts_anything_else(env):
    man = env["manifest"]
    w = worker(env, "victims", budget_blobs=2, prefetch_concurrency=1)
    x = np.ones((1, man.model.hidden_size), np.float32)
    ray.get(w.compute.remote(0, [0], [1], x))
    ray.get(w.compute.remote(0, [1], [1], x))               # full: (0, 0), (0, 1)

    def settle():
        deadline = time.time() + 10
        while time.time() < deadline:
            s = ray.get(w.stats.remote())
            if s["queued_prefetches"] == 0 and s["prefetch_loads"] + s["prefetch_dropped"] >= settle.n:
                return s
            time.sleep(0.02)
        raise AssertionError("prefetches did not settle")
    settle.n = 1
    ray.get(w.prefetch.remote([(1, 0, 1.0, "r", [])]))      # no victims named and no room: dropped
    s = settle()
    assert s["prefetch_dropped"] == 1 and sorted(map(tuple, ray.get(w.resident.remote()))) == [(0, 0), (0, 1)]
    settle.n = 2
    ray.get(w.prefetch.remote([(1, 0, 1.0, "r", [(0, 1)])]))  # only (0, 1) may go, though (0, 0) is the LRU
    settle()
    assert sorted(map(tuple, ray.get(w.resident.remote()))) == [(0, 0), (1, 0)]


def test_coordinator_values_decide_what_a_demand_miss_evicts(env):
    """prefetch(keep=...) hands the worker its residents' values (the planner's Plan.keep): a demand miss then
    evicts the lowest-valued resident, not the least recent; [] goes back to the cache's own LRU."""
    man = env["manifest"]
    w = worker(env, "keep", budget_blobs=2)
    x = np.ones((1, man.model.hidden_size), np.float32)
    ray.get(w.compute.remote(0, [0], [1], x))
    ray.get(w.compute.remote(0, [1], [1], x))               # full: (0, 0) least recent, (0, 1)
    ray.get(w.prefetch.remote([], None, [(0, 0, 2e-9), (0, 1, 1e-9)]))   # (0, 0) is worth more
    y = ray.get(w.compute.remote(1, [0], [1], x))
    assert sorted(map(tuple, ray.get(w.resident.remote()))) == [(0, 0), (1, 0)], "LRU would have evicted (0, 0)"
    _check_exact(env, y, 1, [0], [1], x)
    ray.get(w.prefetch.remote([], None, []))                 # values cleared: LRU again
    ray.get(w.compute.remote(1, [1], [1], x))
    assert sorted(map(tuple, ray.get(w.resident.remote()))) == [(1, 0), (1, 1)]


def test_tierset_without_dram_reads_storage_and_leaves_dram_alone(env):
    sa = storage(env, "tierset")
    node, [h] = next(iter(sa.items()))
    got, tier = ray.get(h.get_tiered.remote(0, 3, ["nvme"]))
    assert tier == "nvme" and ray.get(h.resident.remote()) == []      # not cached in DRAM on its behalf
    assert isinstance(got, np.ndarray), "an uncached blob comes back in the reply, not as a ref to get again"
    assert ray.get(h.stage.remote([(0, 3)], ["nvme"])) == 0 and ray.get(h.resident.remote()) == []
    ray.get(h.stage.remote([(0, 3)]))
    assert [tuple(k) for k in ray.get(h.resident.remote())] == [(0, 3)]
    _, tier = ray.get(h.get_tiered.remote(0, 3))
    assert tier == "dram"
    assert got.nbytes == env["manifest"].blob(0, 3).size


def test_fast_path_cancel_of_a_load_on_the_wire_marks_it_when_it_lands(env, moto_server):
    """The runtime's fast path cancels what the router refuted. A refuted expert still queued is dropped; one already
    on the wire is marked stale (first to evict) when it lands, unless it was ordered again meanwhile. A
    coordinator's order (it carries a request) is never touched by the fast path's cancellations."""
    with ShapingProxy(moto_server.endpoint_url, bandwidth_bps=None, first_byte_latency_s=0.4) as proxy:
        sbn = storage(env, "refute", tiers=("dram", "s3"), overrides={"s3": proxy.endpoint_url})
        w = worker(env, "refute", budget_blobs=8, storage_by_node=sbn, prefetch_concurrency=1)
        items = [(1, e) for e in range(3)]
        assert ray.get(w.prefetch.remote([(1, 0, 3.0, None), (1, 1, 2.0, None), (1, 2, 1.0, "req-c")])) == 3
        while (lambda st: (st["queued_prefetches"], st["loads_in_flight"]))(ray.get(w.stats.remote())) != (2, 1):
            time.sleep(0.01)                                  # (1, 0) on the wire, the others queued
        assert ray.get(w.cancel.remote(items=items, fast_path=True)) == 1   # (1, 1) only: (1, 2) is the coordinator's
        deadline = time.time() + 10
        while time.time() < deadline:
            st = ray.get(w.stats.remote())
            if st["prefetch_loads"] >= 2 and st["queued_prefetches"] == 0:
                break
            time.sleep(0.05)
        res = set(map(tuple, ray.get(w.resident.remote())))
        assert (1, 0) in res and (1, 2) in res and (1, 1) not in res, res
        assert st["stale_marked"] == 1, st["stale_marked"]     # (1, 0), on landing
        # ordered again while on the wire: the mark is forgotten
        assert ray.get(w.prefetch.remote([(0, 3, 3.0, None)])) == 1
        while (lambda st: (st["queued_prefetches"], st["loads_in_flight"]))(ray.get(w.stats.remote())) != (0, 1):
            time.sleep(0.01)                                  # on the wire
        assert ray.get(w.cancel.remote(items=[(0, 3)], fast_path=True)) == 0   # nothing queued to drop
        assert ray.get(w.prefetch.remote([(0, 3, 3.0, None)])) == 0   # on the wire: not queued twice
        deadline = time.time() + 10
        while (0, 3) not in set(map(tuple, ray.get(w.resident.remote()))) and time.time() < deadline:
            time.sleep(0.05)
        assert (0, 3) in set(map(tuple, ray.get(w.resident.remote())))
        assert ray.get(w.stats.remote())["stale_marked"] == 1
        ray.kill(w)


def test_each_miss_is_told_why_it_missed(env, moto_server):
    """Every miss gets one cause (telemetry: what a better predictor, an earlier order or a larger cache would have
    saved): never resident and not ordered; ordered and on the wire; ordered and still queued; evicted after a
    use; loaded by a prefetch and evicted before its use. One S3 read takes 0.4 s, so what is on the wire or
    queued stays there while the compute arrives."""
    with ShapingProxy(moto_server.endpoint_url, bandwidth_bps=None, first_byte_latency_s=0.4) as proxy:
        sbn = storage(env, "why", tiers=("dram", "s3"), overrides={"s3": proxy.endpoint_url})
        w = worker(env, "why", budget_blobs=2, storage_by_node=sbn, prefetch_concurrency=1)
        x = np.ones((1, env["manifest"].model.hidden_size), np.float32)
        x2 = np.ones((2, env["manifest"].model.hidden_size), np.float32)

        def why(layer, experts, xs):
            return ray.get(w.compute.remote(layer, experts, [1] * len(experts), xs, True))[1][5]

        def state():
            st = ray.get(w.stats.remote())
            return st["queued_prefetches"], st["loads_in_flight"]

        assert why(0, [0], x) == {"not_ordered": 1}
        assert ray.get(w.prefetch.remote([(0, 1, 2.0, None), (0, 2, 1.0, None)])) == 2
        while state() != (1, 1):                     # (0, 1) on the wire, (0, 2) behind it
            time.sleep(0.01)
        assert why(0, [1, 2], x2) == {"in_flight": 1, "queued": 1}
        assert why(0, [0], x) == {"evicted": 1}       # the two loads above took its place
        assert ray.get(w.prefetch.remote([(1, 3, 1.0, None)])) == 1
        deadline = time.time() + 10
        while (1, 3) not in set(map(tuple, ray.get(w.resident.remote()))) and time.time() < deadline:
            time.sleep(0.02)
        ray.get(w.cancel.remote(items=[(1, 3)], fast_path=True))   # refuted: first to evict
        assert why(1, [0], x) == {"not_ordered": 1}
        assert why(1, [3], x) == {"evicted_unused": 1}
        assert why(1, [3], x) == {}                   # a hit has no cause
        st = ray.get(w.stats.remote())
        assert st["miss_causes"] == {"in_flight": 1, "queued": 1, "evicted_unused": 1, "evicted": 1,
                                     "not_ordered": 2}
        assert sum(st["miss_causes"].values()) == st["misses"]
        ray.kill(w)


def test_fast_path_values_decide_what_a_load_evicts(env):
    """The runtime's fast path sends its latest P of each expert with a compute call (pack_orders' values); from
    then on the cache evicts the lowest-valued first, where LRU would have evicted the least recent."""
    w = worker(env, "values", budget_blobs=2)
    x = np.ones((1, env["manifest"].model.hidden_size), np.float32)
    ray.get(w.compute.remote(0, [0], [1], x))
    ray.get(w.compute.remote(0, [1], [1], x))          # LRU order now: (0, 0) first out
    vals = {(0, 0): 0.9, (0, 1): 0.1}
    r = ray.get(w.compute_packed.remote(pack_call(1, [0], [1], x) + pack_orders([], [], vals)))
    assert unpack_reply(r, 1)[2] == 1                   # (1, 0) missed and was loaded: one of the two went
    res = set(map(tuple, ray.get(w.resident.remote())))
    assert res == {(0, 0), (1, 0)}, res                 # the low-valued (0, 1) went, not the least recent
    assert ray.get(w.stats.remote())["eviction_values"] == 2
    ray.kill(w)


def test_a_fast_path_order_never_evicts_a_resident_valued_above_it(env):
    """A fast-path order names no victims; with the eviction values that ride with it, the worker declines it
    (before any byte moves) when the resident it would evict is valued at least as high as the order itself, and
    loads it when that resident is valued lower (issue #4: a prefetch never evicts a resident expert whose expected
    value is higher than the incoming one's)."""
    w = worker(env, "admit", budget_blobs=2, prefetch_concurrency=1)
    x = np.ones((1, env["manifest"].model.hidden_size), np.float32)
    ray.get(w.compute.remote(0, [0], [1], x))
    ray.get(w.compute.remote(0, [1], [1], x))
    vals = {(0, 0): 0.9, (0, 1): 0.6, (1, 1): 0.8, (1, 0): 0.5}
    # (1, 1) first (higher priority): 0.8 over (0, 1)'s 0.6 loads; then (1, 0) at 0.5 would evict (1, 1)'s 0.8
    assert ray.get(w.prefetch.remote([(1, 1, 16.8, None), (1, 0, 16.5, None)], None, None, True, vals)) == 2
    deadline = time.time() + 20
    while time.time() < deadline:
        st = ray.get(w.stats.remote())
        if st["prefetch_loads"] + st["prefetch_declined"] >= 2 and st["loads_in_flight"] == 0:
            break
        time.sleep(0.02)
    assert (st["prefetch_loads"], st["prefetch_declined"]) == (1, 1), st
    res = set(map(tuple, ray.get(w.resident.remote())))
    assert res == {(0, 0), (1, 1)}, res
    ray.kill(w)
