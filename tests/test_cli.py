"""Every mistake a user makes on the command line is one clear line: no traceback, no hang, the value named."""

import contextlib
import errno
import json
import logging
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from jaxgen.cli import build_parser, run_command
from jaxgen.commands import cmd_eval
from jaxgen.errors import UsageError, describe
from jaxgen.files import write_atomic
from jaxgen.metrics import read_metrics

from conftest import TINY_CONFIG
from helpers import REPO, cli_env, error_lines, run_jaxgen


def refused(result, *, status=2, says: str) -> str:
    """The run failed with `status` and exactly one error line containing `says`, and no traceback."""
    assert result.returncode == status, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    [line] = error_lines(result.stderr)
    assert says in line, line
    return line


@pytest.mark.parametrize("overrides,says", [
    (["model.kind=gpt"], "model.kind='gpt' is not a model kind; valid: transformer, dit"),
    (["train.steps=true"], "train.steps: true is a boolean; a number is expected here"),
    (["data.seed=-5"], "config key 'data.seed' = -5: Input should be greater than or equal to 0"),
    (["data.text="], "data.text: is empty"),
    (["optimizer.lr=.inf"], "'optimizer.lr' = inf: Input should be a finite number"),
    (["train.seed=99999999999999999999"], "'train.seed' = 99999999999999999999: Input should be less than or equal "
                                          "to 4294967295"),
    (["train.stpes=3"], "Did you mean 'train.steps'?"),
    (["model.n_layers=[1,2"], "override 'model.n_layers=[1,2' is not valid YAML"),
])
def test_config_mistakes_are_one_line_naming_the_key(tmp_path, overrides, says):
    refused(run_jaxgen("train", "--run-dir", str(tmp_path / "r"), *overrides), says=says)
    assert not (tmp_path / "r").exists()


def test_a_config_that_is_a_directory_or_an_alias_bomb_is_refused_at_once(tmp_path):
    refused(run_jaxgen("train", "--config", str(tmp_path)), says="is a directory; give a YAML file")
    bomb = tmp_path / "bomb.yaml"
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for name, prev in zip("bcdefghi", "abcdefgh"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 10)}]")
    bomb.write_text("\n".join(lines) + "\ntrain:\n  sample_prompt: *i\n")  # 10^9 values once expanded
    start = time.monotonic()
    line = refused(run_jaxgen("train", "--config", str(bomb), timeout=60), says="expands to more than 100,000 values")
    assert time.monotonic() - start < 30 and len(line) < 300


def test_a_model_too_large_for_the_machine_is_refused_before_allocating(tmp_path):
    start = time.monotonic()
    line = refused(run_jaxgen("train", "--run-dir", str(tmp_path / "r"), "model.n_layers=1000000000", timeout=120),
                   says="training this model needs at least")
    assert time.monotonic() - start < 60
    assert "PB per device" in line and "available" in line
    assert not (tmp_path / "r").exists()


def test_overrides_anywhere_after_the_command_version_and_unknown_arguments(tmp_path):
    # The override after --run-dir reaches the config (its typo is reported), not argparse.
    refused(run_jaxgen("train", "--run-dir", str(tmp_path / "r"), "train.stpes=3"), says="Did you mean 'train.steps'?")
    version = run_jaxgen("--version")
    assert version.returncode == 0 and version.stdout.startswith("jaxgen ")
    refused(run_jaxgen("train", "--run-dir", str(tmp_path / "r"), "--bogus"),
            says="unrecognized arguments: --bogus (see `jaxgen train --help`)")
    refused(run_jaxgen("sample", "--run-dir", str(tmp_path), "--max-new-tokens", "0"),
            says="argument --max-new-tokens: 0 is not a positive integer")


def test_every_option_has_help_text():
    def parsers(parser):
        yield parser
        for action in parser._actions:
            for sub in getattr(action, "choices", None) or {}:
                if isinstance(action.choices, dict):
                    yield from parsers(action.choices[sub])

    missing = [f"{parser.prog} {action.option_strings or action.dest}"
               for parser in parsers(build_parser()) for action in parser._actions
               if not action.help and action.dest != "help"]
    assert missing == []


