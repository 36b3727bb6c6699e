"""Conversations (`Ego.chat`): follow-ups on the cached context give the answers of a full recomputation."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
import torch
from conftest import WholeBudgetGenerations, photo, record_scores, spy_on_generate, tiny_engine

from ego import AnswerRequest, ConversationFullError, FollowUpRequest, InputError
from ego.settings import Settings

FOLLOW_UPS = ["What is she holding?", "And the colour of the wall?"]
SAME_SCORES = dict(atol=1e-5, rtol=1e-4)
"""Cached and recomputed follow-ups give the same logits at every step, to float32 rounding (about 1e-7 here): a
tiny random model's greedy tokens barely depend on its inputs (an M-RoPE offset wrong by a few hundred positions
leaves them as they were), its logits move by 1e-3 and more."""


def new_tokens(engine, question: str) -> int:
    """Tokens a follow-up adds: the previous answer closed, the question in a new user turn."""
    return len(engine.backend.tokenizer(engine.backend.continue_turn(question), add_special_tokens=False).input_ids)


@pytest.fixture(scope="module")
def concepts():
    return {}


def chelsea(engine, concepts):
    if engine.model_id not in concepts:
        concepts[engine.model_id] = engine.introduce("Chelsea", [photo(1)], keywords=["tabby cat"], area_pct=10)
    return concepts[engine.model_id]


def test_cached_follow_ups_equal_recomputed_ones_with_another_conversation_in_between(family, concepts, monkeypatch):
    engine = tiny_engine(family)
    concept = chelsea(engine, concepts)
    chat = engine.chat([concept], image=photo(3))
    first = chat.ask("Is Chelsea here?", max_new_tokens=6)
    assert first.prefill_tokens == first.context_tokens and first.concepts_used == ("Chelsea",)
    reference = engine.chat([concept], image=photo(3))
    assert reference.ask("Is Chelsea here?", max_new_tokens=6) == first
    calls = spy_on_generate(monkeypatch, engine)
    scores = record_scores(monkeypatch, engine)
    for question in FOLLOW_UPS:
        # Another conversation (no photo: other M-RoPE positions) runs just before each cached follow-up.
        engine.chat([concept]).ask("Who is Chelsea?", max_new_tokens=6)
        cached = chat.ask(question, max_new_tokens=6)
        recomputed = reference.ask(question, max_new_tokens=6, use_cache=False)
        assert cached == recomputed
        torch.testing.assert_close(scores[-2], scores[-1], **SAME_SCORES)
        assert cached.context_tokens == recomputed.context_tokens == recomputed.prefill_tokens
        # Only the new tokens were computed: the question's turn, and the last answer token if it was cut.
        assert new_tokens(engine, question) <= cached.prefill_tokens <= new_tokens(engine, question) + 1
        assert cached.concepts_used == ("Chelsea",)
    cached_call, recomputed_call = calls[1], calls[2]  # (calls[0]: the other conversation)
    for call in (cached_call, recomputed_call):
        ids, embeds = call["input_ids"][0], call["inputs_embeds"][0]
        slots = ids == engine.backend.placeholder_id
        torch.testing.assert_close(embeds[slots].float(), concept.embeddings.float())  # memory rows in place
        assert embeds.shape[0] == ids.shape[0]
    assert not any(key in cached_call for key in engine.backend.vision_input_keys)  # the photo is cached
    assert cached_call["past_key_values"].get_seq_length() > 0
    # Recomputed on a new cache of the conversation's own (prefill_tokens == context_tokens above: it was empty).
    assert (
        "pixel_values" in recomputed_call and recomputed_call["past_key_values"] is not cached_call["past_key_values"]
    )
    assert [q for q, _ in chat.turns] == ["Is Chelsea here?", *FOLLOW_UPS]


def test_a_stream_follow_up_ends_in_the_answer_and_closing_it_keeps_the_answer_so_far(concepts, monkeypatch):
    engine = tiny_engine("qwen3-vl")
    concept = chelsea(engine, concepts)
    chat, reference = engine.chat([concept], image=photo(3)), engine.chat([concept], image=photo(3))
    assert list(chat.stream("Is Chelsea here?", max_new_tokens=5))[-1] == reference.ask(
        "Is Chelsea here?", max_new_tokens=5
    )
    parts = list(chat.stream(FOLLOW_UPS[0], max_new_tokens=5))
    assert parts[-1] == reference.ask(FOLLOW_UPS[0], max_new_tokens=5, use_cache=False)
    assert parts[-1].prefill_tokens < parts[-1].context_tokens

    generations = WholeBudgetGenerations(monkeypatch, engine)  # 200 tokens unless stopped
    stream = chat.stream("Describe everything in great detail.", max_new_tokens=200)
    next(stream)
    before = generations.held()  # the generation waits for the Stop after its next token
    stream.close()
    monkeypatch.undo()
    assert len(generations.tokens) == 1 and generations.tokens[0] <= before + 1 < 200  # it stopped there
    assert not engine._lock.locked(), "the model lock was not released"
    assert not any(t.name == "ego-generate" and t.is_alive() for t in threading.enumerate())
    assert len(chat.turns) == 3  # the stopped answer stays in the conversation, marked so
    assert chat.turns[-1][1].stopped and not any(answer.stopped for _, answer in chat.turns[:-1])
    reference.ask("Describe everything in great detail.", max_new_tokens=200)  # (a longer, complete answer)
    assert chat.ask(FOLLOW_UPS[1], max_new_tokens=5).prefill_tokens < chat.turns[-1][1].context_tokens


def test_the_least_recently_used_cache_is_dropped_and_its_conversation_recomputed(concepts):
    base = tiny_engine("qwen2.5-vl")
    concept = chelsea(base, concepts)
    probe = base.chat([concept], image=photo(3))
    probe.ask("Is Chelsea here?", max_new_tokens=4)
    # Room for about one and a half conversations' caches.
    engine = base.with_settings(max_cached_conversations_mb=probe.cache_bytes * 1.5 / 2**20)
    first, second = engine.chat([concept], image=photo(3)), engine.chat([concept], image=photo(4))
    first.ask("Is Chelsea here?", max_new_tokens=4)
    assert first.cache_bytes > 0
    second.ask("Is Chelsea here?", max_new_tokens=4)
    assert first.cache_bytes == 0 and second.cache_bytes > 0  # the older one made room
    again = first.ask(FOLLOW_UPS[0], max_new_tokens=4)
    assert again.prefill_tokens == again.context_tokens  # recomputed from scratch
    assert again == probe.ask(FOLLOW_UPS[0], max_new_tokens=4)  # the same answer as a cached follow-up
    assert second.cache_bytes == 0 and first.cache_bytes > 0
    assert second.ask(FOLLOW_UPS[0], max_new_tokens=4).prefill_tokens == second.turns[-1][1].context_tokens


def test_a_full_conversation_says_to_start_a_new_one_and_keeps_its_turns(concepts):
    base = tiny_engine("internvl3")
    concept = chelsea(base, concepts)
    engine = base.with_settings(max_conversation_turns=2)
    chat = engine.chat([concept], image=photo(3))
    first = chat.ask("Is Chelsea here?", max_new_tokens=4)
    with pytest.raises(InputError, match="Type a question"):
        chat.ask("   ")
    chat.ask(FOLLOW_UPS[0], max_new_tokens=4)
    with pytest.raises(InputError, match="start a new conversation"):
        chat.ask(FOLLOW_UPS[1], max_new_tokens=4)
    assert [q for q, _ in chat.turns] == ["Is Chelsea here?", FOLLOW_UPS[0]]

    room = first.context_tokens + 4 + new_tokens(base, FOLLOW_UPS[0]) + 1 + 4
    engine = base.with_settings(max_conversation_context_tokens=room, answer_max_new_tokens=1)
    chat = engine.chat([concept], image=photo(3))
    chat.ask("Is Chelsea here?", max_new_tokens=4)
    with pytest.raises(InputError, match="start a new conversation"):
        chat.ask(FOLLOW_UPS[0], max_new_tokens=100)
    assert len(chat.turns) == 1
    assert chat.ask(FOLLOW_UPS[0], max_new_tokens=4).prefill_tokens < first.context_tokens
    # A first question is held to the same limit: its context (photo and memories) and its answer's cap.
    # When the context fits and its answer's cap does not, the way out is a shorter answer.
    tight = base.with_settings(max_conversation_context_tokens=first.context_tokens + 3, answer_max_new_tokens=1)
    with pytest.raises(InputError, match=f"needs {first.context_tokens} tokens of context.*shorter answer .at most 3 "):
        tight.answer("Is Chelsea here?", [concept], image=photo(3), max_new_tokens=4)
    full = base.with_settings(max_conversation_context_tokens=first.context_tokens, answer_max_new_tokens=1)
    with pytest.raises(InputError, match=r"fewer concepts\.$"):
        full.answer("Is Chelsea here?", [concept], image=photo(3), max_new_tokens=1)
    assert str(tight.answer("Is Chelsea here?", [concept], image=photo(3), max_new_tokens=3)) == str(
        base.answer("Is Chelsea here?", [concept], image=photo(3), max_new_tokens=3)
    )


def test_a_conversation_refuses_bad_media_before_any_model_call():
    engine = tiny_engine("qwen2-vl")
    with pytest.raises(InputError, match="one image or one video"):
        engine.chat(image=photo(1), video=[photo(2), photo(3)])
    with pytest.raises(InputError):
        engine.chat(image=b"not an image")


def test_a_one_question_answer_computes_its_whole_context():
    engine = tiny_engine("qwen2-vl")
    answer = engine.answer("Describe this photo.", image=photo(2), max_new_tokens=3)
    assert answer.prefill_tokens == answer.context_tokens > 0


@pytest.mark.parametrize("family", ["qwen3-vl", "internvl3"])
def test_a_conversation_about_a_clip_follows_up_on_its_cache(family, concepts, monkeypatch):
    engine = tiny_engine(family)
    concept = chelsea(engine, concepts)
    clip = [photo(seed) for seed in (4, 5, 6, 7)]
    chat, reference = engine.chat([concept], video=clip), engine.chat([concept], video=clip)
    assert chat.ask("Who is here?", max_new_tokens=4) == reference.ask("Who is here?", max_new_tokens=4)
    engine.chat([concept], image=photo(2)).ask("And here?", max_new_tokens=4)  # another conversation between
    scores = record_scores(monkeypatch, engine)
    cached = chat.ask(FOLLOW_UPS[0], max_new_tokens=4)
    assert cached == reference.ask(FOLLOW_UPS[0], max_new_tokens=4, use_cache=False)
    torch.testing.assert_close(scores[0], scores[1], **SAME_SCORES)
    assert cached.prefill_tokens <= new_tokens(engine, FOLLOW_UPS[0]) + 1


def test_a_first_answer_given_elsewhere_is_taken_as_the_first_turn():
    """`Chat.adopt`: the Space answers first questions in batches with other visitors' and hands the answer to
    the conversation; its next question recomputes the context and that answer once, later ones use its cache."""
    engine = tiny_engine("qwen2-vl")
    concept = engine.introduce("Rex", [photo(0)], keywords="dog", area_pct=5)
    made_here = engine.chat([concept], image=photo(1))
    first = made_here.ask("Who is here?", max_new_tokens=6)
    tokenizer = engine.backend.tokenizer
    assert tokenizer.decode(tokenizer(str(first), add_special_tokens=False).input_ids) == str(first)  # text round trip

    adopted = engine.chat([concept], image=photo(1))
    given = engine.answer_batch([AnswerRequest("Who is here?", [concept], photo(1), None, 6)])[0]
    assert str(given) == str(first)
    adopted.adopt("Who is here?", given)
    assert adopted.turns == [("Who is here?", given)]
    second = adopted.ask("And then?", max_new_tokens=6)
    assert second.prefill_tokens == second.context_tokens  # the whole context, computed once
    assert str(second) == str(made_here.ask("And then?", max_new_tokens=6))
    third = adopted.ask("More?", max_new_tokens=6)
    assert third.prefill_tokens < third.context_tokens / 4  # then on its own cache
    assert str(third) == str(made_here.ask("More?", max_new_tokens=6))


def test_follow_ups_answered_elsewhere_are_taken_as_turns():
    """A copy of a conversation in another process (a ZeroGPU worker) answers a follow-up; the conversation takes
    it (`Chat.adopt` after its first turn) and goes on as if it had answered it itself."""
    engine = tiny_engine("qwen2.5-vl")
    concept = engine.introduce("Rex", [photo(0)], keywords="dog", area_pct=5)
    questions = ["Who is here?", "And then?", "What colour is Rex?", "More?"]
    made_here = engine.chat([concept], image=photo(1))
    answers = [made_here.ask(question, max_new_tokens=6) for question in questions]

    copy = engine.chat([concept], image=photo(1))  # nothing asked here: every turn was answered elsewhere
    for question, answer in zip(questions[:3], answers):
        copy.adopt(question, answer)
    last = copy.ask(questions[3], max_new_tokens=6)
    assert str(last) == str(answers[3]) and last.prefill_tokens == last.context_tokens == answers[3].context_tokens

    kept = engine.chat([concept], image=photo(1))  # its own first turn, then one answered elsewhere
    kept.ask(questions[0], max_new_tokens=6)
    kept.adopt(questions[1], answers[1])
    third = kept.ask(questions[2], max_new_tokens=6)
    assert str(third) == str(answers[2]) and third.prefill_tokens < third.context_tokens / 4  # on its cache
    assert [q for q, _ in kept.turns] == questions[:3]

    # An answer known only as its text is tokenized again (the text of a random model's answer does not give
    # back its tokens, so only the context's length can be compared).
    text_only = engine.chat([concept], image=photo(1))
    text_only.adopt(questions[0], str(answers[0]))
    again = text_only.ask(questions[1], max_new_tokens=6)
    retokenized = len(engine.backend.tokenizer(str(answers[0]), add_special_tokens=False).input_ids)
    assert again.context_tokens == answers[1].context_tokens - len(answers[0].token_ids) + retokenized


def test_a_conversation_counts_what_it_holds_for_its_follow_ups(concepts):
    """Its photo dominates and grows with the photo: a bound on all sessions must see it (the key/value cache is
    bounded apart). The processor's float32 pixels are not held: they are computed again when needed."""
    engine = tiny_engine("qwen2.5-vl")
    known = [chelsea(engine, concepts)]
    held = {}
    for size in ((200, 150), (400, 300)):
        picture = photo(3, size=size)
        chat = engine.chat(known, image=picture)
        chat.ask("Is Chelsea here?", max_new_tokens=2)
        inputs = engine._prepare_answer("Is Chelsea here?", known, picture, None, 2).encoded.inputs
        vision = engine.backend.vision_input_keys
        pixels = sum(t.numel() * t.element_size() for k, t in inputs.items() if k in vision)
        others = sum(t.numel() * t.element_size() for k, t in inputs.items() if k not in vision)
        floor = size[0] * size[1] * 3 + others
        assert floor <= chat.held_bytes < floor + 256 * 1024
        assert chat.held_bytes < pixels  # what it held before: the photo and the pixels
        held[size] = chat.held_bytes
        chat.ask("And now?", max_new_tokens=2)
        assert chat.held_bytes > held[size]  # the turns' text and tokens too
    assert held[(400, 300)] > 3 * held[(200, 150)] - 256 * 1024


