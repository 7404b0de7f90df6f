"""JOBQUEUE_ACCESS_LOG: one line a job by default (not one a poll), every request, or none;
never the query string (the dashboard's image links carry an access token in it)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import httpx
import pytest

from conftest import ROOT, eventually, run_server

SECRET = "token-that-must-not-be-logged"


def access_lines(server) -> list[str]:
    return [line for line in server.log_path.read_text().splitlines()
            if "jobqueue.access" in line]


@pytest.mark.parametrize("mode", ["jobs", "all", "off"])
def test_access_log_modes(tmp_path, mode):
    with run_server(tmp_path, access_log=mode) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        put = client.post("/put", json={"data": "hi", "seconds": 0})
        assert put.status_code == 200
        missing = client.get(f"/jobs/{uuid.uuid4()}", params={"token": SECRET})
        assert missing.status_code == 404
        # The marker: a request every mode but off logs, sent last, so once it shows the
        # lines before it are written too.
        assert client.delete(f"/jobs/{uuid.uuid4()}").status_code == 404
        if mode == "off":
            assert access_lines(server) == []
            return
        eventually(lambda: any('"DELETE /jobs/' in line for line in access_lines(server)))
        lines = access_lines(server)
        assert any('"POST /put HTTP/1.1" 200' in line for line in lines), lines
        assert any('"GET /jobs/' in line and '" 404 ' in line for line in lines), lines
        assert not any(SECRET in line for line in lines)
        # The start-up probe asked for /health too.
        health = [line for line in lines if '"GET /health ' in line]
        assert (len(health) >= 1) if mode == "all" else not health, lines


LOGGING_PROCESS = """
import logging, sys
from jobqueue import logs
logs.configure()
access, other = logging.getLogger("jobqueue.access"), logging.getLogger("jobqueue.other")
access.info("first access line")
print("logged", flush=True); sys.stdin.readline()
access.info("second access line")
other.warning("a warning")
print("logged", flush=True); sys.stdin.readline()
access.info("last access line")
"""


def test_access_lines_go_out_in_batches_and_in_order_with_every_other_line(tmp_path):
    """The access log's lines wait for the next flush (at most StderrHandler.FLUSH_SECONDS,
    or the next other line, or the exit); every other line goes out at once, after them."""
    err = tmp_path / "stderr.log"
    with err.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", LOGGING_PROCESS], cwd=ROOT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                   text=True)
    try:
        assert process.stdout.readline() == "logged\n"
        eventually(lambda: "first access line" in err.read_text())  # by the flusher
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.stdout.readline() == "logged\n"
        lines = err.read_text().splitlines()  # the warning flushed them, no wait needed
        assert [line.split(": ", 1)[1] for line in lines] == [
            "first access line", "second access line", "a warning"], lines
        process.stdin.write("\n")
        process.stdin.close()
        assert process.wait(30) == 0
    finally:
        process.kill()
    assert err.read_text().splitlines()[-1].endswith("last access line")  # flushed at exit
