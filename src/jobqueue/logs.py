"""Logging of the server, a worker process and the local launcher, set up in one place
(`configure`): plain lines (JOBQUEUE_LOG_FORMAT=text, the default) or one JSON object a line
(json: time, level, logger, message, and jobId, traceId, spanId when there are any).

A line about a job carries its id: text lines say `job <id>: …` already, and a JSON line has it
as jobId, taken from the line's `extra={"jobId": …}`, else from a message that starts
`job %s` (the convention of every such line here), else from the job whose handler runs on
this thread (`current_job`, set by lifecycle.run). While tracing is on (tracing.py), a line
logged inside a span carries the span's trace and span ids (text: at its end).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
import time
from typing import Literal

from jobqueue import tracing

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The logger of api/edge.py's access lines.
ACCESS_LOGGER = "jobqueue.access"
LogFormat = Literal["text", "json"]

# The job whose handler runs in this context (a worker thread, between its start and end).
current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("jobqueue_job",
                                                                         default=None)


def job_id_of(record: logging.LogRecord) -> str | None:
    """The id of the job a line is about, if it is about one."""
    job_id = getattr(record, "jobId", None)
    if job_id:
        return str(job_id)
    if isinstance(record.msg, str) and record.msg.startswith("job %s") \
            and isinstance(record.args, tuple) and record.args:
        return str(record.args[0])
    return current_job.get()


class TextFormatter(logging.Formatter):
    """The plain line, with the current span's ids at its end while tracing is on."""

    _second: int | None = None
    _second_text = ""

    def formatTime(self, record: logging.LogRecord,  # noqa: N802 - logging's name
                   datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        # One strftime a second, not one a line: a busy server writes hundreds a second.
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format,
                                              self.converter(record.created))
            self._second = second
        return self.default_msec_format % (self._second_text, record.msecs)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        if (ids := tracing.current_ids()) is not None:
            line += f" traceId={ids[0]} spanId={ids[1]}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log collectors that parse rather than grep."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (job_id := job_id_of(record)) is not None:
            entry["jobId"] = job_id
        if (ids := tracing.current_ids()) is not None:
            entry["traceId"], entry["spanId"] = ids
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class StderrHandler(logging.StreamHandler):
    """stderr, with the access log's lines (logger `jobqueue.access`) written in batches: one
    system call for all those of FLUSH_SECONDS, rather than one a line, which on the event
    loop's thread cost a tiny `/put` about a sixth of its time (the thread gives the
    interpreter up for the call, and waits to get it back). Every other line goes out at once,
    and the access lines before it with it, so the order holds; at exit they are flushed too
    (only a kill -9 or a crash of the interpreter loses the last FLUSH_SECONDS of them)."""

    FLUSH_SECONDS = 0.1

    def __init__(self) -> None:
        try:  # its own block-buffered stream on stderr's file: sys.stderr flushes every line
            stream = open(sys.stderr.fileno(), "w", buffering=1 << 16, closefd=False,
                          encoding=sys.stderr.encoding or "utf-8", errors="backslashreplace")
        except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
            stream = sys.stderr
        super().__init__(stream)
        self._unflushed = False
        self._flusher: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != ACCESS_LOGGER:
            super().emit(record)  # written and flushed, the access lines before it too
            return
        try:
            self.stream.write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        self._unflushed = True
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_often, name="log-flush",
                                             daemon=True)
            self._flusher.start()

    def _flush_often(self) -> None:
        while True:
            time.sleep(self.FLUSH_SECONDS)
            if self._unflushed:
                self._unflushed = False
                self.flush()


def configure(log_format: LogFormat = "text", text_format: str = TEXT_FORMAT) -> None:
    """The root logger at INFO, to stderr, as `log_format` says (`text_format`: the plain
    line's layout). As logging.basicConfig, it leaves a logger set up already alone."""
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(text_format))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if log_format == "json":
        logging.captureWarnings(True)  # a warnings.warn line is JSON too
