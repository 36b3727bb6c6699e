"""The Gradio Space around the engine: everything app.py needs besides laying out the page.

- `space.actions`: the event handlers; visitor mistakes become `gr.Error` sentences.
- `space.guidance`: small handlers that tell the visitor where they stand (after Introduce, after Stop, ...).
- `space.session`: one visitor's concepts, the value held in `gr.State`.
- `space.conversations`: one visitor's conversations (held by their session) and their chat views.
- `space.resume`: a reload in the same browser finds its session again (`gr.BrowserState`).
- `space.settings`: every limit and default only the Space has (`SpaceSettings`).
- `space.loading`: the one model of the process, loaded on first use behind a lock.
- `space.views`: what the visitor sees (kept-token pictures, heat maps, reports, captions, records).
- `space.examples`: the bundled examples (examples/examples.json) as absolute paths.
- `space.pictures`: pictures for the page, written into Gradio's cache atomically (no race between visitors).
- `space.links`, `space.uploads`: the server never fetches a link; uploads stop before they fill the disk.
- `space.visitors`: one client address cannot start sessions by the thousand nor fill the shared queue.
- `space.api`: the HTTP API's descriptions, and a sentence for a call Gradio cannot read.
- `space.scheduler`: visitors' questions that arrive together answered by one batched generation.
- `space.zerogpu`: on Hugging Face ZeroGPU, model calls in a GPU worker process (`spaces.GPU`).

app.py imports these only when it builds the demo (they import the engine, hence torch), but for
`space.components` (upload components that check their files) and `space.page` (the page's CSS and scripts).
"""
