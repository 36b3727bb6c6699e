"""The event handlers of the Space. app.py only wires them to components.

Every handler takes the visitor's `Session` (the `gr.State` value) first, and those a visitor triggers
return it too: Gradio frees a session's state `time_to_live` seconds after it was last *returned*, so
every action of the visitor keeps their concepts alive. Mistakes a visitor can make
(`ego.InputError`, `ego.MemoryFileError`, `ego.ModelBusyError`), and a question the app closed before its
turn (`SchedulerClosedError`), become a `gr.Error` with the engine's sentence, HTML-escaped because Gradio
renders error messages as HTML; anything else is logged by type and stack only (never the visitor's text,
names or file names) and reported as a server fault. A handler changes the session only after all of its
work succeeded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import logging
import os
import threading
import time
import traceback
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder
from PIL import Image

from ego import Answer, checks
from ego.errors import ConversationFullError, InputError, MemoryFileError, ModelBusyError
from ego.media import load_image, load_video
from ego.memory import load_concepts, read_thumbnails, save_concepts

from . import guidance, views
from .conversations import TABS, Conversations, messages
from .examples import Examples
from .loading import LazyEngine
from .pictures import cached
from .resume import Sessions
from .scheduler import AnswerScheduler, SchedulerClosedError, cut_short
from .session import ELSEWHERE, FULL_OF_CONVERSATIONS, Entry, MemoryBudget, Session, name_key
from .settings import SpaceSettings
from .zerogpu import call_seconds, gpu, on_zero_gpu

log = logging.getLogger("ego.space")
ENDED_CONVERSATIONS = " The conversations that knew it ended: your next message starts a new one."
SESSION_ENDED = (
    "Your session on this server ended {after} after your last action (sooner if the server was very "
    "busy), and its concepts and conversations were deleted with it."
)
"""Said once in a tab left open past its session's expiry, at its next action, or to a script whose session held
concepts, at its next question (`Sessions.rejoin`). Not after a restart of the server: it knows no page then, and
says nothing."""
TO_GO_ON = " To go on with your concepts, import your concept file (if you exported one) or introduce them again."
TO_ASK_AGAIN = (
    " Import your concept file (if you exported one) or introduce your concepts again, then ask again{or_now}. Your "
    "question is still in its box."
)
TO_ASK_AGAIN_THROUGH_THE_API = (
    " Import your concept file with /import_concepts (if you exported one) or introduce your concepts again with "
    "/introduce, then ask again{or_now}."
)
TO_FOLLOW_UP_THROUGH_THE_API = (
    " There is no conversation to follow up: bring your concepts back (/import_concepts or /introduce), then ask a "
    "first question with /ask_image or /ask_video."
)
TO_ADD_AGAIN_THROUGH_THE_API = (
    " Nothing was added: make this call again to start a new session with it, and bring your other concepts back "
    "with /import_concepts (if you exported them) or /introduce."
)
WITHOUT_THEM = "; or ask again now, without them"
"""Only beside a photo or clip: a question without one is about the visitor's concepts."""
WAITING_FOR_AN_INTRODUCTION = "Waiting for the model: another concept is being introduced…"
START_AGAIN_ON_THE_PAGE = "press New conversation, then ask again (your question is still in its box)"
START_AGAIN_THROUGH_THE_API = "ask a first question with /ask_image or /ask_video"
MAKE_ROOM = "; remove some of your concepts to make room (export them first to keep them), then ask again."


def in_space_terms(error: Exception, start_again: str = START_AGAIN_THROUGH_THE_API) -> str:
    """The engine's sentence, in what a visitor of the Space can do. When a question does not fit in its
    conversation, the engine tells a Python caller to ask for a shorter answer where one would fit; a visitor cannot
    choose an answer's length (the Space's settings give it): a follow-up's refusal says how to start a new
    conversation (`start_again`), a first question's to make room among the concepts."""
    if isinstance(error, ConversationFullError):
        if error.new_conversation:
            return f"{error.situation}; start a new conversation to ask more: {start_again}."
        if error.longest_answer_tokens is not None:
            return error.situation + MAKE_ROOM
    return str(error)


@contextlib.contextmanager
def for_visitor(
    doing: str,
    session: Session | None = None,
    *,
    quietly: bool = False,
    start_again: str = START_AGAIN_THROUGH_THE_API,
):
    """Turn exceptions into messages for the visitor; `doing` completes "while ..." in a fault message. With
    `quietly`, the sentence is kept for the concept panel's status line (`Session.tell`) instead of raised, and
    the body's work is left undone; a raised one is shown by the browser, so it is not kept (a kept sentence
    would outlive the action it was about). The engine's sentences are put in the Space's terms (`in_space_terms`,
    with `start_again`)."""
    try:
        yield
    except gr.Error:
        raise
    except (InputError, MemoryFileError, ModelBusyError, SchedulerClosedError) as error:
        said = in_space_terms(error, start_again)
        if not quietly:
            raise gr.Error(html.escape(said, quote=False), print_exception=False) from None
        session.tell(said)
    except Exception as error:  # noqa: BLE001 - a server fault; the visitor gets a sentence, the log the stack
        stack = "".join(traceback.format_tb(error.__traceback__))  # code lines only: no message, no values
        log.error("fault while %s: %s\n%s", doing, type(error).__name__, stack)
        sentence = f"Something went wrong on the server while {doing}; it has been logged. Please try again."
        if not quietly:
            raise gr.Error(sentence, print_exception=False) from None
        session.tell(sentence)


def skipped_the_queue(request: gr.Request | None) -> bool:
    """True for an event posted outside the queue (`/run/`: the browser's panel events). The browser shows no
    error of such an event and runs none of the events chained after it, so its refusals are told in the
    panel's status line instead of raised; through the queue (`gradio_client`, `/call/`) they stay errors."""
    path = getattr(getattr(request, "request", None), "url", None)
    return path is not None and "/run/" in path.path


def _most_that_fit(session: Session, entries: list[Entry], max_file_bytes: int) -> int:
    """How many of `entries`, taken in order, the session can add while its export stays within
    `max_file_bytes` (a file's size grows with every concept added: a binary search of the first ones)."""
    low, high = 0, len(entries)
    while low < high:
        middle = (low + high + 1) // 2
        if session.file_bytes_with(entries[:middle]) <= max_file_bytes:
            low = middle
        else:
            high = middle - 1
    return low


def _paths(gallery_value) -> list[str]:
    """File paths from a Gallery value: a list of (path, caption) pairs (or plain paths, from Python callers)."""
    items = [item[0] if isinstance(item, (tuple, list)) else item for item in gallery_value or []]
    return [str(path) for path in items if path]


