"""Ego: embedding-guided personalization of a vision-language model, without training.

This module reads top to bottom like section 3 of the paper (arXiv 2603.09771):

  3.1  Concept introduction. For each reference image (1 to 5 per concept):
       (1) encode it with the model's own vision tower + projector: X_R, [N_r, D];
       (2) ask the model to describe the subject (greedy); its content words are the keywords (Eq. 1);
       (3) read the attention the keyword tokens pay to the N_r visual tokens at the layers L,
           recorded in one forward over the prompt and the description once it is generated (Eq. 2), and
           average it over layers, heads and keywords: the importance I_j of each visual token (Eq. 3);
       (4) ask, in the same conversation, what share of the image the subject covers: alpha_c;
       (5) K_c = max(1, round(min(K, alpha_c * N_r / 100))) (Eq. 4);
       (6) keep the top-K_c tokens, back in raster order; the memory is those rows of X_R (and, for a
           family whose language model adds more visual features inside its layers, those tokens'
           features too: `Concept.residuals`).
       Views of one concept are concatenated.
  3.2  Inference. The memories of the concepts in play go into the context, each after its name, as
       soft prompts: placeholder tokens whose input embeddings are replaced by the memory rows (the
       residuals, if any, are added where the family adds an image's own), before the query image or
       video and the question. With more concepts than fit (`max_concepts_in_context`), the ones the
       question names are kept first, then those whose memory tokens are most similar to the query's
       visual tokens; that similarity is reported for every answer.

Nothing here depends on the model family: `ego.backends` hides processors, prompts and vision towers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import numbers
import os
import queue
import re
import threading
import time
import unicodedata
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import batching, checks, prompts
from .attention import ATTENTION_NAME, AttentionCapture, capturing
from .backends import Backend, backend_for_model_type, families
from .backends.base import Encoded
from .batching import AnswerRequest, FollowUpRequest
from .decoding import Decoder
from .errors import ConversationFullError, IncompatibleMemoryError, InputError, ModelBusyError
from .media import load_image, load_video, reduced
from .memory import Concept, ConceptView, check_concepts, local_model_id, same_model, storage_bytes
from .presets import DEFAULT_PRESET, UNCALIBRATED, check_model_name, depth_scaled_layers, resolve
from .quantization import check_known, check_supported, for_device, quantization_config
from .settings import DEFAULT_SETTINGS, Settings

log = logging.getLogger("ego.engine")

OUT_OF_MEMORY = (
    "The model ran out of memory on this request; try a smaller image, a shorter clip or fewer concepts, then ask "
    "again."
)
WAITING_FOR_OWN_STREAM = (
    "Waiting for the model, which a stream this thread opened still holds (stream_answer or Chat.stream): unless "
    "another thread iterates that stream, iterate it to the end or call its close() (contextlib.closing(stream) "
    "does it for a block); this call waits until then."
)
OWN_STREAM_WARNING_S = 10.0
"""How long a thread waits for a model its own open stream holds before the log says why it waits."""


class ModelLock:
    """One model call at a time, as a `threading.Lock`, that says why a thread waits for a model a stream it opened
    still holds: a stream holds the model from its first piece to its end, and one paused in a notebook, then
    another call in the same thread, waits forever. (It still waits: a stream served from a pool of threads, each
    piece on any of them, may be ended by another thread.)"""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking and timeout < 0 and self._owner == threading.get_ident():
            while not self._lock.acquire(timeout=OWN_STREAM_WARNING_S):
                log.warning(WAITING_FOR_OWN_STREAM)
        elif not self._lock.acquire(blocking, timeout):
            return False
        self._owner = threading.get_ident()
        return True

    def release(self) -> None:
        self._owner = None
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Answer(str):
    """An answer's text, with what went into the context."""

    concepts_used: tuple[str, ...]
    """Names of the concepts whose memories were in the context, in prompt order."""
    concepts_dropped: tuple[str, ...]
    """Concepts left out because more were given than `max_concepts_in_context` (`select_concepts`: those the
    question names are kept first, then the most similar to the query), the lowest ranked last."""
    context_tokens: int
    memory_tokens: int
    similarity: tuple[tuple[str, float], ...]
    """(name, similarity) of every concept given, in the order given, when there was an image or a video to
    compare with: how much its memory looks like the query's visual tokens (`similarity_to_query`). The
    ranking behind `concepts_dropped`; a hint of which concepts are in view, not a detection."""
    similarity_maps: tuple[tuple[str, torch.Tensor], ...]
    """(name, float32 [rows, cols] on CPU) of every concept given, for an image question: how much each
    visual token of the image looks like the concept's memory (`similarity_to_query`), in raster order."""
    prefill_tokens: int
    """Context tokens this answer computed; in a conversation's follow-up, the rest came from its cache."""
    token_ids: tuple[int, ...]
    """The answer's tokens as generated, its stop token removed (a whole answer's; () in the pieces of a stream
    and when only the text is known): a conversation that takes this answer as a turn (`Chat.adopt`) continues
    from exactly these tokens, not from its text tokenized again."""
    stopped: bool
    """Whether a Stop ended it before its end (a stream closed early, a batch row's Stop): its text is what had
    been handed on by then."""

    def __new__(
        cls,
        text: str,
        *,
        used=(),
        dropped=(),
        context_tokens=0,
        memory_tokens=0,
        similarity=(),
        similarity_maps=(),
        prefill_tokens=None,
        token_ids=(),
        stopped=False,
    ):
        answer = super().__new__(cls, text)
        answer.stopped = bool(stopped)
        answer.token_ids = tuple(int(token) for token in token_ids)
        answer.concepts_used, answer.concepts_dropped = tuple(used), tuple(dropped)
        answer.context_tokens, answer.memory_tokens = context_tokens, memory_tokens
        answer.prefill_tokens = context_tokens if prefill_tokens is None else prefill_tokens
        answer.similarity, answer.similarity_maps = tuple(similarity), tuple(similarity_maps)
        return answer

    def __getstate__(self) -> dict:
        # A context handed over by a batch (`HandedContext`: a key/value cache, on the model's device) is for the
        # conversation in this process that adopts the answer; a copy (pickled to a worker, saved) goes without it.
        state = dict(self.__dict__)
        state.pop("_handed", None)
        return state


@dataclass
class Reference:
    """Step (1) for one reference image: the processor output and what the vision tower made of it."""

    encoded: Encoded
    rows: torch.Tensor
    """X_R, the projector output: [N_r, D]."""
    grid: tuple[int, int]


@dataclass
class Description:
    """Steps (2) and (4) for one reference image."""

    ids: list[int]
    """The description's tokens (stop tokens removed), or the user's keywords tokenized."""
    start: int
    """Position of its first token in the conversation."""
    capture: AttentionCapture
    """Its tokens' attention over the N_r visual tokens, at the layers asked for."""
    size_answer: str
    size_cut: bool = False
    """Whether the size answer stopped at its length cap rather than at a stop token."""


@dataclass
class Query:
    """A checked question (section 3.2's input): its text, the concepts given, at most one image or video."""

    text: str
    concepts: list[Concept]
    picture: Any | None
    clip: Any | None
    """(frames, metadata) of a video, as `load_video` returns it."""
    max_new_tokens: int

    @property
    def visual_block(self) -> list[dict]:
        """The chat block of the image or video, if any."""
        if self.picture is not None:
            return [{"type": "image"}]
        return [{"type": "video"}] if self.clip is not None else []


@dataclass
class Selection:
    """Which concepts go into the context, and what comparing them with the query found."""

    kept: list[Concept]
    dropped: list[Concept]
    """Lowest ranked last."""
    probe: Encoded | None = None
    """The query encoded for ranking, when there were more concepts than fit (its vision outputs are reused)."""
    scores: list[float] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)
    rows_on_device: dict[int, torch.Tensor] | None = None
    """id(concept) -> its memory rows [K_c, D] in the one device copy made for the comparison."""

    def kept_rows(self) -> torch.Tensor:
        """The kept memories from the comparison's device copy: [sum K, D]."""
        return torch.cat([self.rows_on_device[id(c)] for c in self.kept])


@dataclass
class StagedAnswer:
    """A question's work that needs no model, done before the model's turn (`Ego.stage`): the checked question,
    its photo or clip loaded, and the processor's output for its prompt. With more concepts than fit and a photo or
    clip, which concepts go into the context is the vision tower's to say: `encoded` is then the ranking prompt (the
    photo or clip and the question) and the context's prompt is made in the model's turn."""

    query: Query
    encoded: Encoded
    """The prompt with the kept concepts' memory placeholders; the ranking prompt where `selection` is None."""
    selection: Selection | None
    """The concepts kept and dropped, where no model call decides them; None where the vision tower ranks them."""
    model: Any = field(default=None, repr=False)
    settings: Settings | None = field(default=None, repr=False)
    """The model and settings it was staged with: an engine with another model or other settings does not take it
    (its processor, its limits, its choice of concepts)."""


@dataclass
class StagedContext:
    """A follow-up's work that needs no model, done before the model's turn (`Ego.stage`): its conversation's
    first context made ready where the follow-up must compute it again. Taken only if the conversation is still
    where it was when staged."""

    first: StagedAnswer | None = None
    """A first turn answered elsewhere and adopted (`Chat.adopt`), not computed here yet: its question staged,
    with a budget of one token (its answer is known)."""
    for_turn: Any = None
    """The adopted turn `first` was staged for."""
    pixels: dict[str, torch.Tensor] | None = None
    """The first context's pixels from the processor (on CPU), for a conversation whose key/value cache is gone."""
    prompt: str = ""
    """The chat text `pixels` were made with."""
    chat: Any = field(default=None, repr=False)
    """The conversation it was staged for: no other takes it."""


@dataclass
class HandedContext:
    """A first question's context as a batch computed it (`AnswerRequest.keep_context`), handed over with its
    answer (the answer's `_handed`) to the conversation that takes the answer as its first turn (`Chat.adopt`):
    that conversation then continues on this cache rather than computing its photo or clip and memories again."""

    prepared: PreparedAnswer
    """The question's preparation without its device tensors: what a conversation keeps of its first context
    (`Chat._remember_context`)."""
    cache: Any
    """The batch's key/value cache of this row, its own tokens only (copied): layers of [1, H_kv, T, D]."""
    positions: Any
    """The row's position state (`Backend.row_positions`)."""
    asked: tuple
    """(question as checked, concepts, image, video) as the request gave them: a conversation takes the context
    only if it holds those very concepts, that photo or clip, and adopts the answer to that question."""
    model: Any = field(default=None, repr=False)
    settings: Settings | None = field(default=None, repr=False)

    def continues(self, chat: Chat, question: str) -> bool:
        """Whether `chat` would compute exactly this context for `question` as its first turn: nothing asked in it
        yet, this engine's model and settings, its own concepts (the same objects, in order), photo and clip."""
        text, concepts, image, video = self.asked
        return (
            not chat.turns
            and not chat._adopted
            and not chat._ids
            and chat.engine.model is self.model
            and chat.engine.settings == self.settings
            and text == question
            and len(concepts) == len(chat.concepts)
            and all(mine is theirs for mine, theirs in zip(chat.concepts, concepts))
            and image is chat.picture
            and video is chat.clip
        )


@dataclass
class PreparedAnswer:
    """One question, ready for generate: its arguments and what the answer reports about its context."""

    generate: dict[str, Any]
    """Keyword arguments of `model.generate` (input_ids [1, L], inputs_embeds [1, L, D], ...)."""
    slots: torch.Tensor
    """The memory placeholders: bool [1, L]."""
    residuals: torch.Tensor | None
    """The kept memories' residuals [levels, M, D], added at the slots (`Backend.memory_residuals`)."""
    kept: list[Concept]
    """The concepts in the context, in order: their memories fill the slots."""
    used: list[str]
    dropped: list[str]
    context_tokens: int
    memory_tokens: int
    similarity: list[tuple[str, float]]
    similarity_maps: list[tuple[str, torch.Tensor]]
    encoded: Encoded | None = None
    """The processor output (on CPU, pixels included): what a conversation recomputes its context from."""

    def answer(self, text: str, token_ids=(), stopped: bool = False) -> Answer:
        return Answer(
            text,
            token_ids=token_ids,
            stopped=stopped,
            used=self.used,
            dropped=self.dropped,
            context_tokens=self.context_tokens,
            memory_tokens=self.memory_tokens,
            similarity=self.similarity,
            similarity_maps=self.similarity_maps,
        )


