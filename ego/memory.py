"""Concept memories: what `introduce` keeps, and the file format that carries them between sessions.

A file is one safetensors file: the tensors (memory rows, their residuals where the family has them, kept
token indices, importance scores, and optionally a small square thumbnail per concept) plus,
in the safetensors header's metadata, a JSON document with the format name and version, the model id
and hidden size the memory belongs to, and each concept's name and per-view details. Nothing is ever
unpickled; the header size is checked before it is parsed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .checks import check_name, is_valid_text
from .errors import IncompatibleMemoryError, InputError, MemoryFileError
from .presets import HUB_ID
from .settings import DEFAULT_SETTINGS, MAX_FILE_VIEWS_PER_CONCEPT

FORMAT_NAME = "ego-concepts"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""A safetensors header larger than this is refused before it is read (hostile files)."""
MAX_THUMBNAIL_PX = 512
"""A thumbnail larger than this on either side is ignored on reading, and shrunk to fit on saving (the app writes
128 px ones)."""
MAX_RESIDUAL_LEVELS = 16
"""More residual levels than any family has (Qwen3-VL: 3): a file claiming more is refused."""
MAX_FILE_TEXT_CHARS = 1000
"""Longest name, model id, description or size answer in a file; also the most characters all keywords of one
view may have together. A model's description is `description_max_new_tokens` tokens, a visitor's
keywords at most 200 characters: a file beyond this was not written by Ego, and would make every listing of
the visitor's concepts large."""
MAX_FILE_KEYWORDS_PER_VIEW = 100
_SOURCES = {"keywords_source": ("model", "user"), "area_source": ("model", "user", "fallback", "truncated")}
_DOCUMENT_KEYS = {"format", "version", "model_id", "hidden_size", "concepts"}
_CONCEPT_KEYS = {"name", "views"}
_VIEW_KEYS = {"grid", "k", "area_pct", "keywords", "description", "size_answer", "keywords_source", "area_source"}


@dataclass(frozen=True, eq=False, repr=False)
class ConceptView:
    """What one reference image contributed to a concept's memory. Equal only to itself (hashed the same way), like
    `Concept`: fields that are tensors have no single truth value to compare by."""

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
    """"model", "user", "fallback" (the size answer had no number) or "truncated" (it stopped at its length cap
    inside a number, so the number it meant is unknown): the last two use `Settings.area_pct_fallback`."""
    timings_s: dict = field(default_factory=dict)
    """Seconds spent per stage (encode, description, size, scores, selection); not saved."""

    def __repr__(self) -> str:
        # Short: the generated one prints the scores of every visual token.
        return (
            f"ConceptView(k={self.k}, grid={self.grid}, area_pct={self.area_pct:g} ({self.area_source}), "
            f"keywords={self.keywords!r})"
        )


