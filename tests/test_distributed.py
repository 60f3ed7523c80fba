"""Multi-process settings: where they come from, what is rejected, when JAX is asked to join."""

import errno
import os
import socket
import subprocess
import sys
import time

import jax
import pytest

from jaxgen import distributed
from jaxgen.coordinator_beacon import ask, refusal, report_stop, run_identity, start_beacon
from jaxgen.data.lockstep import DataExhausted, next_in_lockstep
from jaxgen.distributed import DistributedError, DistributedSettings, settings_from
from jaxgen.errors import DataError
from jaxgen.launch import free_port

from helpers import REPO, jaxgen_cli
from test_cli import interrupt_when, one_final_line, start

EXPLICIT_ENV = {"JAXGEN_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAXGEN_NUM_PROCESSES": "4", "JAXGEN_PROCESS_ID": "3"}


def test_environment_supplies_settings_and_flags_win():
    s = settings_from({}, EXPLICIT_ENV)
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.1:1234", 4, 3)
    s = settings_from({"process_id": 0, "heartbeat_timeout_s": 10}, EXPLICIT_ENV)
    assert (s.process_id, s.heartbeat_timeout_s, s.init_timeout_s) == (0, 10, 300)


@pytest.mark.parametrize("flags, message", [
    ({"coordinator_address": "10.0.0.1"}, "'10.0.0.1' must be HOST:PORT"),
    ({"coordinator_address": "10.0.0.1:http"}, "has port 'http'"),
    ({"coordinator_address": "10.0.0.1:70000"}, "has port '70000'; it must be 1..65535"),
    ({"coordinator_address": "::1:1234"}, "IPv6 host in brackets"),
    ({"process_id": 4}, "process id 4 is out of range for 4 processes (valid: 0..3)"),
    ({"num_processes": 0, "process_id": 0}, "number of processes 0 must be at least 1"),
    ({"cluster": "none"}, "cluster 'none' contradicts"),
    ({"init_timeout_s": 0}, "--init-timeout / JAXGEN_INIT_TIMEOUT = 0 must be a positive number of seconds"),
])
def test_bad_settings_name_the_value(flags, message):
    with pytest.raises(DistributedError) as err:
        settings_from(flags, EXPLICIT_ENV)
    assert message in str(err.value)


def test_partial_explicit_settings_say_what_is_missing():
    with pytest.raises(DistributedError, match="missing num_processes, process_id .*JAXGEN_NUM_PROCESSES"):
        settings_from({"coordinator_address": "host:1"}, {})
    with pytest.raises(DistributedError, match=r"JAXGEN_PROCESS_ID='one' is not an integer"):
        settings_from({}, {**EXPLICIT_ENV, "JAXGEN_PROCESS_ID": "one"})


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("environ, cluster", [
    ({}, None),
    ({**SLURM, "SLURM_NTASKS": "16"}, "SLURM"),
    ({**SLURM, "SLURM_NTASKS": "1"}, None),  # one task: an interactive allocation trains alone
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "JOB_COMPLETION_INDEX": "1"}, "Kubernetes indexed Job"),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, None),  # a lone pod, not an indexed Job
    ({"TPU_WORKER_HOSTNAMES": "host-0,host-1"}, "Cloud TPU on GKE"),
    ({"TPU_WORKER_HOSTNAMES": "host-0"}, None),
])
def test_only_multi_process_cluster_jobs_are_detected(environ, cluster):
    assert distributed.detect_cluster(environ) == cluster


