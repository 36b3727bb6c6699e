"""Errors a user can cause. Each message is a sentence that says what to do next."""


class InputError(ValueError):
    """Bad input from the person using the engine or the app (image, video, name, question, limits)."""


class MemoryFileError(ValueError):
    """A concept file that is not ours, is damaged, or was written by an incompatible version."""


class IncompatibleMemoryError(MemoryFileError):
    """A concept memory made by another model: its tokens mean nothing to this one."""


class ModelBusyError(RuntimeError):
    """The model ran out of memory on this request; the request can be retried with smaller input."""
