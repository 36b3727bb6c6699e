"""Run one benchmark: introduce its concepts (cached as concept files), ask every query (appended to a log as
it comes, skipped on restart), score, and write metrics.json, predictions.jsonl and summary.md.

Data-parallel: started with `accelerate launch` or `torchrun`, each process reads its rank and the number of
processes from the environment (RANK / WORLD_SIZE, as both launchers set them), introduces its share of the
concepts, answers its share of the queries into its own part file, and rank 0 merges the parts and scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..memory import load_concepts, save_concepts
from ..quantization import loaded_quantization
from . import scoring
from .datasets import MAX_NEW_TOKENS, Benchmark, Query

PAPER_NUMBERS = json.loads((Path(__file__).with_name("paper_numbers.json")).read_text())
RESUMABLE_EXCEPT = ("limit", "judge")
"""Configuration entries that may change between a run and its resumption."""


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
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


# --- concepts ---------------------------------------------------------------------------------------------
def _file_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


ANSWER_ONLY_SETTINGS = ("max_concepts_in_context", "max_question_chars", "memory_keywords")
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
        concept = engine.introduce(name, [str(p) for p in benchmark.concepts[name]])
        partial = path.with_suffix(f".part{rank}")
        save_concepts(partial, [concept])
        os.replace(partial, path)
        concepts[name] = concept
    return {name: concepts[name] for name in names}


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
    (`judged`) also keeps its judge, since the verdicts already logged are that judge's."""
    path = out / "run.json"
    fixed = {k: v for k, v in config.items() if k not in RESUMABLE_EXCEPT}
    if path.is_file():
        stored = json.loads(path.read_text())
        if judged and stored.get("judge") != config.get("judge"):
            raise InputError(
                f"{out} holds answers judged by {stored.get('judge')}: resume it with that judge, then judge all its "
                f"answers with {config.get('judge')} by `python -m ego.evaluate judge {out} --judge ...`."
            )
        before = {k: v for k, v in stored.items() if k not in RESUMABLE_EXCEPT}
        if before != fixed:
            changed = sorted(k for k in set(before) | set(fixed) if before.get(k) != fixed.get(k))
            raise InputError(
                f"{out} holds a run with another configuration (differs in: {', '.join(changed)}); "
                "give another --out, or delete that folder to start again."
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=1, sort_keys=True))


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
        for query in todo:
            answered = respond(query, in_context, benchmark.root / query.media)
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
    return len(todo)


def answered_keys(out: Path) -> set[str]:
    """The queries answered in the run's folder so far, by any process of any launch."""
    return {r["key"] for part in (out / "parts").glob("*.jsonl") for r in _read_jsonl(part)}


def wait_for_parts(out: Path, keys, timeout_s: float = 7 * 24 * 3600) -> None:
    """Rank 0 waits until every query of `keys` is answered in some process's part file. What is waited for is the
    answers themselves, not marks with a time: the processes of a launch start their benchmarks at different
    moments (the others never wait for rank 0 to merge), so a mark's time says nothing about which launch wrote
    it."""
    deadline, missing = time.monotonic() + timeout_s, set(keys)
    while missing := missing - answered_keys(out):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(missing)} queries were still unanswered after {timeout_s:.0f} s: a process of the launch "
                "stopped; start the launch again to answer them (what is answered is kept)."
            )
        time.sleep(2.0)


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
    per_image = {m: (set(benchmark.truth[m]) & names, said_yes.get(m, set())) for m, names in asked.items()}
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
        for media, (_truth, yes) in per_image.items():
            full_truth = set(benchmark.truth[media])
            pair_records.append(
                (
                    {p for p in benchmark.pairs if set(p) <= full_truth and set(p) <= asked[media]},
                    {p for p in benchmark.pairs if set(p) <= yes},
                )
            )
        result = scoring.recognition_metrics(pair_records, benchmark.pairs)
        result["per_unit"] = {" & ".join(p): v for p, v in result["per_unit"].items()}
        result["aggregation"] += "; units are concept pairs (a pair is detected when all its members are)"
        result["per_concept"] = _brief(by_concept)
    result["unparsed"] = unparsed
    return result


def _split_metrics(benchmark: Benchmark, records: list[dict], per_image: dict, concepts: list, split: str) -> dict:
    """The recognition numbers of one test split, with its rejection rate: in a split without positives
    (This-Is-My-Img's Negative and Fake) precision and recall say nothing, and the share of questions answered
    "no" is what PeKit reports for it."""
    metrics = _brief(
        scoring.recognition_metrics([v for m, v in per_image.items() if benchmark.split_of[m] == split], concepts)
    )
    metrics["rejection_rate"] = scoring.rejection_rate(
        (r["concept"] in benchmark.truth[r["media"]], r["parsed"] is True)
        for r in records
        if benchmark.split_of[r["media"]] == split
    )
    return metrics


def _brief(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("per_unit", "aggregation")}


def write_results(
    benchmark: Benchmark, out: Path, config: dict, records: list[dict], paper_key: str | None = None
) -> dict:
    metrics = compute_metrics(benchmark, records)
    document = {
        "benchmark": benchmark.name,
        "kind": benchmark.kind,
        "model": config.get("model"),
        "settings": config.get("settings"),
        "config": config,
        "metrics": metrics,
        "paper": PAPER_NUMBERS.get(paper_key or benchmark.name, {}),
    }
    (out / "metrics.json").write_text(json.dumps(document, indent=1))
    (out / "summary.md").write_text(summary_markdown([document]))
    return document


