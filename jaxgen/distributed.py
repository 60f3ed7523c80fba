"""One JAX process per host (or per GPU), joined by `jax.distributed`.

jaxgen never schedules processes: the cluster's engine (SLURM's `srun`, a
Kubernetes indexed Job or JobSet, `gcloud ... tpu-vm ssh --worker=all`,
`jaxgen launch local`) starts one process per host and each calls `initialize`
before JAX touches a device. Where the coordinator is and how many processes
there are comes from explicit settings (flags or JAXGEN_* variables) or from
JAX's own detection of the cluster; a single process needs nothing at all.

Before joining, a process asks process 0 which run it coordinates
(`jaxgen.coordinator_beacon`), so that a process of another run never joins
this one. Also here: how a failing process leaves (`exit_status`: within moments, so its
peers fail fast instead of hanging in a collective), process 0's bytes shared with
the others (`bytes_from_process_0`), every process's bytes shared with all (`from_every_process`) and
checks that stop every process together when one fails them (`stop_together`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, get_args

import numpy as np

from jaxgen import cluster_environment, peer_stops
from jaxgen.coordinator_beacon import ask, holder, refusal, report_stop, run_identity, start_beacon
from jaxgen.errors import ConfigError, JaxgenError, PeerStopped, Preempted, describe_os_error, lost_a_peer
from jaxgen.interrupts import claim_last_word

log = logging.getLogger("jaxgen")

Cluster = Literal["auto", "jax", "none"]
CLUSTERS: tuple[str, ...] = get_args(Cluster)

# Setting -> the environment variable that supplies it when no flag does.
ENV = {
    "coordinator_address": "JAXGEN_COORDINATOR_ADDRESS",
    "num_processes": "JAXGEN_NUM_PROCESSES",
    "process_id": "JAXGEN_PROCESS_ID",
    "cluster": "JAXGEN_CLUSTER",
    "init_timeout_s": "JAXGEN_INIT_TIMEOUT",
    "heartbeat_timeout_s": "JAXGEN_HEARTBEAT_TIMEOUT",
}


class DistributedError(ConfigError):
    """Multi-process settings that cannot work; the message names the bad value."""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    # HOST:PORT where process 0 serves the coordination service; every process gives the same.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # auto: explicit settings if given, else JAX's detection when the environment shows a
    # multi-process job (SLURM, Open MPI, Kubernetes indexed Job, multi-host TPU on GKE);
    # jax: always let JAX detect (Cloud TPU VMs, found through the metadata server); none: never.
    cluster: Cluster = "auto"
    # How long processes wait for each other to start (pods and nodes come up slowly).
    init_timeout_s: int = 300
    # A process silent this long is declared dead and every other process stops. This is
    # what ends a run whose peer died: collectives waiting for it do not fail by themselves.
    # Heartbeats come from a native thread, so busy hosts still send them (JAX's default: 100 s).
    heartbeat_timeout_s: int = 30

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator_address, self.num_processes, self.process_id))


def settings_from(flags: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> DistributedSettings:
    """Flags (None = not given) win over JAXGEN_* environment variables, which win over defaults."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(DistributedSettings):
        value = flags.get(field.name)
        if value is None and ENV[field.name] in environ:
            kind = int if field.type.startswith("int") else str  # annotations are strings here
            value = _parse_env(ENV[field.name], environ[ENV[field.name]], kind)
        if value is not None:
            values[field.name] = value
    settings = DistributedSettings(**values)
    validate(settings)
    return settings


