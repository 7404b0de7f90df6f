"""objectstore: the distributed mode with its files in object storage (SeaweedFS's S3 gateway on
loopback) against the same deployment sharing a folder, in the same run.

1. The workloads: 4 concurrent `/put` of a 17-page scanned PDF at 200 dpi, then a 10 s 720p clip
   resized to 640 wide, each through one API replica and one worker process (its own out/ folder
   with object storage: nothing is shared but PostgreSQL and the bucket). Target: object
   storage's wall ≤ 1.15 × the shared folder's.
2. The client: obstore (what the server uses) against boto3, the client most people reach for,
   moving the same bytes to and from the same server: one 64 MB file, and 68 files of 0.6 MB
   (the pages of those 4 PDFs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from statistics import median

import pdf as pdf_bench
import video as video_bench
from common import CACHE, SHARED, free_port, make_clip, spread, table, timed
from jobqueue.local import cluster
from jobqueue.local.postgres import LocalPostgres
from jobqueue.local.seaweedfs import LocalSeaweed

BUCKET = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
               "AWS_REGION": "us-east-1"}
# The same workloads as pdf.py and video.py, through their own /put helpers.
CONCURRENT, DPI, WIDTH = pdf_bench.CONCURRENT, pdf_bench.DPI, video_bench.WIDTH


def deployment(database_url: str, folder: Path, storage: dict[str, str]) -> tuple[str, list]:
    """One replica and one worker; with `storage`, each with an out/ folder of its own."""
    env = {**os.environ, **CREDENTIALS, "JOBQUEUE_DATABASE_URL": database_url,
           "JOBQUEUE_OUT_DIR": str(folder / "out"), "JOBQUEUE_RATE_LIMIT": "10000000/minute",
           "JOBQUEUE_SHUTDOWN_GRACE": "0", "JOBQUEUE_PDF2IMAGE_TIMEOUT": "3600",
           "JOBQUEUE_VIDEO_TIMEOUT": "3600"}
    env.update({f"JOBQUEUE_{key.upper()}": value for key, value in storage.items()})
    worker_env = {**env, "JOBQUEUE_OUT_DIR": str(folder / "worker-out")} if storage else env
    port = free_port()
    processes = [cluster.start_worker(worker_env, folder / "worker.log"),
                 cluster.start_replica(env, port, folder / "replica.log")]
    url = f"http://127.0.0.1:{port}"
    cluster.wait_ready(url, processes[-1], folder / "replica.log")
    return url, processes


def workloads(runs: int, pdf: Path, clip: Path, database: LocalPostgres, weed: LocalSeaweed,
              folder: Path) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    pdf_walls: dict[str, list[float]] = {}
    clip_walls: dict[str, list[float]] = {}
    modes = {"shared folder": {},
             "object storage": {"storage_url": f"s3://{BUCKET}/run-{uuid.uuid4().hex[:8]}",
                                "s3_endpoint": weed.url}}
    deployments = {}
    try:
        for name, storage in modes.items():  # a database each: a queue each
            deployments[name] = deployment(database.new_database(),
                                           folder / name.replace(" ", "-"), storage)
        for url, _ in deployments.values():  # warm-up, not counted
            video_bench.through_server(url, clip)
        for run_number in range(runs):  # interleaved, each first in turn: a slow spell of
            order = list(deployments.items())  # the machine hits both alike
            for name, (url, _) in order[run_number % 2:] + order[:run_number % 2]:
                pdf_walls.setdefault(name, []).append(timed(pdf_bench.through_server, url, pdf))
                clip_walls.setdefault(name, []).append(timed(video_bench.through_server, url, clip))
    finally:
        for _, processes in deployments.values():
            cluster.stop(processes, 15)
    return pdf_walls, clip_walls


def clients(runs: int, weed: LocalSeaweed, folder: Path, big_mb: int, pages_count: int
            ) -> dict[str, dict[str, list[float]]]:
    """Seconds to put and get one big file and many page-sized ones, per client."""
    import boto3
    import obstore
    from obstore.store import S3Store

    big = folder / "big.bin"
    big.write_bytes(os.urandom(big_mb * 2**20))
    pages = []
    for number in range(pages_count):
        page = folder / f"page-{number:03d}.png"
        page.write_bytes(os.urandom(600_000))
        pages.append(page)
    store = S3Store(BUCKET, prefix="clients", endpoint=weed.url,
                    client_options={"allow_http": True}, virtual_hosted_style_request=False,
                    access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                    secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region="us-east-1")
    s3 = boto3.client("s3", endpoint_url=weed.url, region_name="us-east-1",
                      aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def obstore_put(paths: list[Path]) -> None:
        for path in paths:
            with path.open("rb") as source:
                obstore.put(store, path.name, source, chunk_size=8 * 2**20, max_concurrency=4)

    def obstore_get(paths: list[Path]) -> None:
        for path in paths:
            with open(os.devnull, "wb") as sink:
                for chunk in obstore.get(store, path.name):
                    sink.write(chunk)

    def boto3_put(paths: list[Path]) -> None:
        for path in paths:
            s3.upload_file(str(path), BUCKET, f"clients/{path.name}")

    def boto3_get(paths: list[Path]) -> None:
        for path in paths:
            with open(os.devnull, "wb") as sink:
                s3.download_fileobj(BUCKET, f"clients/{path.name}", sink)

    results: dict[str, dict[str, list[float]]] = {}
    for _ in range(runs):
        for name, put, get in (("obstore", obstore_put, obstore_get),
                               ("boto3", boto3_put, boto3_get)):
            for what, paths in ((f"{big_mb} MB", [big]), (f"{pages_count} × 0.6 MB", pages)):
                results.setdefault(name, {}).setdefault(f"put {what}", []).append(
                    timed(put, paths))
                results[name].setdefault(f"get {what}", []).append(timed(get, paths))
    return results


def run(runs: int, pdf: Path = SHARED / "regal-17pages.pdf", seconds: int = 10,
        big_mb: int = 64, pages_count: int = CONCURRENT * 17) -> dict:
    clip = make_clip(CACHE / f"clip-720p-{seconds}s.mp4", seconds, "1280x720")
    folder = Path(tempfile.mkdtemp(prefix="jobqueue-bench-objects-"))
    # Not inside `folder`: PostgreSQL runs as the postgres user, who may not enter it.
    database = LocalPostgres(Path(tempfile.mkdtemp(prefix="jobqueue-bench-pg-")))
    weed = LocalSeaweed(folder / "seaweedfs")
    try:
        database.start()
        weed.start()
        weed.make_bucket(BUCKET)
        pdf_walls, clip_walls = workloads(runs, pdf, clip, database, weed, folder)
        client_times = clients(runs, weed, folder, big_mb, pages_count)
    finally:
        weed.stop()
        database.stop()
        shutil.rmtree(database.folder, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    shared, stored = "shared folder", "object storage"
    ratios = {what: median(walls[stored]) / median(walls[shared])
              for what, walls in (("pdf", pdf_walls), ("video", clip_walls))}
    text = table(
        ["objectstore: 1 replica + 1 worker", "shared folder, wall s", "object storage, wall s",
         "ratio (target ≤ 1.15)"],
        [[f"{CONCURRENT} × {pdf.name} at {DPI} dpi, /put", spread(pdf_walls[shared]),
          spread(pdf_walls[stored]), f"**{ratios['pdf']:.2f}**"],
         [f"{seconds} s 720p clip → {WIDTH} wide, /put", spread(clip_walls[shared]),
          spread(clip_walls[stored]), f"**{ratios['video']:.2f}**"]])
    rows = [[what, spread(client_times["obstore"][what]), spread(client_times["boto3"][what]),
             f"{median(client_times['boto3'][what]) / median(client_times['obstore'][what]):.2f}"]
            for what in client_times["obstore"]]
    text += "\n\n" + table(["S3 client, same SeaweedFS", "obstore s", "boto3 s",
                            "boto3 ÷ obstore"], rows)
    return {"name": "objectstore", "text": text, "ratios": ratios,
            "chart": ("objectstore wall s", {"object storage": median(pdf_walls[stored]),
                                             "shared folder": median(pdf_walls[shared])})}


if __name__ == "__main__":
    import sys

    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3)["text"])
