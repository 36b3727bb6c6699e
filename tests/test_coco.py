"""ego.coco: the calibration set from a fixture written in COCO's own annotation schema."""

from __future__ import annotations

import json
from pathlib import Path

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


def _write_document(root, images: list[dict], annotations: list[dict]) -> Path:
    """A COCO instances document of `images` and `annotations` (category 1, "cat")."""
    path = root / "instances.json"
    categories = [{"id": 1, "name": "cat", "supercategory": "animal"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _image_entry(image_id: int, file_name: str, height: int = H, width: int = W) -> dict:
    return {"id": image_id, "file_name": file_name, "height": height, "width": width}


def _set_of(root: Path, file_names: list[str]) -> tuple[list, Path, Path]:
    """Command-line arguments for a document naming `file_names` (one polygon instance each, category "cat"), each
    image written where the name leads from the image folder `root/coco-images`; the set goes to `root/set`."""
    folder = root / "coco-images"
    polygon = [[10.0, 10.0, 40.0, 10.0, 40.0, 30.0, 10.0, 30.0]]
    entries, annotations = [], []
    for image_id, file_name in enumerate(file_names, 1):
        entries.append(_image_entry(image_id, file_name))
        annotations.append(annotation(image_id, image_id, 1, polygon, 600))
        source = folder / file_name
        source.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (W, H), (image_id * 30, 90, 30)).save(source)
    document = _write_document(root, entries, annotations)
    return ["--annotations", str(document), "--images", str(folder), "--out", str(root / "set")], folder, root / "set"


def test_an_image_in_a_subfolder_is_written_flat_where_calibration_finds_it(tmp_path, capsys):
    arguments, _, out = _set_of(tmp_path, ["sub/c.jpg", "d.jpg"])
    assert coco.main(arguments) == 0
    assert "2 images in 1 categories" in capsys.readouterr().err
    pairs = find_pairs(out / "images", out / "masks")
    assert [(image.name, mask.name) for image, mask in pairs] == [("d.jpg", "d.png"), ("sub_c.jpg", "sub_c.png")]
    assert [entry["file_name"] for entry in json.loads((out / "manifest.json").read_text())["images"]] == [
        "sub/c.jpg",
        "d.jpg",
    ]


def _everything_but(root: Path, out: Path) -> list[Path]:
    """Every file and folder under `root` but `out` and what it holds."""
    return sorted(path for path in root.rglob("*") if path != out and out not in path.parents)


@pytest.mark.parametrize("unsafe", ["../../escaped.jpg", "sub/../../../escaped.jpg", "ABSOLUTE"])
def test_a_file_name_outside_the_image_folder_is_skipped_and_nothing_is_written_outside_out(tmp_path, unsafe):
    """A name that leads out of the image folder would be read from there and written as far out of --out."""
    if unsafe == "ABSOLUTE":
        unsafe = str(tmp_path / "escaped.jpg")
    root = tmp_path / "data"
    (root / "coco-images" / "sub").mkdir(parents=True)
    arguments, _, out = _set_of(root, [unsafe, "d.jpg"])
    assert (tmp_path / "escaped.jpg").is_file()  # the image the name points at, outside the image folder
    before = _everything_but(tmp_path, out)
    assert coco.main(arguments) == 0
    assert _everything_but(tmp_path, out) == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert [entry["file_name"] for entry in manifest["images"]] == ["d.jpg"]
    assert manifest["skipped_images"] == [{"file_name": unsafe, "reason": "not a file name inside the image folder"}]
    assert [path.name for path in (out / "images").iterdir()] == ["d.jpg"]


def test_two_images_that_would_share_a_file_stem_keep_the_first(tmp_path):
    arguments, _, out = _set_of(tmp_path, ["a/b.jpg", "a_b.jpg"])
    assert coco.main(arguments) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [entry["file_name"] for entry in manifest["images"]] == ["a/b.jpg"]
    assert [entry["file_name"] for entry in manifest["skipped_images"]] == ["a_b.jpg"]
    assert len(find_pairs(out / "images", out / "masks")) == 1


def test_a_failed_build_leaves_no_partial_set_and_a_rerun_works(tmp_path, monkeypatch, capsys):
    arguments, _, out = _set_of(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    decoded = []

    def breaks_on_the_third(annotation, height, width):
        decoded.append(annotation["image_id"])
        if len(decoded) == 3:
            raise ValueError("a broken segmentation")
        return np.ones((height, width), dtype=bool)

    monkeypatch.setattr(coco, "instance_mask", breaks_on_the_third)
    assert coco.main(arguments) == 2
    assert "a broken segmentation" in capsys.readouterr().err
    assert not out.exists()  # a rerun would otherwise find a partial set
    monkeypatch.undo()
    assert coco.main(arguments) == 0
    assert len(find_pairs(out / "images", out / "masks")) == 3


@pytest.mark.parametrize("document", ["[]", '"text"', '{"images": {"id": 1}}', '{"images": [1]}'])
def test_a_document_that_is_not_a_coco_object_is_refused_with_a_sentence(tmp_path, capsys, document):
    path = tmp_path / "instances.json"
    path.write_text(document)
    arguments = ["--annotations", str(path), "--images", str(tmp_path), "--out", str(tmp_path / "set")]
    assert coco.main(arguments) == 2
    error = capsys.readouterr().err
    assert "Give a COCO instances_*.json file" in error and "Traceback" not in error
    assert not (tmp_path / "set").exists()


@pytest.mark.parametrize("count", ["0", "-1"])
def test_a_count_below_one_is_refused(tmp_path, capsys, count):
    arguments, _, out = _set_of(tmp_path, ["a.jpg"])
    with pytest.raises(SystemExit) as refused:
        coco.main([*arguments, "--count", count])
    assert refused.value.code == 2 and "--count must be at least 1" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_an_image_stored_turned_is_written_upright_with_its_mask_turned_the_same_way(tmp_path, orientation):
    """COCO's annotations follow the JPEG's stored pixels, while calibration (like every photo the engine reads)
    applies the EXIF orientation: the pair written must agree once the image is loaded that way."""
    from ego.calibrate import binary_mask
    from ego.media import load_image

    arguments, folder, out = _set_of(tmp_path, ["turned.jpg", "plain.jpg"])
    stored = np.zeros((H, W, 3), dtype=np.uint8)
    stored[POLYGON_MASK] = 255  # the annotated object, in stored pixel order
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(folder / "turned.jpg", exif=exif, quality=98)
    Image.fromarray(stored).save(folder / "plain.jpg", quality=98)
    assert coco.main(arguments) == 0
    for stem in ("turned", "plain"):
        picture = np.asarray(load_image(out / "images" / f"{stem}.jpg").convert("L"))
        mask = binary_mask(out / "masks" / f"{stem}.png")
        assert mask.shape == picture.shape
        assert (picture[mask] > 128).mean() > 0.95 and (picture[~mask] < 128).mean() > 0.95
    assert json.loads((out / "manifest.json").read_text())["turned_upright"] == ["turned.jpg"]
    assert Image.open(out / "images" / "turned.jpg").getexif().get(0x0112, 1) == 1
