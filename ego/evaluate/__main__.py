"""python -m ego.evaluate {make-fixture, run, judge}: the paper's benchmarks in their published layouts.

    python -m ego.evaluate make-fixture /tmp/fixture
    python -m ego.evaluate run --benchmark yollava-rec --data /data --model internvl3-14b --out runs/yollava
    python -m ego.evaluate judge runs/multi-vqa --judge openai --judge-url http://localhost:8000/v1 --judge-model m

docs/evaluation.md gives the datasets, the command per table, the time on one GPU and what differs from the
paper's protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

from .. import options
from ..errors import InputError
from ..quantization import loaded_quantization
from ..settings import Settings
from . import runner
from .datasets import LOADERS, load_benchmark, make_fixture
from .judge import EndpointJudge, make_judge
from .oracle import oracle_answerer

TABLES = {
    "table1": ["yollava-rec", "myvlm-rec", "thisismy-rec", "thisismy-multi-rec", "rap-multi-rec"],
    "table2": ["yollava-vqa", "myvlm-cap", "thisismy-multi-vqa", "thisismy-multi-cap", "thisismy-video-vqa"],
}
TABLES["all"] = TABLES["table1"] + TABLES["table2"]
TABLE3 = {
    # variant -> (engine settings it changes, reference photos); all on Yo'LLaVA recognition with the in-context
    # budget fixed at K (about 20 % of a reference photo's tokens)
    "keywords-only": ({"memory_keywords": "only", "memory_size_rule": "fixed"}, 1),  # shares ego-1-view's concepts
    "full-image": ({"memory_selection": "whole_image"}, 1),
    "full-image-keywords": ({"memory_selection": "whole_image", "memory_keywords": "append"}, 1),
    "uniform": ({"memory_selection": "uniform", "memory_size_rule": "fixed"}, 1),
    "ego-1-view": ({"memory_size_rule": "fixed"}, 1),
    "ego-5-views": ({"memory_size_rule": "fixed"}, 5),
}

TOLD = (InputError, runner.ProcessFailedError)
"""Errors whose sentence says what to do (no traceback needed); one that stops a benchmark of a table lets the
others run."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ego.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fixture = commands.add_parser("make-fixture", help="write small synthetic data in every supported layout")
    fixture.add_argument("directory")
    fixture.add_argument("--seed", type=int, default=0)

    run = commands.add_parser("run", help="run a benchmark (or a whole table) and write its results")
    run.add_argument(
        "--benchmark", required=True, help=f"one of {', '.join(LOADERS)}, or a table: {', '.join([*TABLES, 'table3'])}"
    )
    run.add_argument("--data", required=True, help="the folder that holds the datasets (docs/evaluation.md)")
    run.add_argument(
        "--model",
        required=True,
        help="a preset (e.g. internvl3-14b, qwen2.5-vl-7b, tiny-qwen2.5-vl), a Hub id or a folder; "
        "'oracle' answers from a fixture's ground truth",
    )
    run.add_argument("--out", required=True, help="results folder (a run resumes into it)")
    run.add_argument("--limit", type=int, default=None, help="only the first N queries of each benchmark")
    run.add_argument("--refs", type=int, default=1, help="reference photos per concept (1 to 5)")
    options.add_protocol(run)
    options.add_quantization(run)
    run.add_argument("--cache", default=None, help="concept cache folder (default: OUT/concept-cache)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change one engine setting (ego/settings.py), e.g. --set k_cap_tokens=30; repeatable",
    )
    run.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="every answer's token cap, in place of the defaults (4 yes/no, 16 options, 64 open and captions)",
    )
    _judge_options(run)

    judge = commands.add_parser("judge", help="judge the stored open answers of a run again (no model needed)")
    judge.add_argument("out")
    _judge_options(judge)
    judge.add_argument("--model", default=None, help="with --judge self: the model that judges")
    return parser


TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")


