"""Each rule of the method pinned on its own, recomputed here rather than read back from what the engine stored.

Random weights say nothing useful, so where a rule needs the model to say something (the size answer), the
test writes a tiny model's weights so that its greedy answer is known (`conftest.bigram_engine`).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import bigram_engine, generate_call, photo, sharpen_attention, tiny_engine
from transformers import AutoModelForImageTextToText

from ego import prompts
from ego.memory import Concept
from ego.random_models import tiny_checkpoint


def eq4(area_pct: float, n_r: int, cap: int) -> int:
    """K_c = max(1, round(min(K, alpha * N_r / 100))), halves up, written again here."""
    return max(1, math.floor(min(cap, area_pct * n_r / 100) + 0.5))


# --- alpha: the parsed size answer, or the flagged fallback ---------------------------------------------------
def test_alpha_is_the_models_size_answer():
    engine = bigram_engine("internvl3", "5%").with_settings(description_max_new_tokens=6)
    concept = engine.introduce("Mug", [photo(1)])
    view = concept.views[0]
    config = engine.model.config
    # One 448 px tile, 14 px patches, pixel shuffle 0.5: the number of visual tokens, from the config alone.
    tile, patch = (
        torch.tensor(config.vision_config.image_size).flatten()[0].item(),
        torch.tensor(config.vision_config.patch_size).flatten()[0].item(),
    )
    n_r = round((tile / patch) ** 2 * config.downsample_ratio**2)
    assert view.size_answer == "5%"
    assert (view.area_pct, view.area_source) == (5.0, "model")
    assert view.k == eq4(5, n_r, engine.settings.k_cap_tokens) == concept.embeddings.shape[0]
    assert view.k < engine.settings.k_cap_tokens  # the fallback (100 %) would give the cap


def test_a_size_answer_cut_inside_a_number_falls_back_and_says_so():
    engine = bigram_engine("internvl3", "5", repeat_last=True).with_settings(
        description_max_new_tokens=4, size_max_new_tokens=4
    )
    view = engine.introduce("Mug", [photo(1)]).views[0]
    assert view.size_answer == "5555"
    assert (view.area_pct, view.area_source) == (engine.settings.area_pct_fallback, "truncated")
    assert view.k == engine.settings.k_cap_tokens


# --- each view's K_c from its own N_r ---------------------------------------------------------------------
def test_each_view_keeps_tokens_in_proportion_to_its_own_visual_tokens():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    engine = tiny_engine("qwen2-vl")
    pictures = [photo(1, size=(300, 451)), photo(2, size=(160, 640))]
    concept = engine.introduce("Poster", pictures, area_pct=10)
    factor = 28  # 14 px patches, 2x2 merge
    expected_n_r = []
    for picture in pictures:
        # Resized to the reference budget's area whatever their size (both are smaller: enlarged), as the paper's
        # fixed 448x448 input; N_r still follows each view's own grid.
        budget = engine.settings.reference_max_pixels
        height, width = smart_resize(picture.height, picture.width, factor=factor, min_pixels=budget, max_pixels=budget)
        expected_n_r.append(height * width // factor**2)
    assert expected_n_r[0] != expected_n_r[1]
    expected_k = [eq4(10, n_r, engine.settings.k_cap_tokens) for n_r in expected_n_r]
    assert expected_k[0] != expected_k[1]
    assert [view.k for view in concept.views] == expected_k
    assert concept.embeddings.shape[0] == sum(expected_k)


# --- the context: each name, then exactly its own slots holding its own rows; memory, query, question ---------
def _concepts(engine) -> list[Concept]:
    return [engine.introduce("Chelsea", [photo(1)], area_pct=2), engine.introduce("Rex", [photo(2)], area_pct=6)]


@pytest.mark.parametrize("family", ["qwen2.5-vl", "internvl3"])
def test_each_name_is_followed_by_exactly_its_own_memory(family):
    engine = tiny_engine(family)
    concepts = _concepts(engine)
    assert concepts[0].num_tokens != concepts[1].num_tokens
    generate = generate_call(engine, "Who is here?", concepts, image=photo(5))
    ids = generate["input_ids"][0].tolist()
    embeds = generate["inputs_embeds"][0]
    tokenizer, pad = engine.backend.tokenizer, engine.backend.placeholder_id
    opening = tokenizer(engine.backend.memory_open, add_special_tokens=False).input_ids
    for concept in concepts:
        name = tokenizer(f"{concept.name}: ", add_special_tokens=False).input_ids
        marker = name + opening
        starts = [i for i in range(len(ids)) if ids[i : i + len(marker)] == marker]
        assert len(starts) == 1, concept.name
        first = starts[0] + len(marker)
        run = 0
        while ids[first + run] == pad:
            run += 1
        assert run == concept.num_tokens, concept.name
        held = embeds[first : first + run].float().cpu()
        assert torch.equal(held, concept.embeddings.to(embeds.dtype).float()), concept.name


@pytest.mark.parametrize("family", ["qwen2.5-vl", "internvl3"])
def test_the_memory_precedes_the_query_image_and_the_question_follows_it(family):
    engine = tiny_engine(family)
    concepts = _concepts(engine)
    question = "Is Rex on the sofa?"
    generate = generate_call(engine, question, concepts, image=photo(5))
    ids = generate["input_ids"][0].tolist()
    config = engine.model.config
    image_id = getattr(config, "image_token_id", None)
    image_id = image_id if image_id is not None else config.image_token_index
    slots = [i for i, t in enumerate(ids) if t == engine.backend.placeholder_id]
    image = [i for i, t in enumerate(ids) if t == image_id]
    assert slots and image
    assert max(slots) < min(image)
    text_after = engine.backend.tokenizer.decode(ids[max(image) + 1 :])
    assert question in text_after


# --- Qwen: the memory slots' M-RoPE positions -------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_memory_slots_have_consecutive_text_positions_and_the_image_grid_comes_after(family):
    engine = tiny_engine(family)
    concepts = _concepts(engine)
    generate = generate_call(engine, "Who is here?", concepts, image=photo(5))
    input_ids = generate["input_ids"]
    positions, _ = engine.model.model.get_rope_index(
        input_ids,
        generate["mm_token_type_ids"],
        image_grid_thw=generate["image_grid_thw"],
        attention_mask=generate["attention_mask"],
    )  # [3, 1, L]
    positions = positions[:, 0].cpu()
    ids = input_ids[0].cpu()
    slots = (ids == engine.backend.placeholder_id).nonzero().squeeze(1)
    image = (ids == engine.model.config.image_token_id).nonzero().squeeze(1)
    for run_start, concept in zip(_runs(slots), concepts):
        run = torch.arange(run_start, run_start + concept.num_tokens)
        slot_positions = positions[:, run]  # [3, K_c]
        # Text positions: the three axes agree, and each slot is one step after the previous token.
        assert torch.equal(slot_positions[0], slot_positions[1]) and torch.equal(slot_positions[0], slot_positions[2])
        assert torch.equal(slot_positions[0], positions[0, run_start - 1] + 1 + torch.arange(concept.num_tokens))
    grid = positions[:, image]  # [3, N]
    assert int(grid.min()) > int(positions[:, slots].max())
    rows, cols = engine.backend.grid(
        engine.backend.encode(
            engine.backend.chat_text([{"type": "image"}]),
            image=photo(5),
            image_max_pixels=engine.settings.query_image_max_pixels,
            video_frame_max_pixels=engine.settings.video_frame_max_pixels,
        )
    )
    # The image's tokens spread over a 2-D grid: rows x cols distinct (height, width) positions.
    assert len({(int(h), int(w)) for h, w in zip(grid[1], grid[2])}) == rows * cols


def _runs(indices: torch.Tensor) -> list[int]:
    """The first index of each run of consecutive indices."""
    values = indices.tolist()
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v - 1]


# --- Eq. 3 with a margin: peaked attention, keyword positions known without the engine's helper ---------------
@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl3"])
def test_eq3_scores_match_eager_attention_far_beyond_the_tolerance(family):
    # The description is "the mop." one token per character, so its keyword tokens are known by construction:
    # "mop" is the only content word (offsets 4, 5, 6); the paper's keywords add "the" (0, 1, 2).
    says = "the mop."
    engine = bigram_engine(family, says).with_settings(description_max_new_tokens=12, size_max_new_tokens=2)
    sharpen_attention(engine.model, 30.0)
    picture = photo(4)
    view = engine.introduce("Mop", [picture]).views[0]
    assert view.description == says and view.keywords == ("mop",)

    eager = AutoModelForImageTextToText.from_pretrained(
        tiny_checkpoint(family), attn_implementation="eager", dtype=torch.float32
    ).eval()
    eager.load_state_dict(engine.model.state_dict())
    text = engine.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompts.DESCRIBE_PROMPT}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = engine.backend.encode(
        text,
        image=picture,
        image_max_pixels=engine.settings.reference_max_pixels,
        video_frame_max_pixels=engine.settings.video_frame_max_pixels,
        one_view=True,  # as a reference
    ).inputs
    start = inputs["input_ids"].shape[1]
    description = [engine.backend.tokenizer(ch, add_special_tokens=False).input_ids[0] for ch in says]
    ids = torch.cat([inputs["input_ids"], torch.tensor([description])], dim=1)
    grown = ids.shape[1] - start
    forward = {}
    for key, value in inputs.items():
        if key == "input_ids":
            continue
        if torch.is_tensor(value) and value.dim() == 2 and value.shape[0] == 1 and key.endswith(("mask", "_ids")):
            value = torch.cat([value, value.new_full((1, grown), 1 if key == "attention_mask" else 0)], dim=1)
        forward[key] = value
    with torch.no_grad():
        out = eager(input_ids=ids, **forward, output_attentions=True)
    image_id = getattr(eager.config, "image_token_id", None)
    columns = (ids[0] == (image_id if image_id is not None else eager.config.image_token_index)).nonzero().squeeze(1)

    def eq3(offsets):
        rows = torch.tensor([start + i for i in offsets])
        block = torch.stack([out.attentions[layer][0] for layer in engine.layers])[:, :, rows][:, :, :, columns]
        n_layers, n_heads, n_words, _ = block.shape  # [|L|, H, N_w, N_r]
        return block.sum(dim=(0, 1, 2)) / (n_layers * n_heads * n_words)

    expected = eq3([4, 5, 6])
    tolerance = dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(view.scores, expected, **tolerance)
    # The margin: the scores differ far beyond the tolerance, so a constant vector or the wrong keyword
    # tokens (every word, or every token) cannot pass.
    assert float(expected.max() - expected.min()) > 1000 * tolerance["atol"]
    for wrong in ([0, 1, 2, 4, 5, 6], list(range(len(says)))):
        assert not torch.allclose(view.scores, eq3(wrong), **tolerance)
    assert not torch.allclose(view.scores, torch.full_like(expected, float(expected.mean())), **tolerance)
    paper = engine.with_settings(keywords_drop_stopwords=False).introduce("Mop", [picture]).views[0]
    assert paper.keywords == ("the", "mop")
    torch.testing.assert_close(paper.scores, eq3([0, 1, 2, 4, 5, 6]), **tolerance)
