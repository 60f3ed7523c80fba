"""`jaxgen` re-executes itself once with tcmalloc preloaded where the system has it (jaxgen/allocator.py):
the decision as a pure function, and the real command seen from outside through /proc."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from jaxgen.allocator import QUIET, find_tcmalloc, loaded_allocator, preloading_environment
from jaxgen.errors import ConfigError

from helpers import REPO, cli_env

LIBRARY = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def test_auto_preloads_the_library_found_and_keeps_the_rest_of_the_environment():
    env = preloading_environment({"HOME": "/h", "LD_PRELOAD": "/opt/libhook.so"}, LIBRARY, "linux")
    assert env["LD_PRELOAD"] == f"{LIBRARY} /opt/libhook.so" and env["HOME"] == "/h"
    assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == QUIET["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]
    assert preloading_environment({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"}, LIBRARY, "linux")[
        "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"  # the user's own setting wins
    assert preloading_environment({"JAXGEN_ALLOCATOR": "tcmalloc"}, LIBRARY, "linux")["LD_PRELOAD"] == LIBRARY


@pytest.mark.parametrize("env, library, platform", [
    ({"JAXGEN_ALLOCATOR": "system"}, LIBRARY, "linux"),  # asked not to
    ({"LD_PRELOAD": LIBRARY}, LIBRARY, "linux"),  # already re-executed, or preloaded by hand
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, LIBRARY, "linux"),  # the user's own allocator
    ({}, None, "linux"),  # not installed
    ({}, LIBRARY, "darwin"),
])
def test_the_process_keeps_its_allocator(env, library, platform):
    assert preloading_environment(env, library, platform) is None


def test_a_bad_choice_or_a_required_library_that_is_missing_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"JAXGEN_ALLOCATOR='jemalloc' is not one of auto, tcmalloc, system"):
        preloading_environment({"JAXGEN_ALLOCATOR": "jemalloc"}, LIBRARY, "linux")
    with pytest.raises(ConfigError, match=r"JAXGEN_ALLOCATOR=tcmalloc, but no tcmalloc library was found.*"
                                          r"apt-get install libtcmalloc-minimal4"):
        preloading_environment({"JAXGEN_ALLOCATOR": "tcmalloc"}, None, "linux")


def test_the_library_is_looked_for_in_order(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for directory in (first, second):
        directory.mkdir()
    (second / "libtcmalloc.so.4").write_bytes(b"")
    assert find_tcmalloc((str(first), str(second))) == str(second / "libtcmalloc.so.4")
    (first / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert find_tcmalloc((str(first), str(second))) == str(first / "libtcmalloc_minimal.so.4")
    assert find_tcmalloc((str(tmp_path / "nowhere"),)) is None


@pytest.mark.parametrize("command", [["-m", "jaxgen", "train"], ["benchmarks/dit_step.py", "--config", "digits"]])
def test_a_bad_jaxgen_allocator_stops_the_command_with_one_line(command):
    result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                            env={**cli_env(), "JAXGEN_ALLOCATOR": "glibc"}, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "jaxgen: error: JAXGEN_ALLOCATOR='glibc' is not one of auto, tcmalloc, system\n"


def libraries_once_jax_is_loaded(allocator: str, run_dir: pathlib.Path) -> str:
    """/proc/PID/maps of a real `jaxgen train`, read once JAX's own library is mapped; then the run is killed."""
    process = subprocess.Popen([sys.executable, "-m", "jaxgen", "train", "--run-dir", str(run_dir)], cwd=REPO,
                               env={**cli_env(), "JAXGEN_ALLOCATOR": allocator}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            maps = pathlib.Path(f"/proc/{process.pid}/maps").read_text()
            if "jaxlib" in maps:  # the same process id throughout: the re-execution keeps it
                return maps
            assert process.poll() is None, "jaxgen train ended before JAX was loaded"
            time.sleep(0.05)
        raise AssertionError("JAX was not loaded within two minutes")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.skipif(find_tcmalloc() is None or sys.platform != "linux",
                    reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_jaxgen_runs_on_tcmalloc_unless_told_to_keep_the_system_allocator(tmp_path):
    assert find_tcmalloc() in libraries_once_jax_is_loaded("auto", tmp_path / "auto")
    assert "tcmalloc" not in libraries_once_jax_is_loaded("system", tmp_path / "system")


SCRIPT_THAT_WAITS_FOR_CTRL_C = """
import os, sys, time
from jaxgen.allocator import HELD, loaded_allocator, use_tcmalloc
use_tcmalloc()
try:  # the Ctrl-C may come as soon as the line is out
    print(loaded_allocator(), HELD in os.environ, flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.skipif(find_tcmalloc() is None or sys.platform != "linux",
                    reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_a_script_that_re_executes_itself_still_stops_on_ctrl_c(tmp_path):
    """As the benchmarks do, with Python's own handler: Ctrl-C is blocked across the exec, and released after it."""
    script = tmp_path / "waits.py"
    script.write_text(SCRIPT_THAT_WAITS_FOR_CTRL_C)
    process = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env={**cli_env(), "JAXGEN_ALLOCATOR": "auto"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "tcmalloc False\n"  # re-executed, and the marker not passed on
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 130
    finally:
        process.kill()
        process.communicate()


def test_the_allocator_a_process_runs_on_is_read_from_its_mapped_libraries():
    line = "7f00-7f10 r-xp 00000000 fe:00 12 /usr/lib/x86_64-linux-gnu/{}\n"
    assert loaded_allocator(line.format("libtcmalloc_minimal.so.4.5.10")) == "tcmalloc"
    assert loaded_allocator(line.format("libjemalloc.so.2")) == "jemalloc"
    assert loaded_allocator(line.format("libc.so.6")) == "system"
