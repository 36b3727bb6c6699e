"""Checks on what a person types or sends, shared by the engine and the app (no model needed).

Each failure is an `InputError` whose message is one sentence that says what to do.
"""

from __future__ import annotations

import math
import unicodedata

from .errors import InputError
from .settings import Settings

_INVISIBLE = {"Cc", "Cf"}
"""Unicode categories dropped from names: control and format characters."""


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
    """A name as it is kept: white space folded, control and format characters dropped."""
    return " ".join("".join(ch for ch in name if unicodedata.category(ch) not in _INVISIBLE or ch.isspace()).split())


def check_name(name, settings: Settings) -> str:
    """A concept name with its white space folded and invisible characters dropped; empty or too long is
    refused. (Control and format characters, such as a right-to-left override or a zero-width space,
    would make a name look like another one.)"""
    name = fold_name(check_text(str(name or ""), "name"))
    if not name:
        raise InputError("Give the concept a name, for example 'my cat Chelsea'.")
    if len(name) > settings.max_name_chars:
        raise InputError(f"Concept names are at most {settings.max_name_chars} characters; please use a shorter name.")
    return name


def check_question(question, settings: Settings) -> str:
    question = check_text(str(question or ""), "question").strip()
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


def check_keywords(keywords, settings: Settings) -> list[str] | None:
    """User keywords as a list of phrases (a string is split at commas), each once, or None to let the model
    describe."""
    if keywords is None:
        return None
    if isinstance(keywords, str):
        keywords = keywords.replace(";", ",").split(",")
    words = [" ".join(check_text(str(k), "keywords").split()) for k in keywords]
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
    """The subject's share of the image (1..100 %), or None to let the model estimate it."""
    if area_pct is None:
        return None
    try:
        value = float(area_pct)
    except (TypeError, ValueError):
        value = math.nan
    if math.isnan(value) or not 1 <= value <= 100:
        raise InputError("The subject size must be a number between 1 and 100 (percent of the image).")
    return value


def check_max_new_tokens(max_new_tokens, settings: Settings) -> int:
    value = settings.answer_max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    if not 1 <= value <= settings.answer_max_new_tokens_limit:
        raise InputError(f"The answer length must be between 1 and {settings.answer_max_new_tokens_limit} tokens.")
    return value
