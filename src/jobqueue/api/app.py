"""The application factory: settings, the queue engine's lifespan, error handlers (api/problems.py)
and routes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.datastructures import Default
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.responses import Response

from jobqueue import errors, heap, tracing, webhooks
from jobqueue.api import access, problems, ratelimit
from jobqueue.api.edge import Edge, GoneClients
from jobqueue.api.routes import (
    dashboard,
    events,
    files,
    health,
    jobs,
    metrics,
    preview,
    put,
    throughput,
)
from jobqueue.api.schemas import error_responses
from jobqueue.api.slots import ConnectionSlots
from jobqueue.engines import make_engine
from jobqueue.files import retention
from jobqueue.jobs import JobKind
from jobqueue.kinds import load_kinds
from jobqueue.metrics import Metrics
from jobqueue.settings import Settings

log = logging.getLogger(__name__)


class JobQueueApp(FastAPI):
    """FastAPI, with api/edge.py outside Starlette's error middleware: an error's answer (500,
    or 507 for a full disk) is timed and logged with the status the client got."""

    def build_middleware_stack(self):  # noqa: ANN201 - Starlette's ASGIApp
        edge = Edge(super().build_middleware_stack(), self.state.metrics,
                    self.state.settings.access_log)
        if getattr(self.state, "traced", False):
            # The FastAPI instrumentation takes the outer ServerErrorMiddleware of the stack
            # apart to put its span around what is inside it: given one around Edge, the
            # request's span covers Edge too, so the access log line carries its trace id.
            return ServerErrorMiddleware(edge)
        return edge


def instrument(app: JobQueueApp) -> None:
    """A span per request (OpenTelemetry's FastAPI instrumentation), while tracing is on."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    app.state.traced = True
    # No span per ASGI message: an upload or an event stream would make thousands.
    FastAPIInstrumentor.instrument_app(app, exclude_spans=["receive", "send"])


# What include_flat copies of each route as it is, beside its path, endpoint, dependencies,
# responses and response model. The route's router already folded its own defaults into these
# (response class, unique id function, strict content type, body size limit), as FastAPI's
# include_router does; add_api_route folds in the app's and sets the app as the provider of
# dependency overrides.
ROUTE_FIELDS = ("status_code", "tags", "summary", "description", "response_description",
                "deprecated", "methods", "operation_id", "response_model_include",
                "response_model_exclude", "response_model_by_alias",
                "response_model_exclude_unset", "response_model_exclude_defaults",
                "response_model_exclude_none", "include_in_schema", "response_class", "name",
                "callbacks", "openapi_extra", "generate_unique_id_function",
                "strict_content_type", "max_body_size")


class DirectRoute(APIRoute):
    """An APIRoute whose endpoint takes the request alone and returns its Response is handed
    the request as it is: FastAPI's request handler would look for parameters, solve the
    route's (no) dependencies and check for a body it does not read, about a tenth of a
    `GET /health`. Any other endpoint (parameters, dependencies such as the API key's)
    gets FastAPI's handler, as an APIRoute does."""

    def get_route_handler(self):  # noqa: ANN201 - FastAPI's handler type
        if takes_request_alone(self):
            return self.endpoint
        return super().get_route_handler()


def takes_request_alone(route: APIRoute) -> bool:
    dependant, endpoint = route.dependant, route.endpoint
    if not (inspect.iscoroutinefunction(endpoint) and dependant.request_param_name
            and len(inspect.signature(endpoint).parameters) == 1):
        return False
    if any((dependant.path_params, dependant.query_params, dependant.header_params,
            dependant.cookie_params, dependant.body_params, dependant.dependencies)):
        return False
    answer = typing.get_type_hints(endpoint).get("return")
    return isinstance(answer, type) and issubclass(answer, Response)


def include_flat(app: FastAPI, router: APIRouter, dependencies: list | None = None,
                 responses: dict | None = None) -> None:
    """The router's routes as routes of the app itself. FastAPI's include_router (0.165)
    keeps each router as a branch that every request walks, setting and restoring scope keys
    per route, and walks the chosen one twice: ten branches cost a no-op /put as much as the
    rest of FastAPI. Copied routes are matched one by one, as in a single-file app."""
    if router.on_startup or router.on_shutdown:
        raise TypeError("include_flat copies routes only, not a router's event handlers")
    for route in router.routes:
        if not isinstance(route, APIRoute):
            raise TypeError(f"include_flat copies APIRoutes only, not {route!r}")
        form_limits = {**router.form_limits, **route.form_limits}  # the router's, in the scope
        app.router.add_api_route(
            route.path, route.endpoint, dependencies=[*(dependencies or []), *route.dependencies],
            responses={**(responses or {}), **route.responses},
            # A stream's item type (an SSE route's `data` schema, its items' serialization)
            # is only ever inferred from the endpoint's return annotation, when no response
            # model was given: given one, even None, the copy would have none.
            response_model=Default(None) if route.stream_item_type else route.response_model,
            route_class_override=DirectRoute if type(route) is APIRoute else type(route),
            form_limits=form_limits or None,
            **{field: getattr(route, field) for field in ROUTE_FIELDS})


def create_app(settings: Settings | None = None, with_workers: bool = True,
               kinds: dict[str, JobKind] | None = None) -> FastAPI:
    """The app. `with_workers`: in distributed mode (JOBQUEUE_DATABASE_URL), whether this
    process also runs workers (`--with-workers`); the embedded engine always does. `kinds`:
    the job kinds served, by name; default: those JOBQUEUE_KINDS names.

    CannotStart for a kind that cannot be loaded, or a wrong limit of one."""
    settings = settings or Settings()
    kinds = load_kinds(settings.kinds) if kinds is None else kinds
    for kind in kinds.values():
        try:
            settings.limits(kind)
        except ValueError as error:
            raise errors.CannotStart(str(error)) from None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The loop it serves on, for the routes: asking asyncio costs a system call (getpid).
        app.state.loop = asyncio.get_running_loop()
        # The engine opens its store and starts its threads here, never at import time.
        try:
            engine = make_engine(settings, kinds, app.state.metrics, with_workers)
            app.state.engine = engine
            await engine.start()
        except errors.CannotStart as error:
            log.critical("cannot start: %s", error)  # what to do, before uvicorn's traceback
            raise
        try:
            await retention.sweep_orphans(engine, settings.out_dir, at_start=True)
        except errors.CannotStart:
            raise
        except Exception as error:  # the database may be down: the periodic sweep tries again
            log.warning("the sweep of leftover job folders failed at start: %s", error)
        sweeper = asyncio.create_task(retention.sweep_forever(engine, settings,
                                                              app.state.uploads.holders))
        # Completion webhooks: every process that answers HTTP delivers (webhooks.py); with
        # no secret to sign them, nothing (and no look for deliveries costs anything).
        deliverer = asyncio.create_task(webhooks.Deliverer(
            engine, lambda record: jobs.status_document(app, record),
            settings.webhook_secret.get_secret_value(), settings.webhook_retry_hours,
            settings.webhook_allow_host_list, app.state.metrics.webhook_attempted).run()) \
            if settings.webhook_secret.get_secret_value() else None
        heap.settle()  # started: what lives as long as the process is out of the GC's way
        yield
        sweeper.cancel()
        if deliverer is not None:
            deliverer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await deliverer
        await engine.stop()
        log.info("workers stopped")

    app = JobQueueApp(
        title="jobqueue",
        summary="Slow work behind HTTP: bounded queues per job kind, served by worker threads.",
        version="0.1.0",
        lifespan=lifespan,
        # Spans come from OpenTelemetry's FastAPI instrumentation (`instrument`, tracing.py)
        # and only while tracing is on. FastAPI's own telemetry (0.165) would otherwise ask
        # the global providers on every request whether they are set up.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.kinds = kinds
    app.state.metrics = Metrics(kinds)
    app.state.draining = False  # set on SIGTERM / Ctrl-C: see api/shutdown.py
    app.state.preview_slots = preview.PreviewSlots(settings.preview_streams)
    app.state.uploads = ConnectionSlots(settings.max_uploads, "uploads", "JOBQUEUE_MAX_UPLOADS")
    app.state.streams = ConnectionSlots(settings.max_streams, "event streams",
                                        "JOBQUEUE_MAX_STREAMS")
    ratelimit.configure(app, settings.rate_limit,
                        settings.rate_limit_storage.get_secret_value())
    problems.install(app)  # errors.py's errors and the rest as HTTP answers
    include_flat(app, health.router)
    include_flat(app, metrics.router)  # its own token, never an API key or a rate limit
    include_flat(app, dashboard.router)  # the page asks for a key itself
    # 401 without a valid key when keys are set; without keys every caller is the same owner,
    # and the routes skip the dependency altogether.
    keyed = [Depends(access.require_key)] if settings.api_key_list else []
    for router in (put.router, jobs.router, files.router, preview.router, events.router,
                   throughput.router, access.router):
        include_flat(app, router, keyed,
                     error_responses(401, 429) if settings.api_key_list else None)
    put.describe_kinds(app, kinds)
    # FastAPI's own pages (/docs, /redoc, /openapi.json) after the API's routes: Starlette
    # tries routes in order, and every /put and /health went past these four first. They are
    # in no schema, so the API's description keeps its order.
    own = [route for route in app.router.routes if not isinstance(route, APIRoute)]
    app.router.routes[:] = [*(r for r in app.router.routes if isinstance(r, APIRoute)), *own]
    app.add_middleware(GoneClients)  # inside Starlette's error middleware: see api/edge.py
    if settings.cors_origin_list:  # off unless JOBQUEUE_CORS_ORIGINS names the origins
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[access.HEADER, "Content-Type"],
            expose_headers=["Location", "Retry-After", "X-RateLimit-Limit",
                            "X-RateLimit-Remaining", "X-RateLimit-Reset"])
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    # Only with OTEL_* asking for traces: otherwise no middleware, no cost per request.
    if tracing.setup("jobqueue"):
        instrument(app)
    return app
