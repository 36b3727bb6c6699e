"""Scoring rules of the evaluation harness, on hand-made answers with hand-computed results."""

from __future__ import annotations

import pytest

from ego.evaluate import scoring
from ego.evaluate.judge import RuleJudge, read_verdict


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes.", True),
        ("yes", True),
        ("YES!", True),
        ("No, it is not.", False),
        ("no", False),
        ("I think yes, it is there", True),
        ("Well... no. Yes?", False),
        ("Certainly not", None),
        ("", None),
        ("Nope", None),
        ("Yesterday it was here", None),
    ],
)
def test_yes_no(answer, expected):
    assert scoring.parse_yes_no(answer) is expected


OPTIONS = {"A": "Cat", "B": "Dog"}


@pytest.mark.parametrize(
    "answer, strict, pekit",
    [
        ("B", "B", "B"),
        ("(A)", "A", "A"),
        ("A.", "A", "A"),
        ("B) Dog", "B", "B"),
        ("A: Cat", "A", "A"),
        ("The answer is B.", "B", "B"),
        ("Answer: a", "A", "A"),
        ("A dog sits on the mat.", "B", "A"),  # the article "A" is not the letter A
        ("a cat and a dog", None, "A"),
        ("I am not sure", None, None),
        ("It is a dog", "B", None),
        # After "answer is", a small letter followed by a word is the article, not option A.
        ("The answer is a dog.", "B", None),
        ("The answer is a **dog**.", "B", None),  # emphasis after the article: still the article
        ("A **dog**.", "B", "A"),  # the article, then the emphasised word (the published parser reads A)
        ("A **golden retriever** sits there", None, "A"),
        ('The answer is a "dog".', "B", None),
        ("The correct option is a dog", "B", None),
        ("Answer: a dog", "B", "A"),
        ("The answer is: B", "B", None),
        ("The answer is (a)", "A", "A"),
        ("The answer is B because it barks.", "B", None),
        ("Option a.", "A", "A"),
        # Markdown emphasis, quotes, and "B is correct": ours reads them; the published parser stays as it was.
        ("**B**", "B", None),
        ('"B"', "B", None),
        ("`A`", "A", None),
        ("“B”", "B", None),
        ("B is correct", "B", "B"),
        ("(b) is the right one", "B", "B"),
        ("The answer is **B**.", "B", None),
        ("**A dog** sits on the mat.", "B", None),  # still the article, and the dog
        ("A's owner holds a dog", "B", "A"),  # "A'" is no letter choice
        # After "answer:", a capital "A" and a word may be the article: the option the rest names decides.
        ("Answer: A dog", "B", "A"),
        ("Answer: A cat", "A", "A"),
        ("The answer is A because it purrs.", "A", None),  # no option named: the letter
    ],
)
def test_two_option_letters(answer, strict, pekit):
    assert scoring.parse_option(answer, OPTIONS) == strict
    assert scoring.parse_option_pekit(answer) == pekit


def test_caption_names_longest_first_and_apostrophes():
    names = ["Casey", "Caseys son", "H", "Parrot_1", "Bluey"]
    assert scoring.names_in_caption("Casey's son rides a board.", names) == {"Caseys son"}
    assert scoring.names_in_caption("Casey's son and Casey ride.", names) == {"Casey", "Caseys son"}
    assert scoring.names_in_caption("Hello there, bluey and PARROT_1!", names) == {"Bluey", "Parrot_1"}
    assert scoring.names_in_caption("An H on the wall", names) == {"H"}
    assert scoring.names_in_caption("Blueys are", names) == set()


def test_caption_recall():
    result = scoring.caption_recall([({"A", "B"}, {"A"}), ({"C"}, {"C", "A"})])
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["recall_mean_per_image"] == pytest.approx((0.5 + 1.0) / 2)
    assert result["all_names_rate"] == pytest.approx(0.5)
    assert result["n"] == 2 and result["n_names"] == 3


