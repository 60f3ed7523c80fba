"""Real JAX processes joined over loopback: the multi-host story on one machine.

Every test bounds its processes with a watchdog and kills them (by process
group) whatever happens, so a hang fails the test instead of the whole suite.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxgen.data.corpus import BUNDLED_CORPUS
from jaxgen.data.tokenizer import train_tokenizer
from jaxgen.errors import EXIT_PREEMPTED
from jaxgen.launch import free_port, process_env
from jaxgen.metrics import read_metrics

from conftest import REPO, TINY_CONFIG

WORKER = REPO / "tests" / "multiprocess_worker.py"
WATCHDOG_S = 240


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Processes running one program (same config, same process layout) compile it once between them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        yield


class Run:
    """Processes of one multi-process run, started directly (no launcher to rescue them)."""

    def __init__(self, argv: list[str], processes: int, devices_per_process: int, logs):
        port = free_port()
        self.logs = [logs / f"process{i}.log" for i in range(processes)]
        self.procs = [
            subprocess.Popen(argv, cwd=REPO, env=process_env(os.environ, i, processes, devices_per_process, port),
                             stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
            for i, log in enumerate(self.logs)
        ]

    def wait(self, timeout: float = WATCHDOG_S) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"processes still running after {timeout}s (a hang); logs:\n{self.output()}")

    def wait_for_line(self, index: int, text: str, timeout: float = WATCHDOG_S) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.logs[index].read_text():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.kill()
                pytest.fail(f"process {index} never printed {text!r}; logs:\n{self.output()}")
            time.sleep(0.2)

    def results(self) -> list[dict]:
        lines = [line for log in self.logs for line in log.read_text().splitlines() if line.startswith("RESULT:")]
        return sorted((json.loads(line.removeprefix("RESULT:")) for line in lines), key=lambda r: r["process"])

    def output(self) -> str:
        return "\n".join(f"--- process {i}\n{log.read_text()[-3000:]}" for i, log in enumerate(self.logs))

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def runs():
    started: list[Run] = []

    def start(argv, processes, devices_per_process, logs):
        logs.mkdir(parents=True, exist_ok=True)
        started.append(Run(argv, processes, devices_per_process, logs))
        return started[-1]

    yield start
    for run in started:
        run.kill()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """The first 3,000 verses: enough text for the tiny config, quick to tokenize."""
    path = tmp_path_factory.mktemp("corpus") / "verses.txt"
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        path.write_text("".join(line for _, line in zip(range(3000), f)))
    return path


def tiny_train_args(small_corpus, run_dir, *overrides):
    return ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), f"data.text={small_corpus}",
            "logging.every=1", "logging.progress_bar=false", "logging.tensorboard=false",
            "train.sample_tokens=0", "train.peak_flops_per_device=1e11", *overrides]


# Parameters split over all 8 devices: each process holds, and checkpoints, only its half.
ACROSS_PROCESSES = ["mesh.data=1", "mesh.fsdp=8"]
# A run that trains until stopped (killed or preempted), saving only when told to.
ENDLESS = ["train.steps=100000", "checkpoint.every=100000", *ACROSS_PROCESSES]


# Adam's eps bounds how much float reordering noise near-zero gradients can amplify (see test_sharding).
SAME_LOSS_OVERRIDES = ["mesh.data=1", "mesh.fsdp=8", "optimizer.eps=1e-3"]


def test_two_processes_of_four_devices_train_like_one_process_of_eight(runs, tmp_path, devices):
    from multiprocess_worker import train_losses

    run = runs([sys.executable, str(WORKER), "losses", "3", *SAME_LOSS_OVERRIDES], 2, 4, tmp_path)
    reference = train_losses(3, SAME_LOSS_OVERRIDES)  # this process: 8 devices, no jax.distributed
    assert run.wait() == [0, 0], run.output()
    results = run.results()
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        np.testing.assert_allclose(r["losses"], reference["losses"], rtol=1e-5)
        np.testing.assert_allclose(r["param_norm"], reference["param_norm"], rtol=1e-5)
    assert reference["losses"][-1] < reference["losses"][0]


def test_killing_one_process_makes_the_other_exit_nonzero_within_a_minute(runs, tmp_path, small_corpus):
    argv = [sys.executable, "-m", "jaxgen", *tiny_train_args(small_corpus, tmp_path / "run", *ENDLESS)]
    run = runs(argv, 2, 4, tmp_path / "logs")
    # Mid-training the survivor waits in a collective that never completes by itself;
    # JAX's heartbeat timeout (jaxgen's default: 30 s) is what ends it.
    run.wait_for_line(0, "compiled in")
    os.kill(run.procs[1].pid, signal.SIGKILL)
    survivor_status = run.wait(timeout=60)[0]  # fails the test if process 0 is still running
    assert survivor_status != 0, run.output()


def test_one_process_failing_mid_run_stops_the_others_with_its_line(runs, tmp_path, small_corpus):
    """Process 1 alone fails (a full disk on its host): it said so and left, and process 0, whose log people
    read, waited out the heartbeat timeout in a collective, then JAX aborted it from C++ (exit 134, a stack
    dump, no word of why)."""
    argv = [sys.executable, str(REPO / "tests" / "crash_driver.py"), "full-disk-on-1", "4", "--",
            *tiny_train_args(small_corpus, tmp_path / "run", "train.steps=100000", "checkpoint.every=4",
                             *ACROSS_PROCESSES)]
    run = runs(argv, 2, 4, tmp_path / "logs")
    run.wait_for_line(0, "compiled in")
    started = time.monotonic()
    assert run.wait(timeout=60) == [1, 1], run.output()
    assert time.monotonic() - started < 25  # the heartbeat timeout (30 s) never came into it
    output = run.output()
    assert "Check failure" not in output and "terminate called" not in output, output
    last = [log.read_text().splitlines()[-1] for log in run.logs]
    assert last == ["jaxgen: error: process 1 stopped: /scratch/x: no space left on device",
                    "jaxgen: error: /scratch/x: no space left on device"], output


@pytest.mark.parametrize("end, message", [
    ("stop", "training data ran out on process 1 before step 3 (2 processes); every process stops at step 3"),
    ("error", "training data failed on process 1 (see its log) before step 3 (2 processes)"),
])
def test_uneven_data_shares_end_every_process_at_the_same_step(runs, tmp_path, end, message):
    run = runs([sys.executable, str(WORKER), "uneven", end, "4", "2"], 2, 2, tmp_path)
    assert run.wait() == [0, 0], run.output()
    first, second = run.results()
    assert first["stopped_at"] == second["stopped_at"] == 3
    # Each of the two steps summed every process's rows: 4 devices x 2 rows of the step's value.
    assert first["sums"] == second["sums"] == [0.0, 8.0]
    assert message in first["message"]
    if end == "stop":
        assert second["message"] == first["message"]
    else:  # the process that failed reports its own error
        assert (second["error"], second["message"]) == ("DataError", "process 1 cannot read its share")


def test_too_few_training_documents_for_the_reader_streams_stop_every_process_with_one_line(runs, tmp_path,
                                                                                           small_corpus):
    # One long training document and one long held-out one (every 2nd document held out) for 8 reader streams.
    verses = small_corpus.read_text().splitlines()
    corpus = tmp_path / "one_document.txt"
    corpus.write_text(" ".join(verses[:300]) + "\n" + " ".join(verses[300:600]) + "\n")
    tokenizer = train_tokenizer(verses, 512, tmp_path / "tokenizer.model")
    args = tiny_train_args(small_corpus, tmp_path / "run", f"data.text={corpus}", "data.eval_every_nth_doc=2",
                           "data.eval_block=1", f"data.tokenizer={tokenizer.path}", "data.streams=8")
    run = runs([sys.executable, "-m", "jaxgen", *args], 2, 4, tmp_path / "logs")
    assert run.wait(timeout=120) == [2, 2], run.output()
    for log in run.logs:
        [error] = [line for line in log.read_text().splitlines() if "jaxgen: error:" in line]
        assert "holds 1 records, too few for 8 reader streams (data.streams)" in error
        assert "Traceback" not in log.read_text()


def can_give_a_process_its_own_mounts() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# Process 1 runs with another folder mounted over the run directory's parent: the same path, not the same files,
# as on a host whose --run-dir is on its own disk.
OWN_DISK_FOR_PROCESS_1 = """if [ "$JAXGEN_PROCESS_ID" = 1 ]; then
  exec unshare --mount sh -c 'mount --bind "$0" "$1" && shift && exec "$@"' "$OWN" "$SHARED" "$@"
