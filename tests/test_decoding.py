"""Decoding (ego.decoding): compiled and eager decoding give the same tokens; the introduction records its
attention rows in one eager forward after the description, with the numbers generation would have seen.

The compiled engine is built and warmed up once for the module, with the "aot_eager" backend: dynamo captures
the decode step and AOTAutograd traces it exactly as for inductor, but no kernels are generated, so it compiles
in seconds rather than the minutes inductor takes on two CPU cores (the graph, the guards, the static cache and
the decode thread are the same).
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import (
    FAMILIES,
    WholeBudgetGenerations,
    description_keyword_tokens,
    eager_model,
    photo,
    record_scores,
    reference_inputs,
    tiny_engine,
)
from transformers import StaticCache, StoppingCriteria, StoppingCriteriaList

from ego import Ego, Settings, prompts
from ego.decoding import allow_compiled_decoding, compile_counts, resolve_mode
from ego.engine import _extend, layer_importance

COMPILED = Settings(decoding="compiled", compile_backend="aot_eager")
SAME_SCORES = dict(atol=1e-5, rtol=1e-4)
"""Compiled and eager decoding give the same logits at every step, to float32 rounding: a tiny random model's
greedy tokens barely depend on its inputs (a wrong position or a swapped input may leave them as they were), its
logits do."""


def assert_same_scores(compiled_scores: list, eager_scores: list) -> None:
    """Each generate call's per-step scores (`conftest.record_scores`), compiled and eager, call by call."""
    assert len(compiled_scores) == len(eager_scores) > 0
    for fast, slow in zip(compiled_scores, eager_scores):
        torch.testing.assert_close(fast, slow, **SAME_SCORES)


@pytest.fixture(scope="module")
def compiled_in_the_space():
    """The compiled engine, compiled the way the Space does it: on first use, with a message for the visitor."""
    from space.loading import LazyEngine

    # Every family's classes loaded first, as the module's other tests load them: the compiled graphs guard on the
    # size of transformers' registry of model classes, and a class new to it would recompile them once.
    for family in FAMILIES:
        tiny_engine(family)
    engine, messages = Ego.tiny("qwen2.5-vl", settings=COMPILED), []
    assert engine.needs_warm_up
    space = LazyEngine(engine, warm_up_batched=True)  # as a Space that batches its visitors
    assert space.get(lambda fraction, desc: messages.append(desc)) is engine
    return engine, messages


@pytest.fixture(scope="module")
def compiled(compiled_in_the_space):
    return compiled_in_the_space[0]


def test_the_space_compiles_on_first_use_and_says_so(compiled_in_the_space):
    from space.loading import WARM_UP_MESSAGE, LazyEngine

    engine, messages = compiled_in_the_space
    assert messages == [WARM_UP_MESSAGE]
    assert not engine.needs_warm_up and engine.decoder.warm_up_s > 0
    later = []
    LazyEngine(engine).get(lambda fraction, desc: later.append(desc))
    assert later == []  # compiled once


def _text_inputs(engine) -> dict:
    """A text-only question as the engine would encode it (the processor's tensors)."""
    text = engine.backend.chat_text([{"type": "text", "text": "Say hello."}])
    return engine.backend.encode(text, image_max_pixels=448 * 448, video_frame_max_pixels=448 * 448).inputs


def _greedy(model, engine, inputs, new_tokens):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, do_sample=False, suppress_tokens=engine.backend.unspeakable_token_ids
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


