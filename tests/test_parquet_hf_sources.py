"""A user's own documents as Parquet files (data.parquet) or a Hugging Face dataset (data.hf):
read back as written, shuffled whole, shared out to processes, mixed with other sources,
resumed exactly, accepted by `data prepare` / `tokenizer train`, trained on; and every bad
input one clear line before anything is written."""

import itertools
import json
import logging
import pickle
import sys

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from jaxgen.data.corpus import BUNDLED_CORPUS, iter_documents
from jaxgen.data.hf_datasets import HfDocuments
from jaxgen.data.lm import train_batches
from jaxgen.data.parquet import ParquetDocuments, open_parquet
from jaxgen.data.sources import describe, mixed_documents, one_pass_documents, open_documents
from jaxgen.data.splits import HoldOut, Shard
from jaxgen.errors import ConfigError, DataError

from conftest import TINY_CONFIG, tiny_config
from helpers import assert_resumes_exactly, error_lines, losses, run_jaxgen, start_jaxgen

datasets = pytest.importorskip("datasets")

# Row 33 is null: a null is no document, but it keeps its place in the hold-out count.
DOCS = [None if i == 33 else f"doc {i}{' amen' * (i % 3)}" for i in range(150)]
EVERY_NTH = 10


def expected(part: str) -> list[str]:
    rule = HoldOut(EVERY_NTH, part, tiny_config().data.eval_block)
    return [doc for i, doc in enumerate(DOCS) if rule.keeps(i) and doc is not None]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same documents as Parquet files (several row groups each) and as Hugging Face datasets."""
    root = tmp_path_factory.mktemp("own_data")
    (root / "parquet").mkdir()
    for name, rows, group in [("part-0.parquet", range(90), 16), ("part-1.parquet", range(90, 150), 25)]:
        table = pa.table({"id": list(rows), "text": [DOCS[i] for i in rows]})
        pq.write_table(table, root / "parquet" / name, row_group_size=group)
    whole = datasets.Dataset.from_dict({"text": DOCS, "id": list(range(150))})
    whole.save_to_disk(root / "hf_saved")  # no splits
    train, held_out = expected("train"), expected("eval")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "validation": datasets.Dataset.from_dict({"text": held_out})}).save_to_disk(root / "hf_splits")
    return root


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """`load_dataset` builds its Arrow copy of a folder here, not in the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def source(kind: str, corpus) -> str:
    return {"parquet": f"data.parquet={corpus}/parquet/*.parquet",
            "hf": f"data.hf={corpus}/hf_saved",
            "hf_folder": f"data.hf={corpus}/parquet"}[kind]


def documents(*overrides, part="train"):
    return list(one_pass_documents(tiny_config(f"data.eval_every_nth_doc={EVERY_NTH}", *overrides).data, part))


# ----------------------------------------------------------------------------- read as written


@pytest.mark.parametrize("kind", ["parquet", "hf", "hf_folder"])
def test_documents_are_those_written_in_order_with_every_nth_held_out(corpus, kind):
    assert documents(source(kind, corpus)) == expected("train")
    assert documents(source(kind, corpus), part="eval") == expected("eval")


def test_hf_splits_are_the_datasets_own(corpus):
    assert documents(f"data.hf={corpus}/hf_splits") == expected("train")
    assert documents(f"data.hf={corpus}/hf_splits", part="eval") == expected("eval")


@pytest.mark.parametrize("kind", ["parquet", "hf"])
def test_shuffled_whole_and_shared_out_to_processes(corpus, kind):
    cfg = tiny_config(source(kind, corpus), f"data.eval_every_nth_doc={EVERY_NTH}").data

    def share(index, count, seed):
        return list(open_documents(cfg, cfg, "train", Shard(index, count), seed=seed, epochs=1))

    shuffled = share(0, 1, seed=3)
    assert sorted(shuffled) == sorted(expected("train")) and shuffled != expected("train")
    assert share(0, 1, seed=3) == shuffled and share(0, 1, seed=4) != shuffled
    shares = [share(i, 2, seed=3) for i in range(2)]
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == sorted(expected("train"))