class Actions:
    def __init__(
        self, engine: LazyEngine, settings: SpaceSettings, examples: Examples, sessions: Sessions | None = None
    ):
        if not isinstance(settings, SpaceSettings):
            raise TypeError(
                f"Actions take the Space's settings (space.settings.SpaceSettings), not "
                f"{type(settings).__name__}: the engine's limits come from the engine."
            )
        self._lazy = engine
        self.settings = settings
        self.limits = engine.settings
        """The engine's settings (`ego.Settings`): the limits it enforces, shown and checked here too."""
        self.examples = examples
        # Twice the sessions Gradio keeps: a tab whose session was dropped as the least recently used is told too.
        self.sessions = sessions if sessions is not None else Sessions(remember=2 * settings.max_sessions)
        """The sessions the page loads handed their tabs (`space.resume`): an action of a tab that outlived its
        session is told so (`Sessions.rejoin`)."""
        self.budget = MemoryBudget(settings.max_all_sessions_memory_bytes)
        """What all visitors' sessions may hold together: one per app, like the model."""
        self.conversation_budget = MemoryBudget(
            settings.max_all_conversations_memory_bytes, held_by=lambda session: session.conversations.nbytes
        )
        """What all visitors' conversations may hold together for their follow-ups, apart from their concepts."""
        self.answers = AnswerScheduler(
            settings.answer_batch_window_s, settings.answer_batch_max_size, settings.answer_batch_preparing_wait_s
        )
        """Questions of different visitors that arrive together are answered by one batched generation."""
        self.zero_gpu = on_zero_gpu()
        """On ZeroGPU each model call runs in a GPU worker process (`space.zerogpu`), one visitor's per call."""
        self._introducing = threading.Lock()
        """One introduction's model call at a time: introductions prepare their photos side by side, but only one
        waits at the engine's lock, so a batch of answers that waits there too waits for one introduction, not for
        every one in progress. Not on ZeroGPU, where each call runs in a GPU worker of its own."""
        fixed_s, per_token_s = settings.zero_gpu_call_fixed_s, settings.zero_gpu_call_per_token_s
        per_photo = self.limits.description_max_new_tokens + self.limits.size_max_new_tokens
        self._stream_on_gpu = gpu(self._stream_in_worker, duration=call_seconds(fixed_s, per_token_s))
        self._follow_up_on_gpu = gpu(self._follow_up_in_worker, duration=call_seconds(fixed_s, per_token_s))
        self._introduce_on_gpu = gpu(
            self._introduce_in_worker,
            duration=lambda name, pictures, *rest: fixed_s + per_token_s * per_photo * len(pictures),
        )

    def close(self) -> None:
        """With the app (`SessionBlocks.close`): the answer scheduler's worker ends after its batch, and the
        questions still waiting are told to ask again."""
        self.answers.close()

    # ------------------------------------------------------------------------------------------
    # Model calls: picklable arguments and results, so that on ZeroGPU they can run in a GPU worker
    # ------------------------------------------------------------------------------------------
    def _worker_engine(self):
        """The engine inside a model call: on ZeroGPU, in the forked worker, without its lock (`Ego.unguarded`)."""
        engine = self._lazy.get()
        return engine.unguarded() if self.zero_gpu else engine

    def _stream_in_worker(self, question, concepts, image, video, max_new_tokens):
        yield from self._worker_engine().stream_answer(
            question, concepts, image=image, video=video, max_new_tokens=max_new_tokens
        )

    def _follow_up_in_worker(self, concepts, picture, clip, turns, question, max_new_tokens):
        """A follow-up in a copy of the conversation: its concepts, photo or clip and turns so far ((question,
        `ego.Answer` with its tokens) pairs); a ZeroGPU worker keeps no cache between calls, so the copy computes
        the whole conversation once, then the answer (the same greedy answer as on a kept cache)."""
        chat = self._worker_engine().chat(concepts, image=picture, video=clip)
        for asked, answered in turns:
            chat.adopt(asked, answered)
        yield from chat.stream(question, max_new_tokens=max_new_tokens)

    def _introduce_in_worker(self, name, pictures, keywords, area_pct):
        return self._worker_engine().introduce(name, pictures, keywords=keywords, area_pct=area_pct)

    def _introduce_in_turn(self, name, pictures, keywords, area_pct, say=None, doing: str = ""):
        """The introduction's model call, once the introductions before it made theirs; `say(message)` shows the
        visitor what it waits for meanwhile, then what it does (`doing`). On ZeroGPU each call has a GPU worker of its
        own (there is no shared model to wait for): at once."""
        if self.zero_gpu:
            return self._introduce_on_gpu(name, pictures, keywords, area_pct)
        if not self._introducing.acquire(blocking=False):
            if say is not None:
                say(WAITING_FOR_AN_INTRODUCTION)
            self._introducing.acquire()
            if say is not None:
                say(doing)
        try:
            return self._introduce_on_gpu(name, pictures, keywords, area_pct)
        finally:
            self._introducing.release()

    def _answer_stream(self, engine, question, concepts, *, image=None, video=None, stop=None, keep_context=False):
        """The answer as it grows (`ego.Answer`s): on ZeroGPU from a GPU call of this visitor's own, elsewhere
        from the scheduler that answers questions arriving together in one batch. Closing it ends the answer, and
        so does setting `stop` (the scheduler's: at its next token; the caller checks it too, after each piece).
        keep_context, for a conversation's first question asked with its own concepts, photo or clip: the whole
        answer brings the context its batch computed, for the conversation to follow up on
        (`AnswerRequest.keep_context`); not on ZeroGPU, where no cache outlives a call."""
        budget = self.limits.answer_max_new_tokens
        if self.zero_gpu:
            return self._stream_on_gpu(question, tuple(concepts), image, video, budget)
        return self.answers.stream(
            engine,
            question,
            concepts,
            image=image,
            video=video,
            max_new_tokens=budget,
            stop=stop,
            keep_context=keep_context,
        )

    def _engine(self, progress):
        """The model, loaded on first use; a load that fails is a server fault with its own sentence."""
        try:
            return self._lazy.get(progress)
        except Exception as error:  # noqa: BLE001 - missing weights, no GPU memory, bad install, ...
            if _not_downloadable(error):  # no traceback: what to do is known
                log.error(
                    "the model %s is not in this machine's Hugging Face cache and could not be downloaded (no "
                    "connection to huggingface.co, or offline mode): let this machine reach the Hub, or start the "
                    "app with --model and a local folder or a tiny preset (e.g. tiny-qwen2.5-vl)",
                    self._lazy.name,
                )
                raise gr.Error(
                    "The model could not be downloaded on this server; the details are in the server's log. "
                    "Please try again later.",
                    print_exception=False,
                ) from None
            stack = "".join(traceback.format_tb(error.__traceback__))
            log.error("the model could not be loaded: %s: %s\n%s", type(error).__name__, error, stack)
            raise gr.Error(
                "The model could not be loaded on this server; the details are in the server's log. "
                "Please try again later.",
                print_exception=False,
            ) from None

    def session_ended(self, then: str = TO_GO_ON) -> str:
        """The sentence for a tab whose session ended since its page loaded, and what to do `then`."""
        return SESSION_ENDED.format(after=views.duration(self.settings.session_ttl_s)) + then

    def _rejoin_adding(self, session: Session, request) -> Session:
        """The session an action that adds concepts works on (`Sessions.rejoin`): in a tab whose session had ended,
        the visitor is told (the concepts they had are gone) and what they add starts the new one. A script reads no
        warning: its call is refused with that sentence (before any work), and made again it starts the new one."""
        session, ended = self.sessions.rejoin(session, request)
        if ended:
            if self.sessions.is_script(request):
                raise gr.Error(self.session_ended(TO_ADD_AGAIN_THROUGH_THE_API), print_exception=False)
            gr.Warning(self.session_ended())
        return session

    # ------------------------------------------------------------------------------------------
    # Introduce
    # ------------------------------------------------------------------------------------------
    def introduce(
        self,
        session: Session,
        name,
        photos,
        keywords=None,
        auto_size=True,
        size_pct=25,
        progress=gr.Progress(),
        request: gr.Request = None,
    ):
        """Introduce a concept from 1-5 photos; returns (session, report, kept-token pictures, heat maps)."""
        session = self._rejoin_adding(session, request)
        with for_visitor("introducing the concept"), contextlib.ExitStack() as reserved:
            name = checks.check_name(name, self.limits)
            keywords = checks.check_keywords(keywords, self.limits)  # before the model loads: a mistake costs nothing
            paths = _paths(photos)
            checks.check_reference_count(len(paths), self.limits)
            # The name and a place held until the concept is added: a second tab's request for it waits for nothing.
            held = reserved.enter_context(session.reserving([name], self.settings.max_concepts_per_session))
            self.budget.check()  # before the model's work, not after
            engine = self._engine(progress)  # loaded (and a failed load reported) before the model call
            # A session whose file cannot take even the smallest concept of these photos is told before the
            # model's work (a larger one may still be refused after it, once its size is known).
            if len(session):
                session.check_file_room(
                    session.file_bytes_with([]) + _smallest_concept_bytes(engine, len(paths)),
                    self.settings.max_concept_file_bytes,
                )
            started = time.perf_counter()
            doing = f"Choosing the memory tokens of {len(paths)} photo{'s' * (len(paths) > 1)}…"
            progress(0.1, desc=doing)
            # Decoded once, for both uses; a refused one of several is named by its position.
            pictures = checks.load_each(paths, lambda path: load_image(path, self.limits))
            area_pct = None if auto_size else size_pct
            concept = self._introduce_in_turn(
                name, pictures, keywords, area_pct, functools.partial(progress, 0.1), doing
            )
            seconds = time.perf_counter() - started
            patches, heats = self._pictures([(concept, pictures)])
            report = views.introduction_report([concept], seconds)
            session.add(
                [Entry(concept, views.thumbnail(pictures[0], self.settings.thumbnail_px))],
                self.settings.max_concepts_per_session,
                self.budget,
                self.settings.max_concept_file_bytes,
                held,
            )
            self.sessions.remember_script(session, request)  # a script's: told if it ends (as a page's is)
        log.info("introduce: %d photos, %d tokens, %.2f s", len(paths), concept.num_tokens, seconds)
        unknown = _unknown_to_conversations(session, script=self.sessions.is_script(request))
        return session, report + unknown, patches, heats

    def load_example_concepts(self, session: Session, progress=gr.Progress(), request: gr.Request = None):
        """Introduce the bundled example concepts this visitor does not have yet."""
        session = self._rejoin_adding(session, request)
        with for_visitor("introducing the example concepts"), contextlib.ExitStack() as reserved:
            with session.changing():  # the ones missing are the ones reserved: no other request comes in between
                missing = [
                    (name, paths)
                    for name, paths in self.examples.concepts
                    if not session.has(name) and not session.is_coming(name)
                ]
                if not missing:
                    message = (
                        "This installation has no example concepts."
                        if not self.examples.concepts
                        else f"The example concepts are being introduced in your session already {ELSEWHERE}; "
                        "they are added when that ends (if it fails, load them again)."
                        if any(session.is_coming(name) for name, _ in self.examples.concepts)
                        else "Your concepts already include all the example concepts."
                    )
                    return session, message, [], []
                names = [name for name, _ in missing]
                held = reserved.enter_context(session.reserving(names, self.settings.max_concepts_per_session))
            self.budget.check()
            self._engine(progress)
            started = time.perf_counter()
            made = []
            for number, (name, paths) in enumerate(missing):
                doing = f"Introducing example concept {number + 1} of {len(missing)}…"
                progress((number, len(missing)), desc=doing)
                pictures = [load_image(path, self.limits) for path in paths]
                say = functools.partial(progress, (number, len(missing)))
                made.append((self._introduce_in_turn(name, pictures, None, None, say, doing), pictures))
            seconds = time.perf_counter() - started
            patches, heats = self._pictures(made)
            report = views.introduction_report([c for c, _ in made], seconds)
            session.add(
                [Entry(c, views.thumbnail(p[0], self.settings.thumbnail_px)) for c, p in made],
                self.settings.max_concepts_per_session,
                self.budget,
                self.settings.max_concept_file_bytes,
                held,
            )
        return session, report + _unknown_to_conversations(session, len(made)), patches, heats

    def _pictures(self, made):
        """Gallery items: each reference photo with its kept tokens, and with its importance heat map."""
        patches, heats, many, px = [], [], len(made) > 1, self.settings.patch_view_max_px
        for concept, pictures in made:
            for number, (picture, view) in enumerate(zip(pictures, concept.views), 1):
                label = f"{views.isolated(concept.name)} · photo {number}" if many else f"Photo {number}"
                total = view.grid[0] * view.grid[1]
                patches.append(
                    (
                        cached(views.patch_view(picture, view.grid, view.token_indices, px)),
                        f"{label} · {view.k} of {total} tokens kept",
                    )
                )
                heats.append(
                    (cached(views.heat_map(picture, view.grid, view.scores, px)), f"{label} · token importance")
                )
        return patches, heats

    # ------------------------------------------------------------------------------------------
    # Ask
    # ------------------------------------------------------------------------------------------
    def ask_image(
        self,
        session: Session,
        image,
        question,
        compare=False,
        progress=gr.Progress(),
        in_flight=None,
        request: gr.Request = None,
    ):
        """Start a conversation about a photo, or, without one, about the visitor's concepts themselves (their
        memories are the only visual input); stream (session, answer, answer without memory, details, where each
        concept matches). `in_flight` (the chat tab's `AnswerInFlight`): its Stop ends the answer as far as it
        came, and it says whether the answer was cut short. With `request` (/ask_image), a script whose session
        ended is told so first (`_refuse_if_ended`); the chat tab asks that before it calls this."""
        stop = in_flight.stop if in_flight is not None else None
        if request is not None:
            session = self._refuse_if_ended(session, request, image, on_the_page=False)
        with for_visitor("answering"):
            if not image and not len(session):
                raise InputError("Add a photo to ask about, or introduce a concept to ask about it without a photo.")
            question = checks.check_question(question, self.limits)
            # Decoded once: for the model and the match pictures.
            picture = load_image(image, self.limits) if image else None
            engine = self._engine(progress)
            started = time.perf_counter()
            plain = "(after the personalized answer)" if compare else ""
            answer, details, matches = "", {}, []
            # The first answer comes from the scheduler (batched with other visitors' questions); the conversation
            # takes it as its first turn, and its follow-ups run on its own cache.
            chat = engine.chat(session.concepts, image=picture)
            # The photo as the conversation holds it (reduced once, if large: `query_image_kept_factor`): what the
            # model is asked about, what crosses to a ZeroGPU worker, and what the match pictures are drawn on.
            picture = chat.picture
            if image and (digest := _box_digest(image)) is not None:
                session.conversations.asked_about(chat, digest)
            asked = session.conversations.asking("image")
            stream = self._answer_stream(
                engine, question, chat.concepts, image=chat.picture, stop=stop, keep_context=True
            )
            failed = False
            ended = False
            try:
                for number, answer in enumerate(stream):
                    details = views.answer_details(answer, time.perf_counter() - started)
                    if number == 0:  # the context, hence the maps, are known from the first piece on
                        matches = self._matches(picture, answer)
                        self._tell_dropped(answer)
                    yield session, str(answer), plain, details, matches if number == 0 else gr.skip()
                    if self._stopped_here(stop):
                        break
                else:
                    ended = True
            except Exception:
                failed = True  # the conversation the visitor had stays
                raise
            finally:
                stream.close()
                if not failed:  # finished or stopped: the answer so far is the first turn
                    answer = answer if ended else cut_short(answer)
                    _tell_cut(in_flight, answer)
                    self._keep_conversation(session, "image", chat, question, answer, asked)
            if compare and not _stopped(stop):  # streamed too, so that Stop or a closed tab also ends it at once
                stream = self._answer_stream(engine, question, (), image=picture, stop=stop)
                try:
                    for plain in stream:
                        yield session, str(answer), str(plain), details, gr.skip()
                        if self._stopped_here(stop):
                            break
                finally:
                    stream.close()
            yield session, str(answer), str(plain), details, matches  # the final value of every output

    def _keep_conversation(self, session: Session, tab: str, chat, question: str, answer, asked: int) -> None:
        """A first question answered (or stopped): its conversation becomes the tab's for follow-ups, within the
        memory all sessions may hold; if it does not fit, the visitor is told that this answer cannot be followed
        up. Not kept, silently, when the visitor moved on while it was answered (a new photo or clip, "New
        conversation", another first question, a removed concept), nor when the answer has no word; then no older
        conversation of the tab is followed up either: the last question asked was about another photo or clip."""
        if not str(answer):
            session.conversations.end(tab, asked)
            return
        chat.adopt(question, answer)
        if session.keep_conversation(tab, chat, self.conversation_budget, asked) is False:
            gr.Warning(FULL_OF_CONVERSATIONS)

    def _tell_dropped(self, answer) -> None:
        """A notice when some of the visitor's concepts did not fit in the context (counts only: the names
        are in the details, where they are shown as text)."""
        dropped = len(answer.concepts_dropped)
        if dropped:
            then = "the ones most like the photo or clip" if answer.similarity else "your first ones"
            gr.Warning(
                f"{dropped} of your {dropped + len(answer.concepts_used)} concepts were left out of this "
                f"answer: at most {self.limits.max_concepts_in_context} fit. The ones the question names "
                f"were kept first, then {then}; name a concept to keep it."
            )

    def _matches(self, picture, answer) -> list[tuple[str, str]]:
        """Gallery items: for each concept, the photo coloured by how much each visual token looks like its
        memory (relative within the picture), captioned with the concept's overall similarity."""
        if picture is None:
            return []
        overall = dict(answer.similarity)
        return [
            (
                cached(views.heat_map(picture, tuple(grid.shape), grid.flatten(), self.settings.patch_view_max_px)),
                f"{views.isolated(name)} · similarity {overall.get(name, 0.0):.2f}",
            )
            for name, grid in answer.similarity_maps
        ]

    def ask_video(
        self, session: Session, video, question, progress=gr.Progress(), in_flight=None, request: gr.Request = None
    ):
        """Start a conversation about a clip; stream (session, sampled frames, answer, details); `in_flight` and
        `request` as in `ask_image`."""
        stop = in_flight.stop if in_flight is not None else None
        if request is not None:
            session = self._refuse_if_ended(session, request, video, on_the_page=False)
        with for_visitor("answering"):
            if not video:
                raise InputError("Add a video clip to ask about first.")
            question = checks.check_question(question, self.limits)
            progress(0.05, desc=f"Decoding the clip and sampling {self.limits.video_num_frames} frames…")
            frames, metadata = load_video(video, self.limits)
            gallery = list(zip([cached(frame) for frame in frames], views.frame_captions(metadata)))
            yield session, gallery, "", {}
            engine = self._engine(progress)
            started = time.perf_counter()
            answer, details = "", {}
            chat = engine.chat(session.concepts, video=(frames, metadata))
            if (digest := _box_digest(video)) is not None:
                session.conversations.asked_about(chat, digest)
            asked = session.conversations.asking("video")
            stream = self._answer_stream(engine, question, chat.concepts, video=chat.clip, stop=stop, keep_context=True)
            failed = False
            ended = False
            try:
                for number, answer in enumerate(stream):
                    details = views.answer_details(answer, time.perf_counter() - started)
                    if number == 0:
                        self._tell_dropped(answer)
                    yield session, gr.skip(), str(answer), details
                    if self._stopped_here(stop):
                        break
                else:
                    ended = True
            except Exception:
                failed = True  # the conversation the visitor had stays
                raise
            finally:
                stream.close()
                if not failed:
                    answer = answer if ended else cut_short(answer)
                    _tell_cut(in_flight, answer)
                    self._keep_conversation(session, "video", chat, question, answer, asked)
            yield session, gallery, str(answer), details

    # ------------------------------------------------------------------------------------------
    # Conversations
    # ------------------------------------------------------------------------------------------
    def follow_up(self, session: Session, question, progress=gr.Progress(), request: gr.Request = None):
        """Ask a follow-up in the conversation the visitor started last (/ask_image or /ask_video), on its cached
        photo or clip and memories; stream (session, answer). A script whose session ended is told so."""
        session, ended = self.sessions.rejoin(session, request)
        if ended:
            raise gr.Error(self.session_ended(TO_FOLLOW_UP_THROUGH_THE_API), print_exception=False)
        chats = session.conversations
        for answer in self._follow_up(chats, chats.current, question, progress):
            yield session, str(answer)

    def _follow_up(
        self,
        chats: Conversations,
        tab: str | None,
        question,
        progress,
        stop=None,
        start_again: str = START_AGAIN_THROUGH_THE_API,
    ):
        """Stream the text of a follow-up in the `tab`'s conversation, on its cached context; `stop` as in
        `ask_image`; `start_again` says how the visitor starts a new conversation when this one is full."""
        with for_visitor("answering", start_again=start_again):
            chat = chats.get(tab) if tab else None
            if chat is None or not chat.turns:
                raise InputError(
                    "There is no conversation to follow up yet: ask a first question about a photo "
                    "(/ask_image) or a clip (/ask_video). (A session, its concepts and conversations with it, ends "
                    f"{views.duration(self.settings.session_ttl_s)} after its last action.)"
                )
            question = checks.check_question(question, self.limits)
            engine = self._engine(progress)
            budget = self.limits.answer_max_new_tokens
            # One follow-up at a time per conversation: a second would continue from the same turns.
            if not chats.answering(chat):
                raise InputError(
                    "Your previous question in this conversation is still being answered; ask when it ends."
                )
            try:
                if not self.zero_gpu:  # with other visitors' follow-ups, each on its conversation's cache
                    settled = threading.Event()  # the worker is done with it: its turn recorded, or its batch failed

                    def shown(answer):  # the worker records the turn when its batch ends: until then, this one
                        if answer.stopped:
                            chats.cut_short(tab, chat, question, answer, settled)

                    stream = self.answers.stream_follow_up(
                        engine, chat, question, max_new_tokens=budget, stop=stop, settled=settled
                    )
                    yield from self._streamed_follow_up(stream, shown)
                    return
                # The worker answers on a copy of the conversation, away from the engine's lock, and this one takes
                # its answer.
                turns = [(asked, _tokens_of(answered)) for asked, answered in chat.turns]
                stream = self._follow_up_on_gpu(chat.concepts, chat.picture, chat.clip, turns, question, budget)
                yield from self._streamed_follow_up(stream, lambda answer: chat.adopt(question, answer), stop)
            finally:
                chats.answered(chat)

    @staticmethod
    def _streamed_follow_up(stream, keep=None, stop=None):
        """The follow-up's answer (`ego.Answer`) as it grows, then once more whole (marked `stopped` when it was cut
        short: the very object the conversation keeps); `keep(answer)` once it has ended or was stopped with some
        text (not when it failed). `stop`, for a stream that cannot see it (ZeroGPU's): checked after each piece."""
        answer, failed, ended = "", False, False
        try:
            for answer in stream:
                yield answer
                if _stopped(stop):
                    break
            else:
                ended = True
        except Exception:
            failed = True
            raise
        finally:
            stream.close()
            answer = answer if ended else cut_short(answer)
            if keep is not None and str(answer) and not failed:
                keep(answer)
        yield answer

    def chat_image(
        self, session: Session, image, message, compare=False, progress=gr.Progress(), request: gr.Request = None
    ):
        """The image tab's message: a first one starts a conversation about the photo (as /ask_image), a later one
        follows it up. Streams (session, chat view, message box, answer without memory, details, where each concept
        matches); the message box empties once the question is taken. Refused or failed, the chat view is the
        conversation's again and the message is back in its box. In a tab whose session had ended, nothing is
        asked (`_refuse_if_ended`)."""
        session = self._refuse_if_ended(session, request, image)
        with session.conversations.answering_in("image") as in_flight:
            if _follows_up(session, "image", image):
                steps = [self._follow_up_steps(session, "image", message, progress, extra=3, stop=in_flight.stop)]
            else:
                asked = self.ask_image(session, image, message, compare, progress, in_flight=in_flight)
                steps = [
                    ((messages([], message, _so_far(a)), plain, facts, found) for _, a, plain, facts, found in asked)
                ]
            for view, box, *rest in self._chat_steps(session, "image", message, steps, extra=3, in_flight=in_flight):
                yield session, view, box, *rest

    def chat_video(self, session: Session, video, message, progress=gr.Progress(), request: gr.Request = None):
        """The video tab's message: a first one starts a conversation about the clip (as /ask_video), a later one
        follows it up. Streams (session, frames, chat view, message box, details), as `chat_image` does."""
        session = self._refuse_if_ended(session, request, video)
        with session.conversations.answering_in("video") as in_flight:
            if _follows_up(session, "video", video):
                steps = [self._follow_up_steps(session, "video", message, progress, extra=2, stop=in_flight.stop)]
            else:
                asked = self.ask_video(session, video, message, progress, in_flight=in_flight)
                steps = [((messages([], message, _so_far(a)), frames, details) for _, frames, a, details in asked)]
            steps_shown = self._chat_steps(session, "video", message, steps, extra=2, in_flight=in_flight)
            for view, box, frames, details in steps_shown:
                yield session, frames, view, box, details

    def _refuse_if_ended(self, session: Session, request, box, *, on_the_page: bool = True) -> Session:
        """The session a chat tab's message (or a script's question) is asked in (`Sessions.rejoin`). In a tab whose
        session had ended, the message is refused with the sentence that says so, before any output: the message
        stays in its box, the chat views show what they showed (the visitor may still read it), and the next message
        is asked in the tab's new session (without the concepts, unless the visitor brought them back; `box`: the
        tab's photo or clip, without which there is nothing to ask about then). `on_the_page`: a chat tab's message,
        or a script's question (/ask_image, /ask_video), told what to call."""
        session, ended = self.sessions.rejoin(session, request)
        if ended:
            if on_the_page:  # beside the panel, refreshed after the refusal (`panel_if_told`)
                session.tell(self.session_ended())
            to_ask_again = TO_ASK_AGAIN if on_the_page else TO_ASK_AGAIN_THROUGH_THE_API
            then = to_ask_again.format(or_now=WITHOUT_THEM if box else "")
            raise gr.Error(self.session_ended(then), print_exception=False)
        return session

    def _follow_up_steps(self, session: Session, tab: str, message, progress, *, extra: int, stop=None):
        """(chat view, *`extra` skipped outputs) as a follow-up streams, then the conversation with its new turn."""
        before, skip, answer = session.conversations.turns(tab), (gr.skip(),) * extra, ""
        for answer in self._follow_up(session.conversations, tab, message, progress, stop, START_AGAIN_ON_THE_PAGE):
            yield messages(before, message, _so_far(answer)), *skip
        # The conversation with this answer as its turn (a turn cut short shows as its visitor saw it until the worker
        # records it: `Conversations.turns`). An answer without a word is no turn: the question stays in view, with
        # "" for `_chat_steps` to explain.
        after = session.conversations.turns(tab)
        kept = any(answered is answer for _, answered in after)
        yield (messages(after) if kept else messages(before, message, "")), *skip

    @staticmethod
    def _chat_steps(session: Session, tab: str, message, steps, *, extra: int, in_flight=None):
        """(chat view, message box, *`extra` more outputs) per step of a chat tab's answer, from `steps` (iterables
        of (chat view, *extra), gone through in order, the later ones only once the earlier ones end): the box
        emptied once, at the first step, then left alone (the visitor may type the next question while this one
        streams); an answer its Stop cut short is marked "(stopped)" (`in_flight`; a follow-up's view marks it
        itself). On a refusal or a failure: the conversation's own view, the message back in its box, then the
        error."""
        emptied, chats, view = False, session.conversations, []
        chats.streams(tab, True)
        try:
            if str(message or "").strip():  # the question at once, and "Thinking…" as its answer
                view = messages(chats.turns(tab), message, guidance.THINKING)
                yield view, "", *(gr.skip(),) * extra
                emptied = True
            for view, *rest in (step for part in steps for step in part):
                yield view, gr.skip() if emptied else "", *rest
                emptied = True
            wordless = bool(view) and view[-1]["role"] == "assistant" and view[-1]["content"] in ("", guidance.THINKING)
            stopped = in_flight is not None and in_flight.stop.is_set()
            if stopped and (wordless or in_flight.cut.is_set()):
                # Cut short by its Stop: said so, whether it had words or not ("Thinking…").
                marked = {"role": "assistant", "content": guidance.mark_stopped(view[-1]["content"])}
                yield [*view[:-1], marked], gr.skip(), *(gr.skip(),) * extra
            elif wordless:
                # The answer ended without a word: say so, rather than "Thinking…" for good.
                yield (
                    [*view[:-1], {"role": "assistant", "content": guidance.NO_ANSWER}],
                    gr.skip(),
                    *(gr.skip(),) * extra,
                )
        except Exception:
            chats.streams(tab, False)
            yield messages(chats.turns(tab)), message, *(gr.skip(),) * extra
            raise
        chats.streams(tab, False)  # not reached when Stop closed this generator: the answer stays "coming"

    def _stopped_here(self, stop) -> bool:
        """Whether the handler itself ends its answer now, on its Stop: on ZeroGPU, where the answer streams from a
        GPU call that cannot see the Stop; elsewhere the scheduler ends it at its next token (and a follow-up's
        conversation records it before its stream ends)."""
        return self.zero_gpu and _stopped(stop)

    def photo_changing(self, session: Session, photo, request: gr.Request = None) -> None:
        """The image tab's photo box changes: a new photo (or none) stops the tab's answer, as `stop_answer`; the
        conversation's photo put back in the box by a reload, or by opening the page in another browser tab, does
        not (that would stop the answer streaming in the first one)."""
        session, _ = self.sessions.peek(session, request)
        if photo and session.conversations.is_restored("image", _digest(photo)):
            return
        self.stop_answer(session, "image")

    def stop_answer(self, session: Session, tab: str, request: gr.Request = None) -> None:
        """The tab's Stop: its answer ends as far as it has come (its handler returns it, marked "(stopped)", and the
        conversation keeps it), and this returns once it has (at most `stop_wait_s`). A Stop that only cancelled the
        event would race with Gradio's own end of it: the page could show "Error" over the tab's boxes. A message
        still waiting in the queue has no answer yet: the Stop's `cancels=` that follows removes it. In a tab that
        outlived its state while another tab of the browser holds its session, it acts on that session, as the
        tab's next message would (`Sessions.peek`: nothing is taken over)."""
        session, _ = self.sessions.peek(session, request)
        session.conversations.stop(tab, self.settings.stop_wait_s)

    def shown_conversations(self, session: Session):
        """(image tab's, video tab's) chat views of the conversations the session holds: after a reload, or in
        another tab of the browser, the view shows the conversation that a follow-up would continue."""
        return self.shown_conversation(session, tab="image"), self.shown_conversation(session, tab="video")

    def restored_conversations(self, session: Session):
        """After a reload (or in another tab of the browser): (image tab's chat view, its photo box, video tab's
        chat view, its frames) of the conversations the session holds, with what each is about: the photo back in
        its box (a follow-up is about it), the clip's sampled frames (the clip itself is not kept). A tab without a
        conversation keeps its box and frames as they are."""
        chats = session.conversations
        image_chat, video_chat = chats.get("image"), chats.get("video")
        photo, frames = gr.skip(), gr.skip()
        if image_chat is not None and image_chat.picture is not None:
            photo = cached(image_chat.picture)
            chats.restored("image", _digest(photo))
        if video_chat is not None and video_chat.clip is not None:
            clip_frames, metadata = video_chat.clip
            frames = list(zip([cached(frame) for frame in clip_frames], views.frame_captions(metadata)))
        image_view, video_view = self.shown_conversations(session)
        return image_view, photo, video_view, frames

    def photo_changed(self, session: Session, photo, request: gr.Request = None):
        """The image tab's photo box changed: a new photo (or none) ends the tab's conversation, as
        `new_conversation`; the conversation's own photo put back by a reload (`restored_conversations`) does not."""
        session = self.sessions.take_over(session, request)
        if photo and session.conversations.is_restored("image", _digest(photo)):
            return (gr.skip(),) * 5
        return self.new_conversation(session, tab="image")

    @staticmethod
    def shown_conversation(session: Session, *, tab: str) -> list[dict]:
        """One tab's chat view of the conversation the session holds."""
        return messages(session.conversations.turns(tab))

    def new_conversation(self, session: Session, tab: str, request: gr.Request = None):
        """End the tab's conversation (the next message starts one); returns the session, an empty chat view, and
        empty values for what the ended conversation showed beside it (image tab: the answer without memory, the
        details, the match pictures; video tab: the sampled frames, the details)."""
        session = self.sessions.take_over(session, request)
        session.conversations.end(tab)
        return (session, [], "", {}, []) if tab == "image" else (session, [], [], {})

    # ------------------------------------------------------------------------------------------
    # The concept panel
    # ------------------------------------------------------------------------------------------
    def list_concepts(self, session: Session) -> tuple[Session, list[dict]]:
        """(session, JSON-able records of the visitor's concepts)."""
        return session, self.records(session)

    def records(self, session: Session) -> list[dict]:
        return [views.concept_record(concept) for concept in session.concepts]

    def panel(self, session: Session, status: bool = True):
        """(cards, remove dropdown, summary line, records, status line) for the concept panel; status=False leaves
        the status line (and the sentence waiting for it) as it is."""
        cards = [(cached(entry.thumbnail), views.concept_caption(entry.concept)) for entry in session.entries]
        summary = self.summary(session)
        return (
            cards,
            gr.Dropdown(choices=session.names, value=None),
            summary,
            self.records(session),
            self.status(session) if status else gr.skip(),
        )

    def panel_if_told(self, session: Session):
        """The concept panel after a chat tab's message was refused (or stopped): shown again, with its status line,
        when the refusal left a sentence for it (the tab's session had ended: the panel shows that nothing is left);
        otherwise left as it is (a concept picked for removal stays picked)."""
        return self.panel(session) if session.has_note else (gr.skip(),) * 5

    def panel_if_changed(self, session: Session, shown_records, shown_summary, request: gr.Request = None):
        """The concept panel of a tab shown again (another tab of this browser may have changed the concepts they
        share): refreshed if it shows other concepts or another summary than its session's, else left as it is (a
        concept picked for removal stays picked). A tab whose session ended meanwhile shows it, with the sentence
        in its status line. Nothing changes on the server (`Sessions.peek`): the tab's next action is still told
        (a question is refused, its text kept), and showing a tab does not keep a session alive."""
        session, ended = self.sessions.peek(session, request)
        if shown_records == self.records(session) and shown_summary == self.summary(session) and not ended:
            return (gr.skip(),) * 5
        *panel, _ = self.panel(session, status=False)
        return (*panel, views.escape_markdown(self.session_ended()) if ended else gr.skip())

    def status(self, session: Session) -> str:
        """The panel's status line: the sentence the visitor's last panel action left (Markdown-escaped)."""
        return views.escape_markdown(session.take_note())

    def remove_concept(self, session: Session, name, request: gr.Request = None):
        session, gone = self.sessions.rejoin(session, request)
        with for_visitor("removing the concept", session, quietly=skipped_the_queue(request)):
            if gone:  # the concept named went with the session
                raise InputError(self.session_ended())
            if not name:
                raise InputError("Pick the concept to remove from the list first.")
            if not isinstance(name, str):
                raise InputError("Give the name of the concept to remove as text.")
            ended = session.remove(checks.check_text(name, "name"))
            session.tell("Removed the concept." + (ENDED_CONVERSATIONS if ended else ""))
        return session, self.records(session)

    def clear_concepts(self, session: Session, request: gr.Request = None):
        session, gone = self.sessions.rejoin(session, request)
        if gone:  # the concepts went with the session
            session.tell(self.session_ended())
            return session, self.records(session)
        count = len(session)
        ended = session.clear()
        said = f"Removed all {count} of your concepts." if count else "There are no concepts to clear."
        session.tell(said + (ENDED_CONVERSATIONS if ended else ""))
        return session, self.records(session)

    def export_concepts(self, session: Session, request: gr.Request = None):
        """Write the visitor's concepts to a safetensors file; returns (session, file path, or None when the
        browser's export was refused: the status line says why)."""
        path = None
        session, gone = self.sessions.rejoin(session, request)
        with for_visitor("exporting the concepts", session, quietly=skipped_the_queue(request)):
            if gone:  # rather than "no concepts yet": the visitor had some
                raise InputError(self.session_ended())
            if not len(session):
                raise InputError("There are no concepts to export yet; introduce or import one first.")
            # In Gradio's file cache, whose sweep deletes it on time even if the session is evicted
            # (eviction skips `forget`); a file elsewhere would stay until the server restarts.
            version = session.version  # what is written: a change made meanwhile is not in this file
            with session.export_file(get_upload_folder()) as fresh:
                thumbnails = [entry.thumbnail for entry in session.entries]
                # Held to the limits its import will apply, the engine's: a file written is a file read back.
                path = save_concepts(
                    fresh, session.concepts, thumbnails, max_concepts=self.limits.max_concept_file_concepts
                )
            session.mark_exported(version)
            session.tell(f"Exported {len(session)} concepts: download the file below.")
        return session, None if path is None else str(path)

    def after_export(self, session: Session, exported):
        """(file box, status line, summary line) once an export ended: the box shows the new file, or is emptied
        and hidden when the export was refused (with any badge it had), the status line says which, and the
        summary whether every concept is in the file."""
        return gr.File(value=exported or None, visible=bool(exported)), self.status(session), self.summary(session)

    def summary(self, session: Session) -> str:
        """The concept panel's summary line."""
        return views.panel_summary(
            len(session), session.memory_tokens, self.settings.max_concepts_per_session, exported=session.exported
        )

    def import_concepts(self, session: Session, file, progress=gr.Progress(), request: gr.Request = None):
        """Add the concepts of a file written by /export_concepts (or ego.save_concepts); names the visitor
        already has are skipped and listed in a message, with their thumbnails where the file has them."""
        session = self._rejoin_adding(session, request)
        with for_visitor("importing the concepts"), contextlib.ExitStack() as still:
            path = file if isinstance(file, (str, os.PathLike)) else getattr(file, "name", file)
            if not path:
                raise InputError("Choose a concept file (.safetensors) exported from this app first.")
            if os.path.getsize(path) > self.settings.max_concept_file_bytes:
                raise InputError(f"Concept files are at most {self.settings.max_concept_file_mb:g} MiB.")
            engine = self._engine(progress)
            concepts = load_concepts(path, engine)
            thumbnails = read_thumbnails(path, len(concepts))
            # From here to `add`, no other request changes the session: what is chosen is what is added. A concept
            # being introduced (another tab's) counts as one the visitor has.
            still.enter_context(session.changing())
            entries, skipped, being_introduced, twice, seen = [], [], [], [], set()
            for concept, thumbnail in zip(concepts, thumbnails):
                name = concept.name  # held to the rule of typed names by load_concepts
                if session.has(name):
                    skipped.append(name)
                    continue
                if name_key(name) in seen:  # the file's first concept of that name is taken (names ignore case)
                    twice.append(name)
                    continue
                seen.add(name_key(name))
                if session.is_coming(name):
                    being_introduced.append(name)
                    continue
                first = concept.views[0] if concept.views else None
                picture = (
                    views.thumbnail(thumbnail, self.settings.thumbnail_px)
                    if thumbnail is not None
                    else views.token_map(first.grid, first.token_indices, self.settings.thumbnail_px)
                    if first
                    else views.token_map((1, 1), [], self.settings.thumbnail_px)
                )
                entries.append(Entry(concept, picture))
            if being_introduced and not entries:
                several = len(being_introduced) > 1
                raise InputError(
                    f"{_named(being_introduced)} {'are' if several else 'is'} being introduced in your session now "
                    f"{ELSEWHERE}{', and the other concepts of this file are already yours' if skipped else ''}: "
                    f"nothing was added. If {'any of those introductions fails' if several else 'it fails'}, "
                    f"import the file again."
                )
            if skipped and not entries:
                yours = _one_per_name(skipped)
                one = len(yours) == 1
                raise InputError(
                    f"You already have {'a concept' if one else 'concepts'} named {_named(yours)}: every concept "
                    f"in this file is already yours, so nothing was added. Remove yours first to import the file's."
                )
            # A file may hold more concepts than a session: the first ones that fit come in, and importing the file
            # again once there is room brings the rest (the ones already in the session are skipped).
            most = self.settings.max_concepts_per_session
            room = max(0, most - len(session) - session.coming)
            if entries and not room:
                underway = f" ({session.coming} more being introduced)" if session.coming else ""
                raise InputError(
                    f"A session holds at most {most} concepts and you have {len(session)}{underway}: remove some "
                    f"first (export them to keep them), then import the file again."
                )
            by_count = room
            room = min(room, _most_that_fit(session, entries[:room], self.settings.max_concept_file_bytes))
            limit = (
                f"a session holds at most {most}"
                if room == by_count
                else f"a session's concepts fit one concept file of {self.settings.max_concept_file_mb:g} MiB"
            )
            if entries and not room:
                raise InputError(
                    f"Your concepts fill one concept file ({self.settings.max_concept_file_mb:g} MiB), the most a "
                    f"session holds: remove some first (export them to keep them), then import the file again."
                )
            entries, left_out = entries[:room], [entry.concept.name for entry in entries[room:]]
            session.add(entries, most, self.budget, self.settings.max_concept_file_bytes)
            if entries:
                self.sessions.remember_script(session, request)
            added = f"Imported {len(entries)} concept{'s' * (len(entries) != 1)}."
            if left_out:
                added += f" Left out {len(left_out)}: no room."
            if skipped:
                added += f" Skipped {len(skipped)} already yours."
            if being_introduced:
                added += f" Skipped {len(being_introduced)} being introduced."
            if twice:
                added += f" Skipped {len(twice)} named like an earlier one in the file."
            if entries:
                added += _unknown_to_conversations(session, len(entries))
            session.tell(added)
        if left_out:
            more = f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
            gr.Warning(
                f"Imported the file's first {len(entries)} new concepts: {limit}. Left out "
                f"{_quoted(left_out[:5])}{more}; remove some of yours (export them to keep them) and import the file "
                f"again to add them."
            )
        if twice:
            gr.Warning(
                f"Skipped {_quoted(twice)}: this file holds "
                + (
                    "an earlier concept with that name, which was imported."
                    if len(twice) == 1
                    else "earlier concepts with those names, which were imported."
                )
            )
        if skipped:
            yours = _one_per_name(skipped)
            gr.Warning(
                f"Added {len(entries)} concept{'s' * (len(entries) != 1)}; skipped {_quoted(yours)}: you already "
                f"have {'a concept with that name' if len(yours) == 1 else 'concepts with those names'} (remove "
                f"yours first to import the file's)."
            )
        if being_introduced:
            several = len(being_introduced) > 1
            gr.Warning(
                f"Skipped {_quoted(being_introduced)}: being introduced in your session now {ELSEWHERE}; if "
                f"{'any of those introductions fails' if several else 'it fails'}, import the file again to "
                f"add {'them' if several else 'it'}."
            )
        skipped_all = len(skipped) + len(being_introduced) + len(twice)
        log.info("import: %d concepts, %d skipped, %d left out", len(entries), skipped_all, len(left_out))
        return session, self.records(session)


