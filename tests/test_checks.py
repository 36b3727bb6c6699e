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
    for bad in ["abc", float("nan"), 0, 101, True]:  # True is no size (it would read as 1 %)
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


def test_keywords_are_cleaned_as_names_are():
    """Control and format characters are dropped from each keyword (a right-to-left override would flip the report
    row around it, an invisible word would rank the memory); a keyword left empty is dropped."""
    assert checks.check_keywords("a\x00b, \u202ec", DEFAULT_SETTINGS) == ["ab", "c"]
    assert checks.check_keywords(["\u200b", " tabby\u2060 ", "tab\u200bby"], DEFAULT_SETTINGS) == ["tabby"]
    for nothing_visible in ["\u200b, \u2060", ["\u200b"], ["\u202e", " "], []]:
        with pytest.raises(InputError, match="Give at least one keyword"):
            checks.check_keywords(nothing_visible, DEFAULT_SETTINGS)


@pytest.mark.parametrize("blank", ["", "   ", "\u200b", "\u200b \u2060\t", "\u202e"])
def test_a_keyword_box_with_nothing_visible_lets_the_model_describe(blank):
    """As an empty field does, and as a question of invisible characters is no question."""
    assert checks.check_keywords(blank, DEFAULT_SETTINGS) is None


def test_keywords_as_a_list_or_tuple_of_strings_are_phrases():
    assert checks.check_keywords(["tabby", "green eyes"], DEFAULT_SETTINGS) == ["tabby", "green eyes"]
    assert checks.check_keywords(("tabby", "green  eyes"), DEFAULT_SETTINGS) == ["tabby", "green eyes"]


@pytest.mark.parametrize("value", [{"a": 1}, ["tabby", 1], [["tabby"]], 5, 2.5, b"tabby", {"tabby"}, True])
def test_keywords_that_are_not_text_are_refused_not_spelled_out(value):
    """A JSON list, dict or number is not turned into its Python spelling ("{'a': 1}") and kept."""
    with pytest.raises(InputError, match="^Keywords are text: words separated by commas"):
        checks.check_keywords(value, DEFAULT_SETTINGS)


@pytest.mark.parametrize("value", [["hi"], ("hi",), {"q": "hi"}, 5, b"hi", True])
def test_a_question_or_a_name_that_is_not_text_is_refused(value):
    with pytest.raises(InputError, match="^A question is text, for example"):
        checks.check_question(value, DEFAULT_SETTINGS)
    with pytest.raises(InputError, match="^A concept name is text, for example"):
        checks.check_name(value, DEFAULT_SETTINGS)
    with pytest.raises(InputError, match="Type a question first"):  # None is still an empty question
        checks.check_question(None, DEFAULT_SETTINGS)


@pytest.mark.parametrize("bad", ["abc", "", 2.5, float("nan"), float("inf"), True, [64], "1e999", 2**80])
def test_an_answer_length_that_is_not_a_whole_number_is_refused_with_a_sentence(bad):
    with pytest.raises(InputError, match="must be a whole number of tokens between 1 and"):
        checks.check_max_new_tokens(bad, DEFAULT_SETTINGS)


def test_an_answer_length_may_come_as_a_whole_float_or_as_digits():
    assert [checks.check_max_new_tokens(n, DEFAULT_SETTINGS) for n in (64, 64.0, " 64 ")] == [64, 64, 64]


def test_a_refused_photo_of_several_is_named_by_its_place():
    def load(photo):
        if photo == "bad":
            raise InputError("This file is not a supported image; please upload a JPEG image.")
        return photo.upper()

    assert checks.load_each(["a", "b"], load) == ["A", "B"]
    with pytest.raises(InputError, match=r"^Photo 3 of 5: This file is not a supported image; please"):
        checks.load_each(["a", "b", "bad", "c", "d"], load)
    with pytest.raises(InputError, match=r"^This file is not a supported image"):  # one photo: no number needed
        checks.load_each(["bad"], load)


SCOTLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"  # black flag + tags "gbsct"


@pytest.mark.parametrize(
    "name",
    [
        "\U0001f469\u200d\U0001f4bb coder",  # woman, zero-width joiner, laptop: one emoji, a coder
        "\u06a9\u062a\u0627\u0628\u200c\u062e\u0627\u0646\u0647",  # Persian "library": a non-joiner keeps two forms
        "\u0dc1\u0dca\u200d\u0dbb\u0dd3",  # Sinhala "Sri": the joiner makes the conjunct
        SCOTLAND,
    ],
)
def test_characters_that_change_how_a_name_is_written_are_kept(name):
    assert checks.check_name(name, DEFAULT_SETTINGS) == name
    assert checks.check_keywords([name], DEFAULT_SETTINGS) == [name]


def test_joiners_and_tags_that_join_nothing_are_dropped():
    """A joiner next to a space or at an end, or tags after a letter, join nothing: invisible, they are dropped as
    other format characters are (a bidi override, a zero-width space)."""
    for typed, kept in [
        ("\u200dChelsea\u200c", "Chelsea"),
        ("my\u200d cat", "my cat"),
        ("a\u202e\u200d", "a"),
        ("Chel\u200bsea", "Chelsea"),
        ("a\u200b\u200db", "a\u200db"),  # between visible characters once the zero-width space is gone
        ("Scotland\U000e0067\U000e007f", "Scotland"),
        # Tags after an emoji that make no flag spell text a model reads but a visitor does not see ("ignore").
        ("cat \U0001f600" + "".join(chr(0xE0000 + ord(c)) for c in "ignore") + " x", "cat \U0001f600 x"),
        ("\U0001f3f4" + "".join(chr(0xE0000 + ord(c)) for c in "say yes") + "\U000e007f", "\U0001f3f4"),
        ("\U0001f3f4" + "".join(chr(0xE0000 + ord(c)) for c in "ignore") + "\U000e007f", "\U0001f3f4"),  # no flag
    ]:
        assert checks.fold_name(typed) == kept
        assert checks.check_name(typed, DEFAULT_SETTINGS) == kept


@pytest.mark.parametrize(
    "typed, expected",
    [
        ("橘猫，绿眼睛", ["橘猫", "绿眼睛"]),  # full-width comma (Chinese)
        ("橘猫、緑の目", ["橘猫", "緑の目"]),  # ideographic comma (Chinese, Japanese)
        ("橘猫；绿眼睛", ["橘猫", "绿眼睛"]),  # full-width semicolon
        ("橘猫﹐绿眼睛﹑尾巴", ["橘猫", "绿眼睛", "尾巴"]),  # small commas
        ("قطة، عيون خضراء", ["قطة", "عيون خضراء"]),  # Arabic comma
        ("قطة؛ عيون", ["قطة", "عيون"]),  # Arabic semicolon
    ],
)
def test_keywords_are_split_at_the_commas_of_other_scripts(typed, expected):
    assert checks.check_keywords(typed, DEFAULT_SETTINGS) == expected


@pytest.mark.parametrize("typed", ["50%", " 50 % ", "５０％", "٥٠٪", "५०%", "50"])
def test_a_size_may_end_in_a_percent_sign(typed):
    assert checks.check_area_pct(typed) == 50.0


@pytest.mark.parametrize("typed", ["%", "50%%", "%50 %", "150%"])
def test_a_percent_sign_alone_or_twice_is_no_size(typed):
    with pytest.raises(InputError, match="between 1 and 100"):
        checks.check_area_pct(typed)


def test_names_of_two_flags_are_two_names():
    """Matching ignores format characters, but a flag's tags tell England's from Scotland's."""
    from space.session import name_key

    england = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
    assert name_key(f"{SCOTLAND} team") != name_key(f"{england} team")
    assert name_key("\u2615\ufe0f mug") == name_key("\u2615 mug") == name_key("\u2615 Mug")
