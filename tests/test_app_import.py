"""app.py: importing it loads no model library; its command line and launch settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ["torch", "transformers", "torchvision", "safetensors", "av", "ego.engine", "ego.memory", "space.actions"]


def test_import_app_loads_nothing_heavy():
    """Importing app (what a Space does first) imports no model library: the model and its libraries load with the
    first visitor (`space.loading`). How long the import takes is not a test's concern."""
    probe = f"import json, sys\nimport app\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert heavy == [], f"import app loaded {heavy}"


def test_command_line_defaults_and_environment(monkeypatch):
    import app

    for name in ("EGO_MODEL", "EGO_QUANTIZATION", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    args = app.parse_args([])
    assert (args.model, args.quantization, args.host, args.port, args.share) == (
        None,
        "auto",
        "127.0.0.1",
        7860,
        False,
    )  # no model named: the machine decides (below)

    monkeypatch.setenv("EGO_MODEL", "tiny-qwen2-vl")
    monkeypatch.setenv("EGO_QUANTIZATION", "none")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    args = app.parse_args([])
    assert (args.model, args.quantization, args.host) == ("tiny-qwen2-vl", "none", "0.0.0.0")
    assert app.parse_args(["--model", "tiny-qwen3-vl", "--port", "9000"]).port == 9000


@pytest.mark.parametrize(
    "variable, value",
    [
        ("EGO_PROTOCOL", "papr"),
        ("EGO_DECODING", "fast"),
        ("EGO_QUANTIZATION", "nf4"),
        ("GRADIO_SERVER_PORT", "abc"),
        ("GRADIO_SERVER_PORT", "70000"),
    ],
)
def test_a_mistyped_environment_variable_stops_the_app_with_a_sentence(monkeypatch, capsys, variable, value):
    """argparse checks what is typed after a flag, not a default taken from the environment: those are checked
    too, and the sentence names the variable."""
    import app

    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as stopped:
        app.parse_args([])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (variable if variable.startswith("EGO_") else "GRADIO_SERVER_PORT") in error and "Traceback" not in error


def test_environment_values_are_read_in_any_case(monkeypatch):
    import app

    monkeypatch.setenv("EGO_PROTOCOL", "Paper")
    monkeypatch.setenv("EGO_DECODING", "Eager")
    monkeypatch.setenv("EGO_QUANTIZATION", "None")
    args = app.parse_args([])
    assert (args.protocol, args.decoding, args.quantization) == ("paper", "eager", "none")
    assert app.parse_args(["--decoding", "COMPILED"]).decoding == "compiled"
    for name in ("EGO_PROTOCOL", "EGO_DECODING", "EGO_QUANTIZATION", "GRADIO_SERVER_PORT", "GRADIO_SERVER_NAME"):
        monkeypatch.setenv(name, "")  # set but blank, as container files often leave them: unset
    args = app.parse_args([])
    assert (args.protocol, args.decoding, args.quantization, args.port, args.host) == (
        "ours",
        "auto",
        "auto",
        7860,
        "127.0.0.1",
    )


def test_main_launches_with_the_limits_and_loads_the_model_lazily(monkeypatch):
    import app
    from ego import DEFAULT_SETTINGS, Ego
    from space.settings import SpaceSettings

    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.update(kwargs, demo=self))
    monkeypatch.setattr(Ego, "from_pretrained", classmethod(lambda cls, *a, **k: seen.setdefault("loaded", True)))
    app.main(["--model", "tiny-qwen2.5-vl"])
    assert "loaded" not in seen  # the model waits for its first visitor
    assert seen["server_name"] == "127.0.0.1" and seen["share"] is False
    # Gradio's one cap on a file is the larger of a photo's and a concept file's: exports can be imported again
    largest_file_bytes = max(DEFAULT_SETTINGS.max_upload_mb, SpaceSettings().max_concept_file_mb) * 1024 * 1024
    assert seen["max_file_size"] == largest_file_bytes > DEFAULT_SETTINGS.max_upload_mb * 1024 * 1024
    assert seen["state_session_capacity"] == SpaceSettings().max_sessions
    links, quota, sessions = seen["app_kwargs"]["middleware"]
    assert (links.cls.__name__, quota.cls.__name__, sessions.cls.__name__) == (
        "RefuseFileLinks",
        "UploadQuota",
        "NewSessionQuota",
    )
    assert sessions.kwargs == {
        "max_new": SpaceSettings().max_new_sessions_per_address_per_hour,
        "max_body_bytes": SpaceSettings().max_request_body_mb * 1024 * 1024,
        "remember": 2 * SpaceSettings().max_sessions,
    }
    assert quota.kwargs == {
        "max_bytes": SpaceSettings().max_cache_mb * 1024 * 1024,
        "upload_bytes": largest_file_bytes,
    }
    assert seen["demo"]._queue.max_size == SpaceSettings().queue_max_size
    assert not list((ROOT / "space").glob("*.pyi")), "building the demo wrote files next to the code"


