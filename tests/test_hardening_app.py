"""The Space under hostile input, over HTTP: visitors kept apart, limits, file routes, hostile concept files.

One demo is launched for the module, with the production launch options (`app.launch_options`) and
small limits, and driven with gradio_client and plain HTTP.
"""

from __future__ import annotations

import datetime
import gc
import http.server
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import (
    EXAMPLE_PHOTO,
    EXAMPLE_QUERY,
    introduce_through_api as introduce,
    photo,
    running_demo,
    tiny_engine,
    visitor,
)
from gradio.utils import get_upload_folder
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from safetensors import safe_open
from safetensors.torch import save_file

from ego import DEFAULT_SETTINGS
from space.actions import Actions
from space.examples import Examples
from space.loading import LazyEngine
from space.session import Session, forget
from space.settings import SpaceSettings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = DEFAULT_SETTINGS.replace(answer_max_new_tokens=4, max_upload_mb=1)
SPACE_SETTINGS = SpaceSettings(max_concepts_per_session=3, max_concept_file_mb=1)
PHOTO, QUERY = EXAMPLE_PHOTO, EXAMPLE_QUERY
PASSWD_LINE = "root:"
APP_SOURCE_LINE = "Ego, the Space"
SECRET = b"secret served on the loopback interface"


def names(client: Client) -> list[str]:
    return [record["name"] for record in client.predict(api_name="/list_concepts")]


@pytest.fixture(scope="module")
def mine(url, tmp_path_factory):
    """A visitor with one concept, its records and its exported concept file."""
    client = visitor(url)
    introduce(client, "Mine")
    exported = Path(client.predict(api_name="/export_concepts"))
    kept = tmp_path_factory.mktemp("exported") / "mine.safetensors"
    kept.write_bytes(exported.read_bytes())
    return {"client": client, "records": client.predict(api_name="/list_concepts"), "file": kept}


# ----------------------------------------------------------------------------------------------
# Visitors are kept apart
# ----------------------------------------------------------------------------------------------
def test_interleaved_visitors_see_only_their_own_concepts(url):
    clients = {"A": visitor(url), "B": visitor(url)}
    seen, errors = {"A": [], "B": []}, []

    def work(who: str, thread: int):
        client = clients[who]
        try:
            for round_ in range(2):
                name = f"{who}-{thread}-{round_}"
                introduce(client, name)
                _, _, details, _ = client.predict(handle_file(QUERY), "Who is here?", False, api_name="/ask_image")
                listed = names(client)
                seen[who] += details["concepts_used"] + listed
                assert name in details["concepts_used"] and name in listed
                client.predict(name, api_name="/remove_concept")
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(who, n)) for who in clients for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for who, names_seen in seen.items():
        assert names_seen and all(name.startswith(f"{who}-") for name in names_seen), (who, names_seen)
    assert names(clients["A"]) == names(clients["B"]) == []


