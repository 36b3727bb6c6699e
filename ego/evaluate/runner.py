"""Run one benchmark: introduce its concepts (cached as concept files), ask every query (appended to a log as
it comes, skipped on restart), score, and write metrics.json, predictions.jsonl and summary.md.

Data-parallel: started with `accelerate launch` or `torchrun`, each process reads its rank and the number of
processes from the environment (RANK / WORLD_SIZE, as both launchers set them), introduces its share of the
concepts, answers its share of the queries into its own part file, and rank 0 merges the parts and scores. A
process that stops on a benchmark leaves a mark beside its part file (`failure_mark`), so that rank 0 stops waiting
for its share and says which process stopped, why, and how to resume.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import socket
import sys
import time
import traceback
from pathlib import Path

from ..errors import InputError
from ..memory import load_concepts, save_concepts
from ..quantization import loaded_quantization
from ..settings import Settings
from . import scoring
from .datasets import MAX_NEW_TOKENS, Benchmark, Query, not_an_image_hint

PAPER_NUMBERS = json.loads((Path(__file__).with_name("paper_numbers.json")).read_text())
RESUMABLE_EXCEPT = ("limit", "judge")
"""Configuration entries that may change between a run and its resumption."""
RECORDED_SINCE = ("references", "loaded_quantization")
"""Configuration keys an earlier version did not record: a run folder without them resumes, and records them."""
SETTINGS_SINCE = {"query_image_kept_factor": 0}
"""Settings an earlier version did not have, each with the value that does what that version did (0: every query
photo given to the processor as it came): a run folder whose recorded settings lack one resumes where the run's
value is that one (a run under `--protocol paper`), and is refused where it is not."""


PROCESS_STARTED = time.time()
"""When this process started (to within its imports): a failure mark written before it is an earlier launch's,
since the processes of a launch start together and a launch starts after the one before it has ended."""


class ProcessFailedError(RuntimeError):
    """Another process of a data-parallel launch stopped on the benchmark rank 0 waits for: its share will not be
    answered in this launch."""


def process_share() -> tuple[int, int]:
    """(rank, number of processes) of a data-parallel launch; (0, 1) when started plainly."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard(items, rank: int, world: int) -> list:
    """Process `rank`'s share: every `world`-th item from position `rank`."""
    if not 0 <= rank < world:
        raise InputError(f"rank {rank} is outside a launch of {world} processes.")
    return list(items)[rank::world]


