"""The rows the bidirectional families train on, built from real documents through the real pipeline.

Masked-LM rows pack whole [BOS] ... [EOS] pieces and mask only their text;
span-corruption rows hide exactly what their targets list; supervised pairs keep
each input with its own target; every row marks its documents so that none
attends to another; and the stream resumes exactly where it was.
"""

import itertools
import json
import pathlib

import numpy as np
import pytest

from jaxgen.config import load_config
from jaxgen.data.bidirectional import (
    build_text_rows,
    held_out_pairs,
    sentinels_needed,
    special_ids,
    training_pairs,
)
from jaxgen.data.corpus import BUNDLED_CORPUS, iter_documents
from jaxgen.data.splits import Shard
from jaxgen.data.tokenizer import MASK_PIECE, sentinel_piece
from jaxgen.errors import DataError

from helpers import assert_resumes_exactly, take

SMALL = ["data.batch_size=8", "data.seq_len=32", "model.vocab_size=320", "train.eval_batches=2"]


@pytest.fixture(scope="module")
def verses(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "verses.txt"
    path.write_text("\n".join(itertools.islice(iter_documents([BUNDLED_CORPUS]), 1500)) + "\n")
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Words spelled out -> the same letters in capitals, reversed."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    lines, words = [], set()
    while len(words) < 600:
        word = "".join(rng.choice(list("abcdefgh"), rng.integers(3, 7)))
        if word in words:
            continue
        words.add(word)
        lines.append(json.dumps({"spelling": " ".join(word), "reversed": " ".join(word[::-1].upper())}))
    path.write_text("\n".join(lines) + "\n")
    return path


def rows_of(kind, tmp_path, *overrides):
    cfg = load_config(None, [f"model.kind={kind}", *SMALL, *overrides])
    return cfg, build_text_rows(cfg, tmp_path / "run", Shard())


def segments_of(row_tokens, segments):
    return [row_tokens[segments == s] for s in range(1, segments.max() + 1)]


def test_masked_lm_rows_pack_whole_pieces_and_mask_only_their_text(verses, tmp_path):
    cfg, data = rows_of("encoder", tmp_path, f"data.text={verses}", "model.max_seq_len=32")
    tok = data.tokenizer
    mask_id = tok.piece_id(MASK_PIECE)
    assert mask_id == 3
    batches = take(data.train, 4)
    for batch in batches:
        for inputs, targets, weights, segments, positions in zip(batch["inputs"], batch["targets"], batch["weights"],
                                                                 batch["segment_ids"], batch["positions"]):
            assert segments.max() >= 1 and np.all(np.diff(segments[segments > 0]) >= 0)
            for s in range(1, segments.max() + 1):
                piece = targets[segments == s]
                assert piece[0] == tok.bos_id and piece[-1] == tok.eos_id  # [CLS] ... [SEP], whole
                assert list(positions[segments == s]) == list(range(len(piece)))
            maskable = (segments > 0) & (targets != tok.bos_id) & (targets != tok.eos_id)
            assert not np.any(weights[~maskable])  # never [CLS], [SEP] or padding
            k = max(1, round(cfg.mlm.mask_rate * maskable.sum()))
            assert weights.sum() == k
            assert np.array_equal(inputs[weights == 0], targets[weights == 0])  # the rest untouched
            chosen = inputs[weights == 1]
            assert (chosen == mask_id).sum() == round(k * 0.8)
            random = chosen[(chosen != mask_id) & (chosen != targets[weights == 1])]
            assert not set(random.tolist()) & set(special_ids(tok))
    # Long verses are split into pieces of at most a row; none is lost or repeated within the held-out set.
    held_out_text = [t for b in data.eval for t in b["targets"][b["segment_ids"] > 0].tolist()]
    assert tok.bos_id in held_out_text and len(data.eval) == 2


def test_span_corruption_rows_hide_exactly_what_their_targets_list(verses, tmp_path):
    cfg, data = rows_of("encoder_decoder", tmp_path, f"data.text={verses}", "data.target_len=16")
    tok = data.tokenizer
    sentinels = [tok.piece_id(sentinel_piece(i)) for i in range(sentinels_needed(cfg))]
    assert None not in sentinels and len(sentinels) >= 1
    for batch in take(data.train, 3):
        for row in range(len(batch["inputs"])):
            inputs, in_seg = batch["inputs"][row], batch["input_segments"][row]
            targets, tgt_seg = batch["targets"][row], batch["target_segments"][row]
            assert set(in_seg[in_seg > 0]) == set(tgt_seg[tgt_seg > 0])  # every pair whole in the row
            for s in range(1, in_seg.max() + 1):
                source, target = inputs[in_seg == s].tolist(), targets[tgt_seg == s].tolist()
                assert source[-1] == target[-1] == tok.eos_id
                # Re-inserting each span at its sentinel gives back a run of ordinary text.
                spans, current = {}, None
                for t in target[:-1]:
                    if t in sentinels:
                        current = t
                        spans[current] = []
                    else:
                        spans[current].append(t)
                assert target[0] == sentinels[0] and list(spans) == [s_ for s_ in source if s_ in sentinels]
                restored = [t for s_ in source[:-1] for t in (spans[s_] if s_ in sentinels else [s_])]
                assert not set(restored) & set(sentinels) and len(restored) >= 2
            shifted = batch["targets_in"][row]
            starts = batch["target_positions"][row] == 0
            assert np.all(shifted[starts & (tgt_seg > 0)] == tok.bos_id)
            inside = (~starts) & (tgt_seg > 0)
            assert np.array_equal(shifted[1:][inside[1:]], targets[:-1][inside[1:]])


def test_supervised_pairs_keep_each_input_with_its_own_target(pairs_file, tmp_path):
    cfg, data = rows_of("encoder_decoder", tmp_path, f"data.jsonl={pairs_file}", "data.input_field=spelling",
                        "data.target_field=reversed", "data.eval_every_nth_doc=5", "data.eval_block=1",
                        "data.target_len=32", "model.vocab_size=280")
    tok = data.tokenizer
    batch = take(data.train, 1)[0]
    decoded = []
    for row in range(len(batch["inputs"])):
        in_seg, tgt_seg = batch["input_segments"][row], batch["target_segments"][row]
        assert in_seg.max() > 1  # short pairs share a row
        for s in range(1, in_seg.max() + 1):
            source = tok.decode(batch["inputs"][row][in_seg == s].tolist())
            target = tok.decode(batch["targets"][row][tgt_seg == s].tolist())
            decoded.append((source, target))
    for source, target in decoded:
        assert target == " ".join(source.replace(" ", "")[::-1].upper())
    held = held_out_pairs(cfg.data, 1000)
    train = training_pairs(cfg.data, 10_000)
    assert len(held) == 120 and len(train) == 480
    assert {json.dumps(p) for p in held}.isdisjoint(json.dumps(p) for p in train)
    assert all(t == " ".join(s.replace(" ", "")[::-1].upper()) for s, t in held)


def test_pairs_longer_than_their_rows_are_cut_and_said_to_be(pairs_file, tmp_path, caplog):
    """Pairs longer than data.seq_len / data.target_len were cut to fit without a word, and a cut target (ending
    in EOS) teaches the model to stop early."""
    fields = [f"data.jsonl={pairs_file}", "data.input_field=spelling", "data.target_field=reversed",
              "data.eval_every_nth_doc=5", "data.eval_block=1", "model.vocab_size=280"]
    with caplog.at_level("WARNING", logger="jaxgen"):
        rows_of("encoder_decoder", tmp_path / "fits", *fields, "data.target_len=32")
    assert "do not fit their rows" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxgen"):
        cfg, data = rows_of("encoder_decoder", tmp_path / "cut", *fields, "data.target_len=4")
    lengths = [len(data.tokenizer.encode_document(t)) + 1 for _, t in training_pairs(cfg.data, 1000)]
    longer = [n for n in lengths if n > 4]
    assert 0 < len(longer) < len(lengths)
    assert (f"{len(longer)} of the first 480 training pairs of data.jsonl do not fit their rows: {len(longer)} "
            f"targets longer than data.target_len=4 (the longest {max(longer)} tokens, EOS included); they are cut "
            f"to fit, so the model learns from cut text (a cut target teaches it to stop early); raise "
            f"data.target_len to {max(longer)} to hold them") in caplog.text
    batch = take(data.train, 1)[0]
    assert batch["target_segments"].shape[1] == 4 and data.tokenizer.eos_id in batch["targets"][0]


def test_a_pairs_line_without_its_field_is_one_line_naming_it(pairs_file, tmp_path):
    """The pair is read after its place in the files is dropped; the message still names the file and line."""
    bad = tmp_path / "bad.jsonl"
    lines = pairs_file.read_text().splitlines(keepends=True)
    bad.write_text("".join(lines) + json.dumps({"spelling": "a b"}) + "\n")
    with pytest.raises(DataError, match=rf"^line {len(lines) + 1} of '{bad}' \(data.jsonl\) has no field 'reversed' "
                                        r"\(data.target_field\); it holds \['spelling'\]"):
        cfg, data = rows_of("encoder_decoder", tmp_path, f"data.jsonl={bad}", "data.input_field=spelling",
                            "data.target_field=reversed", "data.index_max_mb=0", "model.vocab_size=280")
        take(data.train, 200)


def test_a_refused_pair_names_its_file_and_line_where_it_can_be_found():
    from jaxgen.data.text_pairs import read_pair

    with pytest.raises(DataError, match=r"^a line of data.jsonl is not JSON"):  # no files to search
        read_pair("{", "x", "y")
    with pytest.raises(DataError, match=r"^field 'y' \(data.target_field\) of a line of data.jsonl holds int"):
        read_pair('{"x": "a", "y": 3}', "x", "y", lambda: [pathlib.Path("/nonexistent.jsonl")])


def test_a_given_tokenizer_without_the_mask_piece_is_refused(verses, tmp_path):
    from jaxgen.data.tokenizer import train_tokenizer

    plain = train_tokenizer(iter_documents([verses]), 320, tmp_path / "plain.model")
    with pytest.raises(DataError, match=r"lacks \[MASK\], which masked-LM training"):
        rows_of("encoder", tmp_path, f"data.text={verses}", "model.max_seq_len=32", f"data.tokenizer={plain.path}")


@pytest.mark.parametrize("kind", ["encoder", "encoder_decoder"])
def test_the_row_stream_resumes_exactly(verses, tmp_path, kind):
    cfg = load_config(None, [f"model.kind={kind}", *SMALL, f"data.text={verses}", "model.max_seq_len=32"]
                      if kind == "encoder" else [f"model.kind={kind}", *SMALL, f"data.text={verses}"])
    build_text_rows(cfg, tmp_path / "run", Shard())  # trains the tokenizer once

    def make_batches():
        return build_text_rows(cfg, tmp_path / "run", Shard()).train

    assert_resumes_exactly(make_batches, consumed=3, following=3)
