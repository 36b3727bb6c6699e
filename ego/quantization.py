"""How `Ego.from_pretrained` quantizes the model's weights, and what each way needs.

* "4bit": bitsandbytes NF4 (double quantization, bf16 compute): the default on CUDA (6.4 GiB of weights for the
  7B preset; 7.0 GiB at the peak of a question with 20 concepts, decoded eagerly: a 12 GB card leaves room for
  compiled decoding's static cache and the CUDA context). It also runs on a CPU (slowly). transformers 5.23 does
  not compile its decode step on its own; `ego.decoding.allow_compiled_decoding` lets it.
* "8bit": bitsandbytes LLM.int8. Never compiled (its layers hold state between calls).
* "int4": torchao's int4 weight-only quantization (`Int4WeightOnlyConfig`, groups of 128, the "tile_packed_to_4d"
  packing: PyTorch's own tinygemm kernel), made while loading, on CUDA only (torchao 0.18 has no int4 kernel for a
  CPU). transformers flags it compileable; torchao publishes it as faster than bf16 at batch 1 when compiled.
* "fp8": transformers' fine-grained FP8 (weights in 128×128 blocks, activations quantized per token group as
  they come), made while loading; it needs a GPU of compute capability 8.9 or newer (L4, RTX 4090, H100, ...).
  About 8 GiB of weights for the 7B; closer to bf16's answers than either 4-bit way.
* None: no quantization (bf16 on CUDA, as in the paper).

Whichever is chosen, only the language model's linear layers are quantized: the vision tower, the projector and
the output head stay in the model's dtype (each backend's `unquantized_modules`), because the memories are the
vision tower's outputs and a concept made under one quantization is read under another.
"""

from __future__ import annotations

import torch

from .settings import QUANTIZATIONS

INT4_GROUP_SIZE = 128
"""Weights per int4 scale and zero point (torchao's default; tinygemm packs groups of 32, 64, 128 or 256)."""

FP8_BLOCK = (128, 128)
"""Weights per FP8 scale (rows, columns): transformers' default block."""

FP8_MIN_CAPABILITY = (8, 9)
"""The first CUDA compute capability with FP8 tensor cores (Ada, then Hopper)."""


def check_known(quantization) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}; got {quantization!r}.")


def for_device(quantization: str | None, device: str) -> str | None:
    """The quantization to load once "auto" is settled for `device`."""
    check_known(quantization)
    if quantization == "auto":
        return "4bit" if str(device).startswith("cuda") else None
    return quantization


def check_supported(quantization: str | None, device: str) -> None:
    """Raise, before anything is loaded, where `quantization` cannot run on `device`: a sentence that says
    which quantization to use instead."""
    on_cuda = str(device).startswith("cuda")
    if quantization == "int4":
        if not on_cuda:
            raise ValueError(
                f'quantization="int4" (torchao) runs only on a CUDA GPU, and this model is to load on {device}: '
                'use quantization="4bit" (bitsandbytes NF4, which also runs on a CPU) or None.'
            )
        try:
            import torchao  # noqa: F401
        except ImportError as error:
            raise ImportError(
                'quantization="int4" needs the torchao package: pip install -r requirements.txt '
                '(it pins torchao), or use quantization="4bit".'
            ) from error
    if quantization == "fp8":
        if not on_cuda:
            raise ValueError(
                f'quantization="fp8" runs only on a CUDA GPU, and this model is to load on {device}: '
                'use quantization="4bit" or None.'
            )
        capability = torch.cuda.get_device_capability(torch.device(device))
        if capability < FP8_MIN_CAPABILITY:
            raise ValueError(
                f'quantization="fp8" needs a GPU of compute capability 8.9 or newer (L4, RTX 4090, H100); this one '
                f'is {capability[0]}.{capability[1]}: use quantization="4bit", "int4" or None.'
            )


def quantization_config(quantization: str | None, unquantized_modules, dtype: torch.dtype):
    """The transformers quantization config that loads the weights as `quantization` says (None: none), every
    module under `unquantized_modules` (full module paths) left as it is."""
    skip = list(unquantized_modules)
    if quantization is None:
        return None
    if quantization in ("4bit", "8bit"):
        from transformers import BitsAndBytesConfig

        if quantization == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        )
    if quantization == "int4":
        from torchao.quantization import Int4WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(
            quant_type=Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d"),
            modules_to_not_convert=skip,
        )
    if quantization == "fp8":
        from transformers import FineGrainedFP8Config

        return FineGrainedFP8Config(weight_block_size=FP8_BLOCK, modules_to_not_convert=skip)
    check_known(quantization)
    raise ValueError(f"quantization {quantization!r} is settled for a device first (`for_device`).")


def loaded_quantization(model) -> str | None:
    """How a loaded model's weights are quantized, in `QUANTIZATIONS`' words (None: not quantized)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return None
    config = quantizer.quantization_config
    method = str(getattr(config.quant_method, "value", config.quant_method))
    if method == "bitsandbytes":
        return "4bit" if config.load_in_4bit else "8bit"
    if method == "torchao":
        kind = type(config.quant_type).__name__
        return "int4" if kind == "Int4WeightOnlyConfig" else f"torchao {kind}"
    if method == "fp8":
        return "fp8"
    return method
