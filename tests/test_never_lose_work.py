"""A cluster and a careless user treat a run badly; nothing is lost or poisoned.

Every scenario drives the CLI in subprocesses: damaged checkpoints, a learning
rate that overflows, two jobs on one directory, readers during training, kills
and full disks before the first checkpoint, a refused start, a finished run
started again.
"""

import errno
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxgen import files
from jaxgen.checkpoint import restore_subtree
from jaxgen.checkpoint_layout import checkpoint_dir, committed_steps
from jaxgen.config import load_config
from jaxgen.errors import DirectoryInUse, describe
from jaxgen.files import building
from jaxgen.metrics import read_metrics
from jaxgen.outputs.runs import open_run
from jaxgen.sharding import make_mesh
from jaxgen.train.build import build_training

from conftest import TINY_CONFIG
from helpers import error_lines, flip_bytes, logged_steps, losses, run_jaxgen, start_jaxgen, wait_for

STEPS = 12


def train_args(run_dir, tokenizer, *overrides):
    return ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), f"train.steps={STEPS}",
            "checkpoint.every=4", "logging.every=1", f"train.eval_every={STEPS}", "train.sample_tokens=0",
            f"data.tokenizer={tokenizer.path}", *overrides]


def saved_params(run_dir, step):
    cfg = load_config(run_dir / "config.yaml", ["mesh.data=1"])
    layout = build_training(cfg, make_mesh(cfg.mesh, jax.devices()[:1])).layout
    params, _, _ = restore_subtree(checkpoint_dir(run_dir), ("params",), layout.target.params, step)
    return jax.device_get(params)


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tokenizer):
    """An uninterrupted run, started after a refused first attempt on the same directory."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    refused = run_jaxgen(*train_args(run_dir, tokenizer, "model.vocab_size=1024"))
    left_behind = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    result = run_jaxgen(*train_args(run_dir, tokenizer))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, refused, left_behind


def test_a_refused_start_copies_nothing_in_and_leaves_the_directory_usable(straight):
    run_dir, refused, left_behind = straight
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "has 512 pieces but model.vocab_size=1024" in error_lines(refused.stderr)[0]
    assert left_behind == []  # the directory it made is gone: no lock file, no empty checkpoints folder
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))  # the next start on it trained normally


def test_a_start_left_at_once_removes_the_directory_it_made_where_nothing_was_written(tmp_path):
    """Ctrl-C during start-up leaves at once (os._exit), skipping the `finally` that removes a refused start's
    directory: it left a folder holding only the lock file and an empty checkpoints/."""
    script = ("import pathlib, sys\n"
              "from jaxgen.interrupts import leave_with\n"
              "from jaxgen.train.run_dir import holding\n"
              "run_dir = pathlib.Path(sys.argv[1])\n"
              "with holding(run_dir):\n"
              "    (run_dir / 'checkpoints').mkdir()\n"
              "    if len(sys.argv) > 2:\n"
              "        (run_dir / 'config.yaml').write_text('a run from here on')\n"
              "    leave_with('interrupted', 130)\n")
    made, started = tmp_path / "made", tmp_path / "started"
    for run_dir, *more in [(made,), (started, "config")]:
        left = subprocess.run([sys.executable, "-c", script, str(run_dir), *more], capture_output=True, text=True)
        assert left.returncode == 130 and left.stderr.endswith("jaxgen: interrupted\n"), left.stderr[-2000:]
    assert not made.exists()
    assert sorted(p.name for p in started.iterdir()) == [".jaxgen.lock", "checkpoints", "config.yaml"]


def test_a_finished_run_started_again_changes_nothing(straight, tokenizer):
    run_dir, _, _ = straight
    before = snapshot(run_dir)
    again = run_jaxgen(*train_args(run_dir, tokenizer))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "is complete (step 12)" in again.stderr
    assert snapshot(run_dir) == before


def test_a_run_stopped_after_its_final_checkpoint_writes_its_end_of_run_outputs_when_started_again(
        straight, tokenizer, tmp_path):
    """kill -9 (or a full disk) between the final checkpoint and summary.json lost the run's summary, final
    samples and plots for good: started again, the run called itself complete, with nothing to do."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    original = json.loads((run_dir / "summary.json").read_text())
    for output in ("summary.json", "loss_curve.png"):
        (run_dir / output).unlink()
    checkpoints = snapshot(run_dir / "checkpoints")
    again = run_jaxgen(*train_args(run_dir, tokenizer))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "saved its final step (12) but was stopped before its end-of-run outputs" in again.stderr
    assert "compiled in" not in again.stderr  # no step is left to train
    written = json.loads((run_dir / "summary.json").read_text())
    assert (written["final_loss"], written["eval_loss_final"]) == (original["final_loss"], original["eval_loss_final"])
    assert written["eval_loss_initial"] == original["eval_loss_initial"] > 0  # logged by the first process
    assert (run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert snapshot(run_dir / "checkpoints") == checkpoints and sorted(losses(run_dir)) == list(range(1, STEPS + 1))


def test_a_summary_of_an_earlier_end_or_fewer_steps_never_make_a_run_complete(straight, tokenizer, tmp_path):
    """A run extended past an earlier end, stopped after its final checkpoint, called itself complete with the
    earlier end's summary.json; one asked for fewer steps than it had trained did too (exit 0 both)."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    before = snapshot(run_dir)
    fewer = run_jaxgen(*train_args(run_dir, tokenizer), "train.steps=5")
    assert fewer.returncode == 2 and error_lines(fewer.stderr) == [
        f"jaxgen: error: train.steps=5 is below step {STEPS}, which the run's newest checkpoint holds (it was saved "
        f"with train.steps={STEPS}); give train.steps={STEPS} or more to continue it, or another --run-dir to train "
        "anew"]
    assert snapshot(run_dir) == before
    original = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**original, "steps": STEPS - 4}))  # an end before extending
    again = run_jaxgen(*train_args(run_dir, tokenizer))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"saved its final step ({STEPS}) but was stopped before its end-of-run outputs" in again.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS


def test_damaged_newest_checkpoint_falls_back_and_training_matches(straight, tokenizer, tmp_path):
    expected = losses(straight[0])
    run_dir = tmp_path / "damaged"
    args = train_args(run_dir, tokenizer, "checkpoint.keep=2")
    died = run_jaxgen(*args, crash=("after-commit", 8))
    assert died.returncode == 137
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert max(e.step for e in events.Scalars("loss")) >= 8  # flushed with the checkpoint, not lost in the kill

    for data_file in (run_dir / "checkpoints" / "8" / "state").rglob("d/*"):  # parameters and optimizer state
        if data_file.stat().st_size > 10_000:
            flip_bytes(data_file, count=16, every=1024)
    evaluation = run_jaxgen("eval", "--run-dir", str(run_dir))  # readers refuse it, and change nothing
    assert evaluation.returncode == 2 and "Traceback" not in evaluation.stderr
    [refusal] = error_lines(evaluation.stderr)
    assert "checkpoints/8 is damaged" in refusal and "read another with --step (available: [4])" in refusal
    assert committed_steps(checkpoint_dir(run_dir)) == [4, 8]
    resumed = run_jaxgen(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoints/8 is damaged" in resumed.stderr and "falling back" in resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == 4
    assert summary["eval_loss_initial"] == json.loads((straight[0] / "summary.json").read_text())["eval_loss_initial"]
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # every step once
    assert losses(run_dir) == expected  # bit-identical to the uninterrupted run
    # keep=2, yet 4 stays: it is the newest checkpoint known to read back intact.
    assert committed_steps(checkpoint_dir(run_dir)) == [4, 8, 12]
    assert (run_dir / "checkpoints" / "8.damaged").is_dir()


@pytest.mark.parametrize("mode", ["skip", "abort"])
def test_an_overflowing_learning_rate_never_reaches_a_checkpoint(tokenizer, tmp_path, mode):
    run_dir = tmp_path / mode
    # 1e39 is finite for the config but infinite in float32: every update is NaN while loss and gradient are fine.
    result = run_jaxgen(*train_args(run_dir, tokenizer, "optimizer.lr=1e39", f"train.nonfinite={mode}",
                                    "train.max_consecutive_nonfinite=5", "checkpoint.every=2"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [error] = error_lines(result.stderr)
    steps = committed_steps(checkpoint_dir(run_dir))
    if mode == "abort":
        assert "step 1: non-finite update" in error and "train.nonfinite=abort" in error
        assert steps == []
    else:
        assert "5 updates in a row were skipped as non-finite" in error
        assert result.stderr.count("the update was skipped") == 4
        skipped = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if r.get("skipped")]
        assert skipped == [1, 2, 3, 4, 5]
        assert steps == [2, 4]
        for step in steps:  # saved, and as finite as the initial parameters it still holds
            assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved_params(run_dir, step)))


def test_a_diverged_run_still_writes_json_that_strict_readers_accept(tokenizer, tmp_path):
    """Step 1's huge (finite) update saturates the model, step 2 is skipped, and the held-out loss is NaN:
    summary.json and eval.jsonl said NaN, which jq, JavaScript and pandas refuse; they say null."""
    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))

    run_dir = tmp_path / "diverged"
    trained = run_jaxgen(*train_args(run_dir, tokenizer, "optimizer.lr=1e9", "optimizer.warmup_steps=0",
                                     "train.steps=2", "train.eval_every=2"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    summary = strict((run_dir / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 1 and summary["eval_loss_final"] is None
    assert summary["eval_loss_initial"] > 0
    evaluated = run_jaxgen("eval", "--run-dir", str(run_dir))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert strict(evaluated.stdout.splitlines()[-1])["eval_loss"] is None
    assert strict((run_dir / "eval.jsonl").read_text())["perplexity"] is None


def test_training_into_another_tools_directory_is_refused_before_it_overwrites_anything(tokenizer, tmp_path):
    """`--run-dir` given an export (or any directory holding files a run writes) overwrote its tokenizer."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "tokenizer.model").write_bytes(b"the export's own tokenizer")
    (export / "model.safetensors").write_bytes(b"weights")
    before = snapshot(export)
    refused = run_jaxgen(*train_args(export, tokenizer, "train.steps=1"))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert error_lines(refused.stderr) == [
        f"jaxgen: error: --run-dir '{export}' is not a jaxgen run directory, and training would overwrite what it "
        "holds (tokenizer.model); give a new or empty directory, or a run directory to continue"]
    assert snapshot(export) == before and not (export / ".jaxgen.lock").exists()

    planned = tmp_path / "planned"  # the user's config, tokenizer and a scheduler's log, put there first: welcome
    planned.mkdir()
    (planned / "config.yaml").write_text(TINY_CONFIG.read_text())
    (planned / "slurm-1.out").write_text("starting\n")
    shutil.copyfile(tokenizer.path, planned / "tokenizer.model")
    trained = run_jaxgen(*train_args(planned, tokenizer, "train.steps=1", "train.eval_every=1",
                                     f"data.tokenizer={planned / 'tokenizer.model'}"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert committed_steps(checkpoint_dir(planned)) == [1] and (planned / "slurm-1.out").read_text() == "starting\n"


def test_an_infinite_learning_rate_is_refused_by_the_config(tmp_path):
    result = run_jaxgen("train", "--run-dir", str(tmp_path / "r"), "optimizer.lr=.inf")
    assert result.returncode == 2 and "optimizer.lr" in result.stderr and "finite" in result.stderr
    assert not (tmp_path / "r").exists()


def test_one_writer_per_run_directory_and_readers_never_fail_while_it_trains(tokenizer, tmp_path):
    run_dir = tmp_path / "busy"
    args = train_args(run_dir, tokenizer, "train.steps=100000", "checkpoint.every=2", "checkpoint.keep=2",
                      "logging.every=1")
    first = start_jaxgen(*args)
    try:
        wait_for(lambda: len(committed_steps(checkpoint_dir(run_dir))) >= 1, what="a first checkpoint")
        second = run_jaxgen(*args)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by process {first.pid} on host" in error_lines(second.stderr)[0]

        evaluations = [run_jaxgen("eval", "--run-dir", str(run_dir)) for _ in range(2)]
        for evaluation in evaluations:  # retention keeps 2 and deletes under the reader all the time
            assert evaluation.returncode == 0, evaluation.stderr[-3000:]
            result = json.loads(evaluation.stdout.splitlines()[-1])
            assert result["eval_loss"] > 0
            assert result["checkpoint"], result  # named as read: retention may delete it while it is scored
        # Many more reads, in this process: each reads the newest checkpoint, which may vanish while it reads.
        read_steps = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and first.poll() is None:
            read_steps.append(open_run(run_dir, overrides=[f"mesh.data={jax.device_count()}"]).step)
        assert len(read_steps) >= 3 and read_steps == sorted(read_steps)
        os.killpg(first.pid, signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 75, stderr[-3000:]
    steps = logged_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1))  # one writer: no record twice, none interleaved
    stopped_at = max(committed_steps(checkpoint_dir(run_dir)))
    assert steps[-1] == stopped_at  # the stopping step's record is written, not lost
    assert saved_params(run_dir, stopped_at)


def test_on_a_file_system_without_locks_the_holder_record_stands_in_with_a_warning(tmp_path, monkeypatch, caplog):
    """flock fails on Lustre mounted without `flock`, NFS without a lock daemon and some FUSE mounts: training
    refused to start at all there ('No locks available')."""
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    lock_file = tmp_path / ".jaxgen.lock"
    first = files.DirectoryLock(lock_file, "run directory 'r'", "choose another")
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        assert first.acquire() is None
    assert "run directory 'r' is on a file system without file locks (no locks available)" in caplog.text
    with pytest.raises(DirectoryInUse, match=rf"in use by process {os.getpid()} on host"):  # alive, on this host
        files.DirectoryLock(lock_file, "run directory 'r'", "choose another").acquire()
    first.release()
    assert files.DirectoryLock(lock_file, "run directory 'r'", "choose another").acquire() is None
    dead = subprocess.Popen(["true"])
    dead.wait()
    for host in (socket.gethostname(), "another-node"):  # a holder that died, or one that cannot be asked
        lock_file.write_text(json.dumps({"host": host, "pid": dead.pid}))
        assert files.DirectoryLock(lock_file, "run directory 'r'", "choose another").acquire()["host"] == host


def test_a_log_line_cut_short_never_swallows_the_records_written_after_it(tmp_path):
    """metrics.jsonl and eval.jsonl are appended to; a kill or a full disk mid-write leaves a last line without its
    end, and the next record written onto it made one unreadable line of both, losing the new record too."""
    log_file = tmp_path / "eval.jsonl"
    files.append_line(log_file, json.dumps({"step": 4}))
    with open(log_file, "a") as f:
        f.write('{"step": 8, "eval_lo')  # what a write cut short leaves
    files.append_line(log_file, json.dumps({"step": 12}))
    files.append_line(log_file, json.dumps({"step": 16}))
    assert [r["step"] for r in read_metrics(log_file)] == [4, 12, 16]
    assert log_file.read_text().count("\n") == 4
    # A write the disk refuses is an error naming the log (it named no file), never a record silently cut.
    # Nor does it leave half the record behind, which every later reader of the log would trip over.
    before = log_file.read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (log_file.stat().st_size + 8, limits[1]))  # Python ignores SIGXFSZ
    try:
        with pytest.raises(OSError) as refused:
            files.append_line(log_file, json.dumps({"step": 20, "eval_loss": 1.5}))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert refused.value.filename == str(log_file)
    assert log_file.read_bytes() == before
    # A first record the disk refuses leaves no empty log, which would read as one whose records were lost.
    resource.setrlimit(resource.RLIMIT_FSIZE, (8, limits[1]))
    try:
        with pytest.raises(OSError):
            files.append_line(tmp_path / "new.jsonl", json.dumps({"step": 20, "eval_loss": 1.5}))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert not (tmp_path / "new.jsonl").exists()


def test_kills_and_full_disks_before_the_first_checkpoint_never_block_a_restart(straight, tokenizer, tmp_path):
    """A run killed (or failing) before its first committed checkpoint restarts from step 0 when rerun."""
    run_dir = tmp_path / "early"
    args = train_args(run_dir, tokenizer, "checkpoint.every=100")  # the first checkpoint is the last step's

    at_start = run_jaxgen(*args, file_size_limit=2048)  # the tokenizer (~10 kB) cannot be copied in
    assert at_start.returncode != 0
    assert not (run_dir / "tokenizer.model").exists()

    training = start_jaxgen(*args)
    try:
        wait_for(lambda: len(losses(run_dir)) >= 3, what="three logged steps")
        resource.prlimit(training.pid, resource.RLIMIT_FSIZE, (16384, 16384))  # the disk fills up mid-run
        _, stderr = training.communicate(timeout=120)
    finally:
        if training.poll() is None:
            os.killpg(training.pid, signal.SIGKILL)
    assert training.returncode == 1, stderr[-3000:]
    assert "no earlier checkpoint exists" in error_lines(stderr)[0]
    assert committed_steps(checkpoint_dir(run_dir)) == []

    killed = start_jaxgen(*args)
    wait_for(lambda: len(losses(run_dir)) >= 3, what="three logged steps")
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()

    again = run_jaxgen(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] is None
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    assert losses(run_dir) == losses(straight[0])
    assert committed_steps(checkpoint_dir(run_dir)) == [STEPS]
    shutil.rmtree(run_dir)


def test_a_log_the_disk_refuses_stops_the_run_after_saving_its_steps(straight, tokenizer, tmp_path):
    """A full disk under metrics.jsonl or tensorboard/ stopped the run where it stood: every step since the last
    checkpoint (up to checkpoint.every) was lost to a log file."""
    run_dir = tmp_path / "full_log"
    # Step 6's record is written as step 7 is dispatched (one step late): steps 5-7 are past checkpoint 4.
    failed = run_jaxgen(*train_args(run_dir, tokenizer), crash=("full-log-at", 6))
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert error_lines(failed.stderr) == [
        f"jaxgen: error: {run_dir / 'metrics.jsonl'}: no space left on device; checkpoint 7 was saved first, so no "
        "step is lost; run the same command again once it is mended"]
    assert committed_steps(checkpoint_dir(run_dir)) == [4, 7]
    again = run_jaxgen(*train_args(run_dir, tokenizer))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == 7
    # The record the disk refused is the one thing missing; the run goes on exactly as one never stopped.
    assert logged_steps(run_dir) == [s for s in range(1, STEPS + 1) if s != 6]
    assert losses(run_dir) == {s: loss for s, loss in losses(straight[0]).items() if s != 6}


def test_a_batch_that_cannot_be_read_stops_the_run_after_saving_its_steps(straight, tokenizer, tmp_path):
    """An image damaged since the run started, met mid-run, stopped it where it stood: the steps since the last
    checkpoint (up to checkpoint.every) were lost."""
    run_dir = tmp_path / "bad_batch"
    failed = run_jaxgen(*train_args(run_dir, tokenizer), crash=("bad-batch-at", 7))  # fetched as step 6 runs
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert error_lines(failed.stderr) == [
        "jaxgen: error: image '/data/cats/7.png' cannot be read: image file is truncated; checkpoint 6 was saved "
        "first, so no step is lost; run the same command again once it is mended"]
    assert committed_steps(checkpoint_dir(run_dir)) == [4, 6]
    again = run_jaxgen(*train_args(run_dir, tokenizer))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == 6
    assert losses(run_dir) == losses(straight[0])


def test_a_disk_full_at_the_runs_end_says_every_step_is_saved(straight, tokenizer, tmp_path):
    """The end-of-run outputs failing on a full disk said only `RUN/loss_curve.png: no space left on device`."""
    run_dir = tmp_path / "full_at_end"
    failed = run_jaxgen(*train_args(run_dir, tokenizer), crash=("full-at-end", 0))
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert error_lines(failed.stderr) == [
        f"jaxgen: error: {run_dir / 'loss_curve.png'}: no space left on device; the final checkpoint (step {STEPS}) "
        "is saved, so no step is lost; run the same command again to write the end-of-run outputs (summary.json, "
        "final samples, plots) once it is mended"]
    assert not (run_dir / "summary.json").exists()
    again = run_jaxgen(*train_args(run_dir, tokenizer))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "loss_curve.png").exists()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert losses(run_dir) == losses(straight[0])


