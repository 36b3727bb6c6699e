"""Random-weight InternVL3 models of the real classes (`InternVLForConditionalGeneration`), offline tokenizer."""

from __future__ import annotations

from typing import Any

from ..backends.internvl import INTERNVL_NAMED_TOKENS
from .qwen import QWEN_SPECIAL_TOKENS
from .tokenizer import build_tokenizer

FAMILIES = ("internvl3",)

# Special tokens of the real InternVL3-hf vocabulary (Qwen2.5-VL's, then InternVL's), in id order.
INTERNVL_SPECIAL_TOKENS = [
    *QWEN_SPECIAL_TOKENS,
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<video>",
]
# The chat template of the InternVL3-hf checkpoints (transformers' conversion script): ChatML turns, an
# image is `<IMG_CONTEXT>\n` and a video `<video>\n`, both expanded by the processor.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def build(family: str, overrides: dict) -> tuple[Any, Any]:
    """A random InternVL3 of the real classes: tiny by default; real dimensions through `overrides`
    ({"text_config": {...}, "vision_config": {...}}, any other key goes to `InternVLConfig`)."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"{family!r} is not an InternVL family.")
    tokenizer = build_tokenizer(
        INTERNVL_SPECIAL_TOKENS,
        chat_template=INTERNVL_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra={"extra_special_tokens": dict(INTERNVL_NAMED_TOKENS)},
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in INTERNVL_SPECIAL_TOKENS}
    text = dict(
        model_type="qwen2",
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
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False,
    )
    # Vision dims of at least 64 so every Linear can be 4-bit (bitsandbytes' CPU blocksize); the real
    # tile geometry (448 px, 14 px patches -> 32 x 32 patches -> pixel shuffle 0.5 -> 256 tokens).
    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=448, patch_size=14
    )
    text.update(overrides.get("text_config", {}))
    vision.update(overrides.get("vision_config", {}))
    top = {k: v for k, v in overrides.items() if k not in ("text_config", "vision_config")}
    top.setdefault("downsample_ratio", 0.5)
    top.setdefault("tie_word_embeddings", bool(text.get("tie_word_embeddings", False)))
    image_px = vision["image_size"] if isinstance(vision["image_size"], int) else vision["image_size"][0]
    patch_px = vision["patch_size"] if isinstance(vision["patch_size"], int) else vision["patch_size"][0]
    seq_length = int((image_px // patch_px) ** 2 * top["downsample_ratio"] ** 2)
    top.setdefault("image_seq_length", seq_length)
    config = tf.InternVLConfig(text_config=text, vision_config=vision, image_token_id=ids["<IMG_CONTEXT>"], **top)
    model = tf.InternVLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    pixels = dict(size={"height": image_px, "width": image_px}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    image_processor = tf.GotOcr2ImageProcessor(crop_to_patches=False, min_patches=1, max_patches=12, **pixels)
    video_processor = tf.InternVLVideoProcessor(**pixels)
    processor = tf.InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=config.image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return model, processor
