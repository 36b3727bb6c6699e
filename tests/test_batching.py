"""Several visitors' questions in one batched generation: each answer equals the same question asked alone."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import torch
from conftest import FAMILIES, bigram_engine, photo, spy_on_generate, tiny_engine

from ego import InputError
from ego.batching import AnswerRequest, collate

SMALL = dict(
    query_image_max_pixels=224 * 224,
    reference_max_pixels=224 * 224,
    video_frame_max_pixels=112 * 112,
    video_num_frames=4,
)


def clip(seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 255, (4, 96, 128, 3)).astype(np.uint8)


_SETUPS: dict = {}
_LONE_LOGITS: dict[str, list[torch.Tensor]] = {}
"""Per family, each request's logits asked alone, [steps, V] (`build_setup`)."""

LOGIT_TOLERANCE = 1e-4
"""How far a batched row's logits may be from the same question's alone: float32 on CPU, they differ only by the
order of sums in a padded batch (about 3e-7 on logits of about 0.6 on the tiny models); another photo's features in
the row move them by 3e-2 or more. The random-weight models' greedy texts barely depend on the photo (InternVL3
gives one answer for different photos), so the logits are what shows a row got its own inputs."""


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    return build_setup(request.param)


@pytest.fixture(scope="module")
def one_family():
    """Stop, streaming and errors are the same code on every family: one family is enough."""
    return build_setup("qwen2.5-vl")


def build_setup(family: str):
    """(engine, three concepts of 1, 2 and 1 photos, a mix of questions, their answers alone): images, a video, no
    media; 0 to 3 concepts; questions and budgets of different lengths. Built once per family."""
    if family in _SETUPS:
        return _SETUPS[family]
    engine = tiny_engine(family).with_settings(**SMALL)
    cat = engine.introduce("Chelsea", [photo(1)], keywords="tabby cat", area_pct=8)
    mug = engine.introduce("Mug", [photo(2), photo(3)], keywords="white mug", area_pct=3)
    rocket = engine.introduce("Rocket", [photo(4)], keywords="rocket", area_pct=15)
    requests = [
        AnswerRequest("Is Chelsea in this photo?", (cat,), image=photo(5), max_new_tokens=7),
        AnswerRequest(
            "What happens in this clip, and where is the mug that Chelsea likes to sit next to?",
            (cat, mug),
            video=clip(6),
            max_new_tokens=11,
        ),
        AnswerRequest("Hi", (), max_new_tokens=4),
        AnswerRequest("Which of them is here?", (mug, rocket, cat), image=photo(7, size=(240, 160)), max_new_tokens=9),
        AnswerRequest("Describe it.", (), image=photo(8), max_new_tokens=6),
    ]
    with pytest.MonkeyPatch.context() as patch:
        logits = record_logits(patch, engine)
        lone = [alone(engine, r) for r in requests]
    _LONE_LOGITS[family] = [steps[0] for steps in logits]
    _SETUPS[family] = engine, (cat, mug, rocket), requests, lone
    return _SETUPS[family]


def record_logits(monkeypatch, engine) -> list[torch.Tensor]:
    """Until `monkeypatch` is undone, each `engine.model.generate` call also records its logits at every step
    ([B, steps, V], before any logits processor); generate still returns its tokens as the engine expects."""
    seen, original = [], engine.model.generate

    def recording(**kwargs):
        out = original(**kwargs, output_logits=True, return_dict_in_generate=True)
        seen.append(torch.stack(out.logits, dim=1))
        return out.sequences

    monkeypatch.setattr(engine.model, "generate", recording)
    return seen


def assert_rows_score_as_alone(rows: torch.Tensor, lone: list[torch.Tensor]) -> None:
    """Each batched row's logits [steps, V] at every step of its answer alone equal those alone (the later steps
    of a row that ended are padding)."""
    for row, own in enumerate(lone):
        difference = (rows[row, : own.shape[0]] - own).abs().max().item()
        assert difference <= LOGIT_TOLERANCE, f"row {row}: logits {difference:.2g} from the same question alone"


@contextlib.contextmanager
def language_model_inputs(engine):
    """Inside the block, the keyword arguments of every call of the language model: what the model's forward
    hands it after scattering the visual features into `inputs_embeds` [B, L, D] (and, on Qwen3-VL, with the
    deepstack features per visual position, `deepstack_visual_embeds` at `visual_pos_masks`)."""
    seen: list[dict] = []
    handle = engine.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    try:
        yield seen
    finally:
        handle.remove()


