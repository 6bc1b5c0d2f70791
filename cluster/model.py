"""The model runtime: a whole Mixture-of-Experts decoder in one file, gpt-fast style.

Families: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE, built from a Hugging Face `config.json` dict (`ModelArgs`) and
the checkpoint's dense weights under their checkpoint names (`dense.safetensors` of the store: everything except
the routed experts). Routed experts are NOT computed here: every MoE layer hands its tokens to an injected
`ExpertBackend` (in one process `LocalExperts`; in the cluster, the ExpertWorkers), after an optional `on_route`
hook that lets the cluster publish the routing event before the experts run.

    args   = ModelArgs.from_config(config)                         # config.json as a dict
    model  = MoEModel.from_dense(config, dense, LocalExperts(experts), device="cuda", dtype=torch.bfloat16)
    tokens = generate(model, [[1, 5, 7], [1, 9]], max_new_tokens=32)   # greedy; temperature/top_p/seeds to sample

Dense offload (`weight_prefetch=` a weight_prefetch_config with dense_offload on; `DenseOffload`): the layers'
attention projections and dense MLP / shared-expert weights live in host memory and stream to the device one layer
ahead, by the config's attn/mlp ratios; the logits are bit-for-bit those of device-resident weights.

Batching: requests of different lengths share one forward, RIGHT-padded. Each sequence b keeps its own length
`cache.lens[b]` (a host-side list), its tokens sit at KV-cache slots 0..lens[b]-1, and the slot of a token is its
RoPE position. A forward over `tokens [B, T]` with `n_new[b]` real tokens per row gives token t of row b the
position `lens[b] + t`, writes K/V only for real tokens, and lets it attend to slots j <= its position. Padding
never reaches the cache or the experts (MoE and dense MLPs run on the packed real tokens only), so every
sequence's logits are what it would get alone. Decode is the same forward with T = 1 and n_new[b] in {0, 1}
(0 for a finished sequence: it costs attention on one padded query, nothing else).

Shapes in comments: B batch, T new tokens per row, S attended cache slots, M real (non-padding) tokens of a forward,
H hidden, V vocab, nH query heads, nKV key/value heads, D head dim, E experts, k experts per token, I expert width.
No Ray here: this file is pure torch and runs the same on CPU and CUDA tensors.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ROPE_TYPES = ("default", "linear", "yarn")


class UnsupportedModelError(ValueError):
    """The config asks for something this runtime does not implement (family, activation, RoPE type, ...)."""


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
# transformers 5.x config-class defaults for keys a config.json may leave out (configuration_<family>.py).
_FAMILY_DEFAULTS: dict[str, dict] = {
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=4096 * 32, eos_token_id=2,
                    bos_token_id=1, pad_token_id=None, num_experts_per_tok=2, num_local_experts=8,
                    num_key_value_heads=8),
    "qwen2_moe": dict(rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=32768, eos_token_id=None,
                      bos_token_id=None, pad_token_id=None, num_experts_per_tok=4, num_experts=60,
                      num_key_value_heads=16, qkv_bias=True, norm_topk_prob=False, decoder_sparse_step=1,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632),
    "qwen3_moe": dict(rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=32768, eos_token_id=None,
                      bos_token_id=None, pad_token_id=None, num_experts_per_tok=8, num_experts=128,
                      num_key_value_heads=4, attention_bias=False, norm_topk_prob=False, decoder_sparse_step=1,
                      moe_intermediate_size=768),
    "olmoe": dict(rms_norm_eps=1e-5, rope_theta=10_000.0, max_position_embeddings=4096, eos_token_id=50279,
                  bos_token_id=None, pad_token_id=1, num_experts_per_tok=8, num_experts=64, attention_bias=False,
                  norm_topk_prob=False, clip_qkv=None),
}
assert tuple(_FAMILY_DEFAULTS) == SUPPORTED_FAMILIES


def _get(cfg: dict, defaults: dict, *keys: str):
    """First key present (and not None) in config.json, else the family default, else None."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    for k in keys:
        if defaults.get(k) is not None:
            return defaults[k]
    return None


