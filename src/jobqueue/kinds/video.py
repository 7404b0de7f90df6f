"""`video`: resizes a video with ffmpeg (H.264 + AAC in MP4), keeping its audio track."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import ffmpeg
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobqueue import (
    BadInput,
    JobContext,
    JobKind,
    Output,
    ProcessFailed,
    Settings,
    TooLarge,
    UnsupportedInput,
    child_output,
    run_child,
    start_child,
)

DEFAULT_WIDTH = 640
OUTPUT_NAME = "video.mp4"
# An upload may be a playlist that points ffmpeg at URLs or other jobs' files: read only the
# upload itself, and only as one of these containers.
INPUT_OPTIONS = {
    "protocol_whitelist": "file",
    "format_whitelist": "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,ogg,asf,nut",
}
PREVIEW_BOUNDARY = "frame"
PROBE_TIMEOUT_SECONDS = 30
PROBE_ENTRIES = ("format=duration:stream=codec_type,width,height,avg_frame_rate,r_frame_rate,"
                 "nb_read_packets:stream_side_data=displaymatrix")
SEND_A_VIDEO = "Send a video file such as MP4, MOV, MKV or WebM."
NO_VIDEO = "The file has no video stream. " + SEND_A_VIDEO


class VideoOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    width: int | None = Field(None, ge=2, le=7680,
                              description="Output width; default 640 when height is not "
                                          "given either.")
    height: int | None = Field(None, ge=2, le=4320,
                               description="Output height; missing sides keep the aspect ratio.")

    @field_validator("width", "height")
    @classmethod
    def even(cls, value: int | None) -> int | None:
        if value is not None and value % 2:
            raise ValueError("must be an even number (H.264 needs even sizes)")
        return value

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The size ffmpeg's scale filter gives a `width` x `height` frame: -2 is the other side
        times the aspect ratio, rounded half up to an even number (av_rescale in scale_eval.c),
        and a side that comes to 0 that way is the input's (0 means "as it is" to the filter)."""
        out_w, out_h = self.scale()
        if out_w < 0:
            out_w = (out_h * width + height) // (2 * height) * 2 or width
        if out_h < 0:
            out_h = (out_w * height + width) // (2 * width) * 2 or height
        return out_w, out_h

    def scale(self) -> tuple[int, int]:
        """The scale filter's width and height; -2 keeps the aspect ratio at an even size."""
        if self.width is None and self.height is None:
            return DEFAULT_WIDTH, -2
        return self.width or -2, self.height or -2


def probe_command(path: str) -> list[str]:
    flags = [arg for key, value in INPUT_OPTIONS.items() for arg in (f"-{key}", value)]
    # -count_packets reads the whole file (no decoding): the real number of frames, which a
    # header's frame rate and duration may lie about. Only the fields read here are asked
    # for, so a file's tags (of any size) never reach the server.
    return ["ffprobe", "-v", "error", *flags, "-count_packets", "-show_entries", PROBE_ENTRIES,
            "-of", "json", path]


def probe_result(path: str, returncode: int, out: bytes, err: bytes) -> dict:
    """ffprobe's JSON, or UnsupportedInput with the reason it gave and what to send instead
    (the same answer before queueing and, for /put, when the job starts)."""
    if returncode != 0:
        lines = err.decode(errors="replace").replace(f"{path}: ", "").strip().splitlines()
        reason = lines[-1] if lines else "unknown format"
        raise UnsupportedInput(f"The file is not a video ffprobe can read ({reason}). "
                               + SEND_A_VIDEO)
    info = json.loads(out)
    video = next((s for s in info.get("streams", []) if s.get("codec_type") == "video"), None)
    if video is None:
        raise UnsupportedInput(NO_VIDEO)
    if not (video.get("width") and video.get("height")):
        raise UnsupportedInput("ffprobe cannot tell the video's frame size; the file may be "
                               "damaged. " + SEND_A_VIDEO)
    if _frame_count(info) == 0:
        # Its header describes a stream, but no frame of it is in the file: a track with no
        # samples, or one whose data reference points at another file (ffmpeg reads only the
        # upload). Said before any limit, so its header's other lies (a frame rate of
        # 12800) are not what the user hears about.
        raise UnsupportedInput("The video stream has no frames in the file (its data may be "
                               "in another file, or the file is damaged). " + SEND_A_VIDEO)
    return info


