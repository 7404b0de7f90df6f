"""What clients can hold: slow or huge headers, slow or stalled uploads, bodies over the cap by
their Content-Length (with Expect: 100-continue), refusals sent while a client is still sending,
many uploads and event streams at once, huge list pages, and forwarded addresses from whoever
claims to be a proxy."""

from __future__ import annotations

import asyncio
import errno
import http.client
import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
from httpx_sse import connect_sse
from starlette.requests import Request

from conftest import run_server
from jobqueue.api.connections import HOLD_BYTES, _Transport
from jobqueue.api.problems import internal_error


def connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (recv sees its end)."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes the connection."""
    answer = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return answer
        if not chunk:
            return answer
        answer += chunk


def test_a_connection_whose_headers_dribble_in_is_closed(tmp_path):
    with run_server(tmp_path, header_timeout=1) as server:
        with connect(server) as sock:
            sock.settimeout(0.2)
            started = time.monotonic()
            request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
            closed = False
            for byte in request:  # a byte every 50 ms: never done within a second
                try:
                    sock.send(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                try:
                    if closed_by_server(sock):
                        closed = True
                        break
                except TimeoutError:
                    pass
                time.sleep(0.05)
            assert closed, "the server kept the dribbling connection open"
            assert time.monotonic() - started < 8
        with server.client() as client:
            assert client.get("/health").status_code == 200


def multipart_head(boundary: str = "b0undary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"jobType\"\r\n\r\n"
            f"pdf2image\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"slow.pdf\"\r\n\r\n%PDF-1.4\n").encode()


def start_upload(server, length: int = 10 * 2**20) -> socket.socket:
    """A multipart upload that sends its head and then nothing more."""
    sock = connect(server)
    head = multipart_head()
    sock.sendall(f"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
                 "Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n".encode() + head)
    return sock


def test_a_stalled_upload_is_cut_off_with_408_and_its_file_removed(tmp_path):
    """Nothing for 30 s, less than JOBQUEUE_MIN_UPLOAD_KBPS: 408, and the partial file goes."""
    with run_server(tmp_path) as server, start_upload(server) as sock:
        uploads = lambda: list(server.out_dir.glob("*/input/*"))  # noqa: E731
        deadline = time.monotonic() + 5
        while not uploads():
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.05)
        sock.settimeout(45)
        answer = read_until_closed(sock)  # head and body may come in separate segments
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"JOBQUEUE_MIN_UPLOAD_KBPS" in answer
        assert uploads() == [], "the partial upload is removed"


def test_uploads_and_event_streams_past_their_caps_get_503(tmp_path):
    with run_server(tmp_path, max_uploads=2, max_streams=2) as server, \
            server.client() as client:
        held = [start_upload(server) for _ in range(2)]
        try:
            deadline = time.monotonic() + 5
            while len(list(server.out_dir.glob("*/input/*"))) < 2:
                assert time.monotonic() < deadline, "the uploads never started"
                time.sleep(0.05)
            refused = client.post("/jobs", data={"jobType": "pdf2image"},
                                  files={"file": ("x.pdf", b"%PDF-1.4")})
            assert refused.status_code == 503 and "JOBQUEUE_MAX_UPLOADS" in refused.text
            assert int(refused.headers["Retry-After"]) > 0
            assert client.post("/jobs", json={"seconds": 0}).status_code == 202, \
                "a JSON body is no upload"
        finally:
            for sock in held:
                sock.close()

        job_id = client.post("/jobs", json={"seconds": 30}).json()["id"]
        with server.client() as one, server.client() as two, \
                connect_sse(one, "GET", "/events") as first, \
                connect_sse(two, "GET", f"/jobs/{job_id}/events") as second:
            # Hold the iterators: a dropped one closes its stream.
            first_events, second_events = first.iter_sse(), second.iter_sse()
            next(first_events)
            next(second_events)
            with client.stream("GET", "/events") as third:
                assert third.status_code == 503
                assert "JOBQUEUE_MAX_STREAMS" in third.read().decode()
        client.delete(f"/jobs/{job_id}")
        deadline = time.monotonic() + 5  # the streams' slots free up once they have ended
        while True:
            with client.stream("GET", f"/jobs/{job_id}/events") as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "a closed stream kept its slot"
            time.sleep(0.05)


