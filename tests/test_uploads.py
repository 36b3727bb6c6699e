"""space/uploads.py: uploads stop, with a sentence, before they fill the disk; the rest keeps working."""

from __future__ import annotations

import base64
import io
import itertools
import os
import zlib

import anyio
import gradio as gr
import httpx
import pytest
from conftest import free_port
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ego import DEFAULT_SETTINGS
from space.settings import SpaceSettings
from space.uploads import FULL, SIZE_REQUIRED, UploadQuota, folder_bytes


def storing_app(folder):
    """A stand-in for Gradio's upload route: every POST body becomes a file in `folder`."""
    numbers = itertools.count()

    async def store(request):
        (folder / f"upload-{next(numbers)}").write_bytes(await request.body())
        return PlainTextResponse("stored")

    async def other(request):
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/gradio_api/upload", store, methods=["POST"]),
            Route("/gradio_api/queue/join", other, methods=["POST"]),
        ]
    )


def client(folder, **options) -> TestClient:
    options = {"max_bytes": 1000, "upload_bytes": 600, "folder": str(folder), "recount_s": 0.0, **options}
    app = storing_app(folder)
    app.add_middleware(UploadQuota, **options)
    return TestClient(app)


def test_uploads_are_refused_once_the_folder_would_pass_the_limit_and_taken_again_when_room_frees(tmp_path):
    http = client(tmp_path)
    assert http.post("/gradio_api/upload", content=b"a" * 400).status_code == 200
    assert http.post("/gradio_api/upload", content=b"b" * 400).status_code == 200
    refused = http.post("/gradio_api/upload", content=b"c" * 400)
    assert refused.status_code == 503 and refused.text == FULL and refused.headers["retry-after"]
    assert folder_bytes(tmp_path) == 800, "the refused upload reached the disk"
    # Other routes are not uploads: they keep working while the folder is full.
    assert http.post("/gradio_api/queue/join", content=b"{}").status_code == 200
    (tmp_path / "upload-0").unlink()  # the sweep deletes an old file
    assert http.post("/gradio_api/upload", content=b"d" * 400).status_code == 200


def test_uploads_let_in_between_two_counts_are_counted_too(tmp_path):
    """A burst faster than the recount: what was let in since the last count is added to it."""
    http = client(tmp_path, recount_s=3600.0)
    assert [http.post("/gradio_api/upload", content=b"x" * 300).status_code for _ in range(4)] == [200, 200, 200, 503]


def test_an_upload_that_does_not_say_its_size_is_refused(tmp_path):
    """A chunked body could hold any number of files, each up to the per-file cap: it is not let in at all."""
    http = client(tmp_path)

    def chunks():
        yield b"z" * 10

    refused = http.post("/gradio_api/upload", content=chunks())
    assert refused.status_code == 411 and refused.text == SIZE_REQUIRED and folder_bytes(tmp_path) == 0


def test_an_upload_still_arriving_is_counted_across_recounts(tmp_path):
    """A slow upload is let in; a recount does not find it on disk yet, and it still counts until it ends."""
    release, statuses = anyio.Event(), []

    async def slow_gradio(scope, receive, send):
        await release.wait()
        await PlainTextResponse("stored")(scope, receive, send)

    quota = UploadQuota(slow_gradio, max_bytes=1000, upload_bytes=600, folder=str(tmp_path), recount_s=0.0)

    async def post(size: int):
        scope = {"type": "http", "method": "POST", "path": "/gradio_api/upload"}
        scope["headers"] = [(b"content-length", str(size).encode())]

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await quota(scope, receive, send)

    async def two_uploads():
        async with anyio.create_task_group() as group:
            group.start_soon(post, 600)  # let in, its body still arriving
            await anyio.sleep(0.05)
            await post(600)  # a recount finds nothing on disk: the first is still counted
            release.set()

    anyio.run(two_uploads)
    assert statuses == [503, 200]


def test_the_component_server_route_is_refused(tmp_path):
    """Gradio reads every file of a multipart request to it into memory before any check; no component here
    has server functions."""
    assert client(tmp_path).post("/gradio_api/component_server", files={"f": b"x" * 100}).status_code == 404


def test_folder_bytes_counts_nested_files_and_not_links(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"1" * 123)
    (tmp_path / "g").write_bytes(b"2" * 7)
    os.symlink(tmp_path / "g", tmp_path / "link")
    assert folder_bytes(tmp_path) == 130 + os.lstat(tmp_path / "link").st_size
    assert folder_bytes(tmp_path / "missing") == 0


@pytest.fixture
def small_cache_server(tmp_path, monkeypatch):
    """A Gradio app launched with the Space's launch options, a 1 MiB cache and its own cache folder."""
    import app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    settings = DEFAULT_SETTINGS.replace(max_upload_mb=1)
    with gr.Blocks() as demo:
        gr.File()
    demo.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
        **app.launch_options(settings, SpaceSettings(max_cache_mb=1)),
    )
    try:
        yield demo.local_url, tmp_path
    finally:
        demo.close()


def test_the_space_launch_options_stop_uploads_at_the_cache_limit(small_cache_server):
    url, folder = small_cache_server

    def upload(size: int) -> httpx.Response:
        return httpx.post(
            f"{url}gradio_api/upload", files={"files": ("clip.mp4", os.urandom(size), "video/mp4")}, timeout=30
        )

    accepted = [upload(300 * 1024).status_code for _ in range(3)]
    assert accepted == [200, 200, 200]
    refused = upload(300 * 1024)  # 4 x 300 KiB > 1 MiB
    assert refused.status_code == 503 and refused.text == FULL
    assert 900 * 1024 <= folder_bytes(folder) <= 1024 * 1024


def test_a_photo_sent_inline_as_a_data_url_is_refused_before_gradio_decodes_it():
    """Gradio would decode a data: URL whole into its cache before any limit of ours (size, quota, pixels)."""
    from gradio.data_classes import ImageData

    from space.components import INLINE_REFUSAL, photo_input

    picture = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(picture, "PNG")
    with gr.Blocks():
        photo = photo_input()
    inline = ImageData(url="data:image/png;base64," + base64.b64encode(picture.getvalue()).decode())
    with pytest.raises(gr.Error, match="uploaded file") as refused:
        photo.preprocess(inline)
    assert str(refused.value).strip('"') == INLINE_REFUSAL
    uploaded = ImageData(path="examples/scenes/chelsea_query.jpg", orig_name="query.jpg")
    assert photo.preprocess(uploaded) == "examples/scenes/chelsea_query.jpg"


def test_a_photo_gradio_cannot_open_gets_the_reason(tmp_path):
    """Gradio's own check opens the upload before the app decodes it safely: a photo declaring far too many
    pixels, or an empty file, is told so (as the library tells it), not "not an image"."""
    from gradio.data_classes import ImageData

    from space.components import EMPTY, TOO_MANY_PIXELS, photo_input

    with gr.Blocks():
        photo = photo_input()
    huge = tmp_path / "huge.png"  # a 16 x 16 pixel PNG whose header declares 20000 x 20000 (a few bytes)
    data = io.BytesIO()
    Image.new("L", (16, 16)).save(data, "PNG")
    png = bytearray(data.getvalue())
    png[16:24] = (20000).to_bytes(4, "big") * 2
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    huge.write_bytes(bytes(png))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path, sentence in ((huge, TOO_MANY_PIXELS), (empty, EMPTY)):
        with pytest.raises(gr.Error) as refused:
            photo.preprocess(ImageData(path=str(path), orig_name=path.name))
        assert refused.value.message == sentence