def test_sample_options_belong_to_a_model_kind(tmp_path):
    lm, dit = tmp_path / "lm", tmp_path / "dit"
    lm.mkdir()
    dit.mkdir()
    (lm / "config.yaml").write_text(TINY_CONFIG.read_text())
    (dit / "config.yaml").write_text((REPO / "configs" / "dit_digits.yaml").read_text())
    refused(run_jaxgen("sample", "--run-dir", str(lm), "--labels", "1,2"),
            says=f"--labels cannot be used with {lm}, a model.kind=transformer run; its options: --prompt")
    refused(run_jaxgen("sample", "--run-dir", str(dit), "--prompt", "hi", "--temperature", "0"),
            says="--prompt, --temperature cannot be used with")
    refused(run_jaxgen("sample", "--run-dir", str(lm), "--top-k", "5000"),  # before reading any checkpoint
            says="--top-k 5000 is more than the 512 tokens of this run's model; give 0 (off) to 512")
    refused(run_jaxgen("sample", "--run-dir", str(lm), "--max-new-tokens", "64"),
            says="--max-new-tokens 64 does not fit this run's context (model.max_seq_len=64, one of them the BOS "
                 "token); give 1 to 63")
    refused(run_jaxgen("export", "--run-dir", str(lm), "--out", str(tmp_path / "hf")),  # not about its tokenizer
            says=f"run directory '{lm}' holds no checkpoint")
    refused(run_jaxgen("sample", "--run-dir", str(dit), "--labels", "0,10"),
            says="--labels 0,10: each label must be in 0..9 (model.num_classes=10)")
    refused(run_jaxgen("sample", "--run-dir", str(dit), "--sampler", "ddim"),
            says="--sampler ddim does not fit this run's diffusion.objective='flow'; valid: euler, heun")
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.yaml").write_text((REPO / "configs" / "vae_fashion.yaml").read_text())
    refused(run_jaxgen("sample", "--run-dir", str(vae), "--images", str(tmp_path / "none*.png")),
            says=f"--images '{tmp_path}/none*.png' matches no files")
    refused(run_jaxgen("sample", "--run-dir", str(vae), "--images", str(tmp_path / "none*.png"), "--seed", "3"),
            says=f"--seed cannot be used with {vae}, a model.kind=autoencoder run; its options: --images, --out, "
                 "--save-array")  # reconstructions draw nothing at random: the seed was taken and unused
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.yaml").write_text((REPO / "configs" / "t5_tiny.yaml").read_text())
    line = refused(run_jaxgen("sample", "--run-dir", str(t5), "--prompt", "a", "--max-new-tokens", str(10**12)),
                   says=f"--max-new-tokens {10**12} needs about ")  # was an allocation failure naming train options
    assert re.search(r"for the decoder's cache of 1 input at once, more than the .* available; give at most \d+$", line)
    beyond = run_jaxgen("sample", "--run-dir", str(t5), "--prompt", "a", "--max-new-tokens", "1000")
    assert ("--max-new-tokens 1000 is more than the 32 target tokens the model was trained to write (data.target_len)"
            in beyond.stderr)


def test_a_prompt_longer_than_the_context_is_refused_before_the_checkpoint_is_read(tmp_path, tokenizer):
    """It was refused after the restore: minutes for a large model, for a mistake the tokenizer alone shows."""
    run = tmp_path / "lm"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "config.yaml").write_text(TINY_CONFIG.read_text())
    shutil.copy(tokenizer.path, run / "tokenizer.model")
    (run / "checkpoints" / "4" / "jaxgen_checksums.json").write_text("{}")  # no arrays: any read would fail
    line = refused(run_jaxgen("sample", "--run-dir", str(run), "--prompt", "a", "--prompt", "And God said " * 40),
                   says="the longest prompt (")
    assert line.endswith("tokens with BOS) fills the model's context (model.max_seq_len=64); shorten it")


@pytest.mark.parametrize("flag,value,says", [
    ("--temperature", "-1", "argument --temperature: -1 is negative; give 0 or more"),
    ("--temperature", "nan", "argument --temperature: nan is not a finite number"),
    ("--temperature", "hot", "argument --temperature: 'hot' is not a number"),
    ("--top-k", "-3", "argument --top-k: -3 is negative; give 0 or more"),
    ("--top-p", "0", "argument --top-p: 0 is not a probability mass; give a number above 0, at most 1"),
    ("--top-p", "7", "argument --top-p: 7 is not a probability mass"),
    ("--guidance", "inf", "argument --guidance: inf is not a finite number"),
    ("--guidance", "1e308", "argument --guidance: 1e+308 is not a guidance scale; give 0 to 100 (1 = no guidance)"),
    ("--labels", "0_1", "argument --labels: '0_1' is not a comma-separated list of integers ('0_1' is not one), "
                        "e.g. 0,1,2"),
    ("--labels", "1,٣", "argument --labels: '1,٣' is not a comma-separated list of integers ('٣' is not one)"),
    ("--seed", "99999999999999999999", "argument --seed: 99999999999999999999 is not a seed; give an integer from 0 "
                                       "to 4294967295"),
    ("--seed", "-1", "argument --seed: -1 is not a seed"),
    ("--cpu-devices", "100000", "argument --cpu-devices: 100000 is not a simulated device count; give 1 to 4096"),
])
def test_numbers_out_of_range_are_refused_by_the_parser(flag, value, says):
    with pytest.raises(UsageError) as refusal:
        build_parser().parse_args(["sample", "--run-dir", "r", flag, value])
    assert says in str(refusal.value) and "\n" not in str(refusal.value)
    assert build_parser().parse_args(["sample", "--run-dir", "r", "--labels", "0, 3,-1"]).labels == [0, 3, -1]


@pytest.mark.parametrize("args,suffix", [
    (["sample", "--run-dir", "r", "--out"], ".png"), (["sample", "--run-dir", "r", "--save-array"], ".npz"),
    (["data", "g2p", "--out"], ".jsonl"),
    (["tokenizer", "train", "--input", "x", "--vocab-size", "9", "--out"], ".model")])
def test_a_file_to_write_is_checked_by_the_parser(tmp_path, args, suffix):
    def refusal(path: str) -> str:
        with pytest.raises(UsageError) as refused_:
            build_parser().parse_args([*args, path])
        return str(refused_.value)

    assert f"argument {args[-1]}: '{tmp_path}' is a directory; give the file to write, e.g. {tmp_path}/NAME{suffix}" \
        in refusal(str(tmp_path))
    assert f"argument {args[-1]}: an empty path; give the file to write" in refusal("")
    if suffix:  # a PNG named .jpg, or JSON lines named .txt (which would be read as text), help nobody
        assert f"argument {args[-1]}: 'out.txt' does not end in {suffix}; the file written is" in refusal("out.txt")
    assert getattr(build_parser().parse_args([*args, f"Out{suffix.upper()}"]), args[-1][2:].replace("-", "_"))