# ----------------------------------------------------------------------------------------------
# Limits
# ----------------------------------------------------------------------------------------------
def upload(url, name: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{url}gradio_api/upload", files={"files": (name, data, "image/jpeg")}, timeout=30)


def cached_files_starting_with(prefix: bytes) -> list[Path]:
    found = []
    for path in Path(get_upload_folder()).rglob("*"):
        try:
            if path.is_file() and path.stat().st_size >= len(prefix) and path.open("rb").read(len(prefix)) == prefix:
                found.append(path)
        except OSError:
            continue
    return found


def test_an_oversized_upload_is_refused_with_413(url, mine):
    marker = os.urandom(16)
    too_big = upload(url, "big.jpg", marker + b"\0" * SETTINGS.max_upload_bytes)
    assert too_big.status_code == 413
    assert not cached_files_starting_with(marker), "the refused upload was kept on the server"
    small = upload(url, "small.jpg", marker + b"\0" * 1000)
    assert small.status_code == 200 and len(small.json()) == 1
    assert mine["client"].predict(api_name="/list_concepts") == mine["records"]


def test_count_limits_leave_the_concepts_unchanged(url, mine):
    client = visitor(url)
    with pytest.raises(AppError, match="at most 5 reference photos; you gave 6"):
        introduce(client, "Six", [PHOTO] * 6)
    assert names(client) == []
    for name in ("One", "Two", "Three"):
        introduce(client, name)
    before = client.predict(api_name="/list_concepts")
    with pytest.raises(AppError, match="at most 3 concepts and you have 3; there is room for 0 more"):
        introduce(client, "Four")
    with pytest.raises(AppError, match="at most 3 concepts"):
        client.predict(handle_file(str(mine["file"])), api_name="/import_concepts")
    assert client.predict(api_name="/list_concepts") == before


def test_all_sessions_share_one_memory_budget_and_a_dropped_session_frees_its_share(tmp_path):
    """Two sessions at most, memory for one concept file of twelve concepts: a second visitor's
    import is refused while the first holds the budget; once a third visitor makes Gradio drop the first
    (least recently used), the room is back. The budget is counted from what the server really holds."""
    from ego import save_concepts

    engine = tiny_engine("qwen2.5-vl")
    concepts = [engine.introduce(f"c{i}", [photo(i)], keywords="cat", area_pct=100) for i in range(12)]
    file = save_concepts(tmp_path / "twelve.safetensors", concepts)
    one_file = sum(c.nbytes for c in concepts) + 12 * SPACE_SETTINGS.thumbnail_px**2 * 3  # rows + thumbnails
    space = SPACE_SETTINGS.replace(max_sessions=2, max_concepts_per_session=12, max_all_sessions_memory_mb=1)
    assert one_file < 1024 * 1024 < 2 * one_file, "the fixture no longer fits the budget it tests"
    with running_demo(SETTINGS, space) as small:
        first, second = visitor(small.local_url), visitor(small.local_url)
        first.predict(handle_file(str(file)), api_name="/import_concepts")
        with pytest.raises(AppError, match="as many concepts as it can.*your concepts are unchanged"):
            second.predict(handle_file(str(file)), api_name="/import_concepts")
        assert len(names(first)) == 12 and names(second) == []  # first is now the least recently used
        # Something may still refer to a dropped session (a cancelled answer's iterator, say): held here.
        held = small.state_holder.session_data[first.session_hash]
        (kept,) = [value for value in held.state_data.values() if isinstance(value, Session)]
        names(visitor(small.local_url))  # a third session: Gradio drops the least recently used (first)
        assert len(kept) == 0  # let go all the same: its concepts freed
        gc.collect()
        second.predict(handle_file(str(file)), api_name="/import_concepts")
        assert len(names(second)) == 12


def test_a_closed_tabs_concepts_are_freed_after_the_sessions_time_to_live(tmp_path):
    """Gradio keeps a closed tab's states an hour whatever their time to live; the Space says its session is freed
    `session_ttl_s` after its last action, a closed tab's too, and frees it then."""
    space = SPACE_SETTINGS.replace(session_ttl_s=1)
    with running_demo(SETTINGS, space) as demo:
        tab = visitor(demo.local_url)
        introduce(tab, "Chelsea")
        state = demo.state_holder.session_data[tab.session_hash]
        (kept,) = [value for value in state.state_data.values() if isinstance(value, Session)]
        assert len(kept) == 1
        state.is_closed = True  # what Gradio marks when the page's connection closes
        deadline = time.monotonic() + 10  # Gradio looks for expired states every second
        while len(kept) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(kept) == 0, "the closed tab's session was not freed after its time to live"


def test_closing_the_app_ends_its_answer_worker():
    """The answer scheduler's worker thread ends with the app (a relaunch starts another): it would otherwise wait
    for questions forever, a thread per app made in the process."""
    with running_demo(SETTINGS) as demo:
        tab = visitor(demo.local_url)
        tab.predict(handle_file(QUERY), "What is in the photo?", False, api_name="/ask_image")
        (close,) = demo.on_close
        worker = close.__self__.answers._worker.thread
        assert worker.is_alive()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the answer scheduler's worker outlived the app"


# ----------------------------------------------------------------------------------------------
# A tab left open past its session's expiry
# ----------------------------------------------------------------------------------------------
def page_load(url: str, demo, tab: Client, token=None) -> str:
    """What a browser tab's page load does in `tab`'s Gradio session: the registry hands it a session; returns the
    token its browser keeps (`token`: what the browser had kept)."""
    fn_index = next(i for i, fn in demo.fns.items() if fn.name == "resume")
    body = {"data": [None, token], "fn_index": fn_index, "session_hash": tab.session_hash}
    loaded = httpx.post(f"{url}gradio_api/run/predict", json=body, timeout=30)
    loaded.raise_for_status()
    return loaded.json()["data"][1]


def ask_in_page(url: str, demo, tab: Client, question: str) -> dict:
    """The image tab's Ask, without a photo, in `tab`'s Gradio session; the event's final message."""
    fn_index = next(i for i, fn in demo.fns.items() if fn.name == "chat_image")
    return raw_queue_call(url, tab.session_hash, fn_index, [None, None, question, False])


def hints_in_page(url: str, demo, tab: Client, question: str) -> list[str]:
    """The messages the image tab's hint about example questions shows for `question` in `tab`'s Gradio session."""
    fn_index = next(i for i, fn in demo.fns.items() if fn.name == "hint")
    body = {"data": [None, question], "fn_index": fn_index, "session_hash": tab.session_hash}
    httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=30).raise_for_status()
    shown = []
    with httpx.stream(
        "GET", f"{url}gradio_api/queue/data", params={"session_hash": tab.session_hash}, timeout=60
    ) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "log":
                    shown.append(message["log"])
                if message.get("msg") == "process_completed":
                    return shown
    raise AssertionError("the event never completed")


