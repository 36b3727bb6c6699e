"""The Space in a real browser (Debian chromium driven by playwright): example, introduce, a two-turn conversation,
screenshot; a reload that keeps the concepts; a second tab on a phone-sized screen.

Needs Debian's /usr/bin/chromium (`apt-get install -y chromium`) and the `playwright` package, which is
pointed at that browser and never downloads one of its own. Set EGO_SKIP_BROWSER=1 to skip this test on a
machine without chromium.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from conftest import chromium_browser
from PIL import Image

from ego import DEFAULT_SETTINGS

README_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshot.png"
"""Refreshed only with EGO_UPDATE_SCREENSHOT=1, so a test run leaves the tree clean."""
HOSTILE_NAME = '<img src=x onerror="window.__xss=1">'
WAIT_MS = 30_000
SETTINGS = DEFAULT_SETTINGS.replace(answer_max_new_tokens=24)
SHOW_ERROR = True
"""The module's server (conftest's `demo` and `url` fixtures)."""

if os.environ.get("EGO_SKIP_BROWSER") == "1":
    pytest.skip("EGO_SKIP_BROWSER=1: browser test skipped on request", allow_module_level=True)


@pytest.fixture(scope="module")
def page(url):
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)  # a busy machine: the model's steps can take more than the default 5 s
    with chromium_browser() as browser:
        page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()  # a second tab may join
        page.set_default_timeout(WAIT_MS)
        page.goto(url, wait_until="domcontentloaded")  # never "networkidle": Gradio keeps a stream open
        yield page


def settled(locator, quiet_s: float = 1.0) -> None:
    """Wait until `locator`'s text stops changing for `quiet_s` (a streamed answer has ended)."""
    deadline, last, since = time.monotonic() + WAIT_MS / 1000, None, time.monotonic()
    while time.monotonic() < deadline:
        text = locator.inner_text()
        if text != last:
            last, since = text, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.2)
    raise AssertionError("the answer kept changing")


