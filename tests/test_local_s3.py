"""Tests for the local S3 stack (storage_adapters.local_s3 + s3_proxy).

Everything is real: a moto server subprocess, proxy subprocesses in front of it
and boto3 talking HTTP to 127.0.0.1. Nothing is mocked.
"""
from __future__ import annotations

import hashlib
import http.client
import http.server
import os
import socket
import threading
import time
import urllib.error
from types import SimpleNamespace

import pytest
from botocore.exceptions import (ClientError, ConnectionClosedError, IncompleteReadError,
                                 ReadTimeoutError, ResponseStreamingError)

from storage_adapters.local_s3 import MotoServer, ShapingProxy, make_bucket, s3_client

BUCKET = "local-s3-tests"
SHAPED_BPS = 20e6
LATENCY_S = 0.2
MiB = 1 << 20
# One attempt only: botocore must not hide injected faults behind silent retries.
NO_RETRY = dict(retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=2, read_timeout=5)


@pytest.fixture(scope="module")
def stack():
    with MotoServer() as moto, \
            ShapingProxy(moto.endpoint_url, bandwidth_bps=SHAPED_BPS,
                         first_byte_latency_s=LATENCY_S) as shaped, \
            ShapingProxy(moto.endpoint_url, bandwidth_bps=None, first_byte_latency_s=0) as fast:
        make_bucket(moto.endpoint_url, BUCKET)
        yield SimpleNamespace(moto=moto, shaped=shaped, fast=fast,
                              direct=s3_client(moto.endpoint_url, **NO_RETRY),
                              s3=s3_client(fast.endpoint_url, **NO_RETRY))


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def put_random(client, key: str, size: int) -> bytes:
    data = os.urandom(size)
    client.put_object(Bucket=BUCKET, Key=key, Body=data)
    return data


# ---------------------------------------------------------------- data path

def test_roundtrip_20mib_is_byte_exact(stack):
    before = stack.fast.stats()
    data = put_random(stack.s3, "roundtrip", 20 * MiB)
    got = stack.s3.get_object(Bucket=BUCKET, Key="roundtrip")["Body"].read()
    assert sha256(got) == sha256(data)
    # What reached moto through the proxy is intact too.
    stored = stack.direct.get_object(Bucket=BUCKET, Key="roundtrip")["Body"].read()
    assert sha256(stored) == sha256(data)
    after = stack.fast.stats()
    assert after["bytes_to_upstream"] - before["bytes_to_upstream"] >= 20 * MiB
    assert after["bytes_to_client"] - before["bytes_to_client"] >= 20 * MiB
    assert after["requests"] - before["requests"] == 2


def test_ranged_get_returns_exact_range(stack):
    data = put_random(stack.direct, "ranged", 3 * MiB)
    resp = stack.s3.get_object(Bucket=BUCKET, Key="ranged", Range="bytes=1000000-2000123")
    assert resp["Body"].read() == data[1000000:2000124]
    assert resp["ContentRange"] == f"bytes 1000000-2000123/{len(data)}"
    tail = stack.s3.get_object(Bucket=BUCKET, Key="ranged", Range="bytes=-777")["Body"].read()
    assert tail == data[-777:]


def test_multipart_upload_through_proxy(stack):
    parts_data = [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(123457)]
    mpu = stack.s3.create_multipart_upload(Bucket=BUCKET, Key="multipart")
    parts = []
    for n, chunk in enumerate(parts_data, start=1):
        r = stack.s3.upload_part(Bucket=BUCKET, Key="multipart", PartNumber=n,
                                 UploadId=mpu["UploadId"], Body=chunk)
        parts.append({"PartNumber": n, "ETag": r["ETag"]})
    stack.s3.complete_multipart_upload(Bucket=BUCKET, Key="multipart", UploadId=mpu["UploadId"],
                                       MultipartUpload={"Parts": parts})
    got = stack.direct.get_object(Bucket=BUCKET, Key="multipart")["Body"].read()
    assert sha256(got) == sha256(b"".join(parts_data))