def test_a_large_photo_is_held_reduced_and_answered_as_that_reduced_photo(concepts):
    """A query photo over `query_image_kept_factor` times the processor's budget is reduced as it is loaded: the
    conversation holds the smaller photo, the answers are those of that reduced photo given as it is (the processor's
    input; its rounded sides may lengthen it past an aspect-ratio limit its original just met, by one pixel, which is
    forgiven), and its follow-ups recompute it. `Settings.paper()` gives photos as they came."""
    from ego.media import reduced

    base = tiny_engine("qwen2.5-vl")
    known = [chelsea(base, concepts)]
    engine = base.with_settings(query_image_max_pixels=224 * 224, max_image_aspect_ratio=1.25)
    large = photo(3, size=(604, 755))  # 755 x 604 (1.2500), over 4 x 224 x 224 = 200,704 pixels
    smaller = reduced(large, 4 * 224 * 224)
    assert smaller.size == (378, 302)  # halved, the odd sides rounded up: 1.2517
    chat = engine.chat(known, image=large)
    assert chat.picture.size == (378, 302) and chat.held_bytes < 378 * 302 * 3 + 256 * 1024
    first = chat.ask("Is Chelsea here?", max_new_tokens=4)
    # That photo given anew (its sides rounded up: 1.2517 for a limit of 1.25) is taken, and answered the same.
    assert first.token_ids == engine.answer("Is Chelsea here?", known, image=smaller, max_new_tokens=4).token_ids
    chat.drop_cache()
    assert chat.ask("And now?", max_new_tokens=2).context_tokens > first.context_tokens  # recomputed, not refused
    assert engine.with_settings(query_image_kept_factor=0).chat(known, image=large).picture.size == (755, 604)
    assert Settings.paper().query_image_kept_factor == 0


