"""`python -m jobs.benchmark policies` submitted with `ray job submit` to a 3-node Ray cluster (issue 6 §4),
unchanged: the job server starts it as the entrypoint, tells it the cluster through RAY_ADDRESS, and the benchmark
connects with `--address auto`. The cluster is a ray.cluster_utils.Cluster on 127.0.0.1
(2 CPUs and 150 MiB of object store per node, the head with its dashboard: the job server); the trace is a tiny
synthetic one. From the JSON: the workers sit on 3 nodes, each worker node has its own storage actor (no expert
byte crosses nodes), the activations do cross nodes through the object store, and both policies replay the same
tokens."""
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # before Ray: the nodes advertise 127.0.0.1
from ray.cluster_utils import Cluster  # noqa: E402

from jobs.benchmark import HIDDEN, cut_trace  # noqa: E402
from policies.traces import TraceSlots, synthetic_trace  # noqa: E402
from storage_adapters.local_s3 import free_port  # noqa: E402

pytestmark = pytest.mark.ray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES = 3
POLICIES = ("on_demand", "cross_layer")          # the baseline and one predictor (through the PrefetchCoordinator)
BATCH, TOKENS, REQUESTS = 3, 72, 3               # the replay: 3 requests of at most 72 // 3 rows, 3 at a time


@pytest.fixture(scope="module")
def cluster():
    """3 small nodes, the head with its dashboard (the job server `ray job submit` talks to) and its dashboard agent
    (which runs the job) on free ports: the agent's default 52365 is taken when another Ray instance runs here.
    This process never connects (the benchmark job is the only driver)."""
    port = free_port()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 150 << 20, "include_dashboard": True, "dashboard_port": port,
        "dashboard_agent_listen_port": free_port()})
    try:
        for _ in range(NODES - 1):
            c.add_node(num_cpus=2, object_store_memory=150 << 20)
        c.wait_for_nodes()
        yield c, f"http://127.0.0.1:{port}"
    finally:
        c.shutdown()                   # stops the raylets, GCS and dashboard this fixture started, by their handles


