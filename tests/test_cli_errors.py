"""Command-line input checks of the jobs: a bad flag, a missing or malformed file, a policy or predictor that is not
one fails up front with exit 2 and one line `prog: error: ...` that names the flag and the value (or the file),
before any expensive work. No test starts Ray: in-process runs replace what would start it (or build a store) with
a failure, so a check that regresses fails its test instead of running a job."""
import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_store
from policies.traces import synthetic_trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(REPO, "jobs", "embedded_model")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    synthetic_trace(60, 3, 8, 1, num_requests=3, seed=1).save_npz(d / "t.npz")                  # 3 x 8, top-1
    synthetic_trace(60, 3, 8, 2, num_requests=3, seed=1, hidden_dim=16).save_npz(d / "th.npz")  # with hidden states
    synthetic_trace(120, 4, 16, 2, num_requests=4, seed=1).save_npz(d / "e4.npz")               # the embedded model's
    (d / "bad.npz").write_text("not an npz")
    (d / "a_dir").mkdir()
    return d


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def exits_2(capsys, fn, argv) -> str:
    """fn(argv) must stop with a parser error (exit 2); its one-line message."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    msg = last_error(capsys)
    assert ": error: " in msg
    return msg


# -- jobs.convert (subprocess: without its check, --max-inflight 0 hangs) -----------------------------------------
def convert_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "jobs.convert", "--checkpoint", EMBEDDED, "--quiet", *args],
                          capture_output=True, text=True, timeout=60, cwd=cwd, env={**os.environ, "PYTHONPATH": REPO})


@pytest.mark.parametrize("n", ["0", "-1"])
def test_convert_max_inflight_must_be_positive(tmp_path, n):
    r = convert_cli("--store", f"file://{tmp_path}/store", "--max-inflight", n)
    assert r.returncode == 2, r.stderr
    assert f"argument --max-inflight: must be >= 1, got {n}" in r.stderr
    assert not (tmp_path / "store").exists()


def test_convert_refuses_a_relative_file_uri(tmp_path):
    # run in tmp_path: without the check the store would be written to tmp_path/rel/store
    r = convert_cli("--store", "file://rel/store", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "--store 'file://rel/store': a file:// URI needs an absolute path" in r.stderr
    assert not (tmp_path / "rel").exists() and r.stdout == ""


# -- jobs.benchmark -----------------------------------------------------------------------------------------------
@pytest.fixture()
def bench(files, monkeypatch):
    """jobs.benchmark's main with the store building and the run (Ray) replaced by failures."""
    import jobs.benchmark as B

    def must_not_run(*a, **k):
        raise AssertionError("the benchmark got past its checks (it would build a store or start Ray)")
    for f in ("build_store", "model_store", "_run_all"):
        monkeypatch.setattr(B, f, must_not_run)

    def run(*args, trace=str(files / "t.npz")):
        return B.main(["policies", "--trace", trace, "--work", str(files / "work"), "--json", str(files / "o.json"),
                       *args])
    return run


def test_benchmark_unknown_policy(bench, capsys):
    msg = exits_2(capsys, lambda a: bench(*a), ["--policies", "on_demand,cross_layr"])
    assert "--policies on_demand,cross_layr: unknown policy 'cross_layr'; valid: on_demand" in msg


def test_benchmark_bad_suffix(bench, capsys):
    msg = exits_2(capsys, lambda a: bench(*a), ["--policies", "cross_layer+fifo"])
    assert "policy 'cross_layer+fifo': the suffix after '+' must be" in msg


def test_benchmark_policy_names_as_run_policy_reads_them():
    from jobs.benchmark import policy_error
    for ok in ("on_demand", "slru", "oracle", "resident", "fast_path", "cross_layer", "learned", "ensemble",
               "topk_frequency+reuse", "on_demand+reuse_fast", "cross_layer+lru", "fast_path+reuse"):
        assert policy_error(ok) is None, ok
    for bad in ("foo", "", "slru2+reuse", "on_demand+reuse+lru", "cross_layer+fast"):
        assert policy_error(bad), bad


