"""`python -m ego.evaluate` end to end on the synthetic fixture: the oracle scores 100, a tiny model runs every
benchmark, a resumed run repeats nothing, a changed configuration is refused, shares of a data-parallel launch
merge to the whole (a process that stops is named at once), and open answers are re-judged through an
OpenAI-compatible endpoint on loopback."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import tiny_engine

from ego import InputError, Settings
from ego.evaluate import __main__ as cli, judge as judge_module, runner, scoring
from ego.evaluate.datasets import LOADERS, Benchmark, Query, concept_name, load_benchmark, make_fixture
from ego.evaluate.judge import JUDGE_PROMPT, EndpointJudge, ModelJudge
from ego.evaluate.oracle import oracle_answerer

FAST = ["--set", "description_max_new_tokens=3", "--set", "size_max_new_tokens=1", "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_fixture(tmp_path_factory.mktemp("fixture"))


@pytest.fixture
def engine(monkeypatch):
    """The session's tiny Qwen2.5-VL (the command would load the same preset), with its calls counted."""
    engine = tiny_engine("qwen2.5-vl")
    calls, asked = {"answer": 0, "introduce": 0}, []
    for name in calls:
        real = getattr(type(engine), name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            if _name == "answer":  # (question, concepts given, what their lines hold), with the run's settings
                asked.append((args[0], len(args[1]), self.settings.memory_keywords))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(type(engine), name, counted)
    monkeypatch.setattr(cli, "load_engine", lambda *args, **kwargs: engine)
    engine.calls, engine.asked = calls, asked
    yield engine
    del engine.calls, engine.asked


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fixture_layouts_are_read_as_published(data):
    counts = {name: (len(load(data, 1).concepts), len(load(data, 1).queries)) for name, load in LOADERS.items()}
    assert counts == {
        "yollava-rec": (3, 9 * 3),
        "yollava-vqa": (3, 3),
        "myvlm-rec": (3, 6 * 3),
        "myvlm-cap": (3, 6),
        "thisismy-rec": (3, 12 * 3),
        "thisismy-multi-rec": (4, 4 * 4),
        "thisismy-multi-vqa": (4, 4),
        "thisismy-multi-cap": (4, 4),
        "rap-multi-rec": (4, 4 * 4),
        "thisismy-video-vqa": (3, 2),
    }
    yollava = LOADERS["yollava-rec"](data, 5)
    assert all("negative_example" not in str(p) for refs in yollava.concepts.values() for p in refs)
    assert [p.name for p in yollava.concepts["alpha"]] == ["0.png", "1.png", "2.png"]
    rap = LOADERS["rap-multi-rec"](data, 1)
    assert ("H", "Parrot_1") in rap.pairs and "Anns ball" in LOADERS["thisismy-rec"](data, 1).concepts
    with pytest.raises(InputError, match="Yo'LLaVA"):
        LOADERS["yollava-rec"](data / "myvlm", 1)


def test_a_double_image_is_asked_about_its_folders_concept_only(data, tmp_path):
    """A `*_double.png` shows a second concept its name does not give: a right "yes" about it is no false positive."""
    root = tmp_path / "data"
    shutil.copytree(data, root)
    folder = root / "This-is-My-Img" / "Single-concept" / "test" / "Positive" / "Anns ball-ball"
    shutil.copy(folder / "0.png", folder / "7_double.png")
    benchmark = LOADERS["thisismy-rec"](root, 1)
    asked = [q.concept for q in benchmark.queries if q.media.endswith("7_double.png")]
    assert asked == ["Anns ball"] and len(benchmark.queries) == 12 * 3 + 1
    oracle = oracle_answerer(data)

    def respond(query, concepts, media):  # "yes" about everything on the double image
        return {"raw": "Yes."} if query.media.endswith("_double.png") else oracle(query, concepts, media)

    config = {"benchmark": benchmark.name, "model": "oracle"}
    runner.answer_share(benchmark, {}, respond, tmp_path / "run", config, progress=False)
    records = runner.merge(benchmark, tmp_path / "run")
    assert runner.compute_metrics(benchmark, records)["f1"] == 1.0


def test_oracle_scores_100_on_every_benchmark(data, tmp_path):
    assert (
        cli.main(["run", "--benchmark", "all", "--data", str(data), "--model", "oracle", "--out", str(tmp_path)]) == 0
    )
    for name in cli.TABLES["all"]:
        document = json.loads((tmp_path / name / "metrics.json").read_text())
        metrics = document["metrics"]
        main = runner.MAIN_METRIC[LOADERS[name](data, 1).kind]
        assert metrics[main] == 1.0, name
        assert all(r["verdict"] is True for r in _lines(tmp_path / name / "predictions.jsonl")), name
        if main == "f1":
            # The right answer is logged with each yes/no question: the oracle's (from the fixture's truth file).
            logged = _lines(tmp_path / name / "predictions.jsonl")
            assert all(r["gold"] is r["parsed"] for r in logged) and {r["gold"] for r in logged} == {True, False}
            assert metrics["precision"] == metrics["recall"] == metrics["micro_f1"] == 1.0
            assert metrics["n_positive"] > 0 and metrics["n_negative"] > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| thisismy-multi-vqa | accuracy % | 100.0 | 4 | 72.2 (another setting) | RAP 53.7" in summary


def _oracle(data, out, *args) -> str:
    """The summary of an oracle run (`args`: the benchmark and any other options)."""
    assert cli.main(["run", "--data", str(data), "--model", "oracle", "--out", str(out), *args]) == 0
    return (out / "summary.md").read_text()


def test_a_paper_number_measured_under_another_setting_is_marked_with_what_differs(data, tmp_path):
    """The 80.4 set beside Yo'LLaVA recognition is Table 3's Ego at a fixed budget; a run with the method's dynamic
    K (the default) is not that setting, and the summary says so and names the run that is."""
    paper = ["--protocol", "paper"]
    table1 = _oracle(data, tmp_path / "table1", "--benchmark", "table1", *paper)
    row = next(line for line in table1.splitlines() if line.startswith("| yollava-rec |"))
    assert "| 80.4 (another setting) |" in row and "Table 3 ablation" in row
    assert "strongest baseline" not in table1 and "| paper's point of comparison |" in table1
    assert (
        "- yollava-rec: the paper's 80.4 was measured with memory_size_rule fixed (this run: area); the run under "
        "its setting is table3/ego-1-view." in table1
    )
    assert "| 90.2 |" in table1 and "myvlm-rec:" not in table1  # the method's own setting: nothing to say
    fixed = _oracle(data, tmp_path / "fixed", "--benchmark", "yollava-rec", "--set", "memory_size_rule=fixed", *paper)
    assert "| 80.4 |" in fixed and "another setting" not in fixed
    five = _oracle(data, tmp_path / "five", "--benchmark", "myvlm-rec", "--refs", "2", *paper)
    assert "| 90.2 (another setting) |" in five and "refs 1 (this run: 2)" in five
    table3 = _oracle(data, tmp_path / "table3", "--benchmark", "table3", *paper)
    # The fixture's concepts have 3 photos: the 5-view row really used 3, and is marked so.
    assert [line.split(" | ")[0] for line in table3.splitlines() if "another setting" in line] == [
        "| table3/ego-5-views"
    ]
    assert "- table3/ego-5-views: the paper's 85.7 was measured with refs 5 (this run: 3)." in table3


def test_a_run_under_the_librarys_defaults_is_marked_as_another_setting_than_the_papers_protocol(data, tmp_path):
    """The paper's numbers were measured under its own protocol (Settings.paper(): one 448x448 tile per query, its
    prompts, bf16): the default protocol's run is marked, with each setting that differs."""
    summary = _oracle(data, tmp_path, "--benchmark", "myvlm-rec")
    assert "| 90.2 (another setting) |" in summary
    ours, paper = Settings(), Settings.paper()
    differing = [f.name for f in dataclasses.fields(Settings) if getattr(ours, f.name) != getattr(paper, f.name)]
    assert "query_image_max_pixels" in differing
    note = next(line for line in summary.splitlines() if "measured under its own protocol" in line)
    for name in differing:
        if name != "model_quantization":  # the oracle loads no weights: no quantization to compare
            assert f"{name} {getattr(paper, name)} (this run: {getattr(ours, name)})" in note
    assert "`--protocol paper` runs it" in note and "model_quantization" not in note
    # With weights loaded, what they were loaded as is compared: NF4 is not the paper's bf16.
    document = json.loads((tmp_path / "metrics.json").read_text())
    document["config"]["loaded_quantization"] = "4bit"
    assert "model_quantization None (this run: 4bit)" in runner.setting_differences(document)
    document["config"]["loaded_quantization"] = None
    assert not any(d.startswith("model_quantization") for d in runner.setting_differences(document))


def test_two_option_vqa_is_set_beside_the_paper_by_pekits_parser(data, tmp_path, monkeypatch):
    """ "A blue one." chooses B by its words, A by its first letter (how the paper's group read answers): the
    paper's 92.3 is compared with the latter, and metrics.json keeps both."""
    oracle = oracle_answerer(data)

    def respond(query, concepts, media):
        if query.kind == "option" and query.gold == "B":
            return {"raw": f"A {query.options['B'].lower()} one."}
        return oracle(query, concepts, media)

    monkeypatch.setattr(cli, "oracle_answerer", lambda root: respond)
    summary = _oracle(data, tmp_path, "--benchmark", "yollava-vqa", "--protocol", "paper")
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert metrics["accuracy"] == 1.0 and metrics["accuracy_pekit_parser"] == pytest.approx(2 / 3)
    assert "| yollava-vqa | accuracy_pekit_parser % | 66.7 | 3 | 92.3 | RAP 97.6 |" in summary
    assert "this harness's accuracy is 100.0" in summary


def test_the_compared_metric_is_the_kinds_main_one_unless_the_papers_entry_names_another():
    documents = {
        name: {"kind": kind, "paper": runner.PAPER_NUMBERS[name]}
        for name, kind in [("myvlm-rec", "recognition"), ("myvlm-cap", "caption"), ("thisismy-multi-vqa", "vqa")]
    }
    assert {name: runner.compared_metric(doc) for name, doc in documents.items()} == {
        "myvlm-rec": "f1",
        "myvlm-cap": "recall",
        "thisismy-multi-vqa": "accuracy",
    }
    assert runner.compared_metric({"kind": "vqa", "paper": runner.PAPER_NUMBERS["yollava-vqa"]}) == (
        "accuracy_pekit_parser"
    )
    assert runner.compared_metric({"kind": "caption", "paper": {}}) == "recall"  # a benchmark the paper lacks
    # A metrics.json written before it recorded its kind (`judge` rewrites a table's summary from them): by its
    # metrics; a recognition document holds a recall too.
    older = {"paper": {}, "metrics": {"precision": 0.5, "recall": 0.5, "f1": 0.5}}
    assert runner.compared_metric(older) == "f1"
    assert runner.compared_metric({"paper": {}, "metrics": {"recall": 0.5}}) == "recall"


def test_splits_without_positives_report_pekits_targeted_rejection_rate(data, tmp_path):
    """This-Is-My-Img's Negative and Fake images show none of the concepts; PeKit labels each with its folder's
    concept c and reports the share where c was not answered "yes". The share over every question about an absent
    concept is another number, kept under its own name."""
    benchmark = LOADERS["thisismy-rec"](data, 1)
    oracle = oracle_answerer(data)

    def respond(query, concepts, media):
        split, folder = Path(query.media).parts[-3], Path(query.media).parent.name
        own = query.concept == concept_name(folder)
        if split == "Fake" or (split == "Negative (Hard)" and not own) or (split == "Negative (Other)" and own):
            return {"raw": "Yes."}
        return oracle(query, concepts, media)

    runner.answer_share(benchmark, {}, respond, tmp_path, {"benchmark": benchmark.name}, progress=False)
    records = runner.merge(benchmark, tmp_path)
    per_split = runner.compute_metrics(benchmark, records)["per_split"]
    # 3 images per split, one per concept, each asked about the 3 concepts
    assert {split: m["rejection_rate"] for split, m in per_split.items()} == {
        "Fake": 0.0,  # "yes" about its own concept on every image
        "Negative (Hard)": 1.0,  # never fooled about the folder's concept, only about the other two
        "Negative (Other)": 0.0,
        "Positive": None,  # its images show their folder's concept
    }
    assert {split: m["rejection_rate_all_questions"] for split, m in per_split.items()} == {
        "Fake": 0.0,
        "Negative (Hard)": pytest.approx(3 / 9),
        "Negative (Other)": pytest.approx(6 / 9),
        "Positive": 1.0,
    }
    assert per_split["Fake"]["precision"] == 0.0 and per_split["Fake"]["recall"] is None  # kept, as before
    summary = runner.write_results(benchmark, tmp_path, {"benchmark": benchmark.name}, records)
    text = (tmp_path / "summary.md").read_text()
    assert "| thisismy-rec | Negative (Hard) | 3 | 0.0 | — | — | 100.0 | 33.3 | 0 |" in text
    assert summary["metrics"]["per_split"]["Positive"]["rejection_rate_micro"] is None


def test_every_benchmark_runs_on_a_tiny_model(data, tmp_path, engine):
    assert (
        cli.main(
            [
                "run",
                "--benchmark",
                "all",
                "--data",
                str(data),
                "--model",
                "tiny-qwen2.5-vl",
                "--out",
                str(tmp_path),
                "--limit",
                "1",
                *FAST,
            ]
        )
        == 0
    )
    for name in cli.TABLES["all"]:
        document = json.loads((tmp_path / name / "metrics.json").read_text())
        assert set(document) >= {"benchmark", "model", "settings", "metrics", "paper"}
        assert document["benchmark"] == name and document["model"] == "tiny-qwen2.5-vl"
        assert document["paper"]["ego"] > 0
        kind = LOADERS[name](data, 1).kind
        wanted = {
            "recognition": {"precision", "recall", "f1", "n_positive", "n_negative", "macro_f1", "micro_f1"},
            "vqa": {"accuracy", "n"},
            "caption": {"recall", "n"},
        }[kind]
        assert wanted <= set(document["metrics"]), name
        predictions = _lines(tmp_path / name / "predictions.jsonl")
        assert len(predictions) == 1 and all({"question", "raw", "parsed", "verdict"} <= set(r) for r in predictions)
        assert name in (tmp_path / name / "summary.md").read_text()
    assert engine.calls["answer"] == len(cli.TABLES["all"])
    # a concept is introduced once for all the benchmarks that share its name and photos (e.g. rec and VQA)
    distinct = {
        (name, tuple(str(p) for p in refs))
        for n in cli.TABLES["all"]
        for name, refs in LOADERS[n](data, 1).concepts.items()
    }
    assert engine.calls["introduce"] == len(distinct) == 17


def test_table3_runs_each_engine_variant(data, tmp_path, engine):
    small = tmp_path / "data"
    shutil.copytree(data / "yollava-data", small / "yollava-data", ignore=shutil.ignore_patterns("gamma"))
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "run",
                "--benchmark",
                "table3",
                "--data",
                str(small),
                "--model",
                "tiny-qwen2.5-vl",
                "--out",
                str(out),
                "--limit",
                "1",
                *FAST,
            ]
        )
        == 0
    )
    # variants that differ only in what answers read share their concepts: fixed K, whole image, uniform, 5 views
    assert engine.calls["introduce"] == 2 * 4
    for variant, (changes, refs) in cli.TABLE3.items():
        document = json.loads((out / variant / "metrics.json").read_text())
        assert document["paper"]["source"].startswith("Table 3")
        assert all(document["settings"][k] == v for k, v in changes.items()) and document["config"]["refs"] == refs
    # Every variant answers with both concepts; the keyword rows put their keywords in the concepts' lines.
    assert [(n, lines) for _, n, lines in engine.asked] == [
        (2, changes.get("memory_keywords", "none")) for changes, _ in cli.TABLE3.values()
    ]
    summary = (out / "summary.md").read_text()
    assert all(f"| table3/{variant} | f1 % |" in summary for variant in cli.TABLE3)


