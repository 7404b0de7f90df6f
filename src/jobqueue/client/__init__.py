"""The jobqueue client library: the server's API over HTTP, from blocking code (Client) or
asyncio (AsyncClient), with typed answers and errors.

    from jobqueue.client import Client

    with Client("http://127.0.0.1:8000") as client:
        print(client.put("message", data="hi", seconds=1).data)
        job = client.wait(client.submit("pdf2image", "scan.pdf", dpi=150))
        client.download(job, "pages")

It imports nothing of the server (httpx and httpx-sse only): a machine that only sends jobs
needs none of it. `python -m jobqueue.client` runs the command-line client (jobqueue.cli).
docs/client.md documents both.
"""

from jobqueue.client.aio import AsyncClient
from jobqueue.client.errors import (
    ClientError,
    JobCancelled,
    JobFailed,
    Refused,
    RetriesExhausted,
    Unreachable,
)
from jobqueue.client.models import (
    FINISHED,
    Callback,
    EarlierError,
    Event,
    Job,
    Links,
    Progress,
    Result,
    Retry,
)
from jobqueue.client.sync import Client
from jobqueue.client.wire import DEFAULT_URL

__all__ = [
    "DEFAULT_URL", "FINISHED", "AsyncClient", "Callback", "Client", "ClientError",
    "EarlierError", "Event", "Job", "JobCancelled", "JobFailed", "Links", "Progress", "Refused",
    "Result", "Retry",
    "RetriesExhausted", "Unreachable",
]
