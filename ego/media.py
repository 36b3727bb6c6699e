"""Safe decoding of the images and videos a visitor sends.

Everything here treats its input as hostile: a public Space receives files from anyone. The rules:

* Only an allowlist of formats is decoded (images: JPEG, PNG, WebP, GIF, BMP, TIFF; videos: MP4/MOV,
  WebM/Matroska, AVI, GIF), so an SVG, HTML page or script renamed ``.png`` is refused rather than
  handed to some permissive parser.
* Size is checked before work is done: the file size before reading, the pixel count from the header
  before the pixels are decoded (PIL's ``Image.open`` and PyAV's ``open`` are lazy), so a 20 KB
  "decompression bomb" that claims 30000x30000 pixels never allocates them.
* A video is streamed: only the sampled frames are kept (downscaled at once), and a wall-clock
  budget is checked between packets and frames, so a container that lies about its length cannot
  exhaust memory or hang a worker.
* The work one picture takes is bounded before it is decoded, as the budget cannot interrupt a decoder:
  a JPEG (a photo, or a frame of an MJPEG video) of more than ``max_jpeg_scans`` scans is refused (each
  scan decodes the whole picture again: a 25 MB file of 300,000 tiny scans takes the CPU for most of an
  hour), and a video's codec must be one of ``VIDEO_CODECS`` (camera, phone, web, editing and
  screen-recording codecs, whose one frame is bounded by its pixels).
* Nothing is fetched: a URL is refused, and a video's demuxer is chosen from the file's magic bytes
  and may not open any other file or URL (ffmpeg's HLS/concat demuxers are a known SSRF vector).
* Every refusal is an :class:`ego.errors.InputError` whose short message says what to do next; no
  raw PIL, PyAV or OS error escapes for bad input.

All limits come from :class:`ego.settings.Settings`.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import stat
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO

import av
import numpy as np
from PIL import Image, ImageOps

from ego.errors import InputError
from ego.settings import DEFAULT_SETTINGS, Settings

log = logging.getLogger("ego.media")

__all__ = ["load_image", "load_video", "reduced", "sample_indices"]

# --- formats ------------------------------------------------------------------------------------

IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""PIL plugins allowed to open an image. Everything else (SVG, ICO, PSD, EPS, ...) is refused."""

_IMAGE_RESULT_FORMATS = frozenset(IMAGE_FORMATS) | {"MPO"}
"""What ``Image.format`` may read after opening: PIL's JPEG plugin reports multi-picture JPEGs
(what many phone cameras write) as MPO."""

_IMAGE_FORMATS_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"

_VIDEO_FORMATS_TEXT = "MP4, MOV, WebM, MKV, AVI or animated GIF"

VIDEO_CODECS: frozenset[str] = frozenset(
    # cameras, phones and the web
    "h264 hevc vvc vp8 vp9 av1 mpeg4 mpeg1video mpeg2video h263 msmpeg4v1 msmpeg4v2 msmpeg4v3 wmv1 wmv2 wmv3 vc1 "
    "theora gif mjpeg dvvideo svq1 svq3 cinepak "
    # editing, screen recording and lossless capture
    "prores dnxhd cfhd utvideo ffv1 huffyuv ffvhuff qtrle png rawvideo fraps tscc tscc2".split()
)
"""Video codecs decoded (ffmpeg's codec names, whichever decoder a build uses for them: AV1's may be "libdav1d"):
what cameras, phones, editors, screen recorders and the web write, each decoding a frame in work bounded by its
pixels (MJPEG's frames are held to ``max_jpeg_scans``). Others (JPEG 2000, TIFF, ...), whose one frame may take
unbounded work, are refused with a sentence."""

_JPEG_CODECS = frozenset({"mjpeg"})

_TIFF_STRIP_OFFSETS, _TIFF_TILE_OFFSETS = 273, 324

_JPEG_SCAN = b"\xff\xda"
"""JPEG's start-of-scan marker. In a scan's coded data every 0xFF byte is followed by 0x00 or a restart marker,
so these two bytes are a scan or, rarely, two bytes of metadata: counting them bounds the scans from above."""

