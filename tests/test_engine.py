"""The method of section 3, checked against independent computations on tiny real architectures."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from conftest import (
    WholeBudgetGenerations,
    description_keyword_tokens,
    eager_model,
    photo,
    reference_inputs,
    spy_on_generate,
    tiny_engine,
)

import ego.engine
from ego import AnswerRequest, Concept, Ego, IncompatibleMemoryError, InputError
from ego.engine import _extend


def eager_importance(engine, family, picture, continuation_ids, keyword_offsets):
    """Eq. 3 recomputed from eager attention maps of the whole sequence (prompt + description)."""
    model = eager_model(family)
    inputs = reference_inputs(engine, picture)
    start = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([continuation_ids])], dim=1)
    # per-token inputs (attention_mask, mm_token_type_ids, ...) grow by the continuation's text tokens
    forward = {k: v for k, v in _extend(inputs, ids.shape[1]).items() if k != "input_ids"}
    with torch.no_grad():
        out = model(input_ids=ids, **forward, output_attentions=True)
    columns = (ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    rows = torch.tensor([start + i for i in keyword_offsets])
    attention = torch.stack([out.attentions[layer][0] for layer in engine.layers])  # [|L|, H, T, T]
    block = attention[:, :, rows][:, :, :, columns]  # [|L|, H, N_w, N_r]
    # mean over keywords, then heads, then layers, written out as sums to stay independent of the code
    n_layers, n_heads, n_words, _ = block.shape
    return block.sum(dim=(0, 1, 2)) / (n_layers * n_heads * n_words), columns.numel()


def eq4(area_pct, n_r, k_cap):
    value = min(k_cap, area_pct * n_r / 100)
    return max(1, math.floor(value + 0.5))


def test_eq3_eq4_match_eager_attention_on_the_generated_description(family):
    engine = tiny_engine(family)
    picture = photo(1)
    concept = engine.introduce("Chelsea", [picture])
    view = concept.views[0]
    # The description the engine saw, regenerated greedily by the eager model from the same prompt.
    inputs = reference_inputs(engine, picture)
    with torch.no_grad():
        generated = eager_model(family).generate(
            **inputs, max_new_tokens=engine.settings.description_max_new_tokens, min_new_tokens=2, **engine.decoding
        )
    description_ids = generated[0, inputs["input_ids"].shape[1] :].tolist()
    while description_ids and description_ids[-1] in engine.backend.stop_token_ids:
        description_ids.pop()
    assert engine.backend.tokenizer.decode(description_ids, skip_special_tokens=True) == view.description
    # The keyword rows, found without the engine's `keyword_positions`.
    offsets = description_keyword_tokens(engine.backend.tokenizer, description_ids)
    expected, n_r = eager_importance(engine, family, picture, description_ids, offsets)
    torch.testing.assert_close(view.scores, expected, atol=2e-5, rtol=1e-4)
    assert view.grid[0] * view.grid[1] == n_r == view.scores.numel()
    k = eq4(view.area_pct, n_r, engine.settings.k_cap_tokens)
    assert view.k == k == concept.embeddings.shape[0]
    assert view.token_indices.tolist() == sorted(torch.topk(expected, k).indices.tolist())


@pytest.mark.parametrize("area_pct", [100, 7, 1])
def test_fixed_and_dynamic_k_with_user_keywords(family, area_pct, monkeypatch):
    """Keywords and size given by the user: the rows read are exactly the keyword tokens, their stop-words
    included (the visitor's words are taken as given; only a description's are filtered)."""
    engine = tiny_engine(family)
    picture = photo(2)
    read = []
    scored = ego.engine.layer_importance
    monkeypatch.setattr(
        ego.engine, "layer_importance", lambda capture, rows: read.append(rows) or scored(capture, rows)
    )
    concept = engine.introduce("my mug", [picture], keywords=["the red", "ceramic mug"], area_pct=area_pct)
    view = concept.views[0]
    assert view.keywords == ("the red", "ceramic mug") and view.keywords_source == "user"
    assert view.area_pct == area_pct and view.area_source == "user"
    tokenizer = engine.backend.tokenizer
    ids = tokenizer("the red, ceramic mug", add_special_tokens=False).input_ids
    word_offsets = [i for i, t in enumerate(ids) if tokenizer.decode([t]).strip(" ,")]  # every token but the comma
    (rows,) = read
    assert [row - rows[0] for row in rows] == [offset - word_offsets[0] for offset in word_offsets]
    expected, n_r = eager_importance(engine, family, picture, ids, word_offsets)
    torch.testing.assert_close(view.scores, expected, atol=2e-5, rtol=1e-4)
    k = eq4(area_pct, n_r, engine.settings.k_cap_tokens)
    assert view.k == k
    if area_pct == 100:
        assert k == engine.settings.k_cap_tokens  # fixed K: the cap
    else:
        assert 1 <= k < engine.settings.k_cap_tokens  # dynamic K: the subject's share of N_r
    assert view.token_indices.tolist() == sorted(torch.topk(expected, k).indices.tolist())


def test_memory_rows_are_projector_rows_at_kept_indices_in_raster_order(family):
    engine = tiny_engine(family)
    pictures = [photo(3), photo(4, size=(200, 260))]
    concept = engine.introduce("Chelsea", pictures, area_pct=30)
    assert len(concept.views) == 2
    rows = []
    for picture, view in zip(pictures, concept.views):
        inputs = reference_inputs(engine, picture)
        with torch.no_grad():
            pixels = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
            features = engine.model.get_image_features(**pixels, return_dict=True).pooler_output[0]
        indices = view.token_indices.tolist()
        assert indices == sorted(indices) and len(set(indices)) == len(indices) == view.k
        rows.append(features[view.token_indices])
    torch.testing.assert_close(concept.embeddings, torch.cat(rows).to(concept.embeddings.dtype))
    assert concept.embeddings.device.type == "cpu"
    assert concept.num_tokens == sum(v.k for v in concept.views)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "internvl3"])
def test_an_introductions_processor_work_is_done_before_the_models_turn(family, monkeypatch):
    """Resizing the photos and tokenizing the prompt need no model: done outside the model's lock (about half a
    second of it for five 12-megapixel photos), one per photo, with the same concept as before (the stages' seconds
    include it)."""
    engine = tiny_engine(family)
    before = engine.introduce("Chelsea", [photo(0), photo(1)], keywords="cat", area_pct=10)
    held, encode = [], engine.backend.encode
    monkeypatch.setattr(
        engine.backend, "encode", lambda *args, **kwargs: held.append(engine._lock.locked()) or encode(*args, **kwargs)
    )
    concept = engine.introduce("Chelsea", [photo(0), photo(1)], keywords="cat", area_pct=10)
    assert held == [False, False]
    # Another thread may use the tokenizer meanwhile: safe while no call changes its state (padding, truncation).
    engine.answer_batch([AnswerRequest("Is Chelsea here?", [concept], photo(2), None, 2), AnswerRequest("Hi?", [])])
    backend = engine.backend.tokenizer._tokenizer
    assert backend.padding is None and backend.truncation is None
    assert torch.equal(concept.embeddings, before.embeddings)
    assert [v.token_indices.tolist() for v in concept.views] == [v.token_indices.tolist() for v in before.views]
    assert all(view.timings_s["encode_s"] > 0 for view in concept.views)


def test_smaller_cap_keeps_fewer_tokens():
    from ego import Settings

    engine = tiny_engine("qwen2-vl", settings=Settings(k_cap_tokens=8))
    concept = engine.introduce("Chelsea", [photo(5)], area_pct=100)
    assert concept.views[0].k == 8 and concept.embeddings.shape[0] == 8


def test_the_settings_given_are_the_engines():
    from ego import Settings

    assert tiny_engine("qwen2-vl", settings=Settings(k_cap_tokens=30)).settings.k_cap_tokens == 30
    assert tiny_engine("qwen2-vl").settings.k_cap_tokens == Settings().k_cap_tokens


def test_with_settings_is_the_same_model_with_other_settings_and_one_call_at_a_time():
    import threading

    from ego import Settings

    engine = tiny_engine("qwen2-vl")
    small = engine.with_settings(k_cap_tokens=8)
    assert small.settings == engine.settings.replace(k_cap_tokens=8) and engine.settings.k_cap_tokens == 50
    assert small.model is engine.model and small.backend is engine.backend and small.decoder is engine.decoder
    with pytest.raises(ValueError, match="set_decoding"):
        engine.with_settings(decoding="compiled")  # one decoder per loaded model
    assert engine.with_settings(Settings.paper(), k_cap_tokens=8).settings == Settings.paper(k_cap_tokens=8)
    assert engine.with_settings(settings=Settings.paper()).settings == Settings.paper()  # by name too
    assert small.introduce("Chelsea", [photo(5)], area_pct=100).views[0].k == 8
    # Both share the model, so both wait for each other: while one holds it, the other cannot take it (asked
    # without waiting, from another thread: an answer, not a timing), and takes it once it is free.
    asked, entered, taken = threading.Event(), threading.Event(), []

    def use_small():
        taken.append(small._lock.acquire(blocking=False))
        if taken[-1]:
            small._lock.release()
        asked.set()
        with small.exclusive_use():
            entered.set()

    with engine.exclusive_use():
        worker = threading.Thread(target=use_small, daemon=True)
        worker.start()
        assert asked.wait(30)
        assert taken == [False], "the other engine took the model while this one held it"
        assert not entered.is_set()
    worker.join(30)
    assert entered.is_set()


class _EmbedsRecorder:
    """Records the input embeddings the language model receives on its first (prefill) call."""

    def __init__(self, engine):
        self.calls = []
        module = engine.model.model.language_model
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            self.calls.append(kwargs["inputs_embeds"].detach().clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("medium", ["image", "video"])
def test_memories_reach_the_language_model_at_placeholder_positions(family, medium, monkeypatch):
    engine = tiny_engine(family)
    concepts = [
        engine.introduce(name, [photo(i)], keywords="subject", area_pct=area)
        for i, (name, area) in enumerate([("Chelsea", 10), ("my mug", 4), ("rocket", 2)])
    ]
    frames = torch.randint(0, 255, (4, 64, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    query = {"image": photo(9)} if medium == "image" else {"video": frames.numpy()}
    generate_calls = spy_on_generate(monkeypatch, engine)
    with _EmbedsRecorder(engine) as recorder:
        answer = engine.answer("Who is here?", concepts, max_new_tokens=3, **query)
    ids = generate_calls[0]["input_ids"][0]
    embeds = recorder.calls[0][0]
    slots = (ids == engine.backend.placeholder_id).nonzero().squeeze(1)
    memory = torch.cat([c.embeddings for c in concepts])
    assert slots.numel() == memory.shape[0] == answer.memory_tokens
    torch.testing.assert_close(embeds[slots], memory.to(embeds.dtype))
    # Each concept's rows follow its name, in order.
    text = engine.backend.tokenizer.decode(ids)
    assert text.index("Chelsea") < text.index("my mug") < text.index("rocket")
    # InternVL has no video token: its frames are images
    visual_id = getattr(engine.model.config, f"{medium}_token_id", None) or engine.model.config.image_token_id
    assert (ids == visual_id).sum() > 0
    assert answer.concepts_used == ("Chelsea", "my mug", "rocket") and answer.concepts_dropped == ()


def test_without_concepts_the_answer_equals_plain_generation(family):
    engine = tiny_engine(family)
    picture = photo(6)
    question = "What is in this photo?"
    text = engine.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    # The processor inputs at the engine's own pixel budget (InternVL tiles by it), generated the plain way.
    inputs = engine.backend.encode(
        text,
        image=picture,
        image_max_pixels=engine.settings.query_image_max_pixels,
        video_frame_max_pixels=engine.settings.video_frame_max_pixels,
    ).inputs
    with torch.no_grad():
        plain = engine.model.generate(**inputs, max_new_tokens=8, **engine.decoding)
    expected = engine.backend.tokenizer.decode(plain[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert engine.answer(question, image=picture, max_new_tokens=8) == expected.strip()


def test_stream_yields_growing_text_that_ends_in_the_answer():
    engine = tiny_engine("qwen2.5-vl")
    concept = engine.introduce("Chelsea", [photo(0)], area_pct=5)
    parts = list(engine.stream_answer("Is Chelsea here?", [concept], image=photo(7), max_new_tokens=6))
    assert len(parts) >= 2
    # Each piece the text so far as the whole answer reads (stripped), only when it grew: none empty, none repeated.
    growing = parts[:-1]
    assert all(part and part == part.strip() for part in growing)
    assert all(b != a and b.startswith(a) for a, b in zip(growing, growing[1:]))
    assert parts[-1] == engine.answer("Is Chelsea here?", [concept], image=photo(7), max_new_tokens=6)
    assert parts[-1].concepts_used == ("Chelsea",) and parts[-1].startswith(growing[-1])


def test_closing_a_stream_stops_generation_and_frees_the_model(monkeypatch):
    import threading

    engine = tiny_engine("qwen2-vl")
    generations = WholeBudgetGenerations(monkeypatch, engine)  # 200 tokens unless stopped
    stream = engine.stream_answer("Describe this photo.", image=photo(8), max_new_tokens=200)
    next(stream)
    before = generations.held()  # the generation waits for the Stop after its next token
    stream.close()
    assert generations.tokens == [generations.tokens[0]] and generations.tokens[0] <= before + 1 < 200
    assert not engine._lock.locked(), "the model was not released"
    assert not any(t.name == "ego-generate" and t.is_alive() for t in threading.enumerate())


def test_a_call_waiting_for_this_threads_own_open_stream_says_why_and_goes_on_once_it_ends(monkeypatch, caplog):
    """A stream holds the model from its first piece to its end: a stream paused in a notebook, then another call
    in the same thread (through any engine of the model), waits for itself; the log says why. A stream served from
    a pool of threads may be ended by another thread: then the call goes on."""
    import logging
    import threading

    caplog.set_level(logging.WARNING, logger="ego.engine")
    monkeypatch.setattr(ego.engine, "OWN_STREAM_WARNING_S", 0.2)
    engine = tiny_engine("qwen2-vl")
    for same_model in (engine, engine.with_settings(k_cap_tokens=8)):
        caplog.clear()
        stream = engine.stream_answer("Describe this photo.", image=photo(8), max_new_tokens=20)
        next(stream)
        ender = threading.Timer(1.0, list, args=(stream,))  # another thread iterates it to its end
        ender.start()
        assert same_model.answer("Again?", max_new_tokens=2) is not None
        ender.join()
        assert "a stream this thread opened still holds" in caplog.text and "close()" in caplog.text


def test_a_whole_settings_object_keeps_the_engines_decoding():
    """`set_decoding` changes the loaded model's decoding; settings given whole afterwards (their decoding fields
    the defaults) keep it, and only a settings object that names another decoding is refused."""
    from ego import Settings

    engine = tiny_engine("qwen2-vl").with_settings()
    engine.set_decoding("eager")
    assert engine.with_settings(Settings.paper()).settings.decoding == "eager"
    assert engine.with_settings(Settings(k_cap_tokens=30)).settings.k_cap_tokens == 30
    with pytest.raises(ValueError, match="set_decoding"):
        engine.with_settings(Settings(decoding="compiled"))


def test_a_stopped_stream_keeps_the_model_until_its_generation_has_ended(monkeypatch):
    """A decode step slower than a second (a large model on a CPU, a compilation) is still writing the shared
    cache and the backend's state when Stop is pressed: the next caller must not get the model before it ends,
    and the generation ends with that step."""
    import threading
    import time

    engine = Ego.tiny("qwen2-vl", device="cpu")
    generations = WholeBudgetGenerations(monkeypatch, engine)  # 1000 tokens unless stopped
    slow, in_slow_step = threading.Event(), threading.Event()

    def slow_decode_step(module, args, kwargs):
        if slow.is_set() and not in_slow_step.is_set():
            generations.hold()  # the slow step's token is the last one before the Stop
            in_slow_step.set()
            time.sleep(1.5)

    engine.model.model.language_model.register_forward_pre_hook(slow_decode_step, with_kwargs=True)
    stream = engine.stream_answer("Describe this photo.", image=photo(8), max_new_tokens=1000)
    next(stream)
    slow.set()
    assert in_slow_step.wait(timeout=30), "generation ended before the slow step"
    before = generations.tokens[-1]
    stream.close()  # Stop, in the middle of the slow step
    assert not any(t.name == "ego-generate" and t.is_alive() for t in threading.enumerate())
    assert not engine._lock.locked()
    assert len(generations.tokens) == 1 and generations.tokens[0] <= before + 1  # ended with the slow step


TWIN_SIZE = (448, 448)
"""A query photo of the reference budget's area: as a reference and as a query it is encoded to the same grid, so
a concept made from it matches it best (a reference is resized to that area, a query keeps its size)."""


def test_too_many_concepts_keeps_the_most_similar_to_the_query():
    engine = tiny_engine("qwen2-vl")
    engine_small = engine.with_settings(max_concepts_in_context=1)
    query = photo(11, size=TWIN_SIZE)
    # A concept made from the query photo itself is the most similar one.
    twin = engine.introduce("twin", [query], area_pct=20)
    other = engine.introduce("other", [photo(12, size=(120, 400))], area_pct=20)
    answer = engine_small.answer("Who is here?", [other, twin], image=query, max_new_tokens=2)
    assert answer.concepts_used == ("twin",) and answer.concepts_dropped == ("other",)


def test_with_concepts_left_out_the_kept_ones_memories_reach_the_language_model(monkeypatch):
    engine = tiny_engine("qwen2-vl")
    engine_small = engine.with_settings(max_concepts_in_context=2)
    query = photo(11, size=TWIN_SIZE)
    # Different sizes, the kept ones not in a row: rows taken from the wrong concept would not fit or match.
    concepts = [
        engine.introduce("far", [photo(12, size=(120, 400))], area_pct=4),
        engine.introduce("twin", [query], area_pct=20),
        engine.introduce("distant", [photo(13, size=(400, 120))], area_pct=2),
        engine.introduce("Chelsea", [photo(14)], area_pct=10),
    ]
    generate_calls = spy_on_generate(monkeypatch, engine_small)
    with _EmbedsRecorder(engine_small) as recorder:
        answer = engine_small.answer("Is Chelsea here?", concepts, image=query, max_new_tokens=2)
    assert answer.concepts_used == ("twin", "Chelsea")
    kept = [concepts[1], concepts[3]]
    ids, embeds = generate_calls[0]["input_ids"][0], recorder.calls[0][0]
    slots = (ids == engine.backend.placeholder_id).nonzero().squeeze(1)
    memory = torch.cat([c.embeddings for c in kept])
    assert slots.numel() == memory.shape[0] == answer.memory_tokens
    torch.testing.assert_close(embeds[slots], memory.to(embeds.dtype))


def test_each_concepts_similarity_and_map_are_recomputed_from_the_vision_tower(family):
    engine = tiny_engine(family)
    query = photo(11, size=TWIN_SIZE)
    concepts = [
        engine.introduce("other", [photo(12, size=(120, 400))], area_pct=20),
        engine.introduce("twin", [query], area_pct=20),
    ]
    answer = engine.answer("Who is here?", concepts, image=query, max_new_tokens=2)
    # The query's visual rows, independently: the processor at the query budget, then the vision tower.
    text = engine.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is here?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = engine.backend.encode(
        text,
        image=query,
        image_max_pixels=engine.settings.query_image_max_pixels,
        video_frame_max_pixels=engine.settings.video_frame_max_pixels,
    ).inputs
    with torch.no_grad():
        pixels = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
        pooled = engine.model.get_image_features(**pixels, return_dict=True).pooler_output
    rows = torch.cat(list(pooled)) if isinstance(pooled, (tuple, list)) else pooled.reshape(-1, pooled.shape[-1])
    q = rows.double().numpy()
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    expected = []
    for concept in concepts:
        m = concept.embeddings.double().numpy()
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        expected.append((m @ q.T).max(axis=1).mean())
    assert [name for name, _ in answer.similarity] == ["other", "twin"]
    np.testing.assert_allclose([score for _, score in answer.similarity], expected, rtol=1e-4, atol=1e-4)
    # Maps: per visual token of the whole image, the best cosine similarity with the concept's memory rows.
    if "image_grid_thw" in inputs:  # Qwen: every merged token, raster order
        _, h, w = inputs["image_grid_thw"][0].tolist()
        grid, on_map = (h // 2, w // 2), q
    else:  # InternVL: the last tile is the whole image (thumbnail or only tile)
        grid, on_map = (16, 16), q[-256:]
    assert [name for name, _ in answer.similarity_maps] == ["other", "twin"]
    for (_, actual), concept in zip(answer.similarity_maps, concepts):
        m = concept.embeddings.double().numpy()
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        assert tuple(actual.shape) == grid
        np.testing.assert_allclose(actual.numpy(), (on_map @ m.T).max(axis=1).reshape(grid), rtol=1e-4, atol=1e-4)
    assert engine.answer("Who is here?", concepts, max_new_tokens=1).similarity == ()  # nothing to compare


def test_concepts_the_question_names_are_kept_before_the_most_similar():
    engine = tiny_engine("qwen2-vl")
    small = engine.with_settings(max_concepts_in_context=1)
    query = photo(11, size=TWIN_SIZE)
    twin = engine.introduce("twin", [query], area_pct=20)  # the most similar to the query
    other = engine.introduce("Other Cat", [photo(12, size=(120, 400))], area_pct=20)
    named = small.answer("Is other cat's tail visible?", [twin, other], image=query, max_new_tokens=1)
    assert named.concepts_used == ("Other Cat",) and named.concepts_dropped == ("twin",)
    text_only = small.answer("What colour is OTHER CAT?", [twin, other], max_new_tokens=1)
    assert text_only.concepts_used == ("Other Cat",)
    unnamed = small.answer("What colour is it?", [twin, other], max_new_tokens=1)
    assert unnamed.concepts_used == ("twin",)  # nothing to go by: the first one


SCOTLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"  # black flag + tags "gbsct"
ENGLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"  # black flag + tags "gbeng"


@pytest.mark.parametrize(
    "question, name, named",
    [
        ("What colour are Chelsea's eyes?", "Chelsea", True),
        ("Is my   MUG here?", "my mug", True),
        ("Are there Chelseas here?", "Chelsea", False),
        ("Is the mug here?", "my mug", False),
        ("Where is Bo?", "Bob", False),
        ("", "Chelsea", False),
        # scripts without spaces between words, and a name next to them
        ("我的猫在哪里？", "猫", True),
        ("ねこのタマはどこ？", "タマ", True),
        ("첼시가 어디 있어?", "첼시", True),
        ("Chelsea在哪里？", "Chelsea", True),
        ("Chelseaは？", "chelsea", True),
        ("我的狗在哪里？", "猫", False),
        # one name in two Unicode forms, or full-width letters
        ("Where is Zo\u00eb?", "Zoe\u0308", True),
        ("Where is Zoe\u0308?", "Zo\u00eb", True),
        ("Where is \uff23\uff48\uff45\uff4c\uff53\uff45\uff41?", "Chelsea", True),
        ("Where is Zoey?", "Zo\u00eb", False),
        # an emoji drawn as one by the selector a phone adds; flags told apart by their tags
        ("Is \u2615\ufe0f on the table?", "\u2615", True),
        ("Where is my \u2764\ufe0f pillow?", "\u2764 pillow", True),
        (f"Is {ENGLAND} here?", SCOTLAND, False),
        (f"Is {SCOTLAND} here?", SCOTLAND, True),
        # a name inside a longer word first, then on its own
        ("Is xChelsea or Chelsea here?", "Chelsea", True),
    ],
)
def test_a_question_names_a_concept_only_by_its_whole_name(question, name, named):
    from ego.engine import named_in

    assert named_in(question, name) is named


def test_a_local_folder_is_one_model_however_it_is_spelled(tmp_path, monkeypatch):
    """Concept files name a local checkpoint by its folder's name and config, not by the path that was typed, nor
    the server's: the same folder spelled otherwise, or copied elsewhere, is the same model."""
    import os
    import shutil

    from ego.memory import local_model_id

    folder = tmp_path / "runs" / "my-finetune"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "qwen2_5_vl", "hidden_size": 64}')
    os.symlink(folder, tmp_path / "latest")
    monkeypatch.chdir(tmp_path / "runs")
    monkeypatch.setenv("HOME", str(tmp_path))
    spellings = [folder, f"{folder}/", "my-finetune", "./my-finetune/", "../runs/my-finetune", tmp_path / "latest"]
    ids = {local_model_id(spelling) for spelling in [*spellings, "~/runs/my-finetune"]}
    assert len(ids) == 1
    (model_id,) = ids
    assert model_id.startswith("my-finetune (local folder, config ") and str(tmp_path) not in model_id
    copy = shutil.copytree(folder, tmp_path / "elsewhere" / "my-finetune")
    assert local_model_id(copy) == model_id
    (copy / "config.json").write_text('{"model_type": "qwen2_5_vl", "hidden_size": 128}')
    assert local_model_id(copy) != model_id  # another architecture under the same name is another model


