"""Layer calibration (paper section 3, "Phase 0"): which LLM layers'
keyword-to-image attention best finds the described object.

    python -m ego.calibrate --model internvl3-14b --images coco/images --masks coco/masks --keep 5

For every image with a binary mask of the same file stem (COCO single-category, single-instance
images, the mask of the one instance):

1. the engine's own description step runs on the image as a reference image (same prompt, same
   pixel budget, greedy), with the keyword rows captured at EVERY text layer;
2. per layer l, the importance of each visual token is Eq. 3 restricted to that layer: the mean over
   all query heads and all keyword tokens of the keyword -> visual-token attention;
3. the mask is mapped onto the visual-token grid (rows x cols, the whole image in raster order): a
   token is "object" when the mask covers at least half of its cell (cell = its share of the image,
   ``adaptive_avg_pool2d`` bins) OR the pixel at the cell's centre is in the mask;
4. the layer's score on the image is precision@K: the share of its K most important tokens that are
   object tokens (K = --top-k, 50 by default, capped at the number of visual tokens). Beside it, the size-fair
   score: precision at K = the number of object tokens (R-precision), which a small object can reach 1.0 on while
   its precision@50 cannot pass (object tokens) / 50.

Layers are ranked by their mean precision@K over the images (`--rank-by size-fair`: by the size-fair score;
ties: lower index first); the best --keep
layers are written as JSON ``{"model_id", "layers", "scores", "images", "top_k", ...}``, which
``Ego.from_pretrained(model, layers="calibration.json")`` reads for that model only (another one's file is refused,
whatever its depth). Layer indices are 0-based decoder
layers (index 0 = the first transformer block; there is no embedding entry), the convention of the
``output_attentions`` tuple and of ``ego.presets``.

Images whose mask covers no visual token, or whose description has no words, are skipped and listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import options
from .media import load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MIN_COVERAGE = 0.5
"""A visual token is an object token when the mask covers at least this share of its cell (or its centre)."""
MASK_RULE = "object token: mask covers >= 50% of the token's cell, or the cell's centre pixel is in the mask"


# ------------------------------------------------------------------------------------------------
# The pieces, as plain functions
# ------------------------------------------------------------------------------------------------
def binary_mask(mask) -> np.ndarray:
    """A boolean [H, W] array from a mask image, path or array (non-zero = object; 8-bit masks: >= 128)."""
    if isinstance(mask, np.ndarray):
        array = mask
    elif isinstance(mask, torch.Tensor):
        array = mask.cpu().numpy()
    else:
        array = _mask_values(mask)
    if array.ndim == 3:
        array = array.max(axis=-1)
    if array.dtype == bool:
        return array
    threshold = 127 if array.dtype == np.uint8 and array.max() > 1 else 0
    return array > threshold


def _mask_values(path) -> np.ndarray:
    """A mask file's (or a PIL image's) own values, oriented as its image: 16-bit labels unscaled, a palette's
    indices (0 = background), any alpha channel left out. Not `load_image`, which prepares photos: it scales 16-bit
    values to 8 bits (a label 1 becomes 0), paints a palette's colours and composites transparency on white."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from .errors import InputError

    if isinstance(path, Image.Image):
        array, mode = np.asarray(path), path.mode
    else:
        try:
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened)
                array, mode = np.asarray(image), image.mode
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            raise InputError(f"{Path(str(path)).name} is not a readable mask image") from error
    if mode == "P":
        return array != 0
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        array = array[..., :-1]
    return array


def object_tokens(mask, grid: tuple[int, int], *, min_coverage: float = MIN_COVERAGE) -> torch.Tensor:
    """Which of the rows x cols visual tokens (raster order) lie on the object: BoolTensor [rows * cols].

    The grid spans the whole image (both Qwen's resize and InternVL's single 448 px tile map the full
    image onto it), so cell (i, j) is the block of pixels [i*H/rows, (i+1)*H/rows) x [j*W/cols, (j+1)*W/cols).
    """
    # A copy: a mode "1" mask image reads as a read-only array, which torch.from_numpy warns about.
    binary = torch.from_numpy(np.array(binary_mask(mask), dtype=bool, order="C"))
    height, width = binary.shape
    rows, cols = int(grid[0]), int(grid[1])
    coverage = F.adaptive_avg_pool2d(binary.float()[None, None], (rows, cols))[0, 0]  # [rows, cols]
    centre_y = ((torch.arange(rows) + 0.5) * height / rows).long().clamp(max=height - 1)
    centre_x = ((torch.arange(cols) + 0.5) * width / cols).long().clamp(max=width - 1)
    centre = binary[centre_y][:, centre_x]
    return ((coverage >= min_coverage) | centre).flatten()


