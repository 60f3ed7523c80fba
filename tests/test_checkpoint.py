"""Runs die and come back: exact resume, resharding restore, preemption, crashes, bad checkpoints."""

import errno
import json
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

import jax
import numpy as np
import pytest

from jaxgen.checkpoint import Checkpointer, DamagedCheckpoint, _damage_as_error, restore_subtree
from jaxgen.checkpoint_layout import checkpoint_dir
from jaxgen.config import load_config
from jaxgen.data.pipeline import to_global
from jaxgen.errors import EXIT_PREEMPTED, CheckpointError, NonFiniteError
from jaxgen.metrics import read_metrics
from jaxgen.sharding import make_mesh
from jaxgen.train.build import build_training
from jaxgen.train.loop import train

from conftest import REPO, TINY_CONFIG, tiny_config
from helpers import random_batches

DRIVER = pathlib.Path(__file__).with_name("crash_driver.py")
# Short runs that log every step so losses can be compared step by step.
SHORT = ["train.steps=8", "checkpoint.every=4", "logging.every=1", "train.eval_every=8", "train.sample_tokens=0"]


def run(args, devices=8, driver=None, timeout=300, **popen):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    prefix = [sys.executable, str(DRIVER), *driver, "--"] if driver else [sys.executable, "-m", "jaxgen"]
    return subprocess.run([*prefix, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def train_args(run_dir, *overrides):
    return ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), *SHORT, *overrides]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def saved_params(run_dir, step):
    """Params of a checkpoint, restored onto one device."""
    cfg = load_config(run_dir / "config.yaml", ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    layout = build_training(cfg, make_mesh(cfg.mesh, jax.devices()[:1])).layout
    restored = Checkpointer(checkpoint_dir(run_dir), cfg.checkpoint, writer=False).restore(layout.target, step)
    return jax.device_get(restored.state.params)


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


# On one device the same is shown, through a damaged checkpoint, by
# test_never_lose_work.py::test_damaged_newest_checkpoint_falls_back_and_training_matches.
@pytest.mark.parametrize("devices,mesh", [(8, ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2",
                                               "sharding.preset=fsdp_tp"])])
def test_resume_after_a_hard_kill_is_bit_identical(tmp_path, devices, mesh):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert run(train_args(straight, *mesh), devices).returncode == 0

    died = run(train_args(crashed, *mesh), devices, driver=["after-commit", "4"])
    assert died.returncode == 137
    assert max(losses(crashed)) <= 4  # died before step 5

    resumed = run(train_args(crashed, *mesh), devices)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "settings changed" not in resumed.stderr  # the same command
    expected, got = losses(straight), losses(crashed)
    assert [got[s] for s in range(5, 9)] == [expected[s] for s in range(5, 9)]  # bit-identical floats
    assert_trees_equal(saved_params(crashed, 8), saved_params(straight, 8))


def test_restore_reshards_onto_fewer_devices(tmp_path, devices):
    cfg8 = tiny_config("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "sharding.preset=fsdp_tp")
    training8 = build_training(cfg8, make_mesh(cfg8.mesh, devices))
    state = training8.init_state()
    batches = random_batches(cfg8, 2)
    state, _ = training8.train_step(state, to_global(batches[0], training8.mesh))
    directory = tmp_path / "checkpoints"
    saver = Checkpointer(directory, cfg8.checkpoint)
    saver.save(1, state, {"step": 1}, {"tokenizer_sha256": None})
    saver.wait()
    reference = jax.device_get(state.params)
    _, next_metrics = training8.train_step(state, to_global(batches[1], training8.mesh))

    for n, mesh in ((4, ["mesh.fsdp=2", "mesh.tensor=2"]), (1, ["mesh.fsdp=1"])):
        cfg = tiny_config("mesh.data=1", *mesh, "sharding.preset=fsdp_tp")
        training = build_training(cfg, make_mesh(cfg.mesh, devices[:n]))
        restored = Checkpointer(directory, cfg.checkpoint).restore(training.layout.target, 1)
        assert restored.data_states == [{"step": 1}]
        restored = restored.state
        for array, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(training.layout.shardings)):
            assert array.sharding == sharding  # placed straight into the new layout
        assert_trees_equal(jax.device_get(restored.params), reference)
        _, metrics = training.train_step(restored, to_global(batches[1], training.mesh))
        np.testing.assert_allclose(float(metrics["loss"]), float(next_metrics["loss"]), rtol=1e-6)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # the scheduler; the terminal closing
