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
"""

from __future__ import annotations

import logging
import secrets
import threading
import weakref

import gradio as gr

from . import session as visitor_session
from .session import Session

log = logging.getLogger("ego.space")

TOKEN_BYTES = 32
"""256 random bits: a token cannot be guessed, so one visitor cannot take over another's concepts."""


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


class Sessions:
    """token -> the `Session` it names, held weakly, with how many tabs hold each one."""

    def __init__(self):
        self._by_token: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()
        self._holders: weakref.WeakKeyDictionary[Session, int] = weakref.WeakKeyDictionary()
        self._token_of: weakref.WeakKeyDictionary[Session, str] = weakref.WeakKeyDictionary()
        """Each session's one token: a tab that loads again without it gets the same one back, not another."""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_token)

    def resume(self, session: Session, token) -> tuple[Session, str]:
        """On page load: (the session this tab should use, the token the browser should keep).

        `session` is the tab's fresh one; `token` what the browser kept (None, "" or stale on a first visit).
        """
        with self._lock:
            known = self._by_token.get(token) if isinstance(token, str) and token else None
            if known is not None and known is not session:
                self._holders[known] = self._holders.get(known, 0) + 1
                return known, token
            if known is session:
                return session, token
            if session in self._token_of:  # this tab's session already has its token (and counts this tab)
                return session, self._token_of[session]
            return session, self._register(session)

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
        """`gr.State(delete_callback=...)`: one tab let go of `session`; the last one empties it."""
        with self._lock:
            holders = self._holders.get(session, 0) if isinstance(session, Session) else 0
            if holders > 1:
                self._holders[session] = holders - 1
                return
            self._holders.pop(session, None)
            self._token_of.pop(session, None)
            for token in [t for t, s in self._by_token.items() if s is session]:
                del self._by_token[token]
        visitor_session.forget(session)


def keep_promises(holder, session_ttl_s: float) -> None:
    """Gradio's store of sessions (`gradio.state_holder.StateHolder`, one per app), made to keep what the Space says
    of a visitor's data (docs/privacy-and-limits.md):

    * a session dropped beyond `max_sessions` (the least recently used) is let go like an expired one, its
      concepts and conversations freed at once (`gr.State`'s delete callback): Gradio only forgets it, and
      whatever still refers to it (a cancelled answer's iterator, say) keeps it alive, still counted against the
      memory all sessions share;
    * a closed tab's session expires `session_ttl_s` after its last action like an open one's: Gradio keeps a
      closed tab's states an hour (`STATE_TTL_WHEN_CLOSED`), whatever their own time to live.

    Its `update` (which every request of a session calls, and which drops the least recently used) is replaced on
    this one object; the rest is Gradio's."""

    def update(session_id: str) -> None:
        dropped = []
        with holder.lock:
            state = holder.session_data.get(session_id)
            if state is not None:
                holder.session_data.move_to_end(session_id)
                state.STATE_TTL_WHEN_CLOSED = session_ttl_s
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
        super().__init__(*args, **kwargs)

    @property
    def state_holder(self):
        return self._state_holder

    @state_holder.setter
    def state_holder(self, holder) -> None:
        keep_promises(holder, self.session_ttl_s)
        self._state_holder = holder