fi
exec "$@"
"""


def own_folder_for_process_1(tmp_path, own, shared) -> list[str]:
    """The start of a command line that runs process 1 with folder `own` mounted over `shared`."""
    driver = tmp_path / "own_disk.sh"
    driver.write_text(OWN_DISK_FOR_PROCESS_1.replace("$OWN", str(own)).replace("$SHARED", str(shared)))
    return ["sh", str(driver)]


own_mounts = pytest.mark.skipif(not can_give_a_process_its_own_mounts(),
                                reason="`unshare --mount` is not allowed here (it needs root or user namespaces)")


@own_mounts
def test_a_run_directory_the_processes_do_not_share_is_refused_on_every_process(runs, tmp_path, small_corpus):
    """`--run-dir /tmp/run` on each host's own disk: both processes trained, then the first checkpoint's save
    waited for ever for the parts process 0 could not see, until the job's time limit."""
    shared, own = tmp_path / "shared", tmp_path / "own"
    shared.mkdir(), own.mkdir()
    impatient = ("import sys; from jaxgen.train import run_dir; run_dir.SHARED_PATIENCE_S = 3; "
                 "from jaxgen.cli import main; sys.exit(main(sys.argv[1:]))")
    args = tiny_train_args(small_corpus, shared / "run", "train.steps=3", *ACROSS_PROCESSES)
    run = runs([*own_folder_for_process_1(tmp_path, own, shared), sys.executable, "-c", impatient, *args], 2, 4,
               tmp_path / "logs")
    assert run.wait(timeout=120) == [2, 2], run.output()
    for log in run.logs:
        [error] = [line for line in log.read_text().splitlines() if "jaxgen: error:" in line]
        assert error == (f"jaxgen: error: --run-dir '{shared / 'run'}' is not shared by the run's processes: process 1 "
                         "does not see the lock file process 0 wrote there (a folder on each host's own disk?); a "
                         "multi-process run needs its run directory on a file system they all share (NFS, Lustre, a "
                         "bucket mount), else its first checkpoint never completes"), run.output()
        assert "Traceback" not in log.read_text()
    assert "process 1 does not see process 0's lock file in" in run.logs[1].read_text()
    assert not (shared / "run").exists()  # nothing trained, and the folder the refused start made is gone
    assert list(own.iterdir()) == []  # process 1 wrote nothing on its own disk either


