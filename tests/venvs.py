"""A virtual environment of a user's own, as `python -m venv` makes one, with jobqueue installed
into it the way a user installs it (from the clone, or a wheel)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def user_venv(folder: Path) -> Path:
    """A new venv in `folder`. It sees the test venv's packages through a .pth file, so that
    installing jobqueue (`--no-deps`) fetches nothing, and its `pip` is the test venv's pip
    run by its own python (pip installs into the environment of the python that runs it)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True,
                   timeout=120)
    site = next((folder / "lib").glob("python3*/site-packages"))
    # A plain path, not a site dir: the test venv's own .pth files (its editable jobqueue
    # among them) are not read, so jobqueue is only what this venv installs.
    (site / "test-venv-packages.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n")
    pip = folder / "bin" / "pip"
    pip.write_text(f'#!/bin/sh\nexec "{folder}/bin/python" -m pip "$@"\n')
    pip.chmod(0o755)
    return folder


def pip_install(venv: Path, *args: str, cwd: Path = ROOT) -> None:
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps",
                           "--no-build-isolation", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
