"""The bundled examples (examples/examples.json) as absolute paths, ready for `gr.Examples`.

A missing or unreadable examples.json gives no examples rather than an app that does not start; an
entry whose files are missing is skipped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("ego.space")

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


@dataclass(frozen=True)
class Examples:
    concepts: list[tuple[str, list[str]]] = field(default_factory=list)
    """(name, reference photo paths) per example concept."""
    image_questions: list[tuple[str, str]] = field(default_factory=list)
    """(image path, question)."""
    video_questions: list[tuple[str, str]] = field(default_factory=list)
    """(video path, question)."""
    text_questions: list[str] = field(default_factory=list)
    """Questions asked without a photo, about the example concepts themselves."""

    @property
    def questions(self) -> list[str]:
        """Every example question: about a photo, a clip, or none."""
        return [q for _, q in self.image_questions + self.video_questions] + self.text_questions


def load_examples(folder: Path | str = EXAMPLES_DIR) -> Examples:
    folder = Path(folder).resolve()
    try:
        document = json.loads((folder / "examples.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.warning("no examples: %s", type(error).__name__)
        return Examples()

    def path(relative) -> str | None:
        candidate = (folder / str(relative)).resolve()
        if folder not in candidate.parents or not candidate.is_file():
            return None
        return str(candidate)

    concepts, images, videos = [], [], []
    for entry in document.get("concepts", []):
        photos = [path(p) for p in entry.get("images", [])]
        if entry.get("name") and photos and all(photos):
            concepts.append((str(entry["name"]), photos))
    for entry in document.get("image_questions", []):
        image = path(entry.get("image", ""))
        if image and entry.get("question"):
            images.append((image, str(entry["question"])))
    for entry in document.get("video_questions", []):
        video = path(entry.get("video", ""))
        if video and entry.get("question"):
            videos.append((video, str(entry["question"])))
    texts = [str(entry["question"]) for entry in document.get("text_questions", []) if entry.get("question")]
    return Examples(concepts, images, videos, texts)
