"""Benchmark figures against step: one PNG per metric beside the run's loss curve, a line per task."""

from __future__ import annotations

import json
import logging
import pathlib

from jaxgen.metrics import write_against_step

METRICS = ("acc", "acc_norm", "perplexity")
log = logging.getLogger("jaxgen")


def read_results(run_dir: pathlib.Path) -> list[dict]:
    """Every readable RUN_DIR/evals/<step>.json, by step (one that is not is left out of the plots, with a warning)."""
    paths = [p for p in (run_dir / "evals").glob("*.json") if p.stem.isdigit()]
    results = []
    for path in sorted(paths, key=lambda p: int(p.stem)):
        try:
            result = json.loads(path.read_text())
            if isinstance(result, dict) and isinstance(result.get("tasks"), dict) and "step" in result:
                results.append(result)
                continue
            reason = "not a result of jaxgen eval --tasks"
        except (OSError, ValueError) as err:
            reason = str(err)
        log.warning("%s is left out of the plots: %s", path, reason)
    return results


def plot_benchmarks(run_dir: pathlib.Path) -> list[pathlib.Path]:
    """RUN_DIR/evals_<metric>.png for each metric some task reports; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, written = read_results(run_dir), []
    for metric in METRICS:
        series: dict[str, list[tuple[int, float, float]]] = {}
        for result in results:
            for task, figures in result["tasks"].items():
                if metric in figures and not (metric == "acc_norm" and "perplexity" in figures):
                    series.setdefault(task, []).append((result["step"], figures[metric],
                                                        figures.get(f"{metric}_stderr", 0.0)))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
        for task, points in series.items():
            steps, values, errors = zip(*points)
            ax.errorbar(steps, values, yerr=errors, fmt="o-", capsize=3, label=task)
        write_against_step(fig, ax, metric, run_dir / f"evals_{metric}.png")
        written.append(run_dir / f"evals_{metric}.png")
    return written