@pytest.mark.parametrize("media", ["image", "video"])
def test_a_recomputed_context_gets_the_first_questions_pixels_again(media, concepts, monkeypatch):
    """A conversation whose cache was dropped computes its photo's or clip's pixels again: the very tensors the
    first question gave the model, and the processor runs once more only then (never while the cache is kept,
    and not twice for a first turn answered elsewhere, whose preparation made them)."""
    engine = tiny_engine("qwen2.5-vl")
    known = [chelsea(engine, concepts)]
    shown = {"image": photo(3)} if media == "image" else {"video": [photo(seed) for seed in (4, 5, 6, 7)]}
    calls = spy_on_generate(monkeypatch, engine)
    encodes, encode = [], engine.backend.encode
    monkeypatch.setattr(engine.backend, "encode", lambda *a, **k: encodes.append(encode(*a, **k)) or encodes[-1])
    chat = engine.chat(known, **shown)
    chat.ask("Is Chelsea here?", max_new_tokens=3)
    assert len(encodes) == 1  # the first question's pixels went through the vision tower before generate
    first = {k: v for k, v in encodes[0].inputs.items() if k in engine.backend.vision_input_keys}
    assert first
    chat.ask("What is she holding?", max_new_tokens=3)
    assert len(encodes) == 1 and not any(k in calls[1] for k in first)  # on the cache: no pixels
    chat.drop_cache()
    chat.ask("And the wall?", max_new_tokens=3)
    assert len(encodes) == 2
    for key, value in first.items():
        assert torch.equal(calls[2][key], value)

    adopted = engine.chat(known, **shown)
    adopted.adopt("Is Chelsea here?", chat.turns[0][1])
    adopted.ask("What is she holding?", max_new_tokens=3)
    assert len(encodes) == 3  # the adopted turn's preparation, its pixels used for the recomputation
    for key, value in first.items():
        assert torch.equal(calls[3][key], value)
    assert adopted.turns[1][1] == chat.turns[1][1]