@own_mounts
def test_training_files_a_process_sees_otherwise_than_process_0_stop_every_process(runs, tmp_path, small_corpus):
    """The corpus staged to each host's own disk, one copy cut short: that process trained on other documents
    than the run's data order says, and nothing said so."""
    staged, own = tmp_path / "staged", tmp_path / "own"
    staged.mkdir(), own.mkdir()
    shutil.copy(small_corpus, staged / "verses.txt")
    (own / "verses.txt").write_bytes(small_corpus.read_bytes()[:100_000])
    args = tiny_train_args(small_corpus, tmp_path / "run", f"data.text={staged / 'verses.txt'}", "train.steps=3")
    run = runs([*own_folder_for_process_1(tmp_path, own, staged), sys.executable, "-m", "jaxgen", *args], 2, 4,
               tmp_path / "logs")
    assert run.wait(timeout=120) == [2, 2], run.output()
    for log in run.logs:
        [error] = [line for line in log.read_text().splitlines() if "jaxgen: error:" in line]
        assert error == (f"jaxgen: error: process 1 does not see the training files process 0 does (process 0's -> "
                         f"its own: data.text: verses.txt {small_corpus.stat().st_size:,} -> 100,000 bytes): every "
                         "process must read the same files; a copy staged to each host's own disk may be incomplete "
                         "or out of date"), run.output()
    assert not (tmp_path / "run" / "tokenizer.model").exists()  # refused before any data was read


