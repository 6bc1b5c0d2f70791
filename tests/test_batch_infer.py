"""`python -m jobs.batch_infer` as users run it: submitted with `ray.job_submission.JobSubmissionClient` to a local
Ray cluster (dashboard/job server on 127.0.0.1), over a tiny store built here. Its greedy tokens must equal the
runtime's in-process reference (cluster.model.generate over LocalExperts on the same checkpoint); a re-run skips
what is done without recomputing it; bad rows get error rows and a non-zero exit while the others are right.
The jobs read Parquet and JSONL and write a Parquet folder; the JSONL sink, the row parser and the config a job
driver uses are checked without Ray."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_store
from storage_adapters.local_s3 import free_port
from jobs.batch_infer import Committer, JsonlSink, ParquetSink, make_parser, parse_row, read_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# token-id prompts (the tiny store has no tokenizer): varied lengths and budgets, so requests finish at different
# steps and waiting ones join the batch (--max-batch 2 < number of prompts)
PROMPTS = {"a": ([5, 6, 7, 8], 9), "b": ([9, 10], 4), "c": ([11, 12, 13, 14, 15, 16, 17], 12), "d": ([3], 6),
           "e": ([20, 21, 22], 3), "f": ([30, 31, 32, 33, 34], 7), "g": ([40, 41], 10)}


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    ckpt, _ = tiny_store(d, f"file://{d}/store", seed=5)
    from cluster.model import LocalExperts, MoEModel, generate, load_checkpoint
    config, dense, experts = load_checkpoint(ckpt)
    model = MoEModel.from_dense(config, dense, LocalExperts(experts))
    ref = {k: generate(model, [p], n)[0] for k, (p, n) in PROMPTS.items()}   # each prompt alone, greedy
    return f"file://{d}/store", d, ref, model.args.vocab_size


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray head with its job server, every port on 127.0.0.1 chosen free (other Ray clusters may run on
    this machine: the default agent port 52365 may be taken), started as `ray start --head --block` and stopped
    by terminating that process group."""
    from ray.job_submission import JobSubmissionClient
    gcs, dash, agent, agent_grpc, metrics, renv, client_port = (free_port() for _ in range(7))
    log = tmp_path_factory.mktemp("ray") / "ray_start.log"
    # token auth off for this loopback-only test cluster (a token in ~/.ray would otherwise be demanded)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={renv}", f"--ray-client-server-port={client_port}", "--num-cpus=4",
         f"--object-store-memory={256 << 20}", "--disable-usage-stats"],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client, deadline = None, time.monotonic() + 120
        while client is None:
            assert proc.poll() is None, f"ray start exited {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"job server on 127.0.0.1:{dash} never answered"
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        while True:  # the node's job agent registers a little after the job server answers
            try:
                client.submit_job(entrypoint="true")
                break
            except RuntimeError as e:
                assert "No available agent" in str(e) and time.monotonic() < deadline, str(e)
                time.sleep(0.5)
        yield client
    finally:
        # the head's own process group (start_new_session: exactly what this fixture started): SIGTERM, and
        # SIGKILL for what lingers — `ray start --block` alone takes ~30 s to wind its processes down one by one
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


pytestmark = pytest.mark.ray


def _submit(client, args, d):
    """Submit like `ray job submit --working-dir . -- python -m jobs.batch_infer ...` with ray_config.yaml's
    runtime_env; wait for the end. Returns (status, logs)."""
    from cluster.config import load_config
    from ray.job_submission import JobStatus
    renv = load_config(os.path.join(ROOT, "ray_config.yaml")).ray.runtime_env
    env_vars = {**renv.get("env_vars", {}), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m jobs.batch_infer --config ray_config.yaml " + " ".join(args),
        runtime_env={**renv, "env_vars": env_vars, "working_dir": ROOT,
                     "excludes": ["jobs/embedded_model", "tests", "docs"]})
    deadline = time.monotonic() + 240
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job} still {status} after 240 s:\n{client.get_job_logs(job)[-3000:]}"
        time.sleep(0.5)
    return status, client.get_job_logs(job), client.get_job_info(job)


