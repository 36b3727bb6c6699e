"""ego/settings.py: the values each choice accepts are named once, and the modules that use them agree."""

from __future__ import annotations

import pytest

from ego import prompts, settings
from ego.settings import Settings


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
