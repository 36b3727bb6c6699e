"""The Space's answer scheduler: visitors who ask together are answered by one batched generation, each with
their own stream and Stop."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import photo, tiny_engine

from ego import InputError
from space.scheduler import AnswerScheduler, compiled_batch_size

SMALL = dict(query_image_max_pixels=224 * 224, reference_max_pixels=224 * 224)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("qwen2.5-vl").with_settings(**SMALL)


@pytest.fixture(scope="module")
def asks(engine):
    """Four visitors' questions (question, concepts, photo, budget) and their answers asked alone."""
    cat = engine.introduce("Chelsea", [photo(1)], keywords="cat", area_pct=8)
    mug = engine.introduce("Mug", [photo(2)], keywords="mug", area_pct=4)
    asks = [
        ("Is Chelsea here?", (cat,), photo(3), 6),
        ("What is on the table next to the mug?", (cat, mug), photo(4), 9),
        ("Hi", (), None, 4),
        ("Where is the mug?", (mug,), photo(5), 7),
    ]
    lone = [str(engine.answer(q, c, image=i, max_new_tokens=n)) for q, c, i, n in asks]
    return asks, lone


def visit_together(scheduler, engine, asks, *, before=None):
    """Each question from a thread of its own (like Gradio's handler threads), all started together; per visitor
    the list of texts streamed, or the error raised."""
    seen: list = [None] * len(asks)
    start = threading.Barrier(len(asks))

    def visitor(index, question, concepts, image, budget):
        start.wait()
        texts = []
        try:
            stream = scheduler.stream(engine, question, concepts, image=image, max_new_tokens=budget)
            for answer in stream:
                texts.append(str(answer))
                if before is not None and before(index, texts):
                    stream.close()
                    break
            seen[index] = texts
        except Exception as error:  # noqa: BLE001 -- the test looks at it
            seen[index] = error

    threads = [threading.Thread(target=visitor, args=(i, *ask)) for i, ask in enumerate(asks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return seen


def test_visitors_who_ask_together_share_one_batch_and_get_their_own_answers(engine, asks):
    questions, lone = asks
    scheduler = AnswerScheduler(window_s=2.0, max_batch=8)
    seen = visit_together(scheduler, engine, questions)
    assert list(scheduler.batch_sizes) == [4]
    assert [texts[-1] for texts in seen] == lone
    for texts in seen:
        assert all(b.startswith(a.rstrip()) for a, b in zip(texts, texts[1:]))  # each visitor's own stream


def test_the_batch_size_is_capped(engine, asks):
    questions, lone = asks
    scheduler = AnswerScheduler(window_s=2.0, max_batch=3)
    seen = visit_together(scheduler, engine, questions)
    assert sorted(scheduler.batch_sizes) == [1, 3]
    assert [texts[-1] for texts in seen] == lone


def test_compiled_decoding_gets_batches_of_powers_of_two():
    assert [compiled_batch_size(n) for n in range(1, 10)] == [1, 2, 2, 4, 4, 4, 4, 8, 8]


def test_with_compiled_decoding_the_scheduler_uses_only_powers_of_two(engine, asks, monkeypatch):
    """Three visitors together: a batch of 2, then the third first in the next one, each answer as alone. (The
    decoder is only said to be compiled: the batch sizes are the scheduler's choice, the decoding stays eager.)"""
    questions, lone = asks
    monkeypatch.setattr(type(engine.decoder), "compiled", property(lambda decoder: decoder is engine.decoder))
    scheduler = AnswerScheduler(window_s=2.0, max_batch=8)
    seen = visit_together(scheduler, engine, questions[:3])
    assert list(scheduler.batch_sizes) == [2, 1]
    assert [texts[-1] for texts in seen] == lone[:3]


def test_one_visitors_stop_ends_only_their_answer(engine, asks):
    questions, lone = asks
    scheduler = AnswerScheduler(window_s=2.0, max_batch=8)
    seen = visit_together(scheduler, engine, questions, before=lambda index, texts: index == 1 and len(texts) == 2)
    assert len(seen[1]) == 2 and lone[1].startswith(seen[1][-1].strip())
    assert [seen[i][-1] for i in (0, 2, 3)] == [lone[i] for i in (0, 2, 3)]
    # the model is free again: the next question is answered
    assert list(scheduler.stream(engine, *questions[2][:2], image=None, max_new_tokens=4))[-1] == lone[2]


def test_a_stop_event_ends_the_answer_as_far_as_it_came_and_a_waiting_question_without_one(engine, asks):
    """The Space's Stop sets the answer's event instead of closing its stream: the stream then ends by itself, its
    last answer the text so far marked `stopped`; a question stopped before its batch formed ends with no answer
    (its stream does not wait for one forever)."""
    questions, lone = asks
    question, concepts, image, _ = questions[1]
    scheduler = AnswerScheduler(window_s=0.0, max_batch=8)
    stop = threading.Event()
    pieces = []
    for answer in scheduler.stream(engine, question, concepts, image=image, max_new_tokens=9, stop=stop):
        pieces.append(answer)
        if len(pieces) == 2:
            stop.set()
    assert pieces[-1].stopped and len(pieces) <= 4 and lone[1].startswith(str(pieces[-1]).strip())
    assert not any(piece.stopped for piece in pieces[:-1])
    # Stopped before it was gathered (a Stop pressed while it waits for its batch): no answer, and the worker goes on.
    stopped_early = threading.Event()
    stopped_early.set()
    assert list(scheduler.stream(engine, question, concepts, image=image, max_new_tokens=9, stop=stopped_early)) == []
    assert list(scheduler.stream(engine, *questions[2][:2], image=None, max_new_tokens=4))[-1] == lone[2]


def test_a_stopped_answer_ends_without_waiting_for_its_batch(engine, asks, monkeypatch):
    """Another visitor's long answer keeps the batch going: a stopped one ends at once, as far as it came (the
    Space's Stop waits for it a few seconds at most), while the other goes on to its end."""
    questions, lone = asks
    scheduler = AnswerScheduler(window_s=2.0, max_batch=8)
    original = engine.answer_batch

    def slowly(requests, stops, on_text):  # each step of the batch takes a while, as on a busy GPU
        def handed(index, answer):
            time.sleep(0.05)
            on_text(index, answer)

        return original(requests, stops=stops, on_text=handed)

    monkeypatch.setattr(engine, "answer_batch", slowly)
    stop, ended_at, pieces = threading.Event(), {}, {0: [], 1: []}
    long_question, concepts, image, _ = questions[1]

    def visitor(index, budget, stopping):
        for answer in scheduler.stream(
            engine, long_question, concepts, image=image, max_new_tokens=budget, stop=stopping
        ):
            pieces[index].append(answer)
            if index == 0 and len(pieces[0]) == 2:
                stop.set()
        ended_at[index] = time.monotonic()

    threads = [
        threading.Thread(target=visitor, args=(0, 40, stop)),
        threading.Thread(target=visitor, args=(1, 40, None)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert pieces[0][-1].stopped and len(pieces[0]) <= 4 and not pieces[1][-1].stopped
    assert ended_at[1] - ended_at[0] > 0.5  # the stopped one did not wait for the other's end
    assert scheduler.batch_sizes[-1] == 2


def test_a_bad_question_fails_alone_and_the_worker_goes_on(engine, asks):
    questions, lone = asks
    bad = [questions[0], ("   ", (), photo(3), 5), questions[2]]
    scheduler = AnswerScheduler(window_s=2.0, max_batch=8)
    seen = visit_together(scheduler, engine, bad)
    assert isinstance(seen[1], InputError)
    assert [seen[0][-1], seen[2][-1]] == [lone[0], lone[2]]
    assert list(scheduler.stream(engine, *questions[2][:2], max_new_tokens=4))[-1] == lone[2]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="at least 1"):
        AnswerScheduler(window_s=0.1, max_batch=0)


def answer_batch_ends_the_worker(engine, monkeypatch) -> threading.Event:
    """The engine's next `answer_batch` ends the worker thread itself (not an error of the batch); the event is set
    when it happens."""

    class WorkerEnded(BaseException):
        pass

    ended = threading.Event()

    def end_the_worker(*args, **kwargs):
        ended.set()
        raise WorkerEnded

    monkeypatch.setattr(engine, "answer_batch", end_the_worker)
    return ended


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker's end, on purpose
def test_visitors_of_a_batch_that_ended_the_worker_are_told_even_after_another_worker_starts(engine, monkeypatch):
    """A worker ended by something other than an error of the batch: its visitors get an error at once, also
    when the next visitor has already started a new worker (before, they waited on the dead one forever)."""

    scheduler = AnswerScheduler(window_s=0.0, max_batch=2)
    ended = answer_batch_ends_the_worker(engine, monkeypatch)
    outcome = []

    def first_visitor():
        try:
            list(scheduler.stream(engine, "Hi", max_new_tokens=2))
        except RuntimeError as error:
            outcome.append(str(error))

    visitor = threading.Thread(target=first_visitor)
    visitor.start()
    assert ended.wait(timeout=30)
    scheduler._worker.join(timeout=10)
    monkeypatch.undo()
    scheduler._start()  # the next visitor's question starts a new worker before the first looks again
    visitor.join(timeout=10)
    assert not visitor.is_alive() and outcome == ["the answer scheduler's worker thread has ended"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker's end, on purpose
def test_follow_ups_gathered_with_first_questions_are_told_when_the_worker_ends(engine, monkeypatch):
    """First questions and follow-ups gathered together are two generations: a worker ended by the first leaves
    the second's visitors told, not waiting forever."""

    chat = engine.chat([], image=photo(6))
    chat.ask("What is this?", max_new_tokens=3)
    scheduler = AnswerScheduler(window_s=5.0, max_batch=2)
    ended = answer_batch_ends_the_worker(engine, monkeypatch)
    outcome = {}

    def visitor(name, stream):
        try:
            list(stream())
        except RuntimeError as error:
            outcome[name] = str(error)

    visitors = [
        threading.Thread(
            target=visitor, args=("first", lambda: scheduler.stream(engine, "Hi", max_new_tokens=2)), daemon=True
        ),
        threading.Thread(
            target=visitor,
            args=("follow-up", lambda: scheduler.stream_follow_up(engine, chat, "And then?", max_new_tokens=2)),
            daemon=True,  # were it left waiting, the test's end would not wait for it
        ),
    ]
    for thread in visitors:
        thread.start()
    assert ended.wait(timeout=30)
    scheduler._worker.join(timeout=10)
    monkeypatch.undo()
    scheduler._start()  # another visitor's question starts a new worker before these look again
    for thread in visitors:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in visitors)
    assert outcome == dict.fromkeys(("first", "follow-up"), "the answer scheduler's worker thread has ended")
    assert len(chat.turns) == 1  # its follow-up was never asked


def test_an_idle_worker_holds_nothing_of_the_last_batch(engine):
    """Once answered, a conversation the visitor has left is freed while the worker waits for the next question."""
    import gc
    import weakref

    scheduler = AnswerScheduler(window_s=0.0, max_batch=2)
    chat = engine.chat([], image=photo(7))
    chat.ask("What is this?", max_new_tokens=3)
    *_, answer = scheduler.stream_follow_up(engine, chat, "And then?", max_new_tokens=3)
    assert len(chat.turns) == 2 and str(answer) == str(chat.turns[1][1])
    left = weakref.ref(chat)
    del chat, answer
    gc.collect()
    assert scheduler._worker.is_alive() and left() is None