class Progress:
    """A one-line progress bar on stderr with the time left, estimated from the queries answered so far."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.shown = 0.0
        self.line_open = False

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.shown >= 0.5 or self.done == self.total:
            self.shown = now
            elapsed = now - self.started
            left = elapsed / self.done * (self.total - self.done)
            filled = int(20 * self.done / max(1, self.total))
            self.stream.write(
                f"\r{self.label} [{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} "
                f"{elapsed:.0f}s elapsed, ~{left:.0f}s left "
            )
            self.line_open = self.done != self.total
            if not self.line_open:
                self.stream.write("\n")
            self.stream.flush()

    def close(self) -> None:
        """Ends the bar's line if it is still open (a run stopped early), so that what is printed next starts on
        a line of its own."""
        if self.line_open:
            self.stream.write("\n")
            self.stream.flush()
            self.line_open = False


# --- concepts ---------------------------------------------------------------------------------------------
def _file_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


ANSWER_ONLY_SETTINGS = ("max_concepts_in_context", "max_question_chars", "memory_keywords", "query_image_kept_factor")
"""Settings that only answers read: a concept introduced under other values of these is the same concept."""


def concept_key(engine, name: str, references: list[Path]) -> str:
    """What a cached concept depends on: the model and how its weights were loaded (NF4 and bf16 choose other
    tokens), its layers, every setting an introduction may read, the name and the photos."""
    settings = {k: v for k, v in dataclasses.asdict(engine.settings).items() if k not in ANSWER_ONLY_SETTINGS}
    material = json.dumps(
        {
            "model": engine.model_id,
            "quantization": loaded_quantization(engine.model),
            "layers": list(engine.layers),
            "settings": settings,
            "name": name,
            "references": [(p.name, _file_sha1(p)) for p in references],
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _cache_path(cache: Path, engine, name: str, references: list[Path]) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
    return cache / f"{safe}-{concept_key(engine, name, references)}.safetensors"


def concepts_for(benchmark: Benchmark, engine, cache: Path, rank: int = 0, world: int = 1) -> dict:
    """Every concept of the benchmark, from the cache or introduced now (this process's share first, so that
    the processes of a launch introduce different concepts)."""
    cache.mkdir(parents=True, exist_ok=True)
    names = sorted(benchmark.concepts)
    order = shard(names, rank, world) + [n for n in names if n not in shard(names, rank, world)]
    concepts = {}
    for name in order:
        path = _cache_path(cache, engine, name, benchmark.concepts[name])
        if path.is_file():
            concepts[name] = load_concepts(path, engine)[0]
            continue
        concept = _introduce(engine, benchmark, name)
        partial = path.with_suffix(f".part{rank}")
        save_concepts(partial, [concept])
        os.replace(partial, path)
        concepts[name] = concept
    return {name: concepts[name] for name in names}


_PHOTO_NUMBER = re.compile(r"^Photo (\d+) of \d+: ")


def _introduce(engine, benchmark: Benchmark, name: str):
    """`engine.introduce` from the concept's photos; a photo it refuses is named by its path under the data root,
    with what its first bytes tell (a git-lfs pointer, a text file)."""
    photos = benchmark.concepts[name]
    try:
        return engine.introduce(name, [str(p) for p in photos])
    except InputError as error:
        number = _PHOTO_NUMBER.match(str(error))
        refused = [photos[int(number.group(1)) - 1]] if number else photos
        message = _PHOTO_NUMBER.sub("", str(error))
        named = ", ".join(_relative(benchmark.root, p) for p in refused)
        hints = "".join(dict.fromkeys(not_an_image_hint(p) for p in refused))
        raise InputError(f"Introducing {name!r} from {named}: {message}{hints}") from error


def _relative(root: Path, path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:  # a path outside the data root: shown whole
        return str(path)


# --- answering --------------------------------------------------------------------------------------------
def model_answer(engine, max_new_tokens: int | None = None):
    """The answerer used for real runs: `engine.answer` with every concept of the benchmark in context."""

    def respond(query: Query, concepts: list, media: Path) -> dict:
        kind = {"video": str(media)} if query.is_video else {"image": str(media)}
        cap = max_new_tokens or MAX_NEW_TOKENS[query.kind]
        answer = engine.answer(query.question, concepts, max_new_tokens=cap, **kind)
        return {"raw": str(answer), "used": list(answer.concepts_used), "context_tokens": answer.context_tokens}

    return respond


def score_record(query: Query, raw: str, benchmark: Benchmark, judge=None) -> dict:
    """The parsed value and the verdict of one answer (open answers: the judge's)."""
    record = {"parsed": None, "verdict": None}
    if query.kind == "yesno":
        parsed, present = scoring.parse_yes_no(raw), query.concept in benchmark.truth[query.media]
        record.update(parsed=parsed, verdict=(parsed is True) == present, gold=present)  # gold: the right answer
    elif query.kind == "option":
        parsed = scoring.parse_option(raw, query.options)
        gold = str(query.gold).strip().upper()
        verdict = None if parsed is None else parsed == gold  # unparsed: wrong, and counted as unparsed
        record.update(parsed=parsed, parsed_pekit=scoring.parse_option_pekit(raw), verdict=verdict)
    elif query.kind == "caption":
        named = sorted(scoring.names_in_caption(raw, benchmark.concepts))
        record.update(parsed=named, verdict=set(query.gold) <= set(named))
    elif judge is not None:
        verdict, reply = judge(query.question, str(query.gold), raw)
        record.update(verdict=verdict, judge=judge.spec, judge_reply=reply)
    return record


def _read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a log (a line cut short by a crash is ignored)."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def _check_config(out: Path, config: dict, judged: bool = False) -> None:
    """A run resumes only with its own configuration (`RESUMABLE_EXCEPT` apart); a benchmark with open answers
    (`judged`) whose part files already hold judged answers also keeps their judge, since those verdicts are that
    judge's. The configuration it resumes with is written to run.json."""
    path = out / "run.json"
    fixed = {k: v for k, v in config.items() if k not in RESUMABLE_EXCEPT}
    if path.is_file():
        stored = json.loads(path.read_text())
        logged = {
            record["judge"]
            for part in (out / "parts").glob("*.jsonl")
            for record in _read_jsonl(part)
            if record.get("kind") == "open" and record.get("judge")
        }
        if judged and logged and logged != {config.get("judge")}:
            raise InputError(
                f"{out} holds answers judged by {', '.join(sorted(logged))}: resume it with that judge, then judge "
                f"all its answers with {config.get('judge')} by `python -m ego.evaluate judge {out} --judge ...`."
            )
        before = {k: v for k, v in stored.items() if k not in RESUMABLE_EXCEPT}
        before.update({k: fixed[k] for k in RECORDED_SINCE if k not in before and k in fixed})
        if isinstance(before.get("settings"), dict):
            before["settings"] = {**SETTINGS_SINCE, **before["settings"]}
        if before != fixed:
            changed = sorted(k for k in set(before) | set(fixed) if before.get(k) != fixed.get(k))
            raise InputError(
                f"{out} holds a run with another configuration (differs in: {', '.join(changed)}): run it again "
                "with the options it was made with (its run.json), or give another --out to keep both."
            )
    text = json.dumps(config, indent=1, sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        out.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".partial{os.getpid()}")  # the processes of a launch write it side by side
        partial.write_text(text)
        os.replace(partial, path)


def answer_share(
    benchmark: Benchmark,
    concepts: dict,
    respond,
    out: Path,
    config: dict,
    *,
    limit=None,
    judge=None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> int:
    """Answer this process's share of the queries not answered yet, appending each to its part file.
    Returns how many were asked now."""
    _check_config(out, config, judged=any(q.kind == "open" for q in benchmark.queries))
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    done = answered_keys(out)
    queries = shard(benchmark.queries[:limit], rank, world)
    todo = [q for q in queries if q.key not in done]
    in_context = list(concepts.values())
    bar = Progress(len(todo), f"{benchmark.name} (process {rank + 1}/{world})") if progress and todo else None
    log_path = parts / f"rank{rank}.jsonl"
    if log_path.is_file():  # drop a line cut short by a crash, so the next record starts on its own line
        text = log_path.read_bytes()
        log_path.write_bytes(text[: text.rfind(b"\n") + 1])
    with open(log_path, "a") as log:
        try:
            for query in todo:
                answered = _respond(respond, query, in_context, benchmark.root)
                record = {
                    "key": query.key,
                    "kind": query.kind,
                    "media": query.media,
                    "question": query.question,
                    "concept": query.concept,
                    "group": query.group,
                    "gold": query.gold,
                    **answered,
                }
                record.update(score_record(query, answered["raw"], benchmark, judge))
                log.write(json.dumps(record) + "\n")
                log.flush()
                if bar:
                    bar.step()
        finally:
            if bar:
                bar.close()
    return len(todo)


def _respond(respond, query: Query, in_context: list, root: Path) -> dict:
    """One answer; a refusal (a file that does not decode, say) names the query's file under the data root, with
    what its first bytes tell (a git-lfs pointer, a text file)."""
    media = root / query.media
    try:
        return respond(query, in_context, media)
    except InputError as error:
        raise InputError(f"Answering about {query.media}: {error}{not_an_image_hint(media)}") from error


def answered_keys(out: Path) -> set[str]:
    """The queries answered in the run's folder so far, by any process of any launch."""
    return {r["key"] for part in (out / "parts").glob("*.jsonl") for r in _read_jsonl(part)}


def failure_mark(out: Path, rank: int) -> Path:
    """Where process `rank` records that it stopped on the benchmark of `out`: beside its part file, not named
    `*.jsonl`, so that no reader of the answers takes it for one."""
    return out / "parts" / f"rank{rank}.failed.json"


def _mark_failed(out: Path, rank: int, world: int, benchmark: str, error: BaseException) -> None:
    """Records this process's stop on the benchmark (its error and traceback) for rank 0, which waits for its share."""
    mark = failure_mark(out, rank)
    mark.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank,
        "world": world,
        "benchmark": benchmark,
        "error": f"{type(error).__name__}: {error}",
        "traceback": "".join(traceback.format_exception(error)),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "written": time.time(),
    }
    partial = mark.with_suffix(f".partial{os.getpid()}")  # rank 0 reads it whole or not at all
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, mark)


