"""ego.media: a visitor's image or video either decodes to clean RGB or is refused (InputError)."""

from __future__ import annotations

import contextlib
import io
import os
import resource
import struct
import threading
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st
from PIL import Image

from ego.errors import InputError
from ego.media import load_image, load_video, reduced, sample_indices
from ego.settings import DEFAULT_SETTINGS

# --- helpers ------------------------------------------------------------------------------------


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def assert_rgb(im: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    assert isinstance(im, Image.Image)
    assert im.mode == "RGB"
    if size is not None:
        assert im.size == size
    arr = np.asarray(im)
    assert arr.dtype == np.uint8 and arr.shape == (im.height, im.width, 3)
    return arr


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=2), mode="RGB")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: tiny on disk, huge when decoded.

    ``rows`` limits the pixel data written (the header still claims the full size), for sizes whose
    full data would take long to compress.
    """
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    written = height if rows is None else rows
    idat = b"".join(comp.compress(row) for _ in range(written)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def write_video(
    path: Path,
    n: int = 20,
    size: tuple[int, int] = (64, 48),
    fps: int = 10,
    codec: str = "libx264",
    rotation: int = 0,
) -> Path:
    """A clip whose frame ``i`` is a flat grey of level ``12 * i``, so a frame tells its index."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(n):
            arr = np.full((height, width, 3), LEVEL_STEP * i, np.uint8)
            if rotation:
                arr[: height // 4, : width // 4] = 255  # a white top-left corner, to see the turn
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


LEVEL_STEP = 12


def frame_index(frame: np.ndarray) -> int:
    """The index encoded by write_video in a decoded frame (robust to lossy coding)."""
    return int(round(float(np.median(frame)) / LEVEL_STEP))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "mp4": write_video(root / "clip.mp4"),
        "webm": write_video(root / "clip.webm", codec="libvpx-vp9"),
        "mkv": write_video(root / "clip.mkv"),
        "avi": write_video(root / "clip.avi", codec="mpeg4"),
        "rotated": write_video(root / "rotated.mp4", n=4, rotation=90),
        "big": write_video(root / "big.mp4", n=3, size=(320, 240)),
    }


# --- images: valid inputs -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_common_formats_decode_to_rgb(fmt):
    assert_rgb(load_image(encode(gradient(), fmt)), (64, 48))


def test_path_str_and_pathlib_sources(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(gradient(), "JPEG"))
    assert_rgb(load_image(str(path)), (64, 48))
    assert_rgb(load_image(path), (64, 48))


def test_numpy_array_source():
    arr = np.asarray(gradient())
    out = assert_rgb(load_image(arr), (64, 48))
    np.testing.assert_array_equal(out, arr)


def test_pil_source_is_not_mutated_and_a_new_object_is_returned():
    rgb = gradient()
    before = np.asarray(rgb).copy()
    out = load_image(rgb)
    assert out is not rgb
    np.testing.assert_array_equal(np.asarray(rgb), before)

    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    out = load_image(rgba)
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (10, 20, 30, 0)
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_becomes_white():
    im = Image.new("P", (10, 10), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((5, 5), 1)
    out = assert_rgb(load_image(encode(im, "PNG", transparency=0)))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[5, 5]) == (0, 255, 0)


def test_plain_palette_and_gif_first_frame():
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    for frame in frames:
        frame.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * 759)
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = assert_rgb(load_image(data), (8, 8))
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_alpha_is_composited_on_white():
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    im.putpixel((1, 1), (0, 0, 255, 255))
    im.putpixel((2, 2), (0, 0, 0, 128))
    out = assert_rgb(load_image(encode(im, "PNG")))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (0, 0, 255)
    assert 120 <= out[2, 2, 0] <= 135


def test_la_and_grey_become_rgb():
    la = Image.new("LA", (6, 6), (50, 255))
    assert tuple(assert_rgb(load_image(encode(la, "PNG")))[0, 0]) == (50, 50, 50)
    grey = Image.new("L", (6, 6), 200)
    assert tuple(assert_rgb(load_image(encode(grey, "PNG")))[0, 0]) == (200, 200, 200)
    one_bit = Image.new("1", (6, 6), 1)
    assert tuple(assert_rgb(load_image(encode(one_bit, "PNG")))[0, 0]) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    levels = np.array([[0, 256 * 64, 256 * 128, 65535]], dtype=np.uint16).repeat(4, 0)
    for fmt in ("PNG", "TIFF"):
        out = assert_rgb(load_image(encode(Image.fromarray(levels), fmt)))
        np.testing.assert_allclose(out[0, :, 0], [0, 64, 128, 255], atol=1)


