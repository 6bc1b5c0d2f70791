"""ExpertStore: verified reads of expert blobs and dense weights from whichever tiers hold them.

Every byte is checked against the manifest before it is returned. On a mismatch the same tier is tried once
more (a torn read or a flipped bit in flight), then the next tier that holds the blob; if none yields the right
bytes, BlobIntegrityError names the blob, the tier, the expected and the actual checksum. Wrong weights are never
returned. Encrypted tiers are verified as stored, then decrypted into a fresh buffer, then verified as plaintext.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from . import crypto
from .base import BlobAdapter
from .checksum import verify
from .errors import BlobIntegrityError, BlobNotFound, ManifestError, StoreError, TierAccessError
from .manifest import MANIFEST_KEY, AuxFile, BlobEntry, DenseFile, Manifest, TensorEntry

log = logging.getLogger(__name__)


@dataclass
class ReadStats:
    reads: dict[str, int] = field(default_factory=dict)          # tier -> blobs served
    bytes: dict[str, int] = field(default_factory=dict)          # tier -> bytes served
    checksum_failures: dict[str, int] = field(default_factory=dict)
    fallbacks: int = 0


async def load_manifest(adapters: list[BlobAdapter]) -> Manifest:
    """The manifest from the first tier that has a valid one; errors name every tier tried and why."""
    problems = []
    for a in adapters:
        try:
            raw = await a.read(MANIFEST_KEY)
        except BlobNotFound:
            problems.append(f"{a.tier} ({a.uri}): no {MANIFEST_KEY}")
            continue
        except StoreError as e:
            problems.append(f"{a.tier} ({a.uri}): {e}")
            continue
        try:
            return Manifest.from_json(raw.tobytes(), f"{a.uri}/{MANIFEST_KEY}")
        except ManifestError as e:
            problems.append(str(e))
    raise ManifestError("no usable manifest: " + "; ".join(problems) +
                        " — convert a checkpoint first: python -m jobs.convert --checkpoint DIR --store URI")


class ExpertStore:
    def __init__(self, manifest: Manifest, adapters: list[BlobAdapter], keys: dict[str, bytes] | None = None):
        """adapters: in preference order (fastest tier first). keys: tier name -> AES key for encrypted tiers."""
        self.manifest = manifest
        self.adapters = adapters
        self.keys = keys or {}
        self.stats = ReadStats()

    @classmethod
    async def open(cls, adapters: list[BlobAdapter], keys: dict[str, bytes] | None = None) -> "ExpertStore":
        return cls(await load_manifest(adapters), adapters, keys)

    def eligible(self, entry: BlobEntry | DenseFile | AuxFile, tiers: list[str] | None = None) -> list[BlobAdapter]:
        allowed = set(tiers) if tiers is not None else None
        return [a for a in self.adapters if a.tier in entry.tiers and (allowed is None or a.tier in allowed)]

    async def _read_verified(self, entry: BlobEntry | DenseFile | AuxFile, tiers: list[str] | None) -> tuple[np.ndarray, str]:
        cands = self.eligible(entry, tiers)
        if not cands:
            raise TierAccessError(f"blob {entry.key!r}: no eligible tier holds it (held by {sorted(entry.tiers)}, "
                                  f"tiers allowed: {tiers if tiers is not None else 'all'}, configured: "
                                  f"{[a.tier for a in self.adapters]})")
        mismatch: BlobIntegrityError | None = None
        failures = []
        for i, a in enumerate(cands):
            copy = entry.tiers[a.tier]
            for attempt in range(2):
                try:
                    raw = await a.read(entry.key, 0, copy.stored_size)
                except StoreError as e:
                    failures.append(f"{a.tier}: {e}")
                    break  # an access problem does not improve on an immediate retry; adapters retry transients
                ok, actual = verify(raw, copy.stored_checksum)
                if ok and copy.encrypted:
                    key = self.keys.get(a.tier)
                    if key is None:
                        failures.append(f"{a.tier}: blob is encrypted and no key is configured for this tier")
                        break
                    try:
                        raw = crypto.decrypt(key, raw, entry.key)
                    except crypto.DecryptError as e:
                        ok, actual = False, f"undecryptable ({e})"
                    else:
                        ok, actual = verify(raw, entry.checksum)
                if ok:
                    self._served(a.tier, len(raw), fallback=i > 0)
                    return raw, a.tier
                self.stats.checksum_failures[a.tier] = self.stats.checksum_failures.get(a.tier, 0) + 1
                expected = copy.stored_checksum if not copy.encrypted or actual.startswith("undecrypt") \
                    else entry.checksum
                mismatch = BlobIntegrityError(entry.key, a.tier, expected, actual,
                                              f"attempt {attempt + 1}; tiers tried: {[c.tier for c in cands[:i + 1]]}")
                log.warning("%s", mismatch)
        if mismatch is not None:
            raise mismatch
        raise TierAccessError(f"blob {entry.key!r}: every eligible tier failed: " + "; ".join(failures))

    def _served(self, tier: str, nbytes: int, fallback: bool) -> None:
        st = self.stats
        st.fallbacks += fallback
        st.reads[tier] = st.reads.get(tier, 0) + 1
        st.bytes[tier] = st.bytes.get(tier, 0) + nbytes

    async def read_blob(self, layer: int, expert: int, tiers: list[str] | None = None) -> tuple[np.ndarray, str]:
        """(verified plaintext blob [size] uint8, tier it came from)."""
        return await self._read_verified(self.manifest.blob(layer, expert), tiers)

    async def read_tensor(self, layer: int, expert: int, role: str, tiers: list[str] | None = None) -> np.ndarray:
        """One tensor of an expert by byte range (whole blob on encrypted tiers, where ranges cannot verify).

        Same guarantees as read_blob: a mismatch is retried once on the tier, then the next tier is tried; only
        bytes matching the tensor's checksum are returned, else BlobIntegrityError names the blob#role, the tier,
        expected and actual checksum (TierAccessError when no tier could be read at all)."""
        entry = self.manifest.blob(layer, expert)
        t = entry.tensors[role]
        cands = self.eligible(entry, tiers)
        if not cands:
            raise TierAccessError(f"blob {entry.key!r}: no eligible tier holds it (held by {sorted(entry.tiers)}, "
                                  f"tiers allowed: {tiers if tiers is not None else 'all'}, configured: "
                                  f"{[a.tier for a in self.adapters]})")
        failures = []
        mismatch: BlobIntegrityError | None = None
        for i, a in enumerate(cands):
            if entry.tiers[a.tier].encrypted:
                try:
                    blob, _ = await self._read_verified(entry, [a.tier])
                except BlobIntegrityError as e:  # e.g. a wrong key on this tier: another tier may still serve it
                    mismatch = e
                    failures.append(f"{a.tier}: {e}")
                    continue
                except StoreError as e:
                    failures.append(f"{a.tier}: {e}")
                    continue
                if i:
                    self.stats.fallbacks += 1
                return blob[t.offset:t.offset + t.length]
            for attempt in range(2):
                try:
                    raw = await a.read(entry.key, t.offset, t.length)
                except StoreError as e:
                    failures.append(f"{a.tier}: {e}")
                    break
                ok, actual = verify(raw, t.checksum)
                if ok:
                    self._served(a.tier, len(raw), fallback=i > 0)
                    return raw
                self.stats.checksum_failures[a.tier] = self.stats.checksum_failures.get(a.tier, 0) + 1
                failures.append(f"{a.tier}: checksum {actual} != {t.checksum}")
                mismatch = BlobIntegrityError(f"{entry.key}#{role}", a.tier, t.checksum, actual,
                                              f"attempt {attempt + 1}; tiers tried: {[c.tier for c in cands[:i + 1]]}")
                log.warning("%s", mismatch)
        if mismatch is not None:
            raise mismatch
        raise TierAccessError(f"blob {entry.key!r} tensor {role!r}: every eligible tier failed: " + "; ".join(failures))

    async def read_aux(self, name: str, tiers: list[str] | None = None) -> bytes | None:
        """A verified side file of the checkpoint (e.g. "tokenizer.json"), or None when the store has none."""
        entry = self.manifest.aux.get(name)
        if entry is None:
            return None
        raw, _ = await self._read_verified(entry, tiers)
        return raw.tobytes()

    async def read_dense(self, tiers: list[str] | None = None) -> tuple[np.ndarray, str]:
        """The verified dense .safetensors file as bytes (parse with safetensors.torch.load)."""
        return await self._read_verified(self.manifest.dense, tiers)

    @staticmethod
    def tensor_view(blob: np.ndarray, t: TensorEntry) -> np.ndarray:
        """Zero-copy uint8 view of one tensor inside a blob (reinterpret with the dtype at the consumer)."""
        return blob[t.offset:t.offset + t.length]

    async def close(self) -> None:
        for a in self.adapters:
            await a.close()