@dataclass(frozen=True, eq=False, repr=False)
class Concept:
    """One concept's memory, as `introduce` makes it or `load_concepts` reads it. A concept is equal only to itself,
    and hashed the same way: its memory is tensors, which compare element by element with no single truth value,
    so one loaded back from a file is another object (`in`, `list.index` and `list.remove` find the same object)."""

    name: str
    embeddings: torch.Tensor
    """Memory rows, projector output at the kept tokens, views concatenated: float [sum K_c, D], CPU."""
    model_id: str
    views: tuple[ConceptView, ...]
    residuals: torch.Tensor | None = None
    """Per-token features that the family's language model adds at visual positions in its first layers,
    at the kept tokens, views concatenated: float [levels, sum K_c, D], CPU (Qwen3-VL's deepstack
    features, one level per tapped vision depth); None for families without them."""

    def __repr__(self) -> str:
        # Short: the generated one prints every tensor (kilobytes for one concept).
        photos = f"{len(self.views)} photo{'s' if len(self.views) != 1 else ''}"
        return f"Concept({self.name!r}, {photos}, {self.num_tokens} memory tokens, model_id={self.model_id!r})"

    @property
    def num_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def keywords(self) -> tuple[str, ...]:
        """The keywords of every view, each once, in the order the views first give them."""
        return tuple(dict.fromkeys(word for view in self.views for word in view.keywords))

    @property
    def nbytes(self) -> int:
        extra = 0 if self.residuals is None else self.residuals.numel() * self.residuals.element_size()
        return self.embeddings.numel() * self.embeddings.element_size() + extra

    @property
    def held_bytes(self) -> int:
        """Everything this concept holds in memory: the storage of its rows, residuals, kept indices and scores,
        and every string (name, model id, keywords, descriptions), as Python counts them."""
        tensors = [self.embeddings, self.residuals, *(t for v in self.views for t in (v.token_indices, v.scores))]
        total = sum(storage_bytes(t) for t in tensors if t is not None)
        total += sys.getsizeof(self.name) + sys.getsizeof(self.model_id) + sys.getsizeof(self.views)
        for view in self.views:
            texts = (view.description, view.size_answer, view.keywords_source, view.area_source, *view.keywords)
            total += sys.getsizeof(view) + sys.getsizeof(view.keywords) + sum(map(sys.getsizeof, texts))
        return total


def check_concepts(concepts) -> list[Concept]:
    """`concepts` as a list: None is none, a single `Concept` is a list of one, any other iterable is listed;
    anything in it that is not a `Concept` (a name, None) is refused with a sentence (`InputError`) before it is
    read."""
    if concepts is None:
        return []
    if isinstance(concepts, Concept):
        return [concepts]
    if isinstance(concepts, (str, bytes, dict)) or not hasattr(concepts, "__iter__"):
        concepts = [concepts]  # "Chelsea" is one wrong item, not five
    concepts = list(concepts)
    for concept in concepts:
        if not isinstance(concept, Concept):
            raise InputError(
                f"concepts must be Concept objects (from introduce or load_concepts); got {type(concept).__name__}."
            )
    return concepts


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the memory behind `tensor` (a slice keeps its whole storage alive)."""
    return max(tensor.untyped_storage().nbytes(), tensor.numel() * tensor.element_size())


def local_model_id(folder) -> str:
    """The model name of a local checkpoint folder, as concept files record it: the folder's name and a digest of
    its config.json. The same folder spelled another way ("ckpt/", "../x/ckpt", "~/x/ckpt", a link), or copied to
    another machine, is the same model; an exported file carries no server path. (Two checkpoints of one
    architecture in folders of one name share the name: the folder's name is what tells them apart.)"""
    resolved = Path(folder).expanduser().resolve()
    try:
        config = (resolved / "config.json").read_bytes()
    except OSError:
        config = b""
    return f"{resolved.name} (local folder, config {hashlib.sha256(config).hexdigest()[:12]})"


_LOCAL_MODEL_ID = re.compile(r"(?P<folder>.+) \(local folder, config [0-9a-f]{12}\)")
_EARLIER_LOCAL_MODEL_ID = re.compile(r"(?P<folder>.+) \(local folder [0-9a-f]{12}\)")
"""How an earlier version named a local folder: "ckpt (local folder 0123456789ab)", a digest of its path."""


def same_model(made_with: str, model_id: str) -> bool:
    """Whether concepts made with `made_with` belong to the model named `model_id`: the same name, or, for a local
    folder, a file written before folders were named by `local_model_id`, which recorded the folder's path as it
    was typed ("/srv/models/ckpt" or "ckpt" for the folder "ckpt")."""
    if made_with == model_id:
        return True
    local = _LOCAL_MODEL_ID.fullmatch(model_id)
    if local is None or _LOCAL_MODEL_ID.fullmatch(made_with):  # a Hub model, or another config: named exactly
        return False
    if earlier := _EARLIER_LOCAL_MODEL_ID.fullmatch(made_with):
        return earlier["folder"] == local["folder"]
    # A path as it was typed; not a Hub id ("someone/ckpt" is another model than the folder "ckpt").
    return not HUB_ID.fullmatch(made_with.strip()) and _folder_name(made_with) == local["folder"]


def _folder_name(path: str) -> str:
    """The last part of a path as it was typed, on any system ("C:\\models\\ckpt\\" and "ckpt/" give "ckpt")."""
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1]


