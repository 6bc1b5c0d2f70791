"""Storage actors on a multi-node Ray cluster (ray.cluster_utils.Cluster, all on 127.0.0.1): one per node, pinned
there, and a consumer on each node reads verified blobs from its own node's DRAM tier."""

import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import tiny_store
from cluster.config import ClusterConfig
from cluster.storage_tier import local_storage_actor, start_storage_actors
from cluster import ray_compat
from storage_adapters.checksum import digest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 128 << 20})
    c.add_node(num_cpus=2, object_store_memory=128 << 20)
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="test-multinode", logging_level="ERROR")
    yield c
    ray.shutdown()
    c.shutdown()


def test_one_pinned_actor_per_node_serving_its_node(cluster, tmp_path):
    _, man = tiny_store(tmp_path, f"file://{tmp_path}/nvme")
    cfg = ClusterConfig.model_validate({
        "ray": {"namespace": "test-multinode"},
        "tiers": [{"kind": "dram", "budget_bytes": 1 << 30}, {"kind": "nvme", "path": str(tmp_path / "nvme")}]})
    nodes = ray_compat.alive_node_ids()
    assert len(nodes) == 2
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}  # the whole cluster on loopback
    actors = start_storage_actors(cfg)
    assert sorted(actors) == nodes
    for node, [a] in actors.items():
        assert ray.get(a.ping.remote()) == node  # hard affinity held

    @ray.remote(num_cpus=0)
    def consume(cfg, items):
        a = local_storage_actor(cfg)
        refs = ray.get(a.get_many.remote(items))
        return ray_compat.current_node_id(), [digest(x) for x in ray.get(refs)]

    items = [(b.layer, b.expert) for b in man.blobs]
    want = [b.checksum for b in man.blobs]
    for node in nodes:
        where, sums = ray.get(consume.options(scheduling_strategy=ray_compat.pin_to_node(node)).remote(cfg, items))
        assert where == node and sums == want
    for node, [a] in actors.items():
        st = ray.get(a.stats.remote())
        assert st["misses"] == len(items) and st["dram_blobs"] == len(items)  # each node loaded its own tier


def test_expert_cluster_across_nodes_matches_in_process(cluster, tmp_path):
    """Workers spread over two nodes, each reading from its own node's DRAM tier; tokens equal the runtime run
    in one process with every expert resident."""
    from cluster.expert_cluster import ExpertCluster
    from cluster.model import LocalExperts, MoEModel, generate, load_checkpoint

    ckpt, man = tiny_store(tmp_path, f"file://{tmp_path}/nvme", seed=11)
    cfg = ClusterConfig.model_validate({
        "ray": {"namespace": "test-multinode-cluster"},
        "workers": {"count": 4, "hbm_budget_bytes": 2 * man.expert_bytes},
        "tiers": [{"kind": "dram", "budget_bytes": 1 << 30}, {"kind": "nvme", "path": str(tmp_path / "nvme")}]})
    config, dense, experts = load_checkpoint(ckpt)
    ref_model = MoEModel.from_dense(config, dense, LocalExperts(experts))
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    ref = generate(ref_model, prompts, 10, eos_token_id=None)
    with ExpertCluster(cfg) as c:
        assert c.generate(prompts, 10, eos_token_id=None) == ref
        st = c.stats()
        assert {s["node_id"] for s in st["storage"]} == set(ray_compat.alive_node_ids())
        assert all(s["local_storage"] for s in st["workers"])  # each worker reads its own node's DRAM tier
        assert {s["node_id"] for s in st["workers"]} == set(ray_compat.alive_node_ids())  # spread over nodes
        assert all(s["used_bytes"] <= s["budget_bytes"] for s in st["workers"])
