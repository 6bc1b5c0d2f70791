"""The README's main command, end to end: `python -m jobs.demo` on the embedded default (its own Ray and S3 server,
the committed embedded model), with the store on a temporary disk path."""
import os
import re
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_and_generates_from_the_tiers(tmp_path):
    cfg = yaml.safe_load(open(os.path.join(ROOT, "ray_config.yaml")))
    for t in cfg["tiers"]:
        if t["kind"] == "nvme":
            t["path"] = str(tmp_path / "nvme")
    cfg["ray"]["object_store_memory"] = "256MiB"
    (tmp_path / "ray_config.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, "-m", "jobs.demo", "--config", str(tmp_path / "ray_config.yaml"),
                        "--max-tokens", "24"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr[-3000:]
    n = int(re.search(r"convert: (\d+) expert blobs", out)[1])
    aux = 3  # generation_config.json, tokenizer.json, tokenizer_config.json
    assert f"written {{'nvme': {n + 1 + aux}, 's3': {n + 1 + aux}}}" in out, out
    assert "re-run (idempotent): " in out and f"skipped {{'nvme': {n + 1 + aux}, 's3': {n + 1 + aux}}}" in out
    assert re.search(rf"storage read-back: {3 * n}/{3 * n} expert tensors bit-exact", out), out
    cached = int(re.search(r"= (\d+) of (\d+) experts at most", out)[1])
    assert cached <= n // 2
    assert re.search(r"'def ' -> '.+'", out)
    tps = float(re.search(r"tokens/s: ([\d.]+)|: ([\d.]+) tokens/s", out).group(2))
    assert tps > 0
    hits, misses = map(int, re.search(r"expert cache: (\d+) hits, (\d+) misses", out).groups())
    assert misses > n // 2 and hits > 0  # the caches hold half the experts: some are re-read
    for line in re.findall(r"worker \d+: .*", out):
        used, budget = map(float, re.search(r"([\d.]+)/([\d.]+) MiB", line).groups())
        assert used <= budget
    assert "peak RSS" in out and "stopped embedded S3 server" in out and "[demo] done" in out