@pytest.mark.parametrize(
    "made_with, same",
    [
        ("ckpt (local folder, config 0123456789ab)", True),
        ("/srv/models/ckpt", True),  # files written before: the path as it was typed
        ("ckpt/", True),
        ("C:\\models\\ckpt", True),
        ("ckpt (local folder, config ffffffffffff)", False),  # the same name, another config
        ("/srv/models/other", False),
        ("Qwen/Qwen2.5-VL-7B-Instruct", False),
        ("ckpt (local folder 6ffec7d60649)", True),  # an earlier version's name: a digest of the path
        ("other (local folder 6ffec7d60649)", False),
        ("someone-else/ckpt", False),  # a Hub model whose name ends like the folder's
    ],
)
def test_concepts_of_a_local_folder_are_recognised_in_any_spelling_of_it(made_with, same):
    from ego.memory import same_model

    assert same_model(made_with, "ckpt (local folder, config 0123456789ab)") is same
    assert same_model("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct")
    assert not same_model("ckpt", "Qwen/ckpt")  # a Hub model is named exactly


def test_a_local_folder_loads_from_its_home_spelling_and_takes_its_older_files(tmp_path, monkeypatch):
    """ "~/models/tiny" loads the folder; a concept file written when folders were named by their typed path
    loads into it, under the folder's new name."""
    import shutil

    from ego import Ego, load_concepts, save_concepts
    from ego.memory import local_model_id
    from ego.random_models import tiny_checkpoint

    folder = shutil.copytree(tiny_checkpoint("qwen2-vl"), tmp_path / "models" / "tiny")
    monkeypatch.setenv("HOME", str(tmp_path))
    engine = Ego.from_pretrained("~/models/tiny", quantization=None, device="cpu")
    assert engine.model_id == local_model_id(folder)
    concept = engine.introduce("Chelsea", photo(0), keywords="cat", area_pct=10)
    older = save_concepts(tmp_path / "older.ego", [dataclasses.replace(concept, model_id=str(folder))])
    (loaded,) = load_concepts(older, engine)
    assert loaded.model_id == engine.model_id
    assert engine.answer("Is Chelsea here?", [loaded], max_new_tokens=1).concepts_used == ("Chelsea",)