def expire(demo, tab: Client) -> None:
    """Gradio's expiry of a tab's session: its time to live has passed since it was last set, and the sweep deletes
    it (calling its delete callback); the tab's next request gets a new default session."""
    state = demo.state_holder.session_data[tab.session_hash]
    for key, (time_to_live, _) in list(state._state_ttl.items()):
        state._state_ttl[key] = (time_to_live, datetime.datetime.now() - datetime.timedelta(seconds=time_to_live + 1))
    demo.state_holder.delete_all_expired_state()


def test_a_tab_left_open_past_its_sessions_expiry_is_told_once_at_its_next_question(url, demo):
    """A first visit and a second tab of its browser ask without being told anything; the first tab's state expires
    while the second holds the session: the first takes it back. Once both have expired, the next question is
    refused with the sentence, and the one after it (past Gradio's next sweep) is not told again."""
    first, second = visitor(url), visitor(url)
    token = page_load(url, demo, first)
    introduce(first, "Chelsea")
    assert ask_in_page(url, demo, first, "What colour are Chelsea's eyes?")["success"] is True
    assert page_load(url, demo, second, token) == token and names(second) == ["Chelsea"]
    assert ask_in_page(url, demo, second, "What colour are Chelsea's eyes?")["success"] is True
    expire(demo, first)
    assert hints_in_page(url, demo, first, "What colour are Chelsea's eyes?") == []  # Chelsea is still there
    assert ask_in_page(url, demo, first, "What colour are Chelsea's eyes?")["success"] is True
    assert names(first) == ["Chelsea"]  # taken back from the second tab, as a reload would
    expire(demo, first)
    expire(demo, second)
    told = ask_in_page(url, demo, first, "And her paws?")
    assert told["success"] is False
    assert "Your session on this server ended 60 minutes after your last action" in told["output"]["error"]
    time.sleep(1.5)  # Gradio's sweep of expired states runs every second
    again = ask_in_page(url, demo, first, "And her paws?")
    assert again["success"] is False and again["output"]["error"].startswith("Add a photo to ask about")
    assert names(first) == []
    reloaded = visitor(url)  # a reload: its token names nothing any more, and it is no expiry of this page
    page_load(url, demo, reloaded, token)
    assert ask_in_page(url, demo, reloaded, "Hello?")["output"]["error"].startswith("Add a photo to ask about")


# ----------------------------------------------------------------------------------------------
# Gradio's file routes and file payloads: no file content, no fetched link
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def loopback_server():
    """A local HTTP server that records every request it gets."""
    hits = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(SECRET)))
            self.end_headers()
            self.wfile.write(SECRET)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


@pytest.fixture(params=["private", "public"])
def link_checks(request, monkeypatch):
    """ "private": Gradio's own check refuses loopback addresses. "public": the check is told the loopback
    server is public, as any public host would be, so only the app's own refusal stands."""
    if request.param == "public":
        import safehttpx

        async def looks_public(hostname, *args, **kwargs):
            return "127.0.0.1"

        monkeypatch.setattr(safehttpx, "async_validate_url", looks_public)
    return request.param


