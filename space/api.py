"""The Space's "Use via API" page: what each endpoint does, in a visitor's words, and example arguments that
run as they are, from a clone of this repository, against this app; /import_concepts's too once the file that
/export_concepts returns is saved there under its example's name (`EXPORTED_FILE`).

Gradio's own example arguments are web links to a picture of a bus (this app refuses links: a file is
uploaded, never fetched) and empty values where a photo list or a concept name is needed. Here every file
argument is one of the bundled example files, by its path relative to the repository root.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from pathlib import Path

import gradio as gr
from fastapi import HTTPException
from starlette.requests import Request

from .examples import Examples

log = logging.getLogger("ego.space")

ROOT = Path(__file__).resolve().parent.parent

INTRODUCE = (
    "Introduce a concept: a name and 1 to {max_photos} photos of it. The model picks the visual tokens that "
    "represent it and keeps them as a memory in your session. Returns a report (keywords, size, tokens "
    "kept per photo), each photo with its kept tokens highlighted, and each photo's token importance."
)
ASK_IMAGE = (
    "Ask a question about a photo, with your concepts' memories in the model's context (no photo: ask "
    "about your concepts themselves). Returns the answer, the plain model's answer when compare is "
    "true, what went into the context, and per concept where its memory matches the photo."
)
ASK_VIDEO = (
    "Ask a question about a clip ({frames} frames sampled evenly), with your concepts' memories in the "
    "context. Returns the frames the model saw, the answer and what went into the context."
)
FOLLOW_UP = (
    "Ask a follow-up question in your latest conversation (the one /ask_image or /ask_video started): "
    "the same photo or clip and concepts, the answers so far in the context. Returns the answer."
)
LIST_CONCEPTS = "Your concepts: name, memory tokens, photos, keywords and size per photo."
REMOVE_CONCEPT = "Remove one of your concepts by name. Returns your concepts that remain."
EXPORT_CONCEPTS = "Write your concepts to one .safetensors file (no pickle) to keep them or move them."
IMPORT_CONCEPTS = (
    "Add the concepts of a file made by export_concepts with the same model (the example's file: one "
    "export_concepts returned, saved as ego-concepts.safetensors). Names you already have are skipped: compare "
    "the concepts returned with the file's. Returns your concepts."
)

EXPORTED_FILE = "ego-concepts.safetensors"
"""The file that export_concepts writes (its name in the import example)."""


def _file(path: str) -> dict:
    """What `gradio_client.handle_file(path)` makes, with `path` relative to the repository root (written out:
    handle_file checks that the file exists from wherever the server was started)."""
    try:
        path = Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        path = str(path)
    # "url" too: the page writes a file argument as handle_file('<url>').
    return {"path": path, "url": path, "meta": {"_type": "gradio.FileData"}, "orig_name": Path(path).name}


def _example(component, payload) -> None:
    """Set the example argument the API page shows for `component` (on the instance: a subclass of a
    Gradio component makes Gradio write a .pyi file next to this module)."""
    component.example_payload = lambda: payload
    component.example_value = lambda: payload


FOLLOW_UP_EXAMPLE = "What else is in the picture?"


def document_examples(examples: Examples, *, intro, img, vid, mine, follow_up) -> None:
    """Give the API page's snippets the bundled example files, a real concept name and questions (`follow_up`: the
    /follow_up question's box)."""
    if examples.concepts:
        name, photos = examples.concepts[0]
        _example(intro.name, name)
        _example(intro.photos, [{"image": _file(p)} for p in photos])
        _example(mine.to_remove, name)
    _example(intro.keywords, "")  # empty: the model describes the photo
    _example(intro.size_pct, 25)
    _example(img.compare, False)
    if examples.image_questions:
        photo, question = examples.image_questions[0]
        _example(img.image, _file(photo))
        _example(img.question, question)
    if examples.video_questions:
        clip, question = examples.video_questions[0]
        _example(vid.video, _file(clip))
        _example(vid.question, question)
    _example(follow_up, FOLLOW_UP_EXAMPLE)
    _example(mine.import_button, _file(EXPORTED_FILE))


def photos_are_required(demo, label: str) -> None:
    """The page writes a parameter that has an initial value with that value instead of its example: the
    empty photo list of /introduce would make its snippet fail. The photos have no useful default (the
    handler needs one to five), so the API info says so (wrapped on the instance, like `_example`)."""
    api_info = demo.get_api_info

    def get_api_info(*args, **kwargs):
        info = api_info(*args, **kwargs)
        for endpoint in (info or {}).get("named_endpoints", {}).values():
            for parameter in endpoint.get("parameters", []):
                if parameter.get("label") == label:
                    parameter["parameter_has_default"], parameter["parameter_default"] = False, None
        return info

    demo.get_api_info = get_api_info


MALFORMED_CALL = (
    "This call does not match {endpoint}: {problem}. The API page (“Use via API”) lists its inputs, in order, "
    "with an example of each."
)