def filled(box, text: str, quiet_s: float = 0.5) -> None:
    """Type `text` into `box` until it stays there for `quiet_s`: on a busy machine Gradio may render a box again
    just after it shows (an accordion opening), and what was typed before is gone."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        if box.input_value() != text:
            box.fill(text)
        time.sleep(quiet_s)
        if box.input_value() == text:
            return
    raise AssertionError(f"the box did not keep {text!r}")


def test_introduce_ask_and_screenshot(page, tmp_path):
    from playwright.sync_api import expect

    introduce = page.get_by_role("button", name="Introduce", exact=True)
    introduce.wait_for()

    # An example fills the name and the reference photos.
    page.get_by_text("Chelsea", exact=True).first.click()
    expect(page.get_by_label("Name")).to_have_value("Chelsea")
    introduce.click()
    expect(page.get_by_text("memory tokens from 3 photos")).to_be_visible()
    expect(page.get_by_text("Chelsea\u2069” is introduced")).to_be_visible()  # a success message
    expect(page.get_by_label("Name")).to_have_value("")  # the form is cleared
    expect(page.locator("#patches img")).to_have_count(3)  # each photo with its kept tokens
    expect(page.locator("#cards").get_by_text("Chelsea\u2069 ·")).to_be_visible()
    caption = page.locator("#cards .caption-label").first  # read whole: it wraps rather than ending in "…"
    assert caption.evaluate("label => label.scrollWidth <= label.clientWidth"), caption.inner_text()

    # Ask about an example photo; the answer streams in and names the concept used.
    page.get_by_role("tab", name="Ask: image").click()
    page.get_by_text("Is Chelsea in this photo? What is she doing?").first.click()
    question = page.get_by_label("Question").first
    expect(question).to_have_value("Is Chelsea in this photo? What is she doing?")  # the example is filled in
    ask = page.get_by_role("button", name="Ask", exact=True).first
    ask.click()
    chat = page.locator("#image-chat")
    expect(chat.locator("[data-testid='bot']")).to_have_count(1)
    expect(chat.locator("[data-testid='bot']").first).not_to_have_text("")
    expect(page.get_by_text('"Chelsea"').first).to_be_visible()
    page.get_by_text("Where each concept's memory matches the photo").click()
    expect(page.locator("#matches img")).to_have_count(1)  # one picture per concept
    expect(page.locator("#matches").get_by_text("Chelsea\u2069 · similarity")).to_be_visible()

    # A follow-up about the same photo: a second turn in the same conversation, the message box emptied.
    expect(question).to_have_value("")
    settled(chat.locator("[data-testid='bot']").first)  # a click while the answer streams would be dropped
    question.fill("What is she holding?")
    ask.click()
    expect(chat.locator("[data-testid='bot']")).to_have_count(2)
    expect(chat.locator("[data-testid='user']").nth(1)).to_contain_text("What is she holding?")
    expect(chat.locator("[data-testid='user']").first).to_contain_text("Is Chelsea in this photo? What is she doing?")
    expect(question).to_have_value("")
    page.locator("#image-chat-new").click()  # "New conversation" empties the view
    expect(chat.locator("[data-testid='bot']")).to_have_count(0)

    # A question without a photo, about the concept itself: the example clears the photo; Enter asks.
    page.get_by_role("button", name="What colour are Chelsea's eyes?").click()
    expect(page.locator("#image-photo img")).to_have_count(0)
    page.locator("#image-question").locator("textarea, input").first.press("Enter")
    expect(page.locator("#matches img")).to_have_count(0)  # nothing to draw the memory on
    expect(chat.locator("[data-testid='bot']")).to_have_count(1)
    expect(chat.locator("[data-testid='user']")).to_contain_text("What colour are Chelsea's eyes?")

    page.get_by_role("tab", name="Introduce").click()
    expect(page.locator("#patches img").first).to_be_visible()
    screenshot = README_SCREENSHOT if os.environ.get("EGO_UPDATE_SCREENSHOT") == "1" else tmp_path / "shot.png"
    shot = page.screenshot(full_page=True, style=".toast-wrap { display: none !important; }")  # no messages
    picture = Image.open(io.BytesIO(shot)).convert("RGB")
    picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(screenshot, optimize=True)
    assert screenshot.stat().st_size < 600_000


def test_visitor_text_is_shown_not_run(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Introduce").click()
    page.get_by_role("gridcell", name="Chelsea", exact=True).click()  # the example's photos ...
    expect(page.get_by_label("Name")).to_have_value("Chelsea")
    page.get_by_label("Name").fill(HOSTILE_NAME)  # ... under another name
    page.get_by_text("Advanced (reset after each concept)").click()
    keywords = page.get_by_label("Keywords")
    expect(keywords).to_be_visible()
    filled(keywords, "tabby, green eyes")  # taken before the click
    page.get_by_role("button", name="Introduce", exact=True).click()
    expect(page.locator("#cards").get_by_text(HOSTILE_NAME[:12])).to_be_visible()
    expect(page.get_by_role("heading", name=HOSTILE_NAME)).to_be_visible()
    expect(page.get_by_text("tabby, green eyes (yours)").first).to_be_visible()  # the keywords were used ...
    expect(page.get_by_label("Keywords")).to_have_value("")  # ... then reset
    assert page.evaluate("window.__xss") is None
    assert page.locator("img[src='x']").count() == 0

    # A question is shown in the conversation as typed: its markup is text, not elements (the view renders HTML).
    page.get_by_role("tab", name="Ask: image").click()
    page.get_by_role("button", name="New conversation").first.click()
    question = f'<b id="injected">bold?</b> {HOSTILE_NAME}'
    page.locator("#image-question").locator("textarea, input").first.fill(question)
    page.locator("#image-question").locator("textarea, input").first.press("Enter")
    chat = page.locator("#image-chat")
    expect(chat.locator("[data-testid='user']")).to_have_count(1)
    settled(chat.locator("[data-testid='bot']").last)
    assert chat.locator("[data-testid='user']").last.inner_text().replace("\u200b", "").strip() == question
    assert page.locator("#injected").count() == 0 and page.locator("img[src='x']").count() == 0
    assert page.evaluate("window.__xss") is None


def test_panel_actions_that_cannot_act_say_why_where_the_visitor_looks(page, url):
    """Remove, Export and Clear skip the queue, and the browser shows no error of such an event: each says why
    in the panel's status line, and a refused export leaves no error badge behind."""
    from playwright.sync_api import expect

    stranger = page.context.browser.new_context(viewport={"width": 1280, "height": 1000})  # no token: no concepts
    try:
        page = stranger.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(url, wait_until="domcontentloaded")
        status = page.locator("#panel-status")
        expect(status).to_have_attribute("role", "status")  # a screen reader reads each of these sentences out
        page.get_by_role("button", name="Remove", exact=True).click()
        expect(status).to_contain_text("Pick the concept to remove from the list first.")
        page.get_by_role("button", name="Export to a file").click()
        expect(status).to_contain_text("There are no concepts to export yet; introduce or import one first.")
        page.get_by_role("button", name="Clear all").click()
        page.get_by_role("button", name="Yes, remove all my concepts").click()
        expect(status).to_contain_text("There are no concepts to clear.")
        expect(page.get_by_label("Your concept file")).to_be_hidden()
    finally:
        stranger.close()


