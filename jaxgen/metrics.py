"""Where numbers go: JSONL (always), TensorBoard, a loss-curve PNG, experiment trackers; throughput, MFU, start-up.

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import pathlib
import platform
import socket
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Callable, Self

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.device_memory import usable_cores
from jaxgen.errors import Preempted
from jaxgen.files import append_line, make_private_directory, user_cache_dir, write_atomic

if TYPE_CHECKING:
    from jaxgen.trackers import Outcome, Trackers

# Dense bf16 peak FLOP/s per chip from vendor data sheets.
KNOWN_PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
}

log = logging.getLogger("jaxgen")

# One compiled program for every measurement: a fresh lambda per call would compile again each time.
_square = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))


def measure_matmul_peak(n: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of an n x n matmul on the default device: the practical peak on CPUs.

    Inputs in `dtype`, accumulated in float32, as the models' matmuls are.
    """
    a = jnp.ones((n, n), dtype)
    _square(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _square(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times))


class PeakCache:
    """The best matmul peak measured on this machine, per dtype, in a small JSON file; figures only ever rise.

    A measurement taken while other work loads the machine is low, and a low peak inflates
    MFU; the best figure any run has measured here is the fairer denominator. Keyed by host,
    CPU model, the cores this process may use (a container's limit changes the peak) and dtype.
    """

    def __init__(self, path: pathlib.Path | None = None):
        self.path = path or user_cache_dir() / "matmul_peak.json"

    @staticmethod
    def key(dtype: str) -> str:
        return f"{socket.gethostname()}|{cpu_model()}|{usable_cores()} cores|{dtype}"

    def read(self) -> dict[str, float]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: start afresh
            return {}
        if not isinstance(entries, dict):
            return {}
        return {k: float(v) for k, v in entries.items() if isinstance(v, (int, float)) and math.isfinite(v) and v > 0}

    def best(self, key: str, measured: float) -> float:
        """The larger of `measured` and the cached figure for `key`, which becomes the cached one."""
        entries = self.read()
        if measured > entries.get(key, 0.0):
            entries[key] = measured
            try:  # only a help to later runs: a read-only home must not stop this one
                make_private_directory(self.path.parent)
                write_atomic(self.path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
            except OSError as err:
                log.debug("could not keep the matmul peak in %s: %s", self.path, err)
        return entries[key]


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Peak:
    """The MFU denominator: peak FLOP/s of the run's devices together, and where the figure came from.

    `source` is "config", "data_sheet", "measured" (this run's matmul), "cache" (an earlier
    run's on this machine) or "achieved" (the train step itself). A measured peak is a lower
    bound of what the machine can do, so it only rises: it is measured when the device is idle
    after the first step (not before, which would delay that step), again at idle moments every
    REMEASURE_S and whenever a step outran it; where the step still outruns every matmul
    measured, the step's own steady FLOP/s is the best figure there is and becomes the peak (MFU 1).
    A configured or data-sheet peak is a claim about the hardware, not a measurement: a step
    steadily faster than it proves the claim (or the model's FLOP count) wrong, and no corrected
    figure is known, so MFU is not reported from then on and `note` says why. Either way no
    utilisation above 1 is ever reported. "Steadily": the median of the recent readings, not one
    reading, whose short window a host's hiccup can shorten many times over; such a reading
    above the peak gets no MFU (not known) and changes nothing.
    """

    REMEASURE_S = 300.0

    def __init__(self, flops: float | None, source: str, measure: Callable[[], tuple[float, str]] | None = None):
        """`measure`: for a measured peak, a fresh measurement and its source; `flops` is then None."""
        self._flops, self.source, self._measure = flops, source, measure
        self.note: str | None = None
        self._measured_at = -math.inf

    @property
    def flops(self) -> float:
        if self._flops is None:
            self.refresh(every_s=0)
        return self._flops

    def refresh(self, every_s: float = REMEASURE_S) -> None:
        """A measured peak measured again if its last measurement is `every_s` old; best while the device is idle."""
        if self._measure is None or time.monotonic() - self._measured_at < every_s:
            return
        flops, source = self._measure()
        self._measured_at = time.monotonic()
        if self._flops is None or flops > self._flops:
            self._flops, self.source = flops, source

    def utilisation(self, achieved: float, steady: float | None = None) -> float | None:
        """`achieved` FLOP/s as a share of the peak, at most 1; None where it is above the peak, and from then on
        once a fixed peak proved too low. `steady`: the rate of recent readings together (default `achieved`),
        which alone may raise a measured peak or prove a fixed one too low."""
        steady = achieved if steady is None else steady
        if achieved > self.flops and self.note is None:
            if self._measure is not None:
                # The machine may be quieter than when the peak was measured; once the step's own rate is
                # the peak, a faster step simply raises it (no matmul every reading).
                self.refresh(every_s=self.REMEASURE_S if self.source == "achieved" else 0)
                if steady > self._flops:
                    log.info("the train step ran at %.3g FLOP/s, above every matmul measured (best %.3g): "
                             "MFU is taken against the step's own rate", steady, self._flops)
                    self._flops, self.source = steady, "achieved"
            elif steady > self._flops:
                self.note = (f"the train step ran at {steady:.3g} FLOP/s, above the {self.source} peak of "
                             f"{self._flops:.3g}: that peak (or the model's FLOP count) is too low, so MFU is "
                             "not reported")
                log.warning("%s; set train.peak_flops_per_device to the devices' real peak", self.note)
        if self.note or (achieved > self._flops and self.source != "achieved"):
            return None
        return min(achieved / self._flops, 1.0)


def run_peak(configured: float | None, compute_dtype: str, devices: int, cache: PeakCache | None = None) -> Peak:
    """The peak of `devices` for MFU: configured per device, a data sheet's, or measured in the compute dtype.

    Simulated CPU devices share one host's cores, so a CPU's peak is the host's whatever their number.
    """
    kind, platform_name = jax.devices()[0].device_kind, jax.devices()[0].platform
    count = 1 if platform_name == "cpu" else devices
    if configured:
        return Peak(configured * count, "config")
    for name, flops in KNOWN_PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return Peak(flops * count, "data_sheet")
    cache = cache or PeakCache()
    key = cache.key(compute_dtype)

    def measure() -> tuple[float, str]:
        measured = measure_matmul_peak(dtype=jnp.dtype(compute_dtype)) * count
        best = cache.best(key, measured)
        return best, "measured" if measured >= best else "cache"

    return Peak(None, "measured", measure)


class ThroughputMeter:
    """Units per second over the steps since the last reading; time spent outside training steps is left out."""

    STEADY_READINGS = 9  # the recent readings whose median may raise the peak (Peak.utilisation)

    def __init__(self, units_per_step: float, flops_per_unit: float, peak: Peak, step: int):
        self.units_per_step, self.flops_per_unit, self.peak = units_per_step, flops_per_unit, peak
        self.readings: list[float] = []
        self.restart(step)

    def restart(self, step: int) -> None:
        """Measure from now, as after step `step` (call after an evaluation or a sample grid)."""
        self._time, self._step = time.perf_counter(), step

    def idle(self) -> None:
        """The host has just waited for the device's work: a moment to measure the peak (when due); the time
        that takes is left out of the throughput."""
        start = time.perf_counter()
        self.peak.refresh()
        self._time += time.perf_counter() - start

    def read(self, step: int) -> dict[str, float]:
        """{units_per_s, mfu} since the last reading, as the record of `step` carries them (mfu nan: not known)."""
        rate = (step - self._step) * self.units_per_step / max(time.perf_counter() - self._time, 1e-9)
        self.readings.append(rate)
        steady = float(np.median(self.readings[-self.STEADY_READINGS:]))
        # May measure the peak: not in the next reading.
        mfu = self.peak.utilisation(rate * self.flops_per_unit, steady * self.flops_per_unit)
        self.restart(step)
        return {"units_per_s": rate, "mfu": math.nan if mfu is None else mfu}

    def median(self) -> dict[str, float | None]:
        if not self.readings:
            return {"units_per_s": None, "mfu": None}
        rate = float(np.median(self.readings))
        return {"units_per_s": rate, "mfu": self.peak.utilisation(rate * self.flops_per_unit)}


def process_start_time() -> float | None:
    """When this process started, in `time.time()` seconds (Linux's /proc); None where that is not known."""
    try:
        after_name = pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_after_boot = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): starttime
        uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    started = time.time() - (uptime - started_after_boot)
    return started if started <= time.time() else None


