"""The cluster: one validated configuration (`config.py`), bootstrap of the storage actors and, later, workers,
coordinator and the model runtime. Ray-version-sensitive calls live in `ray_compat.py` only.

May import `actors/`, `policies/`, `storage_adapters/`; never `jobs/`.
"""
