"""A reload, or a second tab of the same browser, gets the visitor's concepts back.

The browser keeps one random token (`gr.BrowserState`, in its local storage); the server keeps, for each
token, the `Session` it names. On page load the tab presents its token: while the server still holds that
session, the tab's `gr.State` takes it over; otherwise the tab keeps its new, empty session under a new
token. The token is 256 random bits, sent in a request body (never in an address) and never logged; the
memories themselves never leave the server this way.

Expiry is unchanged: the registry holds weak references only, so a session lives exactly as long as some
tab's `gr.State` holds it (`SpaceSettings.session_ttl_s` after that tab's last action, or Gradio dropping it
beyond `max_sessions`). A session shared by several tabs is emptied only when the last of them lets go.
`SessionBlocks` makes Gradio keep both promises (`keep_promises`).

A tab left open past its session's expiry gets a new, empty session from Gradio at its next action. The registry
remembers which token each page load handed its tab (by the page's Gradio session), so that action can tell
(`Sessions.rejoin`): the visitor is told their session ended, rather than answered as if they had no concepts. A
script of the HTTP API has no page load: its Gradio session is remembered once it holds concepts
(`Sessions.remember_script`), and its questions are told the same way.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import threading
import weakref
from collections import OrderedDict

import gradio as gr

from . import session as visitor_session
from .session import Session

log = logging.getLogger("ego.space")

TOKEN_BYTES = 32
"""256 random bits: a token cannot be guessed, so one visitor cannot take over another's concepts."""


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