@pytest.mark.parametrize("cuda", [True, False])
def test_with_no_model_named_the_app_serves_the_machine_default_and_says_so(monkeypatch, cuda):
    import torch

    import app
    from ego import CPU_DEFAULT_PRESET, DEFAULT_PRESET, Ego

    monkeypatch.delenv("EGO_MODEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.update(demo=self))
    monkeypatch.setattr(Ego, "from_pretrained", classmethod(lambda cls, *a, **k: seen.update(args=a, kwargs=k)))
    app.main([])
    header = next(
        block.value
        for block in seen["demo"].blocks.values()
        if isinstance(block, gr.Markdown) and str(block.value).startswith("# Ego")
    )
    expected = DEFAULT_PRESET if cuda else CPU_DEFAULT_PRESET
    assert f"model: `{expected}`" in header
    assert ("no GPU" in header) is (not cuda)
    assert "loaded" not in seen and "args" not in seen  # still lazily loaded: nothing downloaded
    # A named model is served as named, whatever the machine.
    assert app.choose_model("tiny-qwen2-vl") == ("tiny-qwen2-vl", "")
    if cuda:  # the header names the weights as they are loaded
        assert "(4-bit on this GPU)" in header
        assert app.choose_model(None, "none")[1] == " (bf16 on this GPU)"
        # The paper's protocol loads bf16 ("auto" is its settings' None), and the header says bf16.
        app.main(["--protocol", "paper"])
        paper = next(
            block.value
            for block in seen["demo"].blocks.values()
            if isinstance(block, gr.Markdown) and str(block.value).startswith("# Ego")
        )
        assert "(bf16 on this GPU)" in paper


def test_the_app_cannot_be_built_with_settings_that_disagree_with_its_engine():
    from conftest import tiny_engine

    import app
    from ego import DEFAULT_SETTINGS

    engine = tiny_engine("qwen2.5-vl")
    with pytest.raises(ValueError, match="with_settings"):
        app.build_demo(engine, settings=DEFAULT_SETTINGS.replace(max_question_chars=10))
    with pytest.raises(TypeError, match="SpaceSettings"):
        app.build_demo(engine, DEFAULT_SETTINGS)  # the engine's settings where the Space's belong


def test_a_space_that_batches_its_visitors_compiles_the_batched_step_at_warm_up(monkeypatch):
    from conftest import tiny_engine

    import app
    import space.loading
    from space.settings import SpaceSettings

    made = []

    class Recorded(space.loading.LazyEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(space.loading, "LazyEngine", Recorded)
    engine = tiny_engine("qwen2.5-vl")
    app.build_demo(engine, SpaceSettings(answer_batch_max_size=1))
    app.build_demo(engine, SpaceSettings(answer_batch_max_size=4))
    assert [lazy.warm_up_batched for lazy in made] == [False, True]


@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_a_quantization_this_machine_cannot_load_stops_the_app_at_start(monkeypatch, quantization):
    import torch

    import app
    from ego import Ego

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    started = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: started.append("launch"))
    monkeypatch.setattr(Ego, "from_pretrained", classmethod(lambda cls, *a, **k: started.append("load")))
    with pytest.raises(SystemExit, match="runs only on a CUDA GPU"):
        app.main(["--model", "tiny-qwen2.5-vl", "--quantization", quantization])
    assert started == []
    # On ZeroGPU the model is quantized at start, before a GPU is attached: refused whatever the machine.
    with pytest.raises(SystemExit, match="cannot run on ZeroGPU.*none"):
        app.refuse_quantization(quantization, zero_gpu=True)
    app.refuse_quantization("4bit", zero_gpu=False)  # bitsandbytes NF4 also loads on a CPU


def test_a_mistyped_model_stops_the_app_at_start(monkeypatch):
    """Not at every visitor's first request, after the Space was launched."""
    import app

    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: pytest.fail("launched with a mistyped model"))
    with pytest.raises(SystemExit, match="did you mean qwen2.5-vl-7b"):
        app.main(["--model", "qwen25-vl-7b"])


def test_a_local_model_is_named_on_the_page_without_its_path(monkeypatch, tmp_path):
    """The header names a local checkpoint as concept files do (`local_model_id`): the server's path stays out."""
    import app
    from ego import Ego
    from ego.memory import local_model_id

    folder = tmp_path / "private" / "acme-finetune"
    folder.mkdir(parents=True)
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.update(demo=self))
    monkeypatch.setattr(Ego, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("loaded at start")))
    app.main(["--model", str(folder)])
    page = " ".join(str(b.value) for b in seen["demo"].blocks.values() if isinstance(b, gr.Markdown))
    assert local_model_id(folder) in page and str(tmp_path) not in page


def test_every_handler_that_takes_the_request_is_handed_it():
    """Gradio hands `gr.Request` only to a handler whose annotations it can read (a function or method; not a
    `functools.partial`): one that takes a request and is not handed it would act on the tab's own state alone, never
    on the session its browser holds (`space.resume`)."""
    import inspect

    from conftest import tiny_engine
    from gradio.utils import get_type_hints

    import app

    demo = app.build_demo(tiny_engine("qwen2.5-vl"))
    taking = [
        fn.fn for fn in demo.fns.values() if fn.fn is not None and "request" in inspect.signature(fn.fn).parameters
    ]
    assert len(taking) > 10 and all(get_type_hints(handler).get("request") is gr.Request for handler in taking)
    made = [handler for handler in taking if getattr(handler, "__name__", "") == "handler"]  # by `app._on_tab`
    bound = [dict(zip(h.__code__.co_freevars, (cell.cell_contents for cell in h.__closure__))) for h in made]
    per_tab = {(names["action"].__name__, names["tab"]) for names in bound}
    assert per_tab == {(action, tab) for action in ("new_conversation", "stop_answer") for tab in ("image", "video")}
