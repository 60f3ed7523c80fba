"""Every mistake in a user's data is one clear line naming the file and what would be valid."""

import gzip
import itertools
import json
import logging
import re
import subprocess
import sys

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from jaxgen.data.corpus import BUNDLED_CORPUS, iter_documents, resolve_files
from jaxgen.data.lm import build_lm_data, prepare_tokenizer, train_batches
from jaxgen.data.sentencepiece_tokenizer import pieces_within
from jaxgen.data.sources import one_pass_documents
from jaxgen.data.splits import Shard
from jaxgen.data.tokenizer import SentencepieceTokenizer, load_tokenizer, train_tokenizer
from jaxgen.errors import DataError

from conftest import REPO, tiny_config
from helpers import cli_env

VERSES = list(itertools.islice(iter_documents([BUNDLED_CORPUS]), 400))


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and not getattr(err.value, "__notes__", None)
    return message


def jaxgen_fails(*args: str, cwd) -> str:
    """Run `jaxgen ARGS`; it must fail with status 2 and one `jaxgen: error:` line, which is returned."""
    result = subprocess.run([sys.executable, "-m", "jaxgen", *args], cwd=cwd, env=cli_env(), text=True,
                            capture_output=True, timeout=300, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("jaxgen: error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def verses_with_invalid_utf8(path, bad_lines: list[int]):
    lines = [verse.encode() for verse in VERSES]
    for i in bad_lines:
        lines[i] = b"bad \xff\xfe line"
    return write_lines(path, lines)


# ----------------------------------------------------------------------------- 1. not a tokenizer

NOT_A_TOKENIZER = {
    "random.model": bytes(np.random.default_rng(0).integers(0, 256, 2000, np.uint8)),
    "notes.model": b"hello world\n",
    "empty.model": b"",
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "NoSuchModel"}}).encode(),
    "truncated.json": b'{"version": "1.0", "model": {"type": "BPE", "vocab": {"a"',
}


