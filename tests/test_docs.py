"""Every fenced code block in docs/*.md is run or checked here, by its info string:

- ```python: executed. A block whose first line names a module (`# src/jobqueue/kinds/ocr.py`)
  is loaded as that module and its `KIND`'s handler is run (a stand-in `tesseract` on PATH);
  one naming a module that exists (`kinds/__init__.py`) is an excerpt, run in that module's
  namespace and compared with it; any other block is a client, run against the docs' server in
  a folder holding the files it names, and every file it writes must be there afterwards.
- ```sh: run with `bash -eo pipefail` against the docs' server (`localhost:8000` is its address,
  `<id>` a finished job's, `.venv/bin/` this interpreter's folder; curl fails on an HTTP error).
  `VAR=… make run` starts a server of its own with those settings. A block that starts
  `src/main.py` and `jobqueue-worker` runs as written on the suite's PostgreSQL and redis and
  must run a job. A block of `export`s only is configuration: checked against `Settings`.
- ```console: each `$ command` runs the same way; its output must match the lines shown
  (`…` stands for anything, progress bars are left out).
- ```json: parses. `json answer METHOD PATH BODY` is an answer: the same request to the docs'
  server must answer the same shape (keys, and types of values).
- ```html: parses; each `src`/`href` is fetched from the docs' server.
- ```yaml prometheus-scrape|prometheus-rules (Prometheus is not run here): parsed, its structure
  checked, and every jobqueue_ metric, label and label value it uses must be in /metrics.
- ```text usage|diagram|object-keys|layout: a usage line is checked against the client's
  argparse, a diagram's paths, settings and kinds against the code, object keys against
  files/objects.py, a layout against the files (every package module must be listed).

Every `JOBQUEUE_*` name in any block must be a setting (or one the client reads), every
`OTEL_*` name one the OpenTelemetry SDK reads. A block with any other info string fails, naming
its file and line.
"""

from __future__ import annotations

import html.parser
import importlib
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import opentelemetry.environment_variables as otel_api_variables
import opentelemetry.sdk.environment_variables as otel_sdk_variables
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from conftest import DATA, ROOT, free_port, run_server, wait_finished
from jobqueue.errors import BadInput, JobCancelled
from jobqueue.jobs import JobKind, Output
from jobqueue.kinds import DEFAULT_KINDS, load_kinds
from jobqueue.local import cluster
from jobqueue.settings import Settings, kind_limits, kind_variables

DOCS = ROOT / "docs"
PACKAGE = ROOT / "src" / "jobqueue"
VENV_BIN = Path(sys.executable).parent
METRICS_TOKEN = "docs-metrics-token"
KINDS = load_kinds(DEFAULT_KINDS)
# The settings, and each built-in kind's JOBQUEUE_<NAME>_WORKERS, _QUEUE_SIZE and _TIMEOUT.
SETTINGS = {f"JOBQUEUE_{name.upper()}" for name in Settings.model_fields} | {
    variable for name in KINDS for variable in kind_variables(name).values()}
# Read by the command-line client, not the server.
CLIENT_VARIABLES = set(re.findall(r'environ\.get\("(JOBQUEUE_\w+)"',
                                  (PACKAGE / "cli.py").read_text()))
FENCE = re.compile(r"^(\s*)```(.*)$")
# The standard variables the OpenTelemetry API and SDK read (docs/monitoring.md#traces).
OTEL_VARIABLES = {value for module in (otel_api_variables, otel_sdk_variables)
                  for name, value in vars(module).items() if name.startswith("OTEL_")}


@dataclass
class Block:
    path: Path
    line: int
    info: str
    text: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info else ""

    @property
    def tags(self) -> list[str]:
        return self.info.split()[1:]

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def find_blocks() -> list[Block]:
    blocks = []
    for path in sorted(DOCS.glob("*.md")):
        lines = path.read_text().splitlines()
        number = 0
        while number < len(lines):
            if match := FENCE.match(lines[number]):
                indent, info, start, body = match[1], match[2].strip(), number + 1, []
                number += 1
                while number < len(lines) and not lines[number].strip().startswith("```"):
                    line = lines[number]
                    body.append(line[len(indent):] if line.startswith(indent) else line)
                    number += 1
                assert number < len(lines), f"{path.relative_to(ROOT)}:{start}: unclosed ```"
                blocks.append(Block(path, start, info, "\n".join(body) + "\n"))
            number += 1
    return blocks