@dataclass(frozen=True)
class ModelArgs:
    family: str
    vocab_size: int
    hidden_size: int                      # H
    num_layers: int
    num_heads: int                        # nH
    num_kv_heads: int                     # nKV (GQA when < nH)
    head_dim: int                         # D (Qwen3 decouples it from H / nH)
    rms_norm_eps: float
    rope_theta: float
    rope_type: str                        # "default" | "linear" | "yarn"
    rope_scaling: dict                    # the rope_parameters beyond theta/type (factor, ...), {} for default
    max_position_embeddings: int
    num_experts: int                      # E
    top_k: int                            # k
    norm_topk_prob: bool                  # renormalise the top-k probabilities to sum 1 (Mixtral: always)
    moe_intermediate_size: int            # I of a routed expert
    dense_intermediate_size: int          # width of a dense-MLP layer (Qwen mlp_only_layers / sparse step)
    shared_expert_intermediate_size: int  # Qwen2-MoE's shared expert (0: none)
    moe_layers: tuple[int, ...]           # layers whose MLP is routed; the others run a dense SwiGLU MLP
    qkv_bias: bool
    o_bias: bool
    qk_norm: str                          # "none" | "per_head" (Qwen3: over D) | "full" (OLMoE: over nH*D)
    clip_qkv: float | None                # OLMoE: clamp q, k, v to [-c, c] after the norms
    sliding_window: int | None            # window if any layer uses one; only contexts <= it are supported
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """Read a Hugging Face config.json dict with transformers 5.23's semantics for the supported families."""
        family = config.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(f"unsupported model family {family!r} (config.json model_type); "
                                        f"supported: {', '.join(SUPPORTED_FAMILIES)}")
        d = _FAMILY_DEFAULTS[family]

        def need(*keys):
            v = _get(config, d, *keys)
            if v is None:
                raise UnsupportedModelError(f"{family} config.json lacks {' or '.join(keys)}")
            return v

        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{family}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
        H, n_layers, nH = int(need("hidden_size")), int(need("num_hidden_layers")), int(need("num_attention_heads"))
        # absent: the family's default (Mixtral 8, like its config class); an explicit null: one per attention head
        nKV = int(config.get("num_key_value_heads", d.get("num_key_value_heads")) or nH)
        # Mixtral/Qwen3/OLMoE: `head_dim` if set (and not null), else H // nH
        D = int(config.get("head_dim") or H // nH)
        assert nH % nKV == 0, f"{family}: {nH} attention heads are not a multiple of {nKV} key/value heads"
        E = int(need("num_local_experts", "num_experts", "n_routed_experts"))  # qwen3 may save num_local_experts
        k = int(need("num_experts_per_tok"))
        assert 1 <= k <= E, f"{family}: num_experts_per_tok {k} must be in [1, {E}]"

        # which layers are MoE (same rules as storage_adapters/families.py and the transformers decoder layers)
        if family in ("qwen2_moe", "qwen3_moe"):
            step = int(_get(config, d, "decoder_sparse_step") or 1)
            dense_only = set(config.get("mlp_only_layers") or [])
            moe_layers = tuple(l for l in range(n_layers) if l not in dense_only and E > 0 and (l + 1) % step == 0)
            I = int(need("moe_intermediate_size"))
        else:
            moe_layers = tuple(range(n_layers))
            I = int(need("intermediate_size"))
        dense_I = int(config.get("intermediate_size") or 0)
        shared_I = int(_get(config, d, "shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0

        # attention details
        if family == "qwen2_moe":
            qkv_bias, o_bias = bool(_get(config, d, "qkv_bias")), False
        elif family == "mixtral":
            qkv_bias = o_bias = False
        else:  # qwen3_moe / olmoe: one `attention_bias` for q, k, v and o
            qkv_bias = o_bias = bool(config.get("attention_bias", d.get("attention_bias", False)))
        qk_norm = {"qwen3_moe": "per_head", "olmoe": "full"}.get(family, "none")
        if qk_norm == "full":
            # OLMoE's q_norm spans H and k_norm (H // nH) * nKV: they only fit projections when D == H // nH
            assert D * nH == H, f"olmoe: head_dim {D} * heads {nH} != hidden {H}; its q/k norms assume equality"
        clip = config.get("clip_qkv") if family == "olmoe" else None

        # sliding window: Mixtral uses `sliding_window` whenever set; the Qwens only with use_sliding_window
        window = config.get("sliding_window")
        if family in ("qwen2_moe", "qwen3_moe") and not config.get("use_sliding_window", False):
            window = None
        if family == "qwen2_moe" and window:
            types = config.get("layer_types")
            if types is not None and "sliding_attention" not in types:
                window = None
        if family == "olmoe":
            window = None
        window = int(window) if window else None

        # RoPE: transformers 5.x writes `rope_parameters`; 4.x configs have rope_theta (+ rope_scaling)
        rp = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        theta = float(rp.pop("rope_theta", None) or config.get("rope_theta") or d["rope_theta"])
        rope_type = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
        rp.pop("type", None)
        if rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(f"{family}: RoPE type {rope_type!r} is not supported; "
                                        f"supported: {', '.join(ROPE_TYPES)}")
        if rope_type == "yarn" and config.get("original_max_position_embeddings") is not None:
            # a top-level value wins over the one in the RoPE block, as transformers' standardize_rope_params reads it
            rp["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        prf = rp.pop("partial_rotary_factor", config.get("partial_rotary_factor"))
        if prf not in (None, 1, 1.0):
            raise UnsupportedModelError(f"{family}: partial_rotary_factor {prf} is not supported (full RoPE only)")

        eos = config.get("eos_token_id", d["eos_token_id"])
        eos_ids = () if eos is None else (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)
        return cls(
            family=family, vocab_size=int(need("vocab_size")), hidden_size=H, num_layers=n_layers, num_heads=nH,
            num_kv_heads=nKV, head_dim=D, rms_norm_eps=float(need("rms_norm_eps")), rope_theta=theta,
            rope_type=rope_type, rope_scaling=rp if rope_type != "default" else {},
            max_position_embeddings=int(need("max_position_embeddings")), num_experts=E, top_k=k,
            norm_topk_prob=True if family == "mixtral" else bool(_get(config, d, "norm_topk_prob")),
            moe_intermediate_size=I, dense_intermediate_size=dense_I, shared_expert_intermediate_size=shared_I,
            moe_layers=moe_layers, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm,
            clip_qkv=float(clip) if clip is not None else None, sliding_window=window,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), eos_token_ids=eos_ids,
            pad_token_id=config.get("pad_token_id", d["pad_token_id"]),
            bos_token_id=config.get("bos_token_id", d["bos_token_id"]))


def rope_frequencies(args: ModelArgs, device=None) -> tuple[Tensor, float]:
    """(inv_freq [D/2] f32, attention scaling) exactly as transformers' ROPE_INIT_FUNCTIONS compute them."""
    D, base, p = args.head_dim, args.rope_theta, args.rope_scaling
    pos_freqs = base ** (torch.arange(0, D, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / D)
    inv_freq = 1.0 / pos_freqs
    if args.rope_type == "default":
        return inv_freq, 1.0
    if args.rope_type == "linear":
        return inv_freq / p["factor"], 1.0
    # yarn: interpolate the low frequencies by `factor`, keep the high ones, ramp in between (YaRN paper)
    orig = p.get("original_max_position_embeddings") or args.max_position_embeddings
    factor = p.get("factor") or args.max_position_embeddings / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        attn = (mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
                if p.get("mscale") and p.get("mscale_all_dim") else mscale(factor))
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr_dim(rot):
        return (D * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(D // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 where frequencies are kept as trained
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attn)


# ---------------------------------------------------------------------------------------------------------------
# Dense weights (checkpoint names)
# ---------------------------------------------------------------------------------------------------------------
def load_dense_from_bytes(b) -> dict[str, Tensor]:
    """dense.safetensors' bytes (bytes, memoryview or a uint8 numpy buffer from ExpertStore.read_dense) -> name ->
    tensor. The tensors own their memory (safetensors copies), so the buffer can be released afterwards."""
    from safetensors.torch import load
    if not isinstance(b, (bytes, bytearray)):
        b = memoryview(b).cast("B").tobytes()
    return load(bytes(b))


def load_checkpoint(path: str) -> tuple[dict, dict[str, Tensor], dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]]]:
    """A per-expert Hugging Face checkpoint directory in this process: (config.json as a dict, dense tensors under
    their checkpoint names, {(layer, expert): (gate, up, down)}) — for `MoEModel.from_dense(config, dense,
    LocalExperts(experts))` without a store. Expert names follow storage_adapters/families.py."""
    import json
    import os

    from safetensors.torch import load_file

    from storage_adapters.families import PER_EXPERT, role_of
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    dense, parts = {}, {}
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        for k, t in load_file(os.path.join(path, name)).items():
            m = PER_EXPERT.match(k)
            if m:
                parts.setdefault((int(m["layer"]), int(m["expert"])), {})[role_of(m["proj"])] = t
            else:
                dense[k] = t
    missing = [key for key, p in parts.items() if len(p) != 3]
    assert not missing, f"{path}: experts {missing[:4]} lack some of gate/up/down"
    return config, dense, {key: (p["gate"], p["up"], p["down"]) for key, p in parts.items()}


@dataclass
class LayerWeights:
    attn_norm: Tensor                     # [H]
    wq: Tensor                            # [nH*D, H]   nn.Linear [out, in]
    wk: Tensor                            # [nKV*D, H]
    wv: Tensor                            # [nKV*D, H]
    wo: Tensor                            # [H, nH*D]
    mlp_norm: Tensor                      # [H]
    bq: Tensor | None = None              # [nH*D]  (Qwen2-MoE qkv_bias, OLMoE/Qwen3 attention_bias)
    bk: Tensor | None = None              # [nKV*D]
    bv: Tensor | None = None              # [nKV*D]
    bo: Tensor | None = None              # [H]
    q_norm: Tensor | None = None          # [D] (Qwen3) or [nH*D] (OLMoE)
    k_norm: Tensor | None = None          # [D] (Qwen3) or [nKV*D] (OLMoE)
    router: Tensor | None = None          # [E, H]; None on dense-MLP layers
    mlp: tuple[Tensor, Tensor, Tensor] | None = None      # dense SwiGLU (gate [I', H], up [I', H], down [H, I'])
    shared: tuple[Tensor, Tensor, Tensor] | None = None   # Qwen2-MoE shared expert, same layout
    shared_gate: Tensor | None = None     # [1, H]: sigmoid(x @ shared_gate.T) scales the shared expert


@dataclass
class Weights:
    embed: Tensor                         # [V, H]
    norm: Tensor                          # [H]
    lm_head: Tensor                       # [V, H] (the embedding itself when tied)
    layers: list[LayerWeights]


def _is_routed_expert(name: str) -> bool:
    return ".experts." in name and (".block_sparse_moe." in name or ".mlp." in name)


def load_weights(args: ModelArgs, dense: Mapping[str, Tensor], *, device=None, dtype=None,
                 host_dense: bool = False) -> Weights:
    """Resolve checkpoint names into per-layer weights, checking every shape against the config.

    Missing tensors are reported all at once; tensors the config does not explain (e.g. biases where the config
    says none, routers on layers the config says are dense) are an error too, since silently ignoring them would
    compute a different model. Routed-expert tensors, should a full checkpoint be passed, are ignored: they belong
    to the ExpertBackend. Everything is moved to `device`/`dtype` (default: the embedding's dtype), except with
    host_dense the OFFLOADED tensors (q/k/v/o projections, dense MLP and shared-expert gate/up/down: see
    `DenseOffload`), which go to host memory in `dtype`, pinned when `device` is CUDA (for async copies)."""
    H, D, nH, nKV, V = args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads, args.vocab_size
    if dtype is None and "model.embed_tokens.weight" in dense:
        dtype = dense["model.embed_tokens.weight"].dtype
    used: set[str] = set()
    missing: list[str] = []
    bad: list[str] = []

    pin = host_dense and torch.device(device or "cpu").type == "cuda"

    def take(name: str, shape: tuple[int, ...], offloaded: bool = False) -> Tensor | None:
        t = dense.get(name)
        if t is None:
            missing.append(name)
            return None
        used.add(name)
        if tuple(t.shape) != shape:
            bad.append(f"{name} {list(t.shape)} (config says {list(shape)})")
        if offloaded and host_dense:  # a host copy of its own: the device never holds it outside DenseOffload
            h = t.to(device="cpu", dtype=dtype).contiguous()
            return h.pin_memory() if pin else h
        return t.to(device=device, dtype=dtype)

    # Mixtral checkpoints name the MoE block `block_sparse_moe`, the others (and transformers 5.x in memory) `mlp`
    moe_prefix = "block_sparse_moe" if any(".block_sparse_moe." in n for n in dense) else "mlp"
    embed = take("model.embed_tokens.weight", (V, H))
    norm = take("model.norm.weight", (H,))
    if args.tie_word_embeddings and "lm_head.weight" not in dense:
        lm_head = embed
    else:
        lm_head = take("lm_head.weight", (V, H))
    layers = []
    for l in range(args.num_layers):
        p = f"model.layers.{l}"
        a = f"{p}.self_attn"
        lw = LayerWeights(
            attn_norm=take(f"{p}.input_layernorm.weight", (H,)), wq=take(f"{a}.q_proj.weight", (nH * D, H), True),
            wk=take(f"{a}.k_proj.weight", (nKV * D, H), True), wv=take(f"{a}.v_proj.weight", (nKV * D, H), True),
            wo=take(f"{a}.o_proj.weight", (H, nH * D), True),
            mlp_norm=take(f"{p}.post_attention_layernorm.weight", (H,)))
        if args.qkv_bias:
            lw.bq, lw.bk, lw.bv = (take(f"{a}.q_proj.bias", (nH * D,)), take(f"{a}.k_proj.bias", (nKV * D,)),
                                   take(f"{a}.v_proj.bias", (nKV * D,)))
        if args.o_bias:
            lw.bo = take(f"{a}.o_proj.bias", (H,))
        if args.qk_norm == "per_head":
            lw.q_norm, lw.k_norm = take(f"{a}.q_norm.weight", (D,)), take(f"{a}.k_norm.weight", (D,))
        elif args.qk_norm == "full":
            lw.q_norm, lw.k_norm = take(f"{a}.q_norm.weight", (nH * D,)), take(f"{a}.k_norm.weight", (nKV * D,))
        if l in args.moe_layers:
            m = f"{p}.{moe_prefix}"
            lw.router = take(f"{m}.gate.weight", (args.num_experts, H))
            if args.shared_expert_intermediate_size:
                Is = args.shared_expert_intermediate_size
                lw.shared = (take(f"{m}.shared_expert.gate_proj.weight", (Is, H), True),
                             take(f"{m}.shared_expert.up_proj.weight", (Is, H), True),
                             take(f"{m}.shared_expert.down_proj.weight", (H, Is), True))
                lw.shared_gate = take(f"{m}.shared_expert_gate.weight", (1, H))
        else:
            Id = args.dense_intermediate_size
            lw.mlp = (take(f"{p}.mlp.gate_proj.weight", (Id, H), True), take(f"{p}.mlp.up_proj.weight", (Id, H), True),
                      take(f"{p}.mlp.down_proj.weight", (H, Id), True))
        layers.append(lw)
    unexplained = sorted(n for n in dense if n not in used and not _is_routed_expert(n)
                         and not n.endswith("rotary_emb.inv_freq") and not (n == "lm_head.weight" and lm_head is embed))
    problems = ([f"missing {missing[:8]}" + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")]
                if missing else []) + ([f"wrong shapes: {bad[:8]}"] if bad else []) + \
               ([f"tensors the {args.family} config does not explain: {unexplained[:8]}"] if unexplained else [])
    if problems:
        raise ValueError(f"dense weights do not fit the {args.family} config: " + "; ".join(problems))
    return Weights(embed=embed, norm=norm, lm_head=lm_head, layers=layers)


# ---------------------------------------------------------------------------------------------------------------
# Experts: the backend contract, grouping, and a local implementation
# ---------------------------------------------------------------------------------------------------------------
class ExpertBackend(Protocol):
    def moe(self, layer: int, x: Tensor, topk_ids: Tensor, topk_w: Tensor) -> Tensor:
        """Run the routed experts of one MoE layer.

        x [N, H] in the model's dtype and device: the post-attention-norm hidden states of the N real tokens of
        this forward (padding is never included; N >= 1 in practice, but N == 0 must return [0, H]).
        topk_ids [N, k] int64 in [0, E): the experts each token selected, in router order (not sorted by id).
        topk_w [N, k] (x's dtype): their router weights (renormalised or not, as the family says).
        Returns [N, H] (x's dtype and device): sum_j topk_w[:, j] * expert_{topk_ids[:, j]}(x), where
        expert_e(x) = down_e(silu(gate_e x) * up_e x) (see `swiglu`). Shared experts and dense MLPs are NOT part
        of this: the decoder computes them. Must not modify its inputs; may block (the decoder waits for the
        result before the layer's residual add)."""
        ...


RouteHook = Callable[[int, Tensor, Tensor, Tensor], None]
"""on_route(layer, topk_ids [N, k], topk_w [N, k], x [N, H]): called right before each MoE layer's backend call
with the very tensors the backend gets; it must return at once (publish, do not wait) and must not modify them.
Which request and position row n belongs to: `model.route_rows[n]` is its KV-cache row (so
`cache.requests[route_rows[n]]` its request id) and `model.route_pos[n]` its token position; both are set by
`forward` for the step in progress ([N] int64 tensors)."""


def swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """down(silu(gate x) * up x) with nn.Linear's [out, in] weights: x [N, H], gate/up [I, H], down [H, I] -> [N, H]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def group_by_expert(topk_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Group the (token, slot) pairs of a routing decision by expert, with one argsort and no Python loops.

    topk_ids [N, k] int64 -> (order [N*k], expert_ids [U], counts [U]), all int64 on topk_ids' device:
      order       indices into topk_ids.reshape(-1), grouped by expert ascending (stable: token order within an
                  expert), so pair i is token order[i] // k, slot order[i] % k;
      expert_ids  the U distinct selected experts, ascending;
      counts      pairs per expert; expert_ids[u] owns order[starts[u]:starts[u] + counts[u]] with
                  starts = counts.cumsum(0) - counts. counts.sum() == N*k."""
    assert topk_ids.dim() == 2, f"topk_ids must be [N, k], got {list(topk_ids.shape)}"
    flat = topk_ids.reshape(-1)                                              # [N*k]
    order = torch.argsort(flat, stable=True)                                 # [N*k]
    expert_ids, counts = torch.unique_consecutive(flat[order], return_counts=True)
    return order, expert_ids, counts


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def tensor_from_blob(blob, entry) -> Tensor:
    """Zero-copy view of one tensor of a store blob (uint8 numpy array or bytes-like) described by a manifest
    TensorEntry (offset, length, dtype, shape). Read-only buffers (Ray object store) are viewed, never written."""
    dt = _ST_DTYPES.get(entry.dtype)
    if dt is None:
        raise UnsupportedModelError(f"expert tensor {entry.name!r}: dtype {entry.dtype} is not supported; "
                                    f"supported: {', '.join(_ST_DTYPES)}")
    n = math.prod(entry.shape)
    assert entry.length == n * dt.itemsize, \
        f"expert tensor {entry.name!r}: {entry.length} bytes for shape {list(entry.shape)} {entry.dtype}"
    mv = memoryview(blob).cast("B")
    end = entry.offset + entry.length
    assert end <= len(mv), f"expert tensor {entry.name!r}: bytes [{entry.offset}, {end}) beyond a {len(mv)}-byte blob"
    with warnings.catch_warnings():  # a read-only buffer makes torch warn; we never write through the view
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(mv, dtype=dt, count=n, offset=entry.offset)
    return t.view(tuple(entry.shape))


class LocalExperts:
    """ExpertBackend over weights held in this process: {(layer, expert): (gate [I, H], up [I, H], down [H, I])}.

    Per call it gathers the tokens once, sorted by expert, runs one batched SwiGLU per distinct selected expert
    (never a loop over tokens), and combines with a single index_add_ (on CUDA a sum over the k slots, which,
    unlike CUDA's atomic index_add_, gives the same bits every run)."""

    def __init__(self, weights: Mapping[tuple[int, int], tuple[Tensor, Tensor, Tensor]], *, device=None, dtype=None):
        self.weights: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}
        for key, (g, u, d) in weights.items():
            assert g.shape == u.shape and d.shape == (g.shape[1], g.shape[0]), (
                f"expert {key}: gate {list(g.shape)}, up {list(u.shape)}, down {list(d.shape)}; "
                f"want [I, H], [I, H], [H, I]")
            if device is not None or dtype is not None:
                g, u, d = (t.to(device=device, dtype=dtype) for t in (g, u, d))
            self.weights[key] = (g, u, d)

    @classmethod
    def from_blobs(cls, manifest, blobs: Mapping[tuple[int, int], object], *, device=None,
                   dtype=None) -> "LocalExperts":
        """Experts from store blobs: {(layer, expert): uint8 blob} viewed through the manifest's TensorEntry of
        each role (gate/up/down). Without device/dtype the tensors are zero-copy views of the blobs (keep the
        blobs alive); with them, copies on that device/dtype."""
        weights = {}
        for (layer, expert), blob in blobs.items():
            entry = manifest.blob(layer, expert)
            size = memoryview(blob).nbytes
            assert size == entry.size, f"blob {entry.key}: {size} bytes, the manifest says {entry.size}"
            weights[(layer, expert)] = tuple(tensor_from_blob(blob, entry.tensors[r]) for r in ("gate", "up", "down"))
        return cls(weights, device=device, dtype=dtype)

    def moe(self, layer: int, x: Tensor, topk_ids: Tensor, topk_w: Tensor) -> Tensor:
        N, k = topk_ids.shape
        out = torch.zeros_like(x)                                            # [N, H]
        if N == 0:
            return out
        order, expert_ids, counts = group_by_expert(topk_ids)
        tok = order // k                                                     # [N*k] token of each pair
        xs = x[tok]                                                          # [N*k, H] grouped by expert
        ys = torch.empty_like(xs)                                            # [N*k, H]
        start = 0
        # the only host sync: which experts and how many pairs each (a loop over distinct experts, <= E)
        for e, n in zip(expert_ids.tolist(), counts.tolist()):
            w = self.weights.get((layer, e))
            if w is None:
                raise KeyError(f"LocalExperts holds no weights for layer {layer} expert {e}")
            ys[start:start + n] = swiglu(xs[start:start + n], *w)
            start += n
        ys *= topk_w.reshape(-1)[order].unsqueeze(1)                         # [N*k, H] router weight per pair
        if x.device.type == "cuda":
            # CUDA's index_add_ accumulates with atomics: a token's k adds land in a different order run to run
            # (measured on an H100: 1e-6 logit differences between identical runs at top-4). Put the pairs back
            # in (token, slot) order and reduce over k instead: the same sum every run.
            yk = torch.empty_like(ys)
            yk[order] = ys                                                   # [N*k, H] (token, slot) order
            return yk.view(N, k, -1).sum(1)                                  # [N, H]
        return out.index_add_(0, tok, ys)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------
def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """transformers' RMSNorm: normalise in f32, cast back, then scale (in that order, for bit-compatibility)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, h, D]; cos/sin [B, T, D] (per-token positions, so every row can be at its own offset)."""
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


@dataclass
class KVCache:
    """Preallocated per-layer K/V, [B, max_len, nKV, D] each. Sequence b holds its first lens[b] tokens at slots
    0..lens[b]-1, slot == RoPE position. `lens` is host-side: the host decides how many tokens each row adds, so
    building indices never waits on the device."""
    k: list[Tensor]
    v: list[Tensor]
    lens: list[int]
    max_len: int
    requests: list = field(default_factory=list)  # request id of each row (whoever fills a row sets it; default b)

    @classmethod
    def allocate(cls, args: ModelArgs, batch: int, max_len: int, *, device=None, dtype=torch.float32) -> "KVCache":
        if args.sliding_window is not None and max_len > args.sliding_window:
            raise UnsupportedModelError(
                f"{args.family}: sliding-window attention (window {args.sliding_window}) is not implemented; a "
                f"context of {max_len} tokens would need it — keep contexts <= {args.sliding_window}")
        shape = (batch, max_len, args.num_kv_heads, args.head_dim)
        return cls(k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.num_layers)],
                   v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.num_layers)],
                   lens=[0] * batch, max_len=max_len, requests=list(range(batch)))

    def reset(self) -> None:
        self.lens = [0] * len(self.lens)