def test_recognition_variants_by_hand():
    records = [({"a"}, {"a"}), ({"a"}, set()), ({"b"}, {"a", "b"}), (set(), set())]
    m = scoring.recognition_metrics(records, ["a", "b"])
    # a: detected 2, truth 2, correct 1 -> P .5 R .5; b: detected 1, truth 1, correct 1 -> P 1 R 1
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75) and m["macro_f1"] == pytest.approx(0.75)
    assert m["micro_precision"] == pytest.approx(2 / 3) and m["micro_recall"] == pytest.approx(2 / 3)
    assert m["n_positive"] == 3 and m["n_negative"] == 5
    assert m["weighted_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_recognition_variants_differ_when_a_unit_is_never_detected():
    records = [({"a"}, set()), ({"a"}, set()), ({"b"}, {"b"})]
    m = scoring.recognition_metrics(records, ["a", "b"])
    assert m["precision"] == pytest.approx(1.0)  # a's precision is undefined: left out
    assert m["macro_precision_undefined_as_zero"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert m["macro_f1"] == pytest.approx(0.5)
    assert m["micro_precision"] == pytest.approx(1.0) and m["micro_recall"] == pytest.approx(1 / 3)


def test_rejection_rate_all_questions_is_the_share_of_absent_concepts_not_answered_yes():
    # (concept in the image, answered "yes"): the two questions about a present concept do not count
    answers = [(False, False), (False, True), (False, False), (True, True), (True, False)]
    assert scoring.rejection_rate_all_questions(answers) == pytest.approx(2 / 3)
    assert scoring.rejection_rate_all_questions([(True, True)]) is None


def test_targeted_rejection_is_pekits_inverted_recall_per_concept_then_averaged():
    # (the concept an image is labelled with, answered "yes" about it): a's 3 images, one fooled; b's one, fooled
    answers = [("a", False), ("a", True), ("a", False), ("b", True)]
    rates = scoring.targeted_rejection(answers)
    assert rates["rejection_rate"] == pytest.approx((2 / 3 + 0 / 1) / 2)  # PeKit: mean over concepts of 1 - recall
    assert rates["rejection_rate_micro"] == pytest.approx(2 / 4)
    assert scoring.targeted_rejection([]) == {"rejection_rate": None, "rejection_rate_micro": None}


def test_accuracy_counts_unparsed_as_wrong():
    m = scoring.accuracy([True, False, None, True], groups=["x", "x", "x", "y"])
    assert m["accuracy"] == pytest.approx(0.5) and m["n"] == 4 and m["unparsed"] == 1
    assert m["accuracy_mean_per_concept"] == pytest.approx((1 / 3 + 1) / 2)


def test_rule_judge_and_verdict_reading():
    judge = RuleJudge()
    assert judge("What color is Ann's ball?", "Orange", "It is orange.")[0] is True
    assert judge("What color is Ann's ball?", "Orange", "It is blue.")[0] is False
    assert judge("Q", "Gray shirt and arrow pointing right", "a gray shirt; the arrow points right")[0] is True
    assert judge("Q", "Gray shirt and arrow pointing right", "a gray shirt")[0] is False
    assert read_verdict("Yes.") is True and read_verdict("No") is False and read_verdict("Maybe") is None
    # A reference that is only yes or no: the prediction's own yes or no decides.
    assert judge("Is Bo wearing a hat?", "No.", "No, he is not.")[0] is True
    assert judge("Is Bo wearing a hat?", "No.", "Yes, a red one.")[0] is False
    assert judge("Is Bo wearing a hat?", "Yes", "yes")[0] is True and judge("Q", "Yes", "A hat.")[0] is None


def test_a_unit_not_asked_about_an_image_is_no_negative():
    """With the units asked per image (`--limit`, an image asked about one concept), only those count."""
    records = [({"a"}, {"a"}, {"a", "b"}), (set(), {"b"}, {"b"}), (set(), set(), {"a"})]
    m = scoring.recognition_metrics(records, ["a", "b"])
    assert m["n_positive"] == 1 and m["n_negative"] == 3  # b in the first two images, a in the third
    assert m["weighted_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)
    everything = scoring.recognition_metrics([(t, p) for t, p, _ in records], ["a", "b"])
    assert everything["n_negative"] == 5  # every unit of every image
