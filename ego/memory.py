"""Concept memories: what `introduce` keeps, and the file format that carries them between sessions.

A file is one safetensors file: the tensors (memory rows, their residuals where the family has them, kept
token indices, importance scores, and optionally a small square thumbnail per concept) plus,
in the safetensors header's metadata, a JSON document with the format name and version, the model id
and hidden size the memory belongs to, and each concept's name and per-view details. Nothing is ever
unpickled; the header size is checked before it is parsed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import IncompatibleMemoryError, MemoryFileError

FORMAT_NAME = "ego-concepts"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""A safetensors header larger than this is refused before it is read (hostile files)."""
MAX_THUMBNAIL_PX = 512
"""A thumbnail larger than this on either side is ignored on reading (the app writes 128 px ones)."""
MAX_RESIDUAL_LEVELS = 16
"""More residual levels than any family has (Qwen3-VL: 3): a file claiming more is refused."""


@dataclass(frozen=True)
class ConceptView:
    """What one reference image contributed to a concept's memory."""

    token_indices: torch.Tensor
    """Kept visual tokens, raster order: LongTensor [k]."""
    scores: torch.Tensor
    """Importance I_j (Eq. 3) of every visual token of the reference image: float32 [N_r]."""
    grid: tuple[int, int]
    """(rows, cols) of the reference image's visual tokens; rows * cols == N_r."""
    k: int
    """K_c (Eq. 4): tokens kept from this view."""
    area_pct: float
    """alpha_c: the subject's share of the image in percent (the model's estimate or the user's)."""
    keywords: tuple[str, ...]
    """Content words whose attention ranked the tokens."""
    description: str
    """The text whose keyword tokens were read (the model's self-description, or the user's keywords)."""
    size_answer: str = ""
    """The model's raw answer to the size question ("" when the user gave the size)."""
    keywords_source: str = "model"
    area_source: str = "model"
    """"model", "user" or "fallback" (the size answer had no number)."""
    timings_s: dict = field(default_factory=dict, compare=False)
    """Seconds spent per stage (encode, description, size, scores, selection); not saved."""


@dataclass(frozen=True)
class Concept:
    name: str
    embeddings: torch.Tensor
    """Memory rows, projector output at the kept tokens, views concatenated: float [sum K_c, D], CPU."""
    model_id: str
    views: tuple[ConceptView, ...]
    residuals: torch.Tensor | None = None
    """Per-token features that the family's language model adds at visual positions in its first layers,
    at the kept tokens, views concatenated: float [levels, sum K_c, D], CPU (Qwen3-VL's deepstack
    features, one level per tapped vision depth); None for families without them."""

    @property
    def num_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def nbytes(self) -> int:
        extra = 0 if self.residuals is None else self.residuals.numel() * self.residuals.element_size()
        return self.embeddings.numel() * self.embeddings.element_size() + extra


def save_concepts(path, concepts, thumbnails=None) -> Path:
    """Write concepts of one model to a single safetensors file; returns the path.

    thumbnails: optional, one PIL image (or None) per concept, stored as uint8 [H, W, 3] tensors
    `c{i}.thumbnail`; files without them load as before, and readers that do not know them ignore them.
    """
    from safetensors.torch import save_file

    concepts = list(concepts)
    thumbnails = list(thumbnails) if thumbnails is not None else [None] * len(concepts)
    if len(thumbnails) != len(concepts):
        raise ValueError(f"{len(thumbnails)} thumbnails for {len(concepts)} concepts; give one (or None) each.")
    if not concepts:
        raise MemoryFileError("There are no concepts to save; introduce at least one first.")
    model_ids = {c.model_id for c in concepts}
    if len(model_ids) != 1:
        raise MemoryFileError("These concepts come from different models; save each model's concepts separately.")
    tensors, entries = {}, []
    for i, concept in enumerate(concepts):
        tensors[f"c{i}.embeddings"] = concept.embeddings.detach().cpu().clone()
        if concept.residuals is not None:
            tensors[f"c{i}.residuals"] = concept.residuals.detach().cpu().clone()
        if thumbnails[i] is not None:
            width, height = thumbnails[i].size
            pixels = bytearray(thumbnails[i].convert("RGB").tobytes())
            tensors[f"c{i}.thumbnail"] = torch.frombuffer(pixels, dtype=torch.uint8).reshape(height, width, 3)
        views = []
        for j, view in enumerate(concept.views):
            tensors[f"c{i}.v{j}.token_indices"] = view.token_indices.to(torch.int64).cpu().clone()
            tensors[f"c{i}.v{j}.scores"] = view.scores.float().cpu().clone()
            views.append({
                "grid": list(view.grid), "k": view.k, "area_pct": view.area_pct, "keywords": list(view.keywords),
                "description": view.description, "size_answer": view.size_answer,
                "keywords_source": view.keywords_source, "area_source": view.area_source,
            })
        entries.append({"name": concept.name, "views": views})
    document = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "model_id": concepts[0].model_id,
        "hidden_size": int(concepts[0].embeddings.shape[1]), "concepts": entries,
    }
    path = Path(path)
    save_file(tensors, str(path), metadata={"ego": json.dumps(document)})
    return path


