"""python -m jobs.load_test --url http://127.0.0.1:8000 --clients N[,N2,...] --seconds T [--max-tokens M] [--json OUT]

A closed-loop load test of the completions server (jobs/serve_app.py): N clients, each sending its next request
as soon as its previous one returns, for T seconds (and at most --max-requests in all). Loopback URLs only. Prints
p50/p95/p99 latency, completion tokens/s, requests/s and the error count; --json writes the same numbers.
Several client counts (--clients 1,4,16) run one after the other against the same server, and the report adds
each run's throughput relative to the first. Exit status 1 when any request failed.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
from urllib.parse import urlparse

ERROR_PAUSE_S = 0.1                      # a client waits this long after a failed request
PROMPTS = ["def ", "import os\n", "class ", "    for i in range(", "x = ", "return ", "# ", "if __name__ == "]


def check_loopback(url: str) -> str:
    """The base URL without a trailing slash; ValueError for anything but http(s) to a loopback host."""
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"--url {url!r}: expected http://127.0.0.1:PORT")
    host = u.hostname
    try:
        loop = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: not resolved, refused
        loop = False
    if not loop:
        raise ValueError(f"--url {url!r}: refusing to load-test a non-loopback host {host!r}; this tool only "
                         f"targets servers on this machine (127.0.0.0/8, ::1, localhost)")
    return url.rstrip("/")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


async def run(url: str, clients: int, seconds: float, max_tokens: int, max_requests: int,
              temperature: float, timeout_s: float) -> dict:
    import aiohttp
    lat: list[float] = []
    ttft: list[float] = []
    tokens = 0
    errors: dict[str, int] = {}
    started = 0
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    last_done = t0

    async def client(c: int, session):
        nonlocal tokens, started, last_done
        i = 0
        while time.perf_counter() < stop_at and started < max_requests:
            started += 1
            body = {"prompt": PROMPTS[(c + i) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": temperature,
                    "seed": c * 100003 + i}
            i += 1
            t = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/completions", json=body) as r:
                    data = await r.json(content_type=None)
                    if r.status != 200:
                        key = f"http {r.status}"
                        errors[key] = errors.get(key, 0) + 1
                        await asyncio.sleep(ERROR_PAUSE_S)
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                await asyncio.sleep(ERROR_PAUSE_S)  # a refused connection must not spin
                continue
            now = time.perf_counter()
            lat.append(now - t)
            last_done = max(last_done, now)
            tokens += data["usage"]["completion_tokens"]
            if data.get("ttft_s") is not None:
                ttft.append(data["ttft_s"])

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(client(c, session) for c in range(clients)))
    wall = max(last_done - t0, 1e-9)
    n_err = sum(errors.values())
    rep = {"url": url, "clients": clients, "seconds": seconds, "max_tokens": max_tokens,
           "requests": len(lat), "errors": n_err, "errors_by_kind": errors, "tokens": tokens,
           "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
           "requests_per_s": round(len(lat) / wall, 3)}
    if lat:
        rep.update({f"p{q}_s": round(percentile(lat, q), 4) for q in (50, 95, 99)})
        rep["mean_s"] = round(sum(lat) / len(lat), 4)
    if ttft:
        rep["ttft_p50_s"] = round(percentile(ttft, 50), 4)
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.load_test", description=__doc__.split("\n\n")[1])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", default="4", help="clients, or a comma list of client counts run in turn")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-requests", type=int, default=100_000, help="in all, over every client")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    try:
        url = check_loopback(a.url)
    except ValueError as e:
        print(f"load_test: error: {e}", file=sys.stderr)
        return 2
    try:
        counts = [int(c) for c in str(a.clients).split(",")]
    except ValueError:
        print(f"load_test: error: --clients {a.clients!r}: expected a number or a comma list like 1,4,16",
              file=sys.stderr)
        return 2
    for name, v, lo, hi in ([("--clients", c, 1, 1024) for c in counts] +
                            [("--seconds", a.seconds, 0.1, 3600), ("--max-tokens", a.max_tokens, 1, 100_000),
                             ("--max-requests", a.max_requests, 1, 10**7)]):
        if not lo <= v <= hi:
            print(f"load_test: error: {name} {v} must lie in [{lo}, {hi}]", file=sys.stderr)
            return 2
    runs = []
    for n in counts:
        rep = asyncio.run(run(url, n, a.seconds, a.max_tokens, a.max_requests, a.temperature, a.timeout))
        if runs and runs[0]["tokens_per_s"] > 0:
            rep["tokens_per_s_vs_first"] = round(rep["tokens_per_s"] / runs[0]["tokens_per_s"], 2)
        runs.append(rep)
        lat = (f"p50 {rep['p50_s'] * 1e3:.0f} ms, p95 {rep['p95_s'] * 1e3:.0f} ms, p99 {rep['p99_s'] * 1e3:.0f} ms"
               if rep["requests"] else "no successful request")
        vs = f" ({rep['tokens_per_s_vs_first']:.2f}x the first run)" if "tokens_per_s_vs_first" in rep else ""
        print(f"clients {n}, {rep['seconds']:g} s: {rep['requests']} requests, {rep['errors']} errors "
              f"{rep['errors_by_kind'] or ''}".rstrip())
        print(f"  latency {lat}; {rep['tokens_per_s']:.1f} tokens/s{vs}, {rep['requests_per_s']:.2f} requests/s",
              flush=True)
    out = runs[0] if len(runs) == 1 else {"runs": runs, "errors": sum(r["errors"] for r in runs)}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
