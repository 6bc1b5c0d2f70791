"""python -m jobs.batch_infer --config ray_config.yaml --input IN --output OUT [--store URI] [--max-batch N]

Batch inference on one ExpertCluster: prompts from JSONL or Parquet (a local JSONL file streamed by the driver,
the rest read with Ray Data), decoded together with continuous batching (cluster/engine.py: finished requests
leave the batch, waiting ones join), one output row per prompt. Meant to run as a Ray job (the runtime_env is the
one of ray_config.yaml):

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json "$(python -m jobs.batch_infer --config ray_config.yaml --print-runtime-env)" \
        -- python -m jobs.batch_infer --config ray_config.yaml --input prompts.jsonl --output out.jsonl

Input rows: `id` (string or integer, unique), `prompt` (text, or a list of token ids), optional `max_tokens`
(default --max-tokens), `temperature` (default 0: greedy), `top_p`, `seed`, `tenant`. JSONL is read line by
line as bytes, each line decoded on its own, so one malformed line (invalid JSON or UTF-8), a wrong type or a
missing field costs only that row.

Output rows (JSONL: one object a line; Parquet: OUT is a folder of part files, readable with
`pandas.read_parquet(OUT)` / `ray.data.read_parquet(OUT)`):
    id, row (input line / row number, 1-based), tenant, completion (text when the store has a tokenizer),
    token_ids, tokens, prompt_tokens, finish_reason ("eos" | "length" | null), latency_s, ttft_s, hits, misses
    (this request's share of the expert-cache hits/misses of the steps it rode in: approximate, see
    cluster/engine.py), error (null, or what was wrong), finished_at (unix time).
Progress lines every --progress-s seconds; --stats/--report record and draw a timeline of the cluster's counters
(jobs/report.py).

The store is read (its manifest) before Ray starts: a wrong --store is a one-line error, exit 2. SIGTERM (`ray job
stop`) ends the job like Ctrl-C: finished rows are committed and --stats/--report written before it exits.

Durability: rows are committed in small groups (every --commit-rows rows, and --commit-s seconds after a row
finished even while a long request still runs) — JSONL appended, flushed and fsync'ed; Parquet as part files
written to a temporary name and renamed — so a crash loses nothing committed. A torn last JSONL line is dropped on
the next start. Resume: a re-run skips every id that already has a successful row in OUT; rows that failed are
dropped from OUT (atomically) and retried. Duplicate ids in the input are reported and only the first is decoded.
The exit code is 0 when every row succeeded, 1 (after a summary) when any row failed or was a duplicate, 2 for
bad arguments or configuration.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from jobs._cli import at_least

ROW_FIELDS = ("id", "row", "tenant", "completion", "token_ids", "tokens", "prompt_tokens", "finish_reason",
              "latency_s", "ttft_s", "hits", "misses", "error", "finished_at")


SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 64 - 1    # cluster/engine.py's (torch.Generator's range), without importing torch


def _say(msg: str) -> None:
    print(f"[batch_infer] {msg}", file=sys.stderr, flush=True)


# -- input rows ---------------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One validated input row, ready to become a GenerationRequest."""
    id: str
    row: int
    prompt: object                   # str or list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    tenant: str | None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _plain(v):
    """Ray Data hands list columns over as numpy arrays and ints as numpy scalars: back to Python."""
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def parse_row(raw, row: int, default_max_tokens: int) -> tuple[Item | None, str | None, str | None]:
    """(item, None, id) for a good row, (None, error, id-or-None) for a bad one. `raw` is a dict (Parquet) or a
    JSONL line (bytes, or its text)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"row {row}: not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start}: {e.reason}", None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            return None, f"row {row}: not valid JSON: {e.msg} at column {e.colno}", None
    if not isinstance(raw, dict):
        return None, f"row {row}: expected a JSON object, got {type(raw).__name__}", None
    raw = {k: _plain(v) for k, v in raw.items()}
    rid = raw.get("id")
    if rid is None:
        return None, f"row {row}: id: missing", None
    if not (_is_int(rid) or isinstance(rid, str)) or rid == "":
        return None, f"row {row}: id: expected a non-empty string or an integer, got {rid!r:.40}", None
    rid = str(rid)

    def bad(what):
        return None, f"row {row} (id {rid}): {what}", rid

    p = raw.get("prompt")
    if p is None:
        return bad("prompt: missing")
    if isinstance(p, str):
        if not p:
            return bad("prompt: empty")
    elif isinstance(p, list):
        if not p:
            return bad("prompt: empty token list")
        if not all(_is_int(t) and t >= 0 for t in p):
            return bad("prompt: a token list must hold non-negative integers")
    else:
        return bad(f"prompt: expected text or a list of token ids, got {type(p).__name__}")
    mt = raw.get("max_tokens", default_max_tokens)
    mt = default_max_tokens if mt is None else mt
    if isinstance(mt, float) and mt.is_integer():
        mt = int(mt)  # Parquet/pandas may widen an int column with nulls to float
    if not _is_int(mt) or mt < 1:
        return bad(f"max_tokens: expected an integer >= 1, got {mt!r:.40}")
    temp = raw.get("temperature")
    temp = 0.0 if temp is None else temp
    if not isinstance(temp, (int, float)) or isinstance(temp, bool) or not math.isfinite(temp) or temp < 0:
        return bad(f"temperature: expected a number >= 0, got {temp!r:.40}")
    top_p = raw.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        return bad(f"top_p: expected a number in (0, 1], got {top_p!r:.40}")
    seed = raw.get("seed")
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if seed is not None and not _is_int(seed):
        return bad(f"seed: expected an integer, got {seed!r:.40}")
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        return bad(f"seed: expected an integer in [{SEED_MIN}, {SEED_MAX}], got {seed}")
    tenant = raw.get("tenant")
    if tenant is not None and not isinstance(tenant, str):
        return bad(f"tenant: expected a string, got {type(tenant).__name__}")
    return Item(rid, row, p, mt, float(temp), float(top_p), seed, tenant), None, rid


def read_rows(path: str):
    """Yield (row number, raw) in input order from a JSONL file or folder (raw: the line's bytes, decoded by
    parse_row, so an undecodable line is that row's error) or a Parquet file/folder (raw: a dict). A local JSONL
    file is streamed here; the rest through Ray Data."""
    if "://" not in path and os.path.isfile(path) and not _is_parquet(path):
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line
        return
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True   # row numbers mean something; results come back in order anyway
    ctx.enable_progress_bars = False              # our own progress lines are the ones to read
    kw = {}
    if "://" not in path:  # a file on this (the driver's) node: read it here, not on whichever node Ray picks
        from cluster import ray_compat
        kw["ray_remote_args"] = {"scheduling_strategy": ray_compat.pin_to_node(ray_compat.current_node_id())}
    if _is_parquet(path):
        for n, r in enumerate(ray.data.read_parquet(path, **kw).iter_rows(), 1):
            yield n, dict(r)
    else:  # whole files as bytes (read_text decodes a file at once: one bad byte failed all its rows)
        n = 0
        for r in ray.data.read_binary_files(path, **kw).iter_rows():
            data = r["bytes"]
            for line in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"):
                n += 1
                if line.strip():
                    yield n, line


def _is_parquet(path: str) -> bool:
    return path.rstrip("/").endswith((".parquet", ".pq"))


# -- output sinks -------------------------------------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JsonlSink:
    """OUT as one JSONL file: appended, flushed and fsync'ed per commit."""

    def __init__(self, path: str):
        self.path = path
        rows = []
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            good = data.rfind(b"\n") + 1            # a torn last line (crash mid-write) is not committed
            for line in data[:good].splitlines():
                if line.strip():
                    rows.append(json.loads(line))
            if good != len(data):
                _say(f"{path}: dropping a torn last line ({len(data) - good} bytes) left by an interrupted run")
        self.done = _done_ids(rows)
        if len(self.done) != len(rows) or (os.path.exists(path) and good != len(data)):
            # keep only the successful rows (first per id), atomically: failed ones are retried
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.done.values())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
        self._f = open(path, "a")

    def commit(self, rows: list[dict]) -> None:
        self._f.write("".join(json.dumps(r) + "\n" for r in rows))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class ParquetSink:
    """OUT as a folder of Parquet part files, each written under a temporary name and renamed into place."""

    def __init__(self, path: str):
        import pyarrow as pa
        import pyarrow.parquet as pq
        self.pa, self.pq, self.path = pa, pq, path
        self.schema = pa.schema([("id", pa.string()), ("row", pa.int64()), ("tenant", pa.string()),
                                 ("completion", pa.string()), ("token_ids", pa.list_(pa.int64())),
                                 ("tokens", pa.int64()), ("prompt_tokens", pa.int64()),
                                 ("finish_reason", pa.string()), ("latency_s", pa.float64()),
                                 ("ttft_s", pa.float64()), ("hits", pa.int64()), ("misses", pa.int64()),
                                 ("error", pa.string()), ("finished_at", pa.float64())])
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"--output {path}: a Parquet output is a folder of part files, and this is a file")
        os.makedirs(path, exist_ok=True)
        for t in glob.glob(os.path.join(path, "*.tmp")):
            os.remove(t)                              # a part that never got renamed was never committed
        parts = sorted(glob.glob(os.path.join(path, "part-*.parquet")))
        rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
        self.done = _done_ids(rows)
        self._seq = 0
        self._stamp = f"{int(time.time() * 1e3):x}-{os.getpid()}"
        if len(self.done) != len(rows):
            # rewrite the successful rows as one part, then drop the old parts; a crash in between leaves
            # duplicates of successful rows, which the next start dedups (first per id wins)
            self.commit(list(self.done.values()))
            for p in parts:
                os.remove(p)
            _fsync_dir(path)

    def commit(self, rows: list[dict]) -> None:
        if not rows:
            return
        self._seq += 1
        final = os.path.join(self.path, f"part-{self._stamp}-{self._seq:05d}.parquet")
        tmp = final + ".tmp"
        table = self.pa.Table.from_pylist([{k: r.get(k) for k in ROW_FIELDS} for r in rows], schema=self.schema)
        self.pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.path)

    def close(self) -> None:
        pass


