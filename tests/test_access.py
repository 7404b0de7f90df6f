"""API keys (per-key isolation, constant-time checks, rate limit per key), security headers,
CORS."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from httpx_sse import connect_sse

from conftest import DATA, ROOT, Server, run_server
from jobqueue.api.access import TOKEN_SECONDS, make_token

ALPHA, BETA = "alpha-key-1234", "beta-key-5678"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> Server:
    with run_server(tmp_path_factory.mktemp("keyed"), api_keys=f"{ALPHA}, {BETA}",
                    rate_limit="4/minute") as server:
        yield server


def as_key(server: Server, key: str | None) -> httpx.Client:
    return server.client(headers={"X-API-Key": key} if key else {})


def test_every_job_endpoint_needs_a_valid_key(keyed):
    with as_key(keyed, None) as anonymous, as_key(keyed, "wrong-key") as wrong:
        assert anonymous.get("/").status_code == 200
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/dashboard").status_code == 200  # the page asks for a key
        for client in (anonymous, wrong):
            for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("POST", "/put"),
                                 ("GET", "/events"), ("GET", f"/jobs/{'0' * 8}")):
                response = client.request(method, path, json={} if method == "POST" else None)
                assert response.status_code == 401, (method, path)
                assert "X-API-Key" in response.json()["detail"]
    assert ALPHA not in keyed.log() and BETA not in keyed.log(), "keys must never be logged"


def test_each_key_sees_only_its_own_jobs(keyed):
    with as_key(keyed, ALPHA) as alpha, as_key(keyed, BETA) as beta:
        pdf = alpha.post("/put", json={"jobType": "pdf2image", "dpi": 20}).json()["data"]
        video = alpha.post("/put", json={"jobType": "video", "width": 64}).json()["data"]
        job_id = pdf["id"]
        paths = [f"/jobs/{job_id}", f"/jobs/{job_id}/result", f"/jobs/{job_id}/events",
                 f"/jobs/{job_id}/files/page-001.png", f"/jobs/{video['id']}/preview.mjpg"]
        for path in paths:
            assert alpha.get(path, params={"fps": 60} if "preview" in path else None
                             ).status_code == 200, path
            other = beta.get(path)
            assert other.status_code == 404, path
            assert "There is no job" in other.json()["detail"]
        assert beta.delete(f"/jobs/{job_id}").status_code == 404
        assert alpha.get(f"/jobs/{job_id}").status_code == 200, "beta's DELETE did nothing"
        alpha_ids = {item["id"] for item in alpha.get("/jobs").json()["items"]}
        beta_ids = {item["id"] for item in beta.get("/jobs").json()["items"]}
        assert {job_id, video["id"]} <= alpha_ids and not alpha_ids & beta_ids


def test_event_feed_carries_only_the_keys_jobs(keyed):
    seen: list[str] = []

    def watch(own_job: list[str]) -> None:
        with as_key(keyed, BETA) as beta, connect_sse(beta, "GET", "/events") as events:
            for event in events.iter_sse():
                seen.append(event.event + ":" + event.data)
                if own_job and own_job[0] in event.data:
                    return

    own_job: list[str] = []
    watcher = threading.Thread(target=watch, args=(own_job,))
    watcher.start()
    time.sleep(0.3)
    with as_key(keyed, ALPHA) as alpha:
        job_id = alpha.post("/put", json={"data": "secret", "seconds": 0.3}).json()["data"]["id"]
    time.sleep(0.5)
    with as_key(keyed, BETA) as beta:  # beta's own job ends the watch: it must arrive
        own_job.append(beta.post("/jobs", json={"seconds": 0.5}).json()["id"])
    watcher.join(10)
    assert not watcher.is_alive(), "beta never saw its own job"
    assert any(line.startswith("queues:") for line in seen)  # queue sizes are for everyone
    assert not any(job_id in line for line in seen), "beta saw alpha's job"


def test_rate_limit_counts_each_key_separately(tmp_path):
    with run_server(tmp_path, api_keys=f"{ALPHA},{BETA}", rate_limit="2/minute") as server, \
            as_key(server, ALPHA) as alpha, as_key(server, BETA) as beta:
        for _ in range(2):
            assert alpha.post("/jobs", json={"seconds": 0}).status_code == 202
        limited = alpha.post("/jobs", json={"seconds": 0})
        assert limited.status_code == 429 and "Retry-After" in limited.headers
        assert beta.post("/jobs", json={"seconds": 0}).status_code == 202, "beta has its own"


def test_access_tokens_stand_in_for_the_key_on_reads_only(keyed):
    with as_key(keyed, ALPHA) as alpha, as_key(keyed, None) as browser:
        issued = alpha.post("/access-token")
        assert issued.status_code == 200 and issued.json()["expiresIn"] == TOKEN_SECONDS
        token = issued.json()["token"]
        assert ALPHA not in token
        job_id = alpha.post("/jobs", json={"seconds": 0}).json()["id"]
        mine = browser.get("/jobs", params={"access_token": token})
        assert mine.status_code == 200 and job_id in {i["id"] for i in mine.json()["items"]}
        assert browser.get(f"/jobs/{job_id}", params={"access_token": token}).status_code == 200
        # Reads only, and only what it was made for.
        assert browser.post("/jobs", params={"access_token": token}, json={}).status_code == 401
        assert browser.delete(f"/jobs/{job_id}", params={"access_token": token}
                              ).status_code == 401
        assert browser.post("/access-token", params={"access_token": token}).status_code == 401
        with as_key(keyed, BETA) as beta:
            beta_token = beta.post("/access-token").json()["token"]
        assert browser.get(f"/jobs/{job_id}", params={"access_token": beta_token}
                           ).status_code == 404
        owner, expires, signature = token.split(".")
        for forged in (f"{owner}.{int(expires) + 999}.{signature}", f"{'0' * 32}.{expires}."
                       f"{signature}", token[:-1], "", "...", "garbage"):
            assert browser.get("/jobs", params={"access_token": forged}).status_code == 401
        expired = make_token(owner, [ALPHA, BETA], now=time.time() - TOKEN_SECONDS - 1)
        refused = browser.get("/jobs", params={"access_token": expired})
        assert refused.status_code == 401 and "expired" in refused.json()["detail"]


def test_without_keys_there_is_no_token_to_get(server, client):
    assert client.post("/access-token").json() == {"token": "", "expiresIn": 0}


def test_security_headers_on_pages_and_api(server, client):
    page = client.get("/dashboard")
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "unsafe-inline" not in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["X-Frame-Options"] == "DENY"
    assert client.get("/health").headers["X-Content-Type-Options"] == "nosniff"
    docs = client.get("/docs")
    assert "'sha256-" in docs.headers["Content-Security-Policy"]
    assert "script-src 'self' https://cdn.jsdelivr.net 'sha256-" in docs.headers[
        "Content-Security-Policy"]


def test_cors_is_off_unless_origins_are_set(server, client, tmp_path):
    asked = client.options("/jobs", headers={"Origin": "http://app.test",
                                             "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in asked.headers
    with run_server(tmp_path, cors_origins="http://app.test") as open_server, \
            open_server.client() as other:
        allowed = other.options("/jobs", headers={"Origin": "http://app.test",
                                                  "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "X-API-Key"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://app.test"
        stranger = other.get("/health", headers={"Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in stranger.headers
        posted = other.post("/jobs", json={"seconds": 0}, headers={"Origin": "http://app.test"})
        assert posted.headers["access-control-allow-origin"] == "http://app.test"
        assert "Location" in posted.headers["access-control-expose-headers"]


def test_upload_with_key(keyed):
    with as_key(keyed, ALPHA) as alpha, open(DATA / "sample.pdf", "rb") as pdf:
        response = alpha.post("/jobs", data={"jobType": "pdf2image", "dpi": "20"},
                              files={"file": ("a.pdf", pdf)})
    assert response.status_code == 202


def test_guessing_keys_is_refused_after_twenty_wrong_ones(tmp_path):
    with run_server(tmp_path, api_keys=ALPHA) as server, as_key(server, None) as anonymous:
        assert anonymous.get("/jobs").status_code == 401  # no key at all is not counted
        for guess in range(20):
            assert anonymous.get("/jobs", headers={"X-API-Key": f"guess-{guess}"}
                                 ).status_code == 401
        refused = anonymous.get("/jobs", headers={"X-API-Key": "guess-20"})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        # For the rest of the window even the right key is refused from this address.
        assert anonymous.get("/jobs", headers={"X-API-Key": ALPHA}).status_code == 429


def test_a_key_a_header_cannot_carry_is_refused_at_start(tmp_path):
    """A non-ASCII key ("clé") worked only for clients that send it as latin-1 bytes (httpx,
    curl with the right locale), not for the others. The server refuses to start with it,
    naming the setting, without printing the key."""
    env = {**os.environ, "JOBQUEUE_OUT_DIR": str(tmp_path / "out"),
           "JOBQUEUE_API_KEYS": f"{ALPHA},secret-clé"}
    done = subprocess.run([sys.executable, "src/main.py", "--port", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode != 0
    assert "JOBQUEUE_API_KEYS" in done.stderr and "ASCII" in done.stderr, done.stderr[-2000:]
    assert "secret-cl" not in done.stderr + done.stdout, "the key is not printed"
