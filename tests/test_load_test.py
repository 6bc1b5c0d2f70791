"""jobs/load_test.py without a server: loopback only, argument bounds, percentiles against numpy, and a refused
port counted as errors at a bounded rate. Its run against the real Serve app is in tests/test_serve_app.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jobs.load_test import check_loopback, percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_test(*args):
    return subprocess.run([sys.executable, "-m", "jobs.load_test", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.3.2.1:9/", "http://localhost:8000",
                                 "http://[::1]:8000"])
def test_loopback_urls_are_accepted(url):
    assert check_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://example.com", "http://0.0.0.0:8000",
                                 "ftp://127.0.0.1/", "127.0.0.1:8000"])
def test_other_urls_are_refused_before_any_request(url):
    p = load_test("--url", url, "--clients", "1", "--seconds", "1")
    assert p.returncode == 2 and "load_test: error: --url" in p.stderr and p.stdout == ""


@pytest.mark.parametrize("args,why", [(["--clients", "0"], "--clients 0 must lie in [1, 1024]"),
                                      (["--clients", "1,x"], "comma list like 1,4,16"),
                                      (["--seconds", "0"], "--seconds 0.0 must lie"),
                                      (["--max-tokens", "0"], "--max-tokens 0 must lie")])
def test_bad_arguments_are_clear_errors(args, why):
    p = load_test("--url", "http://127.0.0.1:1", *args)
    assert p.returncode == 2 and why in p.stderr


def test_percentiles_are_nearest_rank():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        xs = rng.random(n).tolist()
        for q in (50, 95, 99):
            assert percentile(xs, q) == np.percentile(xs, q, method="inverted_cdf")


def test_a_refused_port_counts_errors_at_a_bounded_rate(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        out = tmp_path / "r.json"
        p = load_test("--url", f"http://127.0.0.1:{port}", "--clients", "2", "--seconds", "0.5", "--json", str(out))
    rep = json.loads(out.read_text())
    assert p.returncode == 1 and rep["requests"] == 0 and rep["tokens_per_s"] == 0
    # each client pauses 0.1 s after a failure: about 5 tries per client in 0.5 s, not thousands
    assert 2 <= rep["errors"] <= 2 * 7 and set(rep["errors_by_kind"]) == {"ClientConnectorError"}