def test_a_console_that_goes_away_or_was_never_there_never_stops_the_run(straight, tokenizer, tmp_path):
    """`jaxgen train 2>&1 | tee log` with the tee killed: the progress bar's next line failed with a broken pipe,
    which stopped the run (its steps saved). With stderr closed from the start (`2>&-`) the bar's first line
    stopped the run before its first step, saying nothing. A bar is a courtesy: the run goes on, all its records
    in metrics.jsonl, and ends as the uninterrupted run."""
    run_dir = tmp_path / "closed_log"
    run = start_jaxgen(*train_args(run_dir, tokenizer))
    while "first step done" not in (line := run.stderr.readline()):
        assert line, "the run ended before its first step"
    run.stderr.close()  # the reader goes away mid-run
    assert run.wait(timeout=120) == 0
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] is None
    assert losses(run_dir) == losses(straight[0])
    with open(os.devnull, "w") as sink, open("/dev/full", "w") as full:  # stderr that takes nothing, as a closed one
        silent = subprocess.run([sys.executable, "-m", "jaxgen", "data", "synth", "shapes", "--out",
                                 str(tmp_path / "shapes"), "--count", "8"], stdout=sink, stderr=full, timeout=120)
    assert silent.returncode == 0 and sorted(p.name for p in (tmp_path / "shapes").iterdir()) == ["test", "train"]