def test_resume_repeats_no_query_and_a_changed_config_is_refused(data, tmp_path, engine, capsys):
    args = [
        "run",
        "--benchmark",
        "yollava-rec",
        "--data",
        str(data),
        "--model",
        "tiny-qwen2.5-vl",
        "--out",
        str(tmp_path),
        *FAST,
    ]
    assert cli.main([*args, "--limit", "2"]) == 0
    assert engine.calls == {"answer": 2, "introduce": 3}
    assert cli.main([*args, "--limit", "4"]) == 0
    assert engine.calls == {"answer": 4, "introduce": 3}  # 2 new queries, concepts from the cache
    assert cli.main([*args, "--limit", "4"]) == 0
    assert engine.calls["answer"] == 4
    predictions = _lines(tmp_path / "predictions.jsonl")
    assert len({r["key"] for r in predictions}) == len(predictions) == 4

    part = tmp_path / "parts" / "rank0.jsonl"
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])  # the process died mid-line
    assert cli.main([*args, "--limit", "4"]) == 0
    assert engine.calls["answer"] == 5  # only the cut answer is asked again
    assert [r["key"] for r in _lines(tmp_path / "predictions.jsonl")] == [r["key"] for r in predictions]
    before = (tmp_path / "predictions.jsonl").read_text()

    assert cli.main([*args, "--limit", "4", "--refs", "2"]) == 2
    assert "refs" in capsys.readouterr().err
    assert engine.calls["answer"] == 5 and (tmp_path / "predictions.jsonl").read_text() == before