def test_the_same_concept_file_can_be_imported_again(page, url, tmp_path):
    """A browser sends no change when the file picked is the one picked last: the import button's picker forgets
    each file once it is uploaded, so importing a file again after Clear all brings its concepts back."""
    import shutil

    from conftest import introduce_through_api, visitor
    from playwright.sync_api import expect

    maker = visitor(url)
    introduce_through_api(maker, "Rocket")
    concept_file = tmp_path / "mine.safetensors"
    shutil.copy(maker.predict(api_name="/export_concepts"), concept_file)
    stranger = page.context.browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        page = stranger.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(url, wait_until="domcontentloaded")
        status, picker = page.locator("#panel-status"), page.locator("input[type=file][accept*='.safetensors']")
        for _ in range(2):
            picker.set_input_files(str(concept_file))
            expect(status).to_contain_text("Imported 1 concept.")
            expect(page.locator("#cards").get_by_text("Rocket\u2069 ·")).to_be_visible()
            page.get_by_role("button", name="Clear all").click()
            page.get_by_role("button", name="Yes, remove all my concepts").click()
            expect(page.locator("#cards").get_by_text("Rocket\u2069 ·")).to_be_hidden()
    finally:
        stranger.close()


def test_a_reload_keeps_the_concepts_after_a_warning(page):
    from playwright.sync_api import expect

    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.type), dialog.accept()))
    page.reload(wait_until="domcontentloaded")
    assert dialogs == ["beforeunload"]  # concepts never exported: leaving the page asks first
    expect(page.locator("#cards").get_by_text("Chelsea\u2069 ·")).to_be_visible()
    expect(page.get_by_text("2 of 50 concepts")).to_be_visible()
    # The image tab shows the conversation a follow-up would continue: the last one, whose question's markup is
    # still text after the reload.
    page.get_by_role("tab", name="Ask: image").click()
    expect(page.locator("#image-chat [data-testid='user']")).to_have_count(1)
    assert HOSTILE_NAME in page.locator("#image-chat [data-testid='user']").first.inner_text().replace("\u200b", "")
    assert page.locator("#injected").count() == 0 and page.locator("img[src='x']").count() == 0

    # Clear all asks first; keeping them changes nothing.
    page.get_by_role("button", name="Clear all").click()
    page.get_by_role("button", name="Keep them").click()
    expect(page.get_by_role("button", name="Clear all")).to_be_visible()
    expect(page.get_by_text("2 of 50 concepts")).to_be_visible()

    # A conversation about a photo: after a reload, the photo is back in its box, and putting it back did not end
    # the conversation (the box's change event has run a second after it shows).
    page.get_by_text("Is Chelsea in this photo? What is she doing?").first.click()
    page.get_by_role("button", name="Ask", exact=True).first.click()
    settled(page.locator("#image-chat [data-testid='bot']").first)
    page.reload(wait_until="domcontentloaded")
    page.get_by_role("tab", name="Ask: image").click()
    expect(page.locator("#image-photo img").first).to_be_visible()
    page.wait_for_timeout(1000)
    expect(page.locator("#image-chat [data-testid='user']")).to_have_count(1)
    assert "Is Chelsea in this photo?" in page.locator("#image-chat [data-testid='user']").first.inner_text()

    # The chat view's own clear button ends the conversation, as "New conversation" does: a reload shows none.
    page.locator("#image-chat").get_by_role("button", name="Clear").click()
    expect(page.locator("#image-chat [data-testid='user']")).to_have_count(0)
    page.wait_for_timeout(1000)
    # Exported, the concepts are kept in a file: the summary says so, and a reload no longer asks first.
    page.get_by_role("button", name="Export to a file").click()
    expect(page.get_by_text("all in your last export")).to_be_visible()
    page.reload(wait_until="domcontentloaded")
    expect(page.get_by_text("all in your last export")).to_be_visible()
    assert dialogs == ["beforeunload", "beforeunload"]
    page.get_by_role("tab", name="Ask: image").click()
    expect(page.locator("#image-chat")).to_be_visible()
    page.wait_for_timeout(1000)
    expect(page.locator("#image-chat [data-testid='user']")).to_have_count(0)


