"""Reading facts off output files: PNG sizes and ffprobe stream info."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path


def png_size(content: bytes) -> tuple[int, int]:
    assert content[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", content[16:24])
    return width, height


def probe_streams(path: Path) -> dict[str, dict]:
    """The first stream of each type (video, audio) in a media file."""
    output = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
        check=True, capture_output=True,
    ).stdout
    streams = {}
    for stream in json.loads(output)["streams"]:
        streams.setdefault(stream["codec_type"], stream)
    return streams


def pdf_page_points(path: Path) -> tuple[int, float, float]:
    """Page count and the first page's width and height in points, from pdfinfo."""
    info = subprocess.run(["pdfinfo", str(path)], check=True, capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    size = fields["Page size"].split()
    return int(fields["Pages"]), float(size[0]), float(size[2])


def make_clip(path: Path, seconds: int) -> Path:
    """A 640x360 test-pattern video long enough for ffmpeg to be caught mid-job."""
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    f"testsrc=duration={seconds}:size=640x360:rate=25", "-preset", "ultrafast",
                    str(path)], check=True)
    return path
