"""Make the bad-input corpus: files that look like a job's input and are not, or barely are.

    python tests/corpus/make_corpus.py [OUT_DIR]     (default: tests/corpus/files, git-ignored)

Everything is generated here (by hand-written PDF bytes and ffmpeg's test sources), nothing is
downloaded. tests/test_bad_input.py sends each file to /put and /jobs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parents[1] / "data"


def pdf(pages: int, encrypted: bool = False) -> bytes:
    """A valid PDF with `pages` empty pages; `encrypted` adds a standard security handler whose
    user password is not empty, so poppler cannot open it without one."""
    kids = " ".join(f"{4 + page} 0 R" for page in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
        b"<< /Length 0 >>\nstream\n\nendstream",
        *[b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 3 0 R >>"] * pages,
    ]
    trailer = ""
    if encrypted:
        objects.append(b"<< /Filter /Standard /V 1 /R 2 /P -4 /O <" + b"11" * 32
                       + b"> /U <" + b"22" * 32 + b"> >>")
        trailer = f" /Encrypt {len(objects)} 0 R /ID [<{'ab' * 16}> <{'ab' * 16}>]"
    body, offsets = b"%PDF-1.4\n", []
    for number, content in enumerate(objects, 1):
        offsets.append(len(body))
        body += f"{number} 0 obj\n".encode() + content + b"\nendobj\n"
    xref = len(body)
    body += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    body += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    body += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{trailer} >>\n"
             f"startxref\n{xref}\n%%EOF\n").encode()
    return body


def ffmpeg(target: Path, *args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args, str(target)],
                   check=True)


def make(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    sample_pdf = (SAMPLES / "sample.pdf").read_bytes()
    files = {
        "empty.pdf": b"",
        "truncated.pdf": sample_pdf[: len(sample_pdf) * 2 // 5],
        "html-behind-pdf-header.pdf": b"%PDF-1.7\n<html><body><script>alert(1)</script>"
                                      b"</body></html>\n",
        "thousand-pages.pdf": pdf(1000),
        "encrypted.pdf": pdf(1, encrypted=True),
        "text-named.pdf": b"just some notes\n",
        "empty.mp4": b"",
        "text-named.mp4": b"not a video\n",
    }
    for name, content in files.items():
        (out / name).write_bytes(content)
    ffmpeg(out / "image-named.pdf", "-f", "lavfi", "-i", "color=red:size=16x16",
           "-frames:v", "1", "-f", "image2", "-c:v", "png")
    ffmpeg(out / "audio-only.mp4", "-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac")
    ffmpeg(out / "tiny-2x2.mp4", "-f", "lavfi", "-i", "testsrc=duration=1:size=2x2:rate=5",
           "-pix_fmt", "yuv420p", "-c:v", "libx264")
    # An H.264 stream whose container says HEVC: ffprobe believes it, the decoder does not.
    source = out / "h264.mp4"
    ffmpeg(source, "-f", "lavfi", "-i", "testsrc=duration=1:size=320x240:rate=10",
           "-pix_fmt", "yuv420p", "-c:v", "libx264")
    lying = source.read_bytes().replace(b"avc1", b"hvc1").replace(b"avcC", b"hvcC")
    (out / "codec-lie.mp4").write_bytes(lying)
    source.unlink()
    return sorted(out.iterdir())


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "files"
    for path in make(target):
        print(path)
