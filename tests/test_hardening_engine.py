"""The model under load and faults, through the Space: back-pressure, one model call at a time, out of
memory, and answers that stop when the visitor stops them or closes the tab.

One demo is launched for the module, with answers of up to 1024 tokens and a queue of 2. `ModelProbe`
wraps the shared engine's `model.generate` to count the calls in flight, hold them at a gate, fail one,
shorten them, or slow every token down: the tiny model writes 1024 tokens in about 2 s, a real one takes
tens of seconds, and a test of stopping must not pass because the answer ended by itself.
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
import torch
from conftest import (
    EXAMPLE_PHOTO,
    EXAMPLE_QUERY,
    chromium_browser,
    introduce_through_api as introduce,
    space_engine,
    visitor,
)
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from transformers import StoppingCriteria, StoppingCriteriaList

from ego import DEFAULT_SETTINGS
from space.settings import SpaceSettings

# Batches of 1: questions wait in Gradio's queue one at a time (test_app_batching.py has batches); introductions
# run beside them and wait for the model's lock.
SETTINGS = DEFAULT_SETTINGS.replace(answer_max_new_tokens=1024)
SPACE_SETTINGS = SpaceSettings(queue_max_size=2, max_waiting_requests_per_visitor=1, answer_batch_max_size=1)
PHOTO, QUERY = EXAMPLE_PHOTO, EXAMPLE_QUERY


class ModelProbe:
    """Stands in for `model.generate`: counts calls and calls in flight, and can hold, fail or shorten them."""

    def __init__(self, generate):
        self._generate = generate
        self._count = threading.Lock()
        self.calls = self.inside = self.most_inside = 0
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next: BaseException | None = None
        self.shorten = lambda call_number: None
        """The largest max_new_tokens for call number n (1, 2, ...), or None for what the caller asked."""
        self.seconds_per_token = 0.0
        """Seconds each token takes; set, a generation also writes its whole budget unless stopped."""
        self.tokens: dict[int, int] = {}
        """Tokens generated so far by call number n (counted while `seconds_per_token` is set)."""

    def __call__(self, *args, **kwargs):
        with self._count:
            self.calls += 1
            number = self.calls
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            self.gate.wait(timeout=60)
            if self.fail_next is not None:
                error, self.fail_next = self.fail_next, None
                raise error
            cap = self.shorten(number)
            if cap is not None:
                kwargs["max_new_tokens"] = min(kwargs.get("max_new_tokens") or cap, cap)
            if self.seconds_per_token:  # a long answer: no stop token ends it before its budget
                kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
                kwargs["stopping_criteria"] = StoppingCriteriaList(
                    [*kwargs.get("stopping_criteria", ()), _SlowTokens(self.seconds_per_token, self.tokens, number)]
                )
            return self._generate(*args, **kwargs)
        finally:
            with self._count:
                self.inside -= 1


class _SlowTokens(StoppingCriteria):
    """Never stops generation; takes `seconds` per token, like a large model, and counts the tokens of call number
    `number` in `tokens`."""

    def __init__(self, seconds: float, tokens: dict[int, int], number: int):
        self.seconds, self.tokens, self.number = seconds, tokens, number

    def __call__(self, input_ids, scores, **kwargs):
        self.tokens[self.number] = self.tokens.get(self.number, 0) + 1
        time.sleep(self.seconds)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class CountingLock:
    """The engine's model lock, counting the threads that hold it or wait for it."""

    def __init__(self, lock):
        self._lock = lock
        self._count = threading.Lock()
        self.present = self.most_present = 0

    def acquire(self, blocking=True, timeout=-1):
        with self._count:
            self.present += 1
            self.most_present = max(self.most_present, self.present)
        if self._lock.acquire(blocking, timeout):
            return True
        with self._count:
            self.present -= 1
        return False

    def release(self):
        self._lock.release()
        with self._count:
            self.present -= 1

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


@pytest.fixture
def engine():
    return space_engine(SETTINGS)  # the engine the module's Space serves


