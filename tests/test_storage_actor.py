"""StorageActor on a real single-node Ray: zero-copy blobs through the object store, the DRAM tier's byte budget,
coalesced reads, verified fallback across tiers, and failures that take no other request down."""
import contextlib
import os

import numpy as np
import pytest
import ray

from conftest import tiny_store
from cluster.config import ClusterConfig
from cluster.storage_tier import start_storage_actors
from storage_adapters.checksum import digest
from storage_adapters.local_s3 import ShapingProxy
from storage_adapters.manifest import Manifest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def store(tmp_path_factory, moto_server, s3_bucket):
    root = tmp_path_factory.mktemp("sa")
    ckpt, man = tiny_store(root, f"file://{root}/nvme", f"s3://{s3_bucket}/storage-actor",
                           endpoint_url=moto_server.endpoint_url)
    return {"root": root, "manifest": man, "nvme": str(root / "nvme"), "ckpt": ckpt}


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="test-storage", object_store_memory=256 << 20,
             logging_level="ERROR",
             runtime_env={"env_vars": {k: os.environ[k] for k in
                                       ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "NO_PROXY")}})
    yield
    ray.shutdown()


def test_ray_stays_on_loopback(ray_local):
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}


def make_cfg(store, namespace, dram_bytes, tiers=("dram", "nvme", "s3"), endpoint=None):
    return ClusterConfig.model_validate({
        "ray": {"namespace": namespace},
        "tiers": [{"kind": "dram", "budget_bytes": dram_bytes}, {"kind": "nvme", "path": store["nvme"]},
                  {"kind": "s3", "uri": "s3://experts/storage-actor", "endpoint_url": endpoint,
                   "retry": {"base_delay_s": 0.01, "max_delay_s": 0.05}}],
        "tier_sets": {"default": list(tiers)}})


def actor_for(cfg, overrides=None):
    (node, [a]), = start_storage_actors(cfg, overrides).items()
    return a


def test_zero_copy_verified_blobs_and_dram_budget(ray_local, store, moto_server):
    man: Manifest = store["manifest"]
    size = man.blobs[0].size
    cfg = make_cfg(store, "t-budget", 3 * size, endpoint=moto_server.endpoint_url)
    a = actor_for(cfg)
    for b in man.blobs:
        [ref] = ray.get(a.get.remote(b.layer, b.expert))
        arr = ray.get(ref)
        assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8
        assert not arr.flags.writeable  # mapped read-only from the object store, not copied
        assert digest(arr) == b.checksum
        st = ray.get(a.stats.remote())
        assert st["dram_used_bytes"] <= st["dram_budget_bytes"] == 3 * size
    st = ray.get(a.stats.remote())
    assert st["dram_blobs"] == 3 and st["evictions"] == len(man.blobs) - 3
    resident = [tuple(x) for x in ray.get(a.resident.remote())]
    assert resident == [(b.layer, b.expert) for b in man.blobs[-3:]]  # LRU keeps the most recent
    ray.get(a.get.remote(*resident[0]))
    assert ray.get(a.stats.remote())["hits"] == 1
    assert st["tier_reads"] == {"nvme": len(man.blobs)}


def test_concurrent_requests_share_one_read(ray_local, store, moto_server):
    man = store["manifest"]
    with ShapingProxy(moto_server.endpoint_url, bandwidth_bps=None, first_byte_latency_s=0.3) as proxy:
        cfg = make_cfg(store, "t-coalesce", 1 << 30, tiers=("dram", "s3"))
        a = actor_for(cfg, {"s3": proxy.endpoint_url})
        ray.get(a.manifest_json.remote())
        b = man.blobs[1]
        proxy.reset_stats()
        refs = [a.get.remote(b.layer, b.expert) for _ in range(8)]
        got = ray.get(refs)
        assert len({r[0].hex() for r in got}) == 1  # the very same object for everyone
        st = ray.get(a.stats.remote())
        assert st["misses"] == 1 and st["coalesced"] == 7
        assert proxy.stats()["requests"] == 1  # one GET reached the object store
        assert digest(ray.get(got[0][0])) == b.checksum


@contextlib.contextmanager
def overwritten(path: str, offset: int, data_of):
    """Overwrite bytes of a stored blob (data_of(original bytes) -> new bytes at offset); restored afterwards."""
    orig = open(path, "rb").read()
    try:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data_of(orig))
        yield
    finally:
        with open(path, "wb") as f:
            f.write(orig)


