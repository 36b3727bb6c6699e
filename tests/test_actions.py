"""space/actions.py, called directly (no server): results, refusals that change nothing, faults, stopping."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from conftest import tiny_engine
from PIL import Image

from ego import DEFAULT_SETTINGS
from ego.errors import ConversationFullError, InputError
from space.actions import Actions
from space.conversations import messages
from space.examples import EXAMPLES_DIR, Examples, load_examples
from space.guidance import THINKING, mark_stopped_in_chat
from space.loading import LazyEngine
from space.page import EXPORTED
from space.session import Entry, Session
from space.settings import SpaceSettings
from space.views import escape_markdown

SETTINGS = DEFAULT_SETTINGS.replace(answer_max_new_tokens=8)
SPACE = SpaceSettings()
CHELSEA = [str(EXAMPLES_DIR / "concepts" / f"chelsea_{i}.jpg") for i in (1, 2)]
QUERY = str(EXAMPLES_DIR / "scenes" / "chelsea_query.jpg")
CLIP = str(EXAMPLES_DIR / "clip.mp4")
NEW_PHOTO = CHELSEA[1]


def quiet(*args, **kwargs):
    """A stand-in for gr.Progress."""


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("qwen2.5-vl").with_settings(SETTINGS)


@pytest.fixture
def act(engine):
    return Actions(LazyEngine(engine), SPACE, load_examples())


@pytest.fixture(scope="module")
def one_concept(engine):
    """A session holding one concept, shared by tests that must leave it unchanged."""
    session = Session()
    Actions(LazyEngine(engine), SPACE, load_examples()).introduce(
        session, "Chelsea", gallery(CHELSEA[:1]), progress=quiet
    )
    return session


def gallery(paths):
    return [(path, None) for path in paths]


def test_introduce_adds_the_concept_and_shows_each_photo(act):
    session = Session()
    out, report, patches, heats = act.introduce(session, "  Chelsea ", gallery(CHELSEA), progress=quiet)
    assert out is session and session.names == ["Chelsea"]
    concept = session.concepts[0]
    assert len(patches) == len(heats) == 2 == len(concept.views)
    for (path, caption), view in zip(patches, concept.views):
        rows, cols = view.grid
        with Image.open(path) as picture:  # a file in Gradio's cache (space/pictures.py)
            assert picture.size[0] * rows == picture.size[1] * cols  # drawn on the token grid
        assert f"{view.k} of {rows * cols} tokens kept" in caption
    assert "## Chelsea" in report and f"{concept.num_tokens} memory tokens from 2 photos" in report


def test_a_refused_photo_of_several_is_named_and_invisible_keywords_leave_the_description(act, tmp_path):
    """Of several photos, the refused one is named by its position; keywords with nothing visible in them are an
    empty keyword box (the model describes the photo), and keywords sent as a list are phrases, not their Python
    spelling."""
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    session = Session()
    with pytest.raises(gr.Error, match="Photo 2 of 2: This file is not a supported image"):
        act.introduce(session, "Chelsea", gallery([CHELSEA[0], str(notes)]), progress=quiet)
    assert session.names == []
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), "\u200b", progress=quiet)
    assert session.concepts[0].views[0].keywords != ("\u200b",) and session.concepts[0].views[0].keywords
    act.introduce(session, "Bo", gallery(CHELSEA[1:]), ["tabby", " green\u202e eyes"], progress=quiet)
    assert session.concepts[1].views[0].keywords == ("tabby", "green eyes")
    with pytest.raises(gr.Error, match="Keywords are text"):
        act.introduce(session, "Tom", gallery(CHELSEA[1:]), {"a": 1}, progress=quiet)
    assert session.names == ["Chelsea", "Bo"]


def test_user_keywords_and_size_are_used(act):
    session = Session()
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), "tabby, green eyes", False, 10, progress=quiet)
    view = session.concepts[0].views[0]
    assert view.keywords == ("tabby", "green eyes") and view.area_pct == 10.0 and view.area_source == "user"


@pytest.mark.parametrize(
    "name, photos, message",
    [
        ("", CHELSEA, "Give the concept a name"),
        ("x" * 41, CHELSEA, "at most 40 characters"),
        ("Bo", [], "Add at least one reference photo"),
        ("Bo", CHELSEA * 3, "at most 5 reference photos"),
        ("Bo", [str(EXAMPLES_DIR / "examples.json")], "JPEG"),
    ],
)
def test_refused_introductions_change_nothing(act, one_concept, name, photos, message):
    session = one_concept
    before = session.concepts
    with pytest.raises(gr.Error, match=message):
        act.introduce(session, name, gallery(photos), progress=quiet)
    assert session.concepts == before


def test_duplicate_names_are_refused_with_escaped_text(act):
    session = Session()
    name = "<img src=x onerror=alert(1)>"
    act.introduce(session, name, gallery(CHELSEA[:1]), progress=quiet)
    with pytest.raises(gr.Error) as caught:
        act.introduce(session, name.upper(), gallery(CHELSEA[:1]), progress=quiet)
    assert "&lt;img src=x onerror=alert(1)&gt;" in caught.value.message and "<img" not in caught.value.message
    assert "Remove it first" in caught.value.message and len(session) == 1


class BrokenEngine:
    model_id = "broken"
    settings = SETTINGS

    def introduce(self, name, *args, **kwargs):
        message = "internal failure about " + name + " in /tmp/gradio/secret_holiday.jpg"
        raise RuntimeError(message)


def test_server_faults_are_logged_without_visitor_content(caplog):
    act = Actions(LazyEngine(BrokenEngine()), SPACE, load_examples())
    session = Session()
    with caplog.at_level(logging.INFO, logger="ego.space"), pytest.raises(gr.Error, match="Something went wrong"):
        act.introduce(session, "Secret Name", gallery(CHELSEA[:1]), progress=quiet)
    assert "RuntimeError" in caplog.text
    assert "Secret Name" not in caplog.text and "secret_holiday" not in caplog.text
    assert len(session) == 0


def test_ask_image_streams_and_compares(act, engine):
    session = Session()
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), progress=quiet)
    steps = list(act.ask_image(session, QUERY, "Is Chelsea here?", True, progress=quiet))
    _, answer, plain, details, matches = steps[-1]
    assert isinstance(answer, str) and isinstance(plain, str)
    assert details["concepts_used"] == ["Chelsea"] and details["memory_tokens"] == session.concepts[0].num_tokens
    assert steps[0][2] == "(after the personalized answer)"
    # One match picture per concept, drawn on the query's token grid, captioned with its similarity; sent
    # with the first piece of the answer and again with the last, skipped in between.
    ((path, caption),) = matches
    assert caption == f"\u2068Chelsea\u2069 · similarity {details['similarity']['Chelsea']:.2f}"
    rows, cols = engine.answer("?", session.concepts, image=QUERY, max_new_tokens=1).similarity_maps[0][1].shape
    with Image.open(path) as picture:
        assert picture.size[0] * rows == picture.size[1] * cols
    assert steps[0][4] == matches and all(step[4] == gr.skip() for step in steps[1:-1])


def test_stopping_an_answer_frees_the_model(engine):
    act = Actions(LazyEngine(engine.with_settings(answer_max_new_tokens=500)), SPACE, load_examples())
    stream = act.ask_image(Session(), QUERY, "Describe the photo.", progress=quiet)
    next(stream)
    stream.close()  # what Gradio does when the Stop button cancels the event
    done = threading.Event()
    worker = threading.Thread(target=lambda: (engine.answer("Hi?", max_new_tokens=2), done.set()), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert done.is_set(), "the model was still held by the stopped answer"


def test_without_a_photo_the_question_is_about_the_concepts_themselves(act, engine):
    session = Session()
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), progress=quiet)
    *_, (_, answer, _, details, matches) = act.ask_image(
        session, None, "What colour are Chelsea's eyes?", progress=quiet
    )
    assert details["concepts_used"] == ["Chelsea"] and details["similarity"] == {} and matches == []
    # The same prompt as the engine's own text-only answer: the memory is the only visual input.
    expected = engine.answer(
        "What colour are Chelsea's eyes?", session.concepts, max_new_tokens=act.limits.answer_max_new_tokens
    )
    assert answer == str(expected) and details["context_tokens"] == expected.context_tokens


def test_a_visitor_is_told_when_concepts_did_not_fit(engine):
    act = Actions(LazyEngine(engine.with_settings(max_concepts_in_context=1)), SPACE, load_examples())
    session = Session()
    for name in ("Chelsea", "Tabby"):
        act.introduce(session, name, gallery(CHELSEA[:1]), progress=quiet)
    with pytest.warns(UserWarning, match="1 of your 2 concepts were left out of this answer: at most 1 fit"):
        *_, (_, _, _, details, _) = act.ask_image(session, QUERY, "Is Tabby here?", progress=quiet)
    assert details["concepts_used"] == ["Tabby"] and details["concepts_dropped"] == ["Chelsea"]
    with pytest.warns(UserWarning, match="then the ones most like the photo or clip"):
        list(act.ask_video(session, CLIP, "Who is here?", progress=quiet))
    with pytest.warns(UserWarning, match="then your first ones; name a concept to keep it"):
        list(act.ask_image(session, None, "What colour is the fur?", progress=quiet))


def test_ask_refusals(act):
    with pytest.raises(gr.Error, match="Add a photo to ask about, or introduce a concept"):
        list(act.ask_image(Session(), None, "Hi?", progress=quiet))
    with pytest.raises(gr.Error, match="Type a question"):
        list(act.ask_image(Session(), QUERY, "  ", progress=quiet))
    with pytest.raises(gr.Error, match="at most 1000 characters"):
        list(act.ask_video(Session(), CLIP, "?" * 1001, progress=quiet))
    with pytest.raises(gr.Error, match="Add a video"):
        list(act.ask_video(Session(), None, "Hi?", progress=quiet))


def test_ask_video_shows_the_sampled_frames_first(act):
    steps = act.ask_video(Session(), CLIP, "What happens?", progress=quiet)
    _, frames, answer, details = next(steps)
    assert len(frames) == SETTINGS.video_num_frames and answer == "" and details == {}
    *_, (_, frames, answer, details) = steps
    assert len(frames) == SETTINGS.video_num_frames and details["concepts_used"] == []


def test_export_import_round_trip_and_refusals(act, tmp_path):
    session = Session()
    with pytest.raises(gr.Error, match="no concepts to export"):
        act.export_concepts(session)
    act.introduce(session, "Chelsea", gallery(CHELSEA), progress=quiet)
    _, exported = act.export_concepts(session)
    path = exported
    with pytest.raises(gr.Error) as refused:
        act.import_concepts(session, path, progress=quiet)
    assert "already have a concept named '\u2068Chelsea\u2069'" in refused.value.message  # (str() escapes it)
    assert len(session) == 1

    other = Session()
    _, records = act.import_concepts(other, path, progress=quiet)
    assert records == act.records(session)
    # The card keeps the photo's thumbnail (the file carries it), not the drawing of the kept tokens.
    assert other.entries[0].thumbnail.tobytes() == session.entries[0].thumbnail.tobytes()

    garbage = tmp_path / "fake.safetensors"
    garbage.write_bytes(b"<script>alert(1)</script>" * 10)
    with pytest.raises(gr.Error, match="not an Ego concept file"):
        act.import_concepts(other, str(garbage), progress=quiet)
    assert len(other) == 1


def test_import_adds_the_new_names_and_names_the_ones_it_skipped(act, engine, tmp_path):
    from ego import save_concepts

    made = [engine.introduce(name, [CHELSEA[0]], area_pct=10) for name in ("Chelsea", "Bo", "Tom")]
    path = save_concepts(tmp_path / "three.safetensors", made)
    session = Session()
    act.introduce(session, "chelsea", gallery(CHELSEA[:1]), progress=quiet)
    kept = session.concepts[0]
    with pytest.warns(UserWarning, match="Added 2 concepts; skipped “\u2068Chelsea\u2069”"):
        act.import_concepts(session, str(path), progress=quiet)
    assert session.names == ["chelsea", "Bo", "Tom"] and session.concepts[0] is kept
    with pytest.raises(gr.Error) as refused:
        act.import_concepts(session, str(path), progress=quiet)
    assert "named '\u2068Chelsea\u2069', '\u2068Bo\u2069', '\u2068Tom\u2069'" in refused.value.message
    assert session.names == ["chelsea", "Bo", "Tom"]
    # A file with two concepts of one name (names ignore case): the first is imported, the second named as skipped.
    twice = save_concepts(tmp_path / "twice.safetensors", [made[1], dataclasses.replace(made[2], name="BO")])
    fresh = Session()
    with pytest.warns(UserWarning, match="Skipped “\u2068BO\u2069”: this file holds an earlier concept with that name"):
        act.import_concepts(fresh, twice, progress=quiet)  # a Path, as a Python caller may pass it
    assert fresh.names == ["Bo"] and "named like an earlier one" in fresh.take_note()


def test_a_name_being_introduced_elsewhere_in_the_session_is_not_made_twice(act, engine, monkeypatch, tmp_path):
    """Two tabs of a browser (or a script's requests) share a session and may add concepts at once: a second
    introduction of a name being introduced is refused before the model's work; the example concepts leave it to
    that introduction; an import adds the file's other concepts and skips it (it was refused whole)."""
    from ego import save_concepts

    session = Session()
    with session.reserving(["Chelsea"], SPACE.max_concepts_per_session):  # another tab's introduction of it
        with monkeypatch.context() as patched:
            patched.setattr(act, "_introduce_on_gpu", lambda *args: pytest.fail("the model was asked"))
            with pytest.raises(gr.Error) as refused:
                act.introduce(session, "chelsea", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet)
            assert "'\u2068chelsea\u2069' is being introduced in your session already" in refused.value.message
        made = [engine.introduce(name, [CHELSEA[0]], keywords="cat", area_pct=10) for name in ("Chelsea", "Bo")]
        two = str(save_concepts(tmp_path / "two.safetensors", made))
        with pytest.warns(UserWarning, match="Skipped “\u2068Chelsea\u2069”: being introduced in your session now"):
            act.import_concepts(session, two, progress=quiet)
        assert session.names == ["Bo"] and "Skipped 1 being introduced." in session.take_note()
        with pytest.raises(gr.Error) as refused:  # the rest of the file is already in
            act.import_concepts(session, two, progress=quiet)
        assert "'\u2068Chelsea\u2069' is being introduced in your session now" in refused.value.message
        act.load_example_concepts(session, progress=quiet)
        examples = [name for name, _ in act.examples.concepts]
        assert "Chelsea" in examples and session.names == ["Bo", *(n for n in examples if n != "Chelsea")]
        _, said, *_ = act.load_example_concepts(session, progress=quiet)
        assert said.startswith("The example concepts are being introduced in your session already")
    assert session.coming == 0
    _, said, *_ = act.load_example_concepts(session, progress=quiet)  # the introduction failed: it is missing
    assert session.names[-1] == "Chelsea" and "## Chelsea" in said


def test_an_introduction_waiting_for_another_ones_model_call_says_so(act, monkeypatch):
    """Introductions make their model calls one at a time: one that waits says what it waits for, then what it
    does."""
    from space.actions import WAITING_FOR_AN_INTRODUCTION

    said, done = [], []

    def progress(value=None, desc=None, **_):
        said.append(desc)

    act._introducing.acquire()  # another introduction's model call
    try:
        introducing = threading.Thread(
            target=lambda: done.append(
                act.introduce(Session(), "Chelsea", gallery(CHELSEA[:1]), "tabby", False, 10, progress=progress)
            )
        )
        introducing.start()
        deadline = time.monotonic() + 30
        while WAITING_FOR_AN_INTRODUCTION not in said and time.monotonic() < deadline:
            time.sleep(0.02)
        assert said[-1] == WAITING_FOR_AN_INTRODUCTION and not done
    finally:
        act._introducing.release()
    introducing.join(60)
    assert done and said[-1].startswith("Choosing the memory tokens of 1 photo")
    # On ZeroGPU each model call has a GPU worker of its own: an introduction waits for no other.
    with act._introducing, monkeypatch.context() as patched:
        patched.setattr(act, "zero_gpu", True)
        patched.setattr(act, "_introduce_on_gpu", lambda *args: "made")
        assert act._introduce_in_turn("Chelsea", [], None, None, progress) == "made"


def test_an_import_counts_the_places_of_concepts_being_introduced_and_chooses_under_the_sessions_lock(engine, tmp_path):
    """A concept being introduced takes a place: an import brings the file's first concepts that fit beside it (not
    none, refused whole). And an import chooses what to add with the session held still: a concept added while it
    waits for the session is skipped, not the reason the whole file is refused."""
    from ego import save_concepts

    act = Actions(LazyEngine(engine), SpaceSettings(max_concepts_per_session=3), load_examples())
    made = [engine.introduce(name, [CHELSEA[0]], keywords="cat", area_pct=10) for name in ("Bo", "Tom")]
    path = str(save_concepts(tmp_path / "two.safetensors", made))
    session = Session()
    act.introduce(session, "Rex", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet)
    with session.reserving(["Chelsea"], 3):
        with pytest.warns(UserWarning, match="Imported the file's first 1 new concepts: a session holds at most 3"):
            act.import_concepts(session, path, progress=quiet)
        assert session.names == ["Rex", "Bo"]
        with pytest.raises(gr.Error) as refused:
            act.import_concepts(session, str(save_concepts(tmp_path / "tom.safetensors", made[1:])), progress=quiet)
        assert "you have 2 (1 more being introduced)" in refused.value.message
    fresh, imported = Session(), []
    with fresh.changing():
        importing = threading.Thread(target=lambda: imported.append(act.import_concepts(fresh, path, progress=quiet)))
        importing.start()
        importing.join(2)  # it waits for the session
        fresh.add([Entry(made[0], Image.new("RGB", (8, 8)))], 3)  # "Bo", added by another request meanwhile
    importing.join(60)
    assert imported and fresh.names == ["Bo", "Tom"]


def test_a_file_with_more_concepts_than_fit_brings_the_first_ones_and_the_rest_later(engine, tmp_path):
    """A file may hold more concepts than a session: the first ones that fit come in, the visitor is told which
    did not, and importing the file again once there is room brings them (the ones already in are skipped)."""
    from ego import save_concepts

    act = Actions(LazyEngine(engine), SpaceSettings(max_concepts_per_session=3), load_examples())
    made = [engine.introduce(name, [CHELSEA[0]], area_pct=10) for name in ("Chelsea", "Bo", "Tom", "Mia")]
    path = str(save_concepts(tmp_path / "four.safetensors", made))
    session = Session()
    act.introduce(session, "Rex", gallery(CHELSEA[:1]), progress=quiet)
    with pytest.warns(
        UserWarning,
        match="first 2 new concepts: a session holds at most 3. Left out “\u2068Tom\u2069”, “\u2068Mia\u2069”",
    ):
        act.import_concepts(session, path, progress=quiet)
    assert session.names == ["Rex", "Chelsea", "Bo"] and "Left out 2: no room." in session.take_note()
    with pytest.raises(gr.Error, match="at most 3 concepts and you have 3: remove some first"):
        act.import_concepts(session, path, progress=quiet)
    assert session.names == ["Rex", "Chelsea", "Bo"]
    act.remove_concept(session, "Rex")
    with pytest.warns(UserWarning) as told:
        act.import_concepts(session, path, progress=quiet)
    assert session.names == ["Chelsea", "Bo", "Tom"]
    assert any("Left out “\u2068Mia\u2069”" in str(w.message) for w in told)
    assert any("skipped “\u2068Chelsea\u2069”, “\u2068Bo\u2069”" in str(w.message) for w in told)


def test_the_bundled_examples_are_complete():
    examples = load_examples()
    assert examples.concepts and examples.image_questions and examples.video_questions


def test_load_example_concepts_once(engine):
    examples = Examples(concepts=[("Chelsea", CHELSEA[:1]), ("Bo", CHELSEA[1:])])
    act = Actions(LazyEngine(engine), SPACE, examples)
    session = Session()
    _, report, patches, _ = act.load_example_concepts(session, progress=quiet)
    names = ["Chelsea", "Bo"]
    assert session.names == names
    assert len(patches) == sum(len(c.views) for c in session.concepts)
    _, report, patches, _ = act.load_example_concepts(session, progress=quiet)
    assert "already include" in report and patches == [] and session.names == names


def test_panel_lists_the_concepts(act):
    session = Session()
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), progress=quiet)
    cards, dropdown, summary, records, _ = act.panel(session)
    assert [caption for _, caption in cards] == [f"\u2068Chelsea\u2069 · {session.concepts[0].num_tokens} tokens"]
    assert dropdown.choices == [("Chelsea", "Chelsea")] and "1 of 50 concepts" in summary
    assert records[0]["name"] == "Chelsea"
    act.remove_concept(session, "Chelsea")
    assert act.panel(session)[3] == []


