"""The Space never fetches a link a visitor sends it.

Gradio fetches http(s) URLs in two places: a file payload whose `path` is a URL (an API caller can
send one for any file input; the server downloads it, with no size limit, before any handler runs)
and the `/gradio_api/file=<url>` route (the server streams the URL back). Both refuse private
addresses, but any public URL would still be fetched by the Space, on the visitor's behalf. Nothing
in this app needs either, so both are refused: visitors upload the file itself.
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
