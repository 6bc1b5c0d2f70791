"""The one configuration of the cluster: `ray_config.yaml` loaded into pydantic models, validated once at start
and passed down. An invalid file fails before anything starts, naming the file, the key path and what is wrong.

Byte sizes accept integers or strings like "512MiB" / "8GB". Relative paths resolve against the config file's
folder. Environment variables are read here and only here (encryption keys named by `key_env`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

EMBEDDED = "embedded"  # endpoint_url value: start a local S3-compatible server (moto) for the demo


class ConfigError(ValueError):
    """The configuration file is invalid; the message names file, key path and problem."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RayConfig(_Model):
    address: str | None = None          # None: start a local Ray; "auto" or "ray://host:10001": join a cluster
    namespace: str = "moe-expert-cluster"
    runtime_env: dict = Field(default_factory=dict)
    num_cpus: int | None = None
    object_store_memory: ByteSize | None = None


class EncryptionConfig(_Model):
    key_file: str | None = None
    key_env: str | None = None

    @model_validator(mode="after")
    def _one(self):
        if bool(self.key_file) == bool(self.key_env):
            raise ValueError("give exactly one of key_file or key_env")
        return self


class DramTier(_Model):
    kind: Literal["dram"]
    name: str = "dram"
    budget_bytes: ByteSize               # per node, in the Ray object store


class LinkEmulation(_Model):
    """Make the tier's reads take what a link would take (storage_adapters/emulated.py): each read occupies one of
    `channels` for latency_s + bytes / bandwidth_Bps, as a sleep after the real read. For benchmarks and tests on
    machines whose local reads would otherwise be instant or CPU-bound; never needed in production."""
    latency_s: float = Field(ge=0, le=10)
    bandwidth_Bps: float = Field(gt=0)
    channels: int = Field(8, ge=1, le=1024)
    # split a read over the channels free when it starts, one part per split_min_bytes at least, as the real
    # adapters split one (parallel ranged GETs / chunks); None: a read holds one channel
    split_min_bytes: ByteSize | None = Field(None, ge=1)


class NvmeTier(_Model):
    kind: Literal["nvme"]
    name: str = "nvme"
    path: str                            # store root on each node's local disk (a full copy of the store)
    chunk_bytes: ByteSize = ByteSize(4 << 20)
    parallelism: int = Field(8, ge=1, le=256)
    o_direct: bool = True
    encryption: EncryptionConfig | None = None
    emulate: LinkEmulation | None = None      # benchmarks: reads take a modelled link's time (see LinkEmulation)

    @field_validator("chunk_bytes")
    @classmethod
    def _aligned(cls, v):
        if v % 4096:
            raise ValueError("must be a multiple of 4096 (O_DIRECT alignment)")
        return v


class RetryConfig(_Model):
    max_attempts: int = Field(6, ge=1, le=50)
    base_delay_s: float = Field(0.05, gt=0)
    max_delay_s: float = Field(2.0, gt=0)


class S3Tier(_Model):
    kind: Literal["s3"]
    name: str = "s3"
    uri: str                             # s3://bucket/prefix
    endpoint_url: str | None = None      # None: AWS; "embedded": a local moto server started by the job
    region: str = "us-east-1"
    max_connections: int = Field(16, ge=1, le=1024)
    part_bytes: ByteSize = ByteSize(8 << 20)      # smallest ranged GET a blob is split into
    adaptive_parts: bool = True                   # learn how many parts pay off (storage_adapters/tuning.py)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    retry: RetryConfig = RetryConfig()
    encryption: EncryptionConfig | None = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, v):
        if not v.startswith("s3://") or len(v) <= 5 or v[5] == "/":
            raise ValueError("must look like s3://bucket/prefix")
        return v


Tier = Annotated[Union[DramTier, NvmeTier, S3Tier], Field(discriminator="kind")]


class MissRates(_Model):
    """Rates for the per-miss choice between waiting for a transfer and computing on the CPU from the DRAM tier
    (policies/cost_model.py); `measure` refines link_Bps from the worker's own loads."""
    link_Bps: float = Field(gt=0)
    link_latency_s: float = Field(0.0, ge=0)
    device_flops: float = Field(gt=0)
    cpu_flops: float = Field(gt=0)
    measure: bool = False


