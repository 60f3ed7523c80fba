"""`jaxgen data prepare` never leaves a dataset that looks finished but is not:
one prepare per --out, every file read back before the dataset is marked
complete, and a kill or a full disk leaves nothing the next run trips over."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from array_record.python import array_record_module

from jaxgen.data.prepare import prepare_dataset, read_prepared_metadata
from jaxgen.data.sources import open_prepared
from jaxgen.errors import DataError, describe

from conftest import REPO

DOCUMENTS = 20_000  # about a second of writing: long enough to catch a prepare while it runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("".join(f"document {i}: the quick brown fox jumps over the lazy dog\n" for i in range(DOCUMENTS)))
    return path


def prepare_command(corpus, out):
    return [sys.executable, "-m", "jaxgen", "data", "prepare", "--input", str(corpus), "--out", str(out)]


def start_prepare(corpus, out, **kwargs):
    return subprocess.Popen(prepare_command(corpus, out), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def run_prepare(corpus, out, **kwargs):
    return subprocess.run(prepare_command(corpus, out), cwd=REPO, capture_output=True, text=True, timeout=120, **kwargs)


def wait_for(condition, what):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def lock_holder_pid(out):
    try:
        return json.loads(out.with_name(f".{out.name}.prepare.lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def assert_complete(out):
    import tensorflow_datasets as tfds

    summary = read_prepared_metadata(out)
    splits = tfds.builder_from_directory(out).info.splits
    assert summary["documents"] == {name: splits[name].num_examples for name in ("train", "validation")}
    assert sum(summary["documents"].values()) == DOCUMENTS
    assert all(path.stat().st_size > 0 for path in out.iterdir())


def test_a_second_prepare_of_the_same_out_is_refused_naming_the_first(corpus, tmp_path):
    out = tmp_path / "ds"
    processes = [start_prepare(corpus, out), start_prepare(corpus, out)]
    try:
        holder = wait_for(lambda: lock_holder_pid(out), "one prepare to take the lock")
        # Paused while holding the lock, the holder is certainly still running when the other tries.
        os.kill(holder, signal.SIGSTOP)
        [refused] = [p for p in processes if p.pid != holder]
        _, refusal = refused.communicate(timeout=120)
        os.kill(holder, signal.SIGCONT)
        [winner] = [p for p in processes if p.pid == holder]
        _, winner_log = winner.communicate(timeout=120)
    finally:
        for process in processes:
            process.kill()
    assert winner.returncode == 0, winner_log[-2000:]
    assert refused.returncode == 2
    assert refusal.count("jaxgen: error:") == 1 and "Traceback" not in refusal
    assert f"--out '{out}' is in use by process {holder} on host " in refusal
    assert_complete(out)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no lock file, no hidden build directory


def test_a_prepare_killed_mid_write_leaves_no_dataset_and_the_rerun_succeeds(corpus, tmp_path):
    out = tmp_path / "ds"
    process = start_prepare(corpus, out)
    try:
        wait_for(lambda: list(tmp_path.glob(".ds.partial-*/train-*")), "the first records to be written")
    finally:
        process.kill()
        process.communicate()
    assert not out.exists()
    result = run_prepare(corpus, out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_complete(out)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # the killed run's hidden directory is removed too


class DroppingWriter:
    """An ArrayRecord writer on a disk that silently loses the 10th record."""

    def __init__(self, path, options, writer=array_record_module.ArrayRecordWriter):
        self.path, self.written, self._writer = path, 0, writer(path, options)

    def write(self, record):
        self.written += 1
        if self.written != 10:
            self._writer.write(record)

    def close(self):
        self._writer.close()


class AlteringWriter(DroppingWriter):
    """... that changes one byte of the 10th record (same count, other bytes)."""

    def write(self, record):
        self.written += 1
        self._writer.write(record[:-1] + bytes([record[-1] ^ 1]) if self.written == 10 else record)


class TruncatingWriter(DroppingWriter):
    """... that loses the second half of each file once it is closed."""

    def close(self):
        self._writer.close()
        os.truncate(self.path, os.path.getsize(self.path) // 2)


@pytest.mark.parametrize("writer, damage", [
    (DroppingWriter, r"reads back 9799 records, 9800 were written"),
    (AlteringWriter, r"reads back 9800 records whose bytes differ from those written"),
    (TruncatingWriter, r"cannot be read back \("),
])
def test_a_damaged_file_is_caught_before_the_dataset_is_marked_complete(writer, damage, corpus, tmp_path, monkeypatch):
    small = tmp_path / "small.txt"
    small.write_text("".join(corpus.read_text().splitlines(keepends=True)[:10_000]))
    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", writer)
    with pytest.raises(DataError, match=rf"--out '.*ds' was not created: corpus-train.array_record-00000-of-00001 {damage}"):
        prepare_dataset(str(small), tmp_path / "ds", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["small.txt"]


def test_a_full_disk_leaves_no_dataset_and_no_lock(corpus, tmp_path):
    out = tmp_path / "ds"

    def small_file_size_limit():
        # Python ignores SIGXFSZ, so an over-limit write fails with EFBIG as a full disk fails with ENOSPC.
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    result = run_prepare(corpus, out, preexec_fn=small_file_size_limit)
    assert result.returncode != 0
    assert result.stderr.splitlines()[-1] == (f"jaxgen: error: {out}/train-00000.unnumbered: "
                                              "file too large (a file-size limit was reached)")
    assert list(tmp_path.iterdir()) == []
    result = run_prepare(corpus, out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_complete(out)


class FullDiskWriter(DroppingWriter):
    """... that fails to close as array_record does on a full disk: a RuntimeError naming the cause in words."""

    def close(self):
        raise RuntimeError(f"write() failed: No space left on device; writing {self.path}; at byte 65536; "
                           "Failed to close chunk_writer")


def test_a_full_disk_reads_as_every_other_commands_one_line(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", FullDiskWriter)
    with pytest.raises(OSError) as raised:
        prepare_dataset(str(corpus), tmp_path / "ds", progress=False)
    assert describe(raised.value) == (f"error: {tmp_path / 'ds'}/train-00000.unnumbered: no space left on device", 1)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_too_full_for_the_lock_s_record_names_out_and_leaves_no_file(corpus, tmp_path, monkeypatch):
    """The disk full before anything was written: `jaxgen: error: no space left on device`, naming no path (then
    the hidden lock file beside --out), and the empty lock file stayed beside --out."""
    import errno

    from jaxgen import files

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "pwrite", full)
    with pytest.raises(OSError) as raised:
        prepare_dataset(str(corpus), tmp_path / "ds", progress=False)
    assert describe(raised.value) == (f"error: {tmp_path / 'ds'}: no space left on device", 1)
    assert list(tmp_path.iterdir()) == []


def test_a_corpus_of_no_documents_says_so_not_to_hold_out_fewer(tmp_path):
    """A binary file (its lines skipped as invalid UTF-8) was '0 documents, too few for a validation split'."""
    binary = tmp_path / "corrupt.bin"  # no NUL byte (refused before any work, below): only invalid UTF-8
    binary.write_bytes(b"\x89PNG\x1a\xff\xfe\rIHDR\xff\xfe" * 50 + b"\n" + b"\xc3\xc3" * 100)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(DataError) as raised:
        prepare_dataset(str(binary), tmp_path / "ds", progress=False)
    assert str(raised.value) == (f"--input '{binary}' holds no text documents ({binary} looks binary); give text "
                                 "files (a document a line), .jsonl or .parquet files")
    # A file with a NUL byte is no text at all: 200 kB of random bytes gave a "dataset" of 3 documents.
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(range(256)) * 800)
    with pytest.raises(DataError) as raised:
        prepare_dataset(str(noise), tmp_path / "ds", progress=False)
    assert str(raised.value) == (f"--input '{noise}' is not text (a NUL byte in its first 8 kB: a binary file, or "
                                 "text in UTF-16); give text files in UTF-8, a document a line")
    noise.unlink()
    with pytest.raises(DataError) as raised:
        prepare_dataset(str(blank), tmp_path / "ds", progress=False)
    assert str(raised.value) == (f"--input '{blank}' holds no text documents; give text files (a document a line), "
                                 ".jsonl or .parquet files")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt", "corrupt.bin"]


def test_a_prepare_stopped_by_sigterm_leaves_no_lock_file_behind(tmp_path):
    """SIGTERM to `data prepare` left `.NAME.prepare.lock` beside --out: the process leaves at once, past the
    block that removes it."""
    holding = ("import pathlib, sys\nfrom jaxgen.data.prepare import prepare_lock\n"
               "from jaxgen.interrupts import end_cleanly_on_ctrl_c\nend_cleanly_on_ctrl_c()\n"
               "with prepare_lock(pathlib.Path(sys.argv[1])):\n    print('holding', flush=True)\n"
               "    while True:\n        pass\n")
    holder = subprocess.Popen([sys.executable, "-c", holding, str(tmp_path / "out")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "holding\n" and (tmp_path / ".out.prepare.lock").exists()
    # Training on it meanwhile was told to create it with `jaxgen data prepare`, which is refused while in use.
    with pytest.raises(DataError, match=rf"^data.path '{tmp_path}/out' is being written by `jaxgen data prepare` "
                                        rf"\(process {holder.pid} on host .*\); train on it once that has finished$"):
        open_prepared(str(tmp_path / "out"), "train")
    holder.send_signal(signal.SIGTERM)
    _, stderr = holder.communicate(timeout=30)
    assert (holder.returncode, stderr.strip()) == (143, "jaxgen: stopped by SIGTERM")
    assert not any(tmp_path.iterdir())
    with pytest.raises(DataError, match=r"is not a directory; create one with `jaxgen data prepare"):
        open_prepared(str(tmp_path / "out"), "train")


def test_a_prepared_dataset_damaged_since_is_named_in_one_line_where_it_is_read(corpus, tmp_path):
    """A train file cut short, or damaged inside, after prepare: training failed with grain's RuntimeError from a
    reader thread ('Failed to read RiegeliPostscript'), exit 1, naming no file."""
    import shutil

    from jaxgen.data.sources import one_pass_documents

    from conftest import tiny_config

    small = tmp_path / "small.txt"
    small.write_text("".join(corpus.read_text().splitlines(keepends=True)[:10_000]))
    prepare_dataset(str(small), tmp_path / "ds", progress=False)
    cut, inside = tmp_path / "cut", tmp_path / "inside"
    for copy in (cut, inside):
        shutil.copytree(tmp_path / "ds", copy)
    train_file = "corpus-train.array_record-00000-of-00001"
    os.truncate(cut / train_file, os.path.getsize(cut / train_file) // 2)
    data = bytearray((inside / train_file).read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4096, 64):
        data[i] ^= 0xFF
    (inside / train_file).write_bytes(bytes(data))
    for damaged, says in [(cut, f"data.path '{cut}': file '{cut / train_file}' is damaged ("),
                          (inside, f"data.path '{inside}': record ")]:
        with pytest.raises(DataError) as refused:
            list(one_pass_documents(tiny_config(f"data.path={damaged}").data, "train"))
        message, _ = describe(refused.value)
        assert message.startswith("error: " + says)
        assert message.endswith("prepare the dataset again with `jaxgen data prepare`")
        assert "\n" not in message
    assert "cannot be read, its file is damaged (" in message
    assert len(list(one_pass_documents(tiny_config(f"data.path={tmp_path / 'ds'}").data, "train"))) > 9000
