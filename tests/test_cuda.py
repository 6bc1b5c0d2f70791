"""The CUDA paths, where a GPU is present (skipped on machines without one, CI among them; run on a lent GPU machine
and recorded in docs/benchmarks.md "GPU").

- The model runtime on the device: float32 logits of every family within hf_models.TOL of transformers (run on
  the CPU), greedy tokens equal, and bf16 on the device.
- Dense offload on the device: host weights pinned, two device slots, copies on a stream of their own; logits
  bit-for-bit those of the same model with offload off.
- HostToDevice (actors/h2d.py): chunked pinned staging gives the exact bytes, for sizes around chunk multiples,
  into a block recycled while a kernel queued on the caller's stream still writes it, and
  from several threads at once.
- ExpertWorker on the GPU in a real Ray cluster: its cache is device memory, outputs match the CPU reference,
  the budget holds in the index and in what the CUDA allocator reports, prefetch turns misses into hits.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import hf_models  # noqa: E402
from actors.h2d import HostToDevice  # noqa: E402
from cluster.model import LocalExperts, MoEModel  # noqa: E402

DEV = torch.device("cuda")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf"))
    return {f: hf_models.build(f, d) for f in hf_models.FAMILIES}


def _on_device(t, **kw) -> MoEModel:
    dtype = kw.pop("dtype", None)
    return MoEModel.from_dense(t.config, t.dense, LocalExperts(t.experts, device=DEV, dtype=dtype), device=DEV,
                               dtype=dtype, **kw)


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_logits_on_the_gpu_match_transformers(tiny, family):
    t = tiny[family]
    model = _on_device(t)
    assert model.device.type == "cuda"
    err = hf_models.check_against_hf(model, t.model, hf_models.prompts(model.args.vocab_size), family)
    print(f"\n{family}: max abs logit error on {torch.cuda.get_device_name()} vs transformers (CPU): {err:.2e}")


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_greedy_tokens_on_the_gpu_match_transformers(tiny, family):
    hf_models.check_greedy_against_hf(_on_device(tiny[family]), tiny[family].model, family)


def test_bf16_on_the_gpu_tracks_float32(tiny):
    t = tiny["mixtral"]
    f32, bf16 = _on_device(t), _on_device(t, dtype=torch.bfloat16)
    prompts = hf_models.prompts(f32.args.vocab_size)
    a = f32.prefill(f32.new_cache(len(prompts), 32), prompts)
    b = bf16.prefill(bf16.new_cache(len(prompts), 32), prompts)
    assert b.dtype == torch.float32 and b.device.type == "cuda"
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.05, f"bf16 logits on the GPU differ from float32 by {rel:.3f} (relative norm)"


def _forwards(model, decode: int = 3) -> list[torch.Tensor]:
    return hf_models.forwards(model, decode)


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_the_gpu_forward_is_deterministic(tiny, family):
    # qwen2_moe and olmoe route top-4: with atomic adds in the expert combine their logits moved by ~1e-6 run to run
    model = _on_device(t := tiny[family])
    assert model.args.top_k >= 2, t.family
    a, b = _forwards(model), _forwards(model)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{family}: forward {i} differs between two identical runs by {(x - y).abs().max():.2e}"


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_dense_offload_on_the_gpu_is_bit_exact(tiny, family):
    t = tiny[family]
    ref = _forwards(_on_device(t))
    wp = {"dense_offload": True, "prefetch_ratio": {"attn": {"qkv": 0.5, "o": 0.5}, "mlp": {"gate_up": 0.5,
                                                                                             "down": 0.5}}}
    model = _on_device(t, weight_prefetch=wp)
    got = _forwards(model)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b), f"{family}: forward {i} differs from offload off by {(a - b).abs().max():.2e}"
    assert all(s.device.type == "cuda" for s in model.offload.slots), "dense offload slots must be device memory"
    for lw in model.weights.layers:   # the kept layer weights are host tensors, pinned so the copy engine reads them
        for w in [lw.wq, lw.wk, lw.wv, lw.wo]:
            assert w.device.type == "cpu" and w.is_pinned(), "offloaded dense weights must be pinned host memory"
    s = model.dense_offload_stats()
    assert s["forwards"] == 4 and s["ahead_bytes"] > 0 and s["at_use_bytes"] > 0
    assert s["peak_resident_bytes"] <= sum(sorted(s["layer_bytes"])[-2:])


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, (1 << 16) - 1, 1 << 16, 3 * (1 << 16) + 17, 5 << 20])
def test_host_to_device_gives_the_exact_bytes(n):
    h2d = HostToDevice(DEV, chunk_bytes=1 << 16, slots=2)
    host = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    dev, ready = h2d.copy(host)
    assert dev.device.type == "cuda" and ready is not None and ready.query()
    np.testing.assert_array_equal(dev.cpu().numpy(), host)
    dst = torch.zeros(n + 8, dtype=torch.uint8, device=DEV)
    h2d.copy(host, dst=dst[4:4 + n])
    out = dst.cpu().numpy()
    np.testing.assert_array_equal(out[4:4 + n], host)
    assert not out[:4].any() and not out[4 + n:].any(), "a copy into a slice wrote outside it"


def test_host_to_device_waits_for_the_kernels_queued_on_a_recycled_block():
    # a block freed while a kernel queued on the caller's stream still writes it is handed out again at once: the
    # DMA into it must run after that kernel, or the kernel's late write lands in the copied bytes
    h2d = HostToDevice(DEV, chunk_bytes=1 << 20, slots=1)
    n = 4 << 20
    host = np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8)
    old = torch.empty(n, dtype=torch.uint8, device=DEV)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)   # ~0.1 s of GPU time queued ahead of the write below
    old.fill_(7)                      # queued: runs after the sleep
    ptr = old.data_ptr()
    del old                           # freed with the write still queued on the default stream
    dev, _ = h2d.copy(host)
    assert dev.data_ptr() == ptr, "the allocator did not recycle the block: the case is not exercised"
    torch.cuda.synchronize()
    np.testing.assert_array_equal(dev.cpu().numpy(), host)


def test_host_to_device_from_many_threads_while_the_gpu_computes():
    h2d = HostToDevice(DEV, chunk_bytes=1 << 20, slots=2)
    blobs = [np.random.default_rng(i).integers(0, 256, (3 << 20) + i * 4097, dtype=np.uint8) for i in range(8)]
    got: dict[int, torch.Tensor] = {}
    a = torch.randn(2048, 2048, device=DEV)
    stop = threading.Event()

    def busy():   # the default stream keeps computing: loads run on the copy stream beside it
        while not stop.is_set():
            a @ a
            torch.cuda.current_stream().synchronize()

    def load(i):
        got[i] = h2d.copy(blobs[i])[0]

    th = [threading.Thread(target=busy)] + [threading.Thread(target=load, args=(i,)) for i in range(8)]
    for x in th:
        x.start()
    for x in th[1:]:
        x.join()
    stop.set()
    th[0].join()
    for i, b in enumerate(blobs):
        np.testing.assert_array_equal(got[i].cpu().numpy(), b, err_msg=f"blob {i} landed wrong")


# -- ExpertWorker on the GPU, in a real Ray cluster ----------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_env(tmp_path_factory):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from safetensors.numpy import load_file

    from conftest import tiny_store
    root = tmp_path_factory.mktemp("cuda-ew")
    ckpt, man = tiny_store(root, f"file://{root}/nvme")
    ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, namespace="test-cuda",
             object_store_memory=256 << 20, logging_level="ERROR")
    yield {"root": root, "manifest": man, "weights": load_file(os.path.join(ckpt, "model.safetensors")), "ray": ray}
    ray.shutdown()


@pytest.fixture()
def gpu_worker(ray_env):
    """Factory of ExpertWorkers on the GPU; each is killed when its test ends, pass or fail (a failed test's
    traceback would otherwise keep the handle, and with it the GPU the next worker waits for)."""
    from actors.expert_worker import ExpertWorker
    from cluster.config import ClusterConfig
    from cluster.storage_tier import start_storage_actors
    ray, man, made = ray_env["ray"], ray_env["manifest"], []

    def make(name, budget_blobs, **kw):
        cfg = ClusterConfig.model_validate({
            "ray": {"namespace": f"test-cuda-{name}"},
            "tiers": [{"kind": "dram", "budget_bytes": 1 << 30},
                      {"kind": "nvme", "path": str(ray_env["root"] / "nvme")}],
            "tier_sets": {"default": ["dram", "nvme"]}})
        W = ray.remote(ExpertWorker).options(num_gpus=0.5, max_concurrency=16)
        made.append(W.remote(0, man.to_json(), budget_blobs * man.expert_bytes, start_storage_actors(cfg),
                             device="cuda", **kw))
        return made[-1]
    yield make
    for w in made:
        ray.kill(w)


def _reference(env, layer, expert, x):
    from conftest import expert_reference
    return expert_reference(env["weights"], layer, expert, x)


def _check_device_bytes(st: dict) -> None:
    """The residents' device tensors hold exactly what the index charges, within the budget; beyond them the
    allocator holds only the runtime's own buffers (cuBLAS's workspace), nothing left over from loads or calls."""
    assert st["device_resident_bytes"] == st["used_bytes"] <= st["budget_bytes"], \
        f"resident device tensors hold {st['device_resident_bytes']} bytes, the index charges {st['used_bytes']}, " \
        f"budget {st['budget_bytes']}"
    # cuBLAS keeps a workspace per (thread, stream) that ran a matmul: 32 MiB each on an H100 (torch 2.11; measured
    # 32 MiB after one caller, 96 MiB after concurrent ones); the actor has at most 16 call threads
    extra = st["device_allocated_bytes"] - st["device_resident_bytes"]
    assert 0 <= extra <= 16 * (32 << 20), f"{extra} bytes live on the GPU beyond the resident experts"


@pytest.mark.timeout(180)
def test_expert_worker_computes_on_the_gpu_within_its_budget(ray_env, gpu_worker):
    ray, man = ray_env["ray"], ray_env["manifest"]
    w = gpu_worker("exact", budget_blobs=3)
    rng = np.random.default_rng(0)
    H = man.model.hidden_size
    for step in range(8):
        layer = step % 2
        experts = [int(e) for e in rng.choice(4, size=3, replace=False)]
        counts = [int(c) for c in rng.integers(1, 5, size=3)]
        x = rng.standard_normal((sum(counts), H)).astype(np.float32)
        y = ray.get(w.compute.remote(layer, experts, counts, x))
        start = 0
        for e, n in zip(experts, counts):
            torch.testing.assert_close(torch.from_numpy(np.array(y[start:start + n])),
                                       _reference(ray_env, layer, e, x[start:start + n]), rtol=1e-5, atol=1e-5)
            start += n
        st = ray.get(w.stats.remote())
        assert st["device"].startswith("cuda"), f"the worker runs on {st['device']}, not the GPU"
        assert st["used_bytes"] <= st["budget_bytes"] == 3 * man.expert_bytes
        _check_device_bytes(st)
    st = ray.get(w.stats.remote())
    assert st["misses"] == st["loads"] and st["evictions"] > 0 and st["hits"] + st["misses"] == 24
    # two slots of two pinned chunks, each chunk at most one expert (page-rounded): not 2 x 32 MiB per slot
    assert 0 < st["pinned_staging_bytes"] <= 2 * 2 * -(-man.expert_bytes // 4096) * 4096, st["pinned_staging_bytes"]


@pytest.mark.timeout(180)
def test_expert_worker_prefetch_on_the_gpu_turns_misses_into_hits(ray_env, gpu_worker):
    ray, man = ray_env["ray"], ray_env["manifest"]
    w = gpu_worker("prefetch", budget_blobs=8, prefetch_concurrency=2)
    assert ray.get(w.prefetch.remote([(1, e, float(e), "r") for e in range(4)])) == 4
    deadline = time.time() + 20
    while ray.get(w.stats.remote())["prefetch_loads"] < 4 and time.time() < deadline:
        time.sleep(0.02)
    x = np.random.default_rng(1).standard_normal((4, man.model.hidden_size)).astype(np.float32)
    y = ray.get(w.compute.remote(1, [0, 1, 2, 3], [1, 1, 1, 1], x))
    for e in range(4):
        torch.testing.assert_close(torch.from_numpy(np.array(y[e:e + 1])), _reference(ray_env, 1, e, x[e:e + 1]),
                                   rtol=1e-5, atol=1e-5)
    st = ray.get(w.stats.remote())
    assert st["hits"] == 4 and st["misses"] == 0 and st["prefetch_hits"] == 4
    _check_device_bytes(st)
