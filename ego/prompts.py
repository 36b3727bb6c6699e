"""The words the engine says to the model, and how it reads the model's answers.

The paper does not publish its prompts; these are ours (docs/method.md). Parsing is lenient:
a model that answers "About 35%." or "35-40 percent" or "most of the image" is understood, and
anything else falls back to a documented default (Settings.area_pct_fallback).
"""

from __future__ import annotations

import re
import unicodedata

DESCRIBE_PROMPT = (
    "Describe the main subject of this image in one short sentence: what it is, its colours, shape, "
    "material and any distinctive markings."
)
SIZE_PROMPT = (
    "What percentage of the image area does this subject cover? Answer with a single integer between 1 and 100."
)
MEMORY_INTRO = "Here are personal concepts you know, each shown by a few visual tokens from the user's photos:\n"
MEMORY_OUTRO = "When one of them appears, call it by its name.\n"
MEMORY_PROMPTS = {
    "name": (MEMORY_INTRO, MEMORY_OUTRO),
    "neutral": ("Personal concepts, each shown by a few visual tokens:\n", ""),
}
"""(text before the memory lines, text after them) of each `Settings.memory_prompt`."""


def memory_prompt(wording: str) -> tuple[str, str]:
    if wording not in MEMORY_PROMPTS:
        raise ValueError(f"memory_prompt must be one of {sorted(MEMORY_PROMPTS)}; got {wording!r}.")
    return MEMORY_PROMPTS[wording]


# Words that carry no visual evidence about the subject: English function words, plus the words a
# model uses to talk about the photo itself ("The image shows ..."), whose attention spreads over the
# whole picture rather than the subject.
STOPWORDS = frozenset(
    """
a an the this that these those it its it's is are was were be been being am has have had do does did
of in on at to from by for with without about above below under over into onto out up down off near
and or but nor so yet as than then there here which who whom whose what when where why how
very quite rather some any each every all both either neither few more most much many such own same
i me my we our you your he him his she her they them their one ones also just only not no can could
will would should may might must shall s t
image photo photograph picture shot scene frame subject main visible shows showing shown depicts
depicting appears appearing seen features featuring looks looking sentence describe description
""".split()
)


def _code_point_class(categories: set[str], planes: tuple[range, ...]) -> str:
    """The body of a regex character class (ranges of escaped code points) matching the code points of `planes`
    whose Unicode category is one of `categories`."""
    ranges: list[list[int]] = []
    for code in (code for plane in planes for code in plane):
        if unicodedata.category(chr(code)) in categories:
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return "".join(f"\\U{low:08x}" + (f"-\\U{high:08x}" if high > low else "") for low, high in ranges)


MARKS = _code_point_class({"Mn", "Mc", "Me"}, (range(0x20000), range(0xE0000, 0xE1000)))
"""Combining marks as the body of a regex character class: the vowel signs and viramas of Devanagari ("बिल्ली"),
Thai vowels and tone marks ("สีส้ม"), a combining accent (a "café" typed as "e" + U+0301), variation selectors.
Python's `\\w` leaves them out, which would cut such words into pieces. (Marks live in the first two planes and, as
variation selectors, in plane 14; scanning only those keeps the import fast.)"""

_LETTER = r"[^\W_]"
"""A letter or a digit of any script (a word character but the underscore)."""
_WORD_PART = rf"{_LETTER}(?:{_LETTER}|[{MARKS}])*"
_WORD = re.compile(rf"{_WORD_PART}(?:['’]{_WORD_PART})*")
"""A word: a letter or digit followed by letters, digits and marks, with inner apostrophes ("isn't", "cat’s")."""


def _lookup(word: str) -> str:
    """A word as the stop-word list spells it: lower case, a typographic apostrophe as a plain one ("It’s")."""
    return word.lower().replace("’", "'")