class StartupClock:
    """Seconds from `origin` (the process start, for a command) to the end of each phase before the first step."""

    def __init__(self, origin: float, ends: dict[str, float] | None = None):
        """`ends`: `time.time()` when phases that ran before this clock was made (imports, config) ended."""
        self.origin, self.ends = origin, dict(ends or {})

    def mark(self, phase: str) -> None:
        """`phase` ended now (it began where the previous one ended)."""
        self.ends[phase] = time.time()

    def phases(self) -> dict[str, float]:
        """Each phase's seconds, in the order they ran, and their `total`."""
        out, last = {}, self.origin
        for phase, end in self.ends.items():
            out[phase], last = round(end - last, 3), end
        out["total"] = round(last - self.origin, 3)
        return out


class MetricsWriter:
    def __init__(self, run_dir: pathlib.Path, tensorboard: bool, resumed_at: int | None,
                 trackers: Trackers | None = None):
        """`resumed_at`: the checkpoint step a resumed run continues from; None for a run from step 0.

        Records a killed run wrote after that point (or at all, for a run that
        starts over) are dropped, in metrics.jsonl and for TensorBoard, so every
        step appears once. `trackers` (`jaxgen.trackers.open_trackers`) get every
        record and picture too, and are closed with the writer; as a context
        manager, the writer tells them how the run ended.
        """
        self.enabled = jax.process_index() == 0
        self.trackers = trackers
        self.path = run_dir / "metrics.jsonl"
        if self.enabled and self.path.exists():
            kept = [r for r in read_metrics(self.path) if resumed_at is not None and r["step"] <= resumed_at]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._tb = None
        if self.enabled and tensorboard:
            self._tb = TensorBoardFile(run_dir / "tensorboard", purge_step=0 if resumed_at is None else resumed_at + 1)
        # The first write that failed (a full disk): the run stops on it, and nothing retries the broken file,
        # whose second failure would hide what the loop did about the first.
        self.failure: OSError | None = None

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        # Non-finite values (a skipped step's loss) are null: metrics.jsonl stays strict JSON.
        finite = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
        record = {"step": step, **{k: finite.get(k) for k in values}}
        with self._noting_failure():
            append_line(self.path, json.dumps(record))
            if self._tb:
                self._tb.add_scalars(step, finite)
        if self.trackers:
            self.trackers.log_scalars(step, finite)

    @contextlib.contextmanager
    def _noting_failure(self) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            self.failure = self.failure or err
            raise

    def log_image(self, step: int, name: str, png: str | pathlib.Path) -> None:
        """A picture the run wrote (loss curve, sample grid), for the trackers; TensorBoard gets its own."""
        if self.enabled and self.trackers:
            self.trackers.log_image(step, name, pathlib.Path(png))

    def log_pictures(self, step: int, entries: dict) -> None:
        """The pictures among a task's sample entries (the paths of PNG files), for the trackers."""
        for name, value in entries.items():
            if isinstance(value, str) and value.endswith(".png"):
                self.log_image(step, name, value)

    def flush(self) -> None:
        """Make everything written so far durable (at checkpoints and when the run stops)."""
        if self._tb and self.failure is None:
            with self._noting_failure():
                self._tb.flush()

    def close(self, outcome: Outcome = "finished") -> None:
        """`outcome`: how the run ended, as the trackers record it."""
        if self._tb:
            try:
                self._tb.close()
            except OSError:
                if self.failure is None:  # a file that failed once has said its word
                    raise
        if self.trackers:
            self.trackers.close(outcome)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close("finished" if error is None else "preempted" if isinstance(error, Preempted) else "failed")


