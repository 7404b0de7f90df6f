"""The thumbnail program: a JPEG at most WIDTH pixels wide of an image (a rendered page),
never enlarged, keeping the aspect ratio.

Run as a child process under the render memory cap (JOBQUEUE_RENDER_MAX_MB), so decoding a
100-megapixel page never takes the server's memory; like kinds/pdfrender.py it imports nothing of
the server:

    python -I children/thumbnail.py SOURCE TARGET WIDTH
"""

from __future__ import annotations

import sys

from PIL import Image

QUALITY = 80
# The exit status when the source or the target's folder is gone (its job was deleted
# meanwhile): the server answers 404 for that, not "no thumbnail can be made".
GONE = 3


def main() -> int:
    source, target, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        with Image.open(source) as image:
            image.draft("RGB", (width, width * 20))  # JPEG sources decode at a fraction
            image.thumbnail((width, width * 20))
            image.convert("RGB").save(target, "JPEG", quality=QUALITY)
    except FileNotFoundError:
        return GONE
    return 0


if __name__ == "__main__":
    sys.exit(main())