def content_words(text: str) -> list[str]:
    """Keywords of a description: its words without punctuation and stop-words, in order, unique."""
    seen, words = set(), []
    for match in _WORD.finditer(text):
        word = match.group(0).lower()
        if _lookup(word) not in STOPWORDS and word not in seen:
            seen.add(word)
            words.append(word)
    return words


def word_spans(text: str, *, content_only: bool) -> list[tuple[int, int]]:
    """Character spans of the (content) words of `text`."""
    return [m.span() for m in _WORD.finditer(text) if not content_only or _lookup(m.group(0)) not in STOPWORDS]


_UNIT_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS_WORDS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORD = re.compile(
    r"\b(?:(?P<hundred>(?:a|one)\s+hundred)|(?P<tens>"
    + "|".join(_TENS_WORDS)
    + r")(?:[\s-]+(?P<tens_unit>"
    + "|".join(_UNIT_WORDS[1:10])
    + r"))?|(?P<unit>"
    + "|".join(_UNIT_WORDS)
    + r"))\b"
)
_DENOMINATORS = {
    "half": 2,
    "halves": 2,
    "third": 3,
    "thirds": 3,
    "quarter": 4,
    "quarters": 4,
    "fourth": 4,
    "fourths": 4,
    "fifth": 5,
    "fifths": 5,
    "sixth": 6,
    "sixths": 6,
    "eighth": 8,
    "eighths": 8,
    "tenth": 10,
    "tenths": 10,
}
_FRACTION_WORDS = re.compile(r"\b(?P<count>an?|\d+)[\s-]+(?P<part>" + "|".join(_DENOMINATORS) + r")\b")
_FRACTION = re.compile(r"(?<![\d.])(?P<num>\d+)\s*/\s*(?P<den>\d+)(?!\d|\.\d)")  # a full stop may end it
_DIMENSIONS = re.compile(r"\b\d+\s*[x×]\s*\d+\b|\b\d+(?:\.\d+)?\s*(?:px|pixels?|mp|megapixels?)\b")
PERCENT_SIGNS = "%％٪"
"""Percent signs: the ASCII one, the full-width one ("３５％") and the Arabic one ("٣٥٪")."""
# The unit of a share in the languages a model may answer in: "35 %", "35％" (full width), "٣٥٪" (Arabic),
# "35パーセント", "35 por ciento", "35 pour cent", "35 Prozent", "35 процентов". A bare number followed by a word is
# no share ("1 dog"), so a unit word must be known to be read.
_PERCENT = (
    rf"\s*(?:[{PERCENT_SIGNS}]|パーセント|(?:percent|per\s*cent|pct|per\s*cento|por\s*ciento|por\s*cento|pour\s*cent|prozent"
    r"|процент(?:ов|а)?)\b)"
)
# Whole words only: "over" must not be read inside "cover" ("they cover 5%"), nor "under" inside "thunder".
_BELOW = r"\b(?:less than|fewer than|under|below|at most|no more than|not more than|up to)\b|<"
_ABOVE = r"\b(?:more than|over|above|at least|greater than)\b|>"
_HEDGE = r"(?:(?:about|around|approximately|approx\.?|roughly|nearly|almost|maybe|perhaps|some|~)\s*)?"


def _number(name: str) -> str:
    return rf"(?<![\d.])(?P<{name}>\d+(?:\.\d+)?)(?!\.?\d)"


def _amount(percent: str) -> re.Pattern:
    """A stated share: a range (its middle), a bound ("less than 10%"), or one number, in that order of
    preference; `percent` is the unit the number must carry ("" for a bare number, which must then not be
    followed by a word other than "of": "1 dog" is a count, not a share)."""
    bare = r"(?!\s*(?!of\b)[^\W\d_])" if not percent else ""
    return re.compile(
        _HEDGE  # "about 5% to 8%": the range, not its first number
        + r"(?:between\s+|from\s+)?"
        + _HEDGE
        + _number("low")
        + r"(?:"
        + _PERCENT
        + r")?\s*(?:-|to|and)\s*"
        + _number("high")
        + percent
        + bare
        # The space after a bound belongs to the bound: a bare "\s*" here would let this branch start at the
        # space before a range ("covers 5% to 8%") and win as the leftmost match, reading its lower end.
        + r"|(?:(?:(?P<below>"
        + _BELOW
        + r")|(?P<above>"
        + _ABOVE
        + r"))\s*)?"
        + _HEDGE
        + _number("value")
        + percent
        + bare
    )


