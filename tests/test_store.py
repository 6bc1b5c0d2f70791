"""ExpertStore: verified reads, fallback across tiers, integrity errors, manifest errors, encryption at rest.

Stores are made by the real converter from a small hand-built checkpoint, on a file:// tier and an s3:// tier on the
moto server; corruption is injected by editing the stored objects directly (file I/O, boto3 to moto).
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import uuid

import pytest

import checkpoints as C
from storage_adapters.converter import Target, convert, plan_conversion
from storage_adapters.errors import BlobIntegrityError, ManifestError, TierAccessError
from storage_adapters.local_s3 import s3_client
from storage_adapters.manifest import DENSE_KEY, MANIFEST_KEY
from storage_adapters.nvme import NvmeAdapter
from storage_adapters.s3 import RetryPolicy, S3Adapter
from storage_adapters.store import ExpertStore

FAST = RetryPolicy(max_attempts=2, base_delay_s=0.001, max_delay_s=0.01)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ckpt"))
    C.save_legacy(d, dtype="bfloat16", seed=11)
    return d, C.original_tensors(d)


class Store:
    """A converted store on both tiers, and ways to reach its raw objects."""

    def __init__(self, root, endpoint, bucket, prefix):
        self.root, self.endpoint, self.bucket, self.prefix = root, endpoint, bucket, prefix
        self.s3 = s3_client(endpoint) if endpoint else None

    def nvme(self):
        return NvmeAdapter(self.root, tier="nvme")

    def s3a(self):
        return S3Adapter(f"s3://{self.bucket}/{self.prefix}", tier="s3", endpoint_url=self.endpoint, retry=FAST)

    def manifest(self) -> dict:
        with open(os.path.join(self.root, MANIFEST_KEY)) as f:
            return json.load(f)

    def flip_file(self, key: str, offset: int) -> None:
        with open(os.path.join(self.root, key), "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0x01]))

    def get_s3(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()

    def flip_s3(self, key: str, offset: int) -> bytes:
        data = bytearray(self.get_s3(key))
        data[offset] ^= 0x01
        self.s3.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=bytes(data))
        return bytes(data)

    def read_file(self, key: str) -> bytes:
        with open(os.path.join(self.root, key), "rb") as f:
            return f.read()


def _convert(ckpt_dir, targets):
    async def go():
        try:
            return await convert(plan_conversion(ckpt_dir), targets, progress=False)
        finally:
            for t in targets:
                await t.adapter.close()
    return asyncio.run(go())


@pytest.fixture()
def store(ckpt, tmp_path, moto_server, s3_bucket):
    st = Store(str(tmp_path / "nvme"), moto_server.endpoint_url, s3_bucket, f"store/{uuid.uuid4().hex[:8]}")
    _convert(ckpt[0], [Target(st.nvme()), Target(st.s3a())])
    return st


@pytest.fixture()
def nvme_store(ckpt, tmp_path):
    """The same store on the file tier only (cheaper, for tests that need no second tier)."""
    st = Store(str(tmp_path / "nvme"), None, None, None)
    _convert(ckpt[0], [Target(st.nvme())])
    return st


def run_store(adapters, fn, keys=None):
    """Open an ExpertStore over the adapters, run `await fn(store)`, close; returns (result, store)."""
    async def go():
        store = await ExpertStore.open(adapters, keys)
        try:
            return await fn(store), store
        finally:
            await store.close()
    return asyncio.run(go())


def expected_tensor(orig, t: dict) -> bytes:
    return orig[t["source"]][2]


def check_blob(blob: bytes, entry: dict, orig) -> None:
    assert len(blob) == entry["size"]
    for role, t in entry["tensors"].items():
        assert blob[t["offset"]:t["offset"] + t["length"]] == expected_tensor(orig, t), f"{entry['key']}#{role}"


# -- verified reads and fallback --------------------------------------------------------------------------------------
def test_reads_every_blob_verified_from_the_first_tier(store, ckpt):
    orig = ckpt[1]
    m = store.manifest()

    async def read_all(s: ExpertStore):
        out = [await s.read_blob(b["layer"], b["expert"]) for b in m["blobs"]]
        s3_only = [await s.read_blob(b["layer"], b["expert"], tiers=["s3"]) for b in m["blobs"]]
        dense = await s.read_dense()
        return out, s3_only, dense

    (out, s3_only, (dense, dtier)), s = run_store([store.nvme(), store.s3a()], read_all)
    assert [tier for _, tier in out] == ["nvme"] * len(m["blobs"])
    assert [tier for _, tier in s3_only] == ["s3"] * len(m["blobs"])
    for b, (raw, _), (raw3, _) in zip(m["blobs"], out, s3_only):
        check_blob(raw.tobytes(), b, orig)
        assert raw.tobytes() == raw3.tobytes()
    assert dtier == "nvme"
    from safetensors.torch import load
    dense_t = load(dense.tobytes())
    assert set(dense_t) == set(m["dense"]["tensors"])
    for name, t in dense_t.items():
        assert t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes() == orig[name][2]
    n = len(m["blobs"])
    assert s.stats.reads == {"nvme": n + 1, "s3": n} and s.stats.fallbacks == 0 and s.stats.checksum_failures == {}


def test_manifest_is_taken_from_the_next_tier_when_the_first_has_none(store, ckpt):
    os.unlink(os.path.join(store.root, MANIFEST_KEY))
    (raw, tier), _ = run_store([store.nvme(), store.s3a()], lambda s: s.read_blob(1, 3))
    assert tier == "nvme"
    m = json.loads(store.get_s3(MANIFEST_KEY))
    assert (m["blobs"][-1]["layer"], m["blobs"][-1]["expert"]) == (1, 3)
    check_blob(raw.tobytes(), m["blobs"][-1], ckpt[1])


def test_corrupt_nvme_copy_falls_back_to_s3(store, ckpt):
    m = store.manifest()
    b = m["blobs"][5]
    store.flip_file(b["key"], b["tensors"]["down"]["offset"] + 7)

    async def reads(s):
        return await s.read_blob(b["layer"], b["expert"]), await s.read_blob(0, 0)

    ((raw, tier), (_, tier0)), s = run_store([store.nvme(), store.s3a()], reads)
    assert tier == "s3" and tier0 == "nvme"
    check_blob(raw.tobytes(), b, ckpt[1])
    assert s.stats.fallbacks == 1
    assert s.stats.checksum_failures["nvme"] >= 1 and "s3" not in s.stats.checksum_failures
    assert s.stats.reads == {"s3": 1, "nvme": 1}


def test_corrupt_copies_in_every_tier_raise_integrity_error(store, caplog):
    m = store.manifest()
    b = m["blobs"][2]
    store.flip_file(b["key"], 100)
    bad_s3 = store.flip_s3(b["key"], 5000)
    with caplog.at_level(logging.WARNING, logger="storage_adapters.store"):
        with pytest.raises(BlobIntegrityError) as ei:
            run_store([store.nvme(), store.s3a()], lambda s: s.read_blob(b["layer"], b["expert"]))
    e = ei.value
    assert (e.blob, e.tier) == (b["key"], "s3")
    assert e.expected == b["tiers"]["s3"]["stored_checksum"] == b["checksum"]
    assert e.actual == C.xxh64(bad_s3) != e.expected
    msg = str(e)
    for part in (b["key"], "'s3'", e.expected, e.actual):
        assert part in msg, f"{part!r} not in {msg}"
    assert any("'nvme'" in r.getMessage() for r in caplog.records), "the nvme mismatch is logged too"
    # a single-tier store names that tier and the checksum of the bytes it actually holds
    with pytest.raises(BlobIntegrityError) as ei:
        run_store([store.nvme()], lambda s: s.read_blob(b["layer"], b["expert"]))
    assert ei.value.tier == "nvme" and ei.value.actual == C.xxh64(store.read_file(b["key"]))
    assert ei.value.actual in str(ei.value) and b["key"] in str(ei.value)


def test_read_tensor_by_range_is_verified(store, ckpt):
    orig = ckpt[1]
    m = store.manifest()
    b = m["blobs"][6]
    t = b["tensors"]

    async def reads(s):
        return {r: (await s.read_tensor(b["layer"], b["expert"], r)).tobytes() for r in ("gate", "up", "down")}

    got, s = run_store([store.nvme(), store.s3a()], reads)
    for role in ("gate", "up", "down"):
        assert got[role] == expected_tensor(orig, t[role])
    assert s.stats.bytes == {"nvme": sum(t[r]["length"] for r in t)}, "read_tensor reads the tensor's range only"

    # corrupt the down projection on nvme: gate still comes from nvme, down falls back to s3, bytes stay right
    store.flip_file(b["key"], t["down"]["offset"] + t["down"]["length"] - 1)

    async def reads2(s):
        return (await s.read_tensor(b["layer"], b["expert"], "gate")).tobytes(), \
               (await s.read_tensor(b["layer"], b["expert"], "down")).tobytes()

    (gate, down), s = run_store([store.nvme(), store.s3a()], reads2)
    assert gate == expected_tensor(orig, t["gate"]) and down == expected_tensor(orig, t["down"])
    assert s.stats.reads == {"nvme": 1, "s3": 1} and s.stats.fallbacks == 1 and s.stats.checksum_failures["nvme"] >= 1

    store.flip_s3(b["key"], t["down"]["offset"])
    with pytest.raises(BlobIntegrityError) as ei:
        run_store([store.nvme(), store.s3a()], lambda s: s.read_tensor(b["layer"], b["expert"], "down"))
    assert ei.value.blob == f"{b['key']}#down" and ei.value.expected == t["down"]["checksum"]
    assert t["down"]["checksum"] in str(ei.value) and ei.value.actual.startswith("xxh64:")


def test_missing_blob_on_nvme_falls_back(store, ckpt):
    m = store.manifest()
    b = m["blobs"][1]
    os.unlink(os.path.join(store.root, b["key"]))
    (raw, tier), s = run_store([store.nvme(), store.s3a()], lambda s: s.read_blob(b["layer"], b["expert"]))
    assert tier == "s3" and s.stats.fallbacks == 1
    check_blob(raw.tobytes(), b, ckpt[1])
    with pytest.raises(TierAccessError, match="every eligible tier failed"):
        run_store([store.nvme()], lambda s: s.read_blob(b["layer"], b["expert"]))


# -- manifest problems ------------------------------------------------------------------------------------------------
def test_missing_manifest(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(ManifestError) as ei:
        run_store([NvmeAdapter(str(root))], lambda s: s.read_blob(0, 0))
    assert f"file://{root}" in str(ei.value) and "no manifest.json" in str(ei.value)


@pytest.mark.parametrize("how", ["garbage", "wrong_version", "not_an_object", "missing_field"])
def test_corrupt_manifest(nvme_store, how):
    store = nvme_store
    path = os.path.join(store.root, MANIFEST_KEY)
    m = store.manifest()
    raw = {"garbage": b"{\"format_version\": 1, \"blobs\": [",
           "wrong_version": json.dumps(m | {"format_version": 2}).encode(),
           "not_an_object": b"[1, 2, 3]",
           "missing_field": json.dumps({k: v for k, v in m.items() if k != "dense"}).encode()}[how]
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(ManifestError) as ei:
        run_store([store.nvme()], lambda s: s.read_blob(0, 0))
    msg = str(ei.value)
    assert f"file://{store.root}/{MANIFEST_KEY}" in msg
    assert {"garbage": "not valid JSON", "wrong_version": "format_version 2 is not supported",
            "not_an_object": "must be a JSON object", "missing_field": "dense"}[how] in msg


def test_corrupt_manifest_on_s3_names_the_object(store):
    store.s3.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{MANIFEST_KEY}", Body=b"\xff\xfe garbage")
    with pytest.raises(ManifestError) as ei:
        run_store([store.s3a()], lambda s: s.read_blob(0, 0))
    assert f"s3://{store.bucket}/{store.prefix}/{MANIFEST_KEY}" in str(ei.value)


# -- encryption at rest -----------------------------------------------------------------------------------------------
def _key_forms(key: bytes) -> list[str]:
    return [key.hex(), key.hex().upper(), base64.b64encode(key).decode(), repr(key)[2:-1]]


def _exc_chain_text(e: BaseException) -> str:
    out, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out += [str(e), repr(e)]
        e = e.__cause__ or e.__context__
    return "\n".join(out)


def test_encrypted_tier(ckpt, tmp_path, caplog):
    orig = ckpt[1]
    key, wrong = os.urandom(32), os.urandom(32)
    root = str(tmp_path / "enc")
    rep = _convert(ckpt[0], [Target(NvmeAdapter(root), key)])
    mtext = open(os.path.join(root, MANIFEST_KEY)).read()
    assert not any(f in mtext for f in _key_forms(key))
    m = json.loads(mtext)
    for b in m["blobs"]:
        stored = open(os.path.join(root, b["key"]), "rb").read()
        copy = b["tiers"]["nvme"]
        assert copy["encrypted"] and copy["stored_size"] == len(stored) == b["size"] + 28
        assert copy["stored_checksum"] == C.xxh64(stored) != b["checksum"]
        for t in b["tensors"].values():  # no stretch of any tensor's plaintext is visible in the stored bytes
            plain = expected_tensor(orig, t)
            assert plain[:64] not in stored and plain[-64:] not in stored
    dense_stored = open(os.path.join(root, DENSE_KEY), "rb").read()
    assert orig["lm_head.weight"][2][:64] not in dense_stored and m["dense"]["tiers"]["nvme"]["encrypted"]

    async def reads(s):
        blobs = [(await s.read_blob(b["layer"], b["expert"]))[0].tobytes() for b in m["blobs"]]
        down = (await s.read_tensor(1, 2, "down")).tobytes()
        dense = (await s.read_dense())[0].tobytes()
        return blobs, down, dense

    (blobs, down, dense), _ = run_store([NvmeAdapter(root)], reads, keys={"nvme": key})
    for b, raw in zip(m["blobs"], blobs):
        check_blob(raw, b, orig)
    assert down == expected_tensor(orig, m["blobs"][-2]["tensors"]["down"])
    from safetensors.torch import load
    assert set(load(dense)) == set(m["dense"]["tensors"])

    # a wrong key is an error, never bytes; no form of either key shows up in errors or logs
    with caplog.at_level(logging.DEBUG):
        for fn, obj in ((lambda s: s.read_blob(0, 1), "experts/L000/E001.bin"),
                        (lambda s: s.read_tensor(0, 1, "up"), "experts/L000/E001.bin"),
                        (lambda s: s.read_dense(), DENSE_KEY)):
            with pytest.raises(BlobIntegrityError) as ei:
                run_store([NvmeAdapter(root)], fn, keys={"nvme": wrong})
            text = _exc_chain_text(ei.value)
            assert "undecryptable" in text and obj in text, text
            assert not any(f in text for k in (key, wrong) for f in _key_forms(k))
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert not any(f in logs for k in (key, wrong) for f in _key_forms(k))
    # no key at all: says so
    with pytest.raises(TierAccessError, match="no key is configured"):
        run_store([NvmeAdapter(root)], lambda s: s.read_blob(0, 1))

    # re-running with the same key verifies by decrypting and skips; with another key every object is rewritten
    again = _convert(ckpt[0], [Target(NvmeAdapter(root), key)])
    assert again.skipped == {"nvme": len(m["blobs"]) + 1 + len(m["aux"])} and again.written == {}
    rekeyed = _convert(ckpt[0], [Target(NvmeAdapter(root), wrong)])
    assert rekeyed.written == {"nvme": len(m["blobs"]) + 1 + len(m["aux"])}
    (raw, _), _ = run_store([NvmeAdapter(root)], lambda s: s.read_blob(1, 1), keys={"nvme": wrong})
    check_blob(raw.tobytes(), m["blobs"][5], orig)
    assert rep.manifest.blobs[5].key == m["blobs"][5]["key"] == "experts/L001/E001.bin"


def test_encrypted_tier_with_wrong_key_falls_back_to_plain_s3(ckpt, tmp_path, moto_server, s3_bucket):
    orig = ckpt[1]
    key = os.urandom(32)
    st = Store(str(tmp_path / "enc"), moto_server.endpoint_url, s3_bucket, f"store/{uuid.uuid4().hex[:8]}")
    _convert(ckpt[0], [Target(st.nvme(), key), Target(st.s3a(), None)])
    m = st.manifest()
    b = m["blobs"][3]
    assert b["tiers"]["nvme"]["encrypted"] and not b["tiers"]["s3"]["encrypted"]
    assert st.get_s3(b["key"]) != st.read_file(b["key"])

    async def reads(s):
        return (await s.read_blob(b["layer"], b["expert"])), (await s.read_tensor(b["layer"], b["expert"], "gate"))

    ((raw, tier), gate), s = run_store([st.nvme(), st.s3a()], reads, keys={"nvme": os.urandom(32)})
    assert tier == "s3" and s.stats.fallbacks == 2 and s.stats.checksum_failures["nvme"] >= 2
    check_blob(raw.tobytes(), b, orig)
    assert gate.tobytes() == expected_tensor(orig, b["tensors"]["gate"])
    (raw, tier), _ = run_store([st.nvme(), st.s3a()], lambda s: s.read_blob(b["layer"], b["expert"]),
                               keys={"nvme": key})
    assert tier == "nvme"
    check_blob(raw.tobytes(), b, orig)
