"""The store manifest: the single source of truth for what a store holds, where, and how to verify it.

Layout of a store location (a directory for the NVMe tier, a bucket prefix for the S3 tier):

    manifest.json                  this file, written last and atomically
    dense.safetensors              every non-expert weight (embeddings, attention, norms, routers, shared experts)
    aux/tokenizer.json ...         the checkpoint's small side files (tokenizer, generation config), if present
    experts/L{layer:03d}/E{expert:03d}.bin   one blob per (layer, expert): gate, up, down, each 4 KiB-aligned

A blob's tensors are addressable by byte range (`TensorEntry.offset/length`), so a reader can fetch one tensor.
Checksums cover the plaintext: the whole padded blob, and each tensor's own bytes. Where a tier stores a blob
encrypted, `TierCopy.stored_checksum` covers the bytes as stored, so they are verified before decryption.
"""
from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator

from .errors import ManifestError

FORMAT_VERSION = 1
MANIFEST_KEY = "manifest.json"
DENSE_KEY = "dense.safetensors"
ROLES = ("gate", "up", "down")  # Mixtral's w1, w3, w2


def blob_key(layer: int, expert: int) -> str:
    return f"experts/L{layer:03d}/E{expert:03d}.bin"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorEntry(_Strict):
    name: str            # role inside a blob ("gate"/"up"/"down"), or the checkpoint name for dense tensors
    dtype: str           # safetensors dtype name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    offset: int          # bytes from the start of the (plaintext) blob or file
    length: int          # bytes
    checksum: str
    source: str = ""     # where it came from in the checkpoint, e.g. "model.layers.0.mlp.experts.gate_up_proj[3,0:64]"


class TierCopy(_Strict):
    stored_size: int
    stored_checksum: str
    encrypted: bool = False


class BlobEntry(_Strict):
    key: str
    layer: int
    expert: int
    size: int            # plaintext bytes, a multiple of the alignment
    checksum: str
    tensors: dict[str, TensorEntry]
    tiers: dict[str, TierCopy]   # tier name -> how that tier holds it

    @field_validator("tensors")
    @classmethod
    def _roles(cls, v):
        missing = [r for r in ROLES if r not in v]
        if missing:
            raise ValueError(f"blob lacks tensors {missing}")
        return v


class DenseFile(_Strict):
    key: str
    size: int
    checksum: str
    tensors: dict[str, TensorEntry]
    tiers: dict[str, TierCopy]


class AuxFile(_Strict):
    """A small file of the checkpoint kept beside the weights (tokenizer.json, generation_config.json, ...)."""
    key: str
    size: int
    checksum: str
    tiers: dict[str, TierCopy]


AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class ModelInfo(_Strict):
    family: str                   # config.json model_type
    config: dict                  # the checkpoint's config.json, verbatim
    num_layers: int
    num_experts: int
    moe_layers: tuple[int, ...]
    hidden_size: int
    intermediate_size: int        # per expert
    expert_layout: Literal["per_expert", "fused"]


class Manifest(_Strict):
    format_version: int
    created_at: float
    model: ModelInfo
    dtype: str
    alignment: int
    checksum_algo: str
    locations: dict[str, str]     # tier name -> URI of the store on that tier
    dense: DenseFile
    blobs: tuple[BlobEntry, ...]
    aux: dict[str, AuxFile] = {}  # file name -> entry; key "aux/<name>"
    _idx: dict | None = PrivateAttr(default=None)

    @field_validator("format_version")
    @classmethod
    def _version(cls, v):
        if v != FORMAT_VERSION:
            raise ValueError(f"format_version {v} is not supported by this build (reads {FORMAT_VERSION})")
        return v

    # -- lookups ------------------------------------------------------------------------------------------------
    def blob(self, layer: int, expert: int) -> BlobEntry:
        idx = self._index().get((layer, expert))
        if idx is None:
            raise KeyError(f"store has no expert blob for layer {layer}, expert {expert}")
        return self.blobs[idx]

    def _index(self) -> dict[tuple[int, int], int]:
        if self._idx is None:
            self._idx = {(b.layer, b.expert): i for i, b in enumerate(self.blobs)}
        return self._idx

    @property
    def expert_bytes(self) -> int:
        return max((b.size for b in self.blobs), default=0)

    # -- (de)serialisation --------------------------------------------------------------------------------------
    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str, where: str) -> "Manifest":
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{where}: manifest is not valid JSON ({e}); the store is corrupt or was not "
                                f"written by jobs.convert — re-run the conversion") from e
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: manifest must be a JSON object, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            errs = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
            raise ManifestError(f"{where}: invalid manifest: {errs}") from e


def now() -> float:
    return time.time()
