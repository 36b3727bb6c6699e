"""The calibration set, built from COCO's own files (paper: layers are calibrated on COCO single-instance masks).

    python -m ego.coco --annotations annotations/instances_val2017.json --images val2017 --out coco-calibration
    python -m ego.calibrate --model internvl3-14b --images coco-calibration/images --masks coco-calibration/masks

Which images: those whose annotations are exactly ONE instance, not a crowd region (an image with a crowd
region too is left out: the crowd's objects are unmarked), covering at least `--min-area-pct` of the image
(default 5 %: about 13 of InternVL3's 256 visual tokens, so a keyword's attention has an object to find).

How many, and which: at most `--count` images (default 500), as even over the categories as COCO allows:
each category's candidates are ordered by image id, and the categories take turns (by name) giving their
next image until the count is reached, so no category gives more than one image more than another that still
has candidates. No randomness: the same files give the same set.

What it writes, under `--out`: `images/<file_name>` (a copy of the COCO image; a name in subfolders is written
flat, "a/b.jpg" as "a_b.jpg"), `masks/<stem>.png` (the instance's mask, 0 / 255, same size as the image, decoded
from its polygons or RLE with pycocotools), and `manifest.json` (the rule's parameters, each picked image with its
category and area share, the count per category, and the images left out and why), which
`python -m ego.calibrate --images OUT/images --masks OUT/masks` reads as image/mask pairs. The set is written in a
temporary folder inside `--out` and moved into place at the end: a failed run leaves no partial set.

COCO's annotations follow a JPEG's stored pixels, while the engine (and so the calibration) turns a photo upright
by its EXIF orientation: an image stored turned is written upright, without the tag, and its mask turned the same
way (`turned_upright` in the manifest). A file name that is not a path inside the image folder (absolute, or with
"..") is left out, as is a second image whose flat name would repeat another's file stem.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import ExifTags, Image, ImageOps

DEFAULT_COUNT = 500
DEFAULT_MIN_AREA_PCT = 5.0
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""What turns a picture stored with each EXIF orientation upright, as `PIL.ImageOps.exif_transpose` (and so
`ego.media.load_image`) does."""


@dataclass(frozen=True)
class Pick:
    image_id: int
    file_name: str
    category: str
    area_pct: float
    annotation: dict
    height: int
    width: int


