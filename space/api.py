"""The Space's "Use via API" page: what each endpoint does, in a visitor's words, and example arguments that
run as they are, from a clone of this repository, against this app; /import_concepts's too once the file that
/export_concepts returns is saved there under its example's name (`EXPORTED_FILE`).

Gradio's own example arguments are web links to a picture of a bus (this app refuses links: a file is
uploaded, never fetched) and empty values where a photo list or a concept name is needed. Here every file
argument is one of the bundled example files, by its path relative to the repository root.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import gradio as gr

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
    "export_concepts returned, saved as ego-concepts.safetensors). Names you already have are skipped (and "
    "named in a message). Returns your concepts."
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


def document_examples(examples: Examples, *, intro, img, vid, mine) -> None:
    """Give the API page's snippets the bundled example files and a real concept name."""
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
    """A call with too few input values, or one whose value a component cannot read, gets a sentence that says
    which input is wrong and where the inputs are listed. Gradio's own refusal is empty for the caller (the app
    shows no internal errors) and writes the values sent into the server log: visitor content stays out of it,
    only the endpoint, the input's position and the error's type are logged. (Wrapped on the instance.)"""
    from gradio.exceptions import ComponentProcessingError
    from pydantic import ValidationError

    preprocess_data = demo.preprocess_data

    async def well_formed_only(block_fn, inputs, state, *args, **kwargs):
        endpoint = f"/{block_fn.api_name}" if isinstance(getattr(block_fn, "api_name", None), str) else "this event"
        # Positions and counts as the API page lists the inputs: the session's hidden State is not one of them.
        listed = [i for i, block in enumerate(block_fn.inputs) if not getattr(block, "skip_api", False)]
        hidden = len(block_fn.inputs) - len(listed)
        wanted, got = len(listed), max(0, len(inputs) - hidden)
        if len(inputs) < len(block_fn.inputs):
            log.warning("call of %s with %d of its %d inputs refused", endpoint, got, wanted)
            problem = f"it sends {got} input value{'s' * (got != 1)}, and {endpoint} takes {wanted}"
            raise gr.Error(MALFORMED_CALL.format(endpoint=endpoint, problem=problem), print_exception=False)
        try:
            return await preprocess_data(block_fn, inputs, state, *args, **kwargs)
        except (ComponentProcessingError, ValidationError) as error:
            index = _failing_input(error, block_fn, inputs)
            log.warning("call of %s refused: input %s unreadable (%s)", endpoint, index, type(error).__name__)
            where = f"input {listed.index(index) + 1}" if index in listed else "an input"
            label = getattr(block_fn.inputs[index], "label", None) if index is not None else None
            problem = f"{where}{f' ({label})' if label else ''} is not in a form it reads"
            raise gr.Error(MALFORMED_CALL.format(endpoint=endpoint, problem=problem), print_exception=False) from None

    demo.preprocess_data = well_formed_only


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
