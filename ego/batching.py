"""Several visitors' questions answered by one batched generation (`Ego.answer_batch`).

Each question is prepared exactly as when it is asked alone (`Ego._prepare_answer`: its own concepts, memory rows,
photo or clip, question and token budget; its processor work done beforehand, outside the model's turn, where the
caller staged it with `Ego.stage`); the prepared calls are then stacked into one `generate` call:

- per-token inputs ([1, L_i]: input_ids, attention_mask, Qwen's mm_token_type_ids; inputs_embeds [1, L_i, D]) are
  padded on the LEFT to the longest context L and stacked into [B, L]; the attention mask is 0 over the padding,
  so no row attends to another row's tokens or to padding, and Qwen's 3-D rotary positions (`get_rope_index`)
  and the 1-D positions of the other families are counted from each row's first real token;
- per-image inputs (image and video grids, the vision tower's outputs) are concatenated in row order: the models
  scatter visual features into their placeholders in row-major order, so each row gets its own photo's;
- a row's memory rows were put into that row's own input embeddings before stacking, and Qwen3-VL's memory
  residuals are added at the stacked memory slots [B, L] in the same row-major order; a row without memories
  has no slots.

Each row then ends on its own: at a stop token (generate's own end-of-sequence rule), at its own token budget, or
when its request's Stop is set (`RowControl`); an ended row only receives padding until the last row ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria


@dataclass(frozen=True)
class AnswerRequest:
    """One question for `Ego.answer_batch`: the arguments of `Ego.answer`."""

    question: str
    concepts: Sequence[Any] = ()
    image: Any = None
    video: Any = None
    max_new_tokens: int | None = None
    staged: Any = field(default=None, repr=False, compare=False)
    """Its work that needs no model, done beforehand by `Ego.stage` (`ego.engine.StagedAnswer`); None: done in the
    model's turn."""
    keep_context: bool = False
    """Hand the context the batch computed for this question (its row of the key/value cache) over with the
    answer, for the conversation that takes the answer as its first turn (`Chat.adopt`, on the conversation whose
    photo or clip and concepts these are: the Space's): its first follow-up then computes only its own tokens.
    Held by the answer until a conversation takes it (or the answer is freed); never pickled with it."""


@dataclass(frozen=True)
class FollowUpRequest:
    """One follow-up for `Ego.follow_up_batch`: a conversation (`ego.Chat`) and the arguments of its `ask`."""

    chat: Any
    question: str
    max_new_tokens: int | None = None
    staged: Any = field(default=None, repr=False, compare=False)
    """Its conversation's first context made ready beforehand by `Ego.stage` where it must be computed again
    (`ego.engine.StagedContext`); None: done in the model's turn."""


def stack_caches(caches: Sequence[Any], keep: Sequence[int], length: int, config) -> Any:
    """One key/value cache for a batch of conversations: row i holds the first `keep[i]` positions of `caches[i]`,
    left-padded with zeros to `length` (the attention mask is 0 there, as over the padding of the tokens)."""
    from transformers import DynamicCache

    stacked = DynamicCache(config=config)
    for layer in range(len(caches[0].layers)):
        keys, values = [], []
        for cache, kept in zip(caches, keep):
            for own, rows in ((cache.layers[layer].keys, keys), (cache.layers[layer].values, values)):
                part = own[:, :, :kept]  # [1, heads, kept, head_dim]
                rows.append(torch.cat([part.new_zeros(*part.shape[:2], length - kept, part.shape[3]), part], dim=2))
        stacked.update(torch.cat(keys), torch.cat(values), layer)  # [B, heads, length, head_dim]
    return stacked


def row_cache(cache: Any, row: int, start: int, length: int, config) -> Any:
    """Row `row` of a batch's cache, positions [start, start + length) (its own tokens, past its padding), as a
    cache of its own (copied: it must not keep the whole batch's tensors alive)."""
    from transformers import DynamicCache

    own = DynamicCache(config=config)
    for layer, held in enumerate(cache.layers):
        keys, values = (t[row : row + 1, :, start : start + length].clone() for t in (held.keys, held.values))
        own.update(keys, values, layer)
    return own


def collate(calls: Sequence[dict], pad_id: int, *, min_padding: int = 0) -> dict:
    """The keyword arguments of one `generate` call for several prepared ones (`PreparedAnswer.generate`), rows in
    the order given: per-token tensors left-padded to the longest context plus `min_padding` and stacked, per-image
    tensors and the vision tower's outputs concatenated, the token budget the largest of them."""
    length = max(call["input_ids"].shape[1] for call in calls) + min_padding
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for call in calls for k in call):
        values = [call[key] for call in calls if key in call]
        first = values[0]
        if key == "max_new_tokens":
            merged[key] = max(values)
        elif key == "mm_encoder_outputs":
            kinds = dict.fromkeys(kind for value in values for kind in value)
            merged[key] = {kind: _merge_outputs([value[kind] for value in values if kind in value]) for kind in kinds}
        elif (
            torch.is_tensor(first)
            and first.dim() >= 2
            and all(call[key].shape[:2] == call["input_ids"].shape for call in calls if key in call)
        ):
            if len(values) != len(calls):
                raise ValueError(f"{key} is given for some questions of the batch and not others")
            fill = pad_id if key == "input_ids" else 0
            merged[key] = torch.cat([_left_pad(value, length, fill) for value in values])  # [B, L, ...]
        elif torch.is_tensor(first):
            merged[key] = torch.cat(values)  # per image or video: grids, seconds per grid
        else:
            if any(value != first for value in values):
                raise ValueError(f"the questions of a batch must share {key}")
            merged[key] = first
    return merged