def test_file_routes_serve_no_host_file_and_fetch_no_link(url, loopback_server, link_checks):
    server, hits = loopback_server
    targets = [
        "/etc/passwd",
        "../app.py",
        "..%2Fapp.py",
        "%2Fetc%2Fpasswd",
        str(ROOT / "app.py"),
        "app.py",
        str(ROOT / ".gitignore"),
        "/proc/self/environ",
        f"{server}/photo.jpg",
        "HTTP://127.0.0.1:1/x",
    ]
    for target in targets:
        for route in ("file=", "file/"):
            response = httpx.get(f"{url}gradio_api/{route}{target}", timeout=30)
            assert response.status_code in (400, 403, 404), (target, response.status_code)
            assert PASSWD_LINE not in response.text and APP_SOURCE_LINE not in response.text
            assert SECRET not in response.content
    proxied = httpx.get(f"{url}gradio_api/proxy={server}/photo.jpg", timeout=30)
    assert proxied.status_code >= 400 and SECRET not in proxied.content
    assert hits == []


def queue_call(url: str, client: Client, api_name: str, data: list) -> dict:
    """Send raw `data` (State input first) to an endpoint in `client`'s session; the final message."""
    fn_index = next(i for i, dep in enumerate(client.config["dependencies"]) if dep.get("api_name") == api_name)
    session = client.session_hash
    joined = httpx.post(
        f"{url}gradio_api/queue/join",
        json={"data": [None, *data], "fn_index": fn_index, "session_hash": session},
        timeout=30,
    )
    joined.raise_for_status()
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the event never completed")


def test_file_payloads_naming_host_files_or_links_are_refused(url, mine, loopback_server, link_checks):
    server, hits = loopback_server
    client = mine["client"]
    # Host files that would be valid inputs (a photo, a concept file) too: only uploads are read.
    for path in [
        "/etc/passwd",
        "../app.py",
        str(ROOT / "app.py"),
        "/proc/self/environ",
        QUERY,
        str(mine["file"]),
        f"{server}/photo.jpg",
        f"{server}/concepts.safetensors",
    ]:
        # With the "meta" that says it is a file (Gradio checks those), and without it (only this app does).
        for file in ({"path": path, "meta": {"_type": "gradio.FileData"}}, {"path": path}):
            for api_name, data in [
                ("introduce", ["Sneaky", [{"image": file, "caption": None}], "cat", False, 10]),
                ("ask_image", [file, "What is this?", False]),
                ("ask_video", [{"video": file, "subtitles": None}, "What happens?"]),
                ("import_concepts", [file]),
            ]:
                message = queue_call(url, client, api_name, data)
                text = json.dumps(message)
                assert message["success"] is False, (api_name, path, text)
                assert PASSWD_LINE not in text and APP_SOURCE_LINE not in text and SECRET.decode() not in text
    assert hits == []
    assert client.predict(api_name="/list_concepts") == mine["records"]


def test_an_example_click_leaves_the_file_checks_in_place(url, mine):
    """An example click gives the session its own copy of the photo, photos and clip components (Gradio's way of
    updating a component for one session): the checks on file payloads still apply to what it reads."""
    client = mine["client"]
    loads = [  # the examples of the concepts, of the photo and of the clip: each fills a file input
        d["api_name"]
        for d in client.config["dependencies"]
        if re.fullmatch(r"load_example(_\d+)?", str(d.get("api_name"))) and d.get("api_visibility") != "private"
    ]
    assert len(loads) == 3
    for api_name in loads:
        client.predict(0, api_name=f"/{api_name}")
    for file in ({"path": QUERY}, {"path": "/etc/passwd"}, {"url": "data:image/png;base64,iVBORw0KGgo=", "path": None}):
        for api_name, data in [
            ("introduce", ["Sneaky", [{"image": file, "caption": None}], "cat", False, 10]),
            ("ask_image", [file, "What is this?", False]),
            ("ask_video", [{"video": file, "subtitles": None}, "What happens?"]),
        ]:
            message = queue_call(url, client, api_name, data)
            assert message["success"] is False, (api_name, file, json.dumps(message))
    assert client.predict(api_name="/list_concepts") == mine["records"]


