"""Every Ray-version-sensitive call in one place (Ray is pinned in pyproject.toml; upgrade here, nowhere else)."""
from __future__ import annotations

import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .config import ClusterConfig


def init_ray(cfg: ClusterConfig, **extra) -> None:
    """Start or join Ray as the config says; a no-op when this process is already connected."""
    if ray.is_initialized():
        return
    r = cfg.ray
    kw = dict(namespace=r.namespace, runtime_env=r.runtime_env or None, include_dashboard=False,
              logging_level="WARNING", log_to_driver=True)
    if r.address:
        kw["address"] = r.address
    else:
        kw["address"] = "local"   # a new local Ray even when a `ray start` cluster runs on this machine
        if r.num_cpus is not None:
            kw["num_cpus"] = r.num_cpus
        if r.object_store_memory is not None:
            kw["object_store_memory"] = int(r.object_store_memory)
    kw.update(extra)
    ray.init(**kw)


def alive_node_ids() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))


def current_node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def pin_to_node(node_id: str) -> NodeAffinitySchedulingStrategy:
    """Hard affinity: a storage actor serves its own node's DRAM tier, so it must not drift elsewhere."""
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def prefer_node(node_id: str) -> NodeAffinitySchedulingStrategy:
    """Soft affinity: run there if the node is alive, anywhere otherwise."""
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)


def get_actor(name: str, namespace: str):
    return ray.get_actor(name, namespace=namespace)


def wait_named_actors_gone(namespace: str, prefixes: tuple[str, ...], timeout_s: float = 10.0) -> bool:
    """`ray.kill` returns before the actor is gone: wait until no named actor of `namespace` whose name starts with
    one of `prefixes` is listed (a cluster started again in the namespace would otherwise find the dying ones,
    e.g. through get_if_exists). False if some are still listed after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == namespace and a["name"].startswith(prefixes)]
        if not left:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