@pytest.mark.parametrize("media", ["image", "video"])
def test_a_staged_follow_up_brings_its_first_contexts_pixels_to_the_models_turn(media, concepts, monkeypatch):
    """`Ego.stage` of a follow-up whose conversation must compute its first context again (a first answer adopted, a
    cache dropped) runs that context's processor work beforehand: none in the model's turn, the same pixels, the
    same answers as a conversation that answered everything itself."""
    engine = tiny_engine("qwen2.5-vl")
    known = [chelsea(engine, concepts)]
    shown = {"image": photo(3)} if media == "image" else {"video": [photo(seed) for seed in (4, 5, 6, 7)]}
    reference = engine.chat(known, **shown)
    first = reference.ask("Is Chelsea here?", max_new_tokens=3)
    expected = [reference.ask(question, max_new_tokens=3) for question in FOLLOW_UPS]
    chat = engine.chat(known, **shown)
    chat.adopt("Is Chelsea here?", first)
    calls = spy_on_generate(monkeypatch, engine)
    encodes, encode = [], engine.backend.encode
    monkeypatch.setattr(engine.backend, "encode", lambda *a, **k: encodes.append(encode(*a, **k)) or encodes[-1])
    keys = engine.backend.vision_input_keys

    request = engine.stage(FollowUpRequest(chat, FOLLOW_UPS[0], 3))
    assert len(encodes) == 1  # the adopted turn's context, staged
    (answer,) = engine.follow_up_batch([request])
    assert len(encodes) == 1 and answer.token_ids == expected[0].token_ids
    pixels = {k: v for k, v in encodes[0].inputs.items() if k in keys}
    assert pixels and all(torch.equal(calls[-1][k], v) for k, v in pixels.items())

    chat.drop_cache()
    request = engine.stage(FollowUpRequest(chat, FOLLOW_UPS[1], 3))
    assert len(encodes) == 2  # the dropped cache's pixels, staged
    (answer,) = engine.follow_up_batch([request])
    assert len(encodes) == 2 and answer.token_ids == expected[1].token_ids
    assert all(torch.equal(calls[-1][k], v) for k, v in pixels.items())
    assert engine.stage(FollowUpRequest(chat, "And then?", 3)).staged is None  # on its cache: nothing to stage


def adopted_with_room(engine, concepts, room: int):
    """A conversation about photo 3 that adopted its first answer, in a context cap `room` tokens past it."""
    known = [chelsea(engine, concepts)]
    first = engine.answer("Is Chelsea here?", known, image=photo(3), max_new_tokens=3)
    small = engine.with_settings(max_conversation_context_tokens=first.context_tokens + room, answer_max_new_tokens=1)
    chat = small.chat(known, image=photo(3))
    chat.adopt("Is Chelsea here?", first)
    return chat


def test_a_refused_follow_up_leaves_no_pixels_held(concepts):
    """An adopted first turn is prepared (pixels included) by the next question; refused after that, the question
    holds nothing more than the conversation's tokens: its pixels go with it."""
    engine = tiny_engine("qwen2.5-vl")
    chat = adopted_with_room(engine, concepts, 8)
    before = chat.held_bytes
    with pytest.raises(InputError, match="This conversation is full") as full:
        chat.ask("What is she holding, and what colour is the wall behind her?", max_new_tokens=3)
    assert "shorter answer" not in str(full.value)  # the question alone does not fit
    inputs = engine._prepare_answer("Is Chelsea here?", chat.concepts, photo(3), None, 3).encoded.inputs
    pixels = sum(t.numel() * t.element_size() for k, t in inputs.items() if k in engine.backend.vision_input_keys)
    assert chat.held_bytes - before < pixels / 4  # its tokens now, not its pixels


def test_a_turn_this_conversation_would_refuse_is_not_adopted(concepts):
    """Taken, an empty or too long question would make every later question of the conversation fail."""
    engine = tiny_engine("qwen2-vl")
    chat = engine.chat([chelsea(engine, concepts)], image=photo(3))
    first = engine.answer("Is Chelsea here?", [chelsea(engine, concepts)], image=photo(3), max_new_tokens=3)
    chat.adopt("Is Chelsea here?", first)
    for question in ("   ", "x" * (engine.settings.max_question_chars + 1)):
        with pytest.raises(InputError):
            chat.adopt(question, first)
    assert len(chat.turns) == 1
    assert chat.ask("And now?", max_new_tokens=2)  # the conversation goes on
    full = engine.with_settings(max_conversation_turns=2).chat((), image=photo(3))
    full.adopt("One?", first)
    full.adopt("Two?", first)
    with pytest.raises(InputError, match="at most 2 questions"):
        full.adopt("Three?", first)
    assert len(full.turns) == 2


