"""The command-line client against a real server, run the way a user runs it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from conftest import DATA, ROOT, STARTUP_SECONDS, Server, free_port, run_server
from jobqueue.local import cluster
from media import make_clip, png_size, probe_streams

# The `jobqueue` command as its console script runs it (pyproject.toml: jobqueue.cli:main), and
# `python -m jobqueue.client`, the same command under the name docs and scripts use.
JOBQUEUE = [sys.executable, "-c", "import sys; from jobqueue.cli import main; sys.exit(main())"]
MODULE = [sys.executable, "-m", "jobqueue.client"]


def cli_env(**extra: str) -> dict[str, str]:
    """Run from outside the repository, on this checkout's package (which the venv's editable
    install may not be: another worktree's)."""
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), **extra}


def cli(server: Server, *args: object, cwd: Path, timeout: float = 120, command=JOBQUEUE,
        ) -> subprocess.CompletedProcess:
    """`jobqueue --url <server> ...`."""
    env = cli_env(COLUMNS="60")  # a narrow terminal: the job list must still show whole ids
    return subprocess.run(
        [*command, "--url", server.url, *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_submit_wait_out_downloads_every_page(server, tmp_path):
    other = tmp_path / "other.pdf"
    shutil.copy(DATA / "sample.pdf", other)
    done = cli(server, "submit", DATA / "sample.pdf", other, "--type", "pdf2image",
               "--dpi", "50", "--out", tmp_path / "pages", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for stem in ("sample", "other"):
        pages = sorted((tmp_path / "pages" / stem).iterdir())
        assert [page.name for page in pages] == [f"page-00{n}.png" for n in range(1, 5)]
        # A4 at 50 dpi.
        assert png_size(pages[0].read_bytes()) == (414, 585)
    assert done.stdout.count("succeeded") == 2
    assert "4/4 pages" in done.stderr  # the progress bars


def test_submit_video_downloads_the_mp4(server, tmp_path):
    done = cli(server, "submit", DATA / "sample.mp4", "--type", "video", "--width=320",
               "--out", tmp_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    video = probe_streams(tmp_path / "sample" / "video.mp4")["video"]
    assert (video["width"], video["height"]) == (320, 180)


def test_refused_upload_exits_non_zero_with_the_servers_detail(server, tmp_path):
    notes = tmp_path / "notes.pdf"
    notes.write_text("not a PDF at all")
    done = cli(server, "submit", notes, "--type", "pdf2image", "--wait", cwd=tmp_path)
    assert done.returncode == 1
    assert "415" in done.stderr and "not a PDF" in done.stderr
    bad_option = cli(server, "submit", "--type", "video", "--width", "641", cwd=tmp_path)
    assert bad_option.returncode == 1
    assert "width" in bad_option.stderr and "even number" in bad_option.stderr


def test_a_job_that_fails_while_running_exits_non_zero(server, tmp_path):
    clip = make_clip(tmp_path / "long.mp4", 20)
    client = subprocess.Popen(
        [*MODULE, "--url", server.url, "submit", str(clip),
         "--type", "video", "--width", "1280", "--wait"],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (encoders := server.children("ffmpeg")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert encoders, "ffmpeg never started"
    os.kill(encoders[0], signal.SIGKILL)  # the encoder dies mid-job
    stdout, stderr = client.communicate(timeout=60)
    assert client.returncode == 1, stdout + stderr
    assert "failed: ffmpeg was killed by signal 9" in stderr


def test_busy_server_answers_are_retried_until_every_file_is_in(tmp_path):
    files = []
    for number in range(4):
        files.append(tmp_path / f"doc{number}.pdf")
        shutil.copy(DATA / "sample.pdf", files[-1])
    (tmp_path / "server").mkdir()
    with run_server(tmp_path / "server", pdf2image_workers=1, pdf2image_queue_size=1,
                    rate_limit="3/second") as server:
        done = cli(server, "submit", *files, "--type", "pdf2image", "--dpi", "30",
                   "--parallel", "4", "--out", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "retrying" in done.stderr and ("503" in done.stderr or "429" in done.stderr)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"doc{n}" for n in range(4)]
    assert all(len(list((tmp_path / "out" / f"doc{n}").iterdir())) == 4 for n in range(4))


def test_status_list_cancel_wait_and_download(server, tmp_path):
    submitted = cli(server, "submit", "--type", "message", "--data", "cli", "--seconds", "30",
                    cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[0]
    status = cli(server, "status", job_id, cwd=tmp_path)
    assert status.returncode == 0 and f'"id": "{job_id}"' in status.stdout
    listed = cli(server, "list", "--type", "message", cwd=tmp_path)
    assert listed.returncode == 0 and job_id in listed.stdout
    cancelled = cli(server, "cancel", job_id, cwd=tmp_path)
    assert cancelled.returncode == 0 and f"{job_id} cancelled" in cancelled.stdout
    waited = cli(server, "wait", job_id, cwd=tmp_path)
    assert waited.returncode == 1 and "cancelled" in waited.stderr
    missing = cli(server, "status", "no-such-job", cwd=tmp_path)
    assert missing.returncode == 1 and "404" in missing.stderr

    pdf = cli(server, "submit", "--type", "pdf2image", "--dpi", "20", cwd=tmp_path)
    pdf_id = pdf.stdout.split()[0]
    assert cli(server, "wait", pdf_id, cwd=tmp_path).returncode == 0
    downloaded = cli(server, "download", pdf_id, "--out", tmp_path / "d", cwd=tmp_path)
    assert downloaded.returncode == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        f"page-00{n}.png" for n in range(1, 5)]


def test_unreachable_server_and_usage_errors(tmp_path):
    env = cli_env(JOBQUEUE_URL="http://127.0.0.1:9")  # the default comes from JOBQUEUE_URL
    down = subprocess.run([*MODULE, "list"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "cannot reach http://127.0.0.1:9" in down.stderr
    usage = subprocess.run([*JOBQUEUE, "submit", "x.pdf"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "--type" in usage.stderr


def test_api_key_from_the_environment(tmp_path):
    (tmp_path / "keyed").mkdir()
    with run_server(tmp_path / "keyed", api_keys="cli-key") as server:
        env = cli_env()
        env.pop("JOBQUEUE_API_KEY", None)
        command = [*JOBQUEUE, "--url", server.url, "list"]
        refused = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=30)
        assert refused.returncode == 1 and "401" in refused.stderr
        env["JOBQUEUE_API_KEY"] = "cli-key"
        allowed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=30)
        assert allowed.returncode == 0, allowed.stderr


def test_one_command_serves_runs_a_worker_and_is_the_client(tmp_path):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["jobqueue"] == "jobqueue.cli:main"
    assert scripts["jobqueue-worker"] == "jobqueue.worker:main"
    helped = subprocess.run([*JOBQUEUE, "--help"], cwd=tmp_path, env=cli_env(),
                            capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0
    assert "{submit,status,cancel,retry,wait,download,list,serve,worker}" in helped.stdout
    for program, flag in (("serve", "--with-workers"), ("worker", "--kinds")):
        usage = subprocess.run([*JOBQUEUE, program, "--help"], cwd=tmp_path, env=cli_env(),
                               capture_output=True, text=True, timeout=30)
        assert usage.returncode == 0, usage.stderr
        assert f"usage: jobqueue {program}" in usage.stdout and flag in usage.stdout

    # The client commands load nothing of the server.
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys; from jobqueue import cli\n"
         "try: cli.main(['--url', 'http://127.0.0.1:9', 'submit', 'missing.pdf', '--type', 'x'])\n"
         "finally: print(sorted(m for m in sys.modules if m.split('.')[0] in "
         "('fastapi', 'starlette', 'uvicorn') or m in ('jobqueue.server', 'jobqueue.api')))"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=30)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    assert "no such file: missing.pdf" in loaded.stderr

    # `jobqueue serve` is the server.
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*JOBQUEUE, "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path,
            env=cli_env(JOBQUEUE_OUT_DIR=str(tmp_path / "out"), JOBQUEUE_SHUTDOWN_GRACE="0"),
            stdout=log, stderr=subprocess.STDOUT)
    try:
        cluster.wait_ready(f"http://127.0.0.1:{port}", process, log_path, STARTUP_SECONDS)
        listed = cli(Server(f"http://127.0.0.1:{port}", process, tmp_path / "out", log_path),
                     "list", cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
    finally:
        cluster.stop([process], 15, signal.SIGINT)


# ---- no server: the new flags' parsing and the status lines ---------------------------------

def test_submit_wait_takes_an_optional_number_of_seconds(tmp_path, monkeypatch):
    from jobqueue.cli import parser, split_options

    def parsed(*argv: str):
        args, options = split_options(["submit", *argv])
        return parser().parse_args(args), options

    args, options = parsed("--type", "message", "--wait", "5", "--data", "x", "--priority", "3")
    assert (args.wait, args.wait_seconds, args.priority, options) == (True, 5, 3, {"data": "x"})
    assert parsed("--type", "message", "--wait=2.5")[0].wait_seconds == 2.5
    args, _ = parsed("--wait", "a.pdf", "--type", "pdf2image")  # a FILE after a bare --wait
    assert (args.wait, args.wait_seconds, args.files) == (True, None, [Path("a.pdf")])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "7").write_bytes(b"%PDF-")  # a file named like a number is a FILE
    args, _ = parsed("--type", "pdf2image", "--wait", "7")
    assert (args.wait_seconds, args.files) == (None, [Path("7")])
    args, _ = parsed("--type", "message")
    assert (args.wait, args.wait_seconds, args.priority) == (False, None, None)


def test_status_lines_tell_attempts_retries_and_the_estimated_start():
    from datetime import datetime, timezone

    from jobqueue.cli import status_lines
    from jobqueue.client import Job

    now = datetime(2026, 12, 7, 17, 0, 0, tzinfo=timezone.utc)
    job = Job.from_json({
        "id": "j1", "jobType": "message", "status": "queued", "attempt": 1, "maxAttempts": 3,
        "queuePosition": 2, "estimatedStartSeconds": 4.5,
        "nextAttemptAt": "2026-12-07T17:00:10+00:00",
        "earlierErrors": [{"attempt": 1, "error": "OSError: flaky",
                           "finishedAt": "2026-12-07T16:59:59+00:00"}]})
    assert status_lines(job, now) == [
        "attempt 1 of 3", "next attempt at 2026-12-07T17:00:10+00:00 (in 10 s)",
        "attempt 1 failed at 2026-12-07T16:59:59+00:00: OSError: flaky",
        "estimated start in 4.5 s, position 2"]
    # A server without these fields: nothing more than the JSON.
    assert status_lines(Job.from_json({"id": "j2", "jobType": "message",
                                       "status": "queued"}), now) == []
