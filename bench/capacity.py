"""How many visitors one GPU serves at a given answer latency, from the measured numbers of a `python -m bench` run.

`python -m bench.capacity [--results bench/results/h200-2026-12-04/nf4/results.json]` prints the tables of
`docs/scaling.md`. Pure arithmetic, no model. What comes from the run (measured) and what is assumed:

- measured: the seconds per generated token (the plain question's `decode_ms_per_token`, its tokens after the
  first, in the run's own decoding; a run from before that field: the introduction's description stage over its
  32 tokens, which also holds the description's prefill), each question scenario's latency for its 32 tokens,
  and an introduction;
- derived: an answer's fixed cost f (vision tower, prefill, setup) = its measured latency minus its n decode
  steps of t seconds; an answer of n tokens then costs f + n * t, and a batch of B answers B * f + n * t * s: each
  question's fixed cost is paid one question at a time before the shared decoding, whose steps cost s times a lone
  step (`answer_s`);
- measured, where the run has its concurrency scenarios (`concurrent_4`, `concurrent_8`): that step cost s of a
  batch of B, from the batch's wall time B / throughput_per_s less its B fixed costs (those of the scenario its
  visitors ask: `ego_5`, 5 concepts and a query photo each), over its n lone decode steps (`batch_step_factor`),
  taken as 1.0 where it comes out lower;
- assumed: visitors arrive independently (Poisson), each active visitor asks one question every `think_s`
  seconds, every answer has the same length, and a batch's decode step costs `step_factor` times a lone one (1.0:
  purely host-bound steps; larger: the GPU work per step grows with the batch). Queueing is the Allen-Cunneen
  approximation for M/D/c (exact for c = 1: the Pollaczek-Khinchine formula); a batch of B is counted as B servers
  whose answers each take the whole batch's time.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "h200-2026-12-04" / "nf4" / "results.json"


@dataclass(frozen=True)
class Measured:
    """The numbers a capacity estimate starts from, all in seconds."""

    token_s: float
    """One decode step of one sequence, in the run's own decoding (eager or compiled)."""
    answer_fixed_s: dict
    """Scenario name -> an answer's cost besides its decode steps (vision tower, prefill, setup)."""
    introduction_s: float
    """Introducing a concept from one photo (description and size forced to their caps)."""
    batch_step_factor: dict | None = None
    """Visitors B -> the cost of a decode step of a batch of B over a lone step, from the run's concurrency scenarios
    (`concurrent_B`, B > 1) by `batch_step_factor`, at least 1.0; None when the run has none."""
    batch_step_factor_as_measured: dict | None = None
    """The same before the floor of 1.0 (below it, the batch took less than its fixed costs and lone steps)."""


def measured_from_results(results: dict) -> Measured:
    """Read a `python -m bench` results.json (parsed) into the inputs of the capacity model."""
    intro = results["introduce"]
    decode_ms = results["scenarios"].get("plain", {}).get("decode_ms_per_token")
    token_s = decode_ms / 1000 if decode_ms else intro["stages_s"]["description_s"] / intro["description_tokens"]
    fixed = {
        name: scenario["latency_s"] - scenario["new_tokens"] * token_s
        for name, scenario in results["scenarios"].items()
        if "latency_s" in scenario
    }  # not concurrent_N
    as_measured = {
        s["visitors"]: batch_step_factor(s, fixed[f"ego_{s['concepts']}"], token_s)
        for name, s in results["scenarios"].items()
        # First questions only: follow_ups_N compute their contexts on their own before the shared decoding, which
        # no question scenario's fixed cost describes.
        if name.startswith("concurrent_") and s.get("visitors", 1) > 1 and f"ego_{s.get('concepts')}" in fixed
    }
    return Measured(
        token_s=token_s,
        answer_fixed_s=fixed,
        introduction_s=intro["total_s"],
        batch_step_factor={batch: max(1.0, factor) for batch, factor in as_measured.items()} or None,
        batch_step_factor_as_measured=as_measured or None,
    )


def batch_step_factor(scenario: dict, fixed_s: float, token_s: float) -> float:
    """The cost of one decode step of a concurrency scenario's batch over a lone step: the batch's wall time
    (visitors / throughput_per_s) less its visitors' fixed costs, paid one question at a time (`fixed_s` each),
    over its `new_tokens` lone decode steps of `token_s`. It comes out below 1.0, less than a step over more rows
    can cost, where the fixed cost, measured on lone calls, holds work a batch does once (its `generate` call's
    setup, large next to a tiny model's answer) or where noise outweighs the decoding: `measured_from_results` then
    takes 1.0, the least a batch's step costs. When fewer visitors ask than `answer_batch_max_size`, the batching
    window they wait is in it too."""
    batch = scenario["visitors"]
    decoding_s = batch / scenario["throughput_per_s"] - batch * fixed_s
    return decoding_s / (scenario["new_tokens"] * token_s)


