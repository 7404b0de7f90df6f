"""The one place errors become HTTP answers: each of errors.ANSWERED by its category's row in
errors.HTTP_STATUS, as `{"detail": <its message>}`, with the headers it calls for (Retry-After,
WWW-Authenticate, Connection: close, a failed /put job's Location); a request FastAPI could
not validate as its 422; anything else as 500 (507 for a full disk), its traceback in the log.

The code below the routes raises errors.py's errors and knows nothing of HTTP; `install` puts
these handlers on the app.
"""

from __future__ import annotations

import json
import logging
import sqlite3

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from jobqueue import errors
from jobqueue.api.access import HEADER
from jobqueue.api.routes import links
from jobqueue.api.shutdown import shutting_down

log = logging.getLogger(__name__)

# Starlette raises the error again once this answer is sent, and uvicorn then closes the
# connection: the answer says so, so a client sends its next request on a new one.
CLOSE = {"Connection": "close"}


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, invalid_request)
    for error_class in errors.ANSWERED:  # one handler, one table: errors.HTTP_STATUS
        app.add_exception_handler(error_class, answer_error)
    app.add_exception_handler(Exception, internal_error)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, except that an input JSON cannot carry (inf, a lone surrogate) is shown
    as its repr instead of turning the answer into a 500."""
    shown_errors = []
    for error in exc.errors():
        shown = {key: error[key] for key in ("type", "loc", "msg", "input") if key in error}
        try:
            json.dumps(jsonable_encoder(shown), allow_nan=False).encode()
        except (ValueError, TypeError):  # UnicodeEncodeError is a ValueError
            shown["input"] = repr(error.get("input"))[:200]
        shown_errors.append(jsonable_encoder(shown))
    return JSONResponse({"detail": shown_errors}, status_code=422)


async def answer_error(request: Request, exc: Exception) -> JSONResponse:
    """Any of the server's own errors, answered as errors.HTTP_STATUS says."""
    answered = exc
    if isinstance(exc, errors.ShuttingDown):  # the engines' have no message: shutdown.py's has
        answered = shutting_down(request)
    elif isinstance(exc, (errors.QueueFull, errors.TooManyQueued, errors.WouldTimeOut)):
        request.app.state.metrics.refused(exc.kind)
    if isinstance(exc, errors.JobFailed):
        status = errors.HTTP_STATUS.get(exc.error_kind, 500)
    else:
        status = errors.HTTP_STATUS[errors.category_of(exc)]
    headers = {}
    if getattr(answered, "retry_after", None) is not None:
        headers["Retry-After"] = str(answered.retry_after)
    if isinstance(exc, errors.NotAuthenticated):
        headers["WWW-Authenticate"] = HEADER
    if isinstance(exc, errors.JobFailed) and exc.job_id:  # the job ran: this is its end
        headers["Location"] = links.link(request, f"/jobs/{exc.job_id}")
    if getattr(exc, "body_unread", False):  # refused before the body was all read (submission.py)
        headers.update(CLOSE)
    return JSONResponse({"detail": str(answered)}, status_code=status, headers=headers or None)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    disk_full = isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)
    if errors.is_disk_full(exc) or disk_full:
        log.error("disk full on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "The server's disk is full; try again once space has "
                                       "been freed."}, status_code=507, headers=CLOSE)
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "Internal server error; the server log has the details."},
                        status_code=500, headers=CLOSE)