def precision_at_k(importance: torch.Tensor, objects: torch.Tensor, k: int) -> torch.Tensor:
    """importance [num_layers, N]; objects Bool [N] -> share of each layer's top-k tokens on the object [num_layers]."""
    k = max(1, min(int(k), importance.shape[-1]))
    top = importance.float().topk(k, dim=-1).indices  # [num_layers, k]
    return objects.to(importance.device)[top].float().mean(dim=-1).cpu()


def size_fair_precision(importance: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """importance [num_layers, N]; objects Bool [N] -> precision at K = the number of object tokens [num_layers]:
    1.0 when a layer's most important tokens are exactly the object's, whatever its size."""
    return precision_at_k(importance, objects, int(objects.sum()))


RANK_BY = ("precision", "size-fair")
"""What `calibrate` ranks the layers by: precision@K (the default; the paper does not name its overlap score)
or the size-fair score."""


def find_pairs(images_dir, masks_dir) -> list[tuple[Path, Path]]:
    """(image, mask) paths whose file stems match, sorted by stem; images without a mask are left out."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    masks = {}
    for path in sorted(masks_dir.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            masks.setdefault(path.stem, path)
    pairs = []
    for path in sorted(images_dir.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path.stem in masks:
            pairs.append((path, masks[path.stem]))
    return pairs


# ------------------------------------------------------------------------------------------------
# One image: the engine's description step, attention captured at every layer
# ------------------------------------------------------------------------------------------------
class SkipImage(Exception):
    """An image that cannot be scored; the message says why."""


@dataclass
class DescribedImage:
    importance: torch.Tensor
    """Eq. 3 per layer: [num_layers, N_r], mean over heads and keyword tokens."""
    grid: tuple[int, int]
    description: str
    keywords: tuple[str, ...]
    objects: torch.Tensor | None = None
    """The mask on the visual-token grid (when a mask was given): Bool [N_r]."""


def describe_with_attention(engine, image, mask=None) -> DescribedImage:
    """The engine's own self-description of `image` (as a reference image), attention captured at every layer.

    With a `mask`, it is mapped onto the token grid first, and an image whose mask covers no visual token
    is skipped before the language model runs. Raises SkipImage.
    """
    from .engine import keyword_positions, layer_importance  # imports transformers: not needed for --help
    from .errors import InputError

    try:
        picture = load_image(image, engine.settings)
        binary = binary_mask(mask) if mask is not None else None
    except InputError as error:
        raise SkipImage(f"unreadable: {error}") from error
    if binary is not None and binary.shape != (picture.height, picture.width):
        raise SkipImage(
            f"the mask is {binary.shape[1]}x{binary.shape[0]} pixels and the image {picture.width}x{picture.height}"
        )
    reference = engine.encode_reference(picture)
    objects = object_tokens(binary, reference.grid) if binary is not None else None
    if objects is not None and not objects.any():
        raise SkipImage("the mask covers no visual token")
    described = engine.describe(reference, range(engine.num_layers), size_new_tokens=1)
    if not described.ids:
        raise SkipImage("the description is empty")
    tokenizer = engine.backend.tokenizer
    positions, keywords = keyword_positions(
        tokenizer, described.ids, content_only=engine.settings.keywords_drop_stopwords
    )
    recorded = described.capture.recorded_positions()
    rows = [described.start + i for i in positions if described.start + i in recorded]
    if not rows:
        raise SkipImage("the description has no words")
    importance = layer_importance(described.capture, rows)  # [num_layers, N_r]
    description = tokenizer.decode(described.ids, skip_special_tokens=True)
    return DescribedImage(
        importance=importance,
        grid=(int(reference.grid[0]), int(reference.grid[1])),
        description=description,
        keywords=tuple(keywords),
        objects=objects,
    )


# ------------------------------------------------------------------------------------------------
# Many images: rank the layers
# ------------------------------------------------------------------------------------------------
@dataclass
class CalibrationResult:
    model_id: str
    num_layers: int
    top_k: int
    keep: int
    precision: torch.Tensor
    """precision@K per image and layer: [images, num_layers]."""
    size_fair: torch.Tensor | None = None
    """precision at K = the image's number of object tokens, per image and layer: [images, num_layers]."""
    rank_by: str = "precision"
    """"precision" (precision@K) or "size-fair": which score the ranking and the chosen layers follow."""
    names: tuple[str, ...] = ()
    """The scored images, in the rows' order."""
    skipped: tuple[tuple[str, str], ...] = ()
    """(image, reason) for the images left out."""
    descriptions: tuple[str, ...] = field(default=(), repr=False)

    @property
    def images(self) -> int:
        return int(self.precision.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        return self.precision.mean(dim=0) if self.images else torch.zeros(self.num_layers)

    @property
    def std(self) -> torch.Tensor:
        return self.precision.std(dim=0, unbiased=False) if self.images else torch.zeros(self.num_layers)

    @property
    def size_fair_mean(self) -> torch.Tensor:
        rows = self.size_fair
        return rows.mean(dim=0) if rows is not None and rows.shape[0] else torch.zeros(self.num_layers)

    @property
    def ranking(self) -> list[int]:
        """All layers, best first (by the mean of the `rank_by` score; ties: lower index first)."""
        mean = (self.size_fair_mean if self.rank_by == "size-fair" else self.mean).tolist()
        # Compared at the 6 digits the layers file shows: float32 means of the same scores summed in another order
        # differ in the 8th digit, and a tie must go to the lower layer whatever the order.
        return sorted(range(self.num_layers), key=lambda layer: (-round(mean[layer], 6), layer))

    @property
    def layers(self) -> tuple[int, ...]:
        """The best `keep` layers, in increasing order (the set L)."""
        return tuple(sorted(self.ranking[: self.keep]))

    @property
    def scores(self) -> dict[int, float]:
        return {layer: float(value) for layer, value in enumerate(self.mean.tolist())}

    def to_json(self) -> dict:
        std = self.std.tolist()
        return {
            "model_id": self.model_id,
            "layers": list(self.layers),
            "scores": {str(layer): round(value, 6) for layer, value in self.scores.items()},
            "std": {str(layer): round(float(value), 6) for layer, value in enumerate(std)},
            "size_fair_scores": {
                str(layer): round(float(v), 6) for layer, v in enumerate(self.size_fair_mean.tolist())
            },
            "rank_by": self.rank_by,
            "ranking": self.ranking,
            "images": self.images,
            "top_k": self.top_k,
            "keep": self.keep,
            "num_layers": self.num_layers,
            "layer_index": "0-based decoder layers (0 = first transformer block)",
            "metric": "precision@top_k of each layer's Eq. 3 importance (mean over heads and keywords); "
            "size_fair_scores: precision at K = the image's number of object tokens",
            "mask_rule": MASK_RULE,
            "skipped": [{"image": name, "reason": reason} for name, reason in self.skipped],
        }

    def write(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def table(self) -> str:
        """One line per layer, best first; chosen layers are starred."""
        chosen, mean, std = set(self.layers), self.mean.tolist(), self.std.tolist()
        fair = self.size_fair_mean.tolist()
        lines = [f"{'rank':>4}  {'layer':>5}  {'precision@' + str(self.top_k):>13}  {'std':>6}  {'size-fair':>9}"]
        for rank, layer in enumerate(self.ranking, 1):
            star = "  *" if layer in chosen else ""
            lines.append(f"{rank:>4}  {layer:>5}  {mean[layer]:>13.4f}  {std[layer]:>6.4f}  {fair[layer]:>9.4f}{star}")
        return "\n".join(lines)


def calibrate(
    engine,
    pairs: Iterable,
    keep: int = 5,
    top_k: int = 50,
    progress: Callable[[str], None] | None = None,
    rank_by: str = "precision",
) -> CalibrationResult:
    """Rank `engine`'s text layers by how well their keyword attention lands on the object.

    pairs: (image, mask) or (name, image, mask) items; images and masks are paths, PIL images or arrays.
    progress: called with one line of text per image.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("No image/mask pairs to calibrate on.")
    if keep < 1 or keep > engine.num_layers:
        raise ValueError(f"keep must be between 1 and {engine.num_layers}; got {keep}.")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1; got {top_k}.")
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}; got {rank_by!r}.")
    rows, fair_rows, names, skipped, descriptions = [], [], [], [], []
    for index, pair in enumerate(pairs, 1):
        name, image, mask = pair if len(pair) == 3 else (_name_of(pair[0], index), *pair)
        try:
            with engine.exclusive_use():
                described = describe_with_attention(engine, image, mask)
        except SkipImage as reason:
            skipped.append((name, str(reason)))
            _say(progress, f"[{index}/{len(pairs)}] {name}: skipped ({reason})")
            continue
        objects = described.objects
        precision = precision_at_k(described.importance, objects, top_k)
        rows.append(precision)
        fair_rows.append(size_fair_precision(described.importance, objects))
        names.append(name)
        descriptions.append(described.description)
        best = int(precision.argmax())
        _say(
            progress,
            f"[{index}/{len(pairs)}] {name}: {int(objects.sum())}/{objects.numel()} object tokens, "
            f"best layer {best} (precision {float(precision[best]):.2f}); "
            f"keywords: {', '.join(described.keywords[:8])}",
        )
    precision = torch.stack(rows) if rows else torch.zeros(0, engine.num_layers)
    size_fair = torch.stack(fair_rows) if fair_rows else torch.zeros(0, engine.num_layers)
    return CalibrationResult(
        model_id=engine.model_id,
        num_layers=engine.num_layers,
        top_k=int(top_k),
        keep=int(keep),
        precision=precision,
        size_fair=size_fair,
        rank_by=rank_by,
        names=tuple(names),
        skipped=tuple(skipped),
        descriptions=tuple(descriptions),
    )


def _name_of(image, index: int) -> str:
    return Path(image).name if isinstance(image, (str, Path)) else f"image {index}"


def _say(progress, line: str) -> None:
    if progress is not None:
        progress(line)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ego.calibrate",
        description="Rank a model's LLM layers by how well the attention of its self-description's keywords "
        "lands on the object of single-instance masks (COCO style), and write the best ones as JSON "
        "for Ego.from_pretrained(..., layers=FILE).",
    )
    parser.add_argument("--model", required=True, help="preset name (see ego.presets), Hub id or local checkpoint")
    parser.add_argument("--images", required=True, help="folder of images")
    parser.add_argument(
        "--masks",
        required=True,
        help="folder of binary masks, one per image, same file stem (object = white: non-zero, "
        "or >= 128 in 0-255 masks)",
    )
    parser.add_argument("--keep", type=int, default=5, help="how many layers to keep (default 5, as in the paper)")
    parser.add_argument("--top-k", type=int, default=50, help="K of precision@K (default 50)")
    parser.add_argument(
        "--rank-by",
        choices=list(RANK_BY),
        default="precision",
        help="precision: mean precision@K (default; the paper does not name its score); size-fair: mean precision "
        "at K = the object's number of tokens (small objects count as much as large ones)",
    )
    parser.add_argument("--out", help="output JSON (default calibration-<model>.json)")
    options.add_quantization(parser)
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many image/mask pairs")
    options.add_protocol(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Checked before the model loads (minutes for a large one) and before scoring (the result is written last).
    if args.keep < 1 or args.top_k < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--keep, --top-k and --limit must be at least 1")
    out = Path(args.out) if args.out else Path(f"calibration-{_slug(args.model)}.json")
    if not out.parent.is_dir():
        parser.error(f"--out: the folder {out.parent} does not exist; create it or give another path")
    for option, folder in (("--images", Path(args.images)), ("--masks", Path(args.masks))):
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            parser.error(f"{option}: {folder} {what}; give the folder that holds the {option[2:]}")
    try:
        pairs = find_pairs(args.images, args.masks)
    except OSError as error:
        parser.error(f"could not list {error.filename}: {error.strerror}; give folders this user can read")
    if args.limit is not None:
        pairs = pairs[: args.limit]
    if not pairs:
        print(f"No image in {args.images} has a mask with the same file name stem in {args.masks}.", file=sys.stderr)
        return 2
    from .engine import Ego

    print(f"Loading {args.model} ...", file=sys.stderr, flush=True)
    engine = Ego.from_pretrained(
        args.model,
        quantization=options.quantization(args.quantization),
        device=args.device,
        settings=options.protocol_settings(args.protocol),
    )
    if args.keep > engine.num_layers:
        print(
            f"--keep must be at most {engine.num_layers}, this model's text layers; got {args.keep}.", file=sys.stderr
        )
        return 2
    print(
        f"{engine.model_id}: {engine.num_layers} text layers; {len(pairs)} image/mask pairs; "
        f"keep {args.keep}, precision@{args.top_k}",
        file=sys.stderr,
        flush=True,
    )
    result = calibrate(
        engine,
        [(image.name, image, mask) for image, mask in pairs],
        keep=args.keep,
        top_k=args.top_k,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        rank_by=args.rank_by,
    )
    if result.images == 0:
        print("No image could be scored (see the lines above); nothing written.", file=sys.stderr)
        return 1
    print(result.table())
    result.write(out)
    print(
        f"\nBest {args.keep} layers: {list(result.layers)} ({result.images} images, "
        f"{len(result.skipped)} skipped). Written to {out}; use them with "
        f"Ego.from_pretrained({args.model!r}, layers={str(out)!r})."
    )
    return 0


def _slug(model: str) -> str:
    """A file-name-safe name: a preset or Hub id with "/" -> "_", or a local folder's own name."""
    text = str(model).rstrip("/\\")
    if Path(text).exists():
        text = Path(text).name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


if __name__ == "__main__":
    sys.exit(main())
