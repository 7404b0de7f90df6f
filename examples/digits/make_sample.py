"""Writes jobqueue_digits/sample.png, the image a `digits` job reads when it is sent none: the
first 3 of scikit-learn's own digits, dark on light and 8 times its size (python
make_sample.py)."""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

SCALE = 8


def digit_image(pixels: np.ndarray, scale: int = SCALE) -> Image.Image:
    """One of load_digits' 8x8 images (0-16, ink bright) as a picture: dark ink on white."""
    grey = np.round(255 - pixels * 255 / 16).astype(np.uint8)
    return Image.fromarray(grey).resize((8 * scale, 8 * scale), Image.Resampling.NEAREST)


def main() -> None:
    digits = load_digits()
    first_three = int(np.flatnonzero(digits.target == 3)[0])
    digit_image(digits.images[first_three]).save(
        Path(__file__).parent / "jobqueue_digits" / "sample.png", optimize=True)


if __name__ == "__main__":
    main()