class Sessions:
    """token -> the `Session` it names, held weakly, with how many tabs hold each one; and the token each page load
    handed its tab.

    remember: how many page loads' (and scripts') tokens are kept (the oldest are forgotten first); an action of a tab
    whose page load was forgotten is not told that its session ended. Twice `max_sessions` tells every tab Gradio
    still keeps.
    """

    def __init__(self, remember: int = 2000):
        self._by_token: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()
        self._holders: weakref.WeakKeyDictionary[Session, int] = weakref.WeakKeyDictionary()
        self._token_of: weakref.WeakKeyDictionary[Session, str] = weakref.WeakKeyDictionary()
        """Each session's one token: a tab that loads again without it gets the same one back, not another."""
        self._page_tokens: OrderedDict[str, str] = OrderedDict()
        """Per page (its Gradio `session_hash`), the token its load handed it, and per script that added concepts the
        token of its session (`remember_script`): it outlives the session, so the next action can tell that the
        session has ended (`rejoin`)."""
        self._scripts: set[str] = set()
        """The Gradio sessions among `_page_tokens` that are scripts' (`remember_script`, and no page load since):
        they read no warning."""
        self._lost: OrderedDict[str, None] = OrderedDict()
        """The tokens of sessions that ended holding something (concepts, a conversation): a tab or script whose
        session ended with nothing in it lost nothing, and is not told (the last `remember` of them)."""
        self._stands_in: weakref.WeakKeyDictionary[Session, Session] = weakref.WeakKeyDictionary()
        """A tab's new session -> the session the tab took over in its stead (`rejoin`), counted as held by the tab
        for as long as the new one stays in the tab's state (a refused action does not replace it)."""
        self.remember = remember
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_token)

    def resume(self, session: Session, token, request: gr.Request = None) -> tuple[Session, str]:
        """On page load: (the session this tab should use, the token the browser should keep).

        `session` is the tab's fresh one; `token` what the browser kept (None, "" or stale on a first visit);
        `request` names the page, which is told later if its session ends (`rejoin`).
        """
        with self._lock:
            kept, kept_token = self._resume(session, token)
            self._remember_page(request, kept_token)
            self._scripts.discard(getattr(request, "session_hash", None))  # a page load: a page's, not a script's
        return kept, kept_token

    def _resume(self, session: Session, token) -> tuple[Session, str]:
        known = self._by_token.get(token) if isinstance(token, str) and token else None
        if known is not None and known is not session:
            self._holders[known] = self._holders.get(known, 0) + 1
            return known, token
        if known is session:
            return session, token
        if session in self._token_of:  # this tab's session already has its token (and counts this tab)
            return session, self._token_of[session]
        return session, self._register(session)

    def rejoin(self, session, request: gr.Request = None) -> tuple[Session, bool]:
        """Before a tab's action: (the session it acts on, whether the tab's session ended since its page loaded).

        Every page load hands its tab a session this registry knows (`resume`). A session it does not know, in a
        tab whose page load it remembers, is one Gradio made after dropping the tab's state: the tab stayed open
        `session_ttl_s` past its last action, or was the least recently used beyond `max_sessions`. If the token
        that page was handed still names a session (another tab of this browser holds it), the tab takes it over,
        as a reload would: nothing was lost. Otherwise the session has ended (True, if it held concepts or a
        conversation: one that held nothing lost nothing); the tab's new one gets its own token, so the next action
        is not told again.

        A script's session (no page load) is left as it is until it holds concepts (`remember_script`), and so is a
        page whose load has not been answered yet."""
        with self._lock:
            found = self._made_again(session, request)
            if found is None:
                return session, False
            taken, ended = found
            if taken is not session:
                return self._stand_in(session, taken), False
            # What the tab's new session already holds stays in it, under a token of its own.
            self._remember_page(request, self._register(session))
            return session, ended

    def take_over(self, session, request: gr.Request = None) -> Session:
        """The session a tab's action that ends something (New conversation, a new photo) acts on: where the tab
        outlived its state while another tab of the browser still holds its session, that session, taken over as
        `rejoin` takes it; otherwise the tab's own, nothing changed (a session that ended is left for the tab's next
        message to say so). One step under the lock: the shared session cannot end between looking and taking."""
        with self._lock:
            found = self._made_again(session, request)
            if found is None or found[0] is session:
                return session
            return self._stand_in(session, found[0])

    def _stand_in(self, session: Session, taken: Session) -> Session:
        """The tab's new `session` stands in for `taken`, which it holds from now on (counted once); returns
        `taken`. The caller holds the lock."""
        if self._stands_in.get(session) is not taken:
            self._stands_in[session] = taken
            self._holders[taken] = self._holders.get(taken, 0) + 1
        return taken

    def peek(self, session, request: gr.Request = None) -> tuple[Session, bool]:
        """What `rejoin` answers, changing nothing: for an event beside the tab's action (a hint about its
        question), which must neither take the session over nor the action's sentence."""
        with self._lock:
            found = self._made_again(session, request)
        return (session, False) if found is None else found

    def remember_script(self, session, request: gr.Request = None) -> None:
        """A script's session (an HTTP API client: no page load) that now holds concepts: remembered by its Gradio
        session as a page is, so that its next request after the session ended is told so (`rejoin`) rather than
        answered without its concepts. A page's session, or one already remembered, is left as it is."""
        page = getattr(request, "session_hash", None)
        if not isinstance(session, Session) or not isinstance(page, str):
            return
        with self._lock:
            if page not in self._page_tokens:
                token = self._token_of.get(session)
                self._remember_page(request, token if token is not None else self._register(session))
                self._scripts.add(page)

    def is_script(self, request: gr.Request = None) -> bool:
        """Whether `request` comes from a script this registry remembers (`remember_script`), not a page."""
        with self._lock:
            return getattr(request, "session_hash", None) in self._scripts

    def _made_again(self, session, request) -> tuple[Session, bool] | None:
        """None for a session this registry knows, or in a page whose load it does not remember. For a session
        Gradio made again for a remembered page after dropping its state: (the session the page's token still
        names, False) when the new one holds nothing yet (the tab takes it over), else (the new one, whether the
        token names nothing: the session ended). The caller holds the lock."""
        page = getattr(request, "session_hash", None)
        if not isinstance(session, Session) or not isinstance(page, str):
            return None
        token = self._page_tokens.get(page)
        if token is None or session in self._token_of:
            return None
        known = self._by_token.get(token)
        if known is not None and session.holds_nothing:
            return known, False
        return session, known is None and token in self._lost

    def _remember_page(self, request, token: str) -> None:
        """The page of `request` was handed `token` (the caller holds the lock)."""
        page = getattr(request, "session_hash", None)
        if not isinstance(page, str):
            return
        self._page_tokens[page] = token
        self._page_tokens.move_to_end(page)
        while len(self._page_tokens) > self.remember:
            forgotten, _ = self._page_tokens.popitem(last=False)
            self._scripts.discard(forgotten)

    def keep(self, session, token) -> str | None:
        """After the tab's concepts changed: the token the browser should keep for `session`. Its own token when it
        has one; a new one when it has none: the tab stayed open past its session's expiry and Gradio gave it a
        new, unnamed session, whose concepts a reload must find (never another session's: what was just added
        stays in this one)."""
        if not isinstance(session, Session):
            return token
        with self._lock:
            own = self._token_of.get(session)
            return own if own is not None else self._register(session)

    def _register(self, session: Session) -> str:
        """A new token for `session`, held by one more tab (the caller holds the lock)."""
        token = new_token()
        self._by_token[token] = session
        self._token_of[session] = token
        self._holders[session] = self._holders.get(session, 0) + 1
        return token

    def release(self, session) -> None:
        """`gr.State(delete_callback=...)`: one tab let go of `session`; the last one empties it. A session that
        stood in for another one (`rejoin`) lets go of that one too."""
        with self._lock:
            stood_in_for = self._stands_in.pop(session, None) if isinstance(session, Session) else None
            holders = self._holders.get(session, 0) if isinstance(session, Session) else 0
            if holders > 1:
                self._holders[session] = holders - 1
            else:
                self._holders.pop(session, None)
                self._token_of.pop(session, None)
                lost = isinstance(session, Session) and not session.holds_nothing
                for token in [t for t, s in self._by_token.items() if s is session]:
                    del self._by_token[token]
                    if lost:
                        self._lost[token] = None
                while len(self._lost) > self.remember:
                    self._lost.popitem(last=False)
        if holders <= 1:
            visitor_session.forget(session)
        if stood_in_for is not None:
            self.release(stood_in_for)