@pytest.mark.parametrize("flag", ["--tokens", "--layers", "--requests", "--workers", "--batch", "--window",
                                  "--repeat", "--prefetch-concurrency"])
def test_benchmark_counts_must_be_positive(bench, capsys, flag):
    # 0 used to mean the default for --tokens / --layers / --requests (`a.tokens or ...`)
    msg = exits_2(capsys, lambda a: bench(*a), [flag, "0"])
    assert msg.endswith(f"argument {flag}: must be >= 1, got 0")


@pytest.mark.parametrize("flag,value", [("--cache-fraction", "2"), ("--cache-fraction", "0"),
                                        ("--threshold", "0"), ("--threshold", "1.5")])
def test_benchmark_fractions(bench, capsys, flag, value):
    msg = exits_2(capsys, lambda a: bench(*a), [flag, value])
    assert msg.endswith(f"argument {flag}: must be in (0, 1], got {value}")


@pytest.mark.parametrize("value,want", [("full,2", "must be in [0, 1], got 2"),
                                        ("0.5,half", "expected a number in [0, 1], got 'half'")])
def test_benchmark_prefetch_ratio(bench, capsys, value, want):
    # parsed only after Ray had started before
    assert exits_2(capsys, lambda a: bench(*a), ["--prefetch-ratio", value]).endswith(
        f"argument --prefetch-ratio: {want}")


def test_benchmark_json_is_a_directory(bench, files, capsys):
    msg = exits_2(capsys, lambda a: bench(*a), ["--json", str(files / "a_dir")])
    assert f"--json {files / 'a_dir'}: is a directory" in msg


def test_benchmark_json_under_a_file(bench, files, capsys):
    msg = exits_2(capsys, lambda a: bench(*a), ["--json", str(files / "t.npz" / "o.json")])
    assert f"{files / 't.npz'} is not a directory" in msg


def test_benchmark_missing_and_malformed_trace(bench, files, capsys):
    msg = exits_2(capsys, lambda a: bench(trace=a), str(files / "nope.npz"))
    assert msg.endswith(f"--trace {files / 'nope.npz'}: no such file")
    msg = exits_2(capsys, lambda a: bench(trace=a), str(files / "bad.npz"))
    assert f"--trace: {files / 'bad.npz'}: not a readable npz file" in msg


def test_benchmark_model_dir_of_another_geometry(bench, capsys):
    msg = exits_2(capsys, lambda a: bench(*a), ["--model-dir", EMBEDDED])
    assert "the model has 4 MoE layers x 16 experts" in msg and "has 3 x 8" in msg


def fake_predictor(d, L, E, K):
    """What the up-front check reads: predictor.json's format and geometry (LearnedPredictor.save writes it)."""
    d.mkdir(exist_ok=True)
    (d / "predictor.json").write_text(json.dumps({"format": "learned-expert-predictor", "version": 1,
                                                  "num_layers": L, "num_experts": E, "top_k": K}))
    (d / "predictor.safetensors").write_bytes(b"")
    return d


def test_benchmark_predictor_dir_of_another_geometry(bench, tmp_path, capsys):
    d = fake_predictor(tmp_path / "pred", 4, 16, 2)
    msg = exits_2(capsys, lambda a: bench(*a), ["--predictor-dir", str(d)])
    assert f"--predictor-dir {d}: the predictor is for L=4 E=16 K=2" in msg and "is L=3 E=8 K=1" in msg
    # --layers cuts the replay: the predictor must match the cut
    msg = exits_2(capsys, lambda a: bench(*a), ["--predictor-dir", str(fake_predictor(d, 3, 8, 1)), "--layers", "2"])
    assert "the predictor is for L=3 E=8 K=1" in msg and "cut to 2 layers" in msg and "is L=2 E=8 K=1" in msg


