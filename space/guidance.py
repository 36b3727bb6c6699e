"""Small cheap handlers that tell the visitor where they stand: after Introduce, before an answer, after
Stop, before an example question that needs the example concepts. None of them runs the model."""

from __future__ import annotations

import html

import gradio as gr

from ego.checks import fold_name

from . import views
from .conversations import STOPPED
from .session import Session, name_key

THINKING = "Thinking… (the first words can take a few seconds; Stop ends the answer)"
"""Shown in an answer box from the moment Ask is pressed until the first word arrives."""
NO_ANSWER = "(no answer: the model ended at once; ask again in other words)"
"""Shown for an answer that ended without a word."""


def after_introduce(session: Session, name_box):
    """A success message naming the concept just introduced (the session's newest, not what the Name box holds
    now), and the form cleared with its Advanced options back at their defaults (the next concept starts from
    scratch: keywords and a manual size belong to one concept). A visitor who has begun the next concept while
    this one was introduced (the Name box holds another name) keeps what they typed.

    Returns (name, photos, keywords, auto_size, size_pct)."""
    introduced = session.names[-1] if len(session) else fold_name(str(name_box or ""))
    shown = views.isolated(html.escape(introduced, quote=False))  # gr.Info renders HTML
    gr.Info(f"“{shown}” is introduced: ask about it on the Ask tabs.")
    suggest_export(session)
    if name_key(fold_name(str(name_box or ""))) != name_key(introduced):
        return (gr.skip(),) * 5
    return "", None, "", True, 25


def suggest_export(session: Session) -> None:
    """Once per session, when it first holds concepts (introduced, loaded from the examples or imported): where
    they stay, and how to keep them."""
    if len(session) and not session.export_suggested:
        session.export_suggested = True
        gr.Info(
            "Your concepts stay on this server for a while (a reload brings them back); "
            "use Export to a file under Your concepts to keep them."
        )


def text_of(content) -> str:
    """A message's text: a chat view hands its messages to a handler as lists of parts ({"type": "text",
    "text": ...}), an answer box as a string."""
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    if isinstance(content, dict):
        return str(content.get("text") or "")
    return "" if content is None else str(content)


def mark_stopped(answer) -> str:
    """The answer box after Stop: what had streamed, marked as cut short."""
    text = text_of(answer)
    text = "" if text == THINKING else text
    return text if text.endswith(STOPPED.strip()) else (text + STOPPED).strip()


def mark_stopped_in_chat(session: Session, history, *, tab: str):
    """The conversation view after Stop: its last answer marked as cut short if it was still coming ("Thinking…",
    or streaming when Stop came: the event was cancelled, its handler could not end it); otherwise left alone
    (gr.skip()): an answer that had ended, a refused question, or one its Stop ended from within, whose handler
    has sent its own last view (the view this one is handed may be older than that)."""
    shown = [dict(message) for message in (history or [])]
    if shown and shown[-1].get("role") == "assistant":
        content = shown[-1].get("content")
        if text_of(content) == THINKING or session.conversations.streaming(tab):
            shown[-1]["content"] = mark_stopped(content)
            return shown
    return gr.skip()


def example_concepts_hint(example_names: list[str], example_questions: list[str]):
    """A handler (session, question) that warns when an example question names example concepts the
    visitor has not loaded: without them the model answers as if it had never seen them."""
    known_questions = {" ".join(q.split()).casefold() for q in example_questions}

    def hint(session: Session, question) -> None:
        text = " ".join(str(question or "").split()).casefold()
        if text not in known_questions:
            return
        missing = [n for n in example_names if name_key(n) in text and not session.has(n)]
        if missing:
            gr.Warning(
                "This example question is about the example concepts, which you have not loaded: "
                "press “Load the example concepts” on the Introduce tab first, then ask again."
            )

    return hint
