"""Bootstrap of the storage side: one or more StorageActors per alive node, pinned there, named so that any
process on the node finds its own. Resources are declared here, where the actors are created."""
from __future__ import annotations

import ray

from actors.storage_actor import StorageActor

from . import ray_compat
from .config import ClusterConfig

# A storage actor that crashes is restarted on its node (its DRAM tier starts empty and refills on demand), and the
# calls in flight when it died are re-run on the new incarnation: every method is an idempotent read (or a
# prefetch/evict that may run twice). A node's actor never moves elsewhere (hard affinity): if its node is gone,
# calls fail with ActorDiedError and the ExpertWorkers read through another node's actor (actors/expert_worker.py).
MAX_RESTARTS = 16
MAX_TASK_RETRIES = 3


def actor_name(node_id: str, i: int) -> str:
    return f"storage-{node_id[:12]}-{i}"


def start_storage_actors(cfg: ClusterConfig, endpoint_overrides: dict[str, str] | None = None,
                         nodes: list[str] | None = None) -> dict[str, list]:
    """node id -> StorageActor handles (created, or found when already running under the same name)."""
    sa = cfg.storage_actors
    cls = ray.remote(StorageActor)
    out: dict[str, list] = {}
    for node in nodes or ray_compat.alive_node_ids():
        handles = []
        for i in range(sa.per_node):
            handles.append(cls.options(
                name=actor_name(node, i), namespace=cfg.ray.namespace, get_if_exists=True, lifetime=None,
                max_concurrency=sa.max_concurrency, num_cpus=sa.num_cpus,
                max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
                scheduling_strategy=ray_compat.pin_to_node(node),
            ).remote(cfg, node, endpoint_overrides))
        out[node] = handles
    ray.get([h.ping.remote() for hs in out.values() for h in hs])  # fail here, not on first use
    return out


def local_storage_actor(cfg: ClusterConfig, i: int = 0):
    """The StorageActor of the node this process runs on."""
    return ray_compat.get_actor(actor_name(ray_compat.current_node_id(), i), cfg.ray.namespace)
