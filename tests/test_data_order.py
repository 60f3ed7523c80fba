"""Where the batches come from: the first ones draw from the whole corpus, however ordered its
files; the held-out batches are the held-out documents, each exactly once; and `jaxgen data
inspect` names the documents the trainer actually consumes.

The corpora's documents carry their number ("doc 1234 ..."), in corpus order.
"""

import glob
import json
import logging
import pathlib
import re

import numpy as np
import pytest
from scipy import stats

from jaxgen.config import with_overrides
from jaxgen.data.corpus import iter_documents
from jaxgen.data.inspect import inspect_data
from jaxgen.data.lm import eval_batches, held_out_set, train_batches
from jaxgen.data.pipeline import merged_position
from jaxgen.data.sources import one_pass_documents
from jaxgen.data.splits import HoldOut, Shard
from jaxgen.data.streaming import FILE_STRIDE, PIECE_BYTES, PIECES_AT_ONCE, DocumentStream
from jaxgen.data.sentencepiece_tokenizer import BOS_ID
from jaxgen.errors import DataError

from conftest import tiny_config
from helpers import assert_resumes_exactly, assert_same_batches, error_lines, run_jaxgen, take

N_DOCS = 60_000  # 1.2 MB of text: a streamed file is cut into 19 pieces, more than are read at once
WORDS = ["amen", "selah", "and", "the", "word", "light"]


