"""How many visitors one GPU serves at a given answer latency, from the measured numbers of a `python -m bench` run.

`python -m bench.capacity [--results bench/results/h200-2026-11-26/nf4/results.json]` prints the tables of
`docs/scaling.md`. Pure arithmetic, no model. What comes from the run (measured) and what is assumed:

- measured: the seconds per generated token (the plain question's `decode_ms_per_token`, its tokens after the
  first, in the run's own decoding; a run from before that field: the introduction's description stage over its
  32 tokens, which also holds the description's prefill), each question scenario's latency for its 32 tokens,
  and an introduction;
- derived: an answer's fixed cost (vision tower, prefill, setup) = its measured latency minus 32 decode steps;
  an answer of n tokens then costs fixed + n * seconds per token;
- measured, where the run has its concurrency scenarios (`concurrent_4`, `concurrent_8`): the step cost of a batch
  of B, taken as B / its throughput ratio to one at a time (that ratio also carries the per-question vision tower
  and prefill, which a batch does not share, so it is a slight overestimate of the step cost alone);
- assumed: visitors arrive independently (Poisson), each active visitor asks one question every `think_s`
  seconds, every answer has the same length, and a batch of B answers decodes in `step_factor` times the time
  of one (1.0: purely host-bound steps; larger: the GPU work per step grows with the batch). Queueing is the
  Allen-Cunneen approximation for M/D/c (exact for c = 1: the Pollaczek-Khinchine formula); a batch of B is
  counted as B servers whose answers each take the batched answer's time.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "h200-2026-11-26" / "nf4" / "results.json"


@dataclass(frozen=True)
class Measured:
    """The numbers a capacity estimate starts from, all in seconds."""

    token_s: float
    """One eager decode step of one sequence."""
    answer_fixed_s: dict
    """Scenario name -> an answer's cost besides its decode steps (vision tower, prefill, setup)."""
    introduction_s: float
    """Introducing a concept from one photo (description and size forced to their caps)."""
    batch_step_factor: dict | None = None
    """Visitors B -> the step cost of a batch of B over a lone step, from the run's concurrency scenarios
    (`concurrent_B`, B > 1): B / their throughput ratio to one at a time; None when the run has none."""


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
    factors = {
        s["visitors"]: s["visitors"] / s["throughput_ratio"]
        for name, s in results["scenarios"].items()
        if name.startswith("concurrent_") and s.get("visitors", 1) > 1 and s.get("throughput_ratio")
    }  # first questions: follow_ups_N share the decoding after prefills of their own
    return Measured(
        token_s=token_s, answer_fixed_s=fixed, introduction_s=intro["total_s"], batch_step_factor=factors or None
    )


def answer_s(measured: Measured, scenario: str, new_tokens: int, step_factor: float = 1.0) -> float:
    """Seconds of one answer of `new_tokens` tokens, its decode steps `step_factor` times a lone step."""
    return measured.answer_fixed_s[scenario] + new_tokens * measured.token_s * step_factor


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
    lone = answer_s(measured, scenario, new_tokens)
    target = latency_factor * lone
    lines = [
        (
            f"A lone answer ({scenario}, {new_tokens} tokens): {lone:.2f} s; latency target (mean): "
            f"{target:.2f} s; one question per visitor every {think_s:.0f} s."
        ),
        "",
        (
            "| serving | step cost x lone | answer (s) | answers/s at capacity | answers/s at target | "
            "active visitors at target |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for batch, factor in batches:
        service = answer_s(measured, scenario, new_tokens, factor)
        rate = max_arrivals_per_s(service, batch, target)
        name = "one at a time" if batch == 1 else f"batches of up to {batch}"
        if batch > 1 and (measured.batch_step_factor or {}).get(batch) == factor:
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
    measured = measured_from_results(json.loads(args.results.read_text(encoding="utf-8")))
    print(
        f"Measured ({args.results}): {measured.token_s * 1000:.1f} ms per generated token; introduction "
        f"{measured.introduction_s:.2f} s; fixed cost of an answer: "
        + ", ".join(f"{name} {value:.3f} s" for name, value in measured.answer_fixed_s.items())
        + "\n"
    )
    print(
        table(
            measured,
            scenario=args.scenario,
            new_tokens=args.new_tokens,
            latency_factor=args.latency_factor,
            think_s=args.think_s,
            batches=(
                (1, 1.0),
                (8, 1.0),
                (8, 1.25),
                (8, 2.0),
                (16, 1.5),
                *sorted((measured.batch_step_factor or {}).items()),
            ),
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
