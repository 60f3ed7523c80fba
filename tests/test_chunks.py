"""Rows worked on a fixed-size batch at a time (samplers, decoders, reconstructions)."""

import numpy as np

from jaxgen.chunks import chunk_size, padded_chunks


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
