"""Model families behind one small interface (`Backend`), and the registry that picks one.

Adding a family = one file with a `Backend` subclass (its `model_types` names the families it serves) + one
entry in `BACKENDS` below (and presets in `ego/presets.py`; a random-weight builder in `ego/random_models/` for
the tests). The method in `ego/engine.py` only talks to `Backend`.
"""

from __future__ import annotations

import importlib

from .base import Backend

BACKENDS: tuple[str, ...] = (
    # "module:Class"; the families and their config.model_type values are declared on each class.
    "ego.backends.qwen:QwenBackend",
    "ego.backends.internvl:InternVLBackend",
)


def _classes() -> list[type[Backend]]:
    classes = []
    for target in BACKENDS:
        module_name, class_name = target.split(":")
        classes.append(getattr(importlib.import_module(module_name), class_name))
    return classes


def families() -> list[str]:
    return [family for cls in _classes() for family in cls.model_types]


def backend_for_family(family: str) -> type[Backend]:
    for cls in _classes():
        if family in cls.model_types:
            return cls
    raise ValueError(f"Unknown model family {family!r}; known families: {', '.join(families())}.")


def backend_for_model_type(model_type: str) -> tuple[str, type[Backend]]:
    """(family, Backend class) for a transformers `config.model_type`."""
    for cls in _classes():
        for family, model_types in cls.model_types.items():
            if model_type in model_types:
                return family, cls
    raise ValueError(f"Model type {model_type!r} is not supported; supported families: {', '.join(families())}.")


__all__ = ["BACKENDS", "Backend", "backend_for_family", "backend_for_model_type", "families"]
