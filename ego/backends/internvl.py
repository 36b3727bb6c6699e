"""InternVL3 (transformers' native `InternVLForConditionalGeneration`, the `-hf` checkpoints; no remote code).

The paper's main backbone is InternVL3-14B. How this family meets the method:

* Visual tokens. One 448x448 tile -> InternViT (14 px patches, 32x32 = 1024 patches + CLS, CLS dropped)
  -> pixel shuffle 0.5 (16x16 positions, 4x the channels) -> MLP projector: 256 rows in the LLM's
  embedding space, in raster order. Reference images are always ONE tile (`one_view`: `crop_to_patches=False`,
  the whole image resized to 448x448, whatever `reference_max_pixels` says), so N_r = 256 as in the paper
  (section 1.4: "448x448, tiling 1"), on one spatial 16x16 grid.
* Query images follow the pixel budget the engine passes (`Settings.query_image_max_pixels`): a budget
  of at most one tile gives one tile (the paper's protocol: its harness loads test images with
  `max_num=1`); a larger budget allows InternVL's native dynamic tiling with up to
  budget // 448^2 tiles plus the global thumbnail (the default 1024*28*28 px budget -> at most
  4 tiles + thumbnail = 1,280 tokens, close to Qwen2.5-VL's ~1,000). Set
  `query_image_max_pixels=448*448` to reproduce the paper exactly.
* Video: the processor's native video path with the frames as one (T, H, W, 3) uint8 array: each
  frame becomes one 448x448 tile written as "FrameN: <img>256 x <IMG_CONTEXT></img>", the layout the
  InternVL processor produces (InternVL's own multi-frame format; the paper does not say how it samples or
  lays out frames).
  The processor merges the frames into `pixel_values`, so the vision tower sees them as images.
* Positions: ordinary 1-D RoPE (a Qwen2 decoder); a soft prompt of K memory rows needs nothing special.
* Encoding once: InternVL's forward accepts `mm_encoder_outputs` (transformers 5.23), so
  `encode_vision` runs the vision tower + projector once and generate reuses the result; generate
  drops it after the prefill, and a continuation with a KV cache gets neither pixels nor outputs.

Concept-memory placeholder: `<|vision_pad|>`. The InternVL3 `-hf` tokenizers are the Qwen2.5-VL
tokenizer (transformers' conversion script loads `Qwen/Qwen2.5-VL-7B-Instruct`'s tokenizer) plus
`<img>`, `</img>`, `<IMG_CONTEXT>`, `<quad>`, `</quad>`, `<ref>`, `</ref>`, `<box>`, `</box>` (and
`<video>`, a named extra special token), so `<|vision_pad|>` exists in the real vocabulary (id 151654,
like in Qwen2.5) and is one token. InternVL never uses it: the processor only expands `<IMG_CONTEXT>`
(the image context token, which the model overwrites with image features, so it must NOT be the
placeholder) and `<video>`. (A tokenizer without it, e.g. an InternLM2-based InternVL2.5 `-hf`
conversion, which shares model_type "internvl", gets the first of `PLACEHOLDER_CANDIDATES` it has.)
The memory is wrapped in `<img>` ... `</img>` (the processor's start/end image tokens), InternVL's own
image delimiters, so the LLM reads it as (a few tokens of) visual content (the paper does not publish
its template; docs/method.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import Backend, Encoded

# The named tokens InternVLProcessor reads from the tokenizer (as in the real tokenizer_config.json).
INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# Memory placeholders in order of preference: tokens of the vocabulary that the processor never expands.
# InternVL3 (Qwen2.5 vocabulary) has the first; `-hf` conversions of other InternVL generations
# (e.g. InternLM2-based InternVL2.5) lack the Qwen tokens but have InternVL's grounding tokens.
PLACEHOLDER_CANDIDATES = ("<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<quad>", "<ref>", "<box>")


def pick_placeholder(tokenizer, exclude=()) -> str:
    """The first of PLACEHOLDER_CANDIDATES that is one token of `tokenizer`'s vocabulary and not reserved."""
    vocabulary = tokenizer.get_vocab()
    for token in PLACEHOLDER_CANDIDATES:
        if token in vocabulary and token not in exclude:
            return token
    raise ValueError(
        f"This tokenizer has none of {', '.join(PLACEHOLDER_CANDIDATES)}; "
        f"the InternVL backend needs one of them as the concept-memory placeholder."
    )


