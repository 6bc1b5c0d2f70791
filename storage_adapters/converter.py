"""Convert a Hugging Face MoE checkpoint into the expert store, streaming tensor by tensor.

plan_conversion() reads only headers and config.json and validates everything (family, every expected tensor,
shapes, dtypes) before a byte is written, so bad input fails fast and leaves nothing behind. convert() then
writes dense.safetensors, one blob per (layer, expert), and finally manifest.json to every target, each
atomically. Re-running is idempotent and resumes: objects already present with the right checksum are skipped,
leftovers of an interrupted run (temp files, incomplete multipart uploads) are cleared and rewritten.
Peak memory is bounded by `max_inflight` experts plus one 16 MiB dense chunk, whatever the checkpoint's size —
except with encryption at rest: an encrypted copy of the dense file (and of aux files) is read, sealed and
uploaded whole, so it needs about twice the dense file's size in memory. The dense file is staged on disk beside
the first local (file://) store, or in $TMPDIR when there is none: a tmpfs there would hold it in memory.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import crypto
from .base import BlobAdapter
from .buffers import PAGE, align_up, aligned_empty, aligned_zeros, return_large_frees_to_os
from .checksum import Hasher, algo_of, digest
from .errors import BlobNotFound, CheckpointError, StoreError
from .families import FUSED, PER_EXPERT, FamilyGeometry, geometry, role_of
from .manifest import (AUX_FILES, DENSE_KEY, FORMAT_VERSION, MANIFEST_KEY, ROLES, AuxFile, BlobEntry, DenseFile,
                       Manifest, ModelInfo, TensorEntry, TierCopy, blob_key)
from .nvme import NvmeAdapter
from .s3 import S3Adapter
from .safetensors_io import DTYPE_SIZES, SafetensorsWriter, TensorInfo, read_header, read_tensor_bytes

DENSE_CHUNK = 16 << 20
VERIFY_CHUNK = 4 << 20  # read-back of objects a re-run finds already present


@dataclass(frozen=True)
class ExpertPart:
    role: str
    info: TensorInfo
    index: int | None = None              # expert index into a fused [E, ...] tensor
    rows: tuple[int, int] | None = None   # row range inside that expert (gate/up halves of gate_up_proj)

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.info.shape[1:] if self.index is not None else self.info.shape
        return (self.rows[1] - self.rows[0], *s[1:]) if self.rows else s

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * DTYPE_SIZES[self.info.dtype]

    @property
    def source(self) -> str:
        if self.index is None:
            return self.info.name
        return f"{self.info.name}[{self.index}" + (f",{self.rows[0]}:{self.rows[1]}]" if self.rows else "]")


@dataclass(frozen=True)
class ExpertPlan:
    layer: int
    expert: int
    parts: tuple[ExpertPart, ...]         # in ROLES order

    def layout(self) -> tuple[list[int], int]:
        offs, off = [], 0
        for p in self.parts:
            offs.append(off)
            off = align_up(off + p.nbytes, PAGE)
        return offs, off


@dataclass
class ConversionPlan:
    checkpoint: str
    config: dict
    geom: FamilyGeometry
    dtype: str
    layout: str
    experts: list[ExpertPlan]
    dense: list[TensorInfo]


def _load_tensors(ckpt: str) -> dict[str, TensorInfo]:
    index = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable or lacks weight_map: {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(ckpt, f))]
        if missing:
            raise CheckpointError(f"{ckpt}: shards named in model.safetensors.index.json are missing: {missing}")
    else:
        weight_map = None
        files = sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{ckpt}: no *.safetensors files (and no model.safetensors.index.json)")
    tensors: dict[str, TensorInfo] = {}
    for fname in files:
        for name, info in read_header(os.path.join(ckpt, fname)).items():
            if name in tensors:
                raise CheckpointError(f"{ckpt}: tensor {name!r} appears in both {tensors[name].file} and {fname}")
            tensors[name] = info
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{ckpt}: tensors listed in the index are absent from their shards: {absent[:5]}")
    return tensors


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def plan_conversion(ckpt: str) -> ConversionPlan:
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"{ckpt}: checkpoint directory does not exist or is not a directory")
    cfg_path = os.path.join(ckpt, "config.json")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{cfg_path}: missing; a Hugging Face checkpoint needs its config.json") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable or not JSON: {e}") from e
    geom = geometry(config, cfg_path)
    tensors = _load_tensors(ckpt)

    per: dict[tuple[int, int], dict[str, TensorInfo]] = {}
    fused: dict[int, dict[str, TensorInfo]] = {}
    dense: list[TensorInfo] = []
    # DeepSeek-V3 ships its multi-token-prediction module as the layers after the last decoder layer (layer 61):
    # decoding never runs it, and transformers skips it on load, so it is left out of the store too
    n_layers = int(config.get("num_hidden_layers") or 0)
    mtp = range(n_layers, n_layers + int(config.get("num_nextn_predict_layers") or 0)) \
        if geom.family.startswith("deepseek") else range(0)
    for name, info in tensors.items():
        if mtp and (m := _LAYER.match(name)) and int(m[1]) in mtp:
            continue
        if m := PER_EXPERT.match(name):
            per.setdefault((int(m["layer"]), int(m["expert"])), {})[role_of(m["proj"])] = info
        elif m := FUSED.match(name):
            fused.setdefault(int(m["layer"]), {})[m["proj"]] = info
        else:
            dense.append(info)
    if per and fused:
        raise CheckpointError(f"{ckpt}: mixes per-expert and fused expert tensors; convert one layout at a time")
    H, I, E = geom.hidden_size, geom.intermediate_size, geom.num_experts
    want = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    plans: list[ExpertPlan] = []
    problems: list[str] = []
    for layer in geom.moe_layers:
        if fused:
            got = fused.get(layer, {})
            gu, dn = got.get("gate_up_proj"), got.get("down_proj")
            if gu is None or dn is None:
                problems.append(f"layer {layer}: missing fused tensor(s) "
                                f"{[p for p, t in (('gate_up_proj', gu), ('down_proj', dn)) if t is None]}")
                continue
            if gu.shape != (E, 2 * I, H) or dn.shape != (E, H, I):
                problems.append(f"{gu.name} {list(gu.shape)} / {dn.name} {list(dn.shape)}: config says "
                                f"[{E}, {2 * I}, {H}] / [{E}, {H}, {I}]")
                continue
            for e in range(E):
                plans.append(ExpertPlan(layer, e, (ExpertPart("gate", gu, e, (0, I)), ExpertPart("up", gu, e, (I, 2 * I)),
                                                   ExpertPart("down", dn, e))))
        else:
            for e in range(E):
                got = per.get((layer, e), {})
                miss = [r for r in ROLES if r not in got]
                if miss:
                    problems.append(f"layer {layer} expert {e}: missing {miss}")
                    continue
                bad = [f"{got[r].name} {list(got[r].shape)} (config says {list(want[r])})" for r in ROLES
                       if got[r].shape != want[r]]
                if bad:
                    problems += bad
                    continue
                plans.append(ExpertPlan(layer, e, tuple(ExpertPart(r, got[r]) for r in ROLES)))
    extra = sorted({l for l, _ in per} | set(fused)) if (per or fused) else []
    unexpected = [l for l in extra if l not in geom.moe_layers]
    if unexpected:
        problems.append(f"expert tensors in layers {unexpected}, which config.json says are dense")
    if not plans and not problems:
        problems.append("no expert tensors found")
    dtypes = {p.info.dtype for pl in plans for p in pl.parts}
    if len(dtypes) > 1:
        problems.append(f"expert tensors mix dtypes {sorted(dtypes)}")
    dtype = next(iter(dtypes), geom.dtype or "F32")
    if geom.dtype and dtypes and dtype != geom.dtype:
        problems.append(f"config.json declares dtype {geom.dtype} but expert tensors are {dtype}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{ckpt} ({geom.family}): {shown}")
    dense.sort(key=lambda t: t.name)
    return ConversionPlan(ckpt, config, geom, dtype, "fused" if fused else "per_expert", plans, dense)


# -- peak memory -----------------------------------------------------------------------------------------------
class PeakAnonMemory:
    """Samples this process's anonymous resident memory (RssAnon: heap and buffers, not mapped files) so the
    report says what conversion itself holds, independent of the page cache."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.base, self.peak = interval_s, self._read(), 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _read() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._read())

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.base)


