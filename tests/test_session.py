"""space/session.py: one visitor's concepts; refused changes change nothing."""

from __future__ import annotations

import copy
import gc
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from ego.errors import InputError
from ego.memory import Concept, ConceptView
from space.session import Entry, MemoryBudget, Session, forget

THUMB = Image.new("RGB", (8, 8))


def entry(name: str, tokens: int = 3) -> Entry:
    view = ConceptView(
        token_indices=torch.arange(tokens),
        scores=torch.rand(16),
        grid=(4, 4),
        k=tokens,
        area_pct=10.0,
        keywords=("cat",),
        description="a cat",
    )
    return Entry(Concept(name, torch.zeros(tokens, 8), "tiny", (view,)), THUMB)


def test_each_visitor_gets_an_independent_copy_of_the_default():
    default = Session()
    a, b = copy.deepcopy(default), copy.deepcopy(default)
    a.add([entry("Chelsea")], 5)
    assert a.names == ["Chelsea"] and b.names == [] and default.names == []
    assert a._lock is not b._lock


def test_names_are_unique_without_case_or_spacing():
    session = Session()
    session.add([entry("Chelsea")], 5)
    with pytest.raises(
        InputError, match="already have a concept named '\u2068Chelsea\u2069'.*Remove it first.*another"
    ):
        session.add([entry(" chelsea ")], 5)
    with pytest.raises(InputError, match="The name '\u2068BO\u2069' appears more than once"):
        session.add([entry("Bo"), entry("BO")], 5)
    assert session.names == ["Chelsea"]


def test_names_that_look_alike_are_one_name():
    """A "Café" with an accented letter and one with a combining accent, or a full-width "Ｆish" and "fish", look
    alike and are one name to the engine (which finds names in questions compatibility-normalised): one concept."""
    session = Session()
    session.add([entry("Caf\u00e9"), entry("fish")], 5)
    for twin in ("Cafe\u0301", "CAFE\u0301", "\uff26ish"):
        with pytest.raises(InputError, match="already have a concept named"):
            session.add([entry(twin)], 5)
        assert session.has(twin)
    assert session.names == ["Caf\u00e9", "fish"]


@pytest.mark.parametrize(
    "kept, typed",
    [
        ("\U0001f469\u200d\U0001f4bb coder", "\U0001f469\U0001f4bb coder"),  # emoji joined, or typed apart
        ("\U0001f469\U0001f4bb coder", "\U0001f469\u200d\U0001f4bb coder"),  # a name kept without its joiner
        # a Persian word written with its zero-width non-joiner, and typed without it
        ("\u06a9\u062a\u0627\u0628\u200c\u062e\u0627\u0646\u0647", "\u06a9\u062a\u0627\u0628\u062e\u0627\u0646\u0647"),
        ("\u2615\ufe0f mug", "\u2615 mug"),  # the emoji selector a phone's keyboard adds, or not
    ],
)
def test_invisible_characters_never_tell_names_apart(kept, typed):
    """A name with or without its zero-width joiners or variation selectors is one name: taken, found and removed as
    one. (A flag's tags are not invisible in this sense: they tell England's flag from Scotland's.)"""
    session = Session()
    session.add([entry(kept)], 5)
    assert session.has(typed)
    with pytest.raises(InputError, match="already have a concept named"):
        session.add([entry(typed)], 5)
    session.remove(typed)
    assert session.names == []


def test_right_to_left_names_in_a_refusal_are_set_apart():
    """Each name between direction isolates: listed together, "ميمي" and "כלב 3" keep their order and their
    numbers, and the sentence around them reads left to right."""
    session = Session()
    session.add([entry("ميمي"), entry("כלב 3")], 5)
    with pytest.raises(InputError) as refused:
        session.add([entry("ميمي"), entry("כלב 3")], 5)
    assert str(refused.value).startswith(
        "You already have concepts named '\u2068ميمي\u2069', '\u2068כלב 3\u2069'. Remove them "
    )


def test_the_concept_limit_is_all_or_nothing():
    session = Session()
    session.add([entry("a"), entry("b")], 3)
    with pytest.raises(InputError, match="at most 3 concepts.*room for 1 more"):
        session.add([entry("c"), entry("d")], 3)
    assert session.names == ["a", "b"]
    session.add([entry("c")], 3)
    assert len(session) == 3 and session.memory_tokens == 9


