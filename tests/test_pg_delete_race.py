"""The distributed mode under DELETEs that race the workers' pick-up (issue 24): every job a
DELETE reached ends as cancelled, none stays queued with its queue entry gone or running on an
idle worker, the queue's counts return to zero, and a second DELETE of the ended job removes
it."""

from __future__ import annotations

import concurrent.futures
import time

import psycopg

from conftest import eventually
from deployments import deploy
from test_contract import submit

ROUNDS = 20
JOBS = 6  # as many as the slots: every one is being picked up as its DELETE comes
SLOTS_PER_WORKER = 3
END_SECONDS = 30  # a stranded job is rescued within STALLED_SECONDS + a few heartbeats


def wait_ended(client, job_ids: list[str], seconds: float = END_SECONDS) -> dict[str, dict]:
    """Until every job has ended; the ones that have not, by then, fail the test."""
    deadline = time.monotonic() + seconds
    ended: dict[str, dict] = {}
    while True:
        for job_id in job_ids:
            if job_id not in ended:
                job = client.get(f"/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    ended[job_id] = job
        left = [job_id for job_id in job_ids if job_id not in ended]
        if not left:
            return ended
        assert time.monotonic() < deadline, {
            job_id: client.get(f"/jobs/{job_id}").json() for job_id in left}
        time.sleep(0.1)


def wait_idle(client, seconds: float = END_SECONDS) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        queue = client.get("/health").json()["queues"]["message"]
        if queue["queued"] == 0 and queue["busy"] == 0:
            return queue
        assert time.monotonic() < deadline, queue
        time.sleep(0.1)


def test_deletes_racing_the_pick_up_end_every_job(postgres, tmp_path):
    with deploy("postgres", tmp_path, postgres, replicas=2, workers=2,
                message_workers=SLOTS_PER_WORKER) as cluster, \
            cluster.client(0) as submitter, cluster.client(1, timeout=30) as deleter:
        # Both workers serving: their slots are what the DELETEs race.
        eventually(lambda: deleter.get("/health").json()["queues"]["message"]["workers"]
                   == 2 * SLOTS_PER_WORKER, 60)
        for round_ in range(ROUNDS):
            ids: list[str] = []
            answers = {}
            for n in range(JOBS):
                ids.append(submit(submitter, json={"data": f"round {round_} job {n}",
                                                   "seconds": 60})["id"])
                if round_ % 2:  # each DELETE as its job is being picked up
                    answers[ids[-1]] = deleter.delete(f"/jobs/{ids[-1]}")
            # Back to back on one keep-alive connection to the other replica.
            answers.update({job_id: deleter.delete(f"/jobs/{job_id}") for job_id in ids
                            if job_id not in answers})
            assert all(answer.status_code == 200 for answer in answers.values()), answers
            try:
                ended = wait_ended(deleter, ids)
            except AssertionError as error:
                raise AssertionError(f"round {round_}: stuck: {error}") from None
            assert {job["status"] for job in ended.values()} == {"cancelled"}, ended
            # Each DELETE waited for that end and answered it, not the status it found.
            assert {answer.json()["status"] for answer in answers.values()} == {"cancelled"}, [
                answer.json() for answer in answers.values()]
            wait_idle(deleter)
            # A second DELETE of an ended job removes it.
            for job_id in ids:
                assert deleter.delete(f"/jobs/{job_id}").status_code == 200
                assert deleter.get(f"/jobs/{job_id}").status_code == 404


def test_a_delete_ends_a_job_that_nothing_is_left_to_run(postgres, tmp_path):
    """A record queued with its procrastinate job gone, or running with no run left (what the
    race left behind, and what a job stranded that way looks like until a rescue): no worker
    will ever take or abort it, so the DELETE ends it itself, and answers that end. With no
    worker at all there is no rescue either: without this the job stayed for good."""
    with deploy("postgres", tmp_path, postgres, workers=0) as cluster, \
            cluster.client(timeout=30) as client, \
            psycopg.connect(cluster.env["JOBQUEUE_DATABASE_URL"], autocommit=True) as conn:
        queued = submit(client, json={"data": "queued", "seconds": 60})["id"]
        running = submit(client, json={"data": "running", "seconds": 60})["id"]
        conn.execute("DELETE FROM procrastinate_jobs WHERE id IN (SELECT procrastinate_id "
                     "FROM jobqueue_jobs WHERE id = ANY(%s))", ([queued, running],))
        conn.execute("UPDATE jobqueue_jobs SET status = 'running', started_at = %s, "
                     "worker_name = 'a-worker-that-is-gone', attempt = 1 WHERE id = %s",
                     (time.time(), running))
        for job_id in (queued, running):
            answer = client.delete(f"/jobs/{job_id}")
            assert answer.status_code == 200 and answer.json()["status"] == "cancelled", (
                answer.json())
            assert client.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
            # The second DELETE removes the ended job.
            assert client.delete(f"/jobs/{job_id}").status_code == 200
            assert client.get(f"/jobs/{job_id}").status_code == 404
        queue = client.get("/health").json()["queues"]["message"]
        assert queue["queued"] == 0 and queue["busy"] == 0, queue


def test_a_delete_whose_job_is_deleted_as_it_waits_is_404(postgres, tmp_path):
    """The DELETE of a running job waits for its end; the record deleted meanwhile (by a
    second DELETE once it ended) is a 404, not a 500."""
    with deploy("postgres", tmp_path, postgres, workers=0) as cluster, \
            cluster.client(timeout=30) as client, \
            psycopg.connect(cluster.env["JOBQUEUE_DATABASE_URL"], autocommit=True) as conn:
        job_id = submit(client, json={"data": "running", "seconds": 60})["id"]
        # Running on a worker that does not answer its abort: the DELETE waits.
        conn.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = (SELECT "
                     "procrastinate_id FROM jobqueue_jobs WHERE id = %s)", (job_id,))
        conn.execute("UPDATE jobqueue_jobs SET status = 'running', started_at = %s, "
                     "worker_name = 'a-worker-that-does-not-answer', attempt = 1 WHERE id = %s",
                     (time.time(), job_id))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(client.delete, f"/jobs/{job_id}")
            eventually(lambda: conn.execute(
                "SELECT cancelled_as FROM jobqueue_jobs WHERE id = %s", (job_id,)
            ).fetchone()[0] is not None)
            conn.execute("DELETE FROM jobqueue_jobs WHERE id = %s", (job_id,))
            assert answer.result().status_code == 404, answer.result().text
