"""EmulatedLink (storage_adapters/emulated.py), without Ray: bytes are the real tier's, each read waits at least the
modelled latency + bytes / bandwidth, `channels` reads overlap and the rest queue, and `emulate:` in a tier config
builds it (validated: a bad value names its key)."""
from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest
from pydantic import ValidationError

from cluster.config import ClusterConfig
from storage_adapters.emulated import LINK_PRIORITY, PREFETCH, EmulatedLink
from storage_adapters.nvme import NvmeAdapter
from storage_adapters.tiers import adapter_for


@pytest.fixture
def blob(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 256 << 10, dtype=np.uint8)   # 256 KiB
    (tmp_path / "b.bin").write_bytes(data.tobytes())
    return tmp_path, data


def test_reads_are_exact_and_take_the_modelled_time(blob):
    root, data = blob
    link = EmulatedLink(NvmeAdapter(str(root)), latency_s=0.02, bandwidth_Bps=10e6, channels=4)   # 10 MB/s

    async def go():
        t0 = time.perf_counter()
        got = await link.read("b.bin", 4096, 100_000)
        return got, time.perf_counter() - t0
    got, dt = asyncio.run(go())
    assert np.array_equal(got, data[4096:4096 + 100_000]), "the emulated link must return the tier's real bytes"
    want = 0.02 + 100_000 / 10e6        # 30 ms
    assert want <= dt < want + 0.25, f"one read took {dt * 1e3:.1f} ms, the link models {want * 1e3:.1f} ms"
    assert link.waited_s > 0 and link.transfer_s(100_000) == pytest.approx(want)


def test_channels_bound_reads_in_flight(blob):
    root, data = blob
    link = EmulatedLink(NvmeAdapter(str(root)), latency_s=0.05, bandwidth_Bps=1e12, channels=2)

    async def go(n):
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[link.read("b.bin", i * 4096, 4096) for i in range(n)])
        return outs, time.perf_counter() - t0
    outs, dt = asyncio.run(go(6))
    for i, o in enumerate(outs):
        assert np.array_equal(o, data[i * 4096:(i + 1) * 4096])
    # 6 reads of 50 ms over 2 channels: three rounds (150 ms), not one (50 ms) nor six (300 ms)
    assert 0.15 <= dt < 0.28, f"6 reads over 2 channels took {dt * 1e3:.0f} ms, expected ~150 ms"


def test_demand_reads_overtake_queued_prefetches(blob):
    """One channel, four prefetch reads queued, then a demand read: it is served next (second), not last."""
    root, data = blob
    link = EmulatedLink(NvmeAdapter(str(root)), latency_s=0.03, bandwidth_Bps=1e12, channels=1)
    done: list[str] = []

    async def read(name, prio):
        LINK_PRIORITY.set(prio)            # this task's reads carry it (as the StorageActor sets it per call)
        got = await link.read("b.bin", 0, 4096)
        assert np.array_equal(got, data[:4096])
        done.append(name)

    async def go():
        tasks = [asyncio.create_task(read(f"p{i}", PREFETCH)) for i in range(4)]
        await asyncio.sleep(0.005)         # p0 holds the channel, p1..p3 wait
        tasks.append(asyncio.create_task(read("demand", 0)))
        await asyncio.gather(*tasks)
    asyncio.run(go())
    assert done == ["p0", "demand", "p1", "p2", "p3"], done
    assert link.queued[PREFETCH] == 3 and link.queued[0] == 1


def test_a_cancelled_waiter_does_not_leak_its_channel(blob):
    root, _ = blob
    link = EmulatedLink(NvmeAdapter(str(root)), latency_s=0.02, bandwidth_Bps=1e12, channels=1)

    async def go():
        first = asyncio.create_task(link.read("b.bin", 0, 4096))
        await asyncio.sleep(0.002)
        waiter = asyncio.create_task(link.read("b.bin", 0, 4096))
        await asyncio.sleep(0.002)
        waiter.cancel()
        await first
        await asyncio.wait_for(link.read("b.bin", 0, 4096), 1.0)   # the channel came back
        return link._free
    assert asyncio.run(go()) == 1


