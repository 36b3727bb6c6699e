"""The concept file: round trip, and refusal of anything that is not ours or not for this model."""

import json
import struct

import pytest
import torch
from conftest import photo, tiny_engine

import ego
from ego import IncompatibleMemoryError, MemoryFileError, load_concepts, save_concepts


@pytest.fixture(scope="module")
def concepts():
    engine = tiny_engine("qwen2-vl")
    return [
        engine.introduce("Chelsea", [photo(0), photo(1)], area_pct=12),
        engine.introduce("my mug", [photo(2)], keywords="red mug", area_pct=5),
    ]


def test_round_trip_keeps_everything(concepts, tmp_path):
    engine = tiny_engine("qwen2-vl")
    path = save_concepts(tmp_path / "mine.ego", concepts)
    loaded = load_concepts(path, engine)
    assert [c.name for c in loaded] == ["Chelsea", "my mug"]
    for before, after in zip(concepts, loaded):
        torch.testing.assert_close(after.embeddings, before.embeddings, rtol=0, atol=0)
        assert after.model_id == before.model_id
        for v1, v2 in zip(before.views, after.views):
            assert v1.token_indices.tolist() == v2.token_indices.tolist()
            torch.testing.assert_close(v1.scores, v2.scores, rtol=0, atol=0)
            assert (v1.grid, v1.k, v1.area_pct, v1.keywords, v1.description, v1.area_source) == (
                v2.grid,
                v2.k,
                v2.area_pct,
                v2.keywords,
                v2.description,
                v2.area_source,
            )
    # A loaded memory answers like the original.
    q = photo(5)
    assert engine.answer("Who?", loaded, image=q, max_new_tokens=4) == engine.answer(
        "Who?", concepts, image=q, max_new_tokens=4
    )


def test_round_trip_keeps_qwen3_residuals(tmp_path):
    engine = tiny_engine("qwen3-vl")
    made = [engine.introduce("Chelsea", [photo(0), photo(1)], area_pct=12)]
    loaded = load_concepts(save_concepts(tmp_path / "mine.ego", made), engine)
    assert loaded[0].residuals is not None
    torch.testing.assert_close(loaded[0].residuals, made[0].residuals, rtol=0, atol=0)


