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
