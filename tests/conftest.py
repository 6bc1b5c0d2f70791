"""Shared fixtures. Ray stays on loopback; S3 traffic goes to a moto server this session starts on 127.0.0.1."""
import os

# Before anything imports Ray or botocore: Ray must advertise 127.0.0.1 (the machine's other address is not a
# target), and local S3 servers take the standard credential chain with throwaway credentials.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from storage_adapters.local_s3 import MotoServer, ShapingProxy, make_bucket  # noqa: E402


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server for the whole run, over HTTP on 127.0.0.1; stopped by its pid at the end."""
    with MotoServer() as m:
        yield m


@pytest.fixture(scope="session")
def s3_bucket(moto_server):
    return make_bucket(moto_server.endpoint_url, "experts")


@pytest.fixture()
def fault_proxy(moto_server):
    """An unshaped proxy in front of moto for fault injection; each test gets a fresh one."""
    with ShapingProxy(moto_server.endpoint_url, bandwidth_bps=None, first_byte_latency_s=0.0) as p:
        yield p


@pytest.fixture(scope="module")
def one_torch_thread():
    """The test machine's cores are shared: one torch thread for a module, restored afterwards."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_candidates_contract(c, layer: int, num_layers: int, horizon: int) -> None:
    """Predictor output after an event at `layer`: distances 1..horizon, target layers (layer + d) mod L,
    probabilities in (0, 1], each expert at most once per distance."""
    import numpy as np
    assert c.distance.min() >= 1 and c.distance.max() <= horizon
    np.testing.assert_array_equal(c.layer, (layer + c.distance) % num_layers)
    assert (c.prob > 0).all() and (c.prob <= 1).all()
    pairs = c.distance * (c.expert.max() + 1) + c.expert
    assert len(np.unique(pairs)) == len(pairs)


def convert_checkpoint(ckpt: str, *uris: str, endpoint_url: str | None = None):
    """Convert a checkpoint directory into the given store URIs (file:// and/or s3://); returns the manifest."""
    import asyncio

    from storage_adapters.converter import convert, open_target, plan_conversion
    targets = [open_target(u, endpoint_url=endpoint_url) for u in uris]
    return asyncio.run(convert(plan_conversion(ckpt), targets, progress=False)).manifest


def expert_reference(weights: dict, layer: int, expert: int, x):
    """One expert of the `tiny` preset's checkpoint (safetensors.numpy weights) on x [n, H] float32: the CPU
    reference the workers' outputs are checked against."""
    import torch

    from actors.expert_worker import expert_ffn
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    return expert_ffn(torch.from_numpy(x), *(torch.from_numpy(weights[f"{p}.{n}.weight"]) for n in ("w1", "w3", "w2")))


def tiny_store(root, *uris: str, endpoint_url: str | None = None, seed: int = 0):
    """Write the `tiny` preset checkpoint under root/ckpt and convert it; returns (checkpoint dir, manifest)."""
    from jobs.make_checkpoint import PRESETS, write_checkpoint
    ckpt = write_checkpoint(str(root / "ckpt"), PRESETS["tiny"], seed=seed)
    return ckpt, convert_checkpoint(ckpt, *uris, endpoint_url=endpoint_url)
