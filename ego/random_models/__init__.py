"""Random-weight models of the real architectures, built fully offline: tiny ones for tests, real-size ones
for the benchmark (`ego.random_models.architectures`).

Why: model weights cannot be downloaded on the machines that run the tests, and a fake model would
not exercise the real code path. A tiny model of the real class, with a byte-level BPE tokenizer
trained on the fly that carries the real special tokens and the real processor classes, goes through
exactly the same engine code as a 7B checkpoint. Its answers are gibberish; its tensors, shapes,
positions and attention are real. The tiny presets (`tiny-qwen2.5-vl`, ...) and `Ego.tiny` load them.

Nothing here is part of the runtime interface: the engine and the backends never build models. A family
is buildable once its module here (one `build(family, overrides)` per model family) is listed in `BUILDERS`.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import internvl, qwen

BUILDERS: dict[str, Callable[[str, dict], tuple[Any, Any]]] = {
    family: module.build for module in (qwen, internvl) for family in module.FAMILIES
}
"""family -> its builder: (family, overrides) -> (model, processor) of the real classes with random weights."""


def build_random(family: str, overrides: dict | None = None) -> tuple[Any, Any]:
    """(model, processor) of `family`'s real classes with random weights: tiny unless `overrides`
    ({"text_config": {...}, "vision_config": {...}}) give real dimensions."""
    if family not in BUILDERS:
        raise ValueError(f"No random-model builder for family {family!r}; known: {', '.join(BUILDERS)}.")
    return BUILDERS[family](family, overrides or {})


def save_tiny(family: str, directory: str | Path, *, seed: int = 0, overrides: dict | None = None) -> Path:
    """Build the tiny model of `family` and save model + processor to `directory` (from_pretrained-ready)."""
    directory = Path(directory)
    torch.manual_seed(seed)
    model, processor = build_random(family, overrides)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    (directory / "ego_tiny.json").write_text(json.dumps({"family": family, "seed": seed}))
    return directory


def tiny_checkpoint(family: str, seed: int = 0) -> Path:
    """A cached on-disk tiny checkpoint per (family, seed) for this process."""
    return _tiny_checkpoint_cached(family, seed)


@functools.lru_cache(maxsize=16)
def _tiny_checkpoint_cached(family: str, seed: int) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=f"ego-tiny-{family}-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)  # a temporary model, gone with the process
    return save_tiny(family, directory, seed=seed)