@pytest.mark.parametrize("args", [
    ["train", "--run-dir"], ["train", "--config"], ["eval", "--run-dir"], ["sample", "--run-dir"],
    ["eval", "--run-dir", "r", "--tasks", "piqa", "--task-data"], ["export", "--out", "o", "--run-dir"],
    ["data", "inspect", "--batches", "1", "--config"], ["data", "prepare", "--out", "o", "--input"],
    ["data", "fashion-captions", "--out", "o", "--idx"]])
def test_an_empty_path_is_refused_by_the_parser(args):
    """`--run-dir "$RUN_DIR"` with the variable unset: train started a new run under runs/ where the job meant to
    continue its own, and eval read the current folder."""
    with pytest.raises(UsageError) as refusal:
        build_parser().parse_args([*args, ""])
    assert f"argument {args[-1]}: an empty path (a variable not set?); give " in str(refusal.value)


def test_a_prompt_that_is_not_utf8_is_refused_by_the_parser():
    """`--prompt $'caf\\xe9'` (a Latin-1 terminal) ended in sentencepiece's `unexpected TypeError`, exit 1, for an
    LM, and was taken as text by a text-to-image run."""
    for flag in ("--prompt", "--negative-prompt"):
        with pytest.raises(UsageError) as refusal:
            build_parser().parse_args(["sample", "--run-dir", "r", flag, "caf\udce9"])  # how Python holds 0xe9
        assert str(refusal.value) == (f"argument {flag}: holds byte 0xe9 at character 4, which is not UTF-8 text; "
                                      "give UTF-8 text (see `jaxgen sample --help`)")
    assert build_parser().parse_args(["sample", "--run-dir", "r", "--prompt", "café ✓"]).prompt == ["café ✓"]


def test_a_tokenizer_is_never_trained_over_an_existing_file(tmp_path):
    """`tokenizer train --out RUN/tokenizer.model` replaced a run's tokenizer: its checkpoints could no longer be
    sampled, evaluated or resumed (they are refused with another tokenizer) and the original was gone."""
    kept = tmp_path / "run" / "tokenizer.model"
    kept.parent.mkdir()
    kept.write_bytes(b"the run's own")
    corpus = REPO / "jaxgen" / "data" / "kjv.txt.gz"
    refused(run_jaxgen("tokenizer", "train", "--input", str(corpus), "--vocab-size", "512", "--out", str(kept)),
            says=f"--out '{kept}' already exists (runs or datasets made with that tokenizer need it); choose a new "
                 "path, or delete it first")
    assert kept.read_bytes() == b"the run's own"


