"""Rows worked on a fixed-size batch at a time (samplers, decoders, reconstructions)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.chunks import chunk_size, map_chunks, padded_chunks


def test_every_chunk_has_the_full_size_and_the_last_repeats_its_final_row():
    rows = {"labels": np.arange(10), "images": np.arange(10 * 2).reshape(10, 2)}
    chunks = list(padded_chunks(rows, 4))
    assert [count for _, count in chunks] == [4, 4, 2]
    assert all(chunk["images"].shape == (4, 2) and chunk["labels"].shape == (4,) for chunk, _ in chunks)
    np.testing.assert_array_equal(chunks[2][0]["labels"], [8, 9, 9, 9])
    np.testing.assert_array_equal(chunks[2][0]["images"][2:], [[18, 19], [18, 19]])
    kept = np.concatenate([chunk["labels"][:count] for chunk, count in chunks])
    np.testing.assert_array_equal(kept, rows["labels"])
    assert [count for _, count in padded_chunks(np.zeros((8, 3)), 4)] == [4, 4]  # no padding when it divides
    assert list(padded_chunks(np.zeros((0, 3)), 4)) == []


def test_chunk_sizes_are_powers_of_two_up_to_the_largest():
    assert [chunk_size(n, 64) for n in (1, 2, 3, 16, 17, 24, 64, 65, 2000)] == [1, 2, 4, 16, 32, 32, 64, 64, 64]


def test_mapped_chunks_join_to_what_one_call_on_every_row_gives():
    seen = []

    def double_and_sum(chunk, index):  # a pytree out; each call sees a full chunk and its index
        seen.append((index, len(chunk["x"])))
        return {"doubled": jnp.asarray(chunk["x"]) * 2, "sums": (jnp.sum(chunk["y"], axis=1), chunk["x"] + index)}

    rows = {"x": np.arange(10, dtype=np.float32), "y": np.arange(30, dtype=np.int32).reshape(10, 3)}
    out = map_chunks(double_and_sum, rows, 4)
    assert seen == [(0, 4), (1, 4), (2, 4)]
    np.testing.assert_array_equal(out["doubled"], rows["x"] * 2)
    np.testing.assert_array_equal(out["sums"][0], rows["y"].sum(1))
    np.testing.assert_array_equal(out["sums"][1], rows["x"] + np.repeat([0, 1, 2], 4)[:10])
    assert isinstance(out["doubled"], np.ndarray) and out["sums"][0].dtype == np.int32


def test_no_rows_give_empty_results_of_the_right_shapes_without_a_call():
    traced = []

    def embed(chunk, _):
        traced.append(isinstance(chunk, jax.core.Tracer))
        return jnp.zeros((len(chunk), 5, 7), jnp.bfloat16), jnp.mean(chunk, axis=1)

    tokens, pooled = map_chunks(embed, np.zeros((0, 3), np.float32), 4)
    assert traced == [True]  # traced for shapes only
    assert (tokens.shape, tokens.dtype, pooled.shape, pooled.dtype) == ((0, 5, 7), jnp.bfloat16, (0,), np.float32)


def test_a_named_progress_bar_counts_the_chunks_when_there_are_several(capsys):
    rows = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(map_chunks(lambda chunk, _: chunk * 2, rows, 4, progress="draw"), rows * 2)
    shown = capsys.readouterr().err
    assert "draw:" in shown and "/3 " in shown  # three chunks counted
    map_chunks(lambda chunk, _: chunk, rows[:4], 4, progress="draw")  # one chunk: no bar
    map_chunks(lambda chunk, _: chunk, rows, 4)  # no name: no bar
    assert capsys.readouterr().err == ""
