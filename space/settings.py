"""Every limit and default that only the Space has, in one place, with units in the names.

The engine's limits (question length, photos per concept, upload size, answer length, ...) are not here: the
Space reads them from its engine (`engine.settings`, an `ego.Settings`), so the two can never disagree. The
settings table of docs/privacy-and-limits.md mirrors both classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ego.settings import check_numbers


@dataclass(frozen=True)
class SpaceSettings:
    # --- the app --------------------------------------------------------------------------------
    queue_max_size: int = 32
    """Requests waiting for the model before new ones are turned away."""
    session_ttl_s: int = 3600
    """A visitor's concepts are freed this long after their last action (a closed tab's too)."""
    max_sessions: int = 1000
    """Visitor sessions held in server memory; beyond this the least recently used one is dropped."""
    max_request_body_mb: int = 4
    """A request's body (not an upload: files come through the upload route), in MiB; a larger one is refused
    (HTTP 413) before it is read further."""
    max_new_sessions_per_address_per_hour: int = 200
    """Sessions one client address (where it is known) may start in an hour (each page load and each API client
    starts one); one more request in a new session is refused with a sentence. Without it, one script opening
    `max_sessions` sessions would push every visitor's session out."""
    max_all_sessions_memory_mb: int = 4096
    """Concept memory (rows, scores, thumbnails) all sessions together may hold, in MiB; beyond it new
    concepts are refused until sessions expire. 4 GiB is about 10,500 one-photo concepts of Qwen2.5-VL-7B."""
    max_all_conversations_memory_mb: int = 6144
    """Memory all sessions' conversations together may hold for their follow-ups (each its photo or clip and its
    tokens; key/value caches are bounded apart, `max_cached_conversations_mb`), in MiB; a new conversation beyond
    it is answered but not kept for follow-ups. A conversation about a 1024×768 photo holds about 2.3 MiB on
    Qwen2.5-VL (its RGB; the processor's 17.9 MiB of float32 pixel patches are computed again, in about 25 ms,
    only when its context must be recomputed): about 2,600 of them."""
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
    max_waiting_requests_per_visitor: int = 4
    """Model requests (introductions, questions, imports) one visitor may have queued or running at once, counted
    per session and per client address where it is known; one more is refused with a sentence, so that one
    visitor or script cannot fill the queue that all visitors share."""
    answer_batch_max_size: int = 8
    """Questions (of different visitors) answered together by one batched generation, at most; 1 answers them
    one at a time. Introductions are always one model call at a time."""
    concept_requests_at_once: int = 3
    """Introductions and concept imports handled at once: their photos are decoded, their files read and their
    pictures drawn side by side, and each introduction waits for the model only for its own model call (the
    engine's lock: one model call at a time). 1 handles them one after the other."""
    answer_batch_window_s: float = 0.05
    """How long the first waiting question waits for others to join its batch, in seconds."""
    answer_batch_preparing_wait_s: float = 1.0
    """How long a batch also waits for the questions asked within `answer_batch_window_s` of its first that are
    still being prepared (each visitor's photo or clip goes through the processor in their own thread, beside the
    model's work: a 12-megapixel photo takes about half a second), in seconds; 0 never waits for them."""
    stop_wait_s: float = 3.0
    """How long Stop waits for the answer to end as far as it had come (at once while it streams; a question still
    in its first step, the prefill, ends after it), in seconds, before the page cancels the event instead."""
    zero_gpu_call_fixed_s: float = 20.0
    zero_gpu_call_per_token_s: float = 0.1
    """On ZeroGPU, the GPU time a model call asks for: the fixed part plus this much per token of its budget (an
    introduction: per token of its description and size answers), with a margin over the measured ~0.03 s per
    token and ~1 s per photo."""

    # --- limits on what a visitor keeps ---------------------------------------------------------
    max_concepts_per_session: int = 50
    """Concepts one visitor may hold in their session."""
    max_concept_file_mb: float = 128
    """Largest concept file a visitor may import, in MiB, and so the most memory one session may hold: a concept
    that would make the session's export larger is refused, so that every export can be imported again. 128 MiB
    holds 50 concepts of five photos of Qwen2.5-VL-7B (about 1.9 MiB each); Qwen3-VL's memories are four times
    larger (their deepstack rows)."""

    def __post_init__(self):
        check_numbers(self, may_be_zero={"answer_batch_window_s", "answer_batch_preparing_wait_s"})

    def replace(self, **changes) -> SpaceSettings:
        return dataclasses.replace(self, **changes)

    @property
    def max_request_body_bytes(self) -> int:
        return self.max_request_body_mb * 1024 * 1024

    @property
    def max_concept_file_bytes(self) -> int:
        return int(self.max_concept_file_mb * 1024 * 1024)

    @property
    def max_cache_bytes(self) -> int:
        return self.max_cache_mb * 1024 * 1024

    @property
    def max_all_sessions_memory_bytes(self) -> int:
        return self.max_all_sessions_memory_mb * 1024 * 1024

    @property
    def max_all_conversations_memory_bytes(self) -> int:
        return self.max_all_conversations_memory_mb * 1024 * 1024


DEFAULT_SPACE_SETTINGS = SpaceSettings()