def test_of_two_tokenizers_trained_at_once_to_one_out_the_first_written_is_kept(tmp_path, monkeypatch):
    """Two `tokenizer train --out SAME` started together both passed the check above, both printed their
    tokenizer's sha256, and the second replaced the first's without a word."""
    from jaxgen.data import corpus

    out, reading = tmp_path / "tokenizer.model", corpus.iter_documents

    def while_training(*args, **kwargs):
        out.write_bytes(b"the other process's")  # it finishes first
        yield from reading(*args, **kwargs)

    monkeypatch.setattr(corpus, "iter_documents", while_training)
    with pytest.raises(UsageError) as refusal:
        run_command(["tokenizer", "train", "--input", str(REPO / "jaxgen" / "data" / "kjv.txt.gz"), "--vocab-size",
                     "512", "--out", str(out)])
    assert str(refusal.value) == (f"--out '{out}' was written by another process while this one trained; it is "
                                  "kept as that process wrote it, and this one's tokenizer is not: choose a new path")
    assert out.read_bytes() == b"the other process's" and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_file_system_errors_are_named_in_words(tmp_path, monkeypatch):
    assert describe(OSError(errno.ENOSPC, "No space left on device", "/data/x")) == (
        "error: /data/x: no space left on device", 1)
    assert describe(OSError(errno.EROFS, "Read-only file system", "/ro/y"))[0] == "error: /ro/y: read-only file system"
    # A path holding a newline (or any control character) is escaped: the last line stays one line.
    code = ("import errno, sys\nimport jaxgen.cli as cli\n"
            "def fails(args):\n    raise OSError(errno.ENOSPC, 'No space left on device', '/a\\nb')\n"
            "cli.run_parsed = fails\nsys.exit(cli.main(['data', 'g2p', '--out', 'x.jsonl']))")
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (ended.returncode, ended.stderr) == (1, "jaxgen: error: /a\\nb: no space left on device\n")
    # `jaxgen ... | head`: a broken pipe names no file, and "Broken pipe" alone said nothing of whose pipe.
    assert describe(BrokenPipeError(errno.EPIPE, "Broken pipe"))[0] == (
        "error: the pipe this command's output or log goes to was closed by its reader (broken pipe)")
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/secret")
        except OSError as err:
            raise RuntimeError("a library wrapped it") from err
    except RuntimeError as wrapped:
        assert describe(wrapped)[0] == "error: /secret: permission denied"
    exhausted = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 5156002734224 bytes.\ndetails")
    assert describe(exhausted, "train") == describe(exhausted) == (
        "error: a device ran out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 5156002734224 bytes.); make "
        "data.batch_size smaller, use train.microbatches, model.remat=full, or shard over more devices", 1)
    assert describe(exhausted, "sample")[0].endswith("bytes.); ask for less at once (fewer prompts or images, a "
                                                     "smaller --batch-size or --max-new-tokens), or read the model "
                                                     "over more devices (mesh.fsdp=N with sharding.preset=fsdp)")
    # A platform the machine has not (JAX_PLATFORMS): its setting, not the code, and not a crash.
    monkeypatch.setenv("JAX_PLATFORMS", "bogus")
    assert describe(RuntimeError("Unable to initialize backend 'bogus': Backend 'bogus' is not in the list of known "
                                 "backends: ['cpu', 'tpu'].")) == (
        "error: JAX_PLATFORMS='bogus': JAX cannot start it here (Unable to initialize backend 'bogus': Backend 'bogus' "
        "is not in the list of known backends: ['cpu', 'tpu'].); unset JAX_PLATFORMS to use what this machine has, "
        "or name what it has (cpu, cuda, rocm, tpu)", 2)
    # A collective broken by another process's exit: this process is not the one to blame.
    broken = RuntimeError("UNKNOWN: Gloo AllReduce failed: [external/gloo/gloo/transport/tcp/pair.cc:547] Connection "
                          "closed by peer [127.0.0.1]:44467")
    assert describe(broken) == ("error: another process of the run stopped, breaking this one's collective (UNKNOWN: "
                                "Gloo AllReduce failed: [external/gloo/gloo/transport/tcp/pair.cc:547] Connection "
                                "closed by peer [127.0.0.1]:44467); that process's own log says why, or nothing "
                                "where it was killed outright (kill -9, the out-of-memory killer)", 1)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refused(run_jaxgen("train", "--run-dir", str(a_file / "run" / "1"), "train.steps=1"),
            says=f"--run-dir '{a_file / 'run' / '1'}' is under '{a_file}', a file; give a directory")
    refused(run_jaxgen("train", "--run-dir", str(a_file)), says=f"--run-dir '{a_file}' is a file; give a directory")
    refused(run_jaxgen("eval", "--run-dir", str(a_file)), says=f"run directory '{a_file}' is a file")
    # Output directories are tried before any work (export named its hidden temporary after reading the run).
    refused(run_jaxgen("data", "prepare", "--input", str(a_file), "--out", str(a_file / "d")),
            says=f"--out: '{a_file / 'd'}' is under '{a_file}', a file; give a directory")
    refused(run_jaxgen("export", "--run-dir", str(tmp_path), "--out", "/proc/exported"),
            says="--out: '/proc/exported' cannot be written: '/proc' takes no new files (a trial file there failed")
    assert a_file.read_text() == "x"


def test_a_platform_without_its_plugin_and_a_removed_working_directory_are_named(tmp_path, monkeypatch):
    """`JAX_PLATFORMS=cuda` without the CUDA plugin failed an assertion inside JAX: 'unexpected AssertionError';
    a working directory removed under the shell said only 'no such file or directory'."""
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    try:  # raised where JAX raises it: its backend set-up
        exec(compile("assert False", "/site-packages/jax/_src/xla_bridge.py", "exec"))
    except AssertionError as err:
        assert describe(err) == (
            "error: JAX_PLATFORMS='cuda': JAX cannot start it here (JAX has no backend for it: is its plugin, e.g. "
            "jax[cuda12], installed?); unset JAX_PLATFORMS to use what this machine has, or name what it has (cpu, "
            "cuda, rocm, tpu)", 2)
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert describe(FileNotFoundError(errno.ENOENT, "No such file or directory"))[0] == (
        "error: no such file or directory (the current directory was removed after this command started in it: cd "
        "into one that exists, or give absolute paths)")
    absolute = FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere/x")
    assert describe(absolute)[0] == "error: /nowhere/x: no such file or directory"  # not the working directory's


def test_too_many_open_files_names_the_limit_and_a_hung_exit_is_cut_short(tmp_path):
    """Under `ulimit -n 64` with data workers the run said 'too many open files' naming a cache folder, then hung
    for ever as it exited: Orbax's threads of a half-started save waited for a signal that never came."""
    import resource

    from jaxgen.errors import os_error_words

    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert os_error_words(errno.EMFILE) == (f"too many open files (this process may open {limit:,}: raise that with "
                                            "`ulimit -n`, or set data.workers lower)")
    stuck = ("import threading, jaxgen.__main__ as entry\n"
             "threading.Thread(target=threading.Event().wait).start()  # never ends, and is waited for at exit\n"
             "entry.leave_within(1.0, 3)\nraise SystemExit(3)")
    started = time.monotonic()
    ended = subprocess.run([sys.executable, "-c", stuck], timeout=60)
    assert ended.returncode == 3 and time.monotonic() - started < 30


def test_the_user_cache_is_private_whatever_the_umask(tmp_path):
    """Under umask 000 the compilation cache was made world-writable: anyone could put a program there that the
    next run would execute."""
    from jaxgen.files import make_private_directory

    before = os.umask(0)
    try:
        make_private_directory(tmp_path / "cache" / "jaxgen")
    finally:
        os.umask(before)
    assert oct((tmp_path / "cache" / "jaxgen").stat().st_mode & 0o777) == oct(0o700)


