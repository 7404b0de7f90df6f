-- What the distributed engine asks PostgreSQL, by name (sql.py): the replica (engine.py) and
-- the workers (runner.py). The tables are made in schema.sql. Every change of a record is
-- announced with `notify` in the transaction that makes it.

-- ping --
SELECT 1

-- no_statement_timeout --
-- While the schema is first made (it may take a while, or wait for another replica's).
SET statement_timeout = 0

-- reset_statement_timeout --
RESET statement_timeout

-- sweep_statement_timeout --
-- A retention sweep's statement may read a large table: its own bound (milliseconds), to the
-- end of the transaction.
SELECT set_config('statement_timeout', %s, true)

-- notify --
-- Tell every replica a job changed (sent when the transaction commits); the payload is JSON:
-- id, owner, and removed for a deleted job.
SELECT pg_notify('jobqueue_jobs', %s)

-- listen --
LISTEN jobqueue_jobs

-- insert_queued --
-- A new queued record with its procrastinate job, and the replicas told, in one statement
-- (a submit holds its kind's lock until it commits: each round trip less under it is more
-- submits a second). The procrastinate job is what runner.defer's defer_async makes (a row
-- of procrastinate_defer_jobs_v1, whose insert trigger wakes the workers): parameters its
-- queue, task name, priority and args; then schema.params(record), records.COLUMNS in order
-- (procrastinate_id comes from the deferred job); then the notify payload.
WITH deferred AS (
    SELECT unnest(procrastinate_defer_jobs_v1(ARRAY[
        ROW(%s, %s, %s, NULL, NULL, %s, NULL)::procrastinate_job_to_defer_v1])) AS id),
inserted AS (
    INSERT INTO jobqueue_jobs (id, job_type, status, options, input_path, created_at,
                               started_at, finished_at, worker_name, progress, error,
                               error_kind, result, origin, owner, attempt, idempotency_key,
                               priority, fair_round, next_attempt_at, earlier_errors, fair_key,
                               traceparent, procrastinate_id)
    SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
           %s, %s, %s, deferred.id
    FROM deferred
    RETURNING id)
SELECT pg_notify('jobqueue_jobs', %s) FROM inserted

-- set_procrastinate_id --
-- The procrastinate job that is to run the record's job (parameters: its id, the job's).
UPDATE jobqueue_jobs SET procrastinate_id = %s WHERE id = %s

-- select_job --
SELECT * FROM jobqueue_jobs WHERE id = %s

-- select_job_for_update --
SELECT * FROM jobqueue_jobs WHERE id = %s FOR UPDATE

-- select_idempotent --
-- The job an owner submitted with this Idempotency-Key (parameters: owner, key).
SELECT * FROM jobqueue_jobs WHERE owner = %s AND idempotency_key = %s

-- select_procrastinate_id --
SELECT procrastinate_id FROM jobqueue_jobs WHERE id = %s

-- delete_job --
-- A record and its procrastinate job if that has ended (workers delete theirs as they finish
-- them; this catches one a worker died with). A job still to do or running stays for its
-- worker, which finds no record and lets it go. Returns the record's owner.
WITH gone AS (DELETE FROM jobqueue_jobs WHERE id = %s RETURNING owner, procrastinate_id),
queue AS (DELETE FROM procrastinate_jobs WHERE id IN (SELECT procrastinate_id FROM gone)
          AND status NOT IN ('todo', 'doing'))
SELECT owner FROM gone

-- list_jobs --
-- A page of one owner's jobs, newest first, as summaries: no options, and only the file names
-- of a result. {filters}: and_status, and_job_type, each if asked (records.list_query).
SELECT id, job_type, status, '{}'::jsonb AS options, input_path, created_at, started_at,
       finished_at, worker_name, progress, error, error_kind,
       CASE WHEN jsonb_typeof(result) = 'object'
            THEN jsonb_build_object('files', result -> 'files') END AS result,
       origin, owner, attempt, idempotency_key, priority, fair_round, next_attempt_at,
       earlier_errors, fair_key, traceparent
FROM jobqueue_jobs WHERE owner = %s {filters}
ORDER BY seq DESC LIMIT %s OFFSET %s

