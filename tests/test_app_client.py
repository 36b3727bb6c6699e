"""The Space over HTTP with gradio_client: the named API, one visitor's round trip, visitors kept apart."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import running_demo, tiny_engine
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from ego import DEFAULT_SETTINGS
from space.examples import load_examples
from space.settings import SpaceSettings

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = DEFAULT_SETTINGS.replace(answer_max_new_tokens=8)
SHOW_ERROR = True
"""The module's server (conftest's `demo` and `url` fixtures)."""
ENDPOINTS = {
    "/introduce",
    "/ask_image",
    "/ask_video",
    "/follow_up",
    "/list_concepts",
    "/remove_concept",
    "/export_concepts",
    "/import_concepts",
}


@pytest.fixture(scope="module")
def example():
    examples = load_examples()
    name, photos = examples.concepts[0]
    return {
        "name": name,
        "photos": photos[:2],
        "image": examples.image_questions[0],
        "video": examples.video_questions[0],
    }


def photos_payload(paths):
    return [{"image": handle_file(path), "caption": None} for path in paths]


def test_the_api_is_exactly_the_named_endpoints(url):
    api = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == ENDPOINTS
    assert not api["unnamed_endpoints"]
    introduce = [p["parameter_name"] for p in api["named_endpoints"]["/introduce"]["parameters"]]
    assert introduce == ["name", "photos", "keywords", "auto_size", "size_pct"]


def _as_snippet_runs_it(value):
    """An example argument of the "Use via API" page as its snippet sends it, run from the repository root
    (`handle_file('examples/...')`)."""
    if isinstance(value, dict) and value.get("meta", {}).get("_type") == "gradio.FileData":
        assert not str(value["path"]).startswith(("http://", "https://")), "this app refuses links"
        return handle_file(str(ROOT / value["path"]))
    if isinstance(value, dict):
        return {key: _as_snippet_runs_it(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_snippet_runs_it(item) for item in value]
    return value


def test_the_api_page_documents_each_endpoint_and_its_examples_run(url):
    client = Client(url, verbose=False)
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name, endpoint in api.items():
        assert endpoint["description"] and not endpoint["description"].startswith(("Stream (", "(session")), name
        assert all(not re.fullmatch(r"value_\d+", r["label"]) for r in endpoint["returns"]), name
        assert all(p.get("example_input") != "Hello!!" for p in endpoint["parameters"]), name  # Gradio's placeholder

    photos = api["/introduce"]["parameters"][1]
    assert photos["parameter_name"] == "photos" and not photos["parameter_has_default"]  # the page shows the example

    def run(name):
        return client.predict(
            *[_as_snippet_runs_it(p["example_input"]) for p in api[name]["parameters"]], api_name=name
        )

    report, patches, _ = run("/introduce")
    introduced = [p["example_input"] for p in api["/introduce"]["parameters"]][0]
    assert introduced in report and len(patches) == 3
    answer, _, details, _ = run("/ask_image")
    assert details["concepts_used"] == [introduced]
    frames, _, details = run("/ask_video")
    assert len(frames) == SETTINGS.video_num_frames and details["concepts_used"] == [introduced]
    assert run("/follow_up")
    assert run("/remove_concept") == []


def test_one_visitor_round_trip(url, example, tmp_path):
    client = Client(url, verbose=False)
    assert client.predict(api_name="/list_concepts") == []

    report, patches, heats = client.predict(example["name"], photos_payload(example["photos"]), api_name="/introduce")
    assert example["name"] in report and len(patches) == len(heats) == len(example["photos"])
    assert all("tokens kept" in item["caption"] for item in patches)

    listed = client.predict(api_name="/list_concepts")
    assert [c["name"] for c in listed] == [example["name"]]
    concept = listed[0]
    assert concept["tokens"] == sum(view["tokens"] for view in concept["views"]) > 0
    assert concept["photos"] == len(example["photos"]) and len(concept["size_pct"]) == concept["photos"]
    json.dumps(listed)

    image, question = example["image"]
    answer, plain, details, matches = client.predict(handle_file(image), question, True, api_name="/ask_image")
    assert isinstance(answer, str) and isinstance(plain, str)
    assert [item["caption"] for item in matches] == [
        f"\u2068{example['name']}\u2069 · similarity {details['similarity'][example['name']]:.2f}"
    ]
    _, _, details, matches = client.predict(None, f"Describe {example['name']}.", api_name="/ask_image")
    assert details["concepts_used"] == [example["name"]] and matches == []  # no photo: the memory alone
    assert details["concepts_used"] == [example["name"]] and details["memory_tokens"] == concept["tokens"]

    video, question = example["video"]
    frames, answer, details = client.predict(handle_file(video), question, api_name="/ask_video")
    assert len(frames) == DEFAULT_SETTINGS.video_num_frames and isinstance(answer, str)
    assert details["concepts_used"] == [example["name"]]

    exported = client.predict(api_name="/export_concepts")
    assert exported.endswith(".safetensors")

    with pytest.raises(AppError, match="already have a concept named"):
        client.predict(example["name"], photos_payload(example["photos"][:1]), api_name="/introduce")
    assert client.predict(example["name"], api_name="/remove_concept") == []
    assert client.predict(api_name="/list_concepts") == []

    assert client.predict(handle_file(exported), api_name="/import_concepts") == listed
    assert client.predict(api_name="/list_concepts") == listed


def test_visitors_do_not_see_each_other(url, example):
    first, second = Client(url, verbose=False), Client(url, verbose=False)
    first.predict("Only mine", photos_payload(example["photos"][:1]), api_name="/introduce")
    assert [c["name"] for c in first.predict(api_name="/list_concepts")] == ["Only mine"]
    assert second.predict(api_name="/list_concepts") == []

    image, question = example["image"]
    _, _, details, matches = second.predict(handle_file(image), question, api_name="/ask_image")
    assert details["concepts_used"] == [] and matches == []
    with pytest.raises(AppError, match="no concept with that name"):
        second.predict("Only mine", api_name="/remove_concept")
    with pytest.raises(AppError, match="no concepts to export"):
        second.predict(api_name="/export_concepts")
    assert [c["name"] for c in first.predict(api_name="/list_concepts")] == ["Only mine"]


def test_refusals_are_sentences_and_leave_the_concepts_as_they_were(url, example, tmp_path, capfd):
    client = Client(url, verbose=False)
    client.predict("Kept", photos_payload(example["photos"][:1]), api_name="/introduce")
    before = client.predict(api_name="/list_concepts")

    not_a_photo = tmp_path / "private_notes.png"
    not_a_photo.write_text("<svg onload=alert(1)>")
    with pytest.raises(AppError, match="JPEG, PNG"):
        client.predict("New", photos_payload([str(not_a_photo)]), api_name="/introduce")
    with pytest.raises(AppError, match="not an image this app can read"):
        client.predict(handle_file(str(not_a_photo)), "What is this?", api_name="/ask_image")
    with pytest.raises(AppError, match="video"):
        client.predict(handle_file(str(not_a_photo)), "What is this?", api_name="/ask_video")
    with pytest.raises(AppError, match="at most 40 characters"):
        client.predict("x" * 41, photos_payload(example["photos"][:1]), api_name="/introduce")
    fake = tmp_path / "concepts.safetensors"
    fake.write_bytes(b"\x00" * 64)
    with pytest.raises(AppError, match="not an Ego concept file"):
        client.predict(handle_file(str(fake)), api_name="/import_concepts")
    with pytest.raises(AppError, match="Type a question"):
        client.predict(handle_file(example["image"][0]), "", api_name="/ask_image")
    assert client.predict(api_name="/list_concepts") == before
    server_output = capfd.readouterr()
    assert "private_notes" not in server_output.out + server_output.err  # no visitor file names in the log


def test_a_visitors_memory_is_freed_after_its_time_to_live(example, monkeypatch):
    import space.session

    freed = []
    real_forget = space.session.forget
    monkeypatch.setattr(space.session, "forget", lambda s: (freed.append(list(s.names)), real_forget(s)))
    with running_demo(SETTINGS, SpaceSettings(session_ttl_s=1), show_error=True) as demo:
        client = Client(demo.local_url, verbose=False)
        client.predict("Brief", photos_payload(example["photos"][:1]), api_name="/introduce")
        deadline = time.monotonic() + 10
        while not freed and time.monotonic() < deadline:
            time.sleep(0.2)
        assert freed == [["Brief"]]
        # Its next question is told that the session ended, rather than answered without the concept.
        with pytest.raises(AppError, match="Your session on this server ended .* /introduce"):
            client.predict(handle_file(example["image"][0]), "Is Brief here?", False, api_name="/ask_image")
        assert client.predict(api_name="/list_concepts") == []


def test_the_http_api_curl_example_runs(url):
    """docs/http-api.md's curl example, as written, against the Space; then a second session_hash, which sees
    none of the first one's concepts, and a refused call, which ends in an error event with its sentence."""
    doc = (ROOT / "docs" / "http-api.md").read_text(encoding="utf-8")
    section = doc[doc.index("Without Python's client") :]
    script = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert "URL=http://127.0.0.1:7860/gradio_api" in script
    script = script.replace("URL=http://127.0.0.1:7860/gradio_api", f"URL={url}gradio_api")
    script += (
        'echo "--- another session"\nSESSION=another-$SESSION\ncall list_concepts "[]"\n'
        'echo "--- refused"\nSESSION=${SESSION#another-}\ncall remove_concept \'["Nobody"]\'\n'
    )
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    mine, other, refused = (
        done.stdout.split("--- another session\n")[0],
        *done.stdout.split("--- another session\n")[1].split("--- refused\n"),
    )
    listed, answered = (json.loads(line) for line in mine.strip().splitlines())
    assert listed[0] is None and [record["name"] for record in listed[1]] == ["Chelsea"]
    assert answered[0] is None and answered[3]["concepts_used"] == ["Chelsea"] and answered[1]
    assert json.loads(other) == [None, []]
    assert json.loads(refused)["error"] == "There is no concept with that name; pick one from the list."