_MEGA = 1_000_000
_MIB = 1024 * 1024

_URL_RE = re.compile(r"^\s*([a-z][a-z0-9+.\-]*://|data:)", re.IGNORECASE)
"""Anything that looks like a URL. Windows drive letters ("C:\\") do not match: they lack "//"."""

_METADATA_BACKEND = "pyav"


# --- shared checks ------------------------------------------------------------------------------


def _refuse_url(source: str) -> None:
    if _URL_RE.match(source):
        raise InputError("Links are not fetched; please download the file and upload it instead.")


def _check_dimensions(width: int, height: int, settings: Settings, what: str = "image") -> None:
    """Refuse empty, too large or too elongated pictures, from their declared size only."""
    if width <= 0 or height <= 0:
        raise InputError(f"This {what} has no pixels; please upload a different file.")
    if width * height > settings.max_image_pixels:
        raise InputError(
            f"This {what} is {width}x{height} pixels; the limit is "
            f"{settings.max_image_pixels / _MEGA:g} megapixels. Please upload a smaller {what}."
        )
    # One pixel of the long side is forgiven: a picture reduced by a whole factor (`reduced`, its sides rounded up)
    # from one within the limit stays within it.
    if max(width, height) - 1 > settings.max_image_aspect_ratio * min(width, height):
        raise InputError(
            f"This {what} is {width}x{height} pixels, too long and thin (the limit is "
            f"{settings.max_image_aspect_ratio:g}:1); please crop it or upload a squarer {what}."
        )


def _rounded_up(value: float) -> str:
    """A measure over its limit, to a tenth, rounded up: 120.04 s is "120.1", never the limit's "120"."""
    return f"{math.ceil(value * 10) / 10:g}"


def _too_big_message(size_bytes: int, settings: Settings, what: str) -> str:
    return (
        f"This {what} is {_rounded_up(size_bytes / _MIB)} MiB; the limit is {settings.max_upload_mb} MiB. "
        f"Please upload a smaller {what}."
    )


def _open_regular_file(path: str | os.PathLike, settings: Settings, what: str) -> BinaryIO:
    """Open a local regular file for reading after checking its size.

    The size is taken from the open descriptor (``fstat``), not the path, so the file checked is the
    file read. Devices and FIFOs (``/dev/zero``) are refused: they have no size and may never end.
    """
    try:
        fh = open(path, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        typed = os.fsdecode(path)
        if not typed:
            raise InputError(f"The {what} file's path is empty; give the path of the file.") from None
        # Its name only: the Space reads uploads from server paths that are never shown.
        name = os.path.basename(os.path.normpath(typed))
        raise InputError(
            f"There is no {what} file named {name!r} at that path; check the path, or upload the file again."
        ) from None
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        raise InputError(f"The {what} file could not be read; please upload it again.") from None
    try:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"This is not a regular {what} file; please upload a {what}.")
        if info.st_size > settings.max_upload_bytes:
            raise InputError(_too_big_message(info.st_size, settings, what))
        if info.st_size == 0:
            raise InputError(f"This {what} file is empty; please upload it again.")
    except BaseException:
        fh.close()
        raise
    return fh


def _read_file_object(source: io.IOBase, settings: Settings, what: str) -> bytes:
    """The rest of a file object opened for reading in binary mode (an open file, an `io.BytesIO`), from where it
    stands: at most one byte past the upload limit is read, so a larger one is refused without being read whole."""
    as_text = f"This {what} file was opened as text; open it in binary mode ('rb') and pass it again."
    if isinstance(source, io.TextIOBase):
        raise InputError(as_text)
    if source.closed:
        raise InputError(f"This {what} file is closed; pass it while it is open, or pass its path.")
    limit = settings.max_upload_bytes
    chunks, size = [], 0
    try:
        if not source.readable():
            raise InputError(f"This {what} file is not open for reading; open it with 'rb' and pass it again.")
        start = source.tell() if source.seekable() else None
        while size <= limit:  # a pipe or a raw file may return fewer bytes than asked before its end
            chunk = source.read(limit + 1 - size)
            if not chunk:
                break
            if not isinstance(chunk, (bytes, bytearray)):
                raise InputError(as_text)
            chunks.append(bytes(chunk))
            size += len(chunk)
        if size > limit and start is not None:
            size = source.seek(0, io.SEEK_END) - start  # its whole size for the sentence, not the part read
    except InputError:
        raise
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        raise InputError(f"The {what} file could not be read; please upload it again.") from None
    if size > limit:
        raise InputError(_too_big_message(size, settings, what))
    if not size:
        raise InputError(f"This {what} file is empty, or already read to its end; pass it from its start.")
    return b"".join(chunks)


