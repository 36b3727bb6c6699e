"""The app's file cache has a size limit: an upload that would pass it is refused before it is read.

Gradio keeps every upload (and every picture and file the app returns) in its cache folder until the
sweep (`delete_cache`) removes it, `upload_max_age_s` after it was written. Each upload is capped by
`max_file_size`, but nothing caps their number: a script posting 25 MiB files for an hour would fill the
disk of a Space, and then every visitor's request fails. This middleware counts the folder's bytes
(recounted every few seconds, plus what it let in since) and answers an upload that would take the total
past `max_cache_mb` with 503 and a sentence, before Gradio reads its body. Nothing a visitor already has
is touched: their concepts live in memory, and the sweep frees room on its own schedule.

An upload is counted from the moment it is let in until a recount finds it on disk, also while its body is still
arriving (a slow upload is not forgotten by a recount). An upload that does not say its size (no Content-Length:
a chunked body, which could hold any number of files) is refused with 411; browsers and `gradio_client` always
say it. Gradio's `component_server` route reads every file of a multipart request into memory before any check;
this app has no component with server functions, so the route is refused (404).
"""

from __future__ import annotations

import math
import os
import re
import time

import anyio
from gradio.utils import get_upload_folder
from starlette.responses import PlainTextResponse

FULL = "The server's upload space is full right now; please try again in a few minutes."
SIZE_REQUIRED = "Send the upload with its size (a Content-Length header), as browsers and gradio_client do."
NO_COMPONENT_SERVER = "This app has no component server functions."
UPLOAD_ROUTE = re.compile(r"/gradio_api/(upload|process_recording)/?$")
"""The routes whose bodies are files (multipart): counted here, and exempt from the request-body cap."""
_COMPONENT_SERVER_ROUTE = re.compile(r"/gradio_api/component_server/?$")


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the regular files under `folder` (0 if it does not exist); links are not followed."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                stat = os.lstat(os.path.join(root, name))
            except OSError:  # removed by the sweep while we walked
                continue
            total += stat.st_size
    return total


class UploadQuota:
    """ASGI middleware: uploads that would take the cache folder past `max_bytes` get 503.

    `upload_bytes` is the per-file cap (kept for callers; every counted upload declares its size); `folder`
    defaults to Gradio's upload folder at the time of the request.
    """

    def __init__(self, app, *, max_bytes: int, upload_bytes: int, folder: str | None = None, recount_s: float = 2.0):
        self.app = app
        self.max_bytes, self.upload_bytes, self.folder, self.recount_s = max_bytes, upload_bytes, folder, recount_s
        self._counted, self._counted_at = 0, -math.inf
        self._admitted = 0
        """Bytes of the uploads that finished since the last recount (it finds them on disk)."""
        self._arriving = 0
        """Bytes of the uploads let in whose bodies are still arriving: counted until they finish."""

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if _COMPONENT_SERVER_ROUTE.search(path):
            await PlainTextResponse(NO_COMPONENT_SERVER, status_code=404)(scope, receive, send)
            return
        if not (scope.get("method") == "POST" and UPLOAD_ROUTE.search(path)):
            await self.app(scope, receive, send)
            return
        incoming = content_length(scope)
        if incoming is None:
            await PlainTextResponse(SIZE_REQUIRED, status_code=411)(scope, receive, send)
            return
        if await self._used() + incoming > self.max_bytes:
            await PlainTextResponse(FULL, status_code=503, headers={"retry-after": "300"})(scope, receive, send)
            return
        self._arriving += incoming
        try:
            await self.app(scope, receive, send)
        finally:
            self._arriving -= incoming
            self._admitted += incoming  # until the next recount sees it on disk

    async def _used(self) -> int:
        now = time.monotonic()
        if now - self._counted_at >= self.recount_s:
            folder = self.folder or get_upload_folder()
            self._counted = await anyio.to_thread.run_sync(folder_bytes, folder)
            self._counted_at, self._admitted = now, 0
        return self._counted + self._admitted + self._arriving


def content_length(scope) -> int | None:
    """The request's declared Content-Length, or None when it has none (or an unreadable one)."""
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return max(0, int(value))
            except ValueError:
                return None
    return None