def test_a_parquet_source_reads_each_row_group_once_in_order(corpus, monkeypatch):
    docs = open_parquet(f"{corpus}/parquet/*.parquet", "text")
    reads = []
    original = ParquetDocuments._read
    monkeypatch.setattr(ParquetDocuments, "_read", lambda self, *args: reads.append(args[1:]) or original(self, *args))
    assert [docs[i] for i in range(len(docs))] == DOCS
    assert len(reads) == len(set(reads)) == 6 + 3  # 90 rows in groups of 16, 60 in groups of 25


def test_sources_pickle_for_grains_worker_processes(corpus):
    parquet = open_parquet(f"{corpus}/parquet/*.parquet", "text")
    parquet[100]  # a file is open and a row group kept: neither travels
    hf = HfDocuments(datasets.load_from_disk(corpus / "hf_saved"), "text")
    for docs in (parquet, hf):
        copy = pickle.loads(pickle.dumps(docs))
        assert [copy[i] for i in (149, 0, 77, 33)] == [DOCS[149], DOCS[0], DOCS[77], None]


def test_a_uri_goes_through_pyarrows_filesystem_layer(corpus, monkeypatch):
    asked = []

    class Bucket:  # gs://bucket/corpus/... served from the local corpus, with no network
        @staticmethod
        def from_uri(uri):
            asked.append(uri)
            return pyarrow.fs.LocalFileSystem(), uri.replace("gs://bucket/corpus", str(corpus / "parquet"))

    monkeypatch.setattr(pyarrow.fs, "FileSystem", Bucket)
    assert documents("data.parquet=gs://bucket/corpus/*.parquet") == expected("train")
    assert asked == ["gs://bucket/corpus/*.parquet"]
    with pytest.raises(DataError, match=rf"^'gs://{corpus}/parquet/part-0.parquet' has no column 'body'"):
        documents("data.parquet=gs://bucket/corpus/*.parquet", "data.field=body")


def test_a_mixture_of_parquet_and_text_draws_both_by_weight(corpus, tmp_path):
    (tmp_path / "b.txt").write_text("".join(f"beta {i}\n" for i in range(500)))
    cfg = tiny_config(f"data.mixture=[{{parquet: '{corpus}/parquet/*.parquet', weight: 3}}, "
                      f"{{text: '{tmp_path}/b.txt', weight: 1}}]")
    assert describe(cfg.data.mixture[0]) == f"data.mixture[0].parquet '{corpus}/parquet/*.parquet'"
    drawn = list(itertools.islice(mixed_documents(cfg.data, "train", Shard()), 400))
    assert sum(d.startswith("doc ") for d in drawn) == 300 and sum(d.startswith("beta") for d in drawn) == 100


@pytest.mark.parametrize("kind", ["parquet", "hf"])
@pytest.mark.parametrize("consumed", [3, 40], ids=["mid-epoch", "across-epochs"])
def test_resume_gives_exactly_the_uninterrupted_stream(corpus, tokenizer, kind, consumed):
    cfg = tiny_config(source(kind, corpus), f"data.eval_every_nth_doc={EVERY_NTH}", "data.batch_size=4",
                      "data.seq_len=16")
    if consumed == 40:  # the training documents fill under 30 batches: 40 cross an epoch boundary
        assert sum(1 + len(tokenizer.encode_document(d)) for d in expected("train")) < 30 * 4 * 16
    assert_resumes_exactly(lambda: train_batches(cfg.data, tokenizer, Shard()), consumed)


# ----------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def verses(tmp_path_factory):
    """400 verses of the bundled corpus in a Parquet file's `verse` column."""
    path = tmp_path_factory.mktemp("verses") / "verses.parquet"
    rows = list(itertools.islice(iter_documents([BUNDLED_CORPUS]), 400))
    pq.write_table(pa.table({"verse": rows, "number": np.arange(400)}), path, row_group_size=64)
    return path, rows