def conversations_after_a_first_question(engine, known, media_of, budget=5):
    """Per setup (concepts, media keywords, question), a conversation that has answered its first question."""
    chats = []
    for concepts, media, question in media_of:
        chat = engine.chat(concepts, **media)
        chat.ask(question, max_new_tokens=budget)
        chats.append(chat)
    return chats


def test_follow_ups_of_several_conversations_answered_together_equal_each_alone(family, concepts, monkeypatch):
    """Different photos, concepts, context lengths, question lengths and budgets, and a conversation about no photo:
    each batched answer equals the same follow-up asked alone, token for token, and each conversation goes on from
    its own row of the batch's cache exactly as if it had answered alone."""
    engine = tiny_engine(family)
    cat = chelsea(engine, concepts)
    dog = engine.introduce("Rex", [photo(0)], keywords=["dog"], area_pct=5)
    setups = [
        ([cat], dict(image=photo(3)), "Is Chelsea here?"),
        ([cat, dog], dict(image=photo(2, size=(300, 200))), "Who do you see in this photo, Chelsea or Rex?"),
        ([dog], {}, "Who is Rex?"),
    ]
    # First answers long enough, and new parts close enough in length, for every row's recomputed tail to stay in
    # text: then the three share one generation (a row that would compute its photo again is answered alone).
    batched = conversations_after_a_first_question(engine, [cat, dog], setups, budget=12)
    alone = conversations_after_a_first_question(engine, [cat, dog], setups, budget=12)
    questions = ["What is she holding?", "And the colour of the wall?", "Why?"]
    budgets = [6, 3, 8]
    scores = record_scores(monkeypatch, engine)
    got = engine.follow_up_batch([FollowUpRequest(c, q, b) for c, q, b in zip(batched, questions, budgets)])
    want = [c.ask(q, max_new_tokens=b) for c, q, b in zip(alone, questions, budgets)]
    monkeypatch.undo()
    assert [(str(a), a.token_ids, a.context_tokens) for a in got] == [
        (str(a), a.token_ids, a.context_tokens) for a in want
    ]
    # One generation for the three rows, and each row's logits those of its conversation alone, step by step.
    together, *each = scores
    assert together.shape[1] == len(each) == 3
    for row, (alone_scores, answer) in enumerate(zip(each, want)):
        steps = len(answer.token_ids)
        torch.testing.assert_close(together[:steps, row], alone_scores[:steps, 0], **SAME_SCORES)
    assert [a.prefill_tokens for a in got] == [a.prefill_tokens for a in want]  # each computed only its own
    for chat, reference in zip(batched, alone):  # the caches each took back
        later, expected = chat.ask("And then?", max_new_tokens=6), reference.ask("And then?", max_new_tokens=6)
        assert (str(later), later.context_tokens) == (str(expected), expected.context_tokens)
        assert later.prefill_tokens <= expected.prefill_tokens  # the batch may have kept one token more
        assert chat.turns[1][0] == reference.turns[1][0]


def test_a_batch_of_follow_ups_ends_each_on_its_own_and_takes_in_conversations_without_a_cache(concepts, monkeypatch):
    """A Stop ends one row (its answer so far is its turn); a conversation whose cache was dropped, or whose first
    turn was answered elsewhere, computes its context on its own (a prefill, no answer) and joins the batch; the
    same conversation twice and a question a conversation refuses fail alone."""
    engine = tiny_engine("qwen2.5-vl")
    cat = chelsea(engine, concepts)
    setups = [([cat], dict(image=photo(3)), "Is Chelsea here?"), ([cat], dict(image=photo(4)), "Where is she?")]
    # First answers long enough for each row's recomputed tail to stay in text (see the test after this one).
    batched = conversations_after_a_first_question(engine, [cat], setups, budget=12)
    alone = conversations_after_a_first_question(engine, [cat], setups, budget=12)
    dropped, dropped_alone = (engine.chat([cat], image=photo(5)) for _ in range(2))
    for chat in (dropped, dropped_alone):
        chat.ask("What is this?", max_new_tokens=12)
    dropped.drop_cache()
    adopted = engine.chat([cat], image=photo(6))
    adopted.adopt("Is Chelsea here?", engine.answer("Is Chelsea here?", [cat], image=photo(6), max_new_tokens=12))
    stop, seen = threading.Event(), {}

    def on_text(index, answer):
        seen.setdefault(index, []).append(str(answer))
        if index == 0 and len(answer.token_ids) >= 2:
            stop.set()

    requests = [
        FollowUpRequest(batched[0], "What is she holding?", 9),
        FollowUpRequest(batched[1], "And the wall?", 9),
        FollowUpRequest(dropped, "And now?", 5),
        FollowUpRequest(batched[1], "Twice?", 5),
        FollowUpRequest(adopted, "And then?", 5),
        FollowUpRequest(batched[0], "", 5),
    ]
    generate, calls = engine.model.generate, []

    def counted(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape[0], kwargs["max_new_tokens"]))
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", counted)
    results = engine.follow_up_batch(requests, stops=[stop, None, None, None, None, None], on_text=on_text)
    monkeypatch.undo()
    assert calls == [(1, 1), (1, 1), (4, 9)]  # two contexts computed alone, then one generation for four rows
    assert isinstance(results[3], InputError) and "already answering" in str(results[3])
    assert isinstance(results[5], InputError)
    cut = results[0]
    assert 2 <= len(cut.token_ids) < 9 and batched[0].turns[-1] == ("What is she holding?", cut)
    full = alone[0].ask("What is she holding?", max_new_tokens=9)
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids
    assert str(results[1]) == str(alone[1].ask("And the wall?", max_new_tokens=9))
    assert str(results[2]) == str(dropped_alone.ask("And now?", max_new_tokens=5))
    assert results[2].prefill_tokens < results[2].context_tokens  # in the batch: its turn only
    reference = engine.chat([cat], image=photo(6))
    reference.ask("Is Chelsea here?", max_new_tokens=12)
    assert str(results[4]) == str(reference.ask("And then?", max_new_tokens=5))
    for chat, alone_chat in ((adopted, reference), (dropped, dropped_alone)):  # each goes on from its row
        assert chat.ask("Why?", max_new_tokens=6).token_ids == alone_chat.ask("Why?", max_new_tokens=6).token_ids
    assert seen[1][-1].strip() == str(results[1]) and seen[4][-1].strip() == str(results[4])  # every row streamed


