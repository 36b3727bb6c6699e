"""space/guidance.py: the messages around an answer and an introduction."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import gradio as gr
import pytest

from space.guidance import (
    THINKING,
    after_introduce,
    example_concepts_hint,
    mark_stopped,
    mark_stopped_in_chat,
    suggest_export,
)
from space.session import Session


def test_stop_marks_what_had_streamed_once():
    assert mark_stopped("Chelsea is on the") == "Chelsea is on the (stopped)"
    assert mark_stopped("Chelsea is on the (stopped)") == "Chelsea is on the (stopped)"
    assert mark_stopped(THINKING) == "(stopped)"  # stopped before the first word
    assert mark_stopped(None) == "(stopped)"


def _holding(*names) -> Session:
    """A session holding concepts of these names (only their names are read here)."""
    session = Session()
    session._entries = [SimpleNamespace(concept=SimpleNamespace(name=name)) for name in names]
    return session


def test_after_introduce_clears_the_form_and_resets_the_advanced_options(capsys):
    session = _holding("<b>Chelsea</b>")
    form = after_introduce(session, "<b>Chelsea</b>")  # gr.Info outside a request prints its message
    assert form == ("", None, "", True, 25)
    shown = capsys.readouterr().out
    assert "&lt;b&gt;Chelsea&lt;/b&gt;" in shown and "<b>" not in shown  # visitor text, escaped
    assert "Export" in shown  # the first concept: a nudge to export
    session._entries.append(SimpleNamespace(concept=SimpleNamespace(name="Bo")))
    after_introduce(session, "Bo")
    assert "Export" not in capsys.readouterr().out  # once is enough


def test_after_introduce_names_the_concept_introduced_and_keeps_the_next_ones_typing(capsys):
    """The visitor began the next concept while this one was introduced: the message names the one introduced,
    and the form keeps what they typed."""
    form = after_introduce(_holding("Chelsea"), "Bo")
    assert form == (gr.skip(),) * 5
    assert "“\u2068Chelsea\u2069” is introduced" in capsys.readouterr().out
    assert after_introduce(_holding("my cat Chelsea"), "  My  cat chelsea ") == ("", None, "", True, 25)
    # The name is kept without its invisible characters (a zero-width joiner, a soft hyphen): still the same name.
    assert after_introduce(_holding("Fam \U0001f468\U0001f469"), "Fam \U0001f468\u200d\U0001f469") == (
        "",
        None,
        "",
        True,
        25,
    )
    assert after_introduce(_holding("Software"), "Soft\xadware")[0] == ""


def test_the_export_nudge_comes_once_however_the_first_concepts_came(capsys):
    """Introduced, loaded from the examples or imported: the first concepts bring the nudge, once."""
    empty = Session()
    suggest_export(empty)
    assert "Export" not in capsys.readouterr().out  # nothing to keep yet
    loaded = _holding("Chelsea", "my mug", "rocket")
    suggest_export(loaded)
    assert "Export" in capsys.readouterr().out
    suggest_export(loaded)
    after_introduce(loaded, "rocket")
    assert "Export" not in capsys.readouterr().out


def test_an_example_question_without_its_concepts_gets_a_hint():
    hint = example_concepts_hint(["Chelsea", "my mug"], ["Who is next to my mug?", "Describe the sky."])
    with pytest.warns(UserWarning, match="Load the example concepts"):
        hint(Session(), "Who is next to  my mug?")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hint(Session(), "Describe the sky.")  # an example that needs no concept
        hint(Session(), "Who is next to my mug, really?")  # the visitor's own question
        loaded = Session()
        loaded.has = lambda name: True
        hint(loaded, "Who is next to my mug?")  # the concepts are there


def test_stop_marks_the_text_of_the_messages_a_chat_view_hands_over():
    """A chat view gives its handlers each message as a list of parts: Stop marks the text, not the list."""
    chat = gr.Chatbot()

    def handed(history):  # what the handler receives from the browser's chat view
        return chat.preprocess(chat.postprocess(history))

    session = Session()
    session.conversations.streams("image", True)  # an answer is streaming when Stop comes
    partial = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "A partial answer"}]
    assert mark_stopped_in_chat(session, handed(partial), tab="image")[-1]["content"] == "A partial answer (stopped)"
    waiting = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": THINKING}]
    assert mark_stopped_in_chat(Session(), handed(waiting), tab="image")[-1]["content"] == "(stopped)"


def test_chat_views_show_markup_as_text():
    """A chat view renders no Markdown but still renders HTML: what could open a tag or an entity is kept text by
    a zero-width space, and the rest of the text is left as typed (for the Copy button and screen readers)."""
    from space.conversations import messages

    question, answer = '<b id="x">Is <i>Chelsea</i> here?</b>', "Yes & no: 3 < 5 > 2, &amp; <a href='https://e.org'>"
    view = messages([(question, answer)], "<img src=x>", "")
    z = "\u200b"
    assert [m["content"] for m in view] == [
        f'<{z}b id="x">Is <{z}i>Chelsea<{z}/i> here?<{z}/b>',
        f"Yes & no: 3 < 5 > 2, &{z}amp; <{z}a href='https://e.org'>",
        f"<{z}img src=x>",
        "",
    ]
    assert [m["content"].replace(z, "") for m in view[:2]] == [question, answer]  # nothing else changed