def test_every_panel_action_says_what_it_did_or_why_not_in_the_status_line(act, tmp_path):
    """What a panel action did is kept on the session for the status line, shown once; a refusal raised as an
    error (through the queue, which the browser shows) is not kept, or it would outlive its action."""
    session = Session()
    refusals = [
        (lambda: act.remove_concept(session, None), "Pick the concept to remove from the list first."),
        (lambda: act.remove_concept(session, "Nobody"), "There is no concept with that name; pick one from the list."),
        (lambda: act.remove_concept(session, "Bad \ud800"), "The name contains characters that are not valid Unicode"),
        (lambda: act.export_concepts(session), "There are no concepts to export yet"),
        (lambda: act.import_concepts(session, None, progress=quiet), "Choose a concept file"),
    ]
    for action, sentence in refusals:
        with pytest.raises(gr.Error, match=sentence[:30]):
            action()
        assert act.panel(session)[4] == "", "a refusal shown as an error was also kept for the status line"
    act.clear_concepts(session)
    assert act.status(session) == "There are no concepts to clear\\."
    assert act.status(session) == "", "a status line outlived the action it was about"
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), progress=quiet)
    _, exported = act.export_concepts(session)
    file_box, status, _ = act.after_export(session, exported)
    assert file_box.visible is True and status.startswith("Exported 1 concepts")
    act.clear_concepts(session)
    assert act.status(session) == "Removed all 1 of your concepts\\."
    act.import_concepts(session, exported, progress=quiet)
    assert act.panel(session)[4] == "Imported 1 concept\\."
    act.remove_concept(session, "Chelsea")
    assert act.status(session) == "Removed the concept\\."