def save_concepts(
    path, concepts, thumbnails=None, *, max_concepts: int = DEFAULT_SETTINGS.max_concept_file_concepts
) -> Path:
    """Write concepts of one model to a single safetensors file; returns the path. A file `read_concepts` would
    refuse (more than `max_concepts` concepts, more views, keywords or text than a file may hold) is not written.

    thumbnails: optional, one PIL image (or None) per concept, stored as uint8 [H, W, 3] tensors
    `c{i}.thumbnail`, shrunk to at most `MAX_THUMBNAIL_PX` on each side (aspect ratio kept) since a larger one
    would not be read back; files without them load as before, and readers that do not know them ignore them.
    Arguments that are not concepts, pictures or a file path raise `InputError`.
    """
    from safetensors.torch import save_file

    concepts = check_concepts(concepts)
    thumbnails = _checked_thumbnails(thumbnails, len(concepts))
    if not concepts:
        raise MemoryFileError("There are no concepts to save; introduce at least one first.")
    model_ids = {c.model_id for c in concepts}
    if len(model_ids) != 1:
        raise MemoryFileError("These concepts come from different models; save each model's concepts separately.")
    _check_readable(concepts, max_concepts)
    try:
        path = Path(path)
    except TypeError:
        raise InputError(
            f"Give the concept file's path as text, for example 'my-concepts.safetensors'; got {type(path).__name__}."
        ) from None
    if path.is_dir():
        raise InputError(f"{str(path)!r} is a folder; give a file name, for example 'my-concepts.safetensors'.")
    if not path.parent.is_dir():
        raise InputError(f"The folder {str(path.parent)!r} does not exist; create it first, or save elsewhere.")
    tensors = {}
    for i, concept in enumerate(concepts):
        tensors[f"c{i}.embeddings"] = concept.embeddings.detach().cpu().clone()
        if concept.residuals is not None:
            tensors[f"c{i}.residuals"] = concept.residuals.detach().cpu().clone()
        if thumbnails[i] is not None:
            width, height = thumbnails[i].size
            pixels = bytearray(thumbnails[i].tobytes())
            tensors[f"c{i}.thumbnail"] = torch.frombuffer(pixels, dtype=torch.uint8).reshape(height, width, 3)
        for j, view in enumerate(concept.views):
            tensors[f"c{i}.v{j}.token_indices"] = view.token_indices.to(torch.int64).cpu().clone()
            tensors[f"c{i}.v{j}.scores"] = view.scores.float().cpu().clone()
    # A failed write (a full disk, no permission) is the machine's, not the caller's: raised as it is.
    save_file(tensors, str(path), metadata={"ego": json.dumps(_document(concepts))})
    return path


def _document(concepts: list[Concept]) -> dict:
    """The JSON description a concept file carries beside its tensors."""
    entries = [
        {
            "name": concept.name,
            "views": [
                {
                    "grid": list(view.grid),
                    "k": view.k,
                    "area_pct": view.area_pct,
                    "keywords": list(view.keywords),
                    "description": view.description,
                    "size_answer": view.size_answer,
                    "keywords_source": view.keywords_source,
                    "area_source": view.area_source,
                }
                for view in concept.views
            ],
        }
        for concept in concepts
    ]
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_id": concepts[0].model_id,
        "hidden_size": int(concepts[0].embeddings.shape[1]),
        "concepts": entries,
    }