# --------------------------------------------------------------------------------------------------
# The introduction's rows, recorded after generation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_description_rows_scores_and_kept_tokens_equal_eager_attention_over_the_conversation(family, monkeypatch):
    """The rows the engine records equal what a model with eager attention computes over the same conversation
    (prompt, the greedy description, the size question), which is what capturing them during generation gave;
    so do Eq. 3's scores and the kept tokens of the introduction, and the size answer is the greedy continuation."""
    size_tokens = 6
    engine, model = tiny_engine(family).with_settings(size_max_new_tokens=size_tokens), eager_model(family)
    picture, descriptions, describe = photo(5), [], engine.describe
    monkeypatch.setattr(engine, "describe", lambda *a, **k: descriptions.append(describe(*a, **k)) or descriptions[-1])
    view = engine.introduce("Chelsea", [picture]).views[0]
    (described,) = descriptions

    inputs = reference_inputs(engine, picture)
    start = inputs["input_ids"].shape[1]
    stops = engine.backend.stop_token_ids
    description = _greedy(model, engine, {**inputs}, engine.settings.description_max_new_tokens)
    while description and description[-1] in stops:
        description.pop()
    assert described.ids == description and described.start == start
    follow = engine.backend.tokenizer(
        engine.backend.continue_turn(prompts.SIZE_PROMPT), add_special_tokens=False
    ).input_ids
    sequence = torch.tensor([inputs["input_ids"][0].tolist() + description + follow])
    forward = {k: v for k, v in _extend(inputs, sequence.shape[1]).items() if k != "input_ids"}
    with torch.no_grad():
        attentions = model(input_ids=sequence, **forward, output_attentions=True).attentions
    columns = (sequence[0] == model.config.image_token_id).nonzero().squeeze(1)
    positions = range(start, start + len(description))

    assert described.capture.recorded_positions() == set(positions)  # the description's rows, no others
    for layer in engine.layers:
        for position in positions:
            torch.testing.assert_close(
                described.capture.rows[layer][position],
                attentions[layer][0, :, position, columns],
                atol=1e-6,
                rtol=1e-5,
            )

    offsets = description_keyword_tokens(engine.backend.tokenizer, description)  # not the engine's keyword_positions
    rows = torch.tensor([start + i for i in offsets])
    block = torch.stack([attentions[layer][0] for layer in engine.layers])[:, :, rows][:, :, :, columns]
    expected = block.sum(dim=(0, 1, 2)) / (block.shape[0] * block.shape[1] * block.shape[2])  # Eq. 3: [N_r]
    scores = layer_importance(described.capture, rows.tolist()).mean(dim=0)
    torch.testing.assert_close(scores, expected, atol=2e-6, rtol=1e-5)
    for k in (1, 10, 50):
        assert sorted(torch.topk(scores, k).indices.tolist()) == sorted(torch.topk(expected, k).indices.tolist())
    # The introduction's own scores and kept tokens: from the keyword rows it chose itself.
    torch.testing.assert_close(view.scores, expected, atol=2e-6, rtol=1e-5)
    assert view.token_indices.tolist() == sorted(torch.topk(expected, view.k).indices.tolist())

    with torch.no_grad():
        size = _greedy(model, engine, {"input_ids": sequence, **forward}, size_tokens)
    assert described.size_answer == engine.backend.tokenizer.decode(size, skip_special_tokens=True).strip()


# --------------------------------------------------------------------------------------------------
# Modes and settings
# --------------------------------------------------------------------------------------------------
def test_auto_is_compiled_on_cuda_and_eager_elsewhere():
    assert resolve_mode("auto", torch.device("cuda", 0)) == "compiled"
    assert resolve_mode("auto", torch.device("cpu")) == "eager"
    assert resolve_mode("compiled", torch.device("cpu")) == "compiled"
    with pytest.raises(ValueError, match="decoding"):
        resolve_mode("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="decoding"):
        Settings(decoding="fast")
    eager = tiny_engine("qwen2-vl")
    assert eager.decoder.mode == "eager" and "compile_config" not in eager.decoding
    assert not eager.needs_warm_up and eager.decoder.cache(10) is None


def test_bitsandbytes_4bit_compiles_for_this_model_only_and_gives_the_eager_tokens():
    eager = Ego.tiny("qwen2-vl", quantization="4bit", device="cpu")
    assert not eager.model.hf_quantizer.is_compileable  # transformers' own answer for bitsandbytes 4-bit
    fast = Ego.tiny("qwen2-vl", quantization="4bit", device="cpu", settings=COMPILED)
    assert fast.decoder.mode == "compiled" and fast.model.hf_quantizer.is_compileable
    assert not eager.model.hf_quantizer.is_compileable  # the class itself is left alone
    assert allow_compiled_decoding(eager.model) and eager.model.hf_quantizer.is_compileable
    inputs = _text_inputs(fast)
    with torch.no_grad():
        expected = eager.model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, **eager.decoding)
        out = fast.model.generate(
            **inputs, max_new_tokens=8, min_new_tokens=8, return_dict_in_generate=True, **fast.decoding
        )
    assert out.sequences.tolist() == expected.tolist()  # through the 4-bit layers, compiled
    assert isinstance(out.past_key_values, StaticCache) and hasattr(fast.model, "_compiled_call")
    eight = Ego.tiny("qwen2-vl", quantization="8bit", device="cpu", settings=COMPILED)
    assert eight.decoder.mode == "eager"  # not compileable: decoded eagerly


