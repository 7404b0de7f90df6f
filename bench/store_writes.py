"""How long job-store calls hold their caller: p50/p99/max of SqliteJobStore.save (noting the
change for the writer thread, which makes the row), save then flush (until it is committed, as
POST /jobs waits), get and a page of list.

Run: .venv/bin/python bench/store_writes.py [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from jobqueue.records import JobRecord, SqliteJobStore  # noqa: E402

ROUNDS = 2000


def percentile(samples: list[float], fraction: float) -> float:
    return sorted(samples)[int(fraction * (len(samples) - 1))] * 1e6


def main(rounds: int = ROUNDS) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = SqliteJobStore(Path(folder) / "jobs.db")
        saves, commits, gets, lists = [], [], [], []
        for _ in range(rounds):
            record = JobRecord(id=str(uuid.uuid4()), job_type="message", status="queued",
                               options={"data": "x" * 100, "seconds": 3}, input_path=None,
                               created_at=time.time())
            def save_and_flush(record: JobRecord) -> None:
                store.save(record)
                store.flush()

            for samples, call, args in ((saves, store.save, (record,)),
                                        (commits, save_and_flush, (record,)),
                                        (gets, store.get, (record.id,)),
                                        (lists, store.list, ())):
                started = time.perf_counter()
                call(*args)
                samples.append(time.perf_counter() - started)
        print("| call | p50 µs | p99 µs | max µs |\n|---|---|---|---|")
        for name, samples in (("save", saves), ("save + flush", commits), ("get", gets),
                              ("list 20", lists)):
            print(f"| {name} | {percentile(samples, .5):.0f} | {percentile(samples, .99):.0f} "
                  f"| {max(samples) * 1e6:.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    main(parser.parse_args().rounds)
