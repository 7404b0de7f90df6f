"""Jobs finished per minute, for the dashboard's chart (`GET /throughput`).

Each job that runs to an end (succeeded or failed) adds one to a row of a small table beside
the job records, in the same database and the same transaction as its end: (owner, kind,
minute, run-time bucket) → jobs. The chart then reads at most a few thousand rows, however
many jobs an hour holds; counting from the records themselves sorts every job of the hour
(seconds of work at a few hundred jobs a second). Counters of /metrics would not do: they
start at zero with each process, and each process has only its own. The table and its queries
are in each engine's SQL (records.sql; engines/postgres/schema.sql and queries.sql).

Run times go into buckets 20 to a decade (each 12% wider than the one before), so p50 and p95
are read to within 6% above 0.1 ms (a shorter run shows as 0.1 ms); the count of jobs is
exact.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import NamedTuple

from jobqueue.jobs import JobStatus

BUCKETS_PER_DECADE = 20
SMALLEST_SECONDS = 0.0001  # bucket 0: this long or less (a no-op job takes about this)
# The longest window /throughput shows; older rows are swept with the expired jobs.
KEPT_SECONDS = 86400
COUNTED = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value)

Key = tuple[str, str, int, int]  # owner, job type, minute (epoch seconds of its start), bucket


class MinuteFigures(NamedTuple):
    """The jobs of one kind that ran to an end in one minute."""

    job_type: str
    minute: int  # its start, in epoch seconds
    finished: int
    p50_seconds: float  # run times: the median and the 95th percentile (nearest rank)
    p95_seconds: float


def key(owner: str, job_type: str, status: str, started_at: float | None,
        finished_at: float | None) -> Key | None:
    """The row a job's end adds one to; None for a job that never ran or was cancelled."""
    if status not in COUNTED or started_at is None or finished_at is None:
        return None
    seconds = max(finished_at - started_at, SMALLEST_SECONDS)
    bucket = math.ceil(BUCKETS_PER_DECADE * math.log10(seconds / SMALLEST_SECONDS) - 1e-9)
    return owner, job_type, int(finished_at // 60 * 60), max(0, bucket)


def bucket_seconds(bucket: int) -> float:
    """A bucket's run time as shown: the geometric middle of its bounds."""
    if bucket == 0:
        return SMALLEST_SECONDS
    return SMALLEST_SECONDS * 10 ** ((bucket - 0.5) / BUCKETS_PER_DECADE)


def figures(rows: Iterable[tuple[str, int, int, int]]) -> list[MinuteFigures]:
    """MinuteFigures from (job type, minute, bucket, jobs) rows, oldest minute first."""
    groups: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)
    for job_type, minute, bucket, jobs in rows:
        groups[job_type, minute][bucket] = groups[job_type, minute].get(bucket, 0) + jobs
    result = []
    for (job_type, minute), buckets in sorted(groups.items(), key=lambda g: (g[0][1], g[0][0])):
        total = sum(buckets.values())
        result.append(MinuteFigures(job_type, minute, total,
                                    _percentile(buckets, math.ceil(0.5 * total)),
                                    _percentile(buckets, math.ceil(0.95 * total))))
    return result


def _percentile(buckets: dict[int, int], rank: int) -> float:
    seen = 0
    for bucket in sorted(buckets):
        seen += buckets[bucket]
        if seen >= rank:
            return float(f"{bucket_seconds(bucket):.3g}")  # the 6% is all the error
    return 0.0