@pytest.fixture
def probe(engine, monkeypatch):
    probe = ModelProbe(engine.model.generate)
    monkeypatch.setattr(engine.model, "generate", probe)
    monkeypatch.setattr(engine, "_lock", CountingLock(engine._lock))
    yield probe
    probe.gate.set()
    assert model_is_idle(engine, within_s=30), "a test left the model busy"


def wait_for(condition, timeout_s: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def generation_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ego-generate" and t.is_alive()]


def model_is_idle(engine, within_s: float) -> bool:
    """No model call in flight, no generation thread, and the model lock free, within `within_s` seconds."""
    generate = engine.model.generate
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        busy = getattr(generate, "inside", 0) or generation_threads()
        if not busy and engine._lock.acquire(timeout=0.05):
            engine._lock.release()
            return True
        time.sleep(0.02)
    return False


def ask(client: Client, compare: bool = False):
    return client.submit(handle_file(QUERY), "Describe the photo in detail.", compare, api_name="/ask_image")


def test_a_full_queue_turns_visitors_away_and_the_model_runs_one_call_at_a_time(demo, url, engine, probe):
    probe.shorten = lambda number: 4
    first, second, third, fourth, fifth = (visitor(url) for _ in range(5))
    owner = visitor(url)
    introduce(owner, "Kept")
    probe.gate.clear()  # the first request holds the model until released
    running = ask(first)
    wait_for(lambda: probe.inside == 1, what="the first answer to start")
    waiting = [
        second.submit(
            "Cat", [{"image": handle_file(PHOTO), "caption": None}], "tabby", False, 10, api_name="/introduce"
        )
    ]
    # An introduction does not wait in the queue behind answers: it runs, and waits for the model's lock.
    wait_for(lambda: engine._lock.present == 2, timeout_s=10, what="the introduction to wait for the model")
    assert len(demo._queue) == 0 and not waiting[0].done()
    waiting.append(ask(third))
    wait_for(lambda: len(demo._queue) == 1, timeout_s=10, what="the second answer to wait in the queue")
    waiting.append(ask(fourth))
    wait_for(lambda: len(demo._queue) == 2, timeout_s=10, what="the third answer to wait in the queue")
    with pytest.raises(Exception, match="Queue is full"):
        ask(fifth).result(timeout=30)

    # What does not need the model skips the queue, so a visitor in a browser (which posts such events to
    # /run/, not to the queue) can still list, export and remove their concepts.
    def direct(api_name: str, *data):
        reply = httpx.post(
            f"{url}gradio_api/run/{api_name}",
            timeout=30,  # None: the session, filled by Gradio
            json={"data": [None, *data], "session_hash": owner.session_hash},
        )
        assert reply.status_code == 200, reply.text
        return reply.json()["data"]

    # ... while a request for the model cannot skip the queue that way.
    skipping = httpx.post(
        f"{url}gradio_api/run/ask_image",
        timeout=30,
        json={"data": [None, None, "Hi?", False], "session_hash": owner.session_hash},
    )
    assert skipping.status_code == 404 and "join the queue" in skipping.text
    assert [record["name"] for record in direct("list_concepts")[1]] == ["Kept"]
    assert direct("export_concepts")[1]["path"].endswith(".safetensors")
    assert direct("remove_concept", "Kept")[1] == []
    assert len(demo._queue) == 2
    probe.gate.set()
    for job in [running, *waiting]:
        job.result(timeout=60)
    assert probe.calls >= 3
    assert probe.most_inside == 1, "two model calls ran at once"
    assert waiting[0].result(timeout=60)[0].startswith("## Cat"), "the introduction ran after the answer"
    # The answer and the introduction at the model's lock, never a question more: those wait in Gradio's queue.
    assert engine._lock.most_present == 2, "a question waited inside the engine instead of in Gradio's queue"


def test_introductions_decode_their_photos_while_the_model_answers_and_one_at_a_time_waits_for_it(
    url, engine, probe, monkeypatch
):
    """Decoding photos (about half a second for five 12-megapixel ones) is not the model's work: introductions decode
    their photos while another visitor's answer holds the model. Only one of them waits at the model's lock for its
    model call, so answers that wait there too come after at most one introduction."""
    from space import actions

    probe.shorten = lambda number: 4
    asking, introducing = visitor(url), [visitor(url), visitor(url)]
    probe.gate.clear()
    running = ask(asking)
    wait_for(lambda: probe.inside == 1, what="the answer to start")
    decoded, load_image = [], actions.load_image
    monkeypatch.setattr(actions, "load_image", lambda path, limits: decoded.append(path) or load_image(path, limits))
    photos = [{"image": handle_file(path), "caption": None} for path in (PHOTO, QUERY)]
    jobs = [
        client.submit(f"Cat {n}", photos, "tabby", False, 10, api_name="/introduce")
        for n, client in enumerate(introducing)
    ]
    wait_for(lambda: len(decoded) == 4, what="both introductions' photos to be decoded while the model answers")
    wait_for(lambda: engine._lock.present >= 2, what="an introduction to wait for the model")
    time.sleep(1)  # the other introduction, decoded, would be at the model's lock by now: it waits for its turn
    assert engine._lock.present == 2, "more than one introduction waits at the model's lock"
    assert probe.inside == 1 and not running.done() and not any(job.done() for job in jobs)
    probe.gate.set()
    assert isinstance(running.result(timeout=60)[0], str)
    for number, job in enumerate(jobs):
        report, patches, _ = job.result(timeout=60)
        assert report.startswith(f"## Cat {number}") and len(patches) == 2
    assert engine._lock.most_present == 2, "more than one introduction waited at the model's lock"


def join(
    url: str, client: Client, api_name: str, data: list, session_hash: str | None = None, address: str | None = None
) -> httpx.Response:
    """Join the queue for `api_name` as a script would (raw HTTP), in `client`'s session unless another is
    given, with an X-Forwarded-For address if given (as a tunnel such as --share's passes it on)."""
    fn_index = next(i for i, dep in enumerate(client.config["dependencies"]) if dep.get("api_name") == api_name)
    headers = {"x-forwarded-for": address} if address else {}
    return httpx.post(
        f"{url}gradio_api/queue/join",
        timeout=30,
        headers=headers,
        json={"data": [None, *data], "fn_index": fn_index, "session_hash": session_hash or client.session_hash},
    )


def test_one_visitor_cannot_fill_the_queue_and_others_keep_being_served(demo, url, engine, probe):
    """At most `max_waiting_requests_per_visitor` (here 1) model requests per session, and per client address
    where it is known; one more gets a sentence, other visitors still get in."""
    probe.shorten = lambda number: 4
    greedy, other = visitor(url), visitor(url)
    probe.gate.clear()
    running = ask(greedy)
    wait_for(lambda: probe.inside == 1, what="the first answer to start")
    question = [{"path": None}, "Hi?", False]
    refused = join(url, greedy, "ask_image", question)  # the same session: one is already there
    assert refused.status_code == 400
    assert "You already have 1 requests waiting for the model; wait for an answer" in refused.json()["detail"]
    # Through gradio_client, the refusal's sentence reaches the script as an exception it shows (not a bare HTTP 400).
    from gradio_client.exceptions import ValidationError

    with pytest.raises(ValidationError, match="You already have 1 requests waiting for the model"):
        ask(greedy).result(timeout=30)
    waiting = [ask(other)]  # another visitor is still served
    wait_for(lambda: len(demo._queue) == 1, timeout_s=10, what="the other visitor's answer to wait")
    # A script opening new sessions from one address (behind a tunnel, which passes the address on); one IPv6
    # host may hold a whole /64: rotating through its addresses, it is still one visitor.
    first = join(url, other, "ask_image", question, session_hash="script-session-1", address="2001:db8:1:2::7")
    assert first.status_code == 200, first.text
    for number, address in enumerate(("2001:db8:1:2::7", "2001:db8:1:2::8")):
        again = join(url, other, "ask_image", question, session_hash=f"script-session-{number + 2}", address=address)
        assert again.status_code == 400 and "already have 1 requests" in again.json()["detail"]
    assert len(demo._queue) == 2
    probe.gate.set()
    running.result(timeout=60)
    for job in waiting:
        job.result(timeout=60)
    wait_for(lambda: len(demo._queue) == 0, timeout_s=30, what="the queue to empty")
    answer, *_ = ask(greedy).result(timeout=60)  # a finished request frees the visitor's place
    assert isinstance(answer, str)


def test_a_function_number_the_app_does_not_have_is_a_sentence(url, caplog):
    """/queue/join names the function by number; Gradio's queue fails on an unknown one with a traceback in the
    log (anyone could fill the log with them): the caller is told the endpoints are on the API page."""
    from space.visitors import NO_SUCH_FUNCTION

    refused = httpx.post(
        f"{url}gradio_api/queue/join", timeout=30, json={"data": [], "fn_index": 9999, "session_hash": "s-9999"}
    )
    assert refused.status_code == 400 and refused.json()["detail"] == NO_SUCH_FUNCTION
    assert "Traceback" not in caplog.text and "KeyError" not in caplog.text


def test_out_of_memory_is_a_sentence_changes_nothing_and_the_next_request_works(url, engine, probe):
    probe.shorten = lambda number: 4
    client = visitor(url)
    introduce(client, "Mine")
    before = client.predict(api_name="/list_concepts")
    out_of_memory = "CUDA out of memory. Tried to allocate 20.00 GiB"

    probe.fail_next = torch.OutOfMemoryError(out_of_memory)
    with pytest.raises(AppError, match="ran out of memory on this request; try a smaller image") as refused:
        ask(client).result(timeout=60)
    assert "20.00 GiB" not in str(refused.value)
    probe.fail_next = torch.OutOfMemoryError(out_of_memory)
    with pytest.raises(AppError, match="ran out of memory"):
        introduce(client, "Other")
    assert client.predict(api_name="/list_concepts") == before
    assert model_is_idle(engine, within_s=30)

    answer, _, details, _ = ask(client).result(timeout=60)
    assert isinstance(answer, str) and details["concepts_used"] == ["Mine"]


TOKENS_AFTER_A_STOP = 512
"""Tokens a generation may still write after its visitor left (half the 1024-token answer: about 10 s at
`seconds_per_token` 0.02, the time a loaded machine may take to hand the Stop on); one that is not stopped writes
them all. A count, so that a slow machine does not make the test fail, nor a missing Stop pass."""


@pytest.mark.parametrize("compare", [False, True], ids=["answer", "answer without memory"])
def test_a_cancelled_answer_stops_its_generation(url, engine, probe, compare):
    # With `compare`, the personalized answer is cut short and the answer without memory is the long one.
    long_call = 1 + compare
    probe.shorten = lambda number: 2 if compare and number == 1 else None
    probe.seconds_per_token = 0.02  # 1024 tokens: about 20 s
    job = ask(visitor(url), compare)
    wait_for(lambda: probe.tokens.get(long_call, 0) >= 5, what="the long answer to stream a few tokens")
    at_cancel = probe.tokens[long_call]
    job.cancel()
    assert model_is_idle(engine, within_s=60), "the cancelled answer kept the model busy"
    assert probe.tokens[long_call] - at_cancel < TOKENS_AFTER_A_STOP, "the cancelled answer was not stopped"


@pytest.mark.skipif(os.environ.get("EGO_SKIP_BROWSER") == "1", reason="EGO_SKIP_BROWSER=1")
def test_closing_the_tab_stops_the_answer(url, engine, probe):
    from playwright.sync_api import expect

    probe.seconds_per_token = 0.02  # 1024 tokens: about 20 s
    with chromium_browser() as browser:
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(url, wait_until="domcontentloaded")  # never "networkidle": Gradio keeps a stream open
        page.get_by_role("tab", name="Ask: image").click()
        page.get_by_text("Is Chelsea in this photo? What is she doing?").first.click()
        expect(page.locator("#image-photo img")).to_be_visible()
        page.get_by_role("button", name="Ask", exact=True).first.click()
        wait_for(lambda: probe.tokens.get(probe.calls, 0) >= 5, what="the answer to stream a few tokens")
        call = probe.calls
        at_close = probe.tokens[call]
        page.close()
        assert model_is_idle(engine, within_s=60), "the answer kept the model busy after the tab was closed"
        assert probe.tokens[call] - at_close < TOKENS_AFTER_A_STOP, "the answer went on after the tab was closed"
