"""The capacity arithmetic of docs/scaling.md, checked against cases computed by hand."""

import json
import math

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


def test_a_run_that_measures_decode_time_per_token_gives_it_as_the_token_cost():
    """A run with `decode_ms_per_token` (the plain question's tokens after the first, in its own decoding, compiled
    on a GPU) is read for the token cost; the description stage would also carry its prefill."""
    run = json.loads(json.dumps(SMALL_RUN))
    run["scenarios"]["plain"]["decode_ms_per_token"] = 5.0
    measured = measured_from_results(run)
    assert measured.token_s == pytest.approx(0.005)
    assert measured.answer_fixed_s["plain"] == pytest.approx(1.0 - 32 * 0.005)


def test_a_measured_batch_step_cost_comes_from_the_concurrency_scenarios(tmp_path, capsys):
    run = json.loads(json.dumps(SMALL_RUN))
    run["scenarios"]["concurrent_1"] = {"visitors": 1, "throughput_ratio": 0.9}
    run["scenarios"]["concurrent_8"] = {"visitors": 8, "throughput_ratio": 5.0}
    run["scenarios"]["follow_ups_8"] = {"visitors": 8, "throughput_ratio": 3.0}  # prefills of their own: not a step
    measured = measured_from_results(run)
    assert measured.batch_step_factor == {8: pytest.approx(1.6)}  # 8 / 5.0
    assert measured_from_results(SMALL_RUN).batch_step_factor is None
    path = tmp_path / "results.json"
    path.write_text(json.dumps(run))
    assert main(["--results", str(path), "--scenario", "ego_5"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "step cost measured" in line)
    # 0.56 s fixed + 64 tokens * 0.02 s * 1.6
    assert row.startswith("| batches of up to 8 (step cost measured) | 1.60 | 2.61 |")


def test_the_committed_gpu_run_reads_as_the_document_says():
    measured = measured_from_results(json.loads(DEFAULT_RESULTS.read_text(encoding="utf-8")))
    assert measured.token_s * 1000 == pytest.approx(30.36, abs=0.01)  # 971.66 ms / 32 tokens
    assert measured.answer_fixed_s["plain"] == pytest.approx(0.060, abs=0.001)  # 1.0319 - 32 * 0.030364
    assert measured.introduction_s == pytest.approx(1.181, abs=0.001)


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
    assert main(["--new-tokens", "64", "--latency-factor", "2"]) == 0
    printed = capsys.readouterr().out
    assert "30.4 ms per generated token" in printed
    assert "| one at a time | 1.00 | 2.00 | 0.50 |" in printed  # 0.060 + 64 * 0.0304 s
