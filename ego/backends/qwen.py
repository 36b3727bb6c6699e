"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers' native classes, no remote code).

Visual tokens: the merger output, one token per 2x2 patch block (28x28 px for Qwen2/2.5, 32x32 px
for Qwen3). Positions: 3-D M-RoPE computed by generate from input_ids + mm_token_type_ids + grids,
which is why generate always receives input_ids next to inputs_embeds. Concept-memory placeholders
are `<|vision_pad|>`: in the real vocabularies, never expanded by the processors, typed as text
(mm_token_type_ids 0), so they take ordinary 1-D positions like the paper's InternVL soft prompts.

Qwen3-VL adds "deepstack" features (from three depths of its vision tower, each through its own merger)
to the hidden states of its first three decoder layers at the visual positions. A token's projector
output alone is therefore not all the model receives for it: a Qwen3-VL memory also keeps the deepstack
features of its kept tokens (`Concept.residuals`), and a pre-hook on the language model adds them at the
memory's positions, next to the query image's own, exactly as the model does for an image.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from .base import Backend, Encoded


class QwenBackend(Backend):
    model_types = {
        "qwen2-vl": ("qwen2_vl",),
        "qwen2.5-vl": ("qwen2_5_vl",),
        "qwen3-vl": ("qwen3_vl",),
    }
    unquantized_modules = ("model.visual", "lm_head")
    placeholder_token = "<|vision_pad|>"
    memory_open = "<|vision_start|>"
    memory_close = "<|vision_end|>"
    vision_input_keys = ("pixel_values", "pixel_values_videos")
    # The grids build the M-RoPE positions at the prefill; a decode step's positions come from the cached offset.
    prefill_only_inputs = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")

    def __init__(self, model, processor, family: str):
        super().__init__(model, processor, family)
        self._memory: tuple[torch.Tensor, torch.Tensor] | None = None  # (slots [1, L], residuals [lv, M, D])
        if self.residual_levels:
            model.model.language_model.register_forward_pre_hook(self._add_memory_residuals, with_kwargs=True)

    @property
    def _patch_px(self) -> int:
        return self.processor.image_processor.patch_size * self.processor.image_processor.merge_size

    def encode(
        self, text, *, image=None, video=None, image_max_pixels, video_frame_max_pixels, one_view=False
    ) -> Encoded:
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        min_pixels = self._patch_px**2 * 4  # at least a 2x2 grid of visual tokens
        if image is not None:
            # A Qwen image is always one grid. A query keeps its own size within the budget; a reference
            # (one_view) is resized to the budget's area whatever its upload's size, as the paper's fixed 448x448
            # input: N_r about 256 (a small photo is enlarged), so that K_c = alpha * N_r / 100 does not shrink
            # with the upload's resolution.
            smallest = image_max_pixels if one_view else min_pixels
            kwargs["images"] = [image]
            kwargs["images_kwargs"] = {"size": {"shortest_edge": smallest, "longest_edge": image_max_pixels}}
        if video is not None:
            from transformers.video_utils import VideoMetadata

            frames, meta = video
            temporal = int(getattr(self.processor.video_processor, "temporal_patch_size", 1) or 1)
            if frames.shape[0] < temporal:
                # A clip of one frame: its last frame repeated up to one temporal patch, as Qwen2/2.5's processor
                # pads by itself (Qwen3-VL's refuses such a clip).
                missing = temporal - int(frames.shape[0])
                frames = np.concatenate([frames, np.repeat(frames[-1:], missing, axis=0)])
                indices = list(meta["frames_indices"])
                meta = {**meta, "frames_indices": indices + indices[-1:] * missing}
            n = int(frames.shape[0])
            # Qwen3-VL's video processor budgets pixels over all frames; Qwen2/2.5 per frame.
            per_video = video_frame_max_pixels * (n if self.family == "qwen3-vl" else 1)
            kwargs["videos"] = [frames]
            kwargs["videos_kwargs"] = {
                "size": {"shortest_edge": min_pixels, "longest_edge": per_video},
                "do_sample_frames": False,
                # Frames 1 or 3 pixels high would otherwise be read as channels first: (T, H, W, 3) always.
                "input_data_format": "channels_last",
                "video_metadata": [VideoMetadata(**meta)],  # ego.media gives exactly its fields
                # The reference (qwen-vl-utils) behaviour, and the default from transformers 5.22 on: each
                # frame also within an even share of a whole-video budget (far above 8 frames' worth here).
                "cap_pixels_per_frame": True,
            }
        inputs = dict(self.processor(**kwargs))
        ids = inputs["input_ids"][0]
        visual = (ids == self.model.config.image_token_id) | (ids == self.model.config.video_token_id)
        return Encoded(inputs=inputs, visual_columns=visual.nonzero().squeeze(1))

    def encode_vision(self, encoded: Encoded) -> torch.Tensor:
        inputs, outputs, rows = encoded.inputs, {}, []
        with torch.no_grad():
            if "pixel_values" in inputs:
                outputs["image"] = self.model.get_image_features(
                    pixel_values=inputs["pixel_values"].to(self.model.device),
                    image_grid_thw=inputs["image_grid_thw"].to(self.model.device),
                    return_dict=True,
                )
                rows.extend(outputs["image"].pooler_output)
            if "pixel_values_videos" in inputs:
                outputs["video"] = self.model.get_video_features(
                    pixel_values_videos=inputs["pixel_values_videos"].to(self.model.device),
                    video_grid_thw=inputs["video_grid_thw"].to(self.model.device),
                    return_dict=True,
                )
                rows.extend(outputs["video"].pooler_output)
        encoded.encoder_outputs = outputs
        return torch.cat(rows, dim=0)  # [N, D] merger output, the rows the LLM receives

    def grid(self, encoded: Encoded) -> tuple[int, int]:
        _, h, w = encoded.inputs["image_grid_thw"][0].tolist()
        merge = self.processor.image_processor.merge_size
        return h // merge, w // merge

    def query_map(self, encoded: Encoded) -> tuple[torch.Tensor, tuple[int, int]] | None:
        rows, cols = self.grid(encoded)  # one image: its merged tokens are the rows, in raster order
        return torch.arange(rows * cols), (rows, cols)

    # --- M-RoPE positions of a cached conversation ----------------------------------------------
    def save_positions(self) -> torch.Tensor | None:
        # transformers keeps the offset between a token's index and its M-RoPE position after the image on the
        # model (`rope_deltas`, [1, 1]), and continues a cached sequence from it.
        return self.model.model.rope_deltas

    def restore_positions(self, saved: torch.Tensor | None) -> None:
        self.model.model.rope_deltas = saved

    def row_positions(self, saved: torch.Tensor | None, row: int) -> torch.Tensor | None:
        # A batch's offsets are [B, 1], each counted from its row's first real token (its attention mask), as alone.
        return None if saved is None else saved[row : row + 1].clone()

    def stack_positions(self, saved) -> torch.Tensor:
        # Each row continues from its own offset ([B, 1]); transformers adds it to positions counted from each
        # row's first real token (its attention mask), so the left padding of a batch does not move them.
        if any(offset is None for offset in saved):
            raise ValueError("a conversation without its M-RoPE offset cannot continue in a batch")
        return torch.cat([offset.to(self.model.device) for offset in saved])

    # --- Qwen3-VL's deepstack residuals ---------------------------------------------------------
    @property
    def residual_levels(self) -> int:
        return len(getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or ())

    def residual_rows(self, encoded: Encoded) -> torch.Tensor | None:
        image = (encoded.encoder_outputs or {}).get("image")
        if not self.residual_levels or image is None:
            return None
        # deepstack_features: per level, a tuple with one [N, D] tensor per image -> [levels, N, D]
        return torch.stack([torch.cat(level, dim=0) for level in image.deepstack_features])

    @contextlib.contextmanager
    def memory_residuals(self, slots: torch.Tensor, residuals: torch.Tensor | None):
        self._memory = None if residuals is None or not residuals.shape[1] else (slots, residuals)
        try:
            yield
        finally:
            self._memory = None

    def _add_memory_residuals(self, module, args, kwargs):
        """Pre-hook of the language model: on the prefill of a call inside `memory_residuals`, widen the
        visual positions (`visual_pos_masks`, bool [1, L]) by the memory slots and merge the memory's
        residuals into `deepstack_visual_embeds` (per level [n_visual, D], in position order)."""
        if torch.compiler.is_compiling():
            return None  # a compiled decoding step (one token): never a prefill, and no guard on `_memory`
        embeds = kwargs.get("inputs_embeds")
        if self._memory is None or embeds is None or embeds.shape[1] != self._memory[0].shape[1]:
            return None  # not a memory call, or a decoding step: the memory is in the cache already
        slots, residuals = (t.to(embeds.device) for t in self._memory)
        visual, features = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        joint = slots if visual is None else visual.to(embeds.device) | slots
        merged = []
        for level in range(residuals.shape[0]):
            rows = embeds.new_zeros(int(joint.sum()), embeds.shape[-1])
            rows[slots[joint]] = residuals[level].to(rows.dtype)
            if visual is not None and features is not None:
                rows[visual.to(embeds.device)[joint]] = features[level].to(rows.dtype)
            merged.append(rows)
        return args, {**kwargs, "visual_pos_masks": joint, "deepstack_visual_embeds": merged}