def probe(path: str, settings: Settings) -> dict:
    try:
        done = child_output(probe_command(path), PROBE_TIMEOUT_SECONDS,
                                settings.video_max_mb)
    except subprocess.TimeoutExpired:  # run() has killed and reaped it
        raise BadInput(f"ffprobe could not read the file within {PROBE_TIMEOUT_SECONDS} s; it "
                       "may be damaged. " + SEND_A_VIDEO) from None
    return probe_result(path, done.returncode, done.stdout, done.stderr)


def check_size(info: dict, settings: Settings, options: VideoOptions | None = None) -> None:
    """TooLarge when the video is longer or its frames (in or out) bigger than the limits."""
    duration = _duration(info)
    if duration > settings.video_max_seconds:
        raise TooLarge(f"The video is {duration:.0f} s long; this server takes at most "
                       f"{settings.video_max_seconds:g} s (JOBQUEUE_VIDEO_MAX_SECONDS).")
    fps = _frame_rate(info)
    if fps > settings.video_max_fps:
        raise TooLarge(f"The video has {fps:g} frames a second; this server takes at most "
                       f"{settings.video_max_fps:g} (JOBQUEUE_VIDEO_MAX_FPS).")
    frames, max_frames = _frame_count(info), settings.video_max_seconds * settings.video_max_fps
    if frames > max_frames:
        raise TooLarge(too_many_frames(max_frames, f"it has {frames}"))
    width, height = _frame_size(info)
    sizes = [("The video's frames are", width, height)]
    if options is not None:
        sizes.append(("The output frames would be", *options.output_size(width, height)))
    for what, w, h in sizes:
        if w * h > settings.video_max_pixels:
            raise TooLarge(f"{what} {w}x{h} = {w * h} pixels; this server takes at most "
                           f"{settings.video_max_pixels} (JOBQUEUE_VIDEO_MAX_PIXELS).")


def check_video(path: Path, options: VideoOptions, settings: Settings) -> None:
    try:
        info = probe(str(path), settings)
    except UnsupportedInput:
        raise
    except BadInput as error:  # ffprobe timed out
        raise UnsupportedInput(str(error)) from None
    check_size(info, settings, options)


class BackgroundProbe:
    """ffprobe running beside ffmpeg rather than before it, which saves its start-up time."""

    def __init__(self, job: JobContext, path: str):
        self.job = job
        self.path = path
        self.process = start_child(probe_command(path), job.settings.video_max_mb,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        job.attach_process(self.process)
        self._output: tuple[bytes, bytes] | None = None

    def ready(self) -> bool:
        return self._output is not None or self.process.poll() is not None

    def info(self) -> dict:
        """The probe's result, waiting for it if need be; BadInput for a file that is no video."""
        self.job.raise_if_cancelled()  # a cancel kills ffprobe too: that is no verdict on the file
        if self._output is None:
            self._output = self.process.communicate()
        return probe_result(self.path, self.process.returncode, *self._output)

    def close(self) -> None:
        self.job.detach_process(self.process)
        if self._output is None:
            self.process.kill()
            self._output = self.process.communicate()


def _turn(video: dict) -> float:
    """The angle, 0 to 360, ffmpeg's autorotate turns the frames by, decided as ffmpeg
    (5.1, fftools get_rotation) decides it: from the display matrix alone (a `rotate` tag
    turns nothing), its rotation rounded to whole degrees. Only 90 and 270 after rounding
    transpose the frames; any other angle goes through the rotate filter, which keeps the
    frame size. ffprobe's own "rotation" is that angle cut to an integer (89.7° prints as
    89), so the matrix is read instead."""
    matrix = next((side_data["displaymatrix"] for side_data in video.get("side_data_list", [])
                   if "displaymatrix" in side_data), None)
    rotation = _display_rotation(matrix) if isinstance(matrix, str) else None
    if rotation is None:
        return 0.0
    theta = -_round_half_away(rotation)
    return theta - 360 * math.floor(theta / 360 + 0.9 / 360)


def _display_rotation(text: str) -> float | None:
    """libavutil's av_display_rotation_get of the matrix ffprobe printed (three lines of
    "index: a b c"); None for one that is not nine integers or has no scale (NaN to ffmpeg,
    which turns nothing then)."""
    numbers = [word for line in text.splitlines() for word in line.partition(":")[2].split()]
    try:
        a, b, _, c, d, *_ = (int(word) / 65536 for word in numbers)
    except ValueError:
        return None
    if len(numbers) != 9:
        return None
    scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)
    if scale_x == 0 or scale_y == 0:
        return None
    return -math.degrees(math.atan2(b / scale_y, a / scale_x))


