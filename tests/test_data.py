"""The streaming pipeline's promises: same seed same batches, exact resume, disjoint
process shares, packing that loses nothing, and the LM data the trainer gets."""

import itertools
import json
import re

import numpy as np
import pytest

from jaxgen.data.lm import build_lm_data, eval_batches, train_batches
from jaxgen.data.packing import batch_rows, pack_documents
from jaxgen.data import pipeline as data_pipeline
from jaxgen.data.pipeline import merged_position
from jaxgen.data.sources import mixed_documents, one_pass_documents, open_documents
from jaxgen.data.splits import HoldOut, Shard
from jaxgen.data.sentencepiece_tokenizer import BOS_ID, EOS_ID
from jaxgen.errors import ConfigError, DataError

from conftest import tiny_config
from helpers import assert_resumes_exactly, assert_same_batches, take


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Two files of numbered documents, small enough that an epoch is a few batches."""
    directory = tmp_path_factory.mktemp("corpus")
    for name, docs in [("a.txt", range(0, 60)), ("b.txt", range(60, 100))]:
        (directory / name).write_text("".join(f"document {i} says {'amen ' * (i % 7)}\n" for i in docs))
    return str(directory / "*.txt")


def test_batches_have_the_trainer_fields_and_shapes(tokenizer):
    cfg = tiny_config("data.batch_size=8", "data.seq_len=32")
    batch = next(train_batches(cfg.data, tokenizer, Shard()))
    assert {name: (x.shape, x.dtype.name) for name, x in batch.items()} == {
        "inputs": ((8, 32), "int32"), "targets": ((8, 32), "int32"), "weights": ((8, 32), "float32"),
        "segment_ids": ((8, 32), "int32"), "positions": ((8, 32), "int32"),
    }
    # Next-token pairs: within a document, each target is the next row's input.
    same_doc = batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
    np.testing.assert_array_equal(batch["targets"][:, :-1][same_doc], batch["inputs"][:, 1:][same_doc])


def test_same_seed_same_batches_other_seed_other_batches(tokenizer, small_corpus):
    def first(seed):
        cfg = tiny_config(f"data.text={small_corpus}", f"data.seed={seed}", "data.batch_size=4",
                          "data.seq_len=16", "data.shuffle_window=20")
        return take(train_batches(cfg.data, tokenizer, Shard()), 5)

    assert_same_batches(first(0), first(0))
    assert not np.array_equal(first(0)[0]["inputs"], first(1)[0]["inputs"])


# With 2 workers and 1 batch consumed, one worker is mid-stream and the other untouched.
@pytest.mark.parametrize("workers,consumed", [(0, 0), (0, 3), (0, 60), (2, 1)],
                         ids=["start", "mid-epoch", "across-epochs", "workers"])
def test_resume_gives_exactly_the_uninterrupted_stream(tokenizer, small_corpus, workers, consumed):
    # 98 short training documents fill ~30 batches of 4x16 tokens, so 60 batches cross an epoch boundary
    # in every reader stream (the window shuffle's recorded start lags the window behind).
    cfg = tiny_config(f"data.text={small_corpus}", "data.batch_size=4", "data.seq_len=16",
                      "data.shuffle_window=20", f"data.workers={workers}")
    assert_resumes_exactly(lambda: train_batches(cfg.data, tokenizer, Shard()), consumed)


def test_more_workers_than_cores_is_refused_before_any_process_starts(tokenizer, monkeypatch):
    """data.workers=1000000000000 took the host's memory for minutes before anything said why."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    cfg = tiny_config("data.workers=3")
    with pytest.raises(ConfigError, match=r"^data.workers=3 asks for more worker processes than the 2 CPU cores "
                                          r"this process may use; give at most 2 \(0 reads"):
        train_batches(cfg.data, tokenizer, Shard())


