"""One visitor's concepts: the value of the app's `gr.State`.

Gradio keeps one `Session` per browser tab (or per `gradio_client.Client`) in server memory and hands
the live object to every handler of that visitor. Methods that change it check everything first, then
change it under a lock, so a refused or failed request leaves the concepts exactly as they were, and
two requests of one visitor that finish together cannot both slip under a limit.

All sessions together are also held to one `MemoryBudget`: without it, `max_sessions` visitors with
`max_concepts_per_session` concepts of five photos each could ask for tens of GiB of server memory
(importing a file is enough, no model time needed), and the whole Space would be killed.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
import threading
import unicodedata
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ego.checks import without_invisible
from ego.errors import InputError
from ego.memory import Concept, concept_file_bytes

from .conversations import TABS, Conversations, holding
from .views import isolated

EXPORT_NAME = "ego-concepts.safetensors"


@dataclass(frozen=True)
class Entry:
    concept: Concept
    """Memory rows on the CPU, with the per-photo records."""
    thumbnail: Image.Image
    """A small square picture for the concept card."""

    @functools.cached_property
    def nbytes(self) -> int:
        """Server memory this entry holds: everything its concept holds (rows, residuals, scores, indices and
        every string) and its thumbnail (computed once: a budget check sums it over every entry of every
        session)."""
        width, height = self.thumbnail.size
        return self.concept.held_bytes + width * height * len(self.thumbnail.getbands())


FULL_OF_CONCEPTS = (
    "The server is holding as many concepts as it can for all its visitors right now; your concepts are unchanged. "
    "Try again later, or remove concepts you no longer need."
)
FULL_OF_CONVERSATIONS = (
    "The server is holding as much as it can for all its visitors right now, so this answer cannot be followed "
    "up: ask a new first question later."
)


class MemoryBudget:
    """The bytes that all visitors' sessions may hold together: of concepts (`SpaceSettings.max_all_sessions_memory_mb`)
    or, with another `held_by`, of conversations (`max_all_conversations_memory_mb`).

    One per app, next to the model. It holds no visitor data, only weak references to the sessions that
    added something: a session let go (its time to live, or the least recently used one beyond `max_sessions`:
    `forget`, `space.resume.keep_promises`) holds nothing more, and stops counting once Python frees it.
    """

    def __init__(self, max_bytes: int, held_by: Callable[[Session], int] = lambda session: session.nbytes):
        self.max_bytes = max_bytes
        self.held_by = held_by
        """What one session holds of what this budget bounds (by default its concepts, `Session.nbytes`)."""
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self._lock = threading.Lock()

    def held(self) -> int:
        return sum(self.held_by(session) for session in list(self._sessions))

    def check(self, nbytes: int = 1, refusal: str = FULL_OF_CONCEPTS) -> None:
        """Raise InputError(refusal) if `nbytes` more would pass the budget (by default: if it is spent)."""
        if self.held() + nbytes > self.max_bytes:
            raise InputError(refusal)

    @contextlib.contextmanager
    def admitting(self, session: Session, nbytes: int, refusal: str = FULL_OF_CONCEPTS):
        """`check(nbytes)`, then run the body (which adds them) while no other session can add, and count
        `session` from then on."""
        with self._lock:
            self.check(nbytes, refusal)
            yield
            self._sessions.add(session)


def name_key(name: str) -> str:
    """Names are compared without case, extra spaces and format characters, and compatibility-normalised, as the
    engine finds a name in a question (`ego.engine.named_in`): 'Chelsea' and ' chelsea' are one concept, and so are
    a "Café" typed with an accented letter and one typed with a combining accent, a full-width "Ｆish" and "fish",
    or a "👩‍💻 coder" typed with its zero-width joiner and one without (invisible characters never tell names
    apart)."""
    return " ".join(unicodedata.normalize("NFKC", without_invisible(name)).split()).casefold()


ELSEWHERE = "(in another tab, or by another request)"
"""Where a concept being introduced beside the visitor's own request comes from, said in every sentence about it."""


