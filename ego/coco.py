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

What it writes, under `--out`: `images/<file_name>` (a copy of the COCO image), `masks/<stem>.png` (the
instance's mask, 0 / 255, same size as the image, decoded from its polygons or RLE with pycocotools), and
`manifest.json` (the rule's parameters, each picked image with its category and area share, and the count per
category), which `python -m ego.calibrate --images OUT/images --masks OUT/masks` reads as image/mask pairs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_COUNT = 500
DEFAULT_MIN_AREA_PCT = 5.0


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


def build(
    annotations: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    count: int = DEFAULT_COUNT,
    min_area_pct: float = DEFAULT_MIN_AREA_PCT,
) -> dict:
    """Write the calibration set (module docstring) and return its manifest."""
    images, out = Path(images), Path(out)
    document = json.loads(Path(annotations).read_text(encoding="utf-8"))
    chosen = balanced(single_instances(document, min_area_pct=min_area_pct), count)
    for folder in (out / "images", out / "masks"):
        if folder.is_dir() and any(folder.iterdir()):  # calibration reads every pair there, old ones included
            raise FileExistsError(f"{folder} already holds files; give an empty --out folder, or remove it first")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    written, missing = [], []
    for pick in chosen:
        source = images / pick.file_name
        if not source.is_file():
            missing.append(pick.file_name)
            continue
        shutil.copyfile(source, out / "images" / pick.file_name)
        mask = instance_mask(pick.annotation, pick.height, pick.width)
        Image.fromarray((mask * 255).astype(np.uint8)).save(out / "masks" / f"{Path(pick.file_name).stem}.png")
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
    manifest = {
        "source": str(annotations),
        "rule": "exactly one annotation per image, not a crowd region",
        "min_area_pct": min_area_pct,
        "count_asked": count,
        "count": len(written),
        "per_category": dict(sorted(per_category.items())),
        "missing_images": missing,
        "images": written,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


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
    try:
        manifest = build(args.annotations, args.images, args.out, count=args.count, min_area_pct=args.min_area_pct)
    except FileExistsError as error:
        print(f"{error}.", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as error:
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
        ),
        file=sys.stderr,
    )
    return 0 if manifest["count"] else 1


if __name__ == "__main__":
    sys.exit(main())
