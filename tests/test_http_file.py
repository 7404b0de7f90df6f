"""Every request in testApi.http returns the status its `# expect` comment names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from conftest import ROOT

VARIABLE = re.compile(r"\{\{([^}]+)\}\}")


@dataclass
class HttpRequest:
    title: str
    method: str
    url: str
    expect: int
    name: str | None = None
    stream: bool = False  # an endless stream: check its status and first bytes only
    headers: dict[str, str] = field(default_factory=dict)
    body: list[str] = field(default_factory=list)


def parse(text: str) -> tuple[dict[str, str], list[HttpRequest]]:
    """Read the REST Client file: @variables, then blocks that start with ###."""
    variables = dict(re.findall(r"^@(\w+)\s*=\s*(.+)$", text, re.M))
    requests = []
    for block in text.split("\n###")[1:]:
        lines = block.split("\n")
        title, comments, rest = lines[0].strip(), [], lines[1:]
        while rest and (rest[0].startswith("#") or not rest[0].strip()):
            comments.append(rest.pop(0))
        if not rest:
            continue
        method, url = rest.pop(0).split(" ", 1)
        expect = next(int(c.split()[2]) for c in comments if c.startswith("# expect"))
        name = next((c.split()[2] for c in comments if c.startswith("# @name")), None)
        request = HttpRequest(title, method, url.strip(), expect, name,
                              stream="# stream" in comments)
        while rest and rest[0].strip():
            key, value = rest.pop(0).split(":", 1)
            request.headers[key.strip()] = value.strip()
        request.body = rest[1:]
        while request.body and (not request.body[-1].strip() or request.body[-1].startswith("#")):
            request.body.pop()
        requests.append(request)
    return variables, requests


def body_bytes(request: HttpRequest) -> bytes:
    multipart = request.headers.get("Content-Type", "").startswith("multipart/")
    parts = [(ROOT / line[2:].strip()).read_bytes() if line.startswith("< ") else line.encode()
             for line in request.body]
    return (b"\r\n" if multipart else b"\n").join(parts)


def test_every_request_in_testapi_http(server, client):
    variables, requests = parse((ROOT / "testApi.http").read_text())
    variables["HostAddress"] = server.url
    responses: dict[str, dict] = {}

    def substitute(text: str) -> str:
        def value(match: re.Match) -> str:
            reference = match.group(1)
            if reference in variables:
                return variables[reference]
            name, _, path = reference.partition(".response.body.$.")
            node = responses[name]
            for key in path.split("."):
                node = node[key]
            return str(node)
        return VARIABLE.sub(value, text)

    assert len(requests) >= 15
    for request in requests:
        if request.stream:
            with client.stream(request.method, substitute(request.url)) as response:
                assert response.status_code == request.expect, request.title
                assert next(response.iter_bytes()), request.title
            continue
        response = client.request(request.method, substitute(request.url),
                                  headers=request.headers, content=body_bytes(request) or None)
        assert response.status_code == request.expect, (request.title, response.text)
        assert response.status_code < 300 or "detail" in response.json(), request.title
        if request.name:
            responses[request.name] = response.json()
