"""The cost of personalization, measured in one run: Ego against the plain model and against reference images.

    python -m bench --model tiny-qwen2.5-vl                      # CPU smoke, the numbers in bench/RESULTS.md
    python -m bench --model qwen2.5-vl-7b --quantization 4bit    # GPU: random weights of the real 7B architecture

What is measured (each latency is the median of --repeats calls after one warm-up call; the repeats go
round-robin over the question scenarios, so that load drifting on a shared machine hits all of them alike):

* introduction of a concept (one 448x448 reference photo), split into the engine's stages
  (`ConceptView.timings_s`: encode, description, size, scores, selection) plus the rest ("other": image
  checks, the lock, concatenation), and the peak memory while introducing;
* one question about one query image (about 1,000 visual tokens on Qwen2.5-VL), asked
  - plainly, with no personal context ("plain"),
  - with the memories of 1, 5 and 20 concepts in the context ("ego_N"),
  - with the 1, 5 and 20 full reference photos in the context instead ("refs_N": the prompt a user
    would write without Ego, built with the processor directly, the same text around each photo as
    around each memory, photos before the query image);
* one question about a video (the engine's `video_num_frames` sampled frames), plainly and with 5 concepts;
* a conversation about the query image with 5 concepts (`Ego.chat`): the first question, then a short
  follow-up answered on the conversation's cached context; for each, the context tokens it computed
  (`Answer.prefill_tokens`), the time to its first generated token and its latency;
* the bytes a concept takes in memory (`Concept.nbytes`) and in a file (`ego.save_concepts`).

The weights are random, so every answer is gibberish. To make the timings mean something, every
generation runs to its length cap: each `model.generate` call made while measuring gets
`min_new_tokens = max_new_tokens` and the stop tokens added to `suppress_tokens`
(`forced_generation`, a wrapper put on the model object for the duration; the engine is not modified).
So an introduction always generates a description of the engine's `description_max_new_tokens` and a size
answer of `Sizes.size_tokens` (see there), and every answer exactly --new-tokens tokens.

`--profile` adds, after the measurement, one profiled introduction and one profiled plain and 20-concept
question (`torch.profiler`): wall time, the time the GPU was busy (the union of its kernels and copies),
the kernels launched, and the operations that took the most device and host time; it goes into
results.json ("profile"), results.md and the log. It answers "where does the time go" when a target is
missed: a GPU that is busy most of the wall time is computing, one that is idle is waiting for Python and
kernel launches.

Memory: on CUDA, `torch.cuda.max_memory_allocated` (reset before each measured call; weights included);
on a CPU, the process's peak resident set size (`VmHWM`, reset through /proc/self/clear_refs before each
measured call where the kernel allows it; the whole process, libraries included). results.json says which.
On a busy CPU, `--threads 1` gives far steadier timings than oversubscribed OpenMP threads.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
COUNTS = (1, 5, 20)
"""Numbers of concepts (or reference photos) in the context."""
VISITORS = (1, 4, 8)
"""Numbers of visitors asking at the same moment (the concurrency scenarios), each with CONCURRENT_CONCEPTS."""
FOLLOW_UP_VISITORS = 8
"""Visitors who follow up their conversations at the same moment (the `follow_ups_8` scenario)."""
CONCURRENT_CONCEPTS = 5
QUESTION = "Is anyone or anything I know in this picture? Say who it is and what they are doing."
VIDEO_QUESTION = "Is anyone or anything I know in this video? Say who it is and what they do."
FOLLOW_UP = "What are they holding?"
CONVERSATION_CONCEPTS = 5
GIB = 1024**3

TARGETS = {
    # name: (target, what it applies to): the budgets the project holds itself to (bench/RESULTS.md); every
    # target is an upper bound except those in LOWER_BOUNDS. The speed targets are those of compiled decoding;
    # the storage and context ones those of the method; the concurrency ones those of batched answers.
    "decode_ms_per_token": (
        8.0,
        "qwen2.5-vl-7b architecture, 4-bit, one H100/H200, batch 1: the plain question's "
        "generated tokens after the first, per token",
    ),
    "introduce_s_per_concept": (0.5, "qwen2.5-vl-7b architecture, 4-bit, one H100/H200"),
    "plain_answer_s": (
        0.4,
        "qwen2.5-vl-7b architecture, 4-bit, one H100/H200: a 32-token answer about a ~1,000-token photo",
    ),
    "latency_ratio_5_concepts": (
        1.05,
        "qwen2.5-vl-7b architecture on a GPU: Ego with 5 concepts over the plain question",
    ),
    "latency_ratio_20_concepts": (
        1.05,
        "qwen2.5-vl-7b architecture on a GPU: Ego with 20 concepts over the plain question",
    ),
    "compile_warm_up_s": (90.0, "qwen2.5-vl-7b architecture, 4-bit, one H100/H200: compiling the decode step"),
    "context_tokens_per_concept": (
        50,
        "any model: context tokens a concept adds (its name, the two markers, the memory rows)",
    ),
    "stored_mb_per_concept": (0.4, "qwen2.5-vl-7b: bytes per concept in a concept file, in MB (10^6)"),
    "peak_gib_20_concepts": (
        9.0,
        "qwen2.5-vl-7b architecture, 4-bit, one GPU: 20 concepts and a 1000-token query image",
    ),
    "throughput_ratio_8_visitors": (
        4.0,
        "qwen2.5-vl-7b architecture, 4-bit, one H100/H200: 8 visitors asking at once (5 concepts and a "
        "~1,000-token photo each), answers per second batched over one at a time",
    ),
    "latency_p95_8_visitors_over_lone": (
        2.0,
        "qwen2.5-vl-7b architecture, 4-bit, one H100/H200: the 95th-percentile latency of 8 visitors asking at "
        "once, batched, over a lone visitor's median latency (concurrent_1)",
    ),
}
LOWER_BOUNDS = {"throughput_ratio_8_visitors"}
"""Targets that are floors: met when the measured value is at least the target."""


@dataclass(frozen=True)
class Sizes:
    concepts_introduced: int
    """Concepts introduced for real (after one warm-up introduction); the rest up to 20 are copies."""
    query_size: tuple[int, int]
    """(width, height) of the query photo; 1024x768 fits Qwen2.5-VL's budget as 37x27 = 999 visual tokens."""
    reference_size: tuple[int, int]
    """(width, height) of each reference photo: the engine's reference budget, 448x448 (256 tokens)."""
    video_frames: int
    video_size: tuple[int, int]
    new_tokens: int
    """Tokens generated per answer (forced)."""
    repeats: int
    description_tokens: int | None = None
    size_tokens: int | None = None
    """Lengths of the introduction's two generations (forced); None = the engine's caps. The full run forces 5
    size tokens, what an answer such as "35%." takes with its stop token: the size cap (`size_max_new_tokens`) is
    room for a whole sentence, which a random model would always fill."""