def test_head_and_missing_key_pass_through(stack):
    put_random(stack.direct, "headme", 4321)
    assert stack.s3.head_object(Bucket=BUCKET, Key="headme")["ContentLength"] == 4321
    with pytest.raises(ClientError) as e:
        stack.s3.get_object(Bucket=BUCKET, Key="no-such-key")
    assert e.value.response["Error"]["Code"] == "NoSuchKey"
    # The connection is still usable after an error response with a body.
    assert stack.s3.head_object(Bucket=BUCKET, Key="headme")["ContentLength"] == 4321


def test_chunked_and_close_delimited_responses():
    """moto always sends Content-Length; check the other response framings
    against a small HTTP/1.1 upstream that uses them."""
    payload = os.urandom(300_000)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            if self.path == "/chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(payload), 70_000):
                    piece = payload[i:i + 70_000]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            else:  # no length: the body ends when the server closes
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload)
                self.close_connection = True

        def log_message(self, *args):
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with ShapingProxy(f"http://127.0.0.1:{upstream.server_port}", bandwidth_bps=None,
                          first_byte_latency_s=0) as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
            for _ in range(2):  # twice on one keep-alive connection
                conn.request("GET", "/chunked")
                resp = conn.getresponse()
                assert resp.getheader("Transfer-Encoding") == "chunked"
                assert resp.read() == payload
            conn.request("GET", "/eof")
            resp = conn.getresponse()
            assert resp.read() == payload
            assert resp.getheader("Connection") == "close"
            conn.close()
    finally:
        upstream.shutdown()
        upstream.server_close()


# ---------------------------------------------------------------- shaping

def timed_get(client, key: str) -> tuple[float, float, bytes]:
    """(seconds to response head, seconds for the body, body)."""
    t0 = time.perf_counter()
    resp = client.get_object(Bucket=BUCKET, Key=key)
    t1 = time.perf_counter()
    body = resp["Body"].read()
    return t1 - t0, time.perf_counter() - t1, body


def test_bandwidth_cap(stack):
    data = put_random(stack.direct, "ten-mib", 10 * MiB)
    shaped = s3_client(stack.shaped.endpoint_url, **NO_RETRY)
    _, shaped_body_s, body = timed_get(shaped, "ten-mib")
    assert body == data
    # 10 MiB at 20e6 B/s is 0.52 s on one connection.
    assert 0.45 <= shaped_body_s < 2.0, shaped_body_s
    fast_head_s, fast_body_s, body = timed_get(stack.s3, "ten-mib")
    assert body == data
    assert fast_head_s + fast_body_s < shaped_body_s / 2, (fast_head_s, fast_body_s, shaped_body_s)


def test_first_byte_latency(stack):
    put_random(stack.direct, "tiny", 1024)
    shaped = s3_client(stack.shaped.endpoint_url, **NO_RETRY)

    def best_of_3(client):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            client.head_object(Bucket=BUCKET, Key="tiny")
            times.append(time.perf_counter() - t0)
        return min(times)

    shaped_s, fast_s = best_of_3(shaped), best_of_3(stack.s3)
    assert shaped_s >= LATENCY_S
    assert shaped_s - fast_s >= 0.8 * LATENCY_S, (shaped_s, fast_s)


# ---------------------------------------------------------------- faults

def fault_count(proxy: ShapingProxy, kind: str) -> int:
    return proxy.stats()["faults"][kind]


def test_slowdown_fault(stack):
    put_random(stack.direct, "slow", 1000)
    before = fault_count(stack.fast, "slowdown")
    stack.fast.set_faults([{"kind": "slowdown", "method": "GET", "path_contains": "/slow"}])
    with pytest.raises(ClientError) as e:
        stack.s3.get_object(Bucket=BUCKET, Key="slow")
    assert e.value.response["Error"]["Code"] == "SlowDown"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    # count=1 is used up: the next request goes through, on the same connection.
    assert stack.fast.faults() == []
    assert len(stack.s3.get_object(Bucket=BUCKET, Key="slow")["Body"].read()) == 1000
    assert fault_count(stack.fast, "slowdown") == before + 1


