"""The Space's answer scheduler: visitors who ask together are answered by one batched generation, each with
their own stream and Stop; closing it ends its worker thread and tells the visitors still waiting."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import photo, tiny_engine

from ego import InputError
from space.scheduler import SCHEDULER_CLOSED, AnswerScheduler, SchedulerClosedError, compiled_batch_size

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
    Space's Stop waits for it a few seconds at most), while the other goes on to its end. The test holds the batch
    from the Stop on, until the stopped visitor's stream has ended."""
    questions, _ = asks
    scheduler = AnswerScheduler(window_s=2.0, max_batch=8)
    original = engine.answer_batch
    stop, held, release, batch_ended = threading.Event(), threading.Event(), threading.Event(), threading.Event()

    def held_after_the_stop(requests, stops, on_text):
        handed_to_first = [0]

        def handed(index, answer):
            on_text(index, answer)
            handed_to_first[0] += stops[index] is stop  # the first visitor's row (the batch's rows come as prepared)
            if handed_to_first[0] >= 2 and not release.is_set():
                # The first visitor has two pieces and presses Stop on reading the second: from then on the batch
                # waits (as on a busy GPU) until the test lets it go on.
                assert stop.wait(timeout=60)
                held.set()
                assert release.wait(timeout=60)

        try:
            return original(requests, stops=stops, on_text=handed)
        finally:
            batch_ended.set()

    monkeypatch.setattr(engine, "answer_batch", held_after_the_stop)
    ended, pieces = {0: threading.Event(), 1: threading.Event()}, {0: [], 1: []}
    long_question, concepts, image, _ = questions[1]

    def visitor(index, budget, stopping):
        for answer in scheduler.stream(
            engine, long_question, concepts, image=image, max_new_tokens=budget, stop=stopping
        ):
            pieces[index].append(answer)
            if index == 0 and len(pieces[0]) == 2:
                stop.set()
        ended[index].set()

    threads = [
        threading.Thread(target=visitor, args=(0, 40, stop), daemon=True),
        threading.Thread(target=visitor, args=(1, 40, None), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        # the stopped stream ends while the batch is held after the Stop: it did not wait for the other's answer
        assert ended[0].wait(timeout=60)
        assert held.wait(timeout=60) and not batch_ended.is_set() and not ended[1].is_set()
        pieces_before = len(pieces[1])
    finally:
        release.set()
    for thread in threads:
        thread.join(60)
    assert ended[1].is_set() and len(pieces[1]) > pieces_before  # the other went on to its end
    assert pieces[0][-1].stopped and len(pieces[0]) <= 4 and not pieces[1][-1].stopped
    assert scheduler.batch_sizes[-1] == 2


def test_a_bad_question_fails_alone_and_the_worker_goes_on(engine, asks):
    questions, lone = asks
    bad = [questions[0], ("   ", (), photo(3), 5), questions[2]]
    scheduler = AnswerScheduler(window_s=2.0, max_batch=8)
    seen = visit_together(scheduler, engine, bad)
    assert isinstance(seen[1], InputError)
    assert [seen[0][-1], seen[2][-1]] == [lone[0], lone[2]]
    assert list(scheduler.stream(engine, *questions[2][:2], max_new_tokens=4))[-1] == lone[2]


def test_a_questions_photo_is_prepared_while_another_visitor_holds_the_model(engine, asks, monkeypatch):
    """A question's checks, photo and processor work run in its visitor's thread (`Ego.stage`) while the model
    answers someone else; so does a follow-up's first context that must be computed again (an adopted first answer).
    Bad input is refused there, without waiting for the model; a staging failure still settles a follow-up."""
    questions, lone = asks
    question, concepts, image, budget = questions[0]
    lone_answer = engine.answer(question, concepts, image=image, max_new_tokens=budget)
    adopted = engine.chat(concepts, image=image)
    adopted.adopt(question, lone_answer)
    prepared, encode = [], engine.backend.encode
    monkeypatch.setattr(engine.backend, "encode", lambda *a, **k: prepared.append(a[0]) or encode(*a, **k))
    scheduler = AnswerScheduler(window_s=0.0, max_batch=8)
    holding, release, outcome = threading.Event(), threading.Event(), {}

    def another_visitor():
        with engine.exclusive_use():  # the model busy with someone else's answer
            holding.set()
            release.wait(timeout=60)

    def ask(name, stream):
        outcome[name] = list(stream())[-1]

    holder = threading.Thread(target=another_visitor, daemon=True)
    holder.start()
    assert holding.wait(timeout=30)
    visitors = [
        threading.Thread(
            target=ask,
            args=("first", lambda: scheduler.stream(engine, question, concepts, image=image, max_new_tokens=budget)),
            daemon=True,
        ),
        threading.Thread(
            target=ask,
            args=("follow-up", lambda: scheduler.stream_follow_up(engine, adopted, "And then?", max_new_tokens=3)),
            daemon=True,
        ),
    ]
    for thread in visitors:
        thread.start()
    deadline = time.monotonic() + 30
    while len(prepared) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(prepared) == 2 and not outcome  # both prepared, neither answered: the model is still held
    with pytest.raises(InputError):
        next(scheduler.stream(engine, "   ", concepts, image=image, max_new_tokens=budget))
    release.set()
    for thread in visitors:
        thread.join(timeout=60)
    assert len(prepared) == 2  # nothing more in the model's turn
    assert str(outcome["first"]) == lone[0] and str(lone_answer) == lone[0]
    assert adopted.turns[-1][1] == outcome["follow-up"]
    settled = threading.Event()
    full = engine.with_settings(max_conversation_turns=2).chat(concepts, image=image)
    full.adopt(question, lone_answer)
    full.adopt("And then?", outcome["follow-up"])
    with pytest.raises(InputError, match="at most 2 questions"):
        next(scheduler.stream_follow_up(engine, full, "More?", max_new_tokens=2, settled=settled))
    assert settled.is_set()


def test_questions_asked_together_wait_for_each_others_preparation(engine, asks, monkeypatch):
    """The window counts when visitors asked: a question asked first whose photo takes longer to prepare still joins
    the batch of one asked with it and ready sooner; one asked after the window is not waited for; the wait for
    preparations is capped (`preparing_wait_s`)."""
    questions, lone = asks
    stage, slow = engine.stage, {"Where is the mug?": 1.0, "Hi": 1.0}

    def staged_slowly(request):
        time.sleep(slow.get(request.question, 0.0))  # a larger photo: longer in the processor
        return stage(request)

    monkeypatch.setattr(engine, "stage", staged_slowly)

    def answered(scheduler, asked, delays):
        seen = [None] * len(asked)

        def visitor(index):
            time.sleep(delays[index])
            question, concepts, image, budget = asked[index]
            seen[index] = list(scheduler.stream(engine, question, concepts, image=image, max_new_tokens=budget))[-1]

        threads = [threading.Thread(target=visitor, args=(i,), daemon=True) for i in range(len(asked))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return seen

    # The slow one first, the quick one 0.1 s later (within the window of 0.3 s); a third asked 0.6 s after the
    # first (past the window), still being prepared when the first two are ready: not waited for.
    together = AnswerScheduler(window_s=0.3, max_batch=8, preparing_wait_s=5.0)
    seen = answered(together, [questions[3], questions[0], questions[2]], [0.0, 0.1, 0.6])
    assert list(together.batch_sizes) == [2, 1] and [str(a) for a in seen] == [lone[3], lone[0], lone[2]]
    capped = AnswerScheduler(window_s=0.3, max_batch=8, preparing_wait_s=0.0)
    answered(capped, [questions[3], questions[0]], [0.0, 0.1])
    assert list(capped.batch_sizes) == [1, 1]


def test_a_question_being_prepared_when_the_scheduler_closes_is_told_and_starts_no_worker(engine, asks, monkeypatch):
    questions, _ = asks
    question, concepts, image, budget = questions[0]
    stage, preparing = engine.stage, threading.Event()

    def staged_slowly(request):
        preparing.set()
        time.sleep(0.5)
        return stage(request)

    monkeypatch.setattr(engine, "stage", staged_slowly)
    scheduler = AnswerScheduler(window_s=0.0, max_batch=8)
    list(scheduler.stream(engine, "Hi", max_new_tokens=2))  # a worker is running
    outcome = {}

    def visitor():
        try:
            list(scheduler.stream(engine, question, concepts, image=image, max_new_tokens=budget))
        except SchedulerClosedError as error:
            outcome["error"] = error

    asking = threading.Thread(target=visitor, daemon=True)
    asking.start()
    assert preparing.wait(timeout=30)
    assert scheduler.close(wait_s=10)
    asking.join(timeout=30)
    assert str(outcome["error"]) == SCHEDULER_CLOSED
    assert scheduler._worker is None  # no worker started for it
    monkeypatch.undo()
    assert list(scheduler.stream(engine, "Hi", max_new_tokens=2))  # a question asked after the close is answered


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
    scheduler._worker.thread.join(timeout=10)
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
    scheduler._worker.thread.join(timeout=10)
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
    assert scheduler._worker.thread.is_alive() and left() is None


def batches_wait_for(release: threading.Event, engine, monkeypatch) -> threading.Event:
    """The engine's batches of first questions begin only once `release` is set; the event returned is set when
    one is formed and waits (the batch in progress)."""
    original, formed = engine.answer_batch, threading.Event()

    def waiting(requests, stops, on_text):
        formed.set()
        assert release.wait(timeout=60)
        return original(requests, stops=stops, on_text=on_text)

    monkeypatch.setattr(engine, "answer_batch", waiting)
    return formed


def test_closing_lets_the_batch_in_progress_end_and_tells_the_waiting_visitors_at_once(engine, asks, monkeypatch):
    """Three visitors ask together under compiled decoding: two are answered in a batch, the third is carried to
    the next one; then a follow-up is queued. Closed during the batch, the carried and the queued visitors are
    told at once (the batch still going on), the batch's two get their answers, and the worker ends."""
    questions, lone = asks
    monkeypatch.setattr(type(engine.decoder), "compiled", property(lambda decoder: decoder is engine.decoder))
    release = threading.Event()
    formed = batches_wait_for(release, engine, monkeypatch)
    chat = engine.chat([], image=photo(8))
    chat.ask("What is this?", max_new_tokens=3)
    settled = threading.Event()
    scheduler = AnswerScheduler(window_s=2.0, max_batch=8)
    outcome, done = {}, {index: threading.Event() for index in range(4)}
    start = threading.Barrier(3)

    def visitor(index, stream, together=True):
        if together:
            start.wait()
        try:
            outcome[index] = [str(answer) for answer in stream()][-1]
        except Exception as error:  # noqa: BLE001 -- the test looks at it
            outcome[index] = error
        done[index].set()

    visitors = [
        threading.Thread(
            target=visitor,
            args=(i, lambda q=q, c=c, im=im, n=n: scheduler.stream(engine, q, c, image=im, max_new_tokens=n)),
            daemon=True,
        )
        for i, (q, c, im, n) in enumerate(questions[:3])
    ]

    def follow_up():
        return scheduler.stream_follow_up(engine, chat, "And then?", max_new_tokens=3, settled=settled)

    visitors.append(threading.Thread(target=visitor, args=(3, follow_up, False), daemon=True))
    for thread in visitors[:3]:
        thread.start()
    assert formed.wait(timeout=30)
    worker = scheduler._worker
    visitors[3].start()
    deadline = time.monotonic() + 10
    while worker.waiting.qsize() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.waiting.qsize() == 1 and len(worker.carried) == 1

    scheduler.close()
    assert done[3].wait(timeout=10) and settled.is_set() and len(chat.turns) == 1  # its follow-up was never asked
    deadline = time.monotonic() + 10
    while not any(done[index].is_set() for index in range(3)) and time.monotonic() < deadline:
        time.sleep(0.01)
    told = [index for index in range(3) if done[index].is_set()]
    assert len(told) == 1 and not release.is_set()  # the carried visitor was told while the batch waited
    for index in (*told, 3):
        assert isinstance(outcome[index], SchedulerClosedError) and str(outcome[index]) == SCHEDULER_CLOSED
    assert worker.thread.is_alive()  # still on its batch

    release.set()
    for thread in visitors:
        thread.join(timeout=60)
    answered = [index for index in range(3) if index not in told]
    assert [outcome[index] for index in answered] == [lone[index] for index in answered]
    assert list(scheduler.batch_sizes) == [2]
    assert scheduler.close(wait_s=30) and not worker.thread.is_alive()


def test_a_closed_scheduler_ends_its_worker_and_a_later_question_starts_a_new_one(engine, asks):
    """Closing ends the worker thread (idle, it waits for no batch); closing again changes nothing; a question
    asked later (closed Blocks launched again) is answered by a new worker, which the next close ends too."""
    questions, lone = asks
    question, concepts, image, budget = questions[2]
    scheduler = AnswerScheduler(window_s=0.0, max_batch=2)
    assert scheduler.close(wait_s=1)  # never used: nothing to end
    assert [str(a) for a in scheduler.stream(engine, question, concepts, max_new_tokens=budget)][-1] == lone[2]
    first = scheduler._worker.thread
    assert scheduler.close(wait_s=30) and not first.is_alive()
    assert scheduler.close(wait_s=1) and scheduler._worker is None
    assert [str(a) for a in scheduler.stream(engine, question, concepts, max_new_tokens=budget)][-1] == lone[2]
    second = scheduler._worker.thread
    assert second is not first and second.is_alive()
    assert scheduler.close(wait_s=30) and not second.is_alive()
