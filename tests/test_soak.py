"""The soak job (jobs/soak.py) end to end, short: the Serve app under load_test's clients for three 3-second phases,
an ExpertWorker killed in the middle one. Run as a subprocess (its own local Ray, Serve on a free 127.0.0.1 port):
zero requests lost, the kill seen by the replica (one worker fewer, health 200), requests answered in every phase."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_soak_loses_no_request_while_a_worker_is_killed(tmp_path):
    out = tmp_path / "soak.json"
    p = subprocess.run([sys.executable, "-m", "jobs.soak", "--phase-seconds", "3", "--clients", "2",
                        "--max-tokens", "4", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["lost_requests"] == 0 and rep["faults_injected"] == 1 and rep["fault_survived"]
    assert rep["fault"]["killed"] == "expert-worker-0" and rep["lost_workers"] == [0]
    assert rep["workers_after"] == rep["fault"]["workers_before"] - 1 == 2
    for phase in ("before", "during", "after"):
        ph = rep["phases"][phase]
        assert ph["requests"] > 0 and ph["errors"] == 0 and ph["p99_s"] >= ph["p50_s"] > 0, (phase, ph)
    assert "requests lost 0 of" in p.stdout