@pytest.mark.parametrize("family", ["qwen2.5-vl", "internvl3"])
def test_a_follow_up_that_would_compute_its_photo_again_in_a_batch_is_answered_alone(family, concepts):
    """Rows of a batch compute as many tokens as its longest new part: a short follow-up beside a long one would
    compute again some of its first context, photo and memory included, which a batch does not bring. It is answered
    on its own instead, from its own M-RoPE offset (not the one the last conversation put on the model)."""
    engine = tiny_engine(family)
    cat = chelsea(engine, concepts)
    setups = [([cat], dict(image=photo(3)), "Is Chelsea here?"), ([cat], dict(image=photo(4, size=(300, 220))), "Hi?")]
    batched = conversations_after_a_first_question(engine, [cat], setups)
    alone = conversations_after_a_first_question(engine, [cat], setups)
    long = "Please describe " + " ".join(["everything you can see about the colours and shapes"] * 12) + "?"
    questions = ["Why?", long]
    got = engine.follow_up_batch([FollowUpRequest(c, q, 8) for c, q in zip(batched, questions)])
    want = [c.ask(q, max_new_tokens=8) for c, q in zip(alone, questions)]
    assert [a.token_ids for a in got] == [a.token_ids for a in want]
    for chat, reference in zip(batched, alone):
        saved, expected = chat._positions, reference._positions
        assert (saved is None and expected is None) or torch.equal(saved, expected)
        assert str(chat.ask("And then?", max_new_tokens=6)) == str(reference.ask("And then?", max_new_tokens=6))


def test_a_tight_cache_budget_during_a_batch_leaves_every_conversation_able_to_go_on():
    """Taking its row back, one conversation may push another of the same batch out of `max_cached_conversations_mb`:
    that one recomputes later, and a conversation keeps its M-RoPE offset with its cache, so later batches work."""
    base = tiny_engine("qwen2.5-vl")

    def opened(engine):
        chats = [engine.chat([], image=photo(seed)) for seed in (3, 4)]
        for chat in chats:
            chat.ask("What is this?", max_new_tokens=4)
        return chats

    alone = opened(base)
    before = sum(chat.cache_bytes for chat in alone)
    want = [chat.ask(q, max_new_tokens=5) for chat, q in zip(alone, ["Why?", "And then?"])]
    want_next = [chat.ask("Where is it?", max_new_tokens=6) for chat in alone]
    tight = base.with_settings(max_cached_conversations_mb=(before + 1) / 2**20)
    batched = opened(tight)
    got = tight.follow_up_batch([FollowUpRequest(c, q, 5) for c, q in zip(batched, ["Why?", "And then?"])])
    assert [a.token_ids for a in got] == [a.token_ids for a in want]
    assert all(chat.cache_bytes == 0 or chat._positions is not None for chat in batched)
    roomy = tight.with_settings(max_cached_conversations_mb=1000)
    again = roomy.follow_up_batch([FollowUpRequest(chat, "Where is it?", 6) for chat in batched])
    assert [a.token_ids for a in again] == [a.token_ids for a in want_next]


def test_computing_one_conversations_context_does_not_push_the_batchs_others_out_of_the_budget(monkeypatch):
    """With room for about two caches, the third conversation's context computed for the batch (`Chat._prime`)
    must not drop the cache of another row: all three still share one generation, and each answer is its own."""
    base = tiny_engine("qwen2.5-vl")

    def opened(engine):
        asked = engine.chat([], image=photo(3))
        asked.ask("What is this?", max_new_tokens=12)
        adopted = engine.chat([], image=photo(4))
        adopted.adopt("What is this?", engine.answer("What is this?", image=photo(4), max_new_tokens=12))
        other = engine.chat([], image=photo(5))
        other.ask("What is here?", max_new_tokens=12)
        return [asked, adopted, other]

    questions = ["Why?", "More?", "Colours?"]
    alone = opened(base)
    want = [chat.ask(q, max_new_tokens=6) for chat, q in zip(alone, questions)]
    per_chat = max(chat.cache_bytes for chat in alone)
    tight = base.with_settings(max_cached_conversations_mb=1.8 * per_chat / 2**20)
    batched = opened(tight)
    generate, calls = tight.model.generate, []

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(tight.model, "generate", counted)
    got = tight.follow_up_batch([FollowUpRequest(c, q, 6) for c, q in zip(batched, questions)])
    assert calls == [1, 3]  # the adopted one's context, then one generation for all three
    assert [a.token_ids for a in got] == [a.token_ids for a in want]
    held = sum(chat.cache_bytes for chat in batched)
    assert 0 < held <= tight.settings.max_cached_conversations_bytes  # the budget settled once the answers were in