def test_job_matches_reference_resumes_and_reports_bad_rows(store, ray_cluster):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from jobs.report import validate
    from ray.job_submission import JobStatus
    uri, d, ref, vocab = store
    common = ["--store", uri, "--workers", "1", "--hbm-budget", "256KiB", "--max-batch", "2", "--progress-s", "0"]
    out = d / "out.parquet"                       # a folder of part files, shared by both runs

    # 1. five good prompts from Parquet (prompt as a list column): the job succeeds and every completion is the
    #    in-process reference, token for token
    keys = list("abcde")
    pq.write_table(pa.table({"id": keys, "prompt": [PROMPTS[k][0] for k in keys],
                             "max_tokens": [PROMPTS[k][1] for k in keys],
                             "tenant": ["t1", None, "t2", None, "t1"]}), d / "in1.parquet")
    status, logs, info = _submit(ray_cluster, common + [
        "--input", str(d / "in1.parquet"), "--output", str(out), "--json", str(d / "s1.json"),
        "--stats", str(d / "stats.json"), "--stats-interval", "0.2"], d)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    rows1 = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in rows1) == keys
    for r in rows1:
        assert r["error"] is None and r["token_ids"] == ref[r["id"]], (r["id"], r["token_ids"], ref[r["id"]])
        assert r["tokens"] == len(ref[r["id"]]) and r["prompt_tokens"] == len(PROMPTS[r["id"]][0])
        assert r["finish_reason"] in ("eos", "length") and r["latency_s"] > 0
    assert {r["id"]: r["tenant"] for r in rows1} == dict(zip(keys, ["t1", None, "t2", None, "t1"]))
    s1 = json.loads((d / "s1.json").read_text())
    assert s1["ok"] == 5 and s1["failed"] == 0 and s1["tokens"] == sum(len(ref[k]) for k in keys)
    assert s1["cluster_misses"] > 0 and 0 <= s1["hit_rate"] <= 1
    assert s1["engine"]["max_requests_in_step"] == 2 and s1["engine"]["steps_with_several"] > 0   # batched
    assert "rows done" in logs and "tokens/s" in logs and "hit rate" in logs       # progress lines
    # the stats timeline follows jobs/report.py's schema and adds up to the run's cache counts
    stats = validate(json.loads((d / "stats.json").read_text()))
    assert len(stats["timeline"]) >= 2
    assert (stats["totals"]["hits"], stats["totals"]["misses"]) == (s1["cluster_hits"], s1["cluster_misses"])

    # 2. JSONL: the same five, two new ones, bad rows and a duplicate id, into the same output: the five are
    #    skipped (not recomputed), the new ones are right, each bad row gets an error row naming what is wrong,
    #    and the job exits non-zero
    inp2 = d / "in2.jsonl"
    _write_jsonl(inp2, [{"id": k, "prompt": PROMPTS[k][0], "max_tokens": PROMPTS[k][1]} for k in "abcdefg"] + [
        {"id": "no-prompt"},
        {"id": "text", "prompt": "hello"},                       # the tiny store has no tokenizer
        {"id": "bad-max", "prompt": [1, 2], "max_tokens": "x"},
        {"id": "oov", "prompt": [1, vocab + 3]},                  # refused by the engine, not by the reader
        "{not json",
        {"id": "f", "prompt": [1]},                               # duplicate of f
    ])
    status, logs, info = _submit(ray_cluster, common + ["--input", str(inp2), "--output", str(out),
                                                        "--json", str(d / "s2.json")], d)
    assert status == JobStatus.FAILED, logs[-3000:]
    rows2 = pq.read_table(out).to_pylist()
    by_id = {}
    for r in rows2:
        by_id.setdefault(r["id"], []).append(r)
    for k in keys:  # identical rows, finish time included: not recomputed
        assert by_id[k] == [r for r in rows1 if r["id"] == k], k
    for k in "fg":
        [r] = by_id[k]
        assert r["error"] is None and r["token_ids"] == ref[k], (k, r["token_ids"], ref[k])
    errs = {k: by_id[k][0]["error"] for k in ("no-prompt", "text", "bad-max", "oov")}
    assert "prompt: missing" in errs["no-prompt"]
    assert "no tokenizer.json" in errs["text"]
    assert "max_tokens: expected an integer" in errs["bad-max"]
    assert "prompt_ids" in errs["oov"] and "outside the vocabulary" in errs["oov"]
    assert any(r["id"] is None and "not valid JSON" in r["error"] and r["row"] == 12 for r in rows2)
    assert len(rows2) == 7 + 5   # one row per input row; the duplicate gets none
    s2 = json.loads((d / "s2.json").read_text())
    assert (s2["skipped_done"], s2["ok"], s2["failed"], s2["duplicates"]) == (5, 2, 5, 1)
    assert s2["duplicate_ids"] == [{"id": "f", "first_row": 6, "row": 13}]
    assert "5 ids already done" in logs and "FAILED: 5 rows failed, 1 duplicate ids" in logs


