"""The attention capture: exact rows at the chosen layers only, in prefill and in cached decoding."""

import threading

import torch
from conftest import eager_model, photo, reference_inputs, tiny_engine

from ego.attention import AttentionCapture, capturing


def test_captured_rows_equal_eager_rows_in_prefill_and_decode():
    family = "qwen2.5-vl"
    engine = tiny_engine(family)
    inputs = reference_inputs(engine, photo(3))
    ids = inputs["input_ids"]
    start = ids.shape[1]
    extra = torch.tensor([[5, 17, 42, 99]])  # four text tokens after the prompt
    full = torch.cat([ids, extra], dim=1)
    columns = (ids[0] == engine.model.config.image_token_id).nonzero().squeeze(1)
    capture = AttentionCapture(layers=frozenset({1, 3}), columns=columns, first_row=start)
    mm = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}

    def per_token(length):
        return dict(
            attention_mask=torch.ones(1, length, dtype=torch.long),
            mm_token_type_ids=torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros(1, length - start, dtype=torch.long)], 1
            ),
        )

    with capturing(capture), torch.no_grad():
        # prefill over prompt + 3 tokens, then a cached step whose only new query row is the 4th token
        first = engine.model.generate(
            input_ids=full[:, :-1],
            **per_token(full.shape[1] - 1),
            **mm,
            max_new_tokens=1,
            do_sample=False,
            return_dict_in_generate=True,
        )
        grid = {"image_grid_thw": inputs["image_grid_thw"]}  # the image is in the cache: no pixels again
        engine.model.generate(
            input_ids=full,
            **per_token(full.shape[1]),
            **grid,
            past_key_values=first.past_key_values,
            max_new_tokens=1,
            do_sample=False,
        )
    assert set(capture.rows) == {1, 3}  # only the chosen layers
    assert {start, start + 1, start + 2, start + 3} <= capture.recorded_positions()
    assert min(capture.recorded_positions()) == start  # nothing before first_row
    with torch.no_grad():
        eager = eager_model(family)(input_ids=full, **per_token(full.shape[1]), **mm, output_attentions=True).attentions
    for layer in (1, 3):
        for offset in range(4):
            expected = eager[layer][0, :, start + offset, columns]  # [H, N_r]
            torch.testing.assert_close(capture.rows[layer][start + offset], expected, atol=1e-6, rtol=1e-5)
    matrix = capture.matrix([start, start + 3])
    assert matrix.shape == (2, eager[1].shape[1], 2, columns.numel())  # [|L|, H, N_w, N_r]


def test_nothing_is_recorded_outside_a_capture():
    engine = tiny_engine("qwen2-vl")
    capture = AttentionCapture(layers=frozenset({0}), columns=torch.arange(3), first_row=0)
    inputs = reference_inputs(engine, photo(0))
    with torch.no_grad():
        engine.model(**inputs)
    assert capture.rows == {}


def _prompt_capture(engine, inputs) -> AttentionCapture:
    """A capture of every prompt row's attention over the image, at the engine's layers."""
    columns = (inputs["input_ids"][0] == engine.model.config.image_token_id).nonzero().squeeze(1)
    return AttentionCapture(layers=frozenset(engine.layers), columns=columns, first_row=0)


def test_two_engines_capturing_in_two_threads_each_get_their_own_rows():
    engines = [tiny_engine("qwen2-vl"), tiny_engine("qwen2.5-vl")]
    inputs = [reference_inputs(engine, photo(4 + i)) for i, engine in enumerate(engines)]
    alone = []
    for engine, given in zip(engines, inputs):
        with capturing(_prompt_capture(engine, given)) as capture, torch.no_grad():
            engine.model(**given)
        alone.append(capture)

    # Both captures are open before either model runs, and stay open until both have run.
    both_open, both_ran = threading.Barrier(2, timeout=60), threading.Barrier(2, timeout=60)
    together, failures = [None, None], []

    def run(index):
        try:
            engine, given = engines[index], inputs[index]
            with capturing(_prompt_capture(engine, given)) as capture, torch.no_grad():
                both_open.wait()
                engine.model(**given)
                both_ran.wait()
            together[index] = capture
        except Exception as error:  # noqa: BLE001 -- reported in the test's thread below
            failures.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    for engine, given, capture, expected in zip(engines, inputs, together, alone):
        length = given["input_ids"].shape[1]
        assert capture.recorded_positions() == set(range(length))
        for layer in engine.layers:
            assert set(capture.rows[layer]) == set(range(length))
            for position in range(length):
                torch.testing.assert_close(capture.rows[layer][position], expected.rows[layer][position])
