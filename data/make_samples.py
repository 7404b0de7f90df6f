"""Make the bundled samples: data/sample.pdf (4 scanned-looking A4 pages) and data/sample.mp4
(4 s of 720p test pattern with a tone). Run: python data/make_samples.py  (needs Pillow, ffmpeg).

Both are links to src/jobqueue/kinds/samples/, where the package (and its wheel) has them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

DATA_DIR = Path(__file__).resolve().parent
PAGES = 4
DPI = 100  # A4 at 100 dpi is 827 x 1169 pixels


def make_pdf(path: Path) -> None:
    font = ImageFont.load_default(size=28)
    pages = []
    for number in range(1, PAGES + 1):
        page = Image.new("L", (827, 1169), 255)
        draw = ImageDraw.Draw(page)
        draw.text((80, 80), f"jobqueue sample document - page {number} of {PAGES}", font=font,
                  fill=0)
        for line in range(30):
            draw.line((80, 160 + line * 32, 747 - (line * 37) % 200, 160 + line * 32), fill=90,
                      width=3)
        draw.rectangle((80, 1100, 747, 1102), fill=0)
        pages.append(page)
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=DPI, quality=60)


def make_video(path: Path) -> None:
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y",
         "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25:duration=4",
         "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=4",
         "-c:v", "libx264", "-preset", "veryfast", "-crf", "32", "-pix_fmt", "yuv420p",
         "-c:a", "aac", "-b:a", "64k", "-shortest", "-movflags", "+faststart", str(path)],
        check=True,
    )


if __name__ == "__main__":
    make_pdf(DATA_DIR / "sample.pdf")
    make_video(DATA_DIR / "sample.mp4")
    for name in ("sample.pdf", "sample.mp4"):
        print(f"{name}: {(DATA_DIR / name).stat().st_size} bytes")