def test_a_run_folder_of_an_earlier_version_resumes_and_a_table_that_did_not_run_keeps_its_summary(
    data, tmp_path, capsys
):
    """A run.json written before the references and the loaded quantization were recorded resumes (answers of hours
    are not thrown away); a table none of whose benchmarks could run keeps the summary written before."""
    out = tmp_path / "table"
    summary = _oracle(data, out, "--benchmark", "table1", "--protocol", "paper")
    for run_json in out.glob("*/run.json"):
        document = json.loads(run_json.read_text())
        for key in runner.RECORDED_SINCE:
            document.pop(key, None)
        for name in runner.SETTINGS_SINCE:  # settings that did not exist then; the paper's protocol keeps their effect
            document["settings"].pop(name)
        run_json.write_text(json.dumps(document))
    answered = {path: path.read_text() for path in out.glob("*/parts/*.jsonl")}
    assert _oracle(data, out, "--benchmark", "table1", "--protocol", "paper") == summary
    assert {path: path.read_text() for path in answered} == answered  # nothing asked again
    assert all("references" in json.loads(path.read_text()) for path in out.glob("*/run.json"))
    # Under the default protocol the new setting changes what the run would do: an old folder is refused.
    default = tmp_path / "default"
    _oracle(data, default, "--benchmark", "yollava-rec")
    document = json.loads((default / "run.json").read_text())
    document["settings"].pop("query_image_kept_factor")
    (default / "run.json").write_text(json.dumps(document))
    capsys.readouterr()
    assert (
        cli.main(["run", "--data", str(data), "--model", "oracle", "--out", str(default), "--benchmark", "yollava-rec"])
        == 2
    )
    assert "differs in: settings" in capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["run", "--data", str(data), "--model", "oracle", "--out", str(out), "--benchmark", "table1"]) == 2
    assert "no benchmark ran" in capsys.readouterr().err
    assert (out / "summary.md").read_text() == summary


def test_data_parallel_shares_merge_to_the_whole(data, tmp_path):
    benchmark = LOADERS["thisismy-multi-rec"](data, 1)
    oracle, asked = oracle_answerer(data), []

    def respond(query, concepts, media):
        asked.append(query.key)
        return oracle(query, concepts, media)

    config = {"benchmark": benchmark.name, "model": "oracle"}
    keys = [q.key for q in benchmark.queries]
    runner.answer_share(benchmark, {}, respond, tmp_path, config, rank=1, world=2, progress=False)
    with pytest.raises(TimeoutError, match="unanswered"):  # rank 0's share is missing
        runner.wait_for_parts(tmp_path, keys, timeout_s=0)
    runner.answer_share(benchmark, {}, respond, tmp_path, config, rank=0, world=2, progress=False)
    runner.wait_for_parts(tmp_path, keys, timeout_s=5)
    shares = [{r["key"] for r in _lines(tmp_path / "parts" / f"rank{r}.jsonl")} for r in (0, 1)]
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert sorted(asked) == sorted(q.key for q in benchmark.queries)
    records = runner.merge(benchmark, tmp_path)
    assert [r["key"] for r in records] == [q.key for q in benchmark.queries]
    assert runner.write_results(benchmark, tmp_path, config, records)["metrics"]["f1"] == 1.0


