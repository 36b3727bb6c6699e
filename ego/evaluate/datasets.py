"""The public personalization benchmarks, read in the layouts they are published in, and a synthetic fixture
written in the same layouts.

Each loader turns a dataset folder into a `Benchmark`: the concepts with their reference photos, and the
queries (one model call each). docs/evaluation.md gives the download source and tree of every dataset.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

from ..errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}

REC_PROMPT = "Is {name} in this image? Answer with a single word."
OPTION_PROMPT = "{question}\nA. {a}\nB. {b}\nAnswer with the letter of the correct option."
CAPTION_PROMPT = "Describe this image in one sentence, calling the people and things you know by their names."
MAX_NEW_TOKENS = {"yesno": 4, "option": 16, "open": 64, "caption": 64}
"""Answer length caps per kind of question: a word, a letter with its option, a sentence."""


@dataclass(frozen=True)
class Query:
    key: str
    """Stable identity of the query within its benchmark (resumption skips the keys already answered)."""
    kind: str
    """"yesno", "option", "open" or "caption"."""
    question: str
    """The text sent to the model."""
    media: str
    """Path of the image or video, relative to the data root."""
    is_video: bool = False
    concept: str = ""
    """The concept a yes/no question asks about."""
    group: str = ""
    """The concept or pair the query belongs to (per-concept accuracy; recognition's image unit)."""
    raw_question: str = ""
    options: dict = field(default_factory=dict)
    gold: object = None
    """The correct letter, the reference answer, or the names a caption should contain."""


@dataclass
class Benchmark:
    name: str
    kind: str
    """"recognition", "vqa" or "caption"."""
    root: Path
    """The data root; query media are relative to it."""
    concepts: dict[str, list[Path]]
    """Concept name -> its reference photos, in the order they are used."""
    queries: list[Query]
    truth: dict[str, list[str]] = field(default_factory=dict)
    """Recognition: test image (relative path) -> the concepts it shows."""
    pairs: list[tuple[str, ...]] = field(default_factory=list)
    """Multi-concept recognition: the pairs scored as units."""
    split_of: dict[str, str] = field(default_factory=dict)
    """Recognition: test image -> its split (This-Is-My-Img's Positive / Negative / Fake folders)."""
    folder_concept: dict[str, str] = field(default_factory=dict)
    """Recognition with splits: test image -> the concept its folder names (in a Negative or Fake split, the
    concept the image is a targeted negative for)."""
    notes: list[str] = field(default_factory=list)
    """What the loader did that a reader of the results should know (folders skipped, fewer photos than asked)."""

    def reference_files(self) -> dict[str, list[str]]:
        """Each concept's reference photos, relative to the data root, in the order they are used."""
        return {name: [_rel(self.root, path) for path in paths] for name, paths in sorted(self.concepts.items())}


def natural_key(path: Path):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _hidden(path: Path) -> bool:
    """A name no dataset gives a concept or an image: hidden ones (".git", ".ipynb_checkpoints", macOS's "._0.png"
    AppleDouble files beside each image of an archive made on a Mac) and macOS's "__MACOSX" folder."""
    return path.name.startswith(".") or path.name == "__MACOSX"


def _images(folder: Path) -> list[Path]:
    """The image files directly in `folder` (sub-folders such as Yo'LLaVA's negative_example/ are ignored)."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not _hidden(p)),
        key=natural_key,
    )


def _folders(folder: Path, tree: str) -> list[Path]:
    """The sub-folders of `folder` (hidden ones and __MACOSX left out); `tree` is the layout the dataset needs,
    named when the folder is missing."""
    if not folder.is_dir():
        raise InputError(
            f"{folder} is missing: the dataset is there only in part. It needs the tree {tree} "
            '(docs/evaluation.md, "Getting the data").'
        )
    return sorted((p for p in folder.iterdir() if p.is_dir() and not _hidden(p)), key=lambda p: p.name.lower())


def _find(root: Path, candidates: list[str], what: str, source: str) -> Path:
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    raise InputError(
        f"The {what} was not found under {root} (looked for {', '.join(candidates)}). {source} "
        "See docs/evaluation.md for the expected tree."
    )


def _refs(folder: Path, n_refs: int) -> list[Path]:
    images = _images(folder)
    if not images:
        raise InputError(f"{folder} holds no reference images (.png or .jpg); every concept needs at least one.")
    return images[:n_refs]


def _rel(root: Path, path: Path) -> str:
    """`path` relative to `root`, as its key and as the run opens it: symbolic links are not followed (a dataset
    folder linked under the data folder stays under it)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()


GIT_LFS_POINTER = b"version https://git-lfs"
"""How a git-lfs pointer file begins: what a clone made without git-lfs holds in place of every image."""
GIT_LFS_HINT = "run `git lfs install`, then `git lfs pull` inside the dataset's clone"


def _is_git_lfs_pointer(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(len(GIT_LFS_POINTER)) == GIT_LFS_POINTER


def not_an_image_hint(path: Path) -> str:
    """Why a file that should be an image may not decode, when its first bytes tell: a git-lfs pointer or another
    small text file. Empty when they do not."""
    try:
        with open(path, "rb") as file:
            head = file.read(4096)
    except OSError:
        return ""
    if head.startswith(GIT_LFS_POINTER):
        return f" It is a git-lfs pointer, not the image: the dataset was cloned without git-lfs; {GIT_LFS_HINT}."
    if len(head) < 4096 and b"\0" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            return ""
        return " It is a small text file, not an image: check that the dataset was downloaded completely."
    return ""


def check_media(benchmark: Benchmark) -> None:
    """InputError when the benchmark's photos or test media are git-lfs pointers (a clone made without git-lfs
    holds one in place of every image), told before a model loads rather than at the first photo it reads."""
    paths = [p for refs in benchmark.concepts.values() for p in refs]
    paths += [benchmark.root / media for media in dict.fromkeys(q.media for q in benchmark.queries)]
    pointers = [path for path in paths if _is_git_lfs_pointer(path)]
    if pointers:
        what = (
            f"and {len(pointers) - 1} other files are git-lfs pointers, not images"
            if len(pointers) > 1
            else "is a git-lfs pointer, not an image"
        )
        raise InputError(
            f"{_rel(benchmark.root, pointers[0])} {what}: the dataset was cloned without git-lfs; {GIT_LFS_HINT}."
        )


def _read_json(root: Path, path: Path):
    """A dataset's JSON file, or an InputError that names it (relative to the data root) and what is wrong."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise InputError(f"{_rel(root, path)} is not a UTF-8 text file ({error.reason}); get it again.") from error
    except json.JSONDecodeError as error:
        if _is_git_lfs_pointer(path):
            raise InputError(
                f"{_rel(root, path)} is a git-lfs pointer, not the file: the dataset was cloned without git-lfs; "
                f"{GIT_LFS_HINT}."
            ) from error
        raise InputError(
            f"{_rel(root, path)} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            "get it again, or mend it by hand."
        ) from error


def _mapping(value, where: str, what: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{where} should be {what} (a JSON object); it is {type(value).__name__}.")
    return value


def _recognition_queries(root: Path, images: list[Path], names: list[str]) -> list[Query]:
    queries = []
    for image in images:
        rel = _rel(root, image)
        for name in names:
            queries.append(
                Query(
                    key=f"{rel}|{name}",
                    kind="yesno",
                    question=REC_PROMPT.format(name=name),
                    media=rel,
                    concept=name,
                    group=rel,
                )
            )
    return queries


def _resolve_listed(base: Path, listed: str, anchor: str) -> Path:
    """A media path as a dataset's JSON writes it ("./yollava-data/test/bo/3.png"), found under `base` from
    the `anchor` folder on (the JSON files were written relative to other roots)."""

    def inside(candidate: Path) -> bool:  # by its text ("./x/../y" made plain): a folder linked under `base` is in
        within = os.path.abspath(base)
        return os.path.commonpath([within, os.path.abspath(candidate)]) == within

    parts = Path(listed).parts
    if anchor in parts:
        candidate = Path(os.path.normpath(base.joinpath(*parts[parts.index(anchor) :])))
        if candidate.is_file() and inside(candidate):
            return candidate
    candidate = Path(os.path.normpath(base / listed))
    if not inside(candidate):
        raise InputError(f"{listed} is named in the question file but lies outside {base}; name files inside it.")
    if candidate.is_file():
        return candidate
    raise InputError(
        f"{listed} is named in the question file but was not found under {base}; check that the "
        "dataset was extracted completely."
    )


# --- Yo'LLaVA ---------------------------------------------------------------------------------------------
YOLLAVA_SOURCE = (
    "Get it with `git lfs clone https://github.com/WisconsinAIVision/YoLLaVA` (yollava-data/) or from "
    "https://huggingface.co/datasets/thaoshibe/YoLLaVA."
)
YOLLAVA_TREE = "yollava-data/{train,test}/<concept>/*.png (YoLLaVA/yollava-data/... in a clone of its repository)"


def _yollava_dir(root: Path) -> Path:
    return _find(root, ["yollava-data", "YoLLaVA/yollava-data", "YoLLaVA"], "Yo'LLaVA dataset", YOLLAVA_SOURCE)


def yollava_concepts(root: Path, n_refs: int) -> dict[str, list[Path]]:
    train = _yollava_dir(root) / "train"
    return {folder.name: _refs(folder, n_refs) for folder in _folders(train, YOLLAVA_TREE)}


def _check_test_folders(root: Path, named: dict[Path, str], concepts) -> None:
    """InputError naming the test folders (-> the concept each is named after) with no concept of that name in
    train/: their images would otherwise be scored as showing none of the concepts."""
    orphans = [(folder, name) for folder, name in named.items() if name not in concepts]
    if orphans:
        listed = []
        for folder, name in orphans:
            close = difflib.get_close_matches(name, list(concepts), n=1)
            listed.append(_rel(root, folder) + (f" (train/ has {close[0]!r})" if close else ""))
        raise InputError(
            f"These test folders name no concept of train/: {'; '.join(listed)}. Rename each after its concept's "
            "folder in train/ (the names must match exactly, case included), or remove it."
        )


def load_yollava_rec(root: Path, n_refs: int) -> Benchmark:
    base = _yollava_dir(root)
    concepts = yollava_concepts(root, n_refs)
    test_folders = _folders(base / "test", YOLLAVA_TREE)
    _check_test_folders(root, {folder: folder.name for folder in test_folders}, concepts)
    images, truth = [], {}
    for folder in test_folders:
        for image in _images(folder):
            images.append(image)
            truth[_rel(root, image)] = [folder.name]
    return Benchmark(
        "yollava-rec", "recognition", root, concepts, _recognition_queries(root, images, sorted(concepts)), truth=truth
    )


def _field(record: dict, key: str, where: str, needs: str):
    if key not in record:
        raise InputError(f"{where} has no {key!r}; {needs}")
    return record[key]


def _option_queries(root: Path, base: Path, source: Path, anchor: str) -> list[Query]:
    """The queries of a question file (`source`): `{concept: {media path: record}}`, a record with "options"
    and "correct_answer" being a two-option question, one with "answer" an open one."""
    document = _mapping(_read_json(root, source), _rel(root, source), "a mapping of concept names to questions")
    needs = (
        'each record needs "question" and either "options" {"A": ..., "B": ...} with "correct_answer" '
        '(A or B), or "answer" (an open question).'
    )
    queries = []
    for concept_key, records in sorted(document.items()):
        records = _mapping(records, f"{_rel(root, source)}, entry {concept_key!r},", "a mapping of media to questions")
        for listed, record in sorted(records.items()):
            where = f"{_rel(root, source)}, record {listed!r} of {concept_key!r},"
            record = _mapping(record, where, "a question record")
            media = _resolve_listed(base, listed, anchor)
            raw = str(_field(record, "question", where, needs))
            text = re.sub(r"<sks>|\bsks\b", concept_key, raw)
            options = record.get("options") or record.get("option")
            rel = _rel(root, media)
            is_video = media.suffix.lower() not in IMAGE_SUFFIXES
            if options:
                options = _mapping(options, f'{where} "options"', '{"A": ..., "B": ...}')
                if not {"A", "B"} <= set(options):
                    raise InputError(f'{where} "options" has no {"A" if "A" not in options else "B"}; {needs}')
                gold = str(_field(record, "correct_answer", where, needs)).strip().upper()
                if gold not in ("A", "B"):
                    raise InputError(f'{where} "correct_answer" is {record["correct_answer"]!r}, not A or B.')
                question = OPTION_PROMPT.format(question=text, a=options["A"], b=options["B"])
                queries.append(
                    Query(
                        key=f"{rel}|{raw}",
                        kind="option",
                        question=question,
                        media=rel,
                        group=concept_key,
                        raw_question=raw,
                        options=dict(options),
                        gold=gold,
                        is_video=is_video,
                    )
                )
            else:
                gold = record.get("answer", record.get("correct_answer"))
                if gold is None:
                    raise InputError(f'{where} has neither "options" nor "answer"; {needs}')
                queries.append(
                    Query(
                        key=f"{rel}|{raw}",
                        kind="open",
                        question=text,
                        media=rel,
                        group=concept_key,
                        raw_question=raw,
                        gold=gold,
                        is_video=is_video,
                    )
                )
    # One question about one photo or clip asked for several concepts (a clip showing two of them): each its own key,
    # the concept added; a key asked once stays as it was (a run folder of an earlier version resumes).
    counts = Counter(query.key for query in queries)
    return [replace(q, key=f"{q.key}|{q.group}") if counts[q.key] > 1 else q for q in queries]


def load_yollava_vqa(root: Path, n_refs: int) -> Benchmark:
    base = _yollava_dir(root)
    path = base / "yollava-visual-qa.json"
    if not path.is_file():
        raise InputError(f"{path} is missing; it ships with the Yo'LLaVA repository. {YOLLAVA_SOURCE}")
    return Benchmark(
        "yollava-vqa", "vqa", root, yollava_concepts(root, n_refs), _option_queries(root, base, path, "test")
    )


# --- MyVLM -----------------------------------------------------------------------------------------------
MYVLM_SOURCE = "Get it from https://huggingface.co/datasets/yuvalalaluf/MyVLM (non-commercial licence)."
MYVLM_CAPTIONS = ("captions.json", "captions_augmented.json")
"""What marks a concept folder in MyVLM's documented layout (`<concept>/*.jpg` + captions.json, or its augmented
variant); a clone of the dataset's repository also holds docs/ and .git/ beside them."""


def _myvlm(root: Path, n_refs: int) -> tuple[dict[str, list[Path]], list[tuple[str, Path]], list[str]]:
    base = _find(root, ["myvlm/data", "myvlm", "MyVLM"], "MyVLM dataset", MYVLM_SOURCE)
    tree = f"{_rel(root, base)}/<concept>/*.jpg with a captions.json in each concept folder"
    folders = _folders(base, tree)
    concept_folders = [f for f in folders if any((f / name).is_file() for name in MYVLM_CAPTIONS)]
    if not concept_folders:
        raise InputError(
            f"No folder of {_rel(root, base)} holds a captions.json, which marks a MyVLM concept folder: it needs "
            f"the tree {tree}. {MYVLM_SOURCE}"
        )
    skipped = [f.name for f in folders if f not in concept_folders]
    notes = (
        [f"Folders of {_rel(root, base)} without a captions.json, left out as not concepts: {', '.join(skipped)}."]
        if skipped
        else []
    )
    concepts, tests = {}, []
    for folder in concept_folders:
        name = folder.name.replace("_", " ")
        images = _images(folder)
        if len(images) <= n_refs:
            raise InputError(
                f"{_rel(root, folder)} has {len(images)} images; with --refs {n_refs} none is left to test on."
            )
        concepts[name] = images[:n_refs]
        tests += [(name, image) for image in images[n_refs:]]
    return concepts, tests, notes


def load_myvlm_rec(root: Path, n_refs: int) -> Benchmark:
    concepts, tests, notes = _myvlm(root, n_refs)
    truth = {_rel(root, image): [name] for name, image in tests}
    return Benchmark(
        "myvlm-rec",
        "recognition",
        root,
        concepts,
        _recognition_queries(root, [image for _, image in tests], sorted(concepts)),
        truth=truth,
        notes=notes,
    )


def _caption_queries(root: Path, tests: list[tuple[list[str], Path]]) -> list[Query]:
    return [
        Query(
            key=_rel(root, image),
            kind="caption",
            question=CAPTION_PROMPT,
            media=_rel(root, image),
            group=" and ".join(names),
            gold=list(names),
        )
        for names, image in tests
    ]


def load_myvlm_cap(root: Path, n_refs: int) -> Benchmark:
    concepts, tests, notes = _myvlm(root, n_refs)
    queries = _caption_queries(root, [([n], i) for n, i in tests])
    return Benchmark("myvlm-cap", "caption", root, concepts, queries, notes=notes)


# --- This-Is-My-Img -------------------------------------------------------------------------------------
THISISMY_SOURCE = (
    "Get This-is-My-Img from the Google Drive folder named in the README of "
    "https://github.com/vdorovatas/personalization_toolkit."
)
THISISMY_SPLITS = ("Positive", "Negative (Hard)", "Negative (Other)", "Fake")
THISISMY_TREES = {
    "Single-concept": "This-is-My-Img/Single-concept/{train/<Name-category>, "
    "test/{Positive,Negative (Hard),Negative (Other),Fake}/<Name-category>}/*.png",
    "Multi-concept": "This-is-My-Img/Multi-concept/{train/<Name-category>, test/<A>_and_<B>}/*.png",
}


def concept_name(folder_name: str) -> str:
    """ "Zaks dog coffee-dog" -> "Zaks dog coffee": the part after the last "-" is the category."""
    return folder_name.rsplit("-", 1)[0] if "-" in folder_name else folder_name


def _thisismy(root: Path, part: str) -> Path:
    base = _find(root, ["This-is-My-Img", "This-Is-My-Img"], "This-Is-My-Img dataset", THISISMY_SOURCE)
    if not (base / part).is_dir():
        raise InputError(f"{base / part} is missing; it needs the tree {THISISMY_TREES[part]}. {THISISMY_SOURCE}")
    return base / part


def thisismy_concepts(root: Path, part: str, n_refs: int) -> dict[str, list[Path]]:
    train = _thisismy(root, part) / "train"
    return {concept_name(folder.name): _refs(folder, n_refs) for folder in _folders(train, THISISMY_TREES[part])}


def load_thisismy_rec(root: Path, n_refs: int) -> Benchmark:
    """The four test splits pooled: a Positive/<c> image shows c; Negative and Fake images show none of the
    concepts (each is a targeted negative for its folder's concept). Metrics per split are added too.

    A `*_double.png` image shows its folder's concept and a second one its name does not give (PeKit's
    `detection.py`: Reynard's keyboard with his work chair, Nikki's car with her camper bag): it is asked about its
    folder's concept only, so that a right "yes" about the other is not scored as a false positive."""
    base = _thisismy(root, "Single-concept")
    concepts = thisismy_concepts(root, "Single-concept", n_refs)
    splits = [split for split in THISISMY_SPLITS if (base / "test" / split).is_dir()]
    if not splits:
        raise InputError(
            f"{base / 'test'} holds none of the test splits {', '.join(THISISMY_SPLITS)}; it needs the tree "
            f"{THISISMY_TREES['Single-concept']}. {THISISMY_SOURCE}"
        )
    images, truth, split_of, folder_concept = [], {}, {}, {}
    for split in splits:
        folders = _folders(base / "test" / split, THISISMY_TREES["Single-concept"])
        _check_test_folders(root, {folder: concept_name(folder.name) for folder in folders}, concepts)
        for folder in folders:
            for image in _images(folder):
                rel = _rel(root, image)
                images.append(image)
                truth[rel] = [concept_name(folder.name)] if split == "Positive" else []
                split_of[rel] = split
                folder_concept[rel] = concept_name(folder.name)
    queries = [
        query
        for query in _recognition_queries(root, images, sorted(concepts))
        if not Path(query.media).stem.endswith("_double") or query.concept == folder_concept[query.media]
    ]
    return Benchmark(
        "thisismy-rec",
        "recognition",
        root,
        concepts,
        queries,
        truth=truth,
        split_of=split_of,
        folder_concept=folder_concept,
    )


def _pair(folder_name: str, names) -> tuple[str, ...]:
    """ "Casey_and_Caseys boosted board" -> ("Casey", "Caseys boosted board"), checked against the concepts."""
    members = tuple(folder_name.split("_and_"))
    missing = [m for m in members if m not in names]
    if len(members) < 2 or missing:
        raise InputError(
            f"Test folder {folder_name!r} should be named <A>_and_<B> after concepts in train/ "
            f"(not found: {', '.join(missing) or 'a second concept'})."
        )
    return members


def _multi(root: Path, train: Path, test: Path, n_refs: int, strip_category: bool, tree: str):
    concepts = {(concept_name(f.name) if strip_category else f.name): _refs(f, n_refs) for f in _folders(train, tree)}
    tests = [(_pair(folder.name, concepts), image) for folder in _folders(test, tree) for image in _images(folder)]
    return concepts, tests


def _multi_rec(name: str, root: Path, concepts, tests) -> Benchmark:
    truth = {_rel(root, image): list(pair) for pair, image in tests}
    pairs = sorted({pair for pair, _ in tests})
    return Benchmark(
        name,
        "recognition",
        root,
        concepts,
        _recognition_queries(root, [image for _, image in tests], sorted(concepts)),
        truth=truth,
        pairs=pairs,
    )


def _thisismy_multi(root: Path, n_refs: int):
    base = _thisismy(root, "Multi-concept")
    return _multi(root, base / "train", base / "test", n_refs, True, THISISMY_TREES["Multi-concept"])


def load_thisismy_multi_rec(root: Path, n_refs: int) -> Benchmark:
    return _multi_rec("thisismy-multi-rec", root, *_thisismy_multi(root, n_refs))


def load_thisismy_multi_cap(root: Path, n_refs: int) -> Benchmark:
    concepts, tests = _thisismy_multi(root, n_refs)
    return Benchmark("thisismy-multi-cap", "caption", root, concepts, _caption_queries(root, tests))


def load_thisismy_multi_vqa(root: Path, n_refs: int) -> Benchmark:
    base = _thisismy(root, "Multi-concept")
    path = base / "this-is-my-visual-qa-multi-concept.json"
    if not path.is_file():
        raise InputError(f"{path} is missing. {THISISMY_SOURCE}")
    concepts = thisismy_concepts(root, "Multi-concept", n_refs)
    return Benchmark("thisismy-multi-vqa", "vqa", root, concepts, _option_queries(root, base, path, "test"))


# --- RAP multi-concept ----------------------------------------------------------------------------------
RAP_SOURCE = (
    "Get RAP's multi-concept images from the Google Drive file in the README of "
    "https://github.com/Hoar012/RAP-MLLM and arrange them as rap/multi-concept/train_1view_pekit/<concept>/ "
    "and rap/multi-concept/validation/<A>_and_<B>/."
)
RAP_TREE = "rap/multi-concept/{train_1view_pekit/<concept>, validation/<A>_and_<B>}/*.jpg"


def load_rap_multi_rec(root: Path, n_refs: int) -> Benchmark:
    base = _find(root, ["rap/multi-concept"], "RAP multi-concept set", RAP_SOURCE)
    train = next((base / t for t in ("train_1view_pekit", "train") if (base / t).is_dir()), base / "train_1view_pekit")
    return _multi_rec("rap-multi-rec", root, *_multi(root, train, base / "validation", n_refs, False, RAP_TREE))


# --- video ----------------------------------------------------------------------------------------------
VIDEO_FORMAT = (
    'this-is-my/video-qa.json: {"<concept name>": {"./eval_segment/<id>.mp4": {"question": "... '
    '<sks> ...", "options": {"A": "...", "B": "..."}, "correct_answer": "A"}}} (or '
    '"answer": "..." for an open question); concepts from This-is-My-Img/Single-concept/train/.'
)


def load_video_vqa(root: Path, n_refs: int) -> Benchmark:
    base = _find(root, ["this-is-my"], "video question set", "Write your own questions: " + VIDEO_FORMAT)
    path = base / "video-qa.json"
    if not path.is_file():
        raise InputError(
            f"{path} is missing. The paper's video questions are not public; write them as " + VIDEO_FORMAT
        )
    concepts = thisismy_concepts(root, "Single-concept", n_refs)
    document = _mapping(_read_json(root, path), _rel(root, path), "a mapping of concept names to questions")
    unknown = sorted(set(document) - set(concepts))
    if unknown:
        raise InputError(
            f"video-qa.json names concepts with no reference photos: {', '.join(unknown)}; use the "
            "names of This-is-My-Img/Single-concept/train/ without their category."
        )
    return Benchmark("thisismy-video-vqa", "vqa", root, concepts, _option_queries(root, base, path, "eval_segment"))


LOADERS = {
    "yollava-rec": load_yollava_rec,
    "yollava-vqa": load_yollava_vqa,
    "myvlm-rec": load_myvlm_rec,
    "myvlm-cap": load_myvlm_cap,
    "thisismy-rec": load_thisismy_rec,
    "thisismy-multi-rec": load_thisismy_multi_rec,
    "thisismy-multi-vqa": load_thisismy_multi_vqa,
    "thisismy-multi-cap": load_thisismy_multi_cap,
    "rap-multi-rec": load_rap_multi_rec,
    "thisismy-video-vqa": load_video_vqa,
}


def load_benchmark(name: str, root: Path, n_refs: int) -> Benchmark:
    """A benchmark as a run uses it: loaded, its media checked for git-lfs pointers, and a note naming the
    concepts that have fewer photos than `n_refs` (they are introduced from all they have)."""
    benchmark = LOADERS[name](root, n_refs)
    check_media(benchmark)
    fewer = {concept: len(refs) for concept, refs in sorted(benchmark.concepts.items()) if len(refs) < n_refs}
    if fewer:
        listed = ", ".join(f"{concept} ({count})" for concept, count in fewer.items())
        benchmark.notes.append(
            f"--refs {n_refs}: {len(fewer)} of {len(benchmark.concepts)} concepts have fewer photos and are "
            f"introduced from all they have: {listed}."
        )
    return benchmark


# --- the synthetic fixture --------------------------------------------------------------------------------
_COLORS = {
    "red": (220, 40, 40),
    "blue": (40, 70, 220),
    "green": (40, 170, 60),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
    "pink": (240, 120, 180),
}


def _draw(objects, rng: random.Random, size=(112, 112)):
    """A noisy gradient background with each (shape, color) object drawn at a random place and scale."""
    from PIL import Image, ImageDraw

    width, height = size
    top, bottom = [rng.randint(60, 200) for _ in range(3)], [rng.randint(60, 200) for _ in range(3)]
    image = Image.new("RGB", size)
    pixels = image.load()
    for y in range(height):
        for x in range(width):
            t = y / height
            pixels[x, y] = tuple(int(a * (1 - t) + b * t) + rng.randint(-8, 8) for a, b in zip(top, bottom))
    draw = ImageDraw.Draw(image)
    slot = width // max(1, len(objects))
    for i, (shape, color) in enumerate(objects):
        side = rng.randint(slot // 3, max(slot // 3 + 1, int(slot * 0.8)))
        x0 = i * slot + rng.randint(0, max(0, slot - side))
        y0 = rng.randint(0, height - side)
        box = (x0, y0, x0 + side, y0 + side)
        fill = _COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
        else:
            draw.rectangle(box, fill=fill)
    return image


def make_fixture(directory, seed: int = 0) -> Path:
    """Write small synthetic data in every supported dataset's published layout under `directory`, and
    `_truth.json` (which concepts each image shows, the answer to each question) for checking a harness."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    present: dict[str, list[str]] = {}
    answers: dict[str, object] = {}

    def save(path: Path, objects, names):
        path.parent.mkdir(parents=True, exist_ok=True)
        _draw(objects, rng).save(path)
        present[_rel(root, path)] = list(names)

    look = {"alpha": ("circle", "red"), "beta": ("square", "blue"), "gamma": ("triangle", "green")}
    yollava = root / "yollava-data"
    for name, obj in look.items():
        for i in range(3):
            save(yollava / "train" / name / f"{i}.png", [obj], [name])
        for i in range(3):
            save(yollava / "test" / name / f"{i}.png", [obj], [name])
    save(yollava / "train" / "alpha" / "negative_example" / "0.png", [("square", "yellow")], [])
    vqa, colors = {}, {"alpha": ("Red", "Blue"), "beta": ("Green", "Blue"), "gamma": ("Green", "Purple")}
    for name, (a, b) in colors.items():
        correct = "A" if a.lower() == look[name][1] else "B"
        listed = f"./yollava-data/test/{name}/0.png"
        vqa[name] = {
            listed: {"question": "What color is <sks>?", "options": {"A": a, "B": b}, "correct_answer": correct}
        }
        answers[f"yollava-data/test/{name}/0.png|What color is <sks>?"] = correct
    (yollava / "yollava-visual-qa.json").write_text(json.dumps(vqa, indent=1))

    myvlm = root / "myvlm" / "data"
    for folder, obj in {
        "red_cube": ("square", "red"),
        "blue_ring": ("circle", "blue"),
        "green_star": ("triangle", "green"),
    }.items():
        captions = {}
        for i in range(3):
            save(myvlm / folder / f"{i}.jpg", [obj], [folder.replace("_", " ")])
            captions[f"{i}.jpg"] = [f"{folder.replace('_', ' ')} on a plain background"] * 5
        (myvlm / folder / "captions.json").write_text(json.dumps(captions))

    single = root / "This-is-My-Img" / "Single-concept"
    things = {
        "Anns ball-ball": ("circle", "orange"),
        "Bens cup-cup": ("square", "cyan"),
        "Cats hat-hat": ("triangle", "pink"),
    }
    hard = {"orange": "purple", "cyan": "yellow", "pink": "red"}
    for folder, (shape, color) in things.items():
        name = concept_name(folder)
        for i in range(2):
            save(single / "train" / folder / f"{i}.png", [(shape, color)], [name])
        save(single / "test" / "Positive" / folder / "0.png", [(shape, color)], [name])
        save(single / "test" / "Negative (Hard)" / folder / "0.png", [(shape, hard[color])], [])
        save(single / "test" / "Negative (Other)" / folder / "0.png", [("square", "green")], [])
        save(single / "test" / "Fake" / folder / "0.png", [("circle" if shape != "circle" else "square", color)], [])

    multi = root / "This-is-My-Img" / "Multi-concept"
    people = {
        "Ann-woman": ("square", "yellow"),
        "Anns ball-ball": ("circle", "orange"),
        "Ben-man": ("triangle", "blue"),
        "Bens cup-cup": ("square", "cyan"),
    }
    for folder, obj in people.items():
        for i in range(2):
            save(multi / "train" / folder / f"{i}.png", [obj], [concept_name(folder)])
    multi_vqa = {}
    for person, thing in (("Ann", "Anns ball"), ("Ben", "Bens cup")):
        objects = [
            people[f"{person}-{'woman' if person == 'Ann' else 'man'}"],
            people[f"{thing}-{'ball' if 'ball' in thing else 'cup'}"],
        ]
        records = {}
        for k in (1, 2):
            path = multi / "test" / f"{person}_and_{thing}" / f"{person}_{thing}_{k}_positive.png"
            save(path, objects, [person, thing])
            question = f"What color is {thing}?"
            answer = objects[1][1].capitalize()
            records[f"./test/{person}_and_{thing}/{path.name}"] = {"question": question, "answer": answer}
            answers[f"{_rel(root, path)}|{question}"] = answer
        multi_vqa[f"{person}_{thing}"] = records
    (multi / "this-is-my-visual-qa-multi-concept.json").write_text(json.dumps(multi_vqa, indent=1))

    rap = root / "rap" / "multi-concept"
    cartoons = {
        "Bingo": ("circle", "yellow"),
        "Bluey": ("circle", "blue"),
        "H": ("square", "purple"),
        "Parrot_1": ("triangle", "green"),
    }
    for name, obj in cartoons.items():
        save(rap / "train_1view_pekit" / name / "0.jpg", [obj], [name])
    for a, b in (("Bingo", "Bluey"), ("H", "Parrot_1")):
        for i in range(2):
            save(rap / "validation" / f"{a}_and_{b}" / f"{i}.jpg", [cartoons[a], cartoons[b]], [a, b])

    video_qa = {}
    for i, (folder, (shape, color)) in enumerate(list(things.items())[:2]):
        name = concept_name(folder)
        path = root / "this-is-my" / "eval_segment" / f"clip-{i}.mp4"
        _write_clip(path, (shape, color), rng)
        wrong = "Purple" if color != "purple" else "Red"
        options = {"A": color.capitalize(), "B": wrong} if i == 0 else {"A": wrong, "B": color.capitalize()}
        correct = "A" if i == 0 else "B"
        question = "What color is <sks> in this video?"
        video_qa[name] = {
            f"./eval_segment/{path.name}": {"question": question, "options": options, "correct_answer": correct}
        }
        answers[f"{_rel(root, path)}|{question}"] = correct
        present[_rel(root, path)] = [name]
    (root / "this-is-my" / "video-qa.json").write_text(json.dumps(video_qa, indent=1))

    (root / "_truth.json").write_text(json.dumps({"present": present, "answers": answers}, indent=1))
    return root


def _write_clip(path: Path, obj, rng: random.Random, frames: int = 8, size: int = 64) -> None:
    """A short MP4 of the object moving left to right over a still background (PyAV, H.264)."""
    import av
    import numpy as np
    from PIL import ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    background = _draw([], rng, (size, size))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(8))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = background.copy()
            x = 4 + i * (size - 28) // frames
            draw = ImageDraw.Draw(frame)
            box = (x, 20, x + 24, 44)
            (draw.ellipse if obj[0] == "circle" else draw.rectangle)(box, fill=_COLORS[obj[1]])
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
