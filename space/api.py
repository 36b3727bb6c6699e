"""The Space's "Use via API" page: what each endpoint does, in a visitor's words, and example arguments that
run as they are, from a clone of this repository, against this app; /import_concepts's too once the file that
/export_concepts returns is saved there under its example's name (`EXPORTED_FILE`).

Gradio's own example arguments are web links to a picture of a bus (this app refuses links: a file is
uploaded, never fetched) and empty values where a photo list or a concept name is needed. Here every file
argument is one of the bundled example files, by its path relative to the repository root.
"""

from __future__ import annotations

from pathlib import Path

from .examples import Examples

ROOT = Path(__file__).resolve().parent.parent

INTRODUCE = (
    "Introduce a concept: a name and one to five photos of it. The model picks the visual tokens that "
    "represent it and keeps them as a memory in your session. Returns a report (keywords, size, tokens "
    "kept per photo), each photo with its kept tokens highlighted, and each photo's token importance."
)
ASK_IMAGE = (
    "Ask a question about a photo, with your concepts' memories in the model's context (no photo: ask "
    "about your concepts themselves). Returns the answer, the plain model's answer when compare is "
    "true, what went into the context, and per concept where its memory matches the photo."
)
ASK_VIDEO = (
    "Ask a question about a clip (8 frames sampled evenly), with your concepts' memories in the "
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