# -- targets -----------------------------------------------------------------------------------------------------
@dataclass
class Target:
    adapter: BlobAdapter
    key: bytes | None = None  # AES-256 key: this tier stores objects encrypted

    @property
    def tier(self) -> str:
        return self.adapter.tier


@dataclass
class ConvertReport:
    manifest: Manifest
    written: dict[str, int] = field(default_factory=dict)   # tier -> objects written
    skipped: dict[str, int] = field(default_factory=dict)   # tier -> objects already present and verified
    bytes_written: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    peak_anon_bytes: int = 0
    expert_bytes: int = 0
    cleaned: int = 0


def _key_id(key: bytes | None) -> str:
    """A fingerprint that tells keys apart without revealing them (so a re-run under a new key rewrites)."""
    if not key:
        return ""
    import hashlib
    return hashlib.sha256(b"moe-expert-store key id\0" + key).hexdigest()[:16]


async def _present(t: Target, key: str, checksum: str, plain_size: int) -> TierCopy | None:
    """The TierCopy of an object that is already there with the expected content, else None.

    On disk metadata alone is not trusted: a blob corrupted in place (bit rot, a torn write by another tool) keeps
    its size and xattrs, so the object is read back and checked — plaintext in bounded chunks, encrypted objects whole
    (AES-GCM authenticates the whole object), decrypted with this run's key so a store written under another key
    is rewritten rather than recorded as readable. On S3, objects are immutable and carry our metadata (checksums
    and a key fingerprint) from the one request that created them, so that metadata is trusted."""
    info = await t.adapter.stat(key)
    stored = crypto.stored_size(plain_size) if t.key else plain_size
    if info is None or info.size != stored:
        return None
    md = info.metadata
    if md and not (md.get("plain-checksum") == checksum and md.get("stored-checksum")
                   and md.get("encrypted") == str(bool(t.key))):
        return None  # written for other content, or with/without encryption
    if isinstance(t.adapter, S3Adapter) and md and md.get("key-id", "") == _key_id(t.key):
        # An S3 object is immutable and was written whole, with this metadata, by one PUT or completed multipart
        # upload whose parts the server checksummed; downloading every object of a large store to re-verify it
        # would make a re-run as expensive as the upload. Reads verify every byte anyway.
        return TierCopy(stored_size=stored, stored_checksum=md["stored-checksum"], encrypted=bool(t.key))
    algo = algo_of(checksum)
    try:
        if t.key:
            raw = await t.adapter.read(key, 0, stored)
            stored_sum = digest(raw, algo)
            if md and stored_sum != md["stored-checksum"]:
                return None
            try:
                plain = crypto.decrypt(t.key, raw, key)
            except crypto.DecryptError:
                return None
            if digest(plain, algo) != checksum:
                return None
            return TierCopy(stored_size=stored, stored_checksum=stored_sum, encrypted=True)
        h = Hasher(algo)
        buf = aligned_empty(max(1, min(stored, VERIFY_CHUNK)))
        for s in range(0, stored, len(buf)):
            n = min(len(buf), stored - s)
            await t.adapter.read_into(key, buf[:n], s)
            h.update(buf[:n])
    except BlobNotFound:  # deleted between stat and read
        return None
    if h.result() != checksum:
        return None
    return TierCopy(stored_size=stored, stored_checksum=checksum, encrypted=False)


