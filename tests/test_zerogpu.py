"""ZeroGPU: the Space's model calls cross a process boundary, simulated here as ZeroGPU makes it: the decorated
function runs in a process forked from the test's (multiprocessing's 'fork'), its arguments and results (each
yield of a generator) pickled across a pipe."""

from __future__ import annotations

import inspect
import multiprocessing
import pickle
import sys
import threading
import time
import types

import pytest
import torch
from conftest import photo, tiny_engine

from ego import Concept
from space import zerogpu
from space.actions import Actions
from space.examples import load_examples
from space.loading import LazyEngine
from space.settings import SpaceSettings

SMALL = dict(query_image_max_pixels=224 * 224, reference_max_pixels=224 * 224)
CALL_TIMEOUT_S = 120


def _in_worker(connection, function, payload: bytes) -> None:
    """The forked worker: unpickle the arguments, run, pickle back each result; a "stop" from the Space's
    process closes a generator (the visitor's Stop)."""
    torch.set_num_threads(1)
    args, kwargs = pickle.loads(payload)
    try:
        if inspect.isgeneratorfunction(function):
            stream = function(*args, **kwargs)
            for item in stream:
                connection.send_bytes(pickle.dumps(("item", item)))
                if connection.poll() and connection.recv_bytes() == b"stop":
                    stream.close()
                    break
            connection.send_bytes(pickle.dumps(("end", None)))
        else:
            connection.send_bytes(pickle.dumps(("result", function(*args, **kwargs))))
    except Exception as error:  # noqa: BLE001 -- sent back like spaces does
        connection.send_bytes(pickle.dumps(("error", error)))
    finally:
        connection.close()


class ForkedGPU:
    """A stand-in for the `spaces` package's `GPU` decorator with its process boundary: each call runs in a fresh
    forked process; `calls` records the GPU time each call asked for (its `duration`)."""

    def __init__(self):
        self.calls: list[float] = []
        self.exit_codes: list[int | None] = []
        """Exit code of each streaming worker once its stream ended."""

    def GPU(self, function=None, *, duration=None):  # the name `spaces` uses
        if function is None:
            return lambda f: self.GPU(f, duration=duration)

        def run(*args, **kwargs):
            self.calls.append(duration(*args, **kwargs) if callable(duration) else 60)
            ours, theirs = multiprocessing.get_context("fork").Pipe()
            process = multiprocessing.get_context("fork").Process(
                target=_in_worker, args=(theirs, function, pickle.dumps((args, kwargs))), daemon=True
            )
            process.start()
            theirs.close()
            return process, ours

        if inspect.isgeneratorfunction(function):

            def stream(*args, **kwargs):
                process, connection = run(*args, **kwargs)
                ended = False
                try:
                    while True:
                        if not connection.poll(CALL_TIMEOUT_S):
                            raise TimeoutError("the GPU worker did not answer")
                        kind, value = pickle.loads(connection.recv_bytes())
                        ended = kind in ("error", "end")
                        if kind == "error":
                            raise value
                        if kind == "end":
                            return
                        yield value
                finally:
                    if not ended:
                        connection.send_bytes(b"stop")
                        deadline = time.monotonic() + CALL_TIMEOUT_S
                        try:
                            while process.is_alive() and time.monotonic() < deadline:  # a full pipe would block it
                                if connection.poll(0.05):
                                    connection.recv_bytes()
                        except EOFError:  # the worker closed its end: it is done
                            pass
                    process.join(CALL_TIMEOUT_S)
                    self.exit_codes.append(process.exitcode)

            return stream

        def call(*args, **kwargs):
            process, connection = run(*args, **kwargs)
            if not connection.poll(CALL_TIMEOUT_S):
                process.kill()
                raise TimeoutError("the GPU worker did not answer")
            kind, value = pickle.loads(connection.recv_bytes())
            process.join(CALL_TIMEOUT_S)
            if kind == "error":
                raise value
            return value

        return call


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("qwen2.5-vl").with_settings(**SMALL)


@pytest.fixture
def zero(monkeypatch, engine):
    """Actions as on ZeroGPU: SPACES_ZERO_GPU set and a `spaces` module whose GPU decorator forks."""
    fake = ForkedGPU()
    module = types.ModuleType("spaces")
    module.GPU = fake.GPU
    monkeypatch.setitem(sys.modules, "spaces", module)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(zerogpu.importlib.util, "find_spec", lambda name: object() if name == "spaces" else None)
    act = Actions(LazyEngine(engine), SpaceSettings(), load_examples())
    assert act.zero_gpu
    return act, fake


@pytest.mark.parametrize("flag", [None, "", "false", "0", "no", "False"])
def test_off_zero_gpu_the_decorator_changes_nothing(monkeypatch, flag):
    """SPACES_ZERO_GPU read as the `spaces` package reads it: only 1, t or true (any case) is ZeroGPU."""
    if flag is None:
        monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    else:
        monkeypatch.setenv("SPACES_ZERO_GPU", flag)
    monkeypatch.setattr(zerogpu.importlib.util, "find_spec", lambda name: object() if name == "spaces" else None)

    def call():
        return 1

    assert zerogpu.gpu(call) is call and not zerogpu.on_zero_gpu()


