"""ego.coco: the calibration set from a fixture written in COCO's own annotation schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from ego import coco
from ego.calibrate import binary_mask, find_pairs

H, W = 40, 60


def rectangle(top, left, bottom, right) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written here by hand: run lengths over the column-major pixels, starting with 0s."""
    flat = mask.flatten(order="F").astype(int)
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}  # as instances_*.json stores it


POLYGON_MASK = rectangle(10, 10, 30, 40)  # 20 x 30 = 600 px = 25 % of 2400
RLE_MASK = rectangle(0, 30, 20, 60)  # 600 px
UNCOMPRESSED_MASK = rectangle(5, 5, 25, 25)  # 400 px


def annotation(ann_id, image_id, category_id, segmentation, area, iscrowd=0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "area": float(area),
        "bbox": [0.0, 0.0, 1.0, 1.0],
        "iscrowd": iscrowd,
    }


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "val").mkdir()
    images = [
        {
            "id": i,
            "file_name": f"{i:012d}.jpg",
            "height": H,
            "width": W,
            "license": 1,
            "coco_url": "",
            "date_captured": "",
            "flickr_url": "",
        }
        for i in range(1, 9)
    ]
    for image in images:
        Image.new("RGB", (W, H), (image["id"] * 20, 90, 30)).save(root / "val" / image["file_name"])
    polygon = [[10.0, 10.0, 40.0, 10.0, 40.0, 30.0, 10.0, 30.0]]  # x, y pairs of the rectangle's corners
    annotations = [
        annotation(1, 1, 18, polygon, 600),  # kept: polygon
        annotation(2, 2, 17, compressed_rle(RLE_MASK), 600),  # kept: compressed RLE
        annotation(3, 3, 18, uncompressed_rle(UNCOMPRESSED_MASK), 400),  # kept: uncompressed RLE
        annotation(4, 4, 18, polygon, 600),
        annotation(5, 4, 17, polygon, 600),  # two instances
        annotation(6, 5, 1, uncompressed_rle(RLE_MASK), 600, iscrowd=1),  # a crowd only
        annotation(7, 6, 1, [[0.0, 0.0, 4.0, 0.0, 4.0, 4.0]], 8),  # below the minimum area
        annotation(8, 7, 1, polygon, 600),
        annotation(9, 7, 1, uncompressed_rle(RLE_MASK), 600, iscrowd=1),
    ]  # image 8: nothing at all
    document = {
        "info": {},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 17, "name": "cat", "supercategory": "animal"},
            {"id": 18, "name": "dog", "supercategory": "animal"},
        ],
    }
    (root / "instances_val.json").write_text(json.dumps(document))
    return root


def test_single_non_crowd_instances_above_the_minimum_area_are_picked(fixture):
    document = json.loads((fixture / "instances_val.json").read_text())
    picks = coco.single_instances(document, min_area_pct=5)
    assert [(p.image_id, p.category) for p in picks] == [(1, "dog"), (2, "cat"), (3, "dog")]
    assert picks[0].area_pct == 25.0


def test_the_set_is_written_with_masks_decoded_from_polygons_and_rle(fixture, tmp_path):
    manifest = coco.build(fixture / "instances_val.json", fixture / "val", tmp_path / "set", count=10)
    assert manifest["count"] == 3 and manifest["per_category"] == {"cat": 1, "dog": 2}
    pairs = find_pairs(tmp_path / "set" / "images", tmp_path / "set" / "masks")
    assert [image.stem for image, _ in pairs] == ["000000000001", "000000000002", "000000000003"]
    expected = [POLYGON_MASK, RLE_MASK, UNCOMPRESSED_MASK]
    for (_, mask_path), mask in zip(pairs, expected):
        decoded = binary_mask(mask_path)
        # pycocotools rasterizes a polygon's edges inclusively; the region is the rectangle give or take a pixel.
        assert decoded.shape == (H, W) and (decoded != mask).sum() <= mask.shape[0] + mask.shape[1]
    assert np.array_equal(binary_mask(pairs[1][1]), RLE_MASK)
    assert np.array_equal(binary_mask(pairs[2][1]), UNCOMPRESSED_MASK)


def test_categories_take_turns_up_to_the_count(fixture):
    document = json.loads((fixture / "instances_val.json").read_text())
    picks = coco.single_instances(document, min_area_pct=5)
    assert [(p.image_id, p.category) for p in coco.balanced(picks, 2)] == [(2, "cat"), (1, "dog")]
    assert [p.image_id for p in coco.balanced(picks, 10)] == [2, 1, 3]


def test_the_command_writes_the_set_and_says_so(fixture, tmp_path, capsys):
    assert (
        coco.main(
            [
                "--annotations",
                str(fixture / "instances_val.json"),
                "--images",
                str(fixture / "val"),
                "--out",
                str(tmp_path / "out"),
                "--count",
                "2",
            ]
        )
        == 0
    )
    assert "2 images in 2 categories" in capsys.readouterr().err
    again = ["--annotations", str(fixture / "instances_val.json"), "--images", str(fixture / "val")]
    assert coco.main([*again, "--out", str(tmp_path / "out"), "--count", "1"]) == 2  # the last set's pairs would stay
    assert "already holds files; give an empty --out folder" in capsys.readouterr().err
    assert (
        coco.main(
            [
                "--annotations",
                str(tmp_path / "nothing.json"),
                "--images",
                str(fixture / "val"),
                "--out",
                str(tmp_path / "out2"),
            ]
        )
        == 2
    )
    assert "instances_*.json" in capsys.readouterr().err


def test_a_polygon_of_fewer_than_three_points_is_left_out():
    """pycocotools would read a first polygon of 4 numbers as boxes; such a polygon covers nothing."""
    square = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]
    alone = coco.instance_mask({"segmentation": [square]}, 40, 40)
    assert alone.sum() > 0
    assert np.array_equal(coco.instance_mask({"segmentation": [[1.0, 2.0, 3.0, 4.0], square]}, 40, 40), alone)
    assert not coco.instance_mask({"segmentation": [[1.0, 2.0, 3.0, 4.0]]}, 40, 40).any()