FULL = Sizes(
    concepts_introduced=20,
    query_size=(1024, 768),
    reference_size=(448, 448),
    video_frames=16,
    video_size=(640, 480),
    new_tokens=32,
    repeats=3,
    size_tokens=5,
)
QUICK = Sizes(
    concepts_introduced=2,
    query_size=(448, 336),
    reference_size=(224, 224),
    video_frames=8,
    video_size=(224, 224),
    new_tokens=4,
    repeats=1,
    description_tokens=8,
    size_tokens=2,
)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv) -> argparse.Namespace:
    from ego import options

    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure what personalization costs: introduction, questions with 0/1/5/20 concepts "
        "against the same questions with full reference photos in context, a video question, "
        "and storage per concept. Writes results.json, results.md and latency.png.",
    )
    parser.add_argument(
        "--model",
        default="tiny-qwen2.5-vl",
        help="a tiny preset (tiny-qwen2.5-vl, ...), a real preset (qwen2.5-vl-7b, ...: random "
        "weights of its real architecture, built by ego.random_models.architectures), or a local "
        "checkpoint folder (default: tiny-qwen2.5-vl)",
    )
    options.add_quantization(parser)
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"measured calls per scenario after one warm-up; the median is reported "
        f"(default: {FULL.repeats}, --quick: {QUICK.repeats})",
    )
    parser.add_argument(
        "--eager-repeats",
        type=int,
        default=None,
        help="with --decoding both: measured calls per scenario of the eager run, the point of comparison "
        "(default: --repeats)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, 1 repeat, few tokens: a smoke test of the harness"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: bench/out/)")
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help=f"tokens generated per answer, forced (default: {FULL.new_tokens}, --quick: {QUICK.new_tokens})",
    )
    parser.add_argument(
        "--concepts",
        type=int,
        default=None,
        help=f"concepts introduced for real, at most 20; the others up to 20 are copies "
        f"(default: {FULL.concepts_introduced}, --quick: {QUICK.concepts_introduced})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 steadies CPU timings on a busy machine",
    )
    parser.add_argument(
        "--arch-dir",
        default=None,
        help="for a real preset: folder where its random-weight copy is built, or reused when "
        "it already holds the same build (default: a folder under the temp dir)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the measurement, profile one introduction and the plain and 20-concept "
        "questions (torch.profiler): device busy time, kernels, top operations",
    )
    parser.add_argument(
        "--no-concurrency",
        dest="concurrency",
        action="store_false",
        help="leave out the concurrency scenarios (1, 4 and 8 visitors asking at the same moment), "
        "measured after the other results are written",
    )
    parser.add_argument(
        "--text-layers",
        type=int,
        default=None,
        help="for a real preset: cut the text model to this many layers (smoke tests)",
    )
    parser.add_argument(
        "--vision-depth",
        type=int,
        default=None,
        help="for a real preset: cut the vision tower to this many blocks (smoke tests)",
    )
    parser.add_argument(
        "--decoding",
        default="auto",
        choices=["auto", "eager", "compiled", "both"],
        help="how answers decode (ego.decoding); both = eager, then compiled, on the same loaded "
        "model, side by side in one results.json; auto = both on CUDA, eager elsewhere "
        "(default: auto)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        choices=["inductor", "aot_eager"],
        help="torch.compile backend of compiled decoding (default: inductor; aot_eager compiles "
        "in seconds on a CPU, for smoke tests)",
    )
    parser.add_argument(
        "--static-cache-tokens",
        type=int,
        default=None,
        help="the static key/value cache's length for compiled decoding (Settings.static_cache_max_tokens; "
        "default: the settings' own); attention and its key/value expansion run over all of it at every step, "
        "and a generation longer than it decodes eagerly",
    )
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    sizes = replace(
        base,
        repeats=args.repeats if args.repeats is not None else base.repeats,
        new_tokens=args.new_tokens if args.new_tokens is not None else base.new_tokens,
        concepts_introduced=args.concepts if args.concepts is not None else base.concepts_introduced,
    )
    if sizes.repeats < 1 or sizes.new_tokens < 1 or not 1 <= sizes.concepts_introduced <= max(COUNTS):
        parser.error(f"--repeats and --new-tokens must be at least 1, --concepts between 1 and {max(COUNTS)}")
    if args.eager_repeats is not None and args.eager_repeats < 1:
        parser.error("--eager-repeats must be at least 1")
    if args.static_cache_tokens is not None and args.static_cache_tokens < 1:
        parser.error("--static-cache-tokens must be at least 1")
    args.sizes = sizes
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = _load_average()
    (out / PROGRESS_FILE).unlink(missing_ok=True)  # an earlier run's, in this folder
    modes = decoding_modes(args)
    # A compiled-only run loads eager first for its equality check: eager's greedy trace (a second), then compiles.
    engine, model_meta = load_engine(args, "eager" if modes == ["compiled"] else modes[0])
    runs, traces = {}, {}
    if modes == ["compiled"]:
        traces["eager"] = greedy_trace(engine, args.sizes)
    for mode in modes:  # the last one is the primary run: compiled when both are measured
        if engine.decoder.mode != mode:
            engine.set_decoding(mode)
        compile_meta = warm_up(engine, _log, batched=args.concurrency)
        traces[mode] = greedy_trace(engine, args.sizes)
        write_progress(out, mode, compile_meta, traces)
        sizes = args.sizes
        if mode == "eager" and mode != modes[-1] and args.eager_repeats is not None:
            sizes = replace(sizes, repeats=args.eager_repeats)
        runs[mode] = run(engine, sizes, log=_log)
        runs[mode]["meta"]["decoding"] = engine.decoder.mode
        runs[mode]["meta"]["compile"] = finish_compile_meta(compile_meta)
        if mode != modes[-1]:
            # On disk before the next mode compiles: a run stopped by its time limit keeps this one.
            interim = _with_meta(dict(runs[mode]), model_meta, engine, load_at_start, argv)
            interim["targets"] = targets(interim)
            write_outputs(interim, out)
            _log(f"wrote the {mode} run to {out / 'results.json'} (replaced when the run ends)")
    results = _with_meta(runs[modes[-1]], model_meta, engine, load_at_start, argv)
    if len(runs) > 1:
        results["decoding_runs"] = {
            mode: {k: doc[k] for k in ("introduce", "scenarios", "conversation") if k in doc}
            | {
                "meta": {k: doc["meta"][k] for k in ("decoding", "compile")}
                | {"repeats": doc["meta"]["sizes"]["repeats"]}
            }
            for mode, doc in runs.items()
        }
        results["decoding_comparison"] = compare_decoding(runs)
    if {"eager", "compiled"} <= set(traces):
        results["decoding_equality"] = compare_traces(traces["eager"], traces["compiled"])
        _log("compiled vs eager: " + json.dumps(results["decoding_equality"]))
    results["targets"] = targets(results)
    write_outputs(results, out)
    _log(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'latency.png'}")
    if args.concurrency:
        # After the single-question results are on disk, like the profile: a run out of time loses nothing.
        from ego.decoding import compile_counts

        before = compile_counts()

        def keep(scenarios: dict) -> None:
            """Each concurrency scenario on disk as it ends: a run stopped by its time limit keeps those done."""
            after = compile_counts()
            results["scenarios"].update(scenarios)
            # Batches of 2 to 8 rows share the graph the batched warm-up compiled: none is expected here.
            results["meta"]["compile"]["graphs_during_concurrency"] = after["graphs"] - before["graphs"]
            results["meta"]["compile"]["recompiles_during_concurrency"] = after["recompiles"] - before["recompiles"]
            results["targets"] = targets(results)
            write_outputs(results, out)

        measure_concurrency(bench_engine(engine, args.sizes), args.sizes, log=_log, on_scenario=keep)
        _log(f"added the concurrency scenarios to {out / 'results.json'} and {out / 'results.md'}")
    if args.profile:
        # After the measured results are on disk: a profile that fails or runs out of time loses nothing.
        batch = max(VISITORS) if args.concurrency else 0  # its batch size was compiled and measured by then
        results["profile"] = profile(engine, args.sizes, log=_log, batch=batch)
        write_outputs(results, out)
        _log(f"added the profile to {out / 'results.json'} and {out / 'results.md'}")
    return 0