def test_a_file_system_out_of_inodes_is_not_called_out_of_space(tmp_path, monkeypatch):
    """A tmpfs out of inodes said 'no space left on device' while `df -h` showed it half empty."""
    import collections

    from jaxgen.errors import os_error_words

    usage = collections.namedtuple("usage", "f_files f_ffree f_bavail")
    monkeypatch.setattr(os, "statvfs", lambda place: usage(64, 0, 12_000))
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))
    assert describe(full)[0] == (f"error: {tmp_path / 'run' / 'metrics.jsonl'}: no free inodes left on device (the "
                                 "file system can make no more files, though space remains)")
    monkeypatch.setattr(os, "statvfs", lambda place: usage(64, 3, 0))
    assert os_error_words(errno.ENOSPC, tmp_path) == "no space left on device"


def test_a_link_leading_nowhere_is_named_and_a_name_of_any_legal_length_is_written(tmp_path):
    """A dangling link as --run-dir said '<dir>: already exists' after the devices were set up; a 250-byte --out
    failed at the end, naming a hidden temporary name 'too long' (the output's name plus a suffix)."""
    from jaxgen.files import building, unwritable_place

    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    refused(run_jaxgen("train", "--run-dir", str(tmp_path / "dangling"), "train.steps=1"),
            says=f"--run-dir '{tmp_path / 'dangling'}' is a symbolic link to '{tmp_path / 'gone'}', which does not "
                 "exist; make its target first, or give another path")
    assert unwritable_place(str(tmp_path / "dangling" / "run"), directory=True) == (
        f"'{tmp_path / 'dangling' / 'run'}' leads through '{tmp_path / 'dangling'}', a symbolic link to "
        f"'{tmp_path / 'gone'}', which does not exist; make its target first, or give another path")
    assert unwritable_place(str(tmp_path / "loop1" / "x.png")) == (
        f"'{tmp_path / 'loop1' / 'x.png'}' leads through '{tmp_path / 'loop1'}', a symbolic link to 'loop2', one of "
        "a loop of links leading to each other; give another path")
    long_name = "é" * 127  # 254 bytes: legal, with no room for a suffix
    write_atomic(tmp_path / long_name, b"x")
    with building(tmp_path / (long_name[:-1] + "d")) as partial:
        (partial / "f").write_bytes(b"y")
    assert (tmp_path / long_name).read_bytes() == b"x"
    assert (tmp_path / (long_name[:-1] + "d") / "f").read_bytes() == b"y"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["dangling", "loop1", "loop2", long_name,
                                                                  long_name[:-1] + "d"])


def test_a_file_that_could_not_be_written_is_named_and_the_old_one_kept(tmp_path):
    kept = tmp_path / "grid.png"
    kept.write_bytes(b"before")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))  # Python ignores SIGXFSZ: the write fails, EFBIG
    try:
        with pytest.raises(OSError) as failed:
            write_atomic(kept, b"x" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert describe(failed.value)[0] == f"error: {kept}: file too large (a file-size limit was reached)"
    assert kept.read_bytes() == b"before" and [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    # A folder where no file can be made: the temporary file's open fails first, and the user's path is named.
    with pytest.raises(OSError) as failed:
        write_atomic("/proc/words.jsonl", b"x")
    assert describe(failed.value)[0] == "error: /proc/words.jsonl: no such file or directory"
    # An output option is tried before any work (`sample --out` drew every image, then failed to write the grid).
    refused(run_jaxgen("data", "g2p", "--out", "/proc/words.jsonl"),
            says="--out: '/proc/words.jsonl' cannot be written: '/proc' takes no new files (a trial file there "
                 "failed: no such file or directory)")
    refused(run_jaxgen("sample", "--run-dir", str(tmp_path), "--out", str(kept / "x.png")),
            says=f"--out: '{kept / 'x.png'}' is under '{kept}', a file; give a file's path in a directory")


def test_the_outputs_of_one_command_are_written_all_or_none(tmp_path):
    """`sample --out t.png --save-array t.npz` on a full disk failed at the .npz with t.png already replaced."""
    from jaxgen.files import write_output, written_together

    grid, arrays = tmp_path / "t.png", tmp_path / "t.npz"
    grid.write_bytes(b"old grid")
    arrays.write_bytes(b"old arrays")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))  # Python ignores SIGXFSZ: the write fails, EFBIG
    try:
        with pytest.raises(OSError) as failed, written_together():
            write_output(grid, b"new grid")
            write_output(arrays, b"x" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert describe(failed.value)[0] == f"error: {arrays}: file too large (a file-size limit was reached)"
    assert grid.read_bytes() == b"old grid" and arrays.read_bytes() == b"old arrays"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz", "t.png"]  # no hidden leftovers
    with written_together():
        write_output(grid, b"new grid")
        write_output(arrays, b"new arrays")
        assert grid.read_bytes() == b"old grid"  # nothing in place before the last one is written
    assert grid.read_bytes() == b"new grid" and arrays.read_bytes() == b"new arrays"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz", "t.png"]


def test_a_read_only_file_system_names_the_users_path_not_a_temporary_one(tmp_path, monkeypatch):
    """There removing even a name never made fails (EROFS): the clean-up's error, naming the hidden temporary file
    (`..grid.png.together-host-pid.tmp-host-pid`), replaced the write's own."""
    import jaxgen.files
    from jaxgen.files import write_output, written_together

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))

    monkeypatch.setattr(jaxgen.files, "open", read_only, raising=False)
    monkeypatch.setattr(pathlib.Path, "unlink", lambda self, missing_ok=False: read_only(self))
    grid = tmp_path / "samples" / "grid.png"
    for together in (False, True):
        with pytest.raises(OSError) as failed, written_together() if together else contextlib.nullcontext():
            write_output(grid, b"grid")
        assert describe(failed.value)[0] == f"error: {grid}: read-only file system", together