def test_sixteen_bit_grey_keeps_its_transparent_level_as_white():
    """A 16-bit grey PNG names one 16-bit level transparent: those pixels are white, the others scaled."""
    levels = np.array([[0, 256 * 64, 1000, 65535]], dtype=np.uint16).repeat(2, 0)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, "PNG", transparency=1000)
    assert Image.open(io.BytesIO(buffer.getvalue())).info["transparency"] == 1000
    out = assert_rgb(load_image(buffer.getvalue()))
    np.testing.assert_allclose(out[0, :, 0], [0, 64, 255, 255], atol=1)
    assert out[0, 2].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in print colours
    out = assert_rgb(load_image(encode(cmyk, "JPEG", quality=95)), (16, 8))
    r, g, b = (int(v) for v in out[4, 8])
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 10))  # blue top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(im, "JPEG", exif=exif.tobytes(), quality=95)
    out = assert_rgb(load_image(data), (20, 40))
    # Rotated clockwise, the blue top-left corner lands at the top right.
    assert out[2, -3, 2] > 200 and out[2, -3, 0] < 60
    assert out[-3, 2, 0] > 200


# --- images: refusals ---------------------------------------------------------------------------


def test_decompression_bomb_is_refused_before_decoding():
    """64 megapixels claimed by a ~10 KB file: over our 40 MP limit, under PIL's own bomb check."""
    data = bomb_png(8000, 8000)
    assert len(data) < 20_000
    counted = ("new_count", "allocated_blocks", "reused_blocks")
    before = {name: Image.core.get_stats()[name] for name in counted}
    with pil_allocations() as sizes, pytest.raises(InputError, match=r"8000x8000 pixels; the limit is 40 megapixels"):
        load_image(data)
    # PIL made no image and its image-memory allocator never ran: refused from the header alone
    assert sizes == [] and {name: Image.core.get_stats()[name] for name in counted} == before


def test_decompression_bomb_peak_memory_stays_small():
    """Measured in a forked child, whose peak RSS starts from its own pages, not the test run's."""
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    data = bomb_png(8000, 8000)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            try:
                load_image(data)
                outcome = "decoded"
            except InputError:
                outcome = "refused"
            grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            os.write(write_fd, f"{outcome} {grown_kib}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    os.waitpid(pid, 0)
    outcome, grown_kib = os.read(read_fd, 100).decode().split()
    os.close(read_fd)
    assert outcome == "refused"
    assert int(grown_kib) < 20 * 1024  # decoding would take 64 MB (mode "1") and 192 MB as RGB


def test_bomb_beyond_pil_limit_is_refused():
    """900 megapixels: PIL raises DecompressionBombError itself on open; it must be InputError."""
    with pytest.raises(InputError):
        load_image(bomb_png(30000, 30000, rows=4))


def test_a_lower_pixel_limit_from_settings_is_used():
    small = DEFAULT_SETTINGS.replace(max_image_pixels=1000)
    with pytest.raises(InputError, match="64x48 pixels"):
        load_image(encode(gradient(), "PNG"), small)
    with pytest.raises(InputError):
        load_image(gradient(), small)
    with pytest.raises(InputError):
        load_image(np.zeros((48, 64, 3), np.uint8), small)


def test_aspect_ratio_limit():
    ok = Image.new("RGB", (2000, 100))
    assert_rgb(load_image(encode(ok, "PNG")), (2000, 100))
    too_thin = Image.new("RGB", (2002, 100))  # one pixel of the long side is forgiven, two are not
    with pytest.raises(InputError, match="too long and thin"):
        load_image(encode(too_thin, "PNG"))
    with pytest.raises(InputError, match="too long and thin"):
        load_image(Image.new("RGB", (10, 2100)))


@pytest.mark.parametrize(("size", "limit"), [((3505, 1402), 2.5), ((755, 604), 1.25), ((3999, 200), 20.0)])
def test_a_photo_within_the_aspect_limit_stays_within_it_once_reduced(size, limit):
    """A reduced photo's sides are rounded up, which can lengthen it a little: loaded again (a conversation's photo,
    a script that sends it back), it is not refused."""
    settings = DEFAULT_SETTINGS.replace(max_image_aspect_ratio=limit)
    original = load_image(Image.new("RGB", size), settings)
    for budget in (size[0] * size[1] // 3, size[0] * size[1] // 17):
        smaller = reduced(original, budget)
        assert smaller.size != original.size
        load_image(smaller, settings)


@pytest.mark.parametrize(
    "content",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10"/></svg>',
        b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
        b"just some text, not a picture\n",
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    ],
)
def test_non_images_named_png_are_refused(tmp_path, content):
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match="not a supported image"):
        load_image(path)
    with pytest.raises(InputError):
        load_image(content)


def test_disallowed_image_formats_are_refused():
    for fmt in ("ICO", "PPM", "TGA"):
        with pytest.raises(InputError):
            load_image(encode(gradient(), fmt))


