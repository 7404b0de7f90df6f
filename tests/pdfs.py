"""Real PDFs made here, by the tools that make such files elsewhere: matplotlib's PDF backend
(text with an embedded TrueType font; vector paths, fills and hatches) and Pillow's PDF writer
(scanned pages: a JPEG photo, a 1-bit black-and-white page). Nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path

A4_INCHES = (8.27, 11.69)

LOREM = ("Slow work behind HTTP without blocking the event loop: clients wait for the result or "
         "submit and come back. Overload is explicit, and every job kind runs its heavy part in "
         "a child process that a cancel kills. ").split()


def text_pdf(path: Path) -> Path:
    """A page of small running text in DejaVu Sans (embedded as TrueType), with a heading."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["pdf.fonttype"] = 42
    import matplotlib.pyplot as plt

    words = random.Random(1)
    figure = plt.figure(figsize=A4_INCHES)
    figure.text(0.08, 0.95, "Quarterly report: rendering fidelity", fontsize=18, weight="bold")
    for line in range(60):
        text = " ".join(words.choice(LOREM) for _ in range(14))
        figure.text(0.08, 0.91 - line * 0.0145, text, fontsize=8.5)
    figure.savefig(path, format="pdf")
    plt.close(figure)
    return path


def vector_pdf(path: Path) -> Path:
    """Charts: thin lines, filled and hatched areas, a pie, markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = random.Random(2)
    figure, axes = plt.subplots(2, 2, figsize=A4_INCHES)
    xs = [x / 10 for x in range(200)]
    for k in range(5):
        axes[0][0].plot(xs, [((x * (k + 1)) % 7) - k for x in xs], linewidth=0.6)
    axes[0][1].bar(range(12), [rng.uniform(1, 9) for _ in range(12)], hatch="//",
                   edgecolor="black", color="#8ab")
    axes[1][0].pie([3, 5, 2, 7], labels=["a", "b", "c", "d"], wedgeprops={"linewidth": 1})
    axes[1][1].scatter([rng.random() for _ in range(300)], [rng.random() for _ in range(300)],
                       s=6, marker="^")
    axes[1][1].fill_between([0, 0.5, 1], [0, 0.8, 0.2], alpha=0.3)
    figure.savefig(path, format="pdf")
    plt.close(figure)
    return path


def photo_scan_pdf(path: Path) -> Path:
    """A page scanned in colour at 150 dpi and saved as JPEG: shading, noise, dark print."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(3)
    width, height = int(A4_INCHES[0] * 150), int(A4_INCHES[1] * 150)
    page = Image.linear_gradient("L").resize((width, height)).point(lambda v: 190 + v // 5)
    draw = ImageDraw.Draw(page)
    for row in range(40):
        y = 120 + row * 40
        draw.rectangle((100, y, 100 + rng.randint(400, 1000), y + 14), fill=rng.randint(20, 70))
    page = page.filter(ImageFilter.GaussianBlur(1.2))
    page = Image.blend(page, Image.effect_noise((width, height), 40), 0.1)
    tint = Image.merge("RGB", (page, page, page.point(lambda v: max(0, v - 25))))
    tint.save(path, "PDF", resolution=150, quality=80)
    return path


def fax_scan_pdf(path: Path) -> Path:
    """A page scanned in black and white at 300 dpi (1 bit a pixel), as office scanners save
    text: its fine strokes must survive the scaling to the requested dpi."""
    from PIL import Image, ImageDraw

    rng = random.Random(4)
    width, height = int(A4_INCHES[0] * 300), int(A4_INCHES[1] * 300)
    page = Image.new("1", (width, height), 1)
    draw = ImageDraw.Draw(page)
    for row in range(70):
        y = 200 + row * 45
        for word in range(rng.randint(6, 12)):
            x = 200 + word * 170
            draw.rectangle((x, y, x + rng.randint(60, 150), y + 22), fill=0)
    draw.line((150, 150, width - 150, height - 150), fill=0, width=3)
    page.save(path, "PDF", resolution=300)
    return path
