"""JOBQUEUE_ACCESS_LOG: one line a job by default (not one a poll), every request, or none;
never the query string (the dashboard's image links carry an access token in it)."""

from __future__ import annotations

import uuid

import httpx
import pytest

from conftest import eventually, run_server

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
