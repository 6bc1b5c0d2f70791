"""`python -m jobs.report`: PNGs that are real PNGs with the panels the stats carry, absent series named, and
bad stats JSON failing with the field that is wrong. No Ray."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from jobs.report import StatsError, render_report, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def full_stats(n=12):
    tl = []
    for i in range(n):
        tl.append({"t": 0.5 * (i + 1), "hits": 10 * i, "misses": 12 - i, "stall_s": 0.002 * (12 - i),
                   "bytes_by_tier": {"dram": 1000 * i, "nvme": 2**20 * (12 - i), "s3": 2**19 if i < 3 else 0},
                   "prefetch_issued": 4, "prefetch_used": min(4, i), "prefetch_wasted": 4 - min(4, i),
                   "window": 1 + i // 4})
    return {"schema": "moe-stats/1", "label": "test run", "interval_s": 0.5, "timeline": tl}


def check_png(path, panels):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG"
    im = Image.open(path)
    im.load()  # decodes every chunk: a truncated or corrupt file fails here
    assert im.size[0] > 300 and im.size[1] > 200
    assert im.text["Panels"].split(",") == panels


def test_every_series_draws_its_panel(tmp_path):
    stats = full_stats()
    p = tmp_path / "stats.json"
    p.write_text(json.dumps(stats))
    proc = subprocess.run([sys.executable, "-m", "jobs.report", "--stats", str(p), "--out", str(tmp_path / "png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = ["hit_rate", "stall", "bytes_by_tier", "prefetch", "window"]
    for n in names:
        check_png(tmp_path / "png" / f"{n}.png", [n])
    check_png(tmp_path / "png" / "report.png", names)
    assert "not drawn" not in proc.stdout
    tl = stats["timeline"]
    hits, misses = sum(s["hits"] for s in tl), sum(s["misses"] for s in tl)
    assert f"{hits} hits, {misses} misses" in proc.stdout
    # the overview is taller than one panel: five stacked axes
    assert Image.open(tmp_path / "png" / "report.png").size[1] > 4 * Image.open(tmp_path / "png" / "stall.png").size[1]


def test_missing_series_are_skipped_and_named(tmp_path):
    tl = [{"t": float(i), "hits": i, "misses": 3, "bytes_by_tier": {"nvme": 4096 * i}} for i in range(5)]
    rep = render_report({"timeline": tl}, str(tmp_path))
    assert rep["panels"] == ["hit_rate", "bytes_by_tier"]
    assert set(rep["absent"]) == {"stall", "prefetch", "window"}
    assert "prefetch_used" in rep["absent"]["prefetch"] and "window" in rep["absent"]["window"]
    check_png(rep["files"]["report"], ["hit_rate", "bytes_by_tier"])
    assert sorted(os.listdir(tmp_path)) == ["bytes_by_tier.png", "hit_rate.png", "report.png"]
    assert rep["totals"] == {"hits": 10, "misses": 15, "bytes_by_tier": {"nvme": 4096 * 10}}


@pytest.mark.parametrize("stats, field", [
    ({"totals": {}}, "timeline: missing"),
    ({"timeline": []}, "timeline: expected a non-empty list"),
    ({"timeline": [{"hits": 1}]}, "timeline[0].t: missing"),
    ({"timeline": [{"t": 0, "hits": 1}, {"t": 1, "hits": "x"}]}, "timeline[1].hits: expected a number >= 0, got 'x'"),
    ({"timeline": [{"t": 2}, {"t": 1}]}, "timeline[1].t: 1 is before"),
    ({"timeline": [{"t": 0, "bytes_by_tier": {"nvme": -1}}]}, "timeline[0].bytes_by_tier.nvme: expected a number"),
    ({"schema": "other/9", "timeline": [{"t": 0}]}, "schema: expected 'moe-stats/1'"),
    ([1, 2], "top level must be an object"),
])
def test_bad_stats_name_the_field(stats, field):
    with pytest.raises(StatsError) as e:
        validate(stats, "s.json")
    assert f"s.json: {field}" in str(e.value)


def test_cli_reports_bad_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"timeline": [{"t": 0, "misses": null, "window": true}]}')
    proc = subprocess.run([sys.executable, "-m", "jobs.report", "--stats", str(p), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{p}: timeline[0].window: expected a number >= 0, got True" in proc.stderr
    p.write_text('{"timeline": [')
    proc = subprocess.run([sys.executable, "-m", "jobs.report", "--stats", str(p), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr
    assert not any(f.endswith(".png") for f in os.listdir(tmp_path))
