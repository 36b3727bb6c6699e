"""Checks on what a person types: one sentence that says what to do."""

import pytest

from ego import DEFAULT_SETTINGS, InputError, checks


def test_names_are_folded_and_bounded():
    assert checks.check_name("  my   cat\tChelsea ", DEFAULT_SETTINGS) == "my cat Chelsea"
    for bad in ["", "   ", None, "x" * (DEFAULT_SETTINGS.max_name_chars + 1)]:
        with pytest.raises(InputError):
            checks.check_name(bad, DEFAULT_SETTINGS)


def test_keywords_and_size():
    assert checks.check_keywords("tabby, green eyes ;  whiskers") == ["tabby", "green eyes", "whiskers"]
    assert checks.check_keywords(None) is None
    assert checks.check_area_pct("35") == 35.0 and checks.check_area_pct(None) is None
    for bad in ["abc", float("nan"), 0, 101]:
        with pytest.raises(InputError, match="between 1 and 100"):
            checks.check_area_pct(bad)


def test_reference_count_and_answer_length():
    checks.check_reference_count(5, DEFAULT_SETTINGS)
    with pytest.raises(InputError, match="at most 5"):
        checks.check_reference_count(6, DEFAULT_SETTINGS)
    with pytest.raises(InputError, match="at least one"):
        checks.check_reference_count(0, DEFAULT_SETTINGS)
    assert checks.check_max_new_tokens(None, DEFAULT_SETTINGS) == DEFAULT_SETTINGS.answer_max_new_tokens
    with pytest.raises(InputError):
        checks.check_max_new_tokens(DEFAULT_SETTINGS.answer_max_new_tokens_limit + 1, DEFAULT_SETTINGS)
