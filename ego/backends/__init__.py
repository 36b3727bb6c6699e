"""Model families behind one small interface (`Backend`), and the registry that picks one.

Adding a family = one file with a `Backend` subclass + one entry in `_REGISTRY` below (and presets in
`ego/presets.py`). The method in `ego/engine.py` only talks to `Backend`.
"""

from __future__ import annotations

from .base import Backend

_REGISTRY: dict[str, str] = {
    # family name -> "module:Class"; model_type values are declared on the class.
    "qwen2-vl": "ego.backends.qwen:QwenBackend",
    "qwen2.5-vl": "ego.backends.qwen:QwenBackend",
    "qwen3-vl": "ego.backends.qwen:QwenBackend",
    "internvl3": "ego.backends.internvl:InternVLBackend",
}


def _load(target: str) -> type[Backend]:
    import importlib

    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def families() -> list[str]:
    return list(_REGISTRY)


def backend_for_family(family: str) -> type[Backend]:
    if family not in _REGISTRY:
        raise ValueError(f"Unknown model family {family!r}; known families: {', '.join(_REGISTRY)}.")
    return _load(_REGISTRY[family])


def backend_for_model_type(model_type: str) -> tuple[str, type[Backend]]:
    """(family, Backend class) for a transformers `config.model_type`."""
    for family, target in _REGISTRY.items():
        cls = _load(target)
        if model_type in cls.model_types.get(family, ()):
            return family, cls
    raise ValueError(
        f"Model type {model_type!r} is not supported; supported families: {', '.join(_REGISTRY)}."
    )


__all__ = ["Backend", "backend_for_family", "backend_for_model_type", "families"]