def test_the_http_api_conversation_runs_with_gradio_client_and_curl(url, capsys):
    """docs/http-api.md's two-turn examples as written: /ask_image starts a conversation, /follow_up continues it
    (the answer a cached follow-up gives); a follow-up with no conversation is refused with a sentence."""
    doc = (ROOT / "docs" / "http-api.md").read_text(encoding="utf-8")
    section = doc[doc.index("Each `/ask_image` or `/ask_video` call starts a conversation") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'Client("http://127.0.0.1:7860/")' in code and "/follow_up" in code
    scope = {}
    exec(compile(code.replace("http://127.0.0.1:7860/", url), "http-api.md", "exec"), scope)
    printed = capsys.readouterr().out
    # The answers the engine gives to the same two questions, the second recomputed without a cache.
    engine = tiny_engine("qwen2.5-vl")
    chat = engine.chat(
        [engine.introduce("Chelsea", [str(ROOT / "examples/concepts/chelsea_1.jpg")])],
        image=str(ROOT / "examples/scenes/chelsea_query.jpg"),
    )
    first = chat.ask("Is Chelsea in this photo?", max_new_tokens=SETTINGS.answer_max_new_tokens)
    second = chat.ask("What is she doing?", max_new_tokens=SETTINGS.answer_max_new_tokens, use_cache=False)
    assert scope["answer"] == str(first) and printed.endswith(f"{first}\n{second}\n")
    with pytest.raises(AppError, match="no conversation to follow up yet"):
        Client(url, verbose=False).predict("What is she doing?", api_name="/follow_up")

    first = re.search(r"```bash\n(.*?)```", doc[doc.index("Without Python's client") :], re.S).group(1)
    second = re.search(r"```bash\n(.*?)```", doc[doc.index("A conversation over HTTP") :], re.S).group(1)
    script = (first + 'echo "--- conversation"\n' + second).replace(
        "URL=http://127.0.0.1:7860/gradio_api", f"URL={url}gradio_api"
    )
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    asked, followed = (json.loads(line) for line in done.stdout.split("--- conversation\n")[1].strip().splitlines())
    assert asked[0] is None and asked[3]["concepts_used"] == ["Chelsea"]
    assert followed[0] is None and isinstance(followed[1], str) and len(followed) == 2
