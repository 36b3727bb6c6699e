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


def test_a_torchao_quantized_model_runs_the_method_and_decodes_compiled_as_eager():
    """torchao's int4 kernels run only on CUDA; its int8 weight-only runs on a CPU through the same transformers
    integration, as the same kind of weights (torchao tensor subclasses in the language model's linear layers).
    With it the engine's own paths are checked here on such weights: the attention capture and the size question
    of an introduction, the memories as soft prompts, and the compiled decode step."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForImageTextToText, TorchAoConfig

    from ego import Ego, Settings
    from ego.attention import ATTENTION_NAME
    from ego.decoding import compile_counts
    from ego.random_models import tiny_checkpoint

    plain = tiny_engine("qwen2.5-vl")
    backend = type(plain.backend)
    config = TorchAoConfig(quant_type=Int8WeightOnlyConfig(), modules_to_not_convert=list(backend.unquantized_modules))
    model = AutoModelForImageTextToText.from_pretrained(
        tiny_checkpoint("qwen2.5-vl", 0),
        dtype=torch.float32,
        device_map={"": "cpu"},
        attn_implementation={"text_config": ATTENTION_NAME, "vision_config": "sdpa"},  # as Ego.from_pretrained
        quantization_config=config,
    ).eval()
    assert type(model.model.language_model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert type(model.model.visual.blocks[0].mlp.up_proj.weight) is torch.nn.Parameter
    engine = Ego(
        model,
        plain.processor,
        family=plain.family,
        backend_cls=backend,
        model_id=plain.model_id,
        layers=plain.layers,
        settings=Settings(decoding="eager", compile_backend="aot_eager"),
    )

    def method():
        concept = engine.introduce("Chelsea", [photo(0)], keywords=["cat"])
        answer = engine.answer("Is Chelsea here?", [concept], image=photo(1), max_new_tokens=6)
        return concept, answer

    eager_concept, eager_answer = method()
    assert 1 <= eager_concept.views[0].k <= 50 and eager_answer.concepts_used == ("Chelsea",)
    engine.set_decoding("compiled")
    before = compile_counts()["graphs"]
    engine.warm_up()
    assert engine.decoder.mode == "compiled" and compile_counts()["graphs"] > before  # compiled on those weights
    compiled_concept, compiled_answer = method()
    assert compiled_concept.views[0].description == eager_concept.views[0].description
    assert compiled_concept.views[0].size_answer == eager_concept.views[0].size_answer
    assert torch.equal(compiled_concept.views[0].token_indices, eager_concept.views[0].token_indices)
    assert compiled_answer.token_ids == eager_answer.token_ids
