"""Every limit and default of the engine and the method, in one place, with units in the names.

The engine enforces them (a visitor-caused breach raises `ego.InputError`); the Space shows them next to its
inputs, reading them from its engine (`engine.settings`). What only the Space needs (its queue, sessions, file
cache, pictures and per-visitor caps) is `space.settings.SpaceSettings`. The settings table of
docs/privacy-and-limits.md mirrors both.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

MEMORY_KEYWORDS = ("none", "append", "only")
MEMORY_SELECTIONS = ("attention", "uniform", "whole_image")
MEMORY_SIZE_RULES = ("area", "fixed")
MEMORY_PROMPTS = ("name", "neutral")
"""The wordings around the memory lines (`ego.prompts.MEMORY_PROMPTS` holds their text)."""
SYSTEM_PROMPTS = ("template", "original")
DECODING_MODES = ("auto", "eager", "compiled")
"""What `decoding` accepts (`ego.decoding`): "auto" is compiled on CUDA, eager elsewhere."""
QUANTIZATIONS = ("auto", "4bit", "8bit", "int4", "fp8", None)
"""What `quantization=` and `model_quantization` accept (`ego.quantization`); "auto" is "4bit" on CUDA, else None."""
MAX_FILE_VIEWS_PER_CONCEPT = 16
"""Reference photos of one concept that a concept file holds (`ego.memory`; a file read without a model is held to
it). `max_references_per_concept` may not exceed it: a concept of more photos could be introduced, never saved."""


@dataclass(frozen=True)
class Settings:
    # --- the method (paper section 3) ---------------------------------------------------------
    k_cap_tokens: int = 50
    """K in Eq. 4: the most memory tokens kept per reference image (about 20 % of 256)."""
    reference_max_pixels: int = 448 * 448
    """Area a reference image is resized to, larger or smaller, as the paper's fixed 448x448 input: about 256
    visual tokens (196 on Qwen3-VL; InternVL: always one 448x448 tile)."""
    description_max_new_tokens: int = 32
    """Length cap of the self-description whose content words are the keywords. Decoding dominates the
    cost of an introduction, and "one short sentence" rarely needs more."""
    size_max_new_tokens: int = 24
    """Length cap of the answer to "what percentage of the image does the subject cover": room for a full
    sentence with a three-digit number ("The subject covers approximately 100% of the image.") in every
    family's tokenizer, which spell numbers one digit per token. A model that answers "30" stops after three
    tokens; an answer cut by the cap inside a number is unreadable (`area_source` "truncated")."""
    area_pct_fallback: float = 100.0
    """alpha_c used when the size answer has no number or size word: K_c then equals the cap K."""
    max_concepts_in_context: int = 20
    """Above this many concepts, the ones the question names are kept, then the ones most similar to the query's
    visual tokens."""
    keywords_drop_stopwords: bool = True
    """Keywords are the description's words without punctuation AND without stop-words and words about the
    photo itself ("image", "shows"), whose attention spreads over the whole picture. The paper keeps every
    word and drops only punctuation (False)."""
    memory_prompt: str = "name"
    """Wording around the memories in a question: "name" ends with "When one of them appears, call it by its
    name."; "neutral" lists them and says nothing of what to do (no push to name a concept that is absent)."""
    system_prompt: str = "template"
    """"template": the checkpoint's chat template as shipped (Qwen's has "You are a helpful assistant.", the
    InternVL3 `-hf` one has none); "original": the system prompt of the model's original release where its
    template differs (InternVL3's `internvl2_5` conversation template), as the paper's harness used."""
    model_quantization: str | None = "auto"
    """How `Ego.from_pretrained(quantization="auto")` loads the weights: "auto" = 4-bit NF4 on CUDA and
    unquantized elsewhere; "4bit" (bitsandbytes NF4), "8bit" (bitsandbytes), "int4" (torchao, CUDA only), "fp8"
    (CUDA, compute capability 8.9+); None = unquantized bf16 on CUDA, as in the paper (`ego.quantization`)."""
    memory_selection: str = "attention"
    """Which visual tokens of a reference image its memory keeps: "attention" (Eq. 3, the method), "uniform"
    (evenly spaced in raster order) or "whole_image" (all N_r tokens); the last two are Table 3's ablations."""
    memory_size_rule: str = "area"
    """How many tokens a reference image keeps: "area" (Eq. 4, from the subject's share of the image) or "fixed"
    (K for every image: Table 3's fixed in-context budget)."""
    memory_keywords: str = "none"
    """What a concept's line in the context holds besides its name: "none" (its visual tokens: the method),
    "append" (its visual tokens, then its keywords as text) or "only" (its keywords as text, no visual token);
    the keywords are the words whose attention ranked its tokens, of every view. The last two are the paper's
    keyword rows (Table 3; Appendix B.3, "keywords in memory")."""
    decoding: str = "auto"
    """How answers and introductions decode (`ego.decoding`): "compiled" = eager prefill, then a compiled decode
    step over a static KV cache (CUDA graphs on CUDA; compiled once, at the first call or `Ego.warm_up`);
    "eager" = transformers' plain loop; "auto" = compiled on CUDA, eager elsewhere."""
    static_cache_max_tokens: int = 8192
    """Capacity of the static KV cache of compiled decoding, in tokens (prompt + generated): sized once, so that
    prompt lengths and token budgets never recompile the decode step; a longer generation decodes eagerly.
    About 57 KiB per token for Qwen2.5-VL-7B (470 MiB in all)."""
    batch_cache_min_free_mb: float = 2048
    """GPU memory, in MiB, that the static cache of a batch of several questions must leave free when compiled
    decoding first makes it (each batch size has its own: 2, 4 or 8 x `static_cache_max_tokens` tokens, 0.9 to
    3.5 GiB for Qwen2.5-VL-7B): a batch size whose cache would leave less decodes eagerly, on caches as long as
    its questions, so a small GPU still answers batches. The one-question cache is always made."""
    compile_backend: str = "inductor"
    """`torch.compile` backend of compiled decoding: "inductor" generates kernels for the decode step (with CUDA
    graphs on CUDA); "aot_eager" traces the same graph and runs it with PyTorch's own kernels: seconds to compile
    instead of minutes on a CPU, which is what the tests use."""

    # --- questions ------------------------------------------------------------------------------
    query_image_max_pixels: int = 1024 * 28 * 28
    """Pixel budget of a query image (about 1,000 visual tokens on Qwen2.5-VL)."""
    query_image_kept_factor: int = 4
    """A query photo of more than this many times `query_image_max_pixels` pixels is reduced when it is loaded (by
    the smallest whole factor that fits, each pixel the mean of its box: `ego.media.reduced`), before the processor
    resizes it to its budget: at the defaults a 12-megapixel photo is then held for a conversation's follow-ups in
    9 MB rather than 36, and goes through the processor in a quarter of the time. At least 4, so that a whole-factor
    reduction never takes a photo below the processor's budget (the processor still makes the last step itself); 0
    keeps every photo as it came."""
    video_num_frames: int = 8
    """Frames sampled uniformly from a query video."""
    video_frame_max_pixels: int = 448 * 448
    """Pixel budget of one sampled video frame (InternVL makes each frame one 448x448 tile, whatever the budget)."""
    video_default_fps: float = 24.0
    """Frame rate assumed for frames given as an array or list, or a file that states none
    (the value transformers falls back to)."""
    answer_max_new_tokens: int = 256
    """Default length cap of an answer."""
    answer_max_new_tokens_limit: int = 1024
    """The largest length cap a caller may ask for."""
    max_conversation_turns: int = 20
    """Questions in one conversation (`Ego.chat`); one more is refused with a sentence to start a new one."""
    max_conversation_context_tokens: int = 16384
    """Tokens one conversation may reach: its first context, every question and answer, and the next answer's
    length cap. Every question is held to it, a lone `Ego.answer` too (its context and answer cap). Past it, a
    follow-up is refused with a sentence to start a new conversation, a first question with one to ask about fewer
    concepts (or, when its context alone fits, for a shorter answer)."""
    max_cached_conversations_mb: float = 2048
    """Key/value caches all conversations together keep for their follow-ups, in MiB (on the model's device);
    beyond it the least recently used caches are dropped, and their conversations recompute their context on
    the next question (the same answer, more slowly). A 1,000-token photo conversation of Qwen2.5-VL-7B holds
    about 60 MiB."""

    # --- limits on what a visitor sends ---------------------------------------------------------
    max_references_per_concept: int = 5
    """Photos one concept is introduced from: at most `MAX_FILE_VIEWS_PER_CONCEPT`, what a concept file holds."""
    max_name_chars: int = 40
    max_question_chars: int = 1000
    max_keywords: int = 20
    """Keywords a visitor may give for one concept (repeats counted once)."""
    max_keywords_chars: int = 200
    """Characters of those keywords together."""
    max_upload_mb: int = 25
    """Largest photo or clip, in MiB (the Space holds concept files to its own `max_concept_file_mb`)."""
    max_image_pixels: int = 40_000_000
    """Images larger than this are refused before they are decoded (decompression bombs)."""
    max_jpeg_scans: int = 100
    """Scans in one JPEG image, video frame or JPEG strip of a TIFF: an ordinary JPEG has 1 to about 12, and each
    scan decodes the whole picture again, so a file of many tiny scans would take the CPU for minutes."""
    max_image_aspect_ratio: float = 20.0
    """Longer side over shorter side (so at least 1, a square; one pixel of the longer side is forgiven, so that a
    photo reduced by a whole factor stays within it); beyond this the processor cannot make a sensible grid."""
    max_video_duration_s: float = 120.0
    max_video_decode_s: float = 30.0
    """Wall-clock budget for decoding one video; a container that lies cannot hang the server."""
    max_concept_file_concepts: int = 200
    """Concepts in one imported file."""

    def __post_init__(self):
        check_numbers(self, may_be_zero={"max_upload_mb", "batch_cache_min_free_mb", "query_image_kept_factor"})
        if 0 < self.query_image_kept_factor < 4:
            raise ValueError(
                "query_image_kept_factor must be 0 or at least 4: a photo reduced by a whole factor from fewer than 4 "
                "times the processor's budget could end below it, with fewer visual tokens; got "
                f"{self.query_image_kept_factor}."
            )
        if not 1 <= self.area_pct_fallback <= 100:
            raise ValueError(f"area_pct_fallback must be between 1 and 100 (percent); got {self.area_pct_fallback!r}.")
        if self.answer_max_new_tokens > self.answer_max_new_tokens_limit:
            raise ValueError(
                f"answer_max_new_tokens must be at most answer_max_new_tokens_limit ({self.answer_max_new_tokens_limit}"
                f"), or every question is refused; got {self.answer_max_new_tokens}."
            )
        if self.answer_max_new_tokens >= self.max_conversation_context_tokens:
            raise ValueError(
                f"max_conversation_context_tokens must be more than answer_max_new_tokens ({self.answer_max_new_tokens}"
                f"), which every question of the default answer length needs besides its context; got "
                f"{self.max_conversation_context_tokens}."
            )
        if self.compile_backend != "inductor":  # imported only here: torch._dynamo takes a second or two to import
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())  # "aot_eager" is tagged "debug"
            if self.compile_backend not in known:
                shown = {*torch._dynamo.list_backends(), "aot_eager"}  # without the debugging and testing ones
                raise ValueError(
                    f"compile_backend must be a torch.compile backend ({', '.join(sorted(shown))}, or one registered "
                    f"with torch._dynamo.register_backend); got {self.compile_backend!r}."
                )
        if self.max_image_aspect_ratio < 1:
            raise ValueError(
                f"max_image_aspect_ratio must be at least 1 (it is the longer side over the shorter one), or every "
                f"image is refused; got {self.max_image_aspect_ratio!r}."
            )
        if self.max_references_per_concept > MAX_FILE_VIEWS_PER_CONCEPT:
            raise ValueError(
                f"max_references_per_concept must be at most {MAX_FILE_VIEWS_PER_CONCEPT}, the photos of one concept "
                f"a concept file holds, or a concept of more could not be saved; got {self.max_references_per_concept}."
            )
        if self.memory_selection not in MEMORY_SELECTIONS:
            raise ValueError(f"memory_selection must be one of {MEMORY_SELECTIONS}; got {self.memory_selection!r}.")
        if self.memory_size_rule not in MEMORY_SIZE_RULES:
            raise ValueError(f"memory_size_rule must be one of {MEMORY_SIZE_RULES}; got {self.memory_size_rule!r}.")
        if self.memory_prompt not in MEMORY_PROMPTS:
            raise ValueError(f"memory_prompt must be one of {MEMORY_PROMPTS}; got {self.memory_prompt!r}.")
        if self.system_prompt not in SYSTEM_PROMPTS:
            raise ValueError(f"system_prompt must be one of {SYSTEM_PROMPTS}; got {self.system_prompt!r}.")
        if self.memory_keywords not in MEMORY_KEYWORDS:
            raise ValueError(f"memory_keywords must be one of {MEMORY_KEYWORDS}; got {self.memory_keywords!r}.")
        if self.decoding not in DECODING_MODES:
            raise ValueError(f"decoding must be one of {DECODING_MODES}; got {self.decoding!r}.")
        if self.model_quantization not in QUANTIZATIONS:
            raise ValueError(f"model_quantization must be one of {QUANTIZATIONS}; got {self.model_quantization!r}.")

    @classmethod
    def paper(cls, **changes) -> Settings:
        """The paper's protocol where it is known (docs/method.md, "Paper protocol"): one 448x448 tile per query image
        on InternVL3 (the same pixel budget on Qwen, where the paper is silent; the photo given to the processor as
        it came, however large), bf16 weights without quantization, a 50-token description, punctuation-only
        keywords, the model's original system prompt, and a memory prompt that asks nothing."""
        return cls(
            query_image_max_pixels=448 * 448,
            query_image_kept_factor=0,
            model_quantization=None,
            description_max_new_tokens=50,
            keywords_drop_stopwords=False,
            system_prompt="original",
            memory_prompt="neutral",
        ).replace(**changes)

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def max_cached_conversations_bytes(self) -> int:
        return int(self.max_cached_conversations_mb * 1024 * 1024)


def check_numbers(settings, *, may_be_zero: set[str] = frozenset()) -> None:
    """ValueError for a count, size or duration of `settings` (a dataclass) that is not a positive number of its
    kind: an `int` field takes a whole number of at least 1, a `float` field any finite number above 0 (those in
    `may_be_zero`: 0 too), and a `bool` field True or False. A typo is refused when the settings are made, not
    where the value is first used."""
    for field in dataclasses.fields(settings):
        value, kind = getattr(settings, field.name), field.type
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{field.name} must be True or False; got {value!r}.")
            continue
        if kind not in ("int", "float"):
            continue
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        real = whole or (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value))
        zero = field.name in may_be_zero
        if kind == "int":
            usable, need = whole and value >= (0 if zero else 1), f"a whole number of at least {0 if zero else 1}"
        else:
            usable, need = real and (value >= 0 if zero else value > 0), "0 or more" if zero else "a number above 0"
        if not usable:
            raise ValueError(f"{field.name} must be {need}; got {value!r}.")


DEFAULT_SETTINGS = Settings()
