"""python -m jobs.bench_hbm [--sizes-mib 1,8,64,352] [--chunks 8:1,16:4,32:8] [--reps 5] --json OUT   (needs CUDA)

The last hop of an expert load: bytes in host shared memory (as Ray's object store keeps them, /dev/shm) into
device memory. Against the hardware's own bar, measured in the same run:
  pinned_GBps      a pinned host tensor -> device copy (cudaMemcpyAsync at its best: no host copy at all)
  pageable_GBps    torch.from_numpy(view).to(device): the naive path (the driver stages it internally)
  whole_stage_GBps memcpy of the whole blob into one pinned buffer, then one async copy (the worker before
                   actors/h2d.py)
  register_each_GBps  cudaHostRegister of the source in place, one DMA straight from it, unregister (per load)
  chunked_GBps     HostToDevice.copy (actors/h2d.py) per chunk size and copy threads: the host memcpy of chunk
                   i+1 (split over the threads) overlaps the DMA of chunk i
Each as a median over --reps, and as a ratio to pinned_GBps. Then overlap: a matmul loop on the default stream
alone, HostToDevice loads alone, and both at once: overlap = (t_compute + t_load - t_both) / min(t_compute, t_load)
(1: the load hides entirely behind compute; 0: they serialise).
352 MiB is one Mixtral-8x7B expert in bf16 (3 x 4096 x 14336 x 2 bytes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from multiprocessing import shared_memory

import numpy as np
import torch

from actors.h2d import HostToDevice


def _say(msg):
    print(f"[bench_hbm] {msg}", file=sys.stderr, flush=True)


def _timed(fn, reps: int) -> float:
    fn()   # warm: allocator, page faults of the destination
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_size(n: int, chunks: list[int], reps: int, dev: torch.device) -> dict:
    shm = shared_memory.SharedMemory(create=True, size=n)
    try:
        src = np.ndarray((n,), np.uint8, buffer=shm.buf)
        src[:] = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
        dst = torch.empty(n, dtype=torch.uint8, device=dev)
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        pinned.numpy()[:] = src
        r = {"bytes": n}
        r["pinned_s"] = _timed(lambda: dst.copy_(pinned, non_blocking=True), reps)
        r["pageable_s"] = _timed(lambda: dst.copy_(torch.from_numpy(src)), reps)

        def whole():
            np.copyto(pinned.numpy(), src)
            dst.copy_(pinned, non_blocking=True)
        r["whole_stage_s"] = _timed(whole, reps)
        del pinned
        for c, th in chunks:
            h = HostToDevice(dev, chunk_bytes=c, slots=1, copy_threads=th)
            r[f"chunked_{c >> 20}MiB_{th}t_s"] = _timed(lambda: h.copy(src, dst=dst), reps)
            assert torch.equal(dst[:: max(1, n // 4096)].cpu(), torch.from_numpy(src[:: max(1, n // 4096)])), \
                f"chunked copy of {n} bytes landed wrong"
        cudart, t = torch.cuda.cudart(), torch.from_numpy(src)

        def registered():   # page-lock the source in place, DMA straight from it, unlock
            assert int(cudart.cudaHostRegister(src.ctypes.data, n, 0)) == 0, "cudaHostRegister failed"
            try:
                dst.copy_(t, non_blocking=True)
                torch.cuda.current_stream().synchronize()
            finally:
                cudart.cudaHostUnregister(src.ctypes.data)
        r["register_each_s"] = _timed(registered, reps)
        base = r["pinned_s"]
        for k in [k for k in r if k.endswith("_s")]:
            r[k[:-2] + "_GBps"] = n / r[k] / 1e9
            r[k[:-2] + "_vs_pinned"] = base / r[k]
        del src
        return r
    finally:
        shm.close()
        shm.unlink()


def bench_overlap(n: int, chunk: int, dev: torch.device, iters: int = 40) -> dict:
    shm = shared_memory.SharedMemory(create=True, size=n)
    try:
        src = np.ndarray((n,), np.uint8, buffer=shm.buf)
        src[:] = 7
        h = HostToDevice(dev, chunk_bytes=chunk, slots=1, copy_threads=4)
        dst = torch.empty(n, dtype=torch.uint8, device=dev)
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

        def compute():
            for _ in range(iters):
                a @ a
            torch.cuda.current_stream().synchronize()

        def load(k=4):
            for _ in range(k):
                h.copy(src, dst=dst)

        compute(), load(1)   # warm
        t0 = time.perf_counter(); compute(); tc = time.perf_counter() - t0
        t0 = time.perf_counter(); load(); tl = time.perf_counter() - t0
        th = threading.Thread(target=load)
        t0 = time.perf_counter()
        th.start()
        compute()
        th.join()
        tb = time.perf_counter() - t0
        del src
        return {"bytes": n, "loads": 4, "compute_s": tc, "load_s": tl, "both_s": tb,
                "overlap": (tc + tl - tb) / min(tc, tl)}
    finally:
        shm.close()
        shm.unlink()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mib", default="1,8,64,352")
    ap.add_argument("--chunks", default="8:1,16:4,32:8", help="HostToDevice settings: chunk MiB:copy threads, ...")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (this benchmark times host -> device copies)")
    dev = torch.device("cuda")
    chunks = [(int(float(c) * (1 << 20)), int(t)) for c, t in (x.split(":") for x in a.chunks.split(","))]
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "sizes": []}
    _say(f"{out['device']}, torch {torch.__version__}")
    cols = ["pageable", "whole_stage", "register_each"] + [f"chunked_{c >> 20}MiB_{t}t" for c, t in chunks]
    print(f"{'MiB':>6} {'pinned GB/s':>12} " + " ".join(f"{c:>16}" for c in cols) + "   (x pinned)")
    for s in a.sizes_mib.split(","):
        r = bench_size(int(float(s) * (1 << 20)), chunks, a.reps, dev)
        out["sizes"].append(r)
        print(f"{float(s):>6g} {r['pinned_GBps']:>12.1f} " + " ".join(f"{r[c + '_vs_pinned']:>16.2f}" for c in cols),
              flush=True)
    out["overlap"] = bench_overlap(64 << 20, 16 << 20, dev)
    o = out["overlap"]
    print(f"overlap: compute {o['compute_s'] * 1e3:.1f} ms, 4 loads of 64 MiB {o['load_s'] * 1e3:.1f} ms, "
          f"both {o['both_s'] * 1e3:.1f} ms -> overlap {o['overlap']:.2f}")
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
