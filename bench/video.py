"""video: /put resize of a 720p 10 s clip with audio to width 640, against the same ffmpeg."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from statistics import median

import httpx

from common import CACHE, make_clip, server, spread, table, timed
from jobqueue.kinds.video import ffmpeg_command

WIDTH = 640


def engine_alone(clip: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(ffmpeg_command(str(clip), f"{folder}/out.mp4", (WIDTH, -2)),
                       check=True)


def through_server(url: str, clip: Path) -> None:
    with open(clip, "rb") as file:
        response = httpx.post(f"{url}/put", data={"jobType": "video", "width": str(WIDTH)},
                              files={"file": (clip.name, file)}, timeout=600)
    response.raise_for_status()


def run(runs: int, seconds: int = 10) -> dict:
    clip = make_clip(CACHE / f"clip-720p-{seconds}s.mp4", seconds, "1280x720")
    served, alone = [], []
    with server() as srv:
        through_server(srv.url, clip)  # warm-up of both, not counted
        engine_alone(clip)
        for _ in range(runs):  # interleaved, so a slow spell of the machine hits both
            served.append(timed(through_server, srv.url, clip))
            alone.append(timed(engine_alone, clip))
    ratio = median(served) / median(alone)
    text = table(
        [f"video: {seconds} s 720p → {WIDTH} wide", "wall s, median (min–max)"],
        [["jobqueue /put (upload included)", spread(served)],
         ["ffmpeg alone, same command", spread(alone)],
         ["ratio server / engine (target ≤ 1.05)", f"{ratio:.2f}"]])
    return {"name": "video", "text": text, "ratio": ratio,
            "chart": ("video wall s", {"jobqueue": median(served),
                                       "ffmpeg alone": median(alone)})}


if __name__ == "__main__":
    print(run(3)["text"])