@pytest.mark.parametrize("workers", [0, 2])
def test_the_global_batch_and_its_position_do_not_depend_on_the_process_count(tokenizer, small_corpus, workers):
    base = [f"data.text={small_corpus}", "data.seq_len=16", "data.shuffle_window=20", f"data.workers={workers}"]
    cfg = tiny_config(*base, "data.batch_size=8")

    def pipelines(processes: int, position: dict | None = None) -> list:
        made = [train_batches(cfg.data, tokenizer, Shard(i, processes)) for i in range(processes)]
        for pipeline in made if position is not None else ():
            pipeline.set_state(json.loads(json.dumps(position)))  # as a checkpoint stores it
        return made

    def global_batches(made: list, n: int) -> list[dict]:
        per_process = [take(pipeline, n) for pipeline in made]
        return [{k: np.concatenate([p[b][k] for p in per_process]) for k in per_process[0][b]} for b in range(n)]

    one, two = pipelines(1), pipelines(2)
    assert_same_batches(global_batches(two, 3), global_batches(one, 3))
    # Saved on two processes, resumed on one; and saved on one, resumed on two.
    from_two = merged_position([p.get_state() for p in two])
    from_one = merged_position([one[0].get_state()])
    expected = global_batches(one, 4)
    assert_same_batches(global_batches(pipelines(1, from_two), 4), expected)
    assert_same_batches(global_batches(pipelines(2, from_one), 4), expected)
    assert merged_position([one[0].get_state()])["streams"].keys() == {str(s) for s in range(8)}
    assert (tiny_config("data.batch_size=8", "data.streams=4").data.reader_streams,
            tiny_config("data.batch_size=12").data.reader_streams) == (4, 4)
    # A resume cannot take other streams than it saved: the advice to set data.streams led to a second refusal.
    with pytest.raises(ConfigError, match=r"data.streams=8 must be a multiple of the 3 processes, which share the "
                                          r"streams; run on 1, 2, 4 or 8 processes, or, in a new run, set "
                                          r"data.streams to a multiple of 3 \(a run resumes only with the streams"):
        train_batches(cfg.data, tokenizer, Shard(0, 3))
    more = train_batches(tiny_config(*base, "data.batch_size=16", "data.streams=16").data, tokenizer, Shard())
    with pytest.raises(DataError, match=r"^the saved data position holds 8 reader streams, not the 16 of data.streams "
                                        r"now \(none for streams \['8', .*\]\): resume with data.streams=8 on a "
                                        r"process count that divides it, or start a new run from these weights with "
                                        r"checkpoint.init_from$"):
        more.set_state(from_one)


def test_sixty_batches_of_the_small_corpus_cross_an_epoch_boundary(tokenizer, small_corpus):
    cfg = tiny_config(f"data.text={small_corpus}", "data.batch_size=4", "data.seq_len=16", "data.shuffle_window=20")
    batches = train_batches(cfg.data, tokenizer, Shard())
    take(batches, 60)
    documents, streams = len(list(one_pass_documents(cfg.data, "train"))), cfg.data.reader_streams
    for stream in batches.get_state()["streams"].values():  # every reader stream is past its first epoch:
        # reader s of n reads places s, s + n, ... of the epochs' permutations laid end to end
        assert int(re.search(r"'next_index': (\d+)", stream).group(1)) * streams >= documents, stream
    batches.close()


@pytest.mark.parametrize("source", ["text", "array_record"])
def test_two_processes_read_disjoint_shares_that_cover_the_data(source, small_corpus, tmp_path):
    if source == "text":
        cfg = tiny_config(f"data.text={small_corpus}")
    else:
        from array_record.python.array_record_module import ArrayRecordWriter

        writer = ArrayRecordWriter(str(tmp_path / "docs.array_record"), "group_size:1")
        for i in range(101):
            writer.write(f"record {i}".encode())
        writer.close()
        cfg = tiny_config(f"data.array_record={tmp_path}/*.array_record")
    shares = [list(open_documents(cfg.data, cfg.data, "train", Shard(i, 2), seed=3, epochs=1)) for i in range(2)]
    everything = list(one_pass_documents(cfg.data, "train"))
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(everything)
    assert abs(len(shares[0]) - len(shares[1])) <= 1


def test_held_out_documents_never_reach_training(small_corpus):
    cfg = tiny_config(f"data.text={small_corpus}", "data.eval_every_nth_doc=5", "data.eval_block=4")
    train = list(one_pass_documents(cfg.data, "train"))
    held_out = list(one_pass_documents(cfg.data, "eval"))
    assert [d.split()[1] for d in held_out] == [str(i) for i in range(100) if i % 20 >= 16]  # every 5th block of 4
    assert len(train) == 80 and not set(train) & set(held_out)