def start(args, *, cwd=REPO):
    return subprocess.Popen([sys.executable, "-m", "jaxgen", *args], cwd=cwd, env=cli_env(1), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def interrupt_when(process, printed: str | None, after_s: float = 0.0, signum: int = signal.SIGINT):
    """Ctrl-C (SIGINT to the process group), or `signum`, once stderr shows `printed` (or right away); returns
    stderr."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while printed and not any(printed in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(after_s)
    os.killpg(process.pid, signum)
    process.wait(timeout=120)
    reader.join(timeout=10)
    return "".join(lines)


def one_final_line(stderr: str) -> str:
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr
    final = [line for line in stderr.splitlines() if line.startswith("jaxgen:")]
    assert len(final) == 1, stderr[-2000:]
    return final[0]


@pytest.mark.parametrize("moment,printed,after_s,status", [
    ("start-up", None, 0.3, 130),
    ("compilation", "model: ", 0.5, 130),
    ("training", '"step": 2', 0.0, 75),
])
def test_ctrl_c_at_any_moment_is_one_line_and_never_a_crash(tmp_path, moment, printed, after_s, status):
    run_dir = tmp_path / "run"
    process = start(["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "train.steps=100000",
                     "logging.every=1", "checkpoint.every=null", "train.sample_tokens=0"])
    if printed and printed.startswith('"step"'):  # wait for training through its metrics file
        deadline = time.monotonic() + 180
        while not ((run_dir / "metrics.jsonl").exists() and printed in (run_dir / "metrics.jsonl").read_text()):
            assert time.monotonic() < deadline and process.poll() is None, "training never started"
            time.sleep(0.05)
        printed = None
    stderr = interrupt_when(process, printed, after_s)
    assert process.returncode == status, stderr[-2000:]
    final = one_final_line(stderr)
    says = {"start-up": "interrupted", "compilation": "interrupted; run the same command again to continue",
            "training": "preempted: saved a checkpoint"}[moment]
    assert final.startswith(f"jaxgen: {says}"), final
    assert ("Ctrl-C: saving a checkpoint after this step" in stderr) == (moment == "training")


def test_a_ctrl_c_after_the_command_finished_does_not_call_it_failed(tmp_path):
    """`export` printed 'exported to DIR' and then exited 130 on a Ctrl-C during the process's end (JAX's
    teardown): a script that trusted the status ran it again, and was told the output exists."""
    code = ("import os, signal, sys, time, threading\nimport jaxgen.cli as cli\nrun = cli.run_parsed\n"
            "def finished_then_ctrl_c(args):\n    status = run(args)\n"
            "    threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n    return status\n"
            "cli.run_parsed = finished_then_ctrl_c\nstatus = cli.main(sys.argv[1:])\ntime.sleep(30)\n"
            "sys.exit(status)")
    ended = subprocess.run([sys.executable, "-c", code, "data", "g2p", "--out", str(tmp_path / "g2p.jsonl")],
                           capture_output=True, text=True, timeout=120)
    assert ended.returncode == 0, ended.stderr[-2000:]
    assert one_final_line(ended.stderr) == ("jaxgen: interrupted after the command had finished; what it wrote is "
                                            "complete")


def test_a_signal_during_the_interpreters_teardown_leaves_the_commands_status(tmp_path):
    """Python gives every signal back its default action as its teardown starts (freeing JAX's objects takes
    most of a second): `export` printed 'exported to DIR', a SIGTERM then ended it 143 without a word."""
    code = ("import time\nfrom jaxgen.interrupts import end_cleanly_on_ctrl_c\nend_cleanly_on_ctrl_c()\n"
            "class SlowToFree:\n    def __del__(self):\n        print('freeing', flush=True)\n        time.sleep(2)\n"
            "kept = SlowToFree()\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "freeing\n"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, process.stderr.read()[-2000:]


def test_an_interruption_while_text_streams_starts_its_own_line():
    """Ctrl-C during `jaxgen sample`'s streamed text printed `...prep prepjaxgen: interrupted` on one line."""
    code = ("import sys; from jaxgen.interrupts import leave_with, streamed\n"
            "for piece in ('In the', ' beginning'):\n    print(piece, end='', flush=True); streamed(piece)\n"
            "leave_with('interrupted', 130)")
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (ended.returncode, ended.stdout, ended.stderr) == (130, "In the beginning", "\njaxgen: interrupted\n")


def test_a_second_signal_while_leaving_prints_no_second_line():
    """SIGTERM to a launched job's process group reaches each process twice (from the group, then passed on by
    the launcher): a second handler, run on the main thread as it left, printed `stopped by SIGTERM` again;
    one during the clean-up of what the command was building printed its own line instead of the first's."""
    code = ("import os, signal, sys, time\n"
            "from jaxgen.interrupts import end_cleanly_on_ctrl_c, leave_with, undone_on_leaving\n"
            "end_cleanly_on_ctrl_c()\n"
            "def second_signal():\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(0.5)\n"
            "class SlowToFlush:\n    write = lambda self, text: None\n"
            "    def flush(self):\n        self.flush = lambda: None\n        second_signal()\n"
            "if sys.argv[1] == 'after_the_line':\n    sys.stdout = SlowToFlush()\n"
            "with undone_on_leaving(second_signal if sys.argv[1] == 'during_clean_up' else lambda: None):\n"
            "    leave_with('interrupted', 130)\n")
    for moment in ("after_the_line", "during_clean_up"):
        ended = subprocess.run([sys.executable, "-c", code, moment], capture_output=True, text=True, timeout=60)
        assert (ended.returncode, ended.stderr) == (130, "jaxgen: interrupted\n"), moment


