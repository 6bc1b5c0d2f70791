"""Where each supported MoE family keeps its expert weights in a Hugging Face checkpoint, and which layers are MoE.

Two layouts exist on disk:
  per-expert  `...layers.{l}.block_sparse_moe.experts.{e}.w1|w3|w2.weight` (Mixtral) or
              `...layers.{l}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight` (Qwen2/3-MoE, OLMoE, DeepSeek)
  fused       `...layers.{l}.mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first, then up: transformers 5.x
              splits it with .chunk(2, dim=-1) after the matmul) and `...mlp.experts.down_proj` [E, H, I]
In the store every expert becomes gate [I, H], up [I, H], down [H, I] — nn.Linear's [out, in] convention.
Shared experts (Qwen's `shared_expert`, DeepSeek's `shared_experts`) run for every token, so they stay dense.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import CheckpointError

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")

_ROLE = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
PER_EXPERT = re.compile(r"^(?P<prefix>.*?layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp)\.experts)\."
                        r"(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
FUSED = re.compile(r"^(?P<prefix>.*?layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp)\.experts)\."
                   r"(?P<proj>gate_up_proj|down_proj)$")


def role_of(proj: str) -> str:
    return _ROLE[proj]


@dataclass(frozen=True)
class FamilyGeometry:
    family: str
    num_layers: int
    num_experts: int
    hidden_size: int
    intermediate_size: int      # per routed expert
    moe_layers: tuple[int, ...]
    dtype: str | None           # safetensors dtype name the config declares, if any


_TORCH_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def _need(config: dict, where: str, *keys: str):
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    raise CheckpointError(f"{where}: config.json lacks {' or '.join(keys)}")


def geometry(config: dict, where: str) -> FamilyGeometry:
    """Read the family's geometry from config.json; unknown families fail with the supported list."""
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise CheckpointError(f"{where}: unsupported model family {family!r} (config.json model_type); "
                              f"supported: {', '.join(SUPPORTED_FAMILIES)}")
    n_layers = int(_need(config, where, "num_hidden_layers"))
    n_exp = int(_need(config, where, "num_local_experts", "num_experts", "n_routed_experts"))
    hidden = int(_need(config, where, "hidden_size"))
    inter = int(_need(config, where, "moe_intermediate_size", "intermediate_size")
                if family not in ("mixtral", "olmoe") else _need(config, where, "intermediate_size"))
    if family in ("mixtral", "olmoe"):
        moe = range(n_layers)
    elif family in ("qwen2_moe", "qwen3_moe"):
        step, dense = int(config.get("decoder_sparse_step") or 1), set(config.get("mlp_only_layers") or [])
        moe = [l for l in range(n_layers) if l not in dense and (l + 1) % step == 0]
    else:  # deepseek_v2 / deepseek_v3
        k, freq = int(config.get("first_k_dense_replace") or 0), int(config.get("moe_layer_freq") or 1)
        moe = [l for l in range(n_layers) if l >= k and l % freq == 0]
    torch_dtype = config.get("dtype") or config.get("torch_dtype")
    return FamilyGeometry(family, n_layers, n_exp, hidden, inter, tuple(moe), _TORCH_TO_ST.get(torch_dtype))
