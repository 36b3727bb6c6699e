"""How `generate` decodes: eagerly, or with a compiled decode step over one static KV cache.

Decoding a 7B model on a GPU is bound by the host, not the GPU: eager decoding launches about 1,260 kernels
per generated token and the GPU waits between them (bench/RESULTS.md). Compiled decoding removes that wait:

* the prefill stays eager (it carries the photo or clip, the memory rows, Qwen3-VL's residuals and the
  M-RoPE inputs, whose shapes change with every prompt); transformers' `generate` already splits the two and
  calls a `torch.compile`d model only for the decode steps (`CompileConfig`; `mode="reduce-overhead"` on
  CUDA, which records CUDA graphs; inductor's default mode elsewhere, for tests on a CPU);
* the decode steps need a cache of fixed shape: ONE `StaticCache` per batch size, sized once to
  `Settings.static_cache_max_tokens` and reset before each call, so that neither the prompt length nor the
  token budget recompiles the step, and CUDA graphs see the same cache addresses on every call (a new cache
  per call would make them record again, and after enough of that fall back to eager);
* every compiled `generate` runs on one thread of its own: CUDA-graph trees are kept per thread, and the
  Space calls the model from a pool of threads (and streams from another);
* a call that brings a cache of its own (a conversation keeps one between its turns) decodes on the shared
  static cache all the same: its keys and values are copied in before the prefill of the new tokens, and the
  whole sequence's are copied back into the caller's cache afterwards, so that the conversation never keeps
  (or sees) the shared cache, which the next request resets;
* batches of several rows share one compiled step, with its batch dimension dynamic (`Ego.warm_up(batched=True)`);
  each batch size keeps a cache of its own, made only where it leaves `Settings.batch_cache_min_free_mb` of the
  GPU free, and batches decode eagerly where it would not, or where their step failed to compile;
* a call whose prompt plus budget exceeds the ceiling decodes eagerly, on its own cache or a dynamic one;
* one graph decodes a photo's, a clip's and a continuation's steps (an introduction's size question, a
  follow-up): transformers hands every step the prefill's grid sizes, which a step does not read (left out:
  `Backend.prefill_only_inputs`), and gives a continuation's M-RoPE positions in a shape of their own (given in a
  prompt's: `_positions_in_one_shape`); otherwise each is a graph of its own, three more compilations of a 7B;
* the graphs guard on the number of model classes transformers has seen (its output-capturing registry): a model
  of another class loaded after the warm-up (not in the Space, which loads one) recompiles each graph once.

The 4-bit default (bitsandbytes NF4): transformers 5.23 compiles the decode step only if the model's quantizer
says it can be compiled, and its bitsandbytes 4-bit quantizer says no, although bitsandbytes' `Linear4bit`
supports `torch.compile` and CUDA graphs since 0.46. This module flags that one quantizer instance as
compileable (`allow_compiled_decoding`) rather than writing a decode loop of its own: `generate` then keeps
doing everything else (logits processors, stop criteria, streaming, M-RoPE positions). Whether NF4, bf16 or
torchao int4 is the fastest compiled path is measured by `bench/gpu_run.sh`.

Attention capture (Eq. 3's input) never runs inside the compiled step: an introduction records the rows it
needs in one eager forward after the description is generated (`Ego.describe`), and the capture function
passes straight to SDPA while a graph is being traced (`ego.attention`).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Sequence

import torch

from .settings import DECODING_MODES

log = logging.getLogger("ego.decoding")

RECOMPILE_LIMIT = 64
"""Compilations of the decode step torch may make in this process (its default, 8, is a handful of engines)."""


def resolve_mode(mode: str, device: torch.device) -> str:
    """ "eager" or "compiled": "auto" is compiled on CUDA, eager elsewhere."""
    if mode not in DECODING_MODES:
        raise ValueError(f"decoding must be one of {DECODING_MODES}; got {mode!r}.")
    if mode == "auto":
        return "compiled" if device.type == "cuda" else "eager"
    return mode


def allow_compiled_decoding(model) -> bool:
    """Whether `generate` may compile this model's decode step; flags a bitsandbytes 4-bit quantizer as
    compileable (only this model's quantizer object: its class is swapped for a subclass that says so)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or quantizer.is_compileable:
        return True
    if getattr(model, "is_loaded_in_4bit", False) and type(quantizer).__name__ == "Bnb4BitHfQuantizer":
        base = type(quantizer)
        quantizer.__class__ = type(
            f"Compileable{base.__name__}",
            (base,),
            {
                "is_compileable": property(lambda self: True),
                "__doc__": "bitsandbytes' Linear4bit supports torch.compile and CUDA graphs (bitsandbytes >= 0.46).",
            },
        )
        return True
    return False


class Decoder:
    """The one place that decides how the engine's `model.generate` calls decode (`Ego.decoding`)."""

    def __init__(
        self,
        model,
        mode: str,
        *,
        max_cache_tokens: int,
        backend: str = "inductor",
        batch_min_free_bytes: int = 0,
        prefill_only_inputs: Sequence[str] = (),
    ):
        self.model = model
        self.device = model.get_input_embeddings().weight.device
        wanted = resolve_mode(mode, self.device)
        if wanted == "compiled" and not allow_compiled_decoding(model):
            log.warning("this model's quantization cannot be compiled; decoding eagerly")
            wanted = "eager"
        self.mode = wanted
        self.max_cache_tokens = int(max_cache_tokens)
        self.batch_min_free_bytes = int(batch_min_free_bytes)
        self._too_large: set[int] = set()
        """Batch sizes whose static cache did not fit the GPU's free memory: they decode eagerly."""
        self.compile_config = None
        self.warm_up_s: float | None = None
        self.warm_up_steps_s: dict[str, float] = {}
        """Seconds of each step of the last warm-up (`Ego.warm_up`): mostly the compilation of its graph."""
        self.batches_compiled = True
        """Whether a generation of several rows decodes compiled too; False once compiling their step failed
        (`give_up_batches`): batches then decode eagerly and single questions stay compiled."""
        self._caches: dict[int, object] = {}  # batch size -> its StaticCache [layers x (K, V) of max_cache_tokens]
        self._thread_id: int | None = None
        self._executor = None
        self._prepare_inputs = self._prepare_positions = None
        if self.mode == "compiled":
            from transformers import CompileConfig

            cuda = self.device.type == "cuda"
            # CUDA graphs ("reduce-overhead") are inductor's, on CUDA only.
            mode = ("reduce-overhead" if cuda else "default") if backend == "inductor" else None
            self.compile_config = CompileConfig(fullgraph=False, backend=backend, mode=mode)
            self.compile_config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
            # The decode step is one function compiled once for one row and once for batches (`Ego.warm_up`); a
            # model of another class, or a second engine in the process (tests, the benchmark), adds its own. Past
            # torch's default of 8 compilations per function dynamo stops compiling it and that step silently
            # decodes eagerly.
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="ego-decode", initializer=self._remember_thread
            )
            self._generate = model.generate
            model.generate = self.generate  # this model object's generate: every call site goes through it
            if hasattr(model, "_prepare_position_ids_for_generation"):
                model._prepare_position_ids_for_generation = self._prepare_positions = _positions_in_one_shape(
                    model, model._prepare_position_ids_for_generation
                )
            if prefill_only_inputs:
                model.prepare_inputs_for_generation = self._prepare_inputs = _steps_without(
                    model.prepare_inputs_for_generation, tuple(prefill_only_inputs)
                )

    def close(self) -> None:
        """Give the model its own `generate` back and end the decode thread (before another `Decoder` takes over)."""
        if self.compiled and self.model.__dict__.get("generate") == self.generate:
            del self.model.generate
        for name, mine in (
            ("prepare_inputs_for_generation", self._prepare_inputs),
            ("_prepare_position_ids_for_generation", self._prepare_positions),
        ):
            if mine is not None and self.model.__dict__.get(name) is mine:
                delattr(self.model, name)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def compiled(self) -> bool:
        return self.mode == "compiled"

    @property
    def generate_kwargs(self) -> dict:
        """What `Ego.decoding` adds to every generate call."""
        return {"compile_config": self.compile_config} if self.compiled else {}

    def cache(self, length: int, batch_size: int = 1):
        """The shared static cache of `batch_size`, emptied, if `length` tokens fit in it; None when decoding
        eagerly, when the sequence is longer than the ceiling, for batches once their step failed to compile, or
        when a batch size's cache would not leave `batch_min_free_bytes` of the GPU free (the caller then decodes
        eagerly on a cache transformers makes)."""
        if not self.compiled or length > self.max_cache_tokens or batch_size in self._too_large:
            return None
        if batch_size > 1 and not self.batches_compiled:
            return None
        cache = self._caches.get(batch_size)
        if cache is None:
            from transformers import StaticCache

            free = self.free_bytes()
            needed = batch_size * self.max_cache_tokens * self.bytes_per_token()
            if batch_size > 1 and free is not None and free - needed < self.batch_min_free_bytes:
                log.warning(
                    "a static cache for batches of %d (%.2f GiB) would leave %.2f GiB of GPU memory free: "
                    "batches of %d decode eagerly",
                    batch_size,
                    needed / 2**30,
                    (free - needed) / 2**30,
                    batch_size,
                )
                self._too_large.add(batch_size)
                return None

            cache = self._caches[batch_size] = StaticCache(
                config=self.model.config.get_text_config(decoder=True), max_cache_len=self.max_cache_tokens
            )
        cache.reset()
        return cache

    def free_bytes(self) -> int | None:
        """Free memory of the model's GPU, in bytes; None off CUDA (no limit is checked there)."""
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.mem_get_info(self.device)[0])

    def bytes_per_token(self) -> int:
        """Key/value cache bytes one token takes, over all layers: 2 x layers x key/value heads x head size x the
        element size of the model's activations (57,344 for Qwen2.5-VL-7B in bf16)."""
        config = self.model.config.get_text_config(decoder=True)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        element = self.model.get_input_embeddings().weight.element_size()
        return 2 * config.num_hidden_layers * heads * head_dim * element

    def give_up_batches(self, error: BaseException) -> None:
        """Compiling the step of batched answers failed (at warm-up): batches decode eagerly from now on."""
        log.error(
            "compiling the batched decode step failed (%s: %s); batches decode eagerly", type(error).__name__, error
        )
        self.batches_compiled = False
        self._caches = {rows: cache for rows, cache in self._caches.items() if rows == 1}  # theirs are not needed

    def generate(self, *args, **kwargs):
        """`model.generate` on the decode thread, on the shared static cache (a cache the call brings is copied in
        before and back after)."""
        if threading.get_ident() == self._thread_id:
            return self._run(args, kwargs)
        context = contextvars.copy_context()  # e.g. an attention capture opened by the caller
        return self._executor.submit(context.run, self._run, args, kwargs).result()

    def _remember_thread(self):
        self._thread_id = threading.get_ident()

    def _run(self, args, kwargs):
        own = kwargs.get("past_key_values")
        prompt = kwargs.get("input_ids", args[0] if args else None)
        if prompt is None:
            prompt = kwargs.get("inputs_embeds")
        budget = kwargs.get("max_new_tokens")
        if kwargs.get("use_cache", True) is False or prompt is None or budget is None or _is_static(own):
            return self._generate(*args, **kwargs)
        length = int(prompt.shape[1]) + int(budget)
        cache = self.cache(length, int(prompt.shape[0]))
        if cache is None:  # too long for the static cache, or a batch whose cache does not fit the GPU
            if length > self.max_cache_tokens:
                log.info(
                    "a %d-token generation is longer than the static cache (%d): decoding it eagerly",
                    length,
                    self.max_cache_tokens,
                )
            return self._generate(*args, **kwargs)
        if own is None:
            return self._generate(*args, **{**kwargs, "past_key_values": cache})
        _copy_into(own, cache)
        out = self._generate(*args, **{**kwargs, "past_key_values": cache})
        _copy_back(cache, own)
        if not torch.is_tensor(out):
            out.past_key_values = own
        return out

    def record_warm_up(self, started: float) -> float:
        self.warm_up_s = time.perf_counter() - started
        return self.warm_up_s


