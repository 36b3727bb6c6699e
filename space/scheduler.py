"""Questions that arrive together are answered together: one batched generation for several visitors.

Decoding is host-bound (`bench/RESULTS.md`): one decode step for eight sequences costs about what one costs. So
the Space does not answer questions strictly one after another. Each visitor's handler (a Gradio worker thread)
puts its question in one queue and reads its own answer back as it grows; one worker thread owns the model calls:
it takes the first waiting question, waits up to `answer_batch_window_s` for more (up to `answer_batch_max_size`
in all; and for those asked within that window of it that are still being prepared, up to
`answer_batch_preparing_wait_s`), and answers them with one `Ego.answer_batch` for first questions and one
`Ego.follow_up_batch` for follow-ups of conversations. A question's work that needs no model (its checks, its photo
or clip decoded and resized by the processor; a follow-up's first context where it must be computed again:
`Ego.stage`) is done in its visitor's thread before it joins the queue, side by side with the other visitors' and
with the model's work. Every visitor keeps their own stream: the worker hands each answer's text to its visitor as
it grows, and a visitor's Stop (the handler's generator being closed) ends only that visitor's answer, in the queue
or in the batch.

Gradio's own `batch=True` is not used: a batched Gradio function returns whole outputs, it cannot stream each
visitor's answer or stop one of them. Introductions do not come here: each is one model call of its own
(docs/scaling.md).

`AnswerScheduler.close` ends the worker thread after the batch in progress, whose visitors still get their answers;
the questions still waiting (queued, or still being prepared) end with a sentence (`SchedulerClosedError`). A
question asked after that starts a new worker: a Space's Blocks closed and launched again keep their scheduler, and
its visitors must be answered.
"""

from __future__ import annotations

import collections
import copy
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ego import Answer
from ego.batching import AnswerRequest, FollowUpRequest

log = logging.getLogger("ego.space")
WORKER_ENDED = "the answer scheduler's worker thread has ended"
SCHEDULER_CLOSED = (
    "The Space stopped answering (it is being shut down or restarted) before this question's turn came, so it was "
    "not answered: ask it again in a moment."
)


class SchedulerClosedError(RuntimeError):
    """The scheduler was closed before this question's batch began (`AnswerScheduler.close`); asking again is
    answered, by a new worker."""


@dataclass
class _Ticket:
    """One visitor's question on its way through the scheduler."""

    engine: object
    request: AnswerRequest | FollowUpRequest
    stop: threading.Event = field(default_factory=threading.Event)
    asked_at: float = field(default_factory=time.monotonic)
    """When its visitor asked (`time.monotonic`), before its preparation: what the batch window counts."""
    closes: int = 0
    """How many times the scheduler had been closed when it was asked: a close during its preparation ends it."""
    settled: threading.Event = field(default_factory=threading.Event)
    """Set once the worker is done with it (answered, failed or dropped), after a follow-up's turn is recorded."""
    updates: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    """("text", Answer so far), then ("done", Answer) or ("error", exception); ("dropped", None) for a question
    stopped before its batch was formed."""


_POLL_S = 0.1
"""How often a stream waiting for its next piece looks at its Stop and at the worker."""

_CLOSING = object()
"""Put on a closed worker's queue after its questions were taken, to wake the worker if it waits for one."""


class _Worker:
    """One worker thread with the questions waiting for it. A closed scheduler's worker finishes its batch while
    the questions asked after the close wait for the next worker, in a queue of their own."""

    def __init__(self, serve):
        self.waiting: queue.SimpleQueue[_Ticket] = queue.SimpleQueue()
        self.carried: list[_Ticket] = []
        """Questions gathered for a batch but left for the next one (compiled decoding's batch sizes)."""
        self.carrying = threading.Lock()
        """Guards `carried`: `AnswerScheduler.close` takes its questions while the worker may be adding to it."""
        self.closing = False
        """Set by `AnswerScheduler.close`: the worker ends after its batch and answers nothing more."""
        self.thread = threading.Thread(target=serve, args=(self,), name="ego-answers", daemon=True)

    def ended_error(self) -> Exception:
        """What a question this worker will never answer ends with."""
        return SchedulerClosedError(SCHEDULER_CLOSED) if self.closing else RuntimeError(WORKER_ENDED)


