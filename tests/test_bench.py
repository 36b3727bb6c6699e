"""The benchmark harness (`python -m bench`) and the real-architecture builder (`ego.architectures`), on CPU.

No timing is asserted: these tests check that the harness runs end to end and writes every field, and
that the recorded architectures have the published dimensions and load into the engine.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import photo

from ego.architectures import (
    ARCHITECTURES,
    MARKER,
    architecture,
    build_skeleton,
    cached_random_architecture,
    overrides,
    random_architecture,
)

SCENARIOS = {"plain", "ego_1", "ego_5", "ego_20", "refs_1", "refs_5", "refs_20", "video_plain", "video_ego_5"}
CONCURRENT = {"concurrent_1", "concurrent_4", "concurrent_8"}
CONCURRENT_FIELDS = {"visitors", "throughput_per_s", "latency_p50_s", "latency_p95_s", "throughput_ratio",
                     "one_at_a_time_throughput_per_s", "one_at_a_time_latency_p50_s", "one_at_a_time_latency_p95_s",
                     "latency_runs_s", "context_tokens", "peak_mem_gib"}
SCENARIO_FIELDS = {"name", "medium", "method", "concepts", "context_tokens", "memory_tokens", "new_tokens",
                   "latency_s", "latency_runs_s", "ratio_to_plain", "context_ratio_to_plain", "peak_mem_gib", "plain",
                   "fastest_s", "fastest_ratio_to_plain", "ttft_s", "decode_ms_per_token"}
STAGES = {"encode_s", "description_s", "size_s", "scores_s", "selection_s"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from bench import main

    out = tmp_path_factory.mktemp("bench-out")
    # Both decodings side by side, as on a GPU; "aot_eager" compiles the decode step in seconds on a CPU.
    assert main(["--model", "tiny-qwen2.5-vl", "--quick", "--device", "cpu", "--profile", "--decoding", "both",
                 "--compile-backend", "aot_eager", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_writes_results_table_and_plot(quick):
    out, results = quick
    assert set(results) >= {"meta", "introduce", "storage", "scenarios", "targets"}
    table = (out / "results.md").read_text()
    assert "| scenario | context tokens | latency (s) |" in table and "## Introduction" in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_covers_introduction_and_questions(quick):
    out, results = quick
    profile = results["profile"]
    calls = {"introduce", "plain", "ego_20"}
    assert calls <= set(profile)
    for name in calls:
        entry = profile[name]
        # On a CPU nothing runs on a device; the host operations are the real ones of that call.
        assert entry["device_busy_s"] is None and entry["device_operations"] == 0
        assert 0 < entry["host_ops_s"] < entry["wall_s"]
        names = [op["name"] for op in entry["top_host_ops"]]
        assert len(names) == len(set(names)) > 0 and all(op["count"] >= 1 for op in entry["top_host_ops"])
        assert [op["self_s"] for op in entry["top_host_ops"]] == sorted(
            (op["self_s"] for op in entry["top_host_ops"]), reverse=True)
    table = (out / "results.md").read_text()
    assert "## Profile" in table and "ego_20: top host operations" in table


def test_every_scenario_has_every_field(quick):
    _, results = quick
    scenarios = {name: entry for name, entry in results["scenarios"].items() if name not in CONCURRENT}
    assert set(scenarios) == SCENARIOS
    forced = results["meta"]["sizes"]["new_tokens"]
    for name, entry in scenarios.items():
        assert set(entry) >= SCENARIO_FIELDS, name
        assert entry["name"] == name
        assert isinstance(entry["context_tokens"], int) and entry["context_tokens"] > 0
        for key in ("latency_s", "ratio_to_plain", "context_ratio_to_plain", "peak_mem_gib"):
            assert isinstance(entry[key], float) and entry[key] > 0, (name, key)
        assert len(entry["latency_runs_s"]) == results["meta"]["sizes"]["repeats"]
        assert entry["fastest_s"] == min(entry["latency_runs_s"]) <= entry["latency_s"] + 1e-4
        fastest_plain = min(scenarios[entry["plain"]]["latency_runs_s"])
        assert entry["fastest_ratio_to_plain"] == pytest.approx(entry["fastest_s"] / fastest_plain)
        assert entry["new_tokens"] == forced, f"{name}: generation length was not forced"
        # The first token comes after the prompt is built and prefilled, before the call ends; the tokens after it
        # take time each.
        assert 0 < entry["ttft_s"] < entry["latency_s"] and entry["decode_ms_per_token"] > 0, name
        assert entry["ttft_s"] + (forced - 1) * entry["decode_ms_per_token"] / 1000 <= entry["latency_s"] + 1e-3
    assert scenarios["plain"]["ratio_to_plain"] == 1.0 and scenarios["video_plain"]["ratio_to_plain"] == 1.0
    assert scenarios["video_ego_5"]["plain"] == "video_plain" and scenarios["ego_5"]["plain"] == "plain"


def test_eager_and_compiled_decoding_are_measured_side_by_side(quick):
    out, results = quick
    assert results["meta"]["decoding"] == "compiled"       # the primary run
    runs = results["decoding_runs"]
    assert {mode: run["meta"]["decoding"] for mode, run in runs.items()} == {"eager": "eager", "compiled": "compiled"}
    assert runs["compiled"]["scenarios"] == results["scenarios"]
    compiled, eager = runs["compiled"]["meta"]["compile"], runs["eager"]["meta"]["compile"]
    assert compiled["backend"] == "aot_eager" and compiled["warm_up_s"] > 0 and compiled["graphs_at_warm_up"] >= 1
    assert compiled["recompiles_during_run"] == 0 and compiled["graphs_during_run"] == 0  # compiled once, at warm-up
    assert eager["backend"] is None and eager["graphs_at_warm_up"] == 0
    comparison = results["decoding_comparison"]
    assert set(comparison) == SCENARIOS | {"introduce"}
    for name in SCENARIOS:
        row, a, b = comparison[name], runs["eager"]["scenarios"][name], runs["compiled"]["scenarios"][name]
        assert row["decode_ms_per_token_eager"] == a["decode_ms_per_token"]
        assert row["ttft_s_compiled"] == b["ttft_s"]
        assert row["speedup_decode"] == pytest.approx(a["decode_ms_per_token"] / b["decode_ms_per_token"])
    # The same work in both modes: the same contexts and forced lengths.
    for name in SCENARIOS:
        assert runs["eager"]["scenarios"][name]["context_tokens"] == results["scenarios"][name]["context_tokens"]
    equality = results["decoding_equality"]    # float32 on a CPU: the same greedy tokens, the same logits
    assert equality["tokens_equal"] and equality["tokens"] == 16 and equality["logits_compared"] == 16
    assert equality["within_tolerance"] and equality["max_abs_logit_difference"] <= 1e-3
    table = (out / "results.md").read_text()
    assert "## Decoding: eager and compiled" in table and "- decoding: compiled (aot_eager" in table


def test_context_grows_with_concepts_and_photos_cost_more_than_memories(quick):
    _, results = quick
    s = results["scenarios"]
    assert s["plain"]["context_tokens"] < s["ego_1"]["context_tokens"] < s["ego_5"]["context_tokens"] \
        < s["ego_20"]["context_tokens"]
    for n in (1, 5, 20):
        assert s[f"refs_{n}"]["context_tokens"] > s[f"ego_{n}"]["context_tokens"]
        assert s[f"refs_{n}"]["memory_tokens"] == 0 and s[f"ego_{n}"]["memory_tokens"] > 0
    assert s["ego_20"]["memory_tokens"] <= 20 * results["meta"]["settings"]["k_cap_tokens"]
    assert s["video_ego_5"]["memory_tokens"] == s["ego_5"]["memory_tokens"]


def test_introduction_storage_meta_and_targets(quick):
    _, results = quick
    intro = results["introduce"]
    assert set(intro["stages_s"]) == STAGES
    assert intro["concepts_measured"] == results["meta"]["sizes"]["concepts_introduced"]
    assert intro["description_tokens"] == results["meta"]["sizes"]["description_tokens"]
    assert intro["total_s"] > 0 and intro["peak_mem_gib"] > 0
    storage = results["storage"]
    assert storage["concept_nbytes"] > 0 and storage["file_bytes_per_concept"] > storage["concept_nbytes"] * 0.9
    meta = results["meta"]
    for key in ("device", "model", "quantization", "date", "command", "memory_measure", "weights_gib"):
        assert meta[key] not in (None, ""), key
    assert set(meta["versions"]) >= {"torch", "transformers", "bitsandbytes"}
    assert meta["command"].startswith("python -m bench --model tiny-qwen2.5-vl --quick")
    assert meta["memory_measure"].startswith("cpu_peak_rss")
    assert set(results["targets"]) == {
        "decode_ms_per_token", "introduce_s_per_concept", "plain_answer_s", "latency_ratio_5_concepts",
        "latency_ratio_20_concepts", "compile_warm_up_s", "context_tokens_per_concept", "stored_mb_per_concept",
        "peak_gib_20_concepts"}
    assert results["targets"]["decode_ms_per_token"]["measured"] == results["scenarios"]["plain"]["decode_ms_per_token"]
    assert intro["description_decode_ms_per_token"] > 0
    assert all(isinstance(t["met"], bool) for t in results["targets"].values())


# --------------------------------------------------------------------------------------------------
# ego.architectures
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_recorded_architecture_has_the_published_size(name):
    arch = architecture(name)
    model, _ = build_skeleton(name)  # meta device: no memory
    text, vision = model.config.get_text_config(), model.config.vision_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size"):
        assert getattr(text, key) == arch.text_config[key], key
    for key, value in arch.vision_config.items():
        assert getattr(vision, key) == value, key
    assert model.config.tie_word_embeddings == arch.tie_word_embeddings
    assert model.get_input_embeddings().weight.shape == (arch.vocab_size, arch.hidden_size)
    # The dimensions reproduce the checkpoint's published parameter count (within 0.5 %).
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(arch.params_b, rel=5e-3)


def test_overrides_cut_depth_and_keep_index_lists_inside():
    cut = overrides("qwen2.5-vl-7b", text_layers=2, vision_depth=1)
    assert cut["text_config"]["num_hidden_layers"] == 2 and cut["vision_config"]["depth"] == 1
    assert cut["vision_config"]["fullatt_block_indexes"] == [0]
    assert overrides("qwen3-vl-8b", vision_depth=10)["vision_config"]["deepstack_visual_indexes"] == [8]
    assert overrides("qwen2.5-vl-7b")["text_config"] == architecture("qwen2.5-vl-7b").text_config
    with pytest.raises(ValueError):
        architecture("qwen9-vl-1b")


def test_scaled_down_real_architecture_loads_and_introduces(tmp_path):
    from ego import Ego, Settings

    name = "qwen2-vl-2b"  # the smallest real vocabulary x hidden size: 0.47 GB of bf16 weights with 1 layer
    arch = architecture(name)
    folder = random_architecture(name, tmp_path / "arch", text_layers=1, vision_depth=1)
    config = json.loads((folder / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"], text["vocab_size"]) == (
        arch.hidden_size, arch.text_config["num_attention_heads"], arch.text_config["num_key_value_heads"],
        arch.vocab_size)
    assert text["num_hidden_layers"] == 1 and vision["depth"] == 1
    assert (vision["embed_dim"], vision["num_heads"], vision["hidden_size"]) == (1280, 16, arch.hidden_size)
    assert config["tie_word_embeddings"] is True
    marker = json.loads((folder / MARKER).read_text())
    assert marker["preset"] == name and marker["scaled_down"] is True

    engine = Ego.from_pretrained(str(folder), device="cpu", quantization=None,
                                 settings=Settings(description_max_new_tokens=2, size_max_new_tokens=1))
    # Special-token ids come from the offline tokenizer, as for the tiny models.
    assert config["image_token_id"] == engine.backend.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert engine.memory_dtype == torch.bfloat16 and engine.num_layers == 1
    assert engine.model.get_input_embeddings().weight.shape == (arch.vocab_size, arch.hidden_size)
    concept = engine.introduce("Chelsea", photo(0, size=(224, 224)))
    assert concept.embeddings.shape[1] == arch.hidden_size and 1 <= concept.num_tokens <= 50
    assert set(concept.views[0].timings_s) == STAGES

    # The same build in the same folder is reused, not rebuilt.
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert cached_random_architecture(name, folder, text_layers=1, vision_depth=1) == folder
    assert weights.stat().st_mtime_ns == stamp


def test_concurrency_scenarios_report_throughput_and_latency(quick):
    out, results = quick
    entries = {name: results["scenarios"][name] for name in CONCURRENT}
    for name, entry in entries.items():
        assert set(entry) >= CONCURRENT_FIELDS, name
        visitors = int(name.removeprefix("concurrent_"))
        assert entry["visitors"] == visitors and entry["concepts"] == 5
        assert len(entry["latency_runs_s"]) == visitors * results["meta"]["sizes"]["repeats"]
        runs = sorted(entry["latency_runs_s"])
        # percentiles of the per-visitor latencies, recomputed here (numpy's linear rule, by hand)
        for share, key in ((50, "latency_p50_s"), (95, "latency_p95_s")):
            rank = share / 100 * (len(runs) - 1)
            low, high = int(rank), min(int(rank) + 1, len(runs) - 1)
            assert entry[key] == pytest.approx(runs[low] + (rank - low) * (runs[high] - runs[low]), abs=1e-3)
        assert entry["throughput_ratio"] == pytest.approx(
            entry["throughput_per_s"] / entry["one_at_a_time_throughput_per_s"])
        # a round's answers all come within its window, which is at least its slowest visitor's latency, itself at
        # least the visitors-th smallest latency of all rounds
        assert entry["throughput_per_s"] <= visitors / (runs[visitors - 1] - 1e-4) * 1.001
        assert entry["context_tokens"] > results["scenarios"]["plain"]["context_tokens"]   # the memories are in
    table = (out / "results.md").read_text()
    assert "## Visitors asking at the same moment" in table and table.count("\n| 8 |") == 1


def test_the_follow_up_computes_only_its_own_tokens(quick):
    out, results = quick
    conversation = results["conversation"]
    first, follow_up = conversation["first"], conversation["follow_up"]
    assert conversation["concepts"] == 5
    assert first["prefill_tokens"] == first["context_tokens"] == results["scenarios"]["ego_5"]["context_tokens"]
    # The follow-up's context is the first one, the first answer and the new turn; only the last is computed.
    assert (follow_up["context_tokens"]
            == first["context_tokens"] + first["new_tokens"] + follow_up["prefill_tokens"] - 1)
    assert 0 < follow_up["prefill_tokens"] < first["prefill_tokens"] / 4
    forced = results["meta"]["sizes"]["new_tokens"]
    for entry in (first, follow_up):
        assert entry["new_tokens"] == forced
        assert 0 < entry["ttft_s"] <= entry["latency_s"]
        assert len(entry["latency_runs_s"]) == results["meta"]["sizes"]["repeats"]
    assert "## A conversation: a follow-up on the cached context" in (out / "results.md").read_text()
