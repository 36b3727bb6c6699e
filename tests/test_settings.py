"""ego/settings.py: the values each choice accepts are named once, and the modules that use them agree."""

from __future__ import annotations

import pytest

from ego import prompts, settings
from ego.settings import DEFAULT_SETTINGS, Settings


def test_the_memory_wordings_are_the_ones_prompts_has_text_for():
    assert sorted(prompts.MEMORY_PROMPTS) == sorted(settings.MEMORY_PROMPTS)


@pytest.mark.parametrize(
    "field, accepted",
    [
        ("memory_prompt", settings.MEMORY_PROMPTS),
        ("system_prompt", settings.SYSTEM_PROMPTS),
        ("decoding", settings.DECODING_MODES),
        ("memory_keywords", settings.MEMORY_KEYWORDS),
        ("memory_selection", settings.MEMORY_SELECTIONS),
        ("memory_size_rule", settings.MEMORY_SIZE_RULES),
    ],
)
def test_each_choice_takes_its_values_and_names_them_when_refused(field, accepted):
    for value in accepted:
        assert getattr(Settings(**{field: value}), field) == value
    with pytest.raises(ValueError, match=f"{field} must be one of") as refused:
        Settings(**{field: "other"})
    assert all(repr(value) in str(refused.value) for value in accepted)


def test_a_reference_limit_beyond_what_a_concept_file_holds_is_refused():
    from ego.checks import check_reference_count
    from ego.memory import MAX_FILE_VIEWS_PER_CONCEPT

    most = MAX_FILE_VIEWS_PER_CONCEPT
    check_reference_count(most, Settings(max_references_per_concept=most))  # as many photos as a file holds
    with pytest.raises(ValueError, match=f"max_references_per_concept must be at most {most}, the photos of one"):
        Settings(max_references_per_concept=most + 1)


def test_an_aspect_ratio_limit_below_a_square_is_refused():
    from PIL import Image

    from ego.media import load_image

    square_only = Settings(max_image_aspect_ratio=1)
    assert load_image(Image.new("RGB", (8, 8)), square_only).size == (8, 8)
    with pytest.raises(ValueError, match=r"max_image_aspect_ratio must be at least 1 .*got 0\.5\."):
        Settings(max_image_aspect_ratio=0.5)
    with pytest.raises(ValueError, match="max_image_aspect_ratio must be at least 1"):
        DEFAULT_SETTINGS.replace(max_image_aspect_ratio=0.99)


def test_a_conversation_limit_below_the_default_answer_length_and_an_unknown_compiler_are_refused():
    Settings(max_conversation_context_tokens=100, answer_max_new_tokens=99)  # a caller's own short answers fit
    with pytest.raises(ValueError, match=r"max_conversation_context_tokens must be more than answer_max_new_tokens "):
        Settings(max_conversation_context_tokens=100)
    Settings(compile_backend="aot_eager")  # a debugging backend of torch's: the tests' CPU compiler
    with pytest.raises(ValueError, match=r"compile_backend must be a torch.compile backend \(.*inductor.*'inducto'"):
        Settings(compile_backend="inducto")


def test_a_query_photo_kept_at_less_than_four_times_the_processors_budget_is_refused():
    from ego.settings import Settings

    for factor in (1, 3):
        with pytest.raises(ValueError, match="query_image_kept_factor must be 0 or at least 4"):
            Settings(query_image_kept_factor=factor)
    assert Settings(query_image_kept_factor=0).query_image_kept_factor == 0