def _fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the same aspect ratio and at most ``max_pixels`` pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    new_w = max(1, math.floor(width * scale))
    new_h = max(1, math.floor(height * scale))
    return new_w, new_h


# --- images -------------------------------------------------------------------------------------

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_UINT16_MAX = 65535
_UINT8_MAX = 255
_WHITE = (255, 255, 255, 255)


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """Scale 16-bit or 32-bit grey levels to 8 bits.

    PIL's own ``convert("L")`` clips instead of scaling, which turns most 16-bit photos white.
    Integer modes are assumed to use the 16-bit range when any value exceeds 255 (PNG and TIFF
    store 16-bit grey as ``I;16`` or ``I``); float images in [0, 1] are scaled up.
    """
    # One float32 working copy, changed in place: a 40-megapixel image stays near 160 MB, not a gigabyte of
    # float64 copies. (float32's 24-bit mantissa holds every 16-bit level exactly.)
    arr = np.array(im, dtype=np.float32)
    if im.mode == "F":
        np.nan_to_num(arr, copy=False, nan=0.0, posinf=_UINT8_MAX, neginf=0.0)
        peak = float(arr.max(initial=0.0))
        if 0.0 < peak <= 1.0:
            arr *= _UINT8_MAX
        elif peak > _UINT8_MAX:
            arr *= _UINT8_MAX / _UINT16_MAX
    elif im.mode.startswith("I;16") or float(arr.max(initial=0)) > _UINT8_MAX:
        arr *= _UINT8_MAX / _UINT16_MAX
    np.rint(arr, out=arr)
    np.clip(arr, 0, _UINT8_MAX, out=arr)
    return Image.fromarray(arr.astype(np.uint8))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparent pixels become white, as a viewer would show them."""
    if im.mode in _HIGH_DEPTH_MODES:
        transparent = im.info.get("transparency")
        # A 16-bit grey PNG names one grey level transparent: found at full depth, before the scaling to 8 bits.
        hidden = np.array(im) == transparent if isinstance(transparent, (int, float)) else None
        im = _high_depth_to_l(im)
        if hidden is not None and hidden.any():
            im = im.convert("LA")
            im.putalpha(Image.fromarray(np.where(hidden, 0, _UINT8_MAX).astype(np.uint8)))
    has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def _image_from_array(arr: Any) -> Image.Image:
    """A uint8 array (H,W,3), (H,W,4) or (H,W) as a PIL image, without trusting its layout."""
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
        raise InputError("This image array is not 8-bit; please send an RGB uint8 array of shape (H, W, 3).")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(arr))  # L, RGB or RGBA from the shape
    raise InputError(f"This image array has shape {arr.shape}; please send an RGB uint8 array of shape (H, W, 3).")


def _check_jpeg_scans(data: bytes, settings: Settings, what: str, instead: str, pieces: int = 1) -> None:
    """Refuse JPEG data of more than `max_jpeg_scans` scans (before decoding it: each scan decodes it all again);
    `pieces`: the JPEGs the data holds, each decoded on its own (a TIFF's strips or tiles), each with its scans."""
    if data.count(_JPEG_SCAN) > settings.max_jpeg_scans * max(1, pieces):
        raise InputError(
            f"This {what} is stored as a JPEG of more than {settings.max_jpeg_scans} scans, which would take "
            f"minutes to decode; please {instead}."
        )


def _file_bytes(im: Image.Image) -> bytes:
    """The bytes of the file an opened (not yet decoded) image reads from; empty when it has none left (decoded)."""
    fp = getattr(im, "fp", None)
    if fp is None:
        return b""
    position = fp.tell()
    try:
        fp.seek(0)
        return fp.read()
    finally:
        fp.seek(position)


def _decode(im: Image.Image, settings: Settings) -> Image.Image:
    """Check the declared size (and a JPEG's scans), then decode, orient and convert an opened (lazy) image."""
    if im.format is not None and im.format not in _IMAGE_RESULT_FORMATS:
        raise InputError(f"{im.format} images are not accepted; please upload a {_IMAGE_FORMATS_TEXT} image.")
    width, height = im.size
    _check_dimensions(width, height, settings)
    try:
        if im.format in ("JPEG", "MPO"):
            _check_jpeg_scans(_file_bytes(im), settings, "image", "save it again as an ordinary JPEG, or as PNG")
        elif im.format == "TIFF" and im.info.get("compression") in ("jpeg", "tiff_jpeg"):
            # Its strips (or tiles) are JPEGs of their own rows, each with its scans; only such a TIFF's data is
            # free of stray scan markers.
            pieces = len(im.tag_v2.get(_TIFF_STRIP_OFFSETS) or im.tag_v2.get(_TIFF_TILE_OFFSETS) or ())
            _check_jpeg_scans(_file_bytes(im), settings, "image", "save it again as PNG", pieces)
        im.load()
        oriented = ImageOps.exif_transpose(im)
        rgb = _to_rgb(oriented)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError("This image is too large to decode safely; please upload a smaller image.") from None
    except Exception as error:  # noqa: BLE001 - a damaged file can make PIL raise almost anything
        _not_decoded("image", error)
        raise InputError(
            "This image is damaged or incomplete and could not be decoded; please upload it again "
            f"or save it as {_IMAGE_FORMATS_TEXT}."
        ) from None
    # exif_transpose already returns a copy; never hand the caller's own object back regardless.
    return rgb.copy() if rgb is im else rgb


def _open_image(fp: BinaryIO, settings: Settings) -> Image.Image:
    try:
        im = Image.open(fp, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise InputError(
            "This image declares far too many pixels to decode safely; please upload a smaller image."
        ) from None
    except Exception as error:  # noqa: BLE001 - UnidentifiedImageError, SyntaxError, struct.error, ...
        _not_decoded("image", error)
        raise InputError(f"This file is not a supported image; please upload a {_IMAGE_FORMATS_TEXT} image.") from None
    return _decode(im, settings)


def _not_decoded(what: str, error: BaseException) -> None:
    """The server log's line for a file the decoder refused: the error's type and the code line that raised it (so
    that a fault of ours, a TypeError say, is not taken for a damaged upload), never the decoder's message (it may
    quote the file's bytes or name)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
    log.info("%s not decoded: %s at %s", what, type(error).__name__, where)


def load_image(source: Any, settings: Settings = DEFAULT_SETTINGS) -> Image.Image:
    """Decode a visitor's image into a new RGB ``PIL.Image``.

    ``source`` is a PIL image (never modified), a local path (``str`` or ``Path``), raw bytes, a file
    object opened for reading in binary mode (``open(path, "rb")``, ``io.BytesIO``; read from where it
    stands, never closed), or a uint8 numpy array of shape (H, W, 3). EXIF orientation is applied;
    palette, alpha (composited on white), 16-bit, CMYK and grey images all become 8-bit RGB. Animated
    images give their first frame. Raises :class:`InputError` with a sentence for the visitor for anything refused.
    """
    if isinstance(source, Image.Image):
        return _decode(source, settings)
    if isinstance(source, np.ndarray):
        im = _image_from_array(source)
        _check_dimensions(im.width, im.height, settings)
        return _to_rgb(im)
    if isinstance(source, io.IOBase):
        source = _read_file_object(source, settings, "image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > settings.max_upload_bytes:
            raise InputError(_too_big_message(len(data), settings, "image"))
        if not data:
            raise InputError("This image file is empty; please upload it again.")
        return _open_image(io.BytesIO(data), settings)
    if isinstance(source, str):
        _refuse_url(source)
    if isinstance(source, (str, os.PathLike)):
        with _open_regular_file(source, settings, "image") as fh:
            return _open_image(fh, settings)
    raise InputError(f"This is not an image ({type(source).__name__}); please upload a {_IMAGE_FORMATS_TEXT} image.")


# --- videos -------------------------------------------------------------------------------------


def reduced(picture: Image.Image, max_pixels: int) -> Image.Image:
    """`picture` with at most `max_pixels` pixels (0: no limit): reduced by the smallest whole factor that fits, each
    pixel the mean of its factor x factor box (`Image.reduce`: no aliasing, and fast), else `picture` itself."""
    width, height = picture.size
    if not max_pixels or width * height <= max_pixels:
        return picture
    factor = math.ceil(math.sqrt(width * height / max_pixels))
    while math.ceil(width / factor) * math.ceil(height / factor) > max_pixels:  # the edges' partial boxes count
        factor += 1
    return picture.reduce(factor)


def sample_indices(total: int, n: int) -> list[int]:
    """``n`` frame indices spread uniformly over ``total`` frames, each centred in its segment.

    Frame ``i`` is the middle of the i-th of ``n`` equal segments, so a 2-frame sample of a clip
    shows its first and third quarters rather than its (often black) first and last frames. The
    indices are unique and increasing when ``total >= n``; with fewer frames than asked, all are
    returned. Integer arithmetic only, so the result is the same on every machine.
    """
    if total <= 0 or n <= 0:
        return []
    if total <= n:
        return list(range(total))
    return [((2 * i + 1) * total) // (2 * n) for i in range(n)]


def _video_demuxer(head: bytes) -> str | None:
    """The ffmpeg demuxer for a file's first bytes, or None when it is not an allowed container.

    Choosing the demuxer ourselves (instead of letting ffmpeg probe) keeps playlists, concat lists,
    raw streams and images out: those demuxers can open other files or URLs, or accept anything.
    """
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide"):
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    return None


_SNIFF_BYTES = 16


def _refuse_nested_open(url: str, flags: int, options: dict) -> None:
    """io_open hook for PyAV: a demuxer asking to open another file or URL is refused."""
    raise PermissionError("nested open refused")


_clock = time.monotonic
"""The clock of the decode budget; a module attribute so a test can make time pass faster."""


class _Deadline:
    """A wall-clock budget for one video, checked between packets and frames."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.end = _clock() + budget_s

    def remaining_s(self) -> float:
        return self.end - _clock()

    def check(self) -> None:
        if _clock() > self.end:
            raise InputError(
                f"This video could not be decoded within {self.budget_s:g} seconds; please "
                "upload a shorter or standard MP4/WebM clip."
            )


def _damaged_video() -> InputError:
    return InputError(
        f"This video is damaged or uses an unsupported codec; please upload a standard "
        f"{_VIDEO_FORMATS_TEXT} clip (H.264, VP9 or AV1)."
    )


def _too_long(duration_s: float, settings: Settings) -> InputError:
    return InputError(
        f"This video is {_rounded_up(duration_s)} seconds long; the limit is "
        f"{settings.max_video_duration_s:g} seconds. Please upload a shorter clip."
    )


class _FrameSink:
    """Turns the kept frames into equally sized RGB arrays as they are decoded.

    The output size is fixed by the first kept frame (after rotation) so that a stream that changes
    resolution mid-way still yields one (T, H, W, 3) array.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.size: tuple[int, int] | None = None

    def add(self, image: Image.Image) -> np.ndarray:
        image = _to_rgb(image)
        if self.size is None:
            self.size = _fit_pixels(image.width, image.height, self.settings.video_frame_max_pixels)
        if image.size != self.size:
            image = image.resize(self.size, Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.uint8)


def _stream_fps(stream: Any) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        try:
            value = float(rate) if rate is not None else 0.0
        except (TypeError, ValueError, ZeroDivisionError):
            value = 0.0
        if math.isfinite(value) and value > 0:
            return value
    return None


def _declared_duration_s(container: Any, stream: Any) -> float | None:
    """Duration from the stream, else the container; None when neither states one."""
    try:
        if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
            return float(stream.duration * stream.time_base)
        if container.duration is not None and container.duration > 0:
            return container.duration / av.time_base  # the container counts in AV_TIME_BASE units
    except (TypeError, ValueError, ZeroDivisionError):
        pass
    return None


_MIN_IO_TIMEOUT_S = 0.001
"""PyAV treats a zero timeout as "none"; a spent budget is caught by our own check right after."""


def _main_video_stream(container: Any) -> Any:
    """The first real video track: cover art (an "attached picture" stream) is not a video."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise InputError("This file has no video track; please upload a video clip.")


@dataclass
class _Pass:
    """What one decoding pass saw."""

    kept: dict[int, np.ndarray]
    """The frames whose index was wanted, already RGB and downscaled."""
    count: int
    """How many frames the stream really decoded to."""
    estimate: int
    """How many frames the header promised (count, else duration x fps); 0 when it did not say."""
    declared_fps: float | None
    declared_duration_s: float | None
    first_time_s: float | None
    last_time_s: float | None


def _estimated_frames(declared_frames: int, fps: float | None, duration_s: float | None) -> int:
    """The container's frame count, else duration x fps; 0 when neither is known."""
    if declared_frames > 0:
        return declared_frames
    if fps and duration_s:
        return max(0, round(duration_s * fps))
    return 0


def _decode_pass(
    fh: BinaryIO,
    demuxer: str,
    choose: Callable[[int], Sequence[int]],
    settings: Settings,
    deadline: _Deadline,
) -> _Pass:
    """Decode the whole stream once, keeping only the frames whose index ``choose`` selects.

    ``choose`` receives the estimated frame count (0 when unknown) once the header is read and
    returns the wanted indices. Memory is bounded by the kept frames, each downscaled at once.
    """
    fh.seek(0)
    sink = _FrameSink(settings)
    kept: dict[int, np.ndarray] = {}
    count = 0
    first_time: float | None = None
    last_time: float | None = None
    try:
        container = av.open(
            fh,
            mode="r",
            format=demuxer,
            io_open=_refuse_nested_open,
            # ffmpeg's own interrupt, for a demuxer stuck inside one call between our checks.
            timeout=max(deadline.remaining_s(), _MIN_IO_TIMEOUT_S),
        )
    except Exception as error:  # noqa: BLE001 - av.error.*, PermissionError from the hook, ...
        deadline.check()
        _not_decoded("video", error)
        raise _damaged_video() from None
    try:
        with container:
            deadline.check()
            stream = _main_video_stream(container)
            declared_frames = max(0, int(stream.frames or 0))
            declared_fps = _stream_fps(stream)
            declared_duration = _declared_duration_s(container, stream)
            if declared_duration is not None and declared_duration > settings.max_video_duration_s:
                raise _too_long(declared_duration, settings)
            codec = stream.codec_context
            if codec is None or codec.codec is None:
                raise _damaged_video()  # a codec ffmpeg does not know
            kind = codec.codec.canonical_name
            if kind not in VIDEO_CODECS:
                raise InputError(
                    f"This video's codec ({kind}) is not accepted; please convert it to a standard MP4 (H.264) "
                    f"or WebM (VP9) clip."
                )
            if codec.width and codec.height:
                _check_dimensions(codec.width, codec.height, settings, what="video")
            estimate = _estimated_frames(declared_frames, declared_fps, declared_duration)
            wanted = set(choose(estimate))
            # A stream may declare small frames and hold huge ones: ffmpeg itself refuses to decode a frame over
            # the pixel limit (a frame is checked below only once decoded, its memory already taken).
            codec.options = {**codec.options, "max_pixels": str(settings.max_image_pixels)}
            stream.thread_type = "AUTO"
            for packet in container.demux(stream):
                deadline.check()
                if kind in _JPEG_CODECS:  # the budget cannot interrupt one frame's decoding: its scans are counted
                    _check_jpeg_scans(bytes(packet), settings, "video's frame", "convert it to a standard MP4 (H.264)")
                try:
                    frames = packet.decode()
                except av.error.ArgumentError:  # how ffmpeg refuses a frame over `max_pixels`
                    raise InputError(
                        f"This video holds frames larger than {settings.max_image_pixels / _MEGA:g} megapixels; "
                        f"please upload a smaller video."
                    ) from None
                for frame in frames:
                    deadline.check()
                    _check_dimensions(frame.width, frame.height, settings, what="video")
                    if frame.time is not None:
                        first_time = frame.time if first_time is None else first_time
                        last_time = frame.time
                        if last_time - first_time > settings.max_video_duration_s:
                            raise _too_long(last_time - first_time, settings)
                    if count in wanted:
                        image = frame.to_image()
                        rotation = getattr(frame, "rotation", 0) or 0
                        if rotation:
                            # PyAV reports the counter-clockwise turn that shows the frame upright.
                            image = image.rotate(rotation, expand=True)
                        kept[count] = sink.add(image)
                    count += 1
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - av.error.InvalidDataError, odd headers, and friends
        deadline.check()  # an interrupt by the timeout above reads as running out of time
        _not_decoded("video", error)
        raise _damaged_video() from None
    return _Pass(kept, count, estimate, declared_fps, declared_duration, first_time, last_time)


def _metadata(
    total: int, fps: float, indices: list[int], frames: np.ndarray, duration_s: float | None
) -> dict[str, Any]:
    """Metadata in the shape of ``transformers.video_utils.VideoMetadata`` (exactly its fields).

    ``fps`` is the source frame rate and ``frames_indices`` are source indices: transformers
    computes each frame's timestamp as ``index / fps`` (Qwen3-VL) and the sampled rate as
    ``len(frames_indices) / total_num_frames * fps`` (Qwen2.5-VL). No other keys are added because
    ``VideoMetadata(**metadata)`` rejects unknown ones.
    """
    return {
        "total_num_frames": int(total),
        "fps": float(fps),
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
        "duration": float(duration_s if duration_s else total / fps),
        "video_backend": _METADATA_BACKEND,
        "frames_indices": [int(i) for i in indices],
    }


def _decode_video(fh: BinaryIO, settings: Settings, n: int) -> tuple[np.ndarray, dict]:
    """Sample ``n`` frames from an open video file in one pass, or two when the container lies.

    The first pass picks indices from the declared frame count (or duration x fps) and counts the
    frames it decodes. If the count differs from the estimate, or there was none, a second pass
    keeps the right frames. Both passes share one wall-clock budget.
    """
    demuxer = _video_demuxer(fh.read(_SNIFF_BYTES))
    if demuxer is None:
        raise InputError(f"This file is not a supported video; please upload a {_VIDEO_FORMATS_TEXT} clip.")
    deadline = _Deadline(settings.max_video_decode_s)
    deadline.check()

    result = _decode_pass(fh, demuxer, partial(sample_indices, n=n), settings, deadline)
    total = result.count
    if total == 0:
        raise InputError("This video has no frames; please upload a different clip.")
    indices = sample_indices(total, n)
    if any(i not in result.kept for i in indices):
        first_count = total
        result = _decode_pass(fh, demuxer, lambda _estimate: indices, settings, deadline)
        if result.count != first_count or any(i not in result.kept for i in indices):
            raise _damaged_video()  # the stream decoded differently twice
    frames = np.stack([result.kept[i] for i in indices])

    fps = result.declared_fps
    if fps is None and total > 1 and result.first_time_s is not None:
        span = (result.last_time_s or 0.0) - result.first_time_s
        fps = (total - 1) / span if span > 0 else None
    fps = fps or settings.video_default_fps
    # A header that miscounted the frames is not trusted for the duration either.
    duration_s = result.declared_duration_s if result.estimate == total else None
    return frames, _metadata(total, fps, indices, frames, duration_s)


def _check_fps(fps: float | None, settings: Settings) -> float:
    value = settings.video_default_fps if fps is None else float(fps)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    return value


def _already_loaded(video: tuple, settings: Settings) -> tuple[np.ndarray, dict]:
    """A (frames, metadata) pair this function returned before (the app shows the frames, then asks about
    them): checked for shape, size and metadata, not decoded again."""
    frames, metadata = video
    ok = (
        isinstance(frames, np.ndarray)
        and frames.dtype == np.uint8
        and frames.ndim == 4
        and frames.shape[3] == 3
        and frames.shape[0] >= 1
        and frames.shape[1] * frames.shape[2] <= settings.video_frame_max_pixels
        and set(metadata) == set(_metadata(1, 1.0, [0], frames[:1], None))
        and len(metadata.get("frames_indices") or ()) == frames.shape[0]
    )
    if not ok:
        raise InputError(
            "These decoded video frames are not in the form load_video returns; please pass the video file instead."
        )
    return frames, metadata


def _load_video_array(array: np.ndarray, settings: Settings, n: int, fps: float | None) -> tuple[np.ndarray, dict]:
    """Sample and downscale frames that are already decoded."""
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
        raise InputError(
            f"These video frames have shape {array.shape} and type {array.dtype}; please send a "
            "uint8 array of shape (T, H, W, 3)."
        )
    rate = _check_fps(fps, settings)
    total = array.shape[0]
    if total == 0:
        raise InputError("This video has no frames; please upload a different clip.")
    _check_dimensions(array.shape[2], array.shape[1], settings, what="video")
    if total / rate > settings.max_video_duration_s:
        raise _too_long(total / rate, settings)
    indices = sample_indices(total, n)
    sink = _FrameSink(settings)
    frames = np.stack([sink.add(Image.fromarray(np.ascontiguousarray(array[i]))) for i in indices])
    return frames, _metadata(total, rate, indices, frames, None)


def _load_video_images(images: Sequence[Any], settings: Settings, n: int, fps: float | None) -> tuple[np.ndarray, dict]:
    """Sample a list of images; each kept one goes through :func:`load_image` and all its checks."""
    rate = _check_fps(fps, settings)
    total = len(images)
    if total == 0:
        raise InputError("This video has no frames; please upload a different clip.")
    if total / rate > settings.max_video_duration_s:
        raise _too_long(total / rate, settings)
    indices = sample_indices(total, n)
    sink = _FrameSink(settings)
    frames = np.stack([sink.add(load_image(images[i], settings)) for i in indices])
    return frames, _metadata(total, rate, indices, frames, None)


def load_video(
    source: Any,
    settings: Settings = DEFAULT_SETTINGS,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
) -> tuple[np.ndarray, dict]:
    """Decode a visitor's video into ``num_frames`` uniformly sampled RGB frames and their metadata.

    ``source`` is a local path, raw bytes, a file object opened for reading in binary mode (as
    :func:`load_image` takes one), a uint8 array of frames (T, H, W, 3), or a list of images (anything
    :func:`load_image` accepts). ``num_frames`` defaults to ``settings.video_num_frames``;
    ``fps`` is the frame rate of an array or list source (default ``settings.video_default_fps``)
    and is ignored for files, whose container states it.

    Returns ``(frames, metadata)``: frames is a (T, H, W, 3) uint8 array, every frame downscaled to
    at most ``settings.video_frame_max_pixels`` pixels; metadata has exactly the fields of
    transformers' ``VideoMetadata`` (``total_num_frames``, ``fps`` (source rate), ``width``,
    ``height``, ``duration``, ``video_backend``, ``frames_indices`` (source indices)), ready to pass
    as ``video_metadata`` together with ``do_sample_frames=False``.
    """
    n = settings.video_num_frames if num_frames is None else int(num_frames)
    if n < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], dict):
        return _already_loaded(source, settings)
    if isinstance(source, np.ndarray):
        return _load_video_array(source, settings, n, fps)
    if isinstance(source, (list, tuple)):
        return _load_video_images(source, settings, n, fps)
    if isinstance(source, io.IOBase):
        source = _read_file_object(source, settings, "video")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > settings.max_upload_bytes:
            raise InputError(_too_big_message(len(data), settings, "video"))
        if not data:
            raise InputError("This video file is empty; please upload it again.")
        return _decode_video(io.BytesIO(data), settings, n)
    if isinstance(source, str):
        _refuse_url(source)
    if isinstance(source, (str, os.PathLike)):
        with _open_regular_file(source, settings, "video") as fh:
            return _decode_video(fh, settings, n)
    raise InputError(f"This is not a video ({type(source).__name__}); please upload a {_VIDEO_FORMATS_TEXT} clip.")