def test_a_name_being_introduced_is_held_with_its_place_until_added_or_given_up():
    """A second tab's (or a script's) request for a name being introduced, or for the place it will take, is
    refused at once; the request that reserved it adds it; a failed introduction gives both back."""
    session = Session()
    session.add([entry("a")], 3)
    with session.reserving(["Mug"], 3) as held:
        assert session.is_coming(" mug") and session.coming == 1
        with pytest.raises(InputError, match="A concept named '\u2068MUG\u2069' is being introduced in your session"):
            session.check_room(["MUG"], 3)
        with pytest.raises(InputError, match=r"you have 1 \(1 more being introduced\); there is room for 1 more"):
            session.add([entry("b"), entry("c")], 3)
        session.add([entry("b")], 3)
        with pytest.raises(InputError, match="is being introduced"):
            session.add([entry("Mug")], 3)  # not the request that reserved it
        session.add([entry("Mug")], 3, held=held)
    assert session.names == ["a", "b", "Mug"] and session.coming == 0
    with pytest.raises(RuntimeError), session.reserving(["c"], 4):
        raise RuntimeError("the model failed")
    assert not session.is_coming("c") and session.coming == 0
    session.check_room(["c"], 4)


def test_remove_and_clear():
    session = Session()
    session.add([entry("a"), entry("b")], 5)
    with pytest.raises(InputError):
        session.remove("zzz")
    session.remove("A")
    assert session.names == ["b"]
    session.clear()
    assert session.names == [] and session.concepts == ()


def test_export_files_are_replaced_once_written_and_deleted_on_close():
    session = Session()
    with session.export_file() as first:
        first.write_bytes(b"x")
    with pytest.raises(OSError), session.export_file() as failed:
        raise OSError("disk full")  # a write that fails: the previous export stays
    assert first.exists() and not failed.parent.exists()
    with session.export_file() as second:
        assert first.exists()  # a second export does not take the first's file away while it is written
        second.write_bytes(b"x")
    assert not first.exists() and first.parent != second.parent
    outcome = []

    def export_slowly(mark):
        with session.export_file() as path:
            time.sleep(0.2)
            path.write_bytes(mark)
            outcome.append(path.read_bytes() == mark)

    clicks = [threading.Thread(target=export_slowly, args=(mark,)) for mark in (b"1", b"2")]
    for click in clicks:
        click.start()
    for click in clicks:
        click.join()
    assert outcome == [True, True]  # a double click: one export after the other, each written whole
    second = Path(session._export_dir) / second.name
    session.add([entry("a")], 5)
    forget(session)
    assert not os.path.exists(second.parent) and session.names == []
    forget(None)  # a state that never held a Session


# ----------------------------------------------------------------------------------------------
# The budget all sessions share
# ----------------------------------------------------------------------------------------------
def tensor_bytes(tokens: int = 3) -> int:
    """Recomputed by hand: float32 rows [tokens, 8], float32 scores [16], int64 kept indices [tokens], an 8x8
    RGB thumbnail."""
    return tokens * 8 * 4 + 16 * 4 + tokens * 8 + 8 * 8 * 3


def entry_bytes(tokens: int = 3, name: str = "x") -> int:
    """What an entry like the budget tests' ones is counted as (the names of one test have one length)."""
    return entry(name, tokens).nbytes


def test_entry_and_session_bytes_count_rows_scores_indices_thumbnail_and_text():
    session = Session()
    session.add([entry("Chelsea", 3), entry("Mug", 5)], 5)
    for tokens in (3, 5):
        text = len("x") + len("tiny") + len("cat") + len("a cat") + len("model") * 2
        assert tensor_bytes(tokens) + text <= entry("x", tokens).nbytes <= tensor_bytes(tokens) + 2048
    assert session.nbytes == entry("Chelsea", 3).nbytes + entry("Mug", 5).nbytes


def test_every_string_a_concept_holds_is_counted():
    """A concept with many long keywords and a long description holds that text: the budget must see it."""
    small = entry("x")
    view = small.concept.views[0]
    words = tuple(f"{number:04d}" + "w" * 96 for number in range(1000))  # 100,000 characters
    big_view = ConceptView(
        token_indices=view.token_indices,
        scores=view.scores,
        grid=view.grid,
        k=view.k,
        area_pct=view.area_pct,
        keywords=words,
        description="d" * 50_000,
    )
    big = Entry(Concept("x", small.concept.embeddings, "tiny", (big_view,)), THUMB)
    assert big.nbytes - small.nbytes >= 100_000 + 50_000