def test_sigterm_or_a_hangup_saves_at_the_next_step_and_exits_75(tmp_path, signum):
    run_dir = tmp_path / "preempted"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    args = train_args(run_dir, "train.steps=100000", "checkpoint.every=null", "logging.every=1")
    proc = subprocess.Popen([sys.executable, "-m", "jaxgen", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(losses(run_dir)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert "preempted: saved a checkpoint at step" in stderr
    assert ("SIGTERM: saving a checkpoint after this step, then stopping" in stderr) == (signum == signal.SIGTERM)
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and steps[0] >= 3
    assert saved_params(run_dir, steps[0])  # loadable


def test_ctrl_c_says_at_once_that_it_saves_and_a_second_one_says_what_it_abandoned(monkeypatch, caplog):
    """Nothing was said until the step ended, so a user pressed Ctrl-C again and lost the save unwarned."""
    from jaxgen.train import preemption

    def leave(line):
        raise SystemExit(line)

    monkeypatch.setattr(preemption, "exit_interrupted", leave)
    watch = preemption.PreemptionWatch()
    try:
        assert not watch.reached(1)
        with caplog.at_level("WARNING", logger="jaxgen"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs between bytecodes of this thread
        assert watch.reached(1)
        assert caplog.messages == ["Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again stops "
                                   "at once, without it)"]
        os.kill(os.getpid(), signal.SIGINT)  # the same keypress, passed on by `jaxgen launch` a moment later
        time.sleep(0.1)
        assert watch.reached(1)
        monkeypatch.setattr(preemption, "ONE_KEYPRESS_S", 0.0)  # a second keypress
        with pytest.raises(SystemExit, match="interrupted again before the checkpoint was saved; run the same "
                                             "command again to continue from the last one"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        watch.close()


def test_while_the_main_thread_is_busy_the_signal_watcher_says_it_saves_and_leaves_on_a_second_ctrl_c(
        monkeypatch, caplog):
    """A process waiting in C++ (a collective whose peer hung) runs no Python handler: a second Ctrl-C did nothing
    until JAX aborted the process. jaxgen.interrupts' watcher thread calls `_at_once` with every signal."""
    from jaxgen.train import preemption

    def leave(line):
        raise SystemExit(line)

    monkeypatch.setattr(preemption, "exit_interrupted", leave)
    watch = preemption.PreemptionWatch()
    try:
        with caplog.at_level("WARNING", logger="jaxgen"):
            watch._at_once(signal.SIGINT)
            watch._on_signal(signal.SIGINT, None)  # the main thread's handler, later: said already
        assert caplog.messages == ["Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again stops "
                                   "at once, without it)"]
        watch._at_once(signal.SIGINT)  # the same keypress, passed on by `jaxgen launch`
        monkeypatch.setattr(preemption, "ONE_KEYPRESS_S", 0.0)
        with pytest.raises(SystemExit, match="interrupted again before the checkpoint was saved"):
            watch._at_once(signal.SIGINT)
    finally:
        watch.close()


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "torn"
    died = run(train_args(run_dir), driver=["during-save", "8"])
    assert died.returncode == 137
    assert saved_params(run_dir, 4)  # the previous checkpoint still loads
    # Whatever the kill left, plus a torn directory of the shape Orbax writes before its atomic rename.
    torn = run_dir / "checkpoints" / "12.orbax-checkpoint-tmp-1234567"
    (torn / "state").mkdir(parents=True)
    (torn / "state" / "half_written").write_bytes(b"\0" * 100)

    resumed = run(train_args(run_dir, "logging.every=2", "train.steps=10"))  # steps extended: not a change
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] in (4, 8)  # 8 only if its commit beat the kill
    assert (f"continuing step {summary['resumed_from']} with settings changed since it was saved (config.yaml takes "
            "the new ones as training starts): logging.every: 1 -> 2\n") in resumed.stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if "tmp" in p.name] == []


def test_failing_write_is_an_error_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "full"
    args = train_args(run_dir, "train.steps=400", "checkpoint.every=2", "checkpoint.keep=1", "logging.every=50")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    # With SIGXFSZ ignored an over-limit write fails with EFBIG, as a full disk fails with ENOSPC.
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "jaxgen", *args], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, restore_signals=False)
    finally:
        signal.signal(signal.SIGXFSZ, previous)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "2" / "commit_success.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert re.search(r"jaxgen: error: writing a checkpoint to \S+ failed: file too large \(a file-size limit was "
                     r"reached\); step \d+ is intact", stderr), stderr[-3000:]
    assert "Traceback" not in stderr and "never awaited" not in stderr  # Orbax's own report of it stays quiet
    good = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert good, "retention deleted the last good checkpoint"
    assert saved_params(run_dir, max(good))


def test_nonfinite_skip_leaves_state_bit_identical(devices):
    cfg = tiny_config("mesh.data=8")
    training = build_training(cfg, make_mesh(cfg.mesh, devices))
    state = training.init_state()
    bad = random_batches(cfg, 1)[0]
    bad["weights"][0, 0] = np.nan
    before = jax.device_get((state.params, state.opt_state))
    state, metrics = training.train_step(state, to_global(bad, training.mesh))
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1 and int(state.nonfinite_steps) == 1
    assert_trees_equal(jax.device_get((state.params, state.opt_state)), before)


class PoisonedBatches:
    """A data iterator whose n-th batch has NaN loss weights."""

    def __init__(self, inner, poisoned_batch: int):
        self.inner, self.poisoned_batch, self.served = inner, poisoned_batch, 0

    def __next__(self):
        batch = next(self.inner)
        self.served += 1
        if self.served == self.poisoned_batch:
            batch = {**batch, "weights": batch["weights"] * np.nan}
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def test_nonfinite_abort_stops_without_saving_the_bad_state(tmp_path, monkeypatch):
    from jaxgen.tasks.lm import LanguageModelTask

    make_data = LanguageModelTask.make_data

    def poisoned(self, run_dir):
        data = make_data(self, run_dir)
        data.train = PoisonedBatches(data.train, poisoned_batch=3)
        return data

    monkeypatch.setattr(LanguageModelTask, "make_data", poisoned)
    cfg = tiny_config("train.nonfinite=abort", "train.steps=6", "checkpoint.every=2", "train.sample_tokens=0")
    with pytest.raises(NonFiniteError, match="non-finite"):
        train(cfg, tmp_path / "nan")
    steps = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]


