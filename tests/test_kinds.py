"""Which kinds a server serves: JOBQUEUE_KINDS (and --kinds) by built-in name, entry point or
import path; each kind's limits from JOBQUEUE_<NAME>_* or its JobKind; a warning for a
JOBQUEUE_* variable that is no setting."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TEST_KINDS, run_server
from deployments import deploy
from jobqueue.errors import CannotStart
from jobqueue.kinds import DEFAULT_KINDS, kind_names, load_kinds
from jobqueue.settings import Settings, kind_variables, unknown_variables


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("echo"), kinds="message,echo:KIND",
                    echo_queue_size=5, mesage_workers=2) as server:
        yield server


def test_a_kind_from_an_import_path_is_served_beside_a_built_in(echo_server):
    with echo_server.client() as client:
        listed = client.get("/").json()["jobTypes"]
        assert list(listed) == ["message", "echo"]
        answer = client.post("/put", json={"jobType": "echo", "text": "hi"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["result"]["data"] == {"echo": "hi"}
        refused = client.post("/put", json={"jobType": "pdf2image"})
        assert refused.status_code == 422
        assert "valid job types: message, echo" in refused.json()["detail"]
        queues = client.get("/health").json()["queues"]
        assert set(queues) == {"message", "echo"}
        # JOBQUEUE_ECHO_QUEUE_SIZE over the kind's own 3; its workers are its own 2.
        assert queues["echo"]["capacity"] == 5
        assert queues["echo"]["workers"] == 2


def test_a_misspelt_variable_is_named_with_the_closest_setting(echo_server):
    log = echo_server.log_path.read_text()
    assert "JOBQUEUE_MESAGE_WORKERS is not a jobqueue setting (ignored); did you mean " \
           "JOBQUEUE_MESSAGE_WORKERS?" in log


def test_unknown_variables_count_settings_and_the_served_kinds_limits():
    environ = {"JOBQUEUE_OUT_DIR": "x", "JOBQUEUE_ECHO_TIMEOUT": "3", "JOBQUEUE_URL": "u",
               "JOBQUEUE_OUTDIR": "y", "JOBQUEUE_VIDEO_WORKERS": "2", "HOME": "/"}
    warnings = unknown_variables(["echo"], environ)
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("JOBQUEUE_OUTDIR is not") and "JOBQUEUE_OUT_DIR?" in warnings[0]
    assert warnings[1].startswith("JOBQUEUE_VIDEO_WORKERS is not")


def start_refused(tmp_path, kinds: str, **env: str) -> str:
    """What a server that cannot start prints: it exits without serving."""
    done = subprocess.run(
        [sys.executable, "src/main.py", "--port", "0", "--kinds", kinds], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(TEST_KINDS), "JOBQUEUE_OUT_DIR": str(tmp_path),
             **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    return done.stderr


@pytest.mark.parametrize("kinds, says", [
    ("message,nosuchkind", "unknown kind 'nosuchkind'"),
    ("broken", "unknown kind 'broken'"),
    ("broken:KIND", "the kind 'broken:KIND' failed to import broken: ModuleNotFoundError"),
    ("echo:MISSING", "echo has no 'MISSING'"),
    ("echo:NOT_A_KIND", "'echo:NOT_A_KIND' is a str, not a jobqueue.JobKind"),
    ("jobqueue.kinds", "the module jobqueue.kinds (from 'jobqueue.kinds') has no KIND"),
    (" , ", "names no kind"),
])
def test_a_kind_that_cannot_be_loaded_stops_the_start_naming_it(tmp_path, kinds, says):
    assert says in start_refused(tmp_path, kinds)


def test_a_wrong_limit_of_a_kind_stops_the_start_naming_the_variable(tmp_path):
    stderr = start_refused(tmp_path, "echo:KIND", JOBQUEUE_ECHO_WORKERS="0")
    assert "JOBQUEUE_ECHO_WORKERS: Input should be greater than or equal to 1" in stderr


def test_the_default_is_the_three_built_ins_with_their_limits():
    kinds = load_kinds(DEFAULT_KINDS)
    assert list(kinds) == ["message", "pdf2image", "video"]
    settings = Settings()
    assert [(settings.limits(kind).workers, settings.limits(kind).timeout)
            for kind in kinds.values()] == [(1, 5), (2, 60), (1, 300)]


@pytest.fixture
def echo_kind(monkeypatch):
    """Adds a variant of tests/kinds/echo.py's kind to that module, as `echo:<ATTRIBUTE>`."""
    monkeypatch.syspath_prepend(str(TEST_KINDS))
    echo = importlib.import_module("echo")

    def add(attribute: str, **changes: str) -> None:
        monkeypatch.setattr(echo, attribute, dataclasses.replace(echo.KIND, **changes),
                            raising=False)
    return add


def test_two_kinds_of_one_name_are_refused(echo_kind):
    echo_kind("OTHER", description="another")
    with pytest.raises(CannotStart, match="two kinds are named 'echo'"):
        load_kinds("echo:KIND,echo:OTHER")
    assert list(load_kinds("echo:KIND,echo:SECOND")) == ["echo"]  # the same kind twice


def test_the_readme_table_lists_every_setting_once():
    rows = re.findall(r"^\| `(JOBQUEUE_[A-Z0-9_<>]+)`", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) == len(set(rows))
    expected = {f"JOBQUEUE_{name.upper()}" for name in Settings.model_fields}
    expected |= set(kind_variables("<NAME>").values())
    assert set(rows) == expected


def test_a_distributed_worker_runs_a_kind_from_an_import_path(tmp_path, postgres):
    with deploy("postgres", tmp_path, postgres, workers=1,
                kinds="echo:KIND,message") as cluster, cluster.client() as client:
        answer = client.post("/put", json={"jobType": "echo", "text": "far"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["result"]["data"] == {"echo": "far"}
        assert list(client.get("/").json()["jobTypes"]) == ["echo", "message"]


def test_a_kind_whose_limit_would_be_a_setting_is_refused(echo_kind):
    echo_kind("HEADER", name="header")
    with pytest.raises(CannotStart, match="whose limit JOBQUEUE_HEADER_TIMEOUT is a setting"):
        load_kinds("echo:HEADER")


def test_the_typo_guard_knows_kinds_by_their_names_whatever_their_entries(monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_KINDS))
    # Spaces, an import path (the kind it names is `echo`), one this process cannot load.
    assert kind_names(" message , echo:SECOND,elsewhere.kinds:OCR") == ["message", "echo", "ocr"]
