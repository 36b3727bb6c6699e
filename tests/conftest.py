"""Test setup: offline, two threads, no network beyond loopback, tiny engines shared per session."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl3"]

_real_connect = socket.socket.connect


def _loopback_only(sock, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None:
        try:
            allowed = ipaddress.ip_address(host).is_loopback
        except ValueError:
            allowed = host == "localhost"
        if not allowed:
            raise OSError(f"tests must not touch the network (tried {host})")
    return _real_connect(sock, address)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection that is not to loopback fails the test that made it."""
    monkeypatch.setattr(socket.socket, "connect", _loopback_only)


_ENGINES: dict = {}


def tiny_engine(family: str, **kwargs):
    """One tiny engine per (family, options) for the whole session (building one takes ~0.2 s)."""
    from ego import Ego

    key = (family, tuple(sorted(kwargs.items())))
    if key not in _ENGINES:
        _ENGINES[key] = Ego.tiny(family, **kwargs)
    return _ENGINES[key]


def spy_on_generate(monkeypatch, engine) -> list[dict]:
    """Until `monkeypatch` is undone, `engine.model.generate` records the keyword arguments of every call, then runs."""
    calls, original = [], engine.model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(engine.model, "generate", spy)
    return calls


def model_is_free(engine, *, within_s: float) -> bool:
    """Whether another caller gets the model (`engine.exclusive_use`) within `within_s` seconds."""
    entered = threading.Event()

    def use():
        with engine.exclusive_use():
            entered.set()

    threading.Thread(target=use, daemon=True).start()
    return entered.wait(within_s)


def generate_call(engine, question: str, concepts=(), *, image=None) -> dict:
    """The keyword arguments `engine.answer` passes to `model.generate` for this question (one token generated)."""
    with pytest.MonkeyPatch.context() as patch:
        calls = spy_on_generate(patch, engine)
        engine.answer(question, concepts, image=image, max_new_tokens=1)
    return calls[0]


class WholeBudgetGenerations:
    """Until `monkeypatch` is undone, every `engine.model.generate` call generates its whole `max_new_tokens` unless
    its caller stops it (its stop tokens suppressed, as `min_new_tokens` does), and `tokens[i]` counts the tokens
    call i has generated so far. After `hold()`, the running generation waits after its next token until its
    caller's own stopping criteria (a stream's Stop) say stop, for at most `HOLD_S` seconds: it cannot run on by
    itself while the test gets to its Stop, so what a Stop leaves is a count (at most the token being generated
    when it came), never a race with the clock. A Stop that does not stop the generation lets it run on to its
    whole budget once the hold gives up (a test of that fails by its count, `HOLD_S` later)."""

    HOLD_S = 20.0

    def __init__(self, monkeypatch, engine):
        from transformers import StoppingCriteria, StoppingCriteriaList

        self.tokens: list[int] = []
        self._hold, self._held = threading.Event(), threading.Event()
        original, probe = engine.model.generate, self

        def generate(*args, **kwargs):
            index = len(probe.tokens)
            probe.tokens.append(0)
            callers = list(kwargs.get("stopping_criteria") or ())

            def caller_stops(input_ids, scores, **extra) -> bool:
                return any(bool(torch.as_tensor(c(input_ids, scores, **extra)).any()) for c in callers)

            class Count(StoppingCriteria):
                def __call__(self, input_ids, scores, **extra):
                    probe.tokens[index] += 1
                    if probe._hold.is_set():  # one token held, then the generation goes on as it is told
                        probe._hold.clear()
                        probe._held.set()
                        deadline = time.monotonic() + probe.HOLD_S
                        while not caller_stops(input_ids, scores, **extra) and time.monotonic() < deadline:
                            time.sleep(0.005)
                    return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

            # Counted first: the caller's criteria then see a Stop given while this one held the step.
            kwargs["stopping_criteria"] = StoppingCriteriaList([Count(), *callers])
            kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
            return original(*args, **kwargs)

        monkeypatch.setattr(engine.model, "generate", generate)

    def hold(self) -> None:
        """From the next token on, the running generation waits for its caller's Stop."""
        self._hold.set()

    def held(self, timeout_s: float = 30) -> int:
        """`hold()`, then wait until the running generation holds; the tokens it has generated by then."""
        self.hold()
        assert self._held.wait(timeout_s), "no generation was running to hold"
        return self.tokens[-1]