class FromThePage:
    """What Gradio hands a handler for an event the browser posted outside the queue (`/run/`)."""

    class request:
        class url:
            path = "/gradio_api/run/remove_concept"


def test_a_refusal_outside_the_queue_is_told_in_the_status_line_not_raised(act):
    """The browser shows no error of an event that skips the queue, and runs nothing chained after one that
    failed: there the refusal is a sentence in the status line, the outputs are the unchanged concepts."""
    session = Session()
    assert act.remove_concept(session, None, FromThePage())[1] == []
    assert act.status(session) == escape_markdown("Pick the concept to remove from the list first.")
    _, exported = act.export_concepts(session, FromThePage())
    file_box, status, _ = act.after_export(session, exported)
    assert exported is None and file_box.visible is False and file_box.value is None
    assert status.startswith("There are no concepts to export yet")


def test_a_model_that_cannot_load_is_a_sentence_and_is_retried(caplog):
    attempts = []

    def factory(settings):
        attempts.append(1)
        raise OSError("no weights here")

    act = Actions(LazyEngine(factory), SPACE, load_examples())
    for _ in range(2):
        with pytest.raises(gr.Error, match="model could not be loaded"):
            list(act.ask_image(Session(), QUERY, "Hi?", progress=quiet))
    assert len(attempts) == 2 and "OSError" in caplog.text


def test_a_model_neither_cached_nor_downloadable_says_what_to_do_in_the_log(caplog, monkeypatch):
    """A Hub id this machine has not cached, with no way to download it (offline here): one line in the log that
    says what to do, no traceback; the visitor gets a sentence."""
    import functools

    import huggingface_hub.constants

    from ego import Ego

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    factory = functools.partial(Ego.from_pretrained, "ego-tests/not-a-cached-model", quantization=None)
    act = Actions(LazyEngine(factory, name="ego-tests/not-a-cached-model"), SPACE, load_examples())
    with caplog.at_level(logging.ERROR, logger="ego.space"), pytest.raises(gr.Error, match="could not be downloaded"):
        list(act.ask_image(Session(), QUERY, "Hi?", progress=quiet))
    (record,) = [r for r in caplog.records if r.name == "ego.space"]
    assert "ego-tests/not-a-cached-model" in record.getMessage() and "--model" in record.getMessage()
    assert "Traceback" not in caplog.text


def test_a_conversation_in_the_image_tab_follows_up_on_the_same_photo(act, engine):
    session = Session()
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), progress=quiet)
    with pytest.raises(gr.Error, match="no conversation to follow up yet"):
        list(act.follow_up(session, "And now?", progress=quiet))
    steps = list(act.chat_image(session, QUERY, "Is Chelsea here?", progress=quiet))
    _, view, box, _, details, matches = steps[-1]
    first = view[-1]["content"]
    # The box empties with the first step and is left alone after it: a question typed meanwhile stays.
    assert steps[0][2] == "" and all(step[2] == gr.skip() for step in steps[1:])
    assert view[0] == {"role": "user", "content": "Is Chelsea here?"}
    assert details["concepts_used"] == ["Chelsea"] and len(matches) == 1
    # A follow-up streams into the same view; the details and matches of the first answer stay.
    steps = list(act.chat_image(session, QUERY, "What is she holding?", progress=quiet))
    _, view, box, *rest = steps[-1]
    assert [m["content"] for m in view[::2]] == ["Is Chelsea here?", "What is she holding?"]
    assert view[1]["content"] == first and rest == [gr.skip()] * 3
    reference = engine.chat(session.concepts, image=QUERY)
    reference.ask("Is Chelsea here?", max_new_tokens=SETTINGS.answer_max_new_tokens)
    expected = reference.ask("What is she holding?", max_new_tokens=SETTINGS.answer_max_new_tokens, use_cache=False)
    assert view[3]["content"] == str(expected)
    # The HTTP API's follow-up continues the same conversation; "New conversation" ends it.
    *_, (_, answer) = act.follow_up(session, "And the wall?", progress=quiet)
    assert answer == str(reference.ask("And the wall?", max_new_tokens=SETTINGS.answer_max_new_tokens))
    # A reload shows the conversation a follow-up would continue, in its tab only.
    shown_image, shown_video = act.shown_conversations(session)
    assert [m["content"] for m in shown_image[::2]] == ["Is Chelsea here?", "What is she holding?", "And the wall?"]
    assert shown_image[5]["content"] == answer and shown_video == []
    assert act.new_conversation(session, "image") == (session, [], "", {}, [])
    assert act.shown_conversations(session) == ([], [])
    with pytest.raises(gr.Error, match="no conversation to follow up yet"):
        list(act.follow_up(session, "And now?", progress=quiet))
    _, view, *_ = list(act.chat_image(session, QUERY, "Is Chelsea here?", progress=quiet))[-1]
    assert len(view) == 2 and view[1]["content"] == first


@pytest.mark.parametrize("tab", ["image", "video"])
def test_a_first_follow_up_computes_only_its_own_tokens_on_the_context_its_first_answer_handed_over(act, engine, tab):
    """The first answer comes from the scheduler's batch, which hands its row's context to the conversation: the
    first follow-up (like every later one) computes only its own tokens, and says what the conversation alone says."""
    session = Session()
    chat_in = act.chat_image if tab == "image" else act.chat_video
    medium = QUERY if tab == "image" else CLIP
    list(chat_in(session, medium, "What is here?", progress=quiet))
    chat = session.conversations.get(tab)
    assert chat.cache_bytes > 0 and not chat._adopted
    list(chat_in(session, medium, "And the wall?", progress=quiet))
    (_, first), (_, follow_up) = chat.turns
    turn = engine.backend.tokenizer(engine.backend.continue_turn("And the wall?"), add_special_tokens=False)
    assert follow_up.prefill_tokens <= len(turn.input_ids) + 1 < follow_up.context_tokens / 2  # (+1: the answer's last)
    reference = engine.chat(chat.concepts, image=chat.picture, video=chat.clip)
    budget = SETTINGS.answer_max_new_tokens
    assert [str(reference.ask(q, max_new_tokens=budget)) for q in ("What is here?", "And the wall?")] == [
        str(first),
        str(follow_up),
    ]


