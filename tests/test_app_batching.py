"""The running Space answers visitors who ask together in one batch, each their own answer, and one visitor's
Stop (a cancelled job) leaves the others' answers whole."""

from __future__ import annotations

import logging
import time

from conftest import EXAMPLE_PHOTO, EXAMPLE_QUERY, introduce_through_api, running_demo, tiny_engine, visitor
from gradio_client import handle_file

from ego import DEFAULT_SETTINGS
from ego.media import load_image
from space.settings import SpaceSettings

# A long window, so that requests sent over HTTP one after another still meet in one batch.
SETTINGS = DEFAULT_SETTINGS.replace(answer_max_new_tokens=8)
SPACE_SETTINGS = SpaceSettings(answer_batch_window_s=3.0)


def test_visitors_who_ask_together_get_one_batch_and_their_own_answers(url, caplog):
    caplog.set_level(logging.INFO, logger="ego.space")
    engine = tiny_engine("qwen2.5-vl")
    first, second, third = visitor(url), visitor(url), visitor(url)
    introduce_through_api(first, "Chelsea")
    questions = [(first, "Is Chelsea here?"), (second, "What is in this photo?"), (third, "Describe it.")]
    jobs = [
        client.submit(handle_file(EXAMPLE_QUERY), question, api_name="/ask_image") for client, question in questions
    ]
    answers = [job.result(timeout=120)[0] for job in jobs]

    chelsea = first.predict(api_name="/list_concepts")
    assert [record["name"] for record in chelsea] == ["Chelsea"]
    # each visitor's answer is the one their question gets alone (the first with their concept, the others without)
    picture = load_image(EXAMPLE_QUERY, engine.settings)
    concept = engine.introduce("Chelsea", [EXAMPLE_PHOTO], keywords="tabby cat", area_pct=10)
    alone = [
        engine.answer("Is Chelsea here?", [concept], image=picture, max_new_tokens=8),
        engine.answer("What is in this photo?", image=picture, max_new_tokens=8),
        engine.answer("Describe it.", image=picture, max_new_tokens=8),
    ]
    assert answers == [str(a) for a in alone]
    assert "answered a batch of 3" in caplog.text


def test_one_visitors_stop_leaves_the_others_answer_whole(url, caplog):
    caplog.set_level(logging.INFO, logger="ego.space")
    engine = tiny_engine("qwen2.5-vl")
    staying, leaving = visitor(url), visitor(url)
    kept = staying.submit(handle_file(EXAMPLE_QUERY), "What is in this photo?", api_name="/ask_image")
    cancelled = leaving.submit(handle_file(EXAMPLE_QUERY), "Describe it.", api_name="/ask_image")
    time.sleep(1.0)  # both are waiting in the batching window
    cancelled.cancel()
    picture = load_image(EXAMPLE_QUERY, engine.settings)
    assert kept.result(timeout=120)[0] == str(engine.answer("What is in this photo?", image=picture, max_new_tokens=8))


def test_with_compiled_decoding_visitors_keep_their_own_conversations(caplog):
    """The Space decoding compiled (as on CUDA; "aot_eager" here): two visitors' first questions in one batch, then
    their follow-ups together, each batch of follow-ups continuing both conversations' caches on the shared static
    cache; every answer is the eager engine's for that visitor's conversation alone."""
    caplog.set_level(logging.INFO, logger="ego.space")
    settings = SETTINGS.replace(decoding="compiled", compile_backend="aot_eager")
    with running_demo(settings, SPACE_SETTINGS) as demo:
        first, second = visitor(demo.local_url), visitor(demo.local_url)
        introduce_through_api(first, "Chelsea")
        jobs = [
            client.submit(handle_file(EXAMPLE_QUERY), question, api_name="/ask_image")
            for client, question in ((first, "Is Chelsea here?"), (second, "What is in this photo?"))
        ]
        said = {first: [jobs[0].result(timeout=300)[0]], second: [jobs[1].result(timeout=300)[0]]}
        for question in ("And then?", "What colour is it?"):
            follow_ups = [client.submit(question, api_name="/follow_up") for client in (first, second)]
            for client, job in zip((first, second), follow_ups):
                said[client].append(job.result(timeout=300))
    assert caplog.text.count("answered a batch of 2") == 3  # the first questions, then each round of follow-ups

    engine = tiny_engine("qwen2.5-vl")
    picture = load_image(EXAMPLE_QUERY, engine.settings)
    concept = engine.introduce("Chelsea", [EXAMPLE_PHOTO], keywords="tabby cat", area_pct=10)
    for client, concepts, opening in ((first, [concept], "Is Chelsea here?"), (second, [], "What is in this photo?")):
        alone = engine.chat(concepts, image=picture)
        expected = [alone.ask(q, max_new_tokens=8) for q in (opening, "And then?", "What colour is it?")]
        assert said[client] == [str(answer) for answer in expected]