def alone(engine, request: AnswerRequest):
    return engine.answer(
        request.question,
        request.concepts,
        image=request.image,
        video=request.video,
        max_new_tokens=request.max_new_tokens,
    )


def test_every_batched_answer_equals_the_same_question_asked_alone(setup, monkeypatch):
    engine, _, requests, lone = setup
    logits = record_logits(monkeypatch, engine)
    # Some staged beforehand (`Ego.stage`, as the Space's scheduler does in each visitor's thread), some not.
    batched = engine.answer_batch([engine.stage(r) if index % 2 else r for index, r in enumerate(requests)])
    assert [str(a) for a in batched] == [str(a) for a in lone]
    # and each row scores every token as alone: its own photo or clip, memories and question
    assert_rows_score_as_alone(logits[0], _LONE_LOGITS[engine.family])
    # their tokens too, which a conversation that adopts the answer continues from; a stream's last answer has them
    assert [a.token_ids for a in batched] == [a.token_ids for a in lone] and all(a.token_ids for a in lone)
    r = requests[1]
    streamed = list(engine.stream_answer(r.question, r.concepts, video=r.video, max_new_tokens=r.max_new_tokens))
    assert streamed[-1].token_ids == lone[1].token_ids and streamed[0].token_ids == ()
    for a, b in zip(batched, lone):
        assert (a.concepts_used, a.context_tokens, a.memory_tokens) == (
            b.concepts_used,
            b.context_tokens,
            b.memory_tokens,
        )
        assert [name for name, _ in a.similarity] == [name for name, _ in b.similarity]
        assert np.allclose([s for _, s in a.similarity], [s for _, s in b.similarity], atol=1e-5)
    # the same questions in another order and another grouping answer the same
    reordered = engine.answer_batch(requests[::-1][:2])
    assert [str(a) for a in reordered] == [str(a) for a in lone[::-1][:2]]
    assert_rows_score_as_alone(logits[-1], _LONE_LOGITS[engine.family][::-1][:2])


def test_each_row_gets_only_its_own_memories_and_photo_and_no_padding(setup, monkeypatch):
    engine, concepts, requests, _ = setup
    calls = spy_on_generate(monkeypatch, engine)
    with language_model_inputs(engine) as forwarded:
        engine.answer_batch(requests)
    (kwargs,) = calls
    embeds, mask, ids = kwargs["inputs_embeds"], kwargs["attention_mask"], kwargs["input_ids"]  # [B, L, D], [B, L]
    placeholder = engine.backend.placeholder_id
    # the prefill's language-model inputs: each visual placeholder replaced by a visual feature
    prefill = forwarded[0]
    assert prefill["inputs_embeds"].shape == embeds.shape
    config = engine.model.config
    visual_ids = [getattr(config, name, None) for name in ("image_token_id", "video_token_id")]
    visual = torch.isin(ids, torch.tensor([i for i in visual_ids if isinstance(i, int)]))  # [B, L]
    deepstack = _per_position(prefill.get("deepstack_visual_embeds"), prefill.get("visual_pos_masks"))
    every_row = {c.name: c.embeddings.to(embeds.dtype) for c in concepts}  # [K_c, D] each
    for row, request in enumerate(requests):
        real = mask[row].bool()
        # left padding: the row's real tokens are one block at the end, and they are this request's context
        assert real[real.nonzero()[0, 0] :].all() and real[-1]
        lone = engine._prepare_answer(
            request.question, request.concepts, request.image, request.video, request.max_new_tokens
        )
        assert torch.equal(ids[row][real], lone.generate["input_ids"][0])
        # the row's photo or clip is its own: the features of the vision tower's run on it alone, in order
        if request.image is None and request.video is None:
            assert not visual[row].any()
        else:
            own = engine.backend.encode_vision(lone.encoded)  # [N, D]
            assert own.shape[0] and torch.equal(prefill["inputs_embeds"][row][visual[row]], own.to(embeds.dtype))
            levels = engine.backend.residual_rows(lone.encoded)  # Qwen3-VL: [levels, N, D] of a photo
            if levels is not None:
                assert torch.equal(deepstack[:, row][:, visual[row]], levels.to(embeds.dtype))
        mine = torch.cat([c.embeddings for c in request.concepts]).to(embeds.dtype) if request.concepts else None
        slots = ids[row] == placeholder
        if mine is None:
            assert not slots.any()
        else:
            assert torch.equal(embeds[row][slots], mine)
        # no memory row of a concept this visitor did not give appears anywhere in their row
        for name, rows in every_row.items():
            if name in {c.name for c in request.concepts}:
                continue
            hits = (embeds[row][:, None, :] == rows[None]).all(dim=-1)  # [L, K_c]
            assert not hits.any(), (row, name)


