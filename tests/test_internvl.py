"""InternVL3 backend specifics (the generic method is tested in test_engine.py for every family)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import photo, spy_on_generate, tiny_engine

from ego import IncompatibleMemoryError, load_concepts, save_concepts
from ego.backends import backend_for_family, backend_for_model_type
from ego.backends.internvl import InternVLBackend
from ego.presets import PAPER_LAYERS, depth_scaled_layers, resolve


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("internvl3")


def _ids(engine, token):
    return engine.backend.tokenizer.convert_tokens_to_ids(token)


def _encode(engine, image=None, video=None, max_pixels=None):
    block = [{"type": "image"}] if image is not None else [{"type": "video"}]
    return engine.backend.encode(
        engine.backend.chat_text(block + [{"type": "text", "text": "What is this?"}]),
        image=image,
        video=video,
        image_max_pixels=max_pixels or engine.settings.reference_max_pixels,
        video_frame_max_pixels=engine.settings.video_frame_max_pixels,
    )


def test_registry_presets_and_module_paths(engine):
    assert backend_for_family("internvl3") is InternVLBackend
    assert backend_for_model_type("internvl") == ("internvl3", InternVLBackend)
    assert type(engine.model).__name__ == "InternVLForConditionalGeneration"
    assert type(engine.processor).__name__ == "InternVLProcessor"
    assert type(engine.processor.image_processor).__name__ == "GotOcr2ImageProcessor"
    assert type(engine.processor.video_processor).__name__ == "InternVLVideoProcessor"
    for path in InternVLBackend.unquantized_modules:  # full module paths that exist
        engine.model.get_submodule(path)
    text = engine.model.config.text_config
    assert text._attn_implementation == "ego_capture"
    assert engine.model.config.vision_config._attn_implementation == "sdpa"
    layers = engine.model.model.language_model.layers
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(text.num_hidden_layers))

    preset = resolve("internvl3-14b")
    assert preset.model_id == "OpenGVLab/InternVL3-14B-hf" and preset.family == "internvl3"
    assert preset.layers == PAPER_LAYERS == (29, 30, 35, 36, 39) and "0-based" in preset.layers_note
    for name in ("internvl3-8b", "internvl3-2b", "internvl3-1b"):
        assert resolve(name).family == "internvl3" and resolve(name).layers is None
    assert depth_scaled_layers(28) == (17, 18, 20, 21, 23)  # InternVL3-8B / 2B depth
    assert engine.layers == depth_scaled_layers(4) and resolve("tiny-internvl3").tiny


def test_placeholder_is_a_real_unexpanded_special_token(engine):
    backend = engine.backend
    assert backend.placeholder_token == "<|vision_pad|>"
    assert backend.placeholder_id not in (None, backend.tokenizer.unk_token_id)
    assert backend.placeholder_id != engine.model.config.image_token_id
    text = backend.chat_text([{"type": "text", "text": "<img>" + "<|vision_pad|>" * 7 + "</img> and"}])
    encoded = backend.encode(text, image_max_pixels=1, video_frame_max_pixels=1)
    ids = encoded.inputs["input_ids"][0]
    assert int((ids == backend.placeholder_id).sum()) == 7  # not expanded, one token each
    assert encoded.visual_columns.numel() == 0
    # Strings the processor would expand are neutralised in visitor text.
    for special in ("<IMG_CONTEXT>", "<video>", "<img>", "</img>", "<|vision_pad|>"):
        assert special in backend.special_strings


def test_placeholder_falls_back_for_vocabularies_without_vision_pad():
    from ego.backends.internvl import pick_placeholder
    from ego.random_models.tokenizer import build_tokenizer

    internlm_like = build_tokenizer(
        [
            "<s>",
            "</s>",
            "<|im_start|>",
            "<|im_end|>",
            "<img>",
            "</img>",
            "<IMG_CONTEXT>",
            "<quad>",
            "</quad>",
            "<ref>",
            "</ref>",
            "<box>",
            "</box>",
        ],
        chat_template="",
        eos_token="<|im_end|>",
        pad_token="</s>",
    )
    assert pick_placeholder(internlm_like, exclude={"<IMG_CONTEXT>", "<img>", "</img>"}) == "<quad>"
    with pytest.raises(ValueError, match="placeholder"):
        pick_placeholder(internlm_like, exclude={"<quad>", "<ref>", "<box>"})


def test_reference_image_is_one_tile_of_256_tokens(engine):
    encoded = _encode(engine, image=photo(0))
    assert tuple(encoded.inputs["pixel_values"].shape) == (1, 3, 448, 448)
    assert encoded.visual_columns.numel() == 256
    assert engine.backend.grid(encoded) == (16, 16)
    ids = encoded.inputs["input_ids"][0]
    first, last = int(encoded.visual_columns[0]), int(encoded.visual_columns[-1])
    assert last - first == 255  # contiguous
    assert ids[first - 1] == _ids(engine, "<img>") and ids[last + 1] == _ids(engine, "</img>")
    rows = engine.backend.encode_vision(encoded)
    assert tuple(rows.shape) == (256, engine.hidden_size)
    kwargs = engine.backend.generate_kwargs(encoded)
    assert "pixel_values" not in kwargs and set(kwargs["mm_encoder_outputs"]) == {"image"}


def test_a_reference_stays_one_tile_whatever_its_pixel_budget(engine):
    """A reference photo is one 448x448 view on one 16x16 grid, also with a budget that would tile a query."""
    larger = engine.with_settings(reference_max_pixels=4 * 448 * 448)
    reference = larger.encode_reference(photo(0))
    assert tuple(reference.encoded.inputs["pixel_values"].shape) == (1, 3, 448, 448)
    assert reference.grid == (16, 16) and reference.rows.shape[0] == 256


def test_query_image_tiles_follow_the_pixel_budget(engine):
    one = _encode(engine, image=photo(1), max_pixels=448 * 448)
    assert one.visual_columns.numel() == 256
    tiled = _encode(engine, image=photo(1), max_pixels=4 * 448 * 448)
    tiles = tiled.inputs["pixel_values"].shape[0]
    assert 2 < tiles <= 5  # up to 4 tiles + the global thumbnail
    assert tiled.visual_columns.numel() == 256 * tiles
    assert engine.backend.encode_vision(tiled).shape[0] == 256 * tiles


def test_video_frames_use_the_native_video_path(engine):
    frames = np.random.RandomState(0).randint(0, 255, (3, 90, 120, 3)).astype(np.uint8)
    encoded = _encode(engine, video=(frames, {"total_num_frames": 3}))
    assert encoded.inputs["pixel_values"].shape[0] == 3
    assert encoded.visual_columns.numel() == 3 * 256
    text = engine.backend.tokenizer.decode(encoded.inputs["input_ids"][0])
    assert "Frame1: <img>" in text and "Frame3: <img>" in text


def test_memory_rows_reach_the_llm_input_embeddings(engine, monkeypatch):
    concept = engine.introduce("Chelsea", [photo(0)], keywords="tabby, green eyes", area_pct=10)
    assert concept.num_tokens == 26  # round(min(50, 10% of 256))
    generate_calls = spy_on_generate(monkeypatch, engine)
    seen = []

    def grab(module, args, kwargs):
        if not seen:
            seen.append(kwargs["inputs_embeds"].detach().clone())

    handle = engine.model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        engine.answer("Is Chelsea here?", [concept], image=photo(1), max_new_tokens=3)
    finally:
        handle.remove()
    generate = generate_calls[0]
    embeds, ids = seen[0][0], generate["input_ids"][0]
    slots = (ids == engine.backend.placeholder_id).nonzero().squeeze(1)
    assert slots.numel() == 26 and int(slots[-1] - slots[0]) == 25
    assert ids[slots[0] - 1] == _ids(engine, "<img>") and ids[slots[-1] + 1] == _ids(engine, "</img>")
    torch.testing.assert_close(embeds[slots], concept.embeddings.to(embeds.dtype))
    image = ids == engine.model.config.image_token_id
    features = generate["mm_encoder_outputs"]["image"].pooler_output
    torch.testing.assert_close(embeds[image], features.reshape(-1, features.shape[-1]).to(embeds.dtype))
    text = ~image
    text[slots] = False
    torch.testing.assert_close(embeds[text], engine.model.get_input_embeddings()(ids[text]))


def test_size_question_on_the_cache_matches_a_fresh_prefill(engine):
    """The engine's continuation (KV cache, no pixels, no encoder outputs) sees what a full prefill sees."""
    backend = engine.backend
    encoded = _encode(engine, image=photo(2))
    backend.encode_vision(encoded)
    prompt = encoded.inputs["input_ids"]
    kwargs = backend.generate_kwargs(encoded)
    from ego.engine import _extend

    with torch.no_grad():
        out = engine.model.generate(
            input_ids=prompt, **kwargs, do_sample=False, max_new_tokens=4, return_dict_in_generate=True
        )
        sequence = torch.cat([out.sequences, torch.tensor([[_ids(engine, "<|im_end|>"), 11, 12]])], dim=1)
        cached = _extend(kwargs, sequence.shape[1])
        cached.pop("mm_encoder_outputs")
        warm = engine.model.generate(
            input_ids=sequence,
            **cached,
            past_key_values=out.past_key_values,
            do_sample=False,
            max_new_tokens=1,
            output_scores=True,
            return_dict_in_generate=True,
        )
        fresh = engine.model.generate(
            input_ids=sequence,
            **_extend(kwargs, sequence.shape[1]),
            do_sample=False,
            max_new_tokens=1,
            output_scores=True,
            return_dict_in_generate=True,
        )
    torch.testing.assert_close(warm.scores[0], fresh.scores[0], atol=1e-4, rtol=1e-4)