def tensorboardx():
    """The tensorboardX package, imported without PyTorch or boto3.

    tensorboardX imports torch when it is installed (seconds of start-up) for its PyTorch
    helpers, and boto3 for writing to S3; jaxgen calls neither, writing
    event files into the run directory. Hiding both for the duration of the import skips them.
    """
    if "tensorboardX" not in sys.modules:
        hidden = [name for name in ("torch", "boto3") if name not in sys.modules]
        for name in hidden:
            sys.modules[name] = None  # makes `import NAME` raise ImportError, which tensorboardX expects
        try:
            import tensorboardX  # noqa: F401
        finally:
            for name in hidden:
                del sys.modules[name]
    import tensorboardX

    return tensorboardX


class TensorBoardFile:
    """Scalars in a TensorBoard event file, written in the caller's thread (no TensorFlow needed).

    tensorboardX's SummaryWriter queues events for a thread whose `flush` does
    not drain the queue, so what a checkpoint's flush promised could still be
    lost to a kill; here `flush` means on disk.
    """

    FLUSH_EVERY_S = 30.0

    def __init__(self, directory: pathlib.Path, purge_step: int):
        tensorboardx()
        self._directory, self._purge_step = directory, purge_step
        self._events = None  # the file is made with the first record: a start refused before it leaves none
        self._last_flush = time.monotonic()

    def _file(self):
        if self._events is None:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            self._directory.mkdir(parents=True, exist_ok=True)
            self._events = EventsWriter(str(self._directory / "events"))
            # TensorBoard hides the earlier files' events from purge_step on: a resumed run's steps appear once.
            self._events.write_event(Event(wall_time=time.time(), step=self._purge_step,
                                           session_log=SessionLog(status=SessionLog.START)))
        return self._events

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        with self._named():
            events = self._file()
            for key, value in values.items():
                events.write_event(Event(wall_time=time.time(), step=step, summary=scalar(key, value)))
        if time.monotonic() - self._last_flush > self.FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self._events is not None:
            with self._named():
                self._events.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._events is not None:
            self.flush()
            with self._named():
                self._events.close()

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        """A failed write (a full disk) names the event file's folder: tensorboardX's error names no file."""
        try:
            yield
        except OSError as err:
            if err.filename is None:
                raise OSError(err.errno, err.strerror, str(self._directory)) from err
            raise


def read_metrics(path: pathlib.Path) -> list[dict]:
    """Every complete record; a last line cut short by a kill is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def plot_loss_curve(metrics_path: pathlib.Path, out_png: pathlib.Path, loss_name: str = "loss") -> None:
    """Train and eval loss against step, as a PNG for people to look at; `loss_name` labels the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:  # a marker, so that a single point shows too
            ax.plot(*zip(*points), style if len(points) > 1 else "o", label=key.replace("_", " "))
    write_against_step(fig, ax, loss_name, out_png)


def write_against_step(fig, ax, ylabel: str, out_png: pathlib.Path) -> None:
    """Finish a figure of figures against step (labels, grid, legend) and write it as a PNG, atomically."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_atomic(out_png, png.getvalue())
