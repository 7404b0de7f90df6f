"""Draws jobqueue_ocr/sample.png, the image an `ocr` job reads when it is sent none:
python make_sample.py (Pillow's own font, so any machine draws the same picture)."""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LINES = ["HELLO 42", "jobqueue reads this"]


def main() -> None:
    font = ImageFont.load_default(size=48)
    image = Image.new("L", (640, 200), 255)
    draw = ImageDraw.Draw(image)
    for number, line in enumerate(LINES):
        draw.text((32, 32 + 72 * number), line, font=font, fill=0)
    image.save(Path(__file__).parent / "jobqueue_ocr" / "sample.png", optimize=True)


if __name__ == "__main__":
    main()