def test_list_items_are_summaries_without_the_results_data(tmp_path):
    big = "x" * 200_000
    with run_server(tmp_path) as server, server.client() as client:
        job_ids = [client.post("/put", json={"data": big, "seconds": 0}).json()["data"]["id"]
                   for _ in range(5)]
        listed = client.get("/jobs", params={"limit": 100})
        assert len(listed.content) < 10_000, "a page of summaries stays small"
        items = {item["id"]: item for item in listed.json()["items"]}
        assert set(job_ids) <= set(items)
        assert items[job_ids[0]]["result"] == {"files": []}
        assert client.get(f"/jobs/{job_ids[0]}").json()["result"]["data"]["message"] == big


def test_forwarded_addresses_count_only_from_trusted_proxies(tmp_path):
    def third_answer(client: httpx.Client) -> int:
        answers = [client.post("/jobs", json={"seconds": 0},
                               headers={"X-Forwarded-For": f"10.0.0.{n}"}).status_code
                   for n in range(3)]
        assert answers[:2] == [202, 202]
        return answers[2]

    with run_server(tmp_path / "a", rate_limit="2/minute") as server, server.client() as client:
        assert third_answer(client) == 429, "a local client posed as three addresses"
    with run_server(tmp_path / "b", rate_limit="2/minute", trusted_proxies="127.0.0.1") as server, \
            server.client() as client:
        assert third_answer(client) == 202, "behind a trusted proxy each address has its own"


def test_an_unexpected_error_says_its_connection_closes():
    """Starlette raises an unexpected error again once its 500 (or a full disk's 507) is sent,
    and uvicorn then closes the connection: the answer says `Connection: close`, so a client
    does not send its next request on a connection that is going away."""
    request = Request({"type": "http", "method": "POST", "scheme": "http", "path": "/jobs",
                       "root_path": "", "query_string": b"", "headers": [],
                       "server": ("127.0.0.1", 8000)})
    for error, status in ((RuntimeError("a bug"), 500),
                          (OSError(errno.ENOSPC, "No space left on device"), 507)):
        answer = asyncio.run(internal_error(request, error))
        assert answer.status_code == status
        assert answer.headers["connection"] == "close"


def peak_rss_kb(server) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def send_head(server, header_bytes: int) -> bytes:
    """A GET with one header line `header_bytes` long; all the server answers."""
    with connect(server) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
                         + b"a" * header_bytes + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the answer may still be there to read
        return read_until_closed(sock)


def test_a_request_head_over_64_kb_is_431_and_never_kept_whole(tmp_path):
    """httptools keeps a header whole until it ends and has no cap: a 50 MB header line was
    served 200 and took the server's memory. The head is capped at 64 KB: 431 naming the limit,
    and what the client sends on is read and dropped, not kept."""
    with run_server(tmp_path) as server:
        assert send_head(server, 60_000).startswith(b"HTTP/1.1 200"), "under the cap"
        before = peak_rss_kb(server)
        for size in (70_000, 2**20, 50 * 2**20):
            answer = send_head(server, size)
            assert answer.startswith(b"HTTP/1.1 431"), (size, answer[:200])
            body = answer.partition(b"\r\n\r\n")[2]
            assert b"64 KB" in json.loads(body)["detail"].encode()
        assert peak_rss_kb(server) - before < 20_000, "the big header was kept"
        with server.client() as client:
            assert client.get("/health").status_code == 200


