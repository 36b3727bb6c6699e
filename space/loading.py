"""The one model of the process, shared by every visitor and loaded on first use."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ego.settings import DEFAULT_SETTINGS, Settings

log = logging.getLogger("ego.space")

LOADING_MESSAGE = "Loading the model; the first request after a restart takes a minute or two…"
WARM_UP_MESSAGE = "Preparing fast answers: compiling the model's decoding, once after a restart (about two minutes)…"


class LazyEngine:
    """Holds an engine, or a factory that makes one the first time it is needed.

    The engine's settings are known before it is loaded (the page shows its limits): those of the engine
    given, or those a factory is called with (`factory(settings=...)`), so the Space and its engine never
    disagree. Two first visitors do not load the model twice: the factory runs under a lock. A factory that
    fails is tried again on the next request (the error reaches the visitor as a sentence). An engine that
    decodes compiled is compiled on first use too (`Ego.warm_up`), with its own message.
    """

    def __init__(
        self, source, *, settings: Settings | None = None, name: str | None = None, warm_up_batched: bool = False
    ):
        if hasattr(source, "introduce"):  # an engine already loaded
            if settings is not None and settings != source.settings:
                raise ValueError(
                    "These settings differ from the engine's; give the engine `engine.with_settings(...)` instead."
                )
            self._engine, self._factory = source, None
            self.settings = source.settings
            self.name = name or getattr(source, "model_id", None)
        elif callable(source):
            self._engine, self._factory = None, source
            self.settings = settings or DEFAULT_SETTINGS
            self.name = name
        else:
            raise TypeError("build the demo from an engine or from a function that returns one")
        self.warm_up_batched = warm_up_batched
        """Whether the warm-up also compiles the step of batched answers (a Space that batches its visitors)."""
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def get(self, progress: Callable | None = None):
        """The engine; loads it (and compiles its decoding) first if needed, telling the visitor through
        `progress`."""
        if self._engine is not None and not getattr(self._engine, "needs_warm_up", False):
            return self._engine
        with self._lock:
            if self._engine is None:
                if progress is not None:
                    progress(0, desc=LOADING_MESSAGE)
                started = time.perf_counter()
                engine = self._factory(settings=self.settings)
                if engine.settings != self.settings:
                    raise RuntimeError("The engine factory ignored the settings it was given.")
                log.info("model %s loaded in %.1f s", getattr(engine, "model_id", "?"), time.perf_counter() - started)
                self._engine = engine
                self.name = self.name or getattr(engine, "model_id", None)
            if getattr(self._engine, "needs_warm_up", False):
                self._warm_up(progress)
        return self._engine

    def _warm_up(self, progress: Callable | None) -> None:
        """Compile the decode step; if compiling fails, the Space answers with eager decoding instead."""
        if progress is not None:
            progress(0, desc=WARM_UP_MESSAGE)
        try:
            log.info("decode step compiled in %.1f s", self._engine.warm_up(batched=self.warm_up_batched))
        except Exception as error:  # noqa: BLE001 - any compiler failure; eager decoding still answers
            log.error("compiling the decode step failed (%s: %s); decoding eagerly", type(error).__name__, error)
            self._engine.set_decoding("eager")
            self.settings = self._engine.settings  # the same limits; decoding now eager
