"""Conversion of Hugging Face MoE checkpoints into the expert store (storage_adapters.converter, jobs.convert).

Every checkpoint kind (five families written by transformers `save_pretrained`, the fused in-memory layout, a
hand-built bf16 legacy layout, a sharded checkpoint) is converted to a file:// store, an s3:// store on the moto
server, and both at once; every checkpoint tensor is then rebuilt from the store's raw objects and compared byte for
byte with the original. Also: alignment and checksums, idempotent and resumable re-runs, bounded memory, and clear
errors with nothing written for bad input. Nothing is mocked: real files, a real moto server over HTTP.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

import checkpoints as C
from storage_adapters.converter import convert, open_target, plan_conversion
from storage_adapters.errors import BlobIntegrityError, CheckpointError, StoreError, TierAccessError
from storage_adapters.local_s3 import s3_client
from storage_adapters.manifest import DENSE_KEY, MANIFEST_KEY
from storage_adapters.store import ExpertStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = (*C.FAMILIES, "fused", "legacy_bf16", "sharded")
MiB = 1 << 20


# -- checkpoints, built once per module -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cache: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in cache:
            d = str(tmp_path_factory.mktemp(f"ckpt-{kind}"))
            if kind in C.FAMILIES:
                C.save_hf(kind, d)
            elif kind == "fused":
                C.save_fused(d)
            elif kind == "legacy_bf16":
                C.save_legacy(d, dtype="bfloat16")
            elif kind == "sharded":
                C.save_hf("mixtral", d, max_shard_size="60KB", seed=5)
                assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
                assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 2
            else:
                raise AssertionError(kind)
            cache[kind] = d
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def originals(ckpt):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = C.original_tensors(ckpt(kind))
        return cache[kind]
    return get


# -- helpers -------------------------------------------------------------------------------------------------------
def run_convert(ckpt_dir: str, uris: list[str], endpoint: str | None = None, **kw):
    plan = plan_conversion(ckpt_dir)

    async def go():
        targets = [open_target(u, endpoint_url=endpoint) for u in uris]
        try:
            return await convert(plan, targets, progress=False, **kw)
        finally:
            for t in targets:
                await t.adapter.close()
    return asyncio.run(go())


def read_file_store(root: str):
    """(manifest dict, blob key -> bytes, dense bytes, key -> stored size) read with plain file I/O."""
    with open(os.path.join(root, MANIFEST_KEY), "rb") as f:
        m = json.load(f)
    blobs, sizes = {}, {}
    for b in m["blobs"]:
        with open(os.path.join(root, b["key"]), "rb") as f:
            blobs[b["key"]] = f.read()
        sizes[b["key"]] = len(blobs[b["key"]])
    with open(os.path.join(root, DENSE_KEY), "rb") as f:
        dense = f.read()
    sizes[DENSE_KEY] = len(dense)
    return m, blobs, dense, sizes


def read_s3_store(endpoint: str, bucket: str, prefix: str):
    """The same, read with a plain boto3 client straight from the moto server."""
    s3 = s3_client(endpoint)

    def get(key):
        return s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
    m = json.loads(get(MANIFEST_KEY))
    blobs = {b["key"]: get(b["key"]) for b in m["blobs"]}
    dense = get(DENSE_KEY)
    sizes = {k: len(v) for k, v in blobs.items()} | {DENSE_KEY: len(dense)}
    return m, blobs, dense, sizes


def assert_roundtrip(m: dict, blobs: dict, dense: bytes, orig: dict) -> None:
    rebuilt = C.reconstruct_from_store(m, blobs, dense, orig)
    assert set(rebuilt) == set(orig), (f"missing from store: {sorted(set(orig) - set(rebuilt))[:5]}, "
                                       f"not in checkpoint: {sorted(set(rebuilt) - set(orig))[:5]}")
    bad = [name for name, (_, _, raw) in orig.items() if rebuilt[name] != raw]
    assert not bad, f"tensors not bit-exact after the round trip: {bad[:5]}"


def assert_model_info(kind: str, m: dict, orig: dict) -> None:
    info = m["model"]
    fam = {"fused": "qwen3_moe", "legacy_bf16": "mixtral", "sharded": "mixtral"}.get(kind, kind)
    assert info["family"] == fam
    assert info["expert_layout"] == ("fused" if kind == "fused" else "per_expert")
    assert m["dtype"] == ("BF16" if kind == "legacy_bf16" else "F32")
    moe = [1, 2] if fam == "deepseek_v2" else [0, 1]
    assert list(info["moe_layers"]) == moe
    assert sorted((b["layer"], b["expert"]) for b in m["blobs"]) == [(l, e) for l in moe for e in range(C.EXPERTS)]
    for b in m["blobs"]:
        t = b["tensors"]
        assert (tuple(t["gate"]["shape"]), tuple(t["up"]["shape"]), tuple(t["down"]["shape"])) == \
               ((C.INTER, C.HIDDEN), (C.INTER, C.HIDDEN), (C.HIDDEN, C.INTER))
    dense = set(m["dense"]["tensors"])
    if fam == "qwen2_moe":
        assert {f"model.layers.{l}.mlp.shared_expert.{p}.weight" for l in moe
                for p in ("gate_proj", "up_proj", "down_proj")} <= dense
        assert "model.layers.0.mlp.shared_expert_gate.weight" in dense
    if fam == "deepseek_v2":
        assert {f"model.layers.{l}.mlp.shared_experts.{p}.weight" for l in moe
                for p in ("gate_proj", "up_proj", "down_proj")} <= dense
        assert "model.layers.0.mlp.gate_proj.weight" in dense  # first_k_dense_replace=1: layer 0 is a dense MLP
    if kind == "fused":
        srcs = {b["tensors"]["up"]["source"] for b in m["blobs"]}
        assert "model.layers.1.mlp.experts.gate_up_proj[3,32:64]" in srcs
    assert not any(".experts." in n and "shared" not in n for n in dense), "an expert tensor went to dense"


async def _read_all_verified(adapters, m: dict) -> dict[str, bytes]:
    store = await ExpertStore.open(adapters)
    try:
        out = {}
        for b in m["blobs"]:
            raw, _ = await store.read_blob(b["layer"], b["expert"])
            out[b["key"]] = raw.tobytes()
        dense, _ = await store.read_dense()
        out[DENSE_KEY] = dense.tobytes()
        return out
    finally:
        await store.close()


def verified_via_store(uri: str, m: dict, endpoint: str | None = None) -> dict[str, bytes]:
    async def go():
        return await _read_all_verified([open_target(uri, endpoint_url=endpoint).adapter], m)
    return asyncio.run(go())


def s3_uri(bucket: str, test: str) -> tuple[str, str]:
    prefix = f"convert/{test}-{uuid.uuid4().hex[:8]}"
    return f"s3://{bucket}/{prefix}", prefix


# -- round trips ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_file_store(kind, ckpt, originals, tmp_path):
    root = str(tmp_path / "store")
    rep = run_convert(ckpt(kind), [f"file://{root}"])
    m, blobs, dense, sizes = read_file_store(root)
    orig = originals(kind)
    assert_model_info(kind, m, orig)
    C.check_layout(m, blobs, {"nvme": sizes}, dense)
    assert_roundtrip(m, blobs, dense, orig)
    assert rep.written == {"nvme": len(m["blobs"]) + 1 + len(m["aux"])} and rep.skipped == {}
    assert m["locations"] == {"nvme": "file://" + root}
    # the verified read path returns the same bytes
    via = verified_via_store(f"file://{root}", m)
    assert all(via[k] == blobs[k] for k in blobs) and via[DENSE_KEY] == dense
    assert not [f for d, _, fs in os.walk(root) for f in fs if ".tmp-" in f]


@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_s3_store(kind, ckpt, originals, moto_server, s3_bucket):
    uri, prefix = s3_uri(s3_bucket, kind)
    rep = run_convert(ckpt(kind), [uri], endpoint=moto_server.endpoint_url)
    m, blobs, dense, sizes = read_s3_store(moto_server.endpoint_url, s3_bucket, prefix)
    orig = originals(kind)
    assert_model_info(kind, m, orig)
    C.check_layout(m, blobs, {"s3": sizes}, dense)
    assert_roundtrip(m, blobs, dense, orig)
    assert rep.written == {"s3": len(m["blobs"]) + 1 + len(m["aux"])}
    via = verified_via_store(uri, m, moto_server.endpoint_url)
    assert all(via[k] == blobs[k] for k in blobs) and via[DENSE_KEY] == dense


@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_file_and_s3_at_once(kind, ckpt, originals, moto_server, s3_bucket, tmp_path):
    root = str(tmp_path / "store")
    uri, prefix = s3_uri(s3_bucket, kind)
    rep = run_convert(ckpt(kind), [f"file://{root}", uri], endpoint=moto_server.endpoint_url)
    fm, fblobs, fdense, fsizes = read_file_store(root)
    sm, sblobs, sdense, ssizes = read_s3_store(moto_server.endpoint_url, s3_bucket, prefix)
    assert fm == sm, "both tiers must hold the same manifest"
    assert fm["locations"] == {"nvme": "file://" + root, "s3": uri}
    assert fblobs == sblobs and fdense == sdense
    assert all(set(b["tiers"]) == {"nvme", "s3"} for b in fm["blobs"])
    C.check_layout(fm, fblobs, {"nvme": fsizes, "s3": ssizes}, fdense)
    assert_roundtrip(fm, fblobs, fdense, originals(kind))
    n = len(fm["blobs"]) + 1 + len(fm["aux"])
    assert rep.written == {"nvme": n, "s3": n}


def test_sha256_checksums(ckpt, originals, tmp_path):
    root = str(tmp_path / "store")
    run_convert(ckpt("mixtral"), [f"file://{root}"], checksum_algo="sha256")
    m, blobs, dense, sizes = read_file_store(root)
    assert m["checksum_algo"] == "sha256" and m["blobs"][0]["checksum"].startswith("sha256:")
    assert m["dense"]["checksum"] == C.sha256(dense)
    C.check_layout(m, blobs, {"nvme": sizes}, dense)
    assert_roundtrip(m, blobs, dense, originals("mixtral"))


# -- idempotence and resumption -----------------------------------------------------------------------------------
def test_rerun_skips_everything(ckpt, tmp_path, moto_server, s3_bucket):
    root = str(tmp_path / "store")
    uri, _ = s3_uri(s3_bucket, "rerun")
    first = run_convert(ckpt("olmoe"), [f"file://{root}", uri], endpoint=moto_server.endpoint_url)
    n = len(first.manifest.blobs) + 1 + len(first.manifest.aux)
    again = run_convert(ckpt("olmoe"), [f"file://{root}", uri], endpoint=moto_server.endpoint_url)
    assert again.skipped == {"nvme": n, "s3": n}
    assert again.written == {} and again.bytes_written == {} and again.cleaned == 0
    assert again.manifest.blobs == first.manifest.blobs and again.manifest.dense == first.manifest.dense


def test_resume_after_interruption_file(ckpt, originals, tmp_path):
    root = str(tmp_path / "store")
    first = run_convert(ckpt("deepseek_v2"), [f"file://{root}"])
    keys = [b.key for b in first.manifest.blobs]
    # an interrupted run: manifest not yet written, two blobs never landed, one write left its temp file behind
    os.unlink(os.path.join(root, MANIFEST_KEY))
    for k in keys[:2]:
        os.unlink(os.path.join(root, k))
    stale = os.path.join(root, os.path.dirname(keys[0]), f".{os.path.basename(keys[0])}.tmp-0badc0de")
    with open(stale, "wb") as f:
        f.write(b"half a blob")
    rep = run_convert(ckpt("deepseek_v2"), [f"file://{root}"])
    assert rep.cleaned == 1 and not os.path.exists(stale)
    assert rep.written == {"nvme": 2}
    assert rep.skipped == {"nvme": len(keys) - 2 + 1 + len(rep.manifest.aux)}
    m, blobs, dense, sizes = read_file_store(root)
    C.check_layout(m, blobs, {"nvme": sizes}, dense)
    assert_roundtrip(m, blobs, dense, originals("deepseek_v2"))
    assert not [f for d, _, fs in os.walk(root) for f in fs if ".tmp-" in f]


def test_corrupt_blob_on_disk_is_rewritten(ckpt, originals, tmp_path):
    root = str(tmp_path / "store")
    first = run_convert(ckpt("mixtral"), [f"file://{root}"])
    victim = first.manifest.blobs[3]
    path = os.path.join(root, victim.key)
    with open(path, "r+b") as f:  # same size, same xattrs: only the content is wrong
        f.seek(victim.tensors["up"].offset + 10)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    rep = run_convert(ckpt("mixtral"), [f"file://{root}"])
    assert rep.written == {"nvme": 1}, "the corrupt blob must be rewritten, not skipped"
    assert rep.skipped == {"nvme": len(first.manifest.blobs) + len(first.manifest.aux)}
    m, blobs, dense, sizes = read_file_store(root)
    assert C.xxh64(blobs[victim.key]) == victim.checksum
    assert_roundtrip(m, blobs, dense, originals("mixtral"))


def test_truncated_dense_on_disk_is_rewritten(ckpt, tmp_path):
    root = str(tmp_path / "store")
    run_convert(ckpt("qwen3_moe"), [f"file://{root}"])
    with open(os.path.join(root, DENSE_KEY), "r+b") as f:
        f.truncate(1000)
    rep = run_convert(ckpt("qwen3_moe"), [f"file://{root}"])
    assert rep.written == {"nvme": 1}
    m, _, dense, _ = read_file_store(root)
    assert C.xxh64(dense) == m["dense"]["checksum"]


def test_resume_after_interruption_s3(ckpt, originals, moto_server, s3_bucket):
    uri, prefix = s3_uri(s3_bucket, "resume")
    first = run_convert(ckpt("qwen2_moe"), [uri], endpoint=moto_server.endpoint_url)
    s3 = s3_client(moto_server.endpoint_url)
    keys = [b.key for b in first.manifest.blobs]
    s3.delete_object(Bucket=s3_bucket, Key=f"{prefix}/{MANIFEST_KEY}")
    for k in keys[-3:]:
        s3.delete_object(Bucket=s3_bucket, Key=f"{prefix}/{k}")
    # an upload the interrupted run never completed, under our prefix; and one of a sibling store that is not ours
    ours = s3.create_multipart_upload(Bucket=s3_bucket, Key=f"{prefix}/{keys[-1]}")["UploadId"]
    s3.upload_part(Bucket=s3_bucket, Key=f"{prefix}/{keys[-1]}", UploadId=ours, PartNumber=1, Body=b"x" * 1024)
    sibling_key = f"{prefix}-sibling/{keys[0]}"
    sibling = s3.create_multipart_upload(Bucket=s3_bucket, Key=sibling_key)["UploadId"]
    try:
        rep = run_convert(ckpt("qwen2_moe"), [uri], endpoint=moto_server.endpoint_url)
        assert rep.cleaned == 1
        assert rep.written == {"s3": 3} and rep.skipped == {"s3": len(keys) - 3 + 1 + len(rep.manifest.aux)}
        left = s3.list_multipart_uploads(Bucket=s3_bucket, Prefix=prefix + "/").get("Uploads", [])
        assert left == []
        others = s3.list_multipart_uploads(Bucket=s3_bucket, Prefix=prefix + "-sibling/").get("Uploads", [])
        assert [u["UploadId"] for u in others] == [sibling], "a re-run must not abort another store's uploads"
    finally:
        s3.abort_multipart_upload(Bucket=s3_bucket, Key=sibling_key, UploadId=sibling)
    m, blobs, dense, sizes = read_s3_store(moto_server.endpoint_url, s3_bucket, prefix)
    C.check_layout(m, blobs, {"s3": sizes}, dense)
    assert_roundtrip(m, blobs, dense, originals("qwen2_moe"))


def test_s3_object_replaced_by_another_tool_is_rewritten(ckpt, originals, moto_server, s3_bucket):
    """S3 re-runs trust our own metadata; an object of the right size without it (written by someone else) is
    not ours and gets rewritten."""
    uri, prefix = s3_uri(s3_bucket, "foreign")
    first = run_convert(ckpt("mixtral"), [uri], endpoint=moto_server.endpoint_url)
    b = first.manifest.blobs[0]
    s3 = s3_client(moto_server.endpoint_url)
    s3.put_object(Bucket=s3_bucket, Key=f"{prefix}/{b.key}", Body=b"\0" * b.size)  # same size, no metadata
    rep = run_convert(ckpt("mixtral"), [uri], endpoint=moto_server.endpoint_url)
    assert rep.written == {"s3": 1}
    m, blobs, dense, sizes = read_s3_store(moto_server.endpoint_url, s3_bucket, prefix)
    assert_roundtrip(m, blobs, dense, originals("mixtral"))


# -- memory ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    return C.save_big(str(tmp_path_factory.mktemp("ckpt-big")))  # 2 layers x 16 experts x 6 MiB = 192 MiB


@pytest.mark.parametrize("max_inflight", [1, 4])
def test_peak_memory_is_bounded_by_inflight_experts(big_ckpt, tmp_path, max_inflight):
    path, total, expert = big_ckpt
    assert total > 30 * expert
    root = str(tmp_path / "store")
    rep = run_convert(path, [f"file://{root}"], max_inflight=max_inflight)
    assert rep.expert_bytes == expert  # 3 tensors of 2 MiB, already 4 KiB multiples
    assert len(rep.manifest.blobs) == 32 and rep.written == {"nvme": 33}
    bound = max_inflight * expert + 16 * MiB + 24 * MiB  # experts in flight + one dense chunk + interpreter slack
    assert 0 < rep.peak_anon_bytes < bound, \
        f"peak anon {rep.peak_anon_bytes / MiB:.1f} MiB, bound {bound / MiB:.0f} MiB, checkpoint {total / MiB:.0f} MiB"
    assert rep.peak_anon_bytes < total / 3
    # a re-run reads every object back to verify it: that too stays within the bound
    again = run_convert(path, [f"file://{root}"], max_inflight=max_inflight)
    assert again.skipped == {"nvme": 33} and again.written == {}
    assert again.peak_anon_bytes < bound, f"re-run peak anon {again.peak_anon_bytes / MiB:.1f} MiB"
    # spot-check content without loading the whole checkpoint
    m, blobs, dense, _ = read_file_store(root)
    b = m["blobs"][-1]
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
        w2 = f.get_tensor(b["tensors"]["down"]["source"])
    t = b["tensors"]["down"]
    assert blobs[b["key"]][t["offset"]:t["offset"] + t["length"]] == w2.tobytes()


# -- bad input: clear errors, nothing written -------------------------------------------------------------------------
def _legacy(tmp_path, name, *, drop=(), replace=None, config=None, **kw):
    d = str(tmp_path / name)
    t = C.legacy_tensors(**kw)
    for k in drop:
        del t[k]
    t.update(replace or {})
    return C.save_legacy(d, tensors=t, config=config or C.mixtral_config(**kw))


def _bad_checkpoints(tmp_path, ckpt):
    import torch
    E1 = "model.layers.1.block_sparse_moe.experts.2"
    cases = {}
    cases["unsupported_family"] = (
        _legacy(tmp_path, "llama", config=C.mixtral_config() | {"model_type": "llama"}),
        CheckpointError, ["unsupported model family 'llama'", "config.json",
                          "supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2"])
    cases["missing_expert_tensor"] = (
        _legacy(tmp_path, "missing", drop=[f"{E1}.w2.weight"]),
        CheckpointError, ["layer 1 expert 2", "missing ['down']"])
    cases["shape_mismatch"] = (
        _legacy(tmp_path, "shape", replace={f"{E1}.w1.weight": torch.zeros(C.INTER + 8, C.HIDDEN,
                                                                               dtype=torch.bfloat16)}),
        CheckpointError, [f"{E1}.w1.weight [40, 64]", "config says [32, 64]"])
    cases["dtype_mismatch_with_config"] = (
        _legacy(tmp_path, "dtype", config=C.mixtral_config(dtype="float32")),
        CheckpointError, ["declares dtype F32", "expert tensors are BF16"])
    cases["mixed_expert_dtypes"] = (
        _legacy(tmp_path, "mixed", replace={f"{E1}.w3.weight": torch.zeros(C.INTER, C.HIDDEN)}),
        CheckpointError, ["mix dtypes", "BF16", "F32"])
    d = _legacy(tmp_path, "noconfig")
    os.unlink(os.path.join(d, "config.json"))
    cases["missing_config"] = (d, CheckpointError, [os.path.join(d, "config.json"), "missing"])
    d = _legacy(tmp_path, "truncated")
    st = os.path.join(d, "model.safetensors")
    with open(st, "r+b") as f:
        f.truncate(os.path.getsize(st) - 3000)
    cases["truncated_safetensors"] = (d, CheckpointError, [st, "truncated"])
    d = str(tmp_path / "sharded-missing")
    shutil.copytree(ckpt("sharded"), d)
    shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[1]
    os.unlink(os.path.join(d, shard))
    cases["missing_shard"] = (d, CheckpointError, ["model.safetensors.index.json", shard])
    nowhere = str(tmp_path / "no" / "such" / "checkpoint")
    cases["nonexistent_checkpoint_dir"] = (nowhere, CheckpointError, [nowhere, "does not exist"])
    return cases


BAD = ["unsupported_family", "missing_expert_tensor", "shape_mismatch", "dtype_mismatch_with_config",
       "mixed_expert_dtypes", "missing_config", "truncated_safetensors", "missing_shard",
       "nonexistent_checkpoint_dir"]


@pytest.fixture(scope="module")
def bad_ckpts(tmp_path_factory, ckpt):
    return _bad_checkpoints(tmp_path_factory.mktemp("bad"), ckpt)


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_fails_clearly_and_writes_nothing(case, bad_ckpts, tmp_path, moto_server, s3_bucket):
    path, exc, needles = bad_ckpts[case]
    root = tmp_path / "store"
    uri, prefix = s3_uri(s3_bucket, case)
    with pytest.raises(exc) as ei:
        run_convert(path, [f"file://{root}", uri], endpoint=moto_server.endpoint_url)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in error message: {msg}"
    assert not root.exists(), "a failed conversion must leave nothing behind"
    listed = s3_client(moto_server.endpoint_url).list_objects_v2(Bucket=s3_bucket, Prefix=prefix)
    assert listed.get("KeyCount", 0) == 0


def test_fused_shape_mismatch(tmp_path, ckpt):
    d = str(tmp_path / "fused-bad")
    shutil.copytree(ckpt("fused"), d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["moe_intermediate_size"] = 48
    C.write_config(d, cfg)
    with pytest.raises(CheckpointError) as ei:
        plan_conversion(d)
    assert "model.layers.0.mlp.experts.gate_up_proj [4, 64, 64]" in str(ei.value)
    assert "config says [4, 96, 64]" in str(ei.value)


def test_missing_bucket_fails_before_writing(ckpt, tmp_path, moto_server):
    root = tmp_path / "store"
    with pytest.raises(TierAccessError) as ei:
        run_convert(ckpt("mixtral"), [f"file://{root}", "s3://no-such-bucket/x"], endpoint=moto_server.endpoint_url)
    assert "'no-such-bucket'" in str(ei.value) and "does not exist" in str(ei.value)
    assert not (root / MANIFEST_KEY).exists() and not root.exists()


def test_bad_store_uri(ckpt):
    with pytest.raises(StoreError, match="expected file:///path or s3://bucket/prefix"):
        open_target("gs://bucket/x")


# -- the CLI ----------------------------------------------------------------------------------------------------------
VENV_PY = os.path.join(REPO, ".venv", "bin", "python")


def _cli(*args):
    py = VENV_PY if os.path.exists(VENV_PY) else sys.executable
    return subprocess.run([py, "-m", "jobs.convert", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))


def test_cli_bad_input_exits_2(bad_ckpts, tmp_path):
    path, _, needles = bad_ckpts["unsupported_family"]
    root = tmp_path / "store"
    r = _cli("--checkpoint", path, "--store", f"file://{root}", "--quiet")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("convert: error: ") and "Traceback" not in r.stderr
    assert needles[0] in r.stderr and needles[2] in r.stderr
    assert r.stdout == "" and not root.exists()


def test_cli_missing_bucket_exits_2(ckpt, moto_server):
    r = _cli("--checkpoint", ckpt("legacy_bf16"), "--store", "s3://no-such-bucket/x",
             "--endpoint-url", moto_server.endpoint_url, "--quiet")
    assert r.returncode == 2 and r.stderr.startswith("convert: error: ") and "'no-such-bucket'" in r.stderr


def test_cli_converts_and_reports(ckpt, originals, tmp_path):
    root = str(tmp_path / "store")
    report = str(tmp_path / "report.json")
    r = _cli("--checkpoint", ckpt("legacy_bf16"), "--store", f"file://{root}", "--quiet", "--json", report)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == json.load(open(report))
    assert (out["family"], out["layout"], out["dtype"], out["blobs"]) == ("mixtral", "per_expert", "BF16", 8)
    assert out["written"] == {"nvme": 9}
    m, blobs, dense, _ = read_file_store(root)
    assert_roundtrip(m, blobs, dense, originals("legacy_bf16"))
    r2 = _cli("--checkpoint", ckpt("legacy_bf16"), "--store", f"file://{root}", "--quiet")
    assert r2.returncode == 0 and json.loads(r2.stdout)["skipped"] == {"nvme": 9}


def test_side_files_travel_with_the_store(ckpt, tmp_path):
    """tokenizer.json and generation_config.json are stored as verified aux objects beside the weights."""

    from storage_adapters.nvme import NvmeAdapter
    src = tmp_path / "ckpt"
    shutil.copytree(ckpt("mixtral"), src)
    tok = b'{"model": {"type": "BPE"}, "added_tokens": []}'
    (src / "tokenizer.json").write_bytes(tok)
    rep = run_convert(str(src), [f"file://{tmp_path}/store"])
    assert set(rep.manifest.aux) >= {"tokenizer.json", "generation_config.json"}

    async def go():
        s = await ExpertStore.open([NvmeAdapter(str(tmp_path / "store"))])
        try:
            return await s.read_aux("tokenizer.json"), await s.read_aux("special_tokens_map.json")
        finally:
            await s.close()
    got, absent = asyncio.run(go())
    assert got == tok and absent is None
    (tmp_path / "store" / "aux" / "tokenizer.json").write_bytes(tok.replace(b"BPE", b"XYZ"))
    with pytest.raises(BlobIntegrityError, match="aux/tokenizer.json"):
        asyncio.run(go())


def test_the_dense_file_is_staged_beside_the_local_store_and_a_staging_failure_names_it(ckpt, tmp_path, monkeypatch):
    # it was staged in $TMPDIR (a tmpfs holds it in memory; a full one gave a bare OSError traceback)
    import storage_adapters.converter as conv
    build, seen = conv._build_dense, []

    def spy(plan, path, algo):
        seen.append(path)
        return build(plan, path, algo)
    monkeypatch.setattr(conv, "_build_dense", spy)
    (tmp_path / "stores").mkdir()
    root = tmp_path / "stores" / "store"
    run_convert(ckpt("fused"), [f"file://{root}"])
    assert os.path.dirname(os.path.dirname(seen[0])) == str(root.parent), seen
    assert [p.name for p in root.parent.iterdir()] == ["store"], "the staging folder was left behind"

    def full(plan, path, algo):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(conv, "_build_dense", full)
    with pytest.raises(StoreError, match=r"staging the dense file at .*/stores/moe-convert-\w+/dense.safetensors: "
                                         r"No space left on device"):
        run_convert(ckpt("fused"), [f"file://{tmp_path / 'stores' / 'other'}"])


def test_deepseeks_multi_token_prediction_layers_are_left_out(ckpt, tmp_path):
    # DeepSeek-V3 ships its MTP module as layer num_hidden_layers (61) with routed experts: it was refused as
    # "expert tensors in layers [61], which config.json says are dense"
    src = ckpt("deepseek_v2")
    d = tmp_path / "dsv"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    L, H = cfg["num_hidden_layers"], cfg["hidden_size"]
    cfg["num_nextn_predict_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    I = cfg["moe_intermediate_size"]
    specs = [(f"model.layers.{L}.mlp.experts.0.gate_proj.weight", "F32", (I, H)),
             (f"model.layers.{L}.eh_proj.weight", "F32", (H, 2 * H))]
    C.write_safetensors_streaming(str(d / "mtp.safetensors"), specs, lambda name, n: bytes(n))
    plan = plan_conversion(str(d))
    assert all(p.layer < L for p in plan.experts), "an MTP expert was planned"
    assert not [t.name for t in plan.dense if t.name.startswith(f"model.layers.{L}.")], "MTP weights in the dense file"
    cfg["num_nextn_predict_layers"] = 0   # without the key saying so, such layers are still refused
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"expert tensors in layers \[{L}\]"):
        plan_conversion(str(d))
