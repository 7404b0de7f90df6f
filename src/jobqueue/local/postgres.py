"""A PostgreSQL server of the project's own, for `make cluster` and the tests: Debian's
`postgresql` package, initialised in a folder of ours and run in the foreground as a child
process, so it dies with whatever started it.

initdb and postgres refuse to run as root: as root, both run as the `postgres` user (the
package creates it), and the folder is handed to that user.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import psycopg

DATABASE = "jobqueue"
USER = "jobqueue"
START_SECONDS = 30


def binary(name: str) -> str:
    """A PostgreSQL server program: from the newest /usr/lib/postgresql/<version>/bin (where
    Debian keeps them, off the PATH), else the PATH."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda path: int(Path(path).parts[4]) if Path(path).parts[4].isdigit()
                   else 0)
    path = found[-1] if found else shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; `apt-get install postgresql` (make test "
                           "and make cluster do it)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalPostgres:
    """`folder` holds the data (made by initdb once) and the server's socket."""

    def __init__(self, folder: Path, port: int | None = None, fast: bool = False):
        self.folder = folder.resolve()
        self.port = port or free_port()
        self.fast = fast  # no fsync: for tests, whose data may be lost with a crash
        self.process: subprocess.Popen | None = None
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def new_database(self) -> str:
        """A fresh, empty database on this server (a deployment of its own in a test or a
        benchmark); its URL."""
        name = f"jq_{uuid.uuid4().hex[:12]}"
        base = self.url.rsplit("/", 1)[0]
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"{base}/{name}"

    def _user_prefix(self, die_with_parent: bool = False) -> list[str]:
        # setpriv, not su: no session, and the server stays our direct child. The death signal
        # is set in the same setpriv, after the user changes (a change of user clears it).
        death = ["--pdeathsig", "KILL"] if die_with_parent else []
        if not self._as_postgres:
            return ["setpriv", *death, "--"] if death else []
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *death, "--"]

    def init(self) -> None:
        data = self.folder / "data"
        if (data / "PG_VERSION").exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
        subprocess.run([*self._user_prefix(), binary("initdb"), "-D", str(data), "-U", USER,
                        "--auth=trust", "-E", "UTF8", "--no-instructions"],
                       check=True, capture_output=True)

    def start(self) -> None:
        """Start the server as a child (it dies with this process) and wait until it takes
        connections; make the database on its first start."""
        self.init()
        args = [binary("postgres"), "-D", str(self.folder / "data"), "-p", str(self.port),
                "-k", str(self.folder), "-c", "listen_addresses=127.0.0.1",
                "-c", "max_connections=200"]
        if self.fast:
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off"]
        log_file = (self.folder / "postgres.log").open("ab")
        self.process = subprocess.Popen(self._user_prefix(die_with_parent=True) + args,
                                        stdin=subprocess.DEVNULL, stdout=log_file,
                                        stderr=subprocess.STDOUT,
                                        # a terminal's Ctrl-C is for whoever started it, who
                                        # stops the server after its clients
                                        start_new_session=True)
        log_file.close()
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                with psycopg.connect(f"postgresql://{USER}@127.0.0.1:{self.port}/postgres",
                                     autocommit=True, connect_timeout=2) as conn:
                    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                          (DATABASE,)).fetchone()
                    if not exists:
                        conn.execute(f"CREATE DATABASE {DATABASE}")
                return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not start:\n"
                                       + (self.folder / "postgres.log").read_text()[-3000:])
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server (a fast shutdown: open connections are cut)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: it does not wait for clients
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