@pytest.mark.parametrize("flag", ["1", "t", "true", "True", "TRUE"])
def test_zero_gpu_is_read_as_the_spaces_package_reads_it(monkeypatch, flag):
    monkeypatch.setenv("SPACES_ZERO_GPU", flag)
    monkeypatch.setattr(zerogpu.importlib.util, "find_spec", lambda name: object() if name == "spaces" else None)
    assert zerogpu.on_zero_gpu()


def test_introduce_and_answer_across_the_boundary_equal_the_calls_in_process(zero, engine):
    act, fake = zero
    pictures = [photo(1), photo(2)]
    concept = act._introduce_on_gpu("Chelsea", pictures, "tabby cat", 6)
    here = engine.introduce("Chelsea", pictures, keywords="tabby cat", area_pct=6)
    assert isinstance(concept, Concept) and concept.name == "Chelsea"
    assert torch.equal(concept.embeddings, here.embeddings)
    assert [v.token_indices.tolist() for v in concept.views] == [v.token_indices.tolist() for v in here.views]

    pieces = list(act._stream_on_gpu("Is Chelsea here?", (concept,), photo(3), None, 8))
    alone = engine.answer("Is Chelsea here?", [here], image=photo(3), max_new_tokens=8)
    assert pieces[-1] == alone and pieces[-1].concepts_used == ("Chelsea",)
    assert dict(pieces[-1].similarity) == pytest.approx(dict(alone.similarity))
    # the GPU time asked for follows the budget: fixed + per token
    s, limits = act.settings, engine.settings
    assert fake.calls[-1] == pytest.approx(s.zero_gpu_call_fixed_s + 8 * s.zero_gpu_call_per_token_s)
    per_photo = limits.description_max_new_tokens + limits.size_max_new_tokens
    assert fake.calls[0] == pytest.approx(s.zero_gpu_call_fixed_s + 2 * per_photo * s.zero_gpu_call_per_token_s)


def test_no_lock_is_taken_inside_the_gpu_call(zero, engine):
    """A thread of the Space's process holds the engine's lock when the worker is forked: the fork copies it
    locked, and a call that took it would wait forever."""
    act, _ = zero
    held, release = threading.Event(), threading.Event()

    def holder():
        with engine._lock:
            held.set()
            release.wait(CALL_TIMEOUT_S)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    held.wait()
    try:
        pieces = list(act._stream_on_gpu("Hi", (), None, None, 3))
    finally:
        release.set()
        thread.join()
    assert pieces[-1] == engine.answer("Hi", max_new_tokens=3)


def test_a_visitors_stop_ends_generation_in_the_worker(zero):
    act, fake = zero
    stream = act._stream_on_gpu("Describe this photo in detail.", (), photo(4), None, 1000)
    next(stream)
    started = time.perf_counter()
    stream.close()
    # the worker closed its stream (the engine's Stop) and exited cleanly, long before 1,000 tokens
    assert fake.exit_codes[-1] == 0 and time.perf_counter() - started < 30


def test_the_ask_handler_streams_from_the_worker(zero, engine):
    act, _ = zero
    from space.session import Session

    outputs = list(act.ask_image(Session(), photo(5), "What is this?"))
    assert outputs[-1][1] == str(
        engine.answer("What is this?", image=photo(5), max_new_tokens=engine.settings.answer_max_new_tokens)
    )


def test_follow_ups_are_answered_in_the_worker_on_a_copy_of_the_conversation(zero, engine):
    """No cache outlives a ZeroGPU call: each follow-up sends the conversation's turns (their tokens) to the worker,
    which recomputes it and answers; the visitor's conversation takes the answer as its turn."""
    act, fake = zero
    from space.session import Session

    questions = ["What is this?", "And then?", "What colour is it?"]
    *_, (session, first, *_rest) = act.ask_image(Session(), photo(6), questions[0])
    later = [list(act.follow_up(session, question))[-1][1] for question in questions[1:]]
    budget = engine.settings.answer_max_new_tokens
    here = engine.chat([], image=photo(6))
    assert [first, *later] == [str(here.ask(question, max_new_tokens=budget)) for question in questions]
    assert [q for q, _ in session.conversations.get("image").turns] == questions
    assert len(fake.calls) == 3 and set(fake.exit_codes[-2:]) == {0}  # each follow-up in a worker of its own


def test_a_second_follow_up_while_the_first_is_answered_is_refused_and_the_turns_stay_in_order(zero, engine):
    """On ZeroGPU a follow-up is answered away from the engine's lock: a second one at the same time would
    continue from the same turns as the first."""
    import gradio as gr

    from space.session import Session

    act, _ = zero

    *_, (session, *_rest) = act.ask_image(Session(), photo(6), "What is this?")
    first = act.follow_up(session, "And then?")
    next(first)  # the first follow-up is being answered
    with pytest.raises(gr.Error, match="still being answered"):
        list(act.follow_up(session, "And now?"))
    rest = list(first)
    assert [q for q, _ in session.conversations.get("image").turns] == ["What is this?", "And then?"]
    *_, (_, answer) = act.follow_up(session, "And now?")  # once it ended, the next one is taken
    assert rest and answer
    assert [q for q, _ in session.conversations.get("image").turns] == ["What is this?", "And then?", "And now?"]