class InternVLBackend(Backend):
    model_types = {"internvl3": ("internvl",)}
    unquantized_modules = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    placeholder_token = "<|vision_pad|>"
    memory_open = "<img>"
    memory_close = "</img>"
    # The `internvl2_5` conversation template of the original (remote-code) InternVL3 checkpoints starts every
    # conversation with this system message; the `-hf` conversions' chat template has none.
    original_system_prompt = (
        "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
    )

    def __init__(self, model, processor, family: str):
        tokenizer = processor.tokenizer
        reserved = {getattr(processor, name, None) for name in ("image_token", "video_token")}
        reserved |= {getattr(tokenizer, name, None) for name in INTERNVL_NAMED_TOKENS}
        self.placeholder_token = pick_placeholder(tokenizer, exclude=reserved)
        self.memory_open = getattr(processor, "start_image_token", None) or type(self).memory_open
        self.memory_close = getattr(processor, "end_image_token", None) or type(self).memory_close
        super().__init__(model, processor, family)

    @property
    def special_strings(self) -> list[str]:
        # The strings the processor expands are control text even if a tokenizer did not register them.
        extra = {getattr(self.processor, name, None) for name in ("image_token", "video_token")}
        extra |= {getattr(self.tokenizer, name, None) for name in INTERNVL_NAMED_TOKENS}
        strings = set(super().special_strings) | {s for s in extra if s}
        return sorted(strings, key=len, reverse=True)

    # --- geometry ---------------------------------------------------------------------------------
    @property
    def tile_px(self) -> tuple[int, int]:
        """(height, width) of one tile, from the vision config (448 x 448 for InternVL3)."""
        size = self.model.config.vision_config.image_size
        return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))

    @property
    def tokens_per_tile(self) -> int:
        return int(self.processor.image_seq_length)

    def _tiles_for(self, max_pixels: int) -> int:
        height, width = self.tile_px
        return max(1, int(max_pixels) // (height * width))

    # --- vision -------------------------------------------------------------------------------------
    def encode(
        self, text, *, image=None, video=None, image_max_pixels, video_frame_max_pixels, one_view=False
    ) -> Encoded:
        height, width = self.tile_px
        size = {"height": height, "width": width}
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if image is not None:
            tiles = 1 if one_view else self._tiles_for(image_max_pixels)
            kwargs["images"] = [image]
            kwargs["images_kwargs"] = (
                {"size": size, "crop_to_patches": False}
                if tiles == 1
                else {"size": size, "crop_to_patches": True, "min_patches": 1, "max_patches": tiles}
            )
        if video is not None:
            frames = video[0] if isinstance(video, tuple) else video
            kwargs["videos"] = [frames]
            # Frames were sampled by ego.media already; each becomes one tile (InternVL has no per-frame budget).
            # Frames 1 or 3 pixels high would otherwise be read as channels first: (T, H, W, 3) always.
            kwargs["videos_kwargs"] = {"size": size, "do_sample_frames": False, "input_data_format": "channels_last"}
        inputs = dict(self.processor(**kwargs))
        inputs.pop("token_type_ids", None)
        ids = inputs["input_ids"][0]
        visual = ids == self.model.config.image_token_id
        return Encoded(inputs=inputs, visual_columns=visual.nonzero().squeeze(1))

    def encode_vision(self, encoded: Encoded) -> torch.Tensor:
        inputs, outputs = encoded.inputs, {}
        if "pixel_values" not in inputs:
            encoded.encoder_outputs = outputs
            return torch.zeros(0, self.model.config.text_config.hidden_size)
        device = self.model.get_input_embeddings().weight.device
        with torch.no_grad():
            outputs["image"] = self.model.get_image_features(
                pixel_values=inputs["pixel_values"].to(device),
                return_dict=True,
            )
        encoded.encoder_outputs = outputs
        features = outputs["image"].pooler_output  # [tiles or frames, 256, D]
        return features.reshape(-1, features.shape[-1])  # [N, D] projector output, the rows the LLM receives

    def grid(self, encoded: Encoded) -> tuple[int, int]:
        side = math.isqrt(self.tokens_per_tile)
        tiles = int(encoded.inputs["pixel_values"].shape[0]) if "pixel_values" in encoded.inputs else 1
        # One tile (reference images): the whole image resized to the tile, 16 x 16 tokens in raster order.
        # Several tiles: each tile's 16 x 16 block, tiles stacked top to bottom in processor order.
        return side * tiles, side

    def query_map(self, encoded: Encoded) -> tuple[torch.Tensor, tuple[int, int]] | None:
        # One tile: the image itself. Several: the processor appends a thumbnail of the whole image (the
        # image resized to one tile) after the crops; its 16 x 16 tokens are the map.
        tiles, per_tile = int(encoded.inputs["pixel_values"].shape[0]), self.tokens_per_tile
        side = math.isqrt(per_tile)
        first = (tiles - 1) * per_tile
        return torch.arange(first, first + per_tile), (side, side)