def test_random_bytes_truncated_and_empty_files_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(InputError):
        load_image(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for fmt in ("PNG", "JPEG"):
        whole = encode(gradient(256, 256), fmt)
        with pytest.raises(InputError):
            load_image(whole[: len(whole) // 2])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(InputError):
        load_image(empty)
    with pytest.raises(InputError):
        load_image(b"")


def test_a_refused_file_leaves_its_error_type_and_place_in_the_log_but_not_its_name(tmp_path, caplog, monkeypatch):
    """A damaged upload and a fault of ours both reach the visitor as "damaged"; the server log tells them apart
    (the error's type and the line that raised it), without the visitor's file name or the decoder's message."""
    import ego.media as media

    secret = tmp_path / "holiday-with-alice.png"
    whole = encode(gradient(256, 256), "PNG")
    secret.write_bytes(whole[: len(whole) // 2])
    with caplog.at_level("INFO", logger="ego.media"), pytest.raises(InputError):
        load_image(secret)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "ego.media"]
    assert line.startswith("image not decoded: OSError at ") and "alice" not in line and "truncated" not in line

    def broken(image):
        raise TypeError("a fault of ours")

    caplog.clear()
    monkeypatch.setattr(media, "_to_rgb", broken)
    with caplog.at_level("INFO", logger="ego.media"), pytest.raises(InputError):
        load_image(encode(gradient(), "PNG"))
    assert [r.getMessage() for r in caplog.records if r.name == "ego.media"] == [
        f"image not decoded: TypeError at test_media.py:{broken.__code__.co_firstlineno + 1}"
    ]


def test_the_space_names_the_image_formats_the_decoder_takes():
    """The Space's upload hints and refusals cannot import the library (no torch at page build): one text, twice."""
    import ego.media as media
    from space.components import IMAGE_FORMATS_TEXT

    assert IMAGE_FORMATS_TEXT == media._IMAGE_FORMATS_TEXT
    named = IMAGE_FORMATS_TEXT.replace(" or ", ", ").upper().split(", ")
    assert sorted(named) == sorted(media.IMAGE_FORMATS)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/cat.jpg",
        "https://example.com/cat.jpg",
        "  HTTPS://EXAMPLE.COM/CAT.JPG",
        "file:///etc/passwd",
        "ftp://example.com/cat.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
    ],
)
def test_urls_are_refused_not_fetched(url):
    with pytest.raises(InputError, match="Links are not fetched"):
        load_image(url)
    with pytest.raises(InputError, match="Links are not fetched"):
        load_video(url)


def test_missing_file_directory_and_device_are_refused(tmp_path):
    with pytest.raises(InputError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError):
        load_image(tmp_path)
    if os.path.exists("/dev/zero"):
        with pytest.raises(InputError, match="not a regular"):
            load_image("/dev/zero")


def test_upload_size_limit(tmp_path):
    tiny_limit = DEFAULT_SETTINGS.replace(max_upload_mb=0)
    data = encode(gradient(), "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    with pytest.raises(InputError, match="MiB"):
        load_image(data, tiny_limit)
    with pytest.raises(InputError, match="MiB"):
        load_image(path, tiny_limit)
    # Just over the limit reads as over it, never as the limit itself.
    just_over = b"\0" * (25 * 1024 * 1024 + 10)
    with pytest.raises(InputError, match=r"This image is 25\.1 MiB; the limit is 25 MiB"):
        load_image(just_over, DEFAULT_SETTINGS.replace(max_upload_mb=25))


def test_a_missing_file_is_named_by_its_base_name_only(tmp_path, videos):
    """The folder is never shown (the Space's are server paths); other failures keep their sentence."""
    for load, what in ((load_image, "image"), (load_video, "video")):
        for missing in (tmp_path / "gone" / "photo.jpg", str(tmp_path / "photo.jpg")):
            with pytest.raises(InputError, match=rf"^There is no {what} file named 'photo\.jpg' at that path; ") as e:
                load(missing)
            assert str(tmp_path) not in str(e.value)
        with pytest.raises(InputError, match=f"^The {what} file's path is empty"):
            load("")
        with pytest.raises(InputError, match=f"^The {what} file could not be read"):
            load(videos["mp4"] / "inside")  # a path through a file: not a missing file, and not named


def test_binary_file_objects_are_read_and_text_ones_refused(tmp_path, videos):
    data = encode(gradient(), "JPEG")
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    assert_rgb(load_image(io.BytesIO(data)), (64, 48))
    with path.open("rb") as handle:
        assert_rgb(load_image(handle), (64, 48))
    with path.open("rb", buffering=0) as raw:
        assert_rgb(load_image(raw), (64, 48))
    with videos["mp4"].open("rb") as handle:
        check_clip(*load_video(handle))
    check_clip(*load_video(io.BytesIO(videos["mp4"].read_bytes())))
    with path.open("r", encoding="latin-1") as text, pytest.raises(InputError, match="opened as text; open it in"):
        load_image(text)
    with pytest.raises(InputError, match="opened as text"):
        load_video(io.StringIO("not a clip"))
    with path.open("ab") as for_writing, pytest.raises(InputError, match="not open for reading"):
        load_image(for_writing)
    closed = io.BytesIO(data)
    closed.close()
    with pytest.raises(InputError, match="is closed"):
        load_image(closed)
    read_already = io.BytesIO(data)
    read_already.read()
    with pytest.raises(InputError, match="already read to its end"):
        load_image(read_already)


def test_a_file_object_over_the_upload_limit_is_refused_with_its_size_without_reading_it_whole():
    """One byte more than the limit is read; the sentence gives the whole size, as for a path or bytes."""
    big = io.BytesIO(encode(gradient(), "PNG") + b"\0" * (3 * 1024 * 1024))
    with pytest.raises(InputError, match=r"^This image is 3\.1 MiB; the limit is 1 MiB"):
        load_image(big, DEFAULT_SETTINGS.replace(max_upload_mb=1))

    class Stream(io.RawIOBase):  # not seekable: its size is unknown, what was read is over the limit
        def readable(self):
            return True

        def readinto(self, buffer):
            self.given = getattr(self, "given", 0) + len(buffer)
            buffer[:] = b"\0" * len(buffer)
            return len(buffer)

    endless = Stream()
    with pytest.raises(InputError, match=r"^This video is 1\.1 MiB; the limit is 1 MiB"):
        load_video(endless, DEFAULT_SETTINGS.replace(max_upload_mb=1))
    assert endless.given == 1024 * 1024 + 1


@pytest.mark.parametrize(
    "bad",
    [None, 42, {"path": "x.png"}, np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 5), np.uint8)],
)
def test_wrong_source_types_are_refused(bad):
    with pytest.raises(InputError):
        load_image(bad)


# --- images: fuzzing ----------------------------------------------------------------------------

_SEEDS = {
    "png": encode(gradient(48, 40), "PNG"),
    "jpeg": encode(gradient(48, 40), "JPEG", quality=80),
    "gif": encode(gradient(32, 24).convert("P"), "GIF"),
    "webp": encode(gradient(32, 24), "WEBP"),
}


@contextlib.contextmanager
def pil_allocations():
    """Inside the block, the size (width, height) of every image PIL allocates in this thread to decode into
    (`Image.core.new`: a decoder's frame, a new image)."""
    sizes, new, thread = [], Image.core.new, threading.get_ident()

    def recording(mode, size, *args):
        if threading.get_ident() == thread:
            sizes.append(tuple(size))
        return new(mode, size, *args)

    Image.core.new = recording
    try:
        yield sizes
    finally:
        Image.core.new = new


def check_outcome(data: bytes) -> None:
    """RGB or a sentence; and whatever the header claims, PIL allocates images of at most the pixel limit in all to
    decode it into (the work and memory of decoding grow with the pixels decoded)."""
    with pil_allocations() as sizes:
        try:
            out = load_image(data)
        except InputError as err:
            message = str(err)
            assert message and message[0].isupper() and message.endswith(".")
        else:
            assert_rgb(out)
    assert sum(w * h for w, h in sizes) <= DEFAULT_SETTINGS.max_image_pixels, sizes


def _claiming(seed: str, width: int, height: int) -> dict:
    """The edits that make a seed's header claim width x height (GIF: the logical screen, little-endian; JPEG: the
    frame header, big-endian), its pixel data unchanged."""
    data = _SEEDS[seed]
    if seed == "gif":
        at, size = 6, struct.pack("<HH", width, height)
    else:
        at, size = data.index(b"\xff\xc0") + 5, struct.pack(">HH", height, width)
    return dict(seed=seed, edits=[(at + i, byte) for i, byte in enumerate(size)], cut=None)


FUZZ = hsettings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(min_size=0, max_size=2048))
def test_fuzz_random_bytes(data):
    check_outcome(data)