def _failures(out: Path, since: float) -> list[dict]:
    """The failure marks of the benchmark written since `since` (those of an earlier launch are left out: their
    process may not have reached this benchmark again yet), each with its path."""
    marks = []
    for path in sorted((out / "parts").glob("rank*.failed.json")):
        try:
            mark = json.loads(path.read_text())
        except (OSError, ValueError):  # removed meanwhile: its process started the benchmark again
            continue
        if mark.get("written", 0) >= since:
            marks.append({**mark, "path": path})
    return marks


def _stopped_sentence(out: Path, stopped: list[dict], unanswered: dict[int, int]) -> str:
    said = []
    for mark in stopped:
        rank = mark["rank"]
        said.append(
            f"process {rank + 1}/{mark['world']} (rank {rank}, pid {mark.get('pid')} on {mark.get('host')}) stopped "
            f"on {mark.get('benchmark')} with {mark['error'].rstrip('.')} (its traceback is in {mark['path']}, its "
            f"answers so far in {out / 'parts' / f'rank{rank}.jsonl'}; {unanswered[rank]} queries of its share are "
            "unanswered)"
        )
    processes = "; ".join(said)
    return (
        f"{processes[0].upper()}{processes[1:]}. What the processes answered is kept: mend the cause, then start the "
        f"same launch again; it resumes in {out} and asks only the queries not answered yet."
    )