def test_a_reload_puts_back_what_each_conversation_is_about_and_that_is_no_new_photo(act, engine):
    """After a reload the photo box holds the conversation's photo again (a follow-up is about it) and the video tab
    shows the clip's sampled frames; the box's change to that photo does not end the conversation, another does."""
    session = Session()
    list(act.chat_image(session, QUERY, "Is there a cat?", progress=quiet))
    list(act.chat_video(session, CLIP, "What happens?", progress=quiet))
    image_view, photo, video_view, frames = act.restored_conversations(session)
    assert (image_view, video_view) == act.shown_conversations(session) and image_view and video_view
    chat = session.conversations.get("image")
    assert Image.open(photo).size == chat.picture.size
    assert len(frames) == SETTINGS.video_num_frames and all(Path(path).is_file() for path, _ in frames)
    copy = Path(photo).with_name("copy.webp")  # the box's value: Gradio's copy of the file, the same bytes
    copy.write_bytes(Path(photo).read_bytes())
    assert act.photo_changed(session, str(copy)) == (gr.skip(),) * 5
    assert session.conversations.get("image") is chat
    _, view, *_ = list(act.chat_image(session, str(copy), "And the wall?", progress=quiet))[-1]
    assert [m["content"] for m in view[::2]] == ["Is there a cat?", "And the wall?"]  # a follow-up
    assert act.photo_changed(session, NEW_PHOTO) == (session, [], "", {}, [])  # another photo: a new conversation
    assert session.conversations.get("image") is None
    assert act.restored_conversations(session)[:2] == ([], gr.skip())  # nothing to put back: the box is left alone
    assert act.photo_changed(session, str(copy)) == (session, [], "", {}, [])  # the mark went with its conversation


def test_a_message_beside_another_photo_is_about_that_photo_not_another_browser_tabs_conversation(act, tmp_path):
    """Two browser tabs of one visitor share the session's conversation: a message sent in one about the photo in
    its own box starts a conversation about that photo rather than following up the other tab's (a copy of the
    conversation's photo, in a box emptied or not, still follows it up)."""
    session = Session()
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), progress=quiet)
    act.photo_changed(session, NEW_PHOTO)  # browser tab B puts another photo in its box
    list(act.chat_image(session, QUERY, "Is Chelsea here?", progress=quiet))  # browser tab A asks about its own
    chelsea = session.conversations.get("image")
    _, view, *_ = list(act.chat_image(session, NEW_PHOTO, "Who is this?", progress=quiet))[-1]  # tab B
    about_b = session.conversations.get("image")
    assert about_b is not chelsea and [q for q, _ in about_b.turns] == ["Who is this?"]
    assert about_b.picture.size == Image.open(NEW_PHOTO).size and [m["content"] for m in view[::2]] == ["Who is this?"]
    copy = tmp_path / "same.jpg"  # Gradio's copy of the photo: the same bytes
    copy.write_bytes(Path(NEW_PHOTO).read_bytes())
    for box in (str(copy), None):
        list(act.chat_image(session, box, "And now?", progress=quiet))
    assert session.conversations.get("image") is about_b and len(about_b.turns) == 3
    list(act.chat_video(session, CLIP, "What happens?", progress=quiet))
    clip_chat = session.conversations.get("video")
    list(act.chat_video(session, CLIP, "And then?", progress=quiet))
    assert session.conversations.get("video") is clip_chat and len(clip_chat.turns) == 2


def test_a_concept_added_during_a_conversation_is_said_to_be_unknown_to_it(act):
    """A conversation keeps the memories it started with: a concept introduced or imported meanwhile is not in its
    follow-ups, and the visitor is told how to ask about it."""
    session = Session()
    _, report, *_ = act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), progress=quiet)
    assert "conversation" not in report
    list(act.chat_image(session, QUERY, "Is Chelsea here?", progress=quiet))
    _, report, *_ = act.introduce(session, "Bo", gallery(CHELSEA[1:]), progress=quiet)
    assert "conversation going on in the image tab started before and does not know it" in report
    assert [c.name for c in session.conversations.get("image").concepts] == ["Chelsea"]
    _, exported = act.export_concepts(session)
    other = Session()
    list(act.chat_image(other, QUERY, "Is there a cat?", progress=quiet))
    list(act.chat_video(other, CLIP, "What happens?", progress=quiet))
    act.import_concepts(other, exported, progress=quiet)
    assert "conversations going on in the image and video tabs started before and do not know them" in other.take_note()


def test_the_summary_says_when_every_concept_is_in_the_last_export(act):
    """The page asks before it is left unless the summary says so (also after a reload, which rebuilds it)."""
    session = Session()
    act.introduce(
        session, "Chelsea", gallery(CHELSEA[:1]), keywords="cat", auto_size=False, size_pct=10, progress=quiet
    )
    assert not session.exported and EXPORTED not in act.summary(session)
    _, path = act.export_concepts(session)
    assert path and session.exported and EXPORTED in act.summary(session)
    assert EXPORTED in act.after_export(session, path)[2]
    act.introduce(session, "Mug", gallery(CHELSEA[1:2]), keywords="mug", auto_size=False, size_pct=10, progress=quiet)
    assert not session.exported and EXPORTED not in act.panel(session)[2]  # a change since: not all in the file
    act.remove_concept(session, "Mug")
    assert not session.exported  # the same concepts as exported, but counted as a change: the page asks
    act.export_concepts(session)
    act.clear_concepts(session)
    assert not session.exported  # no concepts: nothing to keep


def test_stop_marks_an_answer_cut_short_and_leaves_one_that_had_ended(act):
    """Stop cancels the chat tab's handler, then marks its last answer: only one that was still coming."""
    session = Session()
    *_, (_, ended, *_) = act.chat_image(session, QUERY, "Is there a cat?", progress=quiet)
    assert mark_stopped_in_chat(session, ended, tab="image") == gr.skip()  # its own last view stands
    assert not ended[-1]["content"].endswith("(stopped)")
    steps = act.chat_image(session, QUERY, "And the wall?", progress=quiet)
    _, cut, *_ = next(steps)
    steps.close()  # what Gradio does to the handler when Stop cancels it
    assert mark_stopped_in_chat(session, cut, tab="image")[-1]["content"].endswith("(stopped)")
    assert mark_stopped_in_chat(session, ended, tab="video") == gr.skip()  # the other tab had nothing coming
    refused = act.chat_image(session, QUERY, "   ", progress=quiet)
    _, restored, *_ = next(refused)
    with pytest.raises(gr.Error):
        next(refused)
    assert mark_stopped_in_chat(session, restored, tab="image") == gr.skip()  # a refusal left nothing coming


def test_an_answer_cut_short_stays_marked_whenever_its_conversation_is_shown(act):
    """Stop leaves the answer as far as it was shown: the conversation's turn is that text, marked as stopped in
    every later view (a reload, a follow-up), not just until the next one."""
    session = Session()
    steps = act.chat_image(session, QUERY, "Describe this photo in great detail.", progress=quiet)
    shown = next(view[-1]["content"] for _, view, *_ in steps if view[-1]["content"] not in ("", THINKING))
    steps.close()  # Stop
    (turn,) = session.conversations.get("image").turns
    assert turn[1].stopped and str(turn[1]).strip() == shown.strip()
    marked = {"role": "assistant", "content": f"{shown.strip()} (stopped)"}
    assert act.shown_conversations(session)[0][1] == marked
    _, view, *_ = list(act.chat_image(session, QUERY, "And the wall?", progress=quiet))[-1]
    assert view[1] == marked and not view[3]["content"].endswith("(stopped)")


def test_a_follow_up_cut_short_shows_before_the_worker_records_it(act, engine, monkeypatch):
    """The worker records a stopped follow-up's turn only when its whole batch ends (other visitors' answers may
    go on): the visitor's next question, asked meanwhile, shows the conversation with that turn, marked stopped,
    from "Thinking…" on; once recorded, the conversation's own turn takes its place."""
    session = Session()
    list(act.chat_image(session, QUERY, "Is there a cat?", progress=quiet))
    held, real = threading.Event(), engine.follow_up_batch

    def slow_batch(requests, stops, on_text):  # a batch still going after its visitor's Stop
        def handed(index, answer):
            on_text(index, answer)
            held.wait(30)

        return real(requests, stops=stops, on_text=handed)

    monkeypatch.setattr(engine, "follow_up_batch", slow_batch)
    steps = act.chat_image(session, QUERY, "Describe the wall in great detail.", progress=quiet)
    shown = next(view[-1]["content"] for _, view, *_ in steps if view[-1]["content"] not in ("", THINKING))
    steps.close()  # Stop
    chat = session.conversations.get("image")
    assert len(chat.turns) == 1  # not recorded yet
    cut = {"role": "assistant", "content": f"{shown.strip()} (stopped)"}
    following = act.chat_image(session, QUERY, "And the floor?", progress=quiet)
    _, thinking, *_ = next(following)
    assert [m["content"] for m in thinking[::2]] == [
        "Is there a cat?",
        "Describe the wall in great detail.",
        "And the floor?",
    ]
    assert thinking[3] == cut and thinking[5]["content"] == THINKING
    assert act.shown_conversations(session)[0] == thinking[:4]  # a reload meanwhile shows it too
    held.set()
    *_, (_, final, *_) = following
    assert len(chat.turns) == 3 and chat.turns[1][1].stopped
    assert final[:4] == messages(chat.turns[:2]) and final[3]["content"].endswith("(stopped)")
    assert str(chat.turns[1][1]).startswith(shown.strip())  # what was shown, or a piece more that was handed on


