"""The launchers: `jaxgen launch local` as a process supervisor, and the cluster scripts' validity."""

import gzip
import io
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import yaml

from jaxgen.data.corpus import BUNDLED_CORPUS
from jaxgen.launch import LAUNCHER_PID_ENV, ORPHAN_GRACE_S, exit_code, launch_local, process_env, watch_launcher

from conftest import REPO, TINY_CONFIG

LAUNCH = REPO / "launch"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_each_process_learns_its_place_and_device_count():
    env = process_env({"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8", "HOME": "/h"},
                      index=1, processes=3, devices_per_process=4, port=1234)
    assert env["JAXGEN_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (env["JAXGEN_NUM_PROCESSES"], env["JAXGEN_PROCESS_ID"]) == ("3", "1")
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu" and env["HOME"] == "/h"
    assert env[LAUNCHER_PID_ENV] == str(os.getpid())


def test_output_is_prefixed_by_process_index():
    out = io.StringIO()
    status = launch_local(python("import os; print('hello from', os.environ['JAXGEN_PROCESS_ID'])"), 3, 1, out=out)
    assert status == 0
    assert sorted(out.getvalue().splitlines()) == ["[0] hello from 0", "[1] hello from 1", "[2] hello from 2"]


def test_one_failure_fails_the_run_and_stops_the_others():
    code = """
        import os, sys, time
        if os.environ['JAXGEN_PROCESS_ID'] == '1':
            sys.exit(3)
        time.sleep(300)
    """
    out = io.StringIO()
    start = time.monotonic()
    assert launch_local(python(code), 2, 1, out=out) == 3
    assert time.monotonic() - start < 30  # the sleeper was killed, not waited for
    assert "[launch] process 1 exited with status 3; stopping the others" in out.getvalue()
    alone = io.StringIO()  # with no others, none is said to be stopped
    assert launch_local(python("import sys; sys.exit(3)"), 1, 1, out=alone) == 3
    assert alone.getvalue().splitlines()[-1] == "[launch] process 0 exited with status 3"


def test_a_process_killed_outright_is_named_with_its_signal_and_the_usual_sender():
    code = """
        import os, signal, time
        if os.environ['JAXGEN_PROCESS_ID'] == '1':
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(300)
    """
    out = io.StringIO()
    assert launch_local(python(code), 2, 1, out=out) == 137
    assert ("[launch] process 1 was killed by SIGKILL (the out-of-memory killer, or kill -9), status 137; "
            "stopping the others") in out.getvalue()


def test_the_launchers_line_is_said_again_last_when_the_others_printed_after_it():
    """Process 1 killed: the launcher's line came first, and JAX's C++ stack dump of the process it then aborted
    ended the output."""
    code = """
        import os, sys, time
        if os.environ['JAXGEN_PROCESS_ID'] == '1':
            sys.exit(3)
        time.sleep(1)
        print('*** Check failure stack trace: ***', flush=True)
        print('    @     0x7fc2954eb505  (unknown)', flush=True)
        sys.exit(134)
    """
    out = io.StringIO()
    assert launch_local(python(code), 2, 1, out=out) == 3
    lines = out.getvalue().splitlines()
    assert lines[0] == "[launch] process 1 exited with status 3; stopping the others"
    assert lines[-1] == "[launch] the run stopped: process 1 exited with status 3"


def test_a_process_that_only_relayed_another_s_failure_is_not_named_as_the_one_that_failed():
    """Process 0 hosts JAX's coordination service, so when it fails it leaves last: the first process to exit
    is one that printed its line (jaxgen.peer_stops), and the launcher named that one as the failure."""
    code = """
        import os, sys, time
        if os.environ['JAXGEN_PROCESS_ID'] == '0':
            print('jaxgen: error: /scratch/x: no space left on device', file=sys.stderr, flush=True)
            time.sleep(2)
            sys.exit(1)
        time.sleep(0.5)
        print('jaxgen: error: process 0 stopped: /scratch/x: no space left on device', file=sys.stderr, flush=True)
        sys.exit(1)
    """
    out = io.StringIO()
    assert launch_local(python(code), 2, 1, out=out) == 1
    assert out.getvalue().splitlines()[-1] == ("[launch] process 1 exited with status 1 after process 0 failed "
                                               "(its line says why); stopping the others")


def wait_until_ready(launcher: subprocess.Popen, processes: int) -> None:
    """Until each launched process has printed its 'ready' line."""
    ready = 0
    for line in launcher.stdout:
        ready += line.endswith("ready\n")
        if ready == processes:
            return


def test_sigterm_reaches_every_process_and_their_status_is_the_runs():
    # Like a preempted run: each process saves on SIGTERM and exits 75.
    code = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
        print('ready', flush=True)
        time.sleep(300)
    """
    driver = python(f"""
        import sys
        from jaxgen.launch import launch_local
        sys.exit(launch_local({python(code)!r}, 2, 1))
    """)
    proc = subprocess.Popen(driver, cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until_ready(proc, 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 75
        assert "saved a checkpoint and stopped (status 75); waiting for the others" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_hangup_stops_every_process_as_sigterm_does_though_no_one_reads_the_output(tmp_path):
    """The terminal closes: SIGHUP to the whole process group, and the launcher's output goes nowhere.

    Each process (like jaxgen train) stops on SIGTERM or SIGHUP, but prints plenty while it saves:
    the launcher must keep draining it, or the process would block on a full pipe.
    """
    code = """
        import signal, sys, time
        def save(*_):
            # The launcher passes the hang-up on as SIGTERM: one arriving while the interpreter finalises (which
            # restores the default action of Python handlers, not of SIG_IGN) would end it as 143.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            for _ in range(2000):
                print('saving ' + 'x' * 100, flush=True)  # far more than a pipe holds
            sys.exit(75)
        signal.signal(signal.SIGTERM, save)
        signal.signal(signal.SIGHUP, save)
        print('ready', flush=True)
        time.sleep(300)
    """
    driver = python(f"""
        import sys
        from jaxgen.launch import launch_local
        status = launch_local({python(code)!r}, 2, 1)
        open(sys.argv[1], 'w').write(str(status))
    """)
    status_file = tmp_path / "status"
    proc = subprocess.Popen([*driver, str(status_file)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_until_ready(proc, 2)
        proc.stdout.close()  # the terminal is gone
        os.killpg(proc.pid, signal.SIGHUP)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert status_file.read_text() == "75"  # both saved and stopped; the launcher lived to see it


def test_killed_by_a_signal_reads_as_128_plus_the_signal():
    assert exit_code(-signal.SIGKILL) == 137
    assert exit_code(75) == 75


def test_launch_without_a_command_explains_itself():
    result = subprocess.run([sys.executable, "-m", "jaxgen", "launch", "local", "--processes", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "give the command after --" in result.stderr
    # A mistyped command is refused once, by the launcher, before any process starts ('[0] jaxgen: error: ...').
    result = subprocess.run([sys.executable, "-m", "jaxgen", "launch", "local", "--processes", "2", "--", "train",
                             "--bogus"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == "jaxgen: error: unrecognized arguments: --bogus (see `jaxgen train --help`)\n"
    # Only commands whose processes join one run: `-- sample` ran once per process, `-- launch local` nested
    # launchers; 100,000 processes (or simulated devices each) started until the host gave out.
    for args, says in [(["--", "sample"], "jaxgen launch local runs train or eval, whose processes "
                        "join one run; not `jaxgen sample`, which each process would run on its own, side by side"),
                       (["--", "launch", "local", "--", "train"], "not `jaxgen launch`"),
                       (["--processes", "100000", "--", "train"], "--processes 100000 would start 100000 JAX "
                        "processes on this machine, about 537 MB each before any model or data, more than the "),
                       (["--devices-per-process", "100000", "--", "train"], "argument --devices-per-process: 100000 "
                        "is not a simulated device count; give 1 to 4096"),
                       # Given to every process, it left them all waiting for each other until the join timeout.
                       (["--", "train", "--process-id", "1"], "jaxgen launch local gives each process its "
                        "--process-id itself; remove it from the command (choose --processes, --devices-per-process "
                        "and --port of the launcher instead)")]:
        result = subprocess.run([sys.executable, "-m", "jaxgen", "launch", "local", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and says in result.stderr, result.stderr


# ----------------------------------------------------------------------------- when the launcher dies


needs_proc = pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads processes from /proc")


def process_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: state, parent PID, ...; None once the process is gone."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def is_running(pid: int) -> bool:
    stat = process_stat(pid)
    return stat is not None and stat[0] != "Z"


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    return [int(p.name) for p in pathlib.Path("/proc").iterdir()
            if p.name.isdigit() and (stat := process_stat(int(p.name))) and int(stat[1]) == pid]


def wait_until_gone(pids: list[int], timeout: float) -> float:
    """Seconds until none of `pids` runs; fails the test after `timeout`."""
    start = time.monotonic()
    while any(is_running(pid) for pid in pids):
        assert time.monotonic() - start < timeout, f"still running {timeout}s later: {list(filter(is_running, pids))}"
        time.sleep(0.1)
    return time.monotonic() - start


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_process_not_started_by_the_launcher_watches_nothing():
    threads = threading.active_count()
    watch_launcher({})
    assert threading.active_count() == threads


@needs_proc
@pytest.mark.parametrize("on_sigterm", ["exit", "ignore"])
def test_a_launched_process_stops_by_itself_when_its_launcher_dies(tmp_path, on_sigterm):
    # Like a run, the process prints all the time and, asked to stop, saves (here: leaves
    # a file, as its output goes nowhere once the launcher is gone) and exits; or it
    # never gets that far, and must kill itself after the grace period.
    asked_to_stop = tmp_path / "asked_to_stop"
    process = f"""
        import os, pathlib, signal, sys, time
        import jaxgen.launch

        jaxgen.launch.ORPHAN_GRACE_S = 1.0
        def on_sigterm(signum, frame):
            pathlib.Path({str(asked_to_stop)!r}).touch()
            if {on_sigterm!r} == "exit":
                sys.exit(75)
        signal.signal(signal.SIGTERM, on_sigterm)
        jaxgen.launch.watch_launcher()
        print(os.getpid(), os.environ.get({LAUNCHER_PID_ENV!r}), flush=True)
        while True:
            print("step", flush=True)
            time.sleep(0.01)
    """
    launcher = subprocess.Popen(python(f"""
        from jaxgen.launch import launch_local
        launch_local({python(process)!r}, 1, 1)
    """), cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, pid, inherited = launcher.stdout.readline().split()  # "[0] PID None"
        assert inherited == "None"  # processes it starts do not watch the launcher
        launcher.kill()
        launcher.wait()
        wait_until_gone([int(pid)], timeout=15)
        assert asked_to_stop.exists()  # not ended by a print into the closed pipe
    finally:
        kill_group(launcher.pid)


@needs_proc
def test_killing_the_launcher_makes_its_processes_save_and_stop(tmp_path):
    corpus = tmp_path / "verses.txt"  # the first 3,000 verses: quick to tokenize
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        corpus.write_text("".join(line for _, line in zip(range(3000), f)))
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    argv = [sys.executable, "-m", "jaxgen", "launch", "local", "--processes", "2", "--devices-per-process", "1",
            "--", "train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), f"data.text={corpus}",
            "train.steps=100000", "checkpoint.every=null", "logging.every=1", "train.sample_tokens=0",
            "train.peak_flops_per_device=1e11", "logging.tensorboard=false"]
    launcher = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.2)
        workers = children(launcher.pid)
        assert len(workers) == 2
        launcher.kill()
        launcher.wait()
        seconds = wait_until_gone(workers, timeout=ORPHAN_GRACE_S + 25)
        saved = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
        # The clean stop's checkpoint (`checkpoint.every=null` saves no other), at a step after the third.
        assert len(saved) == 1 and saved[0] >= 3, f"saved {saved}; processes gone after {seconds:.1f}s"
    finally:
        kill_group(launcher.pid)


# ----------------------------------------------------------------------------- cluster scripts


SHELL_SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])


def test_shell_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); the scripts were not checked")
    assert len(SHELL_SCRIPTS) >= 6
    result = subprocess.run(["shellcheck", "--external-sources", *map(str, SHELL_SCRIPTS)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout


def test_executable_scripts_are_executable():
    for script in SHELL_SCRIPTS:
        if script.suffix == ".sh" and script.name != "env.sh":  # env.sh is sourced; sbatch reads .sbatch
            assert os.access(script, os.X_OK), f"{script} is not executable"


def test_the_sbatch_script_run_outside_slurm_or_without_a_run_dir_says_so_in_one_line(tmp_path):
    """Run by hand, it stopped at `SLURM_JOB_ID: unbound variable` (status 1)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for args, says in [(["--run-dir", str(tmp_path)], "not inside a SLURM job (SLURM_JOB_ID is not set)"),
                       ([], "pass --run-dir on shared storage")]:
        ran = subprocess.run(["bash", str(LAUNCH / "slurm" / "train.sbatch"), *args], env=env, capture_output=True,
                             text=True, timeout=60)
        assert (ran.returncode, ran.stdout) == (2, "") and ran.stderr.count("\n") == 1 and says in ran.stderr


@pytest.mark.parametrize("status, requeued", [(75, True), (143, True), (1, False), (0, False)])
def test_the_sbatch_script_requeues_a_run_stopped_by_the_time_limit(tmp_path, status, requeued):
    """75: saved on SIGTERM. 143: a SIGTERM that came before training started, with nothing to save; it was not
    requeued, and the job ended there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\nexit {status}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "SLURM_JOB_ID": "99",
           "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    ran = subprocess.run(["bash", str(LAUNCH / "slurm" / "train.sbatch"), "--run-dir", str(tmp_path / "run")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == status, ran.stderr
    log = tmp_path / "scontrol.log"
    assert (log.read_text() if log.exists() else "") == ("requeue 99\n" if requeued else "")


def k8s_documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((LAUNCH / "k8s" / name).read_text()))


def pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "JobSet":
        return [job["template"]["spec"]["template"]["spec"] for job in doc["spec"]["replicatedJobs"]]
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]["spec"]]
    return []


@pytest.mark.parametrize("manifest", ["jobset.yaml", "indexed-job.yaml"])
def test_kubernetes_jobs_are_indexed_and_run_as_the_rbac_service_account(manifest):
    rbac = {doc["kind"]: doc for doc in k8s_documents("rbac.yaml")}
    docs = k8s_documents(manifest)
    assert all({"apiVersion", "kind", "metadata"} <= doc.keys() for doc in docs)
    jobs = [d["spec"]["replicatedJobs"][0]["template"]["spec"] if d["kind"] == "JobSet" else d["spec"]
            for d in docs if d["kind"] in ("JobSet", "Job")]
    assert jobs and all(j["completionMode"] == "Indexed" and j["parallelism"] == j["completions"] for j in jobs)
    # Replacement pods wait for the pod they replace to end (it saves a checkpoint on SIGTERM; two pods of one
    # index at once is a duplicate JAX task).
    assert all(j["podReplacementPolicy"] == "Failed" for j in jobs)
    for pod in [spec for doc in docs for spec in pod_specs(doc)]:
        assert pod["serviceAccountName"] == rbac["ServiceAccount"]["metadata"]["name"]
        assert pod["containers"][0]["args"][0] == "train"
    services = [d for d in docs if d["kind"] == "Service"]
    for service in services:  # a plain Job needs its headless Service named as the pods' subdomain
        assert service["spec"]["clusterIP"] == "None"
        assert [pod_specs(d)[0]["subdomain"] for d in docs if d["kind"] == "Job"] == [service["metadata"]["name"]]


def test_rbac_grants_what_jax_kubernetes_detection_reads():
    rbac = {doc["kind"]: doc for doc in k8s_documents("rbac.yaml")}
    granted = {(group, resource, verb) for rule in rbac["Role"]["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    # Its own pod (listed by IP), its Job (process count), headless Services (plain Jobs).
    assert {("", "pods", "list"), ("batch", "jobs", "get"), ("", "services", "list")} <= granted
    binding = rbac["RoleBinding"]
    assert binding["roleRef"]["name"] == rbac["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == rbac["ServiceAccount"]["metadata"]["name"]


def test_dockerfile_copies_files_that_exist():
    lines = (LAUNCH / "docker" / "Dockerfile").read_text().splitlines()
    instructions = [line for line in lines if line.strip() and not line.startswith("#")]
    assert instructions[0].startswith("FROM ")
    sources = [part for line in lines if line.startswith("COPY") for part in line.split()[1:-1]]
    assert sources and all((REPO / s).exists() for s in sources), sources


def test_readme_names_every_launcher():
    readme = (LAUNCH / "README.md").read_text()
    for path in [*SHELL_SCRIPTS, *LAUNCH.rglob("*.yaml"), LAUNCH / "docker" / "Dockerfile"]:
        assert str(pathlib.Path(path).relative_to(REPO)) in readme, path


def test_a_suspended_process_is_named_as_the_cause_of_the_others_abort():
    """SIGSTOP on process 1: JAX aborted process 0 for its missing heartbeats, and the launcher blamed process 0."""
    from jaxgen.launch import suspended

    running, paused = subprocess.Popen(["sleep", "30"]), subprocess.Popen(["sleep", "30"])
    try:
        paused.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while suspended([running, paused]) != [1] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert suspended([running, paused]) == [1]
    finally:
        for proc in (running, paused):
            proc.kill()
            proc.wait()
