"""Which run a coordinator serves, asked before joining it.

JAX's coordination service aborts every process of a run when a process whose id
it already has connects again: one process of another run given the same
coordinator address (a copied command, a port two jobs both chose) kills a run
that was training, and it loses everything since its last checkpoint. So process
0 answers, on its coordinator's port number over UDP (JAX holds the TCP port, and
no other port has to be free or opened), which run it coordinates and whether all
of its processes have joined; every other process asks before it connects, and
stops with one line where joining would break that run. Where no answer comes (a
firewall that drops UDP, no beacon because the UDP port was taken), a process
joins as it would without one.

A process that stops before it joins (its own config file missing on its host, a
bad flag) tells the beacon why (`report_stop`): process 0, waiting for it, would
otherwise wait out its whole join timeout and then be aborted by JAX with a C++
stack dump. The beacon hands the report of a process of its own run to
`on_stopped`, which ends process 0 with that process's line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("jaxgen")

QUESTION = b"jaxgen: which run do you coordinate?"
ANSWER_WAIT_S = 0.5  # per try; a beacon on a live process 0 answers within milliseconds
TRIES = 3
STOPPED = b"jaxgen: stopped before joining: "
NOTED = b"jaxgen: noted"
# How long a process that stopped before joining keeps telling process 0: long enough for processes started
# together (srun, launch local) to have their beacon up, short enough not to hold up a run that failed everywhere.
REPORT_S = 5.0


def run_identity(argv: list[str], processes: int) -> dict:
    """What every process of one run shares: the command, its --run-dir as given, and how many processes there are.

    Deliberately little of the command line: the processes of one run may be started with options written in
    another order or given through the environment, and must never be refused as strangers."""
    command = next((a for a in argv if not a.startswith("-")), None)
    run_dir = None
    for i, arg in enumerate(argv):
        if arg == "--run-dir" and i + 1 < len(argv):
            run_dir = argv[i + 1]
        elif arg.startswith("--run-dir="):
            run_dir = arg.partition("=")[2]
    return {"command": command, "run_dir": os.path.normpath(run_dir) if run_dir else None, "processes": processes}


def refusal(answer: dict, mine: dict, address: str) -> str | None:
    """Why this process (of run `mine`) must not join the coordinator at `address` that gave `answer`, or None."""
    theirs = answer.get("identity", {})
    who = f"process 0 is {holder(answer)}"
    advice = "joining would stop that run; give this run its own --coordinator-address (a free port)"
    if answer.get("joined"):
        return (f"the coordinator at {address} serves a run whose {theirs.get('processes')} processes have all "
                f"joined ({who}); {advice}")
    differing = [f"{key} {theirs.get(key)!r} there, {value!r} here" for key, value in mine.items()
                 if theirs.get(key) != value]
    if differing:
        return f"the coordinator at {address} serves another run ({'; '.join(differing)}; {who}); {advice}"
    return None


def holder(answer: dict) -> str:
    """The process 0 a beacon's `answer` comes from, in words."""
    return f"pid {answer.get('pid')} on host {answer.get('host')}, since {answer.get('since')}: {answer.get('command')}"


class Beacon:
    """Process 0's answer to QUESTION on UDP `port`, from a daemon thread, for as long as the process lives."""

    def __init__(self, sock: socket.socket, identity: dict, on_stopped: Callable[[dict], None] | None = None):
        self._sock = sock
        self._joined = False
        self._identity, self._on_stopped = identity, on_stopped
        self._facts = {"identity": identity, "host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                       "command": " ".join(["jaxgen", *sys.argv[1:]])[:200]}
        threading.Thread(target=self._serve, name="jaxgen coordinator beacon", daemon=True).start()

    def all_joined(self) -> None:
        self._joined = True

    def _serve(self) -> None:
        while True:
            try:
                question, sender = self._sock.recvfrom(4096)
                if question == QUESTION:
                    self._sock.sendto(json.dumps({**self._facts, "joined": self._joined}).encode(), sender)
                elif question.startswith(STOPPED):
                    self._sock.sendto(NOTED, sender)
                    self._stopped(question.removeprefix(STOPPED))
            except OSError:
                if self._sock.fileno() < 0:  # closed: nothing more to answer
                    return


    def _stopped(self, raw: bytes) -> None:
        """A process stopped before joining: the end of the run, if it is one of this run's still to join."""
        with contextlib.suppress(ValueError):
            report = json.loads(raw)
            if (isinstance(report, dict) and report.get("identity") == self._identity and not self._joined
                    and self._on_stopped is not None):
                self._on_stopped(report)


def start_beacon(port: int, identity: dict, on_stopped: Callable[[dict], None] | None = None) -> Beacon | None:
    """A beacon on UDP `port` of every interface (both IP versions where the host has them), or None where the
    port cannot be bound (another program holds it): the run goes on without one."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)  # fails where the host has no IPv6 at all
        except OSError:
            continue
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
        except OSError:
            sock.close()
            continue
        return Beacon(sock, identity, on_stopped)
    log.info("UDP port %d is taken: processes of another run given this coordinator address cannot be told apart "
             "from this run's before they join", port)
    return None


def ask(address: str) -> dict | None:
    """The answer of the beacon at coordinator `address` (HOST:PORT), or None where none comes."""
    host, _, port = address.rpartition(":")
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
    except (OSError, ValueError):
        return None
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(ANSWER_WAIT_S)
        for _ in range(TRIES):
            try:
                sock.sendto(QUESTION, where)
                answer = json.loads(sock.recvfrom(4096)[0])
            except (OSError, ValueError):
                continue
            return answer if isinstance(answer, dict) else None
    return None


def report_stop(address: str, report: dict, within_s: float | None = None) -> bool:
    """Tell the beacon at coordinator `address` that this process stopped before joining (`report`: its
    identity, process id, line and exit status), trying for `within_s` (default REPORT_S); whether it was noted."""
    host, _, port = address.rpartition(":")
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
    except (OSError, ValueError):
        return False
    deadline = time.monotonic() + (REPORT_S if within_s is None else within_s)
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(ANSWER_WAIT_S)
        while time.monotonic() < deadline:
            try:
                sock.sendto(STOPPED + json.dumps(report).encode(), where)
                if sock.recvfrom(64)[0] == NOTED:
                    return True
            except OSError:  # no beacon yet (refused, or no answer in time): process 0 may still be starting
                time.sleep(ANSWER_WAIT_S)
    return False
