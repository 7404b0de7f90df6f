"""docs/kinds.md, "Your own job kind", as written: its files in an empty folder, its commands
in a venv of the user's own with jobqueue installed from this clone, its curl answers against
the server its `jobqueue serve` line starts."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

from conftest import ROOT, free_port
from jobqueue.local import cluster
from jobqueue.settings import Settings, kind_variables
from test_docs import BLOCKS, Block, check_console_at
from venvs import pip_install, user_venv

PAGE = ROOT / "docs" / "kinds.md"
FILE_HEADER = re.compile(r"#\s*([\w./-]+\.(?:py|toml))\s*")
SERVE = re.compile(r"^((?:[A-Z][A-Z0-9_]*=\S+\s+)*)jobqueue serve\s*$")
STARTUP_SECONDS = 60


def walkthrough_blocks() -> list[Block]:
    return [block for block in BLOCKS if block.path == PAGE]


def step_of(block: Block) -> str:
    """What the walkthrough does with a block: writes a file, runs commands, or checks output."""
    if block.language in ("python", "toml") and FILE_HEADER.fullmatch(
            block.text.splitlines()[0]):
        return "file"
    if block.language == "sh":
        return "commands"
    if block.language == "console":
        return "console"
    raise AssertionError(f"{block}: the walkthrough knows file blocks (```python or ```toml "
                         "starting with # path), ```sh and ```console")


def test_every_block_of_the_page_is_a_step():
    steps = [step_of(block) for block in walkthrough_blocks()]
    assert steps.count("file") >= 2 and "commands" in steps and "console" in steps, steps


def test_the_page_names_only_settings_and_the_served_kinds_limits():
    known = {f"JOBQUEUE_{name.upper()}" for name in Settings.model_fields}
    for kind in ("message", "pdf2image", "video", "shout"):
        known.update(kind_variables(kind).values())
    named = set(re.findall(r"JOBQUEUE_[A-Z0-9_]*[A-Z0-9]", PAGE.read_text()))
    assert named - known == set()


def test_the_walkthrough_serves_the_new_kind(tmp_path):
    venv = user_venv(tmp_path / "venv")
    pip_install(venv, "-e", str(ROOT))  # as `make setup` does, into the user's venv
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
           "VIRTUAL_ENV": str(venv), "JOBQUEUE_OUT_DIR": str(tmp_path / "out")}
    env.pop("PYTHONPATH", None)
    project = tmp_path / "work"
    project.mkdir()
    cwd, server, url = project, None, None
    try:
        for block in walkthrough_blocks():
            step = step_of(block)
            if step == "file":
                path = project / FILE_HEADER.fullmatch(block.text.splitlines()[0])[1]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(block.text)
            elif step == "commands":
                for line in block.text.splitlines():
                    words = shlex.split(line)
                    if not words:
                        continue
                    if words[0] == "cd":
                        cwd = cwd / words[1]
                    elif match := SERVE.match(line):
                        assert server is None, f"{block}: a second server"
                        server, url = serve(block, match[1], cwd, env, tmp_path)
                    else:
                        run(block, line, cwd, env)
            else:
                assert url is not None, f"{block}: output before `jobqueue serve`"
                check_console_at(block, url, cwd, env)
        assert server is not None, "the page starts no server"
    finally:
        if server is not None:
            cluster.stop([server], 15, signal.SIGINT)


def run(block: Block, command: str, cwd: Path, env: dict[str, str]) -> str:
    if command.startswith("pip install"):  # setuptools from the test venv, not the internet
        command += " -q --no-build-isolation"
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{block}: `{command}`\n{done.stdout}\n{done.stderr}"
    return done.stdout


def serve(block: Block, assignments: str, cwd: Path, env: dict[str, str],
          tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    variables = dict(re.findall(r"([A-Z][A-Z0-9_]*)=(\S+)", assignments))
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["jobqueue", "serve", "--port", str(port)], cwd=cwd,
            env={**env, **variables, "JOBQUEUE_RATE_LIMIT": "1000/minute"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        cluster.wait_ready(url, process, log_path, STARTUP_SECONDS)
    except BaseException:
        cluster.stop([process], 15, signal.SIGINT)
        raise
    return process, url
