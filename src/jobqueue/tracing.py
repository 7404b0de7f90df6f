"""OpenTelemetry traces, configured by the standard OTEL_* variables only (docs/monitoring.md).

Tracing is on in a process when `wanted()` says so: OTEL_TRACES_EXPORTER=otlp, or, with
OTEL_TRACES_EXPORTER unset, an OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT); never with OTEL_SDK_DISABLED=true or
OTEL_TRACES_EXPORTER=none. Otherwise nothing of OpenTelemetry is even imported: no tracer
provider, no instrumentation, and every helper here returns at its first line, so a tiny
request costs what it did before (docs/performance.md).

When on, `setup` installs the SDK's tracer provider with a batching OTLP/HTTP exporter (its
endpoint, headers, timeouts, batch delay and sampler all from their OTEL_* variables), and
the app factory adds the FastAPI instrumentation (a span per request). A job's spans come
from the engines: `job.queue` (from its submission to this attempt's start) and `job.run`
(the attempt), both children of the request that submitted it, whose W3C `traceparent` the
job's record keeps (`JobRecord.traceparent`), so a worker process on another machine
continues the same trace; and `child <program>` for each child process run in a span
(processes.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
# The one exporter this package installs (opentelemetry-exporter-otlp-proto-http).
HTTP_PROTOCOL = "http/protobuf"
# Span attributes of a job's spans (docs/monitoring.md lists them).
KIND, JOB_ID, ATTEMPT, OUTCOME = ("jobqueue.kind", "jobqueue.job_id", "jobqueue.attempt",
                                  "jobqueue.outcome")
# Outcomes (metrics.Outcome's values) that mark a run's span as an error.
ERROR_OUTCOMES = frozenset({"failed", "deadline"})

# Set by `setup` once a tracer provider is installed; None: tracing is off in this process.
_tracer: Any = None
_propagator: Any = None


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the OTEL_* variables ask for traces: OTEL_TRACES_EXPORTER=otlp, or an OTLP
    endpoint with OTEL_TRACES_EXPORTER unset; OTEL_SDK_DISABLED=true wins over both. (The
    specification's default exporter is otlp, which would send spans to localhost:4318 from
    every process that never asked: here an unset exporter needs an endpoint to mean it.)"""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return "otlp" in {name.strip() for name in exporter.split(",")}
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def enabled() -> bool:
    """Whether `setup` has installed a tracer provider in this process."""
    return _tracer is not None


def endpoint(environ: Mapping[str, str] = os.environ) -> str:
    """Where the exporter sends spans, as the OTLP/HTTP exporter works it out (for the log)."""
    if traces := environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return traces
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
    return base.rstrip("/") + "/v1/traces"