@pytest.mark.parametrize("name", NOT_A_TOKENIZER)
def test_a_file_that_is_not_a_tokenizer_is_refused_naming_it(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(NOT_A_TOKENIZER[name])
    with pytest.raises(DataError) as err:
        load_tokenizer(path)
    message = one_line(err)
    kind = "Hugging Face tokenizer.json" if name.endswith(".json") else "sentencepiece model"
    assert str(path) in message and f"not a {kind}" in message or f"not a valid {kind}" in message, message
    assert "sentencepiece .model" in message
    if name.endswith(".model"):
        kept = path.parent / "tokenizer.model"
        with pytest.raises(DataError, match=f"tokenizer file '{kept}'"):  # also when received from process 0
            SentencepieceTokenizer.from_files({"tokenizer.model": NOT_A_TOKENIZER[name]}, path.parent)


def test_a_directory_without_a_tokenizer_is_refused(tmp_path):
    with pytest.raises(DataError, match=f"tokenizer '{tmp_path}' is a directory without tokenizer.model or "
                                        "tokenizer.json; give a sentencepiece .model"):
        load_tokenizer(tmp_path)


def test_a_model_with_other_special_ids_is_refused(tmp_path):
    proto = tmp_path / "t5_style.model"
    with open(proto, "wb") as out:  # T5's convention: pad=0, eos=1, unk=2, no bos
        spm.SentencePieceTrainer.train(sentence_iterator=iter(VERSES), model_writer=out, vocab_size=200,
                                       pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    with pytest.raises(DataError) as err:
        load_tokenizer(proto)
    assert one_line(err) == (f"tokenizer file '{proto}' has special ids unk=2, bos=-1, eos=1 (-1: none), jaxgen needs "
                             "unk=0, bos=1, eos=2; give a sentencepiece .model (e.g. from `jaxgen tokenizer "
                             "train`) or a Hugging Face tokenizer.json")


def test_a_model_with_fewer_pieces_than_the_special_ones_is_refused(tmp_path, tokenizer):
    model = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.files()["tokenizer.model"])
    del model.pieces[2:]
    model.trainer_spec.byte_fallback = False  # else sentencepiece itself refuses the missing byte pieces
    path = tmp_path / "two.model"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(DataError, match=f"'{path}' has 2 pieces, fewer than the 3 special pieces"):
        load_tokenizer(path)


def test_train_refuses_a_broken_tokenizer_json_in_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(NOT_A_TOKENIZER["tokenizer.json"])
    error = jaxgen_fails("train", "--config", str(REPO / "configs/lm_tiny.yaml"), "--run-dir", str(tmp_path / "run"),
                         "data.tokenizer=tokenizer.json", "train.steps=1", cwd=tmp_path)
    assert error.startswith("jaxgen: error: tokenizer file 'tokenizer.json' is not a Hugging Face tokenizer.json (")


# ----------------------------------------------------------------------------- 2. vocabulary too large


def test_a_corpus_too_small_for_the_vocabulary_names_the_largest_possible(tmp_path):
    with pytest.raises(DataError) as err:
        train_tokenizer(VERSES[:100], 32000, tmp_path / "t.model", source="--input 'small.txt'",
                        vocab_option="--vocab-size")
    assert one_line(err).startswith("the corpus is too small for a 32000-piece bpe tokenizer: sentencepiece can make "
                                    "at most ")
    largest = int(str(err.value).split("at most ")[1].split()[0])
    assert 300 < largest < 32000
    assert f"pieces from --input 'small.txt'; set --vocab-size to at most {largest}, or add documents" in str(err.value)
    assert not (tmp_path / "t.model").exists()


def test_a_vocabulary_too_small_for_the_characters_names_the_least_possible(tmp_path):
    with pytest.raises(DataError) as err:
        train_tokenizer(VERSES[:100], 270, tmp_path / "t.model")
    assert re.fullmatch(r"a 270-piece bpe tokenizer is too small for the text of the given documents: .* need at "
                        r"least (\d+); set the vocabulary size to at least \1", one_line(err))


@pytest.mark.parametrize("vocab_size, specials", [(1, ()), (258, ()), (260, ("[MASK]", "<extra_id_0>"))])
def test_a_vocabulary_too_small_for_the_byte_and_special_pieces_is_refused_before_reading(tmp_path, vocab_size,
                                                                                          specials):
    """Below the byte and special pieces sentencepiece failed with an empty reason after reading the corpus."""
    def never_read():
        raise AssertionError("the documents were read")
        yield

    with pytest.raises(DataError) as err:
        train_tokenizer(never_read(), vocab_size, tmp_path / "t.model", vocab_option="model.vocab_size",
                        special_pieces=specials)
    least = 259 + len(specials)
    assert one_line(err) == (f"a {vocab_size}-piece bpe tokenizer is too small: its 256 byte pieces and "
                             f"{3 + len(specials)} special pieces alone need {least}, the text's characters more; "
                             f"set model.vocab_size to at least {least}")


@pytest.mark.parametrize("vocab_size", [2**31, 2**20 + 1])
def test_a_vocabulary_too_large_is_refused_before_reading(tmp_path, vocab_size):
    """Above int32 sentencepiece failed with 'cannot parse "2147483648" as int' after reading the corpus."""
    def never_read():
        raise AssertionError("the documents were read")
        yield

    with pytest.raises(DataError) as err:
        train_tokenizer(never_read(), vocab_size, tmp_path / "t.model", vocab_option="--vocab-size")
    assert one_line(err) == (f"a {vocab_size}-piece bpe tokenizer is too large: jaxgen trains at most 1048576 "
                             "pieces (the largest tokenizers in use have ~256k); set --vocab-size to at most 1048576")


def test_no_documents_to_train_on_says_so(tmp_path):
    with pytest.raises(DataError, match="no documents to train a 300-piece bpe tokenizer on were found"):
        train_tokenizer(iter([]), 300, tmp_path / "t.model")


def test_documents_longer_than_sentencepieces_limit_train_the_tokenizer_too(tmp_path):
    """Sentencepiece silently skips sentences over 4192 bytes: documents as long as web pages trained the
    tokenizer on the short ones alone, and a corpus of only long ones was 'no documents'."""
    books = [" ".join(VERSES[i:i + 60]) for i in range(0, 400, 60)]  # ~7 documents of about 8 kB each
    assert min(len(book.encode()) for book in books) > 4192
    tokenizer = train_tokenizer(books, 400, tmp_path / "t.model")
    assert tokenizer.decode(tokenizer.encode(books[0])) == books[0]
    pieces = pieces_within("in the beginning \u6f22\u6f22\u6f22\u6f22 was", 8)
    assert pieces == ["in the", " beginni", "ng", " \u6f22\u6f22", "\u6f22\u6f22", " was"]  # at spaces, else characters


def test_a_run_whose_documents_are_too_few_for_model_vocab_size_names_the_source_and_key(tmp_path):
    corpus = write_lines(tmp_path / "small.txt", [v.encode() for v in VERSES[:100]])
    cfg = tiny_config(f"data.text={corpus}", "model.vocab_size=32000")
    with pytest.raises(DataError) as err:
        prepare_tokenizer(cfg, tmp_path / "run")
    assert f"from the training documents of data.text '{corpus}'; set model.vocab_size to at most" in one_line(err)
    assert not (tmp_path / "run" / "tokenizer.model").exists()


def test_tokenizer_train_cli_says_the_corpus_is_too_small(tmp_path):
    write_lines(tmp_path / "small.txt", [v.encode() for v in VERSES[:100]])
    error = jaxgen_fails("tokenizer", "train", "--input", "small.txt", "--vocab-size", "32000", "--out", "t.model",
                         cwd=tmp_path)
    assert "the corpus is too small for a 32000-piece bpe tokenizer: sentencepiece can make at most" in error


def test_tokenizer_train_never_writes_over_its_corpus_or_onto_a_directory(tmp_path):
    corpus = write_lines(tmp_path / "small.model", [v.encode() for v in VERSES[:100]])  # a text, oddly named
    before = corpus.read_bytes()
    error = jaxgen_fails("tokenizer", "train", "--input", "*.model", "--vocab-size", "300", "--out", "./small.model",
                         cwd=tmp_path)
    assert error == ("jaxgen: error: --out './small.model' is one of the --input files; the tokenizer would "
                     "overwrite the corpus")
    error = jaxgen_fails("tokenizer", "train", "--input", "*.model", "--vocab-size", "300", "--out", "t.json",
                         cwd=tmp_path)  # a sentencepiece model under another kind's name
    assert "argument --out: 't.json' does not end in .model; the file written is a sentencepiece model" in error
    (tmp_path / "models").mkdir()
    error = jaxgen_fails("tokenizer", "train", "--input", "*.model", "--vocab-size", "300", "--out", "models",
                         cwd=tmp_path)
    assert "argument --out: 'models' is a directory; give the file to write, e.g. models/NAME.model" in error
    assert corpus.read_bytes() == before and not any((tmp_path / "models").iterdir())


# ----------------------------------------------------------------------------- 3. errors reach the user as themselves

INVALID_LINE = (r"bad.txt: line at byte \d+ is not valid UTF-8 \(invalid start byte at byte 4 of line 301\); "
                r"set data.invalid_utf8=skip")


def test_invalid_utf8_while_the_tokenizer_trains_is_reported_as_itself(tmp_path):
    bad = verses_with_invalid_utf8(tmp_path / "bad.txt", [300])
    with pytest.raises(DataError, match=INVALID_LINE.replace("data.invalid_utf8=", "--invalid-utf8 ")) as err:
        train_tokenizer(iter_documents([bad], invalid_utf8="error"), 512, tmp_path / "t.model")
    assert "sentencepiece" not in one_line(err)


def test_invalid_utf8_inside_the_grain_pipeline_is_reported_as_itself(tmp_path, tokenizer):
    bad = verses_with_invalid_utf8(tmp_path / "bad.txt", [300])
    # Streamed, so the line is met inside grain (a source held in memory meets it as it is read in).
    cfg = tiny_config(f"data.text={bad}", "data.invalid_utf8=error", f"data.tokenizer={tokenizer.path}",
                      "data.index_max_mb=0")
    with pytest.raises(DataError, match=INVALID_LINE) as err:
        list(one_pass_documents(cfg.data, "train"))
    one_line(err)
    batches = train_batches(cfg.data, tokenizer, Shard())
    with pytest.raises(DataError, match=INVALID_LINE) as err:
        for _ in range(100):
            next(batches)
    one_line(err)
    batches.close()


def test_train_reports_invalid_utf8_in_one_line(tmp_path):
    verses_with_invalid_utf8(tmp_path / "bad.txt", [300])
    error = jaxgen_fails("train", "--config", str(REPO / "configs/lm_tiny.yaml"), "--run-dir", str(tmp_path / "run"),
                         "data.text=bad.txt", "data.invalid_utf8=error", "train.steps=1", cwd=tmp_path)
    assert error.startswith("jaxgen: error: bad.txt: line at byte")
    assert "of line 301); set data.invalid_utf8=skip" in error


def test_tokenizer_train_cli_reports_invalid_utf8_in_one_line(tmp_path):
    verses_with_invalid_utf8(tmp_path / "bad.txt", [300])
    error = jaxgen_fails("tokenizer", "train", "--input", "bad.txt", "--invalid-utf8", "error", "--vocab-size", "512",
                         "--out", "t.model", cwd=tmp_path)
    assert error.startswith("jaxgen: error: bad.txt: line at byte") and "of line 301)" in error
    assert error.endswith("; set --invalid-utf8 skip to skip such records")  # a flag: it takes no config keys


# ----------------------------------------------------------------------------- 4. skipped lines counted once


def skip_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "invalid UTF-8" in r.getMessage()]