def _parse_env(name: str, raw: str, kind: type) -> Any:
    try:
        return kind(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def validate(s: DistributedSettings) -> None:
    if s.cluster not in CLUSTERS:
        raise DistributedError(f"cluster {s.cluster!r} is not one of {', '.join(CLUSTERS)}")
    for name, flag in (("init_timeout_s", "--init-timeout"), ("heartbeat_timeout_s", "--heartbeat-timeout")):
        if getattr(s, name) <= 0:
            raise DistributedError(f"{flag} / {ENV[name]} = {getattr(s, name)} must be a positive number of seconds")
    if not s.explicit:
        return
    if s.cluster == "none":
        raise DistributedError("cluster 'none' contradicts the coordinator address / process settings given")
    missing = [name for name in ("coordinator_address", "num_processes", "process_id") if getattr(s, name) is None]
    if missing:
        raise DistributedError(
            f"explicit multi-process settings need all of coordinator address, number of processes and "
            f"process id; missing {', '.join(missing)} (flags --coordinator-address/--num-processes/"
            f"--process-id or {', '.join(ENV[m] for m in missing)})"
        )
    check_address(s.coordinator_address)
    if s.num_processes < 1:
        raise DistributedError(f"number of processes {s.num_processes} must be at least 1")
    if not 0 <= s.process_id < s.num_processes:
        raise DistributedError(
            f"process id {s.process_id} is out of range for {s.num_processes} processes (valid: 0..{s.num_processes - 1})"
        )


def check_address(address: str) -> None:
    """HOST:PORT with a numeric port; IPv6 hosts in brackets ([::1]:1234)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise DistributedError(f"coordinator address {address!r} must be HOST:PORT, e.g. 10.0.0.1:1234")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise DistributedError(f"coordinator address {address!r}: write an IPv6 host in brackets, e.g. [::1]:1234")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"coordinator address {address!r} has port {port!r}; it must be 1..65535")


def detect_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
    """Which multi-process cluster engine launched this process, if any.

    Only the markers of a job with several processes count: a single-task SLURM
    job or a lone pod trains alone without contacting anything.
    """

    def count(name: str) -> int:
        value = environ.get(name, "")
        return int(value) if value.isdigit() else 0

    if "SLURM_JOB_ID" in environ and "SLURM_STEP_NODELIST" in environ and count("SLURM_NTASKS") > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in environ and count("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    if "KUBERNETES_SERVICE_HOST" in environ and "JOB_COMPLETION_INDEX" in environ:
        return "Kubernetes indexed Job"
    hosts = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES") or ""
    if "," in hosts:
        return "Cloud TPU on GKE"
    return None


def initialize_kwargs(s: DistributedSettings, environ: Mapping[str, str] = os.environ) -> dict | None:
    """Arguments for `jax.distributed.initialize`, or None when this process runs alone."""
    timeouts = {"initialization_timeout": s.init_timeout_s, "heartbeat_timeout_seconds": s.heartbeat_timeout_s}
    if s.explicit:
        return {"coordinator_address": s.coordinator_address, "num_processes": s.num_processes,
                "process_id": s.process_id, **timeouts}
    if s.cluster == "jax" or (s.cluster == "auto" and detect_cluster(environ)):
        return timeouts
    return None


def another_process_does_it(environ: Mapping[str, str] = os.environ) -> str | None:
    """Where a command that runs in one process (`sample`, `export`) was started on every process of a job (a
    scheduler's `srun`, JAXGEN_* set by hand) and this is not process 0, the variable saying so, else None: each
    process wrote the same export into one folder, and the one that lost the race failed the job."""
    count, index = environ.get(ENV["num_processes"], ""), environ.get(ENV["process_id"], "")
    if count.isdigit() and int(count) > 1 and index.isdigit():
        return None if int(index) == 0 else f"{ENV['process_id']}={index} of {ENV['num_processes']}={count}"
    cluster = detect_cluster(environ)
    value = environ.get(cluster_environment.RANK_VARIABLES.get(cluster or "", ""), "")
    return cluster_environment.place(cluster, environ) if value.isdigit() and int(value) != 0 else None


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Block until process 0's coordinator accepts connections, or raise a clear error.

    JAX's own client aborts the whole process (no Python exception) when it cannot
    register in time; checking first turns the commonest mistakes (a wrong address
    or port, process 0 not started) into a message naming the address.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"no coordinator answered at {address} within {timeout_s:g}s ({err.strerror or err}). Check that "
                    f"process 0 is running, that every process was given the same coordinator address, and that "
                    f"its port is reachable from here"
                ) from None
            time.sleep(0.5)


def port_in_use(port: int) -> bool:
    """Whether something on this machine listens on TCP `port` (any interface), where a coordinator would.

    JAX's coordinator binds every interface with SO_REUSEPORT, so a second run's process 0 given a busy
    port starts a second coordinator beside the first, and processes of either run may join the wrong
    one, which kills the run that was there. A bind without SO_REUSEPORT fails on a listening port.
    """
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # Not fooled by a port a run that just ended still holds in TIME_WAIT: only a listener counts.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # both stacks, as gRPC binds
                probe.bind((host, port))
            return False
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            # Otherwise IPv6 is off on this machine (try IPv4), or the probe itself cannot bind: let JAX try.
    return False


def refuse_busy_port(port: int, named_by: str) -> None:
    if port_in_use(port):
        raise DistributedError(f"coordinator port {port} is already in use on this machine (another run's "
                               f"coordinator, or another program); a second coordinator there would let processes "
                               f"join the wrong run. Give a free port in {named_by}")


def initialize(settings: DistributedSettings) -> None:
    """Join the other processes of this run; must run before any JAX computation."""
    if not settings.explicit and settings.cluster != "none":
        cluster = detect_cluster()
        if why := cluster_environment.problem(cluster, os.environ):
            raise DistributedError(f"could not join the multi-process run via {cluster or 'SLURM'}: {why}")
    kwargs = initialize_kwargs(settings)
    if kwargs is None:
        return
    beacon, identity = None, run_identity(sys.argv[1:], settings.num_processes or 0)
    if settings.explicit and settings.process_id == 0:
        port = int(settings.coordinator_address.rpartition(":")[2])
        refuse_busy_port(port, f"--coordinator-address ({ENV['coordinator_address']})")
        beacon = start_beacon(port, identity, on_stopped=stop_with_peer)
        if beacon is None and (other := ask(f"127.0.0.1:{port}")) is not None:  # two runs started on one port at once
            raise DistributedError(f"coordinator port {port} was taken a moment ago by the process 0 of another run "
                                   f"({holder(other)}); two coordinators on it would let processes join the wrong "
                                   f"run. Give each run its own port (--port, or --coordinator-address)")
    import jax

    where = kwargs.get("coordinator_address") or f"{detect_cluster() or 'JAX cluster detection'}"
    log.info("joining a multi-process run via %s (waiting up to %ds for the others)", where, settings.init_timeout_s)
    if settings.explicit and settings.process_id != 0:
        wait_for_coordinator(settings.coordinator_address, settings.init_timeout_s)
        answer = ask(settings.coordinator_address)
        stranger = answer and refusal(answer, identity, settings.coordinator_address)
        if stranger:
            raise DistributedError(stranger)
    returned = threading.Event()
    watchdog = threading.Timer(join_watch_s(settings.init_timeout_s), stop_unjoined, (settings, where, returned))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as err:  # e.g. called twice, or after JAX already ran a computation
        if "coordinator_address should be defined" in str(err):  # JAX's detection found no run in this environment
            raise DistributedError(f"could not join the multi-process run via {where}: JAX found no coordinator "
                                   "address in this environment; give --coordinator-address, --num-processes and "
                                   "--process-id (or their JAXGEN_* variables) instead") from None
        raise DistributedError(f"could not join the multi-process run via {where}: {err}") from None
    finally:
        returned.set()
        watchdog.cancel()
    log.info("process %d of %d: %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    if jax.process_count() > 1:
        peer_stops.watch(jax.process_index())
    if beacon is not None:  # every process has joined: any other that asks is a stranger
        beacon.all_joined()


def join_watch_s(init_timeout_s: float) -> float:
    """When to give up on the others joining: just before JAX's own timeout, which aborts the process from C++
    with a stack dump and no word of why."""
    return max(init_timeout_s - min(2.0, 0.1 * init_timeout_s), 0.5)


def stop_unjoined(settings: DistributedSettings, where: str, returned: threading.Event) -> None:
    """Run in a timer thread: unless `jax.distributed.initialize` has `returned`, end this process with one line."""
    if returned.is_set():
        return
    count = settings.num_processes
    this = (f"process {settings.process_id} of {count}" if settings.process_id is not None and count
            else cluster_environment.place(detect_cluster(), os.environ))
    start = (f"start all {count}, or give --num-processes the number started" if count
             else "start every process, each with a rank of its own")
    print(f"jaxgen: error: not every process of the run joined via {where} within {settings.init_timeout_s} s "
          f"(--init-timeout{f'; this is {this}' if this else ''}): {start}, or a longer --init-timeout where hosts "
          "start slowly", file=sys.stderr, flush=True)
    os._exit(DistributedError.exit_status)


def stop_with_peer(report: dict) -> None:
    """Process 0, still waiting for the others to join, ends with the line of one that stopped before joining."""
    line = str(report.get("line", "")).removeprefix("error: ")
    print(f"jaxgen: error: process {report.get('process')} stopped before joining the run: {line}", file=sys.stderr,
          flush=True)
    status = report.get("status")
    os._exit(status if isinstance(status, int) and 0 < status < 256 else 1)


def tell_process_0_of_stop(flags: Mapping[str, Any], line: str, status: int) -> None:
    """Where this process of a multi-process run (explicit settings: `flags`, else JAXGEN_* variables) stops
    before it joins, tell process 0's beacon its line, so that process 0 stops with it rather than waiting out
    its join timeout."""
    try:
        settings = settings_from(flags)
    except ConfigError:
        return
    jax_module = sys.modules.get("jax")  # not imported: not joined (and no reason to import it now)
    joined = jax_module is not None and jax_module.distributed.is_initialized()
    if settings.explicit and settings.process_id not in (None, 0) and not joined:
        report_stop(settings.coordinator_address, {"identity": run_identity(sys.argv[1:], settings.num_processes),
                                                   "process": settings.process_id, "line": line, "status": status})


def is_multiprocess() -> bool:
    jax = sys.modules.get("jax")  # not imported: not joined (and no reason to import it now)
    return jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1


# How long a process whose collective broke waits for the line of the process that stopped (peer_stops).
PEER_LINE_WAIT_S = 3.0


def before_last_line(err: BaseException) -> None:
    """Before a failing process prints its line: where the error is another process's stop breaking a
    collective, give that process's posted line (`jaxgen.peer_stops`) a moment to end this one; then make this
    thread the one that prints the last line."""
    if is_multiprocess() and lost_a_peer(str(err)):
        time.sleep(PEER_LINE_WAIT_S)  # the watcher thread ends the process with the peer's line, if one comes
    claim_last_word()


def tell_peers_of_stop(err: BaseException, line: str, status: int) -> None:
    """A process of a joined run that stops on its own error posts its line, with which the others stop; not
    one every process raised alike (`JaxgenError.every_process_knows`)."""
    if (is_multiprocess() and not isinstance(err, Preempted) and not getattr(err, "every_process_knows", False)
            and not lost_a_peer(str(err))):
        import jax

        peer_stops.announce(jax.process_index(), line, status)


def reports_results() -> bool:
    """Whether this process prints a command's results: process 0 alone (every process computes them, and a
    cluster collects every process's output into one log)."""
    import jax

    return jax.process_index() == 0


PEERS_REPORT_S = 2.0


def exit_status(code: int) -> int:
    """Return `code`; but a multi-process run that fails leaves within moments, without JAX's shutdown barrier.

    A normal exit waits in that barrier for every peer (up to 5 minutes), while
    a peer may wait in a collective for this process. Leaving stops this
    process's heartbeats, so the peers are stopped within the heartbeat timeout,
    sooner where a collective notices the closed connection.
    """
    if code == 0 or not is_multiprocess():
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    # Most failures before training (a config or data mistake) are met by every process within moments of
    # each other: a short wait lets each report its own one line, where leaving first would have JAX's
    # coordination service abort the others mid-way, with a C++ stack dump instead of the error. A process
    # that posted its line for the others (jaxgen.peer_stops) leaves at once, unless it hosts that service.
    import jax

    if not (peer_stops.announced() and jax.process_index() != 0):  # else told: process 0 must outlive it
        time.sleep(PEERS_REPORT_S)
    os._exit(code)


def bytes_from_process_0(payload: bytes | None) -> bytes:
    """Process 0's `payload` on every process (what the others pass is ignored)."""
    import jax

    if jax.process_count() == 1:
        return payload
    from jax.experimental import multihost_utils

    is_0 = jax.process_index() == 0
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload or b"") if is_0 else 0)))
    if size == 0:
        return b""
    buffer = np.frombuffer(payload, np.uint8) if is_0 else np.zeros(size, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes()


def from_every_process(payload: bytes) -> list[bytes]:
    """Every process's `payload`, by process index, on every process: so that all of them stop together, with
    the same words, when one cannot go on."""
    import jax

    if jax.process_count() == 1:
        return [payload]
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(payload)], np.int32))).ravel()
    padded = np.zeros(max(int(sizes.max()), 1), np.uint8)
    padded[:len(payload)] = np.frombuffer(payload, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [row[:size].tobytes() for row, size in zip(gathered, sizes)]


Checked = TypeVar("Checked")


def stop_together(check: Callable[[], Checked]) -> Checked:
    """`check()`, run on every process; when it raises a jaxgen error or an OSError on any, every process raises one.
    A process that fails alone leaves the others waiting in their next collective until JAX's coordination
    service aborts them with a C++ stack dump and no word of why: a run directory only some hosts can see
    (`eval --run-dir /tmp/run`) read so. The others now say which process failed, and its line."""
    if not is_multiprocess():
        return check()
    result, failure, report = None, None, b""
    try:
        result = check()
    except JaxgenError as err:
        failure, report = err, json.dumps([err.exit_status, str(err)]).encode()
    except OSError as err:  # a file it may not read, say
        failure, report = err, json.dumps([1, describe_os_error(err)]).encode()
    failed = [(index, json.loads(raw)) for index, raw in enumerate(from_every_process(report)) if raw]
    if failure is not None:
        raise failure
    if failed:
        index, (status, message) = failed[0]
        raise PeerStopped(index, message, status)
    return result
