#!/usr/bin/env python3
"""Summarises the runs of scripts/bench.sh: per scenario the median run
(by deliveries/s, or KiB/conn for conns), its latency, and the spread.

    python3 scripts/bench_summary.py [target/bench] [RUNS]

Writes target/bench/summary.json and copies each median run to NAME.json
(what scripts/plot_growth.py reads).
"""
import json
import shutil
import sys
from pathlib import Path

bench = Path(sys.argv[1] if len(sys.argv) > 1 else "target/bench")
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 1

def metric(name: str) -> str:
    """The figure a scenario is judged by (its median run is chosen by it)."""
    return "server_kib_per_conn" if name.startswith("conns") else "deliveries_per_sec"


names = sorted({p.name.split(".r")[0] for p in bench.glob("*.r*.json")})
summary = {}
for name in names:
    files = [bench / f"{name}.r{r}.json" for r in range(1, runs + 1)]
    reports = [(f, json.loads(f.read_text())) for f in files if f.exists()]
    if not reports:
        continue
    key = metric(name)
    reports.sort(key=lambda fr: fr[1].get(key) or 0)
    f, median = reports[len(reports) // 2]
    shutil.copyfile(f, bench / f"{name}.json")
    values = [r.get(key) for _, r in reports]
    lat = median.get("latency_ms") or {}
    summary[name] = {
        "runs": len(reports),
        key: median.get(key),
        "min": min(v for v in values if v is not None) if any(values) else None,
        "max": max(v for v in values if v is not None) if any(values) else None,
        "p50_ms": lat.get("p50"),
        "p99_ms": lat.get("p99"),
        "ok": all(r.get("ok") for _, r in reports),
        "lost_dup_reordered": sum(
            (r.get("lost") or 0) + (r.get("duplicated") or 0) + (r.get("reordered") or 0)
            for _, r in reports
        ),
    }

(bench / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"\n{'scenario':<20} {'runs':>4} {'median':>12} {'min':>12} {'max':>12} {'p50 ms':>8} {'p99 ms':>8}  ok  loss/dup/reorder")
fmt = lambda v: "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.2f}")
p = lambda v: "-" if v is None else f"{v:.3f}"
for name, s in summary.items():
    key = metric(name)
    print(
        f"{name:<20} {s['runs']:>4} {fmt(s[key]):>12} {fmt(s['min']):>12} {fmt(s['max']):>12}"
        f" {p(s['p50_ms']):>8} {p(s['p99_ms']):>8}  {'yes' if s['ok'] else 'NO':<3} {s['lost_dup_reordered']}"
    )
