"""Reading the model's answers: the size estimate and the keywords."""

import pytest
from conftest import FAMILIES, tiny_engine

from ego import DEFAULT_SETTINGS, prompts
from ego.engine import keyword_positions, memory_size


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("About 35%.", 35.0),
        ("35", 35.0),
        ("35-40 percent", 37.5),
        ("Between 20 and 30%", 25.0),
        ("between 20% and 30%", 25.0),
        ("The subject covers between 20% and 30% of the image.", 25.0),
        ("roughly 10 to 20 %", 15.0),
        ("It covers 15–25% of the frame.", 20.0),
        ("The subject covers 0.35 of the image.", 35.0),
        ("It covers 250% of the frame", 100.0),
        ("0%", 1.0),
        ("It covers about 60%.", 60.0),
        ("The subject covers 100% of the image.", 100.0),
        ("The subject covers approximately 100% of the image area.", 100.0),
        ("The subject covers about 30% of the image.", 30.0),
        ("The mug takes up roughly 12.5 percent of the picture.", 12.5),
        ("I estimate 45 per cent.", 45.0),
        ("The image is 1920x1080 and the dog covers 30%", 30.0),
        ("In this 448 x 448 photo the cat covers 20%.", 20.0),
        ("The photo is 640 pixels wide; the mug takes up 12%", 12.0),
        ("1 dog covers 30%", 30.0),
        ("There is 1 dog; it covers about 40", 40.0),
        ("2 cats sit on the sofa, together about 25% of the image", 25.0),
        ("1/3", 100 / 3),
        ("Approximately 1/3.", 100 / 3),  # a fraction that ends the sentence
        ("3/4.", 75.0),
        ("About 1/4 of the image.", 25.0),
        ("one-third", 100 / 3),
        ("It covers a third of the picture.", 100 / 3),
        ("roughly two thirds of the frame", 200 / 3),
        ("three-quarters", 75.0),
        ("About a quarter of the frame.", 25.0),
        ("fifteen percent", 15.0),
        ("Twenty-five percent.", 25.0),
        ("about seventy percent of the photo", 70.0),
        ("one hundred percent", 100.0),
        ("less than 10%", 5.0),
        ("The cup covers less than 5% of the image.", 2.5),
        ("It covers under 1%.", 1.0),
        ("more than 80%", 90.0),
        ("At least 60% of the frame.", 80.0),
        ("~40%", 40.0),
        ("Answer: 70", 70.0),
        ("The dog covers most of the image", 70.0),
        ("It fills almost all of the picture.", 90.0),
        ("About half.", 50.0),
        ("A small part of the photo", 10.0),
        ("The whole image", 100.0),
        # "cover" is not "over", "thunder" is not "under"
        ("The two birds cover 5% of the image.", 5.0),
        ("They cover about 8% of the image.", 8.0),
        ("The thunder cloud fills 40% of the sky.", 40.0),
        ("It is over 80%.", 90.0),
        # a hedged range is the range's middle, not its first number
        ("About 5% to 8%.", 6.5),
        ("approximately 20%-30%", 25.0),
        ("between about 10 and 20 percent", 15.0),
        # the question's wording repeated is not an answer; "out of 100" is a percentage
        ("Between 1 and 100, I would say 5.", 5.0),
        ("On a scale from 1 to 100: 35", 35.0),
        ("30 out of 100", 30.0),
        # a range inside a sentence is the range, whatever its unit
        ("The subject covers about 5% to 8% of the image.", 6.5),
        ("It covers approximately 20%-30% of the frame.", 25.0),
        ("The subject covers 60% to 70% of the image.", 65.0),
        ("It takes up less than 10% of the photo.", 5.0),
        # "one of" is not an amount
        ("The cat is one of the main subjects and covers most of the image.", 70.0),
        ("It is one of two mugs, about 15% of the frame.", 15.0),
        ("It covers one third of the picture.", 100 / 3),
        ("1/1", 100),  # the whole image: a fraction may equal 1
        ("It covers 2/2 of the image.", 100),
    ],
)
def test_size_answers_are_understood(answer, expected):
    assert prompts.parse_area_pct(answer) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("50パーセント", 50.0),
        ("約30パーセントです。", 30.0),
        ("Cubre un 50 por ciento de la imagen.", 50.0),
        ("Il couvre 40 pour cent de l'image.", 40.0),
        ("Etwa 25 Prozent.", 25.0),
        ("Около 60 процентов.", 60.0),
        ("20 процента", 20.0),
        ("Copre il 15 per cento.", 15.0),
        ("０.５％", 1.0),  # a full-width percent sign is a unit: half a percent, not half the image ("0.5")
        ("0.5٪ من الصورة", 1.0),
    ],
)
def test_size_answers_with_the_unit_of_another_language_are_understood(answer, expected):
    assert prompts.parse_area_pct(answer) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("answer", ["", "banana", "I cannot tell.", "<|im_end|>", "2 cats.", "The image is 1920x1080."])
