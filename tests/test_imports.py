"""What a process loads: a worker of the distributed engine runs jobs, not HTTP, so it never
imports FastAPI or Starlette (the code below the routes speaks data and domain errors)."""

from __future__ import annotations

import ast
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


def imports_of_each_module() -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports anywhere in it
    (at the top, in a function, under TYPE_CHECKING): `from pkg import module` counts as the
    module, not its package."""
    modules = {}
    for path in (SRC / "jobqueue").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jobqueue"):
                submodules = [f"{node.module}.{alias.name}" for alias in node.names
                              if f"{node.module}.{alias.name}" in modules]
                found.update(submodules)
                if len(submodules) < len(node.names):
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names
                             if alias.name.startswith("jobqueue"))
        graph[name] = {module for module in found if module in modules and module != name}
    return graph


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    graph = imports_of_each_module()
    assert graph["jobqueue.engines.embedded.engine"] >= {"jobqueue.engines.embedded.feed"}
    cycles = []
    for start in graph:
        path, seen = [start], set()
        stack = [(start, iter(sorted(graph[start])))]
        while stack:  # depth first, reporting the first way back to `start`
            module, following = stack[-1]
            step = next(following, None)
            if step is None:
                stack.pop()
                path.pop()
            elif step == start:
                cycles.append(" -> ".join([*path, start]))
                break
            elif step not in seen:
                seen.add(step)
                path.append(step)
                stack.append((step, iter(sorted(graph[step]))))
    assert not cycles, cycles


def test_the_built_in_kinds_use_only_the_public_api():
    """A kind imports `from jobqueue import ...` and nothing deeper (pdf2image also its own
    render child, pdfrender.py beside it), as a user's kind in a package of its own does."""
    for name in ("message", "pdf2image", "video"):
        tree = ast.parse((SRC / "jobqueue" / "kinds" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jobqueue"):
                own = node.module == "jobqueue.kinds" and \
                    [alias.name for alias in node.names] == ["pdfrender"]
                assert node.module == "jobqueue" or own, f"{name}.py imports {node.module}"
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("jobqueue") for alias in node.names)