def instance_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    """The boolean [height, width] mask of one COCO annotation: polygons, uncompressed RLE (counts as a list)
    or compressed RLE (counts as a string)."""
    from pycocotools import mask as mask_utils

    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):  # polygons: [[x1, y1, x2, y2, ...], ...]
        # A polygon needs three points; pycocotools reads a list whose first entry has 4 numbers as boxes.
        polygons = [polygon for polygon in segmentation if len(polygon) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:  # compressed RLE
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(bool)


def single_instances(document: dict, *, min_area_pct: float = DEFAULT_MIN_AREA_PCT) -> list[Pick]:
    """Every image of an `instances_*.json` document with exactly one annotation, not a crowd, whose area is at
    least `min_area_pct` of the image; in image id order."""
    categories = {c["id"]: c["name"] for c in document.get("categories", [])}
    by_image: dict[int, list[dict]] = {}
    for annotation in document.get("annotations", []):
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    picks = []
    for image in sorted(document.get("images", []), key=lambda i: i["id"]):
        annotations = by_image.get(image["id"], [])
        if len(annotations) != 1 or annotations[0].get("iscrowd", 0):
            continue
        annotation = annotations[0]
        area_pct = 100.0 * float(annotation["area"]) / (image["height"] * image["width"])
        if area_pct < min_area_pct:
            continue
        picks.append(
            Pick(
                image_id=image["id"],
                file_name=image["file_name"],
                category=categories.get(annotation["category_id"], str(annotation["category_id"])),
                area_pct=round(area_pct, 2),
                annotation=annotation,
                height=image["height"],
                width=image["width"],
            )
        )
    return picks


def balanced(picks: Sequence[Pick], count: int) -> list[Pick]:
    """At most `count` of `picks`, the categories taking turns (sorted by name), each giving its candidates in
    the order given."""
    queues: dict[str, list[Pick]] = {}
    for pick in picks:
        queues.setdefault(pick.category, []).append(pick)
    chosen, turn = [], 0
    names = sorted(queues)
    while len(chosen) < count and any(turn < len(queues[name]) for name in names):
        for name in names:
            if turn < len(queues[name]) and len(chosen) < count:
                chosen.append(queues[name][turn])
        turn += 1
    return chosen


def read_document(annotations: str | Path) -> dict:
    """An `instances_*.json` document: a JSON object whose images, annotations and categories are lists of objects;
    ValueError with a sentence for anything else."""
    document = json.loads(Path(annotations).read_text(encoding="utf-8"))
    if not isinstance(document, dict):
        raise ValueError(f"it holds a JSON {type(document).__name__}, not an object with images and annotations")
    for key in ("images", "annotations", "categories"):
        entries = document.get(key, [])
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise ValueError(f'its "{key}" is not a list of objects')
    return document


def flat_name(file_name) -> str | None:
    """The name an image's `file_name` is written under in the set: its folders and name joined by "_" (calibration
    reads one flat folder), or None for a name that is not a path inside the image folder."""
    if not isinstance(file_name, str) or "\0" in file_name:
        return None
    relative = PurePosixPath(file_name.replace("\\", "/"))
    if relative.is_absolute() or PureWindowsPath(file_name).drive or ".." in relative.parts or not relative.parts:
        return None
    return "_".join(relative.parts)


def build(
    annotations: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    count: int = DEFAULT_COUNT,
    min_area_pct: float = DEFAULT_MIN_AREA_PCT,
) -> dict:
    """Write the calibration set (module docstring) and return its manifest."""
    if count < 1:
        raise ValueError(f"count must be at least 1; got {count}")
    images, out = Path(images), Path(out)
    document = read_document(annotations)
    chosen = balanced(single_instances(document, min_area_pct=min_area_pct), count)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a folder for --out")
    for folder in (out / "images", out / "masks"):
        if folder.is_dir() and any(folder.iterdir()):  # calibration reads every pair there, old ones included
            raise FileExistsError(f"{folder} already holds files; give an empty --out folder, or remove it first")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    moved = []
    try:
        manifest = _write_set(chosen, images, staging)
        manifest = {
            "source": str(annotations),
            "rule": "exactly one annotation per image, not a crowd region",
            "min_area_pct": min_area_pct,
            "count_asked": count,
            **manifest,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        for name in ("images", "masks"):
            if (out / name).is_dir():
                (out / name).rmdir()  # empty, as checked above
            (staging / name).rename(out / name)
            moved.append(out / name)
        (staging / "manifest.json").replace(out / "manifest.json")
    except BaseException:
        for folder in moved:
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write_set(chosen: Sequence[Pick], images: Path, out: Path) -> dict:
    """The images and masks of `chosen` under `out`; the manifest's counts and lists."""
    (out / "images").mkdir()
    (out / "masks").mkdir()
    written, missing, skipped, turned = [], [], [], []
    stems: set[str] = set()
    for pick in chosen:
        name = flat_name(pick.file_name)
        if name is None:
            skipped.append({"file_name": pick.file_name, "reason": "not a file name inside the image folder"})
            continue
        if Path(name).stem.lower() in stems:  # one mask per stem, and some file systems ignore case
            skipped.append({"file_name": pick.file_name, "reason": f"another image is written as {Path(name).stem}"})
            continue
        source = images.joinpath(*PurePosixPath(pick.file_name.replace("\\", "/")).parts)
        if not source.is_file():
            missing.append(pick.file_name)
            continue
        reason, orientation = _write_pair(pick, source, out / "images" / name, out / "masks" / f"{Path(name).stem}.png")
        if reason is not None:
            skipped.append({"file_name": pick.file_name, "reason": reason})
            continue
        stems.add(Path(name).stem.lower())
        if orientation in UPRIGHT:
            turned.append(pick.file_name)
        written.append(
            {
                "image_id": pick.image_id,
                "file_name": pick.file_name,
                "category": pick.category,
                "area_pct": pick.area_pct,
            }
        )
    per_category: dict[str, int] = {}
    for entry in written:
        per_category[entry["category"]] = per_category.get(entry["category"], 0) + 1
    return {
        "count": len(written),
        "per_category": dict(sorted(per_category.items())),
        "missing_images": missing,
        "skipped_images": skipped,
        "turned_upright": turned,
        "images": written,
    }


def _write_pair(pick: Pick, source: Path, image_path: Path, mask_path: Path) -> tuple[str | None, int]:
    """Write the image and its mask, upright; (why it cannot be, or None; its EXIF orientation)."""
    try:
        with Image.open(source) as opened:
            width, height = opened.size
            orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
            if (width, height) != (pick.width, pick.height):
                return f"the image is {width}x{height} pixels, its annotation {pick.width}x{pick.height}", orientation
            mask = Image.fromarray((instance_mask(pick.annotation, pick.height, pick.width) * 255).astype(np.uint8))
            if orientation in UPRIGHT:
                upright = ImageOps.exif_transpose(opened)
                upright.save(image_path, quality=95, icc_profile=opened.info.get("icc_profile"))
                mask = mask.transpose(UPRIGHT[orientation])
            else:
                shutil.copyfile(source, image_path)
    except (Image.UnidentifiedImageError, Image.DecompressionBombError) as error:
        return f"not a readable image ({error})", 1
    mask.save(mask_path)
    return None, orientation


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ego.coco",
        description="Build the layer-calibration set (images and single-instance "
        "masks) from a COCO instances_*.json file and its images.",
    )
    parser.add_argument("--annotations", required=True, help="COCO instances_*.json")
    parser.add_argument("--images", required=True, help="the folder of its images (e.g. val2017)")
    parser.add_argument("--out", required=True, help="output folder (images/, masks/, manifest.json)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help=f"images at most (default {DEFAULT_COUNT})")
    parser.add_argument(
        "--min-area-pct",
        type=float,
        default=DEFAULT_MIN_AREA_PCT,
        help=f"smallest instance, in percent of the image (default {DEFAULT_MIN_AREA_PCT:g})",
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1; got {args.count}")
    try:
        manifest = build(args.annotations, args.images, args.out, count=args.count, min_area_pct=args.min_area_pct)
    except FileExistsError as error:
        print(f"{error}.", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(
            f"Could not build the set from {args.annotations}: {error}. Give a COCO instances_*.json file "
            f"and the folder of its images.",
            file=sys.stderr,
        )
        return 2
    print(
        f"{manifest['count']} images in {len(manifest['per_category'])} categories written to {args.out}"
        + (
            f"; {len(manifest['missing_images'])} images not found in {args.images}"
            if manifest["missing_images"]
            else ""
        )
        + (
            f"; {len(manifest['skipped_images'])} left out (skipped_images in manifest.json says why)"
            if manifest["skipped_images"]
            else ""
        ),
        file=sys.stderr,
    )
    return 0 if manifest["count"] else 1


if __name__ == "__main__":
    sys.exit(main())
