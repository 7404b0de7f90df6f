-- What the embedded engine's job store (records.SqliteJobStore) asks SQLite, by name (sql.py).

-- journal_mode --
PRAGMA journal_mode=WAL

-- synchronous --
PRAGMA synchronous=NORMAL

-- quick_check --
-- Up to 5 problems of a damaged file; one row 'ok' for a sound one.
PRAGMA quick_check(5)

-- make_tables --
-- The first tables (the columns added since are add_*); job_minutes is the jobs-per-minute
-- rollup (rollup.py).
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    job_type TEXT NOT NULL,
    status TEXT NOT NULL,
    options TEXT NOT NULL,
    input_path TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    worker_name TEXT,
    progress TEXT,
    error TEXT,
    result TEXT,
    origin TEXT NOT NULL DEFAULT 'jobs',
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS store (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_minutes (
    owner TEXT NOT NULL,
    job_type TEXT NOT NULL,
    minute INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    jobs INTEGER NOT NULL,
    PRIMARY KEY (owner, job_type, minute, bucket)
);

-- table_columns --
PRAGMA table_info(jobs)

-- add_owner --
-- Columns added after the first release, for databases made before them. (A database that
-- still has the old bad_input column keeps it, unused.)
ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''

-- add_error_kind --
ALTER TABLE jobs ADD COLUMN error_kind TEXT

-- add_attempt --
ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0

-- backfill_attempt --
-- In add_attempt's transaction: a record from before attempts were counted that had started
-- ran at least once (a job it was running when the server died then counts its rerun as the
-- second).
UPDATE jobs SET attempt = 1 WHERE started_at IS NOT NULL

-- add_idempotency_key --
ALTER TABLE jobs ADD COLUMN idempotency_key TEXT

-- add_priority --
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0

-- add_fair_round --
ALTER TABLE jobs ADD COLUMN fair_round INTEGER NOT NULL DEFAULT 0

-- add_next_attempt_at --
ALTER TABLE jobs ADD COLUMN next_attempt_at REAL

-- add_earlier_errors --
ALTER TABLE jobs ADD COLUMN earlier_errors TEXT

-- add_fair_key --
ALTER TABLE jobs ADD COLUMN fair_key TEXT NOT NULL DEFAULT ''

-- add_traceparent --
ALTER TABLE jobs ADD COLUMN traceparent TEXT

-- make_indexes --
-- jobs_listing: a page of GET /jobs walks one owner's newest jobs and stops at the page's
-- end, rather than sorting all of them (and summarizing each one's result) first.
CREATE INDEX IF NOT EXISTS jobs_idempotency ON jobs (owner, idempotency_key);
CREATE INDEX IF NOT EXISTS jobs_listing ON jobs (owner, seq);

-- note_store --
-- The store's id and birth (records.JobStore.store_id), made once (parameters: name, value).
INSERT OR IGNORE INTO store VALUES (?, ?)

-- store_made --
SELECT name, value FROM store

-- save_job --
-- Insert or replace a record, which keeps its place in the order of arrival (seq); the
-- parameters are records._row(record), in records.COLUMNS' order.
INSERT INTO jobs (id, job_type, status, options, input_path, created_at, started_at,
                  finished_at, worker_name, progress, error, error_kind, result, origin, owner,
                  attempt, idempotency_key, priority, fair_round, next_attempt_at,
                  earlier_errors, fair_key, traceparent)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET
    job_type = excluded.job_type, status = excluded.status, options = excluded.options,
    input_path = excluded.input_path, created_at = excluded.created_at,
    started_at = excluded.started_at, finished_at = excluded.finished_at,
    worker_name = excluded.worker_name, progress = excluded.progress, error = excluded.error,
    error_kind = excluded.error_kind, result = excluded.result, origin = excluded.origin,
    owner = excluded.owner, attempt = excluded.attempt,
    idempotency_key = excluded.idempotency_key, priority = excluded.priority,
    fair_round = excluded.fair_round, next_attempt_at = excluded.next_attempt_at,
    earlier_errors = excluded.earlier_errors, fair_key = excluded.fair_key,
    traceparent = excluded.traceparent

-- delete_job --
DELETE FROM jobs WHERE id = ?

-- select_job --
SELECT * FROM jobs WHERE id = ?

-- select_idempotent --
-- The jobs an owner submitted with this Idempotency-Key (parameters: owner, key).
SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?

-- list_jobs --
-- A page of one owner's jobs, newest first, as summaries: no options, and only the file names
-- of a result. {filters}: and_status, and_job_type, each if asked (records.list_query).
SELECT seq, id, job_type, status, '{}' AS options, input_path, created_at, started_at,
       finished_at, worker_name, progress, error, error_kind,
       CASE WHEN json_type(result) = 'object'
            THEN json_object('files', json_extract(result, '$.files')) END AS result,
       origin, owner, attempt, idempotency_key, priority, fair_round, next_attempt_at,
       earlier_errors, fair_key, traceparent
FROM jobs WHERE owner = ? {filters}
ORDER BY seq DESC LIMIT ? OFFSET ?

-- and_status --
AND status = ?

-- and_job_type --
AND job_type = ?

-- unfinished_jobs --
-- Queued and running jobs in the order they arrived.
SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY seq

-- finished_before --
SELECT * FROM jobs WHERE finished_at < ?

-- add_minutes --
-- Add `jobs` to a row of the rollup (rollup.py; parameters: owner, job type, minute, bucket,
-- jobs).
INSERT INTO job_minutes (owner, job_type, minute, bucket, jobs) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (owner, job_type, minute, bucket)
DO UPDATE SET jobs = job_minutes.jobs + excluded.jobs

-- select_minutes --
-- An owner's rows of the rollup since a minute (parameters: owner, since).
SELECT job_type, minute, bucket, jobs FROM job_minutes WHERE owner = ? AND minute >= ?

-- forget_minutes --
-- The rollup's rows older than a time.
DELETE FROM job_minutes WHERE minute < ?

-- shrink_log --
-- Give the write-ahead log's space back to the disk.
PRAGMA wal_checkpoint(TRUNCATE)

-- make_deliveries --
-- Completion webhooks (webhooks.py): a row per job with a callback URL, made with the job's
-- first record and deleted with the job. `ended_at` is the job end its event is of (the job's
-- finished_at then); `claimed_until` keeps a delivery's attempt to one delivery loop.
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    url TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    ended_at REAL,
    next_at REAL,
    claimed_until REAL,
    payload TEXT
);

-- add_delivery --
-- A job's callback URL, in the commit that has its record (parameters: id, owner, url).
INSERT OR IGNORE INTO deliveries (job_id, owner, url) VALUES (?, ?, ?)

-- job_exists --
SELECT 1 FROM jobs WHERE id = ?

-- delete_delivery --
DELETE FROM deliveries WHERE job_id = ?

-- claim_deliveries --
-- Deliveries due now, claimed until a time (parameters: now, limit, until): a job that ended
-- at another time than its delivery's event starts a new event (attempts from 0, its body
-- made anew); a pending one whose next attempt is due (or whose attempt was cut
-- short: no next_at, its claim run out) is tried again.
UPDATE deliveries AS d
SET claimed_until = :until,
    status = CASE WHEN d.ended_at IS j.finished_at THEN d.status ELSE 'pending' END,
    attempts = CASE WHEN d.ended_at IS j.finished_at THEN d.attempts ELSE 0 END,
    last_error = CASE WHEN d.ended_at IS j.finished_at THEN d.last_error END,
    payload = CASE WHEN d.ended_at IS j.finished_at THEN d.payload END,
    next_at = CASE WHEN d.ended_at IS j.finished_at THEN d.next_at END,
    ended_at = j.finished_at
