"""The real dimensions of each preset's model, and random-weight copies of them built without a download.

Why: the benchmark (`python -m bench`) measures what personalization costs on the real architecture of a
preset (the default is Qwen2.5-VL-7B-Instruct). Cost and memory depend on the shapes, not on the values
of the weights, so a folder with random weights of the real shapes, the real classes and the offline
tokenizer of `ego.random_models` measures them as well as the checkpoint would, with nothing to download.

    from ego.random_models.architectures import random_architecture
    folder = random_architecture("qwen2.5-vl-7b", "/tmp/arch-7b", device="cuda")   # 16.6 GB of bf16 weights
    engine = Ego.from_pretrained(str(folder))

The weights are made directly in `dtype` (bfloat16 by default) on `device`: a 7B model needs about
16 GiB there and never a float32 copy in CPU memory. `text_layers` / `vision_depth` cut the depth for
smoke tests; every other dimension (hidden sizes, heads, vocabulary) stays the real one.

The vocabulary size in the config is the real one (the embedding and `lm_head` have their real shapes),
while the tokenizer is the small offline one of `ego.random_models` and the special-token ids in the config are
taken from it, as for the tiny models. Prompts therefore tokenize into somewhat different numbers of text
tokens than with the real tokenizer; visual and memory tokens, which dominate the context, are exact.

Where the numbers come from (each value below agrees across the copies cited, all of which were loaded from or
fine-tuned from the named checkpoint, and the parameter counts computed from them match the published sizes,
`Architecture.params_b`):

* Qwen/Qwen2.5-VL-7B-Instruct: huggingface.co/Artanic30/Wiki-R1-7B config.json (a fine-tune whose
  `_name_or_path` is Qwen2.5-VL-7B-Instruct), huggingface.co/BonnieOne/GUI-Critic-R1 config.json, and a
  public verl training log that prints the config it loaded from Qwen2.5-VL-7B-Instruct with transformers
  4.57.1 ("contains 8.29B parameters", vocab_size 152064, vision depth 32 / hidden 1280 / out 3584).
* Qwen/Qwen2.5-VL-3B-Instruct: huggingface.co/AngelSlim/Qwen2.5-VL-3B-Instruct-INT4-GPTQ config.json and
  huggingface.co/callgg/ocr-bf16 config.json (hidden 2048, 36 layers, 16 heads, 2 KV heads, vocab 151936,
  vision out 2048).
* Qwen/Qwen2-VL-2B-Instruct: huggingface.co/onnx-community/Qwen2-VL-2B-Instruct and
  huggingface.co/lightonai/MonoQwen2-VL-v0.1 config.json (`_name_or_path` Qwen/Qwen2-VL-2B-Instruct). Its
  vision_config lists only hidden_size 1536; the rest are Qwen2VLVisionConfig's defaults (depth 32,
  embed_dim 1280, mlp_ratio 4, 16 heads, quick_gelu), as spelled out in
  huggingface.co/zszhong/Lyra_Qwen2VL_2B_ViT config.json.
* Qwen/Qwen3-VL-4B-Instruct: public copies of its config.json in GitHub code (text 2560 / 36 layers /
  32 heads / 8 KV heads / head_dim 128 / intermediate 9728, rope_theta 5e6, mrope_section [24, 20, 20]
  interleaved, tied embeddings; vision depth 24 / hidden 1024 / intermediate 4096 / out 2560, deepstack
  [5, 11, 17]).
* Qwen/Qwen3-VL-8B-Instruct: huggingface.co/Steinate/Cortex and huggingface.co/Chhagan005/CSM-DocExtract-8N
  config.json (text 4096 / 36 layers / 32 heads / 8 KV heads / intermediate 12288, untied; vision depth 27
  / hidden 1152 / intermediate 4304 / out 4096, deepstack [8, 16, 24]).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

MARKER = "ego_architecture.json"
"""Written into every folder `random_architecture` makes: which preset, how it was cut, the seed."""


@dataclass(frozen=True)
class Architecture:
    preset: str
    family: str
    model_id: str
    text_config: dict
    vision_config: dict
    tie_word_embeddings: bool
    params_b: float
    """Published parameter count in billions (the checkpoint's safetensors total), for a sanity check."""
    source: str = ""

    @property
    def vocab_size(self) -> int:
        return self.text_config["vocab_size"]

    @property
    def num_hidden_layers(self) -> int:
        return self.text_config["num_hidden_layers"]

    @property
    def hidden_size(self) -> int:
        return self.text_config["hidden_size"]


_QWEN2_TEXT = dict(
    hidden_act="silu", rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768, attention_dropout=0.0
)
_QWEN2_ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}
_QWEN3_TEXT = dict(
    hidden_act="silu",
    rms_norm_eps=1e-6,
    head_dim=128,
    attention_bias=False,
    attention_dropout=0.0,
    max_position_embeddings=262144,
)
_QWEN3_ROPE = {
    "rope_type": "default",
    "rope_theta": 5_000_000.0,
    "mrope_section": [24, 20, 20],
    "mrope_interleaved": True,
}
_QWEN25_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    hidden_act="silu",
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
    in_channels=3,
)