# --------------------------------------------------------------------------------------------------
# Compiled decoding (one engine for the module)
# --------------------------------------------------------------------------------------------------
def test_compiled_and_eager_decoding_give_the_same_greedy_tokens(compiled, monkeypatch):
    eager = tiny_engine("qwen2.5-vl")
    picture = photo(7)
    text = compiled.backend.chat_text([{"type": "image"}, {"type": "text", "text": "What is in this photo?"}])
    inputs = compiled.backend.encode(
        text, image=picture, image_max_pixels=448 * 448, video_frame_max_pixels=448 * 448
    ).inputs
    with torch.no_grad():
        out = compiled.model.generate(
            **inputs,
            max_new_tokens=16,
            min_new_tokens=16,
            **compiled.decoding,
            return_dict_in_generate=True,
            output_scores=True,
        )
        expected = eager.model.generate(
            **inputs,
            max_new_tokens=16,
            min_new_tokens=16,
            **eager.decoding,
            return_dict_in_generate=True,
            output_scores=True,
        )
    assert out.sequences.tolist() == expected.sequences.tolist()
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(expected.scores), **SAME_SCORES)
    # It decoded on the shared static cache, through transformers' compiled call.
    assert isinstance(out.past_key_values, StaticCache) and out.past_key_values is compiled.decoder._caches[1]
    assert hasattr(compiled.model, "_compiled_call") and compiled.decoder.warm_up_s > 0
    # And the engine's answers are the eager engine's, with and without concepts.
    concept = eager.introduce("Chelsea", [photo(8)], keywords="cat", area_pct=10)
    scores = {engine: record_scores(monkeypatch, engine) for engine in (compiled, eager)}
    for concepts in ([], [concept]):
        assert compiled.answer("Who is here?", concepts, image=picture, max_new_tokens=12) == eager.answer(
            "Who is here?", concepts, image=picture, max_new_tokens=12
        )
    assert_same_scores(scores[compiled], scores[eager])


def test_compiled_introduction_equals_the_eager_one(compiled):
    eager = tiny_engine("qwen2.5-vl")
    fast, slow = (engine.introduce("Chelsea", [photo(9)]) for engine in (compiled, eager))
    a, b = fast.views[0], slow.views[0]
    assert (a.description, a.size_answer, a.k) == (b.description, b.size_answer, b.k)
    assert a.token_indices.tolist() == b.token_indices.tolist()
    torch.testing.assert_close(a.scores, b.scores, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast.embeddings, slow.embeddings)


def test_new_prompt_lengths_and_budgets_do_not_recompile(compiled):
    before = compile_counts()
    concept = compiled.introduce("mug", [photo(10, size=(200, 300))])
    for size, budget in (((240, 160), 3), ((480, 320), 9)):
        compiled.answer("What is here?", [concept], image=photo(11, size=size), max_new_tokens=budget)
    compiled.answer("Say something.", max_new_tokens=5)
    assert compile_counts() == before


def test_one_graph_decodes_photos_clips_introductions_and_follow_ups_each_as_eager_does(monkeypatch):
    """Transformers hands the prefill's grid sizes (a photo's `image_grid_thw`, a clip's `video_grid_thw` and
    `second_per_grid_ts`) on to every decode step, which does not read them, and gives a continuation on a filled
    cache (an introduction's size question, a follow-up) its positions in another shape: each was a graph of its
    own (six compilations at warm-up instead of two, each minutes of a GPU run's time on a 7B). Left out and in one
    shape, a photo's graph decodes them all, and each gives the eager engine's tokens."""
    from test_batching import clip

    engine, eager = Ego.tiny("qwen2.5-vl", settings=COMPILED), tiny_engine("qwen2.5-vl")
    engine.answer("What is here?", image=photo(12), max_new_tokens=4)
    before = compile_counts()
    frames = clip(32)
    scores = {e: record_scores(monkeypatch, e) for e in (engine, eager)}
    assert engine.answer("What happens?", video=frames, max_new_tokens=6) == eager.answer(
        "What happens?", video=frames, max_new_tokens=6
    )
    fast, slow = (e.introduce("Chelsea", [photo(13)], keywords="cat") for e in (engine, eager))
    assert (fast.views[0].size_answer, fast.views[0].k) == (slow.views[0].size_answer, slow.views[0].k)
    said = []
    for e in (engine, eager):
        chat = e.chat([fast], video=frames)
        said.append([str(chat.ask(q, max_new_tokens=5)) for q in ("Is Chelsea here?", "And then?", "Why?")])
    assert said[0] == said[1]
    assert_same_scores(scores[engine], scores[eager])  # the clip, the size question and the conversation
    assert compile_counts() == before
    monkeypatch.undo()
    engine.decoder.close()
    assert not {"prepare_inputs_for_generation", "_prepare_position_ids_for_generation"} & set(vars(engine.model))