def setup(service_name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Install the tracer provider if the OTEL_* variables ask for traces (once a process);
    whether tracing is on. `service_name` is the default of OTEL_SERVICE_NAME."""
    global _tracer, _propagator
    if _tracer is not None:
        return True
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not wanted(environ):
        if exporter and exporter != "none" \
                and environ.get("OTEL_SDK_DISABLED", "").strip().lower() != "true":
            log.warning("OTEL_TRACES_EXPORTER=%s: only otlp (over HTTP) is installed; no "
                        "traces are sent", exporter)
        return False
    for name in PROTOCOL_VARIABLES:
        protocol = environ.get(name, "").strip()
        if protocol and protocol != HTTP_PROTOCOL:
            log.warning("%s=%s: only %s is installed; spans are sent with it", name, protocol,
                        HTTP_PROTOCOL)
    # Imported here: a process without tracing never loads the SDK.
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    # The default name only where OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) gives none:
    # Resource.create lets attributes given in code win over the environment's.
    named = environ.get("OTEL_SERVICE_NAME", "").strip() or any(
        pair.split("=", 1)[0].strip() == SERVICE_NAME
        for pair in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","))
    provider = TracerProvider(resource=Resource.create({} if named else
                                                       {SERVICE_NAME: service_name}))
    # Batched, on the SDK's own thread (OTEL_BSP_*): a span's end never waits for the network.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)  # its atexit hook sends what is left at exit
    _tracer = trace.get_tracer("jobqueue")
    _propagator = TraceContextTextMapPropagator()
    log.info("tracing on: spans of %s go to %s (OTLP over HTTP)",
             provider.resource.attributes.get(SERVICE_NAME, service_name), endpoint(environ))
    return True


def traceparent() -> str | None:
    """The W3C traceparent of the current span (the request that submits a job), to keep with
    the job; None while tracing is off or no span is current."""
    if _tracer is None:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def current_ids() -> tuple[str, str] | None:
    """The current span's trace id and span id, in hex, for log lines; None while tracing is
    off or no span is current."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class JobTrace:
    """One attempt of a job, traced: `job.queue` (ended at once: from the submission to this
    start, as jobqueue_job_queue_seconds counts it) and `job.run`, open until `end`. Both are
    children of the submitting request's span (its traceparent); `active` makes the run's span
    the current one (on the thread that runs the handler, or in a worker's task), so the
    children it starts and the lines it logs belong to it."""

    def __init__(self, kind: str, job_id: str, attempt: int, parent: str | None,
                 queued_at: float, started_at: float):
        context = _propagator.extract({"traceparent": parent}) if parent else None
        attributes = {KIND: kind, JOB_ID: job_id, ATTEMPT: attempt}
        _tracer.start_span("job.queue", context=context, attributes=attributes,
                           start_time=_ns(queued_at)).end(end_time=_ns(started_at))
        self.span = _tracer.start_span("job.run", context=context, attributes=attributes,
                                       start_time=_ns(started_at))
        self._ended = False

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        from opentelemetry import trace

        with trace.use_span(self.span, end_on_exit=False, record_exception=False,
                            set_status_on_exception=False):
            yield

    def end(self, outcome: str, error: str | None = None) -> None:
        """End the run's span with its outcome (metrics.Outcome's value); once."""
        if self._ended:
            return
        self._ended = True
        self.span.set_attribute(OUTCOME, outcome)
        if outcome in ERROR_OUTCOMES:
            from opentelemetry.trace import Status, StatusCode

            self.span.set_status(Status(StatusCode.ERROR, error or outcome))
        self.span.end()


class _NoTrace:
    """A job's trace while tracing is off: does nothing."""

    def active(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def end(self, outcome: str, error: str | None = None) -> None:
        pass


NO_TRACE = _NoTrace()


def start_job(kind: str, job_id: str, attempt: int, parent: str | None, queued_at: float,
              started_at: float | None) -> JobTrace | _NoTrace:
    """The spans of an attempt that starts now (NO_TRACE while tracing is off)."""
    if _tracer is None:
        return NO_TRACE
    return JobTrace(kind, job_id, attempt, parent, queued_at, started_at or queued_at)


def program_name(args: Sequence[str]) -> str:
    """What a child runs, for its span's name: the program, or the script a Python runs."""
    program = Path(args[0]).name
    if program.startswith("python"):  # python [-I …] script.py: the script
        script = next((arg for arg in args[1:] if not arg.startswith("-")), "")
        if script.endswith(".py"):
            return Path(script).name
    return program


def start_child(args: Sequence[str]) -> Any:
    """A span for a child process about to start, a child of the current span (a job's run,
    or a request's check of its upload); None while tracing is off or no span is current (a
    batch's children run for several jobs at once: they get none)."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    if not trace.get_current_span().is_recording():
        return None
    program = program_name(args)
    return _tracer.start_span(f"child {program}", attributes={
        "process.executable.name": program})


def end_child(span: Any, pid: int | None, returncode: int | None) -> None:
    """End a child's span (from start_child) with its pid and exit code (negative: the
    signal that killed it)."""
    if span is None:
        return
    if pid is not None:
        span.set_attribute("process.pid", pid)
    if returncode is not None:
        span.set_attribute("process.exit.code", returncode)
        if returncode != 0:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, f"exit code {returncode}"))
    span.end()