class WorkersConfig(_Model):
    count: int = Field(2, ge=1)
    hbm_budget_bytes: ByteSize = ByteSize(256 << 20)
    num_gpus_per_worker: float = Field(0, ge=0)   # 0 on CPU machines; 1 per GPU worker on GPU nodes
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # how a MoE layer reaches the workers: plain actor calls, or a Ray Compiled Graph on the steady decode path
    # (every expert resident), falling back to plain calls for a worker that misses
    dispatch: Literal["plain", "compiled"] = "plain"
    # which worker owns which experts: "balanced" spreads each layer's experts over the workers (a layer runs on
    # all of them in parallel: best for prefill and large batches); "by_layer" gives each worker whole layers, so a
    # MoE layer is one worker call (best for decode latency: a Ray round trip is most of a small layer's cost)
    placement: Literal["balanced", "by_layer"] = "balanced"
    # prefetch loads a worker runs at once: on a latency-bound tier (S3, a remote node) the win comes from many
    # reads in flight; on a local tier a few suffice (each also costs the worker CPU)
    prefetch_concurrency: int = Field(2, ge=1, le=64)
    # GPU workers: host -> HBM copies go through pinned staging in chunks of h2d_chunk_bytes (capped at one expert),
    # each chunk's host memcpy split over h2d_copy_threads threads while the previous chunk's DMA runs (one core's
    # memcpy is ~7x slower than the DMA on an H100 host: docs/benchmarks.md "GPU"). Unused on CPU workers.
    h2d_chunk_bytes: ByteSize = Field(ByteSize(32 << 20), ge=4096)
    h2d_copy_threads: int = Field(8, ge=1, le=64)
    # None: a miss always waits for its load into the cache; else the cost model decides per miss
    miss_rates: MissRates | None = None


class StorageActorsConfig(_Model):
    per_node: int = Field(1, ge=1)
    max_concurrency: int = Field(32, ge=1)
    num_cpus: float = Field(0.5, ge=0)


class TierCost(_Model):
    latency_s: float = Field(ge=0)
    bandwidth_Bps: float = Field(gt=0)


class TenantAccess(_Model):
    models: list[str] | None = None      # None: every model
    tiers: list[str] | None = None       # None: every tier


class TenantAuth(_Model):
    """One tenant of the Serve endpoint (docs/security.md). Its API keys are stored as SHA-256 hex digests
    (`python -m jobs.hash_api_key`), never in clear; two digests during a rotation (old and new key both work)."""
    api_key_sha256: list[str] = Field(min_length=1, repr=False)
    models: list[str] | None = None      # served model names it may use (auth.models); None: all of them
    tier_sets: list[str] | None = None   # TierSets it may use, its default first; None: any (default: the active)

    @field_validator("api_key_sha256")
    @classmethod
    def _digests(cls, v):
        out = []
        for i, h in enumerate(v):   # never echo the value: a key pasted here by mistake must not reach a log
            s = h.strip().lower()
            if len(s) != 64 or not set(s) <= set("0123456789abcdef"):
                raise ValueError(f"[{i}] must be a SHA-256 digest (64 hex characters, python -m jobs.hash_api_key), "
                                 f"got {len(s)} characters")
            out.append(s)
        return out


class AuthConfig(_Model):
    """API keys and tenants of the Serve endpoint. Off by default: the local demo needs no key."""
    enabled: bool = False
    models: list[str] = Field(default_factory=lambda: ["moe-expert-cluster"], min_length=1)  # names served here
    tenants: dict[str, TenantAuth] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _tenants(self):
        if self.enabled and not self.tenants:
            raise ValueError("enabled is true but no tenants are configured: nobody could call the endpoint")
        owner: dict[str, str] = {}
        for name, t in self.tenants.items():
            unknown = [m for m in t.models or [] if m not in self.models]
            if unknown:
                raise ValueError(f"tenants.{name}.models: unknown models {unknown} (served: {self.models})")
            for i, h in enumerate(t.api_key_sha256):
                if owner.get(h, name) != name:
                    raise ValueError(f"tenants.{name}.api_key_sha256[{i}]: the same key is listed for tenant "
                                     f"{owner[h]!r}; a key must name one tenant")
                owner[h] = name
        return self

    def tenant_of(self, key: str) -> str | None:
        """The tenant whose key this is, or None. Digests compared in constant time, every one of them, so the
        time taken says nothing about which digest (or how much of one) matched."""
        import hashlib
        import hmac
        d = hashlib.sha256(key.encode()).hexdigest().encode()
        found = None
        for name, t in self.tenants.items():
            for h in t.api_key_sha256:
                if hmac.compare_digest(d, h.encode()):
                    found = name
        return found