MAIN_METRIC = {"recognition": "f1", "vqa": "accuracy", "caption": "recall"}
"""The metric of each kind of benchmark that the summary compares with the paper's number, unless the paper's
entry names another ("metric" in paper_numbers.json: its number was measured that way)."""


def compared_metric(document: dict) -> str:
    """The name of the run's metric that is set beside the paper's number."""
    return document["paper"].get("metric") or MAIN_METRIC[_kind(document)]


def _kind(document: dict) -> str:
    """The benchmark's kind; a document written before metrics.json recorded it: the first kind whose main metric
    it holds (recognition documents hold a recall too, but F1 comes first)."""
    return document.get("kind") or next(kind for kind, main in MAIN_METRIC.items() if main in document["metrics"])


def setting_differences(document: dict) -> list[str]:
    """What the run did otherwise than the paper's number was measured (its entry's "setting"): "memory_size_rule
    fixed (this run: area)", one per difference. A setting the run did not record is not compared."""
    config = document.get("config") or {}
    settings = document.get("settings") or config.get("settings") or {}
    differences = []
    for name, paper_value in (document["paper"].get("setting") or {}).items():
        ours = settings[name] if name in settings else config.get(name)
        if ours is not None and ours != paper_value:
            differences.append(f"{name} {paper_value} (this run: {ours})")
    return differences


def summary_markdown(documents: list[dict]) -> str:
    """Our numbers beside the paper's Ego and its point of comparison (a published method, or one of its own
    ablations where the name says so), with what differs from its protocol and from the setting of its number."""
    lines = [
        "| benchmark | metric | this run | n | Ego (paper) | paper's point of comparison | paper's source |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = set()
    for doc in documents:
        metrics, paper = doc["metrics"], doc["paper"]
        name = compared_metric(doc)
        value = metrics.get(name)
        n = metrics.get("n", metrics.get("n_images"))
        ours = "—" if value is None else f"{100 * value:.1f}"
        baseline = paper.get("baseline") or {}
        label = doc.get("config", {}).get("paper_key") or doc["benchmark"]
        ego = paper.get("ego", "—")
        differences = setting_differences(doc)
        if differences:
            ego = f"{ego} (another setting)"
            same = paper.get("same_setting_run")
            notes.add(
                f"{label}: the paper's {paper.get('ego')} was measured with {', '.join(differences)}"
                + (f"; the run under its setting is {same}." if same else ".")
            )
        if paper.get("metric_note"):  # the run's own main metric stays beside it
            main = MAIN_METRIC[_kind(doc)]
            own = "—" if metrics.get(main) is None else f"{100 * metrics[main]:.1f}"
            notes.add(f"{label}: compared with {name}, since {paper['metric_note']}; this harness's {main} is {own}.")
        lines.append(
            f"| {label} | {name} % | {ours} | {n} | {ego} | "
            f"{baseline.get('name', '—')} {baseline.get('value', '')} | "
            f"{paper.get('source', 'not reported')} ({paper.get('confidence', '—')}) |"
        )
        if "judge" in metrics:
            notes.add(f"Open answers judged by {metrics['judge']}; the paper's group used gpt-35-turbo.")
        config = doc.get("config", {})
        notes.add(
            f"Model {config.get('model')} with the {config.get('protocol')} protocol and "
            f"{config.get('refs')} reference photo(s) per concept; the paper's backbone is InternVL3-14B."
        )
        if config.get("limit"):
            notes.add(f"Limited to the first {config['limit']} queries per benchmark: not a full run.")
    lines += [
        "",
        (
            "Precision, recall and F1: mean of per-unit precision and of per-unit recall where defined, "
            "F1 their harmonic mean (macro_f1 and micro_f1 are in metrics.json; the paper's formula is not "
            "known)."
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
    _check_config(out, config, judged=any(q.kind == "open" for q in benchmark.queries))
    concepts = {} if engine is None else concepts_for(benchmark, engine, cache, rank, world)
    respond = respond or model_answer(engine, max_new_tokens)
    answer_share(
        benchmark, concepts, respond, out, config, limit=limit, judge=judge, rank=rank, world=world, progress=progress
    )
    if rank != 0:
        return None
    if world > 1:
        wait_for_parts(out, [q.key for q in benchmark.queries[:limit]])
    return write_results(benchmark, out, config, merge(benchmark, out, limit), paper_key)


def rejudge_table(out: Path, judge) -> list[dict]:
    """Judge again each benchmark of a table's folder (`run --benchmark table2 --out OUT` gives each benchmark a
    folder of its own) that holds open answers, and write the table's summary anew from all of them. Returns
    each benchmark's document, in the order of their folders' names."""
    runs = sorted(path.parent for path in out.glob("*/metrics.json"))
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
        raise InputError(
            f"{out} has no metrics.json; give the folder of a finished run (a benchmark's, or a table's: "
            "the --out of `run --benchmark table2`)."
        )
    config = json.loads(path.read_text())["config"]
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
    return write_results(benchmark, out, config, records, config.get("paper_key"))
