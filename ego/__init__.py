"""Ego: training-free personalization of vision-language models (arXiv 2603.09771, CVPR 2026).

    from ego import Ego
    engine = Ego.from_pretrained("qwen2.5-vl-7b")
    chelsea = engine.introduce("Chelsea", ["chelsea1.jpg", "chelsea2.jpg"])
    print(engine.answer("Is Chelsea in this photo?", [chelsea], image="query.jpg"))

Names are imported lazily, so `import ego` (and `import app`) stays cheap until a model is needed.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AnswerRequest": "batching",
    "FollowUpRequest": "batching",
    "Answer": "engine",
    "Chat": "engine",
    "Ego": "engine",
    "memory_size": "engine",
    "select_concepts": "engine",
    "similarity_to_query": "engine",
    "ConversationFullError": "errors",
    "IncompatibleMemoryError": "errors",
    "InputError": "errors",
    "MemoryFileError": "errors",
    "ModelBusyError": "errors",
    "Concept": "memory",
    "ConceptView": "memory",
    "load_concepts": "memory",
    "read_concepts": "memory",
    "read_thumbnails": "memory",
    "save_concepts": "memory",
    "DEFAULT_PRESET": "presets",
    "CPU_DEFAULT_PRESET": "presets",
    "PRESETS": "presets",
    "DEFAULT_SETTINGS": "settings",
    "Settings": "settings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ego' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