def test_benchmark_predictor_dir_without_predictor(bench, tmp_path, capsys):
    msg = exits_2(capsys, lambda a: bench(*a), ["--predictor-dir", str(tmp_path)])
    assert f"--predictor-dir {tmp_path}: no predictor.json or predictor.safetensors" in msg


def test_benchmark_predictor_dir_that_matches_passes_the_check(files):
    from jobs.benchmark import predictor_dir_error
    assert predictor_dir_error(str(fake_predictor(files / "pred_ok", 3, 8, 1)), (3, 8, 1)) is None


def test_benchmark_exits_1_when_every_policy_failed(files, tmp_path, monkeypatch, capsys):
    """Every run recorded as {"error": ...}: the JSON is written and the exit status is 1. Ray is not started:
    ray.init is a no-op and each policy run fails at once (the store is built: a tiny one)."""
    import ray

    import jobs.benchmark as B

    def fail(policy, *a, **k):
        raise RuntimeError(f"{policy} cannot run here")
    monkeypatch.setattr(B, "run_policy", fail)
    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: None)
    out = tmp_path / "o.json"
    rc = B.main(["policies", "--trace", str(files / "t.npz"), "--expert-mib", "0.01", "--policies",
                 "on_demand,cross_layer", "--workers", "1", "--batch", "1", "--work", str(tmp_path / "work"),
                 "--json", str(out)])
    assert rc == 1
    res = json.loads(out.read_text())["policies"]
    assert set(res) == {"on_demand", "cross_layer"} and all("error" in m for m in res.values())
    assert "benchmark: error: every policy run failed (on_demand, cross_layer)" in capsys.readouterr().err


# -- jobs.eval_predictors -----------------------------------------------------------------------------------------
def eval_main(files, *args):
    from jobs.eval_predictors import main
    return main(["--trace", str(files / "t.npz"), "--json", str(files / "e.json"), *args])


def test_eval_next_gate_without_hidden_states(files, capsys):
    msg = exits_2(capsys, lambda a: eval_main(files, *a), ["--predictors", "cross_layer,next_gate"])
    assert "next_gate cannot run: the trace has no hidden states" in msg and "needs --model-dir" in msg


def test_eval_learned_without_a_trained_predictor(files, capsys):
    msg = exits_2(capsys, lambda a: eval_main(files, *a),
                  ["--trace", str(files / "th.npz"), "--predictors", "learned", "--store-dir", str(files / "a_dir")])
    assert f"learned cannot run: --store-dir {files / 'a_dir'} has no predictor.safetensors" in msg


def test_eval_flags(files, capsys):
    assert exits_2(capsys, lambda a: eval_main(files, *a), ["--max-tokens", "0"]).endswith(
        "argument --max-tokens: must be >= 1, got 0")
    assert "is a directory" in exits_2(capsys, lambda a: eval_main(files, *a), ["--json", str(files / "a_dir")])
    assert f"--model-dir {files}: no config.json" in exits_2(capsys, lambda a: eval_main(files, *a),
                                                             ["--model-dir", str(files)])
    assert f"--trace {files / 'nope.npz'}: no such file" in exits_2(
        capsys, lambda a: eval_main(files, *a), ["--trace", str(files / "nope.npz")])
    for bad, want in (("1,x", "expected an integer >= 1, got 'x'"), ("0", "must be >= 1, got 0"),
                      ("1,", "expected a comma list of integers >= 1, got '1,'")):
        assert exits_2(capsys, lambda a: eval_main(files, *a), ["--distances", bad]).endswith(
            f"argument --distances: {want}")


def test_eval_runs_what_was_asked(files):
    assert eval_main(files, "--predictors", "cross_layer,oracle", "--distances", "1") == 0
    assert set(json.loads((files / "e.json").read_text())["predictors"]) == {"cross_layer", "oracle"}


