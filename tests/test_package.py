"""jobqueue as a package: the wheel `python -m build` makes has everything the server reads
(its SQL, templates, static files, the bundled samples), declares its dependencies and the
`jobqueue` command, and once installed into a venv of its own serves from any folder."""

from __future__ import annotations

import email
import os
import signal
import subprocess
import sys
import zipfile

import httpx

from conftest import ROOT, free_port
from jobqueue.local import cluster
from venvs import pip_install, user_venv

STARTUP_SECONDS = 60


def test_the_wheel_installs_and_serves_outside_the_clone(tmp_path):
    # The sdist, then the wheel from it: what a release builds (and a check that the sdist
    # carries the package data too).
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation",
                            "--outdir", str(tmp_path / "dist"), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("jobqueue-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = email.message_from_bytes(archive.read(next(
            name for name in names if name.endswith(".dist-info/METADATA"))))
        entry_points = archive.read(next(
            name for name in names if name.endswith(".dist-info/entry_points.txt"))).decode()
    for needed in ("jobqueue/records.sql", "jobqueue/engines/postgres/queries.sql",
                   "jobqueue/engines/postgres/schema.sql", "jobqueue/api/templates/dashboard.html",
                   "jobqueue/kinds/samples/sample.pdf", "jobqueue/kinds/samples/sample.mp4",
                   "jobqueue/kinds/pdfrender.py", "jobqueue/children/thumbnail.py"):
        assert needed in names, f"the wheel has no {needed}"
    assert any(name.startswith("jobqueue/api/static/") for name in names)
    requires = {line.split("==")[0].split("[")[0].lower()
                for line in metadata.get_all("Requires-Dist")}
    assert {"fastapi", "uvicorn", "slowapi", "pdf2image", "ffmpeg-python", "procrastinate",
            "httpx"} <= requires, requires
    assert "jobqueue = jobqueue.cli:main" in entry_points

    venv = user_venv(tmp_path / "venv")
    pip_install(venv, str(wheel))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import jobqueue; print(jobqueue.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr  # not the clone's
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen([str(venv / "bin" / "jobqueue"), "serve", "--port", str(port)],
                                  cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        cluster.wait_ready(url, server, log_path, STARTUP_SECONDS)
        with httpx.Client(base_url=url, timeout=120) as client:
            # The bundled sample, from the installed package.
            answer = client.post("/put", json={"jobType": "pdf2image", "dpi": 30})
            assert answer.status_code == 200, answer.text
            assert answer.json()["data"]["result"]["data"]["pages"] == 4
            assert client.get("/dashboard").status_code == 200  # templates and static files
    finally:
        cluster.stop([server], 15, signal.SIGINT)
    assert (elsewhere / "out").is_dir()  # JOBQUEUE_OUT_DIR's default, in the folder it ran in