def answer_malformed_calls(demo) -> None:
    """A call with too few or too many input values, or one whose value a component cannot read or refuses, gets a
    sentence that says which input is wrong and where the inputs are listed. Gradio's own refusal is empty for the
    caller (the app shows no internal errors) or names no input, and writes the values sent into the server log:
    visitor content stays out of it, only the endpoint, the input's position or the counts and the error's type are
    logged. (Wrapped on the instance.)"""
    from gradio.exceptions import ComponentProcessingError
    from pydantic import ValidationError

    preprocess_data = demo.preprocess_data

    async def well_formed_only(block_fn, inputs, state, *args, **kwargs):
        endpoint = f"/{block_fn.api_name}" if isinstance(getattr(block_fn, "api_name", None), str) else "this event"
        # Positions and counts as the API page lists the inputs: the session's hidden State is not one of them.
        listed = [i for i, block in enumerate(block_fn.inputs) if not getattr(block, "skip_api", False)]
        every_input = _every_input(block_fn, inputs)
        if every_input is None:
            sent, wanted = len(inputs), len(listed)
            log.warning("call of %s refused: %d input values sent, %d taken", endpoint, sent, wanted)
            problem = f"it sends {sent} input value{'s' * (sent != 1)}, and {endpoint} takes {wanted}"
            raise gr.Error(MALFORMED_CALL.format(endpoint=endpoint, problem=problem), print_exception=False)
        try:
            return await preprocess_data(block_fn, every_input, state, *args, **kwargs)
        except (ComponentProcessingError, ValidationError, gr.Error) as error:
            if isinstance(error, gr.Error) and not error.print_exception:
                raise  # this app's own sentence (a refused link, a file that is no image, ...): already said
            if isinstance(error, gr.Error):  # Gradio's refusal of a value (a number out of range, ...)
                index, takes = _refusing_input(error, block_fn), _what_it_takes
            else:
                index, takes = _failing_input(error, block_fn, every_input), None
            where = f"input {listed.index(index) + 1}" if index in listed else "an input"
            log.warning("call of %s refused: %s (%s)", endpoint, where, type(error).__name__)
            block = block_fn.inputs[index] if index is not None else None
            label = getattr(block, "label", None)
            said = takes(block) if takes and block is not None else "is not in a form it reads"
            problem = f"{where}{f' ({label})' if label else ''} {said}"
            raise gr.Error(MALFORMED_CALL.format(endpoint=endpoint, problem=problem), print_exception=False) from None

    demo.preprocess_data = well_formed_only


def _every_input(block_fn, inputs) -> list | None:
    """The values of all of `block_fn`'s inputs, or None when the call's count does not fit.

    A call sends either every input, hidden ones included (the page and gradio_client do, with null for the
    session's State: Gradio keeps its value on the server), or only the inputs the API page lists. Gradio fills
    the hidden ones in for the second form on its /call/ route only, and only when the count is exactly the
    listed one; its /run/ route takes the values as sent, so a direct call with exactly the listed inputs is
    filled in here. A call of an API endpoint that sends a value where the hidden State would be has one value too
    many (Gradio would shift every value one input along); the page's own events keep Gradio's leniency to extra
    values (a JavaScript step may hand on more than the inputs)."""
    blocks = block_fn.inputs
    hidden = [i for i, block in enumerate(blocks) if getattr(block, "skip_api", False)]
    of_the_api = getattr(block_fn, "api_visibility", "public") != "private"
    if len(inputs) == len(blocks) - len(hidden) and hidden:
        values = iter(inputs)
        return [None if i in hidden else next(values) for i in range(len(blocks))]
    if len(inputs) < len(blocks):
        return None
    if of_the_api:
        stateful = [i for i in hidden if getattr(blocks[i], "stateful", False)]
        if len(inputs) > len(blocks) or any(inputs[i] is not None for i in stateful):
            return None
    return inputs


def _refusing_input(error, block_fn) -> int | None:
    """The position of the input whose component refused its value with a Gradio error (which names no input): the
    component whose method raised it, found in the error's traceback (a session's own copy of a component keeps its
    id)."""
    ids = [getattr(block, "_id", None) for block in block_fn.inputs]
    found, traceback = None, error.__traceback__
    while traceback is not None:
        owner = traceback.tb_frame.f_locals.get("self")
        if getattr(owner, "_id", None) in ids:
            found = ids.index(owner._id)  # the innermost frame of an input's component
        traceback = traceback.tb_next
    return found


def _what_it_takes(block) -> str:
    """What an input whose component refused a value takes, in its own terms."""
    minimum, maximum = getattr(block, "minimum", None), getattr(block, "maximum", None)
    if minimum is not None and maximum is not None:
        return f"takes a number from {minimum:g} to {maximum:g}"
    if minimum is not None:
        return f"takes a number of at least {minimum:g}"
    if maximum is not None:
        return f"takes a number of at most {maximum:g}"
    file_types = getattr(block, "file_types", None)
    if file_types:  # extensions (".safetensors") or kinds of file ("image")
        endings = [
            t if t.startswith(".") else f"a{'n' * (t[:1] in 'aeiou')} {t} extension" for t in map(str, file_types)
        ]
        return f"takes a file whose name ends in {' or '.join(endings)}"
    if getattr(block, "choices", None):
        return "takes one of its choices"
    return "is not a value it takes"