def test_a_run_stopped_without_run_dir_names_the_directory_to_continue_in(tmp_path):
    """`jaxgen train` without --run-dir makes a new timestamped directory each time: 'run the same command again
    to resume' started over from step 0 in another one, and a requeued job never got past its first steps."""
    process = start(["train", "--config", str(TINY_CONFIG), "train.steps=100000", "logging.every=1",
                     "train.sample_tokens=0"], cwd=tmp_path)
    deadline = time.monotonic() + 180
    while not list(tmp_path.glob("runs/*/metrics.jsonl")) or len(read_metrics(
            next(tmp_path.glob("runs/*/metrics.jsonl")))) < 3:
        assert time.monotonic() < deadline and process.poll() is None, "training never started"
        time.sleep(0.05)
    [run_dir] = [path.relative_to(tmp_path) for path in tmp_path.glob("runs/*")]
    stderr = interrupt_when(process, None)
    assert process.returncode == 75, stderr[-3000:]
    final = one_final_line(stderr)
    assert final.startswith("jaxgen: preempted: saved a checkpoint at step ") and final.endswith(
        f"; run the same command again with --run-dir {run_dir} to resume"), final
    # Continued with fewer steps than it was started with: its learning-rate schedule changes, and it says so.
    step = int(final.split("at step ")[1].split()[0])
    lowered = subprocess.run([sys.executable, "-m", "jaxgen", "train", "--run-dir", str(run_dir),
                              f"train.steps={step + 1}"], cwd=tmp_path, env=cli_env(1), capture_output=True,
                             text=True, timeout=300)
    assert lowered.returncode == 0, lowered.stderr[-3000:]
    assert (f"continuing step {step} with train.steps lowered (100000 -> {step + 1}): the learning rate now follows "
            f"the schedule of a {step + 1}-step run") in lowered.stderr


def test_data_worker_processes_stop_quietly_with_the_trainer_and_never_outlive_it(tmp_path):
    """Ctrl-C reaches the whole process group: each grain worker printed a KeyboardInterrupt traceback while the
    trainer saved, and the resource tracker warned of their leaked shared memory. Ignoring it, they must still
    go when the trainer goes at once (SIGKILL, the out-of-memory killer)."""
    run_dir = tmp_path / "run"

    def workers_of(pid: int) -> list[int]:
        children = []
        for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            if parent == pid:
                children.append(int(stat.parent.name))
        return children

    for stop in ("ctrl-c", "kill"):
        process = start(["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "train.steps=100000",
                         "logging.every=1", "checkpoint.every=null", "train.sample_tokens=0", "data.workers=2"])
        deadline = time.monotonic() + 180
        while len(read_metrics(run_dir / "metrics.jsonl")) < 3 + (stop == "kill") * 3:
            assert time.monotonic() < deadline and process.poll() is None, "training never started"
            time.sleep(0.05)
        while len(workers := workers_of(process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) >= 2  # the data workers (and multiprocessing's resource tracker)
        if stop == "ctrl-c":
            stderr = interrupt_when(process, None)
            assert process.returncode == 75 and "leaked" not in stderr, stderr[-3000:]
            assert one_final_line(stderr).startswith("jaxgen: preempted: saved a checkpoint")
        else:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(pathlib.Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if pathlib.Path(f"/proc/{pid}").exists()], stop


@pytest.mark.parametrize("signum,says,status", [(signal.SIGINT, "interrupted", 130),
                                                (signal.SIGTERM, "stopped by SIGTERM", 143)])
def test_a_command_stopped_by_a_signal_says_so_in_one_line(tmp_path, signum, says, status):
    """SIGTERM (a scheduler, `timeout`, `kill`) ended a command without a word; a command other than train has
    nothing to continue, so neither line says to run it again."""
    process = start(["data", "synth", "shapes", "--out", str(tmp_path / "shapes"), "--count", "50000"])
    stderr = interrupt_when(process, None, after_s=3.0, signum=signum)
    assert process.returncode == status and one_final_line(stderr) == f"jaxgen: {says}", stderr[-2000:]
    assert not (tmp_path / "shapes").exists()  # its hidden leftovers go when the command runs again
    # Signalled once train has begun (its model is built): before, it may still be importing, with no run yet.
    process = start(["train", "--config", str(TINY_CONFIG), "--run-dir", str(tmp_path / "run")])
    stderr = interrupt_when(process, "model: ", signum=signal.SIGTERM)
    assert process.returncode == 143
    assert one_final_line(stderr) == "jaxgen: stopped by SIGTERM; run the same command again to continue"
    # With its log's reader gone (`| tee` killed), the last line could not be written, and that broken pipe was
    # the exit status: 1, where a scheduler looks for 143.
    process = start(["train", "--config", str(TINY_CONFIG), "--run-dir", str(tmp_path / "unheard")])
    process.stderr.close()
    deadline = time.monotonic() + 180  # its run directory exists once train has begun (a slow machine may take long)
    while not (tmp_path / "unheard").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=120) == 143


