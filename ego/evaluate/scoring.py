"""Scoring rules of the benchmarks, as pure functions (docs/evaluation.md says where each comes from).

Recognition counters follow the published harness of the paper's group (PeKit): per unit u (a concept, or a
concept pair in multi-concept mode) `detected[u]`, `gt[u]`, `correct[u]`. The paper's F1 formula cannot be
recovered from its numbers, so every aggregation variant is reported under its own name.
"""

from __future__ import annotations

import re

_WORDS = re.compile(r"[a-z0-9]+")


def parse_yes_no(answer: str) -> bool | None:
    """True for yes, False for no, None when the answer says neither (the first word decides, else the first
    of the words "yes"/"no" found anywhere)."""
    words = _WORDS.findall(str(answer).lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0] == "yes"
    for word in words:
        if word in ("yes", "no"):
            return word == "yes"
    return None


_EMPHASIS = "*_\"'`“”‘’"
"""Markdown emphasis and quotes a model may put around a letter ("**B**", '"B"')."""
_LONE_LETTER = re.compile(
    rf"^[\s{_EMPHASIS}]*[\(\[]?([ab])\s*(?:[\)\].:,]|[{_EMPHASIS}]+(?![\w{_EMPHASIS}])|$)", re.IGNORECASE
)
_LETTER_IS_CORRECT = re.compile(
    rf"^[\s{_EMPHASIS}]*[\(\[]?([ab])[\)\]]?[{_EMPHASIS}]*\s+is\s+(?:the\s+)?(?:correct|right)\b", re.IGNORECASE
)
# After "answer is", "answer:" or "option": a bracketed letter, a capital letter that does not begin a word, or a
# small letter closed by punctuation or the end, its emphasis right after it ("the answer is a dog", or a
# **golden retriever**, names the animal, not option A).
_ANSWER_IS = re.compile(
    rf"\b(?i:answer|option)\s*(?:(?i:is)\s*:?|:)?\s*[{_EMPHASIS}]*"
    rf"(?:[\(\[]([abAB])[\)\]]|([AB])(?![\w'])|([ab])(?=[{_EMPHASIS}]*\s*(?:[.:,;)\]]|$)))"
)


def parse_option(answer: str, options: dict[str, str]) -> str | None:
    """The chosen letter of a two-option question ("A"/"B"), robust to answers that begin with the article
    "A" ("A dog sits...", "The answer is a dog"): a letter counts only when it stands alone ("B", "(A)", "A.",
    "A: Dog"), after "answer is" as a letter and not an article (a capital "A" and a word there, "Answer: A dog", is
    the article where the rest names exactly one option), or when exactly one option's text appears in the answer;
    markdown emphasis or quotes around the letter ("**B**", '"B"') and "B is correct" count too. None when it cannot
    be told."""
    text = str(answer).strip()
    match = _LONE_LETTER.match(text) or _LETTER_IS_CORRECT.match(text) or _ANSWER_IS.search(text)
    if match:
        letter = next(letter for letter in match.groups() if letter).upper()
        if match.re is _ANSWER_IS and match.group(2) == "A" and re.match(r"\s+[a-z]", text[match.end() :]):
            # "Answer: A dog": "A" may be the article; the option the rest names, where it names exactly one.
            named = _options_named(text[match.end() :], options)
            return named[0] if len(named) == 1 else letter
        return letter
    found = _options_named(text, options)
    return found[0] if len(found) == 1 else None


def _options_named(text: str, options: dict[str, str]) -> list[str]:
    """The letters (upper case) of the options whose text appears in `text`, as words."""
    lowered = _normalise(text)
    return [letter.upper() for letter, option in options.items() if _contains_words(lowered, _normalise(option))]


def parse_option_pekit(answer: str) -> str | None:
    """The published harness's letter parser: the answer's first letter, else "a." / "a)" anywhere. It reads
    "A dog..." as A; it is kept to compare with numbers measured that way."""
    text = str(answer).strip().lower()
    if text.startswith("a"):
        return "A"
    if text.startswith("b"):
        return "B"
    if "a." in text or "a)" in text:
        return "A"
    if "b." in text or "b)" in text:
        return "B"
    return None


def _normalise(text: str) -> str:
    """Lower case, apostrophes dropped ("Casey's" == "Caseys"), everything else that is not a letter or digit
    turned into one space."""
    text = str(text).lower().replace("'", "").replace("\u2019", "")
    return " ".join(re.findall(r"[^\W_]+", text))


def _contains_words(haystack: str, needle: str) -> bool:
    return bool(needle) and re.search(rf"(?<![^\W_]){re.escape(needle)}(?![^\W_])", haystack) is not None


def names_in_caption(caption: str, names) -> set[str]:
    """The names that appear in `caption`: case-insensitive, apostrophes ignored, whole words, longest name
    first with its match removed, so "Casey" is not found inside "Casey's son"."""
    text = _normalise(caption)
    found = set()
    for name in sorted(set(names), key=lambda n: len(_normalise(n)), reverse=True):
        needle = _normalise(name)
        pattern = re.compile(rf"(?<![^\W_]){re.escape(needle)}(?![^\W_])") if needle else None
        if pattern is not None and pattern.search(text):
            found.add(name)
            text = pattern.sub(" | ", text)
    return found