async def _put(t: Target, key: str, data, checksum: str, report: ConvertReport, src_path: str | None = None) -> TierCopy:
    algo = checksum.split(":")[0]
    size = len(memoryview(data).cast("B")) if data is not None else os.path.getsize(src_path)
    have = await _present(t, key, checksum, size)
    if have is not None:
        report.skipped[t.tier] = report.skipped.get(t.tier, 0) + 1
        return have
    if t.key:
        if data is None:
            with open(src_path, "rb") as f:
                data = f.read()
        stored = crypto.encrypt(t.key, data, key)
    else:
        stored = data
    stored_sum = digest(stored, algo) if stored is not None else checksum
    md = {"plain-checksum": checksum, "stored-checksum": stored_sum, "encrypted": str(bool(t.key)),
          "key-id": _key_id(t.key)}
    if stored is None:
        await t.adapter.write_file(key, src_path, md)
    else:
        await t.adapter.write(key, stored, md)
    report.written[t.tier] = report.written.get(t.tier, 0) + 1
    n = size if stored is None else len(memoryview(stored).cast("B"))
    report.bytes_written[t.tier] = report.bytes_written.get(t.tier, 0) + n
    return TierCopy(stored_size=n, stored_checksum=stored_sum, encrypted=bool(t.key))


async def _clean(targets: list[Target]) -> int:
    n = 0
    for t in targets:
        a = t.adapter
        if isinstance(a, S3Adapter):
            await a.check_bucket()
            n += await asyncio.get_running_loop().run_in_executor(None, a.abort_incomplete_uploads)
        elif isinstance(a, NvmeAdapter):
            for p in a.list_tmp():
                os.unlink(p)
                n += 1
    return n