def test_rank_0_of_a_launch_merges_after_a_process_that_finished_before_it_started(data, tmp_path, monkeypatch):
    """The processes of a launch do not wait for each other between benchmarks: another process often finishes its
    share before rank 0 begins that benchmark, and rank 0 must still merge instead of waiting for it again."""
    benchmark = LOADERS["thisismy-multi-rec"](data, 1)
    config = {"benchmark": benchmark.name, "model": "oracle"}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    kwargs = dict(cache=tmp_path / "cache", respond=oracle_answerer(data), progress=False)
    assert runner.run_benchmark(benchmark, None, tmp_path / "run", config, **kwargs) is None
    monkeypatch.setenv("RANK", "0")
    merged = []
    rank_0 = threading.Thread(
        target=lambda: merged.append(runner.run_benchmark(benchmark, None, tmp_path / "run", config, **kwargs)),
        daemon=True,
    )
    rank_0.start()
    rank_0.join(timeout=30)
    assert merged and merged[0]["metrics"]["f1"] == 1.0


def test_rank_0_learns_at_once_that_another_process_stopped_and_the_launch_resumes(data, tmp_path, monkeypatch):
    """A process that stops on a benchmark leaves a failure mark: rank 0, waiting for its share, says at once which
    process stopped, where its traceback and answers are and how to resume, instead of waiting until its timeout.
    A mark of an earlier launch does not stop a later one's rank 0, and the launch started again answers only the
    rest of that process's share."""
    benchmark = LOADERS["thisismy-multi-rec"](data, 1)
    config = {"benchmark": benchmark.name, "model": "oracle"}
    out, keys = tmp_path / "run", [q.key for q in benchmark.queries]
    oracle, asked = oracle_answerer(data), []

    def respond(query, concepts, media):
        asked.append(query.key)
        if len(asked) == 3 and failing:
            raise InputError("it does not decode.")
        return oracle(query, concepts, media)

    failing, waiting = False, threading.Event()
    real_wait = runner.wait_for_parts

    def wait_for_parts(*args, **kwargs):
        waiting.set()
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(runner, "wait_for_parts", wait_for_parts)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    kwargs = dict(cache=tmp_path / "cache", respond=respond, progress=False)
    outcome = []

    def rank_0():
        try:
            outcome.append(runner.run_benchmark(benchmark, None, out, config, **kwargs))
        except Exception as error:  # noqa: BLE001 -- the test looks at it
            outcome.append(error)

    waiting_rank_0 = threading.Thread(target=rank_0, daemon=True)
    waiting_rank_0.start()
    assert waiting.wait(timeout=30)  # rank 0 answered its share and waits for rank 1's
    failing = True
    asked.clear()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(InputError, match="does not decode"):
        runner.run_benchmark(benchmark, None, out, config, **kwargs)
    waiting_rank_0.join(timeout=15)  # the mark is seen at the next look (every 2 s), not after days
    assert not waiting_rank_0.is_alive() and isinstance(outcome[0], runner.ProcessFailedError)
    told, mark = str(outcome[0]), runner.failure_mark(out, 1)
    share = len(keys[1::2])
    assert told.startswith(f"Process 2/2 (rank 1, pid {os.getpid()} on ")
    assert "with InputError: Answering about" in told and f"its traceback is in {mark}" in told
    assert f"its answers so far in {out / 'parts' / 'rank1.jsonl'}; {share - 2} queries of its share" in told
    assert f"start the same launch again; it resumes in {out}" in told
    assert "does not decode" in json.loads(mark.read_text())["traceback"]
    assert len(_lines(out / "parts" / "rank1.jsonl")) == 2  # kept

    # The next launch: its rank 0 does not take the earlier launch's mark for a stop of this one.
    with pytest.raises(TimeoutError, match="unanswered"):
        runner.wait_for_parts(out, keys, timeout_s=0.2, poll_s=0.05, since=time.time())
    failing = False
    asked.clear()
    runner.run_benchmark(benchmark, None, out, config, **kwargs)
    assert len(asked) == share - 2 and not mark.exists()  # only the rest of its share; the mark is gone
    monkeypatch.setenv("RANK", "0")
    assert runner.run_benchmark(benchmark, None, out, config, **kwargs)["metrics"]["f1"] == 1.0


def test_an_option_answer_that_names_no_option_is_wrong_and_counted_unparsed(tmp_path):
    benchmark = Benchmark(name="two-options", kind="vqa", root=tmp_path, concepts={}, queries=[])
    query = Query("q", "option", "Cat or dog?", "x.png", options={"A": "Cat", "B": "Dog"}, gold="B")
    records = [runner.score_record(query, raw, benchmark) for raw in ("I am not sure.", "The answer is a dog.")]
    assert [r["verdict"] for r in records] == [None, True]
    assert scoring.accuracy([r["verdict"] for r in records]) == {"accuracy": 0.5, "n": 2, "unparsed": 1}


def test_the_model_judges_a_long_answer_and_visitors_keep_their_question_cap():
    engine = tiny_engine("qwen2.5-vl")
    judge = ModelJudge(engine)
    prediction = "The dog on the left is Rex, sitting by the door and looking at the camera. " * 4
    verdict, reply = judge("Where is Rex?", "By the door.", prediction)
    assert len(JUDGE_PROMPT.format(question="Where is Rex?", answer="By the door.", pred=prediction)) > 1000
    assert verdict in (True, False, None) and isinstance(reply, str)
    with pytest.raises(InputError, match="at most 1000 characters"):
        engine.answer("x" * 1001, max_new_tokens=1)


def test_set_converts_each_value_to_its_settings_declared_type():
    changes = cli.settings_changes(
        ["keywords_drop_stopwords=False", "batch_cache_min_free_mb=1.5", "k_cap_tokens=30", "system_prompt=original"]
    )
    assert changes == {
        "keywords_drop_stopwords": False,
        "batch_cache_min_free_mb": 1.5,
        "k_cap_tokens": 30,
        "system_prompt": "original",
    }
    assert type(changes["batch_cache_min_free_mb"]) is float and type(changes["k_cap_tokens"]) is int
    assert cli.settings_changes(["keywords_drop_stopwords=yes", "model_quantization=none"]) == {
        "keywords_drop_stopwords": True,
        "model_quantization": None,
    }
    for pair, says in [("keywords_drop_stopwords=maybe", "true or false"), ("k_cap_tokens=many", "number")]:
        with pytest.raises(InputError, match=says):
            cli.settings_changes([pair])