@pytest.mark.parametrize("follow_up", [False, True])
def test_stop_ends_the_answer_from_within_and_it_keeps_what_came(engine, follow_up):
    """The Stop button does not close the handler (cancelling a running event races with Gradio's own end of it,
    and the page may show "Error" over the tab): `stop_answer` asks the answer to end, the handler returns its
    last view itself, marked "(stopped)", and the conversation keeps the answer as far as it came."""
    act = Actions(LazyEngine(engine.with_settings(answer_max_new_tokens=64)), SPACE, load_examples())
    session = Session()
    if follow_up:
        list(act.chat_image(session, QUERY, "Is there a cat?", progress=quiet))
    steps = act.chat_image(session, QUERY, "Describe this photo in great detail.", progress=quiet)
    views = []
    stopping = None
    for _, view, *_ in steps:  # to its natural end: the handler ends by itself
        views.append(view)
        if stopping is None and view[-1]["content"] not in ("", THINKING):
            stopping = threading.Thread(target=act.stop_answer, args=(session,), kwargs={"tab": "image"})
            stopping.start()
    stopping.join(10)
    chat = session.conversations.get("image")
    *_, (asked, answered) = chat.turns
    assert asked == "Describe this photo in great detail." and answered.stopped
    assert views[-1][-1]["content"] == f"{str(answered).strip()} (stopped)"
    assert len(answered.token_ids) < 64  # ended early, not at its budget
    assert views[-1] == act.shown_conversations(session)[0]
    # Stopped while "Thinking…" (no word yet): "(stopped)", and nothing kept as a turn.
    before = list(chat.turns)
    session.conversations.answer_in_flight("image").stop.set()  # an earlier answer's Stop must not end the next
    steps = act.chat_image(session, QUERY, "And the wall?", progress=quiet)
    _, thinking, *_ = next(steps)
    assert thinking[-1]["content"] == THINKING
    session.conversations.stop("image", wait_s=0)  # (the Stop handler's own thread would wait for the end)
    *_, (_, final, *_) = steps
    assert final[-1]["content"] == "(stopped)" and chat.turns == before


def test_a_stop_during_the_answer_without_memory_leaves_the_finished_answer_whole(engine):
    """With "compare", Stop may come while the plain model's answer streams: the personalized answer had ended, so
    neither the view nor the conversation marks it "(stopped)"."""
    act = Actions(LazyEngine(engine.with_settings(answer_max_new_tokens=64)), SPACE, load_examples())
    session = Session()
    stopping, views = None, []
    for _, view, _, plain, *_ in act.chat_image(session, QUERY, "Describe this photo.", compare=True, progress=quiet):
        views.append(view)
        if stopping is None and isinstance(plain, str) and plain and not plain.startswith("(after"):
            stopping = threading.Thread(target=act.stop_answer, args=(session,), kwargs={"tab": "image"})
            stopping.start()
    stopping.join(10)
    ((_, answered),) = session.conversations.get("image").turns
    assert not answered.stopped and views[-1][-1]["content"] == str(answered)


def test_only_a_new_photo_stops_the_answer_not_the_conversations_own_put_back(act):
    """Opening the page in a second browser tab puts the conversation's photo back in its box, which fires the
    box's change: that must not stop the answer streaming in the first tab; a new photo does."""
    from space.actions import _digest

    session = Session()
    in_flight = session.conversations.answer_in_flight("image")
    in_flight.ended.set()  # (its handler would return at once)
    session.conversations.restored("image", _digest(QUERY))
    act.photo_changing(session, QUERY)
    assert not in_flight.stop.is_set()
    act.photo_changing(session, NEW_PHOTO)
    assert in_flight.stop.is_set()


def test_follow_ups_stopped_one_after_another_keep_their_words_while_their_batches_go_on(engine, monkeypatch):
    """Each follow-up is stopped while its batch goes on (other visitors' answers), the second asked before the
    worker recorded the first: each keeps the words its visitor saw, in the view and, once recorded, in the
    conversation; a reload meanwhile shows both."""
    act = Actions(LazyEngine(engine.with_settings(answer_max_new_tokens=64)), SPACE, load_examples())
    session = Session()
    list(act.chat_image(session, QUERY, "Is there a cat?", progress=quiet))
    chats, real, gates = session.conversations, engine.follow_up_batch, []

    def held(requests, stops, on_text):  # the batch goes on after its first words until the test lets it
        gate = threading.Event()
        gates.append(gate)

        def handed(index, answer):
            on_text(index, answer)
            if str(answer):
                gate.wait(30)

        return real(requests, stops=stops, on_text=handed)

    monkeypatch.setattr(engine, "follow_up_batch", held)

    def stopped_after_first_words(question):
        steps = act.chat_image(session, QUERY, question, progress=quiet)
        for _, view, *_ in steps:
            if view[-1]["content"] not in ("", THINKING):
                break
        chats.stop("image", wait_s=0)
        return [view for _, view, *_ in steps][-1]

    wall = stopped_after_first_words("Describe the wall.")
    floor = stopped_after_first_words("Describe the floor.")  # the wall's turn is not recorded yet
    assert [m["content"] for m in floor[2::2]] == ["Describe the wall.", "Describe the floor."]
    assert floor[3] == wall[3] and floor[3]["content"].endswith(" (stopped)") and floor[5]["content"] != "(stopped)"
    assert act.shown_conversations(session)[0] == floor
    for gate in gates:
        gate.set()
    deadline = time.monotonic() + 30
    chat = chats.get("image")
    while len(chat.turns) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [q for q, _ in chat.turns][1:] == ["Describe the wall.", "Describe the floor."]
    assert all(a.stopped for _, a in chat.turns[1:]) and act.shown_conversations(session)[0] == messages(chat.turns)


@pytest.mark.parametrize("moved_on", ["new photo", "another first question"])
def test_an_answer_in_flight_does_not_bring_back_the_conversation_the_visitor_left(act, moved_on):
    """The browser does not wait for a cancelled answer to close before "New conversation" (or a new photo) ends
    the tab's conversation: the closing answer must not start it again, or the next question about the new photo
    would follow up on the old one. Of two first questions in one tab, the one asked last keeps the tab."""
    session = Session()
    first = act.chat_image(session, QUERY, "Describe this photo.", progress=quiet)
    next(first)  # streaming
    if moved_on == "new photo":
        act.new_conversation(session, "image")
        first.close()
        assert session.conversations.get("image") is None
        _, view, *_ = list(act.chat_image(session, NEW_PHOTO, "What is in this photo?", progress=quiet))[-1]
        assert [m["content"] for m in view[::2]] == ["What is in this photo?"]  # a first question, not a follow-up
        assert session.conversations.get("image").picture.size == Image.open(NEW_PHOTO).size
    else:
        *_, (_, later, *_) = act.ask_image(session, NEW_PHOTO, "What is in this photo?", progress=quiet)
        first.close()
        kept = session.conversations.get("image")
        assert kept.turns == [("What is in this photo?", kept.turns[0][1])] and str(kept.turns[0][1]) == later


def test_removing_a_concept_ends_the_conversations_that_know_it(act, engine):
    """A removed concept is not used again, nor kept alive by a conversation outside the concept budget."""
    session = Session()
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), progress=quiet)
    list(act.ask_image(session, QUERY, "Is Chelsea here?", progress=quiet))
    list(act.ask_video(session, CLIP, "Is Chelsea here?", progress=quiet))
    assert act.shown_conversations(session) != ([], [])
    chelsea = session.concepts[0]
    act.remove_concept(session, "Chelsea")
    assert "conversations that knew it ended" in session.take_note()
    assert act.shown_conversations(session) == ([], [])
    with pytest.raises(gr.Error, match="no conversation to follow up yet"):
        list(act.follow_up(session, "And now?", progress=quiet))
    # A first question answered while the concept is removed does not keep it either.
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), progress=quiet)
    asking = act.ask_image(session, QUERY, "Is Chelsea here?", progress=quiet)
    next(asking)
    act.clear_concepts(session)
    list(asking)
    assert session.conversations.get("image") is None and session.conversations.get("video") is None
    assert chelsea not in session.concepts


def test_a_refused_follow_up_keeps_the_question_and_the_conversation(act):
    session = Session()
    *_, (_, frames, answer, _) = act.ask_video(session, CLIP, "What happens?", progress=quiet)
    refused = act.chat_video(session, CLIP, "   ", progress=quiet)
    _, frames, view, box, details = next(refused)  # the conversation's own view again, the message back in its box
    assert [m["content"] for m in view] == ["What happens?", answer] and box == "   "
    assert frames == gr.skip() and details == gr.skip()
    with pytest.raises(gr.Error, match="Type a question"):
        next(refused)
    steps = list(act.chat_video(session, CLIP, "And then?", progress=quiet))
    _, _, view, box, _ = steps[-1]
    assert [m["content"] for m in view] == ["What happens?", answer, "And then?", view[3]["content"]]
    assert steps[0][3] == "" and len(session.conversations.get("video").turns) == 2


@pytest.mark.parametrize("tab", ["image", "video"])
def test_a_first_question_that_fails_keeps_the_conversation_the_visitor_had(act, engine, monkeypatch, tab):
    from ego.errors import ModelBusyError

    session = Session()
    if tab == "image":
        ask = lambda question: list(act.ask_image(session, QUERY, question, progress=quiet))  # noqa: E731
    else:
        ask = lambda question: list(act.ask_video(session, CLIP, question, progress=quiet))  # noqa: E731
    ask("What is this?")
    had = session.conversations.get(tab)
    assert len(had.turns) == 1

    def out_of_memory(*args, **kwargs):
        raise ModelBusyError("The model ran out of memory on this request; try a smaller image, then ask again.")

    monkeypatch.setattr(engine, "answer_batch", out_of_memory)
    monkeypatch.setattr(engine, "stream_answer", out_of_memory)
    with pytest.raises(gr.Error, match="ran out of memory"):
        ask("Describe it.")
    monkeypatch.undo()
    assert session.conversations.get(tab) is had and len(had.turns) == 1 and session.conversations.current == tab
    *_, (_, answer) = act.follow_up(session, "And then?", progress=quiet)  # it still follows up
    assert answer and len(had.turns) == 2


