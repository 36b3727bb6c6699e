"""The interface between the method (ego/engine.py) and a model family.

A backend knows how its family builds prompts, runs its processor, encodes images with its own vision
tower + projector, and which token stands in for a concept-memory row. It knows nothing about the
method: no keywords, no attention, no selection.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class Encoded:
    """Processor output for one prompt, plus what the method needs to find things in it."""

    inputs: dict[str, Any]
    """Every tensor the processor returned (input_ids [1, L], attention_mask, pixel values, grids, ...)."""
    visual_columns: torch.Tensor
    """Positions of the query image's (or video's) visual tokens in input_ids, LongTensor [N]."""
    encoder_outputs: dict[str, Any] | None = None
    """Vision-tower outputs computed once and reused by generate (never encode an image twice)."""
    prompt: str = ""
    """The chat text the processor was given: with the same image or video, it gives the same tensors again."""


class Backend(abc.ABC):
    """One model family. Subclasses fill in the abstract, family-specific parts and override a default only
    where their family differs."""

    model_types: ClassVar[dict[str, tuple[str, ...]]] = {}
    """family name -> transformers config.model_type values it serves."""

    unquantized_modules: ClassVar[tuple[str, ...]] = ("lm_head",)
    """Full module paths kept out of 4/8-bit quantization (the vision tower and lm_head)."""

    placeholder_token: ClassVar[str]
    """Token whose input embeddings are replaced by concept-memory rows."""
    memory_open: ClassVar[str] = ""
    memory_close: ClassVar[str] = ""
    """Text around a memory's placeholders, so the model reads them as visual content."""
    vision_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    """Processor outputs only the vision tower reads: left out of generate once its outputs are kept."""
    prefill_only_inputs: ClassVar[tuple[str, ...]] = ()
    """Inputs of generate that only the prefill reads and transformers still hands every decode step (a photo's or a
    clip's grid sizes): compiled decoding leaves them out of the steps, whose graph would otherwise differ between
    a photo and a clip (`ego.decoding.Decoder`)."""

    def __init__(self, model, processor, family: str):
        self.model = model
        self.processor = processor
        self.family = family
        self.tokenizer = processor.tokenizer
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(self.placeholder_token)

    # --- text ---------------------------------------------------------------------------------
    @property
    def special_strings(self) -> list[str]:
        """Every added/special token string; visitor text must never contain one verbatim."""
        return sorted({t.content for t in self.tokenizer.added_tokens_decoder.values()}, key=len, reverse=True)

    @property
    def stop_token_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return [i for i in ids if i is not None]

    @property
    def unspeakable_token_ids(self) -> list[int]:
        """Tokens a model must never generate: a generated image/video/memory placeholder would be read
        back as a slot for visual features that do not exist."""
        ids = {self.placeholder_id}
        for name in ("image_token_id", "video_token_id", "image_token_index", "video_token_index"):
            value = getattr(self.model.config, name, None)
            if isinstance(value, int):
                ids.add(value)
        return sorted(ids)

    original_system_prompt: str | None = None
    """The default system prompt of the model's original release, where the checkpoint's chat template has
    a different one (or none); None when the template already carries the original's."""

    def chat_text(self, content: list[dict], *, original_system: bool = False) -> str:
        """The prompt for one user turn (`content`: text/image/video blocks) ending in the generation prompt;
        with `original_system`, preceded by `original_system_prompt` (if the family has one)."""
        messages = [{"role": "user", "content": content}]
        if original_system and self.original_system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.original_system_prompt}]})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def continue_turn(self, question: str) -> str:
        """Text that closes the assistant's answer and asks a follow-up in the same conversation (ChatML, the
        chat format of every family so far)."""
        return f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"

    def save_positions(self) -> Any:
        """Position state the model keeps on itself after a generate and reads to continue from a cache (None
        when the family keeps none). A conversation saves it after each answer and restores it before its next
        cached question, since another conversation's generate in between overwrites it."""
        return None

    def restore_positions(self, saved: Any) -> None:
        """Put back what `save_positions` returned (a family that keeps nothing has nothing to put back)."""
        return None

    def row_positions(self, saved: Any, row: int) -> Any:
        """Row `row` of what `save_positions` returned after a batch's generate: that row's conversation continues
        from it alone (a family that keeps nothing has nothing to take)."""
        return None

    def stack_positions(self, saved: Sequence[Any]) -> Any:
        """What `save_positions` returned for several conversations, as one batch's (rows in order), for their
        follow-ups answered together (a family that keeps nothing has nothing to stack)."""
        return None

    # --- vision -------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(
        self,
        text: str,
        *,
        image=None,
        video=None,
        image_max_pixels: int,
        video_frame_max_pixels: int,
        one_view: bool = False,
    ) -> Encoded:
        """Run the processor on one prompt with at most one image or one video ((frames, metadata)). one_view: the
        image as one view of the whole of it, never tiled (a reference image: one grid of visual tokens)."""

    @abc.abstractmethod
    def encode_vision(self, encoded: Encoded) -> torch.Tensor:
        """Run the vision tower + projector once; keep its output for generate; return the rows [N, D]."""

    @abc.abstractmethod
    def grid(self, encoded: Encoded) -> tuple[int, int]:
        """(rows, cols) of the image's visual tokens in raster order."""

    def generate_kwargs(self, encoded: Encoded) -> dict[str, Any]:
        """Everything generate needs besides input_ids / inputs_embeds: the processor's tensors on the model's
        device and, once `encode_vision` kept the vision tower's outputs, those instead of the pixels."""
        skip = {"input_ids", *self.vision_input_keys} if encoded.encoder_outputs else {"input_ids"}
        device = self.model.get_input_embeddings().weight.device
        kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in encoded.inputs.items() if k not in skip}
        if encoded.encoder_outputs:
            kwargs["mm_encoder_outputs"] = dict(encoded.encoder_outputs)
        return kwargs

    def query_map(self, encoded: Encoded) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """For a prompt whose visual input is one image: the rows of `encode_vision`'s output that cover the
        whole image in raster order (LongTensor [rows * cols]) and (rows, cols); None if the family has no
        such map."""
        return None

    # --- residuals: visual features a family adds inside its language model ----------------------
    @property
    def residual_levels(self) -> int:
        """How many per-token features the language model adds at visual positions after its first
        layers (Qwen3-VL's deepstack: 3 on the real models); 0 for families that feed visual tokens once."""
        return 0

    def residual_rows(self, encoded: Encoded) -> torch.Tensor | None:
        """Those features for the image last run through `encode_vision`: [levels, N, D] in the order of
        its rows, or None when the family has none."""
        return None

    def memory_residuals(self, slots: torch.Tensor, residuals: torch.Tensor | None):
        """A context manager: a generate call inside it gets `residuals` [levels, M, D] added at the memory
        slots (bool [1, L], M of them True) the way the family adds them at an image's positions."""
        return contextlib.nullcontext()
