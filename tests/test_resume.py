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


class Page:
    """The `gr.Request` of one browser tab's events: its page's Gradio session."""

    def __init__(self, session_hash: str):
        self.session_hash = session_hash


def test_a_tab_that_outlived_its_session_is_told_once_and_no_other_tab_is():
    """Gradio gives a tab whose state it dropped a new default session; the page load that handed the tab its
    session tells it apart from a first visit, a reload, a second tab or a script."""
    sessions = Sessions()
    tab, early = Page("tab"), Session()
    assert sessions.rejoin(early, tab) == (early, False)  # before its page load is answered: a first visit
    first, token = sessions.resume(early, None, tab)
    assert sessions.rejoin(first, tab) == (first, False)
    first.clear()  # "Clear all": the same session
    assert sessions.rejoin(first, tab) == (first, False)
    for other in (Page("reloaded"), Page("second tab")):
        resumed, _ = sessions.resume(Session(), token, other)
        assert sessions.rejoin(resumed, other) == (first, False)
    script = Session()
    assert sessions.rejoin(script, None) == (script, False)  # no page: a gradio_client visitor
    first._entries = holding("Chelsea")._entries  # a concept, lost when the session ends
    for _ in range(3):  # every tab lets go: the session is freed, and its token names nothing
        sessions.release(first)
    new = Session()
    assert sessions.peek(new, tab) == (new, True) and sessions.peek(new, tab) == (new, True)  # changes nothing
    assert sessions.rejoin(new, tab) == (new, True)
    assert sessions.rejoin(new, tab) == (new, False)  # said once
    kept = sessions.keep(new, token)
    assert kept != token and sessions.resume(Session(), kept, Page("later"))[0] is new  # a reload finds it
    restarted = Sessions()  # a server that restarted knows no page
    assert restarted.rejoin(Session(), tab)[1] is False


def test_a_tab_whose_session_ended_with_nothing_in_it_is_not_told():
    """A page opened and left alone past the session's expiry lost nothing: its first action goes ahead, and a
    session that ends holding something after that is told again."""
    sessions = Sessions()
    tab = Page("tab")
    idle, _ = sessions.resume(Session(), None, tab)
    sessions.release(idle)
    new = Session()
    assert sessions.peek(new, tab) == (new, False) and sessions.rejoin(new, tab) == (new, False)
    new._entries = holding("Chelsea")._entries
    sessions.release(new)
    again = Session()
    assert sessions.rejoin(again, tab) == (again, True)


def outlived_by_a_second_tab():
    """(registry, first tab, session): two tabs of one browser load one session, and the first tab's state expires
    while the second still holds it."""
    sessions = Sessions()
    first_tab, second_tab = Page("first"), Page("second")
    shared, token = sessions.resume(holding("Chelsea"), None, first_tab)
    sessions.resume(Session(), token, second_tab)
    sessions.release(shared)  # the first tab's state expires
    return sessions, first_tab, shared


def test_a_tab_that_outlived_its_session_takes_back_the_one_another_tab_still_holds():
    """The first tab's state expired while a second tab of the browser still holds the session: the first tab's next
    action takes it over, as its reload would, and the session is emptied only when both have let go; a refused
    action (its new session left in its state) lets go of it with that one."""
    sessions, first_tab, shared = outlived_by_a_second_tab()
    new = Session()  # the first tab's state, made again
    assert sessions.peek(new, first_tab) == (shared, False)  # what a hint about its question looks at: not a hold
    assert sessions.rejoin(new, first_tab) == (shared, False)
    assert sessions.rejoin(new, first_tab) == (shared, False)  # the same new session again: counted once
    sessions.release(shared)  # the second tab's state expires
    assert shared.names == ["Chelsea"]  # the first tab holds it
    sessions.release(new)  # the first tab's action was refused, and its new session expired in its state
    assert len(shared) == 0 and len(sessions) == 0
    mine, token = sessions.resume(holding("Chelsea"), None, first_tab)
    sessions.resume(Session(), token, Page("second"))
    sessions.release(mine)
    added = holding("Bo")  # something already added to the tab's new session stays in it
    assert sessions.rejoin(added, first_tab) == (added, False) and mine.names == ["Chelsea"]


