"""Gradio components adjusted for the Space (no engine, no torch: app.py imports this at the top)."""

from __future__ import annotations

import logging

import gradio as gr

log = logging.getLogger("ego.space")

IMAGE_FORMATS_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"
INLINE_REFUSAL = "Send the photo as an uploaded file (see the HTTP API's docs), not inline in the request."


def photo_input(**kwargs) -> gr.Image:
    """A `gr.Image` (type="filepath") whose upload check ends in a sentence for the visitor.

    Gradio's own check opens the upload with PIL; a file that is not an image would otherwise fail with
    an opaque "Error" in the page and a stack trace naming the visitor's file in the server log. The
    image is decoded later, safely, by `ego.media.load_image`. (The check is wrapped on the instance: a
    subclass of a Gradio component makes Gradio write a .pyi file next to this module.)
    """
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    gradio_check = image.preprocess

    def preprocess(payload):
        # Gradio decodes an image sent inline as a data: URL, whole and unchecked, into its cache before any
        # limit of ours: upload limits, the file-cache quota and the pixel limit would not apply. Only uploaded
        # files are taken (what the browser sends, and the HTTP API's documented way).
        if payload is not None:
            url = payload.get("url") if isinstance(payload, dict) else getattr(payload, "url", None)
            path = payload.get("path") if isinstance(payload, dict) else getattr(payload, "path", None)
            if (isinstance(url, str) and url.lstrip().lower().startswith("data:")) or not path:
                raise gr.Error(INLINE_REFUSAL, print_exception=False)
        try:
            return gradio_check(payload)
        except gr.Error:
            raise
        except Exception as error:  # noqa: BLE001 - PIL's UnidentifiedImageError, DecompressionBombError, OSError, ...
            log.info("upload not read as an image: %s", type(error).__name__)  # not its name: the visitor's
            raise gr.Error(
                f"This file is not an image this app can read; please upload a {IMAGE_FORMATS_TEXT} photo.",
                print_exception=False,
            ) from None

    image.preprocess = preprocess
    return image