def _per_position(features: list[torch.Tensor] | None, where: torch.Tensor | None) -> torch.Tensor | None:
    """Qwen3-VL's deepstack features, given per level for the positions of `where` (bool [B, L]) in row-major
    order, as [levels, B, L, D] (zeros elsewhere); None for a family without them."""
    if features is None or where is None:
        return None
    out = features[0].new_zeros(len(features), *where.shape, features[0].shape[-1])
    for level, rows in enumerate(features):
        out[level][where] = rows
    return out


def test_a_stop_ends_only_its_own_answer(one_family):
    engine, _, requests, lone = one_family
    stops = [threading.Event() for _ in requests]
    seen: dict[int, list[str]] = {i: [] for i in range(len(requests))}
    tokens_seen = []

    def on_text(index, answer):
        seen[index].append(str(answer))
        if index == 1 and len(seen[1]) == 2:
            tokens_seen.append(len(answer.token_ids))
            stops[1].set()

    batched = engine.answer_batch(requests, stops=stops, on_text=on_text)
    cut = str(batched[1])
    assert str(lone[1]).startswith(cut) and cut != str(lone[1])
    # it ends with the tokens it had when its Stop came, the ones the visitor saw: not the token generated after
    # (nor the padding generate adds while the other rows run on), which a conversation adopting it would continue
    assert batched[1].token_ids == lone[1].token_ids[: tokens_seen[0]]
    assert cut == seen[1][1].strip()
    assert [answer.stopped for answer in batched] == [index == 1 for index in range(len(batched))]
    assert [str(a) for i, a in enumerate(batched) if i != 1] == [str(a) for i, a in enumerate(lone) if i != 1]
    # streaming: each request's text grows piece by piece into its final answer
    for index, texts in seen.items():
        assert texts, index
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
        assert texts[-1].strip() == str(batched[index])


def test_a_bad_question_fails_alone(one_family):
    engine, (cat, _, _), requests, lone = one_family
    mixed = [
        requests[0],
        AnswerRequest("   ", (cat,), image=photo(5)),
        requests[2],
        AnswerRequest("Hi?", (), image=photo(0), video=clip(1)),
        AnswerRequest("Hi?", (), image=photo(0), max_new_tokens="many"),  # a caller's mistake, not an InputError
    ]
    results = engine.answer_batch(mixed)
    assert isinstance(results[1], InputError) and isinstance(results[3], InputError)
    assert isinstance(results[4], (TypeError, ValueError))
    assert [str(results[0]), str(results[2])] == [str(lone[0]), str(lone[2])]