def hash_api_key(key: str) -> str:
    """The SHA-256 hex digest of an API key, as `auth.tenants.<name>.api_key_sha256` lists it."""
    import hashlib
    assert key and key == key.strip(), "an API key must be non-empty, without surrounding whitespace"
    return hashlib.sha256(key.encode()).hexdigest()


class PrefetchConfig(_Model):
    """The PrefetchCoordinator (actors/prefetch_coordinator.py, docs/coordinator.md). policy on_demand: no
    coordinator at all (no routing traffic)."""
    policy: str = "on_demand"            # a predictor name of policies/registry.py PREDICTOR_NAMES
    lookahead_layers: int = Field(2, ge=0, le=128)   # the initial window, in MoE layers ahead
    lookahead_tokens: int = Field(3, ge=0, le=64)    # the window grows up to this many tokens (x MoE layers)
    max_inflight_bytes: ByteSize = ByteSize(256 << 20)   # global cap on bytes of orders in flight
    threshold: float = Field(0.05, gt=0, le=1)       # minimum P(selected) of a candidate
    hbm_confirm_prob: float = Field(0.5, gt=0, le=1)  # below: never displaces a resident (staged to DRAM instead)
    stage_to_dram: bool = True
    value_residents: bool = True                     # residents keep their learned next-token reuse value
    eviction_hints: bool = False                     # workers evict by the planner's resident values on a miss
    layer_time_s: float | None = Field(None, gt=0)   # caps the stall a prefetch can hide (lead time)
    planner_engine: Literal["compiled", "numpy"] = "compiled"   # numpy: the planner's reference (~3x the time)
    latency_ref_s: float = Field(0.1, gt=0)          # a request latency budget equal to this: neutral
    tier_costs: dict[Literal["peer", "dram", "nvme", "s3"], TierCost] | None = None   # planner's defaults if None
    tenants: dict[str, TenantAccess] | None = None   # None: no access control; else unknown tenants are denied
    refresh_s: float = Field(0.05, gt=0)             # how often the coordinator re-reads workers' residency
    adapt_every: int = Field(16, ge=1)               # decision steps between window adaptations
    expiry_steps: int = Field(64, ge=1)              # a prefetch unused for this many steps counts as wasted
    # a live request that its runtime's last this-many routing batches did not name is forgotten (its end never
    # reached the coordinator: a client gone, a runtime that crashed), so nothing more is prefetched for it; a
    # runtime silent for this many batches per runtime heard of loses its requests alike
    request_idle_batches: int = Field(512, ge=1)
    # the runtime sends one batch per this many MoE layers (and at each forward's last): every coordinator step
    # costs CPU beside the decode loop, and with the fast path below covering the next layers a per-layer step
    # bought nothing (measured: docs/benchmarks.md, session 6)
    publish_every_layers: int = Field(4, ge=1)
    max_pending_batches: int = Field(16, ge=1)       # calls queued at the coordinator (all runtimes) before refusing
    # a runtime's publish calls outstanding at most; routing flushed meanwhile is held and goes in one later call
    # (each call costs the coordinator's process ~0.5 ms of Ray's CPU: docs/benchmarks.md session 21)
    publish_inflight: int = Field(2, ge=1)
    publish_backlog_layers: int = Field(256, ge=1)   # held layer events per runtime before the oldest are dropped
    # the coordinator's orders come back in its publish replies and ride with the runtime's next compute call to
    # each worker (a prefetch call of their own only to a worker the layer does not call), instead of a Ray call
    # per worker from the coordinator
    orders_ride: bool = True
    publish_hidden: bool = True                      # send hidden states (predictors that use them need it)
    # the runtime's fast path (policies/fast_path.py): with a hidden-state policy (next_gate, learned, pre_gated,
    # ensemble), or any policy given speculate_source (transition: routing history only), the forward pass
    # predicts the next `speculate_layers` MoE layers and orders the likely experts from their owners before the
    # layer computes, without the hop to the coordinator (0: off)
    # 4 rather than 3 (session 11): on the embedded model (4 MoE layers) a depth of L wraps onto each layer's next
    # token, so the fast path values every layer; learned hit rate 0.80-0.82 against 0.77 (docs/benchmarks.md)
    speculate_layers: int = Field(4, ge=0, le=8)       # capped by the source (learned: its horizon; pre_gated: 1)
    # a fast-path order's minimum P and per-row count per layer; None: the source's default (policies/fast_path.py
    # order_filter: 0.35 and top_k + 1 for hidden-state sources, 0.5 and top_k for transition; docs/benchmarks.md
    # sessions 7 and 12)
    speculate_threshold: float | None = Field(None, gt=0, le=1)
    speculate_fanout: int | None = Field(None, ge=1)
    # the fast path's latest P of every expert at the layers it predicts rides to the owner as the cache's eviction
    # value (lowest evicted first, instead of the cache policy's order); off while the coordinator's eviction_hints
    # decide instead. Learned, embedded link run: hit rate 0.79 against 0.75, 11% fewer loads (docs/benchmarks.md
    # session 8)
    speculate_values: bool = True
    # the runtime values the experts of each layer it routes by P(the next token selects them there), from a
    # same-layer transition model learned online (policies/reuse.py TransitionReuse); the values ride to their
    # holders as eviction values, like speculate_values (which replace them for the layers the fast path
    # predicts). Off while the coordinator's eviction_hints decide, and when every expert fits. Offline on the
    # shared traces: 1.1-1.5x LRU's hit rate with demand loads alone (docs/benchmarks.md session 9)
    reuse_values: bool = True
    # the reuse values mix a second, long-memory transition table of every request's routing in (policies/reuse.py
    # MixedReuse), weighted per layer by how well each predicted the routing that came; warm-started from
    # `routing_prior`. null: on when there is a routing prior. Offline on the shared traces: hit rate 0.462 -> 0.483
    # on DeepSeek-V2-Lite with a prior of 400 other requests, unchanged (+-0.003) on gpt-oss-20b and Mixtral, and no
    # gain without a prior; it doubles the hook's deferred CPU (docs/benchmarks.md session 16)
    reuse_memory: bool | None = None
    # a routing prior (python -m jobs.train_predictor --routing-prior) to start that table from; None: the store's
    # routing_prior.npz (beside the NVMe tier's files) when there. A prior whose geometry does not match the model
    # is an error at start
    routing_prior: str | None = None
    # auto: the policy's own source (ensemble: the best hidden-state one available; other policies: none). With
    # policy on_demand a source runs the fast path alone, with no coordinator (an error at start if the store lacks
    # it): on the 2-core machine as many hits as `learned` and 7-25% more tokens/s (docs/benchmarks.md session 11)
    speculate_source: Literal["auto", "learned", "pre_gated", "next_gate", "transition"] = "auto"
    max_restarts: int = Field(3, ge=0)

    @field_validator("policy")
    @classmethod
    def _known(cls, v):
        from policies.registry import PREDICTOR_NAMES
        if v not in PREDICTOR_NAMES:
            raise ValueError(f"unknown prefetch policy {v!r}; valid: {', '.join(PREDICTOR_NAMES)}")
        return v

    @model_validator(mode="after")
    def _prior_needs_memory(self):
        if self.routing_prior is not None and not (self.reuse_values and self.reuse_memory is not False):
            raise ValueError(f"prefetch.routing_prior {self.routing_prior!r} is set, but the table it warm-starts is "
                             "off: it needs prefetch.reuse_values and prefetch.reuse_memory")
        return self

    @model_validator(mode="after")
    def _costs(self):
        if self.tier_costs is not None:  # plain dicts for the pure planner
            object.__setattr__(self, "tier_costs", {k: v.model_dump() if hasattr(v, "model_dump") else v
                                                    for k, v in self.tier_costs.items()})
        if self.tenants is not None:
            object.__setattr__(self, "tenants", {k: v.model_dump() if hasattr(v, "model_dump") else v
                                                 for k, v in self.tenants.items()})
        return self