def _with_meta(results: dict, model_meta: dict, engine, load_at_start, argv) -> dict:
    """`results` with the whole run's metadata merged into its own."""
    results["meta"] = {
        **model_meta,
        **results["meta"],
        **environment(engine),
        "load_average_at_start": load_at_start,
        "command": "python -m bench " + shlex.join(argv),
    }
    return results


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
def decoding_modes(args) -> list[str]:
    """The decoding modes to measure, in order: --decoding both (or auto on CUDA) measures eager, then compiled."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.decoding == "both" or (args.decoding == "auto" and device.startswith("cuda")):
        return ["eager", "compiled"]
    return ["compiled" if args.decoding == "compiled" else "eager"]


def warm_up(engine, log, *, batched: bool = False) -> dict:
    """Compile the decode step before measuring (as the Space does at start; batched: with the step of batched
    answers too, as a Space that batches its visitors does): seconds and compile counts."""
    from ego.decoding import compile_counts

    meta = {"backend": None, "mode": None, "before": compile_counts()}
    if engine.decoder.compiled:
        config = engine.decoder.compile_config
        meta.update(backend=config.backend, mode=config.mode)
        log(f"compiling the decode step ({config.backend}, mode {config.mode})")
        # Each step as it ends: a run stopped by its time limit in the middle of compiling still says how far it got.
        meta["warm_up_s"] = engine.warm_up(
            batched=batched, on_step=lambda step, seconds: log(f"compiled the {step} step in {seconds:.1f} s")
        )
        meta["warm_up_batched"] = batched
        meta["warm_up_steps_s"] = dict(engine.decoder.warm_up_steps_s)
        log("compile time per step: " + _seconds_each(meta["warm_up_steps_s"]))
        log(f"compiled in {meta['warm_up_s']:.1f} s")
    meta["after_warm_up"] = compile_counts()
    return meta


PROGRESS_FILE = "progress.json"


def write_progress(out: Path, mode: str, compile_meta: dict, traces: dict) -> None:
    """What `mode`'s warm-up found, in `progress.json` beside the results as soon as it is known: the compile time
    per step, the compilations so far and, once both are traced, compiled against eager's greedy tokens. A run stopped
    by its time limit before it writes its results (a compiled-only configuration writes them at its end) keeps
    this much (`bench/gpu_run.sh` packs the whole folder)."""
    from ego.decoding import compile_counts

    path = out / PROGRESS_FILE
    progress = json.loads(path.read_text()) if path.exists() else {}
    now = compile_counts()
    entry = {k: v for k, v in compile_meta.items() if k not in ("before", "after_warm_up")}
    entry["graphs_so_far"] = now["graphs"] - compile_meta["before"]["graphs"]
    entry["recompiles_so_far"] = now["recompiles"] - compile_meta["before"]["recompiles"]
    progress[mode] = {"compile": entry}
    if {"eager", "compiled"} <= set(traces):
        progress["decoding_equality"] = compare_traces(traces["eager"], traces["compiled"])
    write_whole(path, json.dumps(progress, indent=2, default=_json_default) + "\n")


def finish_compile_meta(meta: dict) -> dict:
    """Compilations at warm-up and during the measured scenarios (the design allows none there)."""
    from ego.decoding import compile_counts

    before, warm, end = meta.pop("before"), meta.pop("after_warm_up"), compile_counts()
    return {
        **meta,
        "warm_up_s": meta.get("warm_up_s"),
        "graphs_at_warm_up": warm["graphs"] - before["graphs"],
        "recompiles_at_warm_up": warm["recompiles"] - before["recompiles"],
        "graphs_during_run": end["graphs"] - warm["graphs"],
        "recompiles_during_run": end["recompiles"] - warm["recompiles"],
    }


EQUALITY_TOKENS = 16
"""Greedy tokens compared between eager and compiled decoding (forced, stop tokens suppressed)."""
LOGIT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5}
"""Largest |compiled - eager| logit accepted while the tokens agree: float32 differs only by the order of
operations; bf16 (and NF4's bf16 compute) rounds each fused kernel's result differently, on logits of order 10."""


def greedy_trace(engine, sizes: Sizes) -> dict:
    """The first EQUALITY_TOKENS greedy tokens of a question about the query photo, and their logits."""
    query = photo(1000, sizes.query_size)
    encoded = engine.backend.encode(
        engine.backend.chat_text([{"type": "image"}, {"type": "text", "text": QUESTION}]),
        image=query,
        image_max_pixels=engine.settings.query_image_max_pixels,
        video_frame_max_pixels=engine.settings.video_frame_max_pixels,
    )
    inputs = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in encoded.inputs.items()}
    decoding = dict(engine.decoding)
    decoding["suppress_tokens"] = sorted(set(decoding["suppress_tokens"]) | set(engine.backend.stop_token_ids))
    with torch.no_grad(), engine.exclusive_use():
        out = engine.model.generate(
            **inputs,
            max_new_tokens=EQUALITY_TOKENS,
            min_new_tokens=EQUALITY_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
            **decoding,
        )
    return {
        "tokens": out.sequences[0, inputs["input_ids"].shape[1] :].tolist(),
        "logits": torch.stack(out.logits)[:, 0].float().cpu(),  # [tokens, vocab]
        "dtype": str(engine.memory_dtype).replace("torch.", ""),
    }


def compare_traces(eager: dict, compiled: dict) -> dict:
    """Whether compiled decoding gives eager's greedy tokens, and how far its logits are from eager's while
    the tokens agree (after a different token the two continue different texts)."""
    same = [a == b for a, b in zip(eager["tokens"], compiled["tokens"])]
    agree = same.index(False) if False in same else len(same)
    compared = max(1, agree)  # the first token's logits come from the same prompt in both
    difference = (eager["logits"][:compared] - compiled["logits"][:compared]).abs().max().item()
    tolerance = LOGIT_TOLERANCE.get(eager["dtype"], 0.5)
    return {
        "tokens": len(same),
        "tokens_equal": agree == len(same),
        "first_different_token": None if agree == len(same) else agree,
        "max_abs_logit_difference": difference,
        "logits_compared": compared,
        "max_abs_logit": eager["logits"][:compared].abs().max().item(),
        "tolerance": tolerance,
        "within_tolerance": difference <= tolerance,
    }


def compare_decoding(runs: dict) -> dict:
    """Per scenario, per turn of the conversation (compiled on the shared static cache too) and for the
    introduction: latency, time to first token and decode time per token of each mode, and the eager / compiled
    ratios."""
    eager, compiled = runs["eager"], runs["compiled"]
    pairs = [(name, eager["scenarios"][name], compiled["scenarios"][name]) for name in compiled["scenarios"]]
    pairs += [
        (f"conversation_{turn}", eager["conversation"][turn], compiled["conversation"][turn])
        for turn in ("first", "follow_up")
        if turn in eager.get("conversation", {}) and turn in compiled.get("conversation", {})
    ]
    table = {}
    for name, a, b in pairs:
        table[name] = {
            f"{key}_{mode}": doc[key]
            for key in ("latency_s", "ttft_s", "decode_ms_per_token")
            for mode, doc in (("eager", a), ("compiled", b))
        }
        table[name]["speedup_latency"] = a["latency_s"] / b["latency_s"]
        table[name]["speedup_decode"] = a["decode_ms_per_token"] / b["decode_ms_per_token"]
    table["introduce"] = {
        "latency_s_eager": eager["introduce"]["total_s"],
        "latency_s_compiled": compiled["introduce"]["total_s"],
        "speedup_latency": eager["introduce"]["total_s"] / compiled["introduce"]["total_s"],
    }
    return table


def load_engine(args, decoding: str = "eager"):
    """(engine, meta) for --model: a tiny preset, a real preset's random-weight architecture, or a folder."""
    from ego import DEFAULT_SETTINGS, Ego, options
    from ego.presets import resolve
    from ego.quantization import loaded_quantization
    from ego.random_models.architectures import ARCHITECTURES, cached_random_architecture, describe

    quantization = options.quantization(args.quantization)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = DEFAULT_SETTINGS.replace(decoding=decoding, compile_backend=getattr(args, "compile_backend", "inductor"))
    if getattr(args, "static_cache_tokens", None):
        settings = settings.replace(static_cache_max_tokens=args.static_cache_tokens)
    preset = resolve(args.model)
    meta = {"model": args.model, "quantization": args.quantization, "requested_device": device}
    started = time.perf_counter()
    if preset is not None and preset.tiny:
        meta["model_kind"] = "tiny random-weight model of the real classes (ego.random_models)"
        engine = Ego.from_pretrained(args.model, quantization=quantization, device=device, settings=settings)
    elif args.model.strip().lower() in ARCHITECTURES:
        name = args.model.strip().lower()
        folder = (
            Path(args.arch_dir)
            if args.arch_dir
            else Path(tempfile.gettempdir())
            / "ego-arch"
            / (
                name
                + (f"-L{args.text_layers}" if args.text_layers else "")
                + (f"-V{args.vision_depth}" if args.vision_depth else "")
            )
        )
        _log(f"random-weight {name} architecture in {folder} (built once, then reused)")
        build_started = time.perf_counter()
        cached_random_architecture(
            name, folder, text_layers=args.text_layers, vision_depth=args.vision_depth, device=device
        )
        meta["architecture_build_s"] = round(time.perf_counter() - build_started, 2)
        meta["model_kind"] = "random weights of the real architecture (ego.random_models.architectures)"
        meta["architecture"] = describe(name, text_layers=args.text_layers, vision_depth=args.vision_depth)
        meta["model_path"] = str(folder)
        engine = Ego.from_pretrained(str(folder), quantization=quantization, device=device, settings=settings)
    elif Path(args.model).is_dir():
        meta["model_kind"] = "local checkpoint folder"
        meta["model_path"] = str(Path(args.model).resolve())
        engine = Ego.from_pretrained(args.model, quantization=quantization, device=device, settings=settings)
    else:
        raise SystemExit(
            f"--model {args.model!r} is neither a preset with a recorded architecture "
            f"({', '.join(ARCHITECTURES)}), a tiny preset, nor a folder."
        )
    meta["load_s"] = round(time.perf_counter() - started - meta.get("architecture_build_s", 0.0), 2)
    meta["quantization_effective"] = loaded_quantization(engine.model) or (
        f"none ({str(engine.memory_dtype).replace('torch.', '')})"
    )
    _log(
        f"loaded {engine.model_id} on {engine.device} ({engine.memory_dtype}, quantization {args.quantization}) "
        f"in {meta['load_s']} s"
    )
    return engine, meta


def environment(engine) -> dict:
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    device = engine.device
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        described = f"{properties.name} ({properties.total_memory / GIB:.0f} GiB)"
    else:
        described = f"CPU: {_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {
        "device": described,
        "device_type": device.type,
        "dtype": str(engine.memory_dtype).replace("torch.", ""),
        "model_id": engine.model_id,
        "family": engine.family,
        "text_layers": engine.num_layers,
        "hidden_size": engine.hidden_size,
        "attention_layers_L": list(engine.layers),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": version("transformers"),
            "bitsandbytes": version("bitsandbytes"),
            "torchao": version("torchao"),
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_at_end": _load_average(),
        "platform": platform.platform(),
    }


