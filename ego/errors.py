"""Errors a user can cause. Each message is a sentence that says what to do next."""


class InputError(ValueError):
    """Bad input from the person using the engine or the app (image, video, name, question, limits)."""


class MemoryFileError(ValueError):
    """A concept file that is not ours, is damaged, or was written by an incompatible version."""


class IncompatibleMemoryError(MemoryFileError):
    """A concept memory made by another model: its tokens mean nothing to this one."""


class ModelBusyError(RuntimeError):
    """The model ran out of memory on this request; the request can be retried with smaller input."""


class ConversationFullError(InputError):
    """A question its conversation has no room for: past `max_conversation_turns`, or its context and answer cap
    past `max_conversation_context_tokens`. The message says what does not fit (`situation`) and the ways out:
    a new conversation when the question is a follow-up (`new_conversation`), a shorter answer when the context
    alone fits (`longest_answer_tokens`: the longest cap that would), and otherwise `otherwise`. An app whose users
    cannot choose an answer's length words its own ways out from these (the Space: `space.actions.in_space_terms`)."""

    def __init__(
        self,
        situation: str,
        new_conversation: bool = False,
        longest_answer_tokens: int | None = None,
        otherwise: str = "ask about fewer concepts",
    ):
        ways = ["start a new conversation to ask more"] if new_conversation else []
        if longest_answer_tokens is not None:
            ways.append(f"{'or ' * bool(ways)}ask for a shorter answer (at most {longest_answer_tokens} tokens)")
        super().__init__(f"{situation}; {'; '.join(ways or [otherwise])}.")
        self.situation, self.new_conversation = situation, new_conversation
        self.longest_answer_tokens, self.otherwise = longest_answer_tokens, otherwise

    def __reduce__(self):
        """Pickled whole (a model call on ZeroGPU runs in another process and raises it there)."""
        arguments = (self.situation, self.new_conversation, self.longest_answer_tokens, self.otherwise)
        return type(self), arguments, self.__dict__
