"""The words the engine says to the model, and how it reads the model's answers.

The paper does not publish its prompts; these are ours (research/paper.md §1.4). Parsing is lenient:
a model that answers "About 35%." or "35-40 percent" or "most of the image" is understood, and
anything else falls back to a documented default (Settings.area_pct_fallback).
"""

from __future__ import annotations

import re

DESCRIBE_PROMPT = (
    "Describe the main subject of this image in one short sentence: what it is, its colours, shape, "
    "material and any distinctive markings."
)
SIZE_PROMPT = (
    "What percentage of the image area does this subject cover? Answer with a single integer between 1 and 100."
)
MEMORY_INTRO = "Here are personal concepts you know, each shown by a few visual tokens from the user's photos:\n"
MEMORY_OUTRO = "When one of them appears, call it by its name.\n"

# Words that carry no visual evidence about the subject: English function words, plus the words a
# model uses to talk about the photo itself ("The image shows ..."), whose attention spreads over the
# whole picture rather than the subject.
STOPWORDS = frozenset("""
a an the this that these those it its it's is are was were be been being am has have had do does did
of in on at to from by for with without about above below under over into onto out up down off near
and or but nor so yet as than then there here which who whom whose what when where why how
very quite rather some any each every all both either neither few more most much many such own same
i me my we our you your he him his she her they them their one ones also just only not no can could
will would should may might must shall s t
image photo photograph picture shot scene frame subject main visible shows showing shown depicts
depicting appears appearing seen features featuring looks looking sentence describe description
""".split())

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)


def content_words(text: str) -> list[str]:
    """Keywords of a description: its words without punctuation and stop-words, in order, unique."""
    seen, words = set(), []
    for match in _WORD.finditer(text):
        word = match.group(0).lower()
        if word not in STOPWORDS and word not in seen:
            seen.add(word)
            words.append(word)
    return words


def word_spans(text: str, *, content_only: bool) -> list[tuple[int, int]]:
    """Character spans of the (content) words of `text`."""
    return [m.span() for m in _WORD.finditer(text) if not content_only or m.group(0).lower() not in STOPWORDS]


_NUMBER = r"(\d{1,3}(?:\.\d+)?)"
_RANGE = re.compile(_NUMBER + r"\s*%?\s*(?:-|–|to)\s*" + _NUMBER)
_SINGLE = re.compile(_NUMBER)
# Size words, checked longest phrase first; the value is the percentage they usually mean.
_SIZE_WORDS = [
    ("almost all", 90), ("nearly all", 90), ("almost the entire", 90), ("nearly the entire", 90),
    ("entire", 100), ("whole", 100), ("fills", 90), ("full", 100), ("majority", 65), ("most", 70),
    ("three quarters", 75), ("three-quarters", 75), ("two thirds", 67), ("two-thirds", 67),
    ("half", 50), ("a third", 33), ("one third", 33), ("quarter", 25), ("a fifth", 20),
    ("large", 60), ("big", 60), ("medium", 35), ("moderate", 35), ("small", 10), ("little", 10),
    ("tiny", 5), ("minor", 10),
]


def parse_area_pct(answer: str) -> float | None:
    """The subject's share of the image in percent (1..100) from a model's answer, or None.

    "About 35%." -> 35; "35-40 percent" -> 37.5 (middle of a range); "0.35" -> 35 (a fraction);
    "The dog covers most of the image" -> 70 (size words); "banana" -> None.
    """
    text = answer.strip().lower()
    if not text:
        return None
    if match := _RANGE.search(text):
        low, high = float(match.group(1)), float(match.group(2))
        if low <= high:
            return _clamp((low + high) / 2)
    if match := _SINGLE.search(text):
        value = float(match.group(1))
        if "." in match.group(1) and value < 1 and "%" not in text[match.end():match.end() + 2]:
            value *= 100  # "0.35": a fraction of the image
        return _clamp(value)
    for phrase, value in _SIZE_WORDS:
        if re.search(r"\b" + re.escape(phrase) + r"\b", text):
            return float(value)
    return None


def _clamp(value: float) -> float:
    return float(min(100.0, max(1.0, value)))


def neutralize(text: str, special_strings: list[str]) -> str:
    """Visitor text with every special-token string broken by a zero-width space, so a visitor who
    types `<|image_pad|>` or `<|im_end|>` gets plain text, never a control token."""
    for special in special_strings:
        if special and special in text:
            text = text.replace(special, special[0] + "\u200b" + special[1:])
    return text