def _steps_without(prepare, keys: tuple[str, ...]):
    """`prepare` (a model's `prepare_inputs_for_generation`) without `keys` in a decode step (transformers marks the
    prefill `is_first_iteration`): the steps of photos, clips and follow-ups are then one graph, with the same
    keyword arguments. Its signature is `prepare`'s (`generate` reads it)."""

    @functools.wraps(prepare)
    def prepare_inputs(*args, **kwargs) -> dict:
        inputs = prepare(*args, **kwargs)
        if not kwargs.get("is_first_iteration", False):
            for key in keys:
                inputs.pop(key, None)
        return inputs

    return prepare_inputs


def _positions_in_one_shape(model, prepare):
    """`prepare` (a model's `_prepare_position_ids_for_generation`) giving a continuation's M-RoPE positions in a
    fresh prompt's shape: transformers' Qwen-VL models give a prompt's as [4, B, L] (the plain text positions, then
    the three rotary rows) and a continuation's, on a filled cache, as [1, B, L] (the rotary positions: text
    positions plus the cached offset, the same on all three axes). Two shapes make the decode step two graphs (an
    introduction's size question and follow-ups continue a cache); in the first shape the rotary rows are the same
    numbers, and the text row is what a prompt's is (it builds no mask where an attention mask is given)."""
    from transformers.generation.utils import GenerationMixin

    @functools.wraps(prepare)
    def positions(inputs_tensor, model_kwargs):
        ids = prepare(inputs_tensor, model_kwargs)
        if torch.is_tensor(ids) and ids.ndim == 3 and ids.shape[0] == 1:
            plain = GenerationMixin._prepare_position_ids_for_generation(model, inputs_tensor, model_kwargs)
            ids = torch.cat([plain[None].to(ids.dtype), ids.expand(3, -1, -1)])
        return ids

    return positions


