"""ego/random_models: random-weight models of the real classes (tiny ones for the tests, real-size ones for the
benchmark), built offline."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, photo

from ego.backends import backend_for_family, families
from ego.random_models import BUILDERS, build_random
from ego.random_models.architectures import (
    ARCHITECTURES,
    MARKER,
    architecture,
    build_skeleton,
    cached_random_architecture,
    overrides,
    random_architecture,
)

STAGES = {"encode_s", "description_s", "size_s", "scores_s", "selection_s"}


def test_every_family_has_a_builder_and_no_backend_builds_models():
    assert sorted(BUILDERS) == sorted(families()) == sorted(FAMILIES)
    for family in families():
        assert not hasattr(backend_for_family(family), "build_random")
    with pytest.raises(ValueError, match="known: qwen2-vl"):
        build_random("llava")


def test_build_random_takes_real_dimension_overrides():
    model, processor = build_random(
        "internvl3",
        {
            "text_config": {
                "hidden_size": 96,
                "intermediate_size": 160,
                "num_hidden_layers": 3,
                "num_attention_heads": 6,
                "num_key_value_heads": 2,
            },
            "vision_config": {
                "hidden_size": 80,
                "intermediate_size": 96,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "image_size": 224,
            },
        },
    )
    config = model.config
    assert config.text_config.num_hidden_layers == 3 and config.text_config.hidden_size == 96
    assert config.vision_config.hidden_size == 80 and tuple(config.vision_config.image_size) == (224, 224)
    assert config.image_seq_length == processor.image_seq_length == 64  # (224 / 14)^2 / 4
    assert model.model.multi_modal_projector.linear_1.in_features == 80 * 4
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")


# --------------------------------------------------------------------------------------------------
# ego.random_models.architectures
# --------------------------------------------------------------------------------------------------
def test_a_skeleton_puts_only_its_own_parameters_on_the_meta_device():
    model, _ = build_skeleton("qwen2-vl-2b", text_layers=1, vision_depth=1)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # nothing left patched after the build


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_recorded_architecture_has_the_published_size(name):
    arch = architecture(name)
    model, _ = build_skeleton(name)  # meta device: no memory
    text, vision = model.config.get_text_config(), model.config.vision_config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    ):
        assert getattr(text, key) == arch.text_config[key], key
    for key, value in arch.vision_config.items():
        assert getattr(vision, key) == value, key
    assert model.config.tie_word_embeddings == arch.tie_word_embeddings
    assert model.get_input_embeddings().weight.shape == (arch.vocab_size, arch.hidden_size)
    # The dimensions reproduce the checkpoint's published parameter count (within 0.5 %).
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(arch.params_b, rel=5e-3)


def test_overrides_cut_depth_and_keep_index_lists_inside():
    cut = overrides("qwen2.5-vl-7b", text_layers=2, vision_depth=1)
    assert cut["text_config"]["num_hidden_layers"] == 2 and cut["vision_config"]["depth"] == 1
    assert cut["vision_config"]["fullatt_block_indexes"] == [0]
    assert overrides("qwen3-vl-8b", vision_depth=10)["vision_config"]["deepstack_visual_indexes"] == [8]
    assert overrides("qwen2.5-vl-7b")["text_config"] == architecture("qwen2.5-vl-7b").text_config
    with pytest.raises(ValueError):
        architecture("qwen9-vl-1b")


def test_scaled_down_real_architecture_loads_and_introduces(tmp_path):
    from ego import Ego, Settings
    from ego.memory import local_model_id

    name = "qwen2-vl-2b"  # the smallest real vocabulary x hidden size: 0.47 GB of bf16 weights with 1 layer
    arch = architecture(name)
    folder = random_architecture(name, tmp_path / "arch", text_layers=1, vision_depth=1)
    config = json.loads((folder / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"], text["vocab_size"]) == (
        arch.hidden_size,
        arch.text_config["num_attention_heads"],
        arch.text_config["num_key_value_heads"],
        arch.vocab_size,
    )
    assert text["num_hidden_layers"] == 1 and vision["depth"] == 1
    assert (vision["embed_dim"], vision["num_heads"], vision["hidden_size"]) == (1280, 16, arch.hidden_size)
    assert config["tie_word_embeddings"] is True
    marker = json.loads((folder / MARKER).read_text())
    assert marker["preset"] == name and marker["scaled_down"] is True

    engine = Ego.from_pretrained(
        str(folder),
        device="cpu",
        quantization=None,
        settings=Settings(description_max_new_tokens=2, size_max_new_tokens=1),
    )
    # Special-token ids come from the offline tokenizer, as for the tiny models.
    assert config["image_token_id"] == engine.backend.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert engine.memory_dtype == torch.bfloat16 and engine.num_layers == 1
    assert engine.model_id == local_model_id(folder) and str(folder.parent) not in engine.model_id
    assert engine.model.get_input_embeddings().weight.shape == (arch.vocab_size, arch.hidden_size)
    concept = engine.introduce("Chelsea", photo(0, size=(224, 224)))
    assert concept.embeddings.shape[1] == arch.hidden_size and 1 <= concept.num_tokens <= 50
    assert set(concept.views[0].timings_s) == STAGES

    # The same build in the same folder is reused, not rebuilt.
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert cached_random_architecture(name, folder, text_layers=1, vision_depth=1) == folder
    assert weights.stat().st_mtime_ns == stamp
