"""overhead: what a tiny job costs. A no-op message job through /put (`seconds: 0`) against
GET /health on the same server, driven by wrk (C, one thread) so the load generator is never
the bottleneck: the Python client this replaced topped out near 500 requests a second.

Runs alternate (/health, /put, /health, ...) so a slow spell of the machine hits both. Beside
requests a second, each run reads the server's CPU time per request (/proc/<pid>/stat): on a
shared machine, whose speed moves from minute to minute, it is the steadier of the two.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from statistics import median

from common import server, table

CLIENTS = (1, 16, 64)
PUT_SCRIPT = """wrk.method = "POST"
wrk.body = '{"data": "", "seconds": 0}'
wrk.headers["Content-Type"] = "application/json"
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, connections: int, seconds: float, script: Path | None = None,
        pid: int | None = None) -> dict:
    """One wrk run: requests/s, p50 and p99 in ms, the count of non-2xx answers, and the
    server's (`pid`) CPU milliseconds per request."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if script:
        command[1:1] = ["-s", str(script)]
    cpu_before = cpu_seconds(pid) if pid else 0.0
    text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(pid) - cpu_before if pid else 0.0
    requests = int(re.search(r"(\d+) requests in", text).group(1))

    def latency(percent: str) -> float:
        value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M).groups()
        return float(value) * UNITS[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
            "p50": latency("50"), "p99": latency("99"),
            "errors": int(errors.group(1)) if errors else 0,
            "cpu_ms": cpu * 1000 / max(requests, 1)}


def run(runs: int, seconds: float = 5) -> dict:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed; `make bench` installs it with apt-get")
    rows, ratios, cpu_ratios, added_p50 = [], {}, {}, 0.0
    with tempfile.TemporaryDirectory() as folder, \
            server(message_queue_size=1024, message_timeout=60) as srv:
        script = Path(folder) / "put.lua"
        script.write_text(PUT_SCRIPT)
        health, put, pid = f"{srv.url}/health", f"{srv.url}/put", srv.process.pid
        wrk(put, 4, 1, script)  # warm up
        for clients in CLIENTS:
            samples = {"health": [], "put": []}
            for _ in range(runs):
                samples["health"].append(wrk(health, clients, seconds, pid=pid))
                samples["put"].append(wrk(put, clients, seconds, script, pid))
            errors = sum(s["errors"] for s in samples["put"] + samples["health"])
            if errors:
                raise RuntimeError(f"{errors} answers were not 2xx at {clients} connections")
            med = {name: {key: median(s[key] for s in runs_)
                          for key in ("rps", "p50", "p99", "cpu_ms")}
                   for name, runs_ in samples.items()}
            ratios[clients] = med["put"]["rps"] / med["health"]["rps"]
            cpu_ratios[clients] = med["health"]["cpu_ms"] / med["put"]["cpu_ms"]
            if clients == 1:
                added_p50 = med["put"]["p50"] - med["health"]["p50"]
            rows.append([clients, f"{med['put']['rps']:.0f}", f"{med['health']['rps']:.0f}",
                         f"{ratios[clients]:.2f}",
                         f"{med['put']['p50']:.2f} / {med['put']['p99']:.2f}",
                         f"{med['health']['p50']:.2f} / {med['health']['p99']:.2f}",
                         f"{med['put']['cpu_ms']:.2f} / {med['health']['cpu_ms']:.2f} "
                         f"({cpu_ratios[clients]:.2f})"])
    text = table(["connections (wrk)", "/put no-op req/s", "/health req/s",
                  "ratio (target ≥ 0.5 at 16)", "/put p50 / p99 ms", "/health p50 / p99 ms",
                  "server CPU ms per request: /put / /health (ratio)"], rows)
    text += (f"\n\nAdded p50 at 1 connection: {added_p50:.2f} ms (target ≤ 0.5 ms). "
             "wrk runs one thread on the same 2 cores as the server.")
    return {"name": "overhead", "text": text, "ratio": ratios[16], "cpu_ratio": cpu_ratios[16],
            "added_p50_ms": added_p50}


if __name__ == "__main__":
    print(run(3)["text"])