def test_the_budget_is_shared_by_all_sessions_and_a_refusal_changes_nothing():
    budget = MemoryBudget(3 * entry_bytes())
    first, second = Session(), Session()
    first.add([entry("A"), entry("B")], 10, budget)
    second.add([entry("C")], 10, budget)
    assert budget.held() == 3 * entry_bytes()
    with pytest.raises(InputError, match="as many concepts as it can.*your concepts are unchanged"):
        second.add([entry("D")], 10, budget)
    with pytest.raises(InputError):
        budget.check()  # spent: checked before any model work
    assert first.names == ["A", "B"] and second.names == ["C"]


def test_room_comes_back_when_a_session_is_removed_from_closed_or_dropped():
    budget = MemoryBudget(2 * entry_bytes())
    kept, dropped = Session(), Session()
    kept.add([entry("A")], 10, budget)
    dropped.add([entry("B")], 10, budget)
    with pytest.raises(InputError):
        kept.add([entry("C")], 10, budget)
    kept.remove("A")
    kept.add([entry("C")], 10, budget)
    dropped.close()  # the time-to-live's callback
    kept.add([entry("D")], 10, budget)
    kept.clear()
    third = Session()
    third.add([entry("E"), entry("F")], 10, budget)
    del third  # Gradio drops a session without a callback (LRU eviction)
    gc.collect()
    assert budget.held() == 0
    kept.add([entry("G"), entry("H")], 10, budget)


def test_many_sessions_adding_at_once_never_pass_the_budget():
    budget = MemoryBudget(10 * entry_bytes(name="0-0"))
    sessions = [Session() for _ in range(8)]
    refused = []

    def fill(session: Session, number: int):
        for i in range(4):
            try:
                session.add([entry(f"{number}-{i}")], 10, budget)
            except InputError:
                refused.append(number)

    threads = [threading.Thread(target=fill, args=(s, n)) for n, s in enumerate(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sum(len(s) for s in sessions) == 10 and len(refused) == 8 * 4 - 10
    assert budget.held() == 10 * entry_bytes(name="0-0")


def test_a_late_first_answer_the_budget_refuses_leaves_the_visitors_newer_conversation():
    """A first answer the visitor moved on from is not kept, and not weighed against the conversation budget either:
    its refusal would end the conversation the visitor has now."""
    from types import SimpleNamespace

    session = Session()
    budget = MemoryBudget(1000, held_by=lambda held: held.conversations.nbytes)
    first, second = session.conversations.asking("image"), session.conversations.asking("image")
    newer = SimpleNamespace(held_bytes=600, concepts=(), turns=[("q", "a")])
    assert session.keep_conversation("image", newer, budget, second) is True
    late = SimpleNamespace(held_bytes=1500, concepts=(), turns=[("q", "a")])
    assert session.keep_conversation("image", late, budget, first) is None
    assert session.conversations.get("image") is newer


def test_a_first_answer_about_a_removed_concept_leaves_no_older_conversation_to_follow_up():
    """The visitor asked about another photo, and removed a concept that answer knew while it was answered: that
    conversation is not kept, and the older one of the tab is not followed up in its place."""
    from types import SimpleNamespace

    session = Session()
    budget = MemoryBudget(10_000, held_by=lambda held: held.conversations.nbytes)
    older = SimpleNamespace(held_bytes=10, concepts=(), turns=[("about photo A", "a")])
    assert session.keep_conversation("image", older, budget, session.conversations.asking("image")) is True
    removed = SimpleNamespace(name="Chelsea")  # a concept the session no longer holds
    newer = SimpleNamespace(held_bytes=10, concepts=(removed,), turns=[("about photo B", "b")])
    assert session.keep_conversation("image", newer, budget, session.conversations.asking("image")) is None
    assert session.conversations.get("image") is None and session.conversations.current is None
    # A question overtaken by a later one ends nothing: the later one's conversation stays.
    late = session.conversations.asking("image")
    kept = SimpleNamespace(held_bytes=10, concepts=(), turns=[("about photo C", "c")])
    assert session.keep_conversation("image", kept, budget, session.conversations.asking("image")) is True
    session.conversations.end("image", late)
    assert session.conversations.get("image") is kept


def test_closing_a_session_ends_its_conversations():
    """A session let go (expired, or dropped beyond `max_sessions`) frees its conversations too: each holds a photo
    or clip and a key/value cache, counted against the memory every session shares."""
    session = Session()
    for tab in ("image", "video"):
        assert session.conversations.start(tab, object())
    session.close()
    assert [session.conversations.get(tab) for tab in ("image", "video")] == [None, None]
    assert session.conversations.current is None