def skip_warning(path, count: int, first_line: int) -> str:
    offset = sum(len(v.encode()) + 1 for v in VERSES[:first_line - 1])
    return (f"{path}: skipped {count} lines of invalid UTF-8 (the first: line at byte {offset}, line {first_line}); "
            "set data.invalid_utf8=error to stop at them instead")


@pytest.mark.parametrize("tokenizer_given", [False, True])
def test_skipped_lines_are_reported_once_per_file_with_the_files_count(tmp_path, caplog, tokenizer, tokenizer_given):
    first = verses_with_invalid_utf8(tmp_path / "a.txt", [3, 150, 151])
    second = verses_with_invalid_utf8(tmp_path / "b.txt", [10])
    given = [f"data.tokenizer={tokenizer.path}"] if tokenizer_given else []  # else trained: one more pass
    cfg = tiny_config(f"data.text={tmp_path}/*.txt", "data.batch_size=8", *given)
    (tmp_path / "run").mkdir()
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        data = build_lm_data(cfg, tmp_path / "run")  # checks one batch, reads held-out batches
        for _ in range(200):  # past the end of both files: every training document was read at least once
            next(data.train)
        data.train.close()
    assert sorted(skip_warnings(caplog)) == [skip_warning(first, 3, 4), skip_warning(second, 1, 11)]