def _done_ids(rows: list[dict]) -> dict[str, dict]:
    """id -> its first successful row."""
    done: dict[str, dict] = {}
    for r in rows:
        if r.get("error") is None and r.get("id") is not None and r["id"] not in done:
            done[r["id"]] = r
    return done


def open_sink(path: str):
    return ParquetSink(path) if _is_parquet(path) else JsonlSink(path)


class Committer:
    """Buffers finished rows and commits them every `every_rows` rows or `every_s` seconds. A timer thread commits
    what waits longer than every_s: rows done before a long request are not held until the next row finishes."""

    def __init__(self, sink, every_rows: int = 16, every_s: float = 2.0):
        self.sink, self.every_rows, self.every_s = sink, every_rows, every_s
        self.buf: list[dict] = []
        self.last = time.monotonic()
        self._lock = threading.Lock()             # buf and the sink: the caller's thread and the timer's
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._tick, name="batch-infer-commit", daemon=True)
        if 0 < every_s < math.inf:                # 0: every add commits anyway; inf: never by time
            self._timer.start()

    def add(self, row: dict) -> None:
        with self._lock:
            self.buf.append(row)
            due = len(self.buf) >= self.every_rows or time.monotonic() - self.last >= self.every_s
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if self.buf:
                self.sink.commit(self.buf)
                self.buf = []
            self.last = time.monotonic()

    def _tick(self) -> None:
        while not self._stop.wait(max(0.05, self.last + self.every_s - time.monotonic())):
            if time.monotonic() - self.last >= self.every_s:
                try:
                    self.flush()
                except Exception as e:  # noqa: BLE001 - the rows stay buffered; close() commits them or raises
                    self.last = time.monotonic()      # next try in every_s, not at once
                    _say(f"commit failed (retried later): {type(e).__name__}: {e}")

    def close(self) -> None:
        """Stop the timer and commit what is left (the caller's thread: a failure raises here)."""
        self._stop.set()
        if self._timer.is_alive():
            self._timer.join()
        self.flush()