def test_answers_with_image_video_and_odd_text(engine):
    concept = engine.introduce("Chelsea", [photo(0)], keywords="tabby", area_pct=5)
    answer = engine.answer("Is Chelsea <video> here <IMG_CONTEXT>?", [concept], image=photo(1), max_new_tokens=3)
    assert answer.memory_tokens == concept.num_tokens and answer.concepts_used == ("Chelsea",)
    frames = np.random.RandomState(1).randint(0, 255, (10, 60, 80, 3)).astype(np.uint8)
    video = engine.answer("What does <img> Chelsea do?", [concept], video=frames, max_new_tokens=3)
    assert video.context_tokens > engine.settings.video_num_frames * 256


def test_introduce_with_the_models_own_description(engine):
    concept = engine.introduce("Mug", [photo(3)])
    view = concept.views[0]
    assert view.grid == (16, 16) and view.scores.shape == (256,)
    assert view.keywords_source == "model" and view.description
    assert 1 <= concept.num_tokens <= 50


def test_memories_do_not_cross_families(engine, tmp_path):
    qwen = tiny_engine("qwen2-vl")
    mine = engine.introduce("Chelsea", [photo(0)], keywords="tabby", area_pct=5)
    theirs = qwen.introduce("Chelsea", [photo(0)], keywords="tabby", area_pct=5)
    assert mine.embeddings.shape[1] == theirs.embeddings.shape[1]  # same width: only the model id tells
    save_concepts(tmp_path / "internvl.safetensors", [mine])
    save_concepts(tmp_path / "qwen.safetensors", [theirs])
    with pytest.raises(IncompatibleMemoryError):
        load_concepts(tmp_path / "internvl.safetensors", qwen)
    with pytest.raises(IncompatibleMemoryError):
        load_concepts(tmp_path / "qwen.safetensors", engine)
    assert load_concepts(tmp_path / "internvl.safetensors", engine)[0].name == "Chelsea"
    with pytest.raises(IncompatibleMemoryError):
        engine.answer("Is Chelsea here?", [theirs], image=photo(1), max_new_tokens=2)


def test_4bit_on_cpu():
    import bitsandbytes as bnb

    quantized = tiny_engine("internvl3", quantization="4bit")
    model = quantized.model
    four_bit = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert four_bit and all(name.startswith("model.language_model.") for name in four_bit)
    for path in InternVLBackend.unquantized_modules:
        module = model.get_submodule(path)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules()), path
    concept = quantized.introduce("Chelsea", [photo(0)], keywords="tabby", area_pct=20)
    assert concept.embeddings.dtype == quantized.memory_dtype and concept.num_tokens == 50  # min(50, 20% of 256)
    answer = quantized.answer("Is Chelsea here?", [concept], image=photo(1), max_new_tokens=3)
    assert answer.memory_tokens == concept.num_tokens
