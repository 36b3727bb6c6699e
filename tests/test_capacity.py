"""The capacity arithmetic of docs/scaling.md, checked against cases computed by hand."""

import functools
import json
import math
import re
from pathlib import Path

import pytest

from bench.capacity import (
    DEFAULT_RESULTS,
    answer_s,
    erlang_c,
    main,
    max_arrivals_per_s,
    mean_latency_s,
    measured_from_results,
    visitors,
)

SMALL_RUN = {
    "introduce": {"stages_s": {"description_s": 0.64}, "description_tokens": 32.0, "total_s": 0.9},
    "scenarios": {"plain": {"latency_s": 1.0, "new_tokens": 32.0}, "ego_5": {"latency_s": 1.2, "new_tokens": 32.0}},
}


def test_token_cost_and_fixed_cost_come_from_the_run():
    measured = measured_from_results(SMALL_RUN)
    assert measured.token_s == pytest.approx(0.02)  # 0.64 s / 32 tokens
    assert measured.answer_fixed_s["plain"] == pytest.approx(0.36)  # 1.0 - 32 * 0.02
    assert measured.answer_fixed_s["ego_5"] == pytest.approx(0.56)  # 1.2 - 32 * 0.02
    assert measured.introduction_s == 0.9
    assert answer_s(measured, "plain", 100) == pytest.approx(2.36)  # 0.36 + 100 * 0.02
    assert answer_s(measured, "plain", 100, step_factor=1.5) == pytest.approx(3.36)  # 0.36 + 100 * 0.03
    # A batch of 8: each question's fixed cost one after another, then the shared decoding.
    assert answer_s(measured, "plain", 100, step_factor=1.5, batch=8) == pytest.approx(5.88)  # 8 * 0.36 + 3.0


def test_a_run_that_measures_decode_time_per_token_gives_it_as_the_token_cost():
    """A run with `decode_ms_per_token` (the plain question's tokens after the first, in its own decoding, compiled
    on a GPU) is read for the token cost; the description stage would also carry its prefill."""
    run = json.loads(json.dumps(SMALL_RUN))
    run["scenarios"]["plain"]["decode_ms_per_token"] = 5.0
    measured = measured_from_results(run)
    assert measured.token_s == pytest.approx(0.005)
    assert measured.answer_fixed_s["plain"] == pytest.approx(1.0 - 32 * 0.005)


def _run_with_visitors(step_cost: float) -> dict:
    """A run whose answers cost a fixed 0.10 s (`ego_5`) plus 32 decode steps of 8 ms, and whose 8 visitors asking
    together take 8 fixed costs one after another, then 32 shared steps of `step_cost` times a lone step."""
    fixed_s, token_s, tokens = 0.10, 0.008, 32
    lone_s, batch_s = fixed_s + tokens * token_s, 8 * fixed_s + tokens * token_s * step_cost
    run = json.loads(json.dumps(SMALL_RUN))
    run["scenarios"]["plain"]["decode_ms_per_token"] = token_s * 1000
    run["scenarios"]["ego_5"]["latency_s"] = lone_s
    # Each visitor asks with 5 concepts and a photo (`ego_5`), as bench.harness.measure_concurrency has them.
    visitors = {"concepts": 5, "new_tokens": tokens}
    run["scenarios"]["concurrent_1"] = {**visitors, "visitors": 1, "throughput_per_s": 1 / lone_s}
    run["scenarios"]["concurrent_8"] = {
        **visitors,
        "visitors": 8,
        "throughput_per_s": 8 / batch_s,
        "throughput_ratio": (8 / batch_s) / (1 / lone_s),  # one at a time: 8 lone answers
    }
    # Their follow-ups compute their contexts on their own before the shared decoding: not a step cost.
    run["scenarios"]["follow_ups_8"] = {**visitors, "visitors": 8, "throughput_per_s": 1.0, "throughput_ratio": 3.0}
    return run


def test_a_measured_batch_step_cost_is_the_batch_s_decoding_over_lone_steps(tmp_path, capsys):
    run = _run_with_visitors(step_cost=1.25)
    # The batch's whole time over a lone answer's, 3.15, holds its 8 fixed costs: it is no step cost.
    assert 8 / run["scenarios"]["concurrent_8"]["throughput_ratio"] == pytest.approx(3.15, abs=0.01)
    measured = measured_from_results(run)
    assert measured.batch_step_factor == {8: pytest.approx(1.25)}  # (1.12 s - 8 * 0.10 s) / (32 * 8 ms)
    assert measured_from_results(SMALL_RUN).batch_step_factor is None
    path = tmp_path / "results.json"
    path.write_text(json.dumps(run))
    assert main(["--results", str(path), "--scenario", "ego_5"]) == 0
    printed = capsys.readouterr().out
    assert "Step cost of a batch of 8 (concurrent_8): 1.25 x a lone step\n" in printed
    row = next(line for line in printed.splitlines() if "step cost measured" in line)
    # 8 visitors' fixed costs of 0.10 s + 64 tokens * 8 ms * 1.25 = 1.44 s; 8 answers in it: 5.56 a second
    assert row.startswith("| batches of up to 8 (step cost measured) | 1.25 | 1.44 | 5.56 |")