def test_a_failure_in_one_generation_of_a_batch_leaves_the_others_answers(monkeypatch):
    """The conversations on their caches are answered first; one answered later on its own fails with its own
    error, and the answers (and turns) of the first stand. Out of memory while one conversation prepares its
    adopted first turn fails that one alone."""
    engine = tiny_engine("qwen2.5-vl")

    def opened(seed):
        chat = engine.chat([], image=photo(seed))
        chat.ask("What is this?", max_new_tokens=4)
        return chat

    a, b, dropped = opened(3), opened(4), opened(5)
    dropped.drop_cache()
    generate = engine.model.generate

    def failing_without_a_cache(*args, **kwargs):
        if kwargs["past_key_values"].get_seq_length() == 0:
            raise RuntimeError("a device fault")
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", failing_without_a_cache)
    results = engine.follow_up_batch([FollowUpRequest(c, "Why?", 4) for c in (a, b, dropped)])
    assert [type(r).__name__ for r in results] == ["Answer", "Answer", "RuntimeError"]
    assert [len(c.turns) for c in (a, b, dropped)] == [2, 2, 1]
    monkeypatch.undo()

    adopted = engine.chat([], image=photo(8))
    adopted.adopt("What is this?", engine.answer("What is this?", image=photo(8), max_new_tokens=4))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(engine, "_prepared", out_of_memory)  # the model's part of the adopted turn's context
    results = engine.follow_up_batch([FollowUpRequest(c, "And?", 4) for c in (a, b, adopted)])
    assert [type(r).__name__ for r in results] == ["Answer", "Answer", "ModelBusyError"]


def test_a_follow_up_stopped_alone_keeps_only_what_was_handed_on_and_goes_on_from_there(concepts):
    """A visitor's Stop: the turn holds the tokens streamed before it (not the one generated after), and the next
    question continues from exactly those, as a conversation that had stopped there would."""
    engine = tiny_engine("qwen2.5-vl")
    cat = chelsea(engine, concepts)
    chat, reference = conversations_after_a_first_question(
        engine, [cat], [([cat], dict(image=photo(3)), "Is Chelsea here?")] * 2, budget=6
    )
    stop, handed = threading.Event(), []

    def on_text(index, answer):
        handed.append(list(answer.token_ids))
        if len(answer.token_ids) >= 3:
            stop.set()

    (cut,) = engine.follow_up_batch([FollowUpRequest(chat, "What is she holding?", 12)], stops=[stop], on_text=on_text)
    assert list(cut.token_ids) == handed[-1] and len(cut.token_ids) == 3 and cut.stopped
    assert chat.turns[-1] == ("What is she holding?", cut) and chat._ids[-3:] == list(cut.token_ids)
    assert chat.cache_bytes > 0 and chat._cache.get_seq_length() == len(chat._ids)
    reference.adopt("What is she holding?", cut)
    following = chat.ask("And the wall?", max_new_tokens=6)
    assert following.token_ids == reference.ask("And the wall?", max_new_tokens=6, use_cache=False).token_ids
    assert not following.stopped


def test_a_follow_up_whose_answer_alone_does_not_fit_is_told_how_long_one_may_be(concepts):
    """The refusal is a `ConversationFullError` (an `InputError`) that carries its ways out: the longest answer
    that fits, exactly (one token more is refused), and that a new conversation would make room."""
    chat = adopted_with_room(tiny_engine("qwen2.5-vl"), concepts, 40)
    with pytest.raises(ConversationFullError, match=r"or ask for a shorter answer \(at most (\d+) tokens\)") as full:
        chat.ask("And then?", max_new_tokens=100)
    room = full.value.longest_answer_tokens
    assert full.value.new_conversation and f"at most {room} tokens" in str(full.value)
    assert str(full.value).startswith(full.value.situation + "; start a new conversation to ask more; or ")
    with pytest.raises(ConversationFullError, match=f"at most {room} tokens"):
        chat.ask("And then?", max_new_tokens=room + 1)
    assert room > 0 and chat.ask("And then?", max_new_tokens=room) is not None  # what it said fits
    # A model call on ZeroGPU runs in another process: the refusal comes back through pickle, whole.
    again = pickle.loads(pickle.dumps(full.value))
    assert type(again) is ConversationFullError and str(again) == str(full.value)
    assert (again.situation, again.new_conversation, again.longest_answer_tokens) == (
        full.value.situation,
        True,
        room,
    )


def test_only_text_is_taken_as_an_answer_elsewhere():
    engine = tiny_engine("qwen2.5-vl")
    chat = engine.chat(image=photo(3))
    for wrong in (None, 5, ["an", "answer"]):
        with pytest.raises(InputError, match="The answer to take is text"):
            chat.adopt("And?", wrong)
    assert chat.turns == []


def test_a_stopped_stream_keeps_exactly_what_its_caller_was_handed(concepts):
    """The conversation continues from the text the caller saw when they stopped: not from the token generated
    after the Stop, nor from a word held back. Its tokens are that text's."""
    engine = tiny_engine("qwen2.5-vl")
    chat = engine.chat([chelsea(engine, concepts)], image=photo(3))
    chat.ask("Is Chelsea here?", max_new_tokens=4)
    stream = chat.stream("Describe everything in great detail.", max_new_tokens=200)
    seen = [next(stream) for _ in range(3)]
    stream.close()
    kept = chat.turns[-1][1]
    assert kept.stopped and str(kept) == str(seen[-1])
    assert engine.backend.tokenizer.decode(kept.token_ids, skip_special_tokens=True).strip() == str(seen[-1])


def first_answers_handed_over(engine, chats, questions, budgets, keep=True):
    """The first questions of `chats` answered in one batch (`AnswerRequest.keep_context`), each adopted by its
    conversation, as the Space does; the answers."""
    requests = [
        AnswerRequest(q, chat.concepts, chat.picture, chat.clip, b, keep_context=keep)
        for chat, q, b in zip(chats, questions, budgets)
    ]
    answers = engine.answer_batch(requests)
    for chat, question, answer in zip(chats, questions, answers):
        chat.adopt(question, answer)
    return answers