BLOCKS = find_blocks()


def test_blocks_found():
    assert len(BLOCKS) > 15, [str(block) for block in BLOCKS]


# Inputs the docs' examples name, in the folder each block runs in.
def _not_a_pdf(path: Path) -> None:
    path.write_text("Meeting notes, typed as text and saved with the wrong name.\n" * 20)


INPUTS = {"scan.pdf": DATA / "sample.pdf", "a.pdf": DATA / "sample.pdf",
          "b.pdf": DATA / "sample.pdf", "holiday.mov": DATA / "sample.mp4",
          "notes.pdf": _not_a_pdf}


@dataclass
class Docs:
    """What the blocks run against: one server for them all, made once, and its jobs."""

    url: str
    folder: Path
    request: pytest.FixtureRequest
    _jobs: dict[str, str] = field(default_factory=dict)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def job(self, kind: str) -> str:
        """The id of a succeeded job of `kind` on its bundled sample (video: a small one)."""
        if kind in self._jobs:  # unless a block deleted it
            with self.client() as client:
                if client.get(f"/jobs/{self._jobs[kind]}").status_code == 404:
                    del self._jobs[kind]
        if kind not in self._jobs:
            body = {"jobType": kind, **({"width": 320} if kind == "video" else {})}
            with self.client() as client:
                answer = client.post("/jobs", json=body)
                assert answer.status_code == 202, answer.text
                job = wait_finished(client, answer.json()["id"], 120)
            assert job["status"] == "succeeded", job
            self._jobs[kind] = job["id"]
        return self._jobs[kind]

    def workdir(self) -> Path:
        folder = self.folder / "runs" / uuid.uuid4().hex[:8]
        folder.mkdir(parents=True)
        for name, source in INPUTS.items():
            if callable(source):
                source(folder / name)
            else:
                (folder / name).symlink_to(source)
        return folder


@pytest.fixture(scope="module")
def docs(tmp_path_factory, request) -> Iterator[Docs]:
    folder = tmp_path_factory.mktemp("docs")
    with run_server(folder / "server", metrics_token=METRICS_TOKEN) as server:
        yield Docs(server.url, folder, request)


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_block(block: Block, docs: Docs):
    if block.path == DOCS / "kinds.md":  # one walkthrough, run by tests/test_own_kind.py
        return
    check = CHECKS.get(block.language)
    if check is None:
        pytest.fail(f"{block}: no check for a ```{block.info} block; give it an info string "
                    f"tests/test_docs.py knows ({', '.join(sorted(CHECKS))})")
    check_setting_names(block)
    check(block, docs)


# --- names -------------------------------------------------------------------------------

def check_setting_names(block: Block) -> None:
    for name in set(re.findall(r"JOBQUEUE_[A-Z0-9_<>]*[A-Z0-9>]", block.text)):
        expansions = ([name.replace("<KIND>", kind.upper()) for kind in KINDS]
                      if "<KIND>" in name else [name])
        for expansion in expansions:
            assert expansion in SETTINGS | CLIENT_VARIABLES, \
                f"{block}: {expansion} is not a setting (src/jobqueue/settings.py)"


def check_environment(block: Block, assignments: dict[str, str]) -> None:
    """A configuration block: its JOBQUEUE_* values are settings, and valid ones."""
    values = {}
    for name, value in assignments.items():
        if name.startswith("JOBQUEUE_"):
            assert name in SETTINGS, f"{block}: {name} is not a setting"
            field = name.removeprefix("JOBQUEUE_").lower()
            if field in Settings.model_fields:
                values[field] = value
        elif name.startswith("OTEL_"):
            assert name in OTEL_VARIABLES, f"{block}: {name} is no OpenTelemetry SDK variable"
        else:
            assert name.startswith("AWS_"), f"{block}: what reads {name}?"
    try:
        Settings(**values)
        for kind in KINDS.values():
            kind_limits(kind, assignments)
    except ValueError as error:
        pytest.fail(f"{block}: these settings are refused: {error}")


ASSIGNMENT = re.compile(r"([A-Z][A-Z0-9_]*)=(\S*)")