-- and_status --
AND status = %s

-- and_job_type --
AND job_type = %s

-- select_summaries --
-- These jobs as list_jobs shows them (parameter: their ids), in the order they came.
SELECT id, job_type, status, '{}'::jsonb AS options, input_path, created_at, started_at,
       finished_at, worker_name, progress, error, error_kind,
       CASE WHEN jsonb_typeof(result) = 'object'
            THEN jsonb_build_object('files', result -> 'files') END AS result,
       origin, owner, attempt, idempotency_key, priority, fair_round, next_attempt_at,
       earlier_errors, fair_key, traceparent
FROM jobqueue_jobs WHERE id = ANY(%s) ORDER BY seq

-- lock_kind --
-- One submit of a kind at a time, cluster-wide (parameter: 'jobqueue:<kind>').
SELECT pg_advisory_xact_lock(hashtext(%s))

-- recent_run_seconds --
-- The mean run time of a kind's last 20 succeeded jobs.
SELECT avg(finished_at - started_at)
FROM (SELECT finished_at, started_at FROM jobqueue_jobs
      WHERE job_type = %s AND status = 'succeeded' ORDER BY seq DESC LIMIT 20) recent

-- running_started_at --
SELECT started_at FROM jobqueue_jobs
WHERE job_type = %s AND status = 'running' AND started_at IS NOT NULL

-- queue_position --
-- 1 for the next queued job of its kind to start; 0 when it is not queued (parameters: id,
-- now): one plus the kind's queued jobs that may start now (not waiting for a retry's time)
-- and come before it in lifecycle.dispatch_order (priority, then fair round, then arrival),
-- as procrastinate fetches them (its priority encodes the first two:
-- schema.procrastinate_priority).
SELECT count(*) FROM jobqueue_jobs other, jobqueue_jobs job
WHERE job.id = %(id)s AND job.status = 'queued'
  AND other.job_type = job.job_type AND other.status = 'queued'
  AND (other.id = job.id
       OR (other.next_attempt_at IS NULL OR other.next_attempt_at <= %(now)s)
          AND (other.priority > job.priority
               OR other.priority = job.priority AND (other.fair_round < job.fair_round
                   OR other.fair_round = job.fair_round AND other.seq < job.seq)))

-- admission --
-- What a submit (or a retry) of a kind is decided by, in one look (parameters: kind,
-- priority, fair_key, id): the kind's queued and running jobs, the owner's (fair key's)
-- queued ones (JOBQUEUE_MAX_QUEUED_PER_KEY), what lifecycle.fair_round takes (the lowest
-- round queued at this priority, the owner's highest queued or running at it; the job itself
-- left out, as a retried one is still running), and what lifecycle.estimated_start takes:
-- the median run time of the kind's last 50 jobs that ran to an end, and how many those are.
WITH live AS (SELECT status, priority, fair_round, fair_key FROM jobqueue_jobs
              WHERE job_type = %(kind)s AND status IN ('queued', 'running') AND id <> %(id)s),
-- The last 50 of each end, then the last 50 of both: each its own walk down the index
-- (job_type, status, seq), never a sort of every job the kind ever ran.
ends AS ((SELECT seq, finished_at - started_at AS seconds FROM jobqueue_jobs
          WHERE job_type = %(kind)s AND status = 'succeeded' AND started_at IS NOT NULL
          ORDER BY seq DESC LIMIT 50)
         UNION ALL
         (SELECT seq, finished_at - started_at AS seconds FROM jobqueue_jobs
          WHERE job_type = %(kind)s AND status = 'failed' AND started_at IS NOT NULL
          ORDER BY seq DESC LIMIT 50)),
recent AS (SELECT seconds FROM ends ORDER BY seq DESC LIMIT 50)
SELECT count(*) FILTER (WHERE status = 'queued') AS queued,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'queued' AND fair_key = %(fair_key)s) AS owners_queued,
       min(fair_round) FILTER (WHERE status = 'queued' AND priority = %(priority)s)
           AS lowest_round,
       max(fair_round) FILTER (WHERE fair_key = %(fair_key)s AND priority = %(priority)s)
           AS owners_last,
       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) FROM recent) AS median,
       (SELECT count(*) FROM recent) AS finished