def test_a_conversation_the_memory_budget_cannot_hold_is_answered_but_not_kept(engine, monkeypatch):
    act = Actions(LazyEngine(engine), SPACE, load_examples())
    session = Session()
    *_, (_, answer, *_) = act.ask_image(session, QUERY, "What is this?", progress=quiet)
    chat = session.conversations.get("image")
    assert chat is not None and session.conversations.nbytes == chat.held_bytes > 0
    assert act.conversation_budget.held() == chat.held_bytes and act.budget.held() == 0  # concepts apart
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message: warnings.append(message))
    act.conversation_budget.max_bytes = chat.held_bytes  # room for what it holds, not for a second conversation
    *_, (_, again, *_) = act.ask_image(session, QUERY, "And this?", progress=quiet)
    assert again  # answered all the same
    assert session.conversations.get("image") is not chat  # the new one replaced it...
    act.conversation_budget.max_bytes = 0
    *_, (_, third, *_) = act.ask_image(session, QUERY, "And now?", progress=quiet)
    assert third and session.conversations.get("image") is None  # ...this one could not
    assert session.conversations.nbytes == 0 == act.conversation_budget.held()
    assert warnings and "cannot be followed up" in warnings[-1]
    with pytest.raises(gr.Error, match="no conversation to follow up yet"):
        list(act.follow_up(session, "Then?", progress=quiet))


def test_follow_up_never_continues_an_older_conversation_than_the_last_started(act):
    """The last conversation started was not kept (or has ended): `/follow_up` says there is none, rather than
    answering about the other tab's clip."""
    session = Session()
    list(act.ask_video(session, CLIP, "What happens?", progress=quiet))
    list(act.ask_image(session, QUERY, "What is this?", progress=quiet))
    act.new_conversation(session, "image")
    with pytest.raises(gr.Error, match="no conversation to follow up yet"):
        list(act.follow_up(session, "And then?", progress=quiet))
    assert len(session.conversations.get("video").turns) == 1


def test_the_video_chat_shows_thinking_until_the_first_words(act):
    session = Session()
    steps = act.chat_video(session, CLIP, "What happens?", progress=quiet)
    _, frames, view, box, _ = next(steps)  # at once: the question, "Thinking…", the box emptied
    assert view == [{"role": "user", "content": "What happens?"}, {"role": "assistant", "content": THINKING}]
    assert box == "" and frames == gr.skip()
    _, frames, view, _, _ = next(steps)  # the frames are sampled, the model has not answered yet
    assert isinstance(frames, list) and frames and view[-1] == {"role": "assistant", "content": THINKING}
    steps.close()


def test_the_pages_own_panel_refresh_leaves_the_status_line_and_its_sentence(act):
    """A Remove pressed while the page still loads: the load's refresh of the panel must neither take nor blank
    the sentence that Remove left for the status line."""
    session = Session()
    session.tell("Pick the concept to remove from the list first.")
    assert act.panel(session, status=False)[4] == gr.skip()
    assert act.panel(session)[4] == "Pick the concept to remove from the list first\\."


def test_an_answer_that_ends_without_a_word_says_so(engine, monkeypatch):
    """A model may end an answer at once: the view says so, not "Thinking…" for good; the next question starts
    a conversation of its own."""
    from space.guidance import NO_ANSWER

    act = Actions(LazyEngine(engine), SPACE.replace(answer_batch_max_size=1), load_examples())
    talking = Session()
    list(act.chat_image(talking, QUERY, "Is Chelsea here?", progress=quiet))
    before = list(talking.conversations.get("image").turns)
    config = engine.model.generation_config
    stops = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    vocabulary = engine.model.config.get_text_config().vocab_size
    monkeypatch.setattr(config, "eos_token_id", stops + [i for i in range(vocabulary) if i not in stops])
    session = Session()
    *_, (_, view, box, *_) = act.chat_image(session, QUERY, "Is Chelsea here?", progress=quiet)
    assert view == [
        {"role": "user", "content": "Is Chelsea here?"},
        {"role": "assistant", "content": NO_ANSWER},
    ]
    assert session.conversations.get("image") is None  # nothing to follow up
    # A follow-up without a word: the sentence in view, and the turn the conversation records, empty.
    *_, (_, view, *_) = act.chat_image(talking, QUERY, "And the wall?", progress=quiet)
    assert view[-2:] == [
        {"role": "user", "content": "And the wall?"},
        {"role": "assistant", "content": NO_ANSWER},
    ]
    turns = talking.conversations.get("image").turns
    assert turns[: len(before)] == before and [(q, str(a)) for q, a in turns[len(before) :]] == [("And the wall?", "")]
    # Over the HTTP API, a first question about another photo that ends without a word: the older conversation is
    # not followed up in its place.
    list(act.ask_image(talking, NEW_PHOTO, "What is this?", progress=quiet))
    assert talking.conversations.get("image") is None
    with pytest.raises(gr.Error, match="no conversation to follow up yet"):
        list(act.follow_up(talking, "And then?", progress=quiet))


def test_export_is_held_to_the_limit_its_import_applies(engine, tmp_path):
    """The engine's `max_concept_file_concepts` bounds a file on its way out as on its way in."""
    small = engine.with_settings(max_concept_file_concepts=1)
    act = Actions(LazyEngine(small), SPACE, load_examples())
    session = Session()
    for name, photo_path in (("Chelsea", CHELSEA[0]), ("Bo", CHELSEA[1])):
        act.introduce(session, name, gallery([photo_path]), keywords="cat", auto_size=False, progress=quiet)
    with pytest.raises(gr.Error, match="holds at most 1 concepts; you are saving 2"):
        act.export_concepts(session)


def test_a_session_holds_no_more_than_one_concept_file_can_bring_back(engine, tmp_path):
    """Every export can be imported again: a concept that would make the session's file larger than
    `max_concept_file_mb` is refused (the session unchanged), and an import takes the first ones that fit."""
    from ego import save_concepts

    made = [engine.introduce(name, [CHELSEA[0]], area_pct=10) for name in ("Chelsea", "Bo", "Tom", "Mia")]
    path = str(save_concepts(tmp_path / "four.safetensors", made))
    # Room for the introduced concept and two of the file's (a few hundred bytes spare per concept: the rule
    # counts a file at most that much larger than it is), measured in the files this Space writes.
    probe = Actions(LazyEngine(engine), SPACE, load_examples())
    three = Session()
    probe.introduce(three, "Rex", gallery(CHELSEA[:1]), progress=quiet)
    probe.import_concepts(three, path, progress=quiet)
    for name in ("Tom", "Mia"):
        probe.remove_concept(three, name)
    _, written = probe.export_concepts(three)
    act = Actions(
        LazyEngine(engine),
        SPACE.replace(max_concept_file_mb=(os.path.getsize(written) + 2000) / 2**20),
        load_examples(),
    )

    session = Session()
    act.introduce(session, "Rex", gallery(CHELSEA[:1]), progress=quiet)
    with pytest.warns(UserWarning, match="first 2 new concepts: a session's concepts fit one concept file of"):
        act.import_concepts(session, path, progress=quiet)
    assert session.names == ["Rex", "Chelsea", "Bo"] and "Left out 2: no room." in session.take_note()
    _, exported = act.export_concepts(session)
    assert os.path.getsize(exported) <= act.settings.max_concept_file_bytes
    assert [c.name for c in act.import_concepts(Session(), exported, progress=quiet)[0].concepts] == session.names

    with pytest.raises(gr.Error, match="fill one concept file .* MiB.*remove some first"):
        act.import_concepts(session, path, progress=quiet)
    with pytest.raises(gr.Error, match="would no longer fit in one concept file"):
        act.introduce(session, "Max", gallery(CHELSEA[1:]), progress=quiet)
    assert session.names == ["Rex", "Chelsea", "Bo"]
    with pytest.raises(gr.Error, match="Concept files are at most"):
        Actions(LazyEngine(engine), SPACE.replace(max_concept_file_mb=0.001), load_examples()).import_concepts(
            Session(), path, progress=quiet
        )


def test_a_session_whose_file_cannot_take_another_concept_is_told_before_the_models_work(engine, monkeypatch):
    """Even the smallest concept of the photos (one memory row each) would not fit the session's concept file: the
    refusal comes before the introduction, not after the visitor waited for it; a file with room for that smallest
    concept is not refused early (a larger concept may still be refused once its size is known)."""
    probe = Actions(LazyEngine(engine), SPACE, load_examples())
    session = Session()
    probe.introduce(session, "Rex", gallery(CHELSEA[:1]), keywords="dog", auto_size=False, progress=quiet)
    # The smallest concept of these photos, made for real: one kept token per photo.
    smallest = engine.with_settings(k_cap_tokens=1).introduce("Max", CHELSEA, keywords="cat", area_pct=25)
    assert smallest.num_tokens == len(CHELSEA)
    rows = smallest.embeddings.nbytes + (smallest.residuals.nbytes if smallest.residuals is not None else 0)

    def introduce_with_file_room(room: int):
        limit = session.file_bytes_with([]) + room
        act = Actions(LazyEngine(engine), SPACE.replace(max_concept_file_mb=limit / 2**20), load_examples())
        monkeypatch.setattr(act, "_introduce_on_gpu", lambda *args: pytest.fail("the model was asked"))
        act.introduce(session, "Max", gallery(CHELSEA), keywords="cat", auto_size=False, progress=quiet)

    with pytest.raises(gr.Error) as refused:
        introduce_with_file_room(rows - 1)
    assert "would no longer fit in one concept file" in refused.value.message and session.names == ["Rex"]
    with pytest.raises(pytest.fail.Exception, match="the model was asked"):
        introduce_with_file_room(rows)
    assert session.names == ["Rex"]