class Ego:
    """A vision-language model that can be personalized with concepts, one model call at a time."""

    def __init__(
        self,
        model,
        processor,
        *,
        family: str,
        backend_cls: type[Backend],
        model_id: str,
        layers: Sequence[int],
        layers_note: str = "",
        settings: Settings = DEFAULT_SETTINGS,
    ):
        self.model = model
        self.processor = processor
        self.family = family
        self.backend = backend_cls(model, processor, family)
        self.model_id = model_id
        self.settings = settings
        self.layers = _checked_layers(layers, self.num_layers)
        self.layers_note = layers_note
        self._lock = ModelLock()  # one model call at a time; concurrent callers wait
        self.decoder = _decoder(model, settings, self.backend.prefill_only_inputs)
        self._cached_chats: OrderedDict[int, weakref.ref] = OrderedDict()  # least recently used first
        self._cached_chats_lock = threading.Lock()
        """Guards `_cached_chats`: a conversation adopting a handed context registers its cache outside the model's
        turn (`_take_cache_if_room`); caches are dropped only in the model's turn (`_keep_cache`,
        `_make_room_for_caches`)."""

    # ------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_PRESET,
        *,
        quantization="auto",
        device=None,
        layers=None,
        settings: Settings | None = None,
        seed: int = 0,
    ) -> Ego:
        """Load a preset name (see `ego.presets.PRESETS`), a Hub id or a local checkpoint folder.

        quantization: "auto" = 4-bit NF4 on CUDA, unquantized elsewhere; "4bit" (bitsandbytes NF4), "8bit",
        "int4" (torchao, CUDA only), "fp8" (CUDA, compute capability 8.9+) or None force it (`ego.quantization`).
        layers: the attention layers L (indices, or a JSON file written by `python -m ego.calibrate`);
        by default the preset's calibrated layers, else the paper's layers scaled to this model's depth.
        settings: every limit and default of the method (`ego.Settings`; K of Eq. 4 is `k_cap_tokens`).
        """
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        check_known(quantization)  # before a tiny preset's folder is built
        if isinstance(model, Path) or str(model).startswith("~"):
            model = str(Path(model).expanduser())  # "~/models/x" is a folder, not a Hub id
        check_model_name(model)
        preset = resolve(model)
        if preset is not None and preset.tiny:
            from .random_models import tiny_checkpoint

            path, model_id = tiny_checkpoint(preset.family, seed), preset.model_id + (f"-seed{seed}" if seed else "")
        elif preset is not None:
            path, model_id = preset.model_id, preset.model_id
        elif Path(model).is_dir():
            path, model_id = model, local_model_id(model)
        else:
            path, model_id = model, str(model)
        device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if quantization == "auto":
            quantization = (settings or DEFAULT_SETTINGS).model_quantization
        quantization = for_device(quantization, device)
        check_supported(quantization, device)
        tiny = preset is not None and preset.tiny
        dtype = torch.float32 if tiny and not device.startswith("cuda") else torch.bfloat16

        config = AutoConfig.from_pretrained(path)
        family, backend_cls = backend_for_model_type(config.model_type)
        # The layers are checked against the config before the weights load (minutes, for a large model).
        num_layers = config.get_text_config().num_hidden_layers
        if layers is not None:
            layers, note = _checked_layers(_read_layers(layers, num_layers, model_id), num_layers), f"given: {layers}"
        elif preset is not None and preset.layers is not None:
            layers, note = preset.layers, preset.layers_note
        else:
            layers = depth_scaled_layers(num_layers)
            note = preset.layers_note if preset is not None else UNCALIBRATED
        kwargs = {
            "dtype": dtype,
            "device_map": {"": device},
            "attn_implementation": {"text_config": ATTENTION_NAME, "vision_config": "sdpa"},
        }
        if quantization is not None:
            # full module paths; a custom list replaces transformers' default (which would keep only lm_head)
            skip = backend_cls.unquantized_modules
            kwargs["quantization_config"] = quantization_config(quantization, skip, dtype)
        loaded = AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()
        processor = AutoProcessor.from_pretrained(path)
        settings = settings or DEFAULT_SETTINGS
        return cls(
            loaded,
            processor,
            family=family,
            backend_cls=backend_cls,
            model_id=model_id,
            layers=layers,
            layers_note=note,
            settings=settings,
        )

    def with_settings(self, settings: Settings | None = None, **changes) -> Ego:
        """The same loaded model (nothing is loaded again, and it still runs one call at a time) with other
        settings: `settings` in place of this engine's, then `changes` to single fields, e.g.
        `engine.with_settings(k_cap_tokens=30)` or `engine.with_settings(Settings.paper())`. It shares this
        engine's decoder (and its compiled step), so the decoding settings cannot change here: a whole `settings`
        whose decoding fields are the defaults keeps this engine's; one that names others is refused."""
        decoding = ("decoding", "static_cache_max_tokens", "compile_backend", "batch_cache_min_free_mb")
        if settings is not None:
            kept = {name: getattr(self.settings, name) for name in decoding}
            settings = settings.replace(
                **{
                    name: value
                    for name, value in kept.items()
                    if getattr(settings, name) == getattr(DEFAULT_SETTINGS, name)
                }
            )
        new = (settings or self.settings).replace(**changes)
        if any(getattr(new, name) != getattr(self.settings, name) for name in decoding):
            # A compiled decoder takes over the model's own `generate`: one decoder per loaded model.
            raise ValueError(
                "How the model decodes belongs to the loaded model, not to one engine: use "
                "engine.set_decoding(...), or load it with those settings."
            )
        other = copy.copy(self)
        other.settings = new
        return other

    @classmethod
    def tiny(cls, family: str, seed: int = 0, **kwargs) -> Ego:
        """A tiny random-weight model of `family`'s real architecture, built offline (for tests and demos)."""
        preset = resolve(f"tiny-{family}")
        if preset is None or not preset.tiny:
            raise ValueError(f"There is no tiny {family!r} model; the families are {', '.join(families())}.")
        return cls.from_pretrained(f"tiny-{family}", seed=seed, **kwargs)

    @property
    def decoding(self) -> dict:
        """Greedy decoding (the paper: a deterministic description beats sampled ones), never emitting a
        visual placeholder token; compiled decode steps when `decoder.mode` is "compiled" (`ego.decoding`).
        Every generate call of the engine takes these keyword arguments."""
        return {
            "do_sample": False,
            "suppress_tokens": self.backend.unspeakable_token_ids,
            **self.decoder.generate_kwargs,
        }

    def set_decoding(self, mode: str) -> None:
        """Decode from now on in `mode` ("auto", "eager" or "compiled"), on the same loaded model (the benchmark
        measures both side by side); a compiled step is compiled again at the next call or `warm_up`."""
        with self.exclusive_use():
            settings = self.settings.replace(decoding=mode)  # checks the mode
            self.decoder.close()
            self.decoder = _decoder(self.model, settings, self.backend.prefill_only_inputs)
            self.settings = settings

    @property
    def needs_warm_up(self) -> bool:
        """Whether the first generation would compile the decode step (`warm_up` does it ahead)."""
        return self.decoder.compiled and self.decoder.warm_up_s is None

    def warm_up(self, *, batched: bool = False, on_step: Callable[[str, float], None] | None = None) -> float:
        """Compile the decode step now rather than on a visitor's first question: 3-token answers about a photo and
        about a clip, and the size question of an introduction (a continuation on a filled cache). One graph decodes all
        three (`ego.decoding`: the grid sizes left out of the steps, a continuation's positions in a prompt's shape);
        each kind is warmed all the same, as a family may differ. batched: also two questions together about photos and
        about clips (`answer_batch`, for a Space that batches its visitors) and two conversations' follow-ups together
        (`follow_up_batch`): a batch's step is another graph (torch specialises a dimension of size 1, so one row and
        several rows never share one), which then serves every batch size from 2 up, each size recording its CUDA graph
        at its first batch. Seconds taken (per step: `decoder.warm_up_steps_s`; on_step(step, seconds) as each step
        ends)."""
        import numpy as np
        from PIL import Image

        started, steps, lap = time.perf_counter(), {}, _Stopwatch()

        def done(step: str) -> None:
            steps[step] = lap.lap()
            if on_step is not None:
                on_step(step, steps[step])

        picture = Image.new("RGB", (64, 64), (120, 90, 60))
        frames = np.full((2, 64, 64, 3), 90, dtype=np.uint8)  # [T, H, W, 3]
        clip = load_video(frames, self.settings)
        with self.exclusive_use(), torch.no_grad():
            for kind, block, media in (
                ("photo", {"type": "image"}, {"image": picture}),
                ("clip", {"type": "video"}, {"video": clip}),
            ):
                encoded = self.backend.encode(
                    self._chat_text([block, {"type": "text", "text": "Hello."}]),
                    **media,
                    image_max_pixels=self.settings.query_image_max_pixels,
                    video_frame_max_pixels=self.settings.video_frame_max_pixels,
                )
                self.model.generate(
                    input_ids=encoded.inputs["input_ids"].to(self.device),
                    **self.backend.generate_kwargs(encoded),
                    **self.decoding,
                    max_new_tokens=3,
                    min_new_tokens=3,
                )
                done(kind)
            self.describe(self.encode_reference(picture), self.layers, user_keywords=["colour"], size_new_tokens=3)
            done("introduction")
        # After the one-row steps: a batch then recompiles the step with its batch dimension dynamic (one graph for
        # every batch size); compiled first, a batch of 2 would be a graph for 2 rows only.
        if batched:
            try:
                for kind, media in (("batched_photos", {"image": picture}), ("batched_clips", {"video": frames})):
                    requests = [
                        AnswerRequest(question, (), **media, max_new_tokens=3) for question in ("Hi.", "Hello there.")
                    ]
                    for result in self.answer_batch(requests):
                        if isinstance(result, Exception):
                            raise result
                    done(kind)
                # Follow-ups together continue several caches: positions in the shape of a continuation, batched.
                chats = [self.chat(image=picture) for _ in range(2)]
                for chat in chats:
                    chat.ask("Hi.", max_new_tokens=2)
                # The same question on the same photo: rows of equal lengths, never answered apart.
                follow_ups = [FollowUpRequest(chat, "And?", 3) for chat in chats]
                for result in self.follow_up_batch(follow_ups):
                    if isinstance(result, Exception):
                        raise result
                done("batched_follow_ups")
            except Exception as error:  # noqa: BLE001 -- any compiler failure: single questions stay compiled
                self.decoder.give_up_batches(error)
        self.decoder.warm_up_steps_s = steps
        return self.decoder.record_warm_up(started)

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def memory_dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------------------------------
    # 3.1 Concept introduction
    # ------------------------------------------------------------------------------------------
    def introduce(self, name: str, images, *, keywords=None, area_pct: float | None = None) -> Concept:
        """Build the memory of concept `name` from 1 to `max_references_per_concept` reference images (PIL images
        or paths): one image, or any iterable of them (a list, a tuple, a generator).

        keywords: the words whose attention ranks the tokens, instead of the model's description.
        area_pct: the subject's share of each image in percent, instead of the model's estimate.
        """
        name = checks.check_name(name, self.settings)
        images = _image_list(images)
        checks.check_reference_count(len(images), self.settings, name)
        user_keywords = checks.check_keywords(keywords, self.settings)
        area_pct = checks.check_area_pct(area_pct)
        # All checked before any model call; a refused one is named by its place ("Photo 3 of 5: ...").
        pictures = checks.load_each(images, lambda image: load_image(image, self.settings))
        # The processor's work (resizing each photo, cutting it into patches, the prompt's tokens) needs no model:
        # done before the model's turn, which it held about half a second for five 12-megapixel photos.
        prepared = [_timed(self.prepare_reference, picture) for picture in pictures]
        with self.exclusive_use():
            made = [
                self._introduce_view(picture, user_keywords, area_pct, ready)
                for picture, ready in zip(pictures, prepared)
            ]
        embeddings = torch.cat([rows for _, rows, _ in made]).to(self.memory_dtype)
        residuals = (
            torch.cat([extra for _, _, extra in made], dim=1).to(self.memory_dtype)
            if self.backend.residual_levels
            else None
        )
        return Concept(
            name=name,
            embeddings=embeddings,
            model_id=self.model_id,
            views=tuple(view for view, _, _ in made),
            residuals=residuals,
        )

    def _chat_text(self, content: list[dict]) -> str:
        return self.backend.chat_text(content, original_system=self.settings.system_prompt == "original")

    def prepare_reference(self, picture) -> Encoded:
        """The processor's inputs for a reference image and the description prompt: CPU work without the model,
        run outside the model's lock while another thread may use the same tokenizer. That is safe because no call
        of the engine changes the tokenizer's state (padding, truncation: batches are padded by `batching.collate`);
        a call that did would change what the other thread's call returns."""
        return self.backend.encode(
            self._chat_text([{"type": "image"}, {"type": "text", "text": prompts.DESCRIBE_PROMPT}]),
            image=picture,
            image_max_pixels=self.settings.reference_max_pixels,
            video_frame_max_pixels=self.settings.video_frame_max_pixels,
            one_view=True,
        )

    def encode_reference(self, picture, prepared: Encoded | None = None) -> Reference:
        """(1) X_R: the projector output the LLM would receive for this reference image, [N_r, D]; `prepared`: its
        `prepare_reference`, made beforehand."""
        encoded = prepared if prepared is not None else self.prepare_reference(picture)
        rows = self.backend.encode_vision(encoded)
        grid, columns = self.backend.grid(encoded), encoded.visual_columns
        if rows.shape[0] != columns.numel() or grid[0] * grid[1] != rows.shape[0]:
            raise RuntimeError(f"visual tokens disagree: {rows.shape[0]} rows, {columns.numel()} columns, grid {grid}")
        return Reference(encoded=encoded, rows=rows, grid=grid)

    def describe(
        self, reference: Reference, layers, *, user_keywords=None, size_new_tokens: int, timings: dict | None = None
    ) -> Description:
        """(2) and (4): the self-description (or the user's keywords) with the attention rows of its tokens
        recorded at `layers`, then the size question in the same conversation.

        The description is generated like any answer (compiled decoding where it is on); then ONE eager forward
        over prompt + description + the size question's turn (all but its last token) records the description
        tokens' rows: by causality they are the numbers generation would have seen, and no capture runs
        inside a compiled decode step. The size question is answered on that forward's cache."""
        timings = {} if timings is None else timings
        clock, tokenizer = _Stopwatch(), self.backend.tokenizer
        prompt_ids = reference.encoded.inputs["input_ids"].to(self.device)  # [1, L0]
        start = prompt_ids.shape[1]
        generate_kwargs = self.backend.generate_kwargs(reference.encoded)

        # (2) Eq. 1: the self-description, greedy.
        with torch.no_grad():
            if user_keywords is None:
                out = self.model.generate(
                    input_ids=prompt_ids,
                    **generate_kwargs,
                    **self.decoding,
                    max_new_tokens=self.settings.description_max_new_tokens,
                    min_new_tokens=2,
                )
                description_ids = _strip_stop(out[0, start:].tolist(), self.backend.stop_token_ids)
            else:
                # Tokenized into the prompt: a family's image token in them must stay plain text (the concept keeps
                # the words as the visitor wrote them).
                special = self.backend.special_strings
                said = ", ".join(prompts.neutralize(word, special) for word in user_keywords)
                description_ids = tokenizer(said, add_special_tokens=False).input_ids
        timings["description_s"] = clock.lap()

        # (3)'s input and (4): the conversation so far, the size question asked in it. One forward over all but
        # its last token records the description's rows [start, start + len) at `layers` and fills the cache;
        # generate feeds the last token and answers.
        follow = tokenizer(self.backend.continue_turn(prompts.SIZE_PROMPT), add_special_tokens=False).input_ids
        sequence = torch.tensor([prompt_ids[0].tolist() + description_ids + follow], device=self.device)  # [1, L]
        length = sequence.shape[1]
        cache = self.decoder.cache(length + size_new_tokens)  # the static cache, or None: a dynamic one
        capture = AttentionCapture(
            layers=frozenset(layers),
            columns=reference.encoded.visual_columns.to(self.device),
            first_row=start,
            end_row=start + len(description_ids),
            call_start=0,
        )
        with capturing(capture), torch.no_grad():
            prefix = self.model(
                input_ids=sequence[:, :-1],
                **_extend(generate_kwargs, length - 1),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )  # no [L, vocab] logits
        size_kwargs = _extend(generate_kwargs, length)
        size_kwargs.pop("mm_encoder_outputs", None)  # the image is in the cache: its rows would be scattered twice
        with torch.no_grad():
            size_out = self.model.generate(
                input_ids=sequence,
                **size_kwargs,
                past_key_values=prefix.past_key_values,
                **self.decoding,
                max_new_tokens=size_new_tokens,
            )
        size_ids = size_out[0, length:].tolist()
        size_answer = tokenizer.decode(size_ids, skip_special_tokens=True).strip()
        size_cut = len(size_ids) >= size_new_tokens and size_ids[-1] not in self.backend.stop_token_ids
        timings["size_s"] = clock.lap()
        return Description(
            ids=description_ids, start=start, capture=capture, size_answer=size_answer, size_cut=size_cut
        )

    def _introduce_view(
        self, picture, user_keywords, user_area_pct, prepared: tuple[Encoded, float] | None = None
    ) -> tuple[ConceptView, torch.Tensor, torch.Tensor | None]:
        """One reference image: (its view, its memory rows [K_c, D], their residuals [levels, K_c, D] or None);
        `prepared`: its `prepare_reference` and the seconds it took, made before the model's turn."""
        timings, tokenizer, clock = {}, self.backend.tokenizer, _Stopwatch()
        encoded, preparing_s = prepared if prepared is not None else (None, 0.0)
        reference = self.encode_reference(picture, encoded)
        x_r, grid, n_r = reference.rows, reference.grid, reference.rows.shape[0]
        timings["encode_s"] = preparing_s + clock.lap()  # the processor's part and the vision tower's
        described = self.describe(
            reference,
            self.layers,
            user_keywords=user_keywords,
            size_new_tokens=self.settings.size_max_new_tokens if user_area_pct is None else 1,
            timings=timings,
        )  # description_s, size_s
        clock.lap()
        description_ids, start, size_answer = described.ids, described.start, described.size_answer

        # Keywords: the description's content words (stop-words and punctuation dropped; with
        # keywords_drop_stopwords off, as in the paper, only punctuation), or the user's.
        description = tokenizer.decode(description_ids, skip_special_tokens=True)
        content_only = user_keywords is None and self.settings.keywords_drop_stopwords
        positions, keywords = keyword_positions(tokenizer, description_ids, content_only=content_only)
        keyword_rows = [start + i for i in positions]

        # (3) Eq. 3: I_j = mean over layers l in L, heads h, keywords n of A^{l,h}_{wr}[n, j].
        scores = layer_importance(described.capture, keyword_rows).mean(dim=0)  # [N_r]
        timings["scores_s"] = clock.lap()

        # (5) Eq. 4, then (6) top-K_c tokens in raster order.
        if user_area_pct is not None:
            area_pct, area_source = user_area_pct, "user"
            size_answer = ""
        else:
            area_pct, area_source = prompts.read_area_pct(
                size_answer, described.size_cut, self.settings.area_pct_fallback
            )
        k = (
            memory_size(area_pct, n_r, self.settings.k_cap_tokens)
            if self.settings.memory_size_rule == "area"
            else min(n_r, self.settings.k_cap_tokens)
        )
        token_indices = select_tokens(scores, k, self.settings.memory_selection)
        k = int(token_indices.numel())  # N_r when the whole image is kept
        rows = x_r[token_indices.to(x_r.device)].detach().cpu()  # [K_c, D]
        residuals = self.backend.residual_rows(reference.encoded)  # [levels, N_r, D] (Qwen3-VL) or None
        if residuals is not None:
            residuals = residuals[:, token_indices.to(residuals.device)].detach().cpu()  # [levels, K_c, D]
        timings["selection_s"] = clock.lap()

        view = ConceptView(
            token_indices=token_indices,
            scores=scores.float(),
            grid=grid,
            k=k,
            area_pct=float(area_pct),
            keywords=tuple(user_keywords) if user_keywords is not None else tuple(keywords),
            description=description if user_keywords is None else ", ".join(user_keywords),
            size_answer=size_answer,
            keywords_source="user" if user_keywords is not None else "model",
            area_source=area_source,
            timings_s=timings,
        )
        return view, rows, residuals

    # ------------------------------------------------------------------------------------------
    # 3.2 Inference with memories as soft prompts
    # ------------------------------------------------------------------------------------------
    def answer(
        self,
        question: str,
        concepts: Sequence[Concept] | Concept = (),
        *,
        image=None,
        video=None,
        max_new_tokens: int | None = None,
    ) -> Answer:
        """Answer `question` about an image or a video (or neither), knowing `concepts`."""
        staged = self._stage_answer(question, concepts, image, video, max_new_tokens)
        with self.exclusive_use():
            prepared = self._prepared(staged)
            with torch.no_grad(), self.backend.memory_residuals(prepared.slots, prepared.residuals):
                out = self.model.generate(**prepared.generate)
        new = out[0, prepared.context_tokens :]
        text = self.backend.tokenizer.decode(new, skip_special_tokens=True).strip()
        return prepared.answer(text, _strip_stop(new.tolist(), self.backend.stop_token_ids))

    def stream_answer(
        self,
        question: str,
        concepts: Sequence[Concept] | Concept = (),
        *,
        image=None,
        video=None,
        max_new_tokens: int | None = None,
    ) -> Iterator[Answer]:
        """Like `answer`, yielding the text so far as it is generated. Closing the iterator stops generation."""
        staged = self._stage_answer(question, concepts, image, video, max_new_tokens)
        with self.exclusive_use():
            prepared = self._prepared(staged)

            def generate(**streaming):
                with torch.no_grad(), self.backend.memory_residuals(prepared.slots, prepared.residuals):
                    return self.model.generate(**prepared.generate, **streaming)

            outputs = []
            # Closed early (Stop), the stream returns once generation has ended: it stops at its next token, and
            # until then it still writes to the shared static cache and the backend's state, so the model is not
            # handed to the next caller before that.
            pieces = _streamed(self.backend.tokenizer, generate, outputs=outputs)
            text = ""
            try:
                for text in pieces:
                    yield prepared.answer(text)
            finally:
                pieces.close()
            # The tokens too (generation has ended; a failed one raised above).
            new = outputs[0][0, prepared.context_tokens :].tolist() if outputs else []
            yield prepared.answer(text.strip(), _strip_stop(new, self.backend.stop_token_ids))

    def answer_batch(
        self,
        requests: Sequence[AnswerRequest],
        *,
        stops: Sequence[threading.Event | None] | None = None,
        on_text: Callable[[int, Answer], None] | None = None,
    ) -> list[Answer | Exception]:
        """Answer several questions (`ego.batching.AnswerRequest`: the arguments of `answer`) with one batched
        generation; each answer equals the one `answer` gives for its request alone.

        Returns, per request in order, its `Answer`, or the error that request alone raised while it was checked
        and prepared (an `InputError`, `IncompatibleMemoryError`, ...): one visitor's mistake ends only their
        question. stops: per request, an event that, once set, ends that request's answer where it is (the others
        go on). on_text(index, answer so far) is called as each request's answer grows, in the calling thread.
        """
        requests, stops = _batch_arguments(requests, stops, AnswerRequest)
        results: list[Answer | Exception | None] = [None] * len(requests)
        for request in requests:
            self._check_staged(request)
        with self.exclusive_use():
            prepared: dict[int, PreparedAnswer] = {}
            for index, request in enumerate(requests):
                # A refusal, or e.g. a processor refusing this clip or its photo running out of memory: this
                # request alone is told. A request not staged beforehand (`stage`) is staged here, in the model's turn.
                outcome = request.staged or _per_request(
                    self._stage_answer,
                    request.question,
                    request.concepts,
                    request.image,
                    request.video,
                    request.max_new_tokens,
                )
                if not isinstance(outcome, Exception):
                    outcome = _per_request(self._prepared, outcome)
                if isinstance(outcome, Exception):
                    results[index] = outcome
                else:
                    prepared[index] = outcome
            if prepared:
                order = list(prepared)  # batch row -> request index
                answered = self._generate_batch(
                    list(prepared.values()),
                    [stops[i] for i in order],
                    None if on_text is None else lambda row, answer: on_text(order[row], answer),
                    keep=[requests[i].keep_context for i in order],
                )
                for index, (text, ids, stopped, kept) in zip(prepared, answered):
                    results[index] = answer = prepared[index].answer(text, ids, stopped)
                    if kept is not None:
                        answer._handed = self._handed(prepared[index], requests[index], *kept)
        return results

    def _handed(self, prepared: PreparedAnswer, request: AnswerRequest, cache, positions) -> HandedContext:
        """A batch row's context for the conversation that will adopt its answer: the preparation without its
        device tensors (pixels, vision outputs, embeddings; a conversation recomputes none of them on this cache),
        its row of the cache and its positions."""
        encoded = dataclasses.replace(
            prepared.encoded, inputs=_context_inputs(prepared.encoded, self.backend), encoder_outputs=None
        )
        slim = dataclasses.replace(
            prepared,
            generate={"input_ids": prepared.generate["input_ids"].cpu()},
            slots=prepared.slots.cpu(),
            residuals=None,
            encoded=encoded,
        )
        question = checks.check_question(request.question, self.settings)
        asked = (question, tuple(request.concepts), request.image, request.video)
        return HandedContext(slim, cache, positions, asked, model=self.model, settings=self.settings)

    def _generate_batch(
        self, prepared: list[PreparedAnswer], stops: list, on_text, keep: Sequence[bool] = ()
    ) -> list[tuple[str, list[int], bool, tuple | None]]:
        """One `generate` for the prepared questions (`ego.batching`), each row ended on its own; their texts,
        tokens, whether a Stop ended them, and for the rows `keep` asks for, (their row of the key/value cache,
        their positions: `HandedContext`), else None."""
        from transformers import StoppingCriteriaList

        tokenizer, stop_ids = self.backend.tokenizer, self.backend.stop_token_ids
        # Every row of a batch starts with padding, the longest too: transformers builds the decode step's mask
        # differently for a batch without any (a tensor of its own, not a view), and the compiled step guards on
        # that, so a batch of equal lengths would compile a graph of its own in the middle of serving.
        kwargs = batching.collate(
            [p.generate for p in prepared], self._pad_id(), min_padding=1 if len(prepared) > 1 else 0
        )
        start = kwargs["input_ids"].shape[1]  # L
        slots = batching.left_pad_mask([p.slots for p in prepared], start)  # bool [B, L]
        extra = [p.residuals for p in prepared if p.residuals is not None]
        residuals = torch.cat(extra, dim=1) if extra else None  # [levels, M, D]
        budgets = [p.generate["max_new_tokens"] for p in prepared]
        control = self._row_control(
            start, budgets, stops, on_text, lambda row, text, own: prepared[row].answer(text, own)
        )
        keep = list(keep) or [False] * len(prepared)
        caches = {"return_dict_in_generate": True} if any(keep) else {}
        with torch.no_grad(), self.backend.memory_residuals(slots, residuals):
            out = self.model.generate(
                **{**kwargs, **self.decoding, **caches}, stopping_criteria=StoppingCriteriaList([control])
            )
        sequences = out.sequences if caches else out  # [B, L + new]
        answers = [
            batching.row_tokens(ids, budgets[row], stop_ids, control.lengths[row])
            for row, ids in enumerate(sequences[:, start:].tolist())
        ]
        kept: list[tuple | None] = [None] * len(prepared)
        if caches:
            # Copied now, before the next request resets a shared static cache. A row's own positions: past its
            # padding, its prompt and its answer, without its stop token (the next turn writes that itself) and
            # without what the batch wrote after the row had ended.
            config, positions = self.model.config.get_text_config(), self.backend.save_positions()
            written = out.past_key_values.get_seq_length()
            for row, own in enumerate(prepared):
                if keep[row]:
                    padding = start - own.context_tokens
                    length = min(own.context_tokens + len(answers[row]), written - padding)
                    cache = batching.row_cache(out.past_key_values, row, padding, length, config)
                    kept[row] = (cache, self.backend.row_positions(positions, row))
            self._make_room_for_caches(sum(_cache_bytes(context[0]) for context in kept if context is not None))
        return [
            (tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, stopped, context)
            for ids, stopped, context in zip(answers, control.stopped, kept)
        ]

    def _pad_id(self) -> int:
        """The token that pads a batch's rows (the model's pad token, else its first stop token)."""
        pad_id = self.model.generation_config.pad_token_id
        return pad_id if pad_id is not None else self.backend.stop_token_ids[0]

    def _row_control(self, start: int, budgets: list[int], stops: list, on_text, answer_of) -> batching.RowControl:
        """The stopping criterion of a batched generate (each row ended on its own); with `on_text`, each row's
        answer so far, `answer_of(row, text, token ids)`, handed to `on_text(row, answer)` after every step."""
        tokenizer, stop_ids = self.backend.tokenizer, self.backend.stop_token_ids

        def on_step(row: int, ids: list[int]) -> bool:
            """Hand the row's text so far on; False when it is held back (`RowControl.handed`)."""
            own = batching.row_tokens(ids, budgets[row], stop_ids)
            text = tokenizer.decode(own, skip_special_tokens=True)
            if text.endswith("\ufffd") and not control.ended[row]:
                return False  # a character split between two tokens: shown with the next one, as a streamer does
            # with its tokens: a conversation that adopts this answer (after a Stop) continues from exactly those
            on_text(row, answer_of(row, text, own))
            return True

        control = batching.RowControl(start, budgets, stops, stop_ids, on_step if on_text is not None else None)
        return control

    def stage(self, request: AnswerRequest | FollowUpRequest) -> AnswerRequest | FollowUpRequest:
        """`request` with its work that needs no model done now, in the calling thread, for `answer_batch` or
        `follow_up_batch`, whose model's turn then holds only the model's work: for a question, the checks, its
        photo or clip decoded, the processor's resizing and tokenizing (`StagedAnswer`); for a follow-up, the same for
        its conversation's first context where the follow-up must compute it again (`StagedContext`: a first answer
        adopted, a cache dropped). A server stages each visitor's question in that visitor's own thread, side by
        side, while the model answers others. Raises what `answer` raises for a question's bad input, and a full
        conversation's `ConversationFullError`."""
        if not isinstance(request, (AnswerRequest, FollowUpRequest)):
            raise TypeError(
                f"stage takes an ego.batching.AnswerRequest or FollowUpRequest; got {type(request).__name__}."
            )
        if request.staged is not None:
            self._check_staged(request)
            return request
        if isinstance(request, FollowUpRequest):
            chat = request.chat
            if getattr(getattr(chat, "engine", None), "model", None) is not self.model:
                return request  # not this engine's conversation: follow_up_batch says so
            checks.check_question(request.question, chat.engine.settings)
            checks.check_max_new_tokens(request.max_new_tokens, chat.engine.settings)
            return dataclasses.replace(request, staged=chat._stage_context())
        staged = self._stage_answer(
            request.question, request.concepts, request.image, request.video, request.max_new_tokens
        )
        return dataclasses.replace(request, staged=staged)

    def _check_staged(self, request: AnswerRequest | FollowUpRequest) -> None:
        """A request's staged work is what this engine's `stage` made for it: its kind of request, this engine's
        model and settings, a follow-up's own conversation."""
        staged = request.staged
        if staged is None:
            return

        def made_by(answer: StagedAnswer, engine) -> bool:
            return answer.model is getattr(engine, "model", None) and answer.settings == engine.settings

        if isinstance(request, FollowUpRequest):  # its first context is the conversation's engine's to prepare
            taken = isinstance(staged, StagedContext) and staged.chat is request.chat
            taken = taken and (staged.first is None or made_by(staged.first, request.chat.engine))
        else:
            taken = isinstance(staged, StagedAnswer) and made_by(staged, self)
        if not taken:
            raise ValueError("A request's staged work is made by this engine's stage(request); stage it here.")

    def _prepare_answer(self, question, concepts, image, video, max_new_tokens) -> PreparedAnswer:
        """Section 3.2 for one question: check it, choose the concepts, build the context, put the memories in."""
        return self._prepared(self._stage_answer(question, concepts, image, video, max_new_tokens))

    def _stage_answer(self, question, concepts, image, video, max_new_tokens, loaded: bool = False) -> StagedAnswer:
        """What section 3.2 does before the model: check the question, load its photo or clip, choose the concepts
        where no vision tower is needed, and run the processor on the prompt (CPU work, safe beside the model's
        turn: see `prepare_reference`). loaded: the photo or clip is a conversation's, loaded and checked already."""
        query = self._check_question(question, concepts, image, video, max_new_tokens, loaded)
        concepts, keep = query.concepts, self.settings.max_concepts_in_context
        if len(concepts) > keep and query.visual_block:
            probe = self._encode_query(query, query.visual_block + [{"type": "text", "text": query.text}])
            return StagedAnswer(query=query, encoded=probe, selection=None, model=self.model, settings=self.settings)
        selection = Selection(kept=concepts, dropped=[])
        if len(concepts) > keep:  # no photo or clip to compare with: the question's names, then the given order
            selection.kept, selection.dropped = select_concepts(concepts, keep, question=query.text)
        encoded = self._encode_query(query, self._context_blocks(query, selection.kept))
        self._check_fits(query, encoded)
        return StagedAnswer(query=query, encoded=encoded, selection=selection, model=self.model, settings=self.settings)

    def _prepared(self, staged: StagedAnswer) -> PreparedAnswer:
        """Section 3.2's model work for a staged question: rank the concepts where there are more than fit, compare
        them with the photo or clip, put the memories in. `staged` stays as it was (the vision tower's outputs, on the
        model's device, go into copies): it holds no device memory after the answer."""
        query, encoded = staged.query, dataclasses.replace(staged.encoded)
        selection = dataclasses.replace(staged.selection) if staged.selection is not None else None
        if selection is None:
            selection = self._rank_concepts(query, probe=encoded)
            # The context's prompt is known only now, with the kept concepts: through the processor in the model's
            # turn (the ranked case only).
            encoded = self._encode_query(query, self._context_blocks(query, selection.kept))
            self._check_fits(query, encoded)
        memory = selection.kept_rows() if selection.rows_on_device else self._memories_on_device(selection.kept)
        if selection.probe is not None:
            encoded.encoder_outputs = selection.probe.encoder_outputs  # the query was encoded once, for ranking
        elif query.visual_block:
            selection.scores, selection.maps = self._compare(query, encoded, memory)  # every concept is kept
        input_ids, embeds, slots = self._soft_prompt(encoded, self._placed_memory(selection.kept, memory))
        names = [c.name for c in query.concepts]
        return PreparedAnswer(
            generate=dict(
                input_ids=input_ids,
                inputs_embeds=embeds,
                **self.backend.generate_kwargs(encoded),
                max_new_tokens=query.max_new_tokens,
                **self.decoding,
            ),
            slots=slots[None],
            residuals=self._memory_residuals(selection.kept),
            kept=list(selection.kept),
            used=[c.name for c in selection.kept],
            dropped=[c.name for c in selection.dropped],
            context_tokens=input_ids.shape[1],
            memory_tokens=int(slots.sum()),
            similarity=list(zip(names, selection.scores)),
            similarity_maps=list(zip(names, selection.maps)),
            encoded=encoded,
        )

    def _check_fits(self, query: Query, encoded: Encoded) -> None:
        """The question's context and its answer's budget within `max_conversation_context_tokens`."""
        context, budget = encoded.inputs["input_ids"].shape[1], query.max_new_tokens
        limit = self.settings.max_conversation_context_tokens
        if context + budget > limit:  # e.g. concepts imported with very long memories
            media = " or a shorter clip" if query.clip is not None else ""
            # The answer's budget alone may be what does not fit: then a shorter answer is the way out.
            raise ConversationFullError(
                f"This question needs {context} tokens of context with your concepts' memories and the photo or "
                f"clip, and {budget} more for its answer: over the {limit} a conversation may hold",
                longest_answer_tokens=limit - context if context < limit else None,
                otherwise=f"ask about fewer concepts{media}",
            )

    def _check_question(self, question, concepts, image, video, max_new_tokens, loaded: bool = False) -> Query:
        """Every check before any model call: the text, the length cap, the concepts' model, the media (`loaded`:
        a conversation's photo or clip, which `chat` loaded, checked and reduced: taken as it is, not copied and
        checked again)."""
        question = prompts.neutralize(checks.check_question(question, self.settings), self.backend.special_strings)
        max_new_tokens = checks.check_max_new_tokens(max_new_tokens, self.settings)
        if image is not None and video is not None:
            raise InputError("Ask about one image or one video at a time, not both.")
        concepts = self._check_compatible(concepts)
        if loaded:
            picture, clip = image, video
        else:
            picture = self._query_picture(image) if image is not None else None
            clip = load_video(video, self.settings) if video is not None else None
        return Query(text=question, concepts=concepts, picture=picture, clip=clip, max_new_tokens=max_new_tokens)

    def _query_picture(self, image) -> Image.Image:
        """A query photo, loaded and checked (`load_image`), reduced past `query_image_kept_factor` times the
        processor's budget (what the processor and a conversation's follow-ups get)."""
        factor, budget = self.settings.query_image_kept_factor, self.settings.query_image_max_pixels
        return reduced(load_image(image, self.settings), factor * budget)

    def _check_compatible(self, concepts: Sequence[Concept] | Concept) -> list[Concept]:
        """The concepts as a list (one `Concept` is a list of one), if each is a `Concept` (else `InputError`)
        made with this model (else `IncompatibleMemoryError`). Every call that takes concepts checks them here."""
        concepts = check_concepts(concepts)
        for concept in concepts:
            levels = None if concept.residuals is None else concept.residuals.shape[0]
            if (
                not same_model(concept.model_id, self.model_id)
                or concept.embeddings.shape[1] != self.hidden_size
                or levels not in (None, self.backend.residual_levels)
            ):
                raise IncompatibleMemoryError(
                    f"The concept {concept.name!r} was made with {concept.model_id}, not {self.model_id}; "
                    f"introduce it again with this model."
                )
        return concepts

    def _encode_query(self, query: Query, text_blocks: list[dict]) -> Encoded:
        return self._encode_prompt(self._chat_text(text_blocks), query.picture, query.clip)

    def _encode_prompt(self, prompt: str, picture, clip) -> Encoded:
        encoded = self.backend.encode(
            prompt,
            image=picture,
            video=clip,
            image_max_pixels=self.settings.query_image_max_pixels,
            video_frame_max_pixels=self.settings.video_frame_max_pixels,
        )
        encoded.prompt = prompt
        return encoded

    def _compare(self, query: Query, encoded: Encoded, memory=None) -> tuple[list[float], list[torch.Tensor]]:
        """Run the vision tower on the photo or clip (once: generate reuses it) and compare every concept
        with its visual tokens (once: ranking, scores and maps share one cosine matrix)."""
        rows = self.backend.encode_vision(encoded)  # [N, D]
        if not query.concepts or not rows.shape[0]:
            return [], []
        located = self.backend.query_map(encoded) if query.picture is not None else None
        return similarity_to_query(query.concepts, rows, located, memory=memory)

    def _placed_memory(self, kept: Sequence[Concept], rows: torch.Tensor | None = None) -> torch.Tensor:
        """The rows placed at the context's slots for `kept` (their memories, `rows` when already on the device;
        none where keyword lines stand for them): [M, D]."""
        rows = self._memories_on_device(kept) if rows is None else rows
        return rows[:0] if self.settings.memory_keywords == "only" else rows

    def _memories_on_device(self, group: Sequence[Concept]) -> torch.Tensor:
        """The memories of `group` on the model's device, in one copy: [sum K, D]."""
        if not group:
            return torch.zeros(0, self.hidden_size, dtype=self.memory_dtype, device=self.device)
        return torch.cat([c.embeddings for c in group]).to(self.device)

    def _rank_concepts(self, query: Query, probe: Encoded) -> Selection:
        """More concepts than fit, and a photo or clip: the named ones, then the most similar to it (the vision
        tower's rows of `probe`, the photo or clip with the question, compared with every memory)."""
        concepts, keep = query.concepts, self.settings.max_concepts_in_context
        selection = Selection(kept=concepts, dropped=[], probe=probe)
        everything = self._memories_on_device(concepts)
        selection.scores, selection.maps = self._compare(query, probe, everything)
        # The kept ones' rows are taken from this copy, not copied to the device again.
        selection.rows_on_device = dict(zip(map(id, concepts), everything.split([c.num_tokens for c in concepts])))
        selection.kept, selection.dropped = select_concepts(
            concepts, keep, question=query.text, scores=selection.scores or None
        )
        return selection

    def _context_blocks(self, query: Query, kept: Sequence[Concept]) -> list[dict]:
        """The user turn: the kept memories, each after its name, then the image or video and the question."""
        blocks = []
        if kept:
            lines = "".join(self._memory_line(c) for c in kept)
            intro, outro = prompts.memory_prompt(self.settings.memory_prompt)
            blocks.append({"type": "text", "text": intro + lines + outro})
        return blocks + query.visual_block + [{"type": "text", "text": query.text}]

    def _memory_line(self, concept: Concept) -> str:
        """One concept's line: its name, then its visual tokens' placeholders, its keywords, or both
        (`Settings.memory_keywords`)."""
        special, mode = self.backend.special_strings, self.settings.memory_keywords
        parts = []
        if mode != "only":
            pad = self.backend.placeholder_token
            parts.append(f"{self.backend.memory_open}{pad * concept.num_tokens}{self.backend.memory_close}")
        if mode != "none":
            parts.append(", ".join(prompts.neutralize(word, special) for word in concept.keywords))
        return f"{prompts.neutralize(concept.name, special)}: {' '.join(parts)}\n"

    def _soft_prompt(self, encoded: Encoded, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids [1, L], input embeddings [1, L, D] with the memory rows at the placeholders, the
        placeholders: bool [L])."""
        input_ids = encoded.inputs["input_ids"].to(self.device)  # [1, L]
        with torch.no_grad():
            embeds = self.model.get_input_embeddings()(input_ids).clone()  # [1, L, D]
        slots = input_ids[0] == self.backend.placeholder_id
        if int(slots.sum()) != memory.shape[0]:
            raise RuntimeError(f"{int(slots.sum())} memory placeholders for {memory.shape[0]} memory rows")
        embeds[0, slots] = memory.to(device=embeds.device, dtype=embeds.dtype)
        return input_ids, embeds, slots

    def _memory_residuals(self, kept: Sequence[Concept]) -> torch.Tensor | None:
        """The kept memories' residuals [levels, M, D], for a family that adds them (a memory saved without
        them adds nothing there); None otherwise."""
        if not self.backend.residual_levels or not kept or self.settings.memory_keywords == "only":
            return None
        return torch.cat(
            [
                c.residuals
                if c.residuals is not None
                else c.embeddings.new_zeros(self.backend.residual_levels, *c.embeddings.shape)
                for c in kept
            ],
            dim=1,
        )  # [levels, M, D]

    # ------------------------------------------------------------------------------------------
    # 3.2 in a conversation: follow-up questions on the cached context
    # ------------------------------------------------------------------------------------------
    def chat(self, concepts: Sequence[Concept] | Concept = (), *, image=None, video=None) -> Chat:
        """A conversation about one image or video (or neither), knowing `concepts`: its first question encodes
        the photo or clip and the memories once, each follow-up computes only its own tokens (`Chat`)."""
        if image is not None and video is not None:
            raise InputError("Ask about one image or one video at a time, not both.")
        concepts = self._check_compatible(concepts)
        picture = self._query_picture(image) if image is not None else None
        clip = load_video(video, self.settings) if video is not None else None
        return Chat(self, concepts, picture, clip)

    def follow_up_batch(
        self,
        requests: Sequence[FollowUpRequest],
        *,
        stops: Sequence[threading.Event | None] | None = None,
        on_text: Callable[[int, Answer], None] | None = None,
    ) -> list[Answer | Exception]:
        """Follow-ups of several conversations (`ego.batching.FollowUpRequest`: a `Chat`, a question, a token
        budget) answered together; each answer, and each conversation afterwards, is what `chat.ask` gives alone.

        The conversations that hold their key/value cache share one batched generation: their caches are stacked,
        each left-padded to one length, and only the tokens each lacks are computed (a row's last cached tokens
        are computed again where another row brings more new tokens, so that all rows' new tokens end together);
        afterwards each conversation takes its own row of the cache back. A conversation that has no cache (its cache
        dropped, or its first turn answered elsewhere and adopted without its context, `AnswerRequest.keep_context`)
        computes it first, on its own and without generating (`Chat._prime`), then joins the batch.
        Returns, per request, its `Answer` or the error that request alone raised while it was checked (an
        `InputError`: the turn limit, a full conversation, the same conversation twice; `ModelBusyError` when its
        preparation ran out of memory), or the error of the generation it was part of: the others' answers stand.
        stops and on_text as in `answer_batch`."""
        requests, stops = _batch_arguments(requests, stops, FollowUpRequest)
        results: list[Answer | Exception | None] = [None] * len(requests)
        for request in requests:
            self._check_staged(request)
        with self.exclusive_use():
            turns: dict[int, _Turn] = {}
            for index, request in enumerate(requests):
                if getattr(getattr(request.chat, "engine", None), "model", None) is not self.model:
                    results[index] = ValueError(
                        "This conversation is not one of this engine's model (Ego.chat of the engine that answers it)."
                    )
                    continue
                if any(requests[other].chat is request.chat for other in turns):
                    results[index] = InputError("This conversation is already answering a question; ask when it ends.")
                    continue
                # Preparing it or computing its context failed (the turn limit, out of memory, ...): this request
                # alone is told.
                outcome = _per_request(self._begin_follow_up, request, [other.chat for other in requests])
                if isinstance(outcome, Exception):
                    results[index] = outcome
                else:
                    turns[index] = outcome
            # Each conversation's M-RoPE offset, read before any generation: a group's `_keep_cache` may drop the
            # cache (and the offset) of a conversation answered in a later group, which still continues its old cache.
            offsets = {i: requests[i].chat._positions for i in turns}
            shared = [i for i in turns if turns[i].prefill_tokens < turns[i].length]  # on their own caches
            while True:
                # Every row computes the longest new part: a row computes again its last cached tokens where its own
                # is shorter. Those must be text (turns and answers): its first context (photo or clip, memory
                # rows) is never computed again in a batch, which brings no pixels and no residuals.
                new = max((turns[i].prefill_tokens for i in shared), default=0)
                short = [i for i in shared if turns[i].length - new < requests[i].chat._slots.numel()]
                if not short:
                    break
                shared = [i for i in shared if i not in short]
            try:
                self.backend.stack_positions([offsets[i] for i in shared])
            except ValueError:  # a conversation without its offset: each is answered on its own
                shared = []
            groups = [shared] if len(shared) > 1 else []
            groups += [[i] for i in turns if not any(i in group for group in groups)]
            for group in groups:
                # A failed generation: its requests get its error; the answers other groups gave (and their
                # conversations recorded) stand.
                answers = _per_request(
                    self._follow_ups,
                    [requests[i].chat for i in group],
                    [turns[i] for i in group],
                    [offsets[i] for i in group],
                    group,
                    stops,
                    on_text,
                )
                if isinstance(answers, Exception):
                    answers = [answers] * len(group)
                for index, answer in zip(group, answers):
                    results[index] = answer
        return results

    @staticmethod
    def _begin_follow_up(request: FollowUpRequest, batch: list[Chat]) -> _Turn:
        """The turn of `request`'s follow-up; a conversation without its cache computes it first, on its own and
        without pushing out the caches of the `batch`'s other conversations."""
        chat = request.chat
        if len(batch) > 1 and chat.turns and chat._cache is None:
            chat._prime(keep=batch, context=request.staged)
        return chat._begin(request.question, request.max_new_tokens, use_cache=True, context=request.staged)

    def _follow_ups(
        self, chats: list[Chat], turns: list[_Turn], offsets: list, indices: list[int], stops, on_text
    ) -> list[Answer]:
        """One generate for the follow-ups of `chats` (one conversation alone on its own cache, or several on their
        caches stacked), each row ended on its own, from each conversation's own position `offsets`; the
        conversations record their turns, all of them once every row's answer and cache are ready."""
        from transformers import StoppingCriteriaList

        tokenizer, stop_ids = self.backend.tokenizer, self.backend.stop_token_ids
        config = self.model.config.get_text_config()
        budgets = [turn.generate["max_new_tokens"] for turn in turns]
        if len(chats) == 1:
            kwargs, start = turns[0].generate, turns[0].length
        else:
            calls = [{k: v for k, v in turn.generate.items() if k != "past_key_values"} for turn in turns]
            kwargs = batching.collate(calls, self._pad_id(), min_padding=1)  # see `_generate_batch`
            start = kwargs["input_ids"].shape[1]  # L
            new = max(turn.prefill_tokens for turn in turns)  # the rows' new tokens: the last `new` of L
            caches = [turn.generate["past_key_values"] for turn in turns]
            kept = [turn.length - new for turn in turns]
            kwargs["past_key_values"] = batching.stack_caches(caches, kept, start - new, config)
            self.backend.restore_positions(self.backend.stack_positions(offsets))
        control = self._row_control(
            start,
            budgets,
            [stops[i] for i in indices],
            None if on_text is None else lambda row, answer: on_text(indices[row], answer),
            lambda row, text, own: chats[row]._answer(text, turns[row], own),
        )
        criteria = StoppingCriteriaList([control])
        if len(chats) == 1:  # exactly `Chat.ask`'s call, with the row's own Stop
            if turns[0].prefill_tokens < turns[0].length:  # on its cache: its own offset (others' `_begin` moved it)
                self.backend.restore_positions(offsets[0])
            out = chats[0]._generate(turns[0], stopping_criteria=criteria)
            return [chats[0]._finish(turns[0], out, ended_at=control.lengths[0], stopped=control.stopped[0])]
        with torch.no_grad():  # the memory rows and their residuals are in the caches: none among the new tokens
            out = self.model.generate(**kwargs, stopping_criteria=criteria)
        rows = []
        for row, turn in enumerate(turns):  # every row ready before any conversation changes
            answer_ids = batching.row_tokens(
                out.sequences[row, start:].tolist(), budgets[row], stop_ids, control.lengths[row]
            )
            ids = turn.generate["input_ids"][0].tolist() + answer_ids
            padding = start - turn.length
            length = min(len(ids), out.past_key_values.get_seq_length() - padding)
            cache = batching.row_cache(out.past_key_values, row, padding, length, config)
            text = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
            rows.append((ids, cache, chats[row]._answer(text, turn, answer_ids, control.stopped[row])))
        for chat, turn, offset, (ids, cache, answer) in zip(chats, turns, offsets, rows):
            chat._ids, chat._cache, chat._positions = ids, cache, offset
            chat.turns.append((turn.question, answer))
        for chat in chats:
            self._keep_cache(chat)
        return [answer for _, _, answer in rows]

    def _keep_cache(self, chat: Chat, keep: Sequence[Chat] = ()) -> None:
        """Mark `chat`'s cache the most recently used, then drop the least recently used caches until all of
        them together fit `max_cached_conversations_mb` (a conversation whose cache was dropped recomputes it on
        its next question). The caches of `keep` (a batch being prepared) are not dropped now: the budget is
        settled when their answers are recorded."""
        with self._cached_chats_lock:
            self._cached_chats.pop(id(chat), None)
            self._cached_chats[id(chat)] = weakref.ref(chat)
            self._drop_caches_beyond(self.settings.max_cached_conversations_bytes, {id(other) for other in keep})

    def _make_room_for_caches(self, cache_bytes: int) -> None:
        """In the model's turn, before a batch hands `cache_bytes` of first answers' caches over (`HandedContext`):
        the least recently used caches are dropped until those fit `max_cached_conversations_mb` beside the rest,
        so that the conversations that adopt them (outside the model's turn, where nothing is dropped) find room."""
        with self._cached_chats_lock:
            self._drop_caches_beyond(self.settings.max_cached_conversations_bytes - cache_bytes)

    def _drop_caches_beyond(self, budget: int, kept: set[int] = frozenset()) -> None:
        """Drop the least recently used caches, but those of the conversations whose ids are in `kept`, until all
        held fit `budget` bytes; with `_cached_chats_lock` held, in the model's turn."""
        holding = self._holding_caches()
        total = sum(held.cache_bytes for held in holding)
        for held in holding:  # least recently used first
            if total <= budget:
                break
            if id(held) in kept:
                continue
            total -= held.cache_bytes
            held.drop_cache()
            del self._cached_chats[id(held)]

    def _holding_caches(self) -> list[Chat]:
        """The conversations that hold a cache, least recently used first (the others leave the record)."""
        holding = []
        for key, ref in list(self._cached_chats.items()):
            held = ref()
            if held is None or held.cache_bytes == 0:
                del self._cached_chats[key]
            else:
                holding.append(held)
        return holding

    def _take_cache_if_room(self, chat: Chat, cache_bytes: int, take: Callable[[], None]) -> bool:
        """If `cache_bytes` more fit `max_cached_conversations_mb` beside the caches held now, `take()` (which gives
        `chat` its cache) and record `chat` as their most recent holder; whether it did. Called outside the model's
        turn (`Chat.adopt`), it drops no other conversation's cache: one being answered now needs its own (and its
        positions) until its turn ends."""
        with self._cached_chats_lock:
            held = sum(other.cache_bytes for other in self._holding_caches() if other is not chat)
            if held + cache_bytes > self.settings.max_cached_conversations_bytes:
                return False
            take()
            self._cached_chats.pop(id(chat), None)
            self._cached_chats[id(chat)] = weakref.ref(chat)
            return True

    # ------------------------------------------------------------------------------------------
    # The model guard
    # ------------------------------------------------------------------------------------------
    def unguarded(self) -> Ego:
        """This engine (the same model) without its one-call-at-a-time lock, for a process that runs one call at
        a time by itself: a worker forked from this one (ZeroGPU) must not take a lock that the fork copied, as a
        thread that no longer exists there may have held it."""
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._lock = contextlib.nullcontext()
        return other

    @contextlib.contextmanager
    def exclusive_use(self):
        """The model to the caller alone for the block (other callers wait): one model call at a time; an
        out-of-memory error frees memory and says what to change. Every engine call takes it; code that drives
        the engine's steps itself (`ego.calibrate`) takes it around them."""
        with self._lock:
            out_of_memory = False
            try:
                yield
            except torch.OutOfMemoryError:
                out_of_memory = True  # handled below, once the exception and its frames are released
            if out_of_memory:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise ModelBusyError(OUT_OF_MEMORY)


@dataclass
class _Turn:
    """One question of a conversation, ready for generate."""

    question: str
    generate: dict[str, Any]
    """Keyword arguments of `model.generate`: the whole conversation's input_ids [1, T] and inputs_embeds
    [1, T, D], and its cache when it is reused."""
    slots: torch.Tensor
    """The memory placeholders in the whole conversation: bool [1, T]."""
    length: int
    """T, the conversation's tokens before this answer."""
    prefill_tokens: int
    prepared: PreparedAnswer | None = None
    """The first question's preparation (section 3.2); None for a follow-up."""


class Chat:
    """A conversation with the engine about one image or video (or neither), knowing some concepts.

    The first question is answered as `Ego.answer` answers it (concepts chosen, memories placed at their
    placeholders, the photo or clip encoded) and the key/value cache of the conversation is kept; a follow-up
    closes the previous answer, opens a new user turn (`Backend.continue_turn`) and computes only those
    tokens on that cache. Asked with `use_cache=False`, or after the engine dropped its cache
    (`max_cached_conversations_mb`), a conversation recomputes its whole token sequence: the same greedy answer.
    """

    def __init__(self, engine: Ego, concepts: Sequence[Concept], picture, clip):
        self.engine = engine
        self.concepts, self.picture, self.clip = tuple(concepts), picture, clip
        self.turns: list[tuple[str, Answer]] = []
        """(question, Answer) of every question answered so far."""
        self._ids: list[int] = []
        """The conversation so far: the first context, then each answer (stop tokens removed) and user turn."""
        self._slots = torch.zeros(0, dtype=torch.bool)
        """The first context's memory placeholders, bool [L0] on CPU."""
        self._kept: tuple[Concept, ...] = ()
        """The concepts in the first context, in order: their memories (and residuals) fill those placeholders, taken
        from the concepts again for each question rather than copied here."""
        self._inputs: dict[str, Any] = {}
        """The first question's processor output but its pixels (grids, masks, ...), to recompute the context from."""
        self._prompt = ""
        """The first question's chat text: with the photo or clip, the processor gives its pixels again."""
        self._details: dict[str, Any] = {}
        """What every answer reports about the first context (`Answer` fields)."""
        self._cache = None
        self._positions = None
        """The backend's position state after this conversation's last generate (`Backend.save_positions`)."""
        self._adopted: list[tuple[str, list[int]]] = []
        """(question, answer tokens) of the turns answered elsewhere since this conversation last asked the model,
        until its next question adds them to its tokens."""

    @property
    def cache_bytes(self) -> int:
        """Memory held by the conversation's key/value cache (0 when it has none)."""
        return 0 if self._cache is None else _cache_bytes(self._cache)

    def drop_cache(self) -> None:
        self._cache, self._positions = None, None

    def _new_cache(self):
        """An empty key/value cache of the conversation's own. Never None: compiled decoding would then lend its
        shared static cache, which the next request resets; given this one, it decodes on the shared cache all the
        same and copies the sequence back into this one (`ego.decoding`)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.engine.model.config.get_text_config())

    def ask(self, question: str, *, max_new_tokens: int | None = None, use_cache: bool = True) -> Answer:
        """Answer `question` in this conversation. use_cache=False recomputes the whole conversation."""
        staged, context = self._stage(question, max_new_tokens, use_cache)
        with self.engine.exclusive_use():
            turn = self._begin(question, max_new_tokens, use_cache, staged, context)
            return self._finish(turn, self._generate(turn))

    def stream(self, question: str, *, max_new_tokens: int | None = None, use_cache: bool = True) -> Iterator[Answer]:
        """Like `ask`, yielding the text so far as it is generated. Closing the iterator stops generation; the
        answer so far stays in the conversation."""
        outputs, handed, answer = [], [0], None
        staged, context = self._stage(question, max_new_tokens, use_cache)
        with self.engine.exclusive_use():
            turn = self._begin(question, max_new_tokens, use_cache, staged, context)
            # Closed early, the stream returns once generation has ended: it writes the conversation's cache until then.
            pieces = _streamed(
                self.engine.backend.tokenizer,
                lambda **streaming: self._generate(turn, **streaming),
                outputs=outputs,
                handed=handed,
            )
            ended = False
            try:
                for text in pieces:
                    yield self._answer(text, turn)
                ended = True
            finally:
                pieces.close()
                if outputs:  # stopped, the turn keeps the tokens behind the text its caller was handed, no more
                    answer = self._finish(turn, outputs[0], None if ended else handed[0], stopped=not ended)
            yield answer

    def adopt(self, question: str, answer: Answer) -> None:
        """Take `answer`, given to `question` elsewhere, as this conversation's next turn: a first answer given in a
        batch with other visitors' questions (`Ego.answer_batch`), or any answer given by a copy of this
        conversation in another process (ZeroGPU's workers keep nothing between calls). No model call now: the
        next question asked here adds those turns to the conversation's tokens and computes what its cache lacks
        (everything, when it has none). A first answer that brings its context (`AnswerRequest.keep_context`, asked
        about this conversation's concepts, photo or clip) is taken with it, where the cache budget has room: the
        next question then computes only its own tokens (`_continue_on`). The answer's own tokens are taken
        (`Answer.token_ids`), so the conversation goes on exactly as if it had answered itself; an answer known only
        as text is tokenized again. A question this conversation would refuse (its checks, its turn limit) is
        refused here (InputError), nothing taken: taken, it would make every later question fail."""
        handed = getattr(answer, "__dict__", {}).pop("_handed", None)  # taken here or nowhere: it holds GPU memory
        self._check_room()
        text = checks.check_question(question, self.engine.settings)
        if not isinstance(answer, str):
            raise InputError(
                f"The answer to take is text (a str, or the ego.Answer a call returned); got {type(answer).__name__}."
            )
        ids = (
            list(getattr(answer, "token_ids", ()))
            or self.engine.backend.tokenizer(str(answer), add_special_tokens=False).input_ids
        )
        if handed is not None and self._continue_on(handed, text, ids):
            self.turns.append((str(question).strip(), answer))
            return
        self._adopted.append((str(question), ids))
        self.turns.append((str(question).strip(), answer))

    def _continue_on(self, handed: HandedContext, question: str, answer_ids: list[int]) -> bool:
        """Take a first answer's context as the batch that answered it computed (`HandedContext`), where it is
        this conversation's and its cache fits `max_cached_conversations_mb` now: the next question then computes
        only its own tokens. False (nothing taken): the next question computes the context itself."""
        if not handed.continues(self, question):
            return False

        def take() -> None:
            self._remember_context(handed.prepared)
            self._ids = self._ids + answer_ids
            self._cache, self._positions = handed.cache, handed.positions

        return self.engine._take_cache_if_room(self, _cache_bytes(handed.cache), take)

    def _stage_first_turn(self, question, max_new_tokens) -> StagedAnswer:
        """The first question's work that needs no model, as `Ego.answer` does it, on this conversation's concepts
        and its photo or clip as `Ego.chat` loaded them."""
        return self.engine._stage_answer(question, self.concepts, self.picture, self.clip, max_new_tokens, loaded=True)

    def _stage_context(self, use_cache: bool = True) -> StagedContext | None:
        """A follow-up's work that needs no model (`Ego.stage`): the first context's processor work where the next
        question must compute that context (a first turn adopted and not computed yet, a cache dropped, or not
        used); None where it need not. A full conversation is refused here (`ConversationFullError`), nothing
        computed."""
        self._check_room()
        # Read once: the model's turn of this conversation's previous question may still be writing them (a Stop
        # lets its visitor ask again before that turn ends); a staging that no longer fits is not taken.
        adopted, ids, cache, prompt = list(self._adopted), self._ids, self._cache, self._prompt
        if adopted and not ids:
            staged = self._stage_first_turn(adopted[0][0], 1)
            return StagedContext(first=staged, for_turn=adopted[0], chat=self)
        without_cache = cache is None or not use_cache
        if ids and prompt and without_cache and (self.picture is not None or self.clip is not None):
            return StagedContext(pixels=self._context_pixels(prompt), prompt=prompt, chat=self)
        return None

    def _add_adopted(self, context: StagedContext | None = None) -> dict[str, torch.Tensor]:
        """The turns answered elsewhere, added to the conversation's tokens: the first context prepared as
        `Ego.answer` prepares it (from `context` where it was staged for that turn), each later question's turn as
        a follow-up opens it (`Backend.continue_turn`), and each answer's tokens. Returns the first context's pixels
        where they are at hand, prepared here or staged in `context` (a question asked now without a cache recomputes
        that context: not twice through the processor), else nothing."""
        engine, pixels = self.engine, {}
        while self._adopted:  # one turn at a time: a failure leaves the conversation as the turns before made it
            question, answer_ids = self._adopted[0]
            if not self._ids:
                # Its context only (the answer is known): checked against the limit with a budget of one token.
                staged = context.first if context is not None and context.for_turn is self._adopted[0] else None
                if staged is None:
                    staged = self._stage_first_turn(question, 1)
                prepared = engine._prepared(staged)
                self._remember_context(prepared)
                pixels = self._pixels_of(prepared.encoded)
            else:
                self._ids = self._ids + self._turn_ids(checks.check_question(question, engine.settings))
            self._ids = self._ids + answer_ids
            self._adopted.pop(0)
        if not pixels and context is not None and context.pixels is not None and context.prompt == self._prompt:
            pixels = context.pixels
        return pixels

    def _turn_ids(self, text: str) -> list[int]:
        """The tokens that close the previous answer and ask the checked question `text` (`Backend.continue_turn`)."""
        backend = self.engine.backend
        said = prompts.neutralize(text, backend.special_strings)
        return backend.tokenizer(backend.continue_turn(said), add_special_tokens=False).input_ids

    def _check_room(self) -> None:
        limit = self.engine.settings.max_conversation_turns
        if len(self.turns) >= limit:
            raise ConversationFullError(
                f"A conversation holds at most {limit} question{'s' * (limit != 1)}", new_conversation=True
            )

    def _stage(self, question, max_new_tokens, use_cache: bool) -> tuple[StagedAnswer | None, StagedContext | None]:
        """A question's work that needs no model (`Ego.stage`), done before the model's turn: the first question
        staged, or a follow-up's first context where it must be computed again."""
        if not self.turns:
            return self._stage_first_turn(question, max_new_tokens), None
        return None, self._stage_context(use_cache)

    def _begin(
        self,
        question,
        max_new_tokens,
        use_cache: bool,
        staged: StagedAnswer | None = None,
        context: StagedContext | None = None,
    ) -> _Turn:
        """Every check, then the generate arguments: the first question's as `Ego.answer` prepares them (from
        `staged` when it was staged beforehand), a follow-up's for the whole conversation (its cache, if kept,
        holds all but the new tokens; its first context's processor work from `context` when it was staged)."""
        engine, settings = self.engine, self.engine.settings
        self._check_room()
        if not self.turns:
            if staged is None:
                staged = self._stage_first_turn(question, max_new_tokens)
            prepared = engine._prepared(staged)
            return _Turn(
                question=str(question).strip(),
                generate=dict(prepared.generate, past_key_values=self._new_cache(), return_dict_in_generate=True),
                slots=prepared.slots,
                length=prepared.context_tokens,
                prefill_tokens=prepared.context_tokens,
                prepared=prepared,
            )
        text = checks.check_question(question, settings)
        max_new_tokens = checks.check_max_new_tokens(max_new_tokens, settings)
        # Dropped with this question if it fails: the photo or clip gives them again.
        pixels = self._add_adopted(context)
        ids = self._ids + self._turn_ids(text)
        limit = settings.max_conversation_context_tokens
        if len(ids) + max_new_tokens > limit:
            # Its answer's budget alone may be what does not fit: a shorter answer still can.
            raise ConversationFullError(
                f"This conversation is full ({limit} tokens of context with its next answer)",
                new_conversation=True,
                longest_answer_tokens=limit - len(ids) if len(ids) < limit else None,
            )
        return self._turn(text, ids, max_new_tokens, self._cache if use_cache else None, pixels)

    def _turn(self, text: str, ids: list[int], max_new_tokens: int, cache, pixels: dict) -> _Turn:
        """generate's arguments for the conversation's tokens `ids` [T]: on `cache` (its tokens already computed),
        or on a new cache with the first context's pixels (`pixels` if the caller has them)."""
        engine = self.engine
        input_ids = torch.tensor([ids], device=engine.device)  # [1, T]
        with torch.no_grad():
            embeds = engine.model.get_input_embeddings()(input_ids).clone()  # [1, T, D]
        slots = torch.zeros(1, len(ids), dtype=torch.bool)
        slots[0, : self._slots.numel()] = self._slots
        memory = engine._placed_memory(self._kept)  # [M, D]
        embeds[0, slots[0].to(embeds.device)] = memory.to(device=embeds.device, dtype=embeds.dtype)
        # The processor's tensors grown to the whole conversation (the new tokens are text), pixels included.
        kwargs = _extend(
            engine.backend.generate_kwargs(Encoded(inputs=self._inputs, visual_columns=slots[0])), len(ids)
        )
        if cache is not None:  # the photo or clip is in the cache: its pixels are not needed
            engine.backend.restore_positions(self._positions)
        else:
            cache = self._new_cache()
            kwargs.update(self._first_context_pixels(pixels))
        return _Turn(
            question=text,
            slots=slots,
            length=len(ids),
            prefill_tokens=len(ids) - cache.get_seq_length(),
            generate=dict(
                input_ids=input_ids,
                inputs_embeds=embeds,
                past_key_values=cache,
                **kwargs,
                max_new_tokens=max_new_tokens,
                return_dict_in_generate=True,
                **engine.decoding,
            ),
        )

    def _prime(self, keep: Sequence[Chat] = (), context: StagedContext | None = None) -> None:
        """Compute the key/value cache of the conversation so far (its first context and every turn), asking
        nothing: a conversation without one (its first turn answered in a batch and adopted, or its cache dropped)
        can then join a batch of follow-ups, which computes only text. One generate with a budget of one token: its
        prefill writes the cache and the M-RoPE offset exactly as answering the last turn here would have."""
        self._check_room()  # a conversation that cannot be followed up is not computed for nothing
        pixels = self._add_adopted(context)
        turn = self._turn("", self._ids, 1, None, pixels)
        out = self._generate(turn)
        self._cache = out.past_key_values
        extra = self._cache.get_seq_length() - len(self._ids)
        if extra > 0:  # whatever the one-token generation wrote past the conversation's tokens
            self._cache.crop(-extra)
        self._positions = self.engine.backend.save_positions()
        self.engine._keep_cache(self, keep)

    def _generate(self, turn: _Turn, **extra):
        """generate for one turn (the memory's residuals added where the family adds them); a failure leaves the
        conversation without a cache, since a half-written one cannot be continued."""
        residuals = turn.prepared.residuals if turn.prepared is not None else self.engine._memory_residuals(self._kept)
        try:
            with torch.no_grad(), self.engine.backend.memory_residuals(turn.slots, residuals):
                return self.engine.model.generate(**turn.generate, **extra)
        except BaseException:
            self.drop_cache()
            raise

    def _finish(self, turn: _Turn, out, ended_at: int | None = None, stopped: bool = False) -> Answer:
        """Record the turn: its answer's tokens join the conversation (the first `ended_at` generated, when a Stop
        ended it: `batching.RowControl.lengths`), and the cache is kept for the next."""
        engine = self.engine
        generated = out.sequences[0, turn.length :].tolist()[:ended_at]
        answer_ids = _strip_stop(generated, engine.backend.stop_token_ids)
        text = engine.backend.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        if turn.prepared is not None:
            self._remember_context(turn.prepared)
        else:
            self._ids = turn.generate["input_ids"][0].tolist()
        self._ids = self._ids + answer_ids
        self._cache = out.past_key_values
        extra = self._cache.get_seq_length() - len(self._ids)
        if extra > 0:  # a removed stop token the next turn writes itself (crop takes how many to remove)
            self._cache.crop(-extra)
        self._positions = engine.backend.save_positions()
        engine._keep_cache(self)
        answer = self._answer(text, turn, answer_ids, stopped)
        self.turns.append((turn.question, answer))
        return answer

    def _pixels_of(self, encoded: Encoded) -> dict[str, torch.Tensor]:
        return {k: v for k, v in encoded.inputs.items() if k in self.engine.backend.vision_input_keys}

    def _first_context_pixels(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The processor's pixels of the first context on the model's device, to recompute it: `pixels` when an
        adopted first turn just prepared them, else computed again from the photo or clip loaded as the first
        question loaded them and the same chat text (the processor is deterministic: the same tensors, the same
        answer). A conversation keeps its photo or clip (a byte a value), not the processor's float32 pixels."""
        if not pixels and (self.picture is not None or self.clip is not None):
            pixels = self._context_pixels(self._prompt)
        return {k: v.to(self.engine.device) for k, v in pixels.items()}

    def _context_pixels(self, prompt: str) -> dict[str, torch.Tensor]:
        """The first context's pixels from the processor, on CPU: its photo or clip (as `Ego.chat` loaded them)
        through its chat text `prompt`."""
        return self._pixels_of(self.engine._encode_prompt(prompt, self.picture, self.clip))

    @property
    def held_bytes(self) -> int:
        """Memory this conversation holds for its follow-ups besides its key/value cache (bounded on its own,
        `max_cached_conversations_mb`) and its concepts (kept where they were made): its photo or clip, the first
        context's processor output but its pixels (computed again when needed) and its tokens, and the turns' texts
        and tokens. Past its first question it grows only by turns, within `max_conversation_context_tokens`."""
        total = 0
        if self.picture is not None:
            width, height = self.picture.size
            total += width * height * len(self.picture.getbands())
        if self.clip is not None:
            total += int(self.clip[0].nbytes)  # frames: uint8 [T, H, W, 3]
        tensors = [*self._inputs.values(), self._slots]
        total += sum(storage_bytes(t) for t in tensors if torch.is_tensor(t))
        total += _PYTHON_INT_BYTES * (len(self._ids) + sum(len(ids) for _, ids in self._adopted))
        for question, answer in self.turns:
            total += len(question) + len(answer) + _PYTHON_INT_BYTES * len(answer.token_ids)
        return total

    def _remember_context(self, prepared: PreparedAnswer) -> None:
        """Keep what a follow-up needs of the first context: its tokens, which concepts fill its memory slots, the
        processor's output but its pixels, and the chat text that gives them again."""
        self._ids = prepared.generate["input_ids"][0].tolist()
        self._slots = prepared.slots[0].cpu()
        self._kept = tuple(prepared.kept)
        self._inputs = _context_inputs(prepared.encoded, self.engine.backend)
        self._prompt = prepared.encoded.prompt
        self._details = dict(
            used=prepared.used,
            dropped=prepared.dropped,
            memory_tokens=prepared.memory_tokens,
            similarity=prepared.similarity,
            similarity_maps=prepared.similarity_maps,
        )

    def _answer(self, text: str, turn: _Turn, token_ids=(), stopped: bool = False) -> Answer:
        if turn.prepared is not None:
            return turn.prepared.answer(text, token_ids, stopped)
        return Answer(
            text,
            context_tokens=turn.length,
            prefill_tokens=turn.prefill_tokens,
            token_ids=token_ids,
            stopped=stopped,
            **self._details,
        )


# ----------------------------------------------------------------------------------------------
# The rules, as plain functions (tests recompute them independently)
# ----------------------------------------------------------------------------------------------
_ONE_IMAGE = (str, bytes, bytearray, memoryview, os.PathLike, io.IOBase, Image.Image, np.ndarray, dict)
"""What `load_image` takes as one image (or refuses as one: a dict), though a string or an array is iterable."""


def _image_list(images) -> list:
    """`introduce`'s images as a list: one image is a list of one, any other iterable is listed."""
    if isinstance(images, _ONE_IMAGE) or not hasattr(images, "__iter__"):
        return [images]
    return list(images)


def _per_request(work, *args):
    """`work(*args)`, or the error it raised, as the outcome of the request(s) of a batch it serves: one visitor's
    failure is theirs alone, the others of the batch go on (hence every error is caught: it is handed to the
    request's visitor, who sees it as if they had been answered alone). Running out of GPU memory is told as the
    model being busy, after the memory the failed work held is given back."""
    try:
        return work(*args)
    except torch.OutOfMemoryError:
        busy = ModelBusyError(OUT_OF_MEMORY)
    except Exception as error:  # noqa: BLE001 -- handed to the request's visitor, as said above
        return error
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # after the except block: the error's frames no longer hold tensors
    return busy


def memory_size(area_pct: float, n_r: int, k_cap: int) -> int:
    """Eq. 4: K_c = max(1, round(min(K, alpha_c * N_r / 100))), rounding halves up."""
    return max(1, int(math.floor(min(k_cap, area_pct * n_r / 100.0) + 0.5)))


MEMORY_SELECTIONS = ("attention", "uniform", "whole_image")


def select_tokens(scores: torch.Tensor, k: int, selection: str = "attention") -> torch.Tensor:
    """Indices (raster order) of the tokens a memory keeps from scores [N_r]: the top k by attention (the
    method), k evenly spaced ones, or all of them (the ablations of Table 3)."""
    n_r = scores.numel()
    if selection == "attention":
        return torch.topk(scores, k).indices.sort().values
    if selection == "uniform":
        return torch.linspace(0, n_r - 1, k).round().long().unique()
    if selection == "whole_image":
        return torch.arange(n_r)
    raise ValueError(f"memory_selection must be one of {MEMORY_SELECTIONS}; got {selection!r}.")


def similarity_to_query(
    concepts: Sequence[Concept],
    query_rows: torch.Tensor,
    located: tuple[torch.Tensor, tuple[int, int]] | None = None,
    *,
    memory: torch.Tensor | None = None,
) -> tuple[list[float], list[torch.Tensor]]:
    """How much each concept's memory looks like the query's visual tokens [N, D] (both are projector
    outputs, so they live in the same space), from one cosine matrix [sum K, N] for all concepts:

    - scores: per concept, the mean over its memory rows of the best cosine similarity with any query token;
    - maps (with `located` = (indices [rows * cols], (rows, cols)) of the tokens that cover the whole image):
      per concept, each of those tokens' best cosine similarity with one of its memory rows, float32
      [rows, cols] on CPU.

    memory: the concepts' rows already concatenated [sum K, D], if the caller has them on the device.
    All concepts go to the device in one copy and come back in one transfer: a per-concept copy and read-back
    would make the host wait for the GPU once per concept, and decoding is host-bound.
    """
    if not concepts:
        return [], []
    query = F.normalize(query_rows.float(), dim=-1)  # [N, D]
    if memory is None:
        memory = torch.cat([c.embeddings for c in concepts])  # [sum K, D]
    cosine = F.normalize(memory.to(query.device).float(), dim=-1) @ query.T  # [sum K, N]
    parts = cosine.split([c.embeddings.shape[0] for c in concepts])  # [K_c, N] each
    scores = torch.stack([part.max(dim=1).values.mean() for part in parts])  # [C]
    if located is None:
        return scores.cpu().tolist(), []
    indices = located[0].to(query.device)
    maps = torch.stack([part[:, indices].max(dim=0).values for part in parts])  # [C, rows * cols]
    scores, maps = scores.cpu().tolist(), maps.reshape(len(concepts), *located[1]).cpu()
    return scores, list(maps.unbind(0))


# Scripts written without spaces between words, or with particles joined to nouns (Thai, Lao, Myanmar, Khmer,
# kana, Han, Hangul): a name in them has no word boundary to find ("我的猫在哪里", "첼시가 어디 있어?").
_UNSPACED = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f"
)
_UNSPACED_LETTER = re.compile(f"[{_UNSPACED}]")
_SPACED_LETTER = re.compile(f"(?![{_UNSPACED}])[\\w{prompts.MARKS}]")
"""A word character or a combining mark of a script with spaces: next to one, a name is part of a longer word
("Chelseas"; "राम" in "रामू", whose last letter takes a vowel sign)."""


def _folded(text: str) -> str:
    """`text` as names are compared: without format characters, which are invisible and never decide a match (a
    zero-width joiner in "👩‍💻" or a non-joiner in "کتاب‌خانه" typed or left out, the tags of a flag), then
    compatibility-normalised (a decomposed "Zoë", full-width letters) and case-folded."""
    return unicodedata.normalize("NFKC", checks.without_invisible(text)).casefold()


def named_in(question: str, name: str) -> bool:
    """Whether `question` names the concept: the whole name, any case, spacing and Unicode form ("chelsea's"
    names Chelsea; so does "我的猫在哪里" 猫)."""
    words = _folded(name).split()
    if not words:
        return False
    text = _folded(question)
    # The letters on either side are checked one by one (the class of letters and marks is thousands of
    # characters: compiled into each name's pattern, it took milliseconds per concept and question).
    bounded_before, bounded_after = not _UNSPACED_LETTER.match(words[0][0]), not _UNSPACED_LETTER.match(words[-1][-1])
    pattern, start = re.compile(r"\s+".join(re.escape(word) for word in words)), 0
    while (found := pattern.search(text, start)) is not None:
        joined_before = bounded_before and found.start() > 0 and _SPACED_LETTER.match(text, found.start() - 1)
        joined_after = bounded_after and _SPACED_LETTER.match(text, found.end())
        if not joined_before and not joined_after:
            return True
        start = found.start() + 1
    return False


def select_concepts(
    concepts: Sequence[Concept], keep: int, *, question: str = "", scores: Sequence[float] | None = None
):
    """Keep `keep` concepts, in the order given; returns (kept, dropped), the last dropped ranked lowest.

    First the concepts the question names (the visitor asks about them), then the ones with the highest
    `scores` (their similarity to the query, `similarity_to_query`), or, with nothing to compare with, the
    first ones.
    """
    scores = list(scores) if scores is not None else [0.0] * len(concepts)
    ranked = sorted(range(len(concepts)), key=lambda i: (not named_in(question, concepts[i].name), -scores[i], i))
    chosen = set(ranked[:keep])
    kept = [c for i, c in enumerate(concepts) if i in chosen]
    dropped = [concepts[i] for i in ranked[keep:]]
    return kept, dropped


def layer_importance(capture: AttentionCapture, keyword_rows: Sequence[int]) -> torch.Tensor:
    """Eq. 3 per layer: I^l_j = mean over heads h and keywords n of A^{l,h}_{wr}[n, j], for the layers of
    `capture` in increasing order: float32 [|L|, N_r] on CPU. The importance is its mean over the layers."""
    attention = capture.matrix(list(keyword_rows))  # [|L|, H, N_w, N_r]
    return attention.mean(dim=2).mean(dim=1).cpu()  # [|L|, N_r]


def keyword_positions(tokenizer, ids: list[int], *, content_only: bool) -> tuple[list[int], list[str]]:
    """Indices (into `ids`) of the tokens that spell the keywords, and the keywords.

    Fallbacks, in order: content words; any word; every token (a description with no words at all).
    """
    prefixes = [tokenizer.decode(ids[: i + 1], skip_special_tokens=True) for i in range(len(ids))]
    ends = [len(prefix) for prefix in prefixes]
    starts = [0] + ends[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for i in range(1, len(ids)):
        if prefixes[i - 1].endswith("\ufffd") and text[ends[i - 1] - 1 : ends[i - 1]] != "\ufffd":
            # The previous token ended inside a character ("é", "猫": several byte tokens), decoded as U+FFFD;
            # this one goes on spelling that character, so its span starts there too.
            starts[i] = ends[i - 1] - 1
    for only in [True, False] if content_only else [False]:
        spans = prompts.word_spans(text, content_only=only)
        positions = [
            i
            for i, (a, b) in enumerate(zip(starts, ends))
            if b > a and any(a < end and start < b for start, end in spans)
        ]
        if positions:
            words = prompts.content_words(text) if only else [text[a:b].lower() for a, b in spans]
            return positions, list(dict.fromkeys(words))
    return list(range(len(ids))), []


class _TextSoFar:
    """A streamer for `generate`: after each generated token, the whole answer so far decoded again, with how many
    tokens are behind it, put on `pieces`; a character split between two tokens (the text ends in U+FFFD) waits for
    the next one. (transformers' TextIteratorStreamer hands text on only up to its last space, or a CJK
    ideograph: a Thai answer, or a Japanese one in kana, showed nothing until it ended, or at all when stopped.)"""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.pieces = tokenizer, [], queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands the prompt on first: [1, L]
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())  # the step's token: [1]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.pieces.put((text, len(self.ids)))

    def end(self) -> None:
        self.pieces.put((self.tokenizer.decode(self.ids, skip_special_tokens=True), len(self.ids)))


def _streamed(tokenizer, generate, *, outputs: list | None = None, handed: list | None = None) -> Iterator[str]:
    """The text so far as `generate(streamer=..., stopping_criteria=...)` produces it in a thread of its own (the
    caller's thread stays free to hand each piece on), stripped as the whole answer is, and only when it grew.
    Closing the iterator stops generation at the next token and waits until the thread has ended; generate's result
    is appended to `outputs`, and its error is raised here. `handed[0]`, when given, is kept at the number of
    generated tokens behind the last text handed on (a conversation stopped there continues from exactly what its
    visitor saw, not from the token generated after the Stop)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stop, failure = threading.Event(), []
    handed = [0] if handed is None else handed
    handed[:] = [0]

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    streamer = _TextSoFar(tokenizer)

    def run():
        try:
            result = generate(streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop()]))
            if outputs is not None:
                outputs.append(result)
        except Exception as error:  # noqa: BLE001 -- re-raised in the caller's thread below
            failure.append(error)
        finally:
            streamer.pieces.put(None)  # the end, however generation ended

    worker = threading.Thread(target=run, name="ego-generate", daemon=True)
    worker.start()
    shown = ""
    try:
        while (piece := streamer.pieces.get()) is not None:
            text, count = piece
            if (now := text.strip()) != shown:
                shown = now
                handed[0] = count
                yield shown
    finally:
        stop.set()
        worker.join()
    if failure:
        raise failure[0]


def _context_inputs(encoded: Encoded, backend: Backend) -> dict[str, Any]:
    """What a conversation keeps of its first context's processor output: all of it but the token ids (kept as a
    list) and the pixels (computed again from its photo or clip when needed)."""
    dropped = {"input_ids", *backend.vision_input_keys}
    return {k: v for k, v in encoded.inputs.items() if k not in dropped}


def _cache_bytes(cache) -> int:
    """Memory held by a key/value cache's tensors."""
    return sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if torch.is_tensor(t)
    )


def _strip_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    while ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return ids


def _extend(kwargs: dict, length: int) -> dict:
    """Generate kwargs for a longer sequence: per-token tensors [1, L0] grow to [1, length] (text tokens)."""
    extended = {}
    for key, value in kwargs.items():
        if torch.is_tensor(value) and value.dim() == 2 and value.shape[0] == 1 and key.endswith(("mask", "_ids")):
            fill = 1 if key == "attention_mask" else 0
            pad = value.new_full((1, length - value.shape[1]), fill)
            value = torch.cat([value, pad], dim=1)
        extended[key] = value
    return extended


def _checked_layers(layers, num_layers: int) -> tuple[int, ...]:
    """The layers L as sorted unique indices, or ValueError unless each is a decoder layer of `num_layers`."""
    layers = tuple(layers) if not isinstance(layers, (str, bytes)) else (layers,)
    if not all(isinstance(layer, numbers.Integral) and not isinstance(layer, bool) for layer in layers):
        raise ValueError(f"Layers must be whole numbers (decoder layer indices); got {list(layers)}.")
    bad = [layer for layer in layers if not 0 <= int(layer) < num_layers]
    if not layers or bad:
        raise ValueError(f"Layers must be indices between 0 and {num_layers - 1}; got {list(layers)}.")
    return tuple(sorted({int(layer) for layer in layers}))


def _read_layers(layers, num_layers: int, model_id: str) -> tuple:
    """The layers L as given, or read from a file of `python -m ego.calibrate`: one made for this model (`model_id`,
    with `num_layers` decoder layers), from at least one scored image (the engine checks the indices themselves).
    A file that names no model (written by hand) is taken as the indices it lists."""
    if not isinstance(layers, (str, Path)):
        return tuple(layers)
    try:
        document = json.loads(Path(layers).read_text())
        listed, made_for, images = document["layers"], document.get("num_layers", num_layers), document.get("images", 1)
        made_with = document.get("model_id", model_id)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{layers} is not a layers file written by `python -m ego.calibrate`.") from error
    if made_for != num_layers:
        raise ValueError(
            f"{layers} was calibrated for a model with {made_for} decoder layers ({document.get('model_id')}); this "
            f"one has {num_layers}: calibrate this model with `python -m ego.calibrate`."
        )
    if not isinstance(made_with, str):
        raise ValueError(f"{layers} is not a layers file written by `python -m ego.calibrate`.")
    # Models of one depth differ in where their attention finds objects: another model's layers are not these.
    if not same_model(made_with, model_id):
        raise ValueError(
            f"{layers} was calibrated for {made_with}, not {model_id}: calibrate this model with "
            f"`python -m ego.calibrate`, or give its layers as indices (layers=[...])."
        )
    if images == 0:
        raise ValueError(f"{layers} was written from no scored image; calibrate again with masks that show objects.")
    if not isinstance(listed, list):
        raise ValueError(f"{layers} is not a layers file written by `python -m ego.calibrate`.")
    return tuple(listed)


_PYTHON_INT_BYTES = 36
"""A token id kept in a Python list: the int object (28 bytes) and the list's pointer to it (8)."""


def _batch_arguments(requests, stops, kind: type) -> tuple[list, list]:
    """`requests` (each a `kind`) and `stops` (one per request, or None) as lists, or a sentence for the caller's
    mistake before anything runs."""
    requests = list(requests)
    wrong = next((r for r in requests if not isinstance(r, kind)), None)
    if wrong is not None:
        raise TypeError(f"Each request is an ego.batching.{kind.__name__}; got {type(wrong).__name__}.")
    stops = list(stops) if stops is not None else [None] * len(requests)
    if len(stops) != len(requests):
        raise ValueError(f"stops has {len(stops)} events for {len(requests)} requests: give one per request, or None.")
    return requests, stops


def _decoder(model, settings: Settings, prefill_only_inputs: Sequence[str] = ()) -> Decoder:
    """The decoder `settings` ask for (`decoding`, `static_cache_max_tokens`, `compile_backend`,
    `batch_cache_min_free_mb`); `prefill_only_inputs`: the backend's."""
    return Decoder(
        model,
        settings.decoding,
        max_cache_tokens=settings.static_cache_max_tokens,
        backend=settings.compile_backend,
        batch_min_free_bytes=int(settings.batch_cache_min_free_mb * 1024 * 1024),
        prefill_only_inputs=prefill_only_inputs,
    )


class _Stopwatch:
    """Seconds between successive `lap()` calls."""

    def __init__(self):
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


def _timed(function, *args):
    """(function(*args), the seconds it took)."""
    clock = _Stopwatch()
    return function(*args), clock.lap()
