"""The command-line options every entry point shares (`python app.py`, `python -m bench`, `python -m ego.evaluate`,
`python -m ego.calibrate`): one spelling, one set of choices and one help text each, read without regard to case.

An option may take its default from an environment variable (the Space's `EGO_QUANTIZATION`, ...): argparse checks
a typed value against the choices but not a default, so `check_environment` checks those after parsing.
"""

from __future__ import annotations

import argparse
import os

from .settings import DEFAULT_SETTINGS, QUANTIZATIONS, Settings

QUANTIZATION_CHOICES = tuple(q or "none" for q in QUANTIZATIONS)
"""`--quantization`'s values: `Settings.model_quantization`'s, with "none" for None."""

PROTOCOLS = ("ours", "paper")
"""`--protocol`'s values: the library's defaults, or the settings the paper states (`Settings.paper()`)."""


def _default(env: str | None, fallback: str) -> str:
    return (os.environ.get(env) if env else None) or fallback


def _env_note(env: str | None) -> str:
    return f" (env {env})" if env else ""


def add_quantization(parser: argparse.ArgumentParser, *, env: str | None = None) -> None:
    parser.add_argument(
        "--quantization",
        type=str.lower,
        choices=QUANTIZATION_CHOICES,
        default=_default(env, "auto"),
        help="auto: 4-bit NF4 on a GPU, unquantized elsewhere; int4 (torchao) and fp8 load only on a GPU; none: "
        f"the model's own dtype (ego.quantization){_env_note(env)}",
    )


def add_protocol(parser: argparse.ArgumentParser, *, env: str | None = None) -> None:
    parser.add_argument(
        "--protocol",
        type=str.lower,
        choices=PROTOCOLS,
        default=_default(env, "ours"),
        help="paper: the paper's choices (Settings.paper(): one 448x448 query tile, bf16, a 50-token description, "
        f"punctuation-only keywords, the model's original system prompt); ours: the library's defaults{_env_note(env)}",
    )


def quantization(value: str):
    """What `Ego.from_pretrained(quantization=...)` takes for an option's value: None for "none"."""
    return None if value == "none" else value


def protocol_settings(protocol: str) -> Settings:
    """The engine's settings of a `--protocol` value."""
    return Settings.paper() if protocol == "paper" else DEFAULT_SETTINGS


def check_environment(parser: argparse.ArgumentParser, args: argparse.Namespace, envs: dict) -> None:
    """Exits through `parser.error` with a sentence when an option's value came from its environment variable and is
    not one of its choices; `envs`: option name -> (variable, choices)."""
    for option, (variable, choices) in envs.items():
        if getattr(args, option) not in choices:
            parser.error(
                f"{variable}={os.environ.get(variable)!r} is not one of {', '.join(choices)}; "
                "set it to one of them, or unset it"
            )