def cut_short(answer):
    """`answer` as its visitor's Stop left it: a copy marked so (`Answer.stopped`), which the chat view says
    whenever it is shown again. (A text without an Answer's fields stays as it is.)"""
    if not isinstance(answer, Answer):
        return answer
    marked = copy.copy(answer)
    marked.stopped = True
    return marked


def compiled_batch_size(waiting: int) -> int:
    """The largest power of two not above `waiting` (at least 1): the batch sizes compiled decoding uses."""
    return 1 << (max(1, int(waiting)).bit_length() - 1)


class AnswerScheduler:
    """One queue of questions and one worker thread that answers them in batches (see the module's text)."""

    def __init__(self, window_s: float, max_batch: int, preparing_wait_s: float = 1.0):
        if max_batch < 1 or window_s < 0 or preparing_wait_s < 0:
            raise ValueError(
                "answer_batch_max_size must be at least 1, answer_batch_window_s and answer_batch_preparing_wait_s "
                "at least 0."
            )
        self.window_s, self.max_batch, self.preparing_wait_s = float(window_s), int(max_batch), float(preparing_wait_s)
        self._preparing: dict[int, float] = {}
        """id(ticket) -> when it was asked, for the questions being prepared in their visitors' threads."""
        self._prepared = threading.Condition()
        """Guards `_preparing`; notified as each question, prepared, joins the queue."""
        self._closes = 0
        """How many times `close` was called: a question being prepared across a close was waiting when it came."""
        self._worker: _Worker | None = None
        """The worker new questions go to; None before the first question and after `close`."""
        self._closed: list[_Worker] = []
        """Closed workers that may still be finishing their batch (`close` waits for them)."""
        self._lock = threading.Lock()
        """Guards which worker is the current one (a question's start against `close`)."""
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1024)
        """The sizes of the last 1,024 batches answered (the server log says each)."""

    def stream(
        self,
        engine,
        question,
        concepts=(),
        *,
        image=None,
        video=None,
        max_new_tokens=None,
        stop=None,
        keep_context=False,
    ) -> Iterator:
        """Like `engine.stream_answer`: the answer's text so far as it grows (`ego.Answer`), the whole answer
        last; closing the iterator, or setting `stop` (a `threading.Event`), ends this answer alone (set, it ends
        as an answer does, marked `stopped`; a question not answered yet ends without one). keep_context: the whole
        answer brings its context along for the conversation that adopts it (`AnswerRequest.keep_context`)."""
        request = AnswerRequest(question, tuple(concepts), image, video, max_new_tokens, keep_context=keep_context)
        return self._stream(_Ticket(engine, request, stop=stop or threading.Event()))

    def stream_follow_up(self, engine, chat, question, *, max_new_tokens=None, stop=None, settled=None) -> Iterator:
        """Like `chat.stream`: a follow-up in the conversation `chat`, answered with other visitors' follow-ups; the
        conversation records its turn (the answer so far, after a Stop) when their batch ends, and `settled` (a
        `threading.Event`) is set then, or when the batch failed. One at a time per conversation: the caller waits
        for one to end before sending the next. `stop` as in `stream`."""
        request = FollowUpRequest(chat, question, max_new_tokens)
        return self._stream(
            _Ticket(engine, request, stop=stop or threading.Event(), settled=settled or threading.Event())
        )

    def close(self, wait_s: float = 0.0) -> bool:
        """Ends the worker thread after the batch in progress, whose visitors get their answers; the questions still
        waiting (queued, or carried to the next batch) end at once with `SchedulerClosedError`, and those still being
        prepared in their visitors' threads as their preparation ends. A question asked later starts a new worker:
        Gradio can launch closed Blocks again, with the same scheduler, and their visitors are answered then. Calling
        it again changes nothing. Waits up to `wait_s` seconds for the worker to end; returns whether every closed
        worker has ended."""
        with self._lock:
            self._closes += 1
            worker, self._worker = self._worker, None
            if worker is not None:
                worker.closing = True
                self._closed.append(worker)
            self._closed = [closed for closed in self._closed if closed.thread.is_alive()]
            ending = list(self._closed)
        if worker is not None:
            with self._prepared:  # a batch waiting for questions being prepared stops waiting
                self._prepared.notify_all()
            self._turn_away(worker)
            # After the questions are taken: a worker waiting for one wakes on this instead. A question put between
            # the two is taken by the worker, which sees `closing` and turns it away as it ends.
            worker.waiting.put(_CLOSING)
        deadline = time.monotonic() + wait_s
        for closed in ending:
            closed.thread.join(max(0.0, deadline - time.monotonic()))
        return not any(closed.thread.is_alive() for closed in ending)

    def _stream(self, ticket: _Ticket) -> Iterator:
        with self._lock:
            ticket.closes = self._closes
        with self._prepared:
            self._preparing[id(ticket)] = ticket.asked_at
        try:
            # Its checks and processor work now, in the visitor's own thread, while the model answers others: the
            # batch's turn then holds only model work (bad input is refused here, without waiting).
            ticket.request = ticket.engine.stage(ticket.request)
            worker = self._start(since=ticket.closes)
            worker.waiting.put(ticket)
        except BaseException:
            ticket.settled.set()  # nothing more comes of it: a follow-up's caller may wait for this
            raise
        finally:
            with self._prepared:  # after it is queued: a batch waiting for it finds it there
                del self._preparing[id(ticket)]
                self._prepared.notify_all()
        ended, last = False, None
        try:
            while True:
                try:
                    kind, value = ticket.updates.get(timeout=_POLL_S)
                except queue.Empty:
                    if ticket.stop.is_set():
                        # Stopped while its batch goes on (another visitor's answer may be long): it ends now, as far
                        # as it came; the worker ends its row at its next token (a follow-up's conversation records
                        # the turn when the batch ends).
                        ended = True
                        if last is not None:
                            yield cut_short(last)
                        return
                    if not worker.thread.is_alive() and ticket.updates.empty():  # nothing came just before it ended
                        raise worker.ended_error() from None
                    continue
                last = value if kind == "text" else last
                ended = kind != "text"
                if kind == "error":
                    raise value
                if kind == "dropped":
                    return
                yield value
                if ended:
                    return
        finally:
            if not ended:
                ticket.stop.set()  # a visitor who left or pressed Stop: their row ends, the others go on

    def _start(self, since: int | None = None) -> _Worker:
        """The worker this question goes to: the current one, or a new one (the first question, after `close`, or
        after a worker that ended). A question asked before a `close` (`since`: the closes before it was asked) that
        came during its preparation was waiting then: it ends as the questions waiting in the queue did."""
        with self._lock:
            if since is not None and self._closes != since:
                raise SchedulerClosedError(SCHEDULER_CLOSED)
            if self._worker is None or not self._worker.thread.is_alive():
                self._worker = _Worker(self._serve)
                self._worker.thread.start()
            return self._worker

    def _serve(self, worker: _Worker) -> None:
        try:
            while not worker.closing:
                # No local name for the batch: while the worker waits for the next question, nothing of the last
                # batch (a conversation and its cache, a photo or clip) stays alive here.
                self._answer(worker, self._gather(worker))
        finally:
            # Closed, or ended by something other than an error of a batch: the questions left are told now (a
            # later question goes to a new worker; these would wait on this one forever).
            self._turn_away(worker)

    def _turn_away(self, worker: _Worker) -> None:
        """Ends every question still waiting for `worker` (queued or carried) with `worker.ended_error()`; one whose
        visitor has left is dropped."""
        with worker.carrying:
            left, worker.carried = worker.carried, []
        while True:
            try:
                left.append(worker.waiting.get_nowait())
            except queue.Empty:
                break
        for ticket in left:
            if ticket is _CLOSING:
                continue
            ticket.updates.put(("dropped", None) if ticket.stop.is_set() else ("error", worker.ended_error()))
            ticket.settled.set()

    def _gather(self, worker: _Worker) -> list[_Ticket]:
        """The first waiting question, and those that arrive within the window after it (up to the maximum), and
        those asked within the window of it that are still being prepared (each visitor's photo is resized in their
        own thread, and a larger one takes longer: the window counts when visitors asked, not when their questions
        were ready), waited for up to `preparing_wait_s`; questions whose visitor left while they waited are dropped.
        Nothing, once the worker is closing."""
        with worker.carrying:
            batch, worker.carried = worker.carried, []
        batch = batch or [worker.waiting.get()]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch and not worker.closing:
            remaining = deadline - time.monotonic()
            try:
                batch.append(worker.waiting.get(timeout=remaining) if remaining > 0 else worker.waiting.get_nowait())
            except queue.Empty:
                break
        self._wait_for_preparing(worker, batch)
        batch = [ticket for ticket in batch if ticket is not _CLOSING]
        if worker.closing:  # closed while these were gathered: they are turned away as the worker ends
            with worker.carrying:
                worker.carried = batch + worker.carried
            return []
        kept = []
        for ticket in batch:
            if ticket.stop.is_set():
                ticket.updates.put(("dropped", None))  # its stream ends (a Stop's event may outlive the stream)
                ticket.settled.set()
            else:
                kept.append(ticket)
        return kept

    def _wait_for_preparing(self, worker: _Worker, batch: list) -> None:
        """Adds to `batch` the questions asked within the window of its first that were still being prepared, as
        they join the queue (and any other that joins meanwhile), for up to `preparing_wait_s`."""
        asked = [ticket.asked_at for ticket in batch if ticket is not _CLOSING]
        if not asked:
            return
        together, deadline = min(asked) + self.window_s, time.monotonic() + self.preparing_wait_s
        while len(batch) < self.max_batch and not worker.closing:
            try:
                batch.append(worker.waiting.get_nowait())
                continue
            except queue.Empty:
                pass
            with self._prepared:
                # A question stops counting as prepared only once it is queued: none is missed between the two. And
                # `close` sets `closing` before it notifies: read here, it cannot be missed while this waits.
                if worker.closing:
                    return
                if not any(at <= together for at in self._preparing.values()) and worker.waiting.empty():
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._prepared.wait(remaining)

    def _answer(self, worker: _Worker, batch: list[_Ticket]) -> None:
        if not batch:
            return
        engine = batch[0].engine
        same = [ticket for ticket in batch if ticket.engine is engine]
        for other in batch:
            if other.engine is not engine:  # another engine (not in the Space, which has one): a later batch
                worker.waiting.put(other)
        # First questions and follow-ups are two generations (a follow-up continues its conversation's cache).
        groups = [
            [ticket for ticket in same if isinstance(ticket.request, FollowUpRequest) == follow_ups]
            for follow_ups in (False, True)
        ]
        groups = [group for group in groups if group]
        if engine.decoder.compiled:
            # Each batch size costs the compiled decoder a CUDA graph and a static cache: only 1, 2, 4, 8, ... are
            # used, and the rest go first into the next batch.
            for group in groups:
                take = compiled_batch_size(len(group))
                with worker.carrying:
                    worker.carried += group[take:]
                del group[take:]
        for number, group in enumerate(groups):
            try:
                self._answer_together(engine, group)
            except BaseException:
                # The worker ends: the visitors of the groups not answered yet are told now, as `_answer_together`
                # told its own (a later visitor starts another worker; these would wait on this one forever).
                for ticket in (ticket for later in groups[number + 1 :] for ticket in later):
                    ticket.updates.put(("error", RuntimeError(WORKER_ENDED)))
                    ticket.settled.set()
                raise

    def _answer_together(self, engine, same: list[_Ticket]) -> None:
        """One batched generation for `same`: all first questions, or all follow-ups."""
        started = time.perf_counter()
        answer = engine.follow_up_batch if isinstance(same[0].request, FollowUpRequest) else engine.answer_batch
        try:
            results = answer(
                [t.request for t in same],
                stops=[t.stop for t in same],
                on_text=lambda index, answer: same[index].updates.put(("text", answer)),
            )
        except Exception as error:  # noqa: BLE001 -- every visitor of the batch gets it; the worker goes on
            for ticket in same:
                ticket.updates.put(("error", error))
            return
        except BaseException:
            # The worker itself ends (SystemExit, ...): its visitors are told now; a later visitor starts another
            # worker, and these would otherwise wait on this one forever.
            for ticket in same:
                ticket.updates.put(("error", RuntimeError(WORKER_ENDED)))
            raise
        finally:
            for ticket in same:  # follow-ups' turns recorded (or their batch failed): nothing more comes of them
                ticket.settled.set()
        for ticket, result in zip(same, results):
            ticket.updates.put(("error", result) if isinstance(result, Exception) else ("done", result))
        self.batch_sizes.append(len(same))
        log.info("answered a batch of %d in %.2f s", len(same), time.perf_counter() - started)
