"""space/loading.py: the model is loaded once, on first use, even when visitors arrive together."""

from __future__ import annotations

import threading
import time

import pytest

from ego import DEFAULT_SETTINGS
from space.loading import LOADING_MESSAGE, LazyEngine


class FakeEngine:
    model_id = "fake"

    def __init__(self, settings=DEFAULT_SETTINGS):
        self.settings = settings

    def introduce(self, *args, **kwargs):
        raise NotImplementedError


def test_loads_once_under_concurrent_first_use():
    calls, messages = [], []

    def factory(settings):
        calls.append(1)
        time.sleep(0.2)
        return FakeEngine(settings)

    lazy = LazyEngine(factory, name="fake-preset")
    assert not lazy.loaded
    got = []

    def visit():
        got.append(lazy.get(lambda *args, **kwargs: messages.append(kwargs)))

    threads = [threading.Thread(target=visit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and lazy.loaded
    assert len({id(engine) for engine in got}) == 1
    assert messages == [{"desc": LOADING_MESSAGE}]
    assert lazy.name == "fake-preset"


def test_a_failed_load_is_retried():
    attempts = []

    def factory(settings):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("out of disk")
        return FakeEngine(settings)

    lazy = LazyEngine(factory)
    with pytest.raises(RuntimeError):
        lazy.get()
    assert isinstance(lazy.get(), FakeEngine) and lazy.name == "fake"


def test_an_engine_is_used_as_is():
    engine = FakeEngine()
    lazy = LazyEngine(engine)
    assert lazy.loaded and lazy.get() is engine and lazy.name == "fake"
    with pytest.raises(TypeError):
        LazyEngine(42)


def test_the_space_knows_a_lazy_engines_settings_before_loading_and_the_engine_gets_them():
    paper = DEFAULT_SETTINGS.paper()
    lazy = LazyEngine(lambda settings: FakeEngine(settings), settings=paper)
    assert lazy.settings is paper and not lazy.loaded
    assert lazy.get().settings is paper
    assert LazyEngine(lambda settings: FakeEngine(settings)).settings == DEFAULT_SETTINGS


def test_settings_that_disagree_with_the_engine_are_refused():
    engine = FakeEngine()
    assert LazyEngine(engine, settings=DEFAULT_SETTINGS).settings is engine.settings
    with pytest.raises(ValueError, match="with_settings"):
        LazyEngine(engine, settings=DEFAULT_SETTINGS.replace(max_question_chars=10))
    deaf = LazyEngine(lambda settings: FakeEngine(), settings=DEFAULT_SETTINGS.replace(max_question_chars=10))
    with pytest.raises(RuntimeError, match="ignored the settings"):
        deaf.get()
    assert not deaf.loaded
