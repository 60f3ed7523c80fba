"""Driving `jaxgen` from outside, as users and clusters do: subprocesses, signals, limits."""

from __future__ import annotations

import json
import os
import pathlib
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np

from jaxgen.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def cli_env(devices: int = 1) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def run_jaxgen(*args: str, devices: int = 1, timeout: int = 300, file_size_limit: int | None = None,
               crash: tuple[str, int] | None = None, cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
    """`python -m jaxgen ARGS` to completion.

    `file_size_limit` (bytes): bigger writes fail as on a full disk. `crash`:
    (mode, step) of tests/crash_driver.py, which dies hard around that save.
    """
    program = [str(REPO / "tests" / "crash_driver.py"), crash[0], str(crash[1]), "--"] if crash else ["-m", "jaxgen"]
    return subprocess.run([sys.executable, *program, *args], cwd=cwd, env=cli_env(devices), text=True,
                          capture_output=True, timeout=timeout, preexec_fn=_disk_of(file_size_limit))


def start_jaxgen(*args: str, devices: int = 1) -> subprocess.Popen:
    """`python -m jaxgen ARGS` in the background, in a process group of its own (as a job scheduler starts it).

    A file-size limit set on it later (resource.prlimit) makes writes fail as on a full disk.
    """
    return subprocess.Popen([sys.executable, "-m", "jaxgen", *args], cwd=REPO, env=cli_env(devices), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_disk_of(None))


def _disk_of(file_size_limit: int | None):
    def in_child():  # writes past the limit fail with EFBIG instead of killing the process with SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return in_child


def flip_bytes(path: pathlib.Path, count: int = 64, every: int | None = None) -> None:
    """Invert `count` bytes in the middle of a file, or `count` in every `every` bytes throughout.

    Orbax packs many arrays into one data file in no fixed order: damage in one place may hit
    only the optimizer state, which a reader of the parameters never loads. Damage throughout
    is certain to reach every array bigger than `every`.
    """
    data = bytearray(path.read_bytes())
    starts = range(every // 2, len(data), every) if every else [len(data) // 2]
    for start in starts:
        for i in range(start, min(start + count, len(data))):
            data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def wait_for(condition, timeout: float = 180, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def losses(run_dir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def logged_steps(run_dir: pathlib.Path, key: str = "loss") -> list[int]:
    """Steps of the records holding `key`, in file order (each should appear once)."""
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("jaxgen: error:")]


def jaxgen_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`python -m jaxgen ARGS` with the test session's 8 simulated devices."""
    return run_jaxgen(*args, devices=8, **kwargs)


# ----------------------------------------------------------------------------- tiny inputs


def random_batches(cfg, n: int) -> list[dict]:
    """`n` LM batches of random tokens, all weights 1, for the shapes `cfg` names."""
    rng = np.random.default_rng(0)
    b, l = cfg.data.batch_size, cfg.data.seq_len
    windows = rng.integers(0, cfg.model.vocab_size, size=(n, b, l + 1), dtype=np.int32)
    return [{"inputs": w[:, :-1], "targets": w[:, 1:], "weights": np.ones((b, l), np.float32)} for w in windows]


DIT_CONFIG = REPO / "configs" / "dit_digits.yaml"


def tiny_dit_config(*overrides: str):
    """A DiT small enough for unit tests, on the digits config."""
    from jaxgen.config import load_config

    return load_config(DIT_CONFIG, ["model.size=null", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                                    "model.freq_dim=32", "data.batch_size=16", *overrides])


def take(iterator, n: int) -> list:
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def assert_resumes_exactly(make_batches, consumed: int, following: int = 12) -> dict:
    """Batches `make_batches()` gives after `consumed` are those a new one gives from the position saved there
    (passed through JSON, as a checkpoint stores it). Returns that position."""
    uninterrupted = make_batches()
    take(uninterrupted, consumed)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    expected = take(uninterrupted, following)
    uninterrupted.close()
    resumed = make_batches()
    resumed.set_state(state)
    assert_same_batches(take(resumed, following), expected)
    resumed.close()
    return state


def as_tfrecord_dataset(version_dir: pathlib.Path) -> None:
    """Rewrite a prepared dataset's ArrayRecord shards as TFRecord, as `tfds build` would store them."""
    import tensorflow as tf
    from array_record.python.array_record_module import ArrayRecordReader

    for shard in sorted(version_dir.glob("*.array_record-*")):
        reader = ArrayRecordReader(str(shard))
        with tf.io.TFRecordWriter(str(shard).replace(".array_record-", ".tfrecord-")) as writer:
            for record in reader.read_all():
                writer.write(record)
        reader.close()
        shard.unlink()
    info = json.loads((version_dir / "dataset_info.json").read_text())
    (version_dir / "dataset_info.json").write_text(json.dumps(info | {"fileFormat": "tfrecord"}))


def saved_state(run_dir: pathlib.Path, step: int):
    """The whole train state of checkpoint `step` of a run, on the host (for bit-exact resume checks)."""
    import jax

    from jaxgen.checkpoint import Checkpointer
    from jaxgen.checkpoint_layout import checkpoint_dir
    from jaxgen.config import load_config
    from jaxgen.sharding import make_mesh
    from jaxgen.train.build import build_training

    cfg = load_config(run_dir / "config.yaml")
    layout = build_training(cfg, make_mesh(cfg.mesh, jax.devices()[:1])).layout
    return jax.device_get(Checkpointer(checkpoint_dir(run_dir), cfg.checkpoint, writer=False)
                          .restore(layout.target, step).state)


def copies_in_token_loop(compiled_text: str, shapes: list[tuple[int, ...]]) -> list[str]:
    """Instructions of a compiled decoder's token loop (its largest while body) that produce an array of one
    of `shapes` (a KV cache, a weight) other than by an in-place dynamic-update-slice: the copies,
    transposes and slices that would move a whole cache or weight on every token.
    """
    bodies = set(re.findall(r"body=(%[\w.\-]+)", compiled_text))
    loops, current = [], None
    for line in compiled_text.splitlines():
        if found := re.match(r"(%[\w.\-]+) .*\{$", line):
            current = [] if found.group(1) in bodies else None
            if current is not None:
                loops.append(current)
        elif current is not None and line.strip() not in ("", "}"):
            current.append(line)
    token_loop = max(loops, key=len)
    assert any("dynamic-update-slice" in line for line in token_loop), "no cache update in the loop"
    copies = []
    for line in token_loop:
        if not (found := re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]", line)):
            continue
        name, shape = found.group(1), tuple(int(x) for x in found.group(2).split(",") if x)
        in_place = name.startswith(("get-tuple-element", "tuple", "param", "bitcast.")) or "dynamic-update-slice" in name
        if shape in shapes and not in_place:
            copies.append(line.strip()[:160])
    return copies