_TENSOR_HEADER_BYTES = 128
"""At most what one tensor's entry takes in a safetensors header: its name, dtype, shape and offsets as JSON."""


def concept_file_bytes(concepts, thumbnails=None) -> int:
    """At least the size of the file `save_concepts(path, concepts, thumbnails)` writes, in bytes, computed
    without writing it (at most a few hundred bytes per concept more): what a limit on the files one may read
    back is checked against before more concepts are taken on."""
    concepts = list(concepts)
    if not concepts:
        return 0
    thumbnails = list(thumbnails) if thumbnails is not None else [None] * len(concepts)
    count, data = 0, 0
    for concept, thumbnail in zip(concepts, thumbnails):
        count += 1 + (concept.residuals is not None) + (thumbnail is not None) + 2 * len(concept.views)
        data += concept.nbytes  # in the dtype it is written in: rows and residuals as they are held
        if thumbnail is not None:
            width, height = _stored_size(thumbnail.size)
            data += width * height * 3
        data += sum(8 * view.token_indices.numel() + 4 * view.scores.numel() for view in concept.views)
    header = json.dumps({"__metadata__": {"ego": json.dumps(_document(concepts))}})
    return 8 + len(header.encode("utf-8")) + 8 + _TENSOR_HEADER_BYTES * count + data