def test_memory_from_another_model_is_refused():
    qwen2 = tiny_engine("qwen2-vl")
    concept = qwen2.introduce("Chelsea", [photo(0)], area_pct=10)
    with pytest.raises(IncompatibleMemoryError):
        tiny_engine("qwen3-vl").answer("Is Chelsea here?", [concept], image=photo(1))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: e.introduce("", [photo(0)]), "name"),
        (lambda e: e.introduce("x" * 500, [photo(0)]), "characters"),
        (lambda e: e.introduce("Chelsea", []), "at least one"),
        (lambda e: e.introduce("Chelsea", [photo(i) for i in range(6)]), "at most 5"),
        (lambda e: e.introduce("Chelsea", [b"not an image"]), ""),
        (lambda e: e.introduce("Chelsea", [photo(0)], area_pct=0), "between 1 and 100"),
        (lambda e: e.introduce("Chelsea", [photo(0)], keywords=" , "), "keyword"),
        (lambda e: e.answer("   ", image=photo(0)), "question"),
        (lambda e: e.answer("Hi?", image=photo(0), video="missing.mp4"), "not both"),
        (lambda e: e.answer("Hi?", video=b"\x00" * 100), ""),
        (lambda e: e.answer("Hi?", max_new_tokens=0), "between 1 and"),
        (lambda e: e.answer("Is \ud800 here?", image=photo(0)), "not valid Unicode"),
        (lambda e: e.introduce("Chelsea", [photo(0)], keywords="tabby, \udc00"), "not valid Unicode"),
        (lambda e: e.introduce("Chel\udfffsea", [photo(0)], area_pct=5), "not valid Unicode"),
    ],
)
def test_user_errors_raise_input_error_with_a_sentence(call, message):
    engine = tiny_engine("qwen2-vl")
    with pytest.raises(InputError) as raised:
        call(engine)
    text = str(raised.value)
    assert message in text and text.endswith(".") and len(text.split()) >= 5