def test_the_session_gradio_makes_again_after_an_expiry_is_not_dropped_within_a_second():
    """Gradio counts the time to live of a state from when it was last set, and keeps that time when the value
    expires: the default it makes for the tab's next request would be dropped (and freed) by its next sweep, under
    the handler just handed it. The Space's store counts it from that request."""
    import datetime

    import gradio as gr
    from gradio.state_holder import StateHolder

    from space.resume import keep_promises

    released = []
    with gr.Blocks() as blocks:
        state = gr.State("new", time_to_live=60, delete_callback=released.append)
    holder = StateHolder()
    holder.set_blocks(blocks)
    keep_promises(holder, session_ttl_s=60)
    holder["tab"][state._id] = "used"
    kept = holder.session_data["tab"]
    kept._state_ttl[state._id] = (60, datetime.datetime.now() - datetime.timedelta(seconds=61))  # an hour later
    holder.delete_all_expired_state()
    assert released == ["used"]
    assert holder["tab"][state._id] == "new"  # the tab's next request
    holder.delete_all_expired_state()
    assert released == ["used"] and holder["tab"][state._id] == "new"


def test_a_session_made_for_an_action_that_failed_before_returning_it_still_expires():
    """Gradio gives a state a time to live only when a handler returns it: the session made for the first action of
    a tab dropped beyond `max_sessions` would never expire if that action failed, and, standing in for the session
    another tab still holds, would hold that one forever. The Space's store counts it from that request."""
    import datetime

    import gradio as gr
    from gradio.state_holder import StateHolder

    from space.resume import keep_promises

    sessions = Sessions()
    with gr.Blocks() as blocks:
        state = gr.State(Session(), time_to_live=60, delete_callback=sessions.release)
    holder = StateHolder()
    holder.set_blocks(blocks)
    holder.capacity = 3
    keep_promises(holder, session_ttl_s=60)
    shared, token = sessions.resume(holding("Chelsea"), None, Page("A"))
    holder["A"][state._id] = shared
    holder["B"][state._id] = sessions.resume(Session(), token, Page("B"))[0]  # a second tab of the browser
    holder["A"]
    for visitor in ("C", "D"):  # other visitors: tab B, the least recently used, is dropped
        holder[visitor][state._id] = Session()
    assert "B" not in holder.session_data and shared.names == ["Chelsea"]
    holder["A"]  # tab A stays: tab B's return drops another visitor
    new = holder["B"][state._id]  # tab B's next action, refused before returning its session: nothing set
    assert sessions.rejoin(new, Page("B")) == (shared, False)  # B's new session stands in for the shared one
    an_hour_later = datetime.timedelta(hours=1)
    for tab in ("A", "B"):  # both tabs idle past the time to live: each state's clock an hour back
        ttl = holder.session_data[tab]._state_ttl
        ttl.update({key: (live, since - an_hour_later) for key, (live, since) in ttl.items()})
    holder.delete_all_expired_state()
    assert shared.names == [] and sessions.resume(Session(), token, Page("D"))[1] != token


def test_an_ending_action_takes_over_the_session_another_tab_holds_and_leaves_an_ended_one_to_be_told():
    """`take_over`: a tab that outlived its state while another tab holds its session acts on that one (held once, as
    `rejoin` holds it); a session that has ended is not taken, and the tab's next message is still told."""
    sessions, first_tab, shared = outlived_by_a_second_tab()
    new = Session()  # the first tab's state, made again
    assert sessions.take_over(new, first_tab) is shared
    assert sessions.take_over(new, first_tab) is shared and sessions.rejoin(new, first_tab) == (shared, False)
    sessions.release(shared)  # the second tab's state expires: the first tab holds it
    assert shared.names == ["Chelsea"]
    sessions.release(new)
    assert len(shared) == 0  # held once, let go once
    mine, token = sessions.resume(holding("Bo"), None, first_tab)
    sessions.release(mine)  # its only tab's state expires: the session ends
    again = Session()
    assert sessions.take_over(again, first_tab) is again
    assert sessions.rejoin(again, first_tab) == (again, True)  # still told
    script = Session()
    assert sessions.take_over(script, None) is script  # a script (no page): its own session


def test_a_page_load_makes_a_session_hash_a_pages_and_a_script_stays_a_script():
    """`is_script`: a Gradio session remembered by `remember_script` (a script that added concepts), until a page
    load names the same session (a page whose first action came before its load was answered)."""
    sessions = Sessions()
    page, script = Page("early page"), Page("script")
    sessions.remember_script(holding("Chelsea"), script)
    sessions.remember_script(holding("Bo"), page)  # its Introduce answered before its page load
    assert sessions.is_script(script) and sessions.is_script(page)
    sessions.resume(Session(), None, page)
    assert sessions.is_script(script) and not sessions.is_script(page) and not sessions.is_script(None)
