"""Tier adapters: NvmeAdapter on real files, S3Adapter against the moto server through the fault-injecting proxy.

NvmeAdapter: reads into aligned and unaligned buffers, random ranges and chunkings (hypothesis) bit-exact against
the file, missing and truncated files, atomic writes with xattr metadata. S3Adapter: parallel ranged reads, every
fault kind the proxy injects is retried to exact bytes, too many faults fail with a clear error, not-found and
missing-bucket are not retried, access denied (moto's IAM enforcement switched on for one test).
"""
from __future__ import annotations

import asyncio
import os
import threading
import urllib.request
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from storage_adapters.buffers import PAGE, aligned_empty
from storage_adapters.errors import BlobNotFound, TierAccessError
from storage_adapters.local_s3 import s3_client
from storage_adapters.nvme import NvmeAdapter
from storage_adapters.s3 import RetryPolicy, S3Adapter

MiB = 1 << 20
FAST = RetryPolicy(max_attempts=5, base_delay_s=0.001, max_delay_s=0.01)


def buffer(n: int, kind: str):
    """A writable buffer of n bytes: page-aligned, deliberately misaligned numpy, or a bytearray."""
    if kind == "aligned":
        return aligned_empty(n)
    if kind == "unaligned":
        raw = aligned_empty(n + 3)
        out = raw[3:]  # address % PAGE == 3
        assert n == 0 or out.ctypes.data % PAGE == 3
        return out
    return bytearray(n)


def as_bytes(buf) -> bytes:
    return bytes(buf) if isinstance(buf, bytearray) else buf.tobytes()


# -- NvmeAdapter ------------------------------------------------------------------------------------------------------
SIZE = 3 * MiB + 1234  # not a multiple of the page size: every read near the end has an unaligned tail


class Content(bytes):
    """File content with a short repr (hypothesis prints test arguments on failure)."""

    def __repr__(self):
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def nvme_file(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nvme"))
    data = Content(np.random.default_rng(7).bytes(SIZE))
    os.makedirs(os.path.join(root, "experts", "L000"))
    with open(os.path.join(root, "experts", "L000", "E000.bin"), "wb") as f:
        f.write(data)
    return root, "experts/L000/E000.bin", data


@pytest.mark.parametrize("kind", ["aligned", "unaligned", "bytearray"])
@pytest.mark.parametrize("o_direct", [True, False])
def test_nvme_read_into_buffers(nvme_file, kind, o_direct):
    root, key, data = nvme_file
    a = NvmeAdapter(root, chunk_bytes=64 * 1024, o_direct=o_direct)

    async def go():
        out = []
        for off, n in [(0, SIZE), (0, 2 * MiB), (PAGE * 3, MiB), (4095, 3 * PAGE + 17), (SIZE - 1, 1),
                       (SIZE - 5000, 5000), (SIZE, 0), (12345, 0)]:
            buf = buffer(n, kind)
            got = await a.read_into(key, buf, off)
            out.append((off, n, got, as_bytes(buf)))
        whole = await a.read(key)
        tail = await a.read(key, SIZE - 777)
        await a.close()
        return out, whole, tail

    out, whole, tail = asyncio.run(go())
    for off, n, got, b in out:
        assert got == n and b == data[off:off + n], f"range [{off}, {off + n})"
    assert whole.tobytes() == data and whole.ctypes.data % PAGE == 0
    assert tail.tobytes() == data[-777:]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), chunk_pages=st.sampled_from([1, 2, 16, 256]), kind=st.sampled_from(["aligned", "unaligned"]),
       o_direct=st.booleans())
