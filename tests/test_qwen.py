"""ego/backends/qwen.py: Qwen3-VL memories carry the deepstack features of their kept tokens, and the
language model adds them at the memory's positions as it adds an image's own at the image's positions."""

from __future__ import annotations

import pytest
import torch
from conftest import photo, reference_inputs, spy_on_generate, tiny_engine

from ego.memory import Concept


class _DeepstackRecorder:
    """Records what the language model's decoder receives for deepstack on every call. Registered after
    the engine's own pre-hook, so it sees the arguments as the decoder layers will."""

    def __init__(self, engine):
        self.calls = []
        module = engine.model.model.language_model
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        mask, features = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        self.calls.append(
            {
                "length": kwargs["inputs_embeds"].shape[1],
                "mask": None if mask is None else mask.clone(),
                "features": None if features is None else [f.detach().clone() for f in features],
            }
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_a_qwen3_memory_keeps_the_deepstack_features_of_its_kept_tokens():
    engine = tiny_engine("qwen3-vl")
    pictures = [photo(3), photo(4, size=(200, 260))]
    concept = engine.introduce("Chelsea", pictures, area_pct=30)
    levels = len(engine.model.config.vision_config.deepstack_visual_indexes)
    assert levels >= 1 and concept.residuals is not None
    assert tuple(concept.residuals.shape) == (levels, concept.num_tokens, engine.hidden_size)
    expected = []
    for picture, view in zip(pictures, concept.views):
        inputs = reference_inputs(engine, picture)
        with torch.no_grad():
            out = engine.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], return_dict=True
            )
        per_level = torch.stack([level[0] for level in out.deepstack_features])  # [levels, N_r, D]
        expected.append(per_level[:, view.token_indices])
    torch.testing.assert_close(concept.residuals, torch.cat(expected, dim=1).to(concept.residuals.dtype))
    assert concept.nbytes == (concept.embeddings.numel() + concept.residuals.numel()) * 4


def test_families_without_deepstack_keep_no_residuals():
    for family in ("qwen2-vl", "qwen2.5-vl", "internvl3"):
        engine = tiny_engine(family)
        assert engine.backend.residual_levels == 0
        assert engine.introduce("Chelsea", [photo(1)], area_pct=10).residuals is None


@pytest.mark.parametrize("medium", ["image", "video"])
def test_the_model_adds_memory_residuals_at_the_slots_and_the_images_own_at_its_tokens(medium, monkeypatch):
    engine = tiny_engine("qwen3-vl")
    concepts = [
        engine.introduce(name, [photo(i)], keywords="subject", area_pct=area)
        for i, (name, area) in enumerate([("Chelsea", 10), ("my mug", 4)])
    ]
    frames = torch.randint(0, 255, (4, 64, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    query = {"image": photo(9)} if medium == "image" else {"video": frames.numpy()}
    with _DeepstackRecorder(engine) as plain:  # no memory: the model's own deepstack input for the query
        engine.answer("Who is here?", max_new_tokens=3, **query)
    generate_calls = spy_on_generate(monkeypatch, engine)
    with _DeepstackRecorder(engine) as recorded:
        engine.answer("Who is here?", concepts, max_new_tokens=3, **query)
    ids = generate_calls[0]["input_ids"][0]
    prefill, *decoding = recorded.calls
    slots = ids == engine.backend.placeholder_id
    image = ids == getattr(engine.model.config, f"{medium}_token_id")
    assert prefill["length"] == ids.numel() and int(slots.sum()) == sum(c.num_tokens for c in concepts)
    assert prefill["mask"][0].tolist() == (slots | image).tolist()
    joint = slots | image
    for level, features in enumerate(prefill["features"]):
        assert features.shape == (int(joint.sum()), engine.hidden_size)
        memory = torch.cat([c.residuals[level] for c in concepts])
        torch.testing.assert_close(features[slots[joint]], memory.to(features.dtype))
        torch.testing.assert_close(features[image[joint]], plain.calls[0]["features"][level])
    # Decoding steps feed one token each and get nothing added: the memory is in the cache already.
    assert decoding and all(c["length"] == 1 and c["mask"] is None and c["features"] is None for c in decoding)


def test_without_an_image_the_memory_is_the_only_visual_input(monkeypatch):
    engine = tiny_engine("qwen3-vl")
    concept = engine.introduce("Chelsea", [photo(2)], keywords="cat", area_pct=8)
    generate_calls = spy_on_generate(monkeypatch, engine)
    with _DeepstackRecorder(engine) as recorded:
        engine.answer("Tell me about Chelsea.", [concept], max_new_tokens=2)
    ids = generate_calls[0]["input_ids"][0]
    prefill = recorded.calls[0]
    slots = ids == engine.backend.placeholder_id
    assert prefill["mask"][0].tolist() == slots.tolist()
    for level, features in enumerate(prefill["features"]):
        torch.testing.assert_close(features, concept.residuals[level].to(features.dtype))


def test_residuals_change_the_answer_and_a_memory_without_them_still_works(monkeypatch):
    """The residuals reach the model's computation (the logits move), and a Qwen3-VL memory that has none
    (made before they were kept) is answered with zeros there, like the plain soft prompt."""
    engine = tiny_engine("qwen3-vl")
    concept = engine.introduce("Chelsea", [photo(6)], keywords="cat", area_pct=20)
    bare = Concept(concept.name, concept.embeddings, concept.model_id, concept.views)
    first_step_logits, original = [], engine.model.generate

    def generate_with_logits(**kwargs):
        out = original(**kwargs, output_logits=True, return_dict_in_generate=True)
        first_step_logits.append(out.logits[0])
        return out.sequences

    with monkeypatch.context() as patch:
        patch.setattr(engine.model, "generate", generate_with_logits)
        for memory in (concept, bare):
            engine.answer("Is Chelsea here?", [memory], image=photo(7), max_new_tokens=1)
    logits = dict(zip(("with", "without"), first_step_logits))
    assert not torch.allclose(logits["with"], logits["without"])
    zeros = concept.residuals.new_zeros(concept.residuals.shape)
    zeroed = Concept(concept.name, concept.embeddings, concept.model_id, concept.views, residuals=zeros)
    query = photo(7)
    assert engine.answer("Is Chelsea here?", [bare], image=query, max_new_tokens=4) == engine.answer(
        "Is Chelsea here?", [zeroed], image=query, max_new_tokens=4
    )


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_a_clip_of_one_frame_is_answered_as_that_frame_twice(family):
    """One frame is less than a temporal patch (2 frames): Qwen2/2.5's processor pads it by repeating it, Qwen3-VL's
    refuses it. The backend repeats it first, so every family answers, and as about the frame shown twice."""
    import numpy as np

    from ego.media import load_video

    engine = tiny_engine(family)
    frame = np.asarray(photo(4, size=(96, 128)))
    once = load_video(frame[None], engine.settings)
    twice = load_video(np.stack([frame, frame]), engine.settings)
    assert once[0].shape[0] == 1
    answer = engine.answer("What happens?", video=once, max_new_tokens=6)
    assert answer.token_ids == engine.answer("What happens?", video=twice, max_new_tokens=6).token_ids
