"""space/views.py: the highlighted-patch pictures mark exactly the kept tokens; visitor text stays literal."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from markdown_it import MarkdownIt
from PIL import Image

from space import views

GREY = 200


def grey_photo(width=300, height=200) -> Image.Image:
    return Image.new("RGB", (width, height), (GREY, GREY, GREY))


def cell_centres(rows, cols, cell):
    return {(r, c): (r * cell + cell // 2, c * cell + cell // 2) for r in range(rows) for c in range(cols)}


@pytest.mark.parametrize(
    "grid, indices",
    [
        ((5, 7), [0, 8, 34]),
        ((3, 11), [10, 11, 32]),
        ((16, 16), list(range(0, 256, 7))),
    ],
)
def test_patch_view_marks_exactly_the_kept_cells(grid, indices):
    rows, cols = grid
    picture = views.patch_view(grey_photo(), grid, torch.tensor(indices), max_px=448)
    cell = 448 // max(rows, cols)
    assert picture.size == (cols * cell, rows * cell)

    expected_kept = {(i // cols, i % cols) for i in indices}  # raster order, recomputed here
    amber = np.array(views.KEPT_RGB, dtype=float)
    kept_colour = GREY * (1 - views.TINT) + amber * views.TINT
    dimmed_colour = np.full(3, GREY * views.DIM)
    pixels = np.asarray(picture, dtype=float)
    for (r, c), (y, x) in cell_centres(rows, cols, cell).items():
        wanted = kept_colour if (r, c) in expected_kept else dimmed_colour
        assert np.abs(pixels[y, x] - wanted).max() <= 2, (r, c)
    # Kept cells are outlined in amber: the top-left pixel of each kept cell is pure amber.
    for r, c in expected_kept:
        assert tuple(pixels[r * cell, c * cell]) == views.KEPT_RGB


def test_kept_mask_is_raster_order_and_checks_range():
    mask = views.kept_mask((2, 3), [1, 5])
    assert mask.tolist() == [[False, True, False], [False, False, True]]
    with pytest.raises(ValueError):
        views.kept_mask((2, 3), [6])


def test_patch_view_follows_the_grid_not_the_photo_shape():
    """The model saw the photo resized to the grid; a tall photo on a wide grid is drawn on the grid."""
    picture = views.patch_view(grey_photo(100, 400), (4, 8), [0], max_px=400)
    assert picture.size == (400, 200)


def test_heat_map_orders_colours_by_score():
    grid = (2, 2)
    picture = views.heat_map(grey_photo(), grid, torch.tensor([0.0, 1.0, 0.5, 0.25]), max_px=100)
    pixels = np.asarray(picture, dtype=float)
    cell = 50
    brightness = [pixels[r * cell + 25, c * cell + 25].sum() for r in range(2) for c in range(2)]
    assert np.argsort(brightness).tolist() == [0, 3, 2, 1]
    with pytest.raises(ValueError):
        views.heat_map(grey_photo(), grid, [1.0, 2.0], max_px=100)
    flat = views.heat_map(grey_photo(), grid, [3.0] * 4, max_px=100)  # all equal: no division by zero
    assert flat.size == (100, 100)


def test_thumbnails_are_small_squares():
    assert views.thumbnail(grey_photo(640, 480), 96).size == (96, 96)
    token_picture = views.token_map((10, 14), [0, 139], px=128)
    assert token_picture.size == (128, 128)
    assert np.asarray(token_picture).reshape(-1, 3).tolist().count(list(views.KEPT_RGB)) > 0


HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "[click](http://evil.example/x)",
    "![pixel](http://evil.example/p.png)",
    "**bold** _it_ `code` $x^2$ # heading",
    "a | b | c",
    "www.evil.example and me@evil.example",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_escape_markdown_keeps_visitor_text_literal(text):
    rendered = MarkdownIt("commonmark").enable("table").render(views.escape_markdown(text))
    for tag in ("<img", "<a ", "<strong", "<em", "<code", "<h1", "<table", "<script"):
        assert tag not in rendered
    # Nothing of the text is lost: the escaped form renders back to the same characters.
    plain = rendered.removeprefix("<p>").removesuffix("</p>\n")
    assert plain.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace("&quot;", '"') == text


def fake_concept(name="Chelsea"):
    view = SimpleNamespace(
        keywords=("tabby", "green"),
        keywords_source="model",
        area_pct=8.0,
        area_source="model",
        grid=(10, 10),
        k=8,
        token_indices=torch.arange(8),
        scores=torch.rand(100),
    )
    user_view = SimpleNamespace(
        keywords=("<b>mine</b>",),
        keywords_source="user",
        area_pct=30.0,
        area_source="user",
        grid=(4, 5),
        k=6,
        token_indices=torch.arange(6),
        scores=torch.rand(20),
    )
    return SimpleNamespace(name=name, num_tokens=14, views=(view, user_view), model_id="tiny-qwen2.5-vl")


def test_introduction_report_has_one_row_per_photo_and_escapes():
    report = views.introduction_report([fake_concept("<script>x</script>")], 1.234)
    rendered = MarkdownIt("commonmark").enable("table").render(report)
    assert "<script>" not in rendered and "<b>" not in rendered
    assert rendered.count("<tr>") == 3  # header + two photos
    assert "| 8\u00a0of\u00a0100 |" in report and "| 6\u00a0of\u00a020 |" in report and "1.23 s" in report


@pytest.mark.parametrize("name", ["قطتي 2", "כלב 3", "Chelsea", "a <b>cat</b>"])
def test_a_card_caption_sets_the_name_apart_from_its_count(name):
    """Between direction isolates (FSI ... PDI), a right-to-left name ending in a number does not pull the count
    after it into its own direction ("150 · 2 قطتي tokens"): the name is read alone, the rest left to right."""
    caption = views.concept_caption(SimpleNamespace(name=name, num_tokens=150))
    assert caption == f"\u2068{name}\u2069 · 150 tokens"
    assert views.isolated(name) == f"\u2068{name}\u2069"


def test_records_and_details_are_json():
    record = views.concept_record(fake_concept())
    assert json.loads(json.dumps(record)) == record
    assert record["tokens"] == 14 and record["photos"] == 2 and record["size_pct"] == [8.0, 30.0]
    assert record["keywords"] == ["tabby", "green", "<b>mine</b>"]
    answer = SimpleNamespace(
        concepts_used=("Chelsea",),
        concepts_dropped=(),
        memory_tokens=14,
        context_tokens=300,
        similarity=(("Chelsea", 0.81234), ("my mug", 0.2)),
    )
    assert views.answer_details(answer, 0.5) == {
        "concepts_used": ["Chelsea"],
        "concepts_dropped": [],
        "memory_tokens": 14,
        "context_tokens": 300,
        "seconds": 0.5,
        "similarity": {"Chelsea": 0.812, "my mug": 0.2},
    }


def test_frame_captions():
    assert views.frame_captions({"fps": 10.0, "frames_indices": [1, 15]}) == ["frame 2 · 0.1 s", "frame 16 · 1.5 s"]
    assert views.frame_captions({"frames_indices": [0]}) == ["frame 1"]


def test_a_duration_reads_in_the_unit_a_visitor_expects():
    assert views.duration(3600) == "60 minutes"
    assert views.duration(4200) == "70 minutes"
    assert views.duration(60) == "1 minute"
    assert views.duration(90) == "1.5 minutes"
    assert views.duration(45) == "45 seconds"
    assert views.duration(1) == "1 second"