@own_mounts
def test_a_run_directory_one_process_cannot_see_stops_eval_on_every_process_with_one_line(runs, tmp_path):
    """`eval --run-dir /tmp/run` on several hosts, the run on one host's disk: the process that could not see it
    said so and left, and the others waited in their next collective until JAX aborted them with a C++ stack
    dump and no word of why."""
    shared, own = tmp_path / "shared", tmp_path / "own"
    (shared / "run").mkdir(parents=True), own.mkdir()
    shutil.copy(TINY_CONFIG, shared / "run" / "config.yaml")
    run = runs([*own_folder_for_process_1(tmp_path, own, shared), sys.executable, "-m", "jaxgen", "eval",
                "--run-dir", str(shared / "run")], 2, 4, tmp_path / "logs")
    assert run.wait(timeout=120) == [2, 2], run.output()
    errors = [[line for line in log.read_text().splitlines() if "jaxgen: error:" in line] for log in run.logs]
    # Checked before JAX starts: process 1 never joins, and process 0 hears of it through the join's beacon.
    assert errors == [[f"jaxgen: error: process 1 stopped before joining the run: run directory '{shared / 'run'}' "
                       "does not exist"],
                      [f"jaxgen: error: run directory '{shared / 'run'}' does not exist"]], run.output()
    assert "Check failure" not in run.output()


@own_mounts
def test_a_process_that_stops_before_joining_ends_process_0_with_its_line(runs, tmp_path):
    """The config file on one host's disk only: process 1 stopped with its line, and process 0 waited out its
    join timeout (300 s by default), then JAX aborted it with a C++ stack dump and no word of why."""
    configs, own = tmp_path / "configs", tmp_path / "own"
    configs.mkdir(), own.mkdir()
    shutil.copy(TINY_CONFIG, configs / "my.yaml")
    patient = ("import sys; from jaxgen import coordinator_beacon; coordinator_beacon.REPORT_S = 60; "  # a busy machine
               "from jaxgen.cli import main; sys.exit(main(sys.argv[1:]))")
    run = runs([*own_folder_for_process_1(tmp_path, own, configs), sys.executable, "-c", patient, "train",
                "--config", str(configs / "my.yaml"), "--run-dir", str(tmp_path / "run")], 2, 4, tmp_path / "logs")
    started = time.monotonic()
    assert run.wait(timeout=120) == [2, 2], run.output()
    assert time.monotonic() - started < 60, run.output()
    errors = [[line for line in log.read_text().splitlines() if "jaxgen: error:" in line] for log in run.logs]
    missing = f"config file '{configs / 'my.yaml'}' does not exist"
    assert errors == [[f"jaxgen: error: process 1 stopped before joining the run: {missing}"],
                      [f"jaxgen: error: {missing}"]], run.output()
    assert "Check failure" not in run.output() and not (tmp_path / "run").exists()


def launch_local(*argv: str) -> tuple[int, str]:
    """`jaxgen launch local ARGV...` under a watchdog; (exit status, combined output)."""
    launcher = subprocess.Popen([sys.executable, "-m", "jaxgen", "launch", "local", *argv], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = launcher.communicate(timeout=WATCHDOG_S)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    return launcher.returncode, output


def eval_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r}


@pytest.fixture(scope="module")
def launched_run(tmp_path_factory, small_corpus):
    """`jaxgen launch local` around a real `jaxgen train`: 2 processes x 4 CPU devices, 3 steps."""
    run_dir = tmp_path_factory.mktemp("launched") / "run"
    status, output = launch_local("--processes", "2", "--devices-per-process", "4", "--",
                                  *tiny_train_args(small_corpus, run_dir, "train.steps=3", *ACROSS_PROCESSES))
    return run_dir, status, output


