"""Checks on what a person types or sends, shared by the engine and the app (no model needed).

Each failure is an `InputError` whose message is one sentence that says what to do.
"""

from __future__ import annotations

import math
import re
import unicodedata

from .errors import InputError
from .prompts import PERCENT_SIGNS
from .settings import Settings

_INVISIBLE = {"Cc", "Cf"}
"""Unicode categories dropped from names: control and format characters (a right-to-left override, a zero-width
space), but for the few format characters that change how a name is written (`_JOINERS`, `_FLAG_TAG_SEQUENCE`)."""
_JOINERS = frozenset("\u200c\u200d")
"""Zero-width non-joiner and joiner, kept between two visible characters: they choose the letter forms of Persian
("کتاب‌خانه"), Sinhala ("ශ්‍රී") or Malayalam, and join emoji into one ("👩‍💻", a woman and a laptop: a coder)."""
_FLAG_TAG_SEQUENCE = re.compile(
    "\U0001f3f4\U000e0067\U000e0062(?:\U000e0065\U000e006e\U000e0067|\U000e0073\U000e0063\U000e0074|"
    "\U000e0077\U000e006c\U000e0073)\U000e007f"
)
"""The subdivision flags emoji fonts draw: the black flag, the tags "gbeng", "gbsct" or "gbwls", the cancel tag
(England, Scotland, Wales). Their tags are kept; any other run of tags is dropped, as it may spell hidden text a
model reads ("ignore all previous ...") and a visitor does not see."""
_VARIATION_SELECTORS = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]")
"""Variation selectors: a phone's keyboard adds U+FE0F after "☕" or "❤" to draw it as an emoji."""


def _flag_tag_positions(text: str) -> set[int]:
    """The positions in `text` of the tags of its subdivision flags (`_FLAG_TAG_SEQUENCE`)."""
    return {i for flag in _FLAG_TAG_SEQUENCE.finditer(text) for i in range(flag.start() + 1, flag.end())}


def without_invisible(text: str) -> str:
    """`text` as names are compared (`ego.engine.named_in`, the Space's `name_key`): without format characters,
    which never tell two names apart (a zero-width joiner in "👩‍💻" or a non-joiner in "کتاب‌خانه" typed or left
    out), but for the tags of a flag, which tell England's from Scotland's, and without variation selectors."""
    in_flags = _flag_tag_positions(text)
    visible = "".join(ch for i, ch in enumerate(text) if i in in_flags or unicodedata.category(ch) != "Cf")
    return _VARIATION_SELECTORS.sub("", visible)