def _build_dense(plan: ConversionPlan, path: str, algo: str) -> tuple[dict[str, TensorEntry], str, int]:
    w = SafetensorsWriter(path, [(t.name, t.dtype, t.shape) for t in plan.dense])
    entries = {}
    try:
        buf = np.empty(DENSE_CHUNK, np.uint8)
        for t in plan.dense:
            h = Hasher(algo)
            for s in range(0, t.nbytes, DENSE_CHUNK):
                n = min(DENSE_CHUNK, t.nbytes - s)
                chunk = read_tensor_bytes(TensorInfo(t.name, "U8", (n,), t.file, t.start + s, t.start + s + n),
                                          out=buf)
                h.update(chunk)
                w.write_part(t.name, chunk)
            b, e = w.offsets[t.name]
            entries[t.name] = TensorEntry(name=t.name, dtype=t.dtype, shape=t.shape, offset=b, length=e - b,
                                          checksum=h.result(), source=t.name)
        w.close()
    except BaseException:
        w.abort()
        os.unlink(path)
        raise
    h = Hasher(algo)
    with open(path, "rb") as f:
        while chunk := f.read(DENSE_CHUNK):
            h.update(chunk)
    return entries, h.result(), w.size


def _pack_expert(p: ExpertPlan, algo: str) -> tuple[np.ndarray, dict[str, TensorEntry], str]:
    offs, size = p.layout()
    blob = aligned_zeros(size)  # padding stays zero, so the blob checksum is reproducible
    tensors = {}
    for off, part in zip(offs, p.parts):
        view = blob[off:off + part.nbytes]
        read_tensor_bytes(part.info, part.index, part.rows, out=view)
        tensors[part.role] = TensorEntry(name=part.role, dtype=part.info.dtype, shape=part.shape, offset=off,
                                         length=part.nbytes, checksum=digest(view, algo), source=part.source)
    return blob, tensors, digest(blob, algo)


def _existing_parent(path: str) -> str:
    """The nearest folder above path that exists (the store's own folder may not yet)."""
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(d):
        d = os.path.dirname(d)
    return d


