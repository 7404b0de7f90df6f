-- The distributed engine's tables beside procrastinate's, and what makes them (schema.ensure).
-- The queries on them are in queries.sql. (Loaded by sql.py: a query under each header.)

-- lock_schema --
-- Taken while the schema is made (parameter: schema.SCHEMA_LOCK), so replicas and workers
-- starting together make it once.
SELECT pg_advisory_xact_lock(%s)

-- procrastinate_installed --
SELECT to_regclass('procrastinate_jobs') IS NOT NULL

-- make_tables --
-- jobqueue_minutes: the jobs-per-minute rollup (rollup.py).
CREATE TABLE IF NOT EXISTS jobqueue_jobs (
    seq bigserial UNIQUE,
    id text PRIMARY KEY,
    job_type text NOT NULL,
    status text NOT NULL,
    options jsonb NOT NULL,
    input_path text,
    created_at double precision NOT NULL,
    started_at double precision,
    finished_at double precision,
    worker_name text,
    progress jsonb NOT NULL DEFAULT '{}',
    error text,
    error_kind text,
    result jsonb,
    origin text NOT NULL,
    owner text NOT NULL DEFAULT '',
    attempt integer NOT NULL DEFAULT 0,
    idempotency_key text,
    procrastinate_id bigint,
    cancelled_as text
);
CREATE INDEX IF NOT EXISTS jobqueue_jobs_waiting ON jobqueue_jobs (job_type, status, seq);
CREATE INDEX IF NOT EXISTS jobqueue_jobs_listing ON jobqueue_jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobqueue_jobs_procrastinate ON jobqueue_jobs (procrastinate_id);
CREATE UNIQUE INDEX IF NOT EXISTS jobqueue_jobs_idempotency
    ON jobqueue_jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS jobqueue_workers (
    name text PRIMARY KEY,
    kinds jsonb NOT NULL,
    heartbeat double precision NOT NULL,
    metrics text,
    states jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS jobqueue_minutes (
    owner TEXT NOT NULL,
    job_type TEXT NOT NULL,
    minute bigint NOT NULL,
    bucket INTEGER NOT NULL,
    jobs bigint NOT NULL,
    PRIMARY KEY (owner, job_type, minute, bucket)
);
-- The store's own id (records.JobStore.store_id), made once by whoever makes the tables.
CREATE TABLE IF NOT EXISTS jobqueue_store (name text PRIMARY KEY, value text NOT NULL);
INSERT INTO jobqueue_store VALUES ('id', gen_random_uuid()::text),
    ('created_at', extract(epoch FROM clock_timestamp())::text) ON CONFLICT DO NOTHING;
-- Columns added since the first tables were made.
ALTER TABLE jobqueue_jobs ADD COLUMN IF NOT EXISTS cancelled_as text;
-- Priorities, fair share and retries (records.JobRecord).
ALTER TABLE jobqueue_jobs ADD COLUMN IF NOT EXISTS priority integer NOT NULL DEFAULT 0;
ALTER TABLE jobqueue_jobs ADD COLUMN IF NOT EXISTS fair_round integer NOT NULL DEFAULT 0;
ALTER TABLE jobqueue_jobs ADD COLUMN IF NOT EXISTS next_attempt_at double precision;
ALTER TABLE jobqueue_jobs ADD COLUMN IF NOT EXISTS earlier_errors jsonb NOT NULL DEFAULT '[]';
ALTER TABLE jobqueue_jobs ADD COLUMN IF NOT EXISTS fair_key text NOT NULL DEFAULT '';
-- The submitting request's W3C traceparent (tracing.py), for the worker's spans.
ALTER TABLE jobqueue_jobs ADD COLUMN IF NOT EXISTS traceparent text;
ALTER TABLE jobqueue_workers ADD COLUMN IF NOT EXISTS metrics text;
-- Each kind's resource in the worker ({"<kind>": {"state", "error", "retryIn"}}); a worker of
-- before it writes none, its kinds count as ready.
ALTER TABLE jobqueue_workers ADD COLUMN IF NOT EXISTS states jsonb NOT NULL DEFAULT '{}';
-- Completion webhooks (webhooks.py): a row per job with a callback URL, written in the job's
-- submit transaction and deleted with the job. `ended_at` is the job end its event is of;
-- `claimed_until` keeps each attempt to one process (claim_deliveries).
CREATE TABLE IF NOT EXISTS jobqueue_deliveries (
    job_id text PRIMARY KEY REFERENCES jobqueue_jobs (id) ON DELETE CASCADE,
    owner text NOT NULL DEFAULT '',
    url text NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    ended_at double precision,
    next_at double precision,
    claimed_until double precision,
    payload text
);