# -- progress -----------------------------------------------------------------------------------------------------
@dataclass
class Progress:
    every_s: float = 5.0
    t0: float = field(default_factory=time.monotonic)
    rows: int = 0
    ok: int = 0
    failed: int = 0
    tokens: int = 0
    hits: int = 0
    misses: int = 0
    last: float = field(default_factory=time.monotonic)
    cluster_hm: object = None        # () -> (hits, misses) of the whole cluster so far, when it can say

    def add(self, row: dict) -> None:
        self.rows += 1
        if row["error"] is None:
            self.ok += 1
        else:
            self.failed += 1
        self.tokens += row["tokens"] or 0
        self.hits += row["hits"] or 0
        self.misses += row["misses"] or 0
        if time.monotonic() - self.last >= self.every_s:
            self.log()

    def line(self, hm: tuple[int, int] | None = None) -> str:
        dt = max(1e-9, time.monotonic() - self.t0)
        h, m = hm or (self.hits, self.misses)
        return (f"{self.rows} rows done ({self.ok} ok, {self.failed} failed), {self.tokens} tokens, "
                f"{self.tokens / dt:.1f} tokens/s, {self.rows / dt:.2f} rows/s, "
                f"expert-cache hit rate {h / max(1, h + m):.1%} ({h} hits, {m} misses)")

    def log(self) -> None:
        self.last = time.monotonic()
        _say(self.line(self.cluster_hm() if self.cluster_hm else None))