def is_valid_text(text: str) -> bool:
    """True if `text` can be written as UTF-8: no lone surrogate (U+D800..U+DFFF), which JSON escapes such as
    "\\ud800" can smuggle into a Python string and which no reply, file or tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(text: str, what: str) -> str:
    """`text` unchanged, or InputError if it holds invalid Unicode; `what` names the field in the sentence."""
    if not is_valid_text(text):
        raise InputError(
            f"The {what} contains characters that are not valid Unicode (a lone surrogate); please type it again."
        )
    return text


def fold_name(name: str) -> str:
    """A name as it is kept: white space folded, control and format characters dropped, but for a zero-width
    (non-)joiner between two visible characters and the tags of a subdivision flag, which change how the name is
    written. Matching names (`ego.engine.named_in`, the Space's `name_key`) ignores every format character."""
    in_flags = _flag_tag_positions(name)
    kept: list[str] = []
    for i, ch in enumerate(name):
        shown = unicodedata.category(ch) not in _INVISIBLE or ch.isspace()
        if shown or i in in_flags or ch in _JOINERS:  # a joiner's neighbours are known once the others are gone
            kept.append(ch)

    def visible(index: int) -> bool:
        return 0 <= index < len(kept) and not kept[index].isspace() and kept[index] not in _JOINERS

    joined = "".join(ch for i, ch in enumerate(kept) if ch not in _JOINERS or (visible(i - 1) and visible(i + 1)))
    return " ".join(joined.split())


def _text_or_empty(value, refusal: str) -> str:
    """`value` if it is a string, "" for None; anything else (a number, a list, a dict sent as JSON) is refused
    with `refusal` rather than turned into its Python spelling ("['hi']"), which no one typed."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(refusal)
    return value


def check_name(name, settings: Settings) -> str:
    """A concept name with its white space folded and invisible characters dropped (`fold_name`); empty or too
    long is refused. (Control and format characters, such as a right-to-left override or a zero-width space,
    would make a name look like another one.)"""
    text = _text_or_empty(name, "A concept name is text, for example 'my cat Chelsea'.")
    name = fold_name(check_text(text, "name"))
    if not name:
        raise InputError("Give the concept a name, for example 'my cat Chelsea'.")
    if len(name) > settings.max_name_chars:
        raise InputError(f"Concept names are at most {settings.max_name_chars} characters; please use a shorter name.")
    return name


def check_question(question, settings: Settings) -> str:
    text = _text_or_empty(question, "A question is text, for example 'Is Chelsea in this photo?'.")
    question = check_text(text, "question").strip()
    if not fold_name(question):  # invisible characters only (a zero-width space): as empty as no question
        raise InputError("Type a question first, for example 'Is Chelsea in this photo?'.")
    if len(question) > settings.max_question_chars:
        raise InputError(f"Questions are at most {settings.max_question_chars} characters; please shorten yours.")
    return question


def check_reference_count(count: int, settings: Settings, name: str = "the concept") -> None:
    limit = settings.max_references_per_concept
    if count < 1:
        raise InputError(f"Add at least one reference photo of {name} (up to {limit}).")
    if count > limit:
        raise InputError(
            f"A concept takes at most {limit} reference photos; you gave {count}. Keep the {limit} clearest ones."
        )


KEYWORDS_ARE_TEXT = "Keywords are text: words separated by commas, for example 'tabby, green eyes'."
_KEYWORD_SEPARATORS = re.compile("[,;，、،；﹐﹑؛﹔]")
"""Where a string of keywords is split: commas and semicolons, and those of other scripts: full-width and
ideographic commas ("橘猫，绿眼睛", "橘猫、緑の目"), the Arabic comma and semicolon ("قطة، عيون"), the small forms."""


def check_keywords(keywords, settings: Settings) -> list[str] | None:
    """User keywords as a list of phrases (a string is split at commas and semicolons, of any script; a list or
    tuple of strings gives one phrase each), each cleaned as a name is (`fold_name`: an invisible word would rank
    the memory, a right-to-left override would flip the report around it) and kept once; or None to let the model
    describe.

    A string with nothing visible in it is an empty keyword box: None, as the Space reads an empty field. Phrases
    that are empty once cleaned are dropped; if none is left, the keywords are refused with a sentence."""
    if keywords is None:
        return None
    if isinstance(keywords, str):
        if not fold_name(check_text(keywords, "keywords")):
            return None
        keywords = _KEYWORD_SEPARATORS.split(keywords)
    elif not isinstance(keywords, (list, tuple)) or not all(isinstance(k, str) for k in keywords):
        raise InputError(KEYWORDS_ARE_TEXT)
    words = [fold_name(check_text(k, "keywords")) for k in keywords]
    words = list(dict.fromkeys(w for w in words if w))
    if not words:
        raise InputError(
            "Give at least one keyword (for example 'tabby, green eyes'), or leave the field empty "
            "to let the model describe the photo."
        )
    if len(words) > settings.max_keywords:
        raise InputError(
            f"Give at most {settings.max_keywords} keywords (you gave {len(words)}); keep the most telling ones."
        )
    if sum(len(w) for w in words) > settings.max_keywords_chars:
        raise InputError(f"Keep the keywords under {settings.max_keywords_chars} characters in total.")
    return words


def check_area_pct(area_pct) -> float | None:
    """The subject's share of the image (1..100 %), or None to let the model estimate it. As text, it may end in a
    percent sign ("35%", "35 %", the full-width "３５％", the Arabic "٣٥٪")."""
    if area_pct is None:
        return None
    if isinstance(area_pct, bool):  # True would read as 1 %
        raise InputError("The subject size must be a number between 1 and 100 (percent of the image).")
    if isinstance(area_pct, str):
        area_pct = area_pct.strip()
        if area_pct.endswith(tuple(PERCENT_SIGNS)):
            area_pct = area_pct[:-1]
    try:
        value = float(area_pct)
    except (TypeError, ValueError):
        value = math.nan
    if math.isnan(value) or not 1 <= value <= 100:
        raise InputError("The subject size must be a number between 1 and 100 (percent of the image).")
    return value


def check_max_new_tokens(max_new_tokens, settings: Settings) -> int:
    """The answer's token budget: None for the settings' default, else a whole number (an int, a float such as
    64.0 that a JSON number may arrive as, or its digits as text) from 1 to the settings' limit."""
    limit = settings.answer_max_new_tokens_limit
    refusal = f"The answer length must be a whole number of tokens between 1 and {limit}."
    if max_new_tokens is None:
        return settings.answer_max_new_tokens
    if isinstance(max_new_tokens, bool):  # an int to Python, but True is no length
        raise InputError(refusal)
    try:
        number = float(max_new_tokens)  # digits as text too, with white space around them
    except (TypeError, ValueError, OverflowError):
        raise InputError(refusal) from None
    if not math.isfinite(number) or not number.is_integer() or not 1 <= number <= limit:
        raise InputError(refusal)
    return int(number)


def load_each(photos: list, load) -> list:
    """`load(photo)` for every photo, in order; a refusal of one of several says which (an `InputError` of the
    same type, "Photo 3 of 5: This file is not a supported image; ..."), so the visitor knows which to replace."""
    loaded = []
    for number, photo in enumerate(photos, 1):
        try:
            loaded.append(load(photo))
        except InputError as error:
            if len(photos) == 1:
                raise
            raise type(error)(f"Photo {number} of {len(photos)}: {error}") from error
    return loaded
