"""Traces (OpenTelemetry, OTLP over HTTP) and JSON log lines, against a real OTLP/HTTP
receiver on loopback: one trace from the submitting request to the job's child processes, in
the embedded server and across processes in the distributed mode; nothing at all without the
OTEL_* variables."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from conftest import DATA, ROOT, eventually, free_port, run_server, wait_finished
from deployments import deploy
from jobqueue import tracing


@dataclass(frozen=True)
class Span:
    name: str
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]


def _value(any_value) -> object:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces, protobuf bodies (gzip or not)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                export = ExportTraceServiceRequest.FromString(body)
                spans = []
                for resource_spans in export.resource_spans:
                    resource = {a.key: _value(a.value)
                                for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            spans.append(Span(
                                span.name, str(resource.get("service.name")),
                                span.trace_id.hex(), span.span_id.hex(),
                                span.parent_span_id.hex(),
                                {a.key: _value(a.value) for a in span.attributes}))
                with lock:
                    receiver.spans.extend(spans)
                    receiver.requests += 1
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def env(self, **extra: str) -> dict[str, str]:
        """OTEL_* for a server that sends here, fast (a 50 ms batch delay)."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.url, "OTEL_BSP_SCHEDULE_DELAY": "50",
                **extra}

    def named(self, name: str) -> list[Span]:
        return [span for span in list(self.spans) if span.name == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


def job_trace(receiver: Receiver, job_id: str) -> dict[str, list[Span]]:
    """The spans of the job's trace by name, once its run's span and a child's have come."""
    def arrived() -> bool:
        runs = [s for s in receiver.named("job.run") if s.attributes.get(tracing.JOB_ID) == job_id]
        return bool(runs) and any(s.name.startswith("child ") and s.trace_id == runs[0].trace_id
                                  for s in list(receiver.spans))

    eventually(arrived, 60)
    run = next(s for s in receiver.named("job.run")
               if s.attributes.get(tracing.JOB_ID) == job_id)
    # The request's span ends after its answer: it may come in a later batch than the job's.
    eventually(lambda: any(s.trace_id == run.trace_id and s.name == "POST /jobs"
                           for s in list(receiver.spans)), 30)
    spans: dict[str, list[Span]] = {}
    for span in list(receiver.spans):
        if span.trace_id == run.trace_id:
            spans.setdefault(span.name, []).append(span)
    return spans


def check_one_trace(spans: dict[str, list[Span]], job_id: str, kind: str, api: str,
                    worker: str) -> None:
    """The request's span, the job's queue and run spans under it, children under the run."""
    [request] = spans["POST /jobs"]
    [queue] = spans["job.queue"]
    [run] = spans["job.run"]
    assert request.service == api and request.parent_id == ""
    assert queue.parent_id == request.span_id and run.parent_id == request.span_id
    assert queue.service == run.service == worker
    for span in (queue, run):
        assert span.attributes[tracing.KIND] == kind
        assert span.attributes[tracing.JOB_ID] == job_id
        assert span.attributes[tracing.ATTEMPT] == 1
    assert run.attributes[tracing.OUTCOME] == "succeeded"
    children = [span for name, found in spans.items() if name.startswith("child ")
                for span in found]
    assert children, spans.keys()
    assert all(child.parent_id == run.span_id and child.service == worker
               for child in children), children
    assert all(child.attributes["process.exit.code"] == 0 for child in children), children
    assert "child pdfrender.py" in spans, spans.keys()


def test_one_trace_from_the_request_to_the_render_children_embedded(tmp_path, receiver):
    with run_server(tmp_path, env=receiver.env()) as server, server.client() as client:
        answer = client.post("/jobs", json={"jobType": "pdf2image", "dpi": 50})
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        assert wait_finished(client, job_id, 120)["status"] == "succeeded"
        spans = job_trace(receiver, job_id)
        check_one_trace(spans, job_id, "pdf2image", "jobqueue", "jobqueue")
        trace_id = spans["job.run"][0].trace_id
        # Its lines carry the trace: the run's end (logged in the run's span) and the request's
        # access line (in the request's).
        eventually(lambda: any(job_id in line and "succeeded after" in line
                               for line in server.log_path.read_text().splitlines()))
        lines = server.log_path.read_text().splitlines()
        end = next(line for line in lines if job_id in line and "succeeded after" in line)
        assert f"traceId={trace_id}" in end, end
        access = [line for line in lines if "jobqueue.access" in line and "POST /jobs" in line]
        assert access and f"traceId={trace_id}" in access[0], access


def upload_and_wait(client, fields: dict, sample: str, media_type: str) -> str:
    """POST /jobs with a sample file of data/; the job's id once it succeeded."""
    with (DATA / sample).open("rb") as file:
        answer = client.post("/jobs", data=fields, files={"file": (sample, file, media_type)})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    assert wait_finished(client, job_id, 120)["status"] == "succeeded"
    return job_id


def test_a_child_a_kind_starts_itself_has_its_span(tmp_path, receiver):
    """The video kind starts ffprobe on its input itself (start_child) beside ffmpeg
    (run_child), then probes the output (run_child): all three are children of the run's
    span, the probe it started itself ended once the kind reaped it."""
    with run_server(tmp_path, env=receiver.env()) as server, server.client() as client:
        job_id = upload_and_wait(client, {"jobType": "video", "width": "64"},
                                 "sample.mp4", "video/mp4")

        def under_run() -> list:
            spans = job_trace(receiver, job_id)
            [run] = spans["job.run"]
            return [span for span in spans.get("child ffprobe", []) + spans["child ffmpeg"]
                    if span.parent_id == run.span_id]
        # (The upload's check before queueing runs an ffprobe of its own, under the request.)
        eventually(lambda: len(under_run()) == 3, 30)
    assert all(span.attributes["process.exit.code"] == 0 for span in under_run())


def test_an_uploads_check_is_in_the_requests_span(tmp_path, receiver):
    with run_server(tmp_path, env=receiver.env()) as server, server.client() as client:
        job_id = upload_and_wait(client, {"jobType": "pdf2image", "dpi": "50"},
                                 "sample.pdf", "application/pdf")
        spans = job_trace(receiver, job_id)
    [request], [run] = spans["POST /jobs"], spans["job.run"]
    parents = {span.parent_id for span in spans["child pdfinfo"]}
    assert parents == {request.span_id, run.span_id}  # the check's, then the run's own


def test_a_worker_process_continues_the_requests_trace(tmp_path, postgres, receiver):
    with deploy("postgres", tmp_path, postgres, env=receiver.env()) as cluster, \
            cluster.client() as client:
        answer = client.post("/jobs", json={"jobType": "pdf2image", "dpi": 50})
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        assert wait_finished(client, job_id, 120)["status"] == "succeeded", cluster.logs()
        spans = job_trace(receiver, job_id)
        # The replica's request span; the worker process's job and child spans, one trace.
        check_one_trace(spans, job_id, "pdf2image", "jobqueue", "jobqueue-worker")


def test_json_log_lines_carry_the_job_and_the_trace(tmp_path, receiver):
    with run_server(tmp_path, env=receiver.env(OTEL_SERVICE_NAME="jobs-json"),
                    log_format="json") as server, server.client() as client:
        answer = client.post("/jobs", json={"data": "hello", "seconds": 0})
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        assert wait_finished(client, job_id)["status"] == "succeeded"
        eventually(lambda: any(s.attributes.get(tracing.JOB_ID) == job_id
                               for s in receiver.named("job.run")))
        log_path = server.log_path
    [run] = [s for s in receiver.named("job.run") if s.attributes.get(tracing.JOB_ID) == job_id]
    assert run.service == "jobs-json"  # OTEL_SERVICE_NAME wins over the default name
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert len(entries) > 3, lines
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
    about_job = [entry for entry in entries if job_id in entry["message"]]
    assert about_job and all(entry.get("jobId") == job_id for entry in about_job), about_job
    end = next(entry for entry in about_job if "succeeded after" in entry["message"])
    assert end["traceId"] == run.trace_id and len(end["spanId"]) == 16, end
    assert any(entry["logger"].startswith("uvicorn") for entry in entries), entries


NOTHING_LOADED = """
import json, sys
from jobqueue.api.app import create_app
from jobqueue.settings import Settings
app = create_app(Settings(out_dir=sys.argv[1]))
stack, layers = app.build_middleware_stack(), []
while stack is not None:
    layers.append(type(stack).__name__)
    stack = getattr(stack, "app", None)
from opentelemetry import trace  # FastAPI itself imports the API (its native telemetry)
print(json.dumps({"layers": layers, "provider": type(trace.get_tracer_provider()).__name__,
                  "sdk": sorted(m for m in sys.modules
                                if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter",
                                                 "opentelemetry.instrumentation")))}))
"""


def test_without_otel_variables_nothing_is_installed(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", NOTHING_LOADED, str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert loaded["sdk"] == []  # not even loaded
    assert loaded["provider"] == "ProxyTracerProvider"  # the API's placeholder: no-op spans
    assert not any("OpenTelemetry" in layer for layer in loaded["layers"]), loaded["layers"]


@pytest.mark.parametrize("environ, wanted", [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "jobs", "OTEL_BSP_SCHEDULE_DELAY": "50"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),  # to http://localhost:4318, as the spec says
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ({"OTEL_TRACES_EXPORTER": "console"}, False),  # not installed: warned, nothing sent
])
def test_what_turns_tracing_on(environ, wanted):
    assert tracing.wanted(environ) is wanted


@pytest.mark.parametrize("off", [{"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}])
def test_tracing_turned_off_sends_nothing(tmp_path, receiver, off):
    with run_server(tmp_path, env=receiver.env(**off)) as server, server.client() as client:
        answer = client.post("/jobs", json={"jobType": "pdf2image", "dpi": 50})
        assert answer.status_code == 202, answer.text
        assert wait_finished(client, answer.json()["id"], 120)["status"] == "succeeded"
        log_path = server.log_path
    # Stopped: a server that traced would have sent its last spans as it exited.
    assert receiver.requests == 0 and receiver.spans == []
    assert "tracing on" not in log_path.read_text()


def test_the_documented_default_endpoint():
    assert tracing.endpoint({}) == "http://localhost:4318/v1/traces"
    assert tracing.endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == \
        "http://c:4318/v1/traces"
    assert tracing.endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/v1/x"}) == \
        "http://t/v1/x"


def test_the_span_names_of_children():
    assert tracing.program_name(["/usr/bin/pdftoppm", "-png"]) == "pdftoppm"
    assert tracing.program_name([sys.executable, "-I", str(Path("kinds/pdfrender.py")),
                                 "in.pdf"]) == "pdfrender.py"
    assert tracing.program_name([sys.executable, "-c", "print(1)"]) == Path(sys.executable).name


@pytest.mark.parametrize("engine", ["embedded", "postgres"])
def test_each_attempt_has_its_spans_in_the_first_requests_trace(engine, request, tmp_path,
                                                                receiver):
    """A job retried after a failed attempt, single and batched: a queue and a run span per
    attempt, all under the span of the request that submitted it."""
    postgres = request.getfixturevalue("postgres") if engine == "postgres" else None
    with deploy(engine, tmp_path, postgres, env=receiver.env(),
                kinds="flaky:FLAKY,flaky:BATCHED") as deployment, deployment.client() as client:
        ids = {}
        for kind in ("flaky", "flakybatch"):
            answer = client.post("/jobs", json={"jobType": kind, "tag": kind, "fail_times": 1})
            assert answer.status_code == 202, answer.text
            ids[kind] = answer.json()["id"]
        for kind, job_id in ids.items():
            job = wait_finished(client, job_id)
            assert job["status"] == "succeeded" and job["attempt"] == 2, job
        for kind, job_id in ids.items():
            def runs(job_id: str = job_id) -> list[Span]:
                return sorted((s for s in receiver.named("job.run")
                               if s.attributes.get(tracing.JOB_ID) == job_id),
                              key=lambda s: s.attributes[tracing.ATTEMPT])

            eventually(lambda: len(runs()) == 2, 60)
            first, second = runs()
            assert [first.attributes[tracing.OUTCOME], second.attributes[tracing.OUTCOME]] == \
                ["retried", "succeeded"]
            assert [first.attributes[tracing.ATTEMPT], second.attributes[tracing.ATTEMPT]] == \
                [1, 2]
            assert first.attributes[tracing.KIND] == kind
            eventually(lambda: any(s.name == "POST /jobs" and s.trace_id == first.trace_id
                                   for s in list(receiver.spans)), 30)
            [submit] = [s for s in receiver.named("POST /jobs") if s.trace_id == first.trace_id]
            assert first.parent_id == second.parent_id == submit.span_id
            queues = [s for s in receiver.named("job.queue")
                      if s.attributes.get(tracing.JOB_ID) == job_id]
            assert len(queues) == 2 and {s.parent_id for s in queues} == {submit.span_id}


def test_a_server_sends_the_spans_it_holds_as_it_stops(tmp_path, receiver):
    # A batch delay of ten minutes: nothing goes out before the server stops.
    with run_server(tmp_path, env=receiver.env(OTEL_BSP_SCHEDULE_DELAY="600000")) as server, \
            server.client() as client:
        answer = client.post("/jobs", json={"data": "hello", "seconds": 0})
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        assert wait_finished(client, job_id)["status"] == "succeeded"
    assert [s.attributes[tracing.OUTCOME] for s in receiver.named("job.run")
            if s.attributes.get(tracing.JOB_ID) == job_id] == ["succeeded"]
