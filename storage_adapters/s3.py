"""S3Adapter: the object-store tier, for AWS S3 or any S3-compatible server (`endpoint_url`).

Reads use aiobotocore: a blob is split into ranged GETs that run in parallel over one bounded connection pool,
each streamed straight into its slice of the caller's buffer. Real object stores cap throughput per connection
(~90 MB/s) and charge a first-byte latency per request, so parallel ranges are what make a blob arrive fast.
Throttling (503 SlowDown), 5xx, timeouts, resets and truncated bodies are retried with jittered exponential
backoff; "not found", "no such bucket" and "access denied" are not, and say so. Writes use boto3: one PUT, or a
multipart upload whose parts are read only as they go out (memory: a few parts, whatever the object's size),
retried the same way and aborted on failure. Credentials come from the standard AWS chain.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .base import ObjectInfo, as_u8, read_fresh
from .errors import BlobNotFound, TierAccessError
from .tuning import PartTuner

_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        # "full jitter": uniform in [0, min(cap, base * 2^attempt)], so retrying clients spread out
        return rng.uniform(0, min(self.max_delay_s, self.base_delay_s * (2 ** attempt)))


_MIN_UPLOAD_PART = 5 << 20  # S3 refuses multipart parts below 5 MiB (all but the last)
_PART_ALIGN = 64 << 10  # part boundaries on 64 KiB, so parts stay page-aligned for the buffers they fill


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class _Truncated(Exception):
    pass


def parse_s3_uri(uri: str) -> tuple[str, str]:
    assert uri.startswith("s3://"), f"not an s3:// URI: {uri!r}"
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: no bucket name")
    return bucket, prefix.strip("/")


class S3Adapter:
    def __init__(self, uri: str, *, tier: str = "s3", endpoint_url: str | None = None, region: str = "us-east-1",
                 max_connections: int = 16, part_bytes: int = 8 << 20, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 10.0, retry: RetryPolicy = RetryPolicy(), seed: int = 0,
                 adaptive_parts: bool = True, upload_concurrency: int = 4):
        self.uri, self.tier = uri, tier
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.endpoint_url, self.region = endpoint_url, region
        self.max_connections, self.part_bytes = max_connections, part_bytes
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self.retry = retry
        self._rng = random.Random(seed)
        self._client = None
        self._client_cm = None
        self._loop = None
        self._sem: asyncio.Semaphore | None = None
        self._making: tuple | None = None   # (loop, asyncio.Lock): one client made per loop, however many ask at once
        self._boto3 = None
        self.retries = 0  # counted for telemetry and tests
        self.upload_concurrency = upload_concurrency
        # one tuner per read shape (parts cap): whole blobs and single-tensor ranges learn separately
        self._tuners: dict[int, PartTuner] | None = {} if adaptive_parts else None
        self._bucket_ok = False  # check_bucket() succeeded once

    @property
    def tuner_history(self) -> dict[int, list[tuple[int, float]]]:
        """parts cap -> [(parts used, bytes/s)] per tuning window, for telemetry and benchmarks."""
        return {cap: list(t.history) for cap, t in (self._tuners or {}).items()}

    def key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- clients --------------------------------------------------------------------------------------------------
    def _botocore_config(self, **extra):
        from botocore.config import Config
        # retries are ours (jittered, with truncation detection), so botocore must not retry underneath
        return Config(region_name=self.region, connect_timeout=self.connect_timeout_s,
                      read_timeout=self.read_timeout_s, retries={"total_max_attempts": 1},
                      max_pool_connections=self.max_connections, s3={"addressing_style": "path"}, **extra)

    async def _aclient(self):
        loop = asyncio.get_running_loop()
        if self._client is not None and self._loop is loop:
            return self._client
        # aiobotocore clients are bound to one event loop. Making one awaits (credentials may come over the
        # network): without the lock every read starting meanwhile made its own client and semaphore, leaking
        # them and lifting the max_connections cap
        if self._making is None or self._making[0] is not loop:
            self._making = (loop, asyncio.Lock())
        async with self._making[1]:
            if self._client is None or self._loop is not loop:
                from aiobotocore.session import get_session
                cm = get_session().create_client("s3", endpoint_url=self.endpoint_url,
                                                 config=self._botocore_config())
                client = await cm.__aenter__()
                self._client_cm, self._client = cm, client
                self._loop, self._sem = loop, asyncio.Semaphore(self.max_connections)
        return self._client

    def _sync_client(self):
        if self._boto3 is None:
            import boto3
            self._boto3 = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url,
                                                         config=self._botocore_config())
        return self._boto3

    # -- errors ---------------------------------------------------------------------------------------------------
    def _classify(self, e: Exception, key: str) -> Exception | None:
        """The final error for a non-retryable failure, or None when the failure is worth retrying."""
        from botocore.exceptions import ClientError, NoCredentialsError
        where = f"tier {self.tier!r}: s3://{self.bucket}/{self.key(key)}"
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                return BlobNotFound(f"{where} does not exist")
            if code == "NoSuchBucket":
                return TierAccessError(f"{where}: bucket {self.bucket!r} does not exist at "
                                       f"{self.endpoint_url or 'AWS'}")
            if code in _DENIED:
                return TierAccessError(f"{where}: access denied ({code}); check the credentials and the bucket "
                                       f"policy")
            if code == "InvalidRange":
                return TierAccessError(f"{where}: requested range lies beyond the object; it is truncated")
            if code in _RETRY_CODES or (status or 0) >= 500:
                return None
            return TierAccessError(f"{where}: {code}: {e}")
        if isinstance(e, NoCredentialsError):
            return TierAccessError(f"{where}: no AWS credentials found in the standard chain")
        return None  # timeouts, resets, truncated bodies, connection errors: transient

    def _failed(self, e: Exception, key: str) -> None:
        """Raise the final error for a failure that is not worth retrying; otherwise count the retry."""
        final = self._classify(e, key)
        if final is not None:
            raise final from e
        self.retries += 1

    def _exhausted(self, key: str, what: str, last: Exception | None) -> TierAccessError:
        return TierAccessError(f"tier {self.tier!r}: {what} s3://{self.bucket}/{self.key(key)} failed after "
                               f"{self.retry.max_attempts} attempts: {type(last).__name__}: {last}")

    async def _with_retries(self, key: str, what, op):
        last = None
        for attempt in range(self.retry.max_attempts):
            try:
                return await op()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - classified in _failed, nothing is swallowed
                self._failed(e, key)
                last = e
                await asyncio.sleep(self.retry.delay(attempt, self._rng))
        raise self._exhausted(key, what, last) from last

    # -- reads ----------------------------------------------------------------------------------------------------
    async def _get_range(self, key: str, view: memoryview, start: int) -> int:
        client = await self._aclient()
        end = start + len(view)

        async def once():
            async with self._sem:
                resp = await client.get_object(Bucket=self.bucket, Key=self.key(key), Range=f"bytes={start}-{end - 1}")
                body, pos = resp["Body"], 0
                async with body:
                    while pos < len(view):
                        chunk = await body.read(min(1 << 20, len(view) - pos))
                        if not chunk:
                            break
                        view[pos:pos + len(chunk)] = chunk
                        pos += len(chunk)
                if pos != len(view):
                    raise _Truncated(f"body ended after {pos} of {len(view)} bytes")
                return pos

        return await self._with_retries(key, f"GET bytes {start}-{end - 1} of", once)

    async def read_into(self, key: str, out, offset: int = 0) -> int:
        """Bytes [offset, offset + len(out)) in up to ceil(len / part_bytes) parallel ranged GETs; how many of
        those parts to use is learned by the PartTuner (see tuning.py) unless adaptive_parts is off."""
        mv = as_u8(out)
        n = len(mv)
        if n == 0:
            return 0
        cap = max(1, _ceil_div(n, self.part_bytes))
        tuner = None
        if self._tuners is not None and cap > 1:  # only reads where the choice matters have a tuner
            tuner = self._tuners.get(cap)
            if tuner is None:
                tuner = self._tuners[cap] = PartTuner(min(cap, self.max_connections))
        k = tuner.begin() if tuner is not None else cap
        step = _ceil_div(_ceil_div(n, k), _PART_ALIGN) * _PART_ALIGN
        done = 0
        try:
            parts = [self._get_range(key, mv[s:s + step], offset + s) for s in range(0, n, step)]
            if len(parts) == 1:
                done = await parts[0]
                return done
            results = await asyncio.gather(*parts, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            done = sum(results)
            return done
        finally:
            if tuner is not None:
                tuner.end(done)

    async def read(self, key: str, offset: int = 0, length: int | None = None) -> np.ndarray:
        return await read_fresh(self, key, offset, length, f"s3://{self.bucket}/{self.key(key)}")

    async def stat(self, key: str) -> ObjectInfo | None:
        client = await self._aclient()

        async def once():
            r = await client.head_object(Bucket=self.bucket, Key=self.key(key))
            return ObjectInfo(int(r["ContentLength"]), dict(r.get("Metadata") or {}))

        try:
            return await self._with_retries(key, "HEAD", once)
        except BlobNotFound:
            # HEAD answers a bare 404 for a missing key and a missing bucket alike; the bucket must not read as
            # "object absent" (callers would rewrite or report the wrong thing), so check it once.
            if not self._bucket_ok:
                await self.check_bucket()
            return None

    async def exists(self, key: str) -> bool:
        return await self.stat(key) is not None

    async def check_bucket(self) -> None:
        """Fail early, with a clear message, when the bucket is missing or not ours to read."""
        client = await self._aclient()

        async def once():
            await client.head_bucket(Bucket=self.bucket)

        try:
            await self._with_retries("", "HEAD bucket", once)
        except BlobNotFound as e:
            raise TierAccessError(f"tier {self.tier!r}: bucket {self.bucket!r} does not exist at "
                                  f"{self.endpoint_url or 'AWS'}") from e
        self._bucket_ok = True

    # -- writes (boto3 transfer manager: multipart above the threshold, parts in parallel) ------------------------
    def _retrying(self, key: str, what: str, call):
        """A write-side request with the read side's policy: jittered backoff on throttling, 5xx and resets."""
        last = None
        for attempt in range(self.retry.max_attempts):
            try:
                return call()
            except Exception as e:  # noqa: BLE001 - classified in _failed, nothing is swallowed
                self._failed(e, key)
                last = e
                time.sleep(self.retry.delay(attempt, self._rng))
        raise self._exhausted(key, what, last) from last

    def _upload(self, key: str, size: int, read, metadata) -> None:
        """Store `size` bytes, produced by read(offset, n) -> bytes, as one object: a single PUT up to one part,
        else a multipart upload whose parts are read only when their upload starts, `upload_concurrency` at a
        time — so memory stays at a few parts, however large the object. An upload that fails is aborted."""
        c, k, md = self._sync_client(), self.key(key), dict(metadata or {})
        psize = max(self.part_bytes, _MIN_UPLOAD_PART)
        if size <= psize:
            self._retrying(key, "PUT", lambda: c.put_object(Bucket=self.bucket, Key=k, Body=read(0, size),
                                                            Metadata=md))
            return
        up = self._retrying(key, "create multipart upload of",
                            lambda: c.create_multipart_upload(Bucket=self.bucket, Key=k, Metadata=md))["UploadId"]

        def part(i: int) -> dict:
            off = i * psize
            body = read(off, min(psize, size - off))
            r = self._retrying(key, f"upload part {i + 1} of", lambda: c.upload_part(
                Bucket=self.bucket, Key=k, UploadId=up, PartNumber=i + 1, Body=body))
            return {"ETag": r["ETag"], "PartNumber": i + 1}

        try:
            with ThreadPoolExecutor(self.upload_concurrency, thread_name_prefix=f"{self.tier}-up") as ex:
                parts = list(ex.map(part, range(_ceil_div(size, psize))))
            self._retrying(key, "complete multipart upload of", lambda: c.complete_multipart_upload(
                Bucket=self.bucket, Key=k, UploadId=up, MultipartUpload={"Parts": parts}))
        except BaseException:
            try:  # leave no parts behind to be billed; a re-run would also clean them up
                c.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=up)
            except Exception:  # noqa: BLE001 - the original error is what matters
                pass
            raise

    async def write(self, key: str, data, metadata: dict[str, str] | None = None) -> None:
        mv = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        await asyncio.get_running_loop().run_in_executor(
            None, self._upload, key, len(mv), lambda off, n: bytes(mv[off:off + n]), metadata)

    async def write_file(self, key: str, path: str, metadata: dict[str, str] | None = None) -> None:
        def go():
            with open(path, "rb") as f:
                fd = f.fileno()
                self._upload(key, os.fstat(fd).st_size, lambda off, n: os.pread(fd, n, off), metadata)
        await asyncio.get_running_loop().run_in_executor(None, go)

    async def delete(self, key: str) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._sync_client().delete_object(Bucket=self.bucket, Key=self.key(key)))

    def abort_incomplete_uploads(self) -> int:
        """Abort multipart uploads left by an interrupted conversion under our prefix (they cost storage).

        Only keys inside this store (prefix + "/"), never a sibling store whose prefix merely starts the same."""
        from botocore.exceptions import ClientError
        c, n = self._sync_client(), 0
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
                for u in page.get("Uploads", []):
                    c.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
                    n += 1
        except ClientError as e:
            raise (self._classify(e, "") or TierAccessError(
                f"tier {self.tier!r}: cannot clear incomplete uploads under s3://{self.bucket}/{prefix}: {e}")) from e
        return n

    async def close(self) -> None:
        if self._client_cm is not None and self._loop is asyncio.get_running_loop():
            await self._client_cm.__aexit__(None, None, None)
        self._client = self._client_cm = None
