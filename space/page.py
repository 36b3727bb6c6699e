"""What the page does in the browser itself: styles, and the few scripts no Python handler can run.

No engine, no torch: app.py imports this at the top.
"""

from __future__ import annotations

import json

EXPORTED = "all in your last export"
"""Said in the concept panel's summary line when every concept is in the visitor's last export (the page then does
not ask before it is left)."""

CSS = """
#report td, #report th { overflow-wrap: normal; word-break: normal; }
#report td:nth-child(-n+2), #report th:nth-child(-n+2) { white-space: nowrap; }
#report td:last-child { overflow-wrap: anywhere; }
#report table { width: 100%; table-layout: auto; }
#cards .caption-label, #frames .caption-label { white-space: normal; max-width: 92%; }
:is(button, input, textarea, select, [role="tab"], [role="gridcell"], a):focus-visible {
    outline: 3px solid #2563eb !important; outline-offset: 2px;
}
.info-text { color: #4b5563 !important; }
.dark .info-text { color: #d1d5db !important; }
button.primary { background: #c2410c !important; border-color: #c2410c !important; }
button.primary:hover { background: #9a3412 !important; }
button.stop { background: #b91c1c !important; border-color: #b91c1c !important; }
button.stop:hover { background: #991b1b !important; }
button[role="tab"].selected { color: #c2410c !important; }
.dark button[role="tab"].selected { color: #fb923c !important; }
@media (max-width: 640px) {
    #report table { font-size: 0.85em; }
    #report td, #report th { padding: 4px 6px; }
    #frames .grid-container { grid-template-columns: repeat(2, minmax(0, 1fr)) !important; }
}
@media (pointer: coarse) {
    button.sm { min-height: 44px; }
}
"""
"""Gradio breaks Markdown table cells anywhere: the report's two number columns must not wrap, its keyword
column wraps inside the page (a phone too). The captions of concept cards and video frames wrap rather than end in
"…" (a card's token count, a frame's time). Every control, example rows too, shows a clear ring when reached by
keyboard. Text and buttons read at WCAG AA contrast (4.5:1; the theme's hints, white on its orange and red buttons
and its orange tab title are under 3:1). On a phone the 8 sampled frames show two per row (four would overflow the
column, hidden in a strip that scrolls sideways); on a touch screen the small buttons are 44 px high to be
tapped."""

ON_LOAD_JS = """
() => {
    window.egoUnsaved = false;
    window.addEventListener("beforeunload", (event) => {
        if (window.egoUnsaved) { event.preventDefault(); event.returnValue = ""; }
    });
    const describe = () => {
        // The examples' thumbnails only: a visitor's own photo is not an example.
        const thumbnails = "[id^='examples-'] img:not([alt]), [id^='examples-'] img[alt='']";
        for (const img of document.querySelectorAll(thumbnails)) {
            const file = decodeURIComponent((img.getAttribute("src") || "").split("/").pop() || "");
            const name = file.replace(/\\.[a-z0-9]+$/i, "").replace(/[-_]+/g, " ").trim();
            img.setAttribute("alt", name ? "Example: " + name : "Example picture");
        }
    };
    describe();
    new MutationObserver(describe).observe(document.body, { childList: true, subtree: true });
    // The concept panel's status line says what Export, Import, Remove and Clear did: read out when it changes.
    const announce = () => document.querySelector("#panel-status")?.setAttribute("role", "status");
    announce();
    new MutationObserver(announce).observe(document.body, { childList: true, subtree: true });
    // Shown again (another browser tab, or another window, was in front): the concept panel is brought up to date.
    let askedAt = 0;
    const refresh = () => {
        if (!window.egoPageReady || document.visibilityState !== "visible" || Date.now() - askedAt < 1000) return;
        askedAt = Date.now();
        document.querySelector("#panel-refresh")?.click();
    };
    document.addEventListener("visibilitychange", refresh);
    window.addEventListener("focus", refresh);
}
"""
"""Runs once per page load: the warning before leaving a page whose concepts were never exported (the
server still holds them for a reload, but not forever), alt text for example thumbnails (Gradio draws
them without), named after the example file, the concept panel's status line as a live region, and the panel
brought up to date when the tab is shown again, as another tab of the browser shares its concepts (once the page
has shown its own: before, the refresh could race the page load's and show the tab's session before it was
resumed). Switching tabs fires both `visibilitychange` and `focus`: one refresh."""

PAGE_READY_JS = "() => { window.egoPageReady = true; }"
"""Chained after the page load's own panel refresh."""

TRACK_CONCEPTS_JS = f"""
(summary) => {{
    const line = String(summary || "");
    window.egoUnsaved = !!line && !line.startsWith("No concepts") && !line.includes({json.dumps(EXPORTED)});
}}
"""
"""After the concept panel's summary changes: concepts that are not all in the visitor's last export (the summary
says when they are; also after a reload) make leaving the page ask first."""


CLEAR_IMPORT_PICKER_JS = """
() => {
    for (const input of document.querySelectorAll("input[type=file][accept*='.safetensors']")) input.value = "";
}
"""
"""Once a concept file is uploaded, the import button's file picker forgets it: a browser sends no change when the
same file is picked again (to import it again after Clear all, or after a refusal), and nothing would happen."""


def scroll_to_js(elem_id: str) -> str:
    """Bring a result into view when its button is pressed (on a phone it sits below the inputs)."""
    return (
        f"(...args) => {{ document.getElementById({elem_id!r})?.scrollIntoView("
        f"{{behavior: 'smooth', block: 'nearest'}}); return args; }}"
    )