def _is_static(cache) -> bool:
    return cache is not None and all(getattr(layer, "is_compileable", False) for layer in cache.layers)


def _copy_into(own, static) -> None:
    """The keys and values of the caller's cache (layers of [B, H_kv, T0, D]) into the emptied static cache:
    its first T0 positions, and its length T0."""
    for mine, shared in zip(own.layers, static.layers, strict=True):
        if getattr(mine, "is_initialized", False) and mine.keys is not None and mine.keys.shape[-2] > 0:
            shared.update(mine.keys, mine.values)


def _copy_back(static, own) -> None:
    """The whole sequence the static cache now holds (the caller's T0 tokens, the new prompt tokens and all
    generated tokens but the last) into the caller's cache, as tensors of its own [B, H_kv, T, D]."""
    own.reset()
    length = int(static.get_seq_length())  # every layer holds as many: one read of the device, not one a layer
    for shared, mine in zip(static.layers, own.layers, strict=True):
        if shared.is_initialized:
            mine.update(shared.keys[:, :, :length].clone(), shared.values[:, :, :length].clone())


def compile_counts() -> dict:
    """Graphs dynamo has compiled in this process, and how many of those compilations were recompilations (a
    guard failed on a frame compiled before): the benchmark reports them to show the decode step compiles once."""
    from torch._dynamo import convert_frame
    from torch._dynamo.utils import counters

    per_frame = getattr(convert_frame, "FRAME_COMPILE_COUNTER", {})
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "frames_compiled": int(counters["frames"]["ok"]),
        "recompiles": int(sum(max(0, count - 1) for count in per_frame.values())),
    }