# ---------------------------------------------------------------------------------------------------------------
# Dense offload: layer weights in host memory, streamed to the device one layer ahead (docs/weight_prefetch.md)
# ---------------------------------------------------------------------------------------------------------------
_WP = "weight_prefetch_config"
_RATIO_KEYS = {"qkv": "attn.qkv", "o": "attn.o", "gate_up": "mlp.gate_up", "down": "mlp.down"}


@dataclass(frozen=True)
class OffloadSettings:
    """The dense-offload part of `weight_prefetch_config` (cluster/config.py). Validated here too, with the same
    key names, so a runtime built without the config loader rejects the same values."""
    enabled: bool = False                 # dense_offload
    qkv: float = 1.0                      # prefetch_ratio.attn.qkv: share of q/k/v rows copied one layer ahead
    o: float = 1.0                        # prefetch_ratio.attn.o
    gate_up: float = 1.0                  # prefetch_ratio.mlp.gate_up: dense MLP / shared expert gate and up
    down: float = 1.0                     # prefetch_ratio.mlp.down
    max_ahead_bytes: int = 18 << 20       # max_prefetch_bytes_per_layer: what one layer may prefetch ahead

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"{_WP}.dense_offload: must be true or false (got {self.enabled!r})")
        for attr, key in _RATIO_KEYS.items():
            v = getattr(self, attr)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{_WP}.prefetch_ratio.{key}: must be a number in [0, 1] (got {v!r})")
        cap = self.max_ahead_bytes
        if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
            raise ValueError(f"{_WP}.max_prefetch_bytes_per_layer: must be > 0 bytes (got {cap!r})")

    @classmethod
    def from_config(cls, wp) -> "OffloadSettings":
        """From `weight_prefetch_config`: the pydantic model or its model_dump() dict (missing keys: defaults)."""
        if hasattr(wp, "model_dump"):
            wp = wp.model_dump()
        r = wp.get("prefetch_ratio") or {}
        attn, mlp = r.get("attn") or {}, r.get("mlp") or {}
        return cls(enabled=wp.get("dense_offload", False), qkv=attn.get("qkv", 1.0), o=attn.get("o", 1.0),
                   gate_up=mlp.get("gate_up", 1.0), down=mlp.get("down", 1.0),
                   max_ahead_bytes=wp.get("max_prefetch_bytes_per_layer", 18 << 20))


