"""Ray actor shells, one class per file: `StorageActor` (a node's DRAM tier), `ExpertWorker` (a GPU's HBM expert
cache and expert compute), `PrefetchCoordinator` (routing events in, prefetch orders out). They own state and
concurrency and delegate decisions to `policies/` and bytes to `storage_adapters/`. May import only `policies/`
and `storage_adapters/` (they receive the validated config object from cluster/, never import it); resources are
declared where the actors are created (cluster/).
"""