def test_tokenizer_train_and_data_prepare_read_a_parquet_input(verses, tmp_path):
    path, rows = verses
    result = run_jaxgen("tokenizer", "train", "--input", str(path), "--field", "verse", "--vocab-size", "400",
                        "--out", str(tmp_path / "t.model"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["vocab_size"] == 400
    result = run_jaxgen("data", "prepare", "--input", str(path), "--field", "verse", "--out", str(tmp_path / "ds"),
                        "--validation-every-nth", "5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["documents"] == {"train": 320, "validation": 80}
    # Held out as training holds out text: every 5th block of 10 verses (the default --validation-block).
    assert list(one_pass_documents(tiny_config(f"data.path={tmp_path / 'ds'}").data, "train")) == [
        row for i, row in enumerate(rows) if i % 50 < 40]


def test_train_on_a_parquet_source(verses, tokenizer, tmp_path):
    path, _ = verses
    run = tmp_path / "run"
    # One verse in ten held out (4 blocks of 10): enough for one held-out batch, which is never repeated.
    result = run_jaxgen("train", "--config", str(TINY_CONFIG), "--run-dir", str(run), f"data.parquet={path}",
                        "data.field=verse", f"data.tokenizer={tokenizer.path}", "train.steps=2",
                        "train.sample_tokens=0", "logging.every=1", "data.eval_every_nth_doc=10")
    assert result.returncode == 0, result.stderr[-2000:]
    recorded = losses(run)
    assert sorted(recorded) == [1, 2] and all(np.isfinite(list(recorded.values())))


# ----------------------------------------------------------------------------- bad input


def bad_inputs(root):
    """Each: the source overrides, and the start of the one line `jaxgen train` must fail with."""
    root.mkdir()
    pq.write_table(pa.table({"body": ["a"], "id": [1]}), root / "no_text.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), root / "numbers.parquet")
    (root / "damaged").mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), root / "damaged" / "a.parquet")
    whole = (root / "damaged" / "a.parquet").read_bytes()
    (root / "damaged" / "b.parquet").write_bytes(whole[: len(whole) // 2])
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                          "test": datasets.Dataset.from_dict({"text": ["b"]})}).save_to_disk(root / "hf")
    return {
        "glob matches nothing": ([f"data.parquet={root}/nothing*.parquet"],
                                 f"data.parquet '{root}/nothing*.parquet' matches no files"),
        "no such column": ([f"data.parquet={root}/no_text.parquet"],
                           (f"'{root}/no_text.parquet' has no column 'text' (data.field); it has ['body', 'id']; "
                            "set data.field to the column of the text")),
        "not strings": ([f"data.parquet={root}/numbers.parquet"],
                        f"'{root}/numbers.parquet': column 'text' (data.field) holds int64, not strings"),
        "damaged file": ([f"data.parquet={root}/damaged/*.parquet"],  # found before a.parquet is read
                         f"'{root}/damaged/b.parquet' cannot be read as Parquet (Parquet magic bytes not found"),
        "no such hf dataset": ([f"data.hf={root}/absent"], f"data.hf '{root}/absent' does not exist; give a directory"),
        "no such split": ([f"data.hf={root}/hf"],
                          f"data.hf '{root}/hf' has no split 'validation' (data.eval_split); it has ['train', 'test']"),
    }


def test_each_bad_input_stops_train_with_one_line_before_anything_is_written(tmp_path):
    cases = bad_inputs(tmp_path / "inputs")
    runs = {name: tmp_path / name.replace(" ", "_") for name in cases}
    started = {name: start_jaxgen("train", "--config", str(TINY_CONFIG), "--run-dir", str(runs[name]),
                                  "train.steps=1", *overrides) for name, (overrides, _) in cases.items()}
    for name, (_, message) in cases.items():
        _, stderr = started[name].communicate(timeout=300)
        assert started[name].returncode == 2 and "Traceback" not in stderr, (name, stderr[-2000:])
        assert [line.removeprefix("jaxgen: error: ")[: len(message)] for line in error_lines(stderr)] == [message], (
            name, stderr[-2000:])
        assert not (runs[name] / "tokenizer.model").exists() and not list(runs[name].glob("checkpoints/*")), name


@pytest.mark.parametrize("kind", ["parquet", "hf"])
def test_a_column_that_is_missing_or_not_text_is_named_with_what_there_is(tmp_path, kind):
    table = {"text": [1, 2, 3], "body": ["a", "b", "c"]}
    if kind == "parquet":
        pq.write_table(pa.table(table), tmp_path / "x.parquet")
        given, named = f"data.parquet={tmp_path}/x.parquet", f"'{tmp_path}/x.parquet'"
    else:
        datasets.Dataset.from_dict(table).save_to_disk(tmp_path / "x")
        given, named = f"data.hf={tmp_path}/x", f"data.hf '{tmp_path}/x'"
    with pytest.raises(DataError, match=rf"^{named}: column 'text' \(data.field\) holds int64, not strings"):
        documents(given)
    with pytest.raises(DataError, match=rf"^{named} has no column 'words' \(data.field\); it has \['text', 'body'\]"):
        documents(given, "data.field=words")
    assert documents(given, "data.field=body") == ["a", "b", "c"]


def test_null_text_cells_are_left_out_with_a_warning_that_counts_them(tmp_path, caplog):
    """A JSONL document that is null is named; a Parquet row whose text is null was left out without a word."""
    pq.write_table(pa.table({"text": ["a", None, "b", None, "c"]}), tmp_path / "x.parquet", row_group_size=2)
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        assert documents(f"data.parquet={tmp_path}/x.parquet", "data.eval_every_nth_doc=100") == ["a", "b", "c"]
    assert caplog.messages == [f"'{tmp_path}/x.parquet': 2 of 5 rows have no 'text' (data.field) value (null); "
                               "they are left out"]


def test_hf_split_rules(corpus, tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"]})}).save_to_disk(tmp_path / "one")
    assert documents(f"data.hf={tmp_path}/one", "data.eval_every_nth_doc=2", "data.eval_block=1", part="eval") == ["b"]
    with pytest.raises(DataError, match=r"has no split 'validation' \(data.eval_split\); it has \['train'\]$"):
        documents(f"data.hf={tmp_path}/one", "data.eval_split=validation", part="eval")
    with pytest.raises(DataError, match=r"has no split 'training' \(data.train_split\); it has \['train', 'validation'\]$"):
        documents(f"data.hf={corpus}/hf_splits", "data.train_split=training")


def test_a_mistyped_local_hf_path_is_not_asked_of_the_hub(tmp_path, monkeypatch):
    """`data.hf=d/hf_nonexistent` beside a folder `d` read as a Hub name "owner/dataset": about 25 s of Hub retries
    (no network) before the error."""
    (tmp_path / "d").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the Hub was asked"))
    with pytest.raises(DataError, match=r"^data.hf 'd/hf_nonexistent' does not exist; give a directory"):
        documents("data.hf=d/hf_nonexistent")


def test_a_saved_dataset_that_is_empty_or_damaged_is_named(tmp_path):
    """A save_to_disk dataset of no rows (datasets writes no data file, then cannot read it back) failed as
    `unexpected IndexError: list index out of range`, naming nothing."""
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": []})}).save_to_disk(tmp_path / "empty")
    with pytest.raises(DataError, match=rf"^data.hf '{tmp_path}/empty' holds no rows \(split 'train' was saved "
                                        r"with none, which datasets cannot read back\); give a dataset with documents$"):
        documents(f"data.hf={tmp_path}/empty")
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(tmp_path / "cut")
    for arrow in (tmp_path / "cut").glob("*.arrow"):
        arrow.unlink()
    with pytest.raises(DataError, match=rf"^data.hf '{tmp_path}/cut' cannot be read by datasets' load_from_disk "
                                        r"\(FileNotFoundError: .*\): its files are missing or damaged; write it again"):
        documents(f"data.hf={tmp_path}/cut")


def test_hf_without_the_datasets_library_names_the_extra(corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ConfigError, match=r'^data.hf needs the datasets library: pip install -e "\.\[hf\]"$'):
        documents(f"data.hf={corpus}/hf_saved")


def test_hf_config_of_a_folder_that_has_none_is_refused(corpus):
    with pytest.raises(DataError, match=rf"data.hf '{corpus}/parquet' \(data.hf_config 'en'\) cannot be loaded"):
        documents(f"data.hf={corpus}/parquet", "data.hf_config=en")
    with pytest.raises(ConfigError, match="was written by save_to_disk and has none: leave data.hf_config out"):
        documents(f"data.hf={corpus}/hf_saved", "data.hf_config=en")