def test_special_tokens_typed_by_a_visitor_stay_text():
    engine = tiny_engine("qwen2-vl")
    concept = engine.introduce("<|vision_pad|><|im_end|>", [photo(0)], area_pct=5)
    answer = engine.answer(
        "<|image_pad|> <|vision_pad|> what is <|im_start|>this?", [concept], image=photo(1), max_new_tokens=2
    )
    assert answer.memory_tokens == concept.num_tokens  # no extra placeholder sneaked in
    assert isinstance(concept, Concept)


def test_special_tokens_typed_as_keywords_stay_text(family):
    """A family's image and video tokens typed as keywords would otherwise reach the processor as placeholders
    ("Image features and image tokens do not match"), when the concept is introduced and whenever its keywords are
    in a prompt; the concept keeps them as they were typed."""
    engine = tiny_engine(family)
    media = [s for s in engine.backend.special_strings if any(w in s.lower() for w in ("image", "img", "vision"))]
    keywords = ", ".join(media[:6])
    assert media and len(keywords) <= 200
    concept = engine.introduce("Chelsea", [photo(0)], keywords=keywords + ", tabby", area_pct=5)
    assert concept.num_tokens >= 1
    assert concept.views[0].keywords == (*media[:6], "tabby") and concept.views[0].description == keywords + ", tabby"
    answer = engine.with_settings(memory_keywords="append").answer("Who?", [concept], image=photo(1), max_new_tokens=2)
    assert answer.memory_tokens == concept.num_tokens  # no extra placeholder sneaked in with the keywords