def test_a_log_failure_beside_an_aborting_step_saves_nothing(tmp_path, monkeypatch):
    """A full log disk saves the steps since the last checkpoint before stopping, but not past a non-finite step
    under train.nonfinite=abort: the run stops on that step, as it would have with the log still writable."""
    from jaxgen import metrics
    from jaxgen.tasks.lm import LanguageModelTask

    make_data = LanguageModelTask.make_data
    append_line = metrics.append_line

    def poisoned(self, run_dir):
        data = make_data(self, run_dir)
        data.train = PoisonedBatches(data.train, poisoned_batch=3)
        return data

    def refuse_step_2(path, line):  # written as step 3 (the non-finite one) is observed: it is still pending
        if json.loads(line)["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        append_line(path, line)

    monkeypatch.setattr(LanguageModelTask, "make_data", poisoned)
    monkeypatch.setattr(metrics, "append_line", refuse_step_2)
    cfg = tiny_config("train.nonfinite=abort", "train.steps=6", "checkpoint.every=4", "logging.every=1",
                      "train.sample_tokens=0")
    with pytest.raises(NonFiniteError, match="step 3: non-finite"):
        train(cfg, tmp_path / "nan")
    assert not [p for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit()]


def test_shape_mismatch_lists_differing_parameters(tmp_path, devices):
    cfg = tiny_config("mesh.data=1")
    training = build_training(cfg, make_mesh(cfg.mesh, devices[:1]))
    saver = Checkpointer(tmp_path / "ck", cfg.checkpoint)
    saver.save(1, training.init_state(), {"step": 1}, {})
    saver.wait()
    wider = tiny_config("mesh.data=1", "model.d_ff=256")
    layout = build_training(wider, make_mesh(wider.mesh, devices[:1])).layout
    with pytest.raises(CheckpointError, match=r"9 arrays differ.*params/model/layers/mlp/w_down/kernel: "
                                              r"checkpoint \(2, 192, 64\) float32, model \(2, 256, 64\) float32"):
        Checkpointer(tmp_path / "ck", cfg.checkpoint).restore(layout.target, 1)
    with pytest.raises(CheckpointError, match=r"3 arrays differ.*w_gate"):
        restore_subtree(tmp_path / "ck", ("params",), layout.target.params)  # every group


def test_ema_and_optimizer_state_resume_bit_identically(tmp_path, devices):
    cfg = load_config(REPO / "configs" / "dit_digits.yaml",
                      ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "model.d_model=64", "model.n_layers=2",
                       "data.batch_size=16", "diffusion.ema_warmup=0", "diffusion.ema_decay=0.9"])
    rng = np.random.default_rng(0)
    batches = [{"images": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
                "labels": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(3)]
    training = build_training(cfg, make_mesh(cfg.mesh, devices))
    state = training.init_state()
    for batch in batches[:2]:
        state, _ = training.train_step(state, to_global(batch, training.mesh))
    saved = jax.device_get(state)
    lagging = [not np.array_equal(e, p) for e, p in zip(jax.tree.leaves(saved.ema_params), jax.tree.leaves(saved.params))]
    assert any(lagging)  # the average trails the params
    saver = Checkpointer(tmp_path / "ck", cfg.checkpoint)
    saver.save(2, state, {}, {})
    saver.wait()
    expected = jax.device_get(training.train_step(state, to_global(batches[2], training.mesh))[0])  # donates state

    restored = Checkpointer(tmp_path / "ck", cfg.checkpoint).restore(training.layout.target, 2).state
    assert_trees_equal(jax.device_get(restored), saved)
    continued = jax.device_get(training.train_step(restored, to_global(batches[2], training.mesh))[0])
    assert_trees_equal(continued, expected)
    # Sampling and evaluation read the average; fine-tuning reads the params.
    params = training.layout.target.params
    ema, key, _ = restore_subtree(tmp_path / "ck", ("ema_params", "params"), params)
    assert key == "ema_params" and set(ema) == {"model"}
    assert_trees_equal(jax.device_get(ema), saved.ema_params)
    assert_trees_equal(jax.device_get(restore_subtree(tmp_path / "ck", ("params",), params)[0]), saved.params)


def test_async_save_survives_the_next_donated_steps(tmp_path, devices):
    """The loop keeps training (donating the state's buffers) while a save is written."""
    cfg = tiny_config("mesh.data=1", "mesh.fsdp=2")
    training = build_training(cfg, make_mesh(cfg.mesh, devices[:2]))
    batches = [to_global(b, training.mesh) for b in random_batches(cfg, 6)]
    state, _ = training.train_step(training.init_state(), batches[0])
    saved = jax.device_get(state)
    saver = Checkpointer(tmp_path / "ck", cfg.checkpoint)
    saver.save(1, state, {}, {})
    for batch in batches[1:]:
        state, _ = training.train_step(state, batch)
    jax.block_until_ready(state)
    saver.wait()
    restored = Checkpointer(tmp_path / "ck", cfg.checkpoint).restore(training.layout.target, 1).state
    assert_trees_equal(jax.device_get(restored), saved)


def test_a_reader_ignores_other_steps_coming_and_going(tmp_path, devices):
    """A training run saves new steps and its retention deletes old ones while `eval`, `sample` or `export`
    read a step: the reader opens only the step it reads, whatever happens to the others meanwhile."""
    cfg = tiny_config("mesh.data=1")
    training = build_training(cfg, make_mesh(cfg.mesh, devices[:1]))
    saver = Checkpointer(tmp_path / "ck", cfg.checkpoint)
    state = training.init_state()
    saved = jax.device_get(state.params)
    saver.save(2, state, {"step": 2}, {})
    saver.wait()
    stop = threading.Event()

    def churn():  # steps appear and vanish, a directory one moment and a stray file the next
        others = [tmp_path / "ck" / str(step) for step in (1, 3, 4, 5, 6, 7)]
        while not stop.is_set():
            for other in others:
                other.mkdir()
                (other / "_CHECKPOINT_METADATA").write_text("{}")
            for other in others:
                shutil.rmtree(other)
                other.write_text("")
            for other in others:
                other.unlink()

    churning = threading.Thread(target=churn)
    churning.start()
    try:
        for _ in range(20):
            params, _, step = restore_subtree(tmp_path / "ck", ("params",), training.layout.target.params, step=2)
            assert step == 2
            assert_trees_equal(jax.device_get(params), saved)
    finally:
        stop.set()
        churning.join()


def test_a_save_the_disk_has_no_room_for_is_refused_before_it_starts(tmp_path, devices, monkeypatch):
    """A disk that filled up between saves: the write started and failed in Orbax's background thread, found at
    the next save (one process) or, in a multi-process run, only when checkpoint.save_timeout_minutes ran out
    (the other processes waiting for the failed one in Orbax's barrier)."""
    from jaxgen import checkpoint
    from jaxgen.errors import CheckpointWriteError

    cfg = tiny_config("mesh.data=1")
    training = build_training(cfg, make_mesh(cfg.mesh, devices[:1]))
    saver = Checkpointer(tmp_path / "ck", cfg.checkpoint)
    state = training.init_state()
    arrays = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    free = {"bytes": arrays // 2 - 1, "total": 10**12}
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(free["total"], 0, free["bytes"]))  # noqa: SLF001
    with pytest.raises(CheckpointWriteError, match=rf"^no room for checkpoint 2 in {re.escape(str(tmp_path))}/ck: "
                       r"\S+ \S+ free there, and the state's arrays are \S+ \S+; free space there; no earlier "
                       r"checkpoint exists$"):
        saver.save(2, state, {"step": 2}, {})
    free["bytes"] = arrays // 2  # Orbax compresses: the first save is refused only below half the arrays
    saver.save(2, state, {"step": 2}, {})
    saver.wait()
    taken = sum(f.stat().st_size for f in (tmp_path / "ck" / "2").rglob("*") if f.is_file())
    free["bytes"] = taken - 1
    with pytest.raises(CheckpointWriteError, match=r"^no room for checkpoint 4 in \S+: \S+ \S+ free there, and "
                       r"checkpoint 2 takes \S+ \S+; free space there; step 2 is intact$") as refused:
        saver.save(4, state, {"step": 4}, {})
    assert refused.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["2"]  # nothing of step 4 was started
    free["total"] = free["bytes"] = 0  # a file system that reports no sizes: left to the write itself
    saver.save(4, state, {"step": 4}, {})
    saver.wait()
    assert checkpoint.committed_steps(tmp_path / "ck") == [2, 4]
    free["total"], free["bytes"] = 10**12, 0  # keeping fewer than the two kept would make room
    with pytest.raises(CheckpointWriteError, match=r"; free space there \(or keep fewer than the 2 kept now: "
                                                   r"checkpoint.keep=1\); step 4 is intact$"):
        saver.save(6, state, {"step": 6}, {})


def test_a_read_whose_collective_lost_a_peer_does_not_call_the_checkpoint_damaged():
    """checkpoint.init_from on one host's disk: the other process's read failed in its first collective, and it
    said 'checkpoint ... is damaged or incomplete', inviting the user to delete a good checkpoint."""
    def lost_peer():
        raise RuntimeError("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] "
                           "Connection closed by peer [127.0.0.1]:44467")

    with pytest.raises(CheckpointError) as refusal:
        _damage_as_error("checkpoint runs/a/checkpoints/4", lost_peer)
    assert not isinstance(refusal.value, DamagedCheckpoint)
    assert str(refusal.value) == ("reading checkpoint runs/a/checkpoints/4 stopped: another process of the run "
                                  "stopped (RuntimeError: UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/"
                                  "transport/tcp/pair.cc:547] Connection closed by peer [127.0.0.1]:44467); its own "
                                  "error says why")

    def garbled():
        raise ValueError("ZSTD_decompressStream() failed: Data corruption detected")

    with pytest.raises(DamagedCheckpoint, match="is damaged or incomplete: ValueError: ZSTD"):
        _damage_as_error("checkpoint runs/a/checkpoints/4", garbled)


def test_a_save_that_times_out_across_processes_says_how_long_it_waited_and_the_space_left(tmp_path):
    """With background saves, a write failing on one process of a multi-process run (its host's full disk) held
    every process at the save's end for Orbax's 20 minutes, then failed as 'DEADLINE_EXCEEDED: Barrier timed out.
    Id: ThreadSaveMultiHostValueHolder...', naming neither the setting nor the disk."""
    from jaxgen.config import CheckpointConfig
    from jaxgen.errors import CheckpointWriteError

    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(save_timeout_minutes=0.5))
    try:
        assert ckpt.manager._options.async_options.timeout_secs == 30  # noqa: SLF001 - what Orbax is given

        def timed_out():
            raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out. Id: ThreadSaveMultiHostValueHolder:set_value")

        with pytest.raises(CheckpointWriteError) as failed:
            ckpt._surface_write_errors(timed_out)  # noqa: SLF001
        assert re.fullmatch(rf"writing a checkpoint to {re.escape(str(tmp_path))}/checkpoints failed: the processes "
                            r"did not all finish their parts within checkpoint.save_timeout_minutes=0.5 \(a write "
                            r"that failed on some host, e.g. a full disk, or one slower than that; \S+ \S+ free there "
                            r"now\); no earlier checkpoint exists", str(failed.value)), str(failed.value)
    finally:
        ckpt.close()