# -- stats timeline (jobs/report.py's schema) ------------------------------------------------------------------------
class StatsRecorder:
    """Samples the cluster's counters every interval_s from a background thread into the timeline schema of
    jobs/report.py: per-interval hits, misses, stall seconds and bytes per tier (the runtime's expert counters),
    and, with a PrefetchCoordinator, prefetches issued/used/wasted and the lookahead window."""

    def __init__(self, cluster, interval_s: float, label: str):
        import threading
        self.c, self.interval_s, self.label = cluster, interval_s, label
        self.timeline: list[dict] = []
        self.t0 = time.monotonic()
        self._prev = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batch-infer-stats", daemon=True)
        self._thread.start()

    def _read(self) -> dict:
        cnt = getattr(self.c.experts, "counters", None) or {}
        cur = {"hits": cnt.get("hits", 0), "misses": cnt.get("misses", 0), "stall_s": cnt.get("stall_s", 0.0),
               "bytes_by_tier": dict(cnt.get("bytes_by_tier", {}))}
        co = self.c.coordinator_stats(timeout_s=5.0) if getattr(self.c, "coordinator", None) is not None else None
        if co and isinstance(co.get("prefetches"), dict):
            pf = co["prefetches"]
            cur.update(prefetch_issued=pf.get("issued", 0), prefetch_used=pf.get("used", 0),
                       prefetch_wasted=pf.get("wasted", 0), window=co.get("window"))
        return cur

    def sample(self) -> None:
        cur, prev = self._read(), self._prev
        s = {"t": round(time.monotonic() - self.t0, 3)}
        for k in ("hits", "misses", "prefetch_issued", "prefetch_used", "prefetch_wasted"):
            if k in cur and k in prev:
                s[k] = max(0, cur[k] - prev[k])
        s["stall_s"] = round(max(0.0, cur["stall_s"] - prev["stall_s"]), 6)
        s["bytes_by_tier"] = {t: b - prev["bytes_by_tier"].get(t, 0) for t, b in cur["bytes_by_tier"].items()}
        if cur.get("window") is not None:
            s["window"] = cur["window"]
        self.timeline.append(s)
        self._prev = cur

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def close(self, path: str | None, report_dir: str | None) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        stats = {"schema": "moe-stats/1", "label": self.label, "interval_s": self.interval_s,
                 "timeline": self.timeline}
        if path:
            with open(path, "w") as f:
                json.dump(stats, f, indent=1)
        if report_dir:
            from jobs.report import render_report
            rep = render_report(stats, report_dir)
            _say(f"plots: {rep['files']['report']}" + (f" (absent: {', '.join(rep['absent'])})"
                                                       if rep["absent"] else ""))