def answer_s(measured: Measured, scenario: str, new_tokens: int, step_factor: float = 1.0, batch: int = 1) -> float:
    """Seconds until the last of `batch` answers of `new_tokens` tokens, asked together, ends: each question's fixed
    cost, one question at a time, then their shared decoding, each step `step_factor` times a lone step."""
    return batch * measured.answer_fixed_s[scenario] + new_tokens * measured.token_s * step_factor


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (`offered_load` = arrival rate x service time)."""
    if offered_load >= servers:
        return 1.0
    term, below = 1.0, 1.0  # a^k / k! for k = 0, and the sum of those terms for k < c
    for k in range(1, servers):
        term *= offered_load / k
        below += term
    top = term * offered_load / servers * servers / (servers - offered_load)  # a^c / c! * c / (c - a)
    return top / (below + top)


def mean_latency_s(service_s: float, servers: int, arrivals_per_s: float) -> float:
    """Mean time from asking to the last token: the wait in an M/D/c queue (Allen-Cunneen: half the M/M/c
    wait) plus the service. Infinite at or beyond capacity."""
    offered = arrivals_per_s * service_s
    if offered >= servers:
        return math.inf
    wait = erlang_c(servers, offered) * service_s / (servers - offered) / 2
    return wait + service_s


def max_arrivals_per_s(service_s: float, servers: int, latency_s: float) -> float:
    """The largest arrival rate whose mean latency stays within `latency_s` (0 when one answer alone is slower)."""
    if latency_s < service_s:
        return 0.0
    low, high = 0.0, servers / service_s
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_latency_s(service_s, servers, middle) <= latency_s else (low, middle)
    return low


def visitors(arrivals_per_s: float, think_s: float) -> float:
    """Active visitors that ask at this total rate, each one question every `think_s` seconds."""
    return arrivals_per_s * think_s


def table(
    measured: Measured,
    *,
    scenario: str,
    new_tokens: int,
    latency_factor: float,
    think_s: float,
    batches: tuple[tuple[int, float], ...],
) -> str:
    """The capacity table: a row per (batch size, assumed step cost) in `batches`, then a row per step cost the run
    measured (`Measured.batch_step_factor`)."""
    lone = answer_s(measured, scenario, new_tokens)
    target = latency_factor * lone
    lines = [
        (
            f"A lone answer ({scenario}, {new_tokens} tokens): {lone:.2f} s; latency target (mean): "
            f"{target:.2f} s; one question per visitor every {think_s:.0f} s. A batch of B: B fixed costs of "
            f"{measured.answer_fixed_s[scenario]:.3f} s, then the shared decoding; answer (s) is the whole batch's."
        ),
        "",
        (
            "| serving | step cost x lone | answer (s) | answers/s at capacity | answers/s at target | "
            "active visitors at target |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [(batch, factor, False) for batch, factor in batches]
    rows += [(batch, factor, True) for batch, factor in sorted((measured.batch_step_factor or {}).items())]
    for batch, factor, from_run in rows:
        service = answer_s(measured, scenario, new_tokens, factor, batch)
        rate = max_arrivals_per_s(service, batch, target)
        name = "one at a time" if batch == 1 else f"batches of up to {batch}"
        if from_run:
            name += " (step cost measured)"
        lines.append(
            f"| {name} | {factor:.2f} | {service:.2f} | {batch / service:.2f} | {rate:.2f} | "
            f"{visitors(rate, think_s):.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="a results.json of `python -m bench`")
    parser.add_argument("--scenario", default="ego_5", help="question scenario of the run (plain, ego_5, ego_20…)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--latency-factor", type=float, default=2.0, help="mean latency target over a lone answer")
    parser.add_argument("--think-s", type=float, default=60.0, help="seconds between one visitor's questions")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text(encoding="utf-8"))
    except OSError as error:
        parser.error(
            f"--results {args.results} cannot be read ({error.strerror}): pass a results.json of `python -m bench`"
        )
    except json.JSONDecodeError:
        parser.error(f"--results {args.results} is not JSON: pass a results.json of `python -m bench`")
    missing = [key for key in ("introduce", "scenarios") if key not in results] if isinstance(results, dict) else []
    if not isinstance(results, dict) or missing:
        parser.error(
            f"--results {args.results} is not a results.json of `python -m bench` (it has no "
            f"{' and no '.join(missing) or 'measurements'}): pass the results.json of a run; a progress.json beside "
            "it holds only what compiling took"
        )
    measured = measured_from_results(results)
    if args.scenario not in measured.answer_fixed_s:
        parser.error(
            f"--scenario {args.scenario} is not a question scenario of {args.results}: choose one of "
            + ", ".join(measured.answer_fixed_s)
        )
    print(
        f"Measured ({args.results}): {measured.token_s * 1000:.1f} ms per generated token; introduction "
        f"{measured.introduction_s:.2f} s; fixed cost of an answer: "
        + ", ".join(f"{name} {value:.3f} s" for name, value in measured.answer_fixed_s.items())
    )
    for batch, factor in sorted((measured.batch_step_factor_as_measured or {}).items()):
        floor = " (below a lone step, which a step over more rows cannot cost: taken as 1.00)" if factor < 1 else ""
        print(f"Step cost of a batch of {batch} (concurrent_{batch}): {factor:.2f} x a lone step{floor}")
    print()
    print(
        table(
            measured,
            scenario=args.scenario,
            new_tokens=args.new_tokens,
            latency_factor=args.latency_factor,
            think_s=args.think_s,
            batches=((1, 1.0), (8, 1.0), (8, 1.25), (8, 2.0), (16, 1.5)),
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