# ----------------------------------------------------------------------------------------------
# Concept files: round trip, and hostile files
# ----------------------------------------------------------------------------------------------
def read_file(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, json.loads(handle.metadata()["ego"])


def rewritten(path: Path, out: Path, change) -> Path:
    """A copy of the concept file at `path` with `change(tensors, document)` applied."""
    tensors, document = read_file(path)
    change(tensors, document)
    save_file(tensors, str(out), metadata={"ego": json.dumps(document)})
    return out


def raw_safetensors(out: Path, header: dict, data: bytes = b"") -> Path:
    encoded = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return out


class LeavesAMark:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return (Path.touch, (self.mark,))


def written(out: Path, data: bytes) -> Path:
    out.write_bytes(data)
    return out


def setter(key, value):
    return lambda tensors, document: document.update({key: value})


def name_setter(*new_names):
    def change(tensors, document):
        document["concepts"] = [dict(document["concepts"][0], name=name) for name in new_names]
        for number in range(1, len(new_names)):
            for suffix in ("embeddings", "v0.token_indices", "v0.scores"):
                tensors[f"c{number}.{suffix}"] = tensors[f"c0.{suffix}"].clone()

    return change


def view_setter(**changes):
    return lambda tensors, document: document["concepts"][0]["views"][0].update(changes)


def keeps_nothing(tensors, document):
    """The concept's one view keeps k = 0 tokens, and its tensors agree (no memory rows, no indices)."""
    document["concepts"][0]["views"][0]["k"] = 0
    for key in ("c0.embeddings", "c0.v0.token_indices"):
        tensors[key] = tensors[key][:0].clone()


def nested_text(path: Path, out: Path, depth: int) -> Path:
    """A copy whose keywords nest `depth` lists deep, written as text (json.dumps cannot go that deep)."""
    tensors, document = read_file(path)
    document["concepts"][0]["views"][0]["keywords"] = "NESTED"
    text = json.dumps(document).replace('"NESTED"', "[" * depth + "]" * depth)
    save_file(tensors, str(out), metadata={"ego": text})
    return out


NOT_OURS = "not an Ego concept file"
HOSTILE = {
    # name: (how the file is made from the exported one, what the visitor is told)
    "text": (lambda good, out: written(out, b"name,embedding\nChelsea,0.1\n"), NOT_OURS),
    "pickle": (lambda good, out: written(out, pickle.dumps(LeavesAMark(out.with_suffix(".mark")))), NOT_OURS),
    "torch.save": (lambda good, out: torch.save({"c0.embeddings": torch.zeros(2, 2)}, out) or out, NOT_OURS),
    "empty": (lambda good, out: written(out, b""), NOT_OURS),
    "truncated": (lambda good, out: written(out, good.read_bytes()[: good.stat().st_size // 2]), NOT_OURS),
    "giant header length": (lambda good, out: written(out, struct.pack("<Q", 1 << 60) + b"{}"), NOT_OURS),
    "plain safetensors": (lambda good, out: save_file({"x": torch.zeros(3)}, str(out)) or out, NOT_OURS),
    "wrong version": (lambda good, out: rewritten(good, out, setter("version", 99)), "format version 99"),
    "another model": (
        lambda good, out: rewritten(good, out, setter("model_id", "someone/another-model")),
        "cannot be used with",
    ),
    "huge tensor shape": (
        lambda good, out: raw_safetensors(
            out,
            {
                "__metadata__": {"ego": json.dumps(read_file(good)[1])},
                "c0.embeddings": {"dtype": "F32", "shape": [1 << 30, 1 << 20], "data_offsets": [0, 1 << 52]},
            },
            b"\0" * 64,
        ),
        NOT_OURS,
    ),
    "offsets past the end": (
        lambda good, out: raw_safetensors(
            out,
            {
                "__metadata__": {"ego": json.dumps(read_file(good)[1])},
                "c0.embeddings": {"dtype": "F32", "shape": [4, 4], "data_offsets": [1 << 40, (1 << 40) + 64]},
            },
            b"\0" * 64,
        ),
        NOT_OURS,
    ),
    "grid larger than its data": (lambda good, out: rewritten(good, out, view_setter(grid=[4096, 4096])), NOT_OURS),
    "negative grid": (lambda good, out: rewritten(good, out, view_setter(grid=[-11, -11])), NOT_OURS),
    "not a number in the memory": (
        lambda good, out: rewritten(good, out, lambda tensors, document: tensors["c0.embeddings"].fill_(float("nan"))),
        NOT_OURS,
    ),
    "thousands of concepts": (
        lambda good, out: rewritten(
            good,
            out,
            lambda tensors, document: document.update(concepts=[{"name": f"c{i}", "views": []} for i in range(5000)]),
        ),
        "at most 200 concepts",
    ),
    "name too long": (lambda good, out: rewritten(good, out, name_setter("x" * 41)), "longer than 40 characters"),
    "empty name": (lambda good, out: rewritten(good, out, name_setter("  ")), "empty name"),
    "invisible name": (lambda good, out: rewritten(good, out, name_setter("\u200b\u202e")), "empty name"),
    # (two concepts of one name are not a refusal: the first is imported, test_actions.py)
    "all names taken": (
        lambda good, out: rewritten(good, out, name_setter(" mine", "MINE")),
        "already have a concept named '\u2068mine\u2069': every",  # one of the visitor's, named once
    ),
    "a name taken": (lambda good, out: rewritten(good, out, name_setter(" mine")), "already have a concept named"),
    "no views": (
        lambda good, out: rewritten(good, out, lambda t, d: d["concepts"][0].update(views=[])),
        "no reference views",
    ),
    "a view that keeps no tokens": (lambda good, out: rewritten(good, out, keeps_nothing), "keeps no memory tokens"),
    "metadata nested 100,000 deep": (lambda good, out: nested_text(good, out, 100_000), "nests deeper"),
    "a lone surrogate in the name": (
        lambda good, out: rewritten(good, out, name_setter("Mi\ud800ne")),
        "not valid Unicode",
    ),
    "a lone surrogate in a keyword": (
        lambda good, out: rewritten(good, out, view_setter(keywords=["\udfff"])),
        "not valid Unicode",
    ),
    "60,000 keywords": (
        lambda good, out: rewritten(good, out, view_setter(keywords=["w"] * 60_000)),
        "more than 100 keywords",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_concept_files_are_refused_and_change_nothing(mine, tmp_path, case):
    make, message = HOSTILE[case]
    path = make(mine["file"], tmp_path / "concepts.safetensors")
    client = mine["client"]
    with pytest.raises(AppError, match=message) as refused:
        client.predict(handle_file(str(path)), api_name="/import_concepts")
    assert str(refused.value).rstrip("'\"").endswith(".")
    assert client.predict(api_name="/list_concepts") == mine["records"]
    assert not list(tmp_path.glob("*.mark")), "a pickle was loaded"


def raw_queue_call(url: str, session_hash: str, fn_index: int, data: list) -> dict:
    """Like `queue_call`, with the JSON written by hand (ASCII escapes), so text no client would encode (a lone
    surrogate) reaches the server as a script can send it."""
    body = json.dumps({"data": data, "fn_index": fn_index, "session_hash": session_hash})
    joined = httpx.post(
        f"{url}gradio_api/queue/join", content=body, timeout=30, headers={"content-type": "application/json"}
    )
    joined.raise_for_status()
    with httpx.stream(
        "GET", f"{url}gradio_api/queue/data", params={"session_hash": session_hash}, timeout=60
    ) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the event never completed")


def test_text_that_is_not_valid_unicode_gets_a_sentence_and_the_session_keeps_working(url, mine):
    client = mine["client"]
    index = {dep.get("api_name"): i for i, dep in enumerate(client.config["dependencies"])}
    for api_name, data, field in [
        ("introduce", [None, "Chel\ud800sea", [], "tabby", False, 10], "name"),
        ("ask_image", [None, None, "Is \udfff here?", False], "question"),
        ("remove_concept", [None, "Mi\ud800ne"], "name"),
    ]:
        reply = raw_queue_call(url, client.session_hash, index[api_name], data)
        assert reply["success"] is False
        assert f"The {field} contains characters that are not valid Unicode" in reply["output"]["error"]
        assert client.predict(api_name="/list_concepts") == mine["records"]
    answer, *_ = client.predict(handle_file(QUERY), "Is Mine here?", False, api_name="/ask_image")
    assert isinstance(answer, str)


def test_round_trip_and_names_that_look_like_paths_or_html(url, mine, tmp_path):
    fresh = visitor(url)
    assert fresh.predict(handle_file(str(mine["file"])), api_name="/import_concepts") == mine["records"]

    hostile = ["../../etc/passwd", "<img src=x onerror=alert(1)>", "ab\u202ecd"]
    path = rewritten(mine["file"], tmp_path / "names.safetensors", name_setter(*hostile))
    other = visitor(url)
    records = other.predict(handle_file(str(path)), api_name="/import_concepts")
    assert [r["name"] for r in records] == ["../../etc/passwd", "<img src=x onerror=alert(1)>", "abcd"]
    exported = Path(other.predict(api_name="/export_concepts"))
    assert exported.name == "ego-concepts.safetensors"  # a name never becomes a path
    assert not (ROOT / "etc").exists() and not Path(get_upload_folder(), "etc", "passwd").exists()
    with pytest.raises(AppError) as refused:  # the name comes back in a message: escaped
        other.predict(handle_file(str(path)), api_name="/import_concepts")
    message = str(refused.value)
    assert "&lt;img src=x onerror=alert(1)&gt;" in message and "<img" not in message
    assert [r["name"] for r in other.predict(api_name="/list_concepts")] == [r["name"] for r in records]


def test_an_export_lives_in_the_swept_file_cache(mine):
    """Gradio evicts sessions beyond `max_sessions` without calling `forget`; an export file in Gradio's
    cache is still deleted by the cache sweep, one anywhere else would stay until a restart."""
    act = Actions(LazyEngine(tiny_engine("qwen2.5-vl").with_settings(SETTINGS)), SPACE_SETTINGS, Examples())
    session = Session()
    act.import_concepts(session, str(mine["file"]), progress=lambda *args, **kwargs: None)
    _, exported = act.export_concepts(session)
    assert Path(exported).resolve().is_relative_to(Path(get_upload_folder()).resolve())
    forget(session)
    assert not Path(exported).exists()


# ----------------------------------------------------------------------------------------------
# Nothing about a visitor reaches the server's output
# ----------------------------------------------------------------------------------------------
VISITOR_SCRIPT = """
import sys
from gradio_client import Client, handle_file
client = Client(sys.argv[1], verbose=False)
photo = [{"image": handle_file(sys.argv[2]), "caption": None}]
client.predict("Quokka Zanzibar", photo, "quokka fur", False, 10, api_name="/introduce")
client.predict(handle_file(sys.argv[3]), "Is the quokka-question-4471 here?", True, api_name="/ask_image")
client.predict(api_name="/list_concepts")
try:
    client.predict(handle_file(sys.argv[4]), api_name="/import_concepts")
except Exception:
    pass
client.predict("Quokka Zanzibar", api_name="/remove_concept")
print(client.session_hash)
"""


def test_session_ids_and_visitor_text_are_never_logged(url, tmp_path, capfd, caplog):
    import logging

    private_file = tmp_path / "quokka-private-file.safetensors"
    private_file.write_bytes(b"not a concept file")
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):
        run = subprocess.run(
            [sys.executable, "-c", VISITOR_SCRIPT, url, PHOTO, QUERY, str(private_file)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert run.returncode == 0, run.stderr
    session_hash = run.stdout.split()[-1]
    captured = capfd.readouterr()
    server_output = captured.out + captured.err + caplog.text
    assert len(session_hash) >= 8
    for secret in (session_hash, "Quokka", "quokka", "4471"):
        assert secret not in server_output, secret


def test_a_malformed_call_gets_a_sentence_and_its_values_stay_out_of_the_log(url, mine, capfd, caplog):
    """Too many values, or a value a component cannot read: the caller learns which input and where the inputs are
    listed (Gradio's own refusal is empty for the caller), and what was sent is not written to the server log."""
    import logging

    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):
        cases = [
            # Counted as sent (on this route with the session's hidden state first), against the inputs the API
            # page lists; numbered as it lists them.
            ("remove_concept", ["quokka-value-9931", "quokka"], "sends 3 input values, and /remove_concept takes 1"),
            ("ask_image", ["quokka-value-9931", "Is the quokka here?", False], "input 1 (Photo)"),
            ("introduce", ["Quokka", [{"caption": "quokka-value-9931"}], "", False, 10], "input 2"),
        ]
        for api_name, data, says in cases:
            message = queue_call(url, mine["client"], api_name, data)
            assert message["success"] is False
            error = message["output"]["error"]
            assert f"This call does not match /{api_name}" in error and says in error and "Use via API" in error
    captured = capfd.readouterr()
    server_output = captured.out + captured.err + caplog.text
    assert "quokka" not in server_output.casefold() and "Received inputs" not in server_output
    assert "/remove_concept" in server_output  # what failed is logged, without the values
