"""Faults the cluster survives, on one real local Ray (shared by the module) over one tiny store converted to an NVMe
tier and an S3 bucket on the moto server. Every test checks what was served against a reference: the greedy tokens
of the runtime run in this process with every expert resident (LocalExperts), and — where weights could have been
wrong — the cluster's own float32 logits of a clean run, compared bit for bit (torch.equal).

- an ExpertWorker killed while a generation runs (another thread): the request completes, placement drops it;
- the node's StorageActor killed while it has reads in flight: Ray restarts it (max_restarts), the reads are retried;
- S3 faults through the fault-injecting proxy (SlowDown, 500, resets, stalls past the read timeout, truncated
  bodies): retried with backoff; a persistent fault falls back to the NVMe tier; a TierSet with S3 alone gets an
  error naming the blob, the tier and the attempts, and the cluster goes on serving;
- corrupted blobs (bytes flipped on disk and in the bucket): detected by checksum, read from the other tier;
- the object store full (a DRAM-tier budget larger than the store) and an HBM budget of one expert: no crash.
The coordinator killed mid-generation is tests/test_coordinator.py; a node removed is tests/test_faults_multinode.py.
"""
from __future__ import annotations

import os
import threading
import time
import uuid

import numpy as np
import pytest
import ray
import torch

from conftest import tiny_store
from cluster.config import ClusterConfig
from cluster.expert_cluster import ExpertCluster
from cluster.model import LocalExperts, MoEModel, generate, load_checkpoint
from storage_adapters.local_s3 import s3_client
from storage_adapters.manifest import blob_key

pytestmark = pytest.mark.ray

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7]]
OBJECT_STORE = 80 << 20   # small on purpose: the memory-pressure test fills it (Ray's minimum is 75 MiB)


@pytest.fixture(scope="module")
def ray_local():
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="test-faults",
             object_store_memory=OBJECT_STORE, logging_level="ERROR")
    yield
    ray.shutdown()