_PERCENT_AMOUNT, _BARE_AMOUNT = _amount(_PERCENT), _amount("")
# An answer cut by the length cap that ends inside a number ("It covers about 6", "between 20% and",
# "twenty") may have meant another one ("65", "between 20% and 30%", "twenty-five").
_CUT_IN_NUMBER = re.compile(
    r"(?:\d[\d.,/\s]*|\d\s*%?\s*(?:-|to|and)\s*|\b(?:"
    + "|".join(_UNIT_WORDS + _TENS_WORDS + ["a", "an", "hundred"])
    + r")[\s-]*)$"
)
# The question's own wording repeated ("between 1 and 100", "on a scale of 1 to 100") is not an answer, and
# "30 out of 100" is 30%.
_ECHO = re.compile(r"\b(?:between\s+|from\s+)?1\s*(?:and|to|-)\s*100\b(?!\s*%)")
_OUT_OF_100 = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s+out\s+of\s+(?:a\s+|one\s+)?100\b")
# After a cut inside a number, a number stated earlier stands if the clause that states it has ended (", which
# is a"); otherwise the cut may be in what qualifies it ("between 20% and 3", "30% of the dog's 2").
_CLAUSE_END = re.compile(r"[,;:!?]|\.(?!\d)")
# Size words, checked longest phrase first; the value is the percentage they usually mean.
_SIZE_WORDS = [
    ("almost all", 90),
    ("nearly all", 90),
    ("almost the entire", 90),
    ("nearly the entire", 90),
    ("entire", 100),
    ("whole", 100),
    ("fills", 90),
    ("full", 100),
    ("majority", 65),
    ("most", 70),
    ("half", 50),
    ("large", 60),
    ("big", 60),
    ("medium", 35),
    ("moderate", 35),
    ("small", 10),
    ("little", 10),
    ("tiny", 5),
    ("minor", 10),
]


# "one of the main subjects" is not an amount (read as "1 of", it would be 1 %). Words only: "0.35 of the image" is.
_ONE_OF = re.compile(r"\bone of (?:the|its|my|our|his|her|their|two|three|several|many|few)\b")


def _spell_out(text: str) -> str:
    """Number words as digits ("twenty-five" -> "25", "a hundred" -> "100"), fraction words and numeric
    fractions as percentages ("two thirds" -> "66.667%", "1/3" -> "33.333%")."""

    def number(match: re.Match) -> str:
        if match.group("hundred"):
            return "100"
        if match.group("tens"):
            tens = (_TENS_WORDS.index(match.group("tens")) + 2) * 10
            return str(tens + (_UNIT_WORDS.index(match.group("tens_unit")) if match.group("tens_unit") else 0))
        return str(_UNIT_WORDS.index(match.group("unit")))

    def fraction_word(match: re.Match) -> str:
        count = 1 if match.group("count") in ("a", "an") else int(match.group("count"))
        return f"{100 * count / _DENOMINATORS[match.group('part')]:.3f}%"

    def fraction(match: re.Match) -> str:
        num, den = int(match.group("num")), int(match.group("den"))
        return f"{100 * num / den:.3f}%" if 0 < num <= den else match.group(0)

    text = _ONE_OF.sub("among", text)
    text = _NUMBER_WORD.sub(number, text)
    text = _FRACTION_WORDS.sub(fraction_word, text)
    return _FRACTION.sub(fraction, text)


