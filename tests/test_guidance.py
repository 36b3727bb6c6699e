"""space/guidance.py: the messages around an answer and an introduction."""

from __future__ import annotations

import warnings

import gradio as gr
import pytest

from space.guidance import THINKING, after_introduce, example_concepts_hint, mark_stopped, mark_stopped_in_chat
from space.session import Session


def test_stop_marks_what_had_streamed_once():
    assert mark_stopped("Chelsea is on the") == "Chelsea is on the (stopped)"
    assert mark_stopped("Chelsea is on the (stopped)") == "Chelsea is on the (stopped)"
    assert mark_stopped(THINKING) == "(stopped)"  # stopped before the first word
    assert mark_stopped(None) == "(stopped)"


def test_after_introduce_clears_the_form_and_resets_the_advanced_options(capsys):
    session = Session()
    session._entries = [object()]
    form = after_introduce(session, "<b>Chelsea</b>")  # gr.Info outside a request prints its message
    assert form == ("", None, "", True, 25)
    shown = capsys.readouterr().out
    assert "&lt;b&gt;Chelsea&lt;/b&gt;" in shown and "<b>" not in shown  # visitor text, escaped
    assert "Export" in shown  # the first concept: a nudge to export
    session._entries = [object(), object()]
    after_introduce(session, "Bo")
    assert "Export" not in capsys.readouterr().out  # once is enough


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
