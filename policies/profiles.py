"""Presets the simulator (policies/simulator.py) runs on: hardware, storage and model geometry, as small dataclasses.

Hardware: one GPU worker type (HBM size and bandwidth, usable FLOP/s, host->HBM link) plus its node (GPUs per
node, DRAM, NIC) and a $/GPU-hour figure for cost per token. Figures are datasheet values derated to what
transfers and decode kernels reach in practice; the derating is stated per field and in docs/simulator.md.
`local` is not a preset: `local_hardware(calib)` builds it from what this machine measured (jobs.benchmark writes
the numbers; see `calibrate` there).

Storage: the tier experts are read from when the node's DRAM does not hold them: a link of `channels` parallel
connections, each `bw_per_channel` bytes/s, with a first-byte latency per read.

Models: the real geometry of each MoE (layers x routed experts, top-k, shared experts, hidden and expert sizes, the
bytes per parameter of the released weights), from the models' config.json files.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

GB = 1e9
MB = 1e6


@dataclass(frozen=True)
class Hardware:
    name: str
    hbm_bytes: float            # per GPU
    hbm_bw: float               # bytes/s a decode kernel streams weights at (~85% of the datasheet's)
    flops: float                # usable dense bf16 FLOP/s (~50% of the datasheet's tensor-core peak)
    h2d_bw: float               # host DRAM -> HBM, bytes/s per GPU (pinned, one direction)
    h2d_latency: float          # s per transfer (driver + DMA setup)
    gpus_per_node: int
    dram_bytes: float           # per node
    net_bw: float               # node-to-node, bytes/s per node (NIC)
    net_latency: float          # s per transfer / per all-to-all hop
    layer_overhead: float       # s per MoE layer: router, dispatch and combine kernels / calls
    dense_s_per_layer: float    # s per decode layer for attention and norms (memory-bound, small batch)
    dollars_per_gpu_hour: float  # rental price assumption (docs/simulator.md says where it comes from)
    expert_s_override: float | None = None  # fixed compute s per expert call (the `local` profile measures it)
    h2d_channels: int = 1       # transfers a worker runs at once on its host link (bw is per transfer)
    load_cpu_s: float = 0.0     # s of the compute path's time one prefetch load's hand-off takes where loads and
                                # compute share CPU cores (0 on a GPU node: a DMA leaves the cores free)


# $/GPU-hour: assumptions, typical on-demand cloud prices in 2025 (community clouds for the 3090); see docs.
HARDWARE = {
    # the seed document's calibration: "~0.85 ms per expert" for its 28.5 MB experts -> 33.5 GB/s; faster than
    # PCIe Gen4 x16's 25 GB/s in practice, kept so that the seed tables can be reproduced on its own terms
    "rtx3090": Hardware("rtx3090", 24 * GB, 800 * GB, 35e12, 28.5 * MB / 0.85e-3, 10e-6, 4, 128 * GB,
                        25 / 8 * GB, 20e-6, 30e-6, 40e-6, 0.25),
    "a100-80gb-pcie": Hardware("a100-80gb-pcie", 80 * GB, 1650 * GB, 156e12, 24 * GB, 10e-6, 8, 1024 * GB,
                               200 / 8 * GB, 10e-6, 25e-6, 25e-6, 1.80),
    "h100-sxm": Hardware("h100-sxm", 80 * GB, 2850 * GB, 495e12, 50 * GB, 8e-6, 8, 2048 * GB,
                         400 / 8 * GB, 8e-6, 20e-6, 15e-6, 3.00),
}


@dataclass(frozen=True)
class Storage:
    name: str
    bw_per_channel: float       # bytes/s one connection / queue streams
    channels: int               # parallel reads in flight
    first_byte: float           # s before the first byte of a read arrives
    split_min_bytes: int = 0    # >0: a read also takes the free channels, one part per this many bytes at least


STORAGE = {
    "nvme-gen4": Storage("nvme-gen4", 1.7 * GB, 4, 90e-6),       # ~6.8 GB/s with 4 reads in flight
    "s3": Storage("s3", 90 * MB, 16, 30e-3),                     # per-connection ~90 MB/s, 16 connections
}


@dataclass(frozen=True)
class Model:
    name: str
    num_layers: int             # MoE layers
    num_experts: int            # routed experts per layer
    top_k: int
    hidden: int
    expert_inter: int           # intermediate size of one routed expert
    bytes_per_param: float
    matrices: int = 3           # SwiGLU gate/up/down; 2 for Switch's ReLU FFN
    shared_experts: int = 0     # always-active experts per layer (resident: computed, never loaded)
    dense_layers: int = 0       # extra dense-FFN layers (computed, never loaded)
    trace: str | None = None    # the shared trace recorded from this model, if any
    blob_bytes: int | None = None  # stored size of one expert when known exactly (a store's aligned blob)

    @property
    def expert_params(self) -> int:
        return self.matrices * self.hidden * self.expert_inter

    @property
    def expert_bytes(self) -> int:
        return self.blob_bytes or int(self.expert_params * self.bytes_per_param)

    @property
    def total_experts(self) -> int:
        return self.num_layers * self.num_experts


MODELS = {
    # Switch-Base-128: d_model 768, d_ff 3072, ReLU FFN, fp32 release; 12 MoE layers (every other of 12+12)
    "switch-base-128": Model("switch-base-128", 12, 128, 1, 768, 3072, 4.0, matrices=2),
    # Qwen1.5-MoE-A2.7B: 24 layers x 60 experts (I=1408), top-4, a shared expert of 4 x 1408 = 5632
    "qwen1.5-moe-a2.7b": Model("qwen1.5-moe-a2.7b", 24, 60, 4, 2048, 1408, 2.0, shared_experts=4),
    "mixtral-8x7b": Model("mixtral-8x7b", 32, 8, 2, 4096, 14336, 2.0,
                          trace="mixtral-8x7b-instruct_humaneval.jsonl"),
    "qwen3-30b-a3b": Model("qwen3-30b-a3b", 48, 128, 8, 2048, 768, 2.0),
    # DeepSeek-V3: 61 layers, the first 3 dense; 58 MoE layers x 256 routed (I=2048) + 1 shared, FP8 release
    "deepseek-v3": Model("deepseek-v3", 58, 256, 8, 7168, 2048, 1.0, shared_experts=1, dense_layers=3),
    "deepseek-v2-lite": Model("deepseek-v2-lite", 26, 64, 6, 2048, 1408, 2.0, shared_experts=2, dense_layers=1,
                              trace="deepseek-v2-lite_prefill.npz"),
    # gpt-oss-20b: MXFP4 experts, ~4.25 bits per parameter
    "gpt-oss-20b": Model("gpt-oss-20b", 24, 32, 4, 2880, 2880, 4.25 / 8, trace="gpt-oss-20b_decode.npz"),
    # the project's embedded model (jobs/embedded_model): 4 MoE layers x 16 experts, top-2, f32
    "embedded": Model("embedded", 4, 16, 2, 128, 64, 4.0),
}


def hardware(name: str, calib: dict | None = None) -> Hardware:
    if name == "local":
        if calib is None:
            raise ValueError("hardware 'local' needs the calibration JSON that `python -m jobs.benchmark policies` "
                             "writes (its `calibration` block): pass --calib PATH")
        return local_hardware(calib)
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(sorted(HARDWARE) + ['local'])}")
    return HARDWARE[name]


def storage(name: str) -> Storage:
    if name not in STORAGE:
        raise ValueError(f"unknown storage {name!r}; known: {', '.join(sorted(STORAGE))}")
    return STORAGE[name]


def model(name: str) -> Model:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def local_hardware(calib: dict) -> Hardware:
    """This machine as a profile, from measured figures (all keys required; jobs.benchmark measures them):
      load_s_per_expert   one expert DRAM tier -> worker cache, s (the `h2d` link; latency 0, bw = bytes / s)
      expert_bytes        the blob size that load time is for
      expert_s            one expert's compute on a decode batch, s (compute is not roofline-modelled here)
      layer_overhead_s    per MoE layer: grouping, one call to each worker, combine (the Ray floor included)
      concurrent_loads    loads a worker runs in parallel (its I/O pool)
    With a `link` block (a --tier link run) also handoff_s: s per load beyond the emulated link's modelled time
    (measured: on_demand's in-worker load time per load minus latency + bytes / bandwidth); it becomes the h2d
    hop's latency, and the storage link is local_storage(calib); and load_cpu_s: s of the layers' time one prefetch
    load's hand-off takes on the cores that compute (calibrate prices it at two Ray calls)."""
    need = ("load_s_per_expert", "expert_bytes", "expert_s", "layer_overhead_s", "concurrent_loads")
    missing = [k for k in need if k not in calib]
    if missing:
        raise ValueError(f"local calibration lacks {missing}; have {sorted(calib)}")
    if calib.get("link"):
        # --tier link: the storage link is the emulated one (local_storage); the h2d hop is what a load costs
        # beyond it: the storage actor's reply through the object store and the copy into the worker's cache
        h2d_bw, h2d_lat = 1e15, float(calib["handoff_s"])
    else:
        h2d_bw, h2d_lat = calib["expert_bytes"] / calib["load_s_per_expert"], 0.0
    return Hardware("local", 1e12, 1e12, 1e12, h2d_bw, h2d_lat, int(calib.get("workers_per_node", 64)), 1e12, 1e12,
                    0.0, calib["layer_overhead_s"], 0.0, 0.0, expert_s_override=calib["expert_s"],
                    h2d_channels=int(calib["concurrent_loads"]),
                    load_cpu_s=float(calib.get("load_cpu_s") or 0.0))


def local_storage(calib: dict) -> Storage:
    """The storage link of a `--tier link` calibration: the emulated link's own model (storage_adapters/emulated.py:
    `channels` reads at once per node, each latency_s + bytes / bandwidth_Bps, split over free channels when
    split_min_bytes is set), which is the simulator's Link. calib["link"] = {latency_s, bandwidth_Bps, channels[,
    split_min_bytes]}."""
    lk = calib.get("link")
    if not lk:
        raise ValueError("local_storage needs a --tier link calibration (its `link` block); got none")
    return Storage("local-link", float(lk["bandwidth_Bps"]), int(lk["channels"]), float(lk["latency_s"]),
                   int(lk.get("split_min_bytes") or 0))


def describe(obj) -> dict:
    return asdict(obj)


__all__ = ["Hardware", "Storage", "Model", "HARDWARE", "STORAGE", "MODELS", "hardware", "storage", "model",
           "local_hardware", "local_storage", "describe"]