def test_collate_pads_on_the_left_and_concatenates_per_image_inputs():
    short = dict(
        input_ids=torch.tensor([[5, 6]]),
        attention_mask=torch.ones(1, 2, dtype=torch.long),
        inputs_embeds=torch.ones(1, 2, 3),
        image_grid_thw=torch.tensor([[1, 2, 2]]),
        max_new_tokens=4,
        do_sample=False,
    )
    long = dict(
        input_ids=torch.tensor([[7, 8, 9]]),
        attention_mask=torch.ones(1, 3, dtype=torch.long),
        inputs_embeds=2 * torch.ones(1, 3, 3),
        image_grid_thw=torch.tensor([[1, 4, 4]]),
        max_new_tokens=9,
        do_sample=False,
    )
    merged = collate([short, long], pad_id=0)
    assert merged["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert merged["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert merged["inputs_embeds"][0, 0].tolist() == [0, 0, 0] and merged["inputs_embeds"][1, 0].tolist() == [2, 2, 2]
    assert merged["image_grid_thw"].tolist() == [[1, 2, 2], [1, 4, 4]]
    assert merged["max_new_tokens"] == 9 and merged["do_sample"] is False
    padded = collate([short, long], pad_id=0, min_padding=1)  # every row starts with padding, the longest too
    assert padded["input_ids"].tolist() == [[0, 0, 5, 6], [0, 7, 8, 9]]
    assert padded["attention_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    with pytest.raises(ValueError, match="share do_sample"):
        collate([short, dict(long, do_sample=True)], pad_id=0)


def test_a_batched_answer_so_far_holds_its_tokens_and_never_half_a_character():
    """What a visitor sees as the batch goes on, and what a conversation adopts after a Stop, is exactly what the
    model generated so far: its text with its tokens, a character split across two tokens shown once whole."""
    from conftest import bigram_engine

    engine = bigram_engine("qwen2-vl", "café", whole=True)
    tokenizer = engine.backend.tokenizer
    assert len(tokenizer("café", add_special_tokens=False).input_ids) > len("café")  # "é" is two tokens here
    requests = [AnswerRequest("What is this?", (), image=photo(0), max_new_tokens=8)] * 2
    seen = []
    answers = engine.answer_batch(requests, on_text=lambda index, answer: seen.append(answer))
    assert [str(a) for a in answers] == ["café", "café"]
    assert seen and not any("\ufffd" in str(a) for a in seen)
    assert all(tokenizer.decode(a.token_ids, skip_special_tokens=True) == str(a) for a in seen)


def test_a_request_that_runs_out_of_memory_fails_alone(monkeypatch):
    """One visitor's clip too large for the GPU while it is prepared: that visitor is told, the others answered."""
    from ego import ModelBusyError

    engine = tiny_engine("qwen2-vl")
    prepare = engine._prepared  # the model's part of the preparation (the vision tower, the memory rows)

    def prepare_or_run_out(staged):
        if staged.query.text == "And this huge clip?":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return prepare(staged)

    monkeypatch.setattr(engine, "_prepared", prepare_or_run_out)
    requests = [
        AnswerRequest("What is this?", (), image=photo(0), max_new_tokens=4),
        AnswerRequest("And this huge clip?", (), image=photo(1), max_new_tokens=4),
    ]
    small, huge = engine.answer_batch(requests)
    assert isinstance(huge, ModelBusyError) and "ran out of memory" in str(huge)
    monkeypatch.undo()
    assert str(small) == str(engine.answer("What is this?", image=photo(0), max_new_tokens=4))


def test_a_stop_that_comes_as_the_answer_ends_is_no_stop():
    """Stop pressed as the last word was shown: the step that notices it is the one that ended the answer, which is
    whole, not cut short (it would show "(stopped)" in every later view)."""
    engine = bigram_engine("qwen2.5-vl", "Hi.")
    stop = threading.Event()

    def on_text(index, answer):
        if str(answer) == "Hi.":
            stop.set()

    (answer,) = engine.answer_batch([AnswerRequest("Who?", max_new_tokens=20)], stops=[stop], on_text=on_text)
    assert str(answer) == "Hi." and stop.is_set() and not answer.stopped


def test_batch_arguments_that_do_not_fit_are_a_sentence_before_anything_runs():
    from ego.batching import FollowUpRequest

    engine, other = tiny_engine("qwen2.5-vl"), tiny_engine("qwen2-vl")
    requests = [AnswerRequest("Hi?", max_new_tokens=2), AnswerRequest("Hello?", max_new_tokens=2)]
    with pytest.raises(ValueError, match="stops has 1 events for 2 requests"):
        engine.answer_batch(requests, stops=[None])
    with pytest.raises(TypeError, match="Each request is an ego.batching.AnswerRequest; got tuple"):
        engine.answer_batch([("Hi?", ())])
    # A conversation of another model is that request's error; the others are answered.
    mine, theirs = engine.chat(image=photo(1)), other.chat(image=photo(1))
    for chat in (mine, theirs):
        chat.ask("Hi?", max_new_tokens=2)
    answered, refused = engine.follow_up_batch([FollowUpRequest(mine, "And?", 2), FollowUpRequest(theirs, "And?", 2)])
    assert isinstance(answered, str) and isinstance(refused, ValueError) and "not one of this engine's" in str(refused)


@contextlib.contextmanager
def processor_calls(engine):
    """Inside the block, the prompts the engine's processor is run on (`Backend.encode`), in order."""
    seen, encode = [], engine.backend.encode

    def counting(prompt, *args, **kwargs):
        seen.append(prompt)
        return encode(prompt, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.backend, "encode", counting)
        yield seen


def test_staged_requests_leave_only_model_work_to_the_models_turn(one_family):
    """`Ego.stage` does a question's checks, photo or clip and processor work before the model's turn: the batch
    then runs no processor, and answers as alone. With more concepts than fit and a photo, the vision tower ranks
    them in the model's turn: only the context's prompt, known then, goes through the processor there."""
    engine, (cat, mug, rocket), requests, lone = one_family
    staged = [engine.stage(r) for r in requests]
    assert all(r.staged is not None for r in staged) and engine.stage(staged[0]) is staged[0]
    with processor_calls(engine) as seen:
        batched = engine.answer_batch(staged)
    assert seen == [] and [a.token_ids for a in batched] == [a.token_ids for a in lone]
    # The vision tower's outputs (on the model's device) went into copies: the requests hold none afterwards.
    assert all(r.staged.encoded.encoder_outputs is None for r in staged)

    two = engine.with_settings(max_concepts_in_context=2)
    ranked = AnswerRequest("Is the rocket here?", (cat, mug, rocket), image=photo(9), max_new_tokens=5)
    named = AnswerRequest("Where is the rocket?", (cat, mug, rocket), max_new_tokens=5)  # no photo: by name
    expected = [alone(two, r) for r in (ranked, named)]
    with processor_calls(two) as seen:
        ready = [two.stage(ranked), two.stage(named)]
    assert len(seen) == 2 and "Chelsea" not in seen[0]  # the ranking prompt: the photo and the question
    assert "Rocket" in seen[1] and len(ready[1].staged.selection.kept) == 2
    with processor_calls(two) as seen:
        answered = two.answer_batch(ready)
    assert [a.token_ids for a in answered] == [a.token_ids for a in expected]
    assert [a.concepts_used for a in answered] == [a.concepts_used for a in expected]
    kept = answered[0].concepts_used
    assert len(seen) == 1 and len(kept) == 2 and all(f"{name}:" in seen[0] for name in kept)  # the ranked context


def test_staging_refuses_bad_input_at_once_and_takes_only_this_engines_work(one_family):
    """`Ego.stage` refuses a question's bad input as `answer` would, in the caller's thread; work staged by another
    engine, by this model with other settings, or for another conversation is refused, not answered with."""
    engine, (cat, *_), requests, _ = one_family
    with pytest.raises(InputError):
        engine.stage(AnswerRequest("   ", (cat,), image=photo(1), max_new_tokens=4))
    with pytest.raises(InputError, match="one image or one video"):
        engine.stage(AnswerRequest("Hi?", image=photo(1), video=clip(1), max_new_tokens=4))
    with pytest.raises(TypeError, match="AnswerRequest or FollowUpRequest; got str"):
        engine.stage("Hi?")
    other = tiny_engine("qwen2-vl").with_settings(**SMALL)
    theirs = other.stage(AnswerRequest("Hi?", max_new_tokens=2))
    with pytest.raises(ValueError, match="stage it here"):
        engine.answer_batch([theirs])
    with pytest.raises(ValueError, match="stage it here"):
        engine.stage(theirs)
    # The same model with other settings (another choice of concepts, another photo size) stages its own.
    one = engine.with_settings(max_concepts_in_context=1)
    with pytest.raises(ValueError, match="stage it here"):
        one.answer_batch([engine.stage(requests[0])])
    # A follow-up's staging is its own conversation's.
    from ego.batching import FollowUpRequest

    chats = [engine.chat([cat], image=photo(1)) for _ in range(2)]
    for chat in chats:
        chat.ask("Hi?", max_new_tokens=2)
        chat.drop_cache()
    staged = engine.stage(FollowUpRequest(chats[0], "And?", 2))
    assert staged.staged.pixels
    with pytest.raises(ValueError, match="stage it here"):
        engine.follow_up_batch([FollowUpRequest(chats[1], "And?", 2, staged=staged.staged)])
    with pytest.raises(InputError):
        engine.stage(FollowUpRequest(chats[0], "   ", 2))  # its question, checked as it is staged


@pytest.mark.parametrize("asking", ["answer", "chat"])
def test_a_question_is_prepared_while_another_call_holds_the_model(one_family, asking):
    """`Ego.answer` (and a conversation's first question) run the processor before they wait for the model: a
    server's other threads prepare their questions while one holds it."""
    engine, (cat, *_), _, _ = one_family
    holding, release, answered = threading.Event(), threading.Event(), []

    def another_caller():
        with engine.exclusive_use():
            holding.set()
            release.wait(timeout=60)

    def ask():
        if asking == "answer":
            answered.append(engine.answer("Is Chelsea here?", [cat], image=photo(3), max_new_tokens=3))
        else:
            answered.append(engine.chat([cat], image=photo(3)).ask("Is Chelsea here?", max_new_tokens=3))

    holder = threading.Thread(target=another_caller, daemon=True)
    holder.start()
    assert holding.wait(timeout=30)
    with processor_calls(engine) as seen:
        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(seen) == 1 and not answered  # prepared, not answered: the model is still held
        release.set()
        asker.join(timeout=60)
    assert len(answered) == 1 and len(seen) == 1