FROM live

-- count_ahead --
-- The queued jobs of a kind that may start now and would start before a new job of this
-- priority and round (parameters: kind, priority, round, now): every one there came earlier.
SELECT count(*) FROM jobqueue_jobs
WHERE job_type = %(kind)s AND status = 'queued'
  AND (next_attempt_at IS NULL OR next_attempt_at <= %(now)s)
  AND (priority > %(priority)s OR priority = %(priority)s AND fair_round <= %(round)s)

-- count_unfinished --
SELECT job_type, status, count(*) FROM jobqueue_jobs
WHERE status IN ('queued', 'running') GROUP BY job_type, status

-- ask_cancel --
-- The first cancel's outcome, for whoever ends the job (its worker, or the replica).
UPDATE jobqueue_jobs SET cancelled_as = coalesce(cancelled_as, %s) WHERE id = %s
RETURNING cancelled_as

-- end_cancelled --
-- A job ended as cancelled where nothing is left to run it (parameters: finished_at, id).
UPDATE jobqueue_jobs SET status = 'cancelled', finished_at = %s WHERE id = %s

-- cancelled_among --
-- Which of these jobs a cancel asked to stop.
SELECT id FROM jobqueue_jobs WHERE id = ANY(%s) AND cancelled_as IS NOT NULL

-- live_workers --
-- The worker processes that beat since a time: for the dashboard.
SELECT name, kinds, heartbeat, metrics, states FROM jobqueue_workers WHERE heartbeat > %s
ORDER BY name

-- live_worker_kinds --
-- The slots per kind of each worker process that beat since a time, the state of its resource
-- of each (its setup's) and when it beat.
SELECT kinds, states, heartbeat FROM jobqueue_workers WHERE heartbeat > %s ORDER BY name

-- heartbeat --
-- By the database's clock, which stranded_jobs reads too: a worker whose own clock runs late
-- never looks dead (parameters: name, slots per kind, where its metrics are, the state of its
-- resource of each kind).
INSERT INTO jobqueue_workers (name, kinds, heartbeat, metrics, states)
VALUES (%s, %s, extract(epoch FROM clock_timestamp()), %s, %s)
ON CONFLICT (name) DO UPDATE
SET kinds = excluded.kinds, heartbeat = excluded.heartbeat, metrics = excluded.metrics,
    states = excluded.states

-- forget_worker --
DELETE FROM jobqueue_workers WHERE name = %s

-- forget_dead_workers --
DELETE FROM jobqueue_workers WHERE heartbeat < %s

-- stranded_jobs --
-- Jobs of `kinds` that nothing will bring to an end: running (since before `started`) on a
-- worker whose heartbeat is `stalled` seconds old by the database's clock (or gone), running
-- here (`me`) on no run of this process (`mine`), or queued with no procrastinate job left to
-- run them (its abort came before its claim).
SELECT j.id, j.procrastinate_id FROM jobqueue_jobs j
WHERE j.job_type = ANY(%(kinds)s) AND (
    (j.status = 'running' AND j.started_at < %(started)s AND (
        j.worker_name = %(me)s AND NOT j.id = ANY(%(mine)s)
        OR NOT EXISTS (SELECT 1 FROM jobqueue_workers w WHERE w.name = j.worker_name
                       AND w.heartbeat >= extract(epoch FROM now()) - %(stalled)s)))
    OR (j.status = 'queued' AND NOT EXISTS (
        SELECT 1 FROM procrastinate_jobs p
        WHERE p.id = j.procrastinate_id AND p.status IN ('todo', 'doing'))))

-- lock_stranded --
-- A stranded job, if still as it was found (parameters: id, procrastinate id, statuses); or a
-- job fetched for a batch and let go before its claim, if still queued on that procrastinate
-- job.
SELECT * FROM jobqueue_jobs
WHERE id = %s AND procrastinate_id IS NOT DISTINCT FROM %s AND status = ANY(%s) FOR UPDATE

-- lock_stranded_by_procrastinate_id --
-- The same for a procrastinate job fetched by a worker that died before it claimed the record
-- (parameters: procrastinate id, statuses).
SELECT * FROM jobqueue_jobs WHERE procrastinate_id = %s AND status = ANY(%s) FOR UPDATE

-- running_on --
-- Whether a job runs on this procrastinate job.
SELECT 1 FROM jobqueue_jobs WHERE procrastinate_id = %s AND status = 'running'

-- requeue_stranded --
UPDATE jobqueue_jobs SET status = 'queued', started_at = NULL, worker_name = NULL,
                         progress = '{}'
WHERE id = %s

-- claim_cancelled --
-- A job cancelled while queued ends as it is taken (parameters by name: now, id, the taker's
-- procrastinate_id): a cancel that came as a worker took the job found no procrastinate job
-- left to delete. A piece of `take`.
UPDATE jobqueue_jobs SET status = 'cancelled', finished_at = %(now)s
WHERE id = %(id)s AND status = 'queued' AND cancelled_as IS NOT NULL
  AND procrastinate_id IS NOT DISTINCT FROM %(procrastinate_id)s
RETURNING *

-- claim --
-- A run starts, if the record's own procrastinate job runs it (parameters by name: now,
-- worker, id, procrastinate_id); never a queued job a cancel asked to stop (claim_cancelled
-- ends that one). A retry's wait is over once it starts. A piece of `take`.
UPDATE jobqueue_jobs SET status = 'running', started_at = %(now)s, worker_name = %(worker)s,
                         attempt = attempt + 1, progress = '{}', error = NULL,
                         error_kind = NULL, result = NULL, next_attempt_at = NULL
