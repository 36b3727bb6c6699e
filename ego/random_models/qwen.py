"""Random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL models of the real classes, with the offline tokenizer."""

from __future__ import annotations

from typing import Any

from .tokenizer import build_tokenizer

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")

# Every special token of the real Qwen2-VL / Qwen2.5-VL / Qwen3-VL vocabularies that the chat template
# or the processors use; `<|vision_pad|>` is the concept-memory placeholder.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The real Qwen2-VL chat template (default system prompt, vision blocks, generation prompt).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(family: str, overrides: dict) -> tuple[Any, Any]:
    """(model, processor) of `family`'s real classes with random weights: tiny by default; real dimensions
    through `overrides` ({"text_config": {...}, "vision_config": {...}})."""
    import transformers as tf

    tokenizer = build_tokenizer(
        QWEN_SPECIAL_TOKENS,
        chat_template=QWEN_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    patch = 16 if family == "qwen3-vl" else 14
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]},
    )
    # Vision dims of at least 64 so every Linear can be 4-bit (bitsandbytes' CPU blocksize).
    if family == "qwen2-vl":
        vision = dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, hidden_size=64, patch_size=patch)
        config_cls, model_cls, proc_cls = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
        video_cls = tf.Qwen2VLVideoProcessor
    elif family == "qwen2.5-vl":
        vision = dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
            window_size=112,
            patch_size=patch,
        )
        config_cls, model_cls, proc_cls = (
            tf.Qwen2_5_VLConfig,
            tf.Qwen2_5_VLForConditionalGeneration,
            tf.Qwen2_5_VLProcessor,
        )
        video_cls = tf.Qwen2VLVideoProcessor
    elif family == "qwen3-vl":
        text.update(head_dim=16)
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
        vision = dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=64,
            num_position_embeddings=256,
            deepstack_visual_indexes=[0],
            patch_size=patch,
        )
        config_cls, model_cls, proc_cls = tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor
        video_cls = tf.Qwen3VLVideoProcessor
    else:
        raise ValueError(f"{family!r} is not a Qwen family.")
    text.update(overrides.get("text_config", {}))
    vision.update(overrides.get("vision_config", {}))
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    pixel = dict(patch_size=patch, merge_size=2, temporal_patch_size=2)
    image_processor = tf.Qwen2VLImageProcessor(**pixel)
    video_processor = video_cls(**pixel)
    processor = proc_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model, processor