def _run_table2(data, tmp_path, capsys) -> Path:
    """Table 2 run by the oracle, on data without the (not public) video questions: its --out folder."""
    root = tmp_path / "data"
    shutil.copytree(data, root)
    (root / "this-is-my" / "video-qa.json").unlink()  # the paper's video questions are not public
    out = tmp_path / "table2"
    assert cli.main(["run", "--benchmark", "table2", "--data", str(root), "--model", "oracle", "--out", str(out)]) == 0
    assert "thisismy-video-vqa" in capsys.readouterr().err
    summary = (out / "summary.md").read_text()
    assert "- Not run: thisismy-video-vqa" in summary
    assert all(f"| {name} |" in summary for name in cli.TABLES["table2"][:4])
    assert not (out / "thisismy-video-vqa").exists()
    return out


def test_a_table_runs_the_benchmarks_whose_data_is_there_and_says_which_are_not(data, tmp_path, capsys):
    _run_table2(data, tmp_path, capsys)


def test_a_tables_open_answers_are_judged_again_from_its_folder(data, tmp_path, judge_server, capsys):
    out = _run_table2(data, tmp_path, capsys)
    metrics = {p.parent.name: json.loads(p.read_text())["metrics"] for p in out.glob("*/metrics.json")}
    open_ones = [name for name in metrics if "judge" in metrics[name]]
    assert open_ones and len(open_ones) < len(metrics)
    args = ["judge", str(out), "--judge", "openai", "--judge-url", judge_server + "/v1", "--judge-model", "m"]
    assert cli.main(args) == 0  # the judge says "No." to everything
    again = {p.parent.name: json.loads(p.read_text())["metrics"] for p in out.glob("*/metrics.json")}
    assert all(again[name]["accuracy"] == 0.0 and "m" in again[name]["judge"] for name in open_ones)
    assert all(again[name] == metrics[name] for name in metrics if name not in open_ones)
    summary = (out / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith(tuple(f"| {name} |" for name in metrics))]
    table = [row for row in rows if " % | " in row]  # the table beside the paper's, in the table's order
    assert [row.split(" | ")[0][2:] for row in table] == cli.TABLES["table2"][:4]
    assert all("| accuracy % | 0.0 |" in row for row in table if row.startswith(tuple(f"| {n} |" for n in open_ones)))
    assert "- Not run: thisismy-video-vqa" in summary and "judged by openai" in summary


def test_a_run_resumes_only_with_the_judge_its_logged_verdicts_came_from(data, tmp_path, judge_server, capsys):
    args = ["run", "--benchmark", "thisismy-multi-vqa", "--data", str(data), "--model", "oracle"]
    args += ["--out", str(tmp_path)]
    endpoint = ["--judge", "openai", "--judge-url", judge_server + "/v1", "--judge-model", "m"]
    assert cli.main([*args, "--limit", "2"]) == 0
    assert cli.main([*args, *endpoint]) == 2
    assert "judged by rule" in capsys.readouterr().err
    assert len(_lines(tmp_path / "predictions.jsonl")) == 2  # nothing was asked or judged again
    assert cli.main([*args, "--limit", "3"]) == 0  # the same judge: it resumes
    assert len(_lines(tmp_path / "predictions.jsonl")) == 3


def test_a_run_with_no_judged_answer_logged_takes_another_judge(data, tmp_path, judge_server, monkeypatch, capsys):
    """A judge that fails at the run's first open answer leaves nothing judged: the run resumes with another."""
    monkeypatch.setattr(judge_module.time, "sleep", lambda seconds: None)
    _JudgeServer.statuses = [200] + [503] * 5  # the probe passes, then every try of the first answer fails
    args = ["run", "--benchmark", "thisismy-multi-vqa", "--data", str(data), "--model", "oracle"]
    args += ["--out", str(tmp_path)]
    assert cli.main([*args, "--judge", "openai", "--judge-url", judge_server + "/v1", "--judge-model", "m"]) == 2
    assert "HTTP 503 on all 5 tries" in capsys.readouterr().err
    assert not _lines(tmp_path / "parts" / "rank0.jsonl")
    assert cli.main(["judge", str(tmp_path), "--judge", "rule"]) == 2
    said = capsys.readouterr().err
    assert "did not finish" in said and "run the same `python -m ego.evaluate run` command again" in said
    assert cli.main(args) == 0  # the rule judge now: nothing was judged by the other
    assert json.loads((tmp_path / "run.json").read_text())["judge"] == "rule"
    assert len(_lines(tmp_path / "predictions.jsonl")) == 4


def test_progress_line_estimates_the_time_left():
    stream = io.StringIO()
    bar = runner.Progress(4, "bench", stream=stream)
    bar.started -= 8.0  # two answers took 8 s: two more take about 8 s
    bar.shown, bar.done = float("-inf"), 1
    bar.step()
    assert "2/4" in stream.getvalue() and "~8s left" in stream.getvalue()