# -- the run ------------------------------------------------------------------------------------------------------
def build_config(args):
    """ray_config.yaml, with the store given by --store (or, without it, the config's own tiers minus an
    embedded S3 server, which only lives inside jobs.demo) and Ray joined when running as a Ray job."""
    from cluster.config import EMBEDDED, load_config
    from jobs import generate
    if args.store:
        cfg = generate.build_config(args)
    else:
        cfg = load_config(args.config)
        keep = [t for t in cfg.tiers if not (t.kind == "s3" and t.endpoint_url == EMBEDDED)]
        if len(keep) != len(cfg.tiers):
            names = {t.name for t in keep}
            sets = {k: [n for n in v if n in names] for k, v in cfg.tier_sets.items()}
            cfg = cfg.model_validate({**cfg.model_dump(), "tiers": [t.model_dump() for t in keep],
                                      "tier_sets": {k: v for k, v in sets.items() if v}})
    # `ray job submit` runs this driver with RAY_ADDRESS set and the job's runtime_env (submitted from the config,
    # see --print-runtime-env) already in force: join that cluster, and pass no runtime_env of our own — Ray
    # refuses a driver runtime_env whose keys collide with the job's
    addr = os.environ.get("RAY_ADDRESS")
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    if addr or in_job:
        upd = {"num_cpus": None, "object_store_memory": None}   # only for starting a Ray, not for joining one
        if not cfg.ray.address:
            upd["address"] = addr or "auto"
        if in_job:
            upd["runtime_env"] = {}
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update=upd)})
    return cfg


def _result_row(res, item: Item, decode) -> dict:
    err = getattr(res, "error", None)
    ok = res.finish_reason != "error" and not err
    ids = list(res.token_ids) if ok else []
    return {"id": item.id, "row": item.row, "tenant": item.tenant,
            "completion": decode(ids) if ok and decode else None, "token_ids": ids, "tokens": len(ids),
            "prompt_tokens": res.prompt_tokens, "finish_reason": res.finish_reason if ok else None,
            "latency_s": round(res.latency_s, 6) if res.latency_s is not None else None,
            "ttft_s": round(res.ttft_s, 6) if getattr(res, "ttft_s", None) is not None else None,
            "hits": int(res.hits or 0), "misses": int(res.misses or 0),
            "error": None if ok else f"row {item.row} (id {item.id}): {err or 'generation failed'}",
            "finished_at": time.time()}


def _error_row(rid, row: int, tenant, error: str) -> dict:
    return {"id": rid, "row": row, "tenant": tenant, "completion": None, "token_ids": [], "tokens": 0,
            "prompt_tokens": None, "finish_reason": None, "latency_s": None, "ttft_s": None, "hits": 0,
            "misses": 0, "error": error, "finished_at": time.time()}


def _hm_since(c, base: tuple[int, int]) -> tuple[int, int]:
    """The runtime's own expert counters since base: no actor call, so progress lines cost nothing."""
    cnt = getattr(c.experts, "counters", None) or {}
    return cnt.get("hits", 0) - base[0], cnt.get("misses", 0) - base[1]


