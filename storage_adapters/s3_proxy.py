"""Shaping, fault-injecting HTTP/1.1 reverse proxy for an S3-compatible endpoint.

A local S3 server (moto) answers instantly and never fails, which hides the
behaviour that matters when serving expert weights from object storage. This
proxy sits between S3 clients (boto3) and the local server and adds, per client
connection, a bandwidth cap and a first-byte latency on responses, plus faults
injected on demand: SlowDown throttling, 500s, connection resets, stalls and
truncated bodies.

Run:
    python -m storage_adapters.s3_proxy --upstream http://127.0.0.1:9000 \
        --host 127.0.0.1 --port 0 [--bandwidth-bps N] [--first-byte-latency-s S]
It prints ``READY <port>`` on stdout once listening and logs to stderr.

Control API, on the same port under ``/__proxy__/`` (JSON in and out):
    POST   /__proxy__/faults   list of rules; replaces the current rules
    GET    /__proxy__/faults   rules not yet used up
    DELETE /__proxy__/faults   remove all rules
    GET    /__proxy__/stats    counters: requests, bytes relayed, faults by kind
    DELETE /__proxy__/stats    reset the counters
    GET    /__proxy__/shaping  current shaping settings
    POST   /__proxy__/shaping  {"bandwidth_bps": N or null, "first_byte_latency_s": S}

A rule: {"kind": "slowdown"|"reset"|"stall"|"truncate"|"error500",
         "method": "GET" (optional), "path_contains": "..." (optional),
         "count": 1, "after_bytes": N (truncate; default half the body),
         "stall_s": 30 (stall)}
The first rule (in order) that matches a request is applied and its count
decremented; a rule whose count reaches zero is dropped.

Standard library only, so it can run in any interpreter next to the servers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import struct
import sys
import time
import uuid
from urllib.parse import urlsplit

log = logging.getLogger("s3_proxy")

READ_SIZE = 256 * 1024  # relay granularity: big reads keep Python overhead per byte low
SHAPE_CHUNK = 64 * 1024  # shaped sends go out in pieces this size (also the bucket's burst)
STREAM_LIMIT = 1024 * 1024  # StreamReader buffer; also caps the size of a message head
CONTROL_PREFIX = "/__proxy__/"
FAULT_KINDS = ("slowdown", "reset", "stall", "truncate", "error500")
RULE_KEYS = {"kind", "method", "path_contains", "count", "after_bytes", "stall_s"}
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Slow Down"}


class _Truncated(Exception):
    """Raised by a Sink once its byte budget (a truncate fault) is spent."""


# --------------------------------------------------------------------------- HTTP helpers

def parse_head(raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Split a message head into its start line and an ordered header list."""
    lines = raw.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return lines[0], headers