def read_concepts(path, *, max_concepts: int = 200) -> tuple[dict, list[Concept]]:
    """Parse a concept file without a model: (header document, concepts). Raises MemoryFileError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    not_ours = "This file is not an Ego concept file; export concepts from this app or with ego.save_concepts."
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
        size = path.stat().st_size
    except OSError as error:
        raise MemoryFileError("The concept file could not be read; please choose the file again.") from error
    if len(prefix) < 8:
        raise MemoryFileError(not_ours)
    (header_bytes,) = struct.unpack("<Q", prefix)
    if header_bytes > MAX_HEADER_BYTES or header_bytes + 8 > size:
        raise MemoryFileError(not_ours)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            document = json.loads(metadata["ego"])
            if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
                raise MemoryFileError(not_ours)
            if document.get("version") != FORMAT_VERSION:
                raise MemoryFileError(
                    f"This concept file has format version {document.get('version')!r}; this version of Ego reads "
                    f"version {FORMAT_VERSION}. Re-export the concepts with this version."
                )
            entries = document["concepts"]
            if not isinstance(entries, list) or len(entries) > max_concepts:
                raise MemoryFileError(f"A concept file may hold at most {max_concepts} concepts.")
            hidden = int(document["hidden_size"])
            names = set(handle.keys())
            concepts = []
            for i, entry in enumerate(entries):
                embeddings = handle.get_tensor(f"c{i}.embeddings")
                if not _is_finite_float(embeddings) or embeddings.dim() != 2 or embeddings.shape[1] != hidden:
                    raise MemoryFileError(not_ours)
                residuals = handle.get_tensor(f"c{i}.residuals") if f"c{i}.residuals" in names else None
                if residuals is not None and (
                        not _is_finite_float(residuals) or residuals.dim() != 3
                        or not 1 <= residuals.shape[0] <= MAX_RESIDUAL_LEVELS
                        or tuple(residuals.shape[1:]) != tuple(embeddings.shape)):
                    raise MemoryFileError(not_ours)
                views = []
                for j, view in enumerate(entry["views"]):
                    views.append(ConceptView(
                        token_indices=handle.get_tensor(f"c{i}.v{j}.token_indices"),
                        scores=handle.get_tensor(f"c{i}.v{j}.scores"),
                        grid=(int(view["grid"][0]), int(view["grid"][1])), k=int(view["k"]),
                        area_pct=float(view["area_pct"]), keywords=tuple(str(w) for w in view["keywords"]),
                        description=str(view["description"]), size_answer=str(view.get("size_answer", "")),
                        keywords_source=str(view.get("keywords_source", "model")),
                        area_source=str(view.get("area_source", "model")),
                    ))
                if sum(v.k for v in views) != embeddings.shape[0] or not all(map(_is_consistent, views)):
                    raise MemoryFileError(not_ours)
                concepts.append(Concept(name=str(entry["name"]), embeddings=embeddings,
                                        model_id=str(document["model_id"]), views=tuple(views), residuals=residuals))
    except MemoryFileError:
        raise
    except (SafetensorError, KeyError, TypeError, ValueError, IndexError, OSError) as error:
        raise MemoryFileError(not_ours) from error
    return document, concepts


def read_thumbnails(path, count: int) -> list:
    """The thumbnails `save_concepts` stored for the first `count` concepts of a file already read with
    `read_concepts`: a PIL image per concept, None where there is none or it is not a small RGB picture."""
    from PIL import Image
    from safetensors import SafetensorError, safe_open

    pictures = [None] * count
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = set(handle.keys())
            for i in range(count):
                if f"c{i}.thumbnail" not in names:
                    continue
                pixels = handle.get_tensor(f"c{i}.thumbnail")
                if (pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[2] != 3
                        or not all(1 <= side <= MAX_THUMBNAIL_PX for side in pixels.shape[:2])):
                    continue
                pictures[i] = Image.fromarray(pixels.contiguous().numpy())
    except (SafetensorError, OSError):
        return [None] * count
    return pictures


def _is_finite_float(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and bool(torch.isfinite(tensor).all())


def _is_consistent(view: ConceptView) -> bool:
    """The grid, scores and kept indices of a view agree (the app draws pictures from the grid, so a
    hostile file must not claim a grid larger than its data)."""
    rows, cols = view.grid
    indices, scores = view.token_indices, view.scores
    if rows < 1 or cols < 1 or scores.dim() != 1 or not scores.is_floating_point() or rows * cols != scores.numel():
        return False
    if indices.dim() != 1 or indices.dtype != torch.int64 or indices.numel() != view.k:
        return False
    return indices.numel() == 0 or (int(indices.min()) >= 0 and int(indices.max()) < scores.numel())


def load_concepts(path, engine) -> list[Concept]:
    """Concepts from a file written by `save_concepts`, checked against `engine`'s model."""
    document, concepts = read_concepts(path, max_concepts=engine.settings.max_concept_file_concepts)
    if document["model_id"] != engine.model_id or int(document["hidden_size"]) != engine.hidden_size:
        raise IncompatibleMemoryError(
            f"These concepts were made with {document['model_id']} and cannot be used with {engine.model_id}; "
            f"introduce them again with this model."
        )
    levels = engine.backend.residual_levels
    if any(c.residuals is not None and c.residuals.shape[0] != levels for c in concepts):
        raise MemoryFileError("This concept file does not match the model it names; export the concepts again.")
    dtype = engine.memory_dtype
    return [replace(c, embeddings=c.embeddings.to(dtype),
                    residuals=None if c.residuals is None else c.residuals.to(dtype)) for c in concepts]
