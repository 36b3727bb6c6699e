"""The Gradio Space around the engine: everything app.py needs besides laying out the page.

- `space.actions`: the event handlers; visitor mistakes become `gr.Error` sentences.
- `space.session`: one visitor's concepts, the value held in `gr.State`.
- `space.loading`: the one model of the process, loaded on first use behind a lock.
- `space.views`: what the visitor sees (kept-token pictures, heat maps, reports, captions, records).
- `space.examples`: the bundled examples (examples/examples.json) as absolute paths.
- `space.pictures`: pictures for the page, written into Gradio's cache atomically (no race between visitors).
- `space.links`, `space.uploads`: the server never fetches a link; uploads stop before they fill the disk.
- `space.scheduler`: visitors' questions that arrive together answered by one batched generation.
- `space.zerogpu`: on Hugging Face ZeroGPU, model calls in a GPU worker process (`spaces.GPU`).

app.py imports these only when it builds the demo (they import the engine, hence torch).
"""
