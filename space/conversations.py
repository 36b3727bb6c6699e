"""One visitor's conversations, held by their `Session` (the value of the app's `gr.State`).

Each ask tab holds at most one conversation (`ego.Chat`) about its photo or clip; the HTTP API's `/follow_up`
continues the one the visitor started last. A conversation holds the model's key/value cache for its
follow-ups (bounded for all visitors together by `Settings.max_cached_conversations_mb`), so it lives only in
this server's memory and is never copied or saved.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import weakref
from collections.abc import Iterator

TABS = ("image", "video")


class AnswerInFlight:
    """A chat tab's message being answered: `stop` asks it to end (the Stop button, `Conversations.stop`), `cut`
    says its answer was cut short by it (an answer that had ended is not, nor is its first answer when the Stop ends
    only the answer without memory that follows), `ended` that its handler has returned its last view."""

    def __init__(self):
        self.stop = threading.Event()
        self.cut = threading.Event()
        self.ended = threading.Event()


class Conversations:
    """The visitor's current conversation in each ask tab, and which of them was started last."""

    def __init__(self):
        self._chats: dict[str, object] = {}
        self.current: str | None = None
        self._lock = threading.Lock()
        self._answering: set[int] = set()
        """The conversations (their ids) whose follow-up is being answered away from the engine's lock."""
        self._asked: dict[str, int] = {}
        """Per tab, how many first questions were asked or conversations ended there: a first question's
        conversation is kept only if nothing happened in its tab since it was asked (`asking`, `start`)."""
        self._streaming: set[str] = set()
        """The tabs whose chat view shows an answer still coming, or one cut short by Stop (`streams`)."""
        self._restored: dict[str, str] = {}
        """Per tab, the digest of the photo a reload put back in the tab's box (`restored`)."""
        self._about: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        """Per conversation, the digest of the file in the box its first question was asked about (`asked_about`)."""
        self._in_flight: dict[str, set[AnswerInFlight]] = {}
        """Per tab, the messages being answered (`answer_in_flight`): one, or one per browser tab of the session."""
        self._cut_short: dict[str, list[tuple]] = {}
        """Per tab, the follow-ups that Stop cut short, as their visitor saw them: (conversation, turn, settled),
        shown until the worker is done with them (`cut_short`)."""

    def __deepcopy__(self, memo) -> Conversations:
        # gr.State deep-copies its default once per visitor: each one starts with no conversation.
        return Conversations()

    def get(self, tab: str):
        """The tab's conversation, or None."""
        return self._chats.get(tab)

    def asking(self, tab: str) -> int:
        """A first question is being asked in `tab`: the mark its conversation is kept with (`start`). A later
        question there, or the tab's conversation ended meanwhile (a new photo, "New conversation"), makes it stale:
        the visitor has moved on, and the answer in flight must not bring back the conversation they left."""
        with self._lock:
            self._asked[tab] = self._asked.get(tab, 0) + 1
            return self._asked[tab]

    def stale(self, tab: str, asked: int | None) -> bool:
        """Whether the first question marked `asked` (`asking`) was overtaken in `tab` (None: never)."""
        with self._lock:
            return asked is not None and self._asked.get(tab) != asked

    def start(self, tab: str, chat, asked: int | None = None) -> bool:
        """`chat` replaces the tab's conversation and becomes the one `/follow_up` continues; not (False) when
        `asked`, the mark of the question that started it, is stale."""
        with self._lock:
            if asked is not None and self._asked.get(tab) != asked:
                return False
            self._chats[tab] = chat
            self.current = tab
            self._restored.pop(tab, None)
            self._cut_short.pop(tab, None)
            return True

    @property
    def nbytes(self) -> int:
        """Memory the conversations hold for their follow-ups (`ego.Chat.held_bytes`; key/value caches apart)."""
        return sum(chat.held_bytes for chat in list(self._chats.values()))

    def turns(self, tab: str) -> list[tuple]:
        """The tab's conversation as its chat view shows it: its (question, answer) turns, then the follow-ups that
        Stop cut short while the answering worker has not recorded them yet (`cut_short`)."""
        with self._lock:
            chat = self._chats.get(tab)
            if chat is None:
                return []
            waiting = [e for e in self._cut_short.get(tab, []) if e[0] is chat and not e[2].is_set()]
            self._cut_short[tab] = waiting  # the others are recorded, or will never be (their batch failed)
            return [*chat.turns, *(turn for _, turn, _ in waiting)]

    def cut_short(self, tab: str, chat, question: str, answer, settled: threading.Event) -> None:
        """A follow-up of `chat` that Stop cut short, with the `answer` its visitor saw. The worker that answers
        follow-ups with other visitors' records the turn only once its whole batch has ended (`settled` then; or
        the batch failed, and the turn is not the conversation's); until then the chat view (the visitor's next
        question, a reload) shows this one in its place."""
        with self._lock:
            if self._chats.get(tab) is chat and not settled.is_set():
                self._cut_short.setdefault(tab, []).append((chat, (question, answer), settled))

    def answer_in_flight(self, tab: str) -> AnswerInFlight:
        """A message of `tab` starts being answered: its Stop (`stop`) from now on, until `answer_ended`."""
        answer = AnswerInFlight()
        with self._lock:
            self._in_flight.setdefault(tab, set()).add(answer)
        return answer

    @contextlib.contextmanager
    def answering_in(self, tab: str) -> Iterator[AnswerInFlight]:
        """`answer_in_flight` for the duration of a handler, `answer_ended` when it returns (or is closed)."""
        answer = self.answer_in_flight(tab)
        try:
            yield answer
        finally:
            self.answer_ended(tab, answer)

    def answer_ended(self, tab: str, answer: AnswerInFlight) -> None:
        answer.ended.set()
        with self._lock:
            self._in_flight.get(tab, set()).discard(answer)

    def stop(self, tab: str, wait_s: float) -> bool:
        """Ask the tab's answers to end, as far as they have come (the session's browser tabs share its
        conversations: a Stop in one ends the tab's answer in another too), and wait (at most `wait_s` seconds in
        all) until their handlers have returned their last views; whether they had by then (True also when nothing
        was being answered)."""
        with self._lock:
            answers = list(self._in_flight.get(tab, ()))
        for answer in answers:
            answer.stop.set()
        deadline = time.monotonic() + wait_s
        return all(answer.ended.wait(max(0.0, deadline - time.monotonic())) for answer in answers)

    def answering(self, chat) -> bool:
        """Mark `chat` as having a follow-up being answered; False if it already has one."""
        with self._lock:
            if id(chat) in self._answering:
                return False
            self._answering.add(id(chat))
            return True

    def answered(self, chat) -> None:
        with self._lock:
            self._answering.discard(id(chat))

    def streams(self, tab: str, coming: bool) -> None:
        """Whether the tab's chat view shows an answer still coming: set as a message is taken, cleared when its
        answer has ended or was refused, left set when Stop cut it (Stop then marks it, and only it)."""
        with self._lock:
            (self._streaming.add if coming else self._streaming.discard)(tab)

    def streaming(self, tab: str) -> bool:
        with self._lock:
            return tab in self._streaming

    def restored(self, tab: str, digest: str) -> None:
        """A reload put the photo of `tab`'s conversation back in its box, as a file of this `digest`: the box's
        change to it is the conversation's own photo, not a new one (`is_restored`)."""
        with self._lock:
            self._restored[tab] = digest

    def is_restored(self, tab: str, digest: str) -> bool:
        with self._lock:
            return self._restored.get(tab) == digest

    def asked_about(self, chat, digest: str) -> None:
        """`chat` is about the file of this `digest` (the photo or clip in the box of the tab it was started in)."""
        with self._lock:
            self._about[chat] = digest

    def is_about(self, tab: str, digest: str) -> bool:
        """Whether the tab's conversation is about the file of this `digest`, as first asked or as a reload put it
        back in the box. Two browser tabs of one visitor share the session's conversation: a message sent beside
        another photo is about that photo, not a follow-up of the conversation the other browser tab started."""
        with self._lock:
            chat = self._chats.get(tab)
            return chat is not None and digest in (self._about.get(chat), self._restored.get(tab))

    def end(self, tab: str, asked: int | None = None) -> None:
        """The tab has no conversation any more (a new photo or clip, or "New conversation"), nor will the first
        question in flight there start one. With `asked` (`asking`'s mark of a first question that ended without
        a conversation to keep): only if nothing happened in the tab since that question was asked."""
        with self._lock:
            if asked is not None and self._asked.get(tab) != asked:
                return
            self._asked[tab] = self._asked.get(tab, 0) + 1
            self._chats.pop(tab, None)
            self._restored.pop(tab, None)
            self._cut_short.pop(tab, None)
            if self.current == tab:  # `/follow_up` continues the last one started, or none: never an older one
                self.current = None