# -- jobs.simulate ------------------------------------------------------------------------------------------------
def sim_main(files, *args):
    from jobs.simulate import main
    return main(["--model", "embedded", "--trace", str(files / "e4.npz"), "--tokens", "60",
                 "--json", str(files / "sim" / "s.json"), *args])


def test_simulate_unknown_policy(files, capsys):
    msg = exits_2(capsys, lambda a: sim_main(files, *a), ["--policy", "cross_layer,foo"])
    assert "--policy cross_layer,foo: unknown 'foo'; valid: all or on_demand" in msg


def test_simulate_unknown_scale_policy(files, capsys):
    msg = exits_2(capsys, lambda a: sim_main(files, *a), ["--scale-policies", "on_demand,cross_layr"])
    assert "--scale-policies on_demand,cross_layr: unknown 'cross_layr'; valid: on_demand" in msg


def test_simulate_a_real_name_that_does_not_apply_stays_unavailable(files):
    assert sim_main(files, "--policy", "cross_layer,next_gate") == 0   # no hidden states: next_gate unavailable
    res = json.loads((files / "sim" / "s.json").read_text())["policies"]
    assert "unavailable" in res["next_gate"] and "tokens_per_s" in res["cross_layer"]


@pytest.mark.parametrize("flag,value,want", [
    ("--cache-fraction", "0", "must be in (0, 1], got 0"), ("--cache-fraction", "1.5", "must be in (0, 1], got 1.5"),
    ("--workers", "0", "must be >= 1, got 0"), ("--batch", "0", "must be >= 1, got 0"),
    ("--dram-fraction", "-0.1", "must be in [0, 1], got -0.1"), ("--dram-fraction", "2", "must be in [0, 1], got 2"),
    ("--tokens", "0", "must be >= 1, got 0"), ("--window", "0", "must be > 0, got 0")])
def test_simulate_numeric_flags(files, capsys, flag, value, want):
    assert exits_2(capsys, lambda a: sim_main(files, *a), [flag, value]).endswith(f"argument {flag}: {want}")


def test_simulate_trace_and_calib_files(files, capsys):
    msg = exits_2(capsys, lambda a: sim_main(files, *a), ["--trace", str(files / "bad.npz")])
    assert f"--trace: {files / 'bad.npz'}: not a readable npz file" in msg
    msg = exits_2(capsys, lambda a: sim_main(files, *a), ["--trace", str(files / "nope.npz")])
    assert msg.endswith(f"--trace {files / 'nope.npz'}: no such file")
    (files / "calib.json").write_text("{not json")
    msg = exits_2(capsys, lambda a: sim_main(files, *a), ["--hardware", "local", "--calib", str(files / "calib.json")])
    assert f"--calib {files / 'calib.json'}: not a readable JSON file" in msg


def test_simulate_predictor_flags(files, tmp_path, capsys):
    """--predictor-from-trace trains a routing-only predictor on the trace's requests after the simulated rows, and
    the learned policy runs on it (also in --policy all); --predictor-dir must hold one; not both; no trace to train
    on (synthetic routing) is an error before any simulation."""
    from jobs.simulate import main
    from policies.learned import LearnedPredictor
    from policies.traces import load
    assert sim_main(files, "--policy", "cross_layer,learned", "--predictor-from-trace", "--work", str(tmp_path)) == 0
    out = json.loads((files / "sim" / "s.json").read_text())
    d, pol = out["routing"]["predictor"], out["policies"]
    assert "tokens_per_s" in pol["learned"] and "tokens_per_s" in pol["cross_layer"]
    simulated = load(str(files / "e4.npz")).head(60).num_requests
    p = LearnedPredictor.load(d)
    assert p.H == 0 and f"requests {simulated}..3" in p.meta["training"]["source"]
    assert sim_main(files, "--policy", "all", "--predictor-dir", d) == 0
    assert "tokens_per_s" in json.loads((files / "sim" / "s.json").read_text())["policies"]["learned"]
    msg = exits_2(capsys, lambda a: sim_main(files, *a), ["--predictor-dir", str(tmp_path / "none")])
    assert f"--predictor-dir {tmp_path / 'none'}: no predictor.json + predictor.safetensors" in msg
    msg = exits_2(capsys, lambda a: sim_main(files, *a), ["--predictor-dir", d, "--predictor-from-trace"])
    assert "--predictor-dir and --predictor-from-trace: give one" in msg
    with pytest.raises(SystemExit) as e:
        main(["--model", "qwen1.5-moe-a2.7b", "--tokens", "8", "--predictor-from-trace", "--work", str(tmp_path),
              "--json", str(tmp_path / "q.json")])
    assert e.value.code == 2 and "has no trace here" in last_error(capsys)
    assert not (tmp_path / "q.json").exists()