def test_results_are_recorded_though_stdout_fails_and_finished_work_succeeds_without_it(straight, tmp_path):
    """`jaxgen eval --all > /dev/full` (or `| head -1`): the first print failed before its result was recorded,
    and --all stopped there. `jaxgen export ... | true` exported whole, then exited 1 on its last line: a job
    script retried it, and was refused by the export it had made."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    (run_dir / "eval.jsonl").unlink(missing_ok=True)

    def to_full_stdout(*args):
        with open("/dev/full", "w") as full:
            return subprocess.run([sys.executable, "-m", "jaxgen", *args], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=300)

    scored = to_full_stdout("eval", "--run-dir", str(run_dir), "--all")
    assert scored.returncode == 1 and error_lines(scored.stderr) == [
        "jaxgen: error: standard output could not be written (no space left on device); the results are recorded "
        f"in {run_dir}/eval.jsonl"], scored.stderr[-2000:]
    assert [r["step"] for r in read_metrics(run_dir / "eval.jsonl")] == committed_steps(checkpoint_dir(run_dir))
    exported = to_full_stdout("export", "--run-dir", str(run_dir), "--format", "safetensors", "--out",
                              str(tmp_path / "exported"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert ("WARNING standard output could not be written (no space left on device); the export is complete in "
            f"{tmp_path / 'exported'}") in exported.stderr
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_a_different_tokenizer_is_refused_on_resume_and_nothing_is_touched(straight, tmp_path):
    from jaxgen.data.corpus import BUNDLED_CORPUS, iter_documents
    from jaxgen.data.tokenizer import train_tokenizer

    run_dir = straight[0]
    other = train_tokenizer([d for _, d in zip(range(4000), iter_documents([BUNDLED_CORPUS]))], 512,
                            tmp_path / "other.model")
    before = snapshot(run_dir)
    result = run_jaxgen(*train_args(run_dir, other, "train.steps=14"))
    assert "resume with the checkpoint's tokenizer" in refusal(result)
    assert snapshot(run_dir) == before


def test_a_runs_config_yaml_cut_at_a_line_is_named_against_the_checkpoints_settings(straight, tmp_path):
    """A config.yaml cut short between lines is valid YAML: the settings cut off took their defaults, and the resume
    was refused as 'does not fit this model (N arrays differ)', a line of every array's shape."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    lines = (run_dir / "config.yaml").read_text().splitlines(keepends=True)
    (run_dir / "config.yaml").write_text("".join(lines[:lines.index("  d_ff: 192\n")]))
    before = snapshot(run_dir)
    result = run_jaxgen("train", "--run-dir", str(run_dir))
    assert refusal(result) == (f"jaxgen: error: {str(run_dir / 'config.yaml')!r} holds other settings than the "
                               "run's checkpoints were trained with (model.d_ff: 192 -> 768; model.max_seq_len: 64 -> "
                               "128): it was edited or cut short; put back those settings (under \"config\" in "
                               "checkpoints/<step>/meta/metadata), or train in a new --run-dir")
    assert snapshot(run_dir) == before


