"""python -m jobs.report --stats STATS.json --out DIR

PNG plots of a run's cache/prefetch statistics, for people who would rather look than read: hit rate and stall
time over time, bytes read per tier, prefetch used vs wasted, and the lookahead window over time. Writes one PNG
per panel plus `report.png` with every panel stacked, and prints what it drew and which series were absent.
The same from Python: `render_report(stats_dict, out_dir)` (what `jobs.batch_infer --report` calls).

Stats JSON schema (version 1) — what `python -m jobs.batch_infer --stats STATS.json` writes (the benchmark's and the
simulator's JSON are other formats):

    {
      "schema": "moe-stats/1",             # optional; if present must be this string
      "label": "embedded, lru, 2 workers", # optional, used as the plots' title
      "interval_s": 1.0,                   # optional, nominal sampling interval (seconds)
      "timeline": [                        # REQUIRED, non-empty, ordered by t; one sample per interval
        {
          "t": 0.5,                        # REQUIRED, seconds since the run started, end of the interval
          "hits": 120,                     # expert-cache hits during the interval (count, >= 0)
          "misses": 8,                     # expert-cache misses during the interval
          "stall_s": 0.013,                # seconds the decode waited on expert loads during the interval
          "bytes_by_tier": {"dram": 0, "nvme": 1048576, "s3": 0},   # bytes read from each tier in the interval
          "prefetch_issued": 10,           # prefetches started in the interval
          "prefetch_used": 7,              # prefetched experts that were computed with before eviction
          "prefetch_wasted": 2,            # prefetched experts evicted (or cancelled) unused
          "window": 2                      # lookahead window at t (layers ahead the coordinator predicts; gauge)
        }
      ],
      "totals": {                          # optional; summed from the timeline when absent
        "hits": 1200, "misses": 80, "stall_s": 0.4, "bytes_by_tier": {...},
        "prefetch_issued": 100, "prefetch_used": 70, "prefetch_wasted": 20
      }
    }

Every field of a sample except `t` is optional: a series that no sample carries is reported as absent and its
panel is skipped (a run without a coordinator has no prefetch or window series). Counts are per interval
(deltas), not cumulative. A field that is present must have the right type; a wrong one fails naming it:
`stats.json: timeline[3].hits: expected a number >= 0, got 'x'`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

SCHEMA = "moe-stats/1"
COUNTS = ("hits", "misses", "stall_s", "prefetch_issued", "prefetch_used", "prefetch_wasted", "window")
PANELS = ("hit_rate", "stall", "bytes_by_tier", "prefetch", "window")   # in drawing order
NEEDS = {"hit_rate": ("hits", "misses"), "stall": ("stall_s",), "bytes_by_tier": ("bytes_by_tier",),
         "prefetch": ("prefetch_used", "prefetch_wasted"), "window": ("window",)}


class StatsError(ValueError):
    """The stats JSON does not follow the schema; the message names the file, the field and the problem."""


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def validate(stats, where: str = "stats") -> dict:
    """Check the schema; returns the stats with `totals` filled in. Raises StatsError naming the first bad field."""
    if not isinstance(stats, dict):
        raise StatsError(f"{where}: top level must be an object, got {type(stats).__name__}")
    if "schema" in stats and stats["schema"] != SCHEMA:
        raise StatsError(f"{where}: schema: expected {SCHEMA!r}, got {stats['schema']!r}")
    tl = stats.get("timeline")
    if tl is None:
        raise StatsError(f"{where}: timeline: missing (a list of per-interval samples, see jobs/report.py)")
    if not isinstance(tl, list) or not tl:
        raise StatsError(f"{where}: timeline: expected a non-empty list of samples, got {tl!r:.60}")
    prev = -math.inf
    for i, s in enumerate(tl):
        at = f"{where}: timeline[{i}]"
        if not isinstance(s, dict):
            raise StatsError(f"{at}: expected an object, got {s!r:.60}")
        if "t" not in s:
            raise StatsError(f"{at}.t: missing (seconds since the start of the run)")
        if not _num(s["t"]):
            raise StatsError(f"{at}.t: expected a number >= 0, got {s['t']!r}")
        if s["t"] < prev:
            raise StatsError(f"{at}.t: {s['t']} is before the previous sample's {prev} (timeline must be ordered)")
        prev = s["t"]
        for k in COUNTS:
            if k in s and s[k] is not None and not _num(s[k]):
                raise StatsError(f"{at}.{k}: expected a number >= 0, got {s[k]!r}")
        b = s.get("bytes_by_tier")
        if b is not None:
            if not isinstance(b, dict):
                raise StatsError(f"{at}.bytes_by_tier: expected an object tier -> bytes, got {b!r:.60}")
            for tier, v in b.items():
                if not _num(v):
                    raise StatsError(f"{at}.bytes_by_tier.{tier}: expected a number >= 0, got {v!r}")
    totals = stats.get("totals")
    if totals is not None and not isinstance(totals, dict):
        raise StatsError(f"{where}: totals: expected an object, got {totals!r:.60}")
    out = dict(stats)
    out["totals"] = {**summarize(tl), **(totals or {})}
    return out


def summarize(timeline: list[dict]) -> dict:
    """Totals of the per-interval series that the timeline carries (window: its last value)."""
    tot: dict = {}
    for k in COUNTS:
        vals = [s[k] for s in timeline if s.get(k) is not None]
        if vals:
            tot[k] = vals[-1] if k == "window" else sum(vals)
    tiers: dict = {}
    for s in timeline:
        for tier, v in (s.get("bytes_by_tier") or {}).items():
            tiers[tier] = tiers.get(tier, 0) + v
    if tiers:
        tot["bytes_by_tier"] = tiers
    return tot


def series(timeline: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(t, value) of the samples that carry key."""
    pts = [(s["t"], s[key]) for s in timeline if s.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def present_panels(timeline: list[dict]) -> tuple[list[str], dict[str, str]]:
    """Panels the timeline has data for, and for the others why not."""
    have, absent = [], {}
    for p in PANELS:
        missing = [k for k in NEEDS[p] if not any(s.get(k) is not None for s in timeline)]
        if missing:
            absent[p] = f"no sample carries {', '.join(missing)}"
        else:
            have.append(p)
    return have, absent


def _draw(ax, panel: str, tl: list[dict]) -> None:
    if panel == "hit_rate":
        pts = [(s["t"], s["hits"] / (s["hits"] + s["misses"])) for s in tl
               if s.get("hits") is not None and s.get("misses") is not None and s["hits"] + s["misses"] > 0]
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=".", color="tab:green")
        ax.set_ylabel("hit rate (%)")
        ax.set_ylim(0, 105)
        ax.set_title("expert-cache hit rate per interval")
    elif panel == "stall":
        t, v = series(tl, "stall_s")
        ax.bar(t, [1e3 * x for x in v], width=_width(t), color="tab:red")
        ax.set_ylabel("stall (ms)")
        ax.set_title("time the decode waited on expert loads per interval")
    elif panel == "bytes_by_tier":
        tiers = sorted({k for s in tl for k in (s.get("bytes_by_tier") or {})})
        ts = [s["t"] for s in tl if s.get("bytes_by_tier") is not None]
        bottom = [0.0] * len(ts)
        for tier in tiers:
            v = [(s["bytes_by_tier"] or {}).get(tier, 0) / 2**20 for s in tl if s.get("bytes_by_tier") is not None]
            ax.bar(ts, v, bottom=bottom, width=_width(ts), label=tier)
            bottom = [a + b for a, b in zip(bottom, v)]
        ax.set_ylabel("MiB read")
        ax.legend(loc="upper right", fontsize="small")
        ax.set_title("bytes read per tier per interval")
    elif panel == "prefetch":
        for key, color in (("prefetch_issued", "tab:gray"), ("prefetch_used", "tab:green"),
                           ("prefetch_wasted", "tab:red")):
            t, v = series(tl, key)
            if t:
                ax.plot(t, v, marker=".", color=color, label=key.split("_")[1])
        ax.set_ylabel("experts")
        ax.legend(loc="upper right", fontsize="small")
        ax.set_title("prefetches: used vs wasted per interval")
    elif panel == "window":
        t, v = series(tl, "window")
        ax.step(t, v, where="post", color="tab:blue")
        ax.set_ylabel("lookahead")
        ax.set_title("lookahead window")
    ax.grid(alpha=0.3)