def test_unreadable_size_answers_give_none(answer):
    assert prompts.parse_area_pct(answer) is None


@pytest.mark.parametrize(
    "answer",
    [
        "It covers about 6",  # "60%." cut after its first digit
        "The subject covers 1",  # "100%"
        "The subject covers about 30",  # "30%" or "300"? the cut hides it
        "between 20% and",  # a range without its end
        "It covers 12.",  # "12.5%"
        "about twenty",  # "twenty-five"
        "roughly 1/",
        "between 20% and 3",  # the range's end was being written
        "About 25% of the image is covered by the dog in the 2",  # the clause is still qualifying its number
    ],
)
def test_an_answer_cut_inside_a_number_is_unreadable(answer):
    assert prompts.parse_area_pct(answer, cut=True) is None
    value, source = prompts.read_area_pct(answer, True, 100.0)
    assert (value, source) == (100.0, "truncated")


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("The subject covers about 30% of the", 30.0),  # the number was complete before the cut
        ("It covers a third of the", 100 / 3),
        ("The dog covers most of the", 70.0),
        # a number stated in a clause that ended before the cut stands
        ("The dog covers about 30% of the image, which is a", 30.0),
        ("The dog covers about 40% of the image, with one", 40.0),
        ("It covers 15%. The rest is 8", 15.0),
    ],
)
def test_an_answer_cut_after_its_number_is_read(answer, expected):
    assert prompts.parse_area_pct(answer, cut=True) == pytest.approx(expected, abs=1e-3)
    assert prompts.read_area_pct(answer, True, 100.0) == (pytest.approx(expected, abs=1e-3), "model")


def test_an_answer_without_a_size_falls_back_and_says_so():
    assert prompts.read_area_pct("I cannot tell.", False, 100.0) == (100.0, "fallback")
    assert prompts.read_area_pct("I cannot tell whether the", True, 100.0) == (100.0, "fallback")
    assert prompts.read_area_pct("About 35%.", False, 100.0) == (35.0, "model")


def test_unreadable_size_falls_back_to_the_cap():
    from ego import DEFAULT_SETTINGS

    # The documented fallback: alpha = 100 %, so K_c = min(K, N_r).
    assert memory_size(DEFAULT_SETTINGS.area_pct_fallback, 256, 50) == 50
    assert memory_size(DEFAULT_SETTINGS.area_pct_fallback, 30, 50) == 30


@pytest.mark.parametrize(
    "area, n_r, cap, expected",
    [
        (100, 256, 50, 50),
        (10, 256, 50, 26),
        (1, 256, 50, 3),
        (1, 40, 50, 1),
        (0.5, 10, 50, 1),
        (50, 1, 50, 1),
        (25, 10, 50, 3),  # 2.5 rounds half up
    ],
)
def test_eq4(area, n_r, cap, expected):
    assert memory_size(area, n_r, cap) == expected


def test_content_words_drop_punctuation_stopwords_and_photo_talk():
    text = "The image shows a fluffy tabby cat with green eyes, sitting on the red chair."
    assert prompts.content_words(text) == ["fluffy", "tabby", "cat", "green", "eyes", "sitting", "red", "chair"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("एक भूरी बिल्ली", ["एक", "भूरी", "बिल्ली"]),  # Hindi: vowel signs (Mc, Mn) and a virama inside words
        ("แมวสีส้ม ตาสีเขียว", ["แมวสีส้ม", "ตาสีเขียว"]),  # Thai: vowels and tone marks above and below
        ("A cafe\u0301 mug", ["cafe\u0301", "mug"]),  # a combining accent stays on its letter
        ("Ein Café in Köln", ["ein", "café", "köln"]),  # precomposed letters, as before
    ],
)
def test_combining_marks_belong_to_their_word(text, words):
    assert prompts.content_words(text) == words
    assert [text[a:b].lower() for a, b in prompts.word_spans(text, content_only=True)] == words


