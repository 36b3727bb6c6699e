"""The options the entry points share: one set of choices everywhere, read without regard to case, and an
environment variable's value checked like a typed one."""

import argparse

import pytest

from bench import harness
from ego import calibrate, options
from ego.evaluate import __main__ as evaluate
from ego.settings import DEFAULT_SETTINGS, Settings

EVALUATE_RUN = ["run", "--benchmark", "mydvlm", "--data", "d", "--model", "m", "--out", "o"]
CALIBRATE = ["--model", "m", "--images", "i", "--masks", "k"]


def _entry_points():
    """(name, parse) for each command line that loads a model with a quantization and a protocol."""
    return [
        ("bench", lambda extra: harness.parse_args(extra)),
        ("calibrate", lambda extra: calibrate._parser().parse_args(CALIBRATE + extra)),
        ("evaluate", lambda extra: evaluate._parser().parse_args(EVALUATE_RUN + extra)),
    ]


@pytest.mark.parametrize("name, parse", _entry_points())
def test_every_entry_point_takes_every_quantization_in_any_case(name, parse):
    for value in ("auto", "4bit", "8bit", "int4", "fp8", "none"):
        assert parse(["--quantization", value.upper()]).quantization == value
    assert parse([]).quantization == "auto"
    with pytest.raises(SystemExit):
        parse(["--quantization", "nf4"])


@pytest.mark.parametrize("name, parse", _entry_points()[1:])  # the benchmark measures the library's defaults
def test_the_protocol_gives_the_papers_settings_or_the_defaults(name, parse):
    assert options.protocol_settings(parse(["--protocol", "Paper"]).protocol) == Settings.paper()
    assert options.protocol_settings(parse([]).protocol) == DEFAULT_SETTINGS
    with pytest.raises(SystemExit):
        parse(["--protocol", "mine"])


def test_none_loads_unquantized_and_the_others_are_passed_on():
    assert options.quantization("none") is None
    assert options.quantization("int4") == "int4"


def test_a_default_from_the_environment_is_checked_like_a_typed_value(monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="demo")
    monkeypatch.setenv("DEMO_QUANTIZATION", "FP8")
    options.add_quantization(parser, env="DEMO_QUANTIZATION")
    args = parser.parse_args([])
    assert args.quantization == "fp8"
    options.check_environment(parser, args, {"quantization": ("DEMO_QUANTIZATION", options.QUANTIZATION_CHOICES)})

    monkeypatch.setenv("DEMO_QUANTIZATION", "nf4")
    parser = argparse.ArgumentParser(prog="demo")
    options.add_quantization(parser, env="DEMO_QUANTIZATION")
    args = parser.parse_args([])  # argparse does not check a default against the choices
    with pytest.raises(SystemExit):
        options.check_environment(parser, args, {"quantization": ("DEMO_QUANTIZATION", options.QUANTIZATION_CHOICES)})
    assert "DEMO_QUANTIZATION='nf4' is not one of auto, 4bit, 8bit, int4, fp8, none" in capsys.readouterr().err
    assert parser.parse_args(["--quantization", "none"]).quantization == "none"  # a typed value wins
