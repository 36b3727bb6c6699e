"""space/resume.py: a reload or a second tab takes over the session its browser's token names."""

from __future__ import annotations

import gc

from space.resume import Sessions
from space.session import Session


class Concept:
    """What a Session entry needs here: a name (the registry never looks inside a concept)."""

    def __init__(self, name):
        self.name = name


def holding(*names) -> Session:
    session = Session()
    session._entries = [type("Entry", (), {"concept": Concept(name), "nbytes": 0})() for name in names]
    return session


def test_a_first_visit_gets_a_new_unguessable_token():
    sessions = Sessions()
    fresh = Session()
    kept, token = sessions.resume(fresh, None)
    assert kept is fresh and isinstance(token, str) and len(token) >= 43  # 256 bits, base64
    other, second = sessions.resume(Session(), "")
    assert second != token and other is not fresh


def test_a_reload_and_a_second_tab_get_the_same_concepts():
    sessions = Sessions()
    first = holding("Chelsea")
    _, token = sessions.resume(first, None)
    reloaded, same = sessions.resume(Session(), token)
    assert reloaded is first and same == token and reloaded.names == ["Chelsea"]


def test_a_stale_or_forged_token_gets_an_empty_session_and_a_new_token():
    sessions = Sessions()
    _, token = sessions.resume(holding("Chelsea"), None)
    fresh = Session()
    kept, new = sessions.resume(fresh, token[:-1] + ("A" if token[-1] != "A" else "B"))
    assert kept is fresh and len(kept) == 0 and new != token


def test_the_last_tab_to_let_go_empties_the_session_and_its_token_is_forgotten():
    sessions = Sessions()
    first = holding("Chelsea")
    _, token = sessions.resume(first, None)
    sessions.resume(Session(), token)  # a second tab
    sessions.release(first)  # the first tab's state expires
    assert first.names == ["Chelsea"]  # the second tab still has them
    assert sessions.resume(Session(), token)[0] is first
    sessions.release(first)
    sessions.release(first)  # the last holder
    assert len(first) == 0
    fresh = Session()
    assert sessions.resume(fresh, token)[0] is fresh  # nothing comes back once it was freed


def test_a_session_gradio_drops_without_a_callback_is_not_kept_alive():
    sessions = Sessions()
    token = sessions.resume(holding("Chelsea"), None)[1]  # nothing else holds it: like an evicted state
    gc.collect()
    assert len(sessions) == 0
    fresh = Session()
    assert sessions.resume(fresh, token)[0] is fresh


def test_release_of_a_session_never_registered_still_frees_it():
    sessions = Sessions()
    client = holding("Chelsea")  # a gradio_client visitor: no page load, no token
    sessions.release(client)
    assert len(client) == 0


def test_a_tab_that_loads_again_and_again_keeps_one_token_and_one_hold():
    """The page-load event posted many times by one tab (its session, no token): one token and one holder, so the
    registry does not grow and the tab's release still empties the session."""
    sessions = Sessions()
    tab = holding("Chelsea")
    tokens = {sessions.resume(tab, None)[1] for _ in range(300)}
    assert len(tokens) == 1 and len(sessions) == 1
    assert sessions.resume(tab, "a stale token")[1] in tokens
    sessions.release(tab)
    assert len(tab) == 0 and len(sessions) == 0


def test_a_tab_that_outlived_its_session_gets_a_token_for_the_new_one_once_it_adds_concepts():
    """Gradio gives a tab whose session expired a new, unnamed one; once it holds concepts, the token must name it,
    so that a reload finds them (and never another tab's session)."""
    sessions = Sessions()
    expired, other_tab = holding("Chelsea"), holding("Rex")
    _, token = sessions.resume(expired, None)
    _, elsewhere = sessions.resume(other_tab, None)
    sessions.release(expired)
    new = holding("Bo")  # added after the expiry, in the tab's new session
    kept = sessions.keep(new, token)
    assert kept not in (token, elsewhere)
    assert sessions.resume(Session(), kept)[0] is new  # the reload finds it
    assert sessions.keep(new, kept) == kept and sessions.keep(other_tab, token) == elsewhere
    assert sessions.keep(None, token) == token  # a state that never held a Session


def test_a_dropped_sessions_states_are_let_go_and_a_failing_one_fails_no_request(caplog):
    """Gradio drops the least recently used session beyond its capacity without a callback; the Space's store
    calls each state's delete callback then, and one that fails is logged, not raised into the request of the
    visitor whose arrival dropped it."""
    import logging

    import gradio as gr
    from gradio.state_holder import StateHolder

    from space.resume import keep_promises

    caplog.set_level(logging.ERROR, logger="ego.space")
    released = []

    def release(value):
        released.append(value)
        if value == "a":
            raise RuntimeError("a full disk, say")

    with gr.Blocks() as blocks:
        state = gr.State("", delete_callback=release)
    holder = StateHolder()
    holder.set_blocks(blocks)
    holder.capacity = 1
    keep_promises(holder, session_ttl_s=60)
    for session in ("a", "b", "c"):
        holder[session][state._id] = session  # a visitor's request: the one before is dropped
    assert released == ["a", "b"] and list(holder.session_data) == ["c"]
    assert "freeing a dropped session failed: RuntimeError" in caplog.text and "full disk" not in caplog.text