def test_corrupt_nvme_copy_falls_back_to_s3(ray_local, store, moto_server):
    man = store["manifest"]
    b = man.blobs[2]
    off = b.tensors["up"].offset + 5
    with overwritten(os.path.join(store["nvme"], b.key), off, lambda orig: bytes([orig[off] ^ 0xFF])):
        a = actor_for(make_cfg(store, "t-fallback", 1 << 30, endpoint=moto_server.endpoint_url))
        [ref] = ray.get(a.get.remote(b.layer, b.expert))
        assert digest(ray.get(ref)) == b.checksum
        st = ray.get(a.stats.remote())
        assert st["fallbacks"] == 1 and st["checksum_failures"]["nvme"] == 2 and st["tier_reads"] == {"s3": 1}


def test_failed_read_does_not_take_others_down(ray_local, store):
    man = store["manifest"]
    b = man.blobs[3]
    with overwritten(os.path.join(store["nvme"], b.key), 0, lambda orig: b"\x00" * 16):
        a = actor_for(make_cfg(store, "t-fail", 1 << 30, tiers=("dram", "nvme")))
        good = a.get.remote(man.blobs[0].layer, man.blobs[0].expert)
        bad = a.get.remote(b.layer, b.expert)
        with pytest.raises(ray.exceptions.RayTaskError) as e:
            ray.get(bad)
        msg = str(e.value)
        assert b.key in msg and "nvme" in msg and b.tiers["nvme"].stored_checksum in msg
        assert digest(ray.get(ray.get(good)[0])) == man.blobs[0].checksum
        assert ray.get(a.ping.remote())  # the actor is alive
        assert ray.get(a.stats.remote())["dram_blobs"] == 1  # nothing wrong was cached


def test_stage_prefetches_into_dram_and_dense_is_served(ray_local, store):
    man = store["manifest"]
    a = actor_for(make_cfg(store, "t-stage", 1 << 30, tiers=("dram", "nvme")))
    items = [(b.layer, b.expert) for b in man.blobs[:4]]
    assert ray.get(a.stage.remote(items)) == 0
    assert ray.get(a.stage.remote(items)) == 4
    ray.get(a.get_many.remote(items))
    st = ray.get(a.stats.remote())
    assert st["misses"] == 4 and st["hits"] == 8  # the second stage and get_many were served from DRAM
    [dref] = ray.get(a.dense.remote())
    from safetensors.numpy import load
    dense = load(ray.get(dref).tobytes())
    assert set(dense) == set(man.dense.tensors)


def test_a_read_in_flight_is_joined_only_within_the_callers_tierset(tmp_path, monkeypatch):
    """In process (no Ray: a put is a tuple). Tenant A's read of a blob runs on a slow tier whose copy is corrupt;
    tenant B, whose TierSet holds only the fast tier, asks meanwhile. B must not get A's read (its error, or bytes
    from a tier outside B's TierSet): B reads its own tier. A caller allowed every tier still joins."""
    import asyncio
    import actors.storage_actor as sa
    from jobs.make_checkpoint import PRESETS, write_checkpoint
    from storage_adapters.converter import Target, convert, plan_conversion
    from storage_adapters.manifest import blob_key
    from storage_adapters.nvme import NvmeAdapter
    ckpt = write_checkpoint(str(tmp_path / "ckpt"), PRESETS["tiny"], seed=0)
    targets = [Target(NvmeAdapter(str(tmp_path / t), tier=t)) for t in ("fast", "slow")]
    asyncio.run(convert(plan_conversion(ckpt), targets, progress=False))
    bad = tmp_path / "slow" / blob_key(0, 1)
    b = bytearray(bad.read_bytes())
    b[100] ^= 0xFF
    bad.write_bytes(bytes(b))
    cfg = ClusterConfig.model_validate({"ray": {"namespace": "x"}, "tiers": [
        {"kind": "dram", "budget_bytes": 1 << 30},
        {"kind": "nvme", "name": "fast", "path": str(tmp_path / "fast"), "o_direct": False},
        {"kind": "nvme", "name": "slow", "path": str(tmp_path / "slow"), "o_direct": False,
         "emulate": {"latency_s": 0.3, "bandwidth_Bps": 1e9}}]})
    monkeypatch.setattr(sa, "ray", type("R", (), {"put": staticmethod(lambda x: ("ref", x))}))
    actor = sa.StorageActor(cfg, "n0")

    async def main():
        async def later(tiers):
            await asyncio.sleep(0.05)
            return await actor.get_tiered(0, 1, tiers)
        a, b_, c = await asyncio.gather(actor.get_tiered(0, 1, ["dram", "slow"]), later(["dram", "fast"]),
                                        later(None), return_exceptions=True)
        return a, b_, c

    a, b_, c = asyncio.run(main())
    assert type(a).__name__ == "BlobIntegrityError"
    assert not isinstance(b_, BaseException) and b_[1] == "fast", b_
    assert not isinstance(c, BaseException), c     # it joined A's read, which failed, then read its own tiers
    assert actor.counters["coalesced"] == 1
