"""Layer calibration (`ego.calibrate`): the mask -> token rule, precision@K, a planted answer, the CLI."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, tiny_engine
from PIL import Image

from ego import attention, calibrate as cal

ROOT = Path(__file__).resolve().parents[1]


def short_engine(family: str):
    """The shared tiny engine with 16-token descriptions (the model is random: length buys nothing here)."""
    engine = copy.copy(tiny_engine(family))
    engine.settings = engine.settings.replace(description_max_new_tokens=16)
    return engine


def _square_mask(size=(300, 451), box=(0.0, 0.0, 0.5, 0.5)) -> np.ndarray:
    """A uint8 0/255 mask with the box (top, left, bottom, right as fractions) set."""
    h, w = size
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[int(box[0] * h) : int(box[2] * h), int(box[1] * w) : int(box[3] * w)] = 255
    return mask


def test_object_tokens_coverage_and_centre_rules():
    mask = np.zeros((40, 40), dtype=bool)
    mask[0:10, 0:10] = True  # cell (0, 0) of a 4x4 grid of 10x10 cells: fully covered
    mask[10:16, 10:20] = True  # cell (1, 1): 60 % covered, centre (15, 15) covered
    mask[20:24, 20:30] = True  # cell (2, 2): 40 % covered, centre (25, 25) not covered
    mask[35, 35] = True  # cell (3, 3): one pixel, exactly its centre
    tokens = cal.object_tokens(mask, (4, 4)).view(4, 4)
    assert tokens[0, 0] and tokens[1, 1] and tokens[3, 3]
    assert not tokens[2, 2]
    assert int(tokens.sum()) == 3
    # 8-bit masks are thresholded at 128; a mask at another resolution maps proportionally.
    grey = np.where(np.kron(mask, np.ones((3, 3), dtype=bool)), 200, 90).astype(np.uint8)
    assert torch.equal(cal.object_tokens(grey, (4, 4)), tokens.flatten())
    assert torch.equal(cal.object_tokens(Image.fromarray(grey), (4, 4)), tokens.flatten())


def test_precision_at_k():
    objects = torch.tensor([True, True, False, False, False, False])
    importance = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.0, 0.0, 0.0],  # both top-2 on the object
            [0.9, 0.0, 0.8, 0.0, 0.0, 0.0],  # one of two
            [0.0, 0.0, 0.9, 0.8, 0.0, 0.0],
        ]
    )  # none
    assert cal.precision_at_k(importance, objects, 2).tolist() == [1.0, 0.5, 0.0]
    assert cal.precision_at_k(importance, objects, 100).tolist() == pytest.approx([1 / 3] * 3)  # K capped at N


def test_the_size_fair_score_is_precision_at_the_objects_own_size():
    small = torch.tensor([True, False, False, False, False, False])  # one object token of six
    importance = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.0, 0.0, 0.0],  # the object's token first: perfect at K = 1
            [0.1, 0.9, 0.8, 0.0, 0.0, 0.0],  # the object's token third
        ]
    )
    assert cal.size_fair_precision(importance, small).tolist() == [1.0, 0.0]
    # precision@3 cannot tell them apart, and cannot pass 1/3 for a one-token object
    assert cal.precision_at_k(importance, small, 3).tolist() == pytest.approx([1 / 3, 1 / 3])


def test_the_ranking_follows_the_chosen_score():
    precision = torch.tensor([[0.5, 0.4, 0.1]])  # layer 0 best by precision@K
    size_fair = torch.tensor([[0.2, 0.9, 0.3]])  # layer 1 best by the size-fair score
    by = {
        rank_by: cal.CalibrationResult(
            model_id="m", num_layers=3, top_k=50, keep=1, precision=precision, size_fair=size_fair, rank_by=rank_by
        )
        for rank_by in cal.RANK_BY
    }
    assert by["precision"].layers == (0,) and by["size-fair"].layers == (1,)
    assert by["size-fair"].to_json()["size_fair_scores"]["1"] == pytest.approx(0.9)
    assert by["size-fair"].to_json()["rank_by"] == "size-fair"


def test_find_pairs_matches_stems(tmp_path):
    (tmp_path / "im").mkdir(), (tmp_path / "m").mkdir()
    for stem in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / "im" / f"{stem}.jpg")
    for stem in ("a", "c", "z"):
        Image.new("L", (8, 8)).save(tmp_path / "m" / f"{stem}.png")
    (tmp_path / "im" / "notes.txt").write_text("not an image")
    pairs = cal.find_pairs(tmp_path / "im", tmp_path / "m")
    assert [(i.name, m.name) for i, m in pairs] == [("a.jpg", "a.png"), ("c.jpg", "c.png")]


def test_per_layer_importance_averages_to_the_engines_eq3():
    """Calibration reads the same rows as concept introduction: its per-layer importance, averaged over
    the engine's layers L, is the engine's Eq. 3 score of the same photo."""
    engine = short_engine("internvl3")
    picture = photo(4)
    view = engine.introduce("Chelsea", [picture]).views[0]
    described = cal.describe_with_attention(engine, picture)
    assert described.description == view.description and described.grid == view.grid
    assert described.importance.shape == (engine.num_layers, 256)
    torch.testing.assert_close(described.importance[list(engine.layers)].mean(dim=0), view.scores)


def _planted(layer: int, objects: torch.Tensor):
    """An AttentionCapture whose `layer` pays all its attention, evenly, to the `objects` visual tokens."""

    class Planted(attention.AttentionCapture):
        def matrix(self, positions):
            matrix = super().matrix(positions)  # [layers, H, N_w, N_r]
            planted = torch.zeros(matrix.shape[-1])
            planted[objects] = 1.0 / int(objects.sum())
            matrix[sorted(self.layers).index(layer)] = planted
            return matrix

    return Planted


@pytest.mark.parametrize("family", ["internvl3", "qwen2.5-vl"])
def test_planted_layer_ranks_first_and_file_loads(family, tmp_path, monkeypatch):
    from ego import Ego

    engine = short_engine(family)
    planted_layer = engine.num_layers - 2
    # The visual grid of a 300x451 reference image on this model (16x16 on InternVL; Qwen's is not square).
    encoded = engine.backend.encode(
        engine.backend.chat_text([{"type": "image"}]),
        image=photo(0),
        image_max_pixels=engine.settings.reference_max_pixels,
        video_frame_max_pixels=engine.settings.video_frame_max_pixels,
        one_view=True,  # as a reference
    )
    grid = engine.backend.grid(encoded)
    objects = cal.object_tokens(_square_mask(), grid)
    assert 10 <= int(objects.sum()) < grid[0] * grid[1] // 2
    import ego.engine

    monkeypatch.setattr(ego.engine, "AttentionCapture", _planted(planted_layer, objects))  # where describe() uses it
    pairs = [(f"p{i}", photo(i), _square_mask()) for i in range(2)]
    lines = []
    result = cal.calibrate(engine, pairs, keep=1, top_k=10, progress=lines.append)

    assert result.images == 2 and len(lines) == 2 and not result.skipped
    assert result.precision.shape == (2, engine.num_layers)
    assert result.precision[:, planted_layer].tolist() == [1.0, 1.0]
    assert result.ranking[0] == planted_layer
    assert result.layers == (planted_layer,)
    assert result.table().splitlines()[1].split()[:3] == ["1", str(planted_layer), "1.0000"]

    path = result.write(tmp_path / "layers.json")
    document = json.loads(path.read_text())
    assert document["layers"] == [planted_layer] and document["images"] == 2 and document["top_k"] == 10
    assert document["model_id"] == engine.model_id
    assert set(document["scores"]) == {str(i) for i in range(engine.num_layers)}
    reloaded = Ego.from_pretrained(f"tiny-{family}", layers=path)
    assert reloaded.layers == (planted_layer,)


def _write_pairs(root: Path, n: int = 2) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(), masks.mkdir()
    for i in range(n):
        photo(i).save(images / f"{i:06d}.jpg")
        Image.fromarray(_square_mask(box=(0.2, 0.3, 0.8, 0.7))).save(masks / f"{i:06d}.png")
    Image.fromarray(np.zeros((300, 451), dtype=np.uint8)).save(masks / "unused.png")
    return images, masks


def test_cli_main_writes_loadable_layers(tmp_path, capsys):
    from ego import Ego

    images, masks = _write_pairs(tmp_path, 4)
    # An empty mask and a damaged one are skipped (before the model runs), not failures.
    Image.fromarray(np.zeros((300, 451), dtype=np.uint8)).save(masks / "000002.png")
    (masks / "000003.png").write_bytes(b"not a png")
    out = tmp_path / "calibration.json"
    code = cal.main(
        [
            "--model",
            "tiny-internvl3",
            "--images",
            str(images),
            "--masks",
            str(masks),
            "--keep",
            "2",
            "--top-k",
            "20",
            "--rank-by",
            "size-fair",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "[3/4] 000002.jpg: skipped (the mask covers no visual token)" in captured.err
    assert "[4/4] 000003.jpg: skipped (unreadable" in captured.err
    assert "precision@20" in captured.out and "Best 2 layers" in captured.out
    document = json.loads(out.read_text())
    assert document["images"] == 2 and document["keep"] == 2 and len(document["layers"]) == 2
    assert [s["image"] for s in document["skipped"]] == ["000002.jpg", "000003.jpg"]
    assert document["skipped"][0]["reason"] == "the mask covers no visual token"
    assert document["rank_by"] == "size-fair"
    fair = document["size_fair_scores"]
    assert document["ranking"][:2] == sorted(document["ranking"][:2], key=lambda layer: -fair[str(layer)])
    assert min(fair[str(layer)] for layer in document["layers"]) >= max(
        fair[str(layer)] for layer in range(document["num_layers"]) if layer not in document["layers"]
    )
    assert sorted(document["ranking"][:2]) == document["layers"]
    assert Ego.from_pretrained("tiny-internvl3", layers=out).layers == tuple(document["layers"])


def test_cli_runs_as_a_module_and_refuses_when_nothing_matches(tmp_path):
    """`python -m ego.calibrate` (the end-to-end run is test_cli_main_writes_loadable_layers, in process)."""
    (tmp_path / "i").mkdir(), (tmp_path / "m").mkdir()
    photo(0).save(tmp_path / "i" / "a.jpg")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "ego.calibrate",
            "--model",
            "tiny-internvl3",
            "--images",
            str(tmp_path / "i"),
            "--masks",
            str(tmp_path / "m"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "same file name stem" in run.stderr


def test_layers_with_the_same_scores_in_another_order_tie_and_the_lower_one_wins():
    """Precision values are multiples of 1/K; float32 means of the same values summed in another order differ in
    their last bits, which must not decide between two layers."""
    import itertools

    from ego.calibrate import CalibrationResult

    k = 50
    orders = [torch.tensor([a / k for a in order]) for order in itertools.permutations([3, 7, 11, 29, 41])]
    for first, second in itertools.product(orders[:24], orders[:24]):
        result = CalibrationResult(
            model_id="m", num_layers=2, top_k=k, keep=1, precision=torch.stack([first, second], 1)
        )
        assert result.layers == (0,) and result.ranking == [0, 1]


@pytest.mark.parametrize(
    "options, words",
    [
        (["--keep", "0"], "must be at least 1"),
        (["--limit", "-1"], "must be at least 1"),
        (["--out", "no-such-folder/layers.json"], "does not exist"),
    ],
)
def test_cli_refuses_bad_options_before_the_model_loads(tmp_path, capsys, monkeypatch, options, words):
    from ego import Ego

    def not_loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Ego, "from_pretrained", not_loaded)
    images, masks = _write_pairs(tmp_path, 1)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        cal.main(["--model", "tiny-internvl3", "--images", str(images), "--masks", str(masks), *options])
    assert refused.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["I;16", "P", "LA", "RGBA", "L"])
def test_a_mask_file_is_read_by_its_own_values_non_zero_is_object(tmp_path, mode):
    """A 16-bit label 1, a palette index 1, a grey mask with an alpha channel: the object is where the values are
    not zero, whatever the photo loader would make of the file (scaled, recoloured, composited on white)."""
    truth = np.zeros((30, 40), dtype=bool)
    truth[5:15, 10:30] = True
    if mode == "I;16":
        image = Image.fromarray(truth.astype(np.uint16))  # label 1
    elif mode == "P":
        image = Image.fromarray(truth.astype(np.uint8), mode="L").convert("P")
        image.putpalette([0, 0, 0] * 2 + [0] * 762)  # both indices drawn black
    elif mode == "LA":
        grey = Image.fromarray((truth * 255).astype(np.uint8))
        image = Image.merge("LA", [grey, Image.new("L", grey.size, 0)])  # fully transparent
    elif mode == "RGBA":
        image = Image.fromarray(np.dstack([truth * 200] * 3 + [np.full(truth.shape, 10)]).astype(np.uint8), "RGBA")
    else:
        image = Image.fromarray((truth * 255).astype(np.uint8))
    path = tmp_path / "mask.png"
    image.save(path)
    assert np.array_equal(cal.binary_mask(path), truth)


def test_an_image_and_a_mask_of_other_sizes_are_skipped():
    from ego import Ego

    engine = Ego.tiny("qwen2-vl")
    picture = photo(0)  # 451x300
    mask = np.zeros((picture.width, picture.height), dtype=bool)  # 300x451: turned a quarter
    mask[:50, :50] = True
    with pytest.raises(cal.SkipImage, match="the mask is 300x451 pixels and the image 451x300"):
        cal.describe_with_attention(engine, picture, mask)


@pytest.mark.parametrize("which", ["--images", "--masks"])
@pytest.mark.parametrize("wrong", ["missing", "a file"])
def test_cli_refuses_an_image_or_mask_folder_that_is_not_one(tmp_path, capsys, monkeypatch, which, wrong):
    from ego import Ego

    def not_loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Ego, "from_pretrained", not_loaded)
    images, masks = _write_pairs(tmp_path, 1)
    folder = tmp_path / "elsewhere"
    if wrong == "a file":
        folder.write_text("not a folder")
    folders = {"--images": str(images), "--masks": str(masks), which: str(folder)}
    with pytest.raises(SystemExit) as refused:
        cal.main(["--model", "tiny-internvl3", *[text for pair in folders.items() for text in pair]])
    expected = "is a file, not a folder" if wrong == "a file" else "does not exist"
    assert refused.value.code == 2 and f"{which}: {folder} {expected}" in capsys.readouterr().err


def test_a_one_bit_mask_file_gives_no_warning(tmp_path):
    """Mode "1" PNGs (the bundled examples' masks) read as read-only arrays; torch warns about those only once
    per process, hence a fresh interpreter with warnings as errors."""
    truth = np.zeros((30, 40), dtype=bool)
    truth[5:20, 10:30] = True
    path = tmp_path / "mask.png"
    Image.fromarray(truth).convert("1").save(path)
    assert Image.open(path).mode == "1"
    script = (
        "import sys; from ego.calibrate import object_tokens; "
        "sys.stdout.write(str(int(object_tokens(sys.argv[1], (3, 4)).sum())))"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-W", "error", "-c", script, str(path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == str(int(cal.object_tokens(truth, (3, 4)).sum()))


def _layers_file(path: Path, model_id: str, num_layers: int = 4) -> Path:
    """A layers file as `python -m ego.calibrate` writes it for `model_id`."""
    result = cal.CalibrationResult(
        model_id=model_id, num_layers=num_layers, top_k=50, keep=2, precision=torch.rand(3, num_layers)
    )
    return result.write(path)


def test_a_layers_file_of_another_model_of_the_same_depth_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText

    from ego import Ego

    assert tiny_engine("qwen2.5-vl").num_layers == tiny_engine("internvl3").num_layers == 4
    path = _layers_file(tmp_path / "layers.json", tiny_engine("qwen2.5-vl").model_id)

    def loads(*args, **kwargs):
        raise AssertionError("the weights were loaded before the layers file was checked")

    with monkeypatch.context() as patched:
        patched.setattr(AutoModelForImageTextToText, "from_pretrained", loads)
        with pytest.raises(ValueError, match="calibrated for tiny-qwen2.5-vl, not tiny-internvl3") as refused:
            Ego.tiny("internvl3", layers=path)
        assert "python -m ego.calibrate" in str(refused.value) and "layers=[" in str(refused.value)
        with pytest.raises(ValueError, match="not tiny-qwen2.5-vl-seed1"):  # other random weights, another model
            Ego.tiny("qwen2.5-vl", seed=1, layers=path)
    document = json.loads(path.read_text())
    assert Ego.tiny("qwen2.5-vl", layers=path).layers == tuple(document["layers"])
    assert Ego.tiny("internvl3", layers=document["layers"]).layers == tuple(document["layers"])  # as indices


def test_a_layers_file_of_a_local_folder_loads_with_the_folder_however_it_is_spelled(tmp_path, monkeypatch):
    from ego import Ego
    from ego.memory import local_model_id
    from ego.random_models import tiny_checkpoint

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("qwen2-vl", 0), folder)
    path = _layers_file(tmp_path / "layers.json", local_model_id(folder))
    monkeypatch.chdir(tmp_path)
    assert Ego.from_pretrained("ckpt/", layers=path).model_id == local_model_id(folder)
    path = _layers_file(tmp_path / "layers.json", "Qwen/ckpt")  # a Hub model of the folder's name is another one
    with pytest.raises(ValueError, match="calibrated for Qwen/ckpt"):
        Ego.from_pretrained(str(folder), layers=path)