def _one_per_name(names) -> list[str]:
    """The first of each name (names ignore case and spacing, `name_key`): a file may hold 'Mine' and 'mine'."""
    firsts: dict[str, str] = {}
    for name in names:
        firsts.setdefault(name_key(name), name)
    return list(firsts.values())


def _named(names) -> str:
    """Visitor names in a sentence of an error: quoted, each set apart (`views.isolated`)."""
    return ", ".join(f"'{views.isolated(name)}'" for name in names)


def _quoted(names) -> str:
    """Visitor names for a message, quoted, escaped (gr.Warning renders HTML) and each set apart, so that
    right-to-left names keep their places in the list (`views.isolated`)."""
    return ", ".join(f"“{views.isolated(html.escape(name, quote=False))}”" for name in names)


def _not_downloadable(error: BaseException) -> bool:
    """Whether loading failed because the weights are neither cached nor downloadable (huggingface_hub's
    `LocalEntryNotFoundError`, which transformers wraps in an OSError)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LocalEntryNotFoundError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _tell_cut(in_flight, answer) -> None:
    """Mark `in_flight` (if any) as cut short when its answer is: the chat view then says "(stopped)"."""
    if in_flight is not None and getattr(answer, "stopped", False):
        in_flight.cut.set()


def _stopped(stop) -> bool:
    return stop is not None and stop.is_set()


def _smallest_concept_bytes(engine, photos: int) -> int:
    """The least a concept of `photos` photos adds to a concept file: one memory row per photo (each keeps at
    least one token), with its residual rows where the model has them."""
    row = engine.hidden_size * engine.memory_dtype.itemsize
    return photos * row * (1 + (engine.backend.residual_levels or 0))


def _unknown_to_conversations(session: Session, added: int = 1, *, script: bool = False) -> str:
    """A sentence for `added` concepts just added while a conversation goes on: a conversation keeps the memories
    it started with, so its follow-ups do not know them (a removed concept ends the conversations that knew it, and
    says so). `script`: told in the HTTP API's terms (a script has no tabs or buttons)."""
    going_on = [tab for tab in TABS if (chat := session.conversations.get(tab)) is not None and chat.turns]
    if not going_on:
        return ""
    them = "it" if added == 1 else "them"
    if script:
        return (
            f" Your conversation started before and does not know {them}: /follow_up will not either; ask a first "
            f"question with /ask_image or /ask_video to ask about {them}."
        )
    if len(going_on) == 1:
        return (
            f" The conversation going on in the {going_on[0]} tab started before and does not know {them}: press "
            f"New conversation there to ask about {them}."
        )
    return (
        f" The conversations going on in the image and video tabs started before and do not know {them}: press "
        f"New conversation to ask about {them}."
    )


