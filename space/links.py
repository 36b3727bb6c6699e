"""The Space never fetches a link a visitor sends it, nor opens a file of the server a visitor names.

Gradio fetches http(s) URLs in two places: a file payload whose `path` is a URL (an API caller can
send one for any file input; the server downloads it, with no size limit, before any handler runs)
and the `/gradio_api/file=<url>` route (the server streams the URL back). Both refuse private
addresses, but any public URL would still be fetched by the Space, on the visitor's behalf. Nothing
in this app needs either, so both are refused: visitors upload the file itself.

Gradio checks that a file payload was uploaded only when the payload says it is a file (its "meta" field):
a photo sent as `{"path": "/some/server/file.png"}` without it reaches the component as it is, and the
component opens the server's file. Every input's payload is therefore checked here, whatever it says it is,
before any component sees it: each path it names must lie in Gradio's upload folder, where uploads (and the
examples' copies) are.
"""

from __future__ import annotations

import re

import gradio as gr
from starlette.responses import PlainTextResponse

REFUSAL = "This app does not fetch links; upload the file itself."
_FILE_ROUTE = re.compile(r"/gradio_api/file[=/](?P<target>.*)$", re.DOTALL)


def _is_link(text) -> bool:
    return isinstance(text, str) and text.lstrip().lower().startswith(("http://", "https://", "//"))


def refuse_links(block) -> None:
    """Make `block` refuse file payloads whose path is a URL instead of downloading them.

    (The method is wrapped on the instance, like `components.photo_input` does: a subclass of a Gradio
    component makes Gradio write a .pyi file next to this module.)
    """
    move_to_cache = block.async_move_resource_to_block_cache

    async def local_files_only(url_or_file_path):
        if _is_link(url_or_file_path):
            raise gr.Error(REFUSAL, print_exception=False)
        return await move_to_cache(url_or_file_path)

    block.async_move_resource_to_block_cache = local_files_only


NOT_UPLOADED = "Send files as uploads (see the HTTP API's docs); this app opens no file of the server."


def refuse_host_files(demo) -> None:
    """Make `demo` refuse, before any component sees it, an input payload that names a file outside Gradio's
    upload folder (a link included) or carries an inline `data:` URL. Checked on the demo's raw inputs, not in each
    component: Gradio gives a session its own copy of a component once a handler updates it (an example click
    does), and a check wrapped on the shared component would not follow. (Wrapped on the instance.)"""
    from gradio.utils import get_upload_folder, is_in_or_equal

    preprocess_data = demo.preprocess_data

    async def uploaded_files_only(block_fn, inputs, state, *args, **kwargs):
        uploads = get_upload_folder()
        for path in _named_paths(inputs):
            if _is_link(path):  # its own sentence: links are never fetched
                raise gr.Error(REFUSAL, print_exception=False)
            if path is _BUILDS_COMPONENTS or _is_inline(path) or not is_in_or_equal(path, uploads):
                raise gr.Error(NOT_UPLOADED, print_exception=False)
        return await preprocess_data(block_fn, inputs, state, *args, **kwargs)

    demo.preprocess_data = uploaded_files_only


def _is_inline(text: str) -> bool:
    return text.lstrip().lower().startswith("data:")


_BUILDS_COMPONENTS = object()
"""Stands for a payload no input of this app sends: one nested deeper than `_MAX_DEPTH`, or one that asks for a
component to be built (a chat message of `"type": "component"`, whose `constructor_args` Gradio's chat view
passes to the component it builds, file arguments and inline pictures included)."""
_MAX_DEPTH = 16


def _named_paths(payload, depth: int = 0):
    """Every "path" a payload names, and every inline "url", at any depth (a gallery's images, a video's file, a
    chat message's files); `_BUILDS_COMPONENTS` for what is refused whatever it names."""
    if depth > _MAX_DEPTH:
        yield _BUILDS_COMPONENTS
        return
    if hasattr(payload, "model_dump"):  # Gradio's data models (ImageData, GalleryData, FileData, ...)
        payload = payload.model_dump()
    if isinstance(payload, dict):
        if payload.get("type") == "component" or "constructor_args" in payload:
            yield _BUILDS_COMPONENTS
            return
        if isinstance(payload.get("path"), str):
            yield payload["path"]
        if isinstance(payload.get("url"), str) and _is_inline(payload["url"]):
            yield payload["url"]
        for value in payload.values():
            yield from _named_paths(value, depth + 1)
    elif isinstance(payload, (list, tuple)):
        for value in payload:
            yield from _named_paths(value, depth + 1)


class RefuseFileLinks:
    """ASGI middleware: `GET /gradio_api/file=<http(s) URL>` is answered 403 instead of fetched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        match = _FILE_ROUTE.search(scope.get("path", "")) if scope["type"] == "http" else None
        if match and _is_link(match["target"]):
            await PlainTextResponse(REFUSAL, status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)
