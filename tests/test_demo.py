"""The README's main command, end to end: `python -m jobs.demo` on the embedded default (own Ray, own S3 server)."""
import os
import re
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_and_verifies_every_tier(tmp_path):
    cfg = yaml.safe_load(open(os.path.join(ROOT, "ray_config.yaml")))
    for t in cfg["tiers"]:
        if t["kind"] == "nvme":
            t["path"] = str(tmp_path / "nvme")
    cfg["ray"]["object_store_memory"] = "256MiB"
    (tmp_path / "ray_config.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, "-m", "jobs.demo", "--config", str(tmp_path / "ray_config.yaml"),
                        "--workdir", str(tmp_path / "work"), "--preset", "tiny"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr[-3000:]
    assert re.search(r"convert: 8 expert blobs .* written \{'nvme': 9, 's3': 9\}", out), out
    assert re.search(r"re-run \(idempotent\): .* written \{\}, skipped \{'nvme': 9, 's3': 9\}", out), out
    passes = re.findall(r"TierSet (\S+) .*?\((cold|warm)\): .*? (\d+)/(\d+) tensors bit-exact", out)
    assert {(s, r) for s, r, _, _ in passes} == {("default", "cold"), ("default", "warm"), ("cold_only", "cold"),
                                                 ("cold_only", "warm")}, out
    assert all(a == b == "24" for _, _, a, b in passes), passes
    assert "reads by tier {'s3': 8}" in out and "reads by tier {'nvme': 8}" in out
    assert "stopped embedded S3 server" in out and "done:" in out