def test_a_second_tab_on_a_phone_has_the_concepts_and_every_tab_label_and_what_it_changes_shows_in_the_first(
    page, url, tmp_path
):
    import shutil

    from conftest import introduce_through_api, visitor
    from playwright.sync_api import expect

    maker = visitor(url)  # a concept file to import in the phone's tab
    introduce_through_api(maker, "Rocket")
    concept_file = str(tmp_path / "rocket.safetensors")
    shutil.copy(maker.predict(api_name="/export_concepts"), concept_file)

    phone = page.context.new_page()  # same browser, so the same stored token
    phone.set_viewport_size({"width": 390, "height": 844})
    phone.set_default_timeout(WAIT_MS)
    phone.goto(page.url, wait_until="domcontentloaded")
    expect(phone.locator("#cards").get_by_text("Chelsea\u2069 ·")).to_be_visible()
    for label in ("Introduce", "Ask: image", "Ask: video"):
        tab = phone.get_by_role("tab", name=label, exact=True)
        expect(tab).to_be_visible()
        box = tab.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, label
    # The answer box comes right under the Ask button, before the examples.
    phone.get_by_role("tab", name="Ask: image").click()
    ask = phone.get_by_role("button", name="Ask", exact=True).first.bounding_box()
    answer = phone.locator("#image-chat").bounding_box()
    examples = phone.get_by_text("Example questions").first.bounding_box()
    assert ask["y"] < answer["y"] < examples["y"]
    # Tapping an example question, far below the question box, brings the box it filled into view.
    phone.get_by_role("gridcell").filter(has_text="Is Chelsea in this photo?").first.click()
    expect(phone.locator("#image-question")).to_be_in_viewport()
    # The tabs share the concepts: cleared on the phone, they are gone from the first tab's panel once it is shown
    # again (without a reload, which would ask first: its concepts were never exported).
    phone.get_by_role("button", name="Clear all").click()
    phone.get_by_role("button", name="Yes, remove all my concepts").click()
    expect(phone.locator("#cards").get_by_text("Chelsea\u2069 ·")).to_be_hidden()
    expect(page.locator("#cards").get_by_text("Chelsea\u2069 ·")).to_be_visible()  # not shown again yet
    # What a browser fires when its tab comes to the front (headless Chromium never hides a tab: it is said here).
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    expect(page.locator("#cards").get_by_text("Chelsea\u2069 ·")).to_be_hidden()
    expect(page.get_by_text("2 of 50 concepts")).to_be_hidden()
    # A window side by side with another gets the focus without becoming visible: that refreshes the panel too.
    phone.locator("input[type=file][accept*='.safetensors']").set_input_files(concept_file)
    expect(phone.locator("#cards").get_by_text("Rocket\u2069 ·")).to_be_visible()
    page.wait_for_timeout(1100)  # one refresh a second at most (switching tabs fires both events)
    page.evaluate("window.dispatchEvent(new Event('focus'))")
    expect(page.locator("#cards").get_by_text("Rocket\u2069 ·")).to_be_visible()
    phone.close()