def _load_average():
    """(1, 5, 15)-minute load averages: other processes on the machine make CPU timings noisy."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------
class Memory:
    """Peak memory of a stretch of work: CUDA allocator peak, or the process's peak RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.resettable = self.cuda or _reset_rss_peak()
        if self.cuda:
            self.kind = "cuda_max_memory_allocated"
        elif self.resettable:
            self.kind = "cpu_peak_rss (VmHWM of the whole process, reset before each measured call)"
        else:
            self.kind = "cpu_peak_rss_since_process_start (VmHWM; this kernel cannot reset it)"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _reset_rss_peak()

    def peak_gib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return _rss_peak_bytes() / GIB

    def current_gib(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) / GIB
        return _rss_bytes() / GIB


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field_name: str) -> int:
    try:
        match = re.search(rf"^{field_name}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        return int(match.group(1)) if match else 0
    except OSError:
        return 0


def _rss_peak_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib:
        return kib * 1024
    import resource  # not Linux: the lifetime peak

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TokenClock:
    """A generate streamer that only notes when tokens arrive: `first_s` (the first generated token), `last_s`."""

    def __init__(self):
        self.prompt_seen, self.first_s, self.last_s = False, None, None

    def put(self, value):
        value.cpu()  # the token on the host, as a text streamer reads it (on a GPU: after its step finished)
        now = time.perf_counter()
        if not self.prompt_seen:  # generate's first put is the prompt
            self.prompt_seen = True
            return
        if self.first_s is None:
            self.first_s = now
        self.last_s = now

    def end(self):
        pass


@contextlib.contextmanager
def forced_generation(model, stop_ids, log: list, calls: list | None = None):
    """Every `model.generate` call inside runs to its `max_new_tokens`, and its number of new tokens is
    appended to `log`; with `calls`, each call's token times are appended to it too ({"start_s", "first_s",
    "last_s", "end_s", "new_tokens"}, perf_counter seconds: `first_s` and `last_s` when its first and last tokens
    reached the streamer, `end_s` when generate returned).

    Random weights stop at random places; a benchmark needs fixed lengths. The calls get
    `min_new_tokens = max_new_tokens` and the stop tokens added to `suppress_tokens` (on top of whatever the
    caller suppresses). The engine is not modified: the wrapper sits on this model object for the duration.
    """
    original = model.generate
    stop_ids = [int(i) for i in stop_ids]

    def generate(*args, **kwargs):
        if kwargs.get("max_new_tokens"):
            kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
        kwargs["suppress_tokens"] = sorted(set(kwargs.get("suppress_tokens") or []) | set(stop_ids))
        clock = None
        if calls is not None and kwargs.get("streamer") is None:
            clock = kwargs["streamer"] = TokenClock()
        started = time.perf_counter()
        out = original(*args, **kwargs)
        prompt = kwargs.get("input_ids", args[0] if args else None)
        sequences = out.sequences if hasattr(out, "sequences") else out
        if prompt is not None and torch.is_tensor(sequences):
            log.append(int(sequences.shape[1] - prompt.shape[1]))
            if clock is not None:
                calls.append(
                    {
                        "start_s": started,
                        "first_s": clock.first_s,
                        "last_s": clock.last_s,
                        "end_s": time.perf_counter(),
                        "new_tokens": log[-1],
                    }
                )
        return out

    own = model.__dict__.get("generate")  # compiled decoding puts its own generate on the model object
    model.generate = generate
    try:
        yield log
    finally:
        if own is None:
            del model.generate
        else:
            model.generate = own


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A deterministic photo-like RGB image (gradients and noise) of (width, height)."""
    width, height = size
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * (1 + seed % 3)) % 256, (y * (2 + seed % 2)) % 256, ((x + y) * (1 + seed % 5)) % 256], -1)
    noise = rng.randint(0, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"))


def video_frames(count: int, size: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a slowly moving synthetic scene.

    Passed as an array, so no video decoding is timed (and the GPU image needs no PyAV)."""
    return np.stack([np.asarray(photo(100 + i, size)) for i in range(count)])


def _median(values):
    return float(statistics.median(values)) if values else None


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def run(engine, sizes: Sizes, log=lambda message: None) -> dict:
    """Measure everything on `engine`; returns the results document (without the model meta and targets)."""
    return _measure(bench_engine(engine, sizes), sizes, log)


def bench_engine(engine, sizes: Sizes):
    """The same engine with its settings widened where the benchmark needs it (20 concepts in context, the
    answer length, --quick's shorter introduction)."""
    settings = engine.settings
    return engine.with_settings(
        max_concepts_in_context=max(max(COUNTS), settings.max_concepts_in_context),
        answer_max_new_tokens_limit=max(sizes.new_tokens, settings.answer_max_new_tokens_limit),
        description_max_new_tokens=sizes.description_tokens or settings.description_max_new_tokens,
        size_max_new_tokens=sizes.size_tokens or settings.size_max_new_tokens,
    )


def _measure(engine, sizes: Sizes, log) -> dict:
    count = max(COUNTS)
    memory = Memory(engine.device)
    references = [photo(i, sizes.reference_size) for i in range(count)]
    query = photo(1000, sizes.query_size)
    frames = video_frames(sizes.video_frames, sizes.video_size)
    weights_gib = memory.current_gib() if memory.cuda else engine.model.get_memory_footprint() / GIB

    introduced, introduce = _measure_introduction(engine, sizes, memory, references, log)
    concepts = _padded_concepts(introduced, count)
    storage = _measure_storage(concepts, count)
    plan = _question_plan(engine, sizes, concepts, references, query, frames)
    runs = _run_plan(engine, sizes, memory, plan, log)
    scenarios = _scenarios(plan, runs, log)
    storage.update(_context_growth(scenarios))
    conversation = _measure_conversation(engine, sizes, memory, concepts[:CONVERSATION_CONCEPTS], query, log)
    return {
        "meta": _meta(engine, sizes, memory, weights_gib, query, frames),
        "introduce": introduce,
        "storage": storage,
        "scenarios": scenarios,
        "conversation": conversation,
    }


def _measure_introduction(engine, sizes: Sizes, memory, references, log) -> tuple[list, dict]:
    """One warm-up introduction, then `sizes.concepts_introduced` timed ones: (the concepts, their summary)."""
    stop_ids = engine.backend.stop_token_ids
    log(f"introducing 1 warm-up + {sizes.concepts_introduced} concepts")
    introduced, records = [], []
    with forced_generation(engine.model, stop_ids, []):
        engine.introduce("warm-up", photo(999, sizes.reference_size))
    for i in range(sizes.concepts_introduced):
        generated: list[int] = []
        calls: list[dict] = []
        memory.reset()
        _sync(engine.device)
        started = time.perf_counter()
        with forced_generation(engine.model, stop_ids, generated, calls):
            concept = engine.introduce(f"concept {i + 1}", references[i])
        _sync(engine.device)
        total = time.perf_counter() - started
        stages = dict(concept.views[0].timings_s)
        records.append(
            {
                "total_s": total,
                "peak_mem_gib": memory.peak_gib(),
                "stages": stages,
                "generated": generated,
                "k": concept.num_tokens,
                "decode_ms": token_times(calls[0], started)[1],
            }
        )  # the description's generate
        introduced.append(concept)
    stage_names = list(records[0]["stages"])
    introduce = {
        "concepts_measured": len(records),
        "warmup": 1,
        "reference_size": list(sizes.reference_size),
        "reference_visual_tokens": int(np.prod(introduced[0].views[0].grid)),
        "stages_s": {name: _median([r["stages"].get(name, 0.0) for r in records]) for name in stage_names},
        "other_s": _median([r["total_s"] - sum(r["stages"].values()) for r in records]),
        "total_s": _median([r["total_s"] for r in records]),
        "total_runs_s": [round(r["total_s"], 4) for r in records],
        "description_tokens": _median([r["generated"][0] for r in records if r["generated"]]),
        "size_tokens": _median([r["generated"][1] for r in records if len(r["generated"]) > 1]),
        "memory_tokens": _median([r["k"] for r in records]),
        "description_decode_ms_per_token": _median([r["decode_ms"] for r in records]),
        "peak_mem_gib": max(r["peak_mem_gib"] for r in records),
    }
    log(
        f"introduction: {introduce['total_s']:.3f} s per concept (median), stages "
        + ", ".join(f"{k} {v:.3f}" for k, v in introduce["stages_s"].items())
    )
    return introduced, introduce


def _padded_concepts(introduced: list, count: int) -> list:
    """Up to `count` concepts: the introduced ones, then copies under new names (the memories' values do not
    change the cost of a question, only their number of rows does)."""
    concepts = list(introduced)
    for i in range(len(concepts), count):
        source = introduced[i % len(introduced)]
        concepts.append(replace(source, name=f"concept {i + 1}"))
    return concepts


def _measure_storage(concepts: list, count: int) -> dict:
    from ego import save_concepts

    with tempfile.TemporaryDirectory(prefix="ego-bench-") as folder:
        one = save_concepts(Path(folder) / "one.safetensors", concepts[:1]).stat().st_size
        many = save_concepts(Path(folder) / "many.safetensors", concepts[:count]).stat().st_size
    return {
        "concept_nbytes": _median([c.nbytes for c in concepts[:count]]),
        "memory_tokens_per_concept": _median([c.num_tokens for c in concepts[:count]]),
        "memory_dtype": str(concepts[0].embeddings.dtype).replace("torch.", ""),
        "file_bytes_1_concept": one,
        f"file_bytes_{count}_concepts": many,
        "file_bytes_per_concept": many / count,
        "file_mb_per_concept": many / count / 1e6,
    }


def _question_plan(engine, sizes: Sizes, concepts, references, query, frames) -> list[tuple]:
    """(name, medium, method, concepts, call) of every question scenario; a call returns (context tokens,
    memory tokens)."""

    def ego(n, *, video=False):
        def call():
            answer = engine.answer(
                VIDEO_QUESTION if video else QUESTION,
                concepts[:n],
                image=None if video else query,
                video=frames if video else None,
                max_new_tokens=sizes.new_tokens,
            )
            return answer.context_tokens, answer.memory_tokens

        return call

    def refs(n):
        return lambda: references_in_context(
            engine, QUESTION, [(c.name, references[i]) for i, c in enumerate(concepts[:n])], query, sizes.new_tokens
        )

    plan = [("plain", "image", "plain", 0, ego(0))]
    plan += [(f"ego_{n}", "image", "ego", n, ego(n)) for n in COUNTS]
    plan += [(f"refs_{n}", "image", "references", n, refs(n)) for n in COUNTS]
    plan += [
        ("video_plain", "video", "plain", 0, ego(0, video=True)),
        ("video_ego_5", "video", "ego", 5, ego(5, video=True)),
    ]
    return plan


def _run_plan(engine, sizes: Sizes, memory, plan: list[tuple], log) -> dict[str, dict]:
    """One warm-up call per scenario, then the repeats round-robin over the scenarios (alternating the
    order), so that a machine whose load drifts during the run shifts every scenario alike."""
    device, stop_ids = engine.device, engine.backend.stop_token_ids
    runs = {
        name: {"latencies": [], "peaks": [], "generated": [], "tokens": None, "ttft": [], "decode_ms": []}
        for name, *_ in plan
    }
    for name, *_, call in plan:
        started = time.perf_counter()
        with forced_generation(engine.model, stop_ids, []):
            runs[name]["tokens"] = call()
        _sync(device)
        # Logged as it goes: if the run is stopped by a time limit, the log still holds rough numbers.
        log(f"warm-up {name:12s} {runs[name]['tokens'][0]:6d} context tokens  {time.perf_counter() - started:.3f} s")
    for repeat in range(sizes.repeats):
        for name, *_, call in plan if repeat % 2 == 0 else plan[::-1]:
            memory.reset()
            _sync(device)
            started, calls = time.perf_counter(), []
            with forced_generation(engine.model, stop_ids, runs[name]["generated"], calls):
                tokens = call()
            _sync(device)
            runs[name]["latencies"].append(time.perf_counter() - started)
            ttft, decode_ms = token_times(calls[-1], started)  # the answer's generate
            runs[name]["ttft"].append(ttft)
            runs[name]["decode_ms"].append(decode_ms)
            runs[name]["peaks"].append(memory.peak_gib())
            if tokens != runs[name]["tokens"]:
                raise RuntimeError(f"{name}: the context changed between calls ({runs[name]['tokens']} -> {tokens})")
        log(f"repeat {repeat + 1}/{sizes.repeats} done")
    return runs


def token_times(call: dict, started: float) -> tuple[float, float]:
    """(time to first token: from `started`, the start of the whole question, to the first generated token, s;
    decode time per token: the tokens after the first, ms per token) of one timed generate call."""
    ttft = call["first_s"] - started
    # From the first token to the last one's arrival: not the hand-back after it (a conversation's cache copy).
    last = call.get("last_s") or call["end_s"]
    decode_ms = (last - call["first_s"]) / max(1, call["new_tokens"] - 1) * 1000
    return ttft, decode_ms


def _measure_conversation(engine, sizes: Sizes, memory, concepts, query, log) -> dict:
    """A conversation about the query photo knowing `concepts` (`Ego.chat`): the first question, then a short
    follow-up on the conversation's cache. One warm-up conversation, then --repeats measured ones."""
    device, stop_ids = engine.device, engine.backend.stop_token_ids
    turns = {"first": [], "follow_up": []}
    for repeat in range(sizes.repeats + 1):
        chat = engine.chat(concepts, image=query)
        for name, question in (("first", QUESTION), ("follow_up", FOLLOW_UP)):
            memory.reset()
            _sync(device)
            calls, generated = [], []
            started = time.perf_counter()
            with forced_generation(engine.model, stop_ids, generated, calls):
                answer = chat.ask(question, max_new_tokens=sizes.new_tokens)
            _sync(device)
            latency = time.perf_counter() - started
            ttft, decode_ms = token_times(calls[-1], started)
            if repeat:
                turns[name].append(
                    {
                        "latency_s": latency,
                        "ttft_s": ttft,
                        "decode_ms": decode_ms,
                        "prefill_tokens": answer.prefill_tokens,
                        "context_tokens": answer.context_tokens,
                        "new_tokens": generated[0],
                        "peak_mem_gib": memory.peak_gib(),
                    }
                )
    document = {"concepts": len(concepts), "question": QUESTION, "follow_up_question": FOLLOW_UP}
    for name, records in turns.items():
        document[name] = {
            "prefill_tokens": records[0]["prefill_tokens"],
            "context_tokens": records[0]["context_tokens"],
            "new_tokens": records[0]["new_tokens"],
            "ttft_s": _median([r["ttft_s"] for r in records]),
            "decode_ms_per_token": _median([r["decode_ms"] for r in records]),
            "latency_s": _median([r["latency_s"] for r in records]),
            "latency_runs_s": [round(r["latency_s"], 4) for r in records],
            "peak_mem_gib": max(r["peak_mem_gib"] for r in records),
        }
        entry = document[name]
        log(
            f"conversation {name:9s} {entry['prefill_tokens']:6d} prefill of {entry['context_tokens']:6d} context "
            f"tokens  first token {entry['ttft_s']:.3f} s  {entry['decode_ms_per_token']:.2f} ms/token  "
            f"latency {entry['latency_s']:.3f} s"
        )
    return document


def _scenarios(plan: list[tuple], runs: dict[str, dict], log) -> dict[str, dict]:
    """Each scenario's medians, and its ratios to the plain question on the same medium."""
    scenarios = {}
    for name, medium, method, n, _ in plan:
        record = runs[name]
        context_tokens, memory_tokens = record["tokens"]
        scenarios[name] = {
            "name": name,
            "medium": medium,
            "method": method,
            "concepts": n,
            "context_tokens": int(context_tokens),
            "memory_tokens": int(memory_tokens),
            "new_tokens": _median(record["generated"]),
            "latency_s": _median(record["latencies"]),
            "latency_runs_s": [round(v, 4) for v in record["latencies"]],
            "peak_mem_gib": max(record["peaks"]),
            "ttft_s": _median(record["ttft"]),
            "decode_ms_per_token": _median(record["decode_ms"]),
        }
        log(
            f"{name:12s} {context_tokens:6d} context tokens  {scenarios[name]['latency_s']:.3f} s  "
            f"first token {scenarios[name]['ttft_s']:.3f} s  {scenarios[name]['decode_ms_per_token']:.2f} ms/token  "
            f"peak {scenarios[name]['peak_mem_gib']:.2f} GiB"
        )
    for entry in scenarios.values():
        plain = scenarios["video_plain" if entry["medium"] == "video" else "plain"]
        entry["plain"] = plain["name"]
        entry["ratio_to_plain"] = entry["latency_s"] / plain["latency_s"]
        # Noise from a busy host only ever adds time, so the fastest calls are a second, steadier estimate.
        entry["fastest_s"] = min(entry["latency_runs_s"])
        entry["fastest_ratio_to_plain"] = entry["fastest_s"] / min(plain["latency_runs_s"])
        entry["context_ratio_to_plain"] = entry["context_tokens"] / plain["context_tokens"]
    return scenarios


def measure_concurrency(engine, sizes: Sizes, log=lambda message: None, on_scenario=None) -> dict[str, dict]:
    """Visitors who ask at the same moment (`VISITORS`), each with the memories of CONCURRENT_CONCEPTS concepts (one
    introduced, under several names: the rows' values do not change the cost) and a photo of their own, through the
    Space's answer scheduler (`space.scheduler`): batched (up to `answer_batch_max_size`, within its window), and
    one at a time (a scheduler with batches of 1: the n-th visitor waits for n - 1 answers first). Per visitor,
    latency = from asking to the whole answer; throughput = answers / (last answer - first question).
    `throughput_ratio` is the batched throughput over the one-at-a-time throughput of the same visitors.
    on_scenario(scenarios so far) after each scenario."""
    from space.scheduler import AnswerScheduler
    from space.settings import DEFAULT_SPACE_SETTINGS

    space = DEFAULT_SPACE_SETTINGS  # the Space's batching, as it is served
    batched = AnswerScheduler(
        space.answer_batch_window_s, space.answer_batch_max_size, space.answer_batch_preparing_wait_s
    )
    serial = AnswerScheduler(0.0, 1)
    try:
        stop_ids, device, memory = engine.backend.stop_token_ids, engine.device, Memory(engine.device)
        queries = [photo(2000 + i, sizes.query_size) for i in range(max(VISITORS))]
        introduced = engine.introduce("concept 1", photo(0, sizes.reference_size), keywords="object", area_pct=20)
        concepts = _padded_concepts([introduced], CONCURRENT_CONCEPTS)
        scenarios = {}
        for count in VISITORS:
            records = {"batched": [], "serial": []}
            peaks = []
            for repeat in range(sizes.repeats + 1):  # the first round is a warm-up
                for mode, scheduler in (("batched", batched), ("serial", serial)):
                    memory.reset()
                    with forced_generation(engine.model, stop_ids, []):
                        asked, answered, contexts = _visit_together(engine, scheduler, queries[:count], concepts, sizes)
                    _sync(device)
                    if repeat:
                        records[mode].append((asked, answered))
                        peaks.append(memory.peak_gib())
            scenarios[f"concurrent_{count}"] = _concurrency_entry(
                f"concurrent_{count}", "first", count, records, contexts, max(peaks), sizes
            )
            log(_concurrency_line(scenarios[f"concurrent_{count}"]))
            if on_scenario is not None:
                on_scenario(dict(scenarios))
        scenarios.update(measure_follow_ups(engine, batched, serial, queries, concepts, sizes, memory))
        log(_concurrency_line(scenarios[f"follow_ups_{FOLLOW_UP_VISITORS}"]))
        if on_scenario is not None:
            on_scenario(dict(scenarios))
        return scenarios
    finally:  # their worker threads end here, not with the process (idle by now: they end at once)
        batched.close(wait_s=10)
        serial.close(wait_s=10)


def measure_follow_ups(engine, batched, serial, queries, concepts, sizes: Sizes, memory) -> dict[str, dict]:
    """FOLLOW_UP_VISITORS visitors follow up their conversations at the same moment, batched and one at a time.
    Each round opens the conversations the way the Space does (the first questions answered in one batch, each
    conversation adopting its answer and the context the batch computed for it, `AnswerRequest.keep_context`),
    untimed; the timed follow-up is then each conversation's first, which computes only its own tokens."""
    from ego.batching import AnswerRequest

    stop_ids = engine.backend.stop_token_ids
    queries = queries[:FOLLOW_UP_VISITORS]
    records, peaks = {"batched": [], "serial": []}, []
    for repeat in range(sizes.repeats + 1):  # the first round is a warm-up
        for mode, scheduler in (("batched", batched), ("serial", serial)):
            with forced_generation(engine.model, stop_ids, []):
                chats = [engine.chat(concepts, image=query) for query in queries]
                requests = [
                    AnswerRequest(QUESTION, chat.concepts, chat.picture, None, sizes.new_tokens, keep_context=True)
                    for chat in chats
                ]
                for chat, answer in zip(chats, engine.answer_batch(requests)):
                    if isinstance(answer, Exception):
                        raise answer
                    chat.adopt(QUESTION, answer)
                _sync(engine.device)
                memory.reset()
                asked, answered, contexts = _together(
                    [
                        functools.partial(
                            scheduler.stream_follow_up, engine, chat, FOLLOW_UP, max_new_tokens=sizes.new_tokens
                        )
                        for chat in chats
                    ]
                )
            _sync(engine.device)
            if repeat:
                records[mode].append((asked, answered))
                peaks.append(memory.peak_gib())
    name = f"follow_ups_{FOLLOW_UP_VISITORS}"
    return {name: _concurrency_entry(name, "follow-up", len(queries), records, contexts, max(peaks), sizes)}


def _concurrency_line(entry: dict) -> str:
    return (
        f"{entry['name']:14s} {entry['visitors']} visitors: {entry['throughput_per_s']:.2f} answers/s "
        f"({entry['throughput_ratio']:.2f}x one at a time), latency p50 {entry['latency_p50_s']:.3f} s, "
        f"p95 {entry['latency_p95_s']:.3f} s"
    )


def _visit_together(engine, scheduler, queries, concepts, sizes: Sizes):
    """Each visitor asks from a thread of their own, all at once: (asked at, answered at, context tokens) per
    visitor, in seconds of `time.perf_counter`."""
    return _together(
        [
            functools.partial(
                scheduler.stream, engine, QUESTION, concepts, image=query, max_new_tokens=sizes.new_tokens
            )
            for query in queries
        ]
    )


def _together(streams):
    """Each visitor's answer stream (a callable that starts it) read from a thread of its own, all started at once:
    (asked at, answered at, context tokens) per visitor, in seconds of `time.perf_counter`."""
    import threading

    count = len(streams)
    asked, answered, contexts, failures = [0.0] * count, [0.0] * count, [0] * count, []
    start = threading.Barrier(count)

    def visitor(index):
        start.wait()
        asked[index] = time.perf_counter()
        try:
            *_, answer = streams[index]()
        except Exception as error:  # noqa: BLE001 -- raised below, in the benchmark's thread
            failures.append(error)
            return
        answered[index], contexts[index] = time.perf_counter(), answer.context_tokens

    threads = [threading.Thread(target=visitor, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return asked, answered, contexts


def _concurrency_entry(
    name: str, turn: str, count: int, records: dict, contexts: list[int], peak_gib: float, sizes: Sizes
) -> dict:
    def latencies(mode):
        return [done - start for asked, answered in records[mode] for start, done in zip(asked, answered)]

    def throughput(mode):
        return _median([len(asked) / (max(answered) - min(asked)) for asked, answered in records[mode]])

    batched, serial = sorted(latencies("batched")), sorted(latencies("serial"))
    return {
        "name": name,
        "turn": turn,
        "medium": "image",
        "method": "ego",
        "concepts": CONCURRENT_CONCEPTS,
        "visitors": count,
        "context_tokens": int(_median(contexts)),
        "new_tokens": sizes.new_tokens,
        "throughput_per_s": throughput("batched"),
        "one_at_a_time_throughput_per_s": throughput("serial"),
        "throughput_ratio": throughput("batched") / throughput("serial"),
        "latency_p50_s": _percentile(batched, 50),
        "latency_p95_s": _percentile(batched, 95),
        "one_at_a_time_latency_p50_s": _percentile(serial, 50),
        "one_at_a_time_latency_p95_s": _percentile(serial, 95),
        "latency_runs_s": [round(v, 4) for v in batched],
        "peak_mem_gib": peak_gib,
    }


def _percentile(values, share: float) -> float:
    """The `share`-th percentile, linear between the closest ranks (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=float), share))


def _context_growth(scenarios: dict[str, dict]) -> dict:
    """Context tokens added per concept memory, and per reference photo, between the fewest and the most."""
    ego_context = {n: scenarios[f"ego_{n}"]["context_tokens"] for n in COUNTS}
    return {
        "context_tokens_per_concept": (ego_context[max(COUNTS)] - ego_context[min(COUNTS)])
        / (max(COUNTS) - min(COUNTS)),
        "reference_tokens_per_photo": (
            scenarios[f"refs_{max(COUNTS)}"]["context_tokens"] - scenarios[f"refs_{min(COUNTS)}"]["context_tokens"]
        )
        / (max(COUNTS) - min(COUNTS)),
    }


def _meta(engine, sizes: Sizes, memory, weights_gib: float, query, frames) -> dict:
    from ego.media import load_video

    return {
        "sizes": asdict(sizes),
        "memory_measure": memory.kind,
        "weights_gib": weights_gib,
        "settings": {
            k: getattr(engine.settings, k)
            for k in (
                "k_cap_tokens",
                "reference_max_pixels",
                "query_image_max_pixels",
                "video_num_frames",
                "video_frame_max_pixels",
                "description_max_new_tokens",
                "size_max_new_tokens",
                "max_concepts_in_context",
                "static_cache_max_tokens",
            )
        },
        "question": QUESTION,
        "video_question": VIDEO_QUESTION,
        "query_visual_tokens": visual_tokens(engine, image=query),
        "video_visual_tokens": visual_tokens(engine, video=load_video(frames, engine.settings)),
        "forced_lengths": "every generation runs to its cap: min_new_tokens = max_new_tokens, stop tokens suppressed",
        "note": "random weights: the texts are meaningless, the costs are those of the architecture",
    }


def visual_tokens(engine, *, image=None, video=None) -> int:
    """Visual tokens the processor gives a query image or video (no model call)."""
    block = {"type": "image"} if image is not None else {"type": "video"}
    encoded = engine.backend.encode(
        engine.backend.chat_text([block]),
        image=image,
        video=video,
        image_max_pixels=engine.settings.query_image_max_pixels,
        video_frame_max_pixels=engine.settings.video_frame_max_pixels,
    )
    return int(encoded.visual_columns.numel())


def references_in_context(engine, question: str, named_images, query, new_tokens: int):
    """The question with full reference photos in the context instead of memories (what a user would do
    without Ego): the same words as Ego's memory block, each name followed by its photo, then the query
    photo and the question; processor + generate + decode, like `Ego.answer`. Returns (context tokens, 0)."""
    from ego import prompts

    blocks = [{"type": "text", "text": prompts.MEMORY_INTRO}]
    for name, _ in named_images:
        blocks += [{"type": "text", "text": f"{name}: "}, {"type": "image"}, {"type": "text", "text": "\n"}]
    blocks += [{"type": "text", "text": prompts.MEMORY_OUTRO}, {"type": "image"}, {"type": "text", "text": question}]
    processor = engine.processor
    image_processor = processor.image_processor
    patch_px = image_processor.patch_size * image_processor.merge_size
    inputs = processor(
        text=[engine.backend.chat_text(blocks)],
        images=[image for _, image in named_images] + [query],
        images_kwargs={
            "size": {"shortest_edge": patch_px**2 * 4, "longest_edge": engine.settings.query_image_max_pixels}
        },
        return_tensors="pt",
    )
    inputs = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in dict(inputs).items()}
    length = inputs["input_ids"].shape[1]
    decoding = getattr(engine, "decoding", {"do_sample": False})  # the engine's own greedy decoding settings
    with torch.no_grad():
        out = engine.model.generate(**inputs, max_new_tokens=new_tokens, **decoding)
    engine.backend.tokenizer.decode(out[0, length:], skip_special_tokens=True)
    return length, 0


# ----------------------------------------------------------------------------------------------
# Profile
# ----------------------------------------------------------------------------------------------
PROFILE_TOP = 8
"""Operations listed per profiled call, by device time and by host time."""


def profile(engine, sizes: Sizes, log=lambda message: None, batch: int = 0) -> dict:
    """One profiled introduction, plain question and 20-concept question (after warm-ups elsewhere); with `batch`,
    also `batch` visitors' first questions answered together (CONCURRENT_CONCEPTS concepts and a photo of their own
    each, staged beforehand as the Space stages them), after the concurrency scenarios have run such batches: timed
    once without the profiler to its first and its last token (`first_token_s`, `whole_s`: how a batch's time
    splits between each question's own work and the shared decoding), then profiled.

    For each: the wall time under the profiler (its own overhead included, so above the medians), the time
    the GPU was busy (union of the intervals of its kernels, copies and sets: overlapping work counted
    once), the share of the wall time it was idle, the number of device operations launched, and the
    operations with the most device time and the most host (self CPU) time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    engine = bench_engine(engine, sizes)
    device = engine.device
    stop_ids = engine.backend.stop_token_ids
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    query = photo(1000, sizes.query_size)
    made = {}

    def introduce():
        made["concept"] = engine.introduce("profiled", photo(0, sizes.reference_size))

    def ask(n):
        def call():
            concepts = [replace(made["concept"], name=f"concept {i + 1}") for i in range(n)]
            engine.answer(QUESTION, concepts, image=query, max_new_tokens=sizes.new_tokens)

        return call

    document = {
        "activities": [str(a).rsplit(".", 1)[-1] for a in activities],
        "note": "one call each, under torch.profiler (its overhead inflates the wall time)",
    }

    def profiled(name, call) -> dict:
        with forced_generation(engine.model, stop_ids, []):
            _sync(device)
            started = time.perf_counter()
            with torch_profile(activities=activities) as profiler:
                call()
                _sync(device)
            wall = time.perf_counter() - started
        document[name] = summarize_profile(profiler, wall)
        return document[name]

    def logged(name) -> None:
        log(f"profile {name}: " + _profile_line(document[name]))
        for line in profile_lines(name, document[name]):
            log("  " + line)

    for name, call in (("introduce", introduce), ("plain", ask(0)), (f"ego_{max(COUNTS)}", ask(max(COUNTS)))):
        profiled(name, call)
        logged(name)
    if batch:
        from ego.batching import AnswerRequest

        concepts = _padded_concepts([made["concept"]], CONCURRENT_CONCEPTS)
        queries = [photo(2000 + i, sizes.query_size) for i in range(batch)]
        # Staged here, outside the timed and profiled calls, as the Space stages each in its visitor's thread.
        requests = [engine.stage(AnswerRequest(QUESTION, concepts, q, None, sizes.new_tokens)) for q in queries]

        def together():
            first = []
            _sync(device)
            started = time.perf_counter()
            engine.answer_batch(requests, on_text=lambda index, answer: first or first.append(time.perf_counter()))
            _sync(device)
            return first[0] - started if first else None, time.perf_counter() - started

        with forced_generation(engine.model, stop_ids, []):
            first_s, whole_s = together()
        log(f"batch of {batch}: first token after {first_s:.3f} s, whole batch {whole_s:.3f} s")
        name = f"batch_{batch}"
        profiled(name, together).update(first_token_s=first_s, whole_s=whole_s, visitors=batch)
        logged(name)
    return document


def summarize_profile(profiler, wall_s: float) -> dict:
    """Device busy time, launches and the top operations of one torch.profiler run."""
    from torch.autograd import DeviceType

    events = list(profiler.events())
    on_device = [e for e in events if e.device_type != DeviceType.CPU]
    intervals = sorted((e.time_range.start, e.time_range.end) for e in on_device)
    busy_us, end = 0.0, float("-inf")
    for start, stop in intervals:  # union of intervals: concurrent kernels are counted once
        if stop > end:
            busy_us += stop - max(start, end)
            end = stop
    by_kernel: dict[str, list] = {}
    for e in on_device:
        entry = by_kernel.setdefault(e.name, [0.0, 0])
        entry[0] += e.time_range.elapsed_us()
        entry[1] += 1
    host = [e for e in profiler.key_averages() if e.device_type == DeviceType.CPU]
    host.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    busy_s = busy_us / 1e6 if on_device else None
    return {
        "wall_s": wall_s,
        "device_busy_s": busy_s,
        "device_idle_share": None if busy_s is None else max(0.0, 1 - busy_s / wall_s),
        "device_operations": len(on_device),
        # Host time inside torch operations, all threads; the rest of the wall time on the host is Python
        # (generate's loop, the engine) and waiting.
        "host_ops_s": sum(e.self_cpu_time_total for e in host) / 1e6,
        "top_device_ops": [
            {"name": name[:120], "s": us / 1e6, "count": count}
            for name, (us, count) in sorted(by_kernel.items(), key=lambda item: item[1][0], reverse=True)[:PROFILE_TOP]
        ],
        "top_host_ops": [
            {"name": e.key[:120], "self_s": e.self_cpu_time_total / 1e6, "count": e.count} for e in host[:PROFILE_TOP]
        ],
    }


def _profile_line(entry: dict) -> str:
    host = f"host time in torch operations {entry['host_ops_s']:.3f} s"
    if entry["device_busy_s"] is None:
        return f"wall {entry['wall_s']:.3f} s, {host} (no device activity recorded)"
    return (
        f"wall {entry['wall_s']:.3f} s, device busy {entry['device_busy_s']:.3f} s "
        f"(idle {entry['device_idle_share']:.0%}), {entry['device_operations']} device operations, {host}"
    )


def profile_lines(name: str, entry: dict) -> list[str]:
    lines = [f"{name}: top device operations"] if entry["top_device_ops"] else []
    lines += [f"  {op['s']:8.4f} s  x{op['count']:<6d} {op['name']}" for op in entry["top_device_ops"]]
    lines.append(f"{name}: top host operations (self CPU time)")
    lines += [f"  {op['self_s']:8.4f} s  x{op['count']:<6d} {op['name']}" for op in entry["top_host_ops"]]
    return lines


# ----------------------------------------------------------------------------------------------
# Targets and outputs
# ----------------------------------------------------------------------------------------------
def targets(results: dict) -> dict:
    meta, scenarios = results["meta"], results["scenarios"]
    architecture = meta.get("architecture") or {}
    default_arch = architecture.get("preset") == "qwen2.5-vl-7b" and not architecture.get("scaled_down")
    on_gpu = default_arch and meta.get("device_type") == "cuda"
    # Either 4-bit way (bitsandbytes NF4, torchao int4) is the mission's 4-bit model.
    gpu_4bit = on_gpu and meta.get("quantization_effective") in ("4bit", "int4")
    compiled_4bit = gpu_4bit and meta.get("decoding") == "compiled"
    compile_meta = meta.get("compile") or {}
    # The Space compiles the batched step at start too (it batches its visitors): a warm-up without it
    # (--no-concurrency) compiles one graph of the two, which the warm-up target does not describe.
    batched_warm_up = bool(compile_meta.get("warm_up_batched"))
    # The concurrency scenarios are left out by --no-concurrency: their targets are then unmeasured.
    eight, lone = scenarios.get("concurrent_8"), scenarios.get("concurrent_1")
    measured = {
        "decode_ms_per_token": scenarios["plain"]["decode_ms_per_token"],
        "introduce_s_per_concept": results["introduce"]["total_s"],
        "plain_answer_s": scenarios["plain"]["latency_s"],
        "latency_ratio_5_concepts": scenarios["ego_5"]["ratio_to_plain"],
        "latency_ratio_20_concepts": scenarios["ego_20"]["ratio_to_plain"],
        "compile_warm_up_s": compile_meta.get("warm_up_s") if batched_warm_up else None,
        "context_tokens_per_concept": results["storage"]["context_tokens_per_concept"],
        "stored_mb_per_concept": results["storage"]["file_mb_per_concept"],
        "peak_gib_20_concepts": scenarios["ego_20"]["peak_mem_gib"],
        "throughput_ratio_8_visitors": eight["throughput_ratio"] if eight else None,
        "latency_p95_8_visitors_over_lone": eight["latency_p95_s"] / lone["latency_p50_s"] if eight and lone else None,
    }
    applies = {
        "decode_ms_per_token": compiled_4bit,
        "introduce_s_per_concept": compiled_4bit,
        "plain_answer_s": compiled_4bit,
        "latency_ratio_5_concepts": on_gpu,
        "latency_ratio_20_concepts": on_gpu,
        "compile_warm_up_s": compiled_4bit and batched_warm_up,
        "context_tokens_per_concept": True,
        "stored_mb_per_concept": default_arch,
        "peak_gib_20_concepts": gpu_4bit and scenarios["ego_20"]["context_tokens"] > 0,
        "throughput_ratio_8_visitors": gpu_4bit and eight is not None,
        "latency_p95_8_visitors_over_lone": gpu_4bit and eight is not None and lone is not None,
    }
    not_measured = {  # why a target's value is missing from this run
        "compile_warm_up_s": (
            "nothing was compiled (eager decoding)"
            if compile_meta.get("warm_up_s") is None
            else f"the warm-up compiled one row's decode step only ({compile_meta['warm_up_s']:.1f} s, "
            "--no-concurrency); the target counts the batched step too, as the Space compiles both"
        ),
        "throughput_ratio_8_visitors": "no concurrency scenarios in this run (--no-concurrency)",
        "latency_p95_8_visitors_over_lone": "no concurrency scenarios in this run (--no-concurrency)",
    }
    document = {}
    for name, (target, scope) in TARGETS.items():
        value, floor = measured[name], name in LOWER_BOUNDS
        document[name] = {
            "target": target,
            "comparison": ">=" if floor else "<=",
            "measured": value,
            # None: not measured by this run, which says neither met nor missed.
            "met": None if value is None else bool(value >= target if floor else value <= target),
            "applies_to": scope,
            "this_run_is_the_target_setting": bool(applies[name]),
        }
        if value is None:
            document[name]["not_measured_because"] = not_measured.get(name, "this run did not measure it")
    return document


def write_outputs(results: dict, out: Path) -> None:
    write_whole(out / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    write_whole(out / "results.md", markdown(results))
    try:
        picture = _part(out / "latency.png")
        plot(results, picture)
        picture.replace(out / "latency.png")
    except ImportError:  # matplotlib is a dev requirement; the numbers are written regardless
        _log("matplotlib is not installed: latency.png not written (pip install -r requirements-dev.txt)")


def write_whole(path: Path, text: str) -> None:
    """`text` written under another name in the same folder, then renamed to `path`: whoever reads the folder while
    the run goes on (`bench/gpu_run.sh` copies it every few seconds) finds the last whole file, never part of one."""
    part = _part(path)
    part.write_text(text)
    part.replace(path)


def _part(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (`bench/gpu_run.sh` packs no `*.part` file)."""
    return path.with_name(f".{path.name}.part")


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _compile_line(compile_meta: dict) -> str:
    if not compile_meta.get("backend"):
        return " (nothing compiled)"
    return (
        f" ({compile_meta['backend']}, mode {compile_meta['mode']}: compiled in {compile_meta['warm_up_s']:.1f} s, "
        f"{compile_meta['graphs_at_warm_up']} graphs and {compile_meta['recompiles_at_warm_up']} recompilations "
        f"at warm-up, {compile_meta['graphs_during_run']} graphs and {compile_meta['recompiles_during_run']} "
        f"recompilations during the scenarios{_steps_text(compile_meta)})"
    )


def _seconds_each(steps: dict) -> str:
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in steps.items())


def _steps_text(compile_meta: dict) -> str:
    """The warm-up's seconds per step, and what the concurrency scenarios compiled, where the run has them."""
    text = ""
    if compile_meta.get("warm_up_steps_s"):
        text += "; warm-up steps: " + _seconds_each(compile_meta["warm_up_steps_s"])
    if "graphs_during_concurrency" in compile_meta:
        text += f"; {compile_meta['graphs_during_concurrency']} graphs during the concurrency scenarios"
    return text


_LABELS = {"plain": "plain question, one image", "video_plain": "plain question, one video"}


def _label(entry) -> str:
    if entry["name"] in _LABELS:
        return _LABELS[entry["name"]]
    n, plural = entry["concepts"], "s" if entry["concepts"] != 1 else ""
    if entry["method"] == "ego":
        return f"{entry['medium']} + memories of {n} concept{plural} (Ego)"
    return f"{entry['medium']} + {n} full reference photo{plural}"


def markdown(results: dict) -> str:
    meta, intro, storage = results["meta"], results["introduce"], results["storage"]
    versions = meta.get("versions", {})
    lines = [
        f"# Ego benchmark: {meta.get('model')} ({meta.get('quantization_effective')}) on {meta.get('device')}",
        "",
        f"- date: {meta.get('date')}",
        f"- command: `{meta.get('command')}`",
        f"- model: {meta.get('model_kind')}; {meta.get('text_layers')} text layers, hidden size "
        f"{meta.get('hidden_size')}, {meta.get('dtype')} weights ({meta.get('weights_gib', 0):.2f} GiB)",
        f"- versions: torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
        f"bitsandbytes {versions.get('bitsandbytes')}, Python {versions.get('python')}",
        f"- each latency is the median of {meta['sizes']['repeats']} calls after one warm-up; every answer "
        f"generates exactly {meta['sizes']['new_tokens']} tokens (stop tokens suppressed: random weights)",
        f"- memory: {meta.get('memory_measure')}",
        f"- decoding: {meta.get('decoding')}" + _compile_line(meta.get("compile") or {}),
        "",
        "## Questions",
        "",
        "| scenario | context tokens | latency (s) | x plain | fastest call (s) | x plain, fastest | "
        "context x plain | first token (s) | decode (ms/token) | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in (e for e in results["scenarios"].values() if "visitors" not in e):
        lines.append(
            f"| {_label(entry)} | {entry['context_tokens']} | {entry['latency_s']:.3f} | "
            f"{entry['ratio_to_plain']:.2f} | {entry['fastest_s']:.3f} | "
            f"{entry['fastest_ratio_to_plain']:.2f} | "
            f"{entry['context_ratio_to_plain']:.2f} | {entry['ttft_s']:.3f} | "
            f"{entry['decode_ms_per_token']:.2f} | {entry['peak_mem_gib']:.2f} |"
        )
    lines += [
        "",
        f"Ratios are against the plain question on the same medium (medians, and the fastest of the "
        f"{meta['sizes']['repeats']} calls: a busy host only ever adds time). A concept adds "
        f"{storage['context_tokens_per_concept']:.1f} context tokens; a full reference photo adds "
        f"{storage['reference_tokens_per_photo']:.1f}.",
        "",
        *concurrency_lines(results["scenarios"]),
    ]
    conversation = results.get("conversation")  # (results written before conversations have none)
    if conversation:
        lines += [
            "## A conversation: a follow-up on the cached context",
            "",
            "| question | context tokens | computed (prefill) tokens | first token (s) | latency (s) "
            "| peak memory (GiB) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, label in (("first", "first question"), ("follow_up", "follow-up")):
            entry = conversation[name]
            lines.append(
                f"| {label} | {entry['context_tokens']} | {entry['prefill_tokens']} | "
                f"{entry['ttft_s']:.3f} | {entry['latency_s']:.3f} | {entry['peak_mem_gib']:.2f} |"
            )
        lines += [
            "",
            f"The query image with {conversation['concepts']} concepts, asked "
            f'"{conversation["question"]}", then "{conversation["follow_up_question"]}": the follow-up '
            f"computes only its own tokens on the conversation's cache (`Ego.chat`).",
            "",
        ]
    lines += [
        f"## Introduction of a concept (one {intro['reference_size'][0]}x{intro['reference_size'][1]} photo, "
        f"{intro['reference_visual_tokens']} visual tokens; median of {intro['concepts_measured']} after 1 warm-up)",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    for name, value in intro["stages_s"].items():
        lines.append(f"| {name.removesuffix('_s')} | {value:.4f} |")
    lines += [
        f"| other (checks, lock, concatenation) | {intro['other_s']:.4f} |",
        f"| **total** | **{intro['total_s']:.4f}** |",
        "",
        f"Generated: {intro['description_tokens']} description tokens, {intro['size_tokens']} size tokens; "
        f"{intro['memory_tokens']} memory tokens kept; the description decoded at "
        f"{intro['description_decode_ms_per_token']:.2f} ms per token after its first. Peak memory while introducing: "
        f"{intro['peak_mem_gib']:.2f} GiB.",
        "",
        "## Storage per concept",
        "",
        f"- in memory: {storage['concept_nbytes']:,.0f} bytes ({storage['memory_tokens_per_concept']:.0f} rows of "
        f"{meta.get('hidden_size')} {storage['memory_dtype']})",
        f"- in a concept file: {storage['file_bytes_per_concept']:,.0f} bytes per concept in a file of 20 "
        f"({storage['file_mb_per_concept']:.3f} MB); a file with one concept: "
        f"{storage['file_bytes_1_concept']:,} bytes",
        "",
    ]
    equal = results.get("decoding_equality")
    if equal:
        # A compiled-only run has no eager measurements, but checks its greedy tokens against eager's all the same.
        agreement = (
            "all equal" if equal["tokens_equal"] else f"first difference at token {equal['first_different_token']}"
        )
        lines += [
            "## Decoding: eager and compiled, the same model in one run"
            if "decoding_comparison" in results
            else "## Decoding: compiled, checked against eager's greedy tokens",
            "",
            f"Greedy tokens of a question about the query photo, compiled against eager: {equal['tokens']} compared, "
            f"{agreement}; largest logit difference over the first {equal['logits_compared']} "
            f"{equal['max_abs_logit_difference']:.2e} (logits up to {equal['max_abs_logit']:.1f}; tolerance "
            f"{equal['tolerance']}: {'within' if equal['within_tolerance'] else 'OUTSIDE'}).",
            "",
        ]
    if "decoding_comparison" in results:
        lines += [
            "| scenario | eager (s) | compiled (s) | speed-up | first token eager / compiled (s) "
            "| decode eager / compiled (ms/token) | decode speed-up |",
            "|---|---:|---:|---:|---|---|---:|",
        ]
        for name, row in results["decoding_comparison"].items():
            if name == "introduce":
                lines.append(
                    f"| introduction | {row['latency_s_eager']:.3f} | {row['latency_s_compiled']:.3f} | "
                    f"{row['speedup_latency']:.2f} | | | |"
                )
                continue
            lines.append(
                f"| {name} | {row['latency_s_eager']:.3f} | {row['latency_s_compiled']:.3f} | "
                f"{row['speedup_latency']:.2f} | {row['ttft_s_eager']:.3f} / {row['ttft_s_compiled']:.3f} | "
                f"{row['decode_ms_per_token_eager']:.2f} / {row['decode_ms_per_token_compiled']:.2f} | "
                f"{row['speedup_decode']:.2f} |"
            )
        runs = results.get("decoding_runs", {})
        lines += [""] + [
            f"- {mode} (latencies: medians of {doc['meta']['repeats']} per scenario):"
            + _compile_line(doc["meta"]["compile"])
            for mode, doc in runs.items()
        ]
        lines += [""]
    if "targets" in results:
        lines += [
            "## Targets",
            "",
            "| target | measured | met | this run is the target's setting |",
            "|---|---:|---|---|",
        ]
        for name, entry in results["targets"].items():
            measured = "-" if entry["measured"] is None else f"{entry['measured']:.3f}"
            met = (
                f"not measured: {entry.get('not_measured_because', 'this run did not measure it')}"
                if entry["measured"] is None
                else ("yes" if entry["met"] else "no")
            )
            lines.append(
                f"| {name} {entry['comparison']} {entry['target']} ({entry['applies_to']}) | "
                f"{measured} | {met} | "
                f"{'yes' if entry['this_run_is_the_target_setting'] else 'no'} |"
            )
        lines.append("")
    if "profile" in results:
        lines += [
            "## Profile (one call each under torch.profiler)",
            "",
            "| call | wall (s) | device busy (s) | device idle | device operations | host time in torch ops (s) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        calls = {k: v for k, v in results["profile"].items() if isinstance(v, dict)}
        for name, entry in calls.items():
            busy = entry["device_busy_s"]
            lines.append(
                f"| {name} | {entry['wall_s']:.3f} | {'-' if busy is None else f'{busy:.3f}'} | "
                f"{'-' if busy is None else format(entry['device_idle_share'], '.0%')} | "
                f"{entry['device_operations']} | {entry['host_ops_s']:.3f} |"
            )
        lines += ["", "```"]
        for name, entry in calls.items():
            lines += profile_lines(name, entry)
        lines += ["```", ""]
    return "\n".join(lines)


def concurrency_lines(scenarios: dict) -> list[str]:
    """The concurrency table of results.md (empty for a results file without it)."""
    entries = [e for e in scenarios.values() if "visitors" in e]
    if not entries:
        return []
    lines = [
        f"## Visitors asking at the same moment ({CONCURRENT_CONCEPTS} concepts and a photo each)",
        "",
        "| question | visitors | answers/s batched | answers/s one at a time | ratio | latency p50 (s) "
        "| latency p95 (s) | one at a time p50 (s) | one at a time p95 (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        lines.append(
            f"| {e.get('turn', 'first')} | {e['visitors']} | {e['throughput_per_s']:.3f} | "
            f"{e['one_at_a_time_throughput_per_s']:.3f} | "
            f"{e['throughput_ratio']:.2f} | {e['latency_p50_s']:.3f} | {e['latency_p95_s']:.3f} | "
            f"{e['one_at_a_time_latency_p50_s']:.3f} | {e['one_at_a_time_latency_p95_s']:.3f} |"
        )
    return lines + [
        "",
        "Batched: questions that arrive together share one generation (the Space's scheduler, "
        "`answer_batch_max_size`, `answer_batch_window_s`); one at a time: each waits for the "
        "answers before it. First: each visitor's first question about a new photo; follow-up: each "
        "visitor's first follow-up in a conversation whose first answer was given in a batch, which "
        "handed each conversation its context (`AnswerRequest.keep_context`): only the follow-ups' own "
        "tokens are computed, in one batch with the decoding.",
        "",
    ]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios, meta = results["scenarios"], results["meta"]
    counts = [0, *COUNTS]
    series = {
        "Ego (concept memories)": [scenarios["plain"]] + [scenarios[f"ego_{n}"] for n in COUNTS],
        "reference photos in context": [scenarios["plain"]] + [scenarios[f"refs_{n}"] for n in COUNTS],
    }
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, entries in series.items():
        left.plot(counts, [e["latency_s"] for e in entries], marker="o", label=label)
        right.plot(counts, [e["context_tokens"] for e in entries], marker="o", label=label)
    left.set(xlabel="concepts in context", ylabel="latency per question (s)", xticks=counts, ylim=(0, None))
    right.set(xlabel="concepts in context", ylabel="context tokens", xticks=counts, ylim=(0, None))
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(
        f"{meta.get('model')} ({meta.get('quantization_effective')}), {meta.get('device')}, "
        f"{meta['sizes']['new_tokens']} new tokens",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")
    plt.close(figure)