def holding(chats: Conversations, concepts) -> list[str]:
    """The tabs whose conversation knows one of `concepts` (by identity)."""
    held = {id(concept) for concept in concepts}
    return [tab for tab in TABS if any(id(c) in held for c in getattr(chats.get(tab), "concepts", ()))]


STOPPED = " (stopped)"
"""After an answer a Stop cut short, in the chat view."""


def messages(turns, question: str | None = None, partial: str | None = None) -> list[dict]:
    """The chat view's value: each (question, answer) turn as a user and an assistant message (an answer a Stop
    ended marked so: `Answer.stopped`), then the question being answered with its answer so far."""
    shown = []
    for asked, answered in list(turns) + ([(question, partial or "")] if question is not None else []):
        text = as_text(answered)
        if getattr(answered, "stopped", False):
            text = (text + STOPPED).strip()
        shown += [{"role": "user", "content": as_text(asked)}, {"role": "assistant", "content": text}]
    return shown


def as_text(text) -> str:
    """Visitor or model text for a chat view, shown as typed. The view renders no Markdown but still renders HTML
    (links, images, styles): a zero-width space after each "<" or "&" that could open a tag, a comment or an
    entity keeps them text. Not entities: the view's Copy button and its screen-reader label use the text as
    given, where "&lt;" would show."""
    return _MARKUP.sub("\\1\u200b", str(text))


_MARKUP = re.compile(r"([<&])(?=[A-Za-z/!?#])")