def exports(text: str) -> dict[str, str] | None:
    """The variables of a block of `export A=1 B=2` lines (and comments), else None."""
    found = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not line.startswith("export "):
            return None
        found.update(ASSIGNMENT.findall(line))
    return found


# --- python -------------------------------------------------------------------------------

def check_python(block: Block, docs: Docs) -> None:
    first = block.text.splitlines()[0]
    if match := re.fullmatch(r"# src/(jobqueue/[\w/]+)\.py", first.strip()):
        module = match[1].replace("/", ".").removesuffix(".__init__")
        if (ROOT / "src" / f"{match[1]}.py").exists():
            check_excerpt(block, module)
        else:
            check_new_kind(block, module, docs)
        return
    run_client_script(block, docs)


# Modules the docs define, by name: a later excerpt may use them (`ocr.KIND`).
DOC_MODULES: dict[str, types.ModuleType] = {}


def load_doc_module(block: Block, name: str) -> types.ModuleType:
    if name not in DOC_MODULES:
        module = types.ModuleType(name)
        module.__file__ = str(block.path)
        exec(compile(block.text, str(block), "exec"), module.__dict__)
        DOC_MODULES[name] = module
    return DOC_MODULES[name]


@dataclass
class DocJob:
    """The JobContext a handler gets, as the engines give it."""

    options: BaseModel
    input_path: Path | None
    out_dir: Path
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    settings: Settings = field(default_factory=Settings)
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    progress: list[tuple[float, float, str]] = field(default_factory=list)

    def set_progress(self, done: float, total: float, unit: str) -> None:
        self.progress.append((done, total, unit))

    def raise_if_cancelled(self) -> None:
        if self.cancel_requested.is_set():
            raise JobCancelled()

    def attach_process(self, process: subprocess.Popen) -> None:
        pass

    def detach_process(self, process: subprocess.Popen) -> None:
        pass


def check_new_kind(block: Block, name: str, docs: Docs) -> None:
    """A new kind module: load it, then run its handler with and without an input."""
    module = load_doc_module(block, name)
    kind = module.KIND
    assert isinstance(kind, JobKind), f"{block}: KIND is not a JobKind"
    assert name.rsplit(".", 1)[-1] == kind.name
    assert issubclass(kind.options, BaseModel)
    assert kind.sample is None or kind.sample.exists(), f"{block}: no {kind.sample}"
    # The programs the handler runs, as stand-ins that write what they were asked for.
    folder = docs.workdir()
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    programs = set(re.findall(r'\[\s*"([\w-]+)"', block.text))
    for program in programs:
        stand_in = bin_dir / program
        stand_in.write_text('#!/bin/sh\nprintf "recognised text\\n" > "$2.txt"\n')
        stand_in.chmod(0o755)
    image = folder / "input" / "scan.png"
    image.parent.mkdir()
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    options = kind.options()
    for out_dir in ("out-1", "out-2"):  # the engines make it before the handler runs
        (folder / out_dir).mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        output = kind.handler(DocJob(options, image, folder / "out-1"))
        if kind.sample is None:
            with pytest.raises(BadInput):
                kind.handler(DocJob(options, None, folder / "out-2"))
    assert isinstance(output, Output), f"{block}: the handler returned {output!r}"
    json.dumps(output.data)
    assert output.files and all(path.is_file() for path in output.files), output


def check_excerpt(block: Block, name: str) -> None:
    """An excerpt of a module that exists: run where it stands; what it assigns must be what
    the module has, plus what the docs' own modules add."""
    real = importlib.import_module(name)
    for other in BLOCKS:  # the modules the same page defined before, whatever ran first
        header = re.fullmatch(r"# src/(jobqueue/[\w/]+)\.py", other.text.splitlines()[0])
        if other.path == block.path and other.line < block.line and header \
                and not (ROOT / "src" / f"{header[1]}.py").exists():
            load_doc_module(other, header[1].replace("/", "."))
    namespace = {**vars(real), **{doc.rsplit(".", 1)[-1]: module
                                  for doc, module in DOC_MODULES.items()}}
    assigned = set(re.findall(r"^(\w+)\s*[:=]", block.text, re.M))
    assert assigned, f"{block}: assigns nothing"
    with pytest.MonkeyPatch.context() as patch:  # so that the excerpt may import them
        for doc, module in DOC_MODULES.items():
            patch.setitem(sys.modules, doc, module)
        exec(compile(block.text, str(block), "exec"), namespace)
    added = {module.KIND.name for module in DOC_MODULES.values() if hasattr(module, "KIND")}
    for variable in assigned:
        ours, theirs = namespace[variable], getattr(real, variable)
        if isinstance(theirs, dict):
            assert {k: v for k, v in ours.items() if k not in added} == theirs, variable
        else:
            assert ours == theirs, variable