def test_nvme_random_ranges_bit_exact(nvme_file, data, chunk_pages, kind, o_direct):
    root, key, content = nvme_file
    # bias towards page-aligned offsets and lengths (the O_DIRECT fast path) as well as arbitrary ones
    off = data.draw(st.one_of(st.integers(0, SIZE), st.integers(0, SIZE // PAGE).map(lambda p: p * PAGE)), "offset")
    n = data.draw(st.one_of(st.integers(0, SIZE - off), st.integers(0, (SIZE - off) // PAGE).map(lambda p: p * PAGE)),
                  "length")
    a = NvmeAdapter(root, chunk_bytes=chunk_pages * PAGE, parallelism=4, o_direct=o_direct)
    buf = buffer(n, kind)

    async def go():
        try:
            return await a.read_into(key, buf, off)
        finally:
            await a.close()

    assert asyncio.run(go()) == n
    assert as_bytes(buf) == content[off:off + n]


def test_nvme_missing_file_is_blob_not_found(tmp_path):
    a = NvmeAdapter(str(tmp_path))

    async def go():
        assert await a.stat("experts/L000/E009.bin") is None and not await a.exists("experts/L000/E009.bin")
        for op in (lambda: a.read_into("experts/L000/E009.bin", aligned_empty(PAGE)),
                   lambda: a.read("experts/L000/E009.bin"), lambda: a.read("experts/L000/E009.bin", 0, 10)):
            with pytest.raises(BlobNotFound, match="E009.bin does not exist"):
                await op()
    asyncio.run(go())


def test_nvme_truncated_file_is_tier_access_error(tmp_path):
    a = NvmeAdapter(str(tmp_path))
    with open(tmp_path / "short.bin", "wb") as f:
        f.write(b"\1" * (2 * PAGE + 100))

    async def go():
        for off, n in [(0, 3 * PAGE), (2 * PAGE, PAGE), (2 * PAGE + 101, 1)]:
            with pytest.raises(TierAccessError) as ei:
                await a.read_into("short.bin", aligned_empty(n), off)
            assert "short.bin" in str(ei.value) and "truncated" in str(ei.value)
        with pytest.raises(TierAccessError, match="truncated"):
            await a.read("short.bin", 0, 3 * PAGE)
        with pytest.raises(TierAccessError, match="beyond its end"):
            await a.read("short.bin", 2 * PAGE + 101)
        assert (await a.read("short.bin", 2 * PAGE + 100)).size == 0  # exactly at the end: empty, not an error
    asyncio.run(go())


def test_nvme_rejects_keys_outside_its_root(tmp_path):
    with pytest.raises(ValueError, match="escapes the tier root"):
        NvmeAdapter(str(tmp_path / "root")).path("../elsewhere/x.bin")


def _tmp_files(root) -> list[str]:
    return [f for d, _, fs in os.walk(root) for f in fs if ".tmp-" in f]


def test_nvme_writes_are_atomic_with_metadata(tmp_path):
    root = str(tmp_path / "store")
    a = NvmeAdapter(root)
    key = "experts/L003/E017.bin"
    first, second = os.urandom(3 * PAGE), os.urandom(5 * PAGE + 1)
    src = tmp_path / "src.bin"
    big = os.urandom(9 * MiB + 5)  # more than one 8 MiB copy chunk
    src.write_bytes(big)

    async def go():
        await a.write(key, np.frombuffer(first, np.uint8), {"plain-checksum": "xxh64:1", "encrypted": "False"})
        info1 = await a.stat(key)
        await a.write(key, second, {"plain-checksum": "xxh64:2"})
        info2 = await a.stat(key)
        await a.write_file("dense.safetensors", str(src), {"plain-checksum": "xxh64:3"})
        info3 = await a.stat("dense.safetensors")
        # a write that fails half-way leaves the old object and no temp file
        with pytest.raises(TypeError):
            await a.write(key, object(), {"plain-checksum": "xxh64:bad"})
        info4 = await a.stat(key)
        await a.delete("never/was.bin")
        return info1, info2, info3, info4

    info1, info2, info3, info4 = asyncio.run(go())
    assert info1.size == len(first) and info1.metadata == {"plain-checksum": "xxh64:1", "encrypted": "False"}
    assert info2.size == len(second) and info2.metadata == {"plain-checksum": "xxh64:2"}
    assert info3.size == len(big) and info3.metadata == {"plain-checksum": "xxh64:3"}
    assert info4 == info2
    assert open(os.path.join(root, key), "rb").read() == second
    assert open(os.path.join(root, "dense.safetensors"), "rb").read() == big
    assert _tmp_files(root) == [] and a.list_tmp() == []
    asyncio.run(a.delete(key))
    assert not os.path.exists(os.path.join(root, key))


def test_nvme_readers_never_see_a_partial_object(tmp_path):
    """Concurrent readers of a key being rewritten see the old or the new object, whole, never a mix or a prefix."""
    root = str(tmp_path / "store")
    a = NvmeAdapter(root, o_direct=False)
    versions = [bytes([v]) * (MiB + 7) for v in range(1, 5)]
    asyncio.run(a.write("x.bin", versions[0]))
    stop, seen, bad = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            with open(os.path.join(root, "x.bin"), "rb") as f:
                got = f.read()
            if got in versions:
                seen.add(got[0])
            else:
                bad.append(len(got))

    t = threading.Thread(target=reader)
    t.start()
    try:
        async def writes():
            for i in range(24):
                await a.write("x.bin", versions[i % len(versions)])
        asyncio.run(writes())
    finally:
        stop.set()
        t.join()
    assert not bad, f"reader saw partial/mixed objects of sizes {bad[:5]}"
    assert len(seen) >= 2 and _tmp_files(root) == []


# -- S3Adapter through the fault proxy ------------------------------------------------------------------------------
OBJ_SIZE = 3 * MiB + 777
PART = 256 * 1024


@pytest.fixture(scope="module")
def s3_obj(moto_server, s3_bucket):
    prefix = f"adapters-{uuid.uuid4().hex[:8]}"
    data = np.random.default_rng(9).bytes(OBJ_SIZE)
    s3_client(moto_server.endpoint_url).put_object(Bucket=s3_bucket, Key=f"{prefix}/experts/L000/E000.bin", Body=data)
    return prefix, "experts/L000/E000.bin", data


def s3_adapter(proxy, bucket, prefix, **kw) -> S3Adapter:
    kw.setdefault("part_bytes", PART)
    kw.setdefault("retry", FAST)
    kw.setdefault("connect_timeout_s", 2.0)
    kw.setdefault("read_timeout_s", 5.0)
    return S3Adapter(f"s3://{bucket}/{prefix}", endpoint_url=proxy.endpoint_url, **kw)


def run(a: S3Adapter, coro_fn):
    async def go():
        try:
            return await coro_fn()
        finally:
            await a.close()
    return asyncio.run(go())


def test_s3_parallel_ranged_reads(fault_proxy, s3_bucket, s3_obj):
    prefix, key, data = s3_obj
    a = s3_adapter(fault_proxy, s3_bucket, prefix)

    async def go():
        whole = await a.read(key)
        ranges = []
        for off, n, kind in [(12345, MiB + 3, "unaligned"), (PART - 1, PART + 2, "aligned"),
                             (OBJ_SIZE - 10, 10, "bytearray"), (0, 0, "aligned")]:
            buf = buffer(n, kind)
            got = await a.read_into(key, buf, off)
            ranges.append((off, n, got, as_bytes(buf)))
        with pytest.raises(TierAccessError, match="beyond its end"):
            await a.read(key, OBJ_SIZE + 1)
        return whole, ranges

    fault_proxy.reset_stats()
    whole, ranges = run(a, go)
    assert whole.tobytes() == data and whole.ctypes.data % PAGE == 0
    for off, n, got, b in ranges:
        assert got == n and b == data[off:off + n]
    stats = fault_proxy.stats()
    parts = -(-OBJ_SIZE // PART)
    assert stats["requests"] >= 1 + parts + 5 + 2 + 1 + 1, "one HEAD, then one GET per part"
    assert stats["faults_injected"] == 0 and a.retries == 0


# fault rule, adapter settings, least number of the adapter's own retries it must cause.
# aiohttp (>= 3.10) silently re-sends an idempotent request once when the connection drops before the response
# head, so one reset never reaches the adapter: two resets on a single-part read do (the second fails aiohttp's
# own retry; the adapter retries after that).
FAULTS = {
    "slowdown_x2": ({"kind": "slowdown", "count": 2}, {}, 2),
    "error500": ({"kind": "error500"}, {}, 1),
    "reset": ({"kind": "reset", "count": 2}, {"part_bytes": 8 * MiB}, 1),
    "reset_parallel_parts": ({"kind": "reset", "count": 3}, {}, 0),
    "truncate": ({"kind": "truncate", "after_bytes": 1000}, {}, 1),
    "truncate_mid_part": ({"kind": "truncate", "after_bytes": PART // 2 + 5, "count": 2}, {}, 2),
    "stall": ({"kind": "stall", "stall_s": 3.0}, {"read_timeout_s": 0.5, "part_bytes": 8 * MiB}, 1),
    "stall_parallel_parts": ({"kind": "stall", "stall_s": 3.0, "count": 2}, {"read_timeout_s": 0.5}, 1),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_s3_faults_are_retried_to_exact_bytes(fault, fault_proxy, s3_bucket, s3_obj):
    prefix, key, data = s3_obj
    rule, adapter_kw, min_retries = FAULTS[fault]
    a = s3_adapter(fault_proxy, s3_bucket, prefix, **adapter_kw)
    fault_proxy.set_faults([dict(rule, method="GET", path_contains=key)])
    buf = aligned_empty(OBJ_SIZE)
    got = run(a, lambda: a.read_into(key, buf))
    assert got == OBJ_SIZE and buf.tobytes() == data
    count = rule.get("count", 1)
    assert fault_proxy.stats()["faults"][rule["kind"]] == count
    assert fault_proxy.faults() == [], "every injected fault was consumed"
    assert a.retries >= min_retries
    if min_retries:
        assert a.retries > 0


def test_s3_stat_is_retried_too(fault_proxy, s3_bucket, s3_obj):
    prefix, key, data = s3_obj
    a = s3_adapter(fault_proxy, s3_bucket, prefix)
    fault_proxy.set_faults([{"kind": "slowdown", "method": "HEAD", "count": 2},
                            {"kind": "reset", "method": "HEAD", "count": 2}])
    info = run(a, lambda: a.stat(key))
    assert info.size == OBJ_SIZE and a.retries == 3  # 2 SlowDowns + 1 (the pair of resets, see FAULTS)
    assert fault_proxy.stats()["faults"]["slowdown"] == 2 and fault_proxy.stats()["faults"]["reset"] == 2


def test_s3_more_faults_than_attempts_is_tier_access_error(fault_proxy, s3_bucket, s3_obj):
    prefix, key, _ = s3_obj
    a = s3_adapter(fault_proxy, s3_bucket, prefix, part_bytes=8 * MiB,
                   retry=RetryPolicy(max_attempts=3, base_delay_s=0.001, max_delay_s=0.01))
    fault_proxy.set_faults([{"kind": "error500", "method": "GET", "path_contains": key, "count": 50}])
    with pytest.raises(TierAccessError) as ei:
        run(a, lambda: a.read_into(key, aligned_empty(OBJ_SIZE)))
    msg = str(ei.value)
    assert f"s3://{s3_bucket}/{prefix}/{key}" in msg and "after 3 attempts" in msg
    assert a.retries == 3 and fault_proxy.stats()["faults"]["error500"] == 3


def test_s3_missing_key_is_blob_not_found_without_retries(fault_proxy, s3_bucket, s3_obj):
    prefix, _, _ = s3_obj
    a = s3_adapter(fault_proxy, s3_bucket, prefix)

    async def go():
        assert await a.stat("experts/L009/E000.bin") is None
        for op in (lambda: a.read_into("experts/L009/E000.bin", aligned_empty(PAGE)),
                   lambda: a.read("experts/L009/E000.bin")):
            with pytest.raises(BlobNotFound) as ei:
                await op()
            assert f"s3://{s3_bucket}/{prefix}/experts/L009/E000.bin" in str(ei.value)
    run(a, go)
    assert a.retries == 0


def test_s3_missing_bucket_is_tier_access_error(fault_proxy, s3_obj):
    a = s3_adapter(fault_proxy, "no-such-bucket", "x")

    async def go():
        for op in (lambda: a.read_into("experts/L000/E000.bin", aligned_empty(PAGE)), lambda: a.check_bucket(),
                   lambda: a.stat("experts/L000/E000.bin"), lambda: a.read("experts/L000/E000.bin")):
            with pytest.raises(TierAccessError) as ei:
                await op()
            assert "'no-such-bucket'" in str(ei.value) and "does not exist" in str(ei.value)
    run(a, go)
    assert a.retries == 0


def test_s3_writes_with_metadata_and_multipart(fault_proxy, s3_bucket, tmp_path):
    prefix = f"adapters-w-{uuid.uuid4().hex[:8]}"
    a = s3_adapter(fault_proxy, s3_bucket, prefix)
    small = os.urandom(5000)
    big = os.urandom(6 * MiB + 11)  # above the multipart threshold: uploaded in parts
    (tmp_path / "big.bin").write_bytes(big)

    async def go():
        await a.write("experts/L000/E001.bin", np.frombuffer(small, np.uint8), {"plain-checksum": "xxh64:ab"})
        await a.write_file("dense.safetensors", str(tmp_path / "big.bin"), {"plain-checksum": "xxh64:cd"})
        i1, i2 = await a.stat("experts/L000/E001.bin"), await a.stat("dense.safetensors")
        r1, r2 = await a.read("experts/L000/E001.bin"), await a.read("dense.safetensors")
        await a.delete("experts/L000/E001.bin")
        await a.delete("experts/L000/E001.bin")  # absent: not an error
        return i1, i2, r1.tobytes(), r2.tobytes(), await a.exists("experts/L000/E001.bin")

    i1, i2, r1, r2, still = run(a, go)
    assert (i1.size, i1.metadata) == (len(small), {"plain-checksum": "xxh64:ab"})
    assert (i2.size, i2.metadata) == (len(big), {"plain-checksum": "xxh64:cd"})
    assert r1 == small and r2 == big and not still
    head = s3_client(fault_proxy.upstream_url).head_object(Bucket=s3_bucket, Key=f"{prefix}/dense.safetensors")
    assert "-" in head["ETag"], "the large file went up as a multipart upload"


def _moto_auth(endpoint: str, no_auth_actions: str) -> None:
    """moto server's own switch: after `no_auth_actions` more requests, enforce IAM ("inf": never)."""
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=no_auth_actions.encode(), method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=5).read()


def test_s3_access_denied_is_not_retried(fault_proxy, moto_server, s3_bucket, s3_obj, monkeypatch):
    import boto3
    prefix, key, _ = s3_obj
    iam = boto3.client("iam", endpoint_url=moto_server.endpoint_url, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    user = f"nobody-{uuid.uuid4().hex[:6]}"
    iam.create_user(UserName=user)
    creds = iam.create_access_key(UserName=user)["AccessKey"]  # a user with no policy: may do nothing
    _moto_auth(moto_server.endpoint_url, "0")  # from now on moto checks signatures and IAM policies
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["SecretAccessKey"])
        a = s3_adapter(fault_proxy, s3_bucket, prefix)

        async def go():
            errs = []
            for op in (lambda: a.read_into(key, aligned_empty(PAGE)), lambda: a.stat(key),
                       lambda: a.write("experts/L000/E002.bin", b"x" * 10)):
                with pytest.raises(TierAccessError) as ei:
                    await op()
                errs.append(str(ei.value))
            return errs
        errs = run(a, go)
    finally:
        _moto_auth(moto_server.endpoint_url, "inf")
    assert all("access denied (" in e for e in errs), errs
    assert "(AccessDenied)" in errs[0] and "(AccessDenied)" in errs[2]  # HEAD has no body: its code is "403"
    assert f"s3://{s3_bucket}/{prefix}/{key}" in errs[0]
    assert a.retries == 0


@pytest.mark.parametrize("o_direct", [True, False])
def test_nvme_unreadable_object_is_tier_access_error(tmp_path, o_direct):
    """An OS-level read failure (here: the key names a directory, EISDIR) surfaces as TierAccessError naming the
    path, not as a bare OSError from a worker thread."""
    (tmp_path / "experts" / "L000").mkdir(parents=True)
    a = NvmeAdapter(str(tmp_path), chunk_bytes=PAGE, o_direct=o_direct)

    async def go():
        with pytest.raises(TierAccessError) as ei:
            await a.read_into("experts/L000", bytearray(100))
        return str(ei.value)
    msg = asyncio.run(go())
    assert os.path.join(str(tmp_path), "experts", "L000") in msg


def test_nvme_a_cancelled_read_closes_its_descriptors_only_after_its_chunks(tmp_path, monkeypatch):
    # closing at the cancel let a thread still in preadv read through a reused descriptor number: another file's
    # bytes written into the caller's buffer after read_into had returned
    (tmp_path / "a.bin").write_bytes(b"A" * (1 << 20))
    (tmp_path / "b.bin").write_bytes(b"B" * (1 << 20))
    ad = NvmeAdapter(str(tmp_path), chunk_bytes=256 << 10, parallelism=2, o_direct=False)
    gate, started = threading.Event(), threading.Semaphore(0)
    pread = NvmeAdapter._pread

    def held(fd, view, off):   # a deep device queue: the chunk stays in flight until the test lets it go
        started.release()
        gate.wait(10)
        return pread(fd, view, off)
    monkeypatch.setattr(NvmeAdapter, "_pread", staticmethod(held))
    open_fds = len(os.listdir("/proc/self/fd"))

    async def run():
        buf = np.zeros(1 << 20, np.uint8)
        t = asyncio.create_task(ad.read_into("a.bin", buf))
        while not started.acquire(blocking=False):
            await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        others = [os.open(tmp_path / "b.bin", os.O_RDONLY) for _ in range(4)]   # would take the freed numbers
        gate.set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(os.listdir("/proc/self/fd")) == open_fds + len(others):
                break
        for f in others:
            os.close(f)
        return buf
    buf = asyncio.run(run())
    assert set(np.unique(buf).tolist()) <= {0, ord("A")}, "another file's bytes reached the buffer"
    assert len(os.listdir("/proc/self/fd")) == open_fds, "the cancelled read's descriptors were never closed"
    ad._pool.shutdown()


def test_s3_reads_that_start_together_share_one_client(fault_proxy, s3_bucket, s3_obj, monkeypatch):
    # making the client awaits (credentials may come over the network: instance roles, IRSA); every part read that
    # started meanwhile used to make a client of its own, each with its own connection cap, left open at close()
    import aiobotocore.session as sess
    prefix, key, data = s3_obj
    made = []
    create, creds = sess.AioSession.create_client, sess.AioSession.get_credentials

    def counting(self, *a, **k):
        made.append(1)
        return create(self, *a, **k)

    async def slow_creds(self):
        await asyncio.sleep(0.05)
        return await creds(self)
    monkeypatch.setattr(sess.AioSession, "create_client", counting)
    monkeypatch.setattr(sess.AioSession, "get_credentials", slow_creds)
    a = s3_adapter(fault_proxy, s3_bucket, prefix, max_connections=2, adaptive_parts=False)

    async def go():
        n = 4 * PART
        bufs = [bytearray(n) for _ in range(3)]
        await asyncio.gather(*(a.read_into(key, b, i * PART) for i, b in enumerate(bufs)))
        return bufs
    bufs = run(a, go)
    assert all(bytes(b) == data[i * PART:i * PART + 4 * PART] for i, b in enumerate(bufs))
    assert len(made) == 1, f"{len(made)} clients made for one event loop"