def test_a_batch_faster_than_lone_steps_counts_as_lone_steps(tmp_path, capsys):
    """A step over 8 rows cannot cost less than a lone one: a batch measured faster than its fixed costs and lone
    steps is taken at a step cost of 1.0, not at a smaller one that would project more than was measured."""
    run = _run_with_visitors(step_cost=0.5)
    measured = measured_from_results(run)
    assert measured.batch_step_factor_as_measured == {8: pytest.approx(0.5)}
    assert measured.batch_step_factor == {8: 1.0}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(run))
    assert main(["--results", str(path)]) == 0
    assert "(concurrent_8): 0.50 x a lone step (below a lone step" in capsys.readouterr().out


def test_the_command_refuses_what_is_not_a_question_scenario_or_a_results_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--scenario", "concurrent_8"])
    assert stopped.value.code == 2
    assert "--scenario concurrent_8 is not a question scenario" in capsys.readouterr().err
    progress = tmp_path / "progress.json"  # what a run writes while it compiles, beside its results.json
    progress.write_text(json.dumps({"compiled": {"compile": {"warm_up_s": 1.0}}}))
    with pytest.raises(SystemExit):
        main(["--results", str(progress)])
    error = capsys.readouterr().err
    assert "is not a results.json of `python -m bench` (it has no introduce and no scenarios)" in error
    with pytest.raises(SystemExit):
        main(["--results", str(tmp_path / "missing.json")])
    assert "cannot be read" in capsys.readouterr().err


DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
EAGER_RUNS = Path(__file__).resolve().parents[1] / "bench" / "results" / "h200-2026-11-26"
"""nf4/ and bf16/ results.json of the committed GPU run of eager decoding (docs/scaling.md, section 1's first table)."""


def document_figures() -> dict[str, tuple[str, str]]:
    """docs/scaling.md's table of the run's figures: field of results.json -> (NF4 figure, bf16 figure), for each
    row whose "where" is one field, e.g. "introduce.total_s" -> ("1.181 s", "0.905 s")."""
    rows = {}
    for line in DOCUMENT.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and re.fullmatch(r"`[\w.]+`", cells[3]):
            rows[cells[3].strip("`")] = (cells[1], cells[2])
    return rows


def document_says(pattern: str) -> tuple[str, ...]:
    """The numbers docs/scaling.md's text gives where `pattern` (a regular expression, its groups the numbers; the
    text's line breaks read as spaces)."""
    found = re.search(pattern, " ".join(DOCUMENT.read_text(encoding="utf-8").split()))
    assert found, f"docs/scaling.md no longer says {pattern!r}"
    return found.groups()


def written_as(value: float, number: str) -> str:
    """`value` written as the document writes `number`: as many decimals, thousands commas if it has them."""
    decimals = len(number.partition(".")[2])
    return f"{value:,.{decimals}f}" if "," in number else f"{value:.{decimals}f}"


def test_the_committed_gpu_run_reads_as_the_document_says():
    """Each figure docs/scaling.md gives from the committed run (its table, NF4 and bf16, and the costs derived from
    it) is that run's, as `bench.capacity` reads it, to the digits the document writes."""
    runs = [
        json.loads((EAGER_RUNS / column / "results.json").read_text(encoding="utf-8")) for column in ("nf4", "bf16")
    ]
    table = document_figures()
    assert {"introduce.total_s", "introduce.stages_s.description_s", "scenarios.plain.latency_s"} <= set(table)
    for field, figures in table.items():
        for run, figure in zip(runs, figures):
            figure = figures[0] if figure == "same" else figure  # a size that does not depend on the precision
            number = figure.split(" ")[0]
            value = functools.reduce(lambda part, key: part[key], field.split("."), run)
            assert written_as(value, number) == number, (field, value, figure)
    nf4, bf16 = (measured_from_results(run) for run in runs)
    introduction = table["introduce.total_s"][0].split(" ")[0]
    assert written_as(nf4.introduction_s, introduction) == introduction
    # section 1: the cost of a decode step (the description's), an answer's fixed cost
    step_nf4, step_bf16 = document_says(
        r"= \*\*([\d.]+) ms\*\* \(NF4\) and [\d.]+ s / \d+ = \*\*([\d.]+) ms\*\* \(bf16\)"
    )
    assert (written_as(nf4.token_s * 1000, step_nf4), written_as(bf16.token_s * 1000, step_bf16)) == (
        step_nf4,
        step_bf16,
    )
    few, many = document_says(r"about \*\*([\d.]+) s\*\* with 0 or 5 concepts and \*\*([\d.]+) s\*\* with 20 \(NF4\)")
    fixed = nf4.answer_fixed_s
    assert [written_as(fixed[name], few) for name in ("plain", "ego_5")] == [few, few]
    assert written_as(fixed["ego_20"], many) == many