def wait_for_parts(
    out: Path, keys, timeout_s: float = 7 * 24 * 3600, *, poll_s: float = 2.0, since: float | None = None
) -> None:
    """Rank 0 waits until every query of `keys` (the benchmark's, in its order) is answered in some process's part
    file. What is waited for is the answers themselves, not marks that a process finished: the processes of a
    launch start their benchmarks at different moments (the others never wait for rank 0 to merge), so such a
    mark's time would say nothing about which launch wrote it. A process that stopped says so at once with its
    failure mark (`failure_mark`): one written since this launch started (`since`, by default this process's start;
    a process of this launch cannot stop before it) raises `ProcessFailedError` while that process's share still
    misses answers. Polls every `poll_s` seconds."""
    keys, since = list(keys), PROCESS_STARTED if since is None else since
    deadline, missing = time.monotonic() + timeout_s, set(keys)
    while missing := missing - answered_keys(out):
        marks = _failures(out, since)
        unanswered = {
            mark["rank"]: sum(key in missing for key in keys[mark["rank"] :: mark["world"]]) for mark in marks
        }
        stopped = [mark for mark in marks if unanswered[mark["rank"]]]  # a share answered before stops nothing
        if stopped:
            raise ProcessFailedError(_stopped_sentence(out, stopped, unanswered))
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(missing)} queries were still unanswered after {timeout_s:.0f} s: a process of the launch "
                "stopped; start the launch again to answer them (what is answered is kept)."
            )
        time.sleep(poll_s)


# --- merging and scoring -----------------------------------------------------------------------------------
def merge(benchmark: Benchmark, out: Path, limit=None) -> list[dict]:
    """All parts' records in the benchmark's query order, one per query, written to predictions.jsonl."""
    by_key = {}
    for part in sorted((out / "parts").glob("*.jsonl")):
        for record in _read_jsonl(part):
            by_key.setdefault(record["key"], record)
    records = [by_key[q.key] for q in benchmark.queries[:limit] if q.key in by_key]
    _write_jsonl(out / "predictions.jsonl", records)
    return records


