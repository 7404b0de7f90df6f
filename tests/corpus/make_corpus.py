"""Make the bad-input corpus: files that look like a job's input and are not, or barely are.

    python tests/corpus/make_corpus.py [OUT_DIR]     (default: tests/corpus/files, git-ignored)

Everything is generated here (by hand-written PDF bytes and ffmpeg's test sources), nothing is
downloaded. tests/test_bad_input.py sends each file to /put and /jobs.
"""

from __future__ import annotations

import hashlib
import math
import struct
import subprocess
import sys
import zlib
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
    return assemble(objects, trailer)


def rc4(key: bytes, data: bytes) -> bytes:
    """RC4, the cipher of the PDF standard security handler's revision 2."""
    state, j = list(range(256)), 0
    for i in range(256):
        j = (j + state[i] + key[i % len(key)]) % 256
        state[i], state[j] = state[j], state[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + state[i]) % 256
        state[i], state[j] = state[j], state[i]
        out.append(byte ^ state[(state[i] + state[j]) % 256])
    return bytes(out)


PASSWORD_PADDING = bytes.fromhex("28bf4e5e4e758a4164004e56fffa01082e2e00b6d0683e802f0ca9fe6453697a")


def encrypted_with_an_empty_password() -> bytes:
    """A one-page PDF encrypted (RC4, 40 bits) with an empty user password and an owner
    password, as "protected" PDFs that only forbid printing or copying are: any viewer opens
    it without asking. O, U and the page's encrypted content follow the PDF 1.4 reference,
    algorithms 3.1 to 3.4."""
    file_id, permissions = b"\xab" * 16, -4
    owner_key = hashlib.md5(b"owner" + PASSWORD_PADDING[:-5]).digest()[:5]
    owner = rc4(owner_key, PASSWORD_PADDING)
    key = hashlib.md5(PASSWORD_PADDING + owner + struct.pack("<i", permissions)
                      + file_id).digest()[:5]
    user = rc4(key, PASSWORD_PADDING)
    content = b"0 0 1 rg 0 0 100 100 re f"
    object_key = hashlib.md5(key + struct.pack("<I", 4)[:3] + b"\0\0").digest()[:10]
    sealed = rc4(object_key, content)
    return assemble([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R >>",
        f"<< /Length {len(sealed)} >>\nstream\n".encode() + sealed + b"\nendstream",
        (f"<< /Filter /Standard /V 1 /R 2 /P {permissions} /O <{owner.hex()}> "
         f"/U <{user.hex()}> >>").encode(),
    ], f" /Encrypt 5 0 R /ID [<{file_id.hex()}> <{file_id.hex()}>]")


def rotated_by_a_real_number() -> bytes:
    """A 612 x 100 page whose /Rotate is 90.0: a real where the PDF reference asks for an
    integer. poppler ignores it (pdfinfo says "rot: 0"), PDFium turns the page by 90."""
    content = b"0 0 1 rg 0 0 100 100 re f"
    return assemble([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 100] /Rotate 90.0 "
         b"/Contents 4 0 R >>"),
        f"<< /Length {len(content)} >>\nstream\n".encode() + content + b"\nendstream",
    ])


def one_page(media_box: str, content: bytes, content_filter: str = "",
             resources: bytes = b"", extra: list[bytes] = (), info: bytes = b"") -> bytes:
    """A one-page PDF: the page (object 3) draws `content` (object 4, through
    `content_filter` if given); `extra` objects follow from number 5; `info` is the trailer's
    /Info dictionary."""
    filter_entry = f" /Filter /{content_filter}" if content_filter else ""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [" + media_box.encode() + b"] "
        b"/Contents 4 0 R /Resources << " + resources + b" >> >>",
        f"<< /Length {len(content)}{filter_entry} >>\nstream\n".encode() + content
        + b"\nendstream",
        *extra,
    ]
    if info:
        objects.append(info)
    return assemble(objects, f" /Info {len(objects)} 0 R" if info else "")


def assemble(objects: list[bytes], trailer: str = "") -> bytes:
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


def huge_page() -> bytes:
    """A few hundred bytes describing a 200 x 200 inch page (1.6 billion pixels at 200 dpi),
    with a title that poses as pdfinfo's line for a tiny first page."""
    return one_page("0 0 14400 14400", b"0 0 1 rg 0 0 100 100 re f",
                    info=b"<< /Title (x\nPage    1 size:  10 x 10 pts\nPages: 1) >>")


def overflowing_page() -> bytes:
    """A page 10^400 points wide: more than a double holds, so pdfinfo prints its size as
    "inf"."""
    return one_page("0 0 " + "9" * 400 + " 792", b"")


def title_with_a_bad_size() -> bytes:
    """A plain small page with a title that poses as pdfinfo's size line, with no number in
    it."""
    return one_page("0 0 200 200", b"0 0 1 rg 0 0 100 100 re f",
                    info=b"<< /Title (x\nPage    1 size:  1.2.3 x 5 pts\n) >>")