def _follows_up(session: Session, tab: str, box) -> bool:
    """Whether a chat tab's message follows up the tab's conversation: there is one, and the file in the tab's box
    (`box`; none, as the visitor may have emptied it) is the one it is about. Another browser tab of the visitor
    may have started it about another photo: then the message is a first question about this one."""
    chat = session.conversations.get(tab)
    if chat is None or not chat.turns:
        return False
    digest = _box_digest(box) if box else None
    return digest is None or session.conversations.is_about(tab, digest)


def _box_digest(value) -> str | None:
    """The digest of what a photo or clip box holds: its file's (`_digest`), a picture's pixels (a caller of the
    handlers may give a PIL image), or None for anything else."""
    if isinstance(value, (str, os.PathLike)):
        return _digest(value)
    if isinstance(value, Image.Image):
        return hashlib.sha256(f"{value.mode} {value.size}".encode() + value.tobytes()).hexdigest()
    return None


def _digest(path) -> str:
    """A file's content digest: a photo box's value is a path, and a copy of a file is the same photo."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _so_far(answer) -> str:
    """An answer's text so far in a chat view: "Thinking…" until its first words."""
    return str(answer) or guidance.THINKING


def _tokens_of(answer) -> Answer:
    """An answer's text and tokens, for a GPU worker to continue the conversation from (no pictures to pickle)."""
    return Answer(str(answer), token_ids=getattr(answer, "token_ids", ()), stopped=getattr(answer, "stopped", False))
