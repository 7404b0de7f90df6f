"""Adaptive batching (JobKind.batch), the same on both engines: a worker takes the first queued
job of a batched kind and the jobs queued within max_wait after it, up to max_size, and calls
the handler once for them; each job keeps its own record, answer, failure, cancel and deadline.

The kinds are tests/kinds/batchy.py's. A batch is made to form deterministically: a first job
holds its batch (its gate file does not exist yet) until the test sees the next jobs queued,
then those form the next batch, already waiting when the worker comes for them (max_wait only
covers a distributed worker fetching its last one). Nothing here waits for a time. The first
tests run lifecycle.run_batch, which both engines use, in this process."""

from __future__ import annotations

import collections
import concurrent.futures
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel

from conftest import eventually, scrape, value, wait_finished
from deployments import ENGINES, Deployment, deploy
from jobqueue import lifecycle
from jobqueue.errors import BadInput, JobCancelled, KindError, user_message
from jobqueue.jobs import Batch, JobContext, JobKind, JobStatus, Output

KINDS = "batchy:GATED,batchy:QUICK,batchy:BRIEF"
IN_BATCH = "in its batch"  # the progress unit a job shows once its batch's call has begun


@pytest.fixture(scope="module", params=ENGINES)
def deployment(request, tmp_path_factory) -> Deployment:
    postgres = request.getfixturevalue("postgres") if request.param == "postgres" else None
    with deploy(request.param, tmp_path_factory.mktemp(f"batch-{request.param}"), postgres,
                kinds=KINDS) as deployment:
        yield deployment


@pytest.fixture
def client(deployment) -> httpx.Client:
    with deployment.client() as client:
        yield client