def keep_promises(holder, session_ttl_s: float) -> None:
    """Gradio's store of sessions (`gradio.state_holder.StateHolder`, one per app), made to keep what the Space says
    of a visitor's data (docs/privacy-and-limits.md):

    * a session dropped beyond `max_sessions` (the least recently used) is let go like an expired one, its
      concepts and conversations freed at once (`gr.State`'s delete callback): Gradio only forgets it, and
      whatever still refers to it (a cancelled answer's iterator, say) keeps it alive, still counted against the
      memory all sessions share;
    * a closed tab's session expires `session_ttl_s` after its last action like an open one's: Gradio keeps a
      closed tab's states an hour (`STATE_TTL_WHEN_CLOSED`), whatever their own time to live;
    * a new session Gradio makes for a tab (its first, or one after the last expired or was dropped) lives
      `session_ttl_s` from the action it was made for: Gradio would count it from the expired one's last action,
      and drop it (and free it, under the handler just handed it) within a second, or, made for an action that
      failed before returning it, never expire it at all.

    Its `update` (which every request of a session calls before it reads the session's states, and which drops the
    least recently used) is replaced on this one object; the rest is Gradio's."""

    def update(session_id: str) -> None:
        dropped = []
        with holder.lock:
            state = holder.session_data.get(session_id)
            if state is not None:
                holder.session_data.move_to_end(session_id)
                state.STATE_TTL_WHEN_CLOSED = session_ttl_s
                now = datetime.datetime.now()
                for key, block in state.blocks_config.blocks.items():
                    # Not there (expired, or a new page's): the value made for this request lives from now, also
                    # if no handler returns it (Gradio gives a time to live only to a value a handler returned).
                    if isinstance(block, gr.State) and block.time_to_live and key not in state.state_data:
                        state._state_ttl[key] = (block.time_to_live, now)
            while len(holder.session_data) > holder.capacity:
                evicted, state = holder.session_data.popitem(last=False)
                holder.time_last_used.pop(evicted, None)
                dropped.append(state)
        for state in dropped:  # outside the store's lock: a callback takes locks of its own
            for key, value in list(state.state_data.items()):
                block = state.blocks_config.blocks.get(key)
                if isinstance(block, gr.State):
                    try:
                        block.delete_callback(value)
                    except Exception as error:  # noqa: BLE001 -- not the failure of the request that dropped it
                        log.error("freeing a dropped session failed: %s", type(error).__name__)

    holder.update = update


class SessionBlocks(gr.Blocks):
    """`gr.Blocks` whose app's store of sessions keeps the Space's promises (`keep_promises`) from the moment the
    app is made: Gradio hands each Blocks its store then (`blocks.state_holder = ...`)."""

    def __init__(self, *args, session_ttl_s: float, **kwargs):
        self.session_ttl_s = session_ttl_s
        self.on_close: list = []
        """What to end with the app (the answer scheduler's worker): called by `close`, each once per close."""
        super().__init__(*args, **kwargs)

    def close(self, verbose: bool = True) -> None:
        super().close(verbose)
        for closing in self.on_close:  # also when the app was not running: Gradio's `close` then does nothing
            closing()

    @property
    def state_holder(self):
        return self._state_holder

    @state_holder.setter
    def state_holder(self, holder) -> None:
        keep_promises(holder, self.session_ttl_s)
        self._state_holder = holder
