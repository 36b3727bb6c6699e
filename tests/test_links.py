"""space/links.py: the checks every input payload passes before any component of the Space reads it."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import gradio as gr
import pytest
from gradio.utils import get_upload_folder

from space.links import NOT_UPLOADED, REFUSAL, refuse_host_files


def _checked(inputs):
    """What a demo wrapped by `refuse_host_files` does with `inputs`: passes them on, or refuses them."""
    seen = []

    async def preprocess_data(block_fn, inputs, state, *args, **kwargs):
        seen.append(inputs)
        return inputs

    demo = SimpleNamespace(preprocess_data=preprocess_data)
    refuse_host_files(demo)
    asyncio.run(demo.preprocess_data(None, inputs, None))
    return seen


def _nested(depth: int, leaf):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


UPLOADED = f"{get_upload_folder()}/0123abcd/photo.jpg"


def test_uploads_and_plain_chat_messages_pass():
    chat = [{"role": "user", "content": [{"type": "text", "text": "Is <b>Chelsea</b> here?"}], "metadata": None}]
    gallery = [{"image": {"path": UPLOADED, "url": "http://host/gradio_api/file=x", "meta": {}}, "caption": None}]
    inputs = [None, gallery, {"path": UPLOADED}, chat, "a question", 25]
    assert _checked(inputs) == [inputs]


@pytest.mark.parametrize(
    "payload",
    [
        {"path": "/etc/passwd"},
        {"path": f"{get_upload_folder()}/../../etc/passwd"},
        {"path": "examples/scenes/chelsea_query.jpg"},
        {"url": "data:image/png;base64,iVBORw0KGgo=", "path": None},
        [{"image": {"path": "/srv/secret.png"}, "caption": None}],
        # A chat message that asks Gradio's chat view to build a component from the request's own arguments
        # (a button whose icon is a server file; an image holding an inline picture of any size).
        [{"role": "user", "content": [{"type": "component", "component": "button", "constructor_args": {}}]}],
        {"component": "image", "constructor_args": {"value": "data:image/png;base64,AAAA"}},
        # Deeper than any input of this app: refused whatever it names.
        _nested(20, {"path": UPLOADED}),
        _nested(20, "text"),
    ],
)
def test_server_files_inline_pictures_built_components_and_deep_payloads_are_refused(payload):
    with pytest.raises(gr.Error, match=re.escape(NOT_UPLOADED)):
        _checked([None, payload])


@pytest.mark.parametrize("link", ["https://example.com/cat.png", "//example.com/cat.png", " HTTP://example.com/x"])
def test_a_link_sent_as_a_file_is_told_that_links_are_not_fetched(link):
    with pytest.raises(gr.Error, match=re.escape(REFUSAL)):
        _checked([None, {"path": link}])
    with pytest.raises(gr.Error, match=re.escape(REFUSAL)):
        _checked([[{"image": {"path": link}, "caption": None}]])