def test_a_pass_that_stops_early_reports_nothing_and_a_whole_pass_reports_once(tmp_path, caplog):
    bad = verses_with_invalid_utf8(tmp_path / "bad.txt", [1, 2])
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        list(itertools.islice(iter_documents([bad]), 10))
        assert skip_warnings(caplog) == []
        for _ in range(3):
            assert len(list(iter_documents([bad]))) == len(VERSES) - 2
    assert len(skip_warnings(caplog)) == 1 and "skipped 2 lines" in skip_warnings(caplog)[0]


# ----------------------------------------------------------------------------- 5. other broken files


def test_a_jsonl_line_that_is_not_json_names_file_line_and_field(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [b'{"text": "one"}', b"{'text': 'two'}"])
    with pytest.raises(DataError) as err:
        list(one_pass_documents(tiny_config(f"data.jsonl={path}").data, "train"))
    assert one_line(err) == (f"{path}: line at byte 16 is not valid JSON (Expecting property name enclosed in double "
                             "quotes at column 2 of line 2); each line of a .jsonl file must be one JSON object "
                             "holding its document in field 'text' (data.field)")


def test_a_raw_control_character_in_a_jsonl_line_is_named_once(tmp_path):
    """Python's decoder says 'Invalid control character at': the message read '... at at column 12'."""
    path = write_lines(tmp_path / "a.jsonl", [b'{"text": "a\tb"}'])
    with pytest.raises(DataError, match=r"is not valid JSON \(Invalid control character at column 12 of line 1\)"):
        list(one_pass_documents(tiny_config(f"data.jsonl={path}").data, "train"))