class _JudgeServer(BaseHTTPRequestHandler):
    seen: list = []
    reply = "No."
    status = 200
    statuses: list = []
    """The statuses of the next requests, in order; `status` once they are used up."""
    retry_after = None
    delays_s: list = []
    """How long the next requests wait before their answer, in order."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).delays_s:  # not time.sleep, which a test may replace to skip the judge's waits
            threading.Event().wait(type(self).delays_s.pop(0))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": type(self).reply}}]})
        try:
            self.send_response(type(self).statuses.pop(0) if type(self).statuses else type(self).status)
            if type(self).retry_after is not None:
                self.send_header("Retry-After", type(self).retry_after)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload.encode())
        except BrokenPipeError:  # the judge stopped waiting for this answer (a timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    _JudgeServer.seen, _JudgeServer.status, _JudgeServer.statuses, _JudgeServer.retry_after = [], 200, [], None
    _JudgeServer.delays_s = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_open_answers_are_judged_again_by_an_endpoint(data, tmp_path, judge_server, monkeypatch):
    monkeypatch.setenv("EGO_JUDGE_API_KEY", "secret-for-test")
    assert (
        cli.main(
            [
                "run",
                "--benchmark",
                "thisismy-multi-vqa",
                "--data",
                str(data),
                "--model",
                "oracle",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    answers = [r["raw"] for r in _lines(tmp_path / "predictions.jsonl")]
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["accuracy"] == 1.0  # rule judge
    assert (
        cli.main(
            [
                "judge",
                str(tmp_path),
                "--judge",
                "openai",
                "--judge-url",
                judge_server + "/v1",
                "--judge-model",
                "judge-model",
            ]
        )
        == 0
    )
    document = json.loads((tmp_path / "metrics.json").read_text())
    assert document["metrics"]["accuracy"] == 0.0 and "judge-model" in document["metrics"]["judge"]
    assert [r["raw"] for r in _lines(tmp_path / "predictions.jsonl")] == answers
    request = _JudgeServer.seen[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret-for-test"
    assert request["body"]["model"] == "judge-model" and request["body"]["temperature"] == 0
    assert "Predicted Answer: It is Orange." in request["body"]["messages"][0]["content"]
    assert len(_JudgeServer.seen) == 4
    assert "secret-for-test" not in "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())


def test_endpoint_errors_say_what_to_check(judge_server):
    _JudgeServer.status = 401
    with pytest.raises(InputError, match="HTTP 401.*key"):
        EndpointJudge(judge_server + "/v1", "m")("q", "a", "p")
    with pytest.raises(InputError, match="could not be reached"):
        EndpointJudge("http://127.0.0.1:9/v1", "m", timeout_s=2)("q", "a", "p")
    with pytest.raises(InputError, match="--judge-url"):
        EndpointJudge("", "m")


def test_the_endpoint_judge_tries_again_when_rate_limited_overloaded_or_slow(judge_server, monkeypatch):
    waits = []
    monkeypatch.setattr(judge_module.time, "sleep", waits.append)
    _JudgeServer.statuses = [429, 502]
    assert EndpointJudge(judge_server + "/v1", "m")("q", "a", "p") == (False, "No.")
    assert len(_JudgeServer.seen) == 3 and waits == [2.0, 4.0]  # each wait twice the one before
    waits.clear()
    _JudgeServer.statuses, _JudgeServer.retry_after = [429], "7"
    assert EndpointJudge(judge_server + "/v1", "m")("q", "a", "p")[0] is False
    assert waits == [7.0]  # the wait the server asks for
    waits.clear()
    _JudgeServer.retry_after, _JudgeServer.delays_s = None, [2.0]
    assert EndpointJudge(judge_server + "/v1", "m", timeout_s=0.5)("q", "a", "p")[0] is False
    assert waits == [2.0]  # the first request timed out
    waits.clear()
    _JudgeServer.seen, _JudgeServer.status = [], 429
    with pytest.raises(InputError, match=r"rate limited \(HTTP 429\) on all 5 tries") as refused:
        EndpointJudge(judge_server + "/v1", "m")("q", "a", "p")
    assert "check the URL" not in str(refused.value)
    assert len(_JudgeServer.seen) == 5 and waits == [2.0, 4.0, 8.0, 16.0]


def test_a_judge_that_cannot_be_reached_is_told_before_the_model_loads(data, tmp_path, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(cli, "load_engine", lambda *args, **kwargs: loads.append(args))
    args = ["run", "--benchmark", "table2", "--data", str(data), "--model", "tiny-qwen2.5-vl", "--out", str(tmp_path)]
    args += ["--judge", "openai", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]
    assert cli.main(args) == 2
    assert "could not be reached" in capsys.readouterr().err and loads == []


def test_a_benchmark_that_fails_is_listed_as_not_run_and_the_table_goes_on(
    data, tmp_path, judge_server, monkeypatch, capsys
):
    monkeypatch.setattr(judge_module.time, "sleep", lambda seconds: None)
    _JudgeServer.statuses = [200] + [503] * 5  # the probe passes, then the judge fails for good
    out = tmp_path / "out"
    args = ["run", "--benchmark", "table2", "--data", str(data), "--model", "oracle", "--out", str(out)]
    assert cli.main([*args, "--judge", "openai", "--judge-url", judge_server + "/v1", "--judge-model", "m"]) == 2
    assert "thisismy-multi-vqa stopped before the end" in capsys.readouterr().err
    summary = (out / "summary.md").read_text()
    assert "- Not run: thisismy-multi-vqa: stopped: The judge endpoint" in summary
    ran = [name for name in cli.TABLES["table2"] if name != "thisismy-multi-vqa"]
    assert all(f"| {name} |" in summary for name in ran) and "| thisismy-multi-vqa |" not in summary


def _copy(data: Path, tmp_path: Path, *parts: str) -> Path:
    """A copy of the fixture (of `parts` of it only, when given, with its truth file) to spoil."""
    root = tmp_path / "data"
    for part in parts or [""]:
        shutil.copytree(data / part, root / part)
    if parts:
        shutil.copy(data / "_truth.json", root / "_truth.json")
    return root


def test_a_partly_present_dataset_stops_only_its_benchmarks_with_the_tree_it_needs(data, tmp_path, capsys):
    root = _copy(data, tmp_path)
    shutil.rmtree(root / "rap" / "multi-concept" / "validation")
    with pytest.raises(InputError, match=r"validation is missing.*rap/multi-concept/\{train_1view_pekit"):
        LOADERS["rap-multi-rec"](root, 1)
    out = tmp_path / "out"
    assert cli.main(["run", "--benchmark", "table1", "--data", str(root), "--model", "oracle", "--out", str(out)]) == 0
    assert "rap-multi-rec" in capsys.readouterr().err
    summary = (out / "summary.md").read_text()
    assert "- Not run: rap-multi-rec: " in summary and "validation/<A>_and_<B>" in summary
    assert all(f"| {name} | f1 % | 100.0 |" in summary for name in cli.TABLES["table1"][:4])
    (root / "YoLLaVA").mkdir()  # what `git lfs clone https://github.com/WisconsinAIVision/YoLLaVA` makes
    shutil.move(root / "yollava-data", root / "YoLLaVA" / "yollava-data")
    yollava = LOADERS["yollava-rec"](root, 1)
    assert len(yollava.queries) == 9 * 3 and yollava.queries[0].media.startswith("YoLLaVA/yollava-data/test/")


def test_hidden_folders_macos_leftovers_and_a_repositorys_own_files_are_not_concepts_or_images(data, tmp_path):
    root = _copy(data, tmp_path, "yollava-data", "myvlm")
    train, test = root / "yollava-data" / "train", root / "yollava-data" / "test"
    (train / ".ipynb_checkpoints").mkdir()
    shutil.copy(train / "alpha" / "0.png", train / ".ipynb_checkpoints" / "0.png")
    (train / "alpha" / "._0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")  # AppleDouble
    (test / "__MACOSX" / "alpha").mkdir(parents=True)
    shutil.copy(test / "alpha" / "0.png", test / "__MACOSX" / "alpha" / "0.png")
    yollava = LOADERS["yollava-rec"](root, 5)
    assert sorted(yollava.concepts) == ["alpha", "beta", "gamma"] and len(yollava.queries) == 9 * 3
    assert [p.name for p in yollava.concepts["alpha"]] == ["0.png", "1.png", "2.png"]
    # A clone of MyVLM's dataset repository: its .git/ and docs/ beside the concept folders
    shutil.move(root / "myvlm" / "data", root / "MyVLM")
    shutil.rmtree(root / "myvlm")
    (root / "MyVLM" / ".git" / "objects").mkdir(parents=True)
    (root / "MyVLM" / "docs").mkdir()
    for i in range(3):
        shutil.copy(root / "MyVLM" / "red_cube" / "0.jpg", root / "MyVLM" / "docs" / f"myvlm-data-{i}.jpg")
    myvlm = load_benchmark("myvlm-rec", root, 1)
    assert sorted(myvlm.concepts) == ["blue ring", "green star", "red cube"] and len(myvlm.queries) == 6 * 3
    assert myvlm.notes == ["Folders of MyVLM without a captions.json, left out as not concepts: docs."]


def test_a_test_folder_named_after_no_concept_of_train_is_refused_with_the_closest_name(data, tmp_path):
    root = _copy(data, tmp_path, "yollava-data", "This-is-My-Img")
    (root / "yollava-data" / "test" / "beta").rename(root / "yollava-data" / "test" / "Beta")
    with pytest.raises(InputError, match=r"yollava-data/test/Beta \(train/ has 'beta'\)"):
        LOADERS["yollava-rec"](root, 1)
    other = root / "This-is-My-Img" / "Single-concept" / "test" / "Negative (Other)"
    (other / "Bens cup-cup").rename(other / "Bens Cup-cup")
    with pytest.raises(InputError, match=r"Negative \(Other\)/Bens Cup-cup \(train/ has 'Bens cup'\)"):
        LOADERS["thisismy-rec"](root, 1)


def test_concepts_with_fewer_photos_than_refs_are_recorded_told_once_and_compared_as_used(data, tmp_path, capsys):
    root = _copy(data, tmp_path)
    for extra in ("1.png", "2.png"):
        (root / "yollava-data" / "train" / "alpha" / extra).unlink()
    out = tmp_path / "out"
    args = ["run", "--benchmark", "all", "--data", str(root), "--model", "oracle", "--out", str(out)]
    assert cli.main([*args, "--refs", "2", "--protocol", "paper"]) == 0
    said = capsys.readouterr().err
    assert said.count("alpha (1)") == 1  # yollava-rec and yollava-vqa share their concepts: told once
    assert "Bingo (1), Bluey (1), H (1), Parrot_1 (1)" in said  # RAP's one-view folders
    references = json.loads((out / "yollava-rec" / "run.json").read_text())["references"]
    assert references["alpha"] == ["yollava-data/train/alpha/0.png"]
    assert references["beta"] == ["yollava-data/train/beta/0.png", "yollava-data/train/beta/1.png"]
    summary = (out / "summary.md").read_text()
    assert "- yollava-rec: the paper's 80.4 was measured with refs 1 (this run: 1-2)," in summary
    assert "- yollava-rec: --refs 2: 1 of 3 concepts have fewer photos" in summary
    assert "| rap-multi-rec | f1 % | 100.0 | 4 | 98.4 |" in summary  # one view, as the paper's number


def test_a_run_with_5_references_is_set_beside_the_papers_5_reference_number(data, tmp_path):
    root = _copy(data, tmp_path, "This-is-My-Img")
    for folder in (root / "This-is-My-Img" / "Single-concept" / "train").iterdir():
        for i in range(2, 5):
            shutil.copy(folder / "0.png", folder / f"{i}.png")
    summary = _oracle(root, tmp_path / "out", "--benchmark", "thisismy-rec", "--refs", "5", "--protocol", "paper")
    assert "| thisismy-rec (5 refs) | f1 % | 100.0 | 12 | 75.1 | PeKit (5 refs) 78.1 |" in summary
    assert "precision 100.0 (mean of per-unit precision; paper 87.2)" in summary and "; paper 65.9)" in summary


def test_a_git_lfs_pointer_in_place_of_an_image_is_told_before_the_model_loads(data, tmp_path, monkeypatch, capsys):
    root = _copy(data, tmp_path, "yollava-data")
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "4d7a2146" * 8 + "\nsize 1834\n"
    (root / "yollava-data" / "test" / "beta" / "2.png").write_text(pointer)
    loads = []
    monkeypatch.setattr(cli, "load_engine", lambda *args, **kwargs: loads.append(args))
    args = ["run", "--benchmark", "yollava-rec", "--data", str(root), "--model", "tiny-qwen2.5-vl"]
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 2
    said = capsys.readouterr().err
    assert "yollava-data/test/beta/2.png is a git-lfs pointer, not an image" in said and "git lfs pull" in said
    assert loads == []


def test_a_file_that_does_not_decode_is_named_by_its_path_under_the_data(data, tmp_path, engine, capsys):
    root = _copy(data, tmp_path, "yollava-data")
    (root / "yollava-data" / "test" / "alpha" / "0.png").write_text("<html>Not Found</html>\n")
    args = ["run", "--benchmark", "yollava-rec", "--data", str(root), "--model", "tiny-qwen2.5-vl", *FAST]
    assert cli.main([*args, "--out", str(tmp_path / "query"), "--limit", "1"]) == 2
    said = capsys.readouterr().err
    assert "Answering about yollava-data/test/alpha/0.png: This file is not a supported image" in said
    assert "It is a small text file, not an image" in said
    (root / "yollava-data" / "train" / "beta" / "0.png").write_bytes(bytes(range(256)) * 8)
    assert cli.main([*args, "--out", str(tmp_path / "reference"), "--limit", "1"]) == 2
    said = capsys.readouterr().err
    assert "Introducing 'beta' from yollava-data/train/beta/0.png: This file is not a supported image" in said


def test_an_error_after_some_answers_is_printed_on_a_line_of_its_own(data, tmp_path, capsys):
    benchmark = LOADERS["yollava-vqa"](data, 1)
    oracle = oracle_answerer(data)

    def respond(query, concepts, media):
        if query is benchmark.queries[1]:
            raise InputError("This file is not a supported image.")
        return oracle(query, concepts, media)

    with pytest.raises(InputError, match=r"^Answering about yollava-data/test/beta/0.png: This file"):
        runner.answer_share(benchmark, {}, respond, tmp_path, {"benchmark": benchmark.name})
    progress = capsys.readouterr().err
    assert "1/3" in progress and progress.endswith(" left \n")


def test_a_damaged_question_file_is_named_with_what_is_wrong(data, tmp_path):
    root = _copy(data, tmp_path, "yollava-data")
    path = root / "yollava-data" / "yollava-visual-qa.json"
    path.write_text('{"alpha": {')
    with pytest.raises(InputError, match=r"^yollava-data/yollava-visual-qa.json is not valid JSON \(.* line 1"):
        LOADERS["yollava-vqa"](root, 1)
    document = json.loads((data / "yollava-data" / "yollava-visual-qa.json").read_text())
    del document["beta"]["./yollava-data/test/beta/0.png"]["correct_answer"]
    path.write_text(json.dumps(document))
    with pytest.raises(InputError, match=r"record './yollava-data/test/beta/0.png' of 'beta', has no 'correct_answer'"):
        LOADERS["yollava-vqa"](root, 1)


def test_multi_concept_recognition_shows_precision_recall_and_every_f1_beside_the_papers(data, tmp_path, monkeypatch):
    """The paper's multi-concept F1 (88.6) is above the harmonic mean of its own P and R (85.3): the summary sets
    P and R beside the paper's, and the F1 variants beside each other."""
    oracle = oracle_answerer(data)

    def respond(query, concepts, media):  # never recognises Ann: her pair is never detected
        if query.kind == "yesno" and query.concept == "Ann":
            return {"raw": "No."}
        return oracle(query, concepts, media)

    monkeypatch.setattr(cli, "oracle_answerer", lambda root: respond)
    summary = _oracle(data, tmp_path, "--benchmark", "thisismy-multi-rec", "--protocol", "paper")
    # Ann & Anns ball: detected 0 of 2 (precision undefined, recall 0); Ben & Bens cup: 2 of 2 (both 1)
    precision, recall = 1.0, (0.0 + 1.0) / 2
    f1 = 2 * precision * recall / (precision + recall)
    macro_f1 = (0.0 + 1.0) / 2
    micro_p, micro_r = 2 / 2, 2 / 4
    micro_f1 = 2 * micro_p * micro_r / (micro_p + micro_r)
    row = next(line for line in summary.splitlines() if line.startswith("| thisismy-multi-rec |") and "(mean" in line)
    assert f"precision {100 * precision:.1f} (mean of per-unit precision; paper 93.9)" in row
    assert f"recall {100 * recall:.1f} (mean of per-unit recall; paper 78.2)" in row
    assert f"**f1 {100 * f1:.1f}** (harmonic mean of these two; paper 88.6)" in row
    assert f"macro_f1 {100 * macro_f1:.1f} (mean of per-unit F1)" in row
    assert f"micro_f1 {100 * micro_f1:.1f} (from the pooled counts)" in row
    assert "harmonic mean of its own P 93.9 and R 78.2 (85.3)" in summary