def offloaded_tensors(lw: LayerWeights) -> list[tuple[str, int | None, Tensor, str]]:
    """The tensors dense offload moves, in copy order: (LayerWeights field, index in its tuple or None, tensor,
    ratio attribute of OffloadSettings). Norms, biases, routers and the shared-expert gate stay on the device:
    they are vectors or [E, H] / [1, H], small next to the projections."""
    out = [(f, None, getattr(lw, f), "qkv") for f in ("wq", "wk", "wv")] + [("wo", None, lw.wo, "o")]
    for f in ("mlp", "shared"):
        g = getattr(lw, f)
        if g is not None:
            out += [(f, 0, g[0], "gate_up"), (f, 1, g[1], "gate_up"), (f, 2, g[2], "down")]
    return out


def plan_ahead_rows(tensors: Sequence[tuple[Tensor, float]], cap: int) -> list[int]:
    """Rows of each [R, C] tensor to copy one layer ahead: floor(ratio x R); when their bytes exceed `cap`, each
    count is scaled by cap / those bytes (floored), so the layer's ahead bytes never exceed the cap."""
    rows = [math.floor(ratio * t.shape[0]) for t, ratio in tensors]
    row_bytes = [t.shape[1] * t.element_size() for t, _ in tensors]
    total = sum(r * b for r, b in zip(rows, row_bytes))
    if total > cap:
        rows = [r * cap // total for r in rows]
    assert sum(r * b for r, b in zip(rows, row_bytes)) <= cap, "ahead rows exceed the per-layer cap"
    return rows


_ALIGN = 4096  # bytes: each tensor in a slot starts page-aligned (>= what torch's allocators give a fresh tensor)


class DenseOffload:
    """Each decoder layer's offloaded dense weights (`offloaded_tensors`) live in host memory; two device SLOTS hold
    at most two layers' at once, layer l running from slot l % 2.

      prefetch(l)  issued when layer l-1 starts (`begin` issues layer 0's at the forward's start): copies the first
                   `ahead` rows of each of layer l's tensors into slot l % 2. On CUDA: non-blocking, on a dedicated
                   stream, after the compute stream has finished with the slot (layer l-2), closed by an event. On
                   CPU the same code does a plain copy.
      acquire(l)   when layer l starts: the compute stream waits for that event, the remaining rows are copied on
                   the compute stream, prefetch(l+1) is issued, and layer l's LayerWeights come back with device
                   views in place of the host tensors.
    The views are whole contiguous tensors of the original shapes, so every op computes exactly as with
    device-resident weights: only where the bytes come from changes (bit-for-bit, tests/test_dense_offload.py).
    Counters: bytes copied ahead and at use, per layer (`stats`). No logging, no per-token work: per forward, a
    few copies per layer."""

    def __init__(self, layers: Sequence[LayerWeights], st: OffloadSettings, device: torch.device):
        import dataclasses
        self.settings, self.device = st, device
        self.cuda = device.type == "cuda"
        per_layer = [offloaded_tensors(lw) for lw in layers]
        dtypes = {t.dtype for ts in per_layer for _, _, t, _ in ts}
        assert len(dtypes) == 1, f"offloaded dense weights must share one dtype, got {dtypes}"
        dtype = dtypes.pop()
        item = dtype.itemsize
        self.parts: list[list[tuple[Tensor, int, int]]] = []   # per layer: (host [R, C], slot elem offset, ahead rows)
        self.layer_bytes: list[int] = []                        # offloaded bytes of each layer
        self.ahead_plan: list[int] = []                         # bytes each layer copies ahead, per forward
        footprint = 0                                           # slot elements the largest layer needs
        for ts in per_layer:
            for f, _, t, _ in ts:
                assert t.dim() == 2 and t.is_contiguous() and t.device.type == "cpu", \
                    f"offloaded {f} must be a contiguous 2-D host tensor, got {list(t.shape)} on {t.device}"
            rows = plan_ahead_rows([(t, getattr(st, ratio)) for _, _, t, ratio in ts], st.max_ahead_bytes)
            parts, off = [], 0
            for (_, _, t, _), r in zip(ts, rows):
                parts.append((t, off, r))
                off += -(-t.numel() * item // _ALIGN) * _ALIGN // item
            self.parts.append(parts)
            self.layer_bytes.append(sum(t.numel() * item for _, _, t, _ in ts))
            self.ahead_plan.append(sum(r * t.shape[1] * item for (_, _, t, _), r in zip(ts, rows)))
            footprint = max(footprint, off)
        # the device memory of dense offload: two slots of the largest layer's footprint, allocated once
        self.slots = [torch.empty(footprint, dtype=dtype, device=device) for _ in range(2)]
        self.views: list[LayerWeights] = []                     # layer l's weights with its slot's device views
        self.dev: list[list[Tensor]] = []                       # per layer, the device view of each part
        for l, (lw, ts) in enumerate(zip(layers, per_layer)):
            vs = [self.slots[l % 2][o:o + t.numel()].view(t.shape) for t, o, _ in self.parts[l]]
            self.dev.append(vs)
            repl: dict = {}
            for (f, i, _, _), v in zip(ts, vs):
                if i is None:
                    repl[f] = v
                else:
                    repl.setdefault(f, list(getattr(lw, f)))[i] = v
            self.views.append(dataclasses.replace(lw, **{f: tuple(v) if isinstance(v, list) else v
                                                         for f, v in repl.items()}))
        top2 = sorted(self.layer_bytes)[-2:]
        self.max_resident_bytes = sum(top2)                     # two layers' (the current and the next)
        self.resident: list[int | None] = [None, None]          # layer whose weights each slot holds
        self.current: int | None = None                         # slot of the layer computing now
        self.peak_resident_bytes = 0
        self.ahead_bytes = [0] * len(layers)                    # counters, cumulative over forwards
        self.at_use_bytes = [0] * len(layers)
        self.forwards = 0
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]   # slot's ahead rows landed (copy stream)
            self.free = [torch.cuda.Event(), torch.cuda.Event()]    # compute stream done with the slot

    def begin(self) -> None:
        """A forward starts: nothing computes from a slot yet; layer 0's ahead rows start copying."""
        self.forwards += 1
        self.current = None
        self.prefetch(0)

    def prefetch(self, l: int) -> None:
        s = l % 2
        assert s != self.current, f"layer {l} would overwrite the slot of the layer computing now"
        self.resident[s] = l
        held = sum(self.layer_bytes[x] for x in self.resident if x is not None)
        assert held <= self.max_resident_bytes, f"{held} dense bytes on the device, more than two layers'"
        self.peak_resident_bytes = max(self.peak_resident_bytes, held)
        if self.cuda:
            # everything queued on the compute stream so far (layer l-2, the slot's last user, included)
            self.free[s].record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(self.free[s])
                self._copy(l, ahead=True)
                self.ready[s].record(self.stream)
        else:
            self._copy(l, ahead=True)
        self.ahead_bytes[l] += self.ahead_plan[l]

    def acquire(self, l: int) -> LayerWeights:
        s = l % 2
        assert self.resident[s] == l, f"layer {l} starts but slot {s} holds layer {self.resident[s]}"
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[s])
        self._copy(l, ahead=False)                              # the rest, on the compute stream
        self.at_use_bytes[l] += self.layer_bytes[l] - self.ahead_plan[l]
        self.current = s
        if l + 1 < len(self.parts):
            self.prefetch(l + 1)                                # overlaps layer l's compute on CUDA
        return self.views[l]

    def _copy(self, l: int, *, ahead: bool) -> None:
        """Rows [0, r) of each tensor (ahead) or [r, R) (at use), host -> layer l's device views."""
        for (host, _, r), dev in zip(self.parts[l], self.dev[l]):
            src, dst = (host[:r], dev[:r]) if ahead else (host[r:], dev[r:])
            if src.shape[0]:
                dst.copy_(src, non_blocking=self.cuda)

    def stats(self) -> dict:
        st = self.settings
        return {"enabled": True, "forwards": self.forwards,
                "ratios": {"attn": {"qkv": st.qkv, "o": st.o}, "mlp": {"gate_up": st.gate_up, "down": st.down}},
                "max_prefetch_bytes_per_layer": st.max_ahead_bytes,
                "ahead_bytes": sum(self.ahead_bytes), "at_use_bytes": sum(self.at_use_bytes),
                "ahead_bytes_per_layer": list(self.ahead_bytes), "at_use_bytes_per_layer": list(self.at_use_bytes),
                "layer_bytes": list(self.layer_bytes), "ahead_plan_per_layer": list(self.ahead_plan),
                "device_buffer_bytes": sum(b.numel() * b.element_size() for b in self.slots),
                "peak_resident_bytes": self.peak_resident_bytes, "max_resident_bytes": self.max_resident_bytes}


