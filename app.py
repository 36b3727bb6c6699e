"""Ego, the Space: introduce your own concepts to a vision-language model, then ask about photos and clips.

    python app.py                                # the default model (Qwen2.5-VL-7B, 4-bit on a GPU)
    python app.py --model tiny-qwen2.5-vl        # a tiny random model: no download, answers are noise

This file only builds the page and wires events to `space.actions`. Importing it loads no model and
no torch: the engine is imported when the demo is built, and the model is loaded on first use.
"""

from __future__ import annotations

import argparse
import logging
import os

import gradio as gr

PAPER_URL = "https://arxiv.org/abs/2603.09771"
MODEL_EVENTS = dict(concurrency_id="model", concurrency_limit=1)
"""Every event that runs the model waits for the one before it (one shared model)."""
PRIVATE = dict(api_visibility="private")


def build_demo(engine_factory_or_engine, settings=None, *, model_name: str | None = None) -> gr.Blocks:
    """The Blocks of the Space, around an engine (`ego.Ego`) or a no-argument function that makes one.

    settings: the limits shown and enforced by the app (default: the engine's, else ego.DEFAULT_SETTINGS).
    """
    # The engine imports torch; keep it out of `import app`.
    from space.actions import Actions
    from space.examples import load_examples
    from space.loading import LazyEngine
    from space.session import Session, forget

    engine = LazyEngine(engine_factory_or_engine, name=model_name)
    if settings is None:
        from ego.settings import DEFAULT_SETTINGS

        settings = getattr(engine_factory_or_engine, "settings", None) or DEFAULT_SETTINGS
    examples = load_examples()
    act = Actions(engine, settings, examples)
    s = settings

    with gr.Blocks(title="Ego: personalize a vision-language model", analytics_enabled=False,
                   delete_cache=(s.upload_cleanup_interval_s, s.upload_max_age_s)) as demo:
        session = gr.State(Session(), time_to_live=s.session_ttl_s, delete_callback=forget)
        gr.Markdown(
            "# Ego: teach a vision-language model your own concepts\n"
            "Show the model one to five photos of *your* cat, mug or friend and give it a name. The model "
            "picks the few visual tokens that represent it and keeps them as a memory; ask about new photos "
            "and clips and the memory goes back into its context. No training. "
            f"[Paper]({PAPER_URL}) · model: `{engine.name or 'not loaded yet'}`",
            latex_delimiters=[],
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Introduce", id="introduce"):
                        with gr.Row():
                            with gr.Column():
                                name = gr.Textbox(label="Name", placeholder="Chelsea", max_length=s.max_name_chars,
                                                  info=f"Up to {s.max_name_chars} characters, unique among your concepts.")
                                photos = gr.Gallery(label=f"Reference photos (1 to {s.max_references_per_concept})",
                                                    type="filepath", file_types=["image"], interactive=True,
                                                    columns=5, height=220, object_fit="cover")
                                gr.Markdown(f"JPEG, PNG, WebP, GIF, BMP or TIFF; up to {s.max_upload_mb} MiB and "
                                            f"{s.max_image_pixels / 1e6:g} megapixels each. One clear photo is "
                                            f"enough; more views help.", elem_classes="hint")
                                with gr.Accordion("Advanced", open=False):
                                    keywords = gr.Textbox(label="Keywords",
                                                          placeholder="tabby, green eyes, white paws",
                                                          info="Comma-separated words whose attention picks the "
                                                               "tokens. Empty: the model describes the photo.")
                                    auto_size = gr.Checkbox(value=True, label="Let the model estimate the size")
                                    size_pct = gr.Slider(1, 100, value=25, step=1, interactive=False,
                                                         label="Subject size (% of each photo)",
                                                         info=f"Tokens kept per photo: about size × tokens / 100, "
                                                              f"at most {s.k_cap_tokens}.")
                                with gr.Row():
                                    introduce_btn = gr.Button("Introduce", variant="primary")
                                    examples_btn = gr.Button("Load the example concepts")
                                if examples.concepts:
                                    gr.Examples([[n, p] for n, p in examples.concepts], [name, photos],
                                                cache_examples=False, label="Example concepts")
                            with gr.Column():
                                report = gr.Markdown(latex_delimiters=[], label="Result")
                                patches = gr.Gallery(label="Kept visual tokens (highlighted)", columns=2,
                                                     height="auto", interactive=False, object_fit="contain")
                                with gr.Accordion("Token importance heat maps (Eq. 3)", open=False):
                                    heats = gr.Gallery(show_label=False, columns=2, height="auto",
                                                       interactive=False, object_fit="contain")

                    with gr.Tab("Ask about an image", id="image"):
                        with gr.Row():
                            with gr.Column():
                                image = gr.Image(label="Photo", type="filepath", image_mode=None,
                                                 sources=["upload", "clipboard"], height=320)
                                gr.Markdown(f"Up to {s.max_upload_mb} MiB and {s.max_image_pixels / 1e6:g} megapixels.",
                                            elem_classes="hint")
                                image_question = gr.Textbox(label="Question", lines=2, max_length=s.max_question_chars,
                                                            placeholder="Is Chelsea in this photo?",
                                                            info=f"Up to {s.max_question_chars} characters.")
                                compare = gr.Checkbox(label="Also answer without memory (the plain model)")
                                with gr.Row():
                                    ask_image_btn = gr.Button("Ask", variant="primary")
                                    stop_image_btn = gr.Button("Stop", variant="stop")
                                if examples.image_questions:
                                    gr.Examples([list(e) for e in examples.image_questions], [image, image_question],
                                                cache_examples=False, label="Example questions")
                            with gr.Column():
                                image_answer = gr.Textbox(label="Answer (with your concepts)", lines=6, max_lines=14,
                                                          interactive=False)
                                plain_answer = gr.Textbox(label="Answer without memory", lines=4, max_lines=14,
                                                          interactive=False, visible=False)
                                image_details = gr.JSON(label="What went into the context")

                    with gr.Tab("Ask about a video", id="video"):
                        with gr.Row():
                            with gr.Column():
                                video = gr.Video(label="Clip", sources=["upload"], height=320)
                                gr.Markdown(f"Up to {s.max_video_duration_s:g} s and {s.max_upload_mb} MiB; "
                                            f"{s.video_num_frames} frames are sampled evenly.", elem_classes="hint")
                                video_question = gr.Textbox(label="Question", lines=2, max_length=s.max_question_chars,
                                                            placeholder="Is Chelsea in this video?",
                                                            info=f"Up to {s.max_question_chars} characters.")
                                with gr.Row():
                                    ask_video_btn = gr.Button("Ask", variant="primary")
                                    stop_video_btn = gr.Button("Stop", variant="stop")
                                if examples.video_questions:
                                    gr.Examples([list(e) for e in examples.video_questions], [video, video_question],
                                                cache_examples=False, label="Example questions")
                            with gr.Column():
                                frames = gr.Gallery(label="Frames the model sees", columns=4, height="auto",
                                                    interactive=False, object_fit="contain")
                                video_answer = gr.Textbox(label="Answer (with your concepts)", lines=6, max_lines=14,
                                                          interactive=False)
                                video_details = gr.JSON(label="What went into the context")

            with gr.Column(scale=1, min_width=260):
                gr.Markdown("## Your concepts")
                summary = gr.Markdown(latex_delimiters=[])
                cards = gr.Gallery(show_label=False, columns=3, fit_columns=False, height="auto", interactive=False,
                                   object_fit="cover", allow_preview=False)
                with gr.Row():
                    to_remove = gr.Dropdown(label="Concept", choices=[], allow_custom_value=True, scale=2)
                    remove_btn = gr.Button("Remove", scale=1, size="sm")
                clear_btn = gr.Button("Clear all", size="sm")
                export_btn = gr.Button("Export to a file", size="sm")
                exported = gr.File(label="Your concept file", interactive=False, visible=False)
                import_btn = gr.UploadButton("Import a concept file", file_types=[".safetensors"],
                                             type="filepath", size="sm")
                with gr.Accordion("Details (JSON)", open=False):
                    records = gr.JSON(show_label=False)
                gr.Markdown(
                    f"Your photos and concepts live in this server's memory for this tab only and are deleted "
                    f"{s.session_ttl_s // 60} minutes after you close it; uploads leave the server within "
                    f"{(s.upload_max_age_s + s.upload_cleanup_interval_s) // 60} minutes. "
                    f"Export your concepts to keep them. At most {s.max_concepts_per_session} concepts.",
                    elem_classes="hint",
                )

        panel = [cards, to_remove, summary, records]

        def refresh(event):
            return event.then(act.panel, session, panel, **PRIVATE)

        # Introduce
        auto_size.change(lambda auto: gr.Slider(interactive=not auto), auto_size, size_pct, queue=False, **PRIVATE)
        refresh(introduce_btn.click(act.introduce, [session, name, photos, keywords, auto_size, size_pct],
                                    [session, report, patches, heats], api_name="introduce", **MODEL_EVENTS))
        refresh(examples_btn.click(act.load_example_concepts, session, [session, report, patches, heats],
                                   **MODEL_EVENTS, **PRIVATE))

        # Ask about an image (the plain answer is shown only when asked for)
        compare.change(lambda on: gr.Textbox(visible=on), compare, plain_answer, queue=False, **PRIVATE)
        asking_image = ask_image_btn.click(act.ask_image, [session, image, image_question, compare],
                                           [image_answer, plain_answer, image_details], api_name="ask_image",
                                           **MODEL_EVENTS)
        stop_image_btn.click(None, cancels=[asking_image], **PRIVATE)

        # Ask about a video
        asking_video = ask_video_btn.click(act.ask_video, [session, video, video_question],
                                           [frames, video_answer, video_details], api_name="ask_video",
                                           **MODEL_EVENTS)
        stop_video_btn.click(None, cancels=[asking_video], **PRIVATE)

        # The concept panel
        demo.load(act.panel, session, panel, **PRIVATE)
        demo.load(act.list_concepts, session, records, api_name="list_concepts")
        refresh(remove_btn.click(act.remove_concept, [session, to_remove], [session, records],
                                 api_name="remove_concept"))
        refresh(clear_btn.click(act.clear_concepts, session, [session, records], **PRIVATE))
        export_btn.click(act.export_concepts, session, [session, exported], api_name="export_concepts")
        refresh(import_btn.upload(act.import_concepts, [session, import_btn], [session, records],
                                  api_name="import_concepts", **MODEL_EVENTS))
    demo.queue(max_size=settings.queue_max_size)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    from ego.presets import DEFAULT_PRESET, PRESETS

    parser = argparse.ArgumentParser(description="Ego: the Gradio Space.")
    parser.add_argument("--model", default=os.environ.get("EGO_MODEL", DEFAULT_PRESET),
                        help=f"a preset ({', '.join(PRESETS)}), a Hub id or a local folder "
                             f"(env EGO_MODEL; default {DEFAULT_PRESET})")
    parser.add_argument("--quantization", choices=["auto", "4bit", "8bit", "none"],
                        default=os.environ.get("EGO_QUANTIZATION", "auto"),
                        help="auto: 4-bit on a GPU, none on a CPU (env EGO_QUANTIZATION)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (env GRADIO_SERVER_NAME; default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                        help="port (env GRADIO_SERVER_PORT; default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    import functools

    from ego import DEFAULT_SETTINGS, Ego

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    settings = DEFAULT_SETTINGS
    quantization = None if args.quantization == "none" else args.quantization
    factory = functools.partial(Ego.from_pretrained, args.model, quantization=quantization, settings=settings)
    demo = build_demo(factory, settings, model_name=args.model)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                max_file_size=settings.max_upload_bytes, state_session_capacity=settings.max_sessions)


if __name__ == "__main__":
    main()