def caption_recall(records) -> dict:
    """records: (names that should appear, names found) per caption. Micro recall over name occurrences (the
    published definition), the mean per-image recall, and the share of captions naming every target."""
    wanted = found = all_found = 0
    per_image = []
    for targets, named in records:
        targets, named = set(targets), set(named)
        hit = len(targets & named)
        wanted, found = wanted + len(targets), found + hit
        if targets:
            per_image.append(hit / len(targets))
            all_found += hit == len(targets)
    n = len(per_image)
    return {
        "recall": _ratio(found, wanted),
        "recall_mean_per_image": _mean(per_image),
        "all_names_rate": _ratio(all_found, n),
        "n": n,
        "n_names": wanted,
    }


def recognition_metrics(records, units) -> dict:
    """records: (truth set, predicted set) of units per test image, or (truth, predicted, asked set) where not every
    unit was asked about every image (`--limit`, an image asked about one concept): a unit not asked is no negative.
    Every aggregation variant by name:
    `macro_*` averages per-unit precision and recall over the units where each is defined (NaN excluded),
    `f1` = harmonic mean of those (the default compared with the paper), `macro_f1` = mean of per-unit F1,
    `micro_*` pools the counts, `weighted_accuracy` = mean of the positive and negative accuracies."""
    units = list(units)
    detected = dict.fromkeys(units, 0)
    gt = dict.fromkeys(units, 0)
    correct = dict.fromkeys(units, 0)
    true_negative = negative = 0
    for truth, predicted, *asked in records:
        truth, predicted = set(truth), set(predicted)
        for unit in units if not asked else [u for u in units if u in asked[0]]:
            detected[unit] += unit in predicted
            gt[unit] += unit in truth
            correct[unit] += unit in predicted and unit in truth
            if unit not in truth:
                negative += 1
                true_negative += unit not in predicted
    precision = {u: _ratio(correct[u], detected[u]) for u in units}
    recall = {u: _ratio(correct[u], gt[u]) for u in units}
    per_unit_f1 = {u: _harmonic(precision[u], recall[u]) for u in units if gt[u]}
    macro_p, macro_r = (
        _mean(v for v in precision.values() if v is not None),
        _mean(v for v in recall.values() if v is not None),
    )
    micro_p = _ratio(sum(correct.values()), sum(detected.values()))
    micro_r = _ratio(sum(correct.values()), sum(gt.values()))
    positive_accuracy = micro_r
    negative_accuracy = _ratio(true_negative, negative)
    return {
        "precision": macro_p,
        "recall": macro_r,
        "f1": _harmonic(macro_p, macro_r),
        "macro_f1": _mean(0.0 if v is None else v for v in per_unit_f1.values()),
        "macro_precision_undefined_as_zero": _mean(0.0 if v is None else v for v in precision.values()),
        "micro_precision": micro_p,
        "micro_recall": micro_r,
        "micro_f1": _harmonic(micro_p, micro_r),
        "weighted_accuracy": _mean(v for v in (positive_accuracy, negative_accuracy) if v is not None),
        "n_positive": sum(gt.values()),
        "n_negative": negative,
        "n_images": len(records),
        "per_unit": {u: {"detected": detected[u], "gt": gt[u], "correct": correct[u]} for u in units},
        "aggregation": "precision/recall: mean of per-unit values where defined; f1: their harmonic mean",
    }


def rejection_rate_all_questions(answers):
    """answers: (whether the concept asked about is in the image, whether the answer was "yes") per yes/no
    question. The share of the questions about an absent concept not answered "yes" (1 - the false-positive
    rate; an unparsed answer counts as "no"), over every such question. None when no question is about an absent
    concept."""
    absent = [said_yes for present, said_yes in answers if not present]
    return _ratio(sum(not said_yes for said_yes in absent), len(absent))


def targeted_rejection(answers) -> dict:
    """answers: (the concept an image is a targeted negative for, whether the answer about that concept was "yes")
    per image; in This-Is-My-Img, a Negative or Fake image of the folder <c> is labelled c. PeKit counts c as the
    image's label and, for these splits, reports 1 - its recall: per concept, the share of its images where c was
    not answered "yes", then the mean over concepts (`rejection_rate`). `rejection_rate_micro` pools the images."""
    per_concept: dict = {}
    for concept, said_yes in answers:
        per_concept.setdefault(concept, []).append(not said_yes)
    pooled = [rejected for values in per_concept.values() for rejected in values]
    return {
        "rejection_rate": _mean(sum(v) / len(v) for v in per_concept.values()),
        "rejection_rate_micro": _ratio(sum(pooled), len(pooled)),
    }


def accuracy(verdicts, groups=None) -> dict:
    """Micro accuracy over questions (None counts as wrong and is reported as unparsed), plus the mean of
    per-group accuracies when `groups` (one label per verdict) is given."""
    verdicts = list(verdicts)
    result = {
        "accuracy": _ratio(sum(v is True for v in verdicts), len(verdicts)),
        "n": len(verdicts),
        "unparsed": sum(v is None for v in verdicts),
    }
    if groups is not None:
        by_group: dict = {}
        for verdict, group in zip(verdicts, groups):
            by_group.setdefault(group, []).append(verdict is True)
        result["accuracy_mean_per_concept"] = _mean(sum(v) / len(v) for v in by_group.values())
    return result


def _ratio(a, b):
    return a / b if b else None


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def _harmonic(p, r):
    if p is None or r is None:
        return None
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)