def _failing_input(error, block_fn, inputs) -> int | None:
    """The position of the input whose value failed: as Gradio's message says ("... at index 2 ..."), or, for a
    data model's validation (whose error names no input), the first value its component's model refuses."""
    from pydantic import ValidationError

    match = re.search(r"component at index (\d+)", str(error))
    if match:
        index = int(match.group(1))
        return index if index < len(block_fn.inputs) else None
    for index, (block, value) in enumerate(zip(block_fn.inputs, inputs)):
        model = getattr(block, "data_model", None)
        if model is None or value is None or getattr(block, "stateful", False):
            continue
        try:
            model.model_validate(value)
        except ValidationError:
            return index
    return None


def offer_images_only(gallery) -> None:
    """Let `gallery` (built without `file_types`) take any file, judged later by its content, while the browser's
    file picker still offers images only.

    Gradio's `file_types=["image"]` is a check of the file's name: a JPEG named `photo` or `blob` (a pasted
    picture, a script's upload) is refused with a traceback, and any file named `.svg` passes. The handler decodes
    every photo with `ego.media.load_image`, which reads the content and refuses what is no image with a sentence.
    The browser reads the picker's filter from the page's config, so only that says "image" (wrapped on the
    instance; a session's own copy of the gallery is built from its arguments, so it has no check of names either).
    """
    get_config = gallery.get_config

    def with_image_picker(*args, **kwargs):
        config = get_config(*args, **kwargs)
        config["file_types"] = ["image"]
        return config

    gallery.get_config = with_image_picker


UNKNOWN_ENDPOINT = (
    "There is no endpoint /{name}; this app's endpoints are {endpoints}: see the API page (“Use via API”)."
)
_DIRECT_ROUTE = re.compile(r"/gradio_api/(?:run|api)/[^/]+/?\Z")
"""Gradio's route for calls outside the queue, which the page uses too (by number)."""
_SHOWN_NAME_CHARS = 60


async def known_endpoints_only(request: Request) -> None:
    """A dependency of every route of the app (FastAPI's `dependencies`): a request to a route that takes an
    endpoint's name (/call/, /call/v2/, /run/, /api/, and /call/'s result stream) naming one this app does not have
    (a typo, one of the page's own events, anything) gets HTTP 404 with a sentence listing the endpoints of the API
    page. Gradio would answer a bare 500 and write a traceback into the server log that ends with the name as sent
    (one with an encoded newline would write a line of its own into the log), or run a UI-only event. The log says
    only that such a call was refused.

    The page calls its events by number on the /run/ route (`/run/predict` with a `fn_index`, whatever the name):
    Gradio ignores the name then, and so does this check.
    """
    name = request.path_params.get("api_name")
    if not isinstance(name, str):
        return
    blocks = request.app.get_blocks()
    if name in _endpoint_names(blocks, include_undocumented=True):
        return
    if request.method == "POST" and _DIRECT_ROUTE.search(request.url.path) and _names_a_function(await request.body()):
        return
    log.info("call of an endpoint this app does not have refused")
    endpoints = ", ".join(f"/{n}" for n in _endpoint_names(blocks))
    raise HTTPException(status_code=404, detail=UNKNOWN_ENDPOINT.format(name=_shown(name), endpoints=endpoints))


def _shown(name: str) -> str:
    """An endpoint's name as sent, for the caller's sentence: shortened, its invisible characters (a decoded
    newline) shown as "�"."""
    name = "".join("�" if unicodedata.category(c).startswith("C") else c for c in name[: _SHOWN_NAME_CHARS + 1])
    return name if len(name) <= _SHOWN_NAME_CHARS else name[:_SHOWN_NAME_CHARS] + "…"


def _endpoint_names(blocks, *, include_undocumented: bool = False) -> list[str]:
    """The endpoints `blocks` serves by name, in the API page's order: the public ones (those it lists) and, with
    `include_undocumented`, those Gradio leaves callable without listing them (an example's loader). The page's
    own (private) events are not endpoints."""
    shown = ("public", "undocumented") if include_undocumented else ("public",)
    return [
        fn.api_name
        for fn in blocks.fns.values()
        if isinstance(fn.api_name, str) and fn.fn is not None and getattr(fn, "api_visibility", "public") in shown
    ]


def _names_a_function(body: bytes) -> bool:
    """Whether a request body names the event it calls by number (`fn_index`), as the page does."""
    try:
        document = json.loads(body)
    except ValueError:
        return False
    fn_index = document.get("fn_index") if isinstance(document, dict) else None
    return isinstance(fn_index, int) and not isinstance(fn_index, bool)
