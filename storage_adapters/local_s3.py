"""Local S3-compatible stack for tests, the demo and benchmarks.

``MotoServer`` runs moto's S3 server as a subprocess on 127.0.0.1 and
``ShapingProxy`` runs ``storage_adapters.s3_proxy`` in front of it, so code
under test talks real S3 over real HTTP sockets, with object-storage-like
bandwidth, latency and faults. Both are context managers and stop their
subprocess by its own pid.

    with MotoServer() as moto, ShapingProxy(moto.endpoint_url) as proxy:
        make_bucket(proxy.endpoint_url, "experts")
        s3 = s3_client(proxy.endpoint_url)
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}

# urllib would honour http_proxy from the environment; local traffic must not.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_live: set["_ManagedProcess"] = set()  # started and not yet stopped, for the atexit hook


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for servers that can't report their own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _http(method: str, url: str, payload=None, timeout: float = 5.0):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with _opener.open(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


class StartupError(RuntimeError):
    """A server did not come up; the message ends with its stderr tail."""

    def __init__(self, message: str, exited: bool):
        super().__init__(message)
        self.exited = exited  # it died (vs. still silent at the deadline)


class _ManagedProcess:
    """Start/wait/stop discipline shared by the launchers. Output goes to temp
    files rather than pipes: nobody drains a pipe, and a full one blocks the server."""

    name = "process"
    startup_timeout = 30.0

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self._log_dir: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _spawn(self, argv: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
        self._log_dir = tempfile.mkdtemp(prefix=f"{self.name}-")
        self.stdout_path = os.path.join(self._log_dir, "stdout.log")
        self.stderr_path = os.path.join(self._log_dir, "stderr.log")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env=env, cwd=cwd)
        _live.add(self)

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The end of the subprocess's stderr (where errors and logs go)."""
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.stderr_path) - n_bytes))
                return f.read().decode(errors="replace")
        except (OSError, AttributeError):
            return ""

    def _fail(self, why: str, exited: bool) -> None:
        tail = self.log_tail()
        self.stop()
        raise StartupError(f"{self.name} {why}; stderr tail:\n{tail}", exited)

    def _wait_until(self, ready, timeout: float) -> None:
        """Poll ready() until true; fail early if the process dies."""
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self._fail(f"exited with code {rc} during startup", exited=True)
            if ready():
                return
            if time.monotonic() > deadline:
                self._fail(f"did not become ready within {timeout:.0f}s", exited=False)
            time.sleep(0.05)

    @staticmethod
    def _answers_http(url: str) -> bool:
        try:
            _opener.open(url, timeout=1).close()
            return True
        except urllib.error.HTTPError:
            return True  # any HTTP status means the server is up
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate our own subprocess (SIGTERM, then SIGKILL) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_dir:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None
        _live.discard(self)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self):  # pragma: no cover - overridden
        raise NotImplementedError


class MotoServer(_ManagedProcess):
    """moto's S3 server in a subprocess on 127.0.0.1 (data lives in its memory)."""

    name = "moto-server"

    def __init__(self, port: int | None = None, startup_timeout: float = 60.0):
        super().__init__()
        self.port = port
        self.startup_timeout = startup_timeout

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoServer":
        env = dict(os.environ)
        env.setdefault("AWS_ACCESS_KEY_ID", "testing")
        env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        env.setdefault("AWS_DEFAULT_REGION", REGION)
        pick_port = not self.port
        for attempt in range(3):
            # moto can't bind port 0 and report it, so a port we picked may be
            # taken by someone else before moto binds it: then try another.
            if pick_port:
                self.port = free_port()
            self._spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                         "-p", str(self.port)], env=env)
            try:
                self._wait_until(lambda: self._answers_http(self.endpoint_url + "/"),
                                 self.startup_timeout)
                return self
            except StartupError as e:
                if not (pick_port and e.exited) or attempt == 2:
                    raise
        return self


class ShapingProxy(_ManagedProcess):
    """``storage_adapters.s3_proxy`` in a subprocess, in front of ``upstream_url``.

    bandwidth_bps caps each client connection's download rate (None/0: unshaped);
    first_byte_latency_s delays every response head."""

    name = "s3-proxy"

    def __init__(self, upstream_url: str, bandwidth_bps: float | None = 90e6,
                 first_byte_latency_s: float = 0.020, port: int = 0,
                 startup_timeout: float = 20.0):
        super().__init__()
        self.upstream_url = upstream_url
        self.bandwidth_bps = bandwidth_bps
        self.first_byte_latency_s = first_byte_latency_s
        self.port = port  # 0: the proxy binds a free port and reports it (no race)
        self.startup_timeout = startup_timeout

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ShapingProxy":
        argv = [sys.executable, "-m", "storage_adapters.s3_proxy",
                "--upstream", self.upstream_url, "--host", "127.0.0.1", "--port", str(self.port),
                "--first-byte-latency-s", repr(float(self.first_byte_latency_s or 0.0))]
        if self.bandwidth_bps:
            argv += ["--bandwidth-bps", repr(float(self.bandwidth_bps))]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self._spawn(argv, env=env, cwd=REPO_ROOT)
        self._wait_until(self._read_ready_line, self.startup_timeout)
        self._wait_until(lambda: self._answers_http(self._control("stats")), self.startup_timeout)
        return self

    def _read_ready_line(self) -> bool:
        with open(self.stdout_path) as f:
            for line in f:
                if line.startswith("READY ") and line.endswith("\n"):
                    self.port = int(line.split()[1])
                    return True
        return False

    def _control(self, path: str) -> str:
        return f"{self.endpoint_url}/__proxy__/{path}"

    def set_faults(self, rules: list[dict]) -> list[dict]:
        """Replace the fault rules (see s3_proxy's docstring); returns them normalized."""
        return _http("POST", self._control("faults"), rules)

    def clear_faults(self) -> None:
        _http("DELETE", self._control("faults"))

    def faults(self) -> list[dict]:
        """Rules not yet used up."""
        return _http("GET", self._control("faults"))

    def stats(self) -> dict:
        """Counters: requests, bytes_relayed (+ per direction), faults {kind: n}, ..."""
        return _http("GET", self._control("stats"))

    def reset_stats(self) -> None:
        _http("DELETE", self._control("stats"))

    def set_shaping(self, bandwidth_bps: float | None = None,
                    first_byte_latency_s: float | None = None) -> dict:
        """Change shaping at runtime (only the arguments given); applies to new responses."""
        cfg = {}
        if bandwidth_bps is not None:
            cfg["bandwidth_bps"] = bandwidth_bps or None
        if first_byte_latency_s is not None:
            cfg["first_byte_latency_s"] = first_byte_latency_s
        return _http("POST", self._control("shaping"), cfg)


def s3_client(endpoint_url: str, **config_kwargs):
    """A boto3 S3 client for a local endpoint (test credentials, path-style URLs).
    Extra keyword arguments go to botocore's Config (retries, timeouts, ...)."""
    import boto3
    from botocore.config import Config

    config_kwargs.setdefault("s3", {"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=REGION,
                        config=Config(**config_kwargs), **CREDENTIALS)


def make_bucket(endpoint_url: str, bucket: str) -> str:
    """Create ``bucket`` (no error if we already own it); returns its name."""
    s3 = s3_client(endpoint_url)
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    return bucket


@atexit.register
def _stop_leftovers() -> None:
    # A crashed test or demo must not leave servers running behind it.
    for p in list(_live):
        p.stop()
