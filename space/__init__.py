"""The Gradio Space around the engine: everything app.py needs besides the Blocks wiring.

- `space.loading`: the one model of the process, loaded lazily behind a lock.
- `space.session`: one visitor's concepts, the value held in `gr.State`.
- `space.views`: pictures and text shown to the visitor (highlighted patches, reports, captions).
- `space.examples`: the bundled examples (examples/examples.json) as absolute paths.
- `space.actions`: the event handlers, turning visitor mistakes into `gr.Error` sentences.

Only `space.actions`, `space.session` and `space.loading`'s callers import the engine (and torch);
`import app` stays light.
"""