def read_for(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends until it closes the connection, or `seconds` pass."""
    sock.settimeout(seconds)
    answer = b""
    try:
        while chunk := sock.recv(4096):
            answer += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        answer += b" (not closed)"
    return answer


def test_a_body_over_the_cap_by_its_content_length_is_413_before_any_of_it_is_sent(tmp_path):
    """`Expect: 100-continue` with a Content-Length over JOBQUEUE_MAX_UPLOAD_MB got `100
    Continue`, then the body was read up to the cap. A Content-Length over the cap is 413 at
    once, with or without the Expect, and no 100 Continue; JSON over 1 MB likewise."""
    multipart = "multipart/form-data; boundary=b0undary"
    with run_server(tmp_path, max_upload_mb=1) as server:
        for path, content_type, length, limit in (
                ("/put", multipart, 10 * 2**20, b"JOBQUEUE_MAX_UPLOAD_MB"),
                ("/jobs", multipart, 10 * 2**20, b"JOBQUEUE_MAX_UPLOAD_MB"),
                ("/jobs", "application/json", 2 * 2**20, b"1024 KB")):
            for expect in ("Expect: 100-continue\r\n", ""):
                with connect(server) as sock:
                    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
                                 f"Content-Type: {content_type}\r\n{expect}\r\n".encode())
                    answer = read_for(sock, 10)  # and not a byte of the body sent
                assert answer.startswith(b"HTTP/1.1 413"), (path, expect, answer[:300])
                assert limit in answer and b"100 Continue" not in answer
        assert [p for p in server.out_dir.iterdir() if p.is_dir()] == [], "nothing stored"


def test_a_refusal_before_the_body_is_read_reaches_a_client_still_sending_it(tmp_path):
    """A JSON body over 1 MB gets its 413 before the server reads it (at once by its
    Content-Length; chunked, after the first MB). Closed there and then, the connection was
    reset while http.client (and so requests) was still sending, and about half of the tries
    ended in "connection reset" instead of the 413. The server now closes lingeringly: every
    try gets its answer."""
    body = b'{"data": "' + b"x" * (4 * 2**20) + b'"}'
    with run_server(tmp_path) as server:
        host, port = server.url.removeprefix("http://").split(":")
        for attempt in range(30):
            chunked = attempt >= 20  # the last ten without a Content-Length
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                if chunked:
                    connection.request("POST", "/jobs", headers={
                        "Content-Type": "application/json"}, encode_chunked=True,
                        body=(body[start:start + 65536]
                              for start in range(0, len(body), 65536)))
                else:
                    connection.request("POST", "/jobs", body=body,
                                       headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = response.read()
            except OSError as error:
                raise AssertionError(f"try {attempt + 1} ({'chunked' if chunked else 'sized'})"
                                     f" lost its answer: {error!r}") from None
            finally:
                connection.close()
            assert response.status == 413, answer
            assert "1024 KB" in json.loads(answer)["detail"]
        with server.client() as client:
            assert client.get("/health").status_code == 200


class RecordingTransport:
    """What the event loop's transport was asked to write, write by write."""

    def __init__(self):
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default=None):
        return default


def test_an_answers_head_and_body_go_out_in_one_write():
    async def scenario() -> None:
        raw = RecordingTransport()
        transport = _Transport(raw, SimpleNamespace(loop=asyncio.get_running_loop()))
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")  # as uvicorn writes a head, then its body
        transport.write(b'{"status": "ok"}')
        assert raw.writes == [], "held until the loop's round ends"
        await asyncio.sleep(0)
        assert raw.writes == [b'HTTP/1.1 200 OK\r\n\r\n{"status": "ok"}']

        transport.write(b"data: 1\n\n")  # an event of a stream: out by the round's end
        await asyncio.sleep(0)
        assert raw.writes[-1] == b"data: 1\n\n"

        big = b"x" * (HOLD_BYTES + 1)
        transport.write(b"head")
        transport.write(big)  # a large write goes at once, the held one before it
        assert raw.writes[-1] == b"head" + big

        transport.write(b"last words")
        transport.flush()  # what the protocol does before it closes the connection
        assert raw.writes[-1] == b"last words"
        await asyncio.sleep(0)
        assert raw.writes.count(b"last words") == 1, "flushed once, not again by the round"

        raw.closing = True
        transport.write(b"to a closed connection")
        await asyncio.sleep(0)
        assert raw.writes[-1] == b"last words", "nothing is written to a closed transport"

    asyncio.run(scenario())
