"""examples/: every entry of examples.json points at a small file that ego.media accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ego.media import load_image, load_video
from space.examples import load_examples

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MAX_FILE_BYTES = 400 * 1024


@pytest.fixture(scope="module")
def listing() -> dict:
    return json.loads((EXAMPLES / "examples.json").read_text(encoding="utf-8"))


def test_listing_has_every_section(listing):
    assert set(listing) == {"concepts", "image_questions", "video_questions", "text_questions", "calibration"}
    assert len(listing["concepts"]) >= 2
    assert listing["image_questions"] and listing["video_questions"] and listing["text_questions"]


def test_concepts_load(listing):
    names = [concept["name"] for concept in listing["concepts"]]
    assert len(names) == len(set(names))
    for concept in listing["concepts"]:
        assert concept["name"].strip() and concept["note"].strip()
        assert 2 <= len(concept["images"]) <= 5
        for rel in concept["images"]:
            image = load_image(EXAMPLES / rel)
            assert image.mode == "RGB" and max(image.size) <= 400


def test_image_questions_load_and_name_known_concepts(listing):
    names = {concept["name"] for concept in listing["concepts"]}
    assert any(len(q["concepts"]) >= 2 for q in listing["image_questions"])  # a multi-concept scene
    for question in listing["image_questions"]:
        assert question["question"].strip().endswith("?")
        assert set(question["concepts"]) <= names
        assert load_image(EXAMPLES / question["image"]).mode == "RGB"


def test_text_questions_name_known_concepts_and_load(listing):
    names = {concept["name"] for concept in listing["concepts"]}
    assert any(len(q["concepts"]) >= 2 for q in listing["text_questions"])  # two concepts, no photo
    for question in listing["text_questions"]:
        assert question["question"].strip().endswith("?") and question["concepts"]
        assert set(question["concepts"]) <= names
        assert all(name in question["question"] for name in question["concepts"])
    assert load_examples(EXAMPLES).text_questions == [q["question"] for q in listing["text_questions"]]


def test_video_questions_load(listing):
    for question in listing["video_questions"]:
        assert question["question"].strip().endswith("?")
        frames, meta = load_video(EXAMPLES / question["video"])
        assert frames.shape[0] == min(8, meta["total_num_frames"]) and frames.shape[3] == 3
        assert 2.0 <= meta["duration"] <= 5.0


def test_every_example_question_gets_the_hint_without_its_concepts(listing):
    """About a photo, a clip or none: each example question, asked before the example concepts are loaded, gets
    the hint to load them (the Space builds its hint from `Examples.questions`)."""
    from space.guidance import example_concepts_hint
    from space.session import Session

    examples = load_examples(EXAMPLES)
    asked = [
        q["question"] for section in ("image_questions", "video_questions", "text_questions") for q in listing[section]
    ]
    assert sorted(examples.questions) == sorted(asked)
    hint = example_concepts_hint([name for name, _ in examples.concepts], examples.questions)
    for question in asked:
        with pytest.warns(UserWarning, match="Load the example concepts"):
            hint(Session(), question)


def test_every_file_is_referenced_and_small(listing):
    referenced = {rel for concept in listing["concepts"] for rel in concept["images"]}
    referenced |= {q["image"] for q in listing["image_questions"]}
    referenced |= {q["video"] for q in listing["video_questions"]}
    referenced |= {rel for pair in listing["calibration"] for rel in pair.values()}
    media = {
        path.relative_to(EXAMPLES).as_posix()
        for path in EXAMPLES.rglob("*")
        if path.suffix.lower() in {".jpg", ".jpeg", ".png", ".mp4", ".webm"}
    }
    assert referenced == media
    for path in EXAMPLES.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            assert path.stat().st_size < MAX_FILE_BYTES, path


def test_calibration_pairs_share_stems_and_masks_are_binary(listing):
    import numpy as np
    from PIL import Image

    assert len(listing["calibration"]) >= 2
    for pair in listing["calibration"]:
        image, mask = EXAMPLES / pair["image"], EXAMPLES / pair["mask"]
        assert image.stem == mask.stem
        values = np.unique(np.asarray(Image.open(mask).convert("L")))
        assert set(values.tolist()) == {0, 255}
        assert Image.open(mask).size == load_image(image).size