def test_a_reader_given_an_override_of_the_models_shape_names_it(straight, tmp_path):
    """`eval model.d_model=96` said the checkpoint "does not fit this model", then listed six arrays: it read as a
    damaged run, not as the override given."""
    result = run_jaxgen("eval", "--run-dir", str(straight[0]), "model.d_model=96", "mesh.data=1")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "jaxgen: error: model.d_model=96: the run's checkpoints hold a model of other shapes (12 arrays differ, e.g. "
        "params/model/embed: checkpoint (512, 64) float32, model (512, 96) float32); a reader keeps the model the "
        "run trained: drop it"]
    # One that changes only what the model computes: an export wrote it into config.json, eval used it, silently.
    export = run_jaxgen("export", "--run-dir", str(straight[0]), "--out", str(tmp_path / "hf"), "model.norm_eps=0.5")
    assert error_lines(export.stderr) == [
        f"jaxgen: error: model.norm_eps: 1e-05 -> 0.5: an export writes the model checkpoint {STEPS} trained, and "
        "these overrides would write another; drop them (to run it otherwise, edit the exported config)"]
    assert not (tmp_path / "hf").exists()
    copy = tmp_path / "run"  # eval records its result in the run: the shared run's eval.jsonl is another test's
    shutil.copytree(straight[0], copy)
    scored = run_jaxgen("eval", "--run-dir", str(copy), "model.norm_eps=0.5", "mesh.data=1")
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert (f"model.norm_eps: 1e-05 -> 0.5 given on the command line: checkpoint {STEPS} was trained with the first, "
            "so this command computes another model than the one trained") in scored.stderr