def record_scores(monkeypatch, engine) -> list[torch.Tensor]:
    """Until `monkeypatch` is undone, `engine.model.generate` also returns its per-step scores (the logits after its
    logits processors), each call's appended to the list returned as a float32 CPU tensor [steps, B, V]; a caller
    that did not ask for generate's output object still gets its token ids. Equal answers on a tiny random model
    say little (its greedy tokens barely depend on the inputs): equal scores, to a stated tolerance, say more."""
    scores, original = [], engine.model.generate

    def generate(*args, **kwargs):
        wants_output = kwargs.get("return_dict_in_generate", False)
        out = original(*args, **{**kwargs, "output_scores": True, "return_dict_in_generate": True})
        scores.append(torch.stack([step.detach().float().cpu() for step in out.scores]))
        return out if wants_output else out.sequences

    monkeypatch.setattr(engine.model, "generate", generate)
    return scores


def description_keyword_tokens(tokenizer, ids: list[int]) -> list[int]:
    """Offsets (into `ids`) of the tokens that spell a description's keywords, found here rather than by
    `ego.engine.keyword_positions`: each token decoded on its own (asserted to make up the whole text); a word is a
    run of letters and digits (with the combining marks after them, and inner apostrophes, as in "isn't"); the
    keywords are its content words (not on the prompt's stop-word list), or its words when it has none, or every
    token when it has no word at all (the fallbacks `keyword_positions` documents)."""
    import unicodedata

    from ego.prompts import STOPWORDS

    pieces = [tokenizer.decode([token], skip_special_tokens=True) for token in ids]
    text = "".join(pieces)
    assert text == tokenizer.decode(ids, skip_special_tokens=True), "a token does not decode to text on its own"

    def part_end(i: int) -> int:  # the end of the letters (and marks) from text[i], a letter
        i += 1
        while i < len(text) and (text[i].isalnum() or unicodedata.category(text[i]).startswith("M")):
            i += 1
        return i

    words, i = [], 0  # (start, end, is a content word)
    while i < len(text):
        if not text[i].isalnum():
            i += 1
            continue
        end = part_end(i)
        while end + 1 < len(text) and text[end] in "'\u2019" and text[end + 1].isalnum():
            end = part_end(end + 1)
        words.append((i, end, text[i:end].lower().replace("\u2019", "'") not in STOPWORDS))
        i = end
    bounds = [(sum(map(len, pieces[:index])), sum(map(len, pieces[: index + 1]))) for index in range(len(ids))]
    for spans in ([(a, b) for a, b, content in words if content], [(a, b) for a, b, _ in words]):
        offsets = [index for index, (start, end) in enumerate(bounds) if any(start < b and a < end for a, b in spans)]
        if offsets:
            return offsets
    return list(range(len(ids)))


_EAGER: dict = {}


def eager_model(family: str):
    """The same tiny checkpoint under transformers' eager attention (returns full attention maps)."""
    from transformers import AutoModelForImageTextToText

    from ego.random_models import tiny_checkpoint

    if family not in _EAGER:
        _EAGER[family] = AutoModelForImageTextToText.from_pretrained(
            tiny_checkpoint(family), attn_implementation="eager", dtype=torch.float32
        ).eval()
    return _EAGER[family]


def reference_inputs(engine, picture) -> dict:
    """The processor output for `picture` as a reference image, built here rather than by the engine."""
    from ego import prompts

    text = engine.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompts.DESCRIBE_PROMPT}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return engine.backend.encode(
        text, image=picture, image_max_pixels=448 * 448, video_frame_max_pixels=448 * 448, one_view=True
    ).inputs


def _single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


def bigram_engine(family: str, says: str, *, repeat_last: bool = False, whole: bool = False):
    """A fresh tiny engine whose every assistant turn is `says` (one token per character, each character once;
    with `whole`, the tokenizer's own tokens of `says`, each once: "é" may be two byte tokens), then its stop
    token; with `repeat_last`, it repeats the last token forever (an answer cut by a cap).

    The real architecture and the real engine path, with chosen weights: attention and MLP outputs are zero,
    so the residual stream at a position is that token's embedding, and the output layer maps each token of
    the chain to the next one. Attention probabilities (what Eq. 3 reads) are still computed as usual.
    """
    from ego import Ego

    engine = Ego.tiny(family)
    model, tokenizer = engine.model, engine.backend.tokenizer
    language = model.model.language_model
    assert model.lm_head.weight is not language.embed_tokens.weight  # untied: the output layer is free
    prompt_end = tokenizer(engine.backend.continue_turn("x"), add_special_tokens=False).input_ids[-1]
    if whole:
        chain = [prompt_end] + tokenizer(says, add_special_tokens=False).input_ids
    else:
        chain = [prompt_end] + [_single_token(tokenizer, ch) for ch in says]
    assert len(set(chain)) == len(chain), "each token once: the output layer maps a token to one next token"
    following = list(zip(chain, chain[1:]))
    following.append((chain[-1], chain[-1] if repeat_last else engine.backend.stop_token_ids[0]))
    with torch.no_grad():
        for layer in language.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = model.lm_head.weight
        head.zero_()
        for current, next_token in following:
            state = language.norm(language.embed_tokens.weight[current][None].to(head.dtype))[0]
            head[next_token] += 40 * state / state.norm() ** 2
    return engine


