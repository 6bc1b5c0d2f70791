"""python -m jobs.demo [--config ray_config.yaml] [--workdir DIR]

The main job on the embedded default, no download and no credentials: generate a small Mixtral-format checkpoint,
convert it into the store on the NVMe tier and on a local S3-compatible server (started here on 127.0.0.1),
start Ray and one StorageActor per node, and read every expert back through the actors — verified against the
source checkpoint byte for byte — from each TierSet. Prints what it did at every step.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from types import SimpleNamespace

import numpy as np


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[1])
    ap.add_argument("--config", default="ray_config.yaml")
    ap.add_argument("--workdir", default=".store/demo-work", help="where the generated checkpoint goes")
    ap.add_argument("--preset", default="demo")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the demo's Ray stays on 127.0.0.1
    from cluster.config import EMBEDDED, ConfigError, load_config
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    _say(f"config {args.config}: tiers {[t.name for t in cfg.tiers]}, active TierSet "
         f"{cfg.active_tier_set}={cfg.active_tiers}")

    from jobs.convert import run as convert_run
    from jobs.make_checkpoint import PRESETS, write_checkpoint
    from storage_adapters.local_s3 import MotoServer, make_bucket
    from storage_adapters.s3 import parse_s3_uri
    from storage_adapters.safetensors_io import read_header, read_tensor_bytes

    ckpt = os.path.abspath(os.path.join(args.workdir, f"checkpoint-{args.preset}"))
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        write_checkpoint(ckpt, PRESETS[args.preset])
    _say(f"checkpoint {ckpt}: {os.path.getsize(os.path.join(ckpt, 'model.safetensors')) / 2**20:.1f} MiB, "
         f"preset {args.preset}")

    servers, overrides = [], {}
    try:
        for t in cfg.storage_tiers:
            if t.kind == "s3" and t.endpoint_url == EMBEDDED:
                m = MotoServer().start()
                servers.append(m)
                make_bucket(m.endpoint_url, parse_s3_uri(t.uri)[0])
                overrides[t.name] = m.endpoint_url
                _say(f"tier {t.name}: embedded S3 server on {m.endpoint_url} (pid {m.pid})")
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if overrides:
                os.environ.setdefault(k, "testing")  # the embedded server takes any credentials

        stores = []
        for t in cfg.storage_tiers:
            stores.append(("file://" + t.path) if t.kind == "nvme" else t.uri)
        endpoint = next(iter(overrides.values()), None) or next(
            (t.endpoint_url for t in cfg.storage_tiers if t.kind == "s3"), None)
        for attempt in ("convert", "re-run (idempotent)"):
            t0 = time.perf_counter()
            rep = asyncio.run(convert_run(SimpleNamespace(checkpoint=ckpt, store=stores, endpoint_url=endpoint,
                                                          checksum="xxh64", encrypt_key_file=None, max_inflight=4,
                                                          quiet=True)))
            _say(f"{attempt}: {rep['blobs']} expert blobs of {rep['expert_blob_bytes'] / 2**20:.2f} MiB + dense "
                 f"{rep['dense_bytes'] / 2**20:.2f} MiB into {list(rep['locations'].values())}; written "
                 f"{rep['written']}, skipped {rep['skipped']}, peak extra memory "
                 f"{rep['peak_anon_bytes'] / 2**20:.1f} MiB, {time.perf_counter() - t0:.2f} s")

        import ray

        from cluster import ray_compat
        from cluster.storage_tier import start_storage_actors

        header = read_header(os.path.join(ckpt, "model.safetensors"))
        for tier_set in [cfg.active_tier_set] + [s for s in cfg.tier_sets if s != cfg.active_tier_set]:
            c = cfg.model_copy(update={"active_tier_set": tier_set, "ray": cfg.ray.model_copy(
                update={"namespace": f"{cfg.ray.namespace}-{tier_set}"})})
            ray_compat.init_ray(c)
            actors = start_storage_actors(c, overrides)
            node, handles = next(iter(actors.items()))
            a = handles[0]
            from storage_adapters.manifest import Manifest
            man = Manifest.from_json(ray.get(a.manifest_json.remote()), "storage actor")
            items = [(b.layer, b.expert) for b in man.blobs]
            for rnd in ("cold", "warm"):
                t0 = time.perf_counter()
                refs = ray.get(a.get_many.remote(items))
                blobs = ray.get(refs)
                dt = time.perf_counter() - t0
                bad = 0
                for b, blob in zip(man.blobs, blobs):
                    for role, te in b.tensors.items():
                        src = header[te.source]
                        if not np.array_equal(blob[te.offset:te.offset + te.length], read_tensor_bytes(src)):
                            bad += 1
                st = ray.get(a.stats.remote())
                _say(f"TierSet {tier_set} {c.active_tiers} ({rnd}): {len(blobs)} blobs through StorageActor on node "
                     f"{node[:8]} in {dt * 1e3:.0f} ms; {3 * len(blobs) - bad}/{3 * len(blobs)} tensors bit-exact "
                     f"vs the checkpoint; hits {st['hits']} misses {st['misses']} coalesced {st['coalesced']}, "
                     f"reads by tier {st.get('tier_reads')}, DRAM {st['dram_used_bytes'] / 2**20:.1f}/"
                     f"{st['dram_budget_bytes'] / 2**20:.0f} MiB")
                if bad:
                    _say("ERROR: bytes differ from the checkpoint")
                    return 1
            del refs, blobs
            ray.shutdown()
        _say("done: store on every tier verified end to end")
        return 0
    finally:
        try:
            import ray
            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
        for m in servers:
            m.stop()
            _say(f"stopped embedded S3 server (pid {m.pid})")


if __name__ == "__main__":
    sys.exit(main())
