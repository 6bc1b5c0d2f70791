"""python -m jobs.convert --checkpoint DIR --store [NAME=]URI [--store [NAME=]URI ...] [--endpoint-url URL]

Convert a Hugging Face MoE checkpoint (config.json + *.safetensors, single or sharded) into the expert store on
the NVMe tier (file:///path), the object tier (s3://bucket/prefix) or both. Safe to re-run: finished objects are
verified and skipped, an interrupted run is completed. The manifest records each copy under its tier's name: "nvme"
and "s3" unless NAME= says otherwise, and the config's tier that reads it must bear that name.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

from jobs._cli import at_least
from storage_adapters.converter import convert, open_target, plan_conversion
from storage_adapters.crypto import KeyError_, load_key
from storage_adapters.errors import StoreError


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.convert", description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--store", required=True, action="append",
                   help="file:///path or s3://bucket/prefix (repeatable); NAME=URI records the copy under the tier "
                        "name NAME, which must be the config's name of the tier that reads it (default: nvme / s3)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS)")
    p.add_argument("--checksum", default="xxh64", choices=["xxh64", "sha256"])
    p.add_argument("--encrypt-key-file", default=None, help="AES-256 key file: store blobs encrypted at rest")
    p.add_argument("--max-inflight", type=at_least(1), default=4, help="experts converted concurrently (bounds memory)")
    p.add_argument("--json", default=None, help="write a JSON report here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    a.targets = []   # (tier name or None, URI)
    for spec in a.store:
        name, sep, u = spec.partition("=") if "=" in spec.split("://", 1)[0] else ("", "", spec)
        if sep and not name.strip():
            p.error(f"--store {spec!r}: an empty tier name before '='")
        a.targets.append((name.strip() or None, u))
    names = [n or ("nvme" if u.startswith("file://") else "s3") for n, u in a.targets]
    if len(set(names)) != len(names):
        p.error(f"--store: two copies under one tier name {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                "name them apart with NAME=URI")
    for _, u in a.targets:
        # file://relative/path would be read relative to the cwd (its "host" taken as the first folder)
        if u.startswith("file://") and not u[len("file://"):].startswith("/"):
            p.error(f"--store {u!r}: a file:// URI needs an absolute path, file:///abs/path (three slashes)")
    return a


async def run(args) -> dict:
    plan = plan_conversion(args.checkpoint)
    key = load_key(key_file=args.encrypt_key_file) if args.encrypt_key_file else None
    named = getattr(args, "targets", None) or [(None, u) for u in args.store]   # (tier name or None, URI)
    targets = [open_target(u, endpoint_url=args.endpoint_url, key=key, tier=name) for name, u in named]
    try:
        rep = await convert(plan, targets, checksum_algo=args.checksum, max_inflight=args.max_inflight,
                            progress=not args.quiet)
    finally:
        for t in targets:
            await t.adapter.close()
    m = rep.manifest
    return {"family": m.model.family, "layout": m.model.expert_layout, "dtype": m.dtype,
            "moe_layers": len(m.model.moe_layers), "experts_per_layer": m.model.num_experts, "blobs": len(m.blobs),
            "expert_blob_bytes": rep.expert_bytes, "dense_bytes": m.dense.size, "locations": m.locations,
            "written": rep.written, "skipped": rep.skipped, "bytes_written": rep.bytes_written,
            "cleaned_leftovers": rep.cleaned, "seconds": round(rep.seconds, 3),
            "peak_anon_bytes": rep.peak_anon_bytes}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = asyncio.run(run(args))
    except (StoreError, KeyError_) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