def _round_half_away(value: float) -> float:
    """C's round(): halves away from zero (Python's round() takes them to the even side)."""
    return math.copysign(math.floor(abs(value) + 0.5), value)


def ffmpeg_command(source: str, target: str, scale: tuple[int, int]) -> list[str]:
    """The ffmpeg command line of a resize (bench/video.py runs the same one)."""
    stream = ffmpeg.input(source, **INPUT_OPTIONS)
    return (
        ffmpeg.output(stream.video.filter("scale", *scale), stream["a?"], target,
                      vcodec="libx264", preset="veryfast", crf=23, pix_fmt="yuv420p",
                      acodec="aac", movflags="+faststart")
        .global_args("-nostdin", "-nostats", "-loglevel", "error")
        .overwrite_output()
        .compile()
    )


def preview_command(source: str, fps: float | None, width: int | None) -> list[str]:
    """ffmpeg decoding `source` at its own pace (-re) into multipart JPEG frames on stdout:
    the body of a `multipart/x-mixed-replace` response, which an <img> tag plays."""
    options = dict(INPUT_OPTIONS)
    if source.startswith(("http://", "https://")):  # a presigned URL of the object store
        options["protocol_whitelist"] = "http,https,tcp,tls"
    stream = ffmpeg.input(source, re=None, **options)["v:0"]
    if fps:
        stream = stream.filter("fps", fps=fps)
    if width:
        stream = stream.filter("scale", f"min({width},iw)", -2)
    return (
        stream.output("pipe:1", format="mpjpeg", boundary_tag=PREVIEW_BOUNDARY, **{"q:v": 5})
        .global_args("-nostdin", "-nostats", "-loglevel", "error")
        .compile()
    )


def resize_video(job: JobContext) -> Output:
    options: VideoOptions = job.options
    source, target = str(job.input_path), job.out_dir / OUTPUT_NAME
    args = ffmpeg_command(source, str(target), options.scale())
    args[1:1] = ["-progress", "pipe:1"]
    background = BackgroundProbe(job, source)

    settings: Settings = job.settings
    # A header can lie about the length and the frame rate: what ffmpeg actually decodes is
    # held to the limits too, and ffmpeg is stopped the moment it goes past them.
    max_frames = settings.video_max_seconds * settings.video_max_fps
    checked = False
    encoded = 0.0  # seconds of output so far, by ffmpeg's count

    def on_progress(line: str) -> None:
        # ffmpeg -progress prints blocks of key=value lines, about every half second:
        # frame= (frames so far), out_time_us= (the position of the output), progress=.
        nonlocal checked, encoded
        key, _, value = line.partition("=")
        if not value.isdigit():
            return
        if key == "frame" and int(value) > max_frames:
            raise TooLarge(too_many_frames(max_frames, "it was stopped there"))
        if key != "out_time_us":
            return
        encoded = int(value) / 1e6
        if encoded > settings.video_max_seconds:
            raise TooLarge(f"The video runs longer than {settings.video_max_seconds:g} s "
                           "(JOBQUEUE_VIDEO_MAX_SECONDS), whatever its header says; it was "
                           "stopped there.")
        if background.ready():
            if not checked:  # /put skips check_video: the limits stop ffmpeg here instead
                check_size(background.info(), settings, options)
                checked = True
            duration = _duration(background.info())
            job.set_progress(round(min(encoded, duration), 2), round(duration, 2), "seconds")

    try:
        try:
            # Under a memory cap: a stream whose frames grow past what its header says
            # (a 320x240 start, then 7680x7680) cannot take the machine's memory.
            run_child(job, args, on_line=on_progress, memory_mb=settings.video_max_mb)
        except ProcessFailed:
            # A clearer message when the file is no video at all, or is over a limit (an
            # output too large for ffmpeg to set up fails it before the probe has answered):
            # the same answer POST /jobs gives before queueing.
            check_size(background.info(), settings, options)
            raise
        info = background.info()
        check_size(info, settings, options)
        out_width, out_height = check_output(job, target)
    except BaseException:
        target.unlink(missing_ok=True)  # a partial output is no use to anyone
        raise
    finally:
        background.close()

    # The output's real length, as ffmpeg wrote it; the header's only if ffmpeg never said.
    duration = encoded or _duration(info)
    job.set_progress(round(duration, 2), round(duration, 2), "seconds")
    return Output(
        data={"width": out_width, "height": out_height, "durationSeconds": round(duration, 3),
              "audio": any(s.get("codec_type") == "audio" for s in info["streams"])},
        files=[target],
    )


