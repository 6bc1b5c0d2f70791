"""Bytes of the expert store: manifest, blob layout, checksums, encryption and the tier adapters.

Pure async I/O, no Ray: `NvmeAdapter` (local files), `S3Adapter` (any S3-compatible server), the manifest that is
the single source of truth for what exists where, and `ExpertStore`, which reads a blob from the best tier that
holds it and never returns bytes that fail their checksum. May import only the standard library, numpy, boto3,
aiobotocore, xxhash, cryptography and pydantic — never Ray, never `cluster/`, `actors/` or `jobs/`.
"""
