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


@pytest.mark.parametrize("surrogate", ["\ud800", "\udfff", "\ud83d"])
def test_text_that_is_not_valid_unicode_is_refused_with_a_sentence(surrogate):
    """A lone surrogate (a JSON payload can carry one as an escape) cannot be encoded by any reply or tokenizer."""
    for check, what in [
        (lambda t: checks.check_name(t, DEFAULT_SETTINGS), "name"),
        (lambda t: checks.check_question(t, DEFAULT_SETTINGS), "question"),
        (checks.check_keywords, "keywords"),
        (lambda t: checks.check_keywords([t]), "keywords"),
    ]:
        with pytest.raises(InputError, match=f"The {what} contains characters that are not valid Unicode"):
            check(f"my cat {surrogate} Chelsea")
    assert checks.check_name("Chelsea \U0001f408", DEFAULT_SETTINGS) == "Chelsea \U0001f408"  # a real emoji