def test_a_hand_made_folder_with_a_number_for_a_name_is_no_step(tmp_path):
    """`checkpoints/007` was taken for step 7: every resume then failed renaming `checkpoints/7`, which does not
    exist, to `7.damaged`."""
    from jaxgen.checkpoint_layout import step_dirs

    for name in ("7", "007", "08", "notes", "12"):
        (tmp_path / name).mkdir()
    assert step_dirs(tmp_path) == [7, 12]


def test_a_run_directory_named_with_dotdot_after_a_link_keeps_its_checkpoints_in_one_place(tmp_path, devices):
    """`--run-dir runs/scratch/../r` with `scratch` a link elsewhere: the kernel puts `r` beside the link's target,
    while TensorStore read '..' as text and wrote the arrays beside the link; every checkpoint then read as damaged."""
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "scratch").symlink_to(tmp_path / "elsewhere" / "sub")
    run_dir = tmp_path / "runs" / "scratch" / ".." / "r"
    assert checkpoint_dir(run_dir) == tmp_path / "elsewhere" / "r" / "checkpoints"
    cfg = tiny_config("mesh.data=1")
    training = build_training(cfg, make_mesh(cfg.mesh, devices[:1]))
    state = training.init_state()
    saver = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    saver.save(1, state, {}, {})
    saver.wait()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_dir() and p.name == "r") == ["r"]  # one place
    restored = Checkpointer(checkpoint_dir(run_dir), cfg.checkpoint, writer=False).restore(training.layout.target, 1)
    assert_trees_equal(jax.device_get(restored.state), jax.device_get(state))
