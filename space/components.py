"""Gradio components adjusted for the Space (no engine, no torch: app.py imports this at the top)."""

from __future__ import annotations

import logging
import os

import gradio as gr
from PIL import Image

log = logging.getLogger("ego.space")

IMAGE_FORMATS_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"
TOO_MANY_PIXELS = "This image declares far too many pixels to decode safely; please upload a smaller image."
EMPTY = "This image file is empty; please upload it again."
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
        except Image.DecompressionBombError:
            log.info("upload not read as an image: DecompressionBombError")
            raise gr.Error(TOO_MANY_PIXELS, print_exception=False) from None
        except Exception as error:  # noqa: BLE001 - PIL's UnidentifiedImageError, OSError, SyntaxError, ...
            log.info("upload not read as an image: %s", type(error).__name__)  # not its name: the visitor's
            if _empty(path):  # (a file Gradio's check has just opened)
                raise gr.Error(EMPTY, print_exception=False) from None
            raise gr.Error(
                f"This file is not an image this app can read; please upload a {IMAGE_FORMATS_TEXT} photo.",
                print_exception=False,
            ) from None

    image.preprocess = preprocess
    return image


def _empty(path) -> bool:
    return isinstance(path, str) and os.path.isfile(path) and os.path.getsize(path) == 0


def text_input(*, what: str, phrases: bool = False, **kwargs) -> gr.Textbox:
    """A `gr.Textbox` that takes only text: Gradio's own turns any JSON value an API call sends into its Python
    spelling ("['tabby', 'green eyes']"), which the handler would take as typed. With `phrases` (keywords), a list
    of strings is the phrases, joined by commas as a visitor types them; any other value is refused with a
    sentence that says what `what` is (wrapped on the instance, as `photo_input`)."""
    box = gr.Textbox(**kwargs)
    gradio_text = box.preprocess

    def preprocess(payload):
        if phrases and isinstance(payload, (list, tuple)) and all(isinstance(item, str) for item in payload):
            payload = ", ".join(payload)
        if payload is not None and not isinstance(payload, str):
            raise gr.Error(f"Send {what} as text (a JSON string), not {_json_kind(payload)}.", print_exception=False)
        return gradio_text(payload)

    box.preprocess = preprocess
    return box


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    return "a list" if isinstance(value, (list, tuple)) else "an object" if isinstance(value, dict) else "that"