ARCHITECTURES: dict[str, Architecture] = {
    a.preset: a
    for a in [
        Architecture(
            "qwen2.5-vl-7b",
            "qwen2.5-vl",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            text_config=dict(
                _QWEN2_TEXT,
                vocab_size=152064,
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                max_position_embeddings=128000,
                max_window_layers=28,
                rope_parameters=dict(_QWEN2_ROPE),
            ),
            vision_config=dict(_QWEN25_VISION, out_hidden_size=3584),
            tie_word_embeddings=False,
            params_b=8.29,
            source="huggingface.co/Artanic30/Wiki-R1-7B config.json; verl log of Qwen2.5-VL-7B-Instruct's config",
        ),
        Architecture(
            "qwen2.5-vl-3b",
            "qwen2.5-vl",
            "Qwen/Qwen2.5-VL-3B-Instruct",
            text_config=dict(
                _QWEN2_TEXT,
                vocab_size=151936,
                hidden_size=2048,
                intermediate_size=11008,
                num_hidden_layers=36,
                num_attention_heads=16,
                num_key_value_heads=2,
                max_position_embeddings=128000,
                max_window_layers=70,
                rope_parameters=dict(_QWEN2_ROPE),
            ),
            vision_config=dict(_QWEN25_VISION, out_hidden_size=2048),
            tie_word_embeddings=True,
            params_b=3.75,
            source="huggingface.co/AngelSlim/Qwen2.5-VL-3B-Instruct-INT4-GPTQ and callgg/ocr-bf16 config.json",
        ),
        Architecture(
            "qwen2-vl-2b",
            "qwen2-vl",
            "Qwen/Qwen2-VL-2B-Instruct",
            text_config=dict(
                _QWEN2_TEXT,
                vocab_size=151936,
                hidden_size=1536,
                intermediate_size=8960,
                num_hidden_layers=28,
                num_attention_heads=12,
                num_key_value_heads=2,
                max_position_embeddings=32768,
                max_window_layers=28,
                rope_parameters=dict(_QWEN2_ROPE),
            ),
            vision_config=dict(
                depth=32,
                embed_dim=1280,
                hidden_size=1536,
                mlp_ratio=4,
                num_heads=16,
                hidden_act="quick_gelu",
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                in_channels=3,
            ),
            tie_word_embeddings=True,
            params_b=2.21,
            source="huggingface.co/onnx-community/Qwen2-VL-2B-Instruct and lightonai/MonoQwen2-VL-v0.1 config.json; "
            "vision defaults as in zszhong/Lyra_Qwen2VL_2B_ViT",
        ),
        Architecture(
            "qwen3-vl-4b",
            "qwen3-vl",
            "Qwen/Qwen3-VL-4B-Instruct",
            text_config=dict(
                _QWEN3_TEXT,
                vocab_size=151936,
                hidden_size=2560,
                intermediate_size=9728,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                rope_parameters=dict(_QWEN3_ROPE),
            ),
            vision_config=dict(
                depth=24,
                hidden_size=1024,
                intermediate_size=4096,
                num_heads=16,
                out_hidden_size=2560,
                hidden_act="gelu_pytorch_tanh",
                patch_size=16,
                spatial_merge_size=2,
                temporal_patch_size=2,
                num_position_embeddings=2304,
                deepstack_visual_indexes=[5, 11, 17],
                in_channels=3,
            ),
            tie_word_embeddings=True,
            params_b=4.44,
            source="public copies of Qwen3-VL-4B-Instruct's config.json in GitHub code",
        ),
        Architecture(
            "qwen3-vl-8b",
            "qwen3-vl",
            "Qwen/Qwen3-VL-8B-Instruct",
            text_config=dict(
                _QWEN3_TEXT,
                vocab_size=151936,
                hidden_size=4096,
                intermediate_size=12288,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                rope_parameters=dict(_QWEN3_ROPE),
            ),
            vision_config=dict(
                depth=27,
                hidden_size=1152,
                intermediate_size=4304,
                num_heads=16,
                out_hidden_size=4096,
                hidden_act="gelu_pytorch_tanh",
                patch_size=16,
                spatial_merge_size=2,
                temporal_patch_size=2,
                num_position_embeddings=2304,
                deepstack_visual_indexes=[8, 16, 24],
                in_channels=3,
            ),
            tie_word_embeddings=False,
            params_b=8.77,
            source="huggingface.co/Steinate/Cortex and Chhagan005/CSM-DocExtract-8N config.json",
        ),
    ]
}