def test_multi_concept_caption_recall_shows_both_readings_of_the_papers_recall(data, tmp_path, monkeypatch):
    """Recall over name occurrences and the share of captions naming every concept both fit the paper's 70.9."""
    monkeypatch.setattr(
        cli, "oracle_answerer", lambda root: lambda query, concepts, media: {"raw": f"{query.gold[0]} on a table."}
    )
    summary = _oracle(data, tmp_path, "--benchmark", "thisismy-multi-cap", "--protocol", "paper")
    assert "**recall 50.0** (over name occurrences; paper 70.9)" in summary  # one name of two in each caption
    assert "all_names_rate 0.0 (captions naming every concept they should)" in summary
    assert "which is all_names_rate here" in summary


def test_the_probe_of_a_judge_that_takes_the_connection_and_never_answers_ends_soon(monkeypatch):
    """Before a model loads, one question to the judge: an endpoint that accepts and stays silent is told within
    the probe's timeout (twice), not after the five tries of a minute each that answers get."""
    import socket
    import time

    from ego.evaluate import judge as judges

    monkeypatch.setattr(judges, "PROBE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(judges.EndpointJudge, "__init__", _fast_waits(judges.EndpointJudge.__init__))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        endpoint = judges.EndpointJudge(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "m")
        started = time.monotonic()
        with pytest.raises(InputError, match="judge"):
            endpoint.probe()
        assert time.monotonic() - started < 10
    finally:
        silent.close()


def _fast_waits(init):
    def fast(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.first_wait_s = 0.1

    return fast


def test_one_question_about_one_clip_for_two_concepts_is_two_questions_and_a_linked_dataset_loads(data, tmp_path):
    """A clip showing two concepts, asked the same templated question for each: two questions with their own keys
    (one answer is not scored twice, the other lost); a key asked once stays as before (old run folders resume). A
    dataset folder linked under the data folder (a symbolic link) loads, its paths under the data folder."""
    linked = tmp_path / "data"
    linked.mkdir()
    for entry in data.iterdir():
        (linked / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    one_at_a_time = LOADERS["thisismy-video-vqa"](linked, 1)
    assert all(not query.media.startswith("..") for query in one_at_a_time.queries)
    questions = json.loads((data / "this-is-my" / "video-qa.json").read_text())
    (first, asked), (second, other) = list(questions.items())[:2]
    clip = next(iter(asked))
    questions[second] = {clip: {**asked[clip], "correct_answer": "B" if asked[clip]["correct_answer"] == "A" else "A"}}
    copy = tmp_path / "copy"
    shutil.copytree(data, copy, symlinks=True)
    (copy / "this-is-my" / "video-qa.json").write_text(json.dumps(questions))
    loaded = LOADERS["thisismy-video-vqa"](copy, 1).queries
    both = [q for q in loaded if q.media.endswith(clip.lstrip("./"))]
    assert len({q.key for q in both}) == 2 == len(both) and {q.gold for q in both} == {"A", "B"}
    assert {q.key.rsplit("|", 1)[1] for q in both} == {first, second}
    before = one_at_a_time.queries  # each clip asked about one concept: the keys as before
    assert before and all(q.key == f"{q.media}|{q.raw_question}" for q in before)


def test_with_a_limit_only_the_questions_asked_count_as_negatives(data, tmp_path):
    """`--limit`: the (image, concept) pairs never asked are no negatives (nor answered "no")."""
    _oracle(data, tmp_path, "--benchmark", "yollava-rec", "--limit", "5")
    records = _lines(tmp_path / "predictions.jsonl")
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert len(records) == 5
    assert metrics["n_negative"] == sum(not r["gold"] for r in records)
    assert metrics["n_positive"] == sum(r["gold"] for r in records)


def test_a_concepts_cache_key_leaves_out_what_only_questions_read(data):
    """A concept introduced under another `query_image_kept_factor` (only a question's photo reads it) is the same
    concept: a run folder's cached concepts are found again; a setting an introduction reads changes the key."""
    engine = tiny_engine("qwen2.5-vl")
    photos = sorted((data / "yollava-data" / "train").rglob("*.png"))[:2]
    key = runner.concept_key(engine, "alpha", photos)
    assert runner.concept_key(engine.with_settings(query_image_kept_factor=0), "alpha", photos) == key
    assert runner.concept_key(engine.with_settings(k_cap_tokens=7), "alpha", photos) != key


def test_a_question_file_naming_a_file_outside_its_dataset_is_refused(data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    (tmp_path / "secret.png").write_bytes((next((data / "yollava-data").rglob("*.png"))).read_bytes())
    path = copy / "this-is-my" / "video-qa.json"
    questions = json.loads(path.read_text())
    concept, asked = next(iter(questions.items()))
    questions[concept] = {"../../secret.png": next(iter(asked.values()))}
    path.write_text(json.dumps(questions))
    with pytest.raises(InputError, match="lies outside"):
        LOADERS["thisismy-video-vqa"](copy, 1)