def test_data_prepare_and_tokenizer_train_advise_the_flags_they_take(tmp_path, caplog):
    """They read with `iter_documents` and refuse config keys: 'set data.field' was advice they could not take."""
    path = write_lines(tmp_path / "a.jsonl", [b'{"text": "one"}', b'{"body": "two"}'])
    with pytest.raises(DataError) as err:
        list(iter_documents([path]))
    assert one_line(err) == (f"{path}: line at byte 16 has no field 'text' (--field); it holds ['body'] (line 2); "
                             "set --field to the key of the text")
    pyarrow.parquet.write_table(pyarrow.table({"body": ["a"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError) as err:
        list(iter_documents([tmp_path / "a.parquet"]))
    assert one_line(err) == (f"'{tmp_path}/a.parquet' has no column 'text' (--field); it has ['body']; "
                             "set --field to the column of the text")
    bad = verses_with_invalid_utf8(tmp_path / "bad.txt", [2])
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        list(iter_documents([bad]))
    assert skip_warnings(caplog)[0].endswith("; set --invalid-utf8 error to stop at them instead")


def test_a_jsonl_line_without_the_field_names_file_line_and_keys(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [b'{"text": "one"}', b'{"body": "two"}'])
    with pytest.raises(DataError) as err:
        list(one_pass_documents(tiny_config(f"data.jsonl={path}").data, "train"))
    assert one_line(err) == (f"{path}: line at byte 16 has no field 'text' (data.field); it holds ['body'] (line 2); "
                             "set data.field to the key of the text")
    path = write_lines(tmp_path / "b.jsonl", [b'{"text": "one"}', b'{"text": 3}'])
    with pytest.raises(DataError) as err:
        list(one_pass_documents(tiny_config(f"data.jsonl={path}").data, "train"))
    assert one_line(err) == f"{path}: line at byte 16: field 'text' (data.field) holds a number, not a string (line 2)"


def test_a_gz_file_that_is_not_gzip_is_refused_before_reading(tmp_path):
    (tmp_path / "plain.txt.gz").write_text("plain text\n")
    with pytest.raises(DataError) as err:
        resolve_files(f"{tmp_path}/*.gz", "data.text")
    assert one_line(err).startswith(f"'{tmp_path}/plain.txt.gz' is not a complete gzip file (Not a gzipped file")
    assert "rename it without .gz if it is plain text" in str(err.value)


def test_data_text_refuses_a_structured_or_binary_file_its_glob_matches(tmp_path):
    """`data.text=d/good.*` also matched good.jsonl and good.parquet: each JSON line was trained on, braces and all,
    and so was every line of the Parquet bytes that decoded, exit 0; 200 kB of random bytes named .txt gave a run
    of 3 "documents"."""
    (tmp_path / "good.txt").write_text("\n".join(VERSES) + "\n")
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"text": v}) + "\n" for v in VERSES))
    pyarrow.parquet.write_table(pyarrow.table({"text": VERSES}), tmp_path / "only.parquet")
    (tmp_path / "noise.txt.gz").write_bytes(gzip.compress(bytes(range(256)) * 100))

    def refusal(pattern):
        with pytest.raises(DataError) as err:
            list(one_pass_documents(tiny_config(f"data.text={pattern}").data, "train"))
        return one_line(err)

    assert refusal(f"{tmp_path}/good.*") == (
        f"data.text '{tmp_path}/good.*' matches '{tmp_path}/good.jsonl', a JSON-lines file, which data.text would "
        "read as lines of plain text; give it as data.jsonl, or narrow the glob to text files")
    assert "a Parquet file, which data.text would read as lines of plain text; give it as data.parquet" in refusal(
        f"{tmp_path}/*.parquet")
    assert refusal(f"{tmp_path}/*.txt*") == (
        f"data.text '{tmp_path}/*.txt*': '{tmp_path}/noise.txt.gz' is not text (a NUL byte in its first 8 kB: a "
        "binary file, or text in UTF-16); give text files in UTF-8, a document a line")
    assert list(one_pass_documents(tiny_config(f"data.text={tmp_path}/good.txt").data, "train"))


