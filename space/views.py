"""What the visitor sees: pictures of the kept visual tokens, concept cards and reports.

Pure functions of PIL images, numpy arrays and the engine's `Concept` / `ConceptView` records; no
Gradio, no model. Visitor text (names, keywords, questions) only reaches Markdown through
`escape_markdown`; everything else is shown by components that render text, not HTML.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from .page import EXPORTED

KEPT_RGB = (255, 196, 0)
"""Amber: the tint and outline of a kept visual token."""
TINT = 0.25
"""How much of KEPT_RGB is mixed into a kept cell."""
DIM = 0.35
"""Brightness factor of the cells that were not kept."""
GRID_RGB = (255, 255, 255)
GRID_ALPHA = 0.25
"""The token grid is drawn as thin white lines at this opacity."""

_INFERNO = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float32)
"""Colour stops of the heat map, from least to most important."""


# ----------------------------------------------------------------------------------------------
# The token grid over a photo (paper, Figures 3 and 5)
# ----------------------------------------------------------------------------------------------
def kept_mask(grid: tuple[int, int], token_indices) -> np.ndarray:
    """Boolean [rows, cols]: True at the visual tokens that were kept (raster order: i = r * cols + c)."""
    rows, cols = int(grid[0]), int(grid[1])
    indices = [int(i) for i in (token_indices.tolist() if hasattr(token_indices, "tolist") else token_indices)]
    if any(not 0 <= i < rows * cols for i in indices):
        raise ValueError(f"token indices must lie in [0, {rows * cols}) for a {rows}x{cols} grid")
    mask = np.zeros(rows * cols, dtype=bool)
    mask[indices] = True
    return mask.reshape(rows, cols)


def cell_px(grid: tuple[int, int], max_px: int) -> int:
    """Side in pixels of one visual token when the grid is drawn with its longest side near `max_px`."""
    return max(4, int(max_px) // max(int(grid[0]), int(grid[1])))


def _on_grid(photo: Image.Image, grid: tuple[int, int], max_px: int) -> tuple[np.ndarray, int]:
    """The photo resized to exactly rows x cols cells, as the model saw it: float32 [H, W, 3], cell side."""
    rows, cols = int(grid[0]), int(grid[1])
    cell = cell_px(grid, max_px)
    resized = photo.convert("RGB").resize((cols * cell, rows * cell), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float32), cell


def _upsample(cells: np.ndarray, cell: int) -> np.ndarray:
    return np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)


def _draw_grid(pixels: np.ndarray, cell: int) -> None:
    """Thin lines on the token boundaries, in place."""
    color = np.array(GRID_RGB, dtype=np.float32)
    for edge in range(cell, pixels.shape[0], cell):
        pixels[edge, :] = pixels[edge, :] * (1 - GRID_ALPHA) + color * GRID_ALPHA
    for edge in range(cell, pixels.shape[1], cell):
        pixels[:, edge] = pixels[:, edge] * (1 - GRID_ALPHA) + color * GRID_ALPHA


def patch_view(photo: Image.Image, grid: tuple[int, int], token_indices, max_px: int) -> Image.Image:
    """The photo with its visual-token grid drawn, the kept tokens tinted and outlined, the rest dimmed."""
    pixels, cell = _on_grid(photo, grid, max_px)
    mask = kept_mask(grid, token_indices)
    kept = _upsample(mask, cell)[..., None]  # [H, W, 1]
    amber = np.array(KEPT_RGB, dtype=np.float32)
    pixels = np.where(kept, pixels * (1 - TINT) + amber * TINT, pixels * DIM)
    _draw_grid(pixels, cell)
    border = max(1, cell // 12)
    for r, c in zip(*np.nonzero(mask)):
        y, x = r * cell, c * cell
        pixels[y : y + border, x : x + cell] = amber
        pixels[y + cell - border : y + cell, x : x + cell] = amber
        pixels[y : y + cell, x : x + border] = amber
        pixels[y : y + cell, x + cell - border : x + cell] = amber
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def heat_map(photo: Image.Image, grid: tuple[int, int], scores, max_px: int) -> Image.Image:
    """The importance I_j (Eq. 3) of every visual token, as colour over a grey copy of the photo."""
    rows, cols = int(grid[0]), int(grid[1])
    values = np.asarray(scores.tolist() if hasattr(scores, "tolist") else scores, dtype=np.float32)
    if values.size != rows * cols:
        raise ValueError(f"{values.size} scores for a {rows}x{cols} grid")
    span = float(values.max() - values.min())
    values = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    colors = colormap(values).reshape(rows, cols, 3)
    pixels, cell = _on_grid(photo, grid, max_px)
    grey = pixels.mean(axis=2, keepdims=True)
    pixels = 0.45 * grey + 0.55 * _upsample(colors, cell)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB float32 [..., 3], interpolating the heat map's colour stops."""
    position = np.clip(values, 0, 1) * (len(_INFERNO) - 1)
    low = np.floor(position).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (position - low)[..., None]
    return _INFERNO[low] * (1 - frac) + _INFERNO[low + 1] * frac