def test_launch_local_trains_with_prefixed_output_and_one_writer(launched_run):
    run_dir, status, output = launched_run
    assert status == 0, output[-5000:]
    lines = output.splitlines()
    assert any(line.startswith("[0] ") and "process 0 of 2: 4 local devices of 8" in line for line in lines)
    assert any(line.startswith("[1] ") and "process 1 of 2: 4 local devices of 8" in line for line in lines)
    # The results are printed once, by process 0 (a cluster's log held them once per process).
    assert [line for line in lines if "run directory: " in line] == [f"[0] run directory: {run_dir}"]
    records = read_metrics(run_dir / "metrics.jsonl")
    # Only process 0 writes: each step appears once, not once per process.
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert list(eval_losses(run_dir)) == [0, 3]


@pytest.fixture(scope="module")
def one_process_run(launched_run, small_corpus, tmp_path_factory):
    """One process started from the 2-process run's checkpoint, on another mesh (data x fsdp = 2 x 4)."""
    two_process_run, status, output = launched_run
    assert status == 0, output[-5000:]
    run_dir = tmp_path_factory.mktemp("one_process") / "run"
    args = tiny_train_args(small_corpus, run_dir, "train.steps=3", "mesh.data=2", "mesh.fsdp=4",
                           f"checkpoint.init_from={two_process_run}", *same_tokenizer(two_process_run))
    result = subprocess.run([sys.executable, "-m", "jaxgen", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=WATCHDOG_S)
    assert result.returncode == 0, result.stderr[-5000:]
    return run_dir


def same_tokenizer(run_dir) -> list[str]:
    """Later runs tokenize exactly as the first did, so held-out batches are identical."""
    return [f"data.tokenizer={run_dir / 'tokenizer.model'}"]


def test_two_process_checkpoint_restores_in_one_process_resharded(launched_run, one_process_run):
    # A run started from restored parameters evaluates them at step 0, on the same held-out batches.
    two_process_run, _, _ = launched_run
    np.testing.assert_allclose(eval_losses(one_process_run)[0], eval_losses(two_process_run)[3], rtol=1e-5)


@pytest.fixture(scope="module")
def preempted_run(launched_run, one_process_run, small_corpus, tmp_path_factory):
    """Two processes start from the one-process checkpoint; then process 1 alone gets SIGTERM."""
    tmp = tmp_path_factory.mktemp("preempted")
    run_dir = tmp / "run"
    args = tiny_train_args(small_corpus, run_dir, *ENDLESS, f"checkpoint.init_from={one_process_run}",
                           *same_tokenizer(launched_run[0]))
    run = Run([sys.executable, "-m", "jaxgen", *args], 2, 4, tmp)
    try:
        run.wait_for_line(0, "compiled in")
        time.sleep(2)  # a few steps in
        os.kill(run.procs[1].pid, signal.SIGTERM)
        statuses = run.wait(timeout=120)
    finally:
        run.kill()
    return run_dir, run, statuses


@own_mounts
def test_an_init_from_one_process_cannot_see_stops_every_process_naming_it(launched_run, runs, tmp_path,
                                                                          small_corpus):
    """checkpoint.init_from on one host's disk: the process that could not see it said so, and the other, its
    read's first collective broken, called the checkpoint 'damaged or incomplete'."""
    source, _, _ = launched_run
    args = tiny_train_args(small_corpus, tmp_path / "run", "train.steps=4", f"checkpoint.init_from={source}",
                           f"data.tokenizer={source / 'tokenizer.model'}", *ACROSS_PROCESSES)
    own = tmp_path / "own"
    own.mkdir()
    run = runs([*own_folder_for_process_1(tmp_path, own, source.parent), sys.executable, "-m", "jaxgen", *args], 2,
               4, tmp_path / "logs")
    assert run.wait(timeout=120) == [2, 2], run.output()
    missing = f"checkpoint.init_from='{source}': '{source}' does not exist"
    errors = [[line for line in log.read_text().splitlines() if "jaxgen: error:" in line] for log in run.logs]
    assert errors == [[f"jaxgen: error: process 1 stopped: {missing}"], [f"jaxgen: error: {missing}"]], run.output()
    assert "damaged" not in run.output()


@own_mounts
def test_a_task_file_one_process_cannot_see_stops_eval_on_every_process_naming_it(launched_run, runs, tmp_path):
    source, _, _ = launched_run
    tasks, own = tmp_path / "tasks", tmp_path / "own"
    tasks.mkdir(), own.mkdir()
    (tasks / "mc.jsonl").write_text('{"context": "Our Father which art in", "choices": ["heaven", "Egypt"], '
                                    '"label": 0}\n')
    run = runs([*own_folder_for_process_1(tmp_path, own, tasks), sys.executable, "-m", "jaxgen", "eval", "--run-dir",
                str(source), "--tasks", f"multiple_choice={tasks / 'mc.jsonl'}"], 2, 4, tmp_path / "logs")
    assert run.wait(timeout=120) == [2, 2], run.output()
    missing = f"task file '{tasks / 'mc.jsonl'}' does not exist"
    errors = [[line for line in log.read_text().splitlines() if "jaxgen: error:" in line] for log in run.logs]
    assert errors == [[f"jaxgen: error: process 1 stopped: {missing}"], [f"jaxgen: error: {missing}"]], run.output()
    assert not (source / "evals").exists()


def test_a_two_process_eval_shows_what_eval_jsonl_holds_and_stops_on_sigterm(launched_run, runs, tmp_path):
    """`eval --all` on two processes hung for ever once eval.jsonl held a result (process 0 alone read a
    checkpoint's settings through Orbax, whose reader ends in a barrier of every process); and a SIGTERM went to
    JAX's preemption notice, which no eval acts on: it scored on."""
    source, status, output = launched_run
    assert status == 0, output[-5000:]
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    eval_all = [sys.executable, "-m", "jaxgen", "eval", "--run-dir", str(run_dir), "--all"]
    scored = subprocess.run(eval_all, cwd=REPO, capture_output=True, text=True, timeout=WATCHDOG_S)
    assert scored.returncode == 0, scored.stderr[-3000:]
    run = runs(eval_all, 2, 4, tmp_path / "logs")
    assert run.wait(timeout=120) == [0, 0], run.output()
    assert "shown from eval.jsonl, not scored again" in run.logs[0].read_text()
    assert [json.loads(line) for line in run.logs[0].read_text().splitlines() if line.startswith("{")] == \
        [json.loads(line) for line in scored.stdout.splitlines()]
    (run_dir / "eval.jsonl").unlink()
    stopped = runs(eval_all, 2, 4, tmp_path / "stopped")
    stopped.wait_for_line(1, "process 1 of 2")
    for process in stopped.procs:
        process.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=60) == [143, 143], stopped.output()
    assert all(log.read_text().splitlines()[-1] == "jaxgen: stopped by SIGTERM" for log in stopped.logs), \
        stopped.output()


