"""space/api.py through the running Space, over plain HTTP: calls of endpoints it does not have, calls whose values
do not fit, values a component refuses, photos judged by their content; what the caller is told and what the
server log keeps (timings, counts and error types, never what was sent)."""

from __future__ import annotations

import json
import logging
import secrets
from urllib.parse import quote

import httpx
import pytest
from conftest import EXAMPLE_PHOTO, visitor
from gradio_client import Client

from ego import DEFAULT_SETTINGS

SETTINGS = DEFAULT_SETTINGS.replace(answer_max_new_tokens=4)
ENDPOINTS = (
    "/introduce, /ask_image, /ask_video, /follow_up, /list_concepts, /remove_concept, /export_concepts, "
    "/import_concepts"
)
FORGED_LINE = "2026-12-03 13:00:00,000 INFO ego.space: FORGED"
SIZE_LABEL = "Subject size (% of each photo)"


@pytest.fixture
def server_output(capfd, caplog):
    """What the server writes while a test runs (its log and its standard streams), read by calling it. The server
    runs in the test's process: the log of the test's own HTTP client (its requests' addresses) is left out."""
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):

        def read() -> str:
            captured = capfd.readouterr()
            records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
            return captured.out + captured.err + "\n".join(caplog.handler.format(r) for r in records)

        yield read


def call(url: str, api_name: str, data: list, session_hash: str | None = None) -> tuple[str, object]:
    """A call as docs/http-api.md makes it: POST /gradio_api/call/<api_name>, then its result's stream, read up to
    the first result. ("complete", the values) or ("error", the error's sentence)."""
    session_hash = session_hash or secrets.token_hex(16)
    started = httpx.post(
        f"{url}gradio_api/call/{api_name}", json={"data": data, "session_hash": session_hash}, timeout=30
    )
    started.raise_for_status()
    event_id = started.json()["event_id"]
    with httpx.stream("GET", f"{url}gradio_api/call/{api_name}/{event_id}", timeout=120) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line in ("event: complete", "event: error"):
                value = json.loads(next(lines).removeprefix("data: "))
                return line.removeprefix("event: "), value["error"] if line == "event: error" else value
    raise AssertionError("the call never ended")


def upload(url: str, name: str, data: bytes) -> dict:
    """A file uploaded under `name`, as an input's value."""
    sent = httpx.post(f"{url}gradio_api/upload", files={"files": (name, data, "application/octet-stream")}, timeout=30)
    sent.raise_for_status()
    return {"path": sent.json()[0], "meta": {"_type": "gradio.FileData"}}


def jpeg() -> bytes:
    with open(EXAMPLE_PHOTO, "rb") as file:
        return file.read()


# ----------------------------------------------------------------------------------------------
# Endpoints the app does not have
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "ask-image",  # a typo
        "x\n" + FORGED_LINE,  # a name that would write a line of its own into the log
        "clear_concepts",  # one of the page's own events, which are not endpoints
        "load_example_2",
    ],
)
def test_a_call_of_an_endpoint_the_app_does_not_have_is_told_the_endpoints_it_has(url, server_output, name):
    quoted = quote(name, safe="")
    for route in ("call", "call/v2", "run", "api"):
        refused = httpx.post(f"{url}gradio_api/{route}/{quoted}", json={"data": []}, timeout=30)
        assert refused.status_code == 404, (route, refused.status_code, refused.text)
        detail = refused.json()["detail"]
        assert detail.startswith("There is no endpoint /") and f"this app's endpoints are {ENDPOINTS}: " in detail
        assert "\n" not in detail
    assert httpx.get(f"{url}gradio_api/call/{quoted}/0123abcd", timeout=30).status_code == 404
    logged = server_output()
    assert "Traceback" not in logged and "FORGED" not in logged and ("\n" in name or name not in logged)
    assert "endpoint this app does not have" in logged


def test_the_page_and_gradio_client_still_reach_every_event(url):
    """The page calls its events by number on /run/predict, gradio_client by number through the queue; an endpoint's
    result is read on /call/<name>/<event_id>."""
    client = Client(url, verbose=False)
    fn_index = {dep.get("api_name"): dep["id"] for dep in client.config["dependencies"]}
    session = secrets.token_hex(16)
    for event in ("list_concepts", "panel"):  # an endpoint, one of the page's own events
        by_number = httpx.post(
            f"{url}gradio_api/run/predict",
            json={"data": [None], "fn_index": fn_index[event], "session_hash": session},
            timeout=30,
        )
        assert by_number.status_code == 200, (event, by_number.text)
    assert client.predict(api_name="/list_concepts") == []
    assert call(url, "list_concepts", []) == ("complete", [None, []])


# ----------------------------------------------------------------------------------------------
# Values that do not fit the endpoint
# ----------------------------------------------------------------------------------------------
def test_a_call_is_told_how_many_values_it_sent_and_how_many_the_endpoint_takes(url, server_output):
    photos = [{"image": upload(url, "quokka.jpg", jpeg())}]
    for data, sent in [
        (["Quokka"], 1),
        (["Quokka", photos, None, True], 4),
        (["Quokka", photos, None, True, 25, "quokka-extra"], 6),  # one more than the inputs: not the hidden state
        (["Quokka", photos, None, True, 25, "quokka-extra", 1], 7),
    ]:
        outcome, said = call(url, "introduce", data)
        assert outcome == "error"
        values = "value" if sent == 1 else "values"
        assert said.startswith(f"This call does not match /introduce: it sends {sent} input {values}, and ")
        assert "/introduce takes 5." in said and "Use via API" in said
    assert call(url, "remove_concept", []) == (
        "error",
        "This call does not match /remove_concept: it sends 0 input values, and /remove_concept takes 1. "
        "The API page (“Use via API”) lists its inputs, in order, with an example of each.",
    )
    logged = server_output()
    assert "quokka" not in logged.casefold() and "Traceback" not in logged
    assert "/introduce refused: 7 input values sent, 5 taken" in logged


