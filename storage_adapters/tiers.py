"""Build adapters from tier configuration objects (duck-typed on `.kind`, so this layer needs no config import)."""
from __future__ import annotations

from .base import BlobAdapter
from .crypto import load_key
from .emulated import EmulatedLink
from .nvme import NvmeAdapter
from .s3 import RetryPolicy, S3Adapter


def adapter_for(t, endpoint_url: str | None = None) -> BlobAdapter:
    if t.kind == "nvme":
        ad = NvmeAdapter(t.path, tier=t.name, chunk_bytes=int(t.chunk_bytes), parallelism=t.parallelism,
                         o_direct=t.o_direct)
        em = getattr(t, "emulate", None)
        if em is not None:
            split = int(em.split_min_bytes) if em.split_min_bytes else None
            return EmulatedLink(ad, latency_s=em.latency_s, bandwidth_Bps=em.bandwidth_Bps, channels=em.channels,
                                split_min_bytes=split)
        return ad
    if t.kind == "s3":
        r = t.retry
        if (endpoint_url or t.endpoint_url) == "embedded":
            raise ValueError(f"tier {t.name!r}: endpoint_url 'embedded' means a local server started by the job "
                             f"(jobs.demo does); give the started server's URL as an endpoint override")
        return S3Adapter(t.uri, tier=t.name, endpoint_url=endpoint_url or t.endpoint_url, region=t.region,
                         max_connections=t.max_connections, part_bytes=int(t.part_bytes),
                         connect_timeout_s=t.connect_timeout_s, read_timeout_s=t.read_timeout_s,
                         retry=RetryPolicy(r.max_attempts, r.base_delay_s, r.max_delay_s),
                         adaptive_parts=t.adaptive_parts)
    raise ValueError(f"tier {t.name!r}: kind {t.kind!r} has no storage adapter")


def keys_for(tiers, environ=None) -> dict[str, bytes]:
    """tier name -> AES key for encrypted tiers, resolved once when a process starts; never logged."""
    return {t.name: load_key(t.encryption.key_file, t.encryption.key_env, environ)
            for t in tiers if getattr(t, "encryption", None) is not None}