def test_packing_keeps_every_token_once_and_marks_boundaries(tokenizer, small_corpus):
    cfg = tiny_config(f"data.text={small_corpus}")
    documents = list(one_pass_documents(cfg.data, "train"))
    stream = open_documents(cfg.data, cfg.data, "train", Shard(), seed=None, epochs=1)
    rows = list(batch_rows(pack_documents(stream, tokenizer, 24), 1))
    inputs, targets, segments, positions = (np.concatenate([r[k][0] for r in rows])
                                            for k in ("inputs", "targets", "segment_ids", "positions"))
    real = segments > 0  # the stream's tail is padded, with zero weight
    assert all((r["weights"] == (r["segment_ids"] > 0)).all() for r in rows)
    expected = np.concatenate([[BOS_ID, *tokenizer.encode_document(d)] for d in documents])
    np.testing.assert_array_equal(inputs[real], expected)
    np.testing.assert_array_equal(targets[real], np.concatenate([[*tokenizer.encode_document(d), EOS_ID] for d in documents]))
    assert (inputs[real] == BOS_ID).sum() == len(documents)
    for r in rows:
        seg, pos = r["segment_ids"][0], r["positions"][0]
        # Segments count the documents (or pieces of one) in a row from 1; positions count
        # from 0 within each segment; every segment but a row's first starts with BOS.
        kept = seg[seg > 0]
        assert kept[0] == 1 and set(np.diff(kept)) <= {0, 1}
        segment_starts = np.flatnonzero(np.diff(seg, prepend=0) != 0)
        np.testing.assert_array_equal(np.flatnonzero((pos == 0) & (seg > 0)), segment_starts[seg[segment_starts] > 0])
        assert (r["inputs"][0][segment_starts[seg[segment_starts] > 1]] == BOS_ID).all()


def test_mixture_draws_documents_by_weight(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"alpha {i}\n" for i in range(500)))
    (tmp_path / "b.txt").write_text("".join(f"beta {i}\n" for i in range(500)))
    cfg = tiny_config(f"data.mixture=[{{text: '{tmp_path}/a.txt', weight: 3}}, {{text: '{tmp_path}/b.txt', weight: 1}}]")
    drawn = list(itertools.islice(mixed_documents(cfg.data, "train", Shard()), 400))
    assert sum(d.startswith("alpha") for d in drawn) == 300


def test_eval_batches_are_fixed_and_per_process_rows_tile_the_global_batch(tokenizer):
    cfg = tiny_config("data.batch_size=8", "data.seq_len=32")
    whole = eval_batches(cfg.data, tokenizer, 3, Shard())
    assert_same_batches(whole, eval_batches(cfg.data, tokenizer, 3, Shard()))
    halves = [eval_batches(cfg.data, tokenizer, 3, Shard(i, 2)) for i in range(2)]
    for full, first, second in zip(whole, *halves):
        np.testing.assert_array_equal(full["inputs"], np.concatenate([first["inputs"], second["inputs"]]))


def test_build_lm_data_on_the_bundled_corpus_trains_and_stores_the_tokenizer(tmp_path):
    cfg = tiny_config("data.batch_size=8")
    data = build_lm_data(cfg, tmp_path, Shard(1, 2))
    assert data.tokenizer.vocab_size == 512 and (tmp_path / "tokenizer.model").is_file()
    assert next(data.train)["inputs"].shape == (4, 64)
    assert len(data.eval) == cfg.train.eval_batches and data.eval[0]["inputs"].shape == (4, 64)
    data.train.close()


def test_held_out_split_is_the_same_every_nth_rule_everywhere():
    rule = HoldOut(3, "train")
    assert [rule.ordinal(i) for i in range(5)] == [i for i in range(8) if rule.keeps(i)][:5]
    assert rule.size(7) == 5 and HoldOut(3, "eval").size(7) == 2


@pytest.mark.parametrize("config", ["dit_digits", "gan_fashion"])
def test_held_out_noise_and_times_do_not_depend_on_the_process_count(config, monkeypatch):
    """Each process drew the held-out batches' fixed noise (and a DiT's grid times) for its own rows alone: two
    processes scored other noise than one, and the loop's eval_loss depended on the process count."""
    from jaxgen.config import load_config
    from jaxgen.tasks import make_task

    from helpers import REPO

    cfg = load_config(REPO / "configs" / f"{config}.yaml", ["data.batch_size=8"])
    task = make_task(cfg)

    def held_out(shard: Shard) -> list[dict]:
        monkeypatch.setattr(data_pipeline, "this_process", lambda: shard)
        rows = 8 // shard.count
        return task.with_fixed_noise([{"labels": np.arange(rows) + shard.index * rows} for _ in range(3)])

    one, halves = held_out(Shard(0, 1)), [held_out(Shard(index, 2)) for index in range(2)]
    for whole, first, second in zip(one, *halves, strict=True):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])
    assert not np.array_equal(one[0]["noise"], one[1]["noise"])  # each batch its own noise
