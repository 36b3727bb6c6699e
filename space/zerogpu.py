"""Hugging Face ZeroGPU: model calls in a GPU worker process, elsewhere nothing changes.

On ZeroGPU hardware (the `SPACES_ZERO_GPU` environment variable is set, and the `spaces` package is installed
there) a function decorated with `spaces.GPU` runs on a GPU of a shared pool, in a worker process forked from
the Space's: its arguments are pickled to the worker and its results (each `yield` of a generator) pickled back,
and the call is charged to the visiting user's quota, which `spaces` reads from the Gradio request of the
calling thread. Hence, for the Space's model calls (`space.actions`):

- only picklable data crosses: the question (str), the photo (a PIL image) or the clip ((frames array,
  metadata dict)), the token budget, the visitor's concepts (`ego.Concept`: CPU tensors), and back an
  `ego.Answer` or an `ego.Concept`; the visitor's `Session` (it holds a lock) stays in the Space's process, which
  adds the returned concept to it;
- no lock is taken inside the call (`Ego.unguarded`): a lock copied by the fork may be held by a thread of the
  Space's process that does not exist in the worker;
- each call is one visitor's question, made from that visitor's handler thread: questions are not batched across
  visitors there (one call would be charged to one visitor for all), the pool runs calls side by side;
- decoding is eager (ZeroGPU does not support `torch.compile`), and the model is loaded when the Space starts,
  onto "cuda", before `demo.launch` packs it for the workers (`app.main`); `spaces` is imported before torch.

Off ZeroGPU `gpu` returns the function itself and `spaces` is never imported: it is not a dependency.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

_TRUE = ("1", "t", "true")
"""How the `spaces` package reads SPACES_ZERO_GPU (its `config.boolean`): "false" or "0" is not ZeroGPU, where its
decorator changes nothing, so neither may this module."""


def _zero_gpu_flag() -> bool:
    flag = os.environ.get("SPACES_ZERO_GPU")
    return flag is not None and flag.lower() in _TRUE


def on_zero_gpu() -> bool:
    """Whether this process runs on ZeroGPU hardware with the `spaces` package installed."""
    return _zero_gpu_flag() and importlib.util.find_spec("spaces") is not None


def zero_gpu_requested_without_spaces() -> bool:
    """Whether SPACES_ZERO_GPU says ZeroGPU but the `spaces` package is missing (the app then runs as on a dedicated
    GPU, and says so in the log)."""
    return _zero_gpu_flag() and importlib.util.find_spec("spaces") is None


def gpu(function: Callable, *, duration: Callable | None = None) -> Callable:
    """`function` decorated with `spaces.GPU(duration=duration)` on ZeroGPU (`duration` takes the call's
    arguments and returns seconds), `function` itself elsewhere."""
    if not on_zero_gpu():
        return function
    import spaces

    return spaces.GPU(duration=duration)(function) if duration is not None else spaces.GPU(function)


def call_seconds(fixed_s: float, per_token_s: float) -> Callable:
    """A `duration` for a model call whose token budget is its argument `max_new_tokens` (keyword or last
    positional): `fixed_s + per_token_s * max_new_tokens` seconds."""

    def seconds(*args, max_new_tokens=None, **kwargs) -> float:
        budget = max_new_tokens if max_new_tokens is not None else (args[-1] if args else 0)
        return fixed_s + per_token_s * int(budget or 0)

    return seconds