def test_a_typographic_apostrophe_is_no_keyword_either():
    for text in ("It's a dog on the grass.", "It’s a dog on the grass."):
        assert prompts.content_words(text) == ["dog", "grass"]
        assert [text[a:b] for a, b in prompts.word_spans(text, content_only=True)] == ["dog", "grass"]


def test_keyword_tokens_spell_exactly_the_content_words():
    tokenizer = tiny_engine("qwen2-vl").backend.tokenizer
    text = "A red ceramic mug with a handle."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    positions, words = keyword_positions(tokenizer, ids, content_only=True)
    assert words == ["red", "ceramic", "mug", "handle"]
    spelled = "".join(tokenizer.decode([ids[i]]) for i in positions).split()
    assert spelled == ["red", "ceramic", "mug", "handle"]


@pytest.mark.parametrize("word", ["café", "Кошка", "柴犬", "बिल्ली", "ส้ม", "cafe\u0301"])
def test_every_byte_token_of_a_keyword_spells_it(word):
    """A character the byte-level tokenizer splits over several tokens ("é", "К", "柴") is spelled by all of
    them: the kept tokens are exactly those whose bytes overlap a content word's bytes. So are the vowel signs and
    viramas of Devanagari, Thai tone marks and a combining accent: marks belong to their word."""
    import re

    tokenizer = tiny_engine("qwen2-vl").backend.tokenizer
    text = f"A grey {word} mug."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    positions, words = keyword_positions(tokenizer, ids, content_only=True)
    assert words == ["grey", word.lower(), "mug"]
    encoded = text.encode("utf-8")
    word_bytes = [
        (len(text[: m.start()].encode("utf-8")), len(text[: m.end()].encode("utf-8")))
        for m in re.finditer(r"grey|mug|" + re.escape(word), text)
    ]
    expected, offset = [], 0
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        size = len(_token_bytes(token))
        if any(offset < end and start < offset + size for start, end in word_bytes):
            expected.append(index)
        offset += size
    assert offset == len(encoded) and positions == expected


def _token_bytes(token: str) -> bytes:
    """A byte-level BPE token's bytes (each character of its string stands for one byte)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    return bytes(byte_of[char] for char in token)


def test_description_without_content_words_falls_back_to_all_words_then_all_tokens():
    tokenizer = tiny_engine("qwen2-vl").backend.tokenizer
    ids = tokenizer("it is the one.", add_special_tokens=False).input_ids
    positions, words = keyword_positions(tokenizer, ids, content_only=True)
    assert words == ["it", "is", "the", "one"] and len(positions) == 4
    punctuation = tokenizer("...", add_special_tokens=False).input_ids
    positions, words = keyword_positions(tokenizer, punctuation, content_only=True)
    assert positions == list(range(len(punctuation))) and words == []


def test_neutralize_breaks_every_special_token():
    specials = ["<|im_end|>", "<|vision_pad|>"]
    text = prompts.neutralize("hi <|im_end|> and <|vision_pad|>", specials)
    assert all(s not in text for s in specials)
    assert text.replace("\u200b", "") == "hi <|im_end|> and <|vision_pad|>"


# Qwen2 / Qwen2.5 / Qwen3 (and InternVL3, which uses Qwen2.5's tokenizer) split text before BPE with this
# pattern: one piece per digit. Every piece is at least one token, and an English word of the sentence one.
_QWEN_PRETOKENIZER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LONG_SIZE_ANSWERS = [
    "The subject covers approximately 100% of the image area.",
    "I would estimate that the subject covers about 100 percent of the image.",
    "The subject covers between 100% and 100% of the image.",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_size_cap_fits_a_full_sentence_with_a_three_digit_number(family):
    from tokenizers import Regex, pre_tokenizers

    cap = DEFAULT_SETTINGS.size_max_new_tokens
    split = pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZER), behavior="isolated")
    tokenizer = tiny_engine(family).backend.tokenizer
    for answer in _LONG_SIZE_ANSWERS:
        pieces = split.pre_tokenize_str(answer)
        assert sum(piece.isdigit() for piece, _ in pieces) >= 3
        assert len(pieces) + 1 <= cap  # the sentence and its stop token, in the real vocabularies
        assert len(tokenizer(answer, add_special_tokens=False).input_ids) + 1 <= cap