def check_output(job: JobContext, target: Path) -> tuple[int, int]:
    """The width and height of the video ffmpeg wrote, probed, not computed: BadInput for an
    output with no video stream or no frames (ffmpeg may end well having decoded nothing),
    TooLarge for frames over JOBQUEUE_VIDEO_MAX_PIXELS (an input whose turn was misjudged
    must not pass as the size it was meant to have)."""
    settings: Settings = job.settings
    lines: list[str] = []
    try:
        run_child(job, probe_command(str(target)), on_line=lines.append,
                      memory_mb=settings.video_max_mb)
    except ProcessFailed as error:
        raise BadInput(f"ffmpeg's output cannot be read back ({error}); nothing usable was "
                       "written. " + SEND_A_VIDEO) from None
    return output_size(json.loads("\n".join(lines) or "{}"), settings)


def output_size(info: dict, settings: Settings) -> tuple[int, int]:
    """check_output's verdict on ffprobe's JSON of the output."""
    video = next((s for s in info.get("streams", []) if s.get("codec_type") == "video"), None)
    if video is None:
        raise BadInput("ffmpeg wrote no video stream: it could decode no frame of the file. "
                       + SEND_A_VIDEO)
    if _frame_count(info) == 0:
        raise BadInput("ffmpeg wrote no video frames: it could decode none of the file's. "
                       + SEND_A_VIDEO)
    width, height = int(video.get("width") or 0), int(video.get("height") or 0)
    if width * height > settings.video_max_pixels:
        raise TooLarge(f"The output frames came out {width}x{height} = {width * height} "
                       f"pixels; this server takes at most {settings.video_max_pixels} "
                       "(JOBQUEUE_VIDEO_MAX_PIXELS).")
    return width, height


def _frame_size(info: dict) -> tuple[int, int]:
    """Width and height of the first video stream, upright as ffmpeg turns it before scaling."""
    video = next(s for s in info["streams"] if s.get("codec_type") == "video")
    width, height = int(video["width"]), int(video["height"])
    if _turn(video) in (90, 270):
        width, height = height, width
    return width, height


def too_many_frames(max_frames: float, what: str) -> str:
    return (f"The video has more than {max_frames:g} frames (JOBQUEUE_VIDEO_MAX_SECONDS × "
            f"JOBQUEUE_VIDEO_MAX_FPS), whatever its header says: {what}.")


def _frame_count(info: dict) -> int:
    """Video packets in the file, as ffprobe -count_packets read them (one frame each)."""
    video = next(s for s in info["streams"] if s.get("codec_type") == "video")
    count = str(video.get("nb_read_packets", "0"))
    return int(count) if count.isdigit() else 0


def _frame_rate(info: dict) -> float:
    """Frames a second of the first video stream: its average rate, else the rate ffprobe
    guesses from its timestamps (r_frame_rate); 0 when it says neither."""
    video = next(s for s in info["streams"] if s.get("codec_type") == "video")
    for field in ("avg_frame_rate", "r_frame_rate"):
        numerator, _, denominator = str(video.get(field, "0/0")).partition("/")
        try:
            rate = float(numerator) / float(denominator or 1)
        except (ValueError, ZeroDivisionError):
            continue
        if rate > 0 and math.isfinite(rate):
            return rate
    return 0.0


def _duration(info: dict) -> float:
    return float(info.get("format", {}).get("duration") or 0)


KIND = JobKind(
    name="video",
    description="Resizes a video to `width` x `height` (H.264/AAC MP4), keeping its audio.",
    options=VideoOptions,
    handler=resize_video,
    sample=Path(__file__).parent / "samples" / "sample.mp4",
    accept="video/*",
    workers=1,
    queue_size=10,
    timeout=300,
    check_input=check_video,
)