def settings_changes(pairs: list[str]) -> dict:
    """--set NAME=VALUE pairs, each value converted to the declared type of the setting it changes: true/false
    (also yes/no, 1/0) for a switch, a number for a number, "none" for a setting that may be None."""
    types = typing.get_type_hints(Settings)
    changes = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in types or not value:
            raise InputError(f"--set {pair!r}: give NAME=VALUE with NAME one of the fields of ego/settings.py.")
        kind = types[name]
        optional = type(None) in typing.get_args(kind)
        kind = next((k for k in typing.get_args(kind) if k is not type(None)), kind)
        if optional and value.lower() == "none":
            changes[name] = None
        elif kind is bool:
            if value.lower() not in TRUE + FALSE:
                raise InputError(f"--set {pair!r}: {name} is true or false.")
            changes[name] = value.lower() in TRUE
        elif kind in (int, float):
            try:
                changes[name] = kind(value)
            except ValueError as error:
                raise InputError(f"--set {pair!r}: {name} takes a number ({kind.__name__}).") from error
        else:
            changes[name] = value
    return changes


def _judge_options(parser) -> None:
    parser.add_argument(
        "--judge",
        choices=["rule", "self", "openai"],
        default="rule",
        help="judge of open answers: rule (offline, not comparable), self (the evaluated model, "
        "biased) or openai (any OpenAI-compatible endpoint)",
    )
    parser.add_argument("--judge-url", default="", help="e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    parser.add_argument("--judge-model", default="", help="e.g. gpt-3.5-turbo")


def load_engine(model: str, quantization: str, settings: Settings):
    from ..engine import Ego

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    import torch

    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return Ego.from_pretrained(
        model,
        quantization=options.quantization(quantization),
        device=device,
        settings=settings,
    )


def _load(name: str, data: Path, refs: int):
    """A benchmark's data, read and checked before any model loads; a file the system cannot read is an
    InputError too, so that a table goes on with its other benchmarks."""
    try:
        return load_benchmark(name, data, refs)
    except OSError as error:
        raise InputError(
            f"Its data could not be read ({error}); check that the files are there and readable."
        ) from error


def _paper_key(name: str, refs: int) -> str:
    """The paper's number a benchmark is set beside: the one measured with `refs` photos where the paper has it."""
    with_refs = f"{name} ({refs} refs)"
    return with_refs if with_refs in runner.PAPER_NUMBERS else name


def run(args) -> list[dict]:
    if not 1 <= args.refs <= 5:
        raise InputError("--refs must be between 1 and 5.")
    if args.limit is not None and args.limit < 1:
        raise InputError("--limit must be at least 1.")
    data, out = Path(args.data).resolve(), Path(args.out)
    names = TABLES.get(args.benchmark, [args.benchmark])
    if args.benchmark != "table3" and any(n not in LOADERS for n in names):
        raise InputError(
            f"Unknown benchmark {args.benchmark!r}; choose one of {', '.join(LOADERS)}, {', '.join(TABLES)} or table3."
        )
    try:
        settings = options.protocol_settings(args.protocol).replace(**settings_changes(args.set))
    except ValueError as error:  # a value the settings refuse, with its own sentence
        raise InputError(f"--set: {error}") from error
    jobs = []  # (benchmark name, paper key, folder, settings changes, refs)
    if args.benchmark == "table3":
        jobs = [("yollava-rec", f"table3/{v}", out / v, changes, refs) for v, (changes, refs) in TABLE3.items()]
    else:
        several = len(names) > 1
        jobs = [(n, _paper_key(n, args.refs), out / n if several else out, {}, args.refs) for n in names]
    # Every dataset is read before the model loads: a missing one is told at once, not after hours of the others.
    benchmarks, not_run = {}, {}
    for name, _, _, _, refs in jobs:
        if (name, refs) in benchmarks or name in not_run:
            continue
        try:
            benchmarks[name, refs] = _load(name, data, refs)
        except InputError as error:
            if len(jobs) == 1:
                raise
            not_run[name] = str(error)
    if not benchmarks:
        raise InputError(
            "No benchmark of this table has its data: " + "; ".join(f"{k}: {v}" for k, v in not_run.items())
        )
    if not_run:
        lines = "\n  ".join(f"{name}: {why}" for name, why in not_run.items())
        print(
            f"Not run, their data is missing or incomplete (each runs on its own once it is there):\n  {lines}",
            file=sys.stderr,
        )
    for note in dict.fromkeys(note for benchmark in benchmarks.values() for note in benchmark.notes):
        print(f"Note: {note}", file=sys.stderr)
    # The judge is asked once before the model loads: a wrong URL, name or key is told in a second, not after it.
    judge = None if args.judge == "self" else make_judge(args.judge, url=args.judge_url, model=args.judge_model)
    if isinstance(judge, EndpointJudge) and any(q.kind == "open" for b in benchmarks.values() for q in b.queries):
        judge.probe()
    oracle = args.model == "oracle"
    engine = None if oracle else load_engine(args.model, args.quantization, settings)
    judge = judge or make_judge(args.judge, engine=engine, url=args.judge_url, model=args.judge_model)
    cache = Path(args.cache) if args.cache else out / "concept-cache"
    documents = []
    try:
        for name, paper_key, folder, changes, refs in jobs:
            if (name, refs) not in benchmarks:
                continue
            benchmark = benchmarks[name, refs]
            run_settings = settings.replace(**changes)
            run_settings = run_settings.replace(
                max_concepts_in_context=max(run_settings.max_concepts_in_context, len(benchmark.concepts))
            )
            config = {
                "benchmark": name,
                "paper_key": paper_key,
                "data": str(data),
                "model": args.model,
                "protocol": args.protocol,
                "refs": refs,
                "references": benchmark.reference_files(),
                "quantization": args.quantization,
                "settings": dataclasses.asdict(run_settings),
                "max_new_tokens": args.max_new_tokens,
                "limit": args.limit,
                "judge": judge.spec,
            }
            if engine is not None:
                config["loaded_quantization"] = loaded_quantization(engine.model)
            try:
                document = runner.run_benchmark(
                    benchmark,
                    None if oracle else engine.with_settings(run_settings),
                    folder,
                    config,
                    cache=cache,
                    respond=oracle_answerer(data) if oracle else None,
                    limit=args.limit,
                    judge=judge,
                    paper_key=paper_key,
                    max_new_tokens=args.max_new_tokens,
                )
            except TOLD as error:  # the table goes on: the other benchmarks do not share the cause
                if len(jobs) == 1:
                    raise
                not_run[paper_key] = f"stopped: {error}"
                print(f"Not finished, {paper_key}: {error}", file=sys.stderr)
                continue
            if document is not None:
                documents.append(document)
    finally:  # the table's summary of what was run, also when a later benchmark failed
        # A table none of whose benchmarks ran this time keeps the summary an earlier run wrote.
        if len(jobs) > 1 and (documents or (not_run and not (out / "summary.md").is_file())):
            listed = "".join(f"- Not run: {name}: {why}\n" for name, why in not_run.items())
            (out / "summary.md").write_text(runner.summary_markdown(documents) + listed)
    if documents:
        print((out / "summary.md").read_text())
    stopped = [name for name, why in not_run.items() if why.startswith("stopped: ")]
    if stopped:
        ran = (
            f"the other benchmarks ran and {out / 'summary.md'} lists what did not"
            if documents
            else "no benchmark ran, and any summary written before is left as it was"
        )
        raise InputError(
            f"{', '.join(stopped)} stopped before the end (the reason is above); {ran}. Run the same command again "
            "once the cause is mended: the answers given so far are kept."
        )
    return documents


def judge_again(args) -> dict:
    engine = None
    if args.judge == "self":
        if not args.model:
            raise InputError("--judge self needs --model (the model that answered).")
        engine = load_engine(args.model, "auto", Settings())
    judge = make_judge(args.judge, engine=engine, url=args.judge_url, model=args.judge_model)
    out = Path(args.out)
    if not (out / "metrics.json").is_file() and any(out.glob("*/metrics.json")):  # a table's folder
        documents = runner.rejudge_table(out, judge, order=[*TABLES["all"], *TABLE3])
        print((out / "summary.md").read_text())
        return {"table": str(out), "benchmarks": documents}
    document = runner.rejudge(out, judge)
    print((out / "summary.md").read_text())
    return document


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "make-fixture":
            print(make_fixture(args.directory, seed=args.seed))
        elif args.command == "run":
            run(args)
        else:
            judge_again(args)
    except TOLD as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
