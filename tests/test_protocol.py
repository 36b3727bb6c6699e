"""The paper's protocol (`Settings.paper()`) beside our defaults: each choice switchable on its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import bigram_engine, generate_call, photo, tiny_engine

from ego import DEFAULT_SETTINGS, Settings

ROOT = Path(__file__).resolve().parent.parent


def test_the_paper_protocol_holds_the_papers_known_choices():
    paper = Settings.paper()
    assert paper.query_image_max_pixels == 448 * 448
    assert paper.model_quantization is None  # bf16, no quantization
    assert paper.description_max_new_tokens == 50
    assert paper.keywords_drop_stopwords is False
    assert paper.system_prompt == "original" and paper.memory_prompt == "neutral"
    assert paper.k_cap_tokens == DEFAULT_SETTINGS.k_cap_tokens == 50
    assert Settings.paper(k_cap_tokens=30).k_cap_tokens == 30
    ours = DEFAULT_SETTINGS
    assert (ours.keywords_drop_stopwords, ours.system_prompt, ours.memory_prompt) == (True, "template", "name")


@pytest.mark.parametrize(
    "field, value", [("memory_prompt", "polite"), ("system_prompt", "mine"), ("model_quantization", "2bit")]
)
def test_an_unknown_choice_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        Settings(**{field: value})


def _image_tokens(engine, picture) -> int:
    generate = generate_call(engine, "What is this?", [], image=picture)
    return int((generate["input_ids"] == engine.model.config.image_token_id).sum())


def test_internvl_queries_are_one_448_tile_under_the_paper_protocol():
    engine = tiny_engine("internvl3")
    big = photo(3, size=(900, 900))
    paper = engine.with_settings(query_image_max_pixels=Settings.paper().query_image_max_pixels)
    assert _image_tokens(paper, big) == engine.backend.tokens_per_tile == 256
    assert _image_tokens(engine, big) > 256  # ours: a few tiles and the thumbnail


def test_the_original_system_prompt_opens_internvl_prompts_under_the_paper_protocol():
    engine = tiny_engine("internvl3")
    original = engine.backend.original_system_prompt
    assert original.startswith("你是书生·万象")
    paper = engine.with_settings(system_prompt="original")
    assert _prompt(paper).startswith(f"<|im_start|>system\n{original}<|im_end|>")
    assert original not in _prompt(engine)
    qwen = tiny_engine("qwen2.5-vl")  # its template's own system prompt is the original's
    assert _prompt(qwen.with_settings(system_prompt="original")) == _prompt(qwen)


def _prompt(engine) -> str:
    """The text of the prompt `engine.answer` gives the model for a plain question."""
    return engine.backend.tokenizer.decode(generate_call(engine, "hi")["input_ids"][0])


def test_the_neutral_memory_prompt_asks_nothing():
    engine = tiny_engine("qwen2.5-vl")
    concept = engine.introduce("Rex", [photo(2)], area_pct=2)
    tokenizer = engine.backend.tokenizer

    def context(settings_engine) -> str:
        ids = generate_call(settings_engine, "Who?", [concept], image=None)["input_ids"][0]
        return tokenizer.decode(ids)

    assert "call it by its name" in context(engine)
    neutral = context(engine.with_settings(memory_prompt="neutral"))
    assert "call it by its name" not in neutral and "Rex: " in neutral


def test_paper_keywords_keep_every_word_and_drop_only_punctuation():
    engine = bigram_engine("internvl3", "the mop.").with_settings(description_max_new_tokens=10, size_max_new_tokens=2)
    ours = engine.introduce("Mop", [photo(1)]).views[0]
    paper = engine.with_settings(keywords_drop_stopwords=False).introduce("Mop", [photo(1)]).views[0]
    assert ours.description == paper.description == "the mop."
    assert ours.keywords == ("mop",)
    assert paper.keywords == ("the", "mop")


def test_the_commands_take_the_paper_protocol(monkeypatch):
    import app
    from ego import Ego
    from ego.calibrate import main

    assert app.parse_args(["--protocol", "paper"]).protocol == "paper"
    assert app.parse_args([]).protocol == "ours"
    loaded = {}

    def record(cls, model, **kwargs):
        loaded.update(kwargs)
        raise SystemExit(0)  # the settings are all this test needs; no model is loaded

    monkeypatch.setattr(Ego, "from_pretrained", classmethod(record))
    folder = str(ROOT / "examples" / "calibration")
    with pytest.raises(SystemExit):
        main(["--model", "m", "--images", f"{folder}/images", "--masks", f"{folder}/masks", "--protocol", "paper"])
    assert loaded["settings"] == Settings.paper()
