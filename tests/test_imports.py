"""What a process loads: a worker of the distributed engine runs jobs, not HTTP, so it never
imports FastAPI or Starlette (the code below the routes speaks data and domain errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

LOADED_WEB = """
import json, sys
import jobqueue.worker
import jobqueue.files.objects  # what a worker loads with object storage
print(json.dumps(sorted(name for name in sys.modules
                        if name.split(".")[0] in ("fastapi", "starlette"))))
"""


def test_a_worker_process_never_imports_fastapi_or_starlette():
    done = subprocess.run([sys.executable, "-c", LOADED_WEB], capture_output=True, text=True,
                          timeout=60, cwd=SRC, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [], "imported by jobqueue.worker"
