"""MFU is never above 1: a peak measured on a busy machine rises, a claimed one that proves too low is dropped."""

import json
import math

import pytest

from jaxgen import metrics
from jaxgen.metrics import Peak, PeakCache, ThroughputMeter, run_peak


def measurements(*figures: float):
    """A stand-in for the matmul measurement: these FLOP/s, one per call, the last one repeated."""
    calls = []

    def measure(n: int = 1024, repeats: int = 5, dtype=None) -> float:
        calls.append(dtype)
        return figures[min(len(calls), len(figures)) - 1]

    return measure, calls


def test_a_depressed_start_up_peak_never_yields_mfu_above_one(monkeypatch, tmp_path):
    measure, calls = measurements(1e9)  # measured while other work loaded the machine, and again as busy
    monkeypatch.setattr(metrics, "measure_matmul_peak", measure)
    peak = run_peak(None, "float32", devices=8, cache=PeakCache(tmp_path / "peak.json"))
    assert not calls  # nothing is measured before the first step
    meter = ThroughputMeter(units_per_step=100, flops_per_unit=1e9, peak=peak, step=0)  # any real rate beats 1e9
    for step in (5, 10, 15):
        assert meter.read(step)["mfu"] <= 1.0
    assert peak.source == "achieved" and peak.note is None
    assert 0 < meter.median()["mfu"] <= 1.0
    assert len(calls) == 2  # at the first reading, and once more when the step outran it; not every reading


def test_a_quieter_machine_measured_again_gives_the_real_figure():
    measure, calls = measurements(1e9, 4e9)
    peak = Peak(None, "measured", lambda: (measure(), "measured"))
    assert peak.utilisation(2e9) == pytest.approx(0.5)  # measured again at once, before any figure is given
    assert (peak.flops, peak.source, len(calls)) == (4e9, "measured", 2)
    assert peak.utilisation(1e9) == pytest.approx(0.25)


def test_a_configured_peak_below_the_achieved_rate_gives_no_mfu():
    peak = Peak(1e9, "config")
    meter = ThroughputMeter(units_per_step=100, flops_per_unit=1e9, peak=peak, step=0)
    assert math.isnan(meter.read(5)["mfu"])  # written as null
    assert meter.median()["mfu"] is None
    assert peak.source == "config" and "above the config peak of 1e+09" in peak.note
    assert Peak(1e12, "data_sheet").utilisation(5e11) == 0.5


def test_the_best_peak_of_the_machine_is_kept_between_runs(monkeypatch, tmp_path):
    path = tmp_path / "jaxgen" / "matmul_peak.json"
    cache, key = PeakCache(path), PeakCache.key("float32")
    assert cache.best(key, 2e11) == 2e11  # the directory is made
    assert cache.best(key, 1e11) == 2e11  # a slower measurement leaves the figure alone
    assert cache.best(PeakCache.key("bfloat16"), 4e11) == 4e11
    assert json.loads(path.read_text()) == {key: 2e11, PeakCache.key("bfloat16"): 4e11}
    assert PeakCache(path).read()[key] == 2e11

    measure, _ = measurements(1.5e11)  # this run's measurement, slower than an earlier run's
    monkeypatch.setattr(metrics, "measure_matmul_peak", measure)
    peak = run_peak(None, "float32", devices=1, cache=PeakCache(path))
    assert (peak.flops, peak.source) == (2e11, "cache")
    path.write_text("{not json")  # a damaged file is started afresh
    assert PeakCache(path).best(key, 1e11) == 1e11


def test_a_cache_that_cannot_be_written_never_stops_the_run(tmp_path):
    blocker = tmp_path / "home"
    blocker.write_text("a file where the cache directory would go")  # mkdir fails as on a read-only home
    cache = PeakCache(blocker / "jaxgen" / "matmul_peak.json")
    assert cache.best(PeakCache.key("float32"), 2e11) == 2e11
    assert not (blocker / "jaxgen").exists() and cache.read() == {}


def test_the_user_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert PeakCache().path == tmp_path / "jaxgen" / "matmul_peak.json"
    assert run_peak(3e11, "float32", devices=8).flops == 3e11  # simulated CPU devices share one host's peak


def test_measuring_the_peak_at_an_idle_moment_is_left_out_of_the_throughput(monkeypatch):
    monkeypatch.setattr(metrics.time, "perf_counter", clock := FakeClock())

    def slow_measurement() -> tuple[float, str]:
        clock.advance(30.0)
        return 1e12, "measured"

    peak = Peak(None, "measured", slow_measurement)
    meter = ThroughputMeter(units_per_step=100, flops_per_unit=1.0, peak=peak, step=0)
    clock.advance(1.0)  # one step
    meter.idle()
    clock.advance(1.0)  # another
    assert meter.read(2)["units_per_s"] == pytest.approx(100.0)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_one_short_reading_above_the_peak_gets_no_mfu_and_leaves_the_peak_alone(monkeypatch):
    """A GAN run logged 41,509 images/s at MFU 1.0 for the one step an evaluation settled early, between
    readings of about 100: that reading became the peak, and every MFU after it was 40 times too low."""
    now = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    peak = Peak(None, "measured", lambda: (1e12, "measured"))
    meter = ThroughputMeter(units_per_step=10, flops_per_unit=1e10, peak=peak, step=0)  # 1e11 FLOP per step
    figures = []
    for step, seconds in enumerate([0.2, 0.2, 0.2, 0.2, 0.001, 0.2, 0.2], start=1):
        now[0] += seconds
        figures.append(meter.read(step)["mfu"])
    assert figures[:4] + figures[5:] == [pytest.approx(0.5)] * 6 and math.isnan(figures[4])  # 100x: not known
    assert (peak.flops, peak.source) == (1e12, "measured")
    assert meter.median()["mfu"] == pytest.approx(0.5)
    fixed = Peak(1e12, "data_sheet")  # nor does one such reading prove a claimed peak wrong for the whole run
    assert fixed.utilisation(5e13, steady=5e11) is None and fixed.note is None
    assert fixed.utilisation(5e11) == pytest.approx(0.5)