def token_map(grid: tuple[int, int], token_indices, px: int) -> Image.Image:
    """The kept tokens alone, on a dark square: the thumbnail of a concept imported without photos."""
    rows, cols = int(grid[0]), int(grid[1])
    cell = max(1, px // max(rows, cols))
    mask = _upsample(kept_mask(grid, token_indices), cell)
    picture = np.full(mask.shape + (3,), 48, dtype=np.uint8)
    picture[mask] = KEPT_RGB
    canvas = Image.new("RGB", (px, px), (32, 32, 32))
    tile = Image.fromarray(picture)
    canvas.paste(tile, ((px - tile.width) // 2, (px - tile.height) // 2))
    return canvas


def thumbnail(photo: Image.Image, px: int) -> Image.Image:
    """A square centre crop of the photo, `px` pixels a side."""
    photo = photo.convert("RGB")
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    return photo.crop((left, top, left + side, top + side)).resize((px, px), Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------
_HTML = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
_MARKDOWN = set("\\`*_{}[]()#+-.!|~$:@^=")
"""Characters that can start Markdown syntax (emphasis, links, tables, headings, autolinks, maths)."""


def duration(seconds: float) -> str:
    """A setting's seconds as a visitor reads them: "45 seconds", "1 minute", "90 minutes", "1.5 minutes"."""
    if seconds < 60:
        return f"{seconds:g} second{'s' * (seconds != 1)}"
    minutes = seconds / 60
    return f"{round(minutes, 1):g} minute{'s' * (minutes != 1)}"


def escape_markdown(text) -> str:
    """Visitor text as literal Markdown: no HTML, links, images, emphasis, tables or maths; one line."""
    out = []
    for ch in " ".join(str(text).split()):
        if ch in _HTML:
            out.append(_HTML[ch])
        elif ch in _MARKDOWN:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def isolated(name: str) -> str:
    """A visitor's name set apart in a sentence, between the Unicode direction isolates FSI (U+2068) and PDI
    (U+2069): a right-to-left name ("قطتي 2", "כלב 3") keeps its own direction without pulling the text around it
    into it ("150 · 2 قطتي tokens"), and several of them stay in the order listed. Names never hold these
    characters themselves (`ego.checks.fold_name` drops them), so a name is never closed early."""
    return f"\u2068{name}\u2069"


_SIZE_SOURCE = {
    "model": "model's estimate",
    "user": "set by you",
    "fallback": "no estimate, so the cap applies",
    "truncated": "estimate cut off mid-number, so the cap applies",
}


def introduction_report(concepts: Sequence, seconds: float) -> str:
    """Markdown: for each new concept, its memory size and, per reference photo, keywords, size and tokens."""
    lines = []
    for concept in concepts:
        photos = len(concept.views)
        lines += [
            f"## {escape_markdown(concept.name)}",  # under the page's one h1: the next level
            f"{concept.num_tokens} memory tokens from {photos} photo{'s' if photos != 1 else ''}.",
            "",
            "| Photo | Tokens kept | Size | Keywords |",  # the long, free-text column last: it takes the width
            "|---|---|---|---|",
        ]
        for number, view in enumerate(concept.views, 1):
            words = ", ".join(view.keywords) if view.keywords else "(none found: every token of the description)"
            if view.keywords_source == "user":
                words += " (yours)"
            size = f"{view.area_pct:g} % ({_SIZE_SOURCE.get(view.area_source, view.area_source)})"
            total = int(view.grid[0]) * int(view.grid[1])
            kept = f"{view.k}\u00a0of\u00a0{total}"  # no-break spaces: the cell never wraps
            lines.append(f"| {number} | {kept} | {escape_markdown(size)} | {escape_markdown(words)} |")
        lines.append("")
    lines.append(f"Done in {seconds:.2f} s.")
    return "\n".join(lines)


def concept_caption(concept) -> str:
    """Gallery caption of a concept card (rendered as text)."""
    return f"{isolated(concept.name)} · {concept.num_tokens} tokens"


def concept_record(concept) -> dict:
    """A JSON-able description of a concept, as `/list_concepts` returns it."""
    keywords = list(dict.fromkeys(word for view in concept.views for word in view.keywords))
    return {
        "name": concept.name,
        "tokens": concept.num_tokens,
        "photos": len(concept.views),
        "keywords": keywords,
        "size_pct": [float(view.area_pct) for view in concept.views],
        "views": [
            {
                "grid": [int(view.grid[0]), int(view.grid[1])],
                "tokens": int(view.k),
                "size_pct": float(view.area_pct),
                "size_source": view.area_source,
                "keywords": list(view.keywords),
                "keywords_source": view.keywords_source,
            }
            for view in concept.views
        ],
        "model_id": concept.model_id,
    }


def answer_details(answer, seconds: float) -> dict:
    """What went into the context of an answer (ego.Answer metadata), JSON-able."""
    return {
        "concepts_used": list(getattr(answer, "concepts_used", ())),
        "concepts_dropped": list(getattr(answer, "concepts_dropped", ())),
        "memory_tokens": int(getattr(answer, "memory_tokens", 0)),
        "context_tokens": int(getattr(answer, "context_tokens", 0)),
        "seconds": round(float(seconds), 2),
        "similarity": {name: round(float(score), 3) for name, score in getattr(answer, "similarity", ())},
    }


def frame_captions(metadata: dict) -> list[str]:
    """ "frame 5 · 0.5 s" for each sampled frame (source index and time)."""
    fps = float(metadata.get("fps") or metadata.get("source_fps") or 0) or None
    captions = []
    for index in metadata.get("frames_indices", []):
        when = f" · {int(index) / fps:.1f} s" if fps else ""
        captions.append(f"frame {int(index) + 1}{when}")
    return captions


def panel_summary(count: int, tokens: int, max_concepts: int, *, exported: bool = False) -> str:
    """One line above the concept cards (no visitor text)."""
    if not count:
        return "No concepts yet: introduce one, or load the example concepts."
    return f"{count} of {max_concepts} concepts · {tokens} memory tokens in all" + (
        f" · {EXPORTED}." if exported else "."
    )