def rotate_tag_lie(out: Path) -> None:
    """A Matroska clip whose `rotate` tag says "abc" (Matroska tags hold any text; ffmpeg
    writes no rotate tag of its own, so another name is written and renamed in the bytes)."""
    clip = out / "rotate-source.mp4"
    ffmpeg(clip, "-f", "lavfi", "-i", "testsrc=duration=1:size=64x48:rate=10",
           "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast")
    tagged = out / "rotate-tagged.mkv"
    ffmpeg(tagged, "-i", str(clip), "-c", "copy", "-write_crc32", "0",
           "-metadata:s:v", "rotatx=abc")
    (out / "rotate-tag-lie.mkv").write_bytes(tagged.read_bytes().replace(b"ROTATX", b"rotate"))
    clip.unlink()
    tagged.unlink()


def bomb_stream(megabytes: int = 300) -> bytes:
    """About 300 KB of Flate data that inflates to `megabytes` MB of path operators."""
    pack = zlib.compressobj(9)
    chunk = b"1 1 m 2 2 l " * (2**20 // 12)
    return b"".join(pack.compress(chunk) for _ in range(megabytes)) + pack.flush()


def flate_bomb(megabytes: int = 300) -> bytes:
    """A page whose content stream is the bomb."""
    return one_page("0 0 200 200", bomb_stream(megabytes), content_filter="FlateDecode")


def good_page_then_bomb() -> bytes:
    """Two pages: a plain one, then the flate bomb's, so the job fails with a page written
    (test_contract.py; not in the corpus, which has the bomb alone)."""
    plain, bomb = b"0 0 1 rg 0 0 100 100 re f", bomb_stream()
    return assemble([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R 5 0 R] /Count 2 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R >>",
        f"<< /Length {len(plain)} >>\nstream\n".encode() + plain + b"\nendstream",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 6 0 R >>",
        f"<< /Length {len(bomb)} /Filter /FlateDecode >>\nstream\n".encode() + bomb
        + b"\nendstream",
    ])


def nested_forms(depth: int = 40) -> bytes:
    """Forms drawn inside forms: each form draws the one below it twice, so the page paints
    2**depth rectangles. No cycle to detect, just more work than any time limit allows."""
    forms = []
    for level in range(depth):
        number = 5 + level
        draw = (b"0 0 1 1 re f" if level == 0 else
                b"q 0.5 0 0 0.5 0 0 cm /F Do Q q 0.5 0 0 0.5 0.5 0.5 cm /F Do Q")
        below = (b"" if level == 0
                 else f"/Resources << /XObject << /F {number - 1} 0 R >> >> ".encode())
        forms.append(b"<< /Type /XObject /Subtype /Form /BBox [0 0 1 1] " + below
                     + f"/Length {len(draw)} >>\nstream\n".encode() + draw + b"\nendstream")
    top = 5 + depth - 1
    return one_page("0 0 200 200", b"q 200 0 0 200 0 0 cm /F Do Q",
                    resources=f"/XObject << /F {top} 0 R >>".encode(), extra=forms)


def lying_length(clip: Path, target: Path) -> None:
    """`clip` (an MP4 without an edit list) with its headers saying it lasts 1 s: the movie's,
    the track's and the media's duration fields rewritten, its frames left as they are."""
    data = bytearray(clip.read_bytes())
    for atom, duration_at, timescale_at in ((b"mvhd", 16, 12), (b"mdhd", 16, 12),
                                            (b"tkhd", 20, None)):
        start = data.find(atom)
        assert start > 0 and data[start + 4] == 0, f"no version-0 {atom!r} box"
        timescale = (struct.unpack(">I", data[start + 4 + timescale_at:][:4])[0]
                     if timescale_at else 1000)  # tkhd counts in the movie's timescale
        position = start + 4 + duration_at
        data[position:position + 4] = struct.pack(">I", timescale)
    target.write_bytes(data)


def grow_boxes(data: bytearray, at: int, path: list[bytes], extra: int) -> None:
    """Add `extra` to the size of each box on `path` (outermost first) that holds offset
    `at`: the boxes around a part of an MP4 that grew by that much."""
    start = data.find(path[0]) - 4
    for name in path:
        box = data.find(name, start) - 4
        assert box >= 0 and box < at, f"no {name!r} box around {at}"
        size = struct.unpack(">I", data[box:box + 4])[0]
        data[box:box + 4] = struct.pack(">I", size + extra)
        start = box + 8