def test_one_process_checkpoint_restores_in_two_processes_resharded(one_process_run, preempted_run):
    run_dir, _, _ = preempted_run
    np.testing.assert_allclose(eval_losses(run_dir)[0], eval_losses(one_process_run)[3], rtol=1e-5)


def test_sigterm_to_one_process_makes_both_save_at_the_same_step_and_stop(preempted_run):
    run_dir, run, statuses = preempted_run
    assert statuses == [EXIT_PREEMPTED, EXIT_PREEMPTED], run.output()
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and saved[0] > 0, saved
    for log in run.logs:
        assert f"preempted: saved a checkpoint at step {saved[0]}" in log.read_text()


def test_ctrl_c_on_a_launch_makes_every_process_save_at_the_same_step_and_stop(small_corpus, tmp_path):
    """A terminal's Ctrl-C reaches the launcher and every process; each left at once ('interrupted'), without
    saving, while a single process saved. Now each turns it into the SIGTERM JAX's preemption sync agrees on."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "jaxgen", "launch", "local", "--processes", "2",
                                 "--devices-per-process", "4", "--", *tiny_train_args(small_corpus, run_dir, *ENDLESS)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + WATCHDOG_S
        while len([r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]) < 2:
            assert time.monotonic() < deadline and launcher.poll() is None, "training never started"
            time.sleep(0.2)
        os.killpg(launcher.pid, signal.SIGINT)  # as the terminal sends it: to the whole foreground group
        output, _ = launcher.communicate(timeout=WATCHDOG_S)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == EXIT_PREEMPTED, output[-5000:]
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and saved[0] >= 2, output[-5000:]
    for index in (0, 1):
        assert f"[{index}] jaxgen: preempted: saved a checkpoint at step {saved[0]}" in output, output[-5000:]
    assert output.count("Ctrl-C: saving a checkpoint after this step, then stopping") == 1  # said by process 0


# The same run on 1 process x 8 devices and on 2 processes x 4 (the global batch of a step is a
# function of the seed and the step alone), and a checkpoint of either resumed on the other.
DATA_PARALLEL = ["mesh.data=8", "optimizer.eps=1e-3", "train.steps=8", "checkpoint.every=4"]


@pytest.fixture(scope="module")
def corpus_tokenizer(small_corpus, tmp_path_factory):
    """Given to every run below, so that none depends on another's tokenizer training."""
    path = tmp_path_factory.mktemp("tokenizer") / "verses512.model"
    train_tokenizer(small_corpus.read_text().splitlines(), 512, path)
    return f"data.tokenizer={path}"


