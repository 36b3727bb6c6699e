"""Checks on what a person types: one sentence that says what to do."""

import pytest

from ego import DEFAULT_SETTINGS, InputError, checks


def test_names_are_folded_and_bounded():
    assert checks.check_name("  my   cat\tChelsea ", DEFAULT_SETTINGS) == "my cat Chelsea"
    for bad in ["", "   ", None, "x" * (DEFAULT_SETTINGS.max_name_chars + 1)]:
        with pytest.raises(InputError):
            checks.check_name(bad, DEFAULT_SETTINGS)


def test_keywords_and_size():
    assert checks.check_keywords("tabby, green eyes ;  whiskers", DEFAULT_SETTINGS) == [
        "tabby",
        "green eyes",
        "whiskers",
    ]
    assert checks.check_keywords(None, DEFAULT_SETTINGS) is None


def test_keywords_are_counted_once_and_bounded():
    """Repeats count once; more keywords, or more characters, than the settings allow get a sentence."""
    limit = DEFAULT_SETTINGS.max_keywords
    assert checks.check_keywords("tabby, tabby,  tabby , eyes", DEFAULT_SETTINGS) == ["tabby", "eyes"]
    letters = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(limit + 1)]
    assert checks.check_keywords(letters[:limit] + letters[:3], DEFAULT_SETTINGS) == letters[:limit]
    with pytest.raises(InputError, match=f"at most {limit} keywords \\(you gave {limit + 1}\\)"):
        checks.check_keywords(letters, DEFAULT_SETTINGS)
    with pytest.raises(InputError, match="under 200 characters"):
        checks.check_keywords(["x" * 101, "y" * 100], DEFAULT_SETTINGS)


@pytest.mark.parametrize("invisible", ["\u200b", "\u200b \u2060", "\u202e\u200d"])
def test_a_question_of_invisible_characters_is_empty(invisible):
    with pytest.raises(InputError, match="Type a question first"):
        checks.check_question(invisible, DEFAULT_SETTINGS)
    assert checks.check_question("Where is\u200b Chelsea?", DEFAULT_SETTINGS) == "Where is\u200b Chelsea?"


def test_area():
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
        (lambda t: checks.check_keywords(t, DEFAULT_SETTINGS), "keywords"),
        (lambda t: checks.check_keywords([t], DEFAULT_SETTINGS), "keywords"),
    ]:
        with pytest.raises(InputError, match=f"The {what} contains characters that are not valid Unicode"):
            check(f"my cat {surrogate} Chelsea")
    assert checks.check_name("Chelsea \U0001f408", DEFAULT_SETTINGS) == "Chelsea \U0001f408"  # a real emoji


@pytest.mark.parametrize(
    "change",
    [
        {"k_cap_tokens": 0},
        {"k_cap_tokens": -5},
        {"k_cap_tokens": "50"},
        {"k_cap_tokens": 50.0},
        {"video_num_frames": 0},
        {"max_video_duration_s": float("nan")},
        {"max_video_duration_s": 0},
        {"keywords_drop_stopwords": "no"},
        {"area_pct_fallback": 0.5},
        {"answer_max_new_tokens": 2000},
        {"memory_size_rule": "Area"},
        {"memory_selection": "attn"},
    ],
)
def test_settings_that_cannot_work_are_refused_when_made(change):
    """A typo or an impossible number stops where the settings are made, with the field's name, not at the first
    introduction or question."""
    from ego import Settings

    (name,) = change
    with pytest.raises(ValueError, match=f"^{name} must be"):
        Settings(**change)
    with pytest.raises(ValueError, match=f"^{name} must be"):
        DEFAULT_SETTINGS.replace(**change)


def test_settings_at_their_edges_are_accepted():
    from ego import Settings
    from space.settings import SpaceSettings

    Settings(max_upload_mb=0, batch_cache_min_free_mb=0, area_pct_fallback=1, answer_max_new_tokens=1024)
    Settings(max_video_decode_s=1e-4, video_default_fps=30)  # a float field takes an int
    SpaceSettings(answer_batch_window_s=0.0, answer_batch_max_size=1)
    with pytest.raises(ValueError, match="^answer_batch_max_size must be a whole number of at least 1"):
        SpaceSettings(answer_batch_max_size=0)
    with pytest.raises(ValueError, match="^session_ttl_s must be"):
        SpaceSettings(session_ttl_s=-1)
