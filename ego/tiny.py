"""Tiny random-weight models of the real architectures, built fully offline.

Why: model weights cannot be downloaded on the machines that run the tests, and a fake model would
not exercise the real code path. A tiny model of the real class, with a byte-level BPE tokenizer
trained on the fly that carries the real special tokens and the real processor classes, goes through
exactly the same engine code as a 7B checkpoint. Its answers are gibberish; its tensors, shapes,
positions and attention are real.

The same builders also make full-size random-weight models of a preset's architecture (the benchmark
uses them to measure cost and memory without a download): pass the real dimensions as overrides.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

# Every special token of the real Qwen2-VL / Qwen2.5-VL / Qwen3-VL vocabularies that the chat template
# or the processors use; `<|vision_pad|>` is the concept-memory placeholder.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
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

# Text the tokenizer is trained on: the words the engine's prompts and a description use, so that
# prompts tokenize into word-sized pieces as they would with a real vocabulary.
_CORPUS_WORDS = (
    "a an the of in on and with is are this that it its to what which who how many much "
    "cat dog mug cup rocket person man woman child bag hat bike car chair toy plush bottle shoe "
    "red green blue black white brown grey gray orange yellow striped tabby fluffy small large "
    "ceramic metal wooden plastic round tall short soft shiny handle ears eyes fur tail face "
    "describe main subject image photo picture video frame percentage percent area covered covers "
    "answer single number integer between one hundred about around most half quarter whole "
    "distinctive visual appearance colour color shape material markings short sentence called "
    "personal concepts you know here are name names question yes no sitting standing next table "
    "0 1 2 3 4 5 6 7 8 9 10 20 25 30 35 40 50 60 70 75 80 90 100 % . , : ; ! ? ' - ( )"
).split()


@functools.lru_cache(maxsize=4)
def _tokenizer_json(special_tokens: tuple[str, ...], vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    generator = torch.Generator().manual_seed(0)
    sentences = []
    for _ in range(400):
        picks = torch.randint(len(_CORPUS_WORDS), (12,), generator=generator).tolist()
        sentences.append(" ".join(_CORPUS_WORDS[i] for i in picks))
    sentences.append(" ".join(_CORPUS_WORDS))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(sentences, trainer)
    return tokenizer.to_str()


def build_tokenizer(special_tokens=QWEN_SPECIAL_TOKENS, *, vocab_size: int = 800, chat_template: str,
                    eos_token: str, pad_token: str, extra: dict | None = None):
    """A byte-level BPE tokenizer (any text round-trips) with the real special tokens first."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_str(_tokenizer_json(tuple(special_tokens), vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=eos_token, pad_token=pad_token,
        chat_template=chat_template, **(extra or {}),
    )


def save_tiny(family: str, directory: str | Path, *, seed: int = 0, overrides: dict | None = None) -> Path:
    """Build the tiny model of `family` and save model + processor to `directory` (from_pretrained-ready)."""
    from .backends import backend_for_family

    directory = Path(directory)
    backend_cls = backend_for_family(family)
    torch.manual_seed(seed)
    model, processor = backend_cls.build_random(family, overrides or {})
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    (directory / "ego_tiny.json").write_text(json.dumps({"family": family, "seed": seed}))
    return directory


def tiny_checkpoint(family: str, seed: int = 0) -> Path:
    """A cached on-disk tiny checkpoint per (family, seed) for this process."""
    return _tiny_checkpoint_cached(family, seed)


@functools.lru_cache(maxsize=16)
def _tiny_checkpoint_cached(family: str, seed: int) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=f"ego-tiny-{family}-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)  # a temporary model, gone with the process
    return save_tiny(family, directory, seed=seed)