@FUZZ
@example(**_claiming("gif", 8000, 8000))  # 64 megapixels: over the limit, under PIL's own bomb check
@example(**_claiming("jpeg", 7000, 7000))
@given(
    seed=st.sampled_from(sorted(_SEEDS)),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=12),
    cut=st.one_of(st.none(), st.integers(min_value=1)),
)
def test_fuzz_mutated_images(seed, edits, cut):
    data = bytearray(_SEEDS[seed])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    check_outcome(bytes(data))


# --- sample_indices -----------------------------------------------------------------------------


def test_sample_indices():
    assert sample_indices(20, 8) == [1, 3, 6, 8, 11, 13, 16, 18]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_indices(100, 1) == [50]
    assert sample_indices(0, 8) == [] and sample_indices(10, 0) == []
    for total in range(1, 200):
        for n in (1, 2, 3, 7, 8, 16):
            got = sample_indices(total, n)
            assert got == sorted(set(got))
            assert len(got) == min(total, n)
            assert all(0 <= i < total for i in got)


# --- videos -------------------------------------------------------------------------------------


def check_clip(frames: np.ndarray, meta: dict, total: int = 20, n: int = 8, fps: float = 10.0) -> None:
    expected = sample_indices(total, n)
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[3] == 3
    assert frames.shape[0] == len(expected)
    assert meta["frames_indices"] == expected
    assert meta["total_num_frames"] == total
    assert meta["fps"] == pytest.approx(fps)
    assert meta["duration"] == pytest.approx(total / fps)
    assert (meta["height"], meta["width"]) == frames.shape[1:3]
    assert [frame_index(f) for f in frames] == expected  # the right frames, not just as many