def test_the_compiled_run_reads_as_the_document_says():
    """docs/scaling.md's table of the compiled run (eager and compiled side by side, `decoding_runs`) and the costs
    section 2 derives from it are that run's, the capacity command's default, to the digits the document writes."""
    run = json.loads(DEFAULT_RESULTS.read_text(encoding="utf-8"))
    rows = {}
    for line in DOCUMENT.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and re.fullmatch(r"`decoding_runs\.\*\.[\w.]+`", cells[3]):
            rows[cells[3].strip("`").removeprefix("decoding_runs.*.")] = (cells[1], cells[2])
    assert {"scenarios.plain.latency_s", "introduce.total_s", "scenarios.plain.decode_ms_per_token"} <= set(rows)
    for field, figures in rows.items():
        for mode, figure in zip(("eager", "compiled"), figures):
            number = figure.split(" ")[0]
            value = functools.reduce(lambda part, key: part[key], field.split("."), run["decoding_runs"][mode])
            assert written_as(value, number) == number, (field, mode, value, figure)
    warm_up = document_says(r"\| compiling the decode step \(once per process\) \| — \| ([\d.]+) s \|")[0]
    assert written_as(run["meta"]["compile"]["warm_up_s"], warm_up) == warm_up
    compiled = measured_from_results(run)
    # section 2: the f and t of the capacity model's 5-concept questions
    f, t = document_says(r"fixed cost f \(([\d.]+) s, section 1\).*?n tokens at t \(([\d.]+) ms\)")
    assert (written_as(compiled.answer_fixed_s["ego_5"], f), written_as(compiled.token_s * 1000, t)) == (f, t)


def test_erlang_c_matches_hand_computed_cases():
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: an arrival waits with probability rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # (1 / 2! * 2 / 1) / (1 + 1 + 1)
    assert erlang_c(3, 3.0) == 1.0  # at capacity everyone waits


def test_mean_latency_is_pollaczek_khinchine_for_one_server():
    assert mean_latency_s(1.0, 1, 0.5) == pytest.approx(1.5)  # 1 + 0.5 * 1 / (2 * 0.5)
    assert mean_latency_s(2.0, 1, 0.25) == pytest.approx(3.0)  # rho 0.5: wait 0.5 * 2 / (2 * 0.5) = 1
    assert mean_latency_s(1.0, 2, 1.0) == pytest.approx(1 + 1 / 6)  # Erlang C 1/3, wait 1/3 / (2 - 1) / 2
    assert mean_latency_s(1.0, 1, 1.0) == math.inf


def test_max_arrivals_inverts_the_latency():
    # one server: rho = 2 (R - S) / (2 R - S), so S = 1, R = 1.5 gives rho 0.5; S = 2, R = 3 gives rho 0.5
    assert max_arrivals_per_s(1.0, 1, 1.5) == pytest.approx(0.5, rel=1e-6)
    assert max_arrivals_per_s(2.0, 1, 3.0) == pytest.approx(0.25, rel=1e-6)
    assert max_arrivals_per_s(1.0, 2, 1 + 1 / 6) == pytest.approx(1.0, rel=1e-6)
    assert max_arrivals_per_s(2.0, 4, 1.9) == 0.0  # one answer alone is slower than the target
    assert visitors(0.5, 60) == pytest.approx(30)


def test_the_command_prints_the_table(capsys):
    eager = str(EAGER_RUNS / "nf4" / "results.json")
    assert main(["--results", eager, "--new-tokens", "64", "--latency-factor", "2"]) == 0
    printed = capsys.readouterr().out
    assert "30.4 ms per generated token" in printed
    assert "| one at a time | 1.00 | 2.00 | 0.50 |" in printed  # 0.060 + 64 * 0.0304 s


def test_the_document_s_capacity_table_is_the_command_s(capsys):
    """docs/scaling.md's capacity table is what `python -m bench.capacity` prints for the committed run."""
    assert main([]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "serving" not in line]
    document = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text(encoding="utf-8")
    assert len(rows) == 7 and all(row in document for row in rows), rows  # 5 assumed step costs, 2 measured