# ----------------------------------------------------------------------------------------------
# A tab left open past its session's expiry
# ----------------------------------------------------------------------------------------------
class Page:
    """What Gradio hands a handler for an event of one browser tab (`gr.Request`): the page's Gradio session, and
    the route the event came by (the page posts its panel's events outside the queue: `outside_the_queue`)."""

    def __init__(self, session_hash: str, route: str = "/gradio_api/queue/join"):
        self.session_hash = session_hash
        self.request = SimpleNamespace(url=SimpleNamespace(path=route))

    def outside_the_queue(self) -> Page:
        return Page(self.session_hash, "/gradio_api/run/predict")


ENDED = "Your session on this server ended 60 minutes after your last action"


def loaded(act, page: Page, token=None) -> tuple[Session, str]:
    """The page load of a tab: the session (and the token its browser keeps) the registry hands it."""
    return act.sessions.resume(Session(), token, page)


def expired(act, session: Session) -> Session:
    """What Gradio does `session_ttl_s` after a tab's last action: its state's delete callback, then a new default
    session for the tab's next action."""
    act.sessions.release(session)
    return Session()


@pytest.mark.parametrize("tab", ["image", "video"])
def test_a_tab_left_open_past_its_sessions_expiry_is_told_once_and_its_message_stays(act, monkeypatch, tab):
    """The next message of a tab whose session expired is refused with the sentence that says so, before any
    output: the message stays in its box and the chat views as they were. The next one is asked in the tab's new
    session (without the concepts), and nothing is said again."""
    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    page = Page("tab")
    session, _ = loaded(act, page)
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet, request=page)
    if tab == "image":
        ask = lambda session, message: act.chat_image(session, QUERY, message, progress=quiet, request=page)  # noqa: E731
    else:
        ask = lambda session, message: act.chat_video(session, CLIP, message, progress=quiet, request=page)  # noqa: E731
    list(ask(session, "Is Chelsea here?"))
    assert session.conversations.get(tab) is not None and warnings == []
    new = expired(act, session)
    steps = ask(new, "And what is she doing?")
    with pytest.raises(gr.Error, match=ENDED) as told:
        next(steps)  # refused before its first output: the question box is never emptied
    sentence = told.value.message
    assert "concepts and conversations were deleted" in sentence and "import your concept file" in sentence.lower()
    assert "Your question is still in its box" in sentence and "or ask again now, without them" in sentence
    assert new.holds_nothing
    cards, dropdown, _, records, status = act.panel_if_told(new)  # the panel, refreshed after the refusal
    assert cards == records == dropdown.choices == [] and status.startswith(escape_markdown(ENDED))
    assert act.panel_if_told(new) == (gr.skip(),) * 5  # after another refusal (or a Stop): left as it is
    *_, last = ask(new, "And what is she doing?")
    details = last[4]
    assert details["concepts_used"] == [] and len(new.conversations.get(tab).turns) == 1  # a first question
    assert warnings == []
    if tab == "image":  # without a photo there is nothing to ask about without the concepts: not offered
        again = expired(act, new)
        with pytest.raises(gr.Error, match=ENDED) as told:
            next(act.chat_image(again, None, "What colour are her eyes?", progress=quiet, request=page))
        assert "without them" not in told.value.message


@pytest.mark.parametrize("end", ["new conversation", "new photo", "stop"])
def test_ending_a_conversation_in_a_tab_that_outlived_its_state_ends_the_one_its_browser_holds(act, monkeypatch, end):
    """A tab whose state expired while another tab of the browser holds the session: its New conversation, a new
    photo and its Stop act on that session, as its next message would (which then starts a new conversation, not
    a follow-up of the old one). Where the session itself ended, they leave it for the next message to say so."""
    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    first, second = Page(f"first {end}"), Page(f"second {end}")
    shared, token = loaded(act, first)
    act.introduce(shared, "Chelsea", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet, request=first)
    assert loaded(act, second, token)[0] is shared
    list(act.chat_image(shared, QUERY, "Is Chelsea here?", progress=quiet, request=second))
    stopped = []
    monkeypatch.setattr(type(shared.conversations), "stop", lambda self, tab, wait_s: stopped.append((self, tab)))

    def ending(session):
        """The first tab's action; the session it leaves in the tab's state (None for Stop, which returns none)."""
        if end == "new conversation":
            return act.new_conversation(session, "image", request=first)[0]
        if end == "new photo":
            act.photo_changing(session, NEW_PHOTO, request=first)
            return act.photo_changed(session, NEW_PHOTO, request=first)[0]
        act.stop_answer(session, "image", request=first)
        return None

    new = expired(act, shared)  # the first tab's state, made again
    assert ending(new) is (None if end == "stop" else shared)
    assert stopped == ([] if end == "new conversation" else [(shared.conversations, "image")])
    *_, last = act.chat_image(new, QUERY, "And now?", progress=quiet, request=first)
    assert last[0] is shared and new.holds_nothing
    assert len(shared.conversations.get("image").turns) == (2 if end == "stop" else 1)  # ended: a first question
    # Both tabs' states expire: the session has ended, which an ending action leaves for the next message to say.
    act.sessions.release(shared)
    act.sessions.release(shared)
    gone = Session()
    assert ending(gone) is (None if end == "stop" else gone)
    with pytest.raises(gr.Error, match=ENDED):
        next(act.chat_image(gone, QUERY, "Is Chelsea here?", progress=quiet, request=first))
    assert warnings == []


@pytest.mark.parametrize("action", ["remove", "clear", "export"])
def test_a_panel_action_in_a_tab_that_outlived_its_session_says_it_ended(act, action):
    """Remove, Clear all and Export in a tab whose session expired say so in the status line (not "there is no
    concept with that name" about a concept the panel still showed); said once, then as in any empty session."""
    page = Page("tab").outside_the_queue()
    session, _ = loaded(act, page)
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet, request=page)
    new = expired(act, session)
    run = {
        "remove": lambda: act.remove_concept(new, "Chelsea", page),
        "clear": lambda: act.clear_concepts(new, page),
        "export": lambda: act.export_concepts(new, page),
    }[action]
    out, value = run()
    assert out is new and not value  # no records, no file
    status = act.status(new)
    assert status.startswith(escape_markdown(ENDED)) and "introduce them again" in status
    run()
    assert act.status(new).startswith(
        {"remove": "There is no concept", "clear": "There are no concepts to clear", "export": "There are no"}[action]
    )


def test_a_tab_shown_again_shows_what_another_tab_of_its_browser_changed(act):
    """Two tabs of a browser share a session. Shown again, a tab's panel is refreshed only when its session holds
    other concepts (or another summary) than it shows; a tab whose session ended meanwhile is told so in its status
    line, once; one whose state expired while the other tab holds the session shows that session's concepts."""
    first, second = Page("first").outside_the_queue(), Page("second").outside_the_queue()
    session, token = loaded(act, first)
    assert loaded(act, second, token)[0] is session
    shown_records, shown_summary = act.records(session), act.summary(session)
    assert act.panel_if_changed(session, shown_records, shown_summary, first) == (gr.skip(),) * 5
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet, request=second)
    cards, dropdown, summary, records, status = act.panel_if_changed(session, shown_records, shown_summary, first)
    assert [choice for choice, _ in dropdown.choices] == ["Chelsea"] and len(cards) == 1
    assert records == act.records(session)
    assert summary == act.summary(session) and status == gr.skip()  # the other tab's sentence is not taken
    assert act.panel_if_changed(session, records, summary, first) == (gr.skip(),) * 5
    act.export_concepts(session, second)  # the same concepts, now exported: the summary says so
    assert act.panel_if_changed(session, records, summary, first)[2] == act.summary(session) != summary
    # The first tab's state expires while the second tab still holds the session: shown again, the first tab shows
    # it (its next action takes it back, as a reload would); being shown holds nothing on the server.
    act.sessions.release(session)
    records = act.records(session)
    assert act.panel_if_changed(Session(), [], "", first)[3] == records
    # The second tab's state expires too: the session has ended, which the first tab shows when it is shown again,
    # each time, until its next action, which is still told (a question refused, its text kept).
    act.sessions.release(session)
    assert len(session) == 0
    new = Session()
    for _ in range(2):
        cards, _, _, shown, status = act.panel_if_changed(new, records, summary, first)
        assert cards == shown == [] and status.startswith(escape_markdown(ENDED))
    assert act.sessions.rejoin(new, first) == (new, True)
    assert act.panel_if_changed(new, shown, act.summary(new), first) == (gr.skip(),) * 5


def test_concepts_added_in_a_tab_that_outlived_its_session_start_its_new_one_and_it_is_said(act, monkeypatch, tmp_path):
    """Introduce and Import go ahead in a tab whose session expired (the model's work is not wasted), with a
    message that the concepts the visitor had are gone; their concept file brings them back."""
    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    page = Page("tab")
    session, _ = loaded(act, page)
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet, request=page)
    _, exported = act.export_concepts(session, page)
    kept = tmp_path / "mine.safetensors"  # the visitor's download: the server's copy goes with the session
    shutil.copy(exported, kept)
    new = expired(act, session)
    out, report, *_ = act.introduce(new, "Bo", gallery(CHELSEA[1:]), "tabby", False, 10, progress=quiet, request=page)
    assert out is new and new.names == ["Bo"] and "## Bo" in report
    assert len(warnings) == 1 and warnings[0].startswith(ENDED)
    act.import_concepts(new, str(kept), progress=quiet, request=page)
    assert new.names == ["Bo", "Chelsea"] and len(warnings) == 1