FROM jobs AS j
WHERE j.id = d.job_id AND d.job_id IN (
    SELECT due.job_id FROM deliveries AS due JOIN jobs AS job ON job.id = due.job_id
    WHERE job.status IN ('succeeded', 'failed', 'cancelled') AND job.finished_at IS NOT NULL
      AND (due.claimed_until IS NULL OR due.claimed_until < :now)
      AND (due.ended_at IS NOT job.finished_at
           OR (due.status = 'pending' AND (due.next_at IS NULL OR due.next_at <= :now)))
    ORDER BY due.next_at LIMIT :limit)
RETURNING job_id, url, attempts, ended_at, payload, claimed_until

-- delivery_done --
-- An attempt's outcome, and its claim let go, if the delivery is still of that end and the
-- claim still this one (parameters: status, attempts, last_error, next_at, payload, id,
-- ended_at, claimed_until).
UPDATE deliveries SET status = ?, attempts = ?, last_error = ?, next_at = ?, payload = ?,
                      claimed_until = NULL
WHERE job_id = ? AND ended_at IS ? AND claimed_until IS ?

-- release_delivery --
-- A claim let go without an attempt (parameters: id, ended_at, claimed_until).
UPDATE deliveries SET claimed_until = NULL
WHERE job_id = ? AND ended_at IS ? AND claimed_until IS ?

-- select_delivery --
SELECT url, status, attempts, last_error, ended_at FROM deliveries WHERE job_id = ?

-- release_deliveries --
-- At an embedded server's start: no other process claims here, so no claim is live.
UPDATE deliveries SET claimed_until = NULL WHERE claimed_until IS NOT NULL