def test_an_abandoned_read_closed_at_shutdown_prints_nothing():
    """Orbax's array reads catch BaseException and raise anew, so closing an abandoned read (after another
    read failed on a damaged checkpoint) raises from GeneratorExit; Python would print that as a traceback."""
    program = """
import gc, types
from jaxgen.cli import quiet_libraries
quiet_libraries()

@types.coroutine
def pending_io():
    yield

async def read():
    try:
        await pending_io()
    except BaseException as e:
        raise Exception("Encountered error while reading array index") from e

coroutine = read()
coroutine.send(None)  # suspended mid-read, as a sibling read fails
del coroutine
gc.collect()
print("done")
"""
    result = subprocess.run([sys.executable, "-c", program], text=True, capture_output=True, timeout=60, cwd=REPO)
    assert result.returncode == 0 and result.stdout == "done\n"
    assert result.stderr == ""


def test_orbax_failures_it_raises_later_are_not_logged_twice_but_the_others_are():
    from jaxgen.cli import not_raised_later

    def record(message, failed=True):
        exc_info = (ValueError, ValueError("OUT_OF_RANGE"), None) if failed else None
        return logging.LogRecord("absl", logging.ERROR, __file__, 1, message, (), exc_info)

    raised = "[process=0][thread=t][operation_id=1] _SignalingThread.run() raised an exception: OUT_OF_RANGE"
    assert not not_raised_later(record(raised))  # jaxgen says it in one line when Orbax raises it
    assert not_raised_later(record("Failed to remove checkpoint (runs/x/checkpoints/4)"))  # never raised: shown
    assert not_raised_later(record(raised, failed=False))


def test_eval_refuses_a_step_and_all_together():
    """`eval --step 8 --all` scored every checkpoint and said nothing of --step."""
    with pytest.raises(UsageError, match=r"^--step 8 and --all choose the checkpoints twice; give --step N for one, "
                                         r"--all for every one$"):
        cmd_eval(build_parser().parse_args(["eval", "--run-dir", "r", "--step", "8", "--all"]))


def test_a_mistyped_command_gets_a_did_you_mean():
    from jaxgen.cli import parse_args
    from jaxgen.errors import UsageError

    with pytest.raises(UsageError, match=r"invalid choice: 'trian' \(choose from .*\); did you mean 'train'\? "
                                         r"\(see `jaxgen --help`\)$"):
        parse_args(["trian"])
    with pytest.raises(UsageError, match=r"invalid choice: 'xyz' \(choose from [^;]*\) \(see `jaxgen --help`\)$"):
        parse_args(["xyz"])


def test_a_wrong_run_dir_step_or_export_target_is_refused_before_jax_starts(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "config.yaml").write_text(TINY_CONFIG.read_text())
    (run / "checkpoints" / "2" / "jaxgen_checksums.json").write_text("{}")  # committed, as far as names go
    (run / "checkpoints" / "5").mkdir()  # a save in progress: not a checkpoint yet
    starting = tmp_path / "starting"  # a run whose first step compiles: config.yaml comes after
    (starting / "checkpoints").mkdir(parents=True)
    (starting / ".jaxgen.lock").write_text(json.dumps({"host": "h1", "pid": 4242, "since": "2026-12-07T04:35:09",
                                                       "command": f"jaxgen train --run-dir {starting}"}))
    commands = [
        (["sample", "--run-dir", str(run), "--step", "5"],
         f"run directory '{run}' has no checkpoint for step 5; available: [2]"),
        (["eval", "--run-dir", str(run), "--step", "99"],
         f"run directory '{run}' has no checkpoint for step 99; available: [2]"),
        (["export", "--run-dir", str(run), "--step", "1", "--out", str(tmp_path / "out")],
         f"run directory '{run}' has no checkpoint for step 1; available: [2] (if it was saved, the run's retention, "
         "checkpoint.keep and keep_every, has deleted it since: a run deletes older checkpoints as it saves)"),
        (["eval", "--run-dir", str(run / "checkpoints" / "2")],
         f"'{run / 'checkpoints' / '2'}' is a checkpoint of run '{run}', not a run directory; give --run-dir "
         f"'{run}' --step 2"),
        (["sample", "--run-dir", str(tmp_path / "nowhere")], f"run directory '{tmp_path / 'nowhere'}' does not exist"),
        (["eval", "--run-dir", str(starting)],
         f"'{starting}' holds no config.yaml yet: process 4242 on host h1 (since 2026-12-07T04:35:09: jaxgen train "
         f"--run-dir {starting}), which started the run there, writes it once the first step compiles (if that "
         "process stopped before, its train command starts the run again)"),
        (["export", "--run-dir", str(run), "--out", str(run / "checkpoints" / "99")],
         f"--out '{run / 'checkpoints' / '99'}' is inside the checkpoints of run '{run}', which the run renames "
         "and deletes; give a directory outside them"),
    ]
    script = ("import json, sys\nfrom jaxgen.cli import main\n"
              "print(json.dumps([main(argv) for argv in json.loads(sys.argv[1])] + ['jax' in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", script, json.dumps([argv for argv, _ in commands])],
                            env=cli_env(1), capture_output=True, text=True, timeout=120)
    assert json.loads(result.stdout) == [2] * len(commands) + [False]  # JAX was never imported
    assert error_lines(result.stderr) == [f"jaxgen: error: {says}" for _, says in commands]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "5"]