def architecture(name: str) -> Architecture:
    key = name.strip().lower()
    if key not in ARCHITECTURES:
        raise ValueError(f"No real architecture is recorded for {name!r}; known: {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[key]


def overrides(name: str, *, text_layers: int | None = None, vision_depth: int | None = None) -> dict:
    """`{"text_config": ..., "vision_config": ...}` for `ego.random_models.build_random`: the real dimensions,
    optionally with fewer text layers / vision blocks (the index lists into the vision blocks are cut to fit)."""
    arch = architecture(name)
    text, vision = copy.deepcopy(arch.text_config), copy.deepcopy(arch.vision_config)
    if text_layers is not None:
        if text_layers < 1:
            raise ValueError("text_layers must be at least 1")
        text["num_hidden_layers"] = int(text_layers)
        if "max_window_layers" in text:
            text["max_window_layers"] = min(text["max_window_layers"], int(text_layers))
    if vision_depth is not None:
        if vision_depth < 1:
            raise ValueError("vision_depth must be at least 1")
        depth = vision["depth"] = int(vision_depth)
        for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            if key in vision:
                vision[key] = [i for i in vision[key] if i < depth] or [depth - 1]
    return {"text_config": text, "vision_config": vision}


def build_skeleton(name: str, *, text_layers: int | None = None, vision_depth: int | None = None):
    """(model on the meta device, processor) of the architecture: the config, class and processor, no memory."""
    from accelerate import init_empty_weights

    from . import build_random

    arch = architecture(name)
    # Parameters only: the offline tokenizer's training, inside the builder, keeps its real tensors.
    with init_empty_weights(include_buffers=False):
        model, processor = build_random(
            arch.family, overrides(name, text_layers=text_layers, vision_depth=vision_depth)
        )
    if model.config.tie_word_embeddings != arch.tie_word_embeddings:
        generation_config = model.generation_config
        model.config.tie_word_embeddings = arch.tie_word_embeddings
        with init_empty_weights(include_buffers=False):
            model = type(model)._from_config(model.config)
        model.generation_config = generation_config
    model.tie_weights()  # tied inside the context, the shared weight would have been registered as a new one
    return model, processor


def random_architecture(
    name: str,
    directory,
    *,
    text_layers: int | None = None,
    vision_depth: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_size: str = "4GB",
) -> Path:
    """Write a from_pretrained-ready folder with random weights of preset `name`'s real architecture.

    The weights are created directly in `dtype` on `device` (no float32 copy, nothing on the CPU when
    `device` is a GPU), then saved in shards of `max_shard_size`. Returns the folder.
    """
    from transformers.initialization import no_init_weights

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    skeleton, processor = build_skeleton(name, text_layers=text_layers, vision_depth=vision_depth)
    torch.manual_seed(seed)
    with torch.device(device), no_init_weights():  # one initialisation pass below, not torch's and then ours
        model = type(skeleton)._from_config(skeleton.config, dtype=dtype)
    model.init_weights()  # transformers' own init (normal(0, initializer_range), norms at 1) and weight tying
    model.eval()
    model.generation_config = copy.deepcopy(skeleton.generation_config)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    processor.save_pretrained(directory)
    (directory / MARKER).write_text(
        json.dumps(describe(name, text_layers=text_layers, vision_depth=vision_depth, dtype=dtype, seed=seed), indent=2)
    )
    del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return directory


def describe(name: str, *, text_layers=None, vision_depth=None, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """What `random_architecture` writes into the folder's marker file (also used to recognise a cached folder)."""
    arch = architecture(name)
    return {
        "preset": arch.preset,
        "family": arch.family,
        "model_id": arch.model_id,
        "text_layers": text_layers or arch.num_hidden_layers,
        "vision_depth": vision_depth or arch.vision_config["depth"],
        "scaled_down": bool(
            (text_layers and text_layers != arch.num_hidden_layers)
            or (vision_depth and vision_depth != arch.vision_config["depth"])
        ),
        "dtype": str(dtype).replace("torch.", ""),
        "seed": seed,
        "source": arch.source,
        "weights": "random (shapes, classes and processor of the real model; offline tokenizer)",
    }


def cached_random_architecture(name: str, directory, **kwargs) -> Path:
    """`random_architecture`, unless `directory` already holds the same build (its marker file matches)."""
    directory = Path(directory)
    marker = directory / MARKER
    wanted = describe(
        name,
        text_layers=kwargs.get("text_layers"),
        vision_depth=kwargs.get("vision_depth"),
        dtype=kwargs.get("dtype", torch.bfloat16),
        seed=kwargs.get("seed", 0),
    )
    if marker.is_file() and (directory / "config.json").is_file():
        try:
            if json.loads(marker.read_text()) == wanted:
                return directory
        except ValueError:
            pass
    return random_architecture(name, directory, **kwargs)


def main(argv=None) -> int:
    """`python -m ego.random_models.architectures NAME DIR [--device cuda] [--text-layers N] [--vision-depth N]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ego.random_models.architectures",
        description="Write a from_pretrained-ready folder with random weights (bf16) of a preset's real "
        "architecture; a folder that already holds the same build is reused.",
    )
    parser.add_argument("name", choices=sorted(ARCHITECTURES))
    parser.add_argument("directory")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the weights are made (default: cuda if available)",
    )
    parser.add_argument("--text-layers", type=int, help="fewer text layers (smoke tests)")
    parser.add_argument("--vision-depth", type=int, help="fewer vision blocks (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = cached_random_architecture(
        args.name,
        args.directory,
        text_layers=args.text_layers,
        vision_depth=args.vision_depth,
        device=args.device,
        seed=args.seed,
    )
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
