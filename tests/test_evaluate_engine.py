"""The engine settings Table 3 compares (which tokens a memory keeps, and how many) really change the kept
tokens, on a tiny Qwen2.5-VL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import photo, tiny_engine

from ego.engine import select_tokens


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("qwen2.5-vl")


@pytest.fixture(scope="module")
def picture():
    return photo(3, size=(224, 224))


def _introduce(engine, picture, area_pct=40.0, **changes):
    return engine.with_settings(**changes).introduce("cup", [picture], keywords=["red", "cup"], area_pct=area_pct)


def test_attention_selection_keeps_the_top_scores(engine, picture):
    view = _introduce(engine, picture).views[0]
    n_r = view.scores.numel()
    expected_k = max(1, int(np.floor(min(engine.settings.k_cap_tokens, 0.40 * n_r) + 0.5)))
    order = np.argsort(-view.scores.numpy(), kind="stable")[:expected_k]
    assert view.k == expected_k and view.token_indices.tolist() == sorted(order.tolist())


def test_uniform_selection_keeps_evenly_spaced_tokens(engine, picture):
    attention = _introduce(engine, picture).views[0]
    concept = _introduce(engine, picture, memory_selection="uniform")
    view = concept.views[0]
    n_r, k = view.scores.numel(), attention.k
    assert view.k == k and concept.num_tokens == k
    assert view.token_indices.tolist() == [round(i * (n_r - 1) / (k - 1)) for i in range(k)]
    assert view.token_indices.tolist() != attention.token_indices.tolist()


def test_whole_image_keeps_every_token(engine, picture):
    concept = _introduce(engine, picture, memory_selection="whole_image")
    view = concept.views[0]
    rows, cols = view.grid
    assert view.k == rows * cols == concept.num_tokens == view.scores.numel()
    assert view.token_indices.tolist() == list(range(rows * cols))
    reference_rows = engine.encode_reference(picture).rows.detach().cpu().to(concept.embeddings.dtype)
    assert torch.equal(concept.embeddings, reference_rows)


def test_fixed_size_rule_ignores_the_subject_size(engine, picture):
    small = _introduce(engine, picture, area_pct=2.0).views[0]
    fixed = _introduce(engine, picture, area_pct=2.0, memory_size_rule="fixed").views[0]
    n_r = small.scores.numel()
    assert small.k == max(1, round(0.02 * n_r))
    assert fixed.k == min(n_r, engine.settings.k_cap_tokens) > small.k


def test_unknown_selection_is_refused():
    with pytest.raises(ValueError, match="memory_selection"):
        select_tokens(torch.rand(10), 3, "random")


@pytest.mark.parametrize("lines", ["none", "append", "only"])
def test_keywords_in_memory_put_the_keywords_in_the_concepts_lines(engine, picture, lines):
    cup = _introduce(engine, picture)
    mug = engine.with_settings().introduce("mug", [photo(4, size=(224, 224))], keywords=["white", "mug"], area_pct=20)
    asking = engine.with_settings(memory_keywords=lines)
    prepared = asking._prepare_answer("Is the cup here?", [cup, mug], photo(5), None, 4)
    ids = prepared.generate["input_ids"][0]
    placeholders = ids == engine.backend.placeholder_id
    text = engine.backend.tokenizer.decode(ids[~placeholders])
    visual = f"{engine.backend.memory_open}{engine.backend.memory_close}"
    expected = {
        "none": [f"cup: {visual}\n", f"mug: {visual}\n"],
        "append": [f"cup: {visual} red, cup\n", f"mug: {visual} white, mug\n"],
        "only": ["cup: red, cup\n", "mug: white, mug\n"],
    }[lines]
    assert "".join(expected) in text
    rows = torch.cat([cup.embeddings, mug.embeddings]) if lines != "only" else cup.embeddings[:0]
    embeds = prepared.generate["inputs_embeds"][0]
    assert prepared.memory_tokens == int(placeholders.sum()) == rows.shape[0]
    assert torch.equal(embeds[placeholders], rows.to(embeds.dtype))
    answer = asking.answer("Is the cup here?", [cup, mug], image=photo(5), max_new_tokens=3)
    assert answer.memory_tokens == rows.shape[0] and answer.concepts_used == ("cup", "mug")


def test_unknown_keywords_in_memory_are_refused():
    from ego import Settings

    with pytest.raises(ValueError, match="memory_keywords"):
        Settings(memory_keywords="both")