def test_a_first_answer_given_in_a_batch_hands_its_context_to_the_conversation_that_adopts_it(
    family, concepts, monkeypatch
):
    """A batch's first answers (a photo with one concept, another photo with two, a clip, nothing) hand each row's
    key/value cache and positions to the conversation that adopts the answer: its follow-up computes only its own
    tokens, with the logits of the same conversation answered alone at every step, and it goes on from there."""
    engine = tiny_engine(family)
    cat = chelsea(engine, concepts)
    dog = engine.introduce("Rex", [photo(0)], keywords=["dog"], area_pct=5)
    setups = [
        ([cat], dict(image=photo(3))),
        ([cat, dog], dict(image=photo(2, size=(300, 200)))),
        ([dog], dict(video=np.random.RandomState(6).randint(0, 255, (4, 96, 128, 3)).astype(np.uint8))),
        ([dog], {}),
    ]
    questions, budgets = ["Is Chelsea here?", "Who do you see?", "What happens?", "Who is Rex?"], [7, 4, 6, 5]
    handed = [engine.chat(known, **media) for known, media in setups]
    alone = [engine.chat(known, **media) for known, media in setups]
    firsts = first_answers_handed_over(engine, handed, questions, budgets)
    want = [chat.ask(q, max_new_tokens=b) for chat, q, b in zip(alone, questions, budgets)]
    assert [str(a) for a in firsts] == [str(a) for a in want]
    assert all(chat.cache_bytes > 0 and not chat._adopted for chat in handed)  # taken: no context to compute
    assert all(not hasattr(answer, "_handed") for answer in firsts)  # the conversation holds it, the answer not
    for chat, reference in zip(handed, alone):
        scores = record_scores(monkeypatch, engine)
        got = chat.ask(FOLLOW_UPS[0], max_new_tokens=6)
        expected = reference.ask(FOLLOW_UPS[0], max_new_tokens=6)
        monkeypatch.undo()
        assert (str(got), got.token_ids, got.context_tokens) == (
            str(expected),
            expected.token_ids,
            expected.context_tokens,
        )
        assert got.prefill_tokens <= new_tokens(engine, FOLLOW_UPS[0]) + 1  # its own tokens (and the answer's last)
        torch.testing.assert_close(scores[0], scores[1], **SAME_SCORES)
        later, again = chat.ask("And then?", max_new_tokens=4), reference.ask("And then?", max_new_tokens=4)
        assert (str(later), later.prefill_tokens) == (str(again), again.prefill_tokens)


def test_a_handed_context_is_taken_only_by_its_own_conversation_within_the_cache_budget(concepts):
    """Another photo's conversation, another question, a second adopter, a request that did not ask for it, or no
    room left in `max_cached_conversations_mb`: nothing is taken, and the next question computes the context itself
    (the answers are the same); a pickled answer leaves its context behind."""
    engine = tiny_engine("qwen2.5-vl")
    cat = chelsea(engine, concepts)
    mine, other = engine.chat([cat], image=photo(3)), engine.chat([cat], image=photo(4))
    answer = engine.answer_batch(
        [AnswerRequest("Is Chelsea here?", mine.concepts, mine.picture, None, 5, keep_context=True)]
    )[0]
    assert hasattr(answer, "_handed")
    copied = pickle.loads(pickle.dumps(answer))
    assert str(copied) == str(answer) and copied.token_ids == answer.token_ids and not hasattr(copied, "_handed")
    other.adopt("Is Chelsea here?", answer)  # not its photo: taken as text and tokens, the context is dropped
    assert other.cache_bytes == 0 and other._adopted and not hasattr(answer, "_handed")
    mine.adopt("Is Chelsea here?", answer)  # the context went with the first adopter
    assert mine.cache_bytes == 0 and mine._adopted
    follow_up = mine.ask("Why?", max_new_tokens=4)
    assert follow_up.prefill_tokens == follow_up.context_tokens  # the whole context, computed again

    renamed = engine.chat([cat], image=photo(3))
    first_answers_handed_over(engine, [renamed], ["Is Chelsea here?"], [5])
    plain = engine.chat([cat], image=photo(3))
    first_answers_handed_over(engine, [plain], ["Is Chelsea here?"], [5], keep=False)
    assert renamed.cache_bytes > 0 and plain.cache_bytes == 0
    one = renamed.cache_bytes  # a first answer's context of that photo
    assert str(renamed.ask("Why?", max_new_tokens=4)) == str(plain.ask("Why?", max_new_tokens=4)) == str(follow_up)
    asked_otherwise = engine.chat([cat], image=photo(3))
    answer = engine.answer_batch(
        [
            AnswerRequest(
                "Is Chelsea here?", asked_otherwise.concepts, asked_otherwise.picture, None, 5, keep_context=True
            )
        ]
    )[0]
    asked_otherwise.adopt("Is she here?", answer)  # another question than the one the context was computed for
    assert asked_otherwise.cache_bytes == 0

    # Room for one conversation's cache: the batch drops the least recently used one in its turn to make it.
    roomy = engine.with_settings(max_cached_conversations_mb=1.5 * one / 2**20)
    older = roomy.chat([cat], image=photo(4))
    older.ask("Is Chelsea here?", max_new_tokens=5)
    assert older.cache_bytes > 0
    newer = roomy.chat([cat], image=photo(3))
    first_answers_handed_over(roomy, [newer], ["Is Chelsea here?"], [5])
    assert older.cache_bytes == 0 and newer.cache_bytes == one
    tight = engine.with_settings(max_cached_conversations_mb=0.5 * one / 2**20)
    full = tight.chat([cat], image=photo(3))
    first_answers_handed_over(tight, [full], ["Is Chelsea here?"], [5])
    assert full.cache_bytes == 0 and full._adopted  # no room for it: computed at its next question
    assert str(full.ask("Why?", max_new_tokens=4)) == str(follow_up)
