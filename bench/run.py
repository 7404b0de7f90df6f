"""Run every benchmark, print the tables and write bench/results/latest.md and latest.png.

Run: make bench   (or .venv/bin/python bench/run.py [--runs N] [--smoke])
--smoke runs each benchmark once on tiny input, only to prove the scripts still work.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import digits
import objectstore
import overhead
import pdf
import peers
import responsiveness
import scaling
import scheduling
import streams
import upload
import video
from common import ROOT

RESULTS = ROOT / "bench" / "results"


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = [r["chart"] for r in results if "chart" in r]
    figure, _ = plt.subplots(1, len(charts), figsize=(5 * len(charts), 3.8))
    for axis, (title, bars) in zip(figure.axes, charts, strict=True):
        axis.bar(list(bars), list(bars.values()),
                 color=["#3b6ea5"] + ["#9aa5b1"] * (len(bars) - 1))
        axis.set_title(title)
        axis.set_ylabel("seconds, median")
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, one run each")
    args = parser.parse_args()

    if args.smoke:
        sample = ROOT / "data" / "sample.pdf"
        plan = [lambda: pdf.run(1, pdf=sample, every_setting=False),
                lambda: video.run(1, seconds=2),
                lambda: overhead.run(1, seconds=1),
                lambda: responsiveness.run(1, seconds=1, pdf=sample, clip_seconds=2),
                lambda: streams.run(1, seconds=1, streams=10),
                lambda: upload.run(1, megabytes=8),
                lambda: scaling.run(1, jobs=4, seconds=0.1, workers=(1, 2)),
                lambda: objectstore.run(1, pdf=sample, seconds=2, big_mb=4,
                                          pages_count=8),
                lambda: scheduling.run(1, flood=20, seconds=1),
                lambda: peers.run(1, seconds=1, smoke=True)]
    else:
        plan = [lambda: pdf.run(args.runs), lambda: video.run(max(args.runs, 7)),
                lambda: overhead.run(args.runs), lambda: responsiveness.run(args.runs),
                lambda: streams.run(args.runs), lambda: upload.run(args.runs),
                lambda: scaling.run(args.runs), lambda: objectstore.run(args.runs),
                lambda: digits.run(args.runs), lambda: scheduling.run(args.runs),
                lambda: peers.run(args.runs)]
    results = []
    for benchmark in plan:
        started = time.monotonic()
        result = benchmark()
        print(result["text"], f"\n\n({result['name']}: {time.monotonic() - started:.0f} s)\n",
              flush=True)
        results.append(result)

    heading = (f"# Benchmarks\n\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
               f"{platform.python_version()}, runs per measurement: "
               f"{1 if args.smoke else args.runs}"
               f"{' (smoke run: tiny inputs)' if args.smoke else ''}\n")
    RESULTS.mkdir(exist_ok=True)
    name = "smoke" if args.smoke else "latest"
    (RESULTS / f"{name}.md").write_text(
        heading + "\n" + "\n\n".join(r["text"] for r in results) + "\n")
    chart(results, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / (name + '.md')} and {RESULTS / (name + '.png')}")


if __name__ == "__main__":
    main()
