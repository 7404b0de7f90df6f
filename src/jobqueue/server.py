"""The jobqueue server: jobqueue serve (or python -m jobqueue, or python src/main.py)
[--host H] [--port P] [--kinds K,…]."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from jobqueue import logs
from jobqueue.api.app import create_app
from jobqueue.api.connections import http_protocol
from jobqueue.api.shutdown import GracefulServer, stop_leftovers
from jobqueue.errors import CannotStart
from jobqueue.settings import Settings, unknown_variables

# After the drain (JOBQUEUE_SHUTDOWN_GRACE), seconds uvicorn lets open requests, such as event
# streams, finish before it cancels them.
GRACEFUL_SHUTDOWN_SECONDS = 3


def main(argv: list[str] | None = None) -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(description="Run the jobqueue server.")
    parser.add_argument("--host", default=settings.host,
                        help="address to listen on (env JOBQUEUE_HOST, default %(default)s)")
    parser.add_argument("--port", type=int, default=settings.port,
                        help="port to listen on (env JOBQUEUE_PORT, default %(default)s)")
    parser.add_argument("--kinds", default=settings.kinds,
                        help="comma-separated job kinds to serve: built-in names, entry "
                             "points (group jobqueue.kinds) or package.module:ATTRIBUTE "
                             "(env JOBQUEUE_KINDS, default %(default)s)")
    parser.add_argument("--with-workers", action="store_true",
                        help="with JOBQUEUE_DATABASE_URL: run workers of every kind in this "
                             "process too (without it an API replica runs no jobs; the "
                             "embedded engine always runs them)")
    args = parser.parse_args(argv)
    settings = settings.model_copy(update={"host": args.host, "port": args.port,
                                           "kinds": args.kinds})

    logs.configure(settings.log_format)
    if settings.database_url.get_secret_value() and "db_path" in settings.model_fields_set:
        logging.getLogger(__name__).warning(
            "JOBQUEUE_DB_PATH is ignored: JOBQUEUE_DATABASE_URL keeps the job records")
    try:
        app = create_app(settings, with_workers=args.with_workers)
    except CannotStart as error:
        raise SystemExit(f"cannot start: {error}") from None
    for warning in unknown_variables(app.state.kinds):
        logging.getLogger(__name__).warning("%s", warning)
    proxies = settings.trusted_proxy_list
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
                            http=http_protocol(settings.header_timeout),
                            # api/edge.py writes the access log (JOBQUEUE_ACCESS_LOG)
                            access_log=False,
                            # JSON lines: uvicorn's own loggers go through the root's handler
                            # (logs.configure) instead of the plain lines of its own config.
                            **({"log_config": None} if settings.log_format == "json" else {}),
                            # X-Forwarded-For only from JOBQUEUE_TRUSTED_PROXIES: uvicorn
                            # would believe any local client, which could then pose as many.
                            proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None)
    try:
        GracefulServer(config, app, settings.shutdown_grace).run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down
        pass
    finally:
        stop_leftovers(app)


if __name__ == "__main__":
    main()