def wait_job_server(url: str, timeout_s: float = 60) -> None:
    """The dashboard answers its job API a few seconds after the head node is up. 401 also means it is up: once
    any test of this process ran `ray.init()` for a local cluster, Ray set RAY_AUTH_MODE=token in this process's
    environment, so the Cluster started here requires the token (which `ray job submit` sends; urllib does not)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code == 401:
                return
        except OSError:
            pass
        assert time.time() < deadline, f"no job server at {url} after {timeout_s} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def run(cluster, tmp_path_factory):
    _, url = cluster
    d = tmp_path_factory.mktemp("bench-multinode")
    # 72 rows x 3 layers x 8 experts, top-1, 3 requests: seconds of replay; 3 workers own the experts
    tr = synthetic_trace(TOKENS, 3, 8, 1, correlation=0.8, num_requests=REQUESTS, seed=11)
    trace = str(d / "tiny.npz")
    tr.save_npz(trace)
    out = str(d / "out.json")
    bench = [sys.executable, "-m", "jobs.benchmark", "policies", "--trace", trace, "--expert-mib", "0.03",
             "--policies", ",".join(POLICIES), "--workers", str(NODES), "--batch", str(BATCH),
             "--requests", str(REQUESTS), "--tokens", str(TOKENS), "--no-simulate", "--address", "auto",
             "--work", str(d / "work"), "--json", out]
    # the entrypoint runs wherever the job supervisor starts it: cd to the repo for `-m jobs.benchmark`. Ray sets
    # RAY_ADDRESS for the entrypoint and `--address auto` reads it (auto without RAY_ADDRESS would scan this
    # machine's GCS processes, ambiguous when other clusters run here)
    entry = f"cd {shlex.quote(ROOT)} && OMP_NUM_THREADS=1 exec {shlex.join(bench)}"
    wait_job_server(url)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", url, "--",
                        "bash", "-c", entry], cwd=ROOT, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    log = f"{p.stdout[-4000:]}\n{p.stderr[-3000:]}"
    assert p.returncode == 0 and "succeeded" in p.stdout + p.stderr, f"job failed ({p.returncode}):\n{log}"
    assert "RAY_ADDRESS" in log, "the entrypoint connected through the RAY_ADDRESS the job server set"
    with open(out) as f:
        res = json.load(f)
    print(f"\nray job submit {wall:.1f} s; " + "; ".join(
        f"{k}: nodes {m.get('nodes')}, activation bytes {m.get('cross_node_activation_bytes')}, expert bytes "
        f"{m.get('cross_node_bytes')}, bytes moved {m.get('bytes_moved')}, hit {m.get('hit_rate')}, "
        f"tok/s {m.get('tokens_per_s')}" for k, m in res["policies"].items()))
    # the benchmark replays the first 3 requests, at most 72 // 3 rows each: the references use that piece
    return cut_trace(tr, None, TOKENS, REQUESTS), res


def expert_uses(tr, batch: int) -> int:
    """Expert uses of the replay, from the trace alone: per decode step and layer, the distinct experts of the live
    rows (rows of one batch routed to the same expert share one call)."""
    slots = TraceSlots(tr, batch)
    n = 0
    while len(live := slots.admit()):
        ids = tr.experts[slots.rows(live)]                 # [b, L, K]
        n += sum(len(np.unique(ids[:, l][ids[:, l] >= 0])) for l in range(tr.num_layers))
        slots.advance(live)
    return n


def test_every_policy_ran_on_three_nodes(run):
    _, res = run
    assert res["workers"] == NODES
    for pol in POLICIES:
        m = res["policies"][pol]
        assert "error" not in m, f"{pol}: {m.get('error')}"
        # `nodes`: distinct node ids of the workers (summarize in jobs/benchmark.py); workers are pinned round-robin
        assert m["nodes"] == NODES, f"{pol}: workers on {m['nodes']} nodes, want {NODES}"
        per_node = m["storage_actors_per_node"]
        assert len(per_node) == NODES and set(per_node.values()) == {1}, f"{pol}: storage actors {per_node}"


def test_same_tokens_and_uses_across_policies(run):
    tr, res = run
    pol = res["policies"]
    for p in POLICIES:
        assert pol[p]["tokens"] == tr.num_tokens == res["trace"]["rows"], p
        assert pol[p]["uses"] == expert_uses(tr, BATCH), p
        assert 0.0 <= pol[p]["hit_rate"] <= 1.0, (p, pol[p]["hit_rate"])
        assert pol[p]["hits"] + pol[p]["misses"] == pol[p]["uses"], p
    assert pol["cross_layer"]["coordinator"]["steps"] > 0, "routing reached the PrefetchCoordinator"


def test_cross_node_bytes(run):
    """The driver sits on one node, so the activations of the other two nodes' workers cross nodes through the
    object store (f32 rows, there and back); experts never do: a worker whose node had no storage actor would
    count its loads in cross_node_bytes (local_storage False), so 0 with loads > 0 on 3 nodes means each node
    served its own workers (storage_actors_per_node, checked above, says there is exactly one on each)."""
    tr, res = run
    row = 2 * 4 * HIDDEN                                   # one f32 activation row, there and back
    for p in POLICIES:
        m = res["policies"][p]
        assert m["cross_node_activation_bytes"] > 0, p
        assert m["cross_node_activation_bytes"] % row == 0, "whole rows"
        assert m["cross_node_activation_bytes"] <= row * int((tr.experts >= 0).sum()), "at most every routed row"
        assert m["bytes_moved"] > 0 and m["loads"] > 0, p
        assert m["bytes_moved"] == m["loads"] * res["expert_bytes"], p
        assert m["cross_node_bytes"] == 0, f"{p}: {m['cross_node_bytes']} expert bytes read from another node"
