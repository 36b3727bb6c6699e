"""An offline tokenizer for random-weight models: byte-level BPE trained on the fly with the real special tokens.

Any text round-trips through it; prompts tokenize into word-sized pieces, as with a real vocabulary.
"""

from __future__ import annotations

import functools

import torch

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
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences, trainer)
    return tokenizer.to_str()


def build_tokenizer(
    special_tokens,
    *,
    vocab_size: int = 800,
    chat_template: str,
    eos_token: str,
    pad_token: str,
    extra: dict | None = None,
):
    """A byte-level BPE tokenizer (any text round-trips) with the real special tokens first."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_str(_tokenizer_json(tuple(special_tokens), vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos_token,
        pad_token=pad_token,
        chat_template=chat_template,
        **(extra or {}),
    )
