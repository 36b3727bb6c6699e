"""Keyword-to-image attention, captured for the needed rows and layers only (Eq. 3's inputs).

A real model must never materialise every layer's full L x L attention (28 layers x 28 heads x L^2).
Instead the text layers run under a registered attention function, `ego_capture`: it delegates to
PyTorch SDPA for the actual output, and only for the layers in `L`, while a capture is active, it also
computes softmax(q k^T * scaling) for the query rows of the description and keeps their columns at
the reference image's visual tokens.

The function is registered with both `AttentionInterface` and `AttentionMaskInterface`: for a name the
mask interface does not know, transformers builds no mask at all.

Capture happens in eager forwards only: an introduction generates its description like any answer, then
records the rows in one forward over the prompt and the description (the same numbers, by causality), so
that decoding can be compiled; inside a compiled graph the function is plain SDPA.

The active capture is held in a context variable: it belongs to the thread (or task) that opened it, so two
engines capturing in two threads at once each record only their own model calls.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "ego_capture"


@dataclass
class AttentionCapture:
    layers: frozenset[int]
    """Indices of the text layers whose attention is recorded (the calibrated set L)."""
    columns: torch.Tensor
    """Key positions of the reference image's visual tokens, LongTensor [N_r]."""
    first_row: int
    """Absolute query positions in [first_row, end_row) are recorded: the description's tokens."""
    end_row: int = 1 << 62
    call_start: int | None = None
    """Absolute position of every recorded call's first query row, for a forward over a whole sequence into a
    cache of fixed capacity (a static cache: its key length is its capacity, not the sequence's); None: the
    keys of a call end at its last query row (a dynamic cache, or none)."""
    rows: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    """layer -> absolute query position -> attention probabilities over the visual tokens [H, N_r]."""

    def matrix(self, positions: list[int]) -> torch.Tensor:
        """A^{l,h}_{wr} for the given query positions: [|L|, H, N_w, N_r] (float32)."""
        return torch.stack(
            [torch.stack([self.rows[layer][p] for p in positions], dim=1) for layer in sorted(self.layers)]
        )

    def recorded_positions(self) -> set[int]:
        sets = [set(self.rows.get(layer, {})) for layer in self.layers]
        return set.intersection(*sets) if sets else set()


_active: contextvars.ContextVar[AttentionCapture | None] = contextvars.ContextVar("ego_attention_capture", default=None)


@contextlib.contextmanager
def capturing(capture: AttentionCapture):
    """Record attention rows into `capture` for the model calls made inside the block, in this thread."""
    token = _active.set(capture)
    try:
        yield capture
    finally:
        _active.reset(token)


def _record(capture: AttentionCapture, layer: int, query, key, attention_mask, scaling) -> None:
    q_len, k_len = query.shape[2], key.shape[2]
    # Absolute position of this call's first query row (batch of one, cache before it).
    start = k_len - q_len if capture.call_start is None else capture.call_start
    lo, hi = max(capture.first_row - start, 0), min(capture.end_row - start, q_len)
    if lo >= hi:
        return
    heads, kv_heads, rows = query.shape[1], key.shape[1], hi - lo
    # GQA: query head h reads kv head h // (heads / kv_heads); group the query heads rather than repeat
    # the keys, so the cached keys are never copied per head.
    q = query[:1, :, lo:hi].float().view(1, kv_heads, heads // kv_heads, rows, -1)  # [1, Hkv, g, r, d]
    k = key[:1].float().unsqueeze(2)  # [1, Hkv, 1, k_len, d]
    scores = (q @ k.transpose(-1, -2)).view(1, heads, rows, k_len) * scaling  # [1, H, r, k_len]
    positions = range(start + lo, start + hi)  # Python ints: reading them back from the GPU would wait for it
    future = (
        torch.arange(k_len, device=query.device)[None, :]
        > torch.arange(positions.start, positions.stop, device=query.device)[:, None]
    )  # causal: [r, k_len]
    scores = scores.masked_fill(future, float("-inf"))
    if attention_mask is not None:
        mask = attention_mask[:1, :, lo:hi, :k_len]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = scores.softmax(-1)[0][:, :, capture.columns.to(query.device)]  # [H, r, N_r]
    store = capture.rows.setdefault(layer, {})
    for i, position in enumerate(positions):
        store[position] = probs[:, i].detach()


def capture_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA, plus a record of the captured rows when this layer is in the active capture."""
    if torch.compiler.is_compiling():  # a compiled decode step: never a capture (see ego.decoding)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    capture = _active.get()
    layer = getattr(module, "layer_idx", None)
    if capture is not None and layer in capture.layers:
        _record(capture, layer, query, key, attention_mask, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(ATTENTION_NAME, capture_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