def test_a_direct_call_with_the_listed_inputs_runs(url):
    """Gradio's /run/ route (what the page uses for the events that need no model) takes the values as sent, without
    the hidden session state the queue fills in; the model's endpoints are only on the queue, and say so."""
    session = secrets.token_hex(16)
    photos = [{"image": upload(url, "chelsea.jpg", jpeg())}]
    assert call(url, "introduce", ["Chelsea", photos, "cat", False, 10], session)[0] == "complete"
    removed = httpx.post(
        f"{url}gradio_api/run/remove_concept", json={"data": ["Chelsea"], "session_hash": session}, timeout=30
    )
    assert removed.status_code == 200 and removed.json()["data"] == [None, []]
    assert call(url, "list_concepts", [], session) == ("complete", [None, []])
    too_few = httpx.post(f"{url}gradio_api/run/remove_concept", json={"data": []}, timeout=30)
    assert "it sends 0 input values, and /remove_concept takes 1" in too_few.json()["error"]
    queued_only = httpx.post(f"{url}gradio_api/run/introduce", json={"data": ["Chelsea", photos]}, timeout=30)
    assert queued_only.status_code == 404 and "join the queue" in queued_only.json()["detail"]


# ----------------------------------------------------------------------------------------------
# Values a component refuses
# ----------------------------------------------------------------------------------------------
def test_a_value_out_of_range_is_told_the_range_and_stays_out_of_the_log(url, server_output):
    photos = [{"image": upload(url, "quokka.jpg", jpeg())}]
    for size in (7771, -6661, 1e308):
        outcome, said = call(url, "introduce", ["Quokka", photos, "quokka", False, size])
        assert outcome == "error"
        assert f"/introduce: input 5 ({SIZE_LABEL}) takes a number from 1 to 100." in said
    outcome, said = call(url, "import_concepts", [upload(url, "quokka.txt", b"quokka")])
    assert outcome == "error" and "input 1 (Import a concept file) takes a file whose name ends in .safetensors" in said
    logged = server_output()
    for sent in ("7771", "6661", "1e+308", "quokka", "Traceback", "maximum value"):
        assert sent not in logged, sent
    assert "call of /introduce refused: input 5 (Error)" in logged


# ----------------------------------------------------------------------------------------------
# Photos are judged by their content, not their names
# ----------------------------------------------------------------------------------------------
def test_a_photo_is_judged_by_its_content_not_its_name(url, server_output):
    client = visitor(url)
    for name in ("photo", "blob", "quokka.txt"):
        photos = [{"image": upload(url, name, jpeg())}]
        outcome, said = call(url, "introduce", [f"Named {name}", photos, "cat", False, 10], client.session_hash)
        assert outcome == "complete", (name, said)
    assert len(client.predict(api_name="/list_concepts")) == 3
    not_a_photo = [{"image": upload(url, "quokka.svg", b"<svg onload=alert(1)>")}]
    outcome, said = call(url, "introduce", ["Vector", not_a_photo, "cat", False, 10])
    assert outcome == "error" and "JPEG, PNG" in said
    logged = server_output()
    assert "Traceback" not in logged and "quokka" not in logged
    # The browser's file picker still offers images only (its `accept`, from the page's config).
    components = httpx.get(f"{url}config", timeout=30).json()["components"]
    gallery = next(c for c in components if str(c["props"].get("label", "")).startswith("Reference photos"))
    assert gallery["props"]["file_types"] == ["image"]


# ----------------------------------------------------------------------------------------------
# Text inputs take text
# ----------------------------------------------------------------------------------------------
def test_text_inputs_take_text_and_keywords_a_list_of_phrases(url):
    """Gradio's text box turns any JSON value into its Python spelling ("['hi']"), which a handler would take as
    typed: keywords sent as a list are the phrases, any other value that is not text is refused with a sentence."""
    client = visitor(url)
    photos = [{"image": upload(url, "quokka.jpg", jpeg())}]
    outcome, said = call(url, "introduce", ["Kw", photos, ["tabby", "green eyes"], False, 10], client.session_hash)
    assert outcome == "complete", said
    (record,) = client.predict(api_name="/list_concepts")
    assert record["keywords"] == ["tabby", "green eyes"]
    for value, kind in ((["Kw2"], "a list"), ({"a": 1}, "an object"), (7, "a number")):
        outcome, said = call(url, "introduce", [value, photos, "", False, 10])
        assert outcome == "error" and f"Send the concept's name as text (a JSON string), not {kind}." in said
    outcome, said = call(url, "introduce", ["Kw3", photos, {"a": 1}, False, 10])
    assert outcome == "error" and "Send the keywords as text (a JSON string), not an object." in said
    outcome, said = call(url, "ask_image", [None, ["hi"], False])
    assert outcome == "error" and "Send the question as text (a JSON string), not a list." in said
