"""The I/O-bound tier of `jobs.benchmark policies --tier s3`: the store's copy on a real moto server behind the real
shaping proxy, read through the tiers the benchmark configures. Reads come from S3 (not the never-read nvme fallback),
are bit-identical to the local copy, and each waits at least the configured first-byte latency. No Ray."""
import asyncio
import time
from types import SimpleNamespace

import numpy as np

from jobs.benchmark import ShapedS3, build_store, cluster_config, planner_settings
from storage_adapters.store import ExpertStore
from storage_adapters.tiers import adapter_for


def test_shaped_s3_tier_serves_loads_with_latency(tmp_path):
    store, _ = build_store(str(tmp_path), 2, 4, 2, 64 << 10)
    ckpt = str(tmp_path / "L2xE4k2-h512-i21" / "ckpt")
    lat = 0.040
    with ShapedS3(ckpt, "t", str(tmp_path), lat, 50e6) as s3:
        a = SimpleNamespace(threshold=None, hbm_confirm_prob=0.25, lookahead_tokens=None, tier="s3",
                            s3_mbps=50.0, s3_latency_ms=1e3 * lat)
        cfg = cluster_config(store, workers=2, hbm=1 << 20, dram=0, policy="on_demand", window=2, ns="t",
                             address=None, inflight=1 << 20, s3=s3, planner=planner_settings(a, 1))
        assert [t.kind for t in cfg.storage_tiers] == ["s3", "nvme"] and cfg.dram is None
        assert cfg.prefetch.hbm_confirm_prob == 0.25
        assert cfg.prefetch.tier_costs["nvme"] == cfg.prefetch.tier_costs["s3"] == \
            {"latency_s": lat, "bandwidth_Bps": 50e6}

        async def reads():
            st = await ExpertStore.open([adapter_for(t) for t in cfg.storage_tiers])
            out = []
            for l in st.manifest.model.moe_layers:
                for e in range(4):
                    t0 = time.perf_counter()
                    blob, tier = await st.read_blob(l, e)
                    dt = time.perf_counter() - t0
                    ref, _ = await st.read_blob(l, e, tiers=["nvme"])
                    out.append((tier, dt, np.array_equal(blob, ref), blob.nbytes))
            return out
        out = asyncio.run(reads())
    assert {t for t, *_ in out} == {"s3"}, out
    assert all(same for _, _, same, _ in out), "S3 copy differs from the local copy"
    # every load waited the proxy's first-byte latency plus bytes / bandwidth (a wait, not CPU work)
    assert min(dt for _, dt, _, _ in out) >= lat + out[0][3] / 50e6 * 0.9, out
