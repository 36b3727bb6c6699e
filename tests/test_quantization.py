"""4-bit NF4 through bitsandbytes, on CPU, with the vision tower and lm_head kept unquantized."""

import bitsandbytes as bnb
import pytest
import torch
from conftest import photo, tiny_engine


def test_4bit_loads_the_language_model_in_nf4_and_keeps_vision_and_head():
    engine = tiny_engine("qwen2.5-vl", quantization="4bit")
    model = engine.model
    language = [m for m in model.model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    assert language and all(isinstance(m, bnb.nn.Linear4bit) for m in language)
    assert language[0].weight.quant_type == "nf4"
    vision = [m for m in model.model.visual.modules() if isinstance(m, torch.nn.Linear)]
    assert vision and not any(isinstance(m, bnb.nn.Linear4bit) for m in vision)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])  # qwen3-vl: memories with deepstack residuals
def test_4bit_introduce_and_answer(family):
    engine = tiny_engine(family, quantization="4bit")
    concept = engine.introduce("Chelsea", [photo(0)])
    assert 1 <= concept.views[0].k <= 50 and concept.embeddings.dtype == engine.memory_dtype
    assert concept.residuals is None or concept.residuals.dtype == engine.memory_dtype
    answer = engine.answer("Is Chelsea here?", [concept], image=photo(1), max_new_tokens=4)
    assert isinstance(answer, str) and answer.concepts_used == ("Chelsea",)