def data_elsewhere(clip: Path, target: Path) -> None:
    """`clip` (a MOV with its moov after its mdat) whose track's data reference is a Mac alias
    to a file elsewhere, as QuickTime reference movies are: ffmpeg does not follow it (nor
    should it), so the track's samples are in no file it reads, and ffprobe still reports a
    640x480 stream of 1 s."""
    data = bytearray(clip.read_bytes())
    # The dref's one entry (size, type, flags: 1, "in this file") follows its own header and
    # entry count. ffmpeg writes the moov last, so no sample offset moves as it grows.
    url = data.find(b"dref", data.find(b"moov")) - 4 + 16
    assert data[url + 4:url + 8] == b"url " and data.find(b"mdat") < url, "no data reference"
    path = b"/Volumes/Other/elsewhere.mov"
    # The alias record as mov_read_dref reads it: 150 bytes of fixed fields (volume and file
    # name among them), then tagged fields, type 2 the absolute path, -1 the end.
    alias = (b"\0" * 10 + bytes([5]) + b"Other".ljust(27, b"\0") + b"\0" * 12
             + bytes([13]) + b"elsewhere.mov".ljust(63, b"\0") + b"\0" * 16
             + struct.pack(">hh", -1, -1) + b"\0" * 16
             + struct.pack(">HH", 2, len(path)) + path + struct.pack(">hH", -1, 0))
    entry = struct.pack(">I", 12 + len(alias)) + b"alis" + b"\0\0\0\0" + alias
    extra = len(entry) - 12
    data[url:url + 12] = entry
    grow_boxes(data, url, [b"moov", b"trak", b"mdia", b"minf", b"dinf", b"dref"], extra)
    target.write_bytes(data)


def no_samples(clip: Path, target: Path) -> None:
    """`clip` (an MP4) with its video track's sample table emptied (no sizes, no durations):
    ffprobe still reports the stream, with a frame rate guessed from its time base."""
    data = bytearray(clip.read_bytes())
    for atom, count_at in ((b"stsz", 12), (b"stts", 8)):  # after type, version/flags (, size)
        start = data.find(atom, data.find(b"moov"))
        assert start > 0, f"no {atom!r} box"
        data[start + count_at:start + count_at + 4] = struct.pack(">I", 0)
    target.write_bytes(data)


def display_matrix(clip: Path, target: Path, degrees: float) -> None:
    """`clip` (an MP4 of one video track) with a display matrix turning it by `degrees`, which
    ffmpeg 5.1 cannot write itself (its mp4 muxer ignores a rotate tag)."""
    data = bytearray(clip.read_bytes())
    start = data.find(b"tkhd")
    assert start > 0 and data[start + 4] == 0, "no version-0 tkhd box"
    turn = math.radians(degrees)

    def fixed(value: float) -> int:  # 16.16
        return round(value * 65536)

    matrix = (fixed(math.cos(turn)), fixed(math.sin(turn)), 0,
              fixed(-math.sin(turn)), fixed(math.cos(turn)), 0, 0, 0, 1 << 30)
    data[start + 44:start + 80] = struct.pack(">9i", *matrix)  # after the fields before it
    target.write_bytes(data)


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
        "encrypted-with-an-empty-password.pdf": encrypted_with_an_empty_password(),
        "rotated-by-a-real-number.pdf": rotated_by_a_real_number(),
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
    no_samples(source, out / "no-samples.mp4")
    source.unlink()
    # A MOV whose frames are "in another file": ffmpeg writes the moov after the mdat.
    movie = out / "movie.mov"
    ffmpeg(movie, "-f", "lavfi", "-i", "testsrc=duration=1:size=640x480:rate=10",
           "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", "-f", "mov")
    data_elsewhere(movie, out / "data-elsewhere.mov")
    movie.unlink()
    # Bombs and lies: a page too large to render, a content stream that inflates to 300 MB,
    # a drawing loop, a 1 s clip at 1000 frames a second, a 20 s clip whose header says 1 s,
    # and a stream declaring 10 frames a second that bursts into 500.
    (out / "huge-page.pdf").write_bytes(huge_page())
    (out / "flate-bomb.pdf").write_bytes(flate_bomb())
    (out / "nested-forms.pdf").write_bytes(nested_forms())
    (out / "overflowing-page.pdf").write_bytes(overflowing_page())
    (out / "title-with-a-bad-size.pdf").write_bytes(title_with_a_bad_size())
    rotate_tag_lie(out)
    ffmpeg(out / "framerate-bomb.mp4", "-f", "lavfi", "-i",
           "testsrc=duration=1:size=32x32:rate=1000", "-pix_fmt", "yuv420p", "-c:v", "libx264",
           "-preset", "ultrafast")
    honest = out / "twenty-seconds.mp4"
    ffmpeg(honest, "-f", "lavfi", "-i", "testsrc=duration=20:size=160x120:rate=10",
           "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", "-use_editlist", "0")
    lying_length(honest, out / "lying-length.mp4")
    honest.unlink()
    calm, burst = out / "calm.ts", out / "burst.ts"
    ffmpeg(calm, "-f", "lavfi", "-i", "testsrc=duration=6:size=64x48:rate=10",
           "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", "-f", "mpegts")
    ffmpeg(burst, "-f", "lavfi", "-i", "testsrc=duration=2:size=64x48:rate=500",
           "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast",
           "-output_ts_offset", "6", "-f", "mpegts")
    (out / "frame-burst.ts").write_bytes(calm.read_bytes() + burst.read_bytes())
    calm.unlink()
    burst.unlink()
    return sorted(out.iterdir())


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "files"
    for path in make(target):
        print(path)
