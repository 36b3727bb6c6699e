"""Presets and the layers L."""

import json

import pytest
from conftest import tiny_engine

from ego import PRESETS, Ego
from ego.presets import PAPER_LAYERS, depth_scaled_layers


def test_paper_depth_gives_the_paper_layers():
    assert depth_scaled_layers(48) == PAPER_LAYERS


@pytest.mark.parametrize("depth", [2, 4, 24, 28, 36, 64])
def test_depth_scaled_layers_keep_relative_depth(depth):
    layers = depth_scaled_layers(depth)
    assert all(0 <= layer < depth for layer in layers) and list(layers) == sorted(set(layers))
    for layer in layers:  # each is the nearest layer to one of the paper's, at the same relative depth
        assert any(abs(layer - paper * depth / 48) <= 0.5 for paper in PAPER_LAYERS)


def test_qwen25_vl_7b_default_layers():
    assert depth_scaled_layers(28) == (17, 18, 20, 21, 23)


def test_every_real_preset_names_a_hub_checkpoint_and_a_known_family():
    from ego.backends import families

    for preset in PRESETS.values():
        assert preset.family in families()
        assert preset.tiny or "/" in preset.model_id
    assert PRESETS["qwen2.5-vl-7b"].model_id == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert PRESETS["internvl3-14b"].layers == PAPER_LAYERS


def test_layers_from_a_calibration_file(tmp_path):
    path = tmp_path / "layers.json"
    path.write_text(json.dumps({"model_id": "tiny-qwen2-vl", "layers": [0, 3]}))
    engine = Ego.from_pretrained("tiny-qwen2-vl", layers=path)
    assert engine.layers == (0, 3)
    with pytest.raises(ValueError, match="between 0 and 3"):
        Ego.from_pretrained("tiny-qwen2-vl", layers=[7])
    refused = {  # what the file is: (its content, the refusal's words)
        "another model's file": ({"model_id": "big", "layers": [1, 2], "num_layers": 48, "images": 9}, "48 decoder"),
        "a file of no scored image": ({"layers": [0, 1], "num_layers": 4, "images": 0}, "no scored image"),
        "layers that are not a list": ({"layers": "12"}, "not a layers file"),
        "fractional layers": ({"layers": [1.9, 2.7]}, "whole numbers"),
        "true for a layer": ({"layers": [True]}, "whole numbers"),
    }
    for document, words in refused.values():
        path.write_text(json.dumps(document))
        with pytest.raises(ValueError, match=words):
            Ego.from_pretrained("tiny-qwen2-vl", layers=path)
    assert tiny_engine("qwen2-vl").layers == depth_scaled_layers(4)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_layers_note_and_the_header_say_whether_the_layers_are_calibrated(name):
    from ego.presets import layers_summary

    preset = PRESETS[name]
    if preset.layers is None:
        assert "depth-scaled, not calibrated" in preset.layers_note
        assert "not calibrated" in layers_summary(name)
    else:
        assert "calibration" in preset.layers_note and "not calibrated" not in layers_summary(name)


def test_a_model_outside_the_presets_is_said_to_be_depth_scaled():
    from ego.presets import UNCALIBRATED, layers_summary

    assert "not calibrated" in layers_summary("someone/Some-VL-7B") and "depth-scaled, not calibrated" in UNCALIBRATED
    assert "not calibrated" in tiny_engine("qwen2-vl").layers_note


@pytest.mark.parametrize("cuda, expected", [(True, "qwen2.5-vl-7b"), (False, "qwen2-vl-2b")])
def test_the_default_model_follows_the_machine(monkeypatch, cuda, expected):
    import torch

    from ego.presets import default_preset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert default_preset() == expected
    preset = PRESETS[expected]
    assert not preset.tiny and preset.model_id.startswith("Qwen/")  # a real checkpoint, never the tiny model