def parse_area_pct(answer: str, *, cut: bool = False) -> float | None:
    """The subject's share of the image in percent (1..100) from a model's answer, or None.

    Read in this order: a percentage anywhere in the answer ("The dog covers about 35% of the frame"),
    a range's middle ("35-40 percent" -> 37.5, "between 20% and 30%" -> 25), a bound's middle ("less than
    10%" -> 5, "more than 80%" -> 90), fractions ("1/3", "a third", "two thirds"), spelled-out numbers
    ("fifteen percent"); then a bare number not followed by a word ("35", "0.35" -> 35, but not "1 dog");
    then size words ("most of the image" -> 70). Image dimensions ("1920x1080", "448 pixels") and the
    question's own words ("between 1 and 100") are ignored; "30 out of 100" is 30.

    cut: the answer stopped at the length cap; if it stopped inside a number ("It covers about 6"), the
    number it meant is unknown and the answer is unreadable (None), unless an amount was stated before it in
    a clause that had ended ("It covers about 30% of the image, which is a" -> 30).
    """
    text = answer.strip().lower().replace("–", "-").replace("—", "-")
    if not text:
        return None
    if cut and (fragment := _CUT_IN_NUMBER.search(text)):
        start = fragment.start()
        while start and (text[start - 1].isdigit() or text[start - 1] in ".,"):
            start -= 1  # the whole number being written ("20% and": from its "2")
        stated = _stated_amount(text[:start])
        return stated[0] if stated is not None and _CLAUSE_END.search(stated[1]) else None
    stated = _stated_amount(text)
    if stated is not None:
        return stated[0]
    text = _spell_out(text)
    for phrase, value in _SIZE_WORDS:
        if re.search(r"\b" + re.escape(phrase) + r"\b", text):
            return float(value)
    return None


def _stated_amount(text: str) -> tuple[float, str] | None:
    """The first amount stated in lower-cased `text` (a percentage first, else a bare number), clamped to
    1..100, with the text after it; None when there is none."""
    text = _OUT_OF_100.sub(r"\1%", _ECHO.sub(" ", text))
    text = _DIMENSIONS.sub(" ", _spell_out(text))
    for pattern in (_PERCENT_AMOUNT, _BARE_AMOUNT):
        if match := pattern.search(text):
            return _clamp(_value(match, fraction_allowed=pattern is _BARE_AMOUNT)), text[match.end() :]
    return None


def read_area_pct(answer: str, cut: bool, fallback_pct: float) -> tuple[float, str]:
    """alpha_c and where it came from: ("model") the parsed answer; ("truncated") the fallback, because the
    answer stopped at its length cap inside a number; ("fallback") the fallback, because it had no size."""
    parsed = parse_area_pct(answer, cut=cut)
    if parsed is not None:
        return parsed, "model"
    return float(fallback_pct), "truncated" if cut and parse_area_pct(answer) is not None else "fallback"


def _value(match: re.Match, *, fraction_allowed: bool) -> float:
    low, high, single = match.group("low"), match.group("high"), match.group("value")
    if low is not None:
        low, high = float(low), float(high)
        return (low + high) / 2 if low <= high else low
    value = float(single)
    if fraction_allowed and "." in single and value < 1:
        value *= 100  # "0.35": a fraction of the image
    if match.group("below"):
        return value / 2  # "less than 10%": the middle of 0..10
    if match.group("above"):
        return (value + 100) / 2  # "more than 80%": the middle of 80..100
    return value


def _clamp(value: float) -> float:
    return float(min(100.0, max(1.0, value)))


def neutralize(text: str, special_strings: list[str]) -> str:
    """Visitor text with every special-token string broken by a zero-width space, so a visitor who
    types `<|image_pad|>` or `<|im_end|>` gets plain text, never a control token."""
    for special in special_strings:
        if special and special in text:
            text = text.replace(special, special[0] + "\u200b" + special[1:])
    return text