@pytest.mark.parametrize("kind", ["mp4", "webm", "mkv", "avi"])
def test_video_files_are_sampled_uniformly(videos, kind):
    frames, meta = load_video(videos[kind])
    check_clip(frames, meta)
    assert frames.shape[1:3] == (48, 64)


def test_webm_reports_zero_frames_yet_samples_right(videos):
    """Matroska/WebM headers carry no frame count: the duration x fps estimate is used."""
    with av.open(str(videos["webm"])) as container:
        assert container.streams.video[0].frames == 0
    check_clip(*load_video(videos["webm"], num_frames=5), n=5)


@pytest.mark.parametrize("claimed", [7, 40])
def test_container_that_lies_about_its_frame_count(videos, tmp_path, claimed):
    """An AVI whose headers claim too few or too many frames still yields the right ones."""
    data = bytearray(videos["avi"].read_bytes())
    strh = data.index(b"strh")
    avih = data.index(b"avih")
    data[strh + 40 : strh + 44] = struct.pack("<I", claimed)  # AVISTREAMHEADER.dwLength
    data[avih + 24 : avih + 28] = struct.pack("<I", claimed)  # AVIMAINHEADER.dwTotalFrames
    path = tmp_path / "liar.avi"
    path.write_bytes(bytes(data))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == claimed
    frames, meta = load_video(path)
    check_clip(frames, meta)


def test_num_frames_and_fewer_frames_than_asked(videos):
    check_clip(*load_video(videos["mp4"], num_frames=3), n=3)
    check_clip(*load_video(videos["mp4"], num_frames=50), n=50)
    with pytest.raises(ValueError):
        load_video(videos["mp4"], num_frames=0)


def test_video_from_bytes(videos):
    check_clip(*load_video(videos["mp4"].read_bytes()))


def test_metadata_fits_transformers_video_metadata(videos):
    video_utils = pytest.importorskip("transformers.video_utils")
    _, meta = load_video(videos["mp4"])
    md = video_utils.VideoMetadata(**meta)
    assert md.timestamps == pytest.approx([i / 10.0 for i in meta["frames_indices"]])
    assert md.sampled_fps == pytest.approx(8 / 20 * 10.0)


def test_frames_are_downscaled_to_the_pixel_budget(videos):
    budget = DEFAULT_SETTINGS.replace(video_frame_max_pixels=80 * 60)
    frames, meta = load_video(videos["big"], budget)
    assert frames.shape[0] == 3
    height, width = frames.shape[1:3]
    assert width * height <= 80 * 60
    assert width / height == pytest.approx(320 / 240, rel=0.05)


def test_display_rotation_is_applied(videos):
    frames, meta = load_video(videos["rotated"])
    assert frames.shape[1:3] == (64, 48)  # portrait after a 90-degree turn
    # Turned counter-clockwise, the white top-left corner ends up at the bottom left.
    assert frames[0, -4, 3].mean() > 200 and frames[0, 3, 3].mean() < 100


def test_frame_array_source():
    clip = np.stack([np.full((30, 40, 3), LEVEL_STEP * i, np.uint8) for i in range(20)])
    frames, meta = load_video(clip, fps=5.0)
    check_clip(frames, meta, fps=5.0)
    frames, meta = load_video(clip)
    assert meta["fps"] == DEFAULT_SETTINGS.video_default_fps
    big = np.zeros((3, 480, 640, 3), np.uint8)
    frames, _ = load_video(big, DEFAULT_SETTINGS.replace(video_frame_max_pixels=64 * 48))
    assert frames.shape == (3, 48, 64, 3)


def test_list_of_images_source():
    images = [Image.new("RGB", (40, 30), (LEVEL_STEP * i,) * 3) for i in range(20)]
    frames, meta = load_video(images, fps=10.0)
    check_clip(frames, meta)
    mixed = [Image.new("L", (40, 30), 0), Image.new("RGBA", (80, 60), (0, 0, 0, 255))]
    frames, _ = load_video(mixed)
    assert frames.shape == (2, 30, 40, 3)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((0, 8, 8, 3), np.uint8),
        np.zeros((4, 8, 8), np.uint8),
        np.zeros((4, 8, 8, 3), np.float32),
        [],
        ["not an image"],
        None,
    ],
)
def test_bad_frame_sources_are_refused(bad):
    with pytest.raises(InputError):
        load_video(bad)


def silence() -> av.AudioFrame:
    """1024 samples of mono silence at 8 kHz."""
    samples = np.zeros((1, 1024), np.float32)
    frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
    frame.sample_rate = 8000
    return frame