def submit(client: httpx.Client, kind: str, **options) -> str:
    answer = client.post("/jobs", json={"jobType": kind, **options})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def job(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/jobs/{job_id}").json()


def queued(client: httpx.Client, kind: str) -> int:
    return client.get("/health").json()["queues"][kind]["queued"]


def in_batch(client: httpx.Client, job_id: str) -> bool:
    return job(client, job_id)["progress"]["unit"] == IN_BATCH


def hold(client: httpx.Client, gate: Path) -> str:
    """A gated job whose batch (of one) holds the kind's one worker until `gate` exists."""
    blocker = submit(client, "gated", text="blocker", gate=str(gate))
    eventually(lambda: in_batch(client, blocker))
    return blocker


def puts_in_order(client: httpx.Client, pool: concurrent.futures.Executor, kind: str,
                  jobs: list[dict]) -> list[concurrent.futures.Future]:
    """A /put for each of `jobs`, each queued before the next is sent (so their order in the
    queue is theirs)."""
    futures = []
    for number, options in enumerate(jobs, 1):
        futures.append(pool.submit(client.post, "/put", json={"jobType": kind, **options}))
        eventually(lambda: queued(client, kind) == number)
    return futures


def metric_sources(deployment: Deployment, client: httpx.Client) -> list[str]:
    """Where the batches are counted: the embedded server, or the worker processes."""
    if deployment.engine == "embedded":
        return [f"{deployment.server.url}/metrics"]
    return [process["metrics"] for process in client.get("/health").json()["workerProcesses"]]


def batches_counted(sources: list[str], kind: str) -> tuple[float, float]:
    """jobqueue_batch_size's count and sum for `kind`, over every source."""
    scrapes = [scrape(source) for source in sources]
    return (sum(value(s, "jobqueue_batch_size_count", kind=kind) for s in scrapes),
            sum(value(s, "jobqueue_batch_size_sum", kind=kind) for s in scrapes))


class NoOptions(BaseModel):
    pass


def contexts(tmp_path: Path, count: int) -> list[JobContext]:
    return [JobContext(f"job-{number}", NoOptions(), None, tmp_path / f"job-{number}", None)
            for number in range(count)]


def test_each_answer_ends_its_own_job_by_the_ladder(tmp_path):
    called, sizes = [], []

    def handler(jobs: list[JobContext]) -> list:
        called.append([job.id for job in jobs])
        return [Output({"n": 1}), None, BadInput("no"), JobCancelled(jobs[3].id),
                RuntimeError("bug")]

    def prepare(job: JobContext) -> None:
        if job.id == "job-6":
            raise BadInput("its input could not be fetched")

    kind = JobKind("b", "", NoOptions, handler, writes_files=False, batch=Batch(8))
    jobs = contexts(tmp_path, 7)
    jobs[5].cancel()  # cancelled before the call: left out of it
    endings = lifecycle.run_batch(kind, jobs, prepare, on_call=sizes.append)
    assert called == [[f"job-{number}" for number in range(5)]] and sizes == [5]
    assert [ending.status for ending in endings] == [
        JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.FAILED, JobStatus.CANCELLED,
        JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.FAILED]
    assert endings[0].result == {"data": {"n": 1}, "files": []}
    assert isinstance(endings[1].error, KindError)  # None is no answer
    assert "answered a NoneType for it" in user_message(endings[1].error, "job-1")
    assert [ending.error_category for ending in endings[2:5]] == ["bad_input", None, "internal"]
    assert str(endings[6].error) == "its input could not be fetched"


@pytest.mark.parametrize("answer", [None, [Output({})], (Output({}),) * 3])
def test_an_answer_that_is_no_list_of_one_per_job_fails_them_all(tmp_path, answer):
    kind = JobKind("b", "", NoOptions, lambda jobs: answer, writes_files=False,
                   batch=Batch(8))
    endings = lifecycle.run_batch(kind, contexts(tmp_path, 2))
    assert {ending.status for ending in endings} == {JobStatus.FAILED}
    assert all(isinstance(ending.error, KindError) for ending in endings)
    assert "the b kind's batch handler returned" in user_message(endings[0].error, "job-0")


def test_concurrent_puts_form_batches_and_each_gets_its_own_answer(deployment, client):
    sources = metric_sources(deployment, client)
    count_before, sum_before = batches_counted(sources, "quick")
    texts = [f"text-{number}" for number in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(
            lambda text: client.post("/put", json={"jobType": "quick", "text": text}), texts))
    results = []
    for text, answer in zip(texts, answers):
        assert answer.status_code == 200, answer.text
        result = answer.json()["data"]["result"]
        assert result["data"]["text"] == text  # its own answer, not a neighbour's
        results.append(result)
    assert max(result["data"]["size"] for result in results) > 1
    batches = collections.defaultdict(list)
    for result in results:
        batches[result["data"]["batch"]].append(result["data"])
    for answers_of_batch in batches.values():  # every job of a batch answered, in its place
        size = answers_of_batch[0]["size"]
        assert sorted(data["index"] for data in answers_of_batch) == list(range(size))
        assert size <= 8
    # Each job's file is in its own folder.
    file = client.get(httpx.URL(results[5]["files"][0]).path)
    assert file.status_code == 200 and file.text == texts[5]
    # One observation per call of the handler, of its size.
    eventually(lambda: batches_counted(sources, "quick") == (count_before + len(batches),
                                                             sum_before + len(texts)))


def test_the_jobs_queued_behind_a_batch_form_the_next_one_in_their_order(client, tmp_path):
    gate = tmp_path / "gate"
    blocker = hold(client, gate)
    jobs = [{"text": "first"}, {"text": "too big", "answer": "too_large"},
            {"text": "boom", "answer": "crash"}, {"text": "last"}, {"text": "next batch"}]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = puts_in_order(client, pool, "gated", jobs)
        gate.touch()
        first, too_large, crash, last, fifth = [future.result() for future in futures]
    assert job(client, blocker)["result"]["data"]["size"] == 1
    assert first.status_code == 200 and last.status_code == 200, (first.text, last.text)
    first, last = (answer.json()["data"]["result"]["data"] for answer in (first, last))
    # One batch of max_size (4), in the order the jobs were queued; the fifth waited.
    assert (first["size"], first["index"], last["index"]) == (4, 0, 3)
    assert last["batch"] == first["batch"] and last["text"] == "last"
    # An exception in a job's place fails that job alone, by its category.
    assert too_large.status_code == 413, too_large.text
    assert "'too big' is too large for batchy" in too_large.json()["detail"]
    assert crash.status_code == 500, crash.text
    assert "internal error" in crash.json()["detail"]
    assert fifth.status_code == 200, fifth.text
    assert fifth.json()["data"]["result"]["data"]["batch"] != first["batch"]


@pytest.mark.parametrize("answer, says", [
    ("raise", "the server log has the details"),
    ("short", "the gated kind's batch handler returned 3 answers for a batch of 4 jobs"),
])
def test_a_handler_that_raises_or_miscounts_fails_its_whole_batch(client, tmp_path, answer,
                                                                   says):
    gate = tmp_path / "gate"
    hold(client, gate)
    jobs = [{"text": "a"}, {"text": "b", "answer": answer}, {"text": "c"}, {"text": "d"}]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = puts_in_order(client, pool, "gated", jobs)
        gate.touch()
        answers = [future.result() for future in futures]
    for put in answers:
        assert put.status_code == 500, put.text
        assert "internal error" in put.json()["detail"] and says in put.json()["detail"]


def test_a_cancel_ends_its_job_at_once_and_the_batch_runs_on(client, tmp_path):
    gate, second_gate = tmp_path / "gate", tmp_path / "second-gate"
    hold(client, gate)
    jobs = [submit(client, "gated", text=f"job-{number}", gate=str(second_gate))
            for number in range(4)]
    eventually(lambda: queued(client, "gated") == 4)
    gate.touch()
    eventually(lambda: all(in_batch(client, job_id) for job_id in jobs))
    cancelled = client.delete(f"/jobs/{jobs[1]}")
    assert cancelled.status_code == 200, cancelled.text
    # Cancelled while its batch still waits for its gate.
    eventually(lambda: job(client, jobs[1])["status"] == "cancelled")
    assert all(job(client, job_id)["status"] == "running" for job_id in jobs[::2])
    second_gate.touch()
    ended = [wait_finished(client, job_id) for job_id in jobs]
    assert [record["status"] for record in ended] == ["succeeded", "cancelled", "succeeded",
                                                     "succeeded"]
    assert "result" not in ended[1]  # its answer was dropped
    assert {record["result"]["data"]["size"] for record in ended[::2]} == {4}
    assert client.get(f"/jobs/{jobs[1]}/files/answer.txt").status_code in (404, 409)


def test_a_put_timeout_ends_its_job_as_a_deadline_and_its_batch_runs_on(deployment, client,
                                                                        tmp_path):
    gate = tmp_path / "gate"
    sources = metric_sources(deployment, client)
    deadlines = sum(value(scrape(source), "jobqueue_jobs_total", kind="brief",
                          outcome="deadline") for source in sources)
    other = submit(client, "brief", text="posted", gate=str(gate))
    eventually(lambda: job(client, other)["status"] == "running")
    put = client.post("/put", json={"jobType": "brief", "text": "put", "gate": str(gate)})
    assert put.status_code == 504, put.text
    assert in_batch(client, other)  # its batch was under way when the /put's time was up
    gate.touch()
    posted = wait_finished(client, other)
    assert posted["status"] == "succeeded" and posted["result"]["data"]["size"] == 2
    eventually(lambda: sum(value(scrape(source), "jobqueue_jobs_total", kind="brief",
                                 outcome="deadline") for source in sources) == deadlines + 1)


def test_a_job_cancelled_while_it_waits_is_left_out_of_the_batch(client, tmp_path):
    gate = tmp_path / "gate"
    hold(client, gate)
    jobs = [submit(client, "gated", text=f"job-{number}") for number in range(5)]
    eventually(lambda: queued(client, "gated") == 5)
    # A distributed worker has fetched it already: it waits, unclaimed, for a batch.
    assert client.delete(f"/jobs/{jobs[1]}").status_code == 200
    eventually(lambda: job(client, jobs[1])["status"] == "cancelled")
    gate.touch()
    ended = [wait_finished(client, job_id) for job_id in jobs]
    assert ended[1]["status"] == "cancelled" and ended[1]["attempt"] == 0
    others = [record["result"]["data"] for number, record in enumerate(ended) if number != 1]
    assert [(data["size"], data["index"]) for data in others] == [(4, 0), (4, 1), (4, 2), (4, 3)]


def test_a_stopping_worker_gives_back_the_jobs_waiting_for_its_batches(deployment, client,
                                                                       tmp_path):
    if deployment.engine != "postgres":
        pytest.skip("worker processes are the distributed mode's")
    gate = tmp_path / "gate"
    blocker = hold(client, gate)
    jobs = [submit(client, "gated", text=f"job-{number}") for number in range(3)]
    eventually(lambda: queued(client, "gated") == 3)  # all three wait in the worker's batcher
    (worker,) = deployment.workers
    worker.terminate()  # no shutdown grace: the running batch is stopped and queued again
    assert worker.wait(30) == 0
    assert job(client, blocker)["status"] == "queued"
    gate.touch()
    deployment.start_worker()
    ended = [wait_finished(client, job_id) for job_id in [blocker, *jobs]]
    assert [record["status"] for record in ended] == ["succeeded"] * 4
    # The blocker ran twice; the others were given back unclaimed, and ran once.
    assert [record["attempt"] for record in ended] == [2, 1, 1, 1]