def test_a_tab_that_outlived_its_session_is_told_and_leaves_the_browsers_other_session_alone(page, demo):
    """A tab left open past its session's expiry: its next question is refused with the sentence that says so, and
    stays in its box. Meanwhile a new tab of the same browser has a session of its own, with a concept: the old tab's
    refusal must not move the browser's token to the old tab's empty session (a reload of the new tab would then
    show nothing)."""
    import datetime
    import json
    from urllib.parse import parse_qs, urlparse

    from playwright.sync_api import expect

    def open_tab():
        """A new tab of the browser, and the Gradio session of its page (which its requests name)."""
        tab, named = browser.new_page(), []
        tab.on("request", lambda request: named.append(session_named(request)))
        tab.set_default_timeout(WAIT_MS)
        tab.goto(page.url, wait_until="domcontentloaded")
        expect(tab.locator("#cards")).to_be_visible()
        deadline = time.monotonic() + WAIT_MS / 1000
        while not any(named) and time.monotonic() < deadline:
            tab.wait_for_timeout(200)
        return tab, next(name for name in named if name)

    def session_named(request):
        """The Gradio session a request of the page names: in its body (page load, queue) or its address."""
        try:
            body = json.loads(request.post_data or "null")
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("session_hash"):
            return body["session_hash"]
        return (parse_qs(urlparse(request.url).query).get("session_hash") or [None])[0]

    def introduce_chelsea(tab):
        tab.get_by_text("Chelsea", exact=True).first.click()  # the example concept: its name and photos
        expect(tab.get_by_label("Name")).to_have_value("Chelsea")
        tab.get_by_role("button", name="Introduce", exact=True).click()
        expect(tab.locator("#cards").get_by_text("Chelsea\u2069 ·")).to_be_visible()
        expect(tab.get_by_text("1 of 50 concepts")).to_be_visible()
        tab.wait_for_timeout(1500)  # the events chained after it have run (the browser keeps its token)

    browser = page.context.browser.new_context(viewport={"width": 1280, "height": 1000})  # a browser of its own
    try:
        old, old_page = open_tab()
        introduce_chelsea(old)
        state = demo.state_holder.session_data[old_page]  # what Gradio does an hour after the tab's last action
        for key, (live, _) in list(state._state_ttl.items()):
            state._state_ttl[key] = (live, datetime.datetime.now() - datetime.timedelta(seconds=live + 1))
        demo.state_holder.delete_all_expired_state()
        new, _ = open_tab()  # the next day: a new tab, whose session is new
        introduce_chelsea(new)

        old.get_by_role("tab", name="Ask: image").click()
        question = old.locator("#image-question").locator("textarea").first
        question.fill("Where is Chelsea?")
        old.get_by_role("button", name="Ask", exact=True).first.click()
        expect(old.get_by_text("Your session on this server ended").first).to_be_visible()
        expect(question).to_have_value("Where is Chelsea?")
        old.wait_for_timeout(1500)  # the refusal's chained events have run

        new.reload(wait_until="domcontentloaded")
        expect(new.locator("#cards").get_by_text("Chelsea\u2069 ·")).to_be_visible()
    finally:
        browser.close()
