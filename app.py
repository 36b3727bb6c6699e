"""Ego, the Space: introduce your own concepts to a vision-language model, then ask about photos and clips.

    python app.py                                # Qwen2.5-VL-7B in 4-bit on a GPU; Qwen2-VL-2B on a CPU-only machine
    python app.py --model tiny-qwen2.5-vl        # a tiny random model: no download, answers are noise

This file only lays out the page and wires events to `space.actions`. Importing it loads no model and
no torch: the engine is imported when the demo is built, and the model is loaded on first use.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from space.components import IMAGE_FORMATS_TEXT, photo_input, text_input
from space.page import CLEAR_IMPORT_PICKER_JS, CSS, ON_LOAD_JS, PAGE_READY_JS, TRACK_CONCEPTS_JS, scroll_to_js

PAPER_URL = "https://arxiv.org/abs/2603.09771"
ANSWER_GROUP = "answers"
"""Questions and follow-ups run side by side, up to `answer_batch_max_size`: their handlers hand them to one
scheduler that answers those arriving together in one batched generation (`space.scheduler`)."""
CONCEPT_GROUP = "concepts"
"""Introductions and concept imports run side by side, up to `concept_requests_at_once`: photos are decoded and
files read outside the model's turn. The model is one shared object that makes one call at a time (the engine's
lock); introductions make theirs one at a time (`Actions`; not on ZeroGPU, where each call has a GPU worker of its
own), so an introduction's model call and a batch of answers take turns. Both groups count toward a visitor's
waiting requests."""
PRIVATE = dict(api_visibility="private")
"""UI-only events: not part of the HTTP API."""
CHEAP = dict(queue=False)
"""Events that never touch the model skip the queue (from the browser; `gradio_client` always joins it): a
queue full of questions leaves a visitor free to list, remove and export their concepts."""


def build_demo(
    engine_factory_or_engine, space_settings=None, *, settings=None, model_name: str | None = None, model_note: str = ""
) -> gr.Blocks:
    """The Blocks of the Space, around an engine (`ego.Ego`) or a function that makes one, called on first use
    as `factory(settings=settings)` (e.g. `functools.partial(Ego.from_pretrained, "qwen2.5-vl-7b")`).

    space_settings: the Space's own limits (`space.settings.SpaceSettings`: queue, sessions, file cache, ...).
    settings: the engine settings (`ego.Settings`) a factory's engine gets; an engine brings its own
    (`engine.with_settings(...)` for other ones). The page shows and enforces the engine's limits.
    model_name: shown in the header before a lazily loaded model is there; model_note: why this model.
    """
    # These import the engine, hence torch: only when a demo is built, never on `import app`.
    from ego.presets import layers_summary
    from space import api, guidance
    from space.actions import Actions
    from space.examples import load_examples
    from space.links import refuse_host_files, refuse_links
    from space.loading import LazyEngine
    from space.resume import SessionBlocks
    from space.session import Session
    from space.settings import DEFAULT_SPACE_SETTINGS
    from space.visitors import limit_requests_per_visitor

    engine = LazyEngine(engine_factory_or_engine, settings=settings, name=model_name)
    s, limits = space_settings or DEFAULT_SPACE_SETTINGS, engine.settings
    examples = load_examples()
    act = Actions(engine, s, examples)
    sessions = act.sessions
    engine.warm_up_batched = s.answer_batch_max_size > 1  # the Space batches its visitors: compile that step too
    answer_events = dict(concurrency_id=ANSWER_GROUP, concurrency_limit=s.answer_batch_max_size)
    concept_events = dict(concurrency_id=CONCEPT_GROUP, concurrency_limit=s.concept_requests_at_once)

    with SessionBlocks(
        title="Ego: personalize a vision-language model",
        analytics_enabled=False,
        delete_cache=(s.upload_cleanup_interval_s, s.upload_max_age_s),
        session_ttl_s=s.session_ttl_s,
    ) as demo:
        session = gr.State(Session(), time_to_live=s.session_ttl_s, delete_callback=sessions.release)
        browser_token = gr.BrowserState(None)  # names this browser's session on the server (space/resume.py)
        gr.Markdown(
            "# Ego: teach a vision-language model your own concepts\n"
            f"Show the model 1 to {limits.max_references_per_concept} photos of *your* cat, mug or friend and give "
            "it a name. The model "
            "picks the few visual tokens that represent it and keeps them as a memory; ask about new photos "
            "and clips and the memory goes back into its context. No training. "
            f"[Paper]({PAPER_URL}) · model: `{engine.name or 'loaded on first use'}`{model_note} · "
            f"{layers_summary(engine.name)}",
            latex_delimiters=[],
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Tabs():
                    intro = _introduce_tab(limits, examples)
                    img = _image_tab(limits, examples)
                    vid = _video_tab(limits, examples)
            with gr.Column(scale=1, min_width=260):
                mine = _concepts_panel(s, limits)

        panel = [mine.cards, mine.to_remove, mine.summary, mine.records, mine.status]

        def then_refresh(event, status: bool = True, after: str = "then", refresh=None, keep_token: bool = True):
            """The panel (`refresh`, by default `act.panel`) and the browser's token after `event`: once it succeeded
            ("then": the page runs no event chained with `then` after a failure), or once it failed ("failure")."""
            refresh = refresh or (act.panel if status else functools.partial(act.panel, status=False))
            chain = getattr(event, after)
            # The session named by the browser's token, also when the tab outlived its last session (space/resume.py).
            if keep_token:  # not after a refusal: it added nothing, and the browser's token (its other tabs') stays
                chain(sessions.keep, [session, browser_token], browser_token, **CHEAP, **PRIVATE)
            return chain(refresh, session, panel, **CHEAP, **PRIVATE).then(
                None, mine.summary, None, js=TRACK_CONCEPTS_JS, **PRIVATE
            )

        # Introduce
        intro.auto_size.change(
            lambda auto: gr.Slider(interactive=not auto), intro.auto_size, intro.size_pct, queue=False, **PRIVATE
        )
        introduced = [session, intro.report, intro.patches, intro.heats]
        form = [intro.name, intro.photos, intro.keywords, intro.auto_size, intro.size_pct]
        intro.button.click(None, js=scroll_to_js("report"), **PRIVATE)
        introducing = intro.button.click(
            act.introduce,
            [session, *form],
            introduced,
            api_name="introduce",
            api_description=api.INTRODUCE.format(max_photos=limits.max_references_per_concept),
            **concept_events,
        )
        then_refresh(introducing)
        # Queued (not CHEAP): only an event on the queue can show the visitor a message.
        introducing.success(guidance.after_introduce, [session, intro.name], form, **PRIVATE)
        loading_examples = intro.examples_button.click(
            act.load_example_concepts, session, introduced, **concept_events, **PRIVATE
        )
        then_refresh(loading_examples)
        loading_examples.success(guidance.suggest_export, session, None, **PRIVATE)

        # Ask about an image: a conversation (Ask, or Enter in the message box); the first answer also without
        # memory only when asked for. The handler shows the question and "Thinking…" first, then streams the answer
        # over it; a question the queue refuses (full, or this visitor's cap) runs no handler and leaves the view
        # and the message box as they were.
        example_hint = guidance.example_concepts_hint([n for n, _ in examples.concepts], examples.questions)

        def hint(session, question, request: gr.Request = None):
            # About the session the question is asked in: the one a tab that outlived its own takes back from
            # another tab; none when the tab's session ended (the question is refused with a sentence that says so).
            session, ended = sessions.peek(session, request)
            if not ended:
                example_hint(session, question)

        img.compare.change(lambda on: gr.Textbox(visible=on), img.compare, img.plain, queue=False, **PRIVATE)
        img_triggers = [img.ask.click, img.question.submit]
        gr.on(img_triggers, hint, [session, img.question], None, **PRIVATE)  # queued: it shows a message
        gr.on(img_triggers, None, js=scroll_to_js("image-chat"), **PRIVATE)
        asking = gr.on(
            img_triggers,
            act.chat_image,
            [session, img.image, img.question, img.compare],
            [session, img.chat, img.question, img.plain, img.details, img.matches],
            **answer_events,
            **PRIVATE,
        )
        # A message refused because the tab's session had ended (`Sessions.rejoin`): the panel shows that nothing
        # is left. The browser's token stays as it is (a refusal adds nothing, and another tab's session may be
        # the one it names); it learns the new session's once something is added there.
        then_refresh(asking, after="failure", refresh=act.panel_if_told, keep_token=False)
        stopping = functools.partial(_stops, _on_tab(act.stop_answer, "image"), session, asking)
        stopping(img.stop.click).then(
            functools.partial(guidance.mark_stopped_in_chat, tab="image"),
            [session, img.chat],
            img.chat,
            **CHEAP,
            **PRIVATE,
        )
        # A new photo, "New conversation" or the chat view's own clear button ends the tab's conversation and stops
        # its answer (a reload putting the conversation's photo back is no new photo: `photo_changed`).
        ended_image = [session, img.chat, img.plain, img.details, img.matches]
        for ending in (img.new.click, img.chat.clear):
            stopping(ending).then(_on_tab(act.new_conversation, "image"), session, ended_image, **CHEAP, **PRIVATE)
        # (Only a new photo stops the answer: a reload in another browser tab puts the conversation's photo back.)
        _stops(act.photo_changing, [session, img.image], asking, img.image.change).then(
            act.photo_changed, [session, img.image], ended_image, **CHEAP, **PRIVATE
        )

        # Ask about a video: a conversation
        vid_triggers = [vid.ask.click, vid.question.submit]
        gr.on(vid_triggers, hint, [session, vid.question], None, **PRIVATE)
        gr.on(vid_triggers, None, js=scroll_to_js("video-chat"), **PRIVATE)
        asking = gr.on(
            vid_triggers,
            act.chat_video,
            [session, vid.video, vid.question],
            [session, vid.frames, vid.chat, vid.question, vid.details],
            **answer_events,
            **PRIVATE,
        )
        then_refresh(asking, after="failure", refresh=act.panel_if_told, keep_token=False)  # as in the image tab
        stopping = functools.partial(_stops, _on_tab(act.stop_answer, "video"), session, asking)
        stopping(vid.stop.click).then(
            functools.partial(guidance.mark_stopped_in_chat, tab="video"),
            [session, vid.chat],
            vid.chat,
            **CHEAP,
            **PRIVATE,
        )
        for ending in (vid.new.click, vid.video.change, vid.chat.clear):
            stopping(ending).then(
                _on_tab(act.new_conversation, "video"),
                session,
                [session, vid.chat, vid.frames, vid.details],
                **CHEAP,
                **PRIVATE,
            )

        # The HTTP API of the ask tabs: each /ask_ call starts a conversation, /follow_up continues the last one
        with gr.Column(visible=False):
            hidden = SimpleNamespace(
                ask_image=gr.Button(),
                ask_video=gr.Button(),
                follow_up=gr.Button(),
                question=text_input(what="the question", label="Question"),
                answer=gr.Textbox(label="Answer"),
            )
        hidden.ask_image.click(
            act.ask_image,
            [session, img.image, img.question, img.compare],
            [session, hidden.answer, img.plain, img.details, img.matches],
            api_name="ask_image",
            api_description=api.ASK_IMAGE,
            **answer_events,
        )
        hidden.ask_video.click(
            act.ask_video,
            [session, vid.video, vid.question],
            [session, vid.frames, hidden.answer, vid.details],
            api_name="ask_video",
            api_description=api.ASK_VIDEO.format(frames=limits.video_num_frames),
            **answer_events,
        )
        hidden.follow_up.click(
            act.follow_up,
            [session, hidden.question],
            [session, hidden.answer],
            api_name="follow_up",
            api_description=api.FOLLOW_UP,
            **answer_events,
        )

        # Your concepts: a reload (or another tab of this browser) takes over the session its token names, with
        # its conversations shown. One chain, not two load events: each returns the session, and the second to
        # finish would win.
        resumed = demo.load(sessions.resume, [session, browser_token], [session, browser_token], **CHEAP, **PRIVATE)
        resumed.then(
            act.restored_conversations, session, [img.chat, img.image, vid.chat, vid.frames], **CHEAP, **PRIVATE
        )
        then_refresh(
            resumed.then(
                act.list_concepts,
                session,
                [session, mine.records],
                api_name="list_concepts",
                api_description=api.LIST_CONCEPTS,
                **CHEAP,
            ),
            # The page's own loading leaves the status line alone: a panel action the visitor made meanwhile keeps
            # its sentence (it would be taken or blanked by this refresh).
            status=False,
        ).then(None, js=PAGE_READY_JS, **PRIVATE)
        # Another tab of this browser may have changed the concepts: a tab shown again brings its panel up to date.
        mine.refresh.click(act.panel_if_changed, [session, mine.records, mine.summary], panel, **CHEAP, **PRIVATE).then(
            None, mine.summary, None, js=TRACK_CONCEPTS_JS, **PRIVATE
        )
        # A removed concept is not used again: the conversations that knew it end, and their chat views empty.
        then_refresh(
            mine.remove.click(
                act.remove_concept,
                [session, mine.to_remove],
                [session, mine.records],
                api_name="remove_concept",
                api_description=api.REMOVE_CONCEPT,
                **CHEAP,
            )
        ).then(act.shown_conversations, session, [img.chat, vid.chat], **CHEAP, **PRIVATE)
        confirm = [mine.clear, mine.confirm_row]
        mine.clear.click(lambda: (gr.Button(visible=False), gr.Row(visible=True)), None, confirm, **CHEAP, **PRIVATE)
        mine.cancel_clear.click(
            lambda: (gr.Button(visible=True), gr.Row(visible=False)), None, confirm, **CHEAP, **PRIVATE
        )
        then_refresh(
            mine.confirm_clear.click(act.clear_concepts, session, [session, mine.records], **CHEAP, **PRIVATE)
        ).then(lambda: (gr.Button(visible=True), gr.Row(visible=False)), None, confirm, **CHEAP, **PRIVATE).then(
            act.shown_conversations, session, [img.chat, vid.chat], **CHEAP, **PRIVATE
        )
        exporting = mine.export.click(
            act.export_concepts,
            session,
            [session, mine.exported],
            api_name="export_concepts",
            api_description=api.EXPORT_CONCEPTS,
            **CHEAP,
        )
        exporting.then(
            act.after_export, [session, mine.exported], [mine.exported, mine.status, mine.summary], **CHEAP, **PRIVATE
        ).then(None, mine.summary, None, js=TRACK_CONCEPTS_JS, **PRIVATE)
        importing = mine.import_button.upload(
            act.import_concepts,
            [session, mine.import_button],
            [session, mine.records],
            api_name="import_concepts",
            api_description=api.IMPORT_CONCEPTS,
            **concept_events,
        )
        then_refresh(importing)
        mine.import_button.upload(None, js=CLEAR_IMPORT_PICKER_JS, **PRIVATE)
        importing.success(guidance.suggest_export, session, None, **PRIVATE)
        # A refused import runs none of the events chained with `then` (the browser chains them on success): the
        # status line would keep the sentence of an earlier action ("Imported 4 concepts.") next to the error.
        importing.failure(lambda: "", None, mine.status, **CHEAP, **PRIVATE)
        demo.load(None, js=ON_LOAD_JS, **PRIVATE)
        api.document_examples(examples, intro=intro, img=img, vid=vid, mine=mine, follow_up=hidden.question)
    api.photos_are_required(demo, intro.photos.label)
    for block in demo.blocks.values():
        refuse_links(block)  # a file payload that names a URL is refused, never downloaded
    refuse_host_files(demo)  # no payload may name a file of the server, whichever copy of a component reads it
    api.answer_malformed_calls(demo)  # a call Gradio cannot read gets a sentence; its values stay out of the log
    demo.on_close.append(act.close)  # the answer scheduler's worker ends with the app (a new launch starts another)
    # api_open=False: an event that uses the queue can be reached only through it (Gradio leaves its
    # direct REST route open everywhere but on HF Spaces, which would let a script skip the queue's limits).
    demo.queue(max_size=s.queue_max_size, api_open=False)
    limit_requests_per_visitor(demo, (CONCEPT_GROUP, ANSWER_GROUP), s.max_waiting_requests_per_visitor)
    return demo


def launch_options(settings, space_settings=None) -> dict:
    """The `demo.launch` arguments that enforce the limits on the server (uploads, sessions, links): the
    engine's `settings` (`ego.Settings`) and the Space's `space_settings` (default: SpaceSettings())."""
    from fastapi import Depends
    from starlette.middleware import Middleware

    from space.api import known_endpoints_only
    from space.links import RefuseFileLinks
    from space.settings import DEFAULT_SPACE_SETTINGS
    from space.uploads import UploadQuota
    from space.visitors import NewSessionQuota

    space = space_settings or DEFAULT_SPACE_SETTINGS
    # One cap for every file Gradio takes in, the larger of a photo's or clip's and a concept file's (Gradio
    # cannot tell them apart); a photo or clip over its own limit is refused with a sentence once it is in.
    largest_file_bytes = max(settings.max_upload_bytes, space.max_concept_file_bytes)
    quota = Middleware(UploadQuota, max_bytes=space.max_cache_bytes, upload_bytes=largest_file_bytes)
    sessions = Middleware(
        NewSessionQuota,
        max_new=space.max_new_sessions_per_address_per_hour,
        max_body_bytes=space.max_request_body_bytes,
        remember=2 * space.max_sessions,
    )
    return dict(
        max_file_size=largest_file_bytes,
        state_session_capacity=space.max_sessions,
        app_kwargs={
            "middleware": [Middleware(RefuseFileLinks), quota, sessions],
            # A call naming an endpoint the app does not have: a 404 sentence, not a traceback in the log.
            "dependencies": [Depends(known_endpoints_only)],
        },
        css=CSS,
    )


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------
def _on_tab(action, tab: str):
    """`action(session, tab=tab, request=...)` as a handler of one tab's event: a function of its own, whose
    annotations Gradio reads to hand it the request (it hands none to a `functools.partial`)."""

    def handler(session, request: gr.Request = None):
        return action(session, tab=tab, request=request)

    return handler


def _stops(stop_answer, inputs, asking, trigger):
    """`trigger` (Stop, or what ends a conversation) ends the tab's answer from within (`Actions.stop_answer` on
    `inputs`: it ends as far as it had come, and its handler returns), then cancels the `asking` event, which then
    only removes a message still waiting in the queue. Cancelling an event that is still running races with
    Gradio's own end of it, and the page could show "Error" over the tab's boxes. Returns the dependency, for
    `.then`."""
    return trigger(stop_answer, inputs, None, **CHEAP, **PRIVATE).then(None, cancels=[asking], **PRIVATE)


def _examples(shown: str, *args, **kwargs) -> gr.Examples:
    """`gr.Examples`, and a tap on one brings the box it fills (`shown`, an elem_id) into view: on a phone the
    examples sit far below it, and nothing else on screen would change."""
    examples = gr.Examples(*args, **kwargs)
    examples.dataset.click(None, js=scroll_to_js(shown), **PRIVATE)
    return examples


def _hint(text: str) -> None:
    gr.Markdown(text, elem_classes="hint", latex_delimiters=[])


def _introduce_tab(s, examples) -> SimpleNamespace:
    from space.api import offer_images_only

    with gr.Tab("Introduce", id="introduce"):
        with gr.Row():
            with gr.Column():
                name = text_input(
                    what="the concept's name",
                    label="Name",
                    elem_id="concept-name",
                    placeholder="Chelsea",
                    max_length=s.max_name_chars,
                    info=f"Up to {s.max_name_chars} characters, unique among your concepts.",
                )
                # No `file_types`: Gradio would judge a photo by its file name; the handler reads its content.
                photos = gr.Gallery(
                    label=f"Reference photos (1 to {s.max_references_per_concept})",
                    type="filepath",
                    interactive=True,
                    columns=5,
                    height=220,
                    object_fit="cover",
                )
                offer_images_only(photos)  # the browser's file picker still offers images only
                _hint(
                    f"{IMAGE_FORMATS_TEXT}; up to {s.max_upload_mb} MiB and "
                    f"{s.max_image_pixels / 1e6:g} megapixels each. One clear photo is enough; more views help."
                )
                with gr.Accordion("Advanced (reset after each concept)", open=False):
                    keywords = text_input(
                        what="the keywords",
                        phrases=True,
                        label="Keywords",
                        placeholder="tabby, green eyes, white paws",
                        info=f"Comma-separated words whose attention picks the tokens (at most {s.max_keywords}, "
                        f"{s.max_keywords_chars} characters). Empty: the model describes the photo.",
                    )
                    auto_size = gr.Checkbox(value=True, label="Let the model estimate the size")
                    size_pct = gr.Slider(
                        1,
                        100,
                        value=25,
                        step=1,
                        interactive=False,
                        label="Subject size (% of each photo)",
                        info=f"Tokens kept per photo: about size × tokens / 100, at most {s.k_cap_tokens}.",
                    )
                with gr.Row():
                    button = gr.Button("Introduce", variant="primary")
                    examples_button = gr.Button("Load the example concepts")
            with gr.Column():  # on a phone this column comes right under the buttons, before the examples
                report = gr.Markdown(label="Introduction report", latex_delimiters=[], elem_id="report")
                patches = gr.Gallery(
                    label="Kept visual tokens (highlighted)",
                    elem_id="patches",
                    columns=2,
                    height="auto",
                    interactive=False,
                    object_fit="contain",
                )
                with gr.Accordion("Token importance heat maps (Eq. 3)", open=False):
                    heats = gr.Gallery(
                        label="Token importance heat maps",
                        show_label=False,
                        elem_id="heats",
                        columns=2,
                        height="auto",
                        interactive=False,
                        object_fit="contain",
                    )
        if examples.concepts:
            _examples(
                "concept-name",
                [[n, p] for n, p in examples.concepts],
                [name, photos],
                cache_examples=False,
                label="Example concepts",
                elem_id="examples-concepts",
            )
    return SimpleNamespace(
        name=name,
        photos=photos,
        keywords=keywords,
        auto_size=auto_size,
        size_pct=size_pct,
        button=button,
        examples_button=examples_button,
        report=report,
        patches=patches,
        heats=heats,
    )


def _question_box(s, placeholder: str, elem_id: str) -> gr.Textbox:
    # One line that grows to four as the question wraps: on a one-line box Gradio sends Enter as "submit".
    return text_input(
        what="the question",
        label="Question",
        lines=1,
        max_lines=4,
        max_length=s.max_question_chars,
        placeholder=placeholder,
        elem_id=elem_id,
        info=f"Up to {s.max_question_chars} characters. Enter asks.",
    )


def _ask_buttons() -> tuple[gr.Button, gr.Button]:
    with gr.Row():
        return gr.Button("Ask", variant="primary"), gr.Button("Stop", variant="stop")


def _answer_box(label: str, elem_id: str, **kwargs) -> gr.Textbox:
    return gr.Textbox(label=label, elem_id=elem_id, lines=6, max_lines=14, interactive=False, **kwargs)


def _chat_view(elem_id: str) -> tuple[gr.Chatbot, gr.Button]:
    """The conversation so far (visitor text shown as text: no Markdown, no HTML) and its "New conversation"."""
    view = gr.Chatbot(
        label="Conversation (with your concepts)",
        elem_id=elem_id,
        height=360,
        render_markdown=False,
        latex_delimiters=[],
        feedback_options=None,
        buttons=["copy"],
        placeholder="Ask a first question; then follow-ups about the same photo or clip.",
    )
    return view, gr.Button("New conversation", size="sm", elem_id=f"{elem_id}-new")


def _image_tab(s, examples) -> SimpleNamespace:
    with gr.Tab("Ask: image", id="image"):
        with gr.Row():
            with gr.Column():
                image = photo_input(label="Photo", sources=["upload", "clipboard"], height=320, elem_id="image-photo")
                _hint(
                    f"{IMAGE_FORMATS_TEXT}; up to {s.max_upload_mb} MiB and {s.max_image_pixels / 1e6:g} "
                    'megapixels. No photo: ask about your concepts themselves ("What colour are Chelsea\'s eyes?").'
                )
                question = _question_box(s, "Is Chelsea in this photo?", "image-question")
                compare = gr.Checkbox(label="Also answer the first question without memory (the plain model)")
                ask, stop = _ask_buttons()
            with gr.Column():
                chat, new = _chat_view("image-chat")
                plain = _answer_box("First answer without memory", "plain-answer", visible=False)
                with gr.Accordion("Where each concept's memory matches the photo", open=False):
                    _hint(
                        "Brighter: that visual token of the photo looks more like one of the concept's memory "
                        "tokens (cosine similarity, relative within each picture). A hint of where the model "
                        "may see the concept, not a detection."
                    )
                    matches = gr.Gallery(
                        label="Where each concept matches",
                        show_label=False,
                        elem_id="matches",
                        columns=2,
                        height="auto",
                        interactive=False,
                        object_fit="contain",
                    )
                details = gr.JSON(label="What went into the context")
        if examples.image_questions:
            _examples(
                "image-question",
                [list(e) for e in examples.image_questions],
                [image, question],
                cache_examples=False,
                elem_id="examples-image-questions",
                label="Example questions (about the example concepts: load them on the Introduce tab)",
            )
        if examples.text_questions:  # clicking one also clears the photo: the question is about the concepts
            _examples(
                "image-question",
                [[q] for q in examples.text_questions],
                [question],
                [image, question],
                fn=lambda text: (None, text),
                run_on_click=True,
                cache_examples=False,
                elem_id="examples-text-questions",
                label="Questions without a photo (load the example concepts first)",
                **PRIVATE,
            )
    return SimpleNamespace(
        image=image,
        question=question,
        compare=compare,
        ask=ask,
        stop=stop,
        chat=chat,
        new=new,
        plain=plain,
        details=details,
        matches=matches,
    )


def _video_tab(s, examples) -> SimpleNamespace:
    with gr.Tab("Ask: video", id="video"):
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="Clip", sources=["upload"], height=320)
                _hint(
                    f"Up to {s.max_video_duration_s:g} s and {s.max_upload_mb} MiB; "
                    f"{s.video_num_frames} frames are sampled evenly."
                )
                question = _question_box(s, "Is Chelsea in this video?", "video-question")
                ask, stop = _ask_buttons()
            with gr.Column():
                chat, new = _chat_view("video-chat")
                frames = gr.Gallery(
                    label="Frames the model sees",
                    elem_id="frames",
                    columns=4,
                    height="auto",
                    interactive=False,
                    object_fit="contain",
                )
                details = gr.JSON(label="What went into the context")
        if examples.video_questions:
            _examples(
                "video-question",
                [list(e) for e in examples.video_questions],
                [video, question],
                cache_examples=False,
                elem_id="examples-video-questions",
                label="Example questions (about the example concepts: load them on the Introduce tab)",
            )
    return SimpleNamespace(
        video=video, question=question, ask=ask, stop=stop, frames=frames, chat=chat, new=new, details=details
    )


def _concepts_panel(s, limits) -> SimpleNamespace:
    from space import views

    gr.Markdown("## Your concepts")
    summary = gr.Markdown(latex_delimiters=[])
    # What the last Remove, Clear, Export or Import did, or why it could not: the browser shows no error of an
    # event that skips the queue, so these events say it here.
    status = gr.Markdown(latex_delimiters=[], elem_id="panel-status")
    cards = gr.Gallery(
        show_label=False,
        elem_id="cards",
        columns=2,
        fit_columns=False,
        height=240,
        interactive=False,
        object_fit="cover",
        allow_preview=False,
    )
    # Clicked by the page itself when the tab is shown again (space.page.ON_LOAD_JS); in the page, never seen.
    refresh = gr.Button("Bring the concept panel up to date", visible="hidden", elem_id="panel-refresh")
    with gr.Row():
        to_remove = gr.Dropdown(label="Concept", choices=[], allow_custom_value=True, scale=2)
        remove = gr.Button("Remove", scale=1, size="sm")
    clear = gr.Button("Clear all", size="sm")
    with gr.Row(visible=False) as confirm_row:
        confirm_clear = gr.Button("Yes, remove all my concepts", variant="stop", size="sm")
        cancel_clear = gr.Button("Keep them", size="sm")
    export = gr.Button("Export to a file", size="sm")
    exported = gr.File(label="Your concept file", interactive=False, visible=False)
    import_button = gr.UploadButton("Import a concept file", file_types=[".safetensors"], type="filepath", size="sm")
    with gr.Accordion("Details (JSON)", open=False):
        records = gr.JSON(label="Your concepts", show_label=False)
    _hint(
        f"Your concepts live in this server's memory: a reload or another tab of this browser brings them "
        f"back, and they are deleted {views.duration(s.session_ttl_s)} after your last action here (sooner if the "
        f"server restarts or is very busy); uploads leave the server within "
        f"{views.duration(s.upload_max_age_s + s.upload_cleanup_interval_s)}. Export your concepts to keep "
        f"them (and import them here: a file of at most {s.max_concept_file_mb:g} MiB and "
        f"{limits.max_concept_file_concepts} concepts). At most {s.max_concepts_per_session} concepts."
    )
    return SimpleNamespace(
        summary=summary,
        status=status,
        cards=cards,
        to_remove=to_remove,
        remove=remove,
        clear=clear,
        confirm_row=confirm_row,
        confirm_clear=confirm_clear,
        cancel_clear=cancel_clear,
        export=export,
        exported=exported,
        import_button=import_button,
        records=records,
        refresh=refresh,
    )


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    from ego import options
    from ego.presets import CPU_DEFAULT_PRESET, DEFAULT_PRESET, PRESETS
    from ego.settings import DECODING_MODES

    parser = argparse.ArgumentParser(description="Ego: the Gradio Space.")
    parser.add_argument(
        "--model",
        default=os.environ.get("EGO_MODEL") or None,
        help=f"a preset ({', '.join(PRESETS)}), a Hub id or a local folder (env EGO_MODEL; "
        f"default {DEFAULT_PRESET} with a CUDA GPU, {CPU_DEFAULT_PRESET} without one)",
    )
    options.add_quantization(parser, env="EGO_QUANTIZATION")
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        help="address to listen on (env GRADIO_SERVER_NAME; default 127.0.0.1: this machine only)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=os.environ.get("GRADIO_SERVER_PORT") or "7860",
        help="port (env GRADIO_SERVER_PORT; default 7860)",
    )
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    options.add_protocol(parser, env="EGO_PROTOCOL")
    parser.add_argument(
        "--decoding",
        type=str.lower,
        choices=DECODING_MODES,
        default=os.environ.get("EGO_DECODING") or "auto",
        help="auto: compiled on a GPU (compiled once at the first request), eager on a CPU (env EGO_DECODING)",
    )
    args = parser.parse_args(argv)
    options.check_environment(
        parser,
        args,
        {
            "quantization": ("EGO_QUANTIZATION", options.QUANTIZATION_CHOICES),
            "protocol": ("EGO_PROTOCOL", options.PROTOCOLS),
            "decoding": ("EGO_DECODING", DECODING_MODES),
        },
    )
    return args


def _port(value: str) -> int:
    """A TCP port from --port or GRADIO_SERVER_PORT, or a sentence naming both."""
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port (1 to 65535; from --port or GRADIO_SERVER_PORT)")
    return port


WEIGHTS_NOTE = {"auto": "4-bit", "4bit": "4-bit", "8bit": "8-bit", "int4": "4-bit int4", "fp8": "FP8", "none": "bf16"}
"""How the header names the weights of the default model on a GPU, per --quantization."""


def choose_model(model: str | None, quantization: str = "auto") -> tuple[str, str]:
    """(the model to serve, a note for the header): the one named, else the default for this machine."""
    from ego.presets import DEFAULT_PRESET, default_preset

    if model:
        return model, ""
    chosen = default_preset()
    if chosen == DEFAULT_PRESET:
        return chosen, f" ({WEIGHTS_NOTE[quantization]} on this GPU)"
    return chosen, (
        " (a small model: this server has no GPU, and the default 7B model would take minutes per answer on its CPU)"
    )


def refuse_quantization(quantization: str | None, *, zero_gpu: bool) -> None:
    """Stop at start, not at the first visitor, with a quantization this machine cannot load."""
    import torch

    from ego.quantization import check_supported, for_device

    if zero_gpu and quantization in ("int4", "fp8"):
        raise SystemExit(
            f"--quantization {quantization} cannot run on ZeroGPU: the model is quantized while it loads, at start, "
            "before a GPU is attached. Use none (bf16, ZeroGPU's default here) or 4bit."
        )
    device = "cuda" if zero_gpu or torch.cuda.is_available() else "cpu"
    try:
        check_supported(for_device(quantization, device), device)
    except (ValueError, ImportError) as error:
        raise SystemExit(str(error)) from None


def main(argv=None) -> None:
    from space.zerogpu import on_zero_gpu, zero_gpu_requested_without_spaces

    zero_gpu = on_zero_gpu()
    if zero_gpu:
        import spaces  # noqa: F401 -- before torch: it sets up ZeroGPU's CUDA emulation in this process

        # transformers loads weights in a pool of threads, where ZeroGPU's emulation of CUDA does not reach (it
        # patches the main thread): the load at start would fail. One thread, then.
        os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")
    elif zero_gpu_requested_without_spaces():
        logging.getLogger("ego.space").warning(
            "SPACES_ZERO_GPU is set but the `spaces` package is not installed: running as on a dedicated GPU. "
            "Add `spaces` to requirements.txt for ZeroGPU (docs/space.md)."
        )

    from ego import Ego, options
    from ego.memory import local_model_id
    from ego.presets import check_model_name

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    settings = options.protocol_settings(args.protocol).replace(decoding=args.decoding)
    quantization = options.quantization(args.quantization)
    if quantization == "auto":
        quantization = settings.model_quantization  # --protocol paper: None (bf16), and the header says so
    if zero_gpu:
        settings = settings.replace(decoding="eager")  # ZeroGPU does not support torch.compile
        if quantization == "auto":
            quantization = None  # bf16: 4-bit quantization would run at start on the CPU, under the emulation
    refuse_quantization(quantization, zero_gpu=zero_gpu)
    model, model_note = choose_model(args.model, quantization or "none")
    model = str(Path(model).expanduser()) if model.startswith("~") else model
    try:
        check_model_name(model)  # a mistyped preset stops the app now, not every visitor's first request
    except ValueError as error:
        raise SystemExit(str(error)) from None
    factory = functools.partial(
        Ego.from_pretrained, model, quantization=quantization, **({"device": "cuda"} if zero_gpu else {})
    )
    # On ZeroGPU the model is loaded now, onto "cuda", so that launch packs it for the GPU workers.
    demo = build_demo(
        factory(settings=settings) if zero_gpu else factory,
        settings=settings,
        model_name=local_model_id(model) if Path(model).is_dir() else model,  # no server path on the page
        model_note=model_note,
    )
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options(settings))


if __name__ == "__main__":
    main()