def test_init_from_starts_a_new_run_from_saved_params(straight, tokenizer, tmp_path):
    tuned = tmp_path / "tuned"
    result = run_jaxgen(*train_args(tuned, tokenizer, "train.steps=2", f"checkpoint.init_from={straight[0]}"))
    assert result.returncode == 0, result.stderr[-2000:]
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(tuned / "metrics.jsonl") if "eval_loss" in r}
    source = {r["step"]: r["eval_loss"] for r in read_metrics(straight[0] / "metrics.jsonl") if "eval_loss" in r}
    assert evals[0] == pytest.approx(source[STEPS], rel=1e-5)
    assert "trained as another model" not in result.stderr
    # Settings unlike the source's, alike in shapes: the restore took the parameters, and the fine-tune started
    # from another function than the one saved, without a word.
    other = run_jaxgen(*train_args(tmp_path / "other", tokenizer, "train.steps=2",
                                   f"checkpoint.init_from={straight[0]}", "model.norm_eps=0.5",
                                   "model.compute_dtype=bfloat16"))
    assert other.returncode == 0, other.stderr[-2000:]
    assert (f"checkpoint.init_from='{straight[0]}': its parameters were trained as another model than this run's "
            "config sets (model.norm_eps: 1e-05 -> 0.5), alike in shapes") in other.stderr  # bfloat16: how, not what