def build_head(start: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [start] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def get_header(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def without(headers: list[tuple[str, str]], *names: str) -> list[tuple[str, str]]:
    drop = {n.lower() for n in names}
    return [(k, v) for k, v in headers if k.lower() not in drop]


def framing(headers: list[tuple[str, str]], eof_default: bool) -> tuple[str, int]:
    """How a message body is delimited: ("chunked"|"length"|"eof"|"none", length)."""
    te = get_header(headers, "transfer-encoding")
    if te and "chunked" in te.lower():
        return "chunked", -1
    cl = get_header(headers, "content-length")
    if cl is not None:
        return "length", int(cl)
    # A request without either has no body; a response runs until the upstream closes.
    return ("eof", -1) if eof_default else ("none", 0)


def simple_response(status: int, body: bytes, content_type: str, *, head_only=False,
                    close=False, extra: list[tuple[str, str]] = ()) -> bytes:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
               ("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())),
               *extra]
    if close:
        headers.append(("Connection", "close"))
    head = build_head(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", headers)
    return head if head_only else head + body


def s3_error(status: int, code: str, message: str, resource: str, **kw) -> bytes:
    """An S3-style XML error response, as botocore expects to parse it."""
    request_id = uuid.uuid4().hex[:16].upper()
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{_xml_escape(resource)}</Resource>"
            f"<RequestId>{request_id}</RequestId><HostId>s3-proxy</HostId></Error>").encode()
    return simple_response(status, body, "application/xml",
                           extra=[("x-amz-request-id", request_id)], **kw)


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --------------------------------------------------------------------------- relaying

class TokenBucket:
    """Bandwidth cap: callers take tokens (bytes) and sleep off any deficit."""

    def __init__(self, rate: float, burst: int = SHAPE_CHUNK):
        self.rate, self.burst = float(rate), burst
        self.tokens, self.stamp = float(burst), time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            # The refill on the next call counts the time slept, so oversleeping
            # is paid back rather than accumulating.
            await asyncio.sleep(-self.tokens / self.rate)


class Sink:
    """Destination of a relayed body: a stream writer (or nothing, to discard),
    optionally shaped by a token bucket and cut off after a byte budget."""

    def __init__(self, writer: asyncio.StreamWriter | None, bucket: TokenBucket | None = None,
                 budget: int | None = None):
        self.writer, self.bucket, self.budget = writer, bucket, budget
        self.sent = 0

    async def send(self, data: bytes) -> None:
        cut = self.budget is not None and self.sent + len(data) > self.budget
        if cut:
            data = data[: self.budget - self.sent]
        if self.writer is not None and data:
            if self.bucket is None:
                self.writer.write(data)
                await self.writer.drain()
            else:
                view = memoryview(data)
                for i in range(0, len(view), SHAPE_CHUNK):
                    piece = view[i:i + SHAPE_CHUNK]
                    await self.bucket.take(len(piece))
                    self.writer.write(piece)
                    await self.writer.drain()
        self.sent += len(data)
        if cut:
            raise _Truncated()


class BufferSink(Sink):
    """Collects a (small) body in memory, for control requests."""

    def __init__(self):
        super().__init__(None)
        self.buf = bytearray()

    async def send(self, data: bytes) -> None:
        if len(self.buf) + len(data) > STREAM_LIMIT:
            raise ValueError("control request body too large")
        self.buf += data


async def relay_exact(reader: asyncio.StreamReader, sink: Sink, n: int) -> None:
    while n > 0:
        data = await reader.read(min(READ_SIZE, n))
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        n -= len(data)
        await sink.send(data)


async def relay_body(reader: asyncio.StreamReader, sink: Sink, kind: str, length: int) -> None:
    """Copy one body, framing included, so chunked streams pass through verbatim."""
    if kind == "length":
        await relay_exact(reader, sink, length)
    elif kind == "eof":
        while data := await reader.read(READ_SIZE):
            await sink.send(data)
    elif kind == "chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            await sink.send(line)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # optional trailers, then the empty line
                    line = await reader.readuntil(b"\r\n")
                    await sink.send(line)
                    if line == b"\r\n":
                        return
            await relay_exact(reader, sink, size + 2)  # data + CRLF


def hard_reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: SO_LINGER (on, 0s) drops unsent data."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


# --------------------------------------------------------------------------- proxy state

class ProxyState:
    """Settings, fault rules and counters shared by all connections."""

    def __init__(self, upstream: str, bandwidth_bps: float | None, first_byte_latency_s: float):
        url = urlsplit(upstream)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream_host, self.upstream_port = url.hostname, url.port or 80
        self.bandwidth_bps = bandwidth_bps or None
        self.first_byte_latency_s = max(0.0, first_byte_latency_s or 0.0)
        self.rules: list[dict] = []
        self.tasks: set[asyncio.Task] = set()
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {"connections": 0, "requests": 0, "bytes_to_client": 0,
                      "bytes_to_upstream": 0, "upstream_errors": 0,
                      "faults": {k: 0 for k in FAULT_KINDS}}

    def stats_json(self) -> dict:
        s = dict(self.stats, faults=dict(self.stats["faults"]))
        s["bytes_relayed"] = s["bytes_to_client"] + s["bytes_to_upstream"]
        s["active_connections"] = len(self.tasks)
        s["faults_injected"] = sum(s["faults"].values())
        return s

    def set_rules(self, raw) -> None:
        if not isinstance(raw, list):
            raise ValueError("expected a JSON list of rules")
        self.rules = [normalize_rule(r) for r in raw]

    def take_fault(self, method: str, target: str) -> dict | None:
        for rule in self.rules:
            if rule["method"] and rule["method"] != method:
                continue
            if rule["path_contains"] and rule["path_contains"] not in target:
                continue
            rule["count"] -= 1
            if rule["count"] <= 0:
                self.rules.remove(rule)
            self.stats["faults"][rule["kind"]] += 1
            return rule
        return None


def normalize_rule(raw) -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"rule must be an object, got {raw!r}")
    if raw.get("kind") not in FAULT_KINDS:
        raise ValueError(f"rule kind must be one of {FAULT_KINDS}, got {raw.get('kind')!r}")
    unknown = set(raw) - RULE_KEYS
    if unknown:
        raise ValueError(f"unknown rule keys {sorted(unknown)}")
    count = int(raw.get("count", 1))
    if count < 1:
        raise ValueError("count must be >= 1")
    after = raw.get("after_bytes")
    return {"kind": raw["kind"],
            "method": raw["method"].upper() if raw.get("method") else None,
            "path_contains": raw.get("path_contains") or None,
            "count": count,
            "after_bytes": None if after is None else max(0, int(after)),
            "stall_s": float(raw.get("stall_s", 30.0))}


# --------------------------------------------------------------------------- connections

class Connection:
    """One client connection and the upstream connection dedicated to it."""

    def __init__(self, state: ProxyState, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.state, self.reader, self.writer = state, reader, writer
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.bucket: TokenBucket | None = None
        writer.transport.set_write_buffer_limits(high=4 * READ_SIZE)

    async def serve(self) -> None:
        while True:
            try:
                raw = await self.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # client closed between requests
            except asyncio.LimitOverrunError:
                self.writer.write(simple_response(431, b"", "text/plain", close=True))
                return
            start, headers = parse_head(raw)
            try:
                method, target, version = start.split(" ", 2)
            except ValueError:
                self.writer.write(simple_response(400, b"", "text/plain", close=True))
                return
            conn_hdr = (get_header(headers, "connection") or "").lower()
            keep = "close" not in conn_hdr and version.upper() != "HTTP/1.0"
            if target.startswith(CONTROL_PREFIX):
                await self.control(method, target, headers, keep)
            else:
                keep = await self.proxy(method, target, headers, keep)
            await self.writer.drain()
            if not keep:
                return

    # ---- control API

    async def control(self, method: str, target: str, headers, keep: bool) -> None:
        kind, length = framing(headers, eof_default=False)
        collector = BufferSink()
        await relay_body(self.reader, collector, kind, length)
        body = bytes(collector.buf)
        path = target.split("?", 1)[0][len(CONTROL_PREFIX):].strip("/")
        st = self.state
        status, result = 200, None
        try:
            if path == "faults" and method == "GET":
                result = st.rules
            elif path == "faults" and method == "POST":
                st.set_rules(json.loads(body or b"[]"))
                log.info("fault rules set: %s", st.rules)
                result = st.rules
            elif path == "faults" and method == "DELETE":
                st.rules = []
                log.info("fault rules cleared")
                result = st.rules
            elif path == "stats" and method == "GET":
                result = st.stats_json()
            elif path == "stats" and method == "DELETE":
                st.reset_stats()
                result = st.stats_json()
            elif path == "shaping" and method in ("GET", "POST"):
                if method == "POST":
                    cfg = json.loads(body or b"{}")
                    if "bandwidth_bps" in cfg:
                        st.bandwidth_bps = cfg["bandwidth_bps"] or None
                    if "first_byte_latency_s" in cfg:
                        st.first_byte_latency_s = max(0.0, float(cfg["first_byte_latency_s"] or 0))
                    log.info("shaping set: bandwidth_bps=%s first_byte_latency_s=%s",
                             st.bandwidth_bps, st.first_byte_latency_s)
                result = {"bandwidth_bps": st.bandwidth_bps,
                          "first_byte_latency_s": st.first_byte_latency_s}
            else:
                status, result = 404, {"error": f"no control endpoint {method} {path!r}"}
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            status, result = 400, {"error": str(e)}
        payload = json.dumps(result).encode()
        self.writer.write(simple_response(status, payload, "application/json", close=not keep))

    # ---- proxying

    async def proxy(self, method: str, target: str, headers, keep: bool) -> bool:
        """Handle one request; returns whether the client connection stays open."""
        st = self.state
        st.stats["requests"] += 1
        if "100-continue" in (get_header(headers, "expect") or "").lower():
            # Answer the expectation here rather than forwarding it: the client
            # then sends its body at once instead of waiting for the upstream.
            headers = without(headers, "expect")
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        req_kind, req_len = framing(headers, eof_default=False)
        head_only = method == "HEAD"

        rule = st.take_fault(method, target)
        if rule is not None:
            log.info("injecting %s on %s %s", rule["kind"], method, target)
            kind = rule["kind"]
            if kind == "stall":
                await asyncio.sleep(rule["stall_s"])  # then carry on, if the client is still there
            elif kind in ("slowdown", "error500", "reset"):
                await relay_body(self.reader, Sink(None), req_kind, req_len)  # read the request
                if kind == "reset":
                    hard_reset(self.writer)
                    return False
                await asyncio.sleep(st.first_byte_latency_s)
                if kind == "slowdown":
                    resp = s3_error(503, "SlowDown", "Please reduce your request rate.", target,
                                    head_only=head_only, close=not keep)
                else:
                    resp = s3_error(500, "InternalError",
                                    "We encountered an internal error. Please try again.",
                                    target, head_only=head_only, close=not keep)
                self.writer.write(resp)
                return keep

        try:
            await self.send_upstream(method, target, headers, req_kind, req_len)
            status, resp_start, resp_headers = await self.read_upstream_head(head_only)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            # Upstream down or broke mid-request. The request body may be half
            # read, so the client connection cannot be trusted either: close it.
            log.warning("upstream error on %s %s: %r", method, target, e)
            st.stats["upstream_errors"] += 1
            self.drop_upstream()
            self.writer.write(s3_error(502, "BadGateway", f"upstream error: {e!r}", target,
                                       head_only=head_only, close=True))
            return False

        if head_only or status in (204, 304):
            resp_kind, resp_len = "none", 0
        else:
            resp_kind, resp_len = framing(resp_headers, eof_default=True)
        up_conn = (get_header(resp_headers, "connection") or "").lower()
        up_keep = not ("close" in up_conn or resp_start.upper().startswith("HTTP/1.0")
                       or resp_kind == "eof")
        # Connection headers are hop-by-hop: the client keeps its connection to
        # us even when the upstream closes its own (we reconnect next time).
        truncate = rule is not None and rule["kind"] == "truncate"
        keep = keep and resp_kind != "eof" and not truncate
        resp_headers = without(resp_headers, "connection", "keep-alive")
        if not keep:
            resp_headers.append(("Connection", "close"))

        await asyncio.sleep(st.first_byte_latency_s)
        self.writer.write(build_head(resp_start, resp_headers))

        budget = None
        if truncate:
            budget = rule["after_bytes"]
            if budget is None:
                budget = resp_len // 2 if resp_kind == "length" else 0
        sink = Sink(self.writer, self.shaper(), budget)
        try:
            await relay_body(self.up_reader, sink, resp_kind, resp_len)
        except _Truncated:
            pass
        except BaseException:
            self.drop_upstream()
            raise
        finally:
            st.stats["bytes_to_client"] += sink.sent
        if truncate or not up_keep:
            self.drop_upstream()  # a truncated body leaves unread bytes upstream
        return keep

    def shaper(self) -> TokenBucket | None:
        rate = self.state.bandwidth_bps
        if not rate:
            return None
        if self.bucket is None or self.bucket.rate != rate:
            self.bucket = TokenBucket(rate)
        return self.bucket

    async def send_upstream(self, method, target, headers, req_kind, req_len) -> None:
        reused = self.up_writer is not None
        if reused and (self.up_reader.at_eof() or self.up_writer.is_closing()):
            self.drop_upstream()
            reused = False
        if not reused:
            self.up_reader, self.up_writer = await asyncio.open_connection(
                self.state.upstream_host, self.state.upstream_port, limit=STREAM_LIMIT)
            self.up_writer.transport.set_write_buffer_limits(high=4 * READ_SIZE)
        self.up_writer.write(build_head(f"{method} {target} HTTP/1.1", headers))
        sink = Sink(self.up_writer)
        try:
            await relay_body(self.reader, sink, req_kind, req_len)
        finally:
            self.state.stats["bytes_to_upstream"] += sink.sent
        await self.up_writer.drain()

    async def read_upstream_head(self, head_only: bool) -> tuple[int, str, list]:
        while True:
            start, headers = parse_head(await self.up_reader.readuntil(b"\r\n\r\n"))
            status = int(start.split(" ", 2)[1])
            if not 100 <= status < 200:  # skip interim responses (we stripped Expect)
                return status, start, headers

    def drop_upstream(self) -> None:
        if self.up_writer is not None:
            self.up_writer.close()
        self.up_reader = self.up_writer = None


async def handle_client(state: ProxyState, reader, writer) -> None:
    task = asyncio.current_task()
    state.tasks.add(task)
    state.stats["connections"] += 1
    conn = Connection(state, reader, writer)
    try:
        await conn.serve()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        log.debug("connection ended: %r", e)  # client went away mid-request
    except ValueError as e:
        log.warning("bad request framing: %r", e)
    except asyncio.CancelledError:
        pass  # shutdown
    except Exception:
        log.exception("unexpected error in connection handler")
    finally:
        conn.drop_upstream()
        writer.close()
        state.tasks.discard(task)


async def serve(args) -> None:
    state = ProxyState(args.upstream, args.bandwidth_bps, args.first_byte_latency_s)
    server = await asyncio.start_server(
        lambda r, w: handle_client(state, r, w), args.host, args.port,
        limit=STREAM_LIMIT, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("listening on %s:%d -> %s (bandwidth_bps=%s, first_byte_latency_s=%s)",
             args.host, port, args.upstream, state.bandwidth_bps, state.first_byte_latency_s)
    print(f"READY {port}", flush=True)
    await stop.wait()
    log.info("shutting down")
    server.close()
    tasks = list(state.tasks)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.wait_closed()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="http://host:port of the S3 server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (see READY line)")
    p.add_argument("--bandwidth-bps", type=float, default=None,
                   help="per-connection response bandwidth cap in bytes/s (0/absent: none)")
    p.add_argument("--first-byte-latency-s", type=float, default=0.0)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s s3_proxy[%(process)d] %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
