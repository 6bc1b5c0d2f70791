"""The cluster: one validated configuration (`config.py`), the model runtime (`model.py`), the continuous-batching
engine (`engine.py`), `ExpertCluster` (storage actors, workers, coordinator, placement), and deployment files
(`deploy/`). Ray-version-sensitive calls live in `ray_compat.py` only.

May import `actors/`, `policies/`, `storage_adapters/`; never `jobs/`.
"""
