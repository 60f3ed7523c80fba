"""The launchers: `jaxgen launch local` as a process supervisor, and the cluster scripts' validity."""

import io
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from jaxgen.launch import exit_code, launch_local, process_env

from conftest import REPO

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
        ready = 0
        for line in proc.stdout:
            ready += line.endswith("ready\n")
            if ready == 2:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 75
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_killed_by_a_signal_reads_as_128_plus_the_signal():
    assert exit_code(-signal.SIGKILL) == 137
    assert exit_code(75) == 75


def test_launch_without_a_command_explains_itself():
    result = subprocess.run([sys.executable, "-m", "jaxgen", "launch", "local", "--processes", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "give the command after --" in result.stderr


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
