"""ego/backends: one registry of families, and the interface every family implements."""

import pytest
from conftest import FAMILIES, photo, tiny_engine

from ego import prompts
from ego.backends import Backend, backend_for_family, backend_for_model_type, families


def test_the_families_come_from_the_backend_classes():
    assert families() == FAMILIES
    for family in families():
        cls = backend_for_family(family)
        for model_type in cls.model_types[family]:
            assert backend_for_model_type(model_type) == (family, cls)
    with pytest.raises(ValueError, match="known families: qwen2-vl"):
        backend_for_family("llava")


def test_a_backend_must_implement_the_family_specific_parts():
    class Partial(Backend):
        placeholder_token = "<|vision_pad|>"

        def encode(self, text, **kwargs):
            raise AssertionError("never called")

    with pytest.raises(TypeError, match="encode_vision"):
        Partial(None, None, "partial")


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_gets_the_vision_outputs_instead_of_the_pixels_once_they_are_kept(family):
    backend = tiny_engine(family).backend
    encoded = backend.encode(
        backend.chat_text([{"type": "image"}, {"type": "text", "text": prompts.DESCRIBE_PROMPT}]),
        image=photo(1),
        image_max_pixels=448 * 448,
        video_frame_max_pixels=448 * 448,
    )
    before = backend.generate_kwargs(encoded)
    assert "pixel_values" in before and "input_ids" not in before and "mm_encoder_outputs" not in before
    backend.encode_vision(encoded)
    after = backend.generate_kwargs(encoded)
    assert "pixel_values" not in after and set(after["mm_encoder_outputs"]) == {"image"}
    assert after["attention_mask"].device == backend.model.get_input_embeddings().weight.device


@pytest.mark.parametrize("family", FAMILIES)
def test_video_frames_one_or_three_pixels_high_keep_their_colours(family):
    """A clip of one colour stays three values (one per channel) after the processor, however thin its frames:
    frames 1 or 3 pixels high are not mistaken for channels first."""
    import numpy as np
    import torch

    from ego.media import load_video

    engine = tiny_engine(family)
    text = engine.backend.chat_text([{"type": "video"}, {"type": "text", "text": "What happens?"}])
    values = {}
    for height in (1, 3, 4):
        frames = np.empty((2, height, 20, 3), np.uint8)
        frames[...] = (200, 10, 60)
        encoded = engine.backend.encode(
            text, video=load_video(frames), image_max_pixels=448 * 448, video_frame_max_pixels=448 * 448
        )
        pixels = next(v for k, v in encoded.inputs.items() if k.startswith("pixel_values"))
        values[height] = torch.unique(pixels).tolist()
    assert len(values[4]) == 3
    assert values[1] == values[3] == values[4]