# -- jobs.generate ------------------------------------------------------------------------------------------------
def test_generate_store_without_manifest(tmp_path, monkeypatch, capsys):
    import cluster.expert_cluster
    from jobs.generate import main

    def no_cluster(*a, **k):
        raise AssertionError("generate got past its store check (it would start Ray)")
    monkeypatch.setattr(cluster.expert_cluster, "ExpertCluster", no_cluster)
    rc = main(["--store", f"file://{tmp_path}", "--prompt-ids", "1,2", "--max-tokens", "2",
               "--config", os.path.join(REPO, "ray_config.yaml")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("generate: error: no usable manifest") and f"file://{tmp_path}" in err
    assert len(err.splitlines()) == 1


def test_generate_store_check_reads_a_real_manifest(tmp_path):
    import argparse

    from jobs.generate import build_config, check_store
    tiny_store(tmp_path, f"file://{tmp_path}/store")
    args = argparse.Namespace(config=os.path.join(REPO, "ray_config.yaml"), store=f"file://{tmp_path}/store",
                              endpoint_url=None, workers=None, hbm_budget=None)
    check_store(build_config(args))   # no error


# -- jobs.collect_traces, jobs.train_predictor --------------------------------------------------------------------
def test_collect_traces_flags(tmp_path, capsys):
    from jobs.collect_traces import main
    assert exits_2(capsys, main, ["--requests", "0", "--out", str(tmp_path / "t.npz")]).endswith(
        "argument --requests: must be >= 1, got 0")
    assert f"--out {tmp_path / 'x.trace'}: must end in .npz" in exits_2(capsys, main,
                                                                        ["--out", str(tmp_path / "x.trace")])
    assert f"folder {tmp_path / 'no'} does not exist" in exits_2(capsys, main, ["--out", str(tmp_path / "no/t.npz")])


@pytest.mark.parametrize("flag", ["--epochs", "--batch", "--horizon", "--rank"])
def test_train_predictor_counts_must_be_positive(files, tmp_path, capsys, flag):
    from jobs.train_predictor import main
    msg = exits_2(capsys, main, ["--traces", str(files / "th.npz"), "--out", str(tmp_path / "p"), flag, "0"])
    assert msg.endswith(f"argument {flag}: must be >= 1, got 0")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("args,want", [
    (["--prefetch-concurrency", "100"], "--prefetch-concurrency 100: input should be less than or equal to 64 "
                                        "(the cluster config's workers.prefetch_concurrency)"),
    (["--lookahead-tokens", "65"], "--lookahead-tokens 65: input should be less than or equal to 64"),
    (["--window", "500"], "--window 500: input should be less than or equal to 128 (the cluster config's "
                          "prefetch.lookahead_layers)"),
    (["--speculate-layers", "9"], "--speculate-layers 9: input should be less than or equal to 8"),
    (["--tier", "link", "--link-channels", "0"], "--link-channels 0: input should be greater than or equal to 1"),
    (["--tier", "link", "--link-mbps", "0"], "--link-mbps 0.0: input should be greater than 0"),
    (["--tier", "s3", "--s3-latency-ms", "-2"], "--s3-latency-ms -2.0: input should be greater than or equal to 0"),
])
def test_benchmark_settings_the_cluster_config_refuses_fail_before_ray(bench, capsys, args, want):
    # these used to pass the parser, start Ray, then fail every policy's run alone
    assert want in exits_2(capsys, lambda a: bench(*a), args)


def test_benchmark_gpus_per_worker_is_checked_before_ray(bench, capsys, monkeypatch):
    import torch
    assert "--gpus-per-worker -1.0: input should be greater than or equal to 0 (the cluster config's " \
           "workers.num_gpus_per_worker)" in exits_2(capsys, lambda a: bench(*a), ["--gpus-per-worker", "-1"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert exits_2(capsys, lambda a: bench(*a), ["--gpus-per-worker", "0.5"]).endswith(
        "--gpus-per-worker 0.5: no CUDA GPU on this machine")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert exits_2(capsys, lambda a: bench(*a), ["--gpus-per-worker", "0.5", "--workers", "3"]).endswith(
        "--gpus-per-worker 0.5: 3 workers x 0.5 GPUs need 1.5; this machine has 1")
    assert exits_2(capsys, lambda a: bench(*a), ["--gpus-per-worker", "1.5", "--workers", "1"]).endswith(
        "--gpus-per-worker 1.5: above 1 it must be a whole number of GPUs (Ray's rule)")
    with pytest.raises(AssertionError, match="got past its checks"):   # two workers on halves of one GPU: valid
        bench("--gpus-per-worker", "0.5", "--workers", "2")


def test_benchmark_gpu_workers_ask_ray_for_gpus_and_compute_on_the_device():
    from types import SimpleNamespace

    from jobs.benchmark import cluster_config, worker_settings
    a = SimpleNamespace(prefetch_concurrency=None, placement=None, gpus_per_worker=0.5)
    cfg = cluster_config("/s", workers=2, hbm=1 << 20, dram=0, policy="on_demand", window=2, ns="n", address=None,
                         inflight=1 << 20, worker_opts=worker_settings(a))
    assert cfg.workers.num_gpus_per_worker == 0.5 and cfg.workers.device == "cuda"
    cpu = cluster_config("/s", workers=2, hbm=1 << 20, dram=0, policy="on_demand", window=2, ns="n", address=None,
                         inflight=1 << 20, worker_opts=worker_settings(SimpleNamespace(gpus_per_worker=0.0)))
    assert cpu.workers.num_gpus_per_worker == 0 and cpu.workers.device == "auto"


def test_convert_names_its_copies_for_the_configs_tiers(tmp_path):
    # a copy was always recorded as "nvme" / "s3", so a config naming its tier otherwise could never read it, and
    # two local copies in one run hit an assertion
    from storage_adapters.manifest import Manifest
    a, b = tmp_path / "a", tmp_path / "b"
    r = convert_cli("--store", f"local-nvme=file://{a}", "--store", f"file://{b}")
    assert r.returncode == 0, r.stderr
    m = Manifest.from_json((a / "manifest.json").read_bytes(), str(a))
    assert set(m.locations) == {"local-nvme", "nvme"} and set(m.blobs[0].tiers) == {"local-nvme", "nvme"}
    import asyncio
    from types import SimpleNamespace
    from storage_adapters.store import ExpertStore
    from storage_adapters.tiers import adapter_for
    tier = SimpleNamespace(kind="nvme", name="local-nvme", path=str(a), chunk_bytes=4 << 20, parallelism=2,
                           o_direct=False, emulate=None)

    async def read():   # a config whose tier is called local-nvme reads the copy made under that name
        st = await ExpertStore.open([adapter_for(tier)])
        try:
            return await st.read_blob(m.blobs[0].layer, m.blobs[0].expert)
        finally:
            await st.close()
    blob, came_from = asyncio.run(read())
    assert len(blob) == m.blobs[0].size and came_from == "local-nvme"
    r = convert_cli("--store", f"file://{tmp_path / 'c'}", "--store", f"file://{tmp_path / 'd'}")
    assert r.returncode == 2 and "two copies under one tier name 'nvme'" in r.stderr, r.stderr
    r = convert_cli("--store", f"=file://{tmp_path / 'e'}")
    assert r.returncode == 2 and "an empty tier name" in r.stderr, r.stderr


# -- jobs.bench_coordinator ---------------------------------------------------------------------------------------
def test_bench_coordinator_pin_names_a_core_of_this_process(monkeypatch, capsys):
    """--pin-coordinator needs a core this process may use, another for the rest of Ray, and the actor run;
    --step-gap-ms a finite pause: refused before any step runs (the run itself replaced by a failure)."""
    import jobs.bench_coordinator as BC
    monkeypatch.setattr(BC, "bench_planner", lambda *a, **k: (_ for _ in ()).throw(AssertionError("it ran")))
    cores = sorted(os.sched_getaffinity(0))
    msg = exits_2(capsys, BC.main, ["--pin-coordinator", str(max(cores) + 1), "--json", os.devnull])
    assert f"--pin-coordinator {max(cores) + 1}: this process may run on cores {cores}" in msg
    for other in ("--no-actor", "--embedded"):
        msg = exits_2(capsys, BC.main, ["--pin-coordinator", str(cores[0]), other, "--json", os.devnull])
        assert f"--pin-coordinator {cores[0]}: pins the actor run's coordinator, which {other} does not start" in msg
    for gap in ("-1", "nan", "inf"):
        msg = exits_2(capsys, BC.main, ["--step-gap-ms", gap, "--json", os.devnull])
        assert f"--step-gap-ms {float(gap)}: must be a finite number >= 0" in msg
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {cores[0]})
    msg = exits_2(capsys, BC.main, ["--pin-coordinator", str(cores[0]), "--json", os.devnull])
    assert "needs one of them to itself and the rest of Ray at least one other" in msg


def test_bench_coordinator_pins_every_thread_of_the_process():
    """_pin_process (run in the coordinator actor) moves every thread of its process, not only the calling one
    (Linux affinity is per thread): checked in a child process with a second thread started before the call."""
    code = ("import os, threading, time\nimport jobs.bench_coordinator as b\n"
            "threading.Thread(target=time.sleep, args=(2,), daemon=True).start()\n"
            "core = min(os.sched_getaffinity(0))\ntids = b._pin_process(None, core)\n"
            "print(len(tids), all(os.sched_getaffinity(t) == {core} for t in tids))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO})
    n, ok = r.stdout.split()
    assert int(n) >= 2 and ok == "True", r.stdout + r.stderr


def test_benchmark_predictor_from_trace_checks(bench, files, tmp_path, capsys):
    """--predictor-from-trace: not with --predictor-dir, a horizon within the replay's layers, and requests left
    over to train on (the replay uses all 3 here: exit 2, nothing trained)."""
    d = fake_predictor(tmp_path / "pred", 3, 8, 1)
    msg = exits_2(capsys, lambda a: bench(*a), ["--predictor-dir", str(d), "--predictor-from-trace"])
    assert "--predictor-dir and --predictor-from-trace: give one" in msg
    msg = exits_2(capsys, lambda a: bench(*a), ["--predictor-from-trace", "--predictor-horizon", "4"])
    assert "--predictor-horizon 4: must lie in [1, 3]" in msg
    with pytest.raises(AssertionError, match="got past its checks"):   # the horizon is checked only for training
        bench("--layers", "1")
    assert bench("--predictor-from-trace", "--requests", "3") == 2
    msg = last_error(capsys)
    assert "--predictor-from-trace:" in msg and "no other request to train on" in msg
    assert not [p for p in (files / "work").glob("predictor-*")]
