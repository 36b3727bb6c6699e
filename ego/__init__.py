"""Ego: training-free personalization of vision-language models (arXiv 2603.09771, CVPR 2026).

    from ego import Ego
    engine = Ego.from_pretrained("qwen2.5-vl-7b")
    chelsea = engine.introduce("Chelsea", ["chelsea1.jpg", "chelsea2.jpg"])
    print(engine.answer("Is Chelsea in this photo?", [chelsea], image="query.jpg"))
"""

from .engine import Answer, Ego, memory_size, select_concepts
from .errors import IncompatibleMemoryError, InputError, MemoryFileError, ModelBusyError
from .memory import Concept, ConceptView, load_concepts, read_concepts, save_concepts
from .presets import DEFAULT_PRESET, PRESETS
from .settings import DEFAULT_SETTINGS, Settings

__all__ = [
    "Answer", "Concept", "ConceptView", "DEFAULT_PRESET", "DEFAULT_SETTINGS", "Ego", "IncompatibleMemoryError",
    "InputError", "MemoryFileError", "ModelBusyError", "PRESETS", "Settings", "load_concepts", "memory_size",
    "read_concepts", "save_concepts", "select_concepts",
]
