"""space/conversations.py: a visitor's conversations as their chat views show them, and the Stop of an answer in
flight. (The conversations here are stand-ins holding turns: what is tested is the bookkeeping, not the model.)"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from space.conversations import Conversations, messages


def conversation(*turns):
    return SimpleNamespace(turns=list(turns), held_bytes=0, concepts=())


class Cut(str):
    """An answer a Stop ended (`ego.Answer.stopped`)."""

    stopped = True


def test_follow_ups_cut_short_show_until_the_worker_is_done_with_them():
    chats = Conversations()
    chat = conversation(("Is there a cat?", "Yes."))
    chats.start("image", chat)
    wall, floor = threading.Event(), threading.Event()
    chats.cut_short("image", chat, "And the wall?", Cut("It is"), wall)
    chats.cut_short("image", chat, "And the floor?", Cut("Wo"), floor)  # asked before the wall's was recorded
    assert [q for q, _ in chats.turns("image")] == ["Is there a cat?", "And the wall?", "And the floor?"]
    assert messages(chats.turns("image"))[3] == {"role": "assistant", "content": "It is (stopped)"}
    chat.turns.append(("And the wall?", Cut("It is white")))  # the worker records the wall's turn, then is done
    wall.set()
    assert [str(a) for _, a in chats.turns("image")] == ["Yes.", "It is white", "Wo"]
    floor.set()  # the floor's batch failed: no turn comes, and it is not shown as the conversation's
    assert [str(a) for _, a in chats.turns("image")] == ["Yes.", "It is white"]


def test_a_cut_short_turn_of_another_conversation_or_already_settled_is_not_shown():
    chats = Conversations()
    chat = conversation(("Is there a cat?", "Yes."))
    chats.start("image", chat)
    done = threading.Event()
    done.set()
    chats.cut_short("image", chat, "Late?", Cut("No"), done)  # the worker was done with it already
    chats.cut_short("image", conversation(), "Other?", Cut("No"), threading.Event())  # not the tab's conversation
    assert chats.turns("image") == [("Is there a cat?", "Yes.")]
    chats.cut_short("image", chat, "And the wall?", Cut("It is"), threading.Event())
    chats.start("image", conversation(("New photo?", "Yes.")))  # a new conversation: the old one's turn goes
    assert chats.turns("image") == [("New photo?", "Yes.")]
    chats.end("image")
    assert chats.turns("image") == []


def test_stop_asks_the_answers_in_flight_to_end_and_waits_for_them():
    chats = Conversations()
    assert chats.stop("image", wait_s=0) is True  # nothing answered: nothing to wait for
    earlier = chats.answer_in_flight("image")
    chats.answer_ended("image", earlier)
    answer = chats.answer_in_flight("image")
    other_browser_tab = chats.answer_in_flight("image")  # the session open in two browser tabs
    video = chats.answer_in_flight("video")

    def answering(one):
        one.stop.wait(5)
        time.sleep(0.05)  # the handler returns its last view
        chats.answer_ended("image", one)

    threads = [threading.Thread(target=answering, args=(one,)) for one in (answer, other_browser_tab)]
    for thread in threads:
        thread.start()
    assert chats.stop("image", wait_s=5) is True and answer.ended.is_set() and other_browser_tab.ended.is_set()
    for thread in threads:
        thread.join(5)
    assert not earlier.stop.is_set() and not video.stop.is_set()  # an answer that had ended, another tab's
    stuck = chats.answer_in_flight("image")
    started = time.monotonic()
    assert chats.stop("image", wait_s=0.2) is False and stuck.stop.is_set()
    assert time.monotonic() - started < 2
    fresh = chats.answer_in_flight("image")
    assert not fresh.stop.is_set()  # each message its own Stop


def test_messages_mark_what_a_stop_ended_and_keep_visitor_text_as_text():
    shown = messages([("<b>hi</b>", Cut("It is")), ("More?", "Yes.")], "And?", "Th")
    assert [m["content"] for m in shown] == ["<\u200bb>hi<\u200b/b>", "It is (stopped)", "More?", "Yes.", "And?", "Th"]
    assert [m["role"] for m in shown] == ["user", "assistant"] * 3
