"""`python -m ego.evaluate` end to end on the synthetic fixture: the oracle scores 100, a tiny model runs every
benchmark, a resumed run repeats nothing, a changed configuration is refused, shares of a data-parallel launch
merge to the whole, and open answers are re-judged through an OpenAI-compatible endpoint on loopback."""

from __future__ import annotations

import io
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import tiny_engine

from ego import InputError
from ego.evaluate import __main__ as cli, runner, scoring
from ego.evaluate.datasets import LOADERS, Benchmark, Query, concept_name, make_fixture
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
    assert "| thisismy-multi-vqa | accuracy % | 100.0 | 4 | 72.2 | RAP 53.7" in (tmp_path / "summary.md").read_text()


def _oracle(data, out, *args) -> str:
    """The summary of an oracle run (`args`: the benchmark and any other options)."""
    assert cli.main(["run", "--data", str(data), "--model", "oracle", "--out", str(out), *args]) == 0
    return (out / "summary.md").read_text()


def test_a_paper_number_measured_under_another_setting_is_marked_with_what_differs(data, tmp_path):
    """The 80.4 set beside Yo'LLaVA recognition is Table 3's Ego at a fixed budget; a run with the method's dynamic
    K (the default) is not that setting, and the summary says so and names the run that is."""
    table1 = _oracle(data, tmp_path / "table1", "--benchmark", "table1")
    row = next(line for line in table1.splitlines() if line.startswith("| yollava-rec |"))
    assert "| 80.4 (another setting) |" in row and "Table 3 ablation" in row
    assert "strongest baseline" not in table1 and "| paper's point of comparison |" in table1
    assert (
        "- yollava-rec: the paper's 80.4 was measured with memory_size_rule fixed (this run: area); the run under "
        "its setting is table3/ego-1-view." in table1
    )
    assert "| 90.2 |" in table1 and "myvlm-rec:" not in table1  # the method's own setting: nothing to say
    fixed = _oracle(data, tmp_path / "fixed", "--benchmark", "yollava-rec", "--set", "memory_size_rule=fixed")
    assert "| 80.4 |" in fixed and "another setting" not in fixed
    five = _oracle(data, tmp_path / "five", "--benchmark", "myvlm-rec", "--refs", "2")
    assert "| 90.2 (another setting) |" in five and "refs 1 (this run: 2)" in five
    table3 = _oracle(data, tmp_path / "table3", "--benchmark", "table3")
    assert "another setting" not in table3


def test_two_option_vqa_is_set_beside_the_paper_by_pekits_parser(data, tmp_path, monkeypatch):
    """ "A blue one." chooses B by its words, A by its first letter (how the paper's group read answers): the
    paper's 92.3 is compared with the latter, and metrics.json keeps both."""
    oracle = oracle_answerer(data)

    def respond(query, concepts, media):
        if query.kind == "option" and query.gold == "B":
            return {"raw": f"A {query.options['B'].lower()} one."}
        return oracle(query, concepts, media)

    monkeypatch.setattr(cli, "oracle_answerer", lambda root: respond)
    summary = _oracle(data, tmp_path, "--benchmark", "yollava-vqa")
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


def test_splits_without_positives_report_their_rejection_rate(data, tmp_path):
    """This-Is-My-Img's Negative and Fake images show none of the concepts: precision and recall say nothing there,
    the share of questions answered "no" does."""
    benchmark = LOADERS["thisismy-rec"](data, 1)
    oracle = oracle_answerer(data)

    def respond(query, concepts, media):  # "yes" to everything in Fake, and about its folder's concept in Hard
        split, folder = Path(query.media).parts[-3], Path(query.media).parent.name
        if split == "Fake" or (split == "Negative (Hard)" and query.concept == concept_name(folder)):
            return {"raw": "Yes."}
        return oracle(query, concepts, media)

    runner.answer_share(benchmark, {}, respond, tmp_path, {"benchmark": benchmark.name}, progress=False)
    per_split = runner.compute_metrics(benchmark, runner.merge(benchmark, tmp_path))["per_split"]
    assert {split: m["rejection_rate"] for split, m in per_split.items()} == {
        "Fake": 0.0,
        "Negative (Hard)": pytest.approx(6 / 9),  # 3 images x 3 concepts, one "yes" each
        "Negative (Other)": 1.0,
        "Positive": 1.0,  # its questions about the concepts an image does not show
    }
    assert per_split["Fake"]["precision"] == 0.0 and per_split["Fake"]["recall"] is None  # kept, as before


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
    rows = [line for line in summary.splitlines() if line.startswith(tuple(f"| {name} |" for name in open_ones))]
    assert len(rows) == len(open_ones) and all("| accuracy % | 0.0 |" in row for row in rows)
    assert "- Not run: thisismy-video-vqa" in summary and "judged by openai" in summary


def test_a_run_resumes_only_with_the_judge_its_logged_verdicts_came_from(data, tmp_path, capsys):
    args = ["run", "--benchmark", "thisismy-multi-vqa", "--data", str(data), "--model", "oracle"]
    args += ["--out", str(tmp_path)]
    assert cli.main([*args, "--limit", "2"]) == 0
    assert cli.main([*args, "--judge", "openai", "--judge-url", "http://localhost:9/v1", "--judge-model", "m"]) == 2
    assert "judged by rule" in capsys.readouterr().err
    assert len(_lines(tmp_path / "predictions.jsonl")) == 2  # nothing was asked or judged again
    assert cli.main([*args, "--limit", "3"]) == 0  # the same judge: it resumes
    assert len(_lines(tmp_path / "predictions.jsonl")) == 3


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

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": type(self).reply}}]})
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    _JudgeServer.seen, _JudgeServer.status = [], 200
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