class _Ratios(_Model):
    """Fractions in [0, 1]; an unknown key is rejected naming the valid ones."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, v):
        if isinstance(v, dict):
            bad = [k for k in v if k not in cls.model_fields]
            if bad:
                raise ValueError(f"unknown key{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} "
                                 f"(valid: {', '.join(cls.model_fields)})")
        return v


class AttnRatios(_Ratios):
    qkv: float = Field(1.0, ge=0, le=1)
    o: float = Field(1.0, ge=0, le=1)


class MoeRatios(_Ratios):
    gate_up: float = Field(0.8, ge=0, le=1)


class MlpRatios(_Ratios):
    gate_up: float = Field(1.0, ge=0, le=1)
    down: float = Field(1.0, ge=0, le=1)


class PrefetchRatios(_Ratios):
    attn: AttnRatios = AttnRatios()
    moe: MoeRatios = MoeRatios()
    mlp: MlpRatios = MlpRatios()


class WeightPrefetchConfig(_Ratios):
    """Ratio-based partial prefetch (docs/weight_prefetch.md). Enabled: a prefetch of an expert moves only the first
    `prefetch_ratio.moe.gate_up` of its gate/up rows; the rest and down are read when the expert is routed, while
    the rows already there compute. Disabled (default): whole experts, as before.
    `dense_offload` (independent of `enabled`): each decoder layer's attention projections and dense MLP / shared
    expert live in host memory; the runtime prefetches `attn`/`mlp` ratios of their rows one layer ahead (at most
    `max_prefetch_bytes_per_layer` per layer) and copies the rest when the layer starts (cluster/model.py
    `DenseOffload`). Off: dense weights stay on the runtime's device and attn/mlp are unused."""
    enabled: bool = False
    prefetch_ratio: PrefetchRatios = PrefetchRatios()
    max_prefetch_bytes_per_layer: ByteSize = ByteSize(18 << 20)   # per worker, partial bytes one layer may hold
    dense_offload: bool = False                                   # dense layer weights in host memory (above)

    @field_validator("max_prefetch_bytes_per_layer")
    @classmethod
    def _positive(cls, v):
        if v <= 0:
            raise ValueError("must be > 0 bytes")
        return v


