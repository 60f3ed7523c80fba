"""Sources a user points the config at, `jaxgen data prepare` / `jaxgen tokenizer train`,
and one clear error for every bad input."""

import gzip
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxgen.data.corpus import BUNDLED_CORPUS, iter_documents
from jaxgen.data.lm import build_lm_data, held_out_set, prepare_tokenizer, train_batches
from jaxgen.data.prepare import prepare_dataset
from jaxgen.data.sources import one_pass_documents
from jaxgen.data.splits import Shard
from jaxgen.data.tokenizer import load_tokenizer, train_tokenizer
from jaxgen.errors import ConfigError, DataError

from conftest import REPO, tiny_config
from helpers import as_tfrecord_dataset


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("jsonl")
    with gzip.open(directory / "part-0.jsonl.gz", "wt") as f:
        for i in range(1000):  # enough for the default held-out rule: blocks of 10, every 50th block
            f.write(json.dumps({"id": i, "body": f"record {i}: in the beginning was the word"}) + "\n")
    return directory


def documents_of(*overrides, part="train"):
    return list(one_pass_documents(tiny_config(*overrides).data, part))


# ----------------------------------------------------------------------------- sources


def test_jsonl_gzip_source_reads_the_named_field(jsonl_corpus):
    documents = documents_of(f"data.jsonl={jsonl_corpus}/*.jsonl.gz", "data.field=body")
    assert len(documents) == 980 and documents[0] == "record 0: in the beginning was the word"


def test_prepared_dataset_round_trips_text_and_tokens_and_splits(jsonl_corpus, tokenizer, tmp_path):
    prepare_dataset(f"{jsonl_corpus}/*.jsonl.gz", tmp_path / "text", field="body", progress=False, shard_size=64)
    summary = prepare_dataset(f"{jsonl_corpus}/*.jsonl.gz", tmp_path / "ids", field="body", tokenizer=tokenizer, progress=False)
    assert summary["documents"] == {"train": 980, "validation": 20}
    train = documents_of(f"data.path={tmp_path / 'text'}")
    # `data prepare` holds out what training holds out of the same files: the same rule, the same defaults.
    assert train == documents_of(f"data.jsonl={jsonl_corpus}/*.jsonl.gz", "data.field=body")
    assert len(list((tmp_path / "text").glob("corpus-train.array_record-*-of-00016"))) == 16
    ids = documents_of(f"data.path={tmp_path / 'ids'}", part="eval")
    assert [tokenizer.decode(x.tolist()) for x in ids] == documents_of(
        f"data.jsonl={jsonl_corpus}/*.jsonl.gz", "data.field=body", part="eval")


