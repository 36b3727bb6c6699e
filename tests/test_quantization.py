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


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl3"])
@pytest.mark.parametrize("quantization", ["4bit", "8bit", "int4", "fp8"])
def test_every_quantization_converts_exactly_the_language_models_linear_layers(family, quantization):
    """transformers' own quantizer, given our config, picks its modules on the model's skeleton (meta device, no
    weights): the language model's linear layers and nothing else, so the vision tower, the projector and the
    output head stay in the model's dtype under int4 and fp8 too (they load only on a GPU: this is what a CPU
    can check of them)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.quantizers import AutoHfQuantizer

    from ego.backends import backend_for_model_type
    from ego.quantization import loaded_quantization, quantization_config
    from ego.random_models import tiny_checkpoint

    config = AutoConfig.from_pretrained(tiny_checkpoint(family, 0))
    _, backend = backend_for_model_type(config.model_type)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    language = model.get_decoder()
    expected = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(module is m for m in language.modules())
    }
    quantizer = AutoHfQuantizer.from_config(
        quantization_config(quantization, backend.unquantized_modules, torch.bfloat16), pre_quantized=False
    )
    quantizer.preprocess_model(model, dtype=torch.bfloat16, device_map={"": "cpu"}, checkpoint_files=None)
    chosen = {
        name
        for name, _ in model.named_parameters()
        if name.endswith(".weight") and quantizer.param_needs_quantization(model, name)
    }
    assert expected and chosen == expected
    model.hf_quantizer = quantizer
    assert loaded_quantization(model) == quantization


@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_gpu_only_quantizations_are_refused_on_a_cpu_before_anything_loads(quantization, monkeypatch):
    from transformers import AutoModelForImageTextToText

    from ego import Ego

    def never(*args, **kwargs):
        raise AssertionError("nothing should load")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", never)
    with pytest.raises(ValueError, match='runs only on a CUDA GPU.*use quantization="4bit"'):
        Ego.tiny("qwen2.5-vl", quantization=quantization, device="cpu")


def test_the_loaded_quantization_is_read_off_the_model():
    from ego.quantization import loaded_quantization

    assert loaded_quantization(tiny_engine("qwen2.5-vl", quantization="4bit").model) == "4bit"
    assert loaded_quantization(tiny_engine("qwen2.5-vl").model) is None