def test_a_script_whose_session_ended_is_told_at_its_next_question(act):
    """An HTTP API client has no page load: once its session holds concepts, its Gradio session is remembered, and
    its next question after the session ended is refused with the sentence that says so and which endpoints bring
    the concepts back (once; the next one is answered without them). A script that never added concepts is not
    told: it lost nothing."""
    script = Page("script")
    session = Session()
    list(act.ask_image(session, QUERY, "What is this?", progress=quiet, request=script))
    fresh = expired(act, session)
    list(act.ask_image(fresh, QUERY, "What is this?", progress=quiet, request=script))  # nothing was lost
    act.introduce(fresh, "Chelsea", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet, request=script)
    *_, last = act.ask_image(fresh, QUERY, "Is Chelsea here?", progress=quiet, request=script)
    assert last[3]["concepts_used"] == ["Chelsea"]
    ended = expired(act, fresh)
    with pytest.raises(gr.Error, match=ENDED) as told:
        next(act.ask_image(ended, QUERY, "Is Chelsea here?", progress=quiet, request=script))
    assert "introduce your concepts again with /introduce" in told.value.message
    assert "/import_concepts" in told.value.message and "or ask again now, without them" in told.value.message
    *_, last = act.ask_image(ended, QUERY, "Is Chelsea here?", progress=quiet, request=script)
    assert last[3]["concepts_used"] == []
    act.introduce(ended, "Bo", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet, request=script)
    for ask in (
        lambda session: next(act.ask_video(session, CLIP, "Is Bo here?", progress=quiet, request=script)),
        lambda session: next(act.follow_up(session, "And now?", progress=quiet, request=script)),
    ):
        ended = expired(act, ended)
        with pytest.raises(gr.Error, match=ENDED) as told:
            ask(ended)
        assert "/introduce" in told.value.message
        act.introduce(ended, "Bo", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet, request=script)
    assert "ask a first question with /ask_image or /ask_video" in told.value.message
    # A script whose first concepts came from a concept file is remembered too.
    _, exported = act.export_concepts(ended, script)
    importer, first = Page("importer"), Session()
    act.import_concepts(first, exported, progress=quiet, request=importer)
    with pytest.raises(gr.Error, match=ENDED):
        next(act.ask_image(expired(act, first), QUERY, "Is Bo here?", progress=quiet, request=importer))


@pytest.mark.parametrize("adding", ["introduce", "import"])
def test_a_script_whose_session_ended_is_refused_when_it_adds_concepts_and_goes_on_when_it_calls_again(
    act, monkeypatch, tmp_path, adding
):
    """A script reads no warning: its first /introduce or /import_concepts after its session ended (its concepts
    gone) is refused with the sentence that says so, before any work; made again, the call starts its new session,
    and its next question is not refused again."""
    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    script = Page(f"adding script {adding}")
    session = Session()
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet, request=script)
    _, exported = act.export_concepts(session, script)
    kept = tmp_path / "mine.safetensors"
    kept.write_bytes(Path(exported).read_bytes())

    def add(into):
        if adding == "introduce":
            return act.introduce(into, "Bo", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet, request=script)
        return act.import_concepts(into, str(kept), progress=quiet, request=script)

    ended = expired(act, session)
    with pytest.raises(gr.Error, match=ENDED) as told:
        add(ended)
    assert "Nothing was added: make this call again" in told.value.message and ended.holds_nothing
    add(ended)
    assert len(ended) == 1 and warnings == []
    *_, last = act.ask_image(ended, QUERY, "Is Chelsea here?", progress=quiet, request=script)
    assert last[3]["concepts_used"] == ended.names
    if adding == "introduce":  # its report speaks of endpoints, not of the page's tabs and buttons
        _, report, _, _ = act.introduce(
            ended, "Rex", gallery(CHELSEA[:1]), "dog", False, 10, progress=quiet, request=script
        )
        assert "/ask_image or /ask_video to ask about it" in report and "New conversation" not in report


def test_no_tab_is_told_its_session_ended_while_it_has_not(act, engine, monkeypatch):
    """A first visit (its question asked before its page load was answered, too), a reload, a second tab, Clear all,
    a script (no page load), and a server that restarted since the page loaded (it knows no page): no sentence."""
    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    first = Page("first")
    early = Session()
    list(act.chat_image(early, QUERY, "What is this?", progress=quiet, request=first))
    session, token = act.sessions.resume(early, None, first)
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet, request=first)
    act.clear_concepts(session, first.outside_the_queue())
    assert act.status(session) == escape_markdown("Removed all 1 of your concepts.")
    for page in (Page("reloaded"), Page("second tab")):
        tab, same = loaded(act, page, token)
        assert tab is session and same == token
        list(act.chat_image(tab, QUERY, "And now?", progress=quiet, request=page))
    list(act.chat_image(Session(), QUERY, "What is this?", progress=quiet))  # a script: no page, no request
    restarted = Actions(LazyEngine(engine), SPACE, load_examples())
    list(restarted.chat_image(Session(), QUERY, "What is this?", progress=quiet, request=first))
    assert warnings == []


# ----------------------------------------------------------------------------------------------
# The engine's advice, in what a visitor of the Space can do
# ----------------------------------------------------------------------------------------------
def test_a_full_conversation_tells_a_space_visitor_how_to_start_one_not_to_ask_for_a_shorter_answer(engine):
    """The engine tells a Python caller whose follow-up's answer does not fit to ask for a shorter one; a visitor
    of the Space cannot choose an answer's length: the page says to press New conversation (the question is back
    in its box), the HTTP API to ask a first question."""
    question, follow_up = "What is this?", "And what colour is the wall behind it?"
    first = engine.answer(question, [], image=QUERY, max_new_tokens=SETTINGS.answer_max_new_tokens)
    roomy = engine.with_settings(max_conversation_context_tokens=first.context_tokens + 200)
    measured = roomy.chat([], image=QUERY)
    measured.adopt(question, first)
    with pytest.raises(ConversationFullError, match="shorter answer") as full:
        measured.ask(follow_up, max_new_tokens=1000)
    taken = first.context_tokens + 200 - full.value.longest_answer_tokens
    # Room for the follow-up's context and 4 tokens of its answer, not for the 8 the Space's settings give.
    small = engine.with_settings(max_conversation_context_tokens=taken + 4)
    act = Actions(LazyEngine(small), SPACE, load_examples())
    session = Session()
    list(act.chat_image(session, QUERY, question, progress=quiet))
    engines_own = small.chat([], image=QUERY)
    engines_own.adopt(question, session.conversations.get("image").turns[0][1])
    with pytest.raises(InputError, match=r"; or ask for a shorter answer \(at most 4 tokens\)\.$"):
        engines_own.ask(follow_up, max_new_tokens=SETTINGS.answer_max_new_tokens)
    shown = []
    with pytest.raises(gr.Error) as on_the_page:
        for step in act.chat_image(session, QUERY, follow_up, progress=quiet):
            shown.append(step)
    assert "shorter answer" not in on_the_page.value.message
    assert on_the_page.value.message.endswith(
        "; start a new conversation to ask more: press New conversation, then ask again (your question is still in "
        "its box)."
    )
    assert shown[-1][2] == follow_up  # back in its box
    with pytest.raises(gr.Error) as through_the_api:
        list(act.follow_up(session, follow_up, progress=quiet))
    assert "shorter answer" not in through_the_api.value.message
    assert through_the_api.value.message.endswith("ask a first question with /ask_image or /ask_video.")
    # The conversation's limit of questions is told the same way on the page.
    one_question = Actions(LazyEngine(engine.with_settings(max_conversation_turns=1)), SPACE, load_examples())
    other = Session()
    list(one_question.chat_image(other, QUERY, question, progress=quiet))
    with pytest.raises(gr.Error, match="at most 1 question; start a new conversation to ask more: press New"):
        list(one_question.chat_image(other, QUERY, follow_up, progress=quiet))


def test_a_first_question_whose_answer_does_not_fit_tells_a_space_visitor_to_make_room(act, engine):
    """The engine's way out when a first question's context fits and its answer's cap does not is a shorter answer;
    the Space's is fewer concepts."""
    session = Session()
    act.introduce(session, "Chelsea", gallery(CHELSEA[:1]), "tabby", False, 10, progress=quiet)
    first = engine.answer("Is Chelsea here?", session.concepts, image=QUERY, max_new_tokens=1)
    tight = engine.with_settings(max_conversation_context_tokens=first.context_tokens + 3)
    with pytest.raises(InputError, match=r"; ask for a shorter answer \(at most 3 tokens\)\.$"):
        tight.answer("Is Chelsea here?", session.concepts, image=QUERY)
    act = Actions(LazyEngine(tight), SPACE, load_examples())
    with pytest.raises(gr.Error) as refused:
        list(act.chat_image(session, QUERY, "Is Chelsea here?", progress=quiet))
    assert "shorter answer" not in refused.value.message
    assert refused.value.message.endswith(
        "; remove some of your concepts to make room (export them first to keep them), then ask again."
    )


def test_the_photo_a_question_is_asked_about_is_the_conversations_reduced_one(act, monkeypatch, tmp_path):
    """A large photo is reduced once, as the conversation takes it: the model is asked about that one (what crosses
    to a ZeroGPU worker too) and the match pictures are drawn on it, not on the full-size photo."""
    large = tmp_path / "large.png"
    Image.open(QUERY).convert("RGB").resize((2100, 1600)).save(large)  # over 4 x the query budget (3.2 MP)
    asked, stream = [], act._answer_stream

    def recording(engine, question, concepts, **media):
        asked.append(media.get("image"))
        return stream(engine, question, concepts, **media)

    monkeypatch.setattr(act, "_answer_stream", recording)
    session = Session()
    list(act.ask_image(session, str(large), "What is this?", progress=quiet))
    chat = session.conversations.get("image")
    assert asked == [chat.picture] and chat.picture.size == (1050, 800)