async def convert(plan: ConversionPlan, targets: list[Target], *, checksum_algo: str = "xxh64",
                  max_inflight: int = 4, progress: bool = True) -> ConvertReport:
    assert targets, "convert needs at least one target store"
    tiers = [t.tier for t in targets]
    assert len(set(tiers)) == len(tiers), f"two targets share a tier name: {tiers}"
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    return_large_frees_to_os()  # freed blobs leave the process, so peak memory is what is live
    with PeakAnonMemory() as mem:
        report = ConvertReport(manifest=None)  # type: ignore[arg-type]
        report.cleaned = await _clean(targets)
        # the dense file is staged beside the first local store (on its disk), not in $TMPDIR: that may be a tmpfs,
        # holding the whole file in memory, or too small
        stage = next((d for d in (_existing_parent(t.adapter.root) for t in targets
                                  if isinstance(t.adapter, NvmeAdapter)) if os.access(d, os.W_OK)), None)
        with tempfile.TemporaryDirectory(prefix="moe-convert-", dir=stage) as tmp:
            dpath = os.path.join(tmp, DENSE_KEY)
            try:
                dtensors, dsum, dsize = await loop.run_in_executor(None, _build_dense, plan, dpath, checksum_algo)
            except OSError as e:
                raise StoreError(f"staging the dense file at {dpath}: {e.strerror or e}") from e
            dcopies = {t.tier: await _put(t, DENSE_KEY, None, dsum, report, src_path=dpath) for t in targets}
        dense = DenseFile(key=DENSE_KEY, size=dsize, checksum=dsum, tensors=dtensors, tiers=dcopies)
        aux = {}
        for name in AUX_FILES:
            src = os.path.join(plan.checkpoint, name)
            if os.path.isfile(src):
                with open(src, "rb") as f:
                    asum = digest(f.read(), checksum_algo)
                copies = {t.tier: await _put(t, f"aux/{name}", None, asum, report, src_path=src) for t in targets}
                aux[name] = AuxFile(key=f"aux/{name}", size=os.path.getsize(src), checksum=asum, tiers=copies)

        sem = asyncio.Semaphore(max_inflight)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(plan.experts), unit="expert", desc=f"convert {plan.geom.family}")

        async def one(p: ExpertPlan) -> BlobEntry:
            async with sem:
                blob, tensors, bsum = await loop.run_in_executor(None, _pack_expert, p, checksum_algo)
                key = blob_key(p.layer, p.expert)
                copies = await asyncio.gather(*[_put(t, key, blob, bsum, report) for t in targets])
                del blob
            if bar is not None:
                bar.update(1)
            return BlobEntry(key=key, layer=p.layer, expert=p.expert, size=p.layout()[1], checksum=bsum,
                             tensors=tensors, tiers=dict(zip(tiers, copies)))

        try:
            blobs = await asyncio.gather(*[one(p) for p in plan.experts])
        finally:
            if bar is not None:
                bar.close()
        g = plan.geom
        manifest = Manifest(
            format_version=FORMAT_VERSION, created_at=time.time(),
            model=ModelInfo(family=g.family, config=plan.config, num_layers=g.num_layers, num_experts=g.num_experts,
                            moe_layers=g.moe_layers, hidden_size=g.hidden_size, intermediate_size=g.intermediate_size,
                            expert_layout=plan.layout),
            dtype=plan.dtype, alignment=PAGE, checksum_algo=checksum_algo,
            locations={t.tier: t.adapter.uri for t in targets}, dense=dense, blobs=tuple(blobs), aux=aux)
        raw = manifest.to_json()
        # the manifest goes last: until it lands, no reader can see a store pointing at missing blobs
        for t in targets:
            await t.adapter.write(MANIFEST_KEY, raw, {"plain-checksum": digest(raw)})
    report.manifest = manifest
    report.seconds = time.perf_counter() - t0
    report.peak_anon_bytes = mem.delta
    report.expert_bytes = manifest.expert_bytes
    return report


def open_target(uri: str, *, endpoint_url: str | None = None, key: bytes | None = None, tier: str | None = None,
                **kw) -> Target:
    """A Target for `file:///path` or `s3://bucket/prefix`. tier: the name the manifest records the copy under,
    which must be the config's name of the tier that reads it (cluster/config.py); default its kind, "nvme" or
    "s3"."""
    if uri.startswith("file://"):
        return Target(NvmeAdapter(uri[len("file://"):], tier=tier or "nvme"), key)
    if uri.startswith("s3://"):
        return Target(S3Adapter(uri, tier=tier or "s3", endpoint_url=endpoint_url, **kw), key)
    raise StoreError(f"store URI {uri!r}: expected file:///path or s3://bucket/prefix")