# ---------------------------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class MoEModel:
    args: ModelArgs
    weights: Weights
    experts: ExpertBackend
    on_route: RouteHook | None = None
    route_rows: Tensor | None = field(default=None, init=False)   # [M] int64 cache row of each routed token
    route_pos: Tensor | None = field(default=None, init=False)    # [M] int64 its position (see RouteHook)
    inv_freq: Tensor = field(init=False)       # [D/2] f32
    rope_scale: float = field(init=False)
    offload: DenseOffload | None = field(default=None, init=False)   # dense_offload on (from_dense sets it)

    def __post_init__(self):
        self.inv_freq, self.rope_scale = rope_frequencies(self.args, self.device)

    @classmethod
    def from_dense(cls, config: dict, dense: Mapping[str, Tensor], experts: ExpertBackend, *, device=None,
                   dtype=None, on_route: RouteHook | None = None,
                   weight_prefetch: "Mapping | OffloadSettings | None" = None) -> "MoEModel":
        """weight_prefetch: `weight_prefetch_config` (its model_dump() dict or an OffloadSettings); with
        dense_offload on, the layers' attention projections and dense MLP / shared-expert weights live in host
        memory and stream to `device` one layer ahead (`DenseOffload`). None or dense_offload off: all on device."""
        args = ModelArgs.from_config(config)
        st = weight_prefetch if isinstance(weight_prefetch, OffloadSettings) or weight_prefetch is None \
            else OffloadSettings.from_config(weight_prefetch)
        st = st if st is not None and st.enabled else None
        weights = load_weights(args, dense, device=device, dtype=dtype, host_dense=st is not None)
        model = cls(args, weights, experts, on_route)
        if st is not None:
            model.offload = DenseOffload(weights.layers, st, torch.device(device or "cpu"))
        return model

    def dense_offload_stats(self) -> dict:
        """The dense-offload counters (DenseOffload.stats), or {"enabled": False}."""
        return self.offload.stats() if self.offload is not None else {"enabled": False}

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.args, batch, max_len, device=self.device, dtype=self.dtype)

    # -- one forward over new tokens of every row -----------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, cache: KVCache, tokens: Tensor, n_new: Sequence[int], *, all_logits: bool = False) -> Tensor:
        """Append n_new[b] tokens to each sequence b and return logits (f32).

        tokens [B, T] int64, right-padded: row b's real tokens are tokens[b, :n_new[b]] (0 <= n_new[b] <= T).
        Returns [B, V] logits of each row's last new token (rows with n_new 0: meaningless), or with all_logits
        [B, T, V] for every position (padding positions meaningless). Advances cache.lens by n_new."""
        a, w = self.args, self.weights
        B, T = tokens.shape
        n_new = [int(n) for n in n_new]
        assert len(n_new) == B == len(cache.lens), \
            f"batch mismatch: tokens {B} rows, n_new {len(n_new)}, cache {len(cache.lens)} sequences"
        assert all(0 <= n <= T for n in n_new), f"n_new {n_new} must lie in [0, T={T}]"
        ends = [s + n for s, n in zip(cache.lens, n_new)]
        if max(ends) > cache.max_len:
            b = max(range(B), key=lambda i: ends[i])
            raise ValueError(f"sequence {b} would hold {ends[b]} tokens, more than the KV cache's {cache.max_len} "
                             f"slots ({cache.lens[b]} cached + {n_new[b]} new)")
        assert all(e >= 1 for e in ends), "every sequence needs at least one token (an empty prompt has no logits)"
        dev = self.device
        M, S = sum(n_new), max(ends)                                         # real tokens; attended slots
        start = torch.tensor(cache.lens, device=dev)                         # [B]
        n_t = torch.tensor(n_new, device=dev)                                # [B]
        end_t = start + n_t                                                  # [B]
        pos = start[:, None] + torch.arange(T, device=dev)[None, :]          # [B, T] position == cache slot
        # packed real tokens: row-major flat indices into [B*T], built without a device->host sync
        rows = torch.repeat_interleave(torch.arange(B, device=dev), n_t, output_size=M)   # [M]
        cols = torch.arange(M, device=dev) - (torch.cumsum(n_t, 0) - n_t)[rows]           # [M]
        flat = rows * T + cols                                               # [M]
        wpos = pos.reshape(-1)[flat]                                         # [M] cache slot of each real token
        self.route_rows, self.route_pos = rows, wpos                         # for on_route: who each row is
        # key slot j is visible to query (b, t) iff j <= its position and j holds a token of row b; for padding
        # queries this still leaves >= 1 visible slot, so no row of the softmax is empty (no NaNs anywhere)
        j = torch.arange(S, device=dev)                                      # [S]
        mask = (j[None, None, :] <= pos[:, :, None]) & (j[None, None, :] < end_t[:, None, None])   # [B, T, S] bool
        mask = mask[:, None]                                                 # [B, 1, T, S]

        freqs = pos[..., None].float() * self.inv_freq                       # [B, T, D/2] f32
        emb = torch.cat((freqs, freqs), dim=-1)                              # [B, T, D]
        cos = (emb.cos() * self.rope_scale).to(self.dtype)
        sin = (emb.sin() * self.rope_scale).to(self.dtype)

        off = self.offload
        if off is not None:  # layer 0's ahead rows copy while the embedding runs
            off.begin()
        h = F.embedding(tokens, w.embed)                                     # [B, T, H]
        for l, lw in enumerate(w.layers):
            if off is not None:  # device views of layer l's dense weights; starts layer l+1's ahead copy
                lw = off.acquire(l)
            h = h + self._attention(l, lw, rms_norm(h, lw.attn_norm, a.rms_norm_eps), cos, sin, cache, mask,
                                    rows, wpos, flat, S)
            x = rms_norm(h, lw.mlp_norm, a.rms_norm_eps).reshape(B * T, -1)[flat]          # [M, H] real tokens
            y = self._moe(l, lw, x) if lw.router is not None else swiglu(x, *lw.mlp)       # [M, H]
            h = h.reshape(B * T, -1).index_add(0, flat, y).reshape(B, T, -1)               # residual, real only
        cache.lens = ends

        if not all_logits:  # only each row's last new token needs the LM head
            last = (n_t - 1).clamp(min=0)                                    # [B]
            h = h[torch.arange(B, device=dev), last]                         # [B, H]
        h = rms_norm(h, w.norm, a.rms_norm_eps)
        return F.linear(h, w.lm_head).float()                                # [B, V] or [B, T, V]

    def _attention(self, l: int, lw: LayerWeights, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache,
                   mask: Tensor, rows: Tensor, wpos: Tensor, flat: Tensor, S: int) -> Tensor:
        a = self.args
        B, T, _ = x.shape
        q = F.linear(x, lw.wq, lw.bq)                                        # [B, T, nH*D]
        k = F.linear(x, lw.wk, lw.bk)                                        # [B, T, nKV*D]
        v = F.linear(x, lw.wv, lw.bv)                                        # [B, T, nKV*D]
        if a.qk_norm == "full":  # OLMoE: RMSNorm over the whole projection, before splitting heads
            q, k = rms_norm(q, lw.q_norm, a.rms_norm_eps), rms_norm(k, lw.k_norm, a.rms_norm_eps)
        if a.clip_qkv is not None:
            c = a.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(B, T, a.num_heads, a.head_dim)                            # [B, T, nH, D]
        k = k.view(B, T, a.num_kv_heads, a.head_dim)                         # [B, T, nKV, D]
        v = v.view(B, T, a.num_kv_heads, a.head_dim)
        if a.qk_norm == "per_head":  # Qwen3: RMSNorm over each head's D
            q, k = rms_norm(q, lw.q_norm, a.rms_norm_eps), rms_norm(k, lw.k_norm, a.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # write the real tokens' K/V at their slots (padding never lands in the cache)
        cache.k[l][rows, wpos] = k.reshape(B * T, a.num_kv_heads, a.head_dim)[flat]
        cache.v[l][rows, wpos] = v.reshape(B * T, a.num_kv_heads, a.head_dim)[flat]
        keys = cache.k[l][:, :S].transpose(1, 2)                             # [B, nKV, S, D]
        vals = cache.v[l][:, :S].transpose(1, 2)                             # [B, nKV, S, D]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask,
                                           scale=a.head_dim ** -0.5,
                                           enable_gqa=a.num_kv_heads != a.num_heads)   # [B, nH, T, D]
        o = o.transpose(1, 2).reshape(B, T, a.num_heads * a.head_dim)        # [B, T, nH*D]
        return F.linear(o, lw.wo, lw.bo)                                     # [B, T, H]

    def _moe(self, l: int, lw: LayerWeights, x: Tensor) -> Tensor:
        """x [M, H] -> [M, H]: route, publish, run routed experts on the backend, add the shared expert."""
        a = self.args
        logits = F.linear(x, lw.router)                                      # [M, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)           # over ALL experts, in f32
        topk_w, topk_ids = torch.topk(probs, a.top_k, dim=-1)                # [M, k] f32, [M, k] int64
        if a.norm_topk_prob:  # Mixtral always: equals softmax over the top-k logits
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        topk_w = topk_w.to(x.dtype)
        if self.on_route is not None:
            self.on_route(l, topk_ids, topk_w, x)
        y = self.experts.moe(l, x, topk_ids, topk_w)                         # [M, H]
        assert y.shape == x.shape, f"expert backend returned {list(y.shape)} for layer {l}, expected {list(x.shape)}"
        if lw.shared is not None:  # Qwen2-MoE: a dense expert for every token, gated by a sigmoid
            y = y + torch.sigmoid(F.linear(x, lw.shared_gate)) * swiglu(x, *lw.shared)
        return y

    # -- conveniences ---------------------------------------------------------------------------------------------
    def prefill(self, cache: KVCache, prompts: Sequence[Sequence[int]]) -> Tensor:
        """Append each prompt to its sequence (right-padded into one forward). Returns [B, V] last-token logits."""
        lens = [len(p) for p in prompts]
        T = max(lens)
        tokens = torch.zeros(len(prompts), T, dtype=torch.int64)
        for b, p in enumerate(prompts):  # building the input on the host: once per request, not per token
            tokens[b, :len(p)] = torch.as_tensor(list(p), dtype=torch.int64)
        return self.forward(cache, tokens.to(self.device), lens)

    def decode(self, cache: KVCache, tokens: Tensor, active: Sequence[bool] | None = None) -> Tensor:
        """One token per active sequence: tokens [B] int64. Returns [B, V] logits (inactive rows: meaningless)."""
        n_new = [1] * tokens.shape[0] if active is None else [int(bool(x)) for x in active]
        return self.forward(cache, tokens.reshape(-1, 1).to(self.device), n_new)