def _write_jsonl(path: Path, records: list[dict]) -> None:
    partial = path.with_suffix(".partial")
    with open(partial, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(partial, path)


def compute_metrics(benchmark: Benchmark, records: list[dict]) -> dict:
    if benchmark.kind == "recognition":
        return recognition(benchmark, records)
    if benchmark.kind == "caption":
        return scoring.caption_recall((r["gold"], r["parsed"]) for r in records)
    result = scoring.accuracy([r["verdict"] for r in records], [r["group"] for r in records])
    if any(r["kind"] == "option" for r in records):
        result["accuracy_pekit_parser"] = scoring.accuracy(
            [r["parsed_pekit"] == str(r["gold"]).strip().upper() for r in records if r["kind"] == "option"]
        )["accuracy"]
    judged = {r.get("judge") for r in records if r["kind"] == "open"}
    if judged:
        result["judge"] = ", ".join(sorted(str(j) for j in judged))
    return result


def recognition(benchmark: Benchmark, records: list[dict]) -> dict:
    """Per test image, the concepts asked about, the ones answered "yes", and the truth among those asked;
    single-concept units are concepts, multi-concept units are the pairs (a pair is detected when all its
    members are), with per-concept numbers beside them."""
    asked: dict[str, set] = {}
    said_yes: dict[str, set] = {}
    for r in records:
        asked.setdefault(r["media"], set()).add(r["concept"])
        if r["parsed"] is True:
            said_yes.setdefault(r["media"], set()).add(r["concept"])
    per_image = {m: (set(benchmark.truth[m]) & names, said_yes.get(m, set()), names) for m, names in asked.items()}
    concepts = sorted(benchmark.concepts)
    by_concept = scoring.recognition_metrics(per_image.values(), concepts)
    unparsed = sum(r["parsed"] is None for r in records)
    if not benchmark.pairs:
        result = by_concept
        if benchmark.split_of:
            result["per_split"] = {
                split: _split_metrics(benchmark, records, per_image, concepts, split)
                for split in sorted({benchmark.split_of[m] for m in per_image})
            }
    else:
        pair_records = []
        for media, (_truth, yes, _asked) in per_image.items():
            full_truth = set(benchmark.truth[media])
            asked_pairs = {p for p in benchmark.pairs if set(p) <= asked[media]}  # asked: all its members were
            pair_records.append(
                (
                    {p for p in asked_pairs if set(p) <= full_truth},
                    {p for p in benchmark.pairs if set(p) <= yes},
                    asked_pairs,
                )
            )
        result = scoring.recognition_metrics(pair_records, benchmark.pairs)
        result["per_unit"] = {" & ".join(p): v for p, v in result["per_unit"].items()}
        result["aggregation"] += "; units are concept pairs (a pair is detected when all its members are)"
        result["per_concept"] = _brief(by_concept)
    result["unparsed"] = unparsed
    return result


def _split_metrics(benchmark: Benchmark, records: list[dict], per_image: dict, concepts: list, split: str) -> dict:
    """The recognition numbers of one test split. In a split without positives (This-Is-My-Img's Negative and
    Fake) precision and recall say nothing; PeKit labels each of its images with its folder's concept c and
    reports the share where c was not detected (`rejection_rate`, per concept then averaged; None in Positive,
    whose images show c). `rejection_rate_all_questions` is the share of every question about a concept the image
    does not show that was not answered "yes"."""
    in_split = [r for r in records if benchmark.split_of[r["media"]] == split]
    metrics = _brief(
        scoring.recognition_metrics([v for m, v in per_image.items() if benchmark.split_of[m] == split], concepts)
    )
    targeted = [
        (r["concept"], r["parsed"] is True)
        for r in in_split
        if r["concept"] == benchmark.folder_concept.get(r["media"]) and r["concept"] not in benchmark.truth[r["media"]]
    ]
    metrics.update(scoring.targeted_rejection(targeted))
    metrics["rejection_rate_all_questions"] = scoring.rejection_rate_all_questions(
        (r["concept"] in benchmark.truth[r["media"]], r["parsed"] is True) for r in in_split
    )
    metrics["unparsed"] = sum(r["parsed"] is None for r in in_split)
    return metrics


def _brief(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("per_unit", "aggregation")}


def write_results(
    benchmark: Benchmark, out: Path, config: dict, records: list[dict], paper_key: str | None = None, notes=None
) -> dict:
    """metrics.json and summary.md of one benchmark; `notes` (what the loader did that a reader should know) go
    with them, the benchmark's own by default."""
    metrics = compute_metrics(benchmark, records)
    document = {
        "benchmark": benchmark.name,
        "kind": benchmark.kind,
        "model": config.get("model"),
        "settings": config.get("settings"),
        "config": config,
        "metrics": metrics,
        "paper": PAPER_NUMBERS.get(paper_key or benchmark.name, {}),
        "notes": list(benchmark.notes if notes is None else notes),
    }
    (out / "metrics.json").write_text(json.dumps(document, indent=1))
    (out / "summary.md").write_text(summary_markdown([document]))
    return document


MAIN_METRIC = {"recognition": "f1", "vqa": "accuracy", "caption": "recall"}
"""The metric of each kind of benchmark that the summary compares with the paper's number, unless the paper's
entry names another ("metric" in paper_numbers.json: its number was measured that way)."""

PAPER_PROTOCOL = {
    field.name: getattr(Settings.paper(), field.name)
    for field in dataclasses.fields(Settings)
    if getattr(Settings.paper(), field.name) != getattr(Settings(), field.name)
}
"""The settings the paper states and the library's defaults do not share (`Settings.paper()`): every paper number
was measured under them, besides its entry's own "setting"."""


def compared_metric(document: dict) -> str:
    """The name of the run's metric that is set beside the paper's number."""
    return document["paper"].get("metric") or MAIN_METRIC[_kind(document)]


def _kind(document: dict) -> str:
    """The benchmark's kind; a document written before metrics.json recorded it: the first kind whose main metric
    it holds (recognition documents hold a recall too, but F1 comes first)."""
    return document.get("kind") or next(kind for kind, main in MAIN_METRIC.items() if main in document["metrics"])


def references_used(config: dict) -> str | None:
    """The reference photos per concept the run really used: "5", or "4-5" when some concepts have fewer photos
    than --refs asked for (they are introduced from all they have). None when the run did not record them."""
    counts = [len(photos) for photos in (config.get("references") or {}).values()]
    if counts:
        return str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    return None if config.get("refs") is None else str(config["refs"])


_NOT_RECORDED = object()


def _run_value(name: str, config: dict, settings: dict):
    if name == "refs":
        return _NOT_RECORDED if references_used(config) is None else references_used(config)
    if name == "model_quantization":  # what the weights were loaded as, not the setting ("auto")
        return config.get("loaded_quantization", _NOT_RECORDED)
    if name in settings:
        return settings[name]
    return config.get(name, _NOT_RECORDED)


def setting_differences(document: dict) -> list[str]:
    """What the run did otherwise than the paper's number was measured: its entry's "setting" and the paper's
    protocol (`PAPER_PROTOCOL`), "memory_size_rule fixed (this run: area)" one per difference. The references are
    the counts really used ("refs 1 (this run: 1-5)"), the quantization the one the weights were loaded with. A
    setting the run did not record is not compared, nor is any for an entry without a setting."""
    return [f"{name} {paper} (this run: {ours})" for name, paper, ours in _differences(document)]


def _differences(document: dict) -> list[tuple[str, object, object]]:
    """(setting, the paper's value, the run's) for each difference `setting_differences` names."""
    setting = document["paper"].get("setting")
    if setting is None:
        return []
    config = document.get("config") or {}
    settings = document.get("settings") or config.get("settings") or {}
    expected = {**setting, **{k: v for k, v in PAPER_PROTOCOL.items() if k not in setting}}
    differences = []
    for name, paper_value in expected.items():
        ours = _run_value(name, config, settings)
        if ours is not _NOT_RECORDED and str(ours) != str(paper_value):
            differences.append((name, paper_value, ours))
    return differences


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _details(doc: dict, label: str) -> str:
    """The row of the details table: every headline number of the benchmark, the compared one in bold, the paper's
    beside each it reports."""
    metrics, paper, compared = doc["metrics"], doc["paper"], compared_metric(doc)
    described = {
        "recognition": [
            ("precision", "mean of per-unit precision"),
            ("recall", "mean of per-unit recall"),
            ("f1", "harmonic mean of these two"),
            ("macro_f1", "mean of per-unit F1"),
            ("micro_f1", "from the pooled counts"),
        ],
        "vqa": [
            ("accuracy", "this harness's letter parser" if "accuracy_pekit_parser" in metrics else "over questions"),
            ("accuracy_pekit_parser", "the published parser: the first letter"),
        ],
        "caption": [
            ("recall", "over name occurrences"),
            ("all_names_rate", "captions naming every concept they should"),
            ("recall_mean_per_image", "mean per image"),
        ],
    }[_kind(doc)]
    paper_values = {"precision": paper.get("precision"), "recall": paper.get("recall"), compared: paper.get("ego")}
    parts = []
    for name, meaning in described:
        if name not in metrics:
            continue
        shown = f"{name} {_percent(metrics[name])}"
        if name == compared:
            shown = f"**{shown}**"
        beside = f"; paper {paper_values[name]}" if paper_values.get(name) is not None else ""
        parts.append(f"{shown} ({meaning}{beside})")
    return f"| {label} | {', '.join(parts)} | {metrics.get('unparsed', '—')} |"


def _split_rows(doc: dict, label: str) -> list[str]:
    return [
        f"| {label} | {split} | {m.get('n_images')} | {_percent(m.get('precision'))} | {_percent(m.get('recall'))} | "
        f"{_percent(m.get('f1'))} | {_percent(m.get('rejection_rate'))} | "
        f"{_percent(m.get('rejection_rate_all_questions'))} | {m.get('unparsed', '—')} |"
        for split, m in (doc["metrics"].get("per_split") or {}).items()
    ]


def summary_markdown(documents: list[dict]) -> str:
    """Our numbers beside the paper's Ego and its point of comparison (a published method, or one of its own
    ablations where the name says so), with what differs from its protocol and from the setting of its number;
    then every headline number of each benchmark, and the per-split numbers where there are splits."""
    lines = [
        "| benchmark | metric | this run | n | Ego (paper) | paper's point of comparison | paper's source |",
        "|---|---|---|---|---|---|---|",
    ]
    details, splits = [], []
    notes, references = set(), {}
    for doc in documents:
        metrics, paper = doc["metrics"], doc["paper"]
        name = compared_metric(doc)
        n = metrics.get("n", metrics.get("n_images"))
        baseline = paper.get("baseline") or {}
        config = doc.get("config") or {}
        label = config.get("paper_key") or doc["benchmark"]
        ego = paper.get("ego", "—")
        differences = _differences(doc)
        if differences:
            ego = f"{ego} (another setting)"
        own = [f"{name} {paper} (this run: {ours})" for name, paper, ours in differences if name not in PAPER_PROTOCOL]
        protocol = [f"{name} {paper} (this run: {ours})" for name, paper, ours in differences if name in PAPER_PROTOCOL]
        if own:
            same = paper.get("same_setting_run")
            notes.add(
                f"{label}: the paper's {paper.get('ego')} was measured with {', '.join(own)}"
                + (f"; the run under its setting is {same}." if same else ".")
            )
        if protocol:
            notes.add(
                f"The paper's numbers were measured under its own protocol, which this run does not follow: "
                f"{', '.join(protocol)}; `--protocol paper` runs it (docs/evaluation.md)."
            )
        if paper.get("metric"):  # the run's own main metric stays beside it
            main = MAIN_METRIC[_kind(doc)]
            notes.add(
                f"{label}: compared with {name}, since {paper['metric_note']}; this harness's {main} is "
                f"{_percent(metrics.get(main))}."
            )
        elif paper.get("metric_note"):
            notes.add(f"{label}: {paper['metric_note']}.")
        lines.append(
            f"| {label} | {name} % | {_percent(metrics.get(name))} | {n} | {ego} | "
            f"{baseline.get('name', '—')} {baseline.get('value', '')} | "
            f"{paper.get('source', 'not reported')} ({paper.get('confidence', '—')}) |"
        )
        details.append(_details(doc, label))
        splits += _split_rows(doc, label)
        notes.update(f"{label}: {note}" for note in doc.get("notes") or [])
        if "judge" in metrics:
            notes.add(f"Open answers judged by {metrics['judge']}; the paper's group used gpt-35-turbo.")
        weights = ""
        if "loaded_quantization" in config:
            weights = f" (weights {config['loaded_quantization'] or 'not quantized'})"
        if config.get("model") == "oracle":
            notes.add("Model oracle: answers read from the fixture's _truth.json; a check of loading and scoring only.")
        else:
            notes.add(
                f"Model {config.get('model')}{weights} with the {config.get('protocol')} protocol; the paper's "
                "backbone is InternVL3-14B."
            )
        references[label] = references_used(config)
        if config.get("limit"):
            notes.add(f"Limited to the first {config['limit']} queries per benchmark: not a full run.")
    if references:
        usual = collections.Counter(references.values()).most_common(1)[0][0]
        others = [f"{label}: {count}" for label, count in references.items() if count != usual]
        notes.add(f"Reference photos per concept: {usual}" + (f" ({'; '.join(others)})." if others else "."))
    lines += [
        "",
        "Every headline number (%; the one set beside the paper's in bold, the paper's own beside those it reports):",
        "",
        "| benchmark | numbers | unparsed answers |",
        "|---|---|---|",
        *details,
    ]
    if splits:
        lines += [
            "",
            "Per test split (%; rejection_rate is PeKit's number for a split without positives):",
            "",
            "| benchmark | split | images | precision | recall | f1 | rejection_rate | rejection_rate_all_questions | "
            "unparsed answers |",
            "|---|---|---|---|---|---|---|---|---|",
            *splits,
        ]
    lines += [
        "",
        (
            "Recognition: precision and recall are means of per-unit values where defined, f1 their harmonic mean; "
            "the paper's F1 formula is not known (docs/evaluation.md says which variant fits which of its numbers)."
        ),
        "The prompts are this harness's own (the paper does not publish its prompts); see docs/evaluation.md.",
        "",
    ] + [f"- {n}" for n in sorted(notes)]
    return "\n".join(lines) + "\n"


def run_benchmark(
    benchmark: Benchmark,
    engine,
    out: Path,
    config: dict,
    *,
    cache: Path,
    respond=None,
    limit=None,
    judge=None,
    progress: bool = True,
    paper_key: str | None = None,
    max_new_tokens: int | None = None,
) -> dict | None:
    """The whole run of one benchmark in this process (a share of it in a data-parallel launch); the
    metrics document on rank 0, None on the others. With no engine, `respond` answers without concepts."""
    rank, world = process_share()
    out.mkdir(parents=True, exist_ok=True)
    failure_mark(out, rank).unlink(missing_ok=True)  # this process takes the benchmark up again
    try:
        _check_config(out, config, judged=any(q.kind == "open" for q in benchmark.queries))
        concepts = {} if engine is None else concepts_for(benchmark, engine, cache, rank, world)
        respond = respond or model_answer(engine, max_new_tokens)
        answer_share(
            benchmark,
            concepts,
            respond,
            out,
            config,
            limit=limit,
            judge=judge,
            rank=rank,
            world=world,
            progress=progress,
        )
    except BaseException as error:
        if world > 1:  # rank 0 would otherwise wait for this share until its timeout
            _mark_failed(out, rank, world, benchmark.name, error)
        raise
    if rank != 0:
        return None
    if world > 1:
        wait_for_parts(out, [q.key for q in benchmark.queries[:limit]])
    return write_results(benchmark, out, config, merge(benchmark, out, limit), paper_key)


def rejudge_table(out: Path, judge, order=()) -> list[dict]:
    """Judge again each benchmark of a table's folder (`run --benchmark table2 --out OUT` gives each benchmark a
    folder of its own) that holds open answers, and write the table's summary anew from all of them. Returns
    each benchmark's document, in the table's order (`order`: the folder names as the table runs them; others
    after them by name)."""
    position = {name: i for i, name in enumerate(order)}
    runs = sorted(
        (path.parent for path in out.glob("*/metrics.json")),
        key=lambda folder: (position.get(folder.name, len(position)), folder.name),
    )
    judged = [folder for folder in runs if any(r["kind"] == "open" for r in _read_jsonl(folder / "predictions.jsonl"))]
    if not judged:
        raise InputError(f"{out} holds no open answers to judge (only open-ended VQA needs a judge).")
    documents = [
        rejudge(folder, judge) if folder in judged else json.loads((folder / "metrics.json").read_text())
        for folder in runs
    ]
    before = out / "summary.md"
    not_run = [
        line for line in (before.read_text() if before.is_file() else "").splitlines() if line.startswith("- Not run:")
    ]
    before.write_text(summary_markdown(documents) + "".join(f"{line}\n" for line in not_run))
    return documents


def rejudge(out: Path, judge) -> dict:
    """Judge the stored open answers of a run again (neither the model nor the data is needed), rewriting
    predictions, metrics and summary."""
    path = out / "metrics.json"
    if not path.is_file():
        if (out / "run.json").is_file():
            raise InputError(
                f"{out} holds a run that did not finish (it has no metrics.json): run the same `python -m "
                "ego.evaluate run` command again to finish it (it resumes), then judge it."
            )
        raise InputError(
            f"{out} has no metrics.json; give the folder of a finished run (a benchmark's, or a table's: "
            "the --out of `run --benchmark table2`)."
        )
    stored = json.loads(path.read_text())
    config = stored["config"]
    records = _read_jsonl(out / "predictions.jsonl")
    if not any(r["kind"] == "open" for r in records):
        raise InputError(f"{out} holds no open answers to judge (only open-ended VQA needs a judge).")
    for record in records:
        if record["kind"] == "open":
            verdict, reply = judge(record["question"], str(record["gold"]), record["raw"])
            record.update(verdict=verdict, judge=judge.spec, judge_reply=reply)
    _write_jsonl(out / "predictions.jsonl", records)
    by_key = {r["key"]: r for r in records}
    for part in (out / "parts").glob("*.jsonl"):  # a later resumption merges the parts: they get the verdicts too
        _write_jsonl(part, [by_key.get(r["key"], r) for r in _read_jsonl(part)])
    config["judge"] = judge.spec
    (out / "run.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    benchmark = Benchmark(config["benchmark"], "vqa", Path(config["data"]), {}, [])
    return write_results(benchmark, out, config, records, config.get("paper_key"), stored.get("notes"))