def test_error500_fault_count_and_method_filter(stack):
    data = put_random(stack.direct, "flaky", 1000)
    before = fault_count(stack.fast, "error500")
    stack.fast.set_faults([{"kind": "error500", "method": "PUT"},
                           {"kind": "error500", "method": "GET", "path_contains": "flaky",
                            "count": 2}])
    for _ in range(2):
        with pytest.raises(ClientError) as e:
            stack.s3.get_object(Bucket=BUCKET, Key="flaky")
        assert e.value.response["Error"]["Code"] == "InternalError"
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert stack.s3.get_object(Bucket=BUCKET, Key="flaky")["Body"].read() == data
    # The PUT rule did not match any GET and is still pending.
    assert [r["method"] for r in stack.fast.faults()] == ["PUT"]
    stack.fast.clear_faults()
    assert stack.fast.faults() == []
    assert fault_count(stack.fast, "error500") == before + 2


def test_reset_fault(stack):
    put_random(stack.direct, "reset-me", 1000)
    before = fault_count(stack.fast, "reset")
    stack.fast.set_faults([{"kind": "reset", "path_contains": "reset-me"}])
    with pytest.raises(ConnectionClosedError):
        stack.s3.get_object(Bucket=BUCKET, Key="reset-me")
    assert fault_count(stack.fast, "reset") == before + 1
    assert len(stack.s3.get_object(Bucket=BUCKET, Key="reset-me")["Body"].read()) == 1000
    # A raw socket sees an RST (ECONNRESET), not an orderly close (b"").
    stack.fast.set_faults([{"kind": "reset"}])
    with socket.create_connection(("127.0.0.1", stack.fast.port), timeout=5) as sock:
        sock.sendall(b"GET /%s/reset-me HTTP/1.1\r\nHost: x\r\n\r\n" % BUCKET.encode())
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)


def test_stall_fault_times_out(stack):
    put_random(stack.direct, "stall-me", 1000)
    client = s3_client(stack.fast.endpoint_url, **dict(NO_RETRY, read_timeout=1))
    before = fault_count(stack.fast, "stall")
    stack.fast.set_faults([{"kind": "stall", "path_contains": "stall-me", "stall_s": 3}])
    t0 = time.perf_counter()
    with pytest.raises(ReadTimeoutError):
        client.get_object(Bucket=BUCKET, Key="stall-me")
    assert 0.9 <= time.perf_counter() - t0 < 2.9
    assert fault_count(stack.fast, "stall") == before + 1


@pytest.mark.parametrize("after_bytes, expect_sent", [(1000, 1000), (None, 32768)])
def test_truncate_fault_is_detected(stack, after_bytes, expect_sent):
    data = put_random(stack.direct, "truncate-me", 65536)
    before = stack.fast.stats()
    rule = {"kind": "truncate", "method": "GET", "path_contains": "truncate-me"}
    if after_bytes is not None:
        rule["after_bytes"] = after_bytes
    stack.fast.set_faults([rule])
    resp = stack.s3.get_object(Bucket=BUCKET, Key="truncate-me")
    assert resp["ContentLength"] == len(data)  # the head promises the full body
    with pytest.raises((IncompleteReadError, ResponseStreamingError)):
        resp["Body"].read()
    after = stack.fast.stats()
    assert after["faults"]["truncate"] == before["faults"]["truncate"] + 1
    assert after["bytes_to_client"] - before["bytes_to_client"] == expect_sent
    assert stack.s3.get_object(Bucket=BUCKET, Key="truncate-me")["Body"].read() == data


def test_bad_fault_rule_is_rejected(stack):
    with pytest.raises(urllib.error.HTTPError) as e:
        stack.fast.set_faults([{"kind": "meteor"}])
    assert e.value.code == 400
    assert stack.fast.faults() == []


# ---------------------------------------------------------------- lifecycle

def test_stop_ends_the_subprocesses():
    with MotoServer() as moto, ShapingProxy(moto.endpoint_url) as proxy:
        pids = [moto.pid, proxy.pid]
        make_bucket(proxy.endpoint_url, "lifecycle")
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert proxy.proc.returncode == 0  # the proxy shut down cleanly on SIGTERM


def test_startup_failure_reports_stderr():
    with pytest.raises(RuntimeError, match="upstream must be an http"):
        ShapingProxy("ftp://127.0.0.1:1").start()