def run(args, cfg=None) -> dict:
    """The whole job (cfg: build_config(args), already checked by main); returns the summary."""
    import ray

    from cluster.engine import Engine, GenerationRequest
    from cluster.expert_cluster import ExpertCluster

    cfg = cfg or build_config(args)
    sink = open_sink(args.output)
    done = set(sink.done)
    if done:
        _say(f"{args.output}: {len(done)} ids already done; they are skipped")
    committer = Committer(sink, args.commit_rows, args.commit_s)
    prog = Progress(args.progress_s)
    seen: dict[str, int] = {}          # id -> row number of its first occurrence in this input
    duplicates: list[tuple[str, int, int]] = []
    skipped = 0
    errors: list[str] = []

    def emit(row: dict) -> None:
        committer.add(row)
        prog.add(row)
        if row["error"]:
            errors.append(row["error"])

    with ExpertCluster(cfg) as c:
        storage = next(iter(c.storage.values()))[0]
        tok_json = ray.get(storage.aux.remote("tokenizer.json"))
        tok = None
        if tok_json:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_str(tok_json.decode())
        base = c.stats()
        prog.t0 = prog.last = time.monotonic()   # rates from the first request on, not from cluster start
        base_hm = _hm_since(c, (0, 0))
        prog.cluster_hm = lambda: _hm_since(c, base_hm)
        engine = Engine(c.model, max_batch=args.max_batch, max_len=args.max_len)
        rec = StatsRecorder(c, args.stats_interval, f"batch_infer {os.path.basename(args.input)}, max_batch "
                            f"{args.max_batch}") if (args.stats or args.report) else None
        items: dict[str, Item] = {}
        t_start = time.monotonic()
        t_first_req = [None]             # when the first request reached the engine (input reading excluded)

        def requests():
            nonlocal skipped
            for n, raw in read_rows(args.input):
                item, err, rid = parse_row(raw, n, args.max_tokens)
                if rid is not None:
                    if rid in seen:
                        duplicates.append((rid, seen[rid], n))
                        _say(f"row {n}: id {rid} duplicates row {seen[rid]}; only the first is decoded")
                        continue
                    seen[rid] = n
                    if rid in done:
                        skipped += 1
                        continue
                if err is None and isinstance(item.prompt, str):
                    if tok is None:
                        err = (f"row {n} (id {rid}): prompt: the store has no tokenizer.json, so prompts must be "
                               f"lists of token ids")
                    else:
                        item.prompt = tok.encode(item.prompt).ids
                if err is not None:
                    emit(_error_row(rid, n, item.tenant if item else None, err))
                    continue
                req = GenerationRequest(id=rid, prompt_ids=list(item.prompt), max_tokens=item.max_tokens,
                                        temperature=item.temperature, top_p=item.top_p, seed=item.seed,
                                        tenant=item.tenant)
                items[rid] = item
                if t_first_req[0] is None:
                    t_first_req[0] = prog.t0 = time.monotonic()
                yield req

        decode = tok.decode if tok else None
        try:
            for res in engine.run(requests()):
                item = items.pop(res.id)
                emit(_result_row(res, item, decode))
        finally:
            committer.close()
            if rec is not None:
                rec.close(args.stats, args.report)
        t_end = time.monotonic()
        wall = t_end - t_start
        dec = t_end - (t_first_req[0] or t_end)
        prog.log()
        st = c.stats()
        prog.cluster_hm = None
    sink.close()
    summary = {"input": args.input, "output": args.output, "rows": prog.rows, "ok": prog.ok,
               "failed": prog.failed, "skipped_done": skipped, "duplicates": len(duplicates),
               "tokens": prog.tokens, "seconds": round(wall, 3), "decode_seconds": round(dec, 3),
               "rows_per_s": round(prog.ok / dec, 3) if dec else None,
               "tokens_per_s": round(prog.tokens / dec, 2) if dec else None, "hits": prog.hits, "misses": prog.misses,
               "cluster_hits": st["hits"] - base["hits"], "cluster_misses": st["misses"] - base["misses"],
               "hit_rate": round((st["hits"] - base["hits"]) /
                                 max(1, st["hits"] - base["hits"] + st["misses"] - base["misses"]), 4),
               "bytes_by_tier": st["bytes_by_tier"], "engine": engine.snapshot(),
               "max_batch": args.max_batch, "errors": errors[:20],
               "duplicate_ids": [{"id": d[0], "first_row": d[1], "row": d[2]} for d in duplicates[:20]]}
    return summary


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM (`ray job stop`) raises SystemExit like Ctrl-C's KeyboardInterrupt, so run()'s finally blocks commit
    the buffered rows and write --stats/--report; the handler from before is back afterwards. (ray.init, when the
    cluster starts, swaps in a sys.exit handler of its own: the same effect, and it is undone here too.)"""
    if threading.current_thread() is not threading.main_thread():   # signal.signal works only there
        yield
        return

    def term(signum, frame):
        raise SystemExit(128 + signum)
    prev = signal.signal(signal.SIGTERM, term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.batch_infer", description=__doc__.split("\n\n")[1])
    ap.add_argument("--config", default="ray_config.yaml")
    ap.add_argument("--input", help="JSONL file, or Parquet file/folder (*.parquet); local or s3://...")
    ap.add_argument("--output", help="*.jsonl file, or *.parquet folder of part files")
    ap.add_argument("--store", default=None, help="file:///path or s3://bucket/prefix (default: the config's tiers)")
    ap.add_argument("--endpoint-url", default=None, help="S3 endpoint for --store s3://...")
    ap.add_argument("--max-batch", type=int, default=8, help="requests decoded together (continuous batching)")
    ap.add_argument("--max-tokens", type=at_least(1), default=64, help="for rows that do not say")
    ap.add_argument("--max-len", type=at_least(1), default=None, help="context per request (default: the model's)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--hbm-budget", default=None, help="per worker, e.g. 8MiB (default: ray_config.yaml)")
    ap.add_argument("--commit-rows", type=int, default=16, help="commit output every this many rows ...")
    ap.add_argument("--commit-s", type=float, default=2.0, help="... or this many seconds")
    ap.add_argument("--progress-s", type=float, default=5.0, help="seconds between progress lines")
    ap.add_argument("--json", default=None, help="write the summary here too")
    ap.add_argument("--stats", default=None, help="write a stats timeline (jobs/report.py schema) here")
    ap.add_argument("--stats-interval", type=float, default=1.0, help="seconds per stats sample")
    ap.add_argument("--report", default=None, help="draw the stats as PNGs into this folder (jobs.report)")
    ap.add_argument("--print-runtime-env", action="store_true",
                    help="print ray_config.yaml's ray.runtime_env as JSON (for ray job submit) and exit")
    return ap


def main(argv=None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    from cluster.config import ConfigError, load_config
    if args.print_runtime_env:
        try:
            print(json.dumps(load_config(args.config).ray.runtime_env))
        except ConfigError as e:
            print(f"batch_infer: error: {e}", file=sys.stderr)
            return 2
        return 0
    if not args.input or not args.output:
        ap.error("--input and --output are required")
    if "://" not in args.input and not os.path.exists(args.input):
        print(f"batch_infer: error: --input {args.input}: no such file or folder", file=sys.stderr)
        return 2
    if args.max_batch < 1:
        ap.error("--max-batch must be >= 1")
    from jobs.generate import check_store
    from storage_adapters.errors import StoreError
    try:  # the config and the store's manifest, before Ray starts: a wrong --store is one line, not a traceback
        cfg = build_config(args)
        check_store(cfg)
    except (ConfigError, StoreError) as e:
        print(f"batch_infer: error: {e}", file=sys.stderr)
        return 2
    try:
        with _sigterm_exits():
            summary = run(args, cfg)
    except (ConfigError, ValueError) as e:
        print(f"batch_infer: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    bad = summary["failed"] + summary["duplicates"]
    if bad:
        _say(f"FAILED: {summary['failed']} rows failed, {summary['duplicates']} duplicate ids "
             f"(of {summary['rows']} rows; {summary['ok']} ok). First errors:")
        for e in summary["errors"][:5]:
            _say(f"  {e}")
        for d in summary["duplicate_ids"][:5]:
            _say(f"  row {d['row']}: id {d['id']} duplicates row {d['first_row']}")
        return 1
    _say(f"done: {summary['ok']} rows ok, {summary['skipped_done']} already done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