def test_a_one_process_command_started_on_every_process_of_a_job_runs_on_process_0(tmp_path):
    """`export` under `srun` with 2 tasks (or JAXGEN_* set by hand): both processes wrote one --out, and the one
    that lost the race failed the job; `sample` printed its text once per process."""
    explicit = {"JAXGEN_NUM_PROCESSES": "2", "JAXGEN_COORDINATOR_ADDRESS": "127.0.0.1:1"}
    assert distributed.another_process_does_it({**explicit, "JAXGEN_PROCESS_ID": "0"}) is None
    assert distributed.another_process_does_it({**explicit, "JAXGEN_PROCESS_ID": "1"}) == \
        "JAXGEN_PROCESS_ID=1 of JAXGEN_NUM_PROCESSES=2"
    assert distributed.another_process_does_it({**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}) == \
        "SLURM_PROCID=1 of SLURM_NTASKS=2"
    assert distributed.another_process_does_it({**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}) is None
    assert distributed.another_process_does_it({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert distributed.another_process_does_it({}) is None
    # The others check the arguments, as process 0 does, and leave before reading the model.
    run = tmp_path / "run"
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "config.yaml").write_text("")
    (run / "checkpoints" / "2" / "jaxgen_checksums.json").write_text("{}")  # committed, as far as names go
    result = subprocess.run([sys.executable, "-m", "jaxgen", "export", "--run-dir", str(run), "--out",
                             str(tmp_path / "out")], env={**os.environ, **explicit, "JAXGEN_PROCESS_ID": "1"},
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0 and "export runs in one process, process 0 of the job; this is JAXGEN_PROCESS_ID=1 " \
        "of JAXGEN_NUM_PROCESSES=2: nothing to do here" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("environ, says", [
    ({**SLURM, "SLURM_NTASKS": "2"}, None),
    ({**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "abc"}, "SLURM_PROCID='abc' is not in 0..1: it is the task's rank"),
    ({**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "5"}, "SLURM_PROCID='5' is not in 0..1"),
    ({**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "-1"}, "SLURM_PROCID='-1' is not in 0..1"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n", "SLURM_NTASKS": "2"},  # JAX: "coordinator_address should be"
     "SLURM_PROCID is not set: it is the task's rank, which srun sets, without which JAX cannot tell"),
    ({**SLURM, "SLURM_NTASKS": "abc"}, "SLURM_NTASKS='abc' is not a number of tasks"),  # it trained alone, silently
    ({"TPU_WORKER_HOSTNAMES": "h0,h1", "TPU_WORKER_ID": "2"}, "TPU_WORKER_ID='2' is not in 0..1"),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1", "TPU_WORKER_ID": "1"}, None),
])
def test_a_cluster_environment_jax_cannot_place_this_process_in_is_named_by_its_variable(environ, says):
    from jaxgen.cluster_environment import problem

    found = problem(distributed.detect_cluster(environ), environ)
    assert (found is None) if says is None else found.startswith(says), found


def test_a_process_of_a_detected_run_is_named_by_its_rank_in_the_clusters_variables():
    from jaxgen.cluster_environment import place

    assert place("SLURM", {**SLURM, "SLURM_NTASKS": "2"}) == "SLURM_PROCID=0 of SLURM_NTASKS=2"
    assert place("Kubernetes indexed Job", {"JOB_COMPLETION_INDEX": "3"}) == "JOB_COMPLETION_INDEX=3"
    assert place("JAX cluster detection", SLURM) is None and place(None, {}) is None


def test_when_jax_distributed_is_initialised():
    timeouts = {"initialization_timeout": 300, "heartbeat_timeout_seconds": 30}
    assert distributed.initialize_kwargs(DistributedSettings(), {}) is None
    assert distributed.initialize_kwargs(DistributedSettings(), {**SLURM, "SLURM_NTASKS": "2"}) == timeouts
    assert distributed.initialize_kwargs(DistributedSettings(cluster="none"), {**SLURM, "SLURM_NTASKS": "2"}) is None
    assert distributed.initialize_kwargs(DistributedSettings(cluster="jax"), {}) == timeouts
    assert distributed.initialize_kwargs(settings_from({}, EXPLICIT_ENV), {}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3, **timeouts}


def test_a_single_process_needs_no_set_up():
    distributed.initialize(DistributedSettings())
    assert not jax.distributed.is_initialized()
    assert distributed.exit_status(3) == 3


def test_running_out_of_data_names_the_process_and_step():
    batches = iter([{"x": 1}, {"x": 2}])
    assert [next_in_lockstep(batches, step)["x"] for step in (1, 2)] == [1, 2]
    with pytest.raises(DataExhausted, match=r"ran out on process 0 before step 3 \(1 processes\); .* train.steps <= 2"):
        next_in_lockstep(batches, 3)


def test_a_process_that_cannot_read_its_data_reports_its_own_error():
    def failing():
        raise DataError("shard 3 holds no documents")
        yield

    with pytest.raises(DataError, match="shard 3 holds no documents"):
        next_in_lockstep(failing(), 1)



def test_cli_rejects_a_coordinator_address_without_port(tmp_path):
    result = jaxgen_cli("train", "--run-dir", str(tmp_path / "r"), "--coordinator-address", "localhost",
                        "--num-processes", "2", "--process-id", "0")
    assert result.returncode == 2
    assert "coordinator address 'localhost' must be HOST:PORT" in result.stderr


def test_missing_peers_end_in_a_clear_error_not_a_hang(tmp_path):
    with socket.socket() as s:  # a port where no coordinator will ever listen
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    result = jaxgen_cli("train", "--run-dir", str(tmp_path / "r"), "--coordinator-address", address,
                        "--num-processes", "2", "--process-id", "1", "--init-timeout", "2")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"no coordinator answered at {address} within 2s" in result.stderr


def refused_process_0(run_dir, port: int, processes: int, init_timeout: int) -> tuple[str, str]:
    """`jaxgen train` as process 0 of `processes` on 127.0.0.1:`port`, no other process started, which must fail
    with status 2: (its last line, all it wrote to stderr)."""
    result = jaxgen_cli("train", "--run-dir", str(run_dir), "--coordinator-address", f"127.0.0.1:{port}",
                        "--num-processes", str(processes), "--process-id", "0", "--init-timeout", str(init_timeout))
    assert result.returncode == 2, result.stderr[-2000:]
    return result.stderr.splitlines()[-1], result.stderr


def test_a_process_0_whose_peers_never_join_ends_with_one_line_before_jax_aborts_it(tmp_path):
    """Two processes started with --num-processes 3 (or a node that never came up): every one waited out the
    join timeout, then JAX aborted it from C++ (RegisterTask: a stack dump, exit 134, no word of why)."""
    port = free_port()
    line, stderr = refused_process_0(tmp_path / "r", port, processes=3, init_timeout=4)
    assert line == (f"jaxgen: error: not every process of the run joined via 127.0.0.1:{port} within 4 s "
                    "(--init-timeout; this is process 0 of 3): start all 3, or give --num-processes the number "
                    "started, or a longer --init-timeout where hosts start slowly")
    assert "Check failure" not in stderr and not (tmp_path / "r").exists()
    assert [distributed.join_watch_s(t) for t in (300, 10, 4, 0.1)] == [298, 9, 3.6, 0.5]


def test_ctrl_c_while_waiting_for_the_others_to_join_stops_at_once(tmp_path):
    """JAX waits for the others in C++, where Python's signal handler cannot run: Ctrl-C did nothing until the
    join timeout (300 s by default). jaxgen.interrupts' watcher thread acts on it at once."""
    port = free_port()
    process = start(["train", "--run-dir", str(tmp_path / "r"), "--coordinator-address", f"127.0.0.1:{port}",
                     "--num-processes", "2", "--process-id", "0", "--init-timeout", "60"])
    started = time.monotonic()
    stderr = interrupt_when(process, "joining a multi-process run", after_s=2.0)
    assert process.returncode == 130, stderr[-2000:]
    assert one_final_line(stderr) == "jaxgen: interrupted; run the same command again to continue"
    assert time.monotonic() - started < 40  # the watchdog's own line would come at 58 s


FORKS_AND_IS_SIGNALLED = """
import os, signal, sys, time
from jaxgen.interrupts import end_cleanly_on_ctrl_c
end_cleanly_on_ctrl_c()
child = os.fork()
if child == 0:
    os.kill(os.getpid(), signal.SIGTERM)  # the child leaves with its own line
    time.sleep(10)
    os._exit(0)
os.waitpid(child, 0)
time.sleep(1)  # time for the parent's signal watcher to act on anything the child wrote to it
print("the parent goes on")
"""


def test_a_forked_childs_signal_does_not_end_the_parent():
    """The child of a fork keeps the interpreter's wakeup descriptor, not the thread that reads it: without care,
    its signals reach the parent's watcher, which ends the parent."""
    result = subprocess.run([sys.executable, "-c", FORKS_AND_IS_SIGNALLED], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert (result.returncode, result.stdout) == (0, "the parent goes on\n"), result.stderr
    assert result.stderr == "jaxgen: stopped by SIGTERM\n"


def listening(reuse_port: bool = False) -> socket.socket:
    """A socket listening on a free port of every interface (with SO_REUSEPORT, as JAX's coordinator binds)."""
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    server.bind(("::", 0))
    server.listen()
    return server


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
def test_a_listening_port_is_in_use_and_one_a_finished_run_left_in_time_wait_is_not(reuse_port):
    server = listening(reuse_port)
    port = server.getsockname()[1]
    assert distributed.port_in_use(port)
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end of the connection waits in TIME_WAIT on `port`
    client.close()
    server.close()
    assert not distributed.port_in_use(port)  # a requeued run given the same port may take it at once


def test_a_second_run_on_a_busy_coordinator_port_is_refused_before_it_starts(tmp_path):
    """A second run's coordinator started beside the first's (JAX binds with SO_REUSEPORT); the first run's
    process 1 then joined the wrong one and the first run died with a C++ stack dump."""
    with listening(reuse_port=True) as server:
        port = server.getsockname()[1]
        assert refused_process_0(tmp_path / "r", port, processes=2, init_timeout=5)[0] == (
            f"jaxgen: error: coordinator port {port} is already in use on this machine (another run's coordinator, "
            "or another program); a second coordinator there would let processes join the wrong run. Give a free "
            "port in --coordinator-address (JAXGEN_COORDINATOR_ADDRESS)")
        launched = jaxgen_cli("launch", "local", "--port", str(port), "--", "train", "--run-dir", str(tmp_path / "l"))
        assert launched.returncode == 2 and "[0]" not in launched.stderr + launched.stdout
        assert launched.stderr.startswith(f"jaxgen: error: coordinator port {port} is already in use")
    assert not (tmp_path / "r").exists() and not (tmp_path / "l").exists()
    result = jaxgen_cli("launch", "local", "--port", "99999", "--", "train")
    assert result.stderr == "jaxgen: error: argument --port: 99999 is not a TCP port; give 1 to 65535 (see `jaxgen " \
                            "launch local --help`)\n"


def test_run_identity_is_the_command_its_run_directory_and_the_process_count():
    assert run_identity(["train", "--config", "c.yaml", "--run-dir", "runs/a/", "x=1"], 2) == {
        "command": "train", "run_dir": "runs/a", "processes": 2}
    assert run_identity(["eval", "--run-dir=./runs/a"], 4) == {"command": "eval", "run_dir": "runs/a", "processes": 4}
    assert run_identity([], 2) == {"command": None, "run_dir": None, "processes": 2}


def test_a_beacon_says_which_run_it_coordinates_and_when_every_process_has_joined():
    mine = run_identity(["train", "--run-dir", "a"], 2)
    with listening() as server:  # where a coordinator would listen; the beacon takes the same port number in UDP
        port = server.getsockname()[1]
        beacon = start_beacon(port, mine)
        address = f"127.0.0.1:{port}"
        answer = ask(address)
        assert answer["identity"] == mine and answer["joined"] is False and answer["pid"] == os.getpid()
        assert refusal(answer, mine, address) is None  # one of its own processes joins
        assert refusal(answer, {**mine, "run_dir": "b"}, address).startswith(
            f"the coordinator at {address} serves another run (run_dir 'a' there, 'b' here; process 0 is pid ")
        beacon.all_joined()
        assert refusal(ask(address), mine, address).startswith(
            f"the coordinator at {address} serves a run whose 2 processes have all joined (process 0 is pid ")

        # The process of another run is refused before it connects: it would have aborted every process of this one.
        result = jaxgen_cli("train", "--run-dir", "a", "--coordinator-address", address, "--num-processes", "2",
                            "--process-id", "1", "--init-timeout", "5")
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.splitlines()[-1].endswith(
            "joining would stop that run; give this run its own --coordinator-address (a free port)")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(("127.0.0.1", 0))
        assert ask(f"127.0.0.1:{unused.getsockname()[1]}") is None  # no beacon: join as without one


def test_a_second_process_0_on_a_port_whose_coordinator_is_starting_is_refused():
    """Two launches started at once with one --port: both found the TCP port free, and the process 0 that lost the
    beacon's UDP port went on ("cannot be told apart"); processes of the two runs then joined each other and JAX
    aborted one process 0 with a C++ stack dump."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert start_beacon(port, run_identity(["train", "--run-dir", "b"], 2)) is not None  # the other run, starting
    result = jaxgen_cli("train", "--run-dir", "a", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes",
                        "2", "--process-id", "0", "--init-timeout", "5")
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.splitlines()[-1]
    assert line.startswith(f"jaxgen: error: coordinator port {port} was taken a moment ago by the process 0 of "
                           f"another run (pid {os.getpid()} on host ")
    assert line.endswith("two coordinators on it would let processes join the wrong run. Give each run its own port "
                         "(--port, or --coordinator-address)")


def test_a_process_that_stops_before_joining_tells_the_beacon_of_its_own_run_only():
    """Process 1 without its config file on its host: process 0 waited out its join timeout, then JAX aborted it
    with a C++ stack dump. The beacon now hands process 0 the line of a process of its own run still to join."""
    mine, reports = run_identity(["train", "--run-dir", "a"], 2), []
    with listening() as server:
        port = server.getsockname()[1]
        beacon = start_beacon(port, mine, on_stopped=reports.append)
        address = f"127.0.0.1:{port}"
        report = {"identity": mine, "process": 1, "line": "error: config file 'c.yaml' does not exist", "status": 2}
        assert report_stop(address, report)
        deadline = time.monotonic() + 10
        while not reports and time.monotonic() < deadline:  # noted first, then handed on by the beacon's thread
            time.sleep(0.01)
        assert reports == [report]
        assert report_stop(address, {**report, "identity": {**mine, "run_dir": "b"}})  # another run's: noted only
        beacon.all_joined()
        assert report_stop(address, report)  # once all have joined, JAX's heartbeats see a process die
        time.sleep(0.2)
        assert reports == [report]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(("127.0.0.1", 0))
        started = time.monotonic()
        assert not report_stop(f"127.0.0.1:{unused.getsockname()[1]}", report, within_s=1)  # no beacon: given up
        assert time.monotonic() - started < 3


def test_a_host_without_ipv6_gets_a_beacon_on_ipv4(monkeypatch):
    real_socket = socket.socket

    def without_ipv6(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    with real_socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(socket, "socket", without_ipv6)
    assert start_beacon(port, {"command": "train"}) is not None
    assert ask(f"127.0.0.1:{port}")["identity"] == {"command": "train"}


def test_the_exit_clean_up_that_cancels_the_peer_watch_survives_jax_moving_its_private_one(monkeypatch):
    from jax._src import api

    from jaxgen import peer_stops

    assert peer_stops.jax_clean_up() is api.clean_up
    monkeypatch.delattr(api, "clean_up")
    assert peer_stops.jax_clean_up() is jax.distributed.shutdown


def test_a_peer_killed_outright_reads_as_a_lost_peer_not_as_this_processs_unexpected_error():
    """kill -9 of process 1 mid-run ended process 0 with 'unexpected JaxRuntimeError: UNKNOWN: Gloo all-reduce
    failed: ... Connection reset by peer': Gloo words a killed peer otherwise than one that exited."""
    from jaxgen.errors import describe, lost_a_peer

    killed = RuntimeError("UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read "
                          "error [127.0.0.1]:63621: Connection reset by peer")
    assert lost_a_peer(str(killed))
    assert describe(killed)[0].startswith("error: another process of the run stopped, breaking this one's")
    exited = "UNKNOWN: Gloo AllReduce failed: [external/gloo/gloo/transport/tcp/pair.cc:547] Connection closed by peer"
    assert lost_a_peer(exited) and not lost_a_peer("UNKNOWN: gloo.cc: unrecognised option")


def test_only_a_processs_own_failure_is_posted_for_the_others(monkeypatch):
    """`eval --run-dir` a run one host cannot see: process 0 posted the line it had from process 1 as its own
    failure, and where that post came first, process 1 printed `process 0 stopped: process 1 stopped: ...` in
    place of its own line (seen in CI). Nor is a check every process fails alike posted by any."""
    from jaxgen import peer_stops
    from jaxgen.errors import ConfigError, PeerStopped, Preempted, on_every_process

    posted = []
    monkeypatch.setattr(distributed, "is_multiprocess", lambda: True)
    monkeypatch.setattr(peer_stops, "announce", lambda process, line, status: posted.append(line))
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    relayed = PeerStopped(1, "run directory '/shared/run' does not exist", 2)
    assert (str(relayed), relayed.exit_status) == ("process 1 stopped: run directory '/shared/run' does not exist", 2)
    for err in (relayed, on_every_process(ConfigError("--run-dir '/r' is not shared")), Preempted(3),
                RuntimeError("Gloo AllReduce failed: Connection closed by peer")):
        distributed.tell_peers_of_stop(err, f"error: {err}", 2)
    assert posted == []
    distributed.tell_peers_of_stop(DataError("/scratch/x: no space left on device"), "error: own", 1)
    assert posted == ["error: own"]
