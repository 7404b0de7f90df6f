"""The benchmark scripts still run: each once, on tiny input (timings are not checked here;
the time-out only bounds a hang: a loaded 2-core machine took 2 minutes)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_every_benchmark_runs_on_tiny_input():
    result = subprocess.run([sys.executable, "run.py", "--smoke"], cwd=ROOT / "bench",
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (ROOT / "bench" / "results" / "smoke.md").read_text()
    for heading in ("pdf: 4 ×", "naive peer", "pdf ratio", "video:", "connections (wrk)",
                    "server CPU ms per request",
                    "responsiveness:", "streams:", "upload memory:", "scaling:",
                    "objectstore:", "S3 client", "scheduling: fair share",
                    "scheduling: retries", "B's wait, fair share / plain FIFO",
                    "peers: no-op job via HTTP (wrk)", "jobqueue embedded /put ÷ to_thread",
                    "arq, Celery and jobqueue distributed are skipped"):
        assert heading in report, heading
    assert "| answer | 415 |" in report, "the upload benchmark streamed its whole body"
    assert (ROOT / "bench" / "results" / "smoke.png").stat().st_size > 1000


def test_the_store_benchmark_runs():
    result = subprocess.run([sys.executable, "bench/store_writes.py", "--rounds", "20"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| save + flush |" in result.stdout


def test_the_digits_benchmark_runs():
    result = subprocess.run([sys.executable, "bench/digits.py", "--smoke"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for heading in ("digits: 16 connections", "| batched: DIGITS_BATCH_SIZE=32 |",
                    "| one job a call: DIGITS_BATCH_SIZE=1 |", "batched / one job a call"):
        assert heading in result.stdout, heading