WHERE id = %(id)s AND status IN ('queued', 'running')
  AND NOT (status = 'queued' AND cancelled_as IS NOT NULL)
  AND procrastinate_id IS NOT DISTINCT FROM %(procrastinate_id)s
RETURNING *

-- take --
-- A worker takes a job: claim_cancelled's end or claim's start ({cancelled} and {started},
-- filled in by runner.py), whichever applies (they update exclusive rows), in one statement
-- and one round trip, the replicas told of either with the status it has now (a waiter for
-- the end need not read a claimed one). Returns the record, with `claimed`: true for a run
-- that starts, false for the cancelled end.
WITH cancelled AS ({cancelled}),
started AS ({started}),
taken AS (SELECT false AS claimed, * FROM cancelled
          UNION ALL SELECT true AS claimed, * FROM started)
SELECT taken.*, pg_notify('jobqueue_jobs', jsonb_build_object(
           'id', id, 'owner', owner, 'removed', false, 'status', status)::text)
FROM taken

-- release --
-- A run aborted by a shutdown as it started gives its job back (parameters: id, attempt).
UPDATE jobqueue_jobs SET status = 'queued', started_at = NULL, worker_name = NULL
WHERE id = %s AND attempt = %s AND status = 'running'
RETURNING *

-- end_run_cancelled --
-- A run aborted by a cancel as it started (parameters: finished_at, id, attempt); returns
-- what the cancel said it was.
UPDATE jobqueue_jobs SET status = 'cancelled', finished_at = %s
WHERE id = %s AND attempt = %s AND status = 'running'
RETURNING cancelled_as

-- set_progress --
-- Only the run that claimed the job last (parameters: progress, id, attempt).
UPDATE jobqueue_jobs SET progress = %s WHERE id = %s AND attempt = %s AND status = 'running'