def _stored_size(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) a thumbnail of `size` is stored at: at most `MAX_THUMBNAIL_PX` on either side."""
    if max(size) <= MAX_THUMBNAIL_PX:
        return size
    scale = MAX_THUMBNAIL_PX / max(size)
    return tuple(max(1, round(side * scale)) for side in size)  # a 5000 x 2 strip keeps 1 px


def _checked_thumbnails(thumbnails, count: int) -> list:
    """One RGB PIL image (or None) per concept, each at most `MAX_THUMBNAIL_PX` on either side: a larger one is
    shrunk (a 4000 px photo would make a 48 MB file whose thumbnail `read_thumbnails` then ignores)."""
    from PIL import Image

    if thumbnails is None:
        return [None] * count
    if isinstance(thumbnails, (str, bytes, dict)) or not hasattr(thumbnails, "__iter__"):
        raise InputError("Give the thumbnails as a list: one PIL image (or None) per concept.")
    thumbnails = list(thumbnails)
    if len(thumbnails) != count:
        raise InputError(f"{len(thumbnails)} thumbnails for {count} concepts; give one (or None) each.")
    checked = []
    for picture in thumbnails:
        if picture is None:
            checked.append(None)
            continue
        if not isinstance(picture, Image.Image):
            raise InputError(f"Thumbnails must be PIL images (or None); got {type(picture).__name__}.")
        if not picture.width or not picture.height:
            raise InputError("A thumbnail has no pixels; give a picture of the concept, or None.")
        try:
            picture = picture.convert("RGB")  # a new image: the caller's is never changed
        except (ValueError, OSError) as error:
            raise InputError(f"A thumbnail in {picture.mode} mode cannot be stored; give an RGB picture.") from error
        if max(picture.size) > MAX_THUMBNAIL_PX:
            picture = picture.resize(_stored_size(picture.size), Image.Resampling.LANCZOS)
        checked.append(picture)
    return checked


def _check_readable(concepts: list[Concept], max_concepts: int) -> None:
    """MemoryFileError, with what to do, for concepts whose file `read_concepts` would refuse."""
    if len(concepts) > max_concepts:
        raise MemoryFileError(
            f"A concept file holds at most {max_concepts} concepts; you are saving {len(concepts)}. "
            f"Save fewer at a time."
        )
    for concept in concepts:
        if len(concept.views) > MAX_FILE_VIEWS_PER_CONCEPT:
            raise MemoryFileError(
                f"The concept {concept.name!r} has {len(concept.views)} photos; a concept file holds at most "
                f"{MAX_FILE_VIEWS_PER_CONCEPT} per concept. Introduce it again from fewer photos."
            )
        texts = [concept.name, concept.model_id] + [t for v in concept.views for t in (v.description, v.size_answer)]
        if any(len(text) > MAX_FILE_TEXT_CHARS for text in texts):
            raise MemoryFileError(
                f"The concept {concept.name!r} holds a text longer than {MAX_FILE_TEXT_CHARS} characters (its "
                f"name, model name, a description or a size answer); introduce it again with a shorter one."
            )
        for view in concept.views:
            if len(view.keywords) > MAX_FILE_KEYWORDS_PER_VIEW or sum(map(len, view.keywords)) > MAX_FILE_TEXT_CHARS:
                raise MemoryFileError(
                    f"A photo of the concept {concept.name!r} has more keywords than a concept file holds (at most "
                    f"{MAX_FILE_KEYWORDS_PER_VIEW}, {MAX_FILE_TEXT_CHARS} characters together); introduce it "
                    f"again with fewer keywords."
                )


def read_concepts(
    path, *, max_concepts: int = DEFAULT_SETTINGS.max_concept_file_concepts, max_views: int = MAX_FILE_VIEWS_PER_CONCEPT
) -> tuple[dict, list[Concept]]:
    """Parse a concept file without a model: (header document, concepts of at most `max_views` views each).
    Raises MemoryFileError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    not_ours = "This file is not an Ego concept file; export concepts from this app or with ego.save_concepts."
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
        size = path.stat().st_size
    except FileNotFoundError:
        # Its name only: the Space reads uploads from server paths that are never shown.
        raise MemoryFileError(
            f"There is no concept file named {path.name!r} at that path; check the path, or choose the file again."
        ) from None
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
            try:
                document = json.loads(metadata["ego"])
            except RecursionError:
                raise MemoryFileError(
                    "This concept file's description nests deeper than any Ego file does; "
                    "export the concepts again from this app."
                ) from None
            if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
                raise MemoryFileError(not_ours)
            version = document.get("version")
            if type(version) is not int or version != FORMAT_VERSION:  # True and 1.0 equal 1 too
                raise MemoryFileError(
                    f"This concept file has format version {_shown(document.get('version'))}; this version of Ego "
                    f"reads version {FORMAT_VERSION}. Re-export the concepts with this version."
                )
            entries = document["concepts"]
            if not isinstance(entries, list) or len(entries) > max_concepts:
                raise MemoryFileError(f"A concept file may hold at most {max_concepts} concepts.")
            if not entries:  # save_concepts writes none such
                raise MemoryFileError("This concept file holds no concepts; export them again from this app.")
            _check_keys(document, _DOCUMENT_KEYS)
            model_id = _file_text(document["model_id"], "model name")
            hidden = document["hidden_size"]
            if type(hidden) is not int or hidden < 1:
                raise MemoryFileError(not_ours)
            names = set(handle.keys())
            concepts = []
            for i, entry in enumerate(entries):
                if not isinstance(entry, dict) or not isinstance(entry.get("views"), list):
                    raise MemoryFileError(not_ours)
                _check_keys(entry, _CONCEPT_KEYS)
                name = _file_text(entry["name"], "concept name")
                if not entry["views"]:
                    raise MemoryFileError(
                        f"Concept {i + 1} in this file has no reference views, so no memory; "
                        f"introduce it again and export it again."
                    )
                if len(entry["views"]) > max_views:
                    raise MemoryFileError(
                        f"Concept {i + 1} in this file has more than {max_views} reference "
                        f"views; a concept takes at most {max_views} photos."
                    )
                embeddings = handle.get_tensor(f"c{i}.embeddings")
                if not _is_finite_float(embeddings) or embeddings.dim() != 2 or embeddings.shape[1] != hidden:
                    raise MemoryFileError(not_ours)
                residuals = handle.get_tensor(f"c{i}.residuals") if f"c{i}.residuals" in names else None
                if residuals is not None and (
                    not _is_finite_float(residuals)
                    or residuals.dim() != 3
                    or not 1 <= residuals.shape[0] <= MAX_RESIDUAL_LEVELS
                    or tuple(residuals.shape[1:]) != tuple(embeddings.shape)
                ):
                    raise MemoryFileError(not_ours)
                views = [_read_view(handle, i, j, view) for j, view in enumerate(entry["views"])]
                if any(view.k < 1 for view in views) or embeddings.shape[0] == 0:
                    raise MemoryFileError(
                        f"Concept {i + 1} in this file keeps no memory tokens from one of its "
                        f"photos, so it cannot be recognised; introduce it again and export it "
                        f"again."
                    )
                if sum(v.k for v in views) != embeddings.shape[0] or not all(map(_is_consistent, views)):
                    raise MemoryFileError(not_ours)
                concepts.append(
                    Concept(
                        name=name, embeddings=embeddings, model_id=model_id, views=tuple(views), residuals=residuals
                    )
                )
    except MemoryFileError:
        raise
    except (SafetensorError, KeyError, TypeError, ValueError, IndexError, OSError, RecursionError) as error:
        raise MemoryFileError(not_ours) from error
    return document, concepts