def _muxed_without_video_frames(path: Path) -> Path:
    """A Matroska file with a video track that holds no frames (only audio packets are muxed)."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("aac", rate=8000)
        audio.layout = "mono"
        for i in range(5):
            frame = silence()
            frame.pts = i * 1024
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    return path


def test_zero_frame_video_is_refused(tmp_path):
    path = _muxed_without_video_frames(tmp_path / "empty.mkv")
    with av.open(str(path)) as container:
        assert len(container.streams.video) == 1
    with pytest.raises(InputError, match="no frames"):
        load_video(path)


def test_audio_only_file_is_refused(tmp_path):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as container:
        audio = container.add_stream("aac", rate=8000)
        audio.layout = "mono"
        frame = silence()
        for packet in [*audio.encode(frame), *audio.encode()]:
            container.mux(packet)
    with pytest.raises(InputError, match="no video"):
        load_video(path)


def test_truncated_video_is_refused(videos, tmp_path):
    data = videos["mp4"].read_bytes()
    path = tmp_path / "half.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        load_video(path)


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a video at all\n" * 10,
        encode(gradient(), "PNG"),
        encode(gradient(), "JPEG"),
        b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://169.254.169.254/latest\n",
        b"ffconcat version 1.0\nfile /etc/passwd\n",
        bytes(range(256)) * 4,
    ],
)
def test_non_videos_are_refused(tmp_path, content):
    path = tmp_path / "clip.mp4"
    path.write_bytes(content)
    with pytest.raises(InputError, match="not a supported video"):
        load_video(path)


def test_too_long_video_is_refused(videos):
    short_limit = DEFAULT_SETTINGS.replace(max_video_duration_s=1.0)
    for kind in ("mp4", "webm"):
        with pytest.raises(InputError, match="seconds long; the limit is 1 seconds"):
            load_video(videos[kind], short_limit)
    with pytest.raises(InputError, match="seconds long"):
        load_video(np.zeros((20, 8, 8, 3), np.uint8), short_limit, fps=10.0)
    # 21 frames at 10 fps, 2.1 s, against a 2-second limit: said as 2.1 seconds, not rounded to the limit.
    with pytest.raises(InputError, match=r"This video is 2\.1 seconds long; the limit is 2 seconds"):
        load_video(np.zeros((21, 8, 8, 3), np.uint8), DEFAULT_SETTINGS.replace(max_video_duration_s=2.0), fps=10.0)


def test_upload_size_limit_for_videos(videos):
    with pytest.raises(InputError, match="MiB"):
        load_video(videos["mp4"], DEFAULT_SETTINGS.replace(max_upload_mb=0))
    with pytest.raises(InputError, match="MiB"):
        load_video(videos["mp4"].read_bytes(), DEFAULT_SETTINGS.replace(max_upload_mb=0))


def test_video_pixel_limit(videos):
    with pytest.raises(InputError, match="320x240 pixels"):
        load_video(videos["big"], DEFAULT_SETTINGS.replace(max_image_pixels=10_000))


def test_decode_budget_is_enforced(videos):
    tiny_budget = DEFAULT_SETTINGS.replace(max_video_decode_s=0.0001)
    with pytest.raises(InputError, match=r"within 0.0001 seconds"):
        load_video(videos["mp4"], tiny_budget)


def test_decode_budget_is_checked_inside_the_decode_loop(videos, monkeypatch):
    """With a clock that advances one second per reading, a 30 s budget runs out mid-stream.

    Opening costs a handful of readings; the 20-frame clip needs more than 30 (one per packet and
    one per frame), so the refusal can only come from the checks between packets and frames.
    """
    import ego.media as media

    ticks = iter(range(10**6))
    monkeypatch.setattr(media, "_clock", lambda: float(next(ticks)))
    with pytest.raises(InputError, match="within 30 seconds"):
        load_video(videos["mp4"], DEFAULT_SETTINGS.replace(max_video_decode_s=30.0))


@hsettings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    kind=st.sampled_from(["mp4", "webm", "avi"]),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=10),
    cut=st.one_of(st.none(), st.integers(min_value=16)),
)
def test_fuzz_mutated_videos(videos, kind, edits, cut):
    """Damaged containers (magic bytes kept, so the demuxer really runs): frames or InputError."""
    data = bytearray(videos[kind].read_bytes())
    for position, value in edits:
        data[16 + position % (len(data) - 16)] = value
    if cut is not None:
        data = data[: 16 + cut % (len(data) - 16)]
    with frames_converted() as converted:
        try:
            frames, meta = load_video(bytes(data))
        except InputError:
            pass
        else:
            assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[3] == 3
            assert len(meta["frames_indices"]) == frames.shape[0] >= 1
    # Whatever the damage, only the sampled frames become pictures, each within the pixel limit, in at most two
    # passes (a second one when the header miscounted the frames): what decoding holds is those 8 frames a pass,
    # not the clip. (Its time is bounded by `max_video_decode_s`: test_decode_budget_is_checked_inside_the_decode_loop.)
    assert len(converted) <= 2 * DEFAULT_SETTINGS.video_num_frames, converted
    assert all(w * h <= DEFAULT_SETTINGS.max_image_pixels for w, h in converted), converted


@contextlib.contextmanager
def frames_converted():
    """Inside the block, the size of every decoded video frame turned into a picture (`_FrameSink.add`)."""
    import ego.media as media

    sizes, add = [], media._FrameSink.add

    def recording(sink, image):
        sizes.append(image.size)
        return add(sink, image)

    media._FrameSink.add = recording
    try:
        yield sizes
    finally:
        media._FrameSink.add = add


def test_a_loaded_video_is_accepted_again_without_decoding(tmp_path):
    """The app shows the sampled frames, then asks about them: the pair passes through, checked."""
    frames = np.random.default_rng(0).integers(0, 255, (20, 48, 64, 3), dtype=np.uint8)
    loaded = load_video(frames)
    again = load_video(loaded)
    assert again[0] is loaded[0] and again[1] == loaded[1]
    with pytest.raises(InputError):
        load_video((loaded[0][:, :, :, :2], loaded[1]))  # not RGB
    with pytest.raises(InputError):
        load_video((loaded[0][:3], loaded[1]))  # frames and indices disagree
    with pytest.raises(InputError):
        load_video((loaded[0], {"fps": 1}))  # not our metadata


def test_a_video_hiding_large_frames_behind_a_small_declared_size_is_refused_before_decoding_them(tmp_path):
    """The header says 64x64, later frames are 400x400: ffmpeg is told the pixel limit, so such a frame is never
    decoded (its memory never taken) and the visitor is told why."""

    def jpeg(side: int) -> bytes:
        data = io.BytesIO()
        Image.new("RGB", (side, side), (120, 30, 200)).save(data, "JPEG", quality=10, subsampling=0)
        return data.getvalue()

    path = tmp_path / "hiding.avi"
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuvj444p"
        for index, data in enumerate([jpeg(64), jpeg(400), jpeg(400)]):
            packet = av.Packet(data)
            packet.stream, packet.pts, packet.dts = stream, index, index
            container.mux(packet)
    with pytest.raises(InputError, match="holds frames larger than 0.01 megapixels"):
        load_video(path, DEFAULT_SETTINGS.replace(max_image_pixels=100 * 100))
    assert len(load_video(path, DEFAULT_SETTINGS)[0]) == 3


# --- work bounded before decoding ---------------------------------------------------------------


def jpeg_of_scans(extra: int, side: int = 64, progressive: bool = True) -> bytes:
    """A greyscale JPEG, with one of its AC scans (and its Huffman table) repeated `extra` more times: a valid file
    that each decoder walks whole once per scan (about 80 bytes a repeat)."""
    out = io.BytesIO()
    Image.new("L", (side, side), 128).save(out, "JPEG", progressive=progressive, quality=50)
    data = out.getvalue()
    if not extra:
        return data
    segments, at = [], 2
    while data[at + 1] != 0xD9:  # marker segments up to the end of image; a scan runs on to the next marker
        marker = data[at + 1]
        end = at + 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
        if marker == 0xDA:
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
        segments.append((marker, data[at:end]))
        at = end
    scans = [i for i, (marker, _) in enumerate(segments) if marker == 0xDA]
    # An AC scan's spectral start (the byte after its component list) is above 0; its table precedes it.
    ac = next(i for i in scans if segments[i][1][5 + 2 * segments[i][1][4]] > 0)
    unit = (segments[ac - 1][1] if segments[ac - 1][0] == 0xC4 else b"") + segments[ac][1]
    return b"\xff\xd8" + b"".join(segment for _, segment in segments) + unit * extra + b"\xff\xd9"


def test_a_jpeg_of_many_scans_is_refused_before_it_is_decoded(tmp_path):
    """Each scan decodes the whole picture again: a file of tiny repeated scans under every size limit would take
    the CPU for minutes (36 megapixels, 300,000 scans in 25 MB: most of an hour). Ordinary JPEGs, progressive ones
    (about 10 scans) too, are decoded; the limit is a setting."""
    assert load_image(jpeg_of_scans(0)).size == (64, 64)
    assert load_image(jpeg_of_scans(0, progressive=False)).size == (64, 64)
    limit = DEFAULT_SETTINGS.max_jpeg_scans
    many = jpeg_of_scans(limit)
    assert Image.open(io.BytesIO(many)).convert("RGB").size == (64, 64)  # a valid JPEG, which PIL would decode
    with pytest.raises(InputError, match=f"JPEG of more than {limit} scans.*save it again as an ordinary JPEG"):
        load_image(many)
    assert load_image(many, DEFAULT_SETTINGS.replace(max_jpeg_scans=2 * limit)).size == (64, 64)
    opened = Image.open(io.BytesIO(many))  # an opened image handed over (the Python API) is held to it too
    with pytest.raises(InputError, match="scans"):
        load_image(opened)
    # A TIFF's JPEG strips are JPEGs of their own rows, each with its scans: a large photo of hundreds of strips is
    # decoded; more scan markers than its strips may hold are refused. Another TIFF's raw data may hold the marker's
    # two bytes by chance, and is not counted.
    one = DEFAULT_SETTINGS.replace(max_jpeg_scans=1)
    for compression in ("jpeg", "raw"):
        tiff = io.BytesIO()
        Image.new("RGB", (512, 512), (255, 218, 255)).save(tiff, "TIFF", compression=compression)
        assert tiff.getvalue().count(b"\xff\xda") > 4
        assert load_image(tiff.getvalue(), one).size == (512, 512)
        if compression == "jpeg":
            with pytest.raises(InputError, match="more than 1 scans.*save it again as PNG"):
                load_image(tiff.getvalue() + b"\xff\xda" * 100, one)  # past the end: what the strips may not hold
    # An opened image whose file is gone is damaged, not a failure of ours.
    path = tmp_path / "closed.jpg"
    Image.new("RGB", (64, 64)).save(path)
    with open(path, "rb") as file:
        closed = Image.open(file)
    with pytest.raises(InputError, match="damaged or incomplete"):
        load_image(closed)


def test_a_video_in_a_codec_outside_the_usual_ones_is_refused_and_mjpeg_frames_are_held_to_the_scan_limit(tmp_path):
    """The decode budget is checked between frames and cannot interrupt one: a codec whose one frame may take
    unbounded work (JPEG 2000 here) is refused with a sentence, and an MJPEG frame of many scans too."""
    jp2 = tmp_path / "clip.mov"
    with av.open(str(jp2), "w", format="mov") as container:
        stream = container.add_stream("jpeg2000", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for packet in [*stream.encode(av.VideoFrame(64, 64, "yuv420p")), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(InputError, match=r"codec \(jpeg2000\) is not accepted.*MP4 \(H.264\)"):
        load_video(jp2)
    # Editing, screen-recording and lossless capture codecs (a frame's work bounded by its pixels) are decoded.
    for codec, container, pix_fmt in (
        ("qtrle", "mov", "rgb24"),
        ("png", "mov", "rgb24"),
        ("ffv1", "matroska", "yuv420p"),
    ):
        path = tmp_path / f"clip-{codec}.{'mkv' if container == 'matroska' else container}"
        with av.open(str(path), "w", format=container) as out:
            stream = out.add_stream(codec, rate=8)
            stream.width, stream.height, stream.pix_fmt = 64, 64, pix_fmt
            for index in range(3):
                frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 40 * index, np.uint8), format="rgb24")
                for packet in stream.encode(frame.reformat(format=pix_fmt)):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        assert len(load_video(path)[0]) == 3, codec

    def mjpeg(path: Path, frames: list[bytes]) -> Path:
        with av.open(str(path), "w", format="avi") as container:
            stream = container.add_stream("mjpeg", rate=8)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuvj420p"
            for index, data in enumerate(frames):
                packet = av.Packet(data)
                packet.stream, packet.pts, packet.dts = stream, index, index
                container.mux(packet)
        return path

    ordinary = jpeg_of_scans(0, progressive=False)
    assert len(load_video(mjpeg(tmp_path / "fine.avi", [ordinary] * 3))[0]) == 3
    hostile = mjpeg(tmp_path / "scans.avi", [ordinary, jpeg_of_scans(DEFAULT_SETTINGS.max_jpeg_scans), ordinary])
    with pytest.raises(InputError, match="video's frame is stored as a JPEG of more than 100 scans"):
        load_video(hostile)


@pytest.mark.parametrize(
    ("size", "budget", "factor"), [((4000, 3000), 3_211_264, 2), ((999, 601), 40_000, 4), ((640, 480), 307_200, 1)]
)
def test_a_photo_over_its_pixel_budget_is_reduced_by_a_whole_factor_to_its_box_means(size, budget, factor):
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    smaller = reduced(original, budget)
    if factor == 1:
        assert smaller is original and reduced(original, 0) is original
        return
    width, height = -(-size[0] // factor), -(-size[1] // factor)  # a partial box at the right and bottom edges
    assert smaller.size == (width, height) and width * height <= budget
    assert -(-size[0] // (factor - 1)) * -(-size[1] // (factor - 1)) > budget  # the smallest factor that fits
    full_w, full_h = size[0] // factor, size[1] // factor
    boxes = np.asarray(original, dtype=np.float64)[: full_h * factor, : full_w * factor]
    means = boxes.reshape(full_h, factor, full_w, factor, 3).mean(axis=(1, 3))
    shown = np.asarray(smaller, dtype=np.float64)[:full_h, :full_w]
    assert np.abs(shown - means).max() <= 0.5 + 1e-9  # each pixel its box's mean
    assert reduced(smaller, budget) is smaller