-- finish --
-- A run's end, if it is still the job's latest, in one statement (parameters by name: status,
-- finished_at, progress, error, error_kind, result, id, attempt; procrastinate_id, the run's
-- procrastinate job, deleted with it as procrastinate's finish_job(delete_job=True) would;
-- and the rollup's row, minute and bucket, when `counted`). Returns what a cancel said it
-- was, if one did, the origin as it is now (a /put job's client may have handed it over
-- meanwhile: its files then stay as a POST /jobs job's do, lifecycle.files_after) and whether
-- the procrastinate job was deleted here. The replicas are told with the end's status and,
-- when it fits in a notification, the record itself (a /put waiter then reads nothing).
WITH ended AS (
    UPDATE jobqueue_jobs SET status = %(status)s, finished_at = %(finished_at)s,
                             progress = %(progress)s, error = %(error)s,
                             error_kind = %(error_kind)s, result = %(result)s
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
    RETURNING *),
queue AS (
    DELETE FROM procrastinate_jobs
    WHERE id = %(procrastinate_id)s AND status IN ('todo', 'doing')
      AND EXISTS (SELECT 1 FROM ended)
    RETURNING id),
minutes AS (
    INSERT INTO jobqueue_minutes (owner, job_type, minute, bucket, jobs)
    SELECT owner, job_type, %(minute)s, %(bucket)s, 1 FROM ended WHERE %(counted)s
    ON CONFLICT (owner, job_type, minute, bucket)
    DO UPDATE SET jobs = jobqueue_minutes.jobs + excluded.jobs),
told AS (
    SELECT ended.*, to_jsonb(ended) - 'seq' - 'cancelled_as' - 'procrastinate_id' AS record
    FROM ended)
SELECT cancelled_as, origin, EXISTS (SELECT 1 FROM queue) AS deleted,
       pg_notify('jobqueue_jobs', jsonb_build_object(
           'id', id, 'owner', owner, 'removed', false, 'status', status,
           'record', CASE WHEN octet_length(record::text) <= 7000 THEN record END)::text)
FROM told

-- retry_attempt --
-- A failed attempt its kind retries (lifecycle.retry_in), if it is still the job's latest
-- run and no cancel asked it to stop (then it ends as its run did): queued again, to start
-- no sooner than next_attempt_at, the failure kept with the others, in a new fair round
-- (parameters: next_attempt_at, the failure as a JSON array of one, fair_round, id,
-- attempt).
UPDATE jobqueue_jobs SET status = 'queued', started_at = NULL, worker_name = NULL,
                         progress = '{}', error = NULL, error_kind = NULL, result = NULL,
                         next_attempt_at = %s, earlier_errors = earlier_errors || %s,
                         fair_round = %s
WHERE id = %s AND attempt = %s AND status = 'running' AND cancelled_as IS NULL
RETURNING *

-- retry_failed --
-- A client's retry of a failed job (POST /jobs/{id}/retry): queued again as a kept job, its
-- failure kept with the earlier ones, in a new fair round; a cancel asked of its last run is
-- forgotten (parameters: the failure as a JSON array of one, fair_round, id).
UPDATE jobqueue_jobs SET status = 'queued', origin = 'jobs', started_at = NULL,
                         finished_at = NULL, worker_name = NULL, progress = '{}', error = NULL,
                         error_kind = NULL, result = NULL, next_attempt_at = NULL,
                         earlier_errors = earlier_errors || %s, fair_round = %s,
                         cancelled_as = NULL
WHERE id = %s AND status = 'failed'
RETURNING *

-- hand_over --
-- A /put job whose client stops waiting (Prefer: respond-async) becomes a POST /jobs one,
-- if it has not ended (lifecycle.CAN_HAND_OVER).
UPDATE jobqueue_jobs SET origin = 'jobs'
WHERE id = %s AND status IN ('queued', 'running') AND origin = 'put'
RETURNING *

-- select_origin --
SELECT origin FROM jobqueue_jobs WHERE id = %s

-- requeue_run --
-- A run stopped by its worker's shutdown gives its job back, unless a cancel asked it to stop
-- (its abort may not have reached the worker before the shutdown's did): that one ends as
-- cancelled instead, lifecycle.after_interrupted_run (parameters: id, attempt).
UPDATE jobqueue_jobs SET status = 'queued', started_at = NULL, worker_name = NULL,
                         progress = '{}'
WHERE id = %s AND attempt = %s AND status = 'running' AND cancelled_as IS NULL
RETURNING *

-- add_minutes --
-- Add `jobs` to a row of the rollup (rollup.py; parameters: owner, job type, minute, bucket,
-- jobs).
INSERT INTO jobqueue_minutes (owner, job_type, minute, bucket, jobs) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (owner, job_type, minute, bucket)
DO UPDATE SET jobs = jobqueue_minutes.jobs + excluded.jobs

-- select_minutes --
-- An owner's rows of the rollup since a minute (parameters: owner, since).
SELECT job_type, minute, bucket, jobs FROM jobqueue_minutes WHERE owner = %s AND minute >= %s

-- forget_minutes --
-- The rollup's rows older than a time.
DELETE FROM jobqueue_minutes WHERE minute < %s

-- store_made --
-- The store's id and birth (records.JobStore.store_id), written by schema.sql's make_tables.
SELECT name, value FROM jobqueue_store

-- known_jobs --
-- Which of these jobs have a record.
SELECT id FROM jobqueue_jobs WHERE id = ANY(%s)

-- expired_jobs --
-- The jobs that finished before a time.
SELECT id FROM jobqueue_jobs WHERE finished_at < %s

-- insert_delivery --
-- A new job's callback URL (webhooks.py), in its submit's transaction (parameters: id, owner,
-- url).
INSERT INTO jobqueue_deliveries (job_id, owner, url) VALUES (%s, %s, %s)
ON CONFLICT (job_id) DO NOTHING

-- claim_deliveries --
-- Deliveries due now, each claimed until a time by this process alone (parameters: now,
-- limit, until): rows another process is claiming are skipped, and one it has claimed is not
-- due. A job that ended at another time than its delivery's event starts a new event
-- (attempts from 0, its body made anew); a pending one whose next attempt is due (or whose
-- attempt was cut short: no next_at, its claim run out) is tried again.
WITH due AS (
    SELECT d.job_id, j.finished_at
    FROM jobqueue_deliveries d JOIN jobqueue_jobs j ON j.id = d.job_id
    WHERE j.status IN ('succeeded', 'failed', 'cancelled') AND j.finished_at IS NOT NULL
      AND (d.claimed_until IS NULL OR d.claimed_until < %(now)s)
      AND (d.ended_at IS DISTINCT FROM j.finished_at
           OR (d.status = 'pending' AND (d.next_at IS NULL OR d.next_at <= %(now)s)))
    ORDER BY d.next_at NULLS FIRST
    LIMIT %(limit)s
    FOR UPDATE OF d SKIP LOCKED)
UPDATE jobqueue_deliveries d
SET claimed_until = %(until)s,
    status = CASE WHEN d.ended_at IS NOT DISTINCT FROM due.finished_at THEN d.status
                  ELSE 'pending' END,
    attempts = CASE WHEN d.ended_at IS NOT DISTINCT FROM due.finished_at THEN d.attempts
                    ELSE 0 END,
    last_error = CASE WHEN d.ended_at IS NOT DISTINCT FROM due.finished_at THEN d.last_error
                 END,
    payload = CASE WHEN d.ended_at IS NOT DISTINCT FROM due.finished_at THEN d.payload END,
    next_at = CASE WHEN d.ended_at IS NOT DISTINCT FROM due.finished_at THEN d.next_at END,
    ended_at = due.finished_at
FROM due WHERE d.job_id = due.job_id
RETURNING d.job_id, d.url, d.attempts, d.ended_at, d.payload, d.claimed_until

-- delivery_done --
-- An attempt's outcome, and its claim let go, if the delivery is still of that end
-- and the claim still this one (parameters: status, attempts, last_error, next_at, payload,
-- id, ended_at, claimed_until).
UPDATE jobqueue_deliveries SET status = %s, attempts = %s, last_error = %s, next_at = %s,
                               payload = %s, claimed_until = NULL
WHERE job_id = %s AND ended_at IS NOT DISTINCT FROM %s AND claimed_until = %s

-- select_delivery --
SELECT url, status, attempts, last_error, ended_at FROM jobqueue_deliveries WHERE job_id = %s

-- release_delivery --
-- An attempt cut short by a shutdown (or not made) is due again (parameters: id, ended_at,
-- claimed_until).
UPDATE jobqueue_deliveries SET claimed_until = NULL
WHERE job_id = %s AND ended_at IS NOT DISTINCT FROM %s AND claimed_until = %s