# -- no Ray below ------------------------------------------------------------------------------------------------
def test_jsonl_sink_recovers_a_torn_line_and_retries_failed_rows(tmp_path):
    p = tmp_path / "o.jsonl"
    good = {"id": "a", "error": None, "token_ids": [1]}
    bad = {"id": "b", "error": "row 2 (id b): prompt: missing"}
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n" + '{"id": "c", "err')   # crash mid-write
    s = JsonlSink(str(p))
    assert set(s.done) == {"a"}
    assert _read_jsonl(p) == [good]            # torn line and failed row gone, atomically
    s.commit([{"id": "c", "error": None}])
    s.close()
    assert [r["id"] for r in _read_jsonl(p)] == ["a", "c"]
    assert not os.path.exists(str(p) + ".tmp")


def test_parquet_sink_ignores_uncommitted_parts_and_compacts(tmp_path):
    import pyarrow.parquet as pq
    out = tmp_path / "o.parquet"
    s = ParquetSink(str(out))
    s.commit([{"id": "a", "row": 1, "error": None, "token_ids": [1, 2]},
              {"id": "b", "row": 2, "error": "row 2 (id b): prompt: missing", "token_ids": []}])
    (out / "part-x.parquet.tmp").write_bytes(b"half a file")                           # never renamed
    s2 = ParquetSink(str(out))
    assert set(s2.done) == {"a"}
    parts = sorted(os.listdir(out))
    assert len(parts) == 1 and parts[0].endswith(".parquet")                           # compacted, tmp dropped
    assert pq.read_table(out / parts[0]).to_pylist()[0]["token_ids"] == [1, 2]


@pytest.mark.parametrize("raw, err", [
    ('{"id": "x", "prompt": [1, 2]}', None),
    ('{"id": 7, "prompt": "text", "max_tokens": 3, "temperature": 0.5, "seed": 1, "tenant": "t"}', None),
    ('[1, 2]', "row 4: expected a JSON object"),
    ('{"prompt": [1]}', "row 4: id: missing"),
    ('{"id": true, "prompt": [1]}', "row 4: id: expected a non-empty string or an integer"),
    ('{"id": "x", "prompt": []}', "row 4 (id x): prompt: empty token list"),
    ('{"id": "x", "prompt": [1, -2]}', "row 4 (id x): prompt: a token list must hold non-negative integers"),
    ('{"id": "x", "prompt": 5}', "row 4 (id x): prompt: expected text or a list of token ids, got int"),
    ('{"id": "x", "prompt": [1], "max_tokens": 0}', "row 4 (id x): max_tokens: expected an integer >= 1"),
    ('{"id": "x", "prompt": [1], "temperature": -1}', "row 4 (id x): temperature: expected a number >= 0"),
    ('{"id": "x", "prompt": [1], "top_p": 0}', "row 4 (id x): top_p: expected a number in (0, 1]"),
    ('{"id": "x", "prompt": [1], "tenant": 3}', "row 4 (id x): tenant: expected a string, got int"),
    # torch.Generator.manual_seed raises ValueError beyond [-2**63, 2**64): it failed the whole job
    ('{"id": "x", "prompt": [1], "seed": 18446744073709551616}', "row 4 (id x): seed: expected an integer in ["),
    ('{"id": "x", "prompt": [1], "seed": -9223372036854775809}', "row 4 (id x): seed: expected an integer in ["),
])
def test_parse_row(raw, err):
    item, got, rid = parse_row(raw, 4, 16)
    if err is None:
        assert got is None and item.id == json.loads(raw)["id"].__str__() and item.max_tokens in (16, 3)
    else:
        assert item is None and got.startswith(err), got