def run_client_script(block: Block, docs: Docs) -> None:
    folder = docs.workdir()
    code = localize(block.text, docs.url, None)
    written = re.findall(r'open\("([^"]+)", "wb"\)', code)
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True,
                            text=True, timeout=180, env=child_env(docs.url))
    assert result.returncode == 0, f"{block}:\n{result.stdout}\n{result.stderr}"
    for name in written:
        assert (folder / name).stat().st_size > 0, f"{block}: {name} is empty"


# --- shell --------------------------------------------------------------------------------

def localize(text: str, url: str, job_id: str | None) -> str:
    """The docs' example addresses, ids and paths, made this test's."""
    address = urlsplit(url).netloc
    text = re.sub(r"http://(localhost|127\.0\.0\.1):8000", url, text)
    text = re.sub(r"\b(localhost|127\.0\.0\.1):8000", address, text)
    text = text.replace(".venv/bin/", f"{VENV_BIN}/")
    if job_id:
        text = text.replace("<id>", job_id)
    return text


def child_env(url: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "JOBQUEUE_URL": url, **extra}


PRELUDE = """set -eo pipefail
curl() { command curl --fail-with-body --show-error --max-time 120 "$@"; }
"""


def run_bash(block: Block, script: str, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(["bash", "-c", PRELUDE + script], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, \
        f"{block}: exit {result.returncode}\n{script}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


MAKE_RUN = re.compile(r"^((?:[A-Z][A-Z0-9_]*=\S+\s+)*)make run\s*$")


def check_shell(block: Block, docs: Docs) -> None:
    if (assignments := exports(block.text)) is not None:
        check_environment(block, assignments)
        printed = run_bash(block, block.text + "env\n", docs.workdir(), dict(os.environ))
        for name, value in assignments.items():
            assert f"{name}={value}" in printed.splitlines()
        return
    if re.search(r"src/main\.py|jobqueue-worker", block.text):
        check_deployment(block, docs)
        return
    lines = block.text.splitlines()
    if match := MAKE_RUN.match(lines[0]):
        settings = dict(ASSIGNMENT.findall(match[1]))
        check_environment(block, settings)
        folder = docs.workdir()
        with run_server(folder / "server", **{name.removeprefix("JOBQUEUE_").lower(): value
                                             for name, value in settings.items()}) as server:
            run_commands(block, "\n".join(lines[1:]), server.url, None, folder)
        return
    run_commands(block, block.text, docs.url, docs.job("pdf2image"), docs.workdir())


def run_commands(block: Block, text: str, url: str, job_id: str | None, folder: Path) -> None:
    script = localize(text, url, job_id)
    run_bash(block, script, folder, child_env(url))
    # "# saves NAME": the command left NAME in its folder.
    for name in re.findall(r"#\s*saves (\S+)", script):
        assert (folder / name).stat().st_size > 0, f"{block}: {name} was not saved"


def check_deployment(block: Block, docs: Docs) -> None:
    """The distributed mode's commands, as written, on the suite's PostgreSQL and redis."""
    postgres = docs.request.getfixturevalue("postgres")
    redis = docs.request.getfixturevalue("redis")
    folder = docs.workdir()
    ours = {"JOBQUEUE_DATABASE_URL": postgres.new_database(),
            "JOBQUEUE_OUT_DIR": str(folder / "shared"),
            "JOBQUEUE_RATE_LIMIT_STORAGE": redis}
    setup, commands = [], []
    for line in block.text.splitlines():
        if line.startswith("export "):
            names = dict(ASSIGNMENT.findall(line))
            check_environment(block, names)
            assert set(names) <= set(ours), f"{block}: what would {names} be here?"
            setup.append(ASSIGNMENT.sub(lambda m: f"{m[1]}={ours[m[1]]}", line))
        elif command := line.split("#", 1)[0].strip():
            commands.append(command)
    assert any("src/main.py" in line for line in commands), block
    assert any("jobqueue-worker" in line for line in commands), block
    env = {**child_env(docs.url), "JOBQUEUE_SHUTDOWN_GRACE": "0"}
    env.pop("JOBQUEUE_URL")
    processes, replica = [], None
    try:
        for number, command in enumerate(commands):
            command = localize(command, docs.url, None)
            if "src/main.py" in command:
                port = free_port()
                command = command.replace("0.0.0.0", "127.0.0.1") + f" --port {port}"
                replica = f"http://127.0.0.1:{port}"
            log = (folder / f"process-{number}.log").open("wb")
            processes.append(subprocess.Popen(
                ["bash", "-c", "\n".join([*setup, "exec " + command])], cwd=ROOT, env=env,
                stdout=log, stderr=subprocess.STDOUT))
        assert replica
        main = processes[[i for i, c in enumerate(commands) if "src/main.py" in c][0]]
        cluster.wait_ready(replica, main, folder / f"process-{processes.index(main)}.log")
        with httpx.Client(base_url=replica, timeout=60) as client:
            answer = client.post("/jobs", json={"jobType": "pdf2image", "dpi": 50})
            assert answer.status_code == 202, answer.text
            job = wait_finished(client, answer.json()["id"], 120)
        assert job["status"] == "succeeded", (job, logs(folder))
    finally:
        cluster.stop(processes, 15)


def logs(folder: Path) -> str:
    return "\n".join(path.read_text(errors="replace") for path in folder.glob("*.log"))


# --- console ------------------------------------------------------------------------------

PROGRESS = re.compile(r"━|\d+:\d\d:\d\d$")


def check_console(block: Block, docs: Docs) -> None:
    check_console_at(block, docs.url, docs.workdir(), child_env(docs.url, COLUMNS="100"))


def check_console_at(block: Block, url: str, folder: Path, env: dict[str, str]) -> None:
    """Each `$ ` command of a console block, run in `folder` against the server at `url`,
    prints the lines shown below it."""
    sessions: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            sessions.append((line[2:], []))
        else:
            assert sessions, f"{block}: output before any `$ ` command"
            sessions[-1][1].append(line)
    for command, expected in sessions:
        script = localize(command, url, None)
        result = subprocess.run(["bash", "-c", script], cwd=folder, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=180, env=env)
        got = [line.rstrip() for line in result.stdout.splitlines()]
        got = [line for line in got if line and not PROGRESS.search(line)]
        wanted = [line for line in expected if not PROGRESS.search(line)]
        patterns = [pattern_of(line) for line in wanted]
        assert len(got) == len(patterns) and all(
            pattern.fullmatch(line) for pattern, line in zip(patterns, got)), \
            f"{block}: `{command}` printed\n" + "\n".join(got) + "\nnot\n" + "\n".join(wanted)


def pattern_of(line: str) -> re.Pattern:
    """`…` stands for anything; `8c3e0a61-…` for a job id."""
    pieces = re.split(r"(\b[0-9a-f]{8}-…|…)", line)
    return re.compile("".join(
        "[0-9a-f-]{36}" if piece.endswith("-…") else ".*?" if piece == "…" else re.escape(piece)
        for piece in pieces))


# --- json ---------------------------------------------------------------------------------

def check_json(block: Block, docs: Docs) -> None:
    try:
        shown = json.loads(block.text)
    except ValueError as error:
        pytest.fail(f"{block}: not JSON: {error}")
    if not block.tags:
        return
    assert block.tags[0] == "answer", f"{block}: unknown json tag {block.tags[0]}"
    method, path, *body = block.info.split(maxsplit=4)[2:]
    with docs.client() as client:
        answer = client.request(method, path, json=json.loads(body[0]) if body else None)
    assert answer.status_code < 300, f"{block}: {answer.status_code} {answer.text}"
    assert_same_shape(block, shown, answer.json(), "")


def assert_same_shape(block: Block, shown: Any, real: Any, where: str) -> None:
    if isinstance(shown, dict):
        assert isinstance(real, dict), f"{block}: {where or 'the answer'} is {real!r}"
        assert set(shown) == set(real), \
            f"{block}: {where or 'the answer'} has keys {sorted(real)}, the doc {sorted(shown)}"
        for key in shown:
            assert_same_shape(block, shown[key], real[key], f"{where}.{key}")
    elif isinstance(shown, list):
        assert isinstance(real, list) and real, f"{block}: {where} is {real!r}"
        for item in real:
            assert_same_shape(block, shown[0], item, f"{where}[]")
    elif isinstance(shown, bool) or shown is None:
        assert real is shown or isinstance(real, type(shown)), f"{block}: {where} is {real!r}"
    elif isinstance(shown, (int, float)):
        assert isinstance(real, (int, float)) and not isinstance(real, bool), \
            f"{block}: {where} is {real!r}"
    else:
        assert isinstance(real, type(shown)), f"{block}: {where} is {real!r}"


# --- html ---------------------------------------------------------------------------------

class Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [value for name, value in attrs if name in ("src", "href") and value]


def check_html(block: Block, docs: Docs) -> None:
    parser = Links()
    parser.feed(block.text)
    parser.close()
    assert parser.links, f"{block}: links to nothing"
    kind = "video" if "preview.mjpg" in block.text else "pdf2image"
    for link in parser.links:
        url = localize(link, docs.url, docs.job(kind))
        with httpx.stream("GET", url, timeout=60) as answer:
            assert answer.status_code == 200, f"{block}: {link}: {answer.status_code}"
            if "mjpg" in link:
                assert answer.headers["content-type"].startswith("multipart/x-mixed-replace")
                head = b""
                for chunk in answer.iter_bytes():
                    head += chunk
                    if b"\xff\xd8" in head:
                        break
                assert b"\xff\xd8" in head, f"{block}: {link} sent no JPEG"


# --- yaml: Prometheus, which is not run here ----------------------------------------------

def scrape(docs: Docs) -> dict[str, list[dict[str, str]]]:
    """The docs' server's metrics: sample name -> the labels of each of its samples."""
    answer = httpx.get(f"{docs.url}/metrics", timeout=30,
                       headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert answer.status_code == 200, answer.text
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)
            samples.setdefault(family.name, []).append(sample.labels)
    return samples


def check_yaml(block: Block, docs: Docs) -> None:
    try:
        data = yaml.safe_load(block.text)
    except yaml.YAMLError as error:
        pytest.fail(f"{block}: not YAML: {error}")
    tag = block.tags[0] if block.tags else ""
    if tag == "prometheus-scrape":
        assert data["scrape_configs"], block
        for job in data["scrape_configs"]:
            assert isinstance(job["job_name"], str)
            if "authorization" in job:
                assert job["authorization"]["type"] == "Bearer"
            for static in job["static_configs"]:
                for target in static["targets"]:
                    assert re.fullmatch(r"[\w.-]+:\d+", target), f"{block}: target {target}"
        assert "/" in job.get("metrics_path", "/metrics")
    elif tag == "prometheus-rules":
        samples = scrape(docs)
        for group in data["groups"]:
            assert isinstance(group["name"], str)
            for rule in group["rules"]:
                assert isinstance(rule["alert"], str) and isinstance(rule["expr"], str)
                assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule
                check_promql(block, rule["expr"], samples)
    else:
        pytest.fail(f"{block}: a yaml block needs a tag this test knows: prometheus-scrape, "
                    "prometheus-rules")


def check_promql(block: Block, expr: str, samples: dict[str, list[dict[str, str]]]) -> None:
    names = re.findall(r"\b(jobqueue_\w+)", expr)
    assert names, f"{block}: {expr} uses no jobqueue_ metric"
    labels: set[str] = set()
    for name in names:
        assert name in samples, f"{block}: there is no metric {name} in /metrics"
        labels |= {label for sample in samples[name] for label in sample}
    for grouping in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
        for label in grouping.split(","):
            assert label.strip() in labels, f"{block}: no label {label.strip()} in {names}"
    for name, matchers in re.findall(r"\b(jobqueue_\w+)\{([^}]*)\}", expr):
        for label, operator, value in re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', matchers):
            seen = {sample.get(label) for sample in samples[name]}
            for alternative in value.split("|") if operator == "=~" else [value]:
                assert alternative in seen, f"{block}: {name} has no {label}={alternative!r}"


# --- text: usage lines, diagrams, object keys, layouts ------------------------------------

def client_help(*command: str) -> str:
    result = subprocess.run([sys.executable, "-m", "jobqueue.client", *command, "--help"],
                            capture_output=True, text=True, env=child_env(""), timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def check_usage(block: Block) -> None:
    first, *rest = block.text.splitlines()
    # `jobqueue` (the console script) and `python -m jobqueue.client` are the same command.
    assert first.startswith(("jobqueue ", "python -m jobqueue.client ")), f"{block}: {first}"
    main = client_help()
    for option in re.findall(r"--[\w-]+", first):
        assert option in main, f"{block}: the client has no {option}"
    commands = set(re.search(r"\{([\w,]+)\}", main)[1].split(","))
    shown = set()
    for line in rest:
        command, *_ = line.split()
        shown.add(command)
        assert command in commands, f"{block}: the client has no command {command}"
        usage = client_help(command)
        for option in re.findall(r"--[\w-]+", line):
            assert option in usage or option == "--OPTION", \
                f"{block}: `{command}` has no {option}"
    assert shown == commands, f"{block}: shows {sorted(shown)}, the client has {sorted(commands)}"


def check_paths(block: Block, text: str) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for path in re.findall(r"(?<![\w/.<-])((?:[\w-]+/)*[\w-]+\.(?:py|md|sql|html|js))\b", text):
        assert any((base / path).exists() for base in (ROOT, ROOT / "src", PACKAGE)), \
            f"{block}: there is no {path}"
    for script in re.findall(r"\b(jobqueue(?:-\w+)?)\s+--", text):
        assert script in scripts, f"{block}: there is no command {script}"
    for kinds in re.findall(r"--kinds\s+([\w,]+)", text):
        assert set(kinds.split(",")) <= set(KINDS), f"{block}: --kinds {kinds}"


def check_object_keys(block: Block) -> None:
    """Each key the doc shows is one files/objects.py's docstring lists, and each piece of
    it that is not a placeholder is in the code that makes the keys."""
    objects = PACKAGE / "files" / "objects.py"
    module = importlib.import_module("jobqueue.files.objects")
    listed = {line.split()[0] for line in module.__doc__.splitlines()
              if line.strip().startswith("jobs/")}
    source = objects.read_text()
    for line in block.text.splitlines():
        if not line.strip():
            continue
        key = re.sub(r"^(<?prefix>?/)", "", line.split()[0])
        assert key in listed, f"{block}: {key} is not one of {sorted(listed)} (files/objects.py)"
        for piece in re.split(r"<\w+>|/", key):
            assert not piece or piece in source, f"{block}: {piece} is not in {objects}"


def check_layout(block: Block) -> None:
    """A listing of the package: every entry exists, the files a line names are in its entry,
    and every folder and module of the package is listed."""
    listed, entry = set(), None
    for line in block.text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            entry = ROOT / line.split()[0]
            assert entry.exists(), f"{block}: there is no {line.split()[0]}"
            listed.add(entry)
        folder = entry if entry.is_dir() else entry.parent
        for name in re.findall(r"\b([\w/]+\.py)\b", line.split(maxsplit=1)[-1]):
            assert (ROOT / name).exists() or next(folder.rglob(name), None), \
                f"{block}: there is no {name} in {folder.relative_to(ROOT)}"
    modules = {path for path in [*PACKAGE.iterdir(), *(PACKAGE / "engines").iterdir(),
                                 *(PACKAGE / "api").iterdir()]
               if (path.suffix == ".py" and path.parent == PACKAGE and path.name != "__init__.py")
               or (path.is_dir() and (path / "__init__.py").exists())}
    missing = sorted(str(path.relative_to(ROOT)) for path in modules - listed)
    assert not missing, f"{block}: does not list {missing}"


def check_text(block: Block, docs: Docs) -> None:
    tag = block.tags[0] if block.tags else ""
    if tag == "usage":
        check_usage(block)
    elif tag == "diagram":
        check_paths(block, block.text)
    elif tag == "object-keys":
        check_object_keys(block)
    elif tag == "layout":
        check_layout(block)
    else:
        pytest.fail(f"{block}: a text block needs a tag this test knows: usage, diagram, "
                    "object-keys, layout")


CHECKS = {"python": check_python, "sh": check_shell, "console": check_console,
          "json": check_json, "html": check_html, "yaml": check_yaml, "text": check_text}
