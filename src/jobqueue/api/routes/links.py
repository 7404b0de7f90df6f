"""The links answers carry (file URLs, the next page of a list, a new job's links): paths
relative to the server, or absolute from JOBQUEUE_PUBLIC_URL when it is set. Never from the
request's Host header, which any client can set (`Host: evil.example` made every file URL point
there)."""

from __future__ import annotations

from fastapi import Request


def base(request: Request) -> str:
    """What every link starts with: JOBQUEUE_PUBLIC_URL (without its trailing slash), or the
    ASGI root path (empty unless the server is mounted under a prefix)."""
    public = request.app.state.settings.public_url
    return public.rstrip("/") if public else request.scope.get("root_path", "")


def link(request: Request, path: str) -> str:
    """`path` (starting with /) as a link."""
    return base(request) + path


def route(request: Request, route_name: str, /, **params: str) -> str:
    """The link to the route called `route_name` with its path parameters."""
    return link(request, request.app.url_path_for(route_name, **params))


def with_query(request: Request, **params: object) -> str:
    """The link to this request's own route with `params` set in its query."""
    url = request.url.include_query_params(**params)
    path = url.path.removeprefix(request.scope.get("root_path", ""))
    return link(request, f"{path}?{url.query}")
