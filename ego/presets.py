"""Named models. Each preset says which checkpoint, which family, and which layers L score attention.

Layers: the paper calibrated L once per backbone on COCO single-instance masks; for InternVL3-14B
(48 text layers) it reports layers 29, 30, 35, 36, 39. Until a preset is calibrated with
`python -m ego.calibrate`, it uses those layers scaled to its own depth (`depth_scaled_layers`), and
says so in `layers_note`.

Index base: every layer index in Ego is 0-based over the decoder layers (index 0 = the first transformer
block; the order of transformers' `output_attentions` tuple and of `model.model.language_model.layers`).
The paper's numbers are read the same way: attention maps, not hidden states, are what its calibration
ranks, and `output_attentions` has no embedding entry (a `hidden_states` tuple would be offset by one).
Both readings fit in 48 layers, and the paper's picks come in neighbouring pairs (29/30, 35/36), so an
off-by-one would land on layers of similar quality; `python -m ego.calibrate` settles it on real weights.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

PAPER_LAYERS = (29, 30, 35, 36, 39)
PAPER_DEPTH = 48
"""InternVL3-14B's calibrated layers and its number of text layers (indices read as 0-based)."""

UNCALIBRATED = (
    "depth-scaled, not calibrated: the paper's InternVL3-14B layers (29, 30, 35, 36, 39 of 48) at the same "
    "relative depth of this model; calibrate them with `python -m ego.calibrate`"
)
TINY_UNCALIBRATED = "tiny random model: depth-scaled, not calibrated"

PAPER_LAYERS_NOTE = (
    "the paper's calibration for InternVL3-14B (Appendix B.2): layers 29, 30, 35, 36, 39 of its 48 LLM layers, read "
    "as 0-based indices of the decoder layers (the order of the `output_attentions` tuple; index 0 = first decoder "
    "layer, no embedding entry); recompute with `python -m ego.calibrate`"
)


def depth_scaled_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's layers at the same relative depth in a model with `num_layers` text layers."""
    scaled = {min(num_layers - 1, max(0, int(layer * num_layers / PAPER_DEPTH + 0.5))) for layer in PAPER_LAYERS}
    return tuple(sorted(scaled))


@dataclass(frozen=True)
class Preset:
    name: str
    model_id: str
    family: str
    layers: tuple[int, ...] | None = None
    """Calibrated layers, or None for the depth-scaled default computed from the loaded config."""
    layers_note: str = UNCALIBRATED
    tiny: bool = False


DEFAULT_PRESET = "qwen2.5-vl-7b"
"""The model on a machine with a CUDA GPU: Qwen2.5-VL-7B, 4-bit NF4 (about 6.4 GiB of weights)."""
CPU_DEFAULT_PRESET = "qwen2-vl-2b"
"""The model on a machine without one. Unquantized on a CPU the 7B holds about 16 GB of memory and takes
minutes per answer. Qwen2-VL-2B (a 1.5B language model and a 0.7B vision tower, about 4.4 GB in bf16) is the
smallest Qwen checkpoint: the same backend as the default, the same dynamic-resolution visual tokens (a
448x448 reference photo is 256 tokens, as in the paper), and about a quarter of the 7B's work per token.
InternVL3-1B is smaller still, but its 0.5B language model is the weaker reader of the description and size
prompts the method depends on, and a query photo there is up to 1,280 tokens (four tiles and a thumbnail)."""


def default_preset(cuda_available: bool | None = None) -> str:
    """The preset served when none is named: the 7B on a CUDA machine, the small one on a CPU-only one."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return DEFAULT_PRESET if cuda_available else CPU_DEFAULT_PRESET


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl"),
        Preset("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl"),
        Preset("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", "qwen2-vl"),
        Preset("qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct", "qwen3-vl"),
        Preset("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct", "qwen3-vl"),
        Preset(
            "internvl3-14b",
            "OpenGVLab/InternVL3-14B-hf",
            "internvl3",
            layers=PAPER_LAYERS,
            layers_note=PAPER_LAYERS_NOTE,
        ),
        Preset("internvl3-8b", "OpenGVLab/InternVL3-8B-hf", "internvl3"),
        Preset("internvl3-2b", "OpenGVLab/InternVL3-2B-hf", "internvl3"),
        Preset("internvl3-1b", "OpenGVLab/InternVL3-1B-hf", "internvl3"),
        Preset("tiny-qwen2-vl", "tiny-qwen2-vl", "qwen2-vl", layers_note=TINY_UNCALIBRATED, tiny=True),
        Preset("tiny-qwen2.5-vl", "tiny-qwen2.5-vl", "qwen2.5-vl", layers_note=TINY_UNCALIBRATED, tiny=True),
        Preset("tiny-qwen3-vl", "tiny-qwen3-vl", "qwen3-vl", layers_note=TINY_UNCALIBRATED, tiny=True),
        Preset("tiny-internvl3", "tiny-internvl3", "internvl3", layers_note=TINY_UNCALIBRATED, tiny=True),
    ]
}


def resolve(name: str) -> Preset | None:
    return PRESETS.get(name.strip().lower())


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""A Hub repository id: owner/name (a local folder is looked for first)."""


def check_model_name(model) -> None:
    """ValueError, with the closest presets, for a model that is neither a preset, a local folder, nor a Hub id
    (owner/name): a mistyped preset stops here, not at a download that cannot find it."""
    text = str(model)
    if resolve(text) is not None or Path(text).expanduser().is_dir() or HUB_ID.fullmatch(text.strip()):
        return
    close = difflib.get_close_matches(text.strip().lower(), list(PRESETS), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ValueError(
        f"{text!r} is not a preset, a folder on this machine or a Hub id (owner/name); {hint}"
        f"the presets are {', '.join(PRESETS)}."
    )


def layers_summary(model: str | None) -> str:
    """A short line for the Space's header: whether `model`'s attention layers L are calibrated."""
    preset = resolve(model) if model else None
    if preset is not None and preset.layers is not None:
        return "attention layers: the paper's calibration"
    return "attention layers: depth-scaled from the paper's, not calibrated for this model"