def _rewritten(path, change):
    """`path` with its tensors passed through `change(tensors)` (a hand-edited, hostile file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "family, change",
    [
        ("qwen3-vl", lambda t: t.update({"c0.residuals": t["c0.residuals"][:, :-1]})),  # rows != memory
        ("qwen3-vl", lambda t: t.update({"c0.residuals": t["c0.residuals"] * float("nan")})),  # not finite
        ("qwen3-vl", lambda t: t.update({"c0.residuals": t["c0.residuals"].repeat(20, 1, 1)})),  # absurd levels
        ("qwen3-vl", lambda t: t.update({"c0.residuals": t["c0.residuals"].repeat(2, 1, 1)})),  # not this model's
        ("qwen3-vl", lambda t: t.update({"c0.residuals": t["c0.residuals"].long()})),  # not float
        ("qwen2-vl", lambda t: t.update({"c0.residuals": torch.zeros(1, *t["c0.embeddings"].shape)})),  # none here
    ],
)
def test_hostile_residuals_are_refused(tmp_path, family, change):
    engine = tiny_engine(family)
    made = [engine.introduce("Chelsea", [photo(0)], area_pct=12)]
    path = _rewritten(save_concepts(tmp_path / "mine.ego", made), change)
    with pytest.raises(MemoryFileError) as raised:
        load_concepts(path, engine)
    assert str(raised.value).endswith(".")


def test_a_memory_is_loaded_in_the_models_dtype_and_must_be_finite_there(tmp_path):
    """Rows stored in float32 are read in the dtype the model computes in; a value finite in float32 but not in
    that dtype (1e5 is inf in float16) is refused, not injected."""
    engine = tiny_engine("qwen2-vl")
    made = [engine.introduce("Chelsea", [photo(0)], area_pct=12)]
    path = save_concepts(tmp_path / "mine.ego", made)
    half = ego.Ego.tiny("qwen2-vl")  # the same model (a fresh copy, not the shared one) computing in float16
    half.model.half()
    (loaded,) = load_concepts(path, half)
    assert loaded.embeddings.dtype == torch.float16
    assert torch.allclose(loaded.embeddings.float(), made[0].embeddings.float(), atol=1e-2, rtol=1e-2)
    big = _rewritten(path, lambda t: t["c0.embeddings"].fill_(1e5))
    with pytest.raises(MemoryFileError, match="cannot"):
        load_concepts(big, half)


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.update({"c0.embeddings": t["c0.embeddings"].to(torch.float8_e4m3fn)}),  # untestable for NaN
        lambda t: t.update(
            {"c0.embeddings": torch.full_like(t["c0.embeddings"], float("nan")).to(torch.float8_e8m0fnu)}
        ),
        lambda t: t.update({"c0.embeddings": t["c0.embeddings"].double()}),
    ],
)
def test_memory_in_a_dtype_ego_does_not_write_is_refused_with_a_sentence(tmp_path, change):
    """Float8 kinds cannot be tested for NaN (torch raises, or calls float8_e8m0's NaN finite): a memory stored in
    one would crash the import or reach the model as NaN."""
    engine = tiny_engine("qwen2-vl")
    made = [engine.introduce("Chelsea", [photo(0)], area_pct=12)]
    path = _rewritten(save_concepts(tmp_path / "mine.ego", made), change)
    with pytest.raises(MemoryFileError) as raised:
        load_concepts(path, engine)
    assert str(raised.value).endswith(".")


def test_thumbnails_round_trip_and_old_files_still_load(concepts, tmp_path):
    from PIL import Image

    engine = tiny_engine("qwen2-vl")
    picture = Image.frombytes("RGB", (6, 4), bytes(range(72)))
    path = save_concepts(tmp_path / "mine.ego", concepts, [picture, None])
    assert [c.name for c in load_concepts(path, engine)] == ["Chelsea", "my mug"]
    first, second = ego.read_thumbnails(path, 2)
    assert first.size == (6, 4) and first.tobytes() == picture.tobytes() and second is None
    # A file written without thumbnails (as before they existed) loads, with none.
    plain = save_concepts(tmp_path / "plain.ego", concepts)
    assert len(load_concepts(plain, engine)) == 2 and ego.read_thumbnails(plain, 2) == [None, None]
    with pytest.raises(ValueError, match="one \\(or None\\) each"):
        save_concepts(tmp_path / "x.ego", concepts, [picture])


@pytest.mark.parametrize(
    "thumbnail",
    [
        torch.zeros(4, 4, 3, dtype=torch.float32),  # not bytes
        torch.zeros(4, 4, dtype=torch.uint8),  # not RGB
        torch.zeros(4, 4, 4, dtype=torch.uint8),  # four channels
        torch.zeros(600, 4, 3, dtype=torch.uint8),  # larger than a thumbnail
    ],
)
def test_odd_thumbnails_are_ignored_not_drawn(concepts, tmp_path, thumbnail):
    engine = tiny_engine("qwen2-vl")
    path = _rewritten(save_concepts(tmp_path / "mine.ego", concepts), lambda t: t.update({"c0.thumbnail": thumbnail}))
    assert len(load_concepts(path, engine)) == 2
    assert ego.read_thumbnails(path, 2) == [None, None]


def test_memory_from_another_family_is_refused(concepts, tmp_path):
    path = save_concepts(tmp_path / "mine.ego", concepts)
    with pytest.raises(IncompatibleMemoryError, match="introduce them again"):
        load_concepts(path, tiny_engine("qwen3-vl"))


def test_files_that_are_not_ours_are_refused(tmp_path, concepts):
    engine = tiny_engine("qwen2-vl")
    cases = {
        "empty": b"",
        "text": b"hello world, this is not a model file at all",
        "pickle": b"\x80\x04\x95" + b"\x00" * 64,
        "huge_header": struct.pack("<Q", 1 << 40) + b"{}",
    }
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    paths = [tmp_path / "plain.safetensors"]
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    good = save_concepts(tmp_path / "good.ego", concepts).read_bytes()
    (tmp_path / "truncated").write_bytes(good[: len(good) // 2])
    paths.append(tmp_path / "truncated")
    for path in paths:
        with pytest.raises(MemoryFileError) as raised:
            load_concepts(path, engine)
        assert str(raised.value).endswith(".")


def test_wrong_version_says_so(tmp_path, concepts):
    path = save_concepts(tmp_path / "mine.ego", concepts)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        document = json.loads(handle.metadata()["ego"])
    document["version"] = 99
    save_file(tensors, str(path), metadata={"ego": json.dumps(document)})
    with pytest.raises(MemoryFileError, match="version 99"):
        load_concepts(path, tiny_engine("qwen2-vl"))


def test_too_many_concepts_in_a_file_are_refused(tmp_path, concepts):
    engine = tiny_engine("qwen2-vl")
    path = save_concepts(tmp_path / "many.ego", concepts * 3)
    small = engine.with_settings(max_concept_file_concepts=5)
    with pytest.raises(MemoryFileError, match="at most 5"):
        load_concepts(path, small)


def test_saving_nothing_or_mixed_models_is_refused(tmp_path, concepts):
    with pytest.raises(MemoryFileError):
        save_concepts(tmp_path / "x.ego", [])
    other = tiny_engine("qwen3-vl").introduce("rocket", [photo(3)], keywords="rocket", area_pct=5)
    with pytest.raises(MemoryFileError):
        save_concepts(tmp_path / "x.ego", [concepts[0], other])


def test_a_file_the_reader_would_refuse_is_not_written(tmp_path, concepts):
    """Every limit `load_concepts` applies is checked when saving: the file is refused with what to do, and not
    written, rather than written and refused on import."""
    import dataclasses

    from ego.memory import MAX_FILE_KEYWORDS_PER_VIEW, MAX_FILE_TEXT_CHARS, MAX_FILE_VIEWS_PER_CONCEPT

    chelsea = concepts[0]
    view = chelsea.views[0]
    many = tuple(f"w{i}" for i in range(MAX_FILE_KEYWORDS_PER_VIEW + 1))
    too_many_keywords = dataclasses.replace(chelsea, views=(dataclasses.replace(view, keywords=many),))
    long_description = dataclasses.replace(
        chelsea, views=(dataclasses.replace(view, description="x" * (MAX_FILE_TEXT_CHARS + 1)),)
    )
    too_many_views = dataclasses.replace(chelsea, views=(view,) * (MAX_FILE_VIEWS_PER_CONCEPT + 1))
    cases = [
        ([too_many_keywords], "more keywords than a concept file holds"),
        ([long_description], "longer than 1000 characters"),
        ([too_many_views], f"at most {MAX_FILE_VIEWS_PER_CONCEPT} per concept"),
        ([chelsea] * 3, "at most 2 concepts; you are saving 3"),
    ]
    for saved, message in cases:
        path = tmp_path / "refused.ego"
        with pytest.raises(MemoryFileError, match=message):
            save_concepts(path, saved, max_concepts=2)
        assert not path.exists()
    # At the limits, the file is written and read back.
    mug = concepts[1]
    keywords = tuple(f"w{i}" for i in range(MAX_FILE_KEYWORDS_PER_VIEW))
    at_limits = dataclasses.replace(mug, views=(dataclasses.replace(mug.views[0], keywords=keywords),))
    path = save_concepts(tmp_path / "limits.ego", [chelsea, at_limits], max_concepts=2)
    assert [c.views[-1].keywords for c in load_concepts(path, tiny_engine("qwen2-vl"))] == [
        chelsea.views[-1].keywords,
        keywords,
    ]


def test_public_api_names():
    for name in ["Ego", "Concept", "ConceptView", "InputError", "save_concepts", "load_concepts", "Settings"]:
        assert hasattr(ego, name)
    assert issubclass(ego.InputError, ValueError) and issubclass(ego.IncompatibleMemoryError, ValueError)


# ----------------------------------------------------------------------------------------------
# Every field of the file's metadata is bounded and checked
# ----------------------------------------------------------------------------------------------
def _with_document(path, out, change):
    """A copy of the concept file at `path` whose tensors and JSON document went through `change`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        document = json.loads(handle.metadata()["ego"])
    text = change(tensors, document)  # a change may return the document's text itself
    save_file(tensors, str(out), metadata={"ego": text or json.dumps(document)})
    return out


def _first_view(**changes):
    return lambda tensors, document: document["concepts"][0]["views"][0].update(changes)


def _no_views(tensors, document):
    document["concepts"][0]["views"] = []


def _keeps_nothing(tensors, document):
    """One view that keeps k = 0 tokens, with tensors that agree (zero memory rows, no indices)."""
    document["concepts"] = document["concepts"][1:2]
    document["concepts"][0]["views"][0]["k"] = 0
    tensors["c0.embeddings"] = tensors.pop("c1.embeddings")[:0].clone()
    tensors["c0.v0.token_indices"] = tensors.pop("c1.v0.token_indices")[:0].clone()
    tensors["c0.v0.scores"] = tensors.pop("c1.v0.scores")
    for key in [k for k in tensors if k.startswith("c0.v1")]:
        del tensors[key]


def _nested(depth):
    """Keywords nested `depth` lists deep, written as text (json.dumps itself cannot go that deep)."""

    def change(tensors, document):
        document["concepts"][0]["views"][0]["keywords"] = "NESTED"
        return json.dumps(document).replace('"NESTED"', "[" * depth + "]" * depth)

    return change


UNUSABLE = {
    # name: (change, the sentence's words)
    "a concept with no views": (_no_views, "no reference views"),
    "a view that keeps no tokens": (_keeps_nothing, "keeps no memory tokens"),
    "metadata nested 100,000 deep": (_nested(100_000), "nests deeper"),
    "a lone surrogate in a name": (lambda t, d: d["concepts"][0].update(name="Chel\ud800sea"), "not valid Unicode"),
    "a lone surrogate in a keyword": (_first_view(keywords=["tabby", "\udfff"]), "not valid Unicode"),
    "a lone surrogate in a description": (_first_view(description="a cat \ud83d"), "not valid Unicode"),
    "a lone surrogate in the model name": (lambda t, d: d.update(model_id="Qwen\ud800"), "not valid Unicode"),
    "a version that is True": (lambda t, d: d.update(version=True), "format version"),
    "a version that is 1.0": (lambda t, d: d.update(version=1.0), "format version"),
    "no concepts at all": (lambda t, d: d.update(concepts=[]), "holds no concepts"),
    "an empty name": (lambda t, d: d["concepts"][1].update(name=""), "Concept 2 in this file has an empty name"),
    "a name of 41 characters": (lambda t, d: d["concepts"][0].update(name="n" * 41), "longer than 40 characters"),
    "a million keywords": (_first_view(keywords=["w"] * 1_000_000), "more than 100 keywords"),
    "keywords of 5,000 characters": (_first_view(keywords=["w" * 50] * 100), "longer than 1000 characters"),
    "a description of 100,000 characters": (_first_view(description="d" * 100_000), "longer than 1000"),
    "six views of one concept": (
        lambda t, d: d["concepts"][0].update(views=d["concepts"][0]["views"] * 3),
        "more than 5 reference views; a concept takes at most 5 photos",
    ),
    "an unknown key carrying a list": (_first_view(extra=list(range(100_000))), "not an Ego concept file"),
    "a keyword that is a list": (_first_view(keywords=[["tabby"]]), "not an Ego concept file"),
    "an unknown size source": (_first_view(area_source="x" * 10_000), "not an Ego concept file"),
    "a size that is not a number": (_first_view(area_pct=float("nan")), "not an Ego concept file"),
    # Memory rows that are not the views' kept tokens: one row more or fewer than the views keep.
    "a memory row fewer than its views keep": (
        lambda t, d: t.update({"c0.embeddings": t["c0.embeddings"][:-1].clone()}),
        "not an Ego concept file",
    ),
    "a size over 100 %": (_first_view(area_pct=250.0), "not an Ego concept file"),
    "a negative size": (_first_view(area_pct=-5.0), "not an Ego concept file"),
    # A kept token just past the view's grid (its scores' length): the app draws pictures from the grid.
    "a kept token past the grid": (
        lambda t, d: t["c0.v0.token_indices"].__setitem__(-1, t["c0.v0.scores"].numel()),
        "not an Ego concept file",
    ),
    # Memory rows beyond the photo's own tokens: one token of a view kept k times (a context of any length).
    "one token kept many times": (
        lambda t, d: t.update({"c0.v0.token_indices": torch.zeros_like(t["c0.v0.token_indices"])}),
        "not an Ego concept file",
    ),
}


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_unusable_or_oversized_metadata_is_refused_with_a_sentence(tmp_path, concepts, case):
    change, words = UNUSABLE[case]
    good = save_concepts(tmp_path / "good.ego", concepts)
    path = _with_document(good, tmp_path / "bad.ego", change)
    with pytest.raises(MemoryFileError, match=words) as refused:
        load_concepts(path, tiny_engine("qwen2-vl"))
    assert str(refused.value).endswith(".")


def test_a_refused_version_is_shown_short_and_printable(tmp_path, concepts):
    good = save_concepts(tmp_path / "good.ego", concepts)
    path = _with_document(good, tmp_path / "bad.ego", lambda t, d: d.update(version="\ud800" + "9" * 100_000))
    with pytest.raises(MemoryFileError, match="format version") as refused:
        load_concepts(path, tiny_engine("qwen2-vl"))
    assert len(str(refused.value)) < 300
    str(refused.value).encode("utf-8")


def test_a_large_thumbnail_is_shrunk_to_what_is_read_back(concepts, tmp_path):
    """A 4000 px photo given as a thumbnail would make a 48 MB file whose thumbnail reading then ignores."""
    from PIL import Image

    from ego.memory import MAX_THUMBNAIL_PX

    large = Image.new("RGB", (4000, 2000), (200, 40, 10))
    strip = Image.new("L", (5000, 2), 90)  # not RGB, and one side shrinks below a pixel
    path = save_concepts(tmp_path / "mine.ego", concepts, [large, strip])
    assert path.stat().st_size < 2 * 1024 * 1024
    first, second = ego.read_thumbnails(path, 2)
    assert first.size == (MAX_THUMBNAIL_PX, MAX_THUMBNAIL_PX // 2) and first.getpixel((5, 5)) == (200, 40, 10)
    assert second.size == (MAX_THUMBNAIL_PX, 1) and second.mode == "RGB"
    assert large.size == (4000, 2000) and strip.mode == "L"  # the caller's pictures are left as they were


def test_a_failed_write_is_the_machines_error_not_the_callers(concepts, tmp_path, monkeypatch):
    """A full disk or a folder without permission is no mistake of the caller's: not an InputError (which the Space
    would show as the visitor's, with the server's path in it), but the system's error, as it is."""
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left") as raised:
        save_concepts(tmp_path / "mine.ego", concepts)
    assert not isinstance(raised.value, ego.InputError)


def test_saving_what_is_not_concepts_pictures_or_a_file_path_is_an_input_error(concepts, tmp_path):
    from PIL import Image

    cases = [
        (lambda: save_concepts(tmp_path / "x.ego", concepts, ["a", None]), "Thumbnails must be PIL images"),
        (lambda: save_concepts(tmp_path / "x.ego", concepts, Image.new("RGB", (4, 4))), "as a list"),
        (lambda: save_concepts(tmp_path / "x.ego", concepts, [Image.new("RGB", (0, 4)), None]), "no pixels"),
        (lambda: save_concepts(tmp_path / "x.ego", ["Chelsea"]), "got str"),
        (lambda: save_concepts(tmp_path / "x.ego", [concepts[0], None]), "got NoneType"),
        (lambda: save_concepts(tmp_path, concepts), "is a folder; give a file name"),
        (lambda: save_concepts(tmp_path / "missing" / "x.ego", concepts), "does not exist"),
        (lambda: save_concepts(None, concepts), "path as text"),
    ]
    for call, message in cases:
        with pytest.raises(ego.InputError, match=message):
            call()
    assert list(tmp_path.iterdir()) == []
    # One concept alone is a list of one; thumbnails may come from any iterable.
    path = save_concepts(tmp_path / "one.ego", concepts[0], (p for p in [Image.new("RGB", (4, 4))]))
    assert ego.read_thumbnails(path, 1)[0].size == (4, 4)
    assert [c.name for c in load_concepts(path, tiny_engine("qwen2-vl"))] == ["Chelsea"]


def test_a_concept_is_equal_only_to_itself_so_lists_and_sets_of_concepts_work(concepts, tmp_path):
    engine = tiny_engine("qwen2-vl")
    chelsea, mug = concepts
    loaded = load_concepts(save_concepts(tmp_path / "mine.ego", [chelsea]), engine)[0]
    assert loaded != chelsea and loaded.views[0] != chelsea.views[0]  # the same memory, another object
    assert chelsea == chelsea and chelsea.views[0] == chelsea.views[0]
    assert loaded not in concepts and mug in concepts and concepts.index(mug) == 1
    kept = [chelsea, loaded, mug]
    kept.remove(loaded)
    assert kept == [chelsea, mug]
    assert len({chelsea, loaded, mug, chelsea}) == 3 and {chelsea: 1}.get(loaded) is None


def test_a_missing_concept_file_is_named_without_its_folder(tmp_path):
    with pytest.raises(MemoryFileError, match=r"^There is no concept file named 'mine\.ego' at that path") as raised:
        load_concepts(tmp_path / "gone" / "mine.ego", tiny_engine("qwen2-vl"))
    assert str(tmp_path) not in str(raised.value)


def test_a_concept_and_its_views_print_short(concepts):
    """A notebook shows a concept by its repr: what it is, not every tensor it holds (kilobytes per concept)."""
    chelsea, mug = concepts
    assert (
        repr(chelsea) == f"Concept('Chelsea', 2 photos, {chelsea.num_tokens} memory tokens, model_id='tiny-qwen2-vl')"
    )
    view = repr(mug.views[0])
    assert view.startswith(f"ConceptView(k={mug.views[0].k}, grid=") and "area_pct=5 (user)" in view
    assert "keywords=('red mug',)" in view and "tensor" not in view + repr(chelsea)


def test_a_files_names_are_held_to_the_rule_of_typed_names(tmp_path, concepts):
    """A name is a line of the prompt, and a concept file may come from anyone: its control characters and
    line breaks are folded as `introduce` folds a typed name's, so no file adds lines to the context."""
    good = save_concepts(tmp_path / "good.ego", concepts)
    path = _with_document(
        good, tmp_path / "lines.ego", lambda t, d: d["concepts"][0].update(name="Chel\n\nsea\u202e X")
    )
    engine = tiny_engine("qwen2-vl")
    loaded = load_concepts(path, engine)
    assert [c.name for c in loaded] == [engine.introduce("Chel\n\nsea\u202e X", [photo(0)], area_pct=12).name, "my mug"]
    assert loaded[0].name == "Chel sea X"


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl", "internvl3"])
def test_the_size_of_a_concept_file_is_known_before_it_is_written(tmp_path, family):
    """`concept_file_bytes` is at least the written file's size, and at most a few hundred bytes per concept more,
    with and without thumbnails (one larger than a file keeps), residual rows (Qwen3-VL) or not."""
    from PIL import Image

    from ego.memory import concept_file_bytes

    engine = tiny_engine(family)
    made = [
        engine.introduce("Chelsea", [photo(0), photo(1)], area_pct=12),
        engine.introduce("my mug", [photo(2)], keywords="red mug", area_pct=5),
    ]
    for thumbnails in (None, [Image.new("RGB", (128, 128)), Image.new("RGB", (900, 301))]):
        written = save_concepts(tmp_path / "mine.safetensors", made, thumbnails).stat().st_size
        assert written <= concept_file_bytes(made, thumbnails) <= written + 400 * len(made)