def train_on_one_process(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "jaxgen", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=WATCHDOG_S)
    assert result.returncode == 0, result.stderr[-5000:]


def train_on_two_processes(args: list[str]) -> None:
    status, output = launch_local("--processes", "2", "--devices-per-process", "4", "--", *args)
    assert status == 0, output[-5000:]


TRAIN_ON = {1: train_on_one_process, 2: train_on_two_processes}


@pytest.fixture(scope="module")
def same_run_on(small_corpus, corpus_tokenizer, tmp_path_factory):
    """{process count: run directory} of one 8-step run, trained on 1 and on 2 processes."""
    runs = {}
    for processes, train in TRAIN_ON.items():
        runs[processes] = tmp_path_factory.mktemp(f"{processes}_processes") / "run"
        train(tiny_train_args(small_corpus, runs[processes], *DATA_PARALLEL, corpus_tokenizer))
    return runs


def step_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_one_and_two_processes_train_on_the_same_global_batches(same_run_on):
    one, two = step_losses(same_run_on[1]), step_losses(same_run_on[2])
    assert list(one) == list(two) == list(range(1, 9))
    np.testing.assert_allclose(list(two.values()), list(one.values()), rtol=1e-5)
    np.testing.assert_allclose(list(eval_losses(same_run_on[2]).values()), list(eval_losses(same_run_on[1]).values()),
                               rtol=1e-5)


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_process_count_in_the_same_data_order(
        same_run_on, small_corpus, corpus_tokenizer, tmp_path, saved_on, resumed_on):
    # The run as it was when its step-4 checkpoint was the newest (later steps are discarded on resume).
    run_dir = tmp_path / "run"
    shutil.copytree(same_run_on[saved_on], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "8")
    (run_dir / "summary.json").unlink()
    TRAIN_ON[resumed_on](tiny_train_args(small_corpus, run_dir, *DATA_PARALLEL, corpus_tokenizer))
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == 4
    resumed, uninterrupted = step_losses(run_dir), step_losses(same_run_on[saved_on])
    assert list(resumed) == list(range(1, 9))
    np.testing.assert_allclose(list(resumed.values()), list(uninterrupted.values()), rtol=1e-5)