def _read_view(handle, i: int, j: int, view) -> ConceptView:
    """One view's record, every field checked for type, range and size (MemoryFileError)."""
    if not isinstance(view, dict):
        raise TypeError("a view is not an object")
    _check_keys(view, _VIEW_KEYS)
    grid, k, area_pct, keywords = view["grid"], view["k"], view["area_pct"], view["keywords"]
    if (
        not isinstance(grid, list)
        or len(grid) != 2
        or any(type(n) is not int for n in grid)
        or type(k) is not int
        or type(area_pct) not in (int, float)
        or not math.isfinite(area_pct)
        or not 0 <= area_pct <= 100
    ):
        raise TypeError("a view's grid, k or area is not what Ego writes")
    if not isinstance(keywords, list) or len(keywords) > MAX_FILE_KEYWORDS_PER_VIEW:
        raise MemoryFileError(
            f"A photo of a concept in this file has more than {MAX_FILE_KEYWORDS_PER_VIEW} "
            f"keywords; export the concepts again from this app."
        )
    keywords = tuple(_file_text(word, "keyword") for word in keywords)
    if sum(map(len, keywords)) > MAX_FILE_TEXT_CHARS:
        raise MemoryFileError(
            f"The keywords of a photo in this file are longer than {MAX_FILE_TEXT_CHARS} "
            f"characters together; export the concepts again from this app."
        )
    sources = {key: view.get(key, "model") for key in _SOURCES}
    if any(value not in _SOURCES[key] for key, value in sources.items()):
        raise TypeError("an unknown source")
    return ConceptView(
        token_indices=handle.get_tensor(f"c{i}.v{j}.token_indices"),
        scores=handle.get_tensor(f"c{i}.v{j}.scores"),
        grid=(grid[0], grid[1]),
        k=k,
        area_pct=float(area_pct),
        keywords=keywords,
        description=_file_text(view["description"], "description"),
        size_answer=_file_text(view.get("size_answer", ""), "size answer"),
        **sources,
    )


def _file_text(value, what: str) -> str:
    """A string of a concept file, bounded and valid Unicode (MemoryFileError otherwise)."""
    if not isinstance(value, str):
        raise TypeError(f"the {what} is not a string")
    if len(value) > MAX_FILE_TEXT_CHARS:
        raise MemoryFileError(
            f"A {what} in this concept file is longer than {MAX_FILE_TEXT_CHARS} characters; "
            f"export the concepts again from this app."
        )
    if not is_valid_text(value):
        raise MemoryFileError(
            f"A {what} in this concept file is not valid Unicode (it holds a lone surrogate); "
            f"export the concepts again from this app."
        )
    return value