def test_every_compiled_generation_runs_on_the_decode_thread(compiled):
    threads = []

    class Record(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            threads.append(threading.current_thread().name)
            return False

    with torch.no_grad():
        compiled.model.generate(
            **_text_inputs(compiled),
            max_new_tokens=3,
            stopping_criteria=StoppingCriteriaList([Record()]),
            **compiled.decoding,
        )
    assert threads and all(name.startswith("ego-decode") for name in threads)
    assert threading.current_thread().name not in threads


def test_streaming_and_stop_work_with_compiled_decoding(compiled, monkeypatch):
    picture = photo(12)
    whole = compiled.answer("Describe this.", image=picture, max_new_tokens=12)
    pieces = list(compiled.stream_answer("Describe this.", image=picture, max_new_tokens=12))
    assert pieces[-1] == whole and len(pieces) > 2
    with monkeypatch.context() as patch:
        generations = WholeBudgetGenerations(patch, compiled)  # 200 tokens unless stopped
        stream = compiled.stream_answer("Describe this.", image=picture, max_new_tokens=200)
        next(stream)
        before = generations.held()  # the decode thread waits for the Stop after its next token
        stream.close()  # Stop: the generation ends, the model is free again
    assert len(generations.tokens) == 1 and generations.tokens[0] <= before + 1 < 200
    assert not compiled._lock.locked()
    assert compiled.answer("Describe this.", image=picture, max_new_tokens=12) == whole


def caches_decoded_on(decoder, monkeypatch) -> list:
    """The cache each of the decoder's generate calls decodes on, from now on."""
    caches, generate = [], decoder._generate

    def spy(*args, **kwargs):
        caches.append(kwargs.get("past_key_values"))
        return generate(*args, **kwargs)

    monkeypatch.setattr(decoder, "_generate", spy)
    return caches


def test_a_conversation_decodes_on_the_shared_cache_and_keeps_a_cache_of_its_own(compiled, monkeypatch):
    """Every turn of a conversation (first, adopted, cached follow-up, recomputed follow-up) decodes on the shared
    static cache, and the conversation keeps a copy: another visitor's answer in between resets the shared cache
    and changes nothing of the conversation's answers, which are the eager engine's."""
    eager = tiny_engine("qwen2.5-vl")
    concept = eager.introduce("Chelsea", [photo(20)], keywords="cat", area_pct=10)
    caches = caches_decoded_on(compiled.decoder, monkeypatch)
    before = compile_counts()
    said, scores = {}, {engine: record_scores(monkeypatch, engine) for engine in (compiled, eager)}
    for engine in (compiled, eager):
        asked, adopted = engine.chat([concept], image=photo(21)), engine.chat([concept], image=photo(22))
        adopted.adopt("What is here?", engine.answer("What is here?", [concept], image=photo(22), max_new_tokens=6))
        answers = [
            asked.ask("Is Chelsea here?", max_new_tokens=6),
            asked.ask("What colour is Chelsea?", max_new_tokens=6),
            adopted.ask("And Chelsea?", max_new_tokens=6),
        ]
        engine.answer("Something else entirely.", image=photo(23, size=(200, 200)), max_new_tokens=9)
        answers += [
            asked.ask("Where is Chelsea?", max_new_tokens=6),
            asked.ask("Anything else?", max_new_tokens=6, use_cache=False),
            list(adopted.stream("Is she happy?", max_new_tokens=6))[-1],
        ]
        said[engine] = [str(answer) for answer in answers] + [chat._cache.get_seq_length() for chat in (asked, adopted)]
        assert not {id(asked._cache), id(adopted._cache)} & {id(cache) for cache in compiled.decoder._caches.values()}
    assert said[compiled] == said[eager]  # the same answers, and caches of the same lengths
    assert_same_scores(scores[compiled], scores[eager])
    assert len(caches) == 8 and all(cache is compiled.decoder._caches[1] for cache in caches)
    assert compile_counts() == before  # a cache filled before the prefill does not recompile the step


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen2.5-vl"])
def test_every_family_continues_a_conversation_compiled_as_it_does_eagerly(family, monkeypatch):
    """The copy into the shared cache and back holds for every family's cache and positions (Qwen2-VL's and
    Qwen3-VL's M-RoPE offsets, Qwen3-VL's deepstack residuals at the memory slots, InternVL's plain positions)."""
    fast, slow = Ego.tiny(family, settings=COMPILED), tiny_engine(family)
    concept = slow.introduce("Chelsea", [photo(40)], keywords="cat", area_pct=10)
    caches = caches_decoded_on(fast.decoder, monkeypatch)
    said, scores = {}, {engine: record_scores(monkeypatch, engine) for engine in (fast, slow)}
    for engine in (fast, slow):
        chat = engine.chat([concept], image=photo(41))
        answers = [chat.ask("Is Chelsea here?", max_new_tokens=5), chat.ask("What colour?", max_new_tokens=5)]
        engine.answer("Something else.", image=photo(42, size=(200, 200)), max_new_tokens=7)
        answers.append(chat.ask("Where is Chelsea?", max_new_tokens=5))
        said[engine] = [str(answer) for answer in answers] + [chat._cache.get_seq_length()]
    assert said[fast] == said[slow]
    assert_same_scores(scores[fast], scores[slow])
    assert len(caches) == 4 and all(cache is fast.decoder._caches[1] for cache in caches)  # on the shared cache


def test_batched_answers_decode_compiled_and_each_equals_its_eager_answer_alone(compiled, monkeypatch):
    """Four visitors' questions (photos, a clip, none; 0 to 3 concepts; different budgets) in one compiled batch,
    on the static cache of batch size 4: each answer is the eager engine's answer to that question alone."""
    from test_batching import _LONE_LOGITS, SMALL, assert_rows_score_as_alone, build_setup, clip, record_logits

    from ego.batching import AnswerRequest

    _, _, requests, lone = build_setup("qwen2.5-vl")
    caches = caches_decoded_on(compiled.decoder, monkeypatch)
    before = compile_counts()
    with monkeypatch.context() as patch:
        logits = record_logits(patch, compiled)
        batched = compiled.with_settings(**SMALL).answer_batch(requests[:4])
    assert [str(answer) for answer in batched] == [str(answer) for answer in lone[:4]]
    (rows,) = logits  # one generation; each row's logits at every step are the eager ones alone
    assert_rows_score_as_alone(rows, _LONE_LOGITS["qwen2.5-vl"][:4])
    assert caches == [compiled.decoder._caches[4]]
    # The warm-up compiled the batched steps: batches of other sizes, of photos or clips, with or without
    # different lengths, compile nothing more.
    same = [AnswerRequest("Who?", (), image=photo(30), max_new_tokens=3)] * 2
    clips = [AnswerRequest(f"What happens{'?' * i}", (), video=clip(31), max_new_tokens=3) for i in range(8)]
    for batch in (same, same * 4, clips, clips[:2] + same):
        assert all(not isinstance(answer, Exception) for answer in compiled.answer_batch(batch))
    assert compile_counts() == before


def test_follow_ups_answered_together_decode_compiled_as_each_does_eagerly_alone(compiled, monkeypatch):
    """Two conversations' follow-ups in one compiled batch, on the static cache of batch size 2 (their caches
    copied in, stacked): the eager engine's answers alone, and each conversation goes on from its own row."""
    from ego import FollowUpRequest

    eager = tiny_engine("qwen2.5-vl")
    concept = eager.introduce("Chelsea", [photo(50)], keywords="cat", area_pct=10)
    said, scores = {}, {}
    for engine in (compiled, eager):
        scores[engine] = record_scores(monkeypatch, engine)
        chats = [engine.chat([concept], image=photo(51)), engine.chat([], image=photo(52, size=(200, 160)))]
        firsts = [chat.ask(q, max_new_tokens=8) for chat, q in zip(chats, ["Is Chelsea here?", "What is this?"])]
        # New parts a few tokens apart: the shorter one computes its last answer tokens again, not its photo.
        questions = ["What is she holding?", "And what colour is the wall?"]
        if engine is compiled:
            with monkeypatch.context() as patch:
                caches = caches_decoded_on(compiled.decoder, patch)
                before = compile_counts()
                follow_ups = engine.follow_up_batch([FollowUpRequest(c, q, 6) for c, q in zip(chats, questions)])
            assert caches == [compiled.decoder._caches[2]] and compile_counts() == before
        else:
            follow_ups = [chat.ask(q, max_new_tokens=6) for chat, q in zip(chats, questions)]
        later = [chat.ask("And then?", max_new_tokens=5) for chat in chats]
        said[engine] = [str(answer) for answer in firsts + follow_ups + later]
    assert said[compiled] == said[eager]
    # Call by call: the two first questions, the follow-ups (compiled: one batch of two; eager: each alone), the
    # two later questions; each batched row's scores are its conversation's alone, at every step of its answer.
    fast, slow = scores[compiled], scores[eager]
    assert len(fast) == 5 and len(slow) == 6 and fast[2].shape[1] == 2
    assert_same_scores(fast[:2] + fast[3:], slow[:2] + slow[4:])
    for row, (alone, answer) in enumerate(zip(slow[2:4], follow_ups)):
        steps = len(answer.token_ids)
        torch.testing.assert_close(fast[2][:steps, row], alone[:steps, 0], **SAME_SCORES)


def test_first_answers_of_a_compiled_batch_hand_their_contexts_over_as_eager_ones_alone(compiled, monkeypatch):
    """Two first questions in one compiled batch (the shared static cache of batch size 2), each answer adopted by
    its conversation with its row of that cache (`AnswerRequest.keep_context`, copied before the cache is reused):
    each follow-up computes only its own tokens and scores as the eager conversation answered alone, step by step,
    and the batch compiles nothing new."""
    from ego import AnswerRequest

    eager = tiny_engine("qwen2.5-vl")
    concept = eager.introduce("Chelsea", [photo(53)], keywords="cat", area_pct=10)
    media = [dict(image=photo(54)), dict(image=photo(55, size=(200, 160)))]
    questions = ["Is Chelsea here?", "What is this?"]
    said, scores = {}, {}
    for engine in (compiled, eager):
        chats = [engine.chat([concept], **m) for m in media]
        if engine is compiled:
            before = compile_counts()
            requests = [
                AnswerRequest(q, c.concepts, c.picture, c.clip, 8, keep_context=True) for c, q in zip(chats, questions)
            ]
            with monkeypatch.context() as patch:
                caches = caches_decoded_on(compiled.decoder, patch)
                firsts = engine.answer_batch(requests)
            for chat, question, answer in zip(chats, questions, firsts):
                chat.adopt(question, answer)
            assert caches == [compiled.decoder._caches[2]] and compile_counts() == before
            assert all(chat.cache_bytes > 0 for chat in chats)
        else:
            firsts = [chat.ask(q, max_new_tokens=8) for chat, q in zip(chats, questions)]
        scores[engine] = record_scores(monkeypatch, engine)
        follow_ups = [chat.ask("What is she holding?", max_new_tokens=6) for chat in chats]
        monkeypatch.undo()
        said[engine] = [(str(a), a.prefill_tokens) for a in follow_ups] + [str(a) for a in firsts]
    assert said[compiled] == said[eager]
    assert_same_scores(scores[compiled], scores[eager])


def test_a_generation_longer_than_the_static_cache_decodes_eagerly(compiled, monkeypatch):
    inputs = _text_inputs(compiled)
    with torch.no_grad():
        fitting = compiled.model.generate(**inputs, max_new_tokens=6, return_dict_in_generate=True, **compiled.decoding)
        monkeypatch.setattr(compiled.decoder, "max_cache_tokens", inputs["input_ids"].shape[1] + 5)
        longer = compiled.model.generate(**inputs, max_new_tokens=6, return_dict_in_generate=True, **compiled.decoding)
    assert isinstance(fitting.past_key_values, StaticCache)
    assert not isinstance(longer.past_key_values, StaticCache)
    assert longer.sequences.tolist() == fitting.sequences.tolist()


def test_a_compile_failure_leaves_the_space_answering_eagerly(caplog):
    import torch._dynamo

    from space.loading import LazyEngine

    def failing(graph, example_inputs):
        raise RuntimeError("this compiler fails")

    torch._dynamo.register_backend(failing, name="ego_always_fails")
    engine = Ego.tiny("qwen2-vl", settings=Settings(decoding="compiled", compile_backend="ego_always_fails"))
    assert engine.needs_warm_up
    assert LazyEngine(engine).get() is engine
    assert "compiling the decode step failed" in caplog.text
    assert engine.decoder.mode == "eager" and not engine.needs_warm_up and "compile_config" not in engine.decoding
    plain = tiny_engine("qwen2-vl")
    assert engine.answer("Say hello.", max_new_tokens=4) == plain.answer("Say hello.", max_new_tokens=4)


def test_a_batch_whose_static_cache_would_not_fit_the_gpu_decodes_eagerly(compiled, monkeypatch, caplog):
    """On a small GPU (free memory reported as 1 GiB, less than a batch cache plus `batch_cache_min_free_mb`),
    batches of 8 decode eagerly with the same answers, and single questions keep their compiled cache."""
    eager = tiny_engine("qwen2.5-vl")
    decoder = compiled.decoder
    # The cache one token takes, recomputed from the one-question cache the compiled answers filled.
    shared = decoder._caches[1]
    held = sum(t.numel() * t.element_size() for layer in shared.layers for t in (layer.keys, layer.values))
    assert held == decoder.max_cache_tokens * decoder.bytes_per_token()

    monkeypatch.setattr(decoder, "free_bytes", lambda: 2**30)
    monkeypatch.setattr(decoder, "batch_min_free_bytes", 2 * 2**30)
    monkeypatch.setattr(decoder, "_caches", {1: shared})
    monkeypatch.setattr(decoder, "_too_large", set())
    from ego.batching import AnswerRequest

    requests = [AnswerRequest(f"Who is here{'?' * i}", (), image=photo(60), max_new_tokens=4) for i in range(8)]
    assert [str(a) for a in compiled.answer_batch(requests)] == [str(a) for a in eager.answer_batch(requests)]
    assert decoder._too_large == {8} and set(decoder._caches) == {1}
    assert "batches of 8 decode eagerly" in caplog.text
    assert compiled.answer("Who?", image=photo(60), max_new_tokens=4) == eager.answer(
        "Who?", image=photo(60), max_new_tokens=4
    )


def test_a_batched_step_that_fails_to_compile_leaves_batches_eager_and_single_questions_compiled(caplog):
    """A compiler that cannot take the batched step's dynamic batch dimension (a backend that refuses symbolic
    shapes, standing in for any compiler failure there): the warm-up says so, batches decode eagerly with the same
    answers, and single questions stay on the compiled step. (No `torch._dynamo.reset()`: it would drop the graphs
    of the module's compiled engine, which later tests would then compile again; dynamo guards each graph on the
    backend that compiled it, so this engine's steps go to its own backend, as `compiled_shapes` checks.)"""
    import torch._dynamo

    compiled_shapes = []

    def static_shapes_only(graph, example_inputs):
        symbolic = any(isinstance(x, torch.SymInt) for x in example_inputs) or any(
            isinstance(size, torch.SymInt) for x in example_inputs if torch.is_tensor(x) for size in x.shape
        )
        compiled_shapes.append("symbolic" if symbolic else "static")
        if symbolic:
            raise RuntimeError("this compiler takes static shapes only")
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    torch._dynamo.register_backend(static_shapes_only, name="ego_static_shapes_only")
    engine = Ego.tiny("qwen2.5-vl", settings=Settings(decoding="compiled", compile_backend="ego_static_shapes_only"))
    engine.warm_up(batched=True)
    assert "compiling the batched decode step failed" in caplog.text
    assert {"static", "symbolic"} <= set(compiled_shapes)  # its one-row step compiled, its batched step refused
    assert engine.decoder.compiled and not engine.decoder.batches_compiled
    eager = tiny_engine("qwen2.5-vl")
    from ego.batching import AnswerRequest

    requests = [AnswerRequest(q, (), image=photo(50), max_new_tokens=5) for q in ("Who?", "What is here, then?")]
    assert [str(a) for a in engine.answer_batch(requests)] == [str(a) for a in eager.answer_batch(requests)]
    assert engine.answer("Who?", image=photo(50), max_new_tokens=5) == eager.answer(
        "Who?", image=photo(50), max_new_tokens=5
    )
    assert engine.decoder._caches.keys() == {1}  # single questions on the compiled step's cache, no batch cache