def document(i: int) -> str:
    return f"doc {i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(i % 5))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The same ordered corpus as one file and as six files (their names sort in corpus order)."""
    root = tmp_path_factory.mktemp("ordered")
    (root / "one").mkdir()
    (root / "one" / "all.txt").write_text("".join(document(i) + "\n" for i in range(N_DOCS)))
    (root / "six").mkdir()
    for f in range(6):
        part = range(f * N_DOCS // 6, (f + 1) * N_DOCS // 6)
        (root / "six" / f"part-{f}.txt").write_text("".join(document(i) + "\n" for i in part))
    return {"one file": f"{root}/one/*.txt", "six files": f"{root}/six/*.txt"}


READ = {"indexed": ["data.index_max_mb=256"], "streamed": ["data.index_max_mb=0", "data.shuffle_window=2000"]}
BATCH = ["data.batch_size=32", "data.seq_len=64"]


def corpus_numbers(pattern: str) -> dict[int, int]:
    """A streamed document's number in `sources.numbered_documents` (file, byte offset) -> its corpus number."""
    numbers = {}
    for f, path in enumerate(sorted(map(pathlib.Path, glob.glob(pattern)))):
        offset = 0
        for line in path.read_bytes().splitlines(keepends=True):
            numbers[f * FILE_STRIDE + offset] = int(line.split()[1])
            offset += len(line)
    return numbers


def starts(batches: list[dict]) -> list[tuple[int, int]]:
    """(source, number) of every document starting in the batches, batch by batch, row by row."""
    return [(int(s), int(i)) for b in batches
            for s, i in zip(b["origin_source"][b["inputs"] == BOS_ID], b["origin_index"][b["inputs"] == BOS_ID])]


def first_documents(cfg, tokenizer, batches: int) -> list[int]:
    """The numbers (`sources.numbered_documents`) of the documents starting in the first training batches."""
    pipeline = train_batches(cfg.data, tokenizer, Shard(), origins=True)
    taken = take(pipeline, batches)
    pipeline.close()
    return [i for _, i in starts(taken)]


@pytest.mark.parametrize("layout", ["one file", "six files"])
def test_the_first_batches_draw_from_the_whole_corpus(corpora, tokenizer, layout):
    # Held in memory (at most data.index_max_mb): a new permutation of the whole corpus every epoch. (A shuffle
    # within windows of 1,000 documents would draw the first batches from the corpus's first eighth.)
    cfg = tiny_config(f"data.text={corpora[layout]}", *BATCH, "data.shuffle_window=1000")
    drawn = np.array(first_documents(cfg, tokenizer, 3))
    assert len(drawn) > 400 and len(set(drawn)) == len(drawn)
    # Their positions in the corpus, a sample of the uniform distribution on [0, 1).
    assert stats.kstest(drawn / N_DOCS, "uniform").pvalue > 0.05
    assert np.histogram(drawn, bins=10, range=(0, N_DOCS))[0].min() > 0  # every tenth of the corpus


@pytest.mark.parametrize("layout", ["one file", "six files"])
def test_a_streamed_source_starts_from_pieces_all_over_it(corpora, tokenizer, layout):
    # Too large to hold: each reader stream reads PIECES_AT_ONCE pieces of the files at once, drawn from all of them.
    cfg = tiny_config(f"data.text={corpora[layout]}", *BATCH, *READ["streamed"])
    numbers = corpus_numbers(corpora[layout])
    drawn = first_documents(cfg, tokenizer, 3)
    pieces = {}  # (file, piece) -> the corpus number of the first document drawn from it
    for place in drawn:
        piece = (place // FILE_STRIDE, place % FILE_STRIDE // PIECE_BYTES)
        pieces[piece] = min(pieces.get(piece, N_DOCS), numbers[place])
    assert len(drawn) > 400 and len(pieces) >= PIECES_AT_ONCE
    assert stats.kstest(np.array(list(pieces.values())) / N_DOCS, "uniform").pvalue > 0.05


def test_a_streamed_source_is_read_whole_each_epoch_and_dealt_out_to_readers(corpora):
    cfg = tiny_config(f"data.text={corpora['six files']}", *READ["streamed"])
    from jaxgen.data.sources import open_documents

    def share(index: int, count: int, seed: int | None) -> list[str]:
        return list(open_documents(cfg.data, cfg.data, "train", Shard(index, count), seed=seed, epochs=1))

    in_order = list(one_pass_documents(cfg.data, "train"))
    assert in_order == share(0, 1, None)  # unseeded: the files in order
    shares = [share(i, 3, seed=7) for i in range(3)]
    assert sorted(shares[0] + shares[1] + shares[2]) == sorted(in_order)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert share(0, 3, seed=7) == shares[0] and share(0, 3, seed=8) != shares[0]


@pytest.fixture(scope="module")
def small_streamed(tmp_path_factory):
    """Two files a few batches long, streamed: an epoch ends every few batches."""
    root = tmp_path_factory.mktemp("small")
    (root / "a.txt").write_text("".join(document(i) + "\n" for i in range(0, 4000)))  # two pieces
    (root / "b.txt").write_text("".join(document(i) + "\n" for i in range(4000, 5000)))
    return tiny_config(f"data.text={root}/*.txt", "data.index_max_mb=0", "data.shuffle_window=50",
                       "data.batch_size=16", "data.seq_len=16", "data.eval_every_nth_doc=10")


@pytest.mark.parametrize("consumed, workers", [(0, 0), (7, 0), (300, 0), (7, 2)],
                         ids=["start", "mid-epoch", "across-epochs", "workers"])
def test_a_streamed_source_resumes_exactly(tokenizer, small_streamed, consumed, workers):
    data = with_overrides(small_streamed, [f"data.workers={workers}"]).data
    state = assert_resumes_exactly(lambda: train_batches(data, tokenizer, Shard()), consumed, following=6)
    if consumed == 300:  # every reader stream is past its first epoch
        assert all(re.search(r"'epoch': [1-9]", stream) for stream in state["streams"].values()), state


def test_a_streamed_reader_resumes_exactly_from_any_position(tmp_path):
    # Restored just after a piece's last line, before the reader moves on, the piece's file is not reopened.
    (tmp_path / "a.txt").write_text("".join(document(i) + "\n" for i in range(0, 4000)))  # two pieces
    (tmp_path / "b.txt").write_text("".join(document(i) + "\n" for i in range(4000, 5000)))
    files = sorted(tmp_path.glob("*.txt"))

    def reader() -> DocumentStream:
        return DocumentStream(files, field=None, holdout=HoldOut(5, "train", 3), shard=Shard(1, 2),
                              invalid_utf8="skip", name="test", seed=3)

    uninterrupted, positions, documents = iter(reader()), [], []
    for _ in range(2500):  # past the end of the reader's first epoch (2000 documents)
        positions.append(json.loads(json.dumps(uninterrupted.get_state())))
        documents.append(next(uninterrupted))
    assert positions[-1]["epoch"] == 1
    for k, position in enumerate(positions[:-1]):
        resumed = iter(reader())
        resumed.set_state(position)
        assert [next(resumed), next(resumed)] == documents[k:k + 2], position


def test_a_line_longer_than_many_pieces_is_read_once_and_a_line_of_no_text_file_is_refused(tmp_path, monkeypatch):
    """Every piece inside a long line read that line to its end (a 300 MB file without newlines: 4,600 reads of
    it, minutes before the first step); a line past 64 MiB is no document but a file that is not text."""
    import jaxgen.data.streaming as streaming

    long_line = "word " * (30 * PIECE_BYTES // 5)  # spans 30 pieces
    (tmp_path / "a.txt").write_text(f"first\n{long_line}\nlast\n")
    read = []

    class Counted:  # the stream's files, counting the bytes read from them
        def __init__(self, handle):
            self.handle = handle

        def readline(self, size=-1):
            line = self.handle.readline(size)
            read.append(len(line))
            return line

        def __getattr__(self, name):
            return getattr(self.handle, name)

    real_open = streaming.open_binary
    monkeypatch.setattr(streaming, "open_binary", lambda path: Counted(real_open(path)))
    stream = DocumentStream([tmp_path / "a.txt"], field=None, holdout=None, shard=Shard(), invalid_utf8="skip",
                            name="test", epochs=1)
    assert [len(doc) for _, doc in stream] == [5, len(long_line.rstrip("\n")), 4]
    assert sum(read) < 2 * (tmp_path / "a.txt").stat().st_size
    monkeypatch.setattr("jaxgen.data.corpus.MAX_LINE_BYTES", PIECE_BYTES)
    with pytest.raises(DataError, match=r"a.txt: the line at byte 6 runs past 0.0625 MiB without a newline; documents "
                                        r"are lines of text: leave a file that is not text out of the data"):
        list(stream)
    with pytest.raises(DataError, match="the line at byte 6 runs past"):  # the one-pass reader too
        list(iter_documents([tmp_path / "a.txt"]))


def test_a_streamed_global_batch_does_not_depend_on_the_process_count(tokenizer, small_streamed):
    def global_batches(processes: int, n: int, position: dict | None = None) -> tuple[list[dict], list]:
        made = [train_batches(small_streamed.data, tokenizer, Shard(i, processes)) for i in range(processes)]
        for pipeline in made if position is not None else ():
            pipeline.set_state(json.loads(json.dumps(position)))
        per_process = [take(pipeline, n) for pipeline in made]
        return [{k: np.concatenate([p[b][k] for p in per_process]) for k in per_process[0][b]} for b in range(n)], made

    one, [single] = global_batches(1, 3)
    two, pair = global_batches(2, 3)
    assert_same_batches(two, one)
    expected, _ = global_batches(1, 6)
    assert_same_batches(global_batches(1, 3, merged_position([p.get_state() for p in pair]))[0], expected[3:])
    assert_same_batches(global_batches(2, 3, merged_position([single.get_state()]))[0], expected[3:])


def test_a_position_saved_in_the_older_data_order_is_refused(tokenizer, small_streamed):
    batches = train_batches(small_streamed.data, tokenizer, Shard())
    position = json.loads(json.dumps(batches.get_state()))
    batches.close()
    del position["order"]  # as jaxgen saved it before documents were dealt out from whole-source permutations
    with pytest.raises(DataError, match="saved by an older jaxgen that read the documents in another order; "
                                        "resume it with that version, or start a new run from it"):
        merged_position([position])


# ----------------------------------------------------------------------------- the held-out set


@pytest.mark.parametrize("read", ["indexed", "streamed"])
def test_held_out_batches_hold_every_held_out_document_exactly_once(corpora, tokenizer, read, caplog):
    cfg = tiny_config(f"data.text={corpora['one file']}", *BATCH, *READ[read], "data.eval_every_nth_doc=40",
                      "data.eval_block=5", "train.eval_batches=100")
    held_out = held_out_set(cfg.data, tokenizer, cfg.train.eval_batches, origins=True)
    numbers = corpus_numbers(corpora["one file"]) if read == "streamed" else None
    found = [numbers[i] if numbers else i for _, i in starts(held_out.batches)]
    expected = sorted(int(d.split()[1]) for d in one_pass_documents(cfg.data, "eval"))
    assert sorted(found) == expected and held_out.documents == len(expected) and held_out.whole
    if read == "indexed":  # blocks of 5 contiguous documents, every 40th block
        rule = HoldOut(40, "eval", 5)
        assert expected == [rule.ordinal(i) for i in range(rule.size(N_DOCS))]
    last = held_out.batches[-1]
    assert last["inputs"].shape == (32, 64) and last["weights"][-1].sum() == 0  # padded with zero weight
    assert held_out.tokens == sum(int(b["weights"].sum()) for b in held_out.batches) == sum(
        len(tokenizer.encode_document(document(n))) + 1 for n in expected)

    # Fewer batches than the held-out documents fill: no document twice, the set named not whole.
    fewer = held_out_set(cfg.data, tokenizer, 2, origins=True)
    drawn = starts(fewer.batches)
    assert len(fewer.batches) == 2 and len(set(drawn)) == len(drawn) == fewer.documents and not fewer.whole
    # Each process keeps its rows of the same global batches, and says what they hold.
    with caplog.at_level(logging.INFO, logger="jaxgen"):
        halves = [eval_batches(cfg.data, tokenizer, 2, Shard(i, 2)) for i in range(2)]
    assert (f"held-out: {fewer.documents} documents, {fewer.tokens} tokens in 2 batches, each document once: a fixed "
            "sample of the held-out documents; train.eval_batches=2 batches take no more") in caplog.text
    for whole, *parts in zip(fewer.batches, *halves):
        np.testing.assert_array_equal(whole["inputs"], np.concatenate([p["inputs"] for p in parts]))


def test_a_held_out_set_smaller_than_one_batch_is_refused_naming_the_key(corpora, tokenizer, tmp_path):
    too_few = [f"data.text={corpora['one file']}", "data.eval_every_nth_doc=5000", "data.eval_block=2"]
    with pytest.raises(DataError, match=r"the held-out documents hold \d+ tokens, fewer than one batch of "
                                        r"data.batch_size x data.seq_len = 16 x 64 = 1024; hold out more with a "
                                        r"smaller data.eval_every_nth_doc \(now 5000\) or data.eval_block \(now 2: "
                                        r"held-out documents come in runs of it, the first after 9,998 documents\)"):
        held_out_set(tiny_config(*too_few).data, tokenizer, 8)
    result = run_jaxgen("data", "inspect", "--batches", "1", *too_few, f"data.tokenizer={tokenizer.path}",
                        "model.vocab_size=512")
    [line] = error_lines(result.stderr)
    assert result.returncode == 2 and "smaller data.eval_every_nth_doc (now 5000)" in line
    # A corpus of one long line: no held-out key can help, and the error says why first.
    (tmp_path / "one_line.txt").write_text(" ".join(document(i) for i in range(300)) + "\n")
    with pytest.raises(DataError, match=r"1024; the training data holds only 1 document \(each line of text is one\) "
                                        r"and document 491 would be the first held out: give more documents, or "
                                        r"hold out more with a smaller data.eval_every_nth_doc \(now 50\)"):
        held_out_set(tiny_config(f"data.text={tmp_path}/one_line.txt").data, tokenizer, 8)
    # At data.eval_every_nth_doc's least there is no key to lower: it advised "a smaller one (now 2)".
    with pytest.raises(DataError, match=r"and document 2 would be the first held out: give more documents "
                                        r"\(data.eval_every_nth_doc=2, its least, already holds out every other "
                                        r"one\)$"):
        held_out_set(tiny_config(f"data.text={tmp_path}/one_line.txt", "data.eval_every_nth_doc=2",
                                 "data.eval_block=1").data, tokenizer, 8)


# ----------------------------------------------------------------------------- jaxgen data inspect


@pytest.fixture(scope="module")
def mixture(corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    (root / "other.jsonl").write_text("".join(json.dumps({"text": document(i)}) + "\n" for i in range(3000)))
    return (f"data.mixture=[{{text: '{corpora['six files']}', weight: 3}}, "
            f"{{jsonl: '{root}/other.jsonl', weight: 1}}]")


def test_data_inspect_names_the_documents_the_trainer_consumes(mixture, tokenizer):
    cfg = tiny_config(mixture, *BATCH, "data.index_max_mb=0.5", "train.eval_batches=3")  # the six files streamed
    report = inspect_data(cfg, 3, tokenizer)
    trainer = train_batches(cfg.data, tokenizer, Shard())
    consumed = take(trainer, 3)
    trainer.close()
    numbers = corpus_numbers(cfg.data.mixture[0].text)

    def texts(batches: list[dict]) -> list[str]:
        """The text of each document start in the batches, up to its row's end or the next document."""
        found = []
        for b in batches:
            for row, seg in zip(b["inputs"], b["segment_ids"]):
                for j in np.flatnonzero(row == BOS_ID):
                    found.append(tokenizer.decode(row[j + 1:][seg[j + 1:] == seg[j]].tolist()))
        return found

    files = sorted(glob.glob(cfg.data.mixture[0].text))

    def where(source: int, place: int | str) -> int:
        """The corpus number of a document inspect names: the six files streamed (FILE:OFFSET), the JSONL indexed."""
        if source == 1:
            return place
        path, offset = place.rsplit(":", 1)
        return numbers[files.index(path) * FILE_STRIDE + int(offset)]

    named = report["train_documents"]
    assert len(named) == len(texts(consumed)) > 300
    for (source, place), text in zip(named, texts(consumed)):
        expected = document(where(source, place))
        assert expected.startswith(text) or text.startswith(expected), (source, place, text)
    assert {s for s, _ in named} == {0, 1}
    assert report["sources"] == [f"data.mixture[0].text {cfg.data.mixture[0].text!r}",
                                 f"data.mixture[1].jsonl {cfg.data.mixture[1].jsonl!r}"]
    assert [s["shuffle"] for s in report["shuffle"]["sources"]] == ["window", "whole source, a new permutation every epoch"]

    held_out = held_out_set(cfg.data, tokenizer, 3)
    assert report["eval_total"] == report["eval_distinct"] == held_out.documents == len(report["eval_documents"])
    for (source, place), text in zip(report["eval_documents"], texts(held_out.batches)):
        expected = document(where(source, place))
        assert expected.startswith(text) or text.startswith(expected)


def test_data_inspect_on_the_command_line_prints_one_json_object(tokenizer, corpora):
    overrides = [f"data.text={corpora['one file']}", *BATCH, f"data.tokenizer={tokenizer.path}", "train.eval_batches=2",
                 "model.vocab_size=512"]
    result = run_jaxgen("data", "inspect", "--batches", "2", *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report == json.loads(json.dumps(inspect_data(tiny_config(*overrides), 2, tokenizer)))
    assert report["shuffle"]["streams"] == 8 and report["eval_distinct"] == report["eval_total"]


TEXT_ROWS = "text as masked-token rows or input-target pairs, which it does not show"


@pytest.mark.parametrize("config, reads", [("bert_tiny", TEXT_ROWS), ("t5_tiny", TEXT_ROWS),
                                           ("dit_digits", "images (images.*)")])
def test_inspect_names_what_another_kind_of_model_reads(config, reads):
    """An encoder's config was told it 'reads images'."""
    from jaxgen.config import load_config
    from jaxgen.data.inspect import inspection_tokenizer
    from jaxgen.errors import ConfigError

    from helpers import REPO

    cfg = load_config(REPO / "configs" / f"{config}.yaml")
    with pytest.raises(ConfigError) as refused:
        inspection_tokenizer(cfg)
    assert str(refused.value) == (f"jaxgen data inspect shows a decoder language model's packed documents, but "
                                  f"model.kind={cfg.model.kind} reads {reads}; give a config with "
                                  "model.kind=transformer")
