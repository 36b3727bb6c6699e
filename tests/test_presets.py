"""Presets and the layers L."""

import json
import re

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


def test_bad_layers_are_refused_before_the_weights_load(tmp_path, monkeypatch):
    """The layers are checked against the config: a wrong index or file costs no model load (minutes for 14B)."""
    from transformers import AutoModelForImageTextToText

    def loads(*args, **kwargs):
        raise AssertionError("the weights were loaded before the layers were checked")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", loads)
    with pytest.raises(ValueError, match="between 0 and 3"):
        Ego.from_pretrained("tiny-qwen2-vl", layers=[99])
    with pytest.raises(ValueError, match="not a layers file"):
        Ego.from_pretrained("tiny-qwen2-vl", layers=tmp_path / "missing.json")


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


@pytest.mark.parametrize(
    "name, suggestion",
    [("qwen25-vl-7b", "qwen2.5-vl-7b"), ("tiny-qwen2.5", "tiny-qwen2.5-vl"), ("internvl-14b", "internvl3-14b")],
)
def test_a_mistyped_preset_is_refused_before_anything_loads(name, suggestion):
    """Neither a preset, a folder nor a Hub id: a sentence with the closest presets, not a failed download."""
    from ego import Ego
    from ego.presets import PRESETS, check_model_name

    assert suggestion in PRESETS
    with pytest.raises(ValueError, match=f"did you mean {re.escape(suggestion)}"):
        check_model_name(name)
    with pytest.raises(ValueError, match="is not a preset, a folder on this machine or a Hub id"):
        Ego.from_pretrained(name)


def test_presets_folders_and_hub_ids_pass_the_name_check(tmp_path):
    from ego.presets import check_model_name

    for name in ("qwen2.5-vl-7b", " Tiny-Qwen2-VL ", "Qwen/Qwen2.5-VL-7B-Instruct", "OpenGVLab/InternVL3-8B-hf"):
        check_model_name(name)
    check_model_name(tmp_path)
    check_model_name(str(tmp_path))
    for name in ("./no/such/folder", "/no/such/folder", "no-such-model"):
        with pytest.raises(ValueError, match="the presets are"):
            check_model_name(name)


def test_tiny_names_the_families_it_knows():
    from ego import Ego

    with pytest.raises(ValueError, match="no tiny 'qwen2.5' model; the families are qwen2-vl, qwen2.5-vl"):
        Ego.tiny("qwen2.5")
    with pytest.raises(ValueError, match="no tiny 'qwen2.5-vl-7b' model"):
        Ego.tiny("qwen2.5-vl-7b")