def test_eval_all_of_a_run_whose_retention_deleted_every_listed_checkpoint_scores_its_newest(straight, caplog):
    """`eval --all` beside a run keeping one checkpoint, saving every step: each listed step was deleted before it
    was read, and it scored nothing, exit 0."""
    from jaxgen.outputs.runs import each_checkpoint

    with caplog.at_level("INFO", logger="jaxgen"):
        read = [opened.step for opened in each_checkpoint(straight[0], [1, 2])]  # listed, then deleted
    assert read == [STEPS]
    assert "deleted every checkpoint listed before it was read; reading its newest" in caplog.text


def test_an_init_from_given_to_a_resumed_run_is_not_recorded_as_its_source(straight, tokenizer, tmp_path):
    """config.yaml took the new checkpoint.init_from, which the resumed run never read, as its source. And a
    resumed run that changed the held-out set's size said only that the setting changed."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    again = run_jaxgen(*train_args(run_dir, tokenizer, f"train.steps={STEPS + 1}", "train.eval_batches=1",
                                   f"checkpoint.init_from={tmp_path / 'elsewhere'}"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (f"train.eval_batches changed: the held-out set is train.eval_batches batches of data.batch_size rows of "
            f"data.seq_len tokens, so eval_loss from step {STEPS} on is measured on another set") in again.stderr
    assert (f"checkpoint.init_from='{tmp_path / 'elsewhere'}' is not applied: it sets where a run starts, and this "
            f"one continues from its own step {STEPS} (config.yaml keeps None)") in again.stderr
    assert load_config(run_dir / "config.yaml").checkpoint.init_from is None


def test_init_from_parameters_of_another_tokenizer_are_refused(straight, tmp_path):
    """Fine-tuning with another tokenizer than the source's loaded its embeddings under other tokens' ids, exit 0:
    only resuming compared tokenizers."""
    import itertools

    from jaxgen.data.corpus import BUNDLED_CORPUS, iter_documents
    from jaxgen.data.tokenizer import train_tokenizer

    other = train_tokenizer(itertools.islice(iter_documents([BUNDLED_CORPUS]), 3000, 6000), 512,
                            tmp_path / "other512.model")
    tuned = tmp_path / "tuned"
    result = run_jaxgen(*train_args(tuned, other, "train.steps=2", f"checkpoint.init_from={straight[0]}"))
    [line] = error_lines(result.stderr)
    assert result.returncode == 2 and line.startswith(f"jaxgen: error: checkpoint.init_from='{straight[0]}': its "
                                                      "parameters were trained with tokenizer ")
    assert line.endswith(f"; give data.tokenizer='{straight[0]}', the tokenizer its run keeps")
    assert not tuned.exists()


def test_an_init_from_step_the_run_has_not_saved_is_named_with_those_it_has(straight, tmp_path):
    """`checkpoint.init_from=RUN/checkpoints/7` (no step 7) was 'not a run or checkpoint directory'."""
    from jaxgen.checkpoint import restore_subtree
    from jaxgen.errors import CheckpointError

    saved = straight[0] / "checkpoints"
    for given, says in [(saved / "7", f"{saved} has no checkpoint for step 7; available: [4, 8, 12]"),
                        (tmp_path / "gone", f"{str(tmp_path / 'gone')!r} does not exist")]:
        with pytest.raises(CheckpointError) as refused:
            restore_subtree(given, ("params/model",), None, what=f"checkpoint.init_from={given}")
        assert str(refused.value) == f"checkpoint.init_from={given}: {says}"


def refusal(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    [line] = error_lines(result.stderr)
    return line


def test_a_run_continues_with_its_own_config_and_another_model_is_refused_by_name(straight, tokenizer, tmp_path):
    """`jaxgen train --run-dir R` without --config took the embedded default config, whose model is another,
    and failed listing array shapes; a config with another model listed shapes too."""
    before = snapshot(straight[0])
    other = run_jaxgen(*train_args(straight[0], tokenizer, "model.d_ff=256", "train.steps=14"))
    assert refusal(other) == (f"jaxgen: error: run directory {str(straight[0])!r} holds a model trained with other "
                              "settings (model.d_ff: 192 -> 256); continue it with its own (`jaxgen train --run-dir "
                              f"{straight[0]}`, without the --config or overrides that change them) or train this "
                              "config in a new --run-dir")
    assert snapshot(straight[0]) == before
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    longer = run_jaxgen("train", "--run-dir", str(run_dir), "train.steps=14")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert f"continuing {run_dir} with its config.yaml" in longer.stderr
    assert sorted(losses(run_dir)) == list(range(1, 15))
    assert load_config(run_dir / "config.yaml") == load_config(straight[0] / "config.yaml", ["train.steps=14"])


def test_eval_all_scores_every_checkpoint_and_reproduces_the_loop(straight):
    run_dir = straight[0]
    result = run_jaxgen("eval", "--run-dir", str(run_dir), "--all")
    assert result.returncode == 0, result.stderr[-2000:]
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["step"] for r in reports] == committed_steps(checkpoint_dir(run_dir)) == [4, 8, 12]
    logged = {r["step"]: r["eval_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r}
    assert reports[-1]["eval_loss"] == pytest.approx(logged[STEPS], rel=1e-6) and "overrides" not in reports[-1]
    # An --all stopped after two checkpoints (a preempted job) goes on with the third.
    lines = (run_dir / "eval.jsonl").read_text().splitlines()
    (run_dir / "eval.jsonl").write_text("\n".join(lines[:2]) + "\n")
    again = run_jaxgen("eval", "--run-dir", str(run_dir), "--all")
    assert [json.loads(line) for line in again.stdout.splitlines()] == reports
    assert [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()] == reports
    assert "checkpoints 4, 8, scored before with these settings, shown from eval.jsonl, not scored" in again.stderr
    other = run_jaxgen("eval", "--run-dir", str(run_dir), "train.eval_batches=1")  # scored on less: it says so
    assert json.loads(other.stdout)["overrides"] == ["train.eval_batches=1"]
    assert json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])["overrides"] == ["train.eval_batches=1"]


def test_a_second_eval_of_a_run_while_one_scores_it_is_refused_naming_the_first(straight):
    """Two `eval --all` of one run at once scored the same checkpoints and wrote each record twice."""
    from jaxgen.outputs.evaluate import EVAL_LOCK

    run_dir = straight[0]
    records = run_dir / "eval.jsonl"
    before = records.read_bytes() if records.exists() else None
    with files.DirectoryLock(run_dir / EVAL_LOCK, "eval", "") as first:
        result = run_jaxgen("eval", "--run-dir", str(run_dir), "--all")
        holder = json.loads(first.record)
    assert result.returncode != 0 and result.stdout == ""
    assert error_lines(result.stderr) == [
        f"jaxgen: error: eval.jsonl of run {str(run_dir)!r} is in use by process {holder['pid']} on host "
        f"{holder['host']} (since {holder['since']}: {holder['command']}); run this again once it ends (with --all, "
        "what it scored is then shown from eval.jsonl, not scored again)"]
    assert (records.read_bytes() if records.exists() else None) == before
    after = run_jaxgen("eval", "--run-dir", str(run_dir), "--step", "4")  # the first gone, its lock with it
    assert after.returncode == 0, after.stderr[-2000:]


def test_eval_all_scores_anew_a_step_saved_again_since_its_result(straight, tokenizer, tmp_path):
    """A run taken back to an earlier checkpoint and continued with a lower learning rate saves new checkpoints
    at the steps eval.jsonl already holds results of: `eval --all` showed the old branch's figures for them."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    first = run_jaxgen("eval", "--run-dir", str(run_dir), "--all")
    assert first.returncode == 0, first.stderr[-2000:]
    old = {r["step"]: r for r in map(json.loads, first.stdout.splitlines())}
    shutil.rmtree(run_dir / "checkpoints" / str(STEPS))
    again = run_jaxgen(*train_args(run_dir, tokenizer, "optimizer.lr=0.001"))
    assert again.returncode == 0, again.stderr[-2000:]
    rescored = run_jaxgen("eval", "--run-dir", str(run_dir), "--all")
    assert rescored.returncode == 0, rescored.stderr[-2000:]
    new = {r["step"]: r for r in map(json.loads, rescored.stdout.splitlines())}
    assert [new[4], new[8]] == [old[4], old[8]]  # the same checkpoints: shown from eval.jsonl
    assert new[STEPS]["checkpoint"] != old[STEPS]["checkpoint"]
    assert new[STEPS]["eval_loss"] != old[STEPS]["eval_loss"]
    logged = {r["step"]: r["eval_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r}
    assert new[STEPS]["eval_loss"] == pytest.approx(logged[STEPS], rel=1e-6)  # the new branch's own
    assert (f"checkpoint {STEPS}: the result eval.jsonl holds is of another checkpoint saved at that step"
            in rescored.stderr)


def test_a_result_names_the_checkpoint_it_scored_though_retention_deleted_it_meanwhile(straight, tmp_path):
    """`eval --all` while the run trained with checkpoint.keep=1 recorded `"checkpoint": null`: the step was
    deleted while it was scored, and its digest was read only afterwards."""
    from jaxgen.checkpoint_layout import checkpoint_digest
    from jaxgen.outputs.runs import each_checkpoint, scored_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    steps = committed_steps(checkpoint_dir(run_dir))
    digests = [checkpoint_digest(checkpoint_dir(run_dir), step) for step in steps]
    named = []
    for run in each_checkpoint(run_dir, steps, [f"mesh.data={jax.device_count()}"]):
        shutil.rmtree(checkpoint_dir(run_dir) / str(run.step))  # retention, while the step is scored
        named.append(scored_checkpoint(run))
    assert named == digests and all(digests)


def test_a_checkpoint_given_as_the_run_directory_is_named_with_the_flags_that_mean_it(straight):
    """`--run-dir runs/try/checkpoints/9` said only that it is not a run directory (no config.yaml)."""
    from jaxgen.errors import ConfigError
    from jaxgen.outputs.runs import load_run_config

    run_dir = straight[0]
    for given, says in [(run_dir / "checkpoints" / "4", f"is a checkpoint of run '{run_dir}', not a run directory; "
                                                         f"give --run-dir '{run_dir}' --step 4"),
                        (run_dir / "checkpoints", f"holds the checkpoints of run '{run_dir}'; give --run-dir "
                                                  f"'{run_dir}'")]:
        with pytest.raises(ConfigError) as refused:
            load_run_config(given)
        assert str(refused.value) == f"'{given}' {says}"


def test_eval_all_scores_the_checkpoints_it_can_read_and_names_the_damaged_ones_last(straight, tmp_path):
    """`eval --all` stopped at the first damaged checkpoint, losing the evaluation of every later one."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    (run_dir / "eval.jsonl").unlink(missing_ok=True)  # another test's evaluation of the run
    for step in (4, 8):  # the first, which opens the run, and one after it
        for data_file in (run_dir / "checkpoints" / str(step) / "state").rglob("d/*"):
            if data_file.stat().st_size > 10_000:
                flip_bytes(data_file, count=16, every=1024)
    result = run_jaxgen("eval", "--run-dir", str(run_dir), "--all")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [json.loads(line)["step"] for line in result.stdout.splitlines()] == [12]
    assert [json.loads(line)["step"] for line in (run_dir / "eval.jsonl").read_text().splitlines()] == [12]
    [refusal] = error_lines(result.stderr)
    assert refusal.startswith(f"jaxgen: error: skipped checkpoints 4, 8 (2 of 3): checkpoint {run_dir}/checkpoints/4 "
                              "is damaged")
    assert "TensorStore" not in refusal and "bound method" not in refusal
    assert committed_steps(checkpoint_dir(run_dir)) == [4, 8, 12]  # readers change nothing
    # The record cannot be written (here a directory in its place, as a full disk would fail it): the figures
    # are printed all the same, before the one line that says so.
    (run_dir / "eval.jsonl").unlink()
    (run_dir / "eval.jsonl").mkdir()
    result = run_jaxgen("eval", "--run-dir", str(run_dir))
    assert result.returncode != 0 and [json.loads(line)["step"] for line in result.stdout.splitlines()] == [12]
    assert error_lines(result.stderr) == [f"jaxgen: error: {run_dir / 'eval.jsonl'}: is a directory"]


def test_two_writers_of_one_output_directory_keep_the_first_whole_and_say_so(tmp_path):
    """Two exports (or prepares) to one --out at once: the one finishing second found the other's output where it
    would rename its own, which failed as 'X.partial-host-pid -> out: Directory not empty'."""
    out = tmp_path / "out"
    with pytest.raises(DirectoryInUse) as refused:
        with building(out) as mine:
            (mine / "weights").write_text("mine")
            out.mkdir()  # the other writer finishes first
            (out / "weights").write_text("theirs")
    assert str(refused.value) == (f"{str(out)!r} was written by another process while this one built it; nothing "
                                  "of this one's was kept: name a new directory")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "weights").read_text() == "theirs"
    with building(tmp_path / "empty") as mine:  # an empty directory there is taken, as before
        (tmp_path / "empty").mkdir()
        (mine / "weights").write_text("mine")
    assert (tmp_path / "empty" / "weights").read_text() == "mine"


def test_a_failed_write_while_building_an_output_names_the_output(tmp_path):
    """A full disk under `data synth shapes` said only 'file too large': PIL's failed write names no file,
    and others name the hidden directory the output is built in."""
    out = tmp_path / "shapes"
    with pytest.raises(OSError) as nameless:
        with building(out):
            raise OSError(errno.EFBIG, "File too large")
    assert describe(nameless.value)[0] == f"error: {out}: file too large (a file-size limit was reached)"
    with pytest.raises(OSError) as hidden:
        with building(out) as partial:
            raise OSError(errno.ENOSPC, "No space left on device", str(partial / "train" / "0.png"))
    assert describe(hidden.value)[0] == f"error: {out / 'train' / '0.png'}: no space left on device"
    assert not any(tmp_path.iterdir())


def test_a_write_landing_after_a_failed_build_leaves_nothing_behind(tmp_path):
    """`jaxgen import` onto a full disk left its hidden partial directory now and then: Orbax's other array
    writes go on after the first one fails, and TensorStore makes the folders a late write lands in."""
    import threading

    def late_writer(partial):
        time.sleep(0.2)  # after the block has failed and its directory was first removed
        (partial / "checkpoints" / "0" / "d").mkdir(parents=True, exist_ok=True)
        (partial / "checkpoints" / "0" / "d" / "late").write_bytes(b"x")

    with pytest.raises(OSError, match="File too large"):
        with building(tmp_path / "out") as partial:
            writer = threading.Thread(target=late_writer, args=(partial,))
            writer.start()
            raise OSError(errno.EFBIG, "File too large")
    writer.join()
    assert not any(tmp_path.iterdir())


LEFT_MID_WRITE = """
import pathlib, sys
from jaxgen.files import building, write_atomic
from jaxgen.interrupts import end_cleanly_on_ctrl_c

end_cleanly_on_ctrl_c()
out = pathlib.Path(sys.argv[1])
with building(out / "export") as partial:
    write_atomic(out / "summary.json", "{}")
    with open(partial / "model.safetensors", "wb") as f:
        f.write(b"x" * 2**20)
        print("writing", flush=True)
        while True:
            f.write(b"x" * 2**16)
"""


@pytest.mark.parametrize("signum, status, line", [(signal.SIGTERM, 143, "jaxgen: stopped by SIGTERM"),
                                                  (signal.SIGINT, 130, "jaxgen: interrupted")])
def test_an_output_interrupted_while_it_is_written_leaves_no_hidden_partial_behind(tmp_path, signum, status, line):
    """Ctrl-C or SIGTERM to an export, import or prepare left its hidden `.NAME.partial-host-pid` folder (tens
    of megabytes) until the same --out was written again: leaving at once skipped the block's clean-up."""
    out = tmp_path / "out"
    out.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", LEFT_MID_WRITE, str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.send_signal(signum)
    _, stderr = writer.communicate(timeout=30)
    assert (writer.returncode, stderr.strip().splitlines()) == (status, [line])
    assert [p.name for p in out.iterdir()] == ["summary.json"]
