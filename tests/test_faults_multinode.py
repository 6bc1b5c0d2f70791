"""Faults that need several nodes: a 3-node ray.cluster_utils.Cluster on 127.0.0.1 (shared by the module), one
StorageActor per node and one ExpertWorker per node, HBM caches of one expert so that experts are read again and
again through the storage actors. Tokens are compared with the runtime run in this process (LocalExperts).

- a node's StorageActor gone for good (killed without restart): that node's worker reads through another node's
  storage actor and the tokens do not change;
- a node removed while a generation runs: its worker's experts are re-placed on the survivors, its storage actor is
  forgotten, the request completes with the reference tokens and later requests are served.
"""
from __future__ import annotations

import threading
import time

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from conftest import tiny_store
from cluster import ray_compat
from cluster.config import ClusterConfig
from cluster.expert_cluster import ExpertCluster
from cluster.model import LocalExperts, MoEModel, generate, load_checkpoint

pytestmark = pytest.mark.ray

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7]]


@pytest.fixture(scope="module")
def cluster():
    torch.set_num_threads(1)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 96 << 20})
    for _ in range(2):
        c.add_node(num_cpus=2, object_store_memory=96 << 20)
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="test-faults-multinode", logging_level="ERROR")
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults-multinode")
    ckpt, man = tiny_store(d, f"file://{d}/nvme", seed=13)
    config, dense, experts = load_checkpoint(ckpt)
    ref = MoEModel.from_dense(config, dense, LocalExperts(experts))
    return str(d / "nvme"), man, (lambda n: generate(ref, PROMPTS, n, eos_token_id=None))


def config(store, namespace: str) -> ClusterConfig:
    nvme, man, _ = store
    return ClusterConfig.model_validate({
        "ray": {"namespace": namespace},
        "workers": {"count": 3, "hbm_budget_bytes": man.expert_bytes},
        "tiers": [{"kind": "dram", "budget_bytes": 64 << 20}, {"kind": "nvme", "path": nvme}]})


def worker_nodes(c: ExpertCluster) -> dict[int, str]:
    return {s["worker_id"]: s["node_id"] for s in c.stats()["workers"]}


def test_worker_falls_back_to_another_nodes_storage_actor(cluster, store):
    reference = store[2]
    with ExpertCluster(config(store, "mn-storage-lost")) as c:
        assert c.generate(PROMPTS, 4, eos_token_id=None) == reference(4)
        here = ray_compat.current_node_id()
        wid, node = next((w, n) for w, n in sorted(worker_nodes(c).items()) if n != here)
        [sa] = c.storage[node]
        ray.kill(sa, no_restart=True)    # gone for good: Ray does not restart it
        assert c.generate(PROMPTS, 8, eos_token_id=None) == reference(8)
        st = c.stats()
        w = next(s for s in st["workers"] if s["worker_id"] == wid)
        assert w["storage_retries"] > 0 and w["loads"] > 0   # it asked its own, then read through another node's
        assert c.lost_workers == [] and len(c.workers) == 3  # the worker itself was never blamed
        assert sum("error" in s for s in st["storage"]) == 1  # stats still answer, the dead actor marked


def test_node_removed_while_serving(cluster, store):
    reference = store[2]
    n = 12
    with ExpertCluster(config(store, "mn-node-removed")) as c:
        here = ray_compat.current_node_id()
        nodes = worker_nodes(c)
        # workers are dealt over the nodes with soft affinity: remove a node (not the driver's) that holds one
        gone = next((n_ for n_ in sorted(set(nodes.values())) if n_ != here), None)
        assert gone is not None and len(set(nodes.values())) >= 2, f"workers not spread over nodes: {nodes}"
        victims = sorted(w for w, n_ in nodes.items() if n_ == gone)
        layers, started = [0], threading.Event()

        def on_route(layer, ids, w, x):   # in the generating thread, right before each MoE dispatch
            layers[0] += 1
            if layers[0] == 4:
                started.set()
            if started.is_set():
                time.sleep(0.05)
        c.model.on_route = on_route
        out: dict = {}
        th = threading.Thread(target=lambda: out.update(tokens=c.generate(PROMPTS, n, eos_token_id=None)))
        th.start()
        assert started.wait(60)
        [node] = [x for x in cluster.list_all_nodes() if x.node_id == gone]
        cluster.remove_node(node)          # its raylet, its storage actor and its worker go away
        th.join(180)
        assert out["tokens"] == reference(n)
        assert sorted(c.lost_workers) == victims and not set(victims) & set(c.workers)
        assert not set(victims) & {c.experts.placement.owner(k) for k in c.sizes}   # re-placed on the survivors
        assert gone not in c.storage                                               # its storage actor forgotten
        c.model.on_route = None
        assert c.generate(PROMPTS, 6, eos_token_id=None) == reference(6)
        assert gone not in set(worker_nodes(c).values())