def _check_keys(record: dict, allowed: set[str]) -> None:
    """Keys Ego does not write are refused: a file cannot carry data that no check looks at."""
    if not set(record) <= allowed:
        raise TypeError("a key Ego does not write")


def _shown(value) -> str:
    """A value of a hostile file, short and printable, for a message."""
    return ascii(value)[:20]


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
                if (
                    pixels.dtype != torch.uint8
                    or pixels.dim() != 3
                    or pixels.shape[2] != 3
                    or not all(1 <= side <= MAX_THUMBNAIL_PX for side in pixels.shape[:2])
                ):
                    continue
                pictures[i] = Image.fromarray(pixels.contiguous().numpy())
    except (SafetensorError, OSError):
        return [None] * count
    return pictures


MEMORY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The dtypes a memory may be stored in (Ego writes the model's). Others are refused: torch cannot test the float8
kinds for finiteness, and it calls float8_e8m0's NaN finite."""


def _is_finite_float(tensor: torch.Tensor) -> bool:
    return tensor.dtype in MEMORY_DTYPES and bool(torch.isfinite(tensor).all())


def _is_consistent(view: ConceptView) -> bool:
    """The grid, scores and kept indices of a view agree (the app draws pictures from the grid, so a
    hostile file must not claim a grid larger than its data)."""
    rows, cols = view.grid
    indices, scores = view.token_indices, view.scores
    if rows < 1 or cols < 1 or scores.dim() != 1 or not scores.is_floating_point() or rows * cols != scores.numel():
        return False
    if indices.dim() != 1 or indices.dtype != torch.int64 or indices.numel() != view.k:
        return False
    if indices.numel() != indices.unique().numel():  # each token kept once: a view keeps at most its grid
        return False
    return indices.numel() == 0 or (int(indices.min()) >= 0 and int(indices.max()) < scores.numel())


def _loaded_name(name: str, number: int, settings) -> str:
    """A file's concept name held to the rule of `Ego.introduce`'s names (folded white space, no control
    characters, not empty, not too long): a name is a line of the prompt, and a file may come from anyone."""
    try:
        return check_name(name, settings)
    except InputError:
        raise MemoryFileError(
            f"Concept {number} in this file has an empty name or one longer than {settings.max_name_chars} "
            f"characters; rename it where it was made and export it again."
        ) from None


def load_concepts(path, engine) -> list[Concept]:
    """Concepts from a file written by `save_concepts`, checked against `engine`'s model."""
    document, concepts = read_concepts(
        path,
        max_concepts=engine.settings.max_concept_file_concepts,
        max_views=engine.settings.max_references_per_concept,
    )
    if not same_model(document["model_id"], engine.model_id) or int(document["hidden_size"]) != engine.hidden_size:
        raise IncompatibleMemoryError(
            f"These concepts were made with {document['model_id']} and cannot be used with {engine.model_id}; "
            f"introduce them again with this model."
        )
    levels = engine.backend.residual_levels
    if any(c.residuals is not None and c.residuals.shape[0] != levels for c in concepts):
        raise MemoryFileError("This concept file does not match the model it names; export the concepts again.")
    dtype = engine.memory_dtype
    loaded = [
        replace(
            c,
            name=_loaded_name(c.name, number, engine.settings),
            embeddings=c.embeddings.to(dtype),
            residuals=None if c.residuals is None else c.residuals.to(dtype),
            model_id=engine.model_id,  # the same model, perhaps named the way an older file named it
        )
        for number, c in enumerate(concepts, 1)
    ]
    # Finite as stored, but maybe not in the model's dtype (float32's 3e38 is inf in bfloat16).
    if not all(
        _is_finite_float(c.embeddings) and (c.residuals is None or _is_finite_float(c.residuals)) for c in loaded
    ):
        raise MemoryFileError(
            "This concept file holds memory values this model cannot read; export the concepts again."
        )
    return loaded