class TelemetryConfig(_Model):
    # the level of the project's loggers (cluster, actors, storage_adapters, policies, jobs) in the driver and in
    # the storage actors, which are the processes that log
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    stats_path: str | None = None        # ExpertCluster writes its stats() here as JSON when it shuts down


LOGGERS = ("cluster", "actors", "storage_adapters", "policies", "jobs")


def apply_log_level(tel: TelemetryConfig) -> None:
    """Set telemetry.log_level on the project's loggers in this process. Where nothing handles their records (a
    plain driver script: Python's last-resort handler shows warnings only), they get a stderr handler of their own."""
    bare = not logging.getLogger().handlers
    for name in LOGGERS:
        lg = logging.getLogger(name)
        lg.setLevel(tel.log_level)
        if bare and not any(getattr(h, "_moe", False) for h in lg.handlers):
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            h._moe = True
            lg.addHandler(h)


class ClusterConfig(_Model):
    ray: RayConfig = RayConfig()
    workers: WorkersConfig = WorkersConfig()
    tiers: list[Tier]
    tier_sets: dict[str, list[str]] = Field(default_factory=dict)
    active_tier_set: str = "default"
    storage_actors: StorageActorsConfig = StorageActorsConfig()
    prefetch: PrefetchConfig = PrefetchConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    auth: AuthConfig = AuthConfig()
    weight_prefetch_config: WeightPrefetchConfig = WeightPrefetchConfig()

    @model_validator(mode="after")
    def _consistent(self):
        names = [t.name for t in self.tiers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tiers: duplicate tier names {dup}")
        if sum(isinstance(t, DramTier) for t in self.tiers) > 1:
            raise ValueError("tiers: at most one dram tier (it is per node)")
        if not any(isinstance(t, (NvmeTier, S3Tier)) for t in self.tiers):
            raise ValueError("tiers: need at least one storage tier (nvme or s3) that holds the store")
        sets = dict(self.tier_sets) or {"default": names}
        for s, members in sets.items():
            unknown = [m for m in members if m not in names]
            if unknown:
                raise ValueError(f"tier_sets.{s}: unknown tiers {unknown} (defined: {names})")
        if self.active_tier_set not in sets:
            raise ValueError(f"active_tier_set: {self.active_tier_set!r} is not one of {sorted(sets)}")
        return self

    @model_validator(mode="after")
    def _tenant_tier_sets(self):
        """Tenants name defined TierSets; with auth on, the coordinator's access rules follow the tenants' TierSets
        (unless prefetch.tenants is given), so no prefetch reads a tier outside them."""
        sets = dict(self.tier_sets) or {"default": [t.name for t in self.tiers]}
        for name, t in self.auth.tenants.items():
            unknown = [s for s in t.tier_sets or [] if s not in sets]
            if unknown:
                raise ValueError(f"auth.tenants.{name}.tier_sets: unknown TierSets {unknown} (defined: {sorted(sets)})")
        if self.auth.enabled and self.prefetch.tenants is None:
            rules = {name: {"models": None, "tiers": None if t.tier_sets is None else
                            sorted({n for s in t.tier_sets for n in sets[s]})} for name, t in self.auth.tenants.items()}
            object.__setattr__(self, "prefetch", self.prefetch.model_copy(update={"tenants": rules}))
        return self

    # -- views ------------------------------------------------------------------------------------------------
    def tier_set(self, name: str) -> list[str]:
        """Tier names of the TierSet `name`, fastest first."""
        sets = self.tier_sets or {"default": [t.name for t in self.tiers]}
        if name not in sets:
            raise KeyError(f"no TierSet named {name!r} (defined: {sorted(sets)})")
        return list(sets[name])

    def tier(self, name: str):
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no tier named {name!r}")

    @property
    def active_tiers(self) -> list[str]:
        """Tier names of the active TierSet, in the order given (fastest first)."""
        return list((self.tier_sets or {"default": [t.name for t in self.tiers]})[self.active_tier_set])

    @property
    def storage_tiers(self) -> list[NvmeTier | S3Tier]:
        active = self.active_tiers
        return [t for t in self.tiers if isinstance(t, (NvmeTier, S3Tier)) and t.name in active]

    @property
    def dram(self) -> DramTier | None:
        return next((t for t in self.tiers if isinstance(t, DramTier) and t.name in self.active_tiers), None)


def _fmt_loc(loc) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("dram", "nvme", "s3") and out.endswith("]"):
            continue  # pydantic's discriminator tag in the path; the index already says which tier
        else:
            out += ("." if out else "") + str(p)
    return out or "(top level)"


def _resolve_paths(raw: dict, base: Path) -> dict:
    tiers = raw.get("tiers")
    for t in tiers if isinstance(tiers, list) else []:  # a non-list is reported by validation, not here
        if isinstance(t, dict) and t.get("kind") == "nvme" and isinstance(t.get("path"), str):
            t["path"] = str((base / os.path.expanduser(t["path"])).resolve())
        enc = t.get("encryption") if isinstance(t, dict) else None
        if isinstance(enc, dict) and isinstance(enc.get("key_file"), str):
            enc["key_file"] = str((base / os.path.expanduser(enc["key_file"])).resolve())
    tel = raw.get("telemetry")
    if isinstance(tel, dict) and isinstance(tel.get("stats_path"), str):
        tel["stats_path"] = str((base / os.path.expanduser(tel["stats_path"])).resolve())
    pf = raw.get("prefetch")
    if isinstance(pf, dict) and isinstance(pf.get("routing_prior"), str):
        pf["routing_prior"] = str((base / os.path.expanduser(pf["routing_prior"])).resolve())
    return raw


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> ClusterConfig:
    """Parse and validate; ConfigError names the file, the key path and the problem for every error found."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration: {e.strerror}") from e
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for k, v in (overrides or {}).items():
        raw[k] = v
    raw = _resolve_paths(raw, path.resolve().parent)
    try:
        return ClusterConfig.model_validate(raw)
    except ValidationError as e:
        # the auth section may hold a key pasted by mistake: its values are never echoed, nor chained
        secret = any(err["loc"][:1] == ("auth",) for err in e.errors())
        lines = [f"{path}: {_fmt_loc(err['loc'])}: {err['msg']}" +
                 (f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict)
                  and err["loc"][:1] != ("auth",) else "") for err in e.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from (None if secret else e)


def resolve_keys(cfg: ClusterConfig, environ=None) -> dict[str, bytes]:
    """tier name -> AES key for every encrypted tier; read once at start, never logged."""
    from storage_adapters.tiers import keys_for
    return keys_for(cfg.storage_tiers, os.environ if environ is None else environ)
