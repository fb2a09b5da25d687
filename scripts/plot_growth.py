#!/usr/bin/env python3
"""Draws docs/img/growth.png from the JSON reports of scripts/bench.sh
(growth-room-*.json) and scripts/bench-100k.sh / conns runs.

    pip install matplotlib && python3 scripts/plot_growth.py [DIR[=LABEL] ...]

Each DIR (default target/bench) is one series on the rate plot, e.g. the
reports of `scripts/bench.sh` and of `GWT= WT= scripts/bench.sh` copied
aside; memory comes from the first DIR.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

args = sys.argv[1:] or ["target/bench"]
series = []
for arg in args:
    path, _, label = arg.partition("=")
    sizes, rates = [], []
    for size in (10, 100, 1000, 10000):
        f = Path(path) / f"growth-room-{size}.json"
        if f.exists():
            sizes.append(size)
            rates.append(json.loads(f.read_text())["deliveries_per_sec"] / 1000)
    series.append((label or path, sizes, rates))
bench = Path(args[0].partition("=")[0])

# Idle memory per connection (gateway + worker) from the conns runs.
mem = [(10_000, None), (100_000, None)]
for i, (n, _) in enumerate(mem):
    f = bench / ("conns-10k.json" if n == 10_000 else "100k-summary.json")
    if f.exists():
        mem[i] = (n, json.loads(f.read_text()).get("server_kib_per_conn"))

fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
for label, sizes, rates in series:
    a.plot(sizes, rates, "o-", label=label)
a.set_xscale("log")
a.set_ylim(0, max([r for _, _, rs in series for r in rs] or [1]) * 1.2)
if len(series) > 1:
    a.legend(loc="lower right")
a.set_xlabel("room size (members)")
a.set_ylabel("deliveries/s (thousands)")
a.set_title("fan-out rate vs room size")
pts = [(n, k) for n, k in mem if k]
if pts:
    b.plot([n for n, _ in pts], [n * k / 1024 for n, k in pts], "o-")
    b.set_xlabel("idle connections")
    b.set_ylabel("server RSS growth (MiB)")
    b.set_title("memory vs connections")
fig.tight_layout()
out = Path("docs/img/growth.png")
out.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(out, dpi=100)
print(f"wrote {out}")