def left_pad_mask(masks: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Per-row bool masks [1, L_i] left-padded with False and stacked: [B, length]."""
    return torch.cat([_left_pad(mask, length, False) for mask in masks])


def _left_pad(value: torch.Tensor, length: int, fill) -> torch.Tensor:
    """[1, L_i, ...] -> [1, length, ...], `fill` in front."""
    pad = value.new_full((value.shape[0], length - value.shape[1], *value.shape[2:]), fill)
    return torch.cat([pad, value], dim=1)


def _merge_outputs(outputs: list):
    """The vision tower's outputs of several questions as one output of all their images, in order."""
    if len(outputs) == 1:
        return outputs[0]
    first = outputs[0]
    fields = {name: _merge([output[name] for output in outputs]) for name in first.keys()}
    return type(first)(**fields)


def _merge(values: list):
    """Tensors: concatenated along dim 0. Sequences of tensors (one per image): one sequence. Sequences of
    sequences (one per level, each one per image): merged level by level. Levels not kept (None) stay None."""
    first = values[0]
    if first is None and all(value is None for value in values):
        return None
    if torch.is_tensor(first):
        return torch.cat(values)
    if isinstance(first, (tuple, list)):
        if all(torch.is_tensor(item) for value in values for item in value):
            return type(first)(item for value in values for item in value)
        return type(first)(_merge(list(level)) for level in zip(*values))
    raise TypeError(f"cannot merge vision outputs of type {type(first).__name__}")


class RowControl(StoppingCriteria):
    """Per row of a batched generate: ends the row at its own token budget or when its Stop is set, and reports
    each row's new tokens after every step.

    starts: the stacked context length L (new tokens begin there); budgets: each row's max_new_tokens;
    stops: each row's Stop (a threading.Event) or None: a row whose Stop is set ends with the tokens it had before
    the step in which the Stop was noticed (the ones `on_step` handed on: a visitor who pressed Stop never saw the
    token generated after it, and their conversation must not continue from it). on_step(row, new_ids) is called
    for every row that was running, after each step (its last one included, once `ended[row]` says so), with the
    row's generated ids so far (stop tokens included; a stopped row's last call repeats the ids it kept).
    `lengths[row]`: how many ids the row kept when it ended (generate pads an ended row while the others run on;
    None while it runs).
    """

    def __init__(
        self,
        start: int,
        budgets: Sequence[int],
        stops: Sequence[threading.Event | None],
        stop_ids: Sequence[int],
        on_step: Callable[[int, list[int]], None] | None = None,
    ):
        self.start, self.budgets, self.stops = start, list(budgets), list(stops)
        self.stop_ids = set(stop_ids)
        self.on_step = on_step
        self.ended = [False] * len(self.budgets)
        self.lengths: list[int | None] = [None] * len(self.budgets)
        self.stopped = [False] * len(self.budgets)
        self.handed = [0] * len(self.budgets)
        """Per row, how many ids the last piece `on_step` handed on covered (it returns False for a piece it held
        back: a character split between two tokens)."""
        """Per row, whether its Stop ended it (rather than its budget or a stop token)."""

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.start :].tolist()  # [B][t]
        done = []
        for row, ids in enumerate(new):
            if not self.ended[row]:
                natural = len(ids) >= self.budgets[row] or bool(self.stop_ids & set(ids))
                stopped = not natural and self.stops[row] is not None and self.stops[row].is_set()
                self.ended[row] = stopped or natural
                if stopped:  # what was handed on before the Stop: not the token generated after it
                    ids = ids[: self.handed[row]] if self.on_step is not None else ids[:-1]
                    self.stopped[row] = True
                if self.ended[row]:
                    self.lengths[row] = len(ids)
                if self.on_step is not None and self.on_step(row, ids) is not False:
                    self.handed[row] = len(ids)
            done.append(self.ended[row])
        return torch.tensor(done, device=input_ids.device)


def row_tokens(ids: list[int], budget: int, stop_ids: Sequence[int], ended_at: int | None = None) -> list[int]:
    """A row's own answer: its generated ids up to its budget and to where it ended (`RowControl.lengths`; the
    padding after a Stop is not its own), ending before its first stop token."""
    ids = ids[: min(budget, ended_at if ended_at is not None else budget)]
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[:position]
    return ids
