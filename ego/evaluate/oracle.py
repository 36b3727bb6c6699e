"""An answerer that reads the fixture's ground truth (`_truth.json`), to check that loading, parsing and
scoring agree: on the fixture it must score 100 on every benchmark."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError


def oracle_answerer(root: Path):
    path = Path(root) / "_truth.json"
    if not path.is_file():
        raise InputError(f"--model oracle answers from {path}, which only `make-fixture` writes.")
    truth = json.loads(path.read_text())
    present, answers = truth["present"], truth["answers"]

    def respond(query, concepts, media) -> dict:
        if query.kind == "yesno":
            raw = "Yes." if query.concept in present[query.media] else "No, it is not."
        elif query.kind == "option":
            letter = answers[f"{query.media}|{query.raw_question}"]
            raw = f"{letter}. {query.options[letter]}"
        elif query.kind == "caption":
            raw = "A photo of " + " and ".join(present[query.media]) + " on a plain background."
        else:
            raw = f"It is {answers[f'{query.media}|{query.raw_question}']}."
        return {"raw": raw}

    return respond