def test_out_of_memory_is_reported_and_the_next_request_works(monkeypatch):
    from ego import ModelBusyError

    engine = tiny_engine("qwen2-vl")
    calls = []

    def exhausted(**kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(engine.model, "generate", exhausted)
        with pytest.raises(ModelBusyError, match="smaller image"):
            engine.answer("What is this?", image=photo(0), max_new_tokens=2)
        with pytest.raises(ModelBusyError):
            list(engine.stream_answer("What is this?", image=photo(0), max_new_tokens=2))
        with pytest.raises(ModelBusyError):
            engine.introduce("Chelsea", [photo(0)])
    assert len(calls) == 3
    assert engine.answer("What is this?", image=photo(0), max_new_tokens=2) is not None


def test_keywords_are_kept_as_names_are_and_invisible_ones_let_the_model_describe():
    engine = tiny_engine("qwen2-vl")
    typed = engine.introduce("Chelsea", [photo(0)], keywords="a\x00b, \u202ec", area_pct=5)
    assert typed.views[0].keywords == ("ab", "c") and typed.views[0].keywords_source == "user"
    invisible = engine.introduce("Chelsea", [photo(0)], keywords="\u200b", area_pct=5)
    assert invisible.views[0].keywords_source == "model"  # as an empty keyword box: the model describes
    assert engine.introduce("Chelsea", [photo(0)], keywords=["tabby", "green eyes"], area_pct=5).keywords == (
        "tabby",
        "green eyes",
    )


def test_photos_may_come_from_any_iterable_and_a_bad_one_is_named_by_its_place():
    import io

    engine = tiny_engine("qwen2-vl")
    assert len(engine.introduce("Chelsea", (p for p in [photo(0), photo(1)]), area_pct=5).views) == 2
    encoded = io.BytesIO()
    photo(0).save(encoded, "PNG")
    encoded.seek(0)
    assert len(engine.introduce("Chelsea", encoded, area_pct=5).views) == 1  # a file object is one photo, not lines
    five = [photo(0), photo(1), b"not an image", photo(2), photo(3)]
    with pytest.raises(InputError, match=r"^Photo 3 of 5: This file is not a supported image"):
        engine.introduce("Chelsea", five, area_pct=5)


def test_a_single_concept_is_a_list_of_one():
    engine = tiny_engine("qwen2-vl")
    concept = engine.introduce("Chelsea", [photo(0)], area_pct=5)
    assert engine.answer("Hi?", concept, max_new_tokens=1).concepts_used == ("Chelsea",)
    assert engine.chat(concept).ask("Hi?", max_new_tokens=1).concepts_used == ("Chelsea",)


@pytest.mark.parametrize("concepts, got", [(["Chelsea"], "str"), ("Chelsea", "str"), ([None], "NoneType"), (5, "int")])
def test_what_is_not_a_concept_is_refused_by_every_call_that_takes_concepts(concepts, got):
    engine = tiny_engine("qwen2-vl")
    real = engine.introduce("Chelsea", [photo(0)], area_pct=5)
    if isinstance(concepts, list):
        concepts = [real, *concepts]
    message = f"^concepts must be Concept objects \\(from introduce or load_concepts\\); got {got}\\.$"
    calls = [
        lambda: engine.answer("Hi?", concepts, max_new_tokens=1),
        lambda: list(engine.stream_answer("Hi?", concepts, max_new_tokens=1)),
        lambda: engine.chat(concepts),
    ]
    for call in calls:
        with pytest.raises(InputError, match=message):
            call()
    (refused,) = engine.answer_batch([ego.AnswerRequest("Hi?", concepts, max_new_tokens=1)])
    assert isinstance(refused, InputError) and re.match(message, str(refused))


def test_a_question_or_length_that_is_not_what_it_should_be_is_an_input_error():
    """The same checks in a single answer, a batch and a conversation's first and later questions."""
    engine = tiny_engine("qwen2-vl")
    chat = engine.chat()
    chat.ask("Hi?", max_new_tokens=1)
    for ask in [
        lambda question, n: engine.answer(question, max_new_tokens=n),
        lambda question, n: list(engine.stream_answer(question, max_new_tokens=n)),
        lambda question, n: engine.chat().ask(question, max_new_tokens=n),
        lambda question, n: chat.ask(question, max_new_tokens=n),
        lambda question, n: list(chat.stream(question, max_new_tokens=n)),
    ]:
        with pytest.raises(InputError, match="answer length must be a whole number"):
            ask("Hi?", "abc")
        with pytest.raises(InputError, match="^A question is text"):
            ask(["hi"], 1)
    assert len(chat.turns) == 1
    refused = engine.answer_batch([ego.AnswerRequest("Hi?", (), max_new_tokens="abc"), ego.AnswerRequest(["hi"])])
    assert all(isinstance(error, InputError) for error in refused)


@pytest.mark.parametrize("text", ["แมวสีส้มนอนอยู่บนโต๊ะไม้", "ねこがテーブルのうえでねています", "The orange cat sleeps"])
def test_a_stream_hands_on_each_token_of_scripts_without_spaces(text):
    """Thai, or Japanese in kana, has no space to wait for: the text so far is handed on as each token comes
    (a character split between two tokens waits for the next one), so a stopped answer shows what had come."""
    from ego.engine import _streamed

    tokenizer = tiny_engine("qwen2.5-vl").backend.tokenizer
    ids = tokenizer(text, add_special_tokens=False).input_ids

    def generate(streamer, stopping_criteria):
        streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, handed on first
        for token in ids:
            streamer.put(torch.tensor([token]))
        streamer.end()
        return "done"

    outputs, handed = [], [0]
    pieces = list(_streamed(tokenizer, generate, outputs=outputs, handed=handed))
    assert pieces[-1] == text and outputs == ["done"] and handed == [len(ids)]
    halfway = [piece for piece in pieces if len(piece) <= len(text) // 2]
    assert halfway and all(text.startswith(piece) and "\ufffd" not in piece for piece in pieces)
    assert len(pieces) >= len(ids) // 3  # (a piece per character or token, not one at the end)


@pytest.mark.parametrize(
    "question, name, named",
    [
        ("रामू कहाँ है?", "राम", False),  # Hindi: the vowel sign ू makes "Ramu" of "Ram"
        ("राम कहाँ है?", "राम", True),
        ("क्या बिल्ली यहाँ है?", "बिल्ली", True),
        ("แมวที่Chelseaชอบ", "Chelsea", True),  # a Thai tone mark before a Latin name is not part of it
        ("Where is q\u0303?", "q", False),  # a combining tilde makes another letter
    ],
)
def test_a_name_is_a_whole_word_with_its_combining_marks(question, name, named):
    from ego.engine import named_in

    assert named_in(question, name) is named


@pytest.mark.parametrize(
    "question, name",
    [
        ("Where is \U0001f469\U0001f4bb coder?", "\U0001f469\u200d\U0001f4bb coder"),
        ("Where is \U0001f469\u200d\U0001f4bb coder?", "\U0001f469\U0001f4bb coder"),
        (
            "این \u06a9\u062a\u0627\u0628\u062e\u0627\u0646\u0647 است",
            "\u06a9\u062a\u0627\u0628\u200c\u062e\u0627\u0646\u0647",
        ),
        ("Is Chel\u200bsea here?", "Chelsea"),
    ],
)
def test_invisible_characters_never_decide_whether_a_question_names_a_concept(question, name):
    from ego.engine import named_in

    assert named_in(question, name)


@pytest.mark.parametrize(
    "typed",
    [
        "\U0001f469\u200d\U0001f4bb coder",
        "\u06a9\u062a\u0627\u0628\u200c\u062e\u0627\u0646\u0647",
        "\u0dc1\u0dca\u200d\u0dbb\u0dd3",
        "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
    ],
)
def test_a_name_typed_with_joiners_or_tags_keeps_its_concept_in_a_full_context(typed):
    """The name is kept as typed and found in a question typed the same way: the named concept is kept first even
    when it is the least similar and more concepts are given than fit."""
    from types import SimpleNamespace

    from ego.checks import check_name
    from ego.engine import select_concepts

    named = SimpleNamespace(name=check_name(typed, ego.DEFAULT_SETTINGS))
    others = [SimpleNamespace(name=f"cat {i}") for i in range(3)]
    kept, dropped = select_concepts(others + [named], 3, question=f"Where is {typed}?", scores=[1.0, 1.0, 1.0, 0.0])
    assert named in kept and len(dropped) == 1