def test_a_truncated_gz_file_is_named(tmp_path):
    compressed = gzip.compress(b"".join(v.encode() + b"\n" for v in VERSES))
    (tmp_path / "cut.txt.gz").write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError, match=f"'{tmp_path}/cut.txt.gz' is not a complete gzip file") as err:
        documents = list(one_pass_documents(tiny_config(f"data.text={tmp_path}/cut.txt.gz").data, "train"))
        assert not documents
    one_line(err)


def test_a_file_that_is_not_array_record_is_named(tmp_path):
    (tmp_path / "x.array_record").write_bytes(b"not an array record\n" * 100)
    with pytest.raises(DataError) as err:
        list(one_pass_documents(tiny_config(f"data.array_record={tmp_path}/*.array_record").data, "train"))
    assert one_line(err).startswith(f"data.array_record '{tmp_path}/*.array_record': "
                                    f"file '{tmp_path}/x.array_record' cannot be read as ArrayRecord (")


def test_a_mixture_entry_is_named_by_its_place_in_the_mixture(tmp_path):
    """Each entry's settings were named as the single source's (`data.text`, `data.field`), which a config with a
    mixture does not have."""
    (tmp_path / "a.txt").write_text("\n".join(VERSES) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": verse}) + "\n" for verse in VERSES))
    missing = tiny_config(f"data.mixture=[{{text: '{tmp_path}/a.txt'}}, {{text: '{tmp_path}/none*.txt'}}]")
    with pytest.raises(DataError) as err:
        list(one_pass_documents(missing.data, "train"))
    assert one_line(err).startswith(f"data.mixture[1].text '{tmp_path}/none*.txt' matches no files")
    unfielded = tiny_config(f"data.mixture=[{{jsonl: '{tmp_path}/b.jsonl'}}, {{text: '{tmp_path}/a.txt'}}]")
    with pytest.raises(DataError) as err:
        list(one_pass_documents(unfielded.data, "train"))
    assert "has no field 'text' (data.mixture[0].field)" in one_line(err)
    assert "set data.mixture[0].field to the key of the text" in one_line(err)


def test_a_data_loader_worker_that_dies_or_has_no_shared_memory_is_a_data_error_naming_why():
    """A worker killed by the out-of-memory killer stopped the run as 'unexpected RuntimeError: Worker process was
    terminated ... Search the logs above' (where nothing was), losing the steps since the last checkpoint; a full
    /dev/shm said only 'no space left on device'. As data errors, a one-process run saves its steps first."""
    import errno

    from jaxgen.data.pipeline import user_errors_unwrapped

    killed = RuntimeError("Worker process was terminated unexpectedly with exit code -9. Search the logs above for "
                          "the source of the crash.")
    with pytest.raises(DataError) as said, user_errors_unwrapped():
        raise killed
    assert str(said.value) == ("a data loader worker process (data.workers) was killed by SIGKILL (the out-of-memory "
                               "killer, or kill -9); if memory ran out, set data.workers lower or data.prefetch "
                               "smaller")
    with pytest.raises(DataError, match=r"^a data loader worker process \(data.workers\) exited with status 3;"), \
            user_errors_unwrapped():
        raise RuntimeError("Worker process was terminated unexpectedly with exit code 3.")
    with pytest.raises(DataError, match=r"^no space left in the shared memory \(/dev/shm\) the data loader's worker "
                                        r"processes pass batches through; make /dev/shm larger"), \
            user_errors_unwrapped():
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(RuntimeError, match="something else"), user_errors_unwrapped():
        raise RuntimeError("something else")