def test_prepare_holds_out_blocks_as_training_does_and_refuses_a_rule_that_holds_out_nothing(jsonl_corpus, tmp_path):
    summary = prepare_dataset(f"{jsonl_corpus}/*.jsonl.gz", tmp_path / "ds", field="body", validation_every_nth=4,
                              validation_block=25, progress=False)
    assert summary["documents"] == {"train": 750, "validation": 250} and summary["validation_block"] == 25
    held_out = documents_of(f"data.path={tmp_path / 'ds'}", part="eval")
    assert [int(d.split()[1].rstrip(":")) for d in held_out] == [i for i in range(1000) if i % 100 >= 75]
    assert held_out == documents_of(f"data.jsonl={jsonl_corpus}/*.jsonl.gz", "data.field=body",
                                    "data.eval_every_nth_doc=4", "data.eval_block=25", part="eval")
    with pytest.raises(DataError, match=r"holds 1000 documents, too few for a validation split: with "
                                        r"--validation-every-nth 50 and --validation-block 30 the first validation "
                                        r"document is number 1471; give a smaller --validation-every-nth or "
                                        r"--validation-block$"):
        prepare_dataset(f"{jsonl_corpus}/*.jsonl.gz", tmp_path / "none", field="body", validation_block=30,
                        progress=False)
    result = subprocess.run([sys.executable, "-m", "jaxgen", "data", "prepare", "--input", f"{jsonl_corpus}/*.jsonl.gz",
                             "--field", "body", "--out", str(tmp_path / "all"), "--validation-every-nth", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == (
        "jaxgen: error: --validation-every-nth 1 would hold out every document; give 2 or more "
        "(one block of documents in N goes to the validation split)")
    assert not (tmp_path / "all").exists() and not (tmp_path / "none").exists()


def test_a_validation_split_smaller_than_one_batch_names_the_prepare_option(jsonl_corpus, tokenizer, tmp_path):
    prepare_dataset(f"{jsonl_corpus}/*.jsonl.gz", tmp_path / "ds", field="body", progress=False)  # 20 validation records
    with pytest.raises(DataError, match=r"^the held-out documents hold \d+ tokens, fewer than one batch of .* = 1024; "
                                        r"prepare data.path again with a smaller --validation-every-nth$"):
        held_out_set(tiny_config(f"data.path={tmp_path / 'ds'}").data, tokenizer, 2)


def test_held_out_documents_that_are_empty_are_called_so(tokenizer, tmp_path):
    """Empty documents were met with advice to hold out more of them (a smaller data.eval_every_nth_doc)."""
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": ""}\n' * 600)
    with pytest.raises(DataError, match=rf"^the held-out documents of data.jsonl '{path}' are empty: \d+ documents, "
                                        r"\d+ tokens, their beginning and end markers alone; give documents that hold"):
        held_out_set(tiny_config(f"data.jsonl={path}").data, tokenizer, 2)


def test_pretokenized_dataset_brings_its_tokenizer_and_refuses_another(jsonl_corpus, tokenizer, tmp_path):
    prepare_dataset(f"{jsonl_corpus}/*.jsonl.gz", tmp_path / "ids", field="body", tokenizer=tokenizer, progress=False)
    cfg = tiny_config(f"data.path={tmp_path / 'ids'}", "data.batch_size=4", "data.seq_len=16")
    (tmp_path / "run1").mkdir()
    assert prepare_tokenizer(cfg, tmp_path / "run1").sha256 == tokenizer.sha256
    other = train_tokenizer(itertools.islice(iter_documents([BUNDLED_CORPUS]), 500), 512, tmp_path / "other.model")
    cfg = tiny_config(f"data.path={tmp_path / 'ids'}", f"data.tokenizer={other.path}")
    (tmp_path / "run2").mkdir()
    with pytest.raises(DataError, match="tokenized with another tokenizer"):
        prepare_tokenizer(cfg, tmp_path / "run2")


def test_a_resumed_run_keeps_its_tokenizer_and_refuses_another(tokenizer, tmp_path):
    kept = prepare_tokenizer(tiny_config(), tmp_path)  # trained on the bundled corpus
    assert prepare_tokenizer(tiny_config(), tmp_path).sha256 == kept.sha256
    with pytest.raises(ConfigError, match="differs from the tokenizer this run directory was trained with"):
        prepare_tokenizer(tiny_config(f"data.tokenizer={tokenizer.path}"), tmp_path)


def test_tfds_dataset_by_name_and_data_dir_without_tensorflow(jsonl_corpus, tmp_path):
    prepare_dataset(f"{jsonl_corpus}/*.jsonl.gz", tmp_path / "tfds" / "corpus" / "1.0.0", field="body", progress=False)
    documents = documents_of("data.tfds=corpus", f"data.tfds_data_dir={tmp_path / 'tfds'}")
    assert documents == documents_of(f"data.path={tmp_path / 'tfds' / 'corpus' / '1.0.0'}")


def test_tfrecord_dataset_without_tensorflow_says_to_install_the_extra(jsonl_corpus, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    if __import__("importlib").util.find_spec("tensorflow"):
        pytest.skip("TensorFlow is installed, so TFRecord datasets are readable")
    version_dir = tmp_path / "tfds" / "corpus" / "1.0.0"
    prepare_dataset(f"{jsonl_corpus}/*.jsonl.gz", version_dir, field="body", progress=False)
    info = json.loads((version_dir / "dataset_info.json").read_text())
    (version_dir / "dataset_info.json").write_text(json.dumps(info | {"fileFormat": "tfrecord"}))
    with pytest.raises(DataError, match=r"stored as TFRecord.*pip install 'jaxgen\[tf\]'"):
        documents_of("data.tfds=corpus", f"data.tfds_data_dir={tmp_path / 'tfds'}")


def test_tfrecord_dataset_streams_with_tensorflow(tmp_path):
    pytest.importorskip("tensorflow")
    from jaxgen.data.sources import open_documents

    (tmp_path / "docs.txt").write_text("".join(f"doc {i}\n" for i in range(120)))
    prepare_dataset(str(tmp_path / "docs.txt"), tmp_path / "tfds" / "corpus" / "1.0.0", validation_block=1,
                    progress=False)
    as_tfrecord_dataset(tmp_path / "tfds" / "corpus" / "1.0.0")
    cfg = tiny_config("data.tfds=corpus", f"data.tfds_data_dir={tmp_path / 'tfds'}").data
    train, held_out = (list(one_pass_documents(cfg, part)) for part in ("train", "eval"))
    assert held_out == ["doc 49", "doc 99"] and sorted(train + held_out) == sorted(f"doc {i}" for i in range(120))
    shares = [list(open_documents(cfg, cfg, "train", Shard(i, 2), seed=None, epochs=1)) for i in range(2)]
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == sorted(train)
    stream = iter(open_documents(cfg, cfg, "train", Shard(), seed=5))
    [next(stream) for _ in range(130)]  # into the second epoch
    state, expected = stream.get_state(), [next(stream) for _ in range(20)]
    resumed = iter(open_documents(cfg, cfg, "train", Shard(), seed=5))
    resumed.set_state(state)
    assert [next(resumed) for _ in range(20)] == expected


def test_mixture_of_prepared_and_text_sources_trains(jsonl_corpus, tokenizer, tmp_path):
    prepare_dataset(f"{jsonl_corpus}/*.jsonl.gz", tmp_path / "ds", field="body", progress=False)
    cfg = tiny_config(f"data.mixture=[{{path: '{tmp_path / 'ds'}', weight: 1}}, {{text: '{BUNDLED_CORPUS}', weight: 1}}]",
                      "data.batch_size=4", "data.seq_len=16")
    batches = train_batches(cfg.data, tokenizer, Shard())
    text = tokenizer.decode(next(batches)["inputs"].ravel().tolist())
    batches.close()
    assert "record" in text and "the" in text


# ----------------------------------------------------------------------------- commands


def test_cli_trains_a_tokenizer_and_prepares_a_pretokenized_dataset(jsonl_corpus, tmp_path):
    def jaxgen(*args):
        result = subprocess.run([sys.executable, "-m", "jaxgen", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    out = json.loads(jaxgen("tokenizer", "train", "--input", str(BUNDLED_CORPUS), "--vocab-size", "400",
                            "--model-type", "unigram", "--out", str(tmp_path / "t.model")).stdout)
    assert out["vocab_size"] == 400 and load_tokenizer(tmp_path / "t.model").sha256 == out["sha256"]
    result = jaxgen("data", "prepare", "--input", f"{jsonl_corpus}/*.jsonl.gz", "--field", "body",
                    "--tokenizer", str(tmp_path / "t.model"), "--out", str(tmp_path / "ds"))
    assert json.loads(result.stdout)["tokenizer"]["vocab_size"] == 400
    assert "doc" in result.stderr  # the progress bar
    assert (tmp_path / "ds" / "tokenizer.model").read_bytes() == (tmp_path / "t.model").read_bytes()


def test_tokenizer_is_lossless_on_any_text(tokenizer):
    text = "Ünïcode — tabs\tand  double  spaces, digits 12345, emoji 🙂 and 中文"
    assert tokenizer.decode(tokenizer.encode_document(text).tolist()) == text


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("key", ["text", "jsonl", "array_record"])
def test_a_glob_matching_nothing_names_the_pattern(key, tmp_path):
    with pytest.raises(DataError, match=rf"data.{key} '{tmp_path}/nothing\*' matches no files"):
        documents_of(f"data.{key}={tmp_path}/nothing*")


@pytest.mark.parametrize("key", ["text", "jsonl", "array_record", "parquet"])
def test_a_folder_given_for_files_is_named_as_one_with_the_glob_it_may_mean(key, tmp_path):
    """`tokenizer train --input corpus/` and `data.text=corpus/` said only 'matches no files'."""
    (tmp_path / "corpus").mkdir()
    suffix = {"text": "txt"}.get(key, key)
    with pytest.raises(DataError) as refused:
        documents_of(f"data.{key}={tmp_path / 'corpus'}")
    assert str(refused.value) == (f"data.{key} '{tmp_path / 'corpus'}' is a folder; give a file or a glob of files in "
                                  f"it, e.g. '{tmp_path / 'corpus'}/**/*.{suffix}'")


def test_a_path_that_is_no_regular_file_is_named_for_what_it_is(tmp_path):
    """A FIFO, a link to /dev/zero and a loop of links each said 'matches no files', though something was there."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for name, what in [("fifo", "a pipe (FIFO)"), ("zero", "a character device"),
                       ("a", "a link that leads to no file (too many levels of symbolic links)")]:
        with pytest.raises(DataError) as refused:
            documents_of(f"data.text={tmp_path / name}")
        assert str(refused.value) == f"data.text '{tmp_path / name}': '{tmp_path / name}' is {what}; give regular files"


def test_a_missing_prepared_dataset_names_the_path(tmp_path):
    with pytest.raises(DataError, match=rf"data.path '{tmp_path}/absent' is not a directory"):
        documents_of(f"data.path={tmp_path}/absent")


def test_an_empty_file_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("one document\n")
    with gzip.open(tmp_path / "b.txt.gz", "wb"):
        pass
    with pytest.raises(DataError, match=r"file '.*b.txt.gz' is empty"):
        documents_of(f"data.text={tmp_path}/*")


def test_invalid_utf8_is_skipped_with_a_count_or_fails_by_config(tmp_path, caplog):
    (tmp_path / "a.txt").write_bytes(b"good one\nbad \xff\xfe line\ngood two\n")
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        assert documents_of(f"data.text={tmp_path}/a.txt", "data.eval_every_nth_doc=50") == ["good one", "good two"]
    assert "skipped 1 lines of invalid UTF-8" in caplog.text and "line at byte 9" in caplog.text
    with pytest.raises(DataError, match=r"a.txt: line at byte 9 is not valid UTF-8.*data.invalid_utf8=skip"):
        documents_of(f"data.text={tmp_path}/a.txt", "data.invalid_utf8=error")


def test_jsonl_without_the_field_names_file_field_and_keys(jsonl_corpus):
    with pytest.raises(DataError, match=r"part-0.jsonl.gz: line at byte 0 has no field 'text' \(data.field\); it holds \['body', 'id'\]"):
        documents_of(f"data.jsonl={jsonl_corpus}/*.jsonl.gz")


def test_a_corpus_smaller_than_one_batch_is_refused(tmp_path, tokenizer):
    (tmp_path / "tiny.txt").write_text("".join(f"line {i}\n" for i in range(60)))
    cfg = tiny_config(f"data.text={tmp_path}/tiny.txt", f"data.tokenizer={tokenizer.path}")
    with pytest.raises(DataError, match=r"hold \d+ tokens, fewer than one batch of data.batch_size x data.seq_len = 16 x 64 = 1024"):
        build_lm_data(cfg, tmp_path)


def test_a_tokenizer_of_another_vocab_size_is_refused(tmp_path, tokenizer):
    cfg = tiny_config(f"data.tokenizer={tokenizer.path}", "model.vocab_size=1024")
    with pytest.raises(ConfigError, match=r"has 512 pieces but model.vocab_size=1024; set model.vocab_size=512"):
        prepare_tokenizer(cfg, tmp_path)


def test_an_interrupted_prepare_leaves_nothing_that_looks_complete(jsonl_corpus, tokenizer, tmp_path, monkeypatch):
    calls = itertools.count()

    def encode_then_interrupt(text):
        if next(calls) == 100:
            raise KeyboardInterrupt
        return np.zeros(3, np.int32)

    monkeypatch.setattr(tokenizer, "encode_document", encode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(f"{jsonl_corpus}/*.jsonl.gz", tmp_path / "ds", field="body", tokenizer=tokenizer, progress=False)
    assert list(tmp_path.iterdir()) == []
    # A process killed outright leaves only the hidden partial directory; a dataset
    # directory without the completion marker is refused by name.
    prepare_dataset(f"{jsonl_corpus}/*.jsonl.gz", tmp_path / "ds", field="body", progress=False)
    (tmp_path / "ds" / "jaxgen_dataset.json").unlink()
    with pytest.raises(DataError, match=rf"data.path '{tmp_path}/ds' is not a complete prepared dataset"):
        build_lm_data(tiny_config(f"data.path={tmp_path}/ds"), tmp_path)


def test_prepare_refuses_to_overwrite(jsonl_corpus, tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match=r"--out '.*ds' already exists"):
        prepare_dataset(f"{jsonl_corpus}/*.jsonl.gz", tmp_path / "ds", field="body", progress=False)


def test_a_missing_split_names_the_splits_there(jsonl_corpus, tmp_path):
    prepare_dataset(f"{jsonl_corpus}/*.jsonl.gz", tmp_path / "ds", field="body", progress=False)
    with pytest.raises(DataError, match=r"has no split 'test'; it has \['train', 'validation'\]"):
        documents_of(f"data.path={tmp_path}/ds", "data.eval_split=test", part="eval")


@pytest.mark.parametrize("read, says", [
    ("data.index_max_mb=256", r"the train part of data.text '.*one.txt' holds 1 records, too few for 2 reader streams"),
    ("data.index_max_mb=0", r"holds 1 documents for the train split, too few for 2 readers"),
], ids=["indexed", "streamed"])
def test_too_few_documents_for_the_readers_is_explained(tmp_path, read, says):
    (tmp_path / "one.txt").write_text("only document\n")
    cfg = tiny_config(f"data.text={tmp_path}/one.txt", read)
    from jaxgen.data.sources import open_documents

    with pytest.raises(DataError, match=says):
        list(itertools.islice(open_documents(cfg.data, cfg.data, "train", Shard(1, 2), seed=None), 1))


def test_a_streamed_file_emptied_under_a_running_job_is_named_as_changed(tmp_path):
    """`: > corpus.txt` while a streamed run read it: the next epoch found no documents, and the error blamed too
    many readers and advised setting data.streams lower."""
    from jaxgen.data.sources import open_documents

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"document {i}\n" for i in range(20)))
    cfg = tiny_config(f"data.text={corpus}", "data.index_max_mb=0")
    documents = iter(open_documents(cfg.data, cfg.data, "train", Shard(0, 2), seed=None))
    first = list(itertools.islice(documents, 5))
    assert len(first) == 5
    corpus.write_text("")
    with pytest.raises(DataError) as err:
        list(itertools.islice(documents, 100))
    assert str(err.value).endswith(f"data.text {str(corpus)!r} changed while the run read it (230 bytes at start-up, "
                                   "0 now), leaving 0 documents for the train split; a file the run reads must stay "
                                   "as it is: put it back, or train on the new data in a new run")


def test_the_training_files_are_told_by_name_under_their_folder_and_size(tmp_path, monkeypatch):
    from jaxgen.data import fingerprint
    from jaxgen.data.fingerprint import changed_files, data_files

    (tmp_path / "corpus").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "corpus" / name).write_text("one line\n" * 10)
    (tmp_path / "prepared" / "train").mkdir(parents=True)  # read as data.path lays it out, not opened here
    (tmp_path / "prepared" / "manifest.json").write_text("{}")
    (tmp_path / "prepared" / "train" / "shard-0").write_bytes(b"x" * 5)
    cfg = tiny_config(f"data.mixture=[{{text: '{tmp_path}/corpus/*.txt'}}, {{path: '{tmp_path}/prepared'}}]")
    saved = data_files(cfg)
    assert saved["data.mixture[0].text"] == {"a.txt": 90, "b.txt": 90}
    assert saved["data.mixture[1].path"] == {"manifest.json": 2, "train/shard-0": 5}
    assert data_files(tiny_config()) == {}  # the bundled corpus

    staged = tmp_path / "local-disk"  # a job's copy on a node's own disk is the same data
    shutil.copytree(tmp_path / "corpus", staged / "corpus")
    shutil.copytree(tmp_path / "prepared", staged / "prepared")
    moved = tiny_config(f"data.mixture=[{{text: '{staged}/corpus/*.txt'}}, {{path: '{staged}/prepared'}}]")
    assert changed_files(saved, data_files(moved)) == []

    with open(tmp_path / "corpus" / "a.txt", "a") as f:
        f.write("appended\n")
    (tmp_path / "corpus" / "b.txt").rename(tmp_path / "corpus" / "c.txt")
    assert changed_files(saved, data_files(cfg)) == [
        "data.mixture[0].text: a.txt 90 -> 99 bytes", "data.mixture[0].text: b.txt gone",
        "data.mixture[0].text: c.txt new"]
    assert changed_files(saved, data_files(tiny_config(f"data.text={tmp_path}/corpus/a.txt"))) == [
        "data.mixture[0].text: no longer read", "data.mixture[1].path: no longer read", "data.text: now read"]
    (tmp_path / "images" / "cat").mkdir(parents=True)  # an image folder: a class folder more is a change too
    (tmp_path / "images" / "cat" / "0.png").write_bytes(b"p" * 7)
    folder = tiny_config("images.source=folder", f"images.folder={tmp_path}/images")
    saved = data_files(folder)
    assert saved["images.folder"] == {"cat/0.png": 7}
    (tmp_path / "images" / "dog").mkdir()
    (tmp_path / "images" / "dog" / "0.png").write_bytes(b"p" * 7)
    assert changed_files(saved, data_files(folder)) == ["images.folder: dog/0.png new"]
    monkeypatch.setattr(fingerprint, "MAX_FILES", 1)  # past it, the total size alone, under a name that stays
    saved = data_files(folder)
    (tmp_path / "images" / "dog" / "1.png").write_bytes(b"p" * 7)
    assert saved["images.folder"] == {"all files": 14}
    assert changed_files(saved, data_files(folder)) == ["images.folder: all files 14 -> 21 bytes"]


def test_a_resume_on_changed_training_files_says_which_and_goes_on(tmp_path, tokenizer, caplog):
    from jaxgen.train.loop import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(itertools.islice(iter_documents([BUNDLED_CORPUS]), 3000)) + "\n")
    overrides = [f"data.text={corpus}", f"data.tokenizer={tokenizer.path}", "checkpoint.every=2",
                 "logging.tensorboard=false"]
    train(tiny_config(*overrides, "train.steps=2"), tmp_path / "run")
    with open(corpus, "a") as f:
        f.write("And it came to pass.\n")
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        summary = train(tiny_config(*overrides, "train.steps=3"), tmp_path / "run")
    assert summary["resumed_from"] == 2
    size = corpus.stat().st_size
    assert (f"continuing step 2 on training files changed since it was saved (data.text: corpus.txt {size - 21:,} -> "
            f"{size:,} bytes): the run goes on, but no longer in the data order nor with the held-out set it had"
            ) in caplog.text