class Store:
    """The tiny store on both tiers, the reference run, and ways to damage (and repair) stored blobs."""

    def __init__(self, root, moto_url: str):
        self.nvme = str(root / "nvme")
        self.prefix = f"faults-{uuid.uuid4().hex[:8]}"
        self.uri = f"s3://experts/{self.prefix}"
        self.moto_url = moto_url
        self.ckpt, self.man = tiny_store(root, f"file://{self.nvme}", self.uri, endpoint_url=moto_url, seed=5)
        config, dense, experts = load_checkpoint(self.ckpt)
        self.ref_model = MoEModel.from_dense(config, dense, LocalExperts(experts))
        self.s3 = s3_client(moto_url)

    def reference(self, n: int) -> list[list[int]]:
        return generate(self.ref_model, PROMPTS, n, eos_token_id=None)

    def flip_nvme(self, layer: int, expert: int) -> bytes:
        """Flip one byte in the middle of a blob's NVMe file; returns the original bytes."""
        path = os.path.join(self.nvme, blob_key(layer, expert))
        with open(path, "rb") as f:
            orig = f.read()
        bad = bytearray(orig)
        bad[len(bad) // 2] ^= 0x40
        with open(path, "wb") as f:
            f.write(bad)
        return orig

    def restore_nvme(self, layer: int, expert: int, orig: bytes) -> None:
        with open(os.path.join(self.nvme, blob_key(layer, expert)), "wb") as f:
            f.write(orig)

    def flip_s3(self, layer: int, expert: int) -> bytes:
        key = f"{self.prefix}/{blob_key(layer, expert)}"
        orig = self.s3.get_object(Bucket="experts", Key=key)["Body"].read()
        bad = bytearray(orig)
        bad[len(bad) // 3] ^= 0x01
        self.s3.put_object(Bucket="experts", Key=key, Body=bytes(bad))
        return orig

    def restore_s3(self, layer: int, expert: int, orig: bytes) -> None:
        self.s3.put_object(Bucket="experts", Key=f"{self.prefix}/{blob_key(layer, expert)}", Body=orig)


@pytest.fixture(scope="module")
def store(tmp_path_factory, moto_server, s3_bucket):
    return Store(tmp_path_factory.mktemp("faults"), moto_server.endpoint_url)


def s3_tier(store: Store, endpoint: str) -> dict:
    return {"kind": "s3", "uri": store.uri, "endpoint_url": endpoint, "read_timeout_s": 1.0, "connect_timeout_s": 1.0,
            "adaptive_parts": False, "retry": {"max_attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.05}}


def config(store: Store, namespace: str, tiers: list[dict], hbm_experts: int, workers: int = 2) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "ray": {"namespace": namespace},
        "workers": {"count": workers, "hbm_budget_bytes": hbm_experts * store.man.expert_bytes},
        "tiers": tiers})


def logits_run(model, steps: int) -> torch.Tensor:
    """[steps + 1, B, V] f32 logits of prefill and greedy decode steps."""
    cache = model.new_cache(len(PROMPTS), max(len(p) for p in PROMPTS) + steps)
    out = [model.prefill(cache, PROMPTS)]
    for _ in range(steps):
        out.append(model.decode(cache, out[-1].argmax(-1)))
    return torch.stack(out)


def storage_stats(c: ExpertCluster) -> dict:
    [s] = c.stats()["storage"]
    return s


def test_worker_killed_mid_request_completes_and_is_replaced(ray_local, store):
    n = 16
    cfg = config(store, "faults-worker", [{"kind": "dram", "budget_bytes": 64 << 20},
                                          {"kind": "nvme", "path": store.nvme}], hbm_experts=64, workers=3)
    with ExpertCluster(cfg) as c:
        victim = c.experts.placement.owner((c.model.args.moe_layers[0], 0))
        layers, started = [0], threading.Event()

        def on_route(layer, ids, w, x):   # runs in the generating thread, right before each MoE dispatch
            layers[0] += 1
            if layers[0] == 6:             # prefill and two decode steps done: the request is under way
                started.set()
            if started.is_set():
                time.sleep(0.05)           # leave the kill time to land while layers are still dispatched
        c.model.on_route = on_route
        out: dict = {}
        th = threading.Thread(target=lambda: out.update(tokens=c.generate(PROMPTS, n, eos_token_id=None)))
        th.start()
        assert started.wait(60), "generation never reached its third MoE layer"
        ray.kill(c.workers[victim])        # while the generation runs in the other thread
        th.join(120)
        assert out["tokens"] == store.reference(n)
        assert c.lost_workers == [victim] and victim not in c.workers
        assert victim not in {c.experts.placement.owner(k) for k in c.sizes}
        assert layers[0] > 6 + 2, "the kill landed after the request had finished"
        c.model.on_route = None
        assert c.generate(PROMPTS, 4, eos_token_id=None) == store.reference(4)  # and later requests too


def test_storage_actor_killed_mid_read_restarts_and_reads_are_retried(ray_local, store, fault_proxy):
    n = 4
    fault_proxy.set_shaping(first_byte_latency_s=0.1)   # every blob read takes a while: reads are in flight
    cfg = config(store, "faults-storage", [{"kind": "dram", "budget_bytes": store.man.expert_bytes},
                                           s3_tier(store, fault_proxy.endpoint_url)], hbm_experts=1)
    with ExpertCluster(cfg) as c:
        [[sa]] = c.storage.values()
        out: dict = {}
        th = threading.Thread(target=lambda: out.update(tokens=c.generate(PROMPTS, n, eos_token_id=None)))
        th.start()
        deadline = time.monotonic() + 60
        while True:   # kill it while it has blob reads in flight
            _, inflight, _, _ = ray.get(sa.snapshot.remote())
            if inflight or time.monotonic() > deadline:
                break
        assert inflight, "the storage actor never had a read in flight"
        ray.kill(sa, no_restart=False)   # a crash: Ray restarts it (max_restarts in cluster/storage_tier.py)
        th.join(120)
        assert out["tokens"] == store.reference(n)
        info = ray._private.state.actors(actor_id=sa._actor_id.hex())
        assert info["NumRestarts"] >= 1 and info["State"] == "ALIVE", info
        assert c.lost_workers == []  # no worker was blamed for its storage actor's death
        assert c.generate(PROMPTS, 2, eos_token_id=None) == store.reference(2)   # the restarted actor serves


def test_s3_faults_retried_then_other_tier_then_clear_error(ray_local, store, fault_proxy):
    steps = 3
    cfg = config(store, "faults-s3", [s3_tier(store, fault_proxy.endpoint_url), {"kind": "nvme", "path": store.nvme}],
                 hbm_experts=1)   # no DRAM tier and one expert of HBM: every expert use reads storage again
    with ExpertCluster(cfg) as c:
        clean = logits_run(c.model, steps)
        assert c.generate(PROMPTS, 6, eos_token_id=None) == store.reference(6)
        s0 = storage_stats(c)
        assert s0["tier_reads"].get("s3", 0) > 0 and s0["fallbacks"] == 0

        # transient faults: each retried with backoff by the S3 adapter
        rules = [{"kind": k, "method": "GET", "path_contains": "experts/", "count": cnt, "stall_s": 3}
                 for k, cnt in (("slowdown", 2), ("error500", 1), ("reset", 2), ("stall", 1), ("truncate", 2))]
        fault_proxy.reset_stats()
        fault_proxy.set_faults(rules)
        assert torch.equal(logits_run(c.model, steps), clean)
        assert fault_proxy.faults() == [], "every injected fault was hit"
        assert fault_proxy.stats()["faults"] == {"slowdown": 2, "error500": 1, "reset": 2, "stall": 1, "truncate": 2}

        # corrupted objects in the bucket: detected by checksum, the NVMe copy is served instead
        layer = c.model.args.moe_layers
        bad = [(layer[0], 0), (layer[0], 1), (layer[-1], 2), (layer[-1], 3)]
        orig = {b: store.flip_s3(*b) for b in bad}
        try:
            s1 = storage_stats(c)
            assert torch.equal(logits_run(c.model, steps), clean)
            s2 = storage_stats(c)
            assert s2["checksum_failures"].get("s3", 0) > s1["checksum_failures"].get("s3", 0)
            assert s2["fallbacks"] > s1["fallbacks"] and s2["tier_reads"].get("nvme", 0) > 0
        finally:
            for b, raw in orig.items():
                store.restore_s3(*b, raw)

        # a persistent fault: after the configured attempts the next tier serves
        fault_proxy.set_faults([{"kind": "slowdown", "method": "GET", "path_contains": "experts/", "count": 100000}])
        s3_ = storage_stats(c)
        assert torch.equal(logits_run(c.model, steps), clean)
        s4 = storage_stats(c)
        assert s4["fallbacks"] > s3_["fallbacks"] and s4["tier_reads"]["nvme"] > s3_["tier_reads"].get("nvme", 0)

        # ... and with S3 the only tier allowed: a clear error naming the blob, the tier and the attempts
        c.experts.tiers = ["s3"]
        with pytest.raises(Exception) as ei:
            c.generate(PROMPTS, 2, eos_token_id=None)
        msg = str(ei.value)
        assert "experts/L" in msg and "s3" in msg and "after 3 attempts" in msg and "SlowDown" in msg, msg
        fault_proxy.clear_faults()
        c.experts.tiers = None
        assert c.lost_workers == [] and len(c.workers) == 2   # nobody was taken down by the failed request
        assert c.generate(PROMPTS, 4, eos_token_id=None) == store.reference(4)


def test_corrupt_nvme_blobs_never_computed_with(ray_local, store):
    steps = 5
    cfg = config(store, "faults-corrupt", [{"kind": "nvme", "path": store.nvme},
                                           s3_tier(store, store.moto_url)], hbm_experts=1)
    with ExpertCluster(cfg) as c:
        clean = logits_run(c.model, steps)
        layer = c.model.args.moe_layers
        bad = [(layer[0], e) for e in range(c.model.args.num_experts)] + [(layer[-1], 1)]
        orig = {b: store.flip_nvme(*b) for b in bad}
        try:
            s1 = storage_stats(c)
            assert torch.equal(logits_run(c.model, steps), clean)   # bit-identical: no wrong byte was used
            assert c.generate(PROMPTS, 8, eos_token_id=None) == store.reference(8)
            s2 = storage_stats(c)
        finally:
            for b, raw in orig.items():
                store.restore_nvme(*b, raw)
        assert s2["checksum_failures"]["nvme"] > s1["checksum_failures"].get("nvme", 0)
        assert s2["tier_reads"]["s3"] > s1["tier_reads"].get("s3", 0) and s2["fallbacks"] > s1["fallbacks"]


def test_object_store_full_and_cache_budgets_hit(ray_local, store):
    """The DRAM tier's budget (1 GiB) is larger than the whole object store (80 MiB), which the driver has filled
    past capacity; the HBM cache holds one expert while top-2 routing needs two per token. Ray spills and the
    caches evict or use an expert once: tokens stay those of the reference, nothing crashes, budgets hold."""
    filler = [ray.put(np.full(8 << 20, i, np.uint8)) for i in range(OBJECT_STORE * 9 // 8 // (8 << 20))]
    cfg = config(store, "faults-memory", [{"kind": "dram", "budget_bytes": 1 << 30},
                                          {"kind": "nvme", "path": store.nvme}], hbm_experts=1)
    with ExpertCluster(cfg) as c:
        assert c.generate(PROMPTS, 8, eos_token_id=None) == store.reference(8)
        st = c.stats()
        for w in st["workers"]:
            assert w["peak_used_bytes"] <= w["budget_bytes"] == store.man.expert_bytes
        assert sum(w["uncached"] + w["evictions"] for w in st["workers"]) > 0   # the HBM budget was hit
        assert st["storage"][0]["dram_used_bytes"] <= st["storage"][0]["dram_budget_bytes"]
    from ray._private.internal_api import memory_summary
    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    assert "Spilled" in summary, summary          # the store was over-full: Ray spilled instead of failing
    assert int(ray.get(filler[-1])[0]) == len(filler) - 1 and int(ray.get(filler[0])[-1]) == 0  # no data lost
    del filler