def _width(t: list[float]) -> float:
    """Bar width: 80% of the typical (median) sampling gap; a short last interval must not thin every bar."""
    gaps = sorted(b - a for a, b in zip(t, t[1:]) if b > a)
    return 0.8 * (gaps[len(gaps) // 2] if gaps else 1.0)


def render_report(stats: dict, out_dir: str, where: str = "stats") -> dict:
    """Validate and draw. Returns {"files": {panel: path, "report": path}, "panels": [...], "absent": {panel: why},
    "totals": {...}}. Each PNG carries its panel names in its PNG text metadata (key "Panels")."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    stats = validate(stats, where)
    tl = stats["timeline"]
    panels, absent = present_panels(tl)
    if not panels:
        raise StatsError(f"{where}: timeline: no plottable series (need at least one of "
                         f"{sorted({k for p in PANELS for k in NEEDS[p]})})")
    os.makedirs(out_dir, exist_ok=True)
    title = stats.get("label") or "expert cluster"
    files = {}
    for p in panels:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        _draw(ax, p, tl)
        ax.set_xlabel("time (s)")
        fig.suptitle(title, fontsize="small")
        fig.tight_layout()
        files[p] = os.path.join(out_dir, f"{p}.png")
        fig.savefig(files[p], dpi=100, metadata={"Panels": p, "Title": title})
        plt.close(fig)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), sharex=True, squeeze=False)
    for ax, p in zip(axes[:, 0], panels):
        _draw(ax, p, tl)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(title + (f"  (absent: {', '.join(absent)})" if absent else ""), fontsize="small")
    fig.tight_layout()
    files["report"] = os.path.join(out_dir, "report.png")
    fig.savefig(files["report"], dpi=100, metadata={"Panels": ",".join(panels), "Title": title})
    plt.close(fig)
    return {"files": files, "panels": panels, "absent": absent, "totals": stats["totals"]}


def load_stats(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise StatsError(f"{path}: cannot read: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise StatsError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n\n")[1])
    ap.add_argument("--stats", required=True, help="stats JSON (schema at the top of jobs/report.py)")
    ap.add_argument("--out", required=True, help="folder for the PNGs")
    args = ap.parse_args(argv)
    try:
        rep = render_report(load_stats(args.stats), args.out, where=args.stats)
    except StatsError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    for p in rep["panels"]:
        print(f"[report] {p}: {rep['files'][p]}")
    print(f"[report] all panels: {rep['files']['report']}")
    for p, why in rep["absent"].items():
        print(f"[report] {p}: not drawn ({why})")
    t = rep["totals"]
    if "hits" in t and "misses" in t:
        print(f"[report] totals: {t['hits']} hits, {t['misses']} misses "
              f"({t['hits'] / max(1, t['hits'] + t['misses']):.0%} hit rate)"
              + (f", stall {t['stall_s']:.3f} s" if "stall_s" in t else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