def sharpen_attention(model, factor: float) -> None:
    """Scale every text layer's queries and keys by `factor` (attention logits by factor squared), so that a
    tiny random model's attention is peaked instead of nearly uniform: a test-only change of weights."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attention = layer.self_attn
            for name in ("q", "k"):
                norm = getattr(attention, f"{name}_norm", None)  # Qwen3: RMSNorm after the projection
                scaled = (
                    [norm.weight]
                    if norm is not None
                    else [
                        p
                        for p in (getattr(attention, f"{name}_proj").weight, getattr(attention, f"{name}_proj").bias)
                        if p is not None
                    ]
                )
                for parameter in scaled:
                    parameter.mul_(factor)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def engine(family):
    return tiny_engine(family)


def photo(seed: int = 0, size=(300, 451)) -> Image.Image:
    """A small deterministic RGB photo-like image (smooth gradients plus noise)."""
    rng = np.random.RandomState(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * (1 + seed % 3)) % 256, (y * 2) % 256, ((x + y) * (1 + seed % 5)) % 256], axis=-1)
    noise = rng.randint(0, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"))


@pytest.fixture
def photos():
    return [photo(i) for i in range(3)]


# --- the Space, served on loopback, and a real browser ----------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_SPACE_ENGINES: dict = {}


def space_engine(settings):
    """The engine `running_demo(settings)` serves: the tiny Qwen2.5-VL with these settings, one per settings, so
    that a test can watch or patch the very engine its Space uses."""
    if settings not in _SPACE_ENGINES:
        if settings.decoding == "compiled":  # how a model decodes belongs to the loaded model: one of its own
            from ego import Ego

            _SPACE_ENGINES[settings] = Ego.tiny("qwen2.5-vl", settings=settings)
        else:
            _SPACE_ENGINES[settings] = tiny_engine("qwen2.5-vl").with_settings(settings)
    return _SPACE_ENGINES[settings]


def _reachable_within_60_s(url: str) -> bool:
    """Gradio's check that the launched page answers, with the patience of a loaded test machine."""
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.head(url, timeout=20).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


@contextlib.contextmanager
def running_demo(settings, space_settings=None, *, show_error: bool = False):
    """The Space on a tiny Qwen2.5-VL with the engine `settings` (an `ego.Settings`) and the Space's
    `space_settings`, launched on loopback with the production launch options."""
    import gradio.networking

    import app

    demo = app.build_demo(space_engine(settings), space_settings)
    # Gradio's launch gives up when one request to the page takes 3 s, which a busy 2-core machine can exceed.
    with mock.patch.object(gradio.networking, "url_ok", _reachable_within_60_s):
        demo.launch(
            server_name="127.0.0.1",
            server_port=free_port(),
            prevent_thread_lock=True,
            quiet=True,
            show_error=show_error,
            **app.launch_options(settings, space_settings),
        )
    try:
        yield demo
    finally:
        demo.close()


@pytest.fixture(scope="module")
def demo(request):
    """The Space launched once per test module, with the module's SETTINGS (the engine's), SPACE_SETTINGS and
    SHOW_ERROR (defaults: the Space's defaults, False)."""
    with running_demo(
        request.module.SETTINGS,
        getattr(request.module, "SPACE_SETTINGS", None),
        show_error=getattr(request.module, "SHOW_ERROR", False),
    ) as demo:
        yield demo


@pytest.fixture(scope="module")
def url(demo) -> str:
    return demo.local_url


# The committed example photos, and a visitor of the Space through its HTTP API.
EXAMPLE_PHOTO = str(Path(__file__).resolve().parent.parent / "examples" / "concepts" / "chelsea_1.jpg")
EXAMPLE_QUERY = str(Path(__file__).resolve().parent.parent / "examples" / "scenes" / "chelsea_query.jpg")


def visitor(url):
    """A new visitor (a session of its own) of the Space at `url`, through gradio_client."""
    from gradio_client import Client

    return Client(url, verbose=False)


def introduce_through_api(client, name: str, photos=(EXAMPLE_PHOTO,)):
    """A fast introduction: the visitor gives keywords and size, so the model does not describe the photo."""
    from gradio_client import handle_file

    return client.predict(
        name,
        [{"image": handle_file(p), "caption": None} for p in photos],
        "tabby cat",
        False,
        10,
        api_name="/introduce",
    )


@contextlib.contextmanager
def chromium_browser():
    """Debian's Chromium driven by playwright (playwright never downloads a browser of its own)."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium (or set EGO_SKIP_BROWSER=1)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