def test_split_reads_take_the_free_channels_and_give_them_back(blob):
    """split_min_bytes: a lone read of 4 parts' bytes runs on 4 idle channels (latency + bytes / 4 bw); a read
    that starts while others hold channels takes only what is free; every channel comes back."""
    root, data = blob
    n, bw = 200_000, 4e6                  # one channel: 20 ms + 50 ms = 70 ms; four: 20 + 12.5 = 32.5 ms
    link = EmulatedLink(NvmeAdapter(str(root)), latency_s=0.02, bandwidth_Bps=bw, channels=6, split_min_bytes=50_000)
    assert [link.parts_for(b) for b in (10_000, 50_000, 120_000, n, 10 * n)] == [1, 1, 2, 4, 6]

    async def timed(off, length):
        t0 = time.perf_counter()
        got = await link.read("b.bin", off, length)
        return got, time.perf_counter() - t0

    async def lone():
        return await timed(0, n)
    got, dt = asyncio.run(lone())
    assert np.array_equal(got, data[:n]), "a split read must return the tier's real bytes"
    want = link.transfer_s(n, 4)
    assert want == pytest.approx(0.02 + n / (4 * bw))
    assert want <= dt < link.transfer_s(n, 2), f"a lone split read took {dt * 1e3:.1f} ms, modelled {want * 1e3:.1f}"
    assert link.split_reads == 1 and link._free == 6

    async def two():
        first = asyncio.create_task(timed(0, n))        # takes 4 of the 6 channels
        await asyncio.sleep(0.003)
        second = await timed(4096, n)                   # only 2 are free: 20 + 25 = 45 ms
        return await first, second
    (g1, d1), (g2, d2) = asyncio.run(two())
    assert np.array_equal(g1, data[:n]) and np.array_equal(g2, data[4096:4096 + n])
    assert link.transfer_s(n, 2) <= d2 < link.transfer_s(n, 1), \
        f"the second read took {d2 * 1e3:.1f} ms; with the 2 channels left it models {link.transfer_s(n, 2) * 1e3:.1f}"
    assert link._free == 6, "a split read must give back every channel it took"


def test_tier_config_builds_the_link_and_rejects_bad_values(tmp_path):
    raw = {"tiers": [{"kind": "nvme", "path": str(tmp_path), "emulate": {"latency_s": 0.005, "bandwidth_Bps": 2e8,
                                                                          "channels": 3}}]}
    cfg = ClusterConfig.model_validate(raw)
    ad = adapter_for(cfg.tiers[0])
    assert isinstance(ad, EmulatedLink) and (ad.latency_s, ad.bandwidth_Bps, ad.channels) == (0.005, 2e8, 3)
    assert ad.split_min_bytes is None, "without split_min_bytes a read holds one channel"
    raw["tiers"][0]["emulate"]["split_min_bytes"] = "64KiB"
    assert adapter_for(ClusterConfig.model_validate(raw).tiers[0]).split_min_bytes == 64 << 10
    raw["tiers"][0]["emulate"]["split_min_bytes"] = 0
    with pytest.raises(ValidationError, match=r"tiers\.0\.nvme\.emulate\.split_min_bytes"):
        ClusterConfig.model_validate(raw)
    del raw["tiers"][0]["emulate"]["split_min_bytes"]
    assert ad.tier == "nvme" and ad.path("x") == os.path.join(str(tmp_path), "x")   # the rest is the real tier's
    assert not isinstance(adapter_for(ClusterConfig.model_validate(
        {"tiers": [{"kind": "nvme", "path": str(tmp_path)}]}).tiers[0]), EmulatedLink)
    raw["tiers"][0]["emulate"]["bandwidth_Bps"] = 0
    with pytest.raises(ValidationError, match=r"tiers\.0\.nvme\.emulate\.bandwidth_Bps"):
        ClusterConfig.model_validate(raw)


def test_prefetch_concurrency_and_placement_are_validated(tmp_path):
    tiers = [{"kind": "nvme", "path": str(tmp_path)}]
    w = ClusterConfig.model_validate({"tiers": tiers, "workers": {"prefetch_concurrency": 16,
                                                                  "placement": "by_layer"}}).workers
    assert (w.prefetch_concurrency, w.placement) == (16, "by_layer")
    with pytest.raises(ValidationError, match=r"workers\.prefetch_concurrency"):
        ClusterConfig.model_validate({"tiers": tiers, "workers": {"prefetch_concurrency": 0}})
    with pytest.raises(ValidationError, match=r"workers\.placement"):
        ClusterConfig.model_validate({"tiers": tiers, "workers": {"placement": "random"}})