def test_config_inside_a_ray_job_joins_and_defers_to_the_jobs_runtime_env(monkeypatch):
    """A job driver must join the job's cluster and pass no runtime_env: Ray refuses a driver runtime_env whose
    keys collide with the job's (submitted from the same config)."""
    from types import SimpleNamespace
    from jobs.batch_infer import build_config
    args = SimpleNamespace(store=None, config=os.path.join(ROOT, "cluster/deploy/ray_config.cluster.yaml"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert build_config(args).ray.runtime_env["env_vars"]          # outside a job: the config's own
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    r = build_config(args).ray
    assert (r.address, r.runtime_env, r.num_cpus, r.object_store_memory) == ("auto", {}, None, None)
    args.config = os.path.join(ROOT, "ray_config.yaml")            # address null: join the job's cluster
    r = build_config(args).ray
    assert (r.address, r.runtime_env, r.object_store_memory) == ("127.0.0.1:6379", {}, None)
    # embedded S3 tiers exist only inside jobs.demo: dropped, the NVMe store stays
    cfg = build_config(args)
    assert [t.kind for t in cfg.tiers] == ["dram", "nvme"] and "s3" not in cfg.tier_sets.get("default", [])


def test_an_undecodable_line_costs_only_its_row(tmp_path):
    """One line of invalid UTF-8 (a Latin-1 byte) used to fail the decoding of the whole file: exit 2, no row."""
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a", "prompt": [1, 2]}\n'
                  b'{"id": "caf\xe9", "prompt": "x"}\n'       # Latin-1, not UTF-8
                  b'\n'
                  b'{"id": "b", "prompt": "\xc3\xa9t\xc3\xa9"}\n')  # UTF-8 text
    got = [(n, *parse_row(raw, n, 8)) for n, raw in read_rows(str(p))]
    assert [n for n, *_ in got] == [1, 2, 4]                      # row numbers are line numbers
    (_, a, err_a, _), (_, bad, err, rid), (_, b, err_b, _) = got
    assert err_a is None and a.prompt == [1, 2] and err_b is None and b.prompt == "\u00e9t\u00e9"
    assert bad is None and rid is None and err == "row 2: not valid UTF-8: byte 0xe9 at offset 11: invalid " \
        "continuation byte", err


def test_committer_commits_on_time_while_no_row_arrives():
    """Rows finished before a long request are committed --commit-s after, not when the next row finishes."""
    class Sink:
        commits = []

        def commit(self, rows):
            self.commits.append(list(rows))
    sink = Sink()
    c = Committer(sink, every_rows=100, every_s=0.2)
    c.add({"id": "a"})
    deadline = time.monotonic() + 5
    while not sink.commits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.commits == [[{"id": "a"}]]
    c.add({"id": "b"})
    c.close()                                                     # the rest, at once
    assert sink.commits == [[{"id": "a"}], [{"id": "b"}]]


@pytest.mark.parametrize("flag", ["--max-len", "--max-tokens"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_lengths_must_be_positive(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        make_parser().parse_args(["--input", "i.jsonl", "--output", "o.jsonl", flag, value])
    assert e.value.code == 2 and f"argument {flag}: must be >= 1, got {value}" in capsys.readouterr().err


def test_a_wrong_store_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    import cluster.expert_cluster
    from jobs.batch_infer import main

    def no_ray(*a, **k):
        raise AssertionError("the cluster (and Ray) started for a store that does not exist")
    monkeypatch.setattr(cluster.expert_cluster, "ExpertCluster", no_ray)
    inp = tmp_path / "in.jsonl"
    _write_jsonl(inp, [{"id": "a", "prompt": [1]}])
    rc = main(["--config", os.path.join(ROOT, "ray_config.yaml"), "--store", f"file://{tmp_path}/nope",
               "--input", str(inp), "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("batch_infer: error: no usable manifest: nvme (file://") and "nope" in err, err
    assert not (tmp_path / "out.jsonl").exists()


def test_sigterm_ends_the_run_through_its_finally_blocks(store, tmp_path, monkeypatch):
    """`ray job stop` sends SIGTERM: it must unwind run() (which commits buffered rows and writes --stats) instead
    of killing the process; the handler before main is back afterwards."""
    import jobs.batch_infer as bi
    uri = store[0]
    unwound = []

    def fake_run(args, cfg):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)                                        # a long step the signal interrupts
        finally:
            unwound.append(cfg.storage_tiers[0].path)
        return {}
    monkeypatch.setattr(bi, "run", fake_run)
    heard = []
    prev = signal.signal(signal.SIGTERM, lambda *a: heard.append(a[0]))   # stands in for the default: no exit
    try:
        inp = tmp_path / "in.jsonl"
        _write_jsonl(inp, [{"id": "a", "prompt": [1]}])
        with pytest.raises(SystemExit) as e:
            bi.main(["--config", os.path.join(ROOT, "ray_config.yaml"), "--store", uri, "--input", str(inp),
                     "--output", str(tmp_path / "out.jsonl")])
        assert e.value.code == 128 + signal.SIGTERM and unwound and not heard
        os.kill(os.getpid(), signal.SIGTERM)                      # the previous handler again
        assert heard == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, prev)