# ---------------------------------------------------------------------------------------------------------------
# Sampling and generation
# ---------------------------------------------------------------------------------------------------------------
def sample(logits: Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
           generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """Next tokens [B] int64 from logits [B, V]. temperature 0: greedy (argmax). Else softmax(logits / T), kept to
    the nucleus (the fewest most-likely tokens whose mass reaches top_p; at least one), renormalised, and sampled
    by inverse CDF with one uniform per row drawn from that row's own CPU generator — so a request's tokens
    depend only on its seed and its own logits, not on the batch it ran in or on the device."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    assert 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"
    B = logits.shape[0]
    assert generators is not None and len(generators) == B, "sampling needs one torch.Generator per row"
    # shifted by the row's max first: the same softmax, but a tiny temperature sends the others to -inf, never the
    # top token to +inf (inf - inf gave NaN probabilities and an index of -1)
    lf = logits.float()
    probs = torch.softmax((lf - lf.amax(dim=-1, keepdim=True)) / temperature, dim=-1)   # [B, V]
    p_sorted, idx = probs.sort(dim=-1, descending=True)                      # [B, V]
    before = p_sorted.cumsum(dim=-1) - p_sorted                              # mass of strictly likelier tokens
    p_sorted = p_sorted.masked_fill(before >= top_p, 0.0)                    # keeps the top token always
    cdf = p_sorted.cumsum(dim=-1)                                            # [B, V]
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(logits.device)   # [B] (per row, not token)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=cdf.shape[-1] - 1)   # [B, 1]
    # searchsorted may land on a zero-probability slot only at cdf plateaus after the nucleus; step back into it
    n_kept = (p_sorted > 0).sum(dim=-1, keepdim=True)
    pick = torch.minimum(pick, n_kept - 1)
    return idx.gather(-1, pick).squeeze(-1)


_CONFIG_EOS = object()


def generate(model: MoEModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seeds: int | Sequence[int] | None = None, eos_token_id=_CONFIG_EOS,
             max_seq_len: int | None = None) -> list[list[int]]:
    """Generate for a batch of prompts; returns each request's new token ids (an EOS token included, as
    transformers does). A request stops at EOS (config `eos_token_id`, int or list; pass eos_token_id=None or ()
    to disable, or your own), after max_new_tokens, or when its sequence fills the context.

    temperature 0 is greedy; otherwise sampling with top_p, each request drawing from its own torch.Generator
    seeded by `seeds` (one int for all, or one per request; None: fresh random seeds).
    The context is max_seq_len (default: the config's max_position_embeddings); a prompt longer than it raises."""
    B = len(prompts)
    assert B >= 1 and max_new_tokens >= 1, "need at least one prompt and max_new_tokens >= 1"
    ctx = max_seq_len or model.args.max_position_embeddings
    lens = [len(p) for p in prompts]
    for b, n in enumerate(lens):
        if n == 0:
            raise ValueError(f"prompt {b} is empty")
        if n > ctx:
            raise ValueError(f"prompt {b} has {n} tokens, longer than the maximum context of {ctx} tokens")
    eos = model.args.eos_token_ids if eos_token_id is _CONFIG_EOS else \
        () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    eos = set(eos)
    # a sequence holds its prompt plus every generated token but the last (which is never fed back)
    budget = [min(max_new_tokens, ctx - n + 1) for n in lens]
    max_len = max(n + m - 1 for n, m in zip(lens, budget))
    generators = None
    if temperature > 0:
        if seeds is None:  # fresh entropy per request
            generators = [torch.Generator() for _ in range(B)]
            for g in generators:
                g.seed()
        else:
            seeds = [seeds] * B if isinstance(seeds, int) else list(seeds)
            assert len(seeds) == B, f"{len(seeds)} seeds for {B} prompts"
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    cache = model.new_cache(B, max_len)
    logits = model.prefill(cache, prompts)                                   # [B, V]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    while True:  # one iteration per generated token position; all work inside is batched
        nxt = sample(logits, temperature=temperature, top_p=top_p, generators=generators)   # [B]
        for b, t in enumerate(nxt.tolist()):  # the one device->host sync per step (EOS needs the values)
            if not done[b]:
                out[b].append(t)
                done[b] = t in eos or len(out[b]) >= budget[b]
        if all(done):
            return out
        logits = model.decode(cache, nxt, active=[not d for d in done])
