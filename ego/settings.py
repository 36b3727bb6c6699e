"""Every limit and default of the engine and the app, in one place, with units in the names.

The README's "Settings and limits" table mirrors this file. The app shows the limits next to its
inputs; the engine enforces them (a visitor-caused breach raises `ego.InputError`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    # --- the method (paper section 3) ---------------------------------------------------------
    k_cap_tokens: int = 50
    """K in Eq. 4: the most memory tokens kept per reference image (about 20 % of 256)."""
    reference_max_pixels: int = 448 * 448
    """Pixel budget of a reference image, as in the paper: about 256 visual tokens."""
    description_max_new_tokens: int = 32
    """Length cap of the self-description whose content words are the keywords. Decoding dominates the
    cost of an introduction, and "one short sentence" rarely needs more."""
    size_max_new_tokens: int = 5
    """Length cap of the answer to "what percentage of the image does the subject cover"."""
    area_pct_fallback: float = 100.0
    """alpha_c used when the size answer has no number or size word: K_c then equals the cap K."""
    max_concepts_in_context: int = 20
    """Above this many concepts, the ones most similar to the query's visual tokens are kept."""
    memory_selection: str = "attention"
    """Which visual tokens of a reference image its memory keeps: "attention" (Eq. 3, the method), "uniform"
    (evenly spaced in raster order) or "whole_image" (all N_r tokens); the last two are Table 3's ablations."""
    memory_size_rule: str = "area"
    """How many tokens a reference image keeps: "area" (Eq. 4, from the subject's share of the image) or "fixed"
    (K for every image: Table 3's fixed in-context budget)."""

    # --- questions ------------------------------------------------------------------------------
    query_image_max_pixels: int = 1024 * 28 * 28
    """Pixel budget of a query image (about 1,000 visual tokens on Qwen2.5-VL)."""
    video_num_frames: int = 8
    """Frames sampled uniformly from a query video."""
    video_frame_max_pixels: int = 448 * 448
    """Pixel budget of one sampled video frame."""
    video_default_fps: float = 24.0
    """Frame rate assumed for frames given as an array or list, or a file that states none
    (the value transformers falls back to)."""
    answer_max_new_tokens: int = 256
    """Default length cap of an answer."""
    answer_max_new_tokens_limit: int = 1024
    """The largest length cap a caller may ask for."""
    stream_stop_timeout_s: float = 1.0
    """How long a stopped stream waits for its generation thread to end."""

    # --- limits on what a visitor sends ---------------------------------------------------------
    max_references_per_concept: int = 5
    max_concepts_per_session: int = 50
    max_name_chars: int = 40
    max_question_chars: int = 1000
    max_upload_mb: int = 25
    """Largest uploaded file (image, video or concept file), in MiB."""
    max_image_pixels: int = 40_000_000
    """Images larger than this are refused before they are decoded (decompression bombs)."""
    max_image_aspect_ratio: float = 20.0
    """Longer side over shorter side; beyond this the processor cannot make a sensible grid."""
    max_video_duration_s: float = 120.0
    max_video_decode_s: float = 30.0
    """Wall-clock budget for decoding one video; a container that lies cannot hang the server."""
    max_concept_file_concepts: int = 200
    """Concepts in one imported file."""

    # --- the app --------------------------------------------------------------------------------
    queue_max_size: int = 32
    """Requests waiting for the model before new ones are turned away."""
    session_ttl_s: int = 3600
    """A visitor's concepts are freed this long after their last action (a closed tab's too)."""
    max_sessions: int = 1000
    """Visitor sessions held in server memory; beyond this the least recently used one is dropped."""
    max_all_sessions_memory_mb: int = 4096
    """Concept memory (rows, scores, thumbnails) all sessions together may hold, in MiB; beyond it new
    concepts are refused until sessions expire. 4 GiB is about 11,000 one-photo concepts of Qwen2.5-VL-7B."""
    upload_max_age_s: int = 3600
    """Uploaded photos and clips, and files the app made, are deleted from the server this long after
    they were written (checked every `upload_cleanup_interval_s`)."""
    upload_cleanup_interval_s: int = 600
    """How often the app's file cache is swept for files older than `upload_max_age_s`."""
    max_cache_mb: int = 4096
    """All files in the app's file cache together (uploads, pictures, exports), in MiB; an upload that
    would pass it is refused (HTTP 503, "try again in a few minutes") until the sweep frees room."""
    thumbnail_px: int = 128
    """Side of the square thumbnail kept for each concept in the visitor's session."""
    patch_view_max_px: int = 448
    """Longest side of the pictures that show which visual tokens a concept kept."""

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def max_cache_bytes(self) -> int:
        return self.max_cache_mb * 1024 * 1024

    @property
    def max_all_sessions_memory_bytes(self) -> int:
        return self.max_all_sessions_memory_mb * 1024 * 1024


DEFAULT_SETTINGS = Settings()
