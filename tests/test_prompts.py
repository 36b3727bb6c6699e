"""Reading the model's answers: the size estimate and the keywords."""

import pytest
from conftest import tiny_engine

from ego import prompts
from ego.engine import keyword_positions, memory_size


@pytest.mark.parametrize("answer, expected", [
    ("About 35%.", 35.0),
    ("35", 35.0),
    ("35-40 percent", 37.5),
    ("Between 20 and 30%", 20.0),  # "20 and 30" is not a range the parser knows: first number wins
    ("roughly 10 to 20 %", 15.0),
    ("The subject covers 0.35 of the image.", 35.0),
    ("It covers 250% of the frame", 100.0),
    ("0%", 1.0),
    ("The dog covers most of the image", 70.0),
    ("It fills almost all of the picture.", 90.0),
    ("About half.", 50.0),
    ("A small part of the photo", 10.0),
    ("The whole image", 100.0),
])
def test_size_answers_are_understood(answer, expected):
    assert prompts.parse_area_pct(answer) == expected


@pytest.mark.parametrize("answer", ["", "banana", "I cannot tell.", "<|im_end|>"])
def test_unreadable_size_answers_give_none(answer):
    assert prompts.parse_area_pct(answer) is None


def test_unreadable_size_falls_back_to_the_cap():
    from ego import DEFAULT_SETTINGS

    # The documented fallback: alpha = 100 %, so K_c = min(K, N_r).
    assert memory_size(DEFAULT_SETTINGS.area_pct_fallback, 256, 50) == 50
    assert memory_size(DEFAULT_SETTINGS.area_pct_fallback, 30, 50) == 30


@pytest.mark.parametrize("area, n_r, cap, expected", [
    (100, 256, 50, 50), (10, 256, 50, 26), (1, 256, 50, 3), (1, 40, 50, 1), (0.5, 10, 50, 1), (50, 1, 50, 1),
    (25, 10, 50, 3),  # 2.5 rounds half up
])
def test_eq4(area, n_r, cap, expected):
    assert memory_size(area, n_r, cap) == expected


def test_content_words_drop_punctuation_stopwords_and_photo_talk():
    text = "The image shows a fluffy tabby cat with green eyes, sitting on the red chair."
    assert prompts.content_words(text) == ["fluffy", "tabby", "cat", "green", "eyes", "sitting", "red", "chair"]


def test_keyword_tokens_spell_exactly_the_content_words():
    tokenizer = tiny_engine("qwen2-vl").backend.tokenizer
    text = "A red ceramic mug with a handle."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    positions, words = keyword_positions(tokenizer, ids, content_only=True)
    assert words == ["red", "ceramic", "mug", "handle"]
    spelled = "".join(tokenizer.decode([ids[i]]) for i in positions).split()
    assert spelled == ["red", "ceramic", "mug", "handle"]


def test_description_without_content_words_falls_back_to_all_words_then_all_tokens():
    tokenizer = tiny_engine("qwen2-vl").backend.tokenizer
    ids = tokenizer("it is the one.", add_special_tokens=False).input_ids
    positions, words = keyword_positions(tokenizer, ids, content_only=True)
    assert words == ["it", "is", "the", "one"] and len(positions) == 4
    punctuation = tokenizer("...", add_special_tokens=False).input_ids
    positions, words = keyword_positions(tokenizer, punctuation, content_only=True)
    assert positions == list(range(len(punctuation))) and words == []


def test_neutralize_breaks_every_special_token():
    specials = ["<|im_end|>", "<|vision_pad|>"]
    text = prompts.neutralize("hi <|im_end|> and <|vision_pad|>", specials)
    assert all(s not in text for s in specials)
    assert text.replace("\u200b", "") == "hi <|im_end|> and <|vision_pad|>"