class Session:
    """The concepts one visitor has introduced or imported, in the order they came."""

    def __init__(self):
        self._entries: list[Entry] = []
        self._lock = threading.RLock()  # reentrant: `changing` holds it around a choice and the `add` it makes
        self._coming: list[str] = []
        """The names (`name_key`) of the concepts being introduced (`reserving`)."""
        self._exporting = threading.Lock()
        self._export_dir: str | None = None
        self._note = ""
        self.conversations = Conversations()
        """The visitor's conversations about a photo or a clip (server memory only, like the concepts)."""
        self.export_suggested = False
        """Whether the visitor was told, once, how to keep their concepts (`guidance.suggest_export`)."""
        self._version = 0
        """Counts the changes to the concepts (added, removed), for `exported`."""
        self._exported_version: int | None = None

    def __deepcopy__(self, memo) -> Session:
        # gr.State deep-copies its default once per visitor; a lock cannot be copied, so make a new one.
        copy = Session()
        copy._entries = list(self._entries)
        return copy

    # --- reading --------------------------------------------------------------------------------
    @property
    def entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries)

    @property
    def concepts(self) -> tuple[Concept, ...]:
        return tuple(entry.concept for entry in self._entries)

    @property
    def names(self) -> list[str]:
        return [entry.concept.name for entry in self._entries]

    @property
    def memory_tokens(self) -> int:
        return sum(entry.concept.num_tokens for entry in self._entries)

    @property
    def nbytes(self) -> int:
        """Server memory held by this visitor's concepts (read without the lock: a budget sums many)."""
        return sum(entry.nbytes for entry in list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def holds_nothing(self) -> bool:
        """No concept and no conversation: as Gradio makes a session for a tab, before any action."""
        return not self._entries and all(self.conversations.get(tab) is None for tab in TABS)

    @property
    def version(self) -> int:
        """Changes to the concepts so far: read before an export writes them (`mark_exported`)."""
        return self._version

    @property
    def exported(self) -> bool:
        """Whether the concepts are all in the visitor's last export, unchanged since (none: False)."""
        return bool(self._entries) and self._exported_version == self._version

    def mark_exported(self, version: int) -> None:
        """The concepts as they were at `version` were written to a file."""
        self._exported_version = version

    def tell(self, sentence: str) -> None:
        """Keep a sentence for the concept panel's status line: what the visitor's last panel action did, or why
        it could not (the browser shows no error of an event that skips the queue)."""
        self._note = str(sentence)

    def take_note(self) -> str:
        """The sentence kept by `tell` (once), or ""."""
        note, self._note = self._note, ""
        return note

    @property
    def has_note(self) -> bool:
        """Whether a sentence kept by `tell` waits for the status line."""
        return bool(self._note)

    def has(self, name: str) -> bool:
        key = name_key(name)
        return any(name_key(entry.concept.name) == key for entry in self._entries)

    def is_coming(self, name: str) -> bool:
        """Whether a concept of that name is on its way to these concepts: another tab's or a script's introduction
        of it is under way (`reserving`)."""
        return name_key(name) in self._coming

    @property
    def coming(self) -> int:
        """How many concepts are on their way to these (`reserving`): each will take a place."""
        return len(self._coming)

    # --- checks ---------------------------------------------------------------------------------
    def check_room(self, names: list[str], max_concepts: int, held: tuple[str, ...] = ()) -> None:
        """Raise InputError unless all `names` can be added: new, distinct, not being introduced by another request
        (`held`: the names this request reserved itself), and within the limit with those being introduced."""
        keys = [name_key(n) for n in names]
        taken = [entry.concept.name for entry in self._entries if name_key(entry.concept.name) in keys]
        if taken:
            listed, one = ", ".join(f"'{isolated(n)}'" for n in taken), len(taken) == 1
            raise InputError(
                f"You already have {'a concept' if one else 'concepts'} named {listed}. Remove "
                f"{'it' if one else 'them'} first (under Your concepts), or pick another name."
            )
        others = list(self._coming)
        for key in held:
            others.remove(key)
        coming = [name for name, key in zip(names, keys) if key in others]
        if coming:
            raise InputError(
                f"A concept named '{isolated(coming[0])}' is being introduced in your session already {ELSEWHERE}; "
                f"wait for it to finish, or pick another name."
            )
        repeated = sorted({n for n, k in zip(names, keys) if keys.count(k) > 1})
        if repeated:
            raise InputError(
                f"The name '{isolated(repeated[0])}' appears more than once; each concept needs its own name."
            )
        if len(self._entries) + len(others) + len(names) > max_concepts:
            room = max(0, max_concepts - len(self._entries) - len(others))
            underway = f" ({len(others)} more being introduced)" if others else ""
            raise InputError(
                f"A session holds at most {max_concepts} concepts and you have {len(self._entries)}{underway}; "
                f"there is room for {room} more. Remove some first (or export them to keep them)."
            )

    @contextlib.contextmanager
    def reserving(self, names: list[str], max_concepts: int):
        """While concepts named `names` are made (an introduction's model work): their names and places are held,
        so that another request of the same visitor (a second tab, a script) for the same name, or past the limit, is
        refused at once rather than after its own model work. Yields the names held, for `add(..., held=...)`."""
        with self._lock:
            self.check_room(names, max_concepts)
            held = tuple(name_key(name) for name in names)
            self._coming.extend(held)
        try:
            yield held
        finally:
            with self._lock:
                for key in held:
                    self._coming.remove(key)

    def changing(self):
        """Hold the concepts still while a change is chosen from them and made (`add` inside): an import picks which
        of its concepts are new and fit, and no other request changes the session in between."""
        return self._lock

    # --- changing -------------------------------------------------------------------------------
    def file_bytes_with(self, entries: list[Entry]) -> int:
        """The size of the concept file an export would write once `entries` are added, in bytes (at most a
        few hundred bytes per concept more)."""
        every = list(self._entries) + list(entries)
        return concept_file_bytes([e.concept for e in every], [e.thumbnail for e in every])

    @staticmethod
    def check_file_room(file_bytes: int, max_file_bytes: int) -> None:
        """InputError when the session's export would be a file of `file_bytes`, more than `max_file_bytes`."""
        if file_bytes > max_file_bytes:
            raise InputError(
                f"Your concepts would no longer fit in one concept file ({max_file_bytes / 2**20:.3g} MiB), so "
                f"they could not be exported and imported again: remove some first (export them to keep them)."
            )

    def add(
        self,
        entries: list[Entry],
        max_concepts: int,
        budget: MemoryBudget | None = None,
        max_file_bytes: int | None = None,
        held: tuple[str, ...] = (),
    ) -> None:
        """Add all of `entries`, or (InputError) none of them; with `max_file_bytes`, only while the session's
        export stays a file of at most that many bytes (one that can be imported again). `held`: the names this
        request reserved for them (`reserving`)."""
        with self._lock:
            self.check_room([entry.concept.name for entry in entries], max_concepts, held)
            if max_file_bytes is not None:
                self.check_file_room(self.file_bytes_with(entries), max_file_bytes)
            if budget is None:
                self._entries = self._entries + list(entries)
            else:
                with budget.admitting(self, sum(entry.nbytes for entry in entries)):
                    self._entries = self._entries + list(entries)
            self._version += 1

    def keep_conversation(self, tab: str, chat, budget: MemoryBudget, asked: int | None = None) -> bool | None:
        """`chat` becomes the tab's conversation if `budget` (one that bounds conversations: `held_by` their
        `nbytes`) admits what it holds beyond the one it replaces; otherwise (False) the tab's conversation ends:
        nothing to follow up, and nothing more held. Nor is it kept (None) when the visitor moved on while its first
        question was answered (`asked`: `Conversations.asking`'s mark), or removed a concept it knows: a
        conversation never holds a concept the session let go."""
        with self._lock:
            ours = {id(entry.concept) for entry in self._entries}
            if self.conversations.stale(tab, asked):
                return None  # before the budget: a refusal would end the conversation the visitor has now
            if any(id(concept) not in ours for concept in chat.concepts):
                self.conversations.end(tab, asked)  # nor may an older conversation be followed up instead
                return None
            previous = self.conversations.get(tab)
            growth = chat.held_bytes - (previous.held_bytes if previous is not None else 0)
            try:
                with budget.admitting(self, growth, FULL_OF_CONVERSATIONS):
                    if not self.conversations.start(tab, chat, asked):
                        return None
            except InputError:
                self.conversations.end(tab)
                return False
        return True

    def remove(self, name: str) -> int:
        """Remove the concept named `name`; returns how many conversations ended with it (they knew it)."""
        with self._lock:
            key = name_key(name or "")
            kept = [entry for entry in self._entries if name_key(entry.concept.name) != key]
            if len(kept) == len(self._entries):
                raise InputError("There is no concept with that name; pick one from the list.")
            ended = self._end_conversations_knowing([e.concept for e in self._entries if e not in kept])
            self._entries = kept
            self._version += 1
            return ended

    def clear(self) -> int:
        """Remove every concept; returns how many conversations ended with them."""
        with self._lock:
            ended = self._end_conversations_knowing([entry.concept for entry in self._entries])
            self._entries = []
            self._version += 1
            return ended

    def _end_conversations_knowing(self, concepts) -> int:
        """A removed concept is not used again: the conversations that know it end (the next message starts one)."""
        tabs = holding(self.conversations, concepts)
        for tab in tabs:
            self.conversations.end(tab)
        return len(tabs)

    @contextlib.contextmanager
    def export_file(self, folder: str | None = None):
        """A fresh path for this visitor's export file, in a new folder under `folder` (default: the system's
        temporary folder), to write in the `with` block. Written, it replaces the previous export, which is deleted
        then and not before; a write that fails leaves the previous one. One export at a time per visitor: a
        second click waits for the first, rather than deleting the folder the first is writing in."""
        with self._exporting:
            if folder is not None:
                Path(folder).mkdir(parents=True, exist_ok=True)
            written = tempfile.mkdtemp(prefix="ego-export-", dir=folder)
            try:
                yield Path(written) / EXPORT_NAME
            except BaseException:
                shutil.rmtree(written, ignore_errors=True)
                raise
            with self._lock:
                self._remove_export()
                self._export_dir = written

    def close(self) -> None:
        """Free everything, conversations too: called when the visitor's state expires or is dropped."""
        with self._lock:
            self._entries = []
            self._remove_export()
        for tab in TABS:
            self.conversations.end(tab)

    def _remove_export(self) -> None:
        if self._export_dir is not None:
            shutil.rmtree(self._export_dir, ignore_errors=True)
            self._export_dir = None


def forget(session) -> None:
    """`gr.State(delete_callback=...)`: the visitor's tab closed long enough ago, or their session was dropped
    beyond `max_sessions`."""
    if isinstance(session, Session):
        session.close()
