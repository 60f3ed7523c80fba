"""Benchmark figures from scores: accuracy, length-normalised accuracy, perplexity, with standard errors.

Pure functions of per-example numbers, as lm-evaluation-harness defines them:
`acc` picks the choice of highest summed log-likelihood, `acc_norm` the highest
log-likelihood per character of the choice (the harness's `acc_norm`; ties go
to the first choice, as numpy's argmax); a cloze example is right when every
target token is the greedy one, and its perplexity is exp(-mean log-likelihood).
Standard errors are the sample standard deviation over sqrt(n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, np.float64)
    stderr = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    return float(np.mean(x)), stderr


def choice_predictions(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of log-likelihood, argmax of log-likelihood per character of the choice)."""
    lls = np.asarray(loglikelihoods, np.float64)
    lengths = np.asarray([max(len(c), 1) for c in choices], np.float64)
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def multiple_choice_figures(labels: Sequence[int], predictions: Sequence[tuple[int, int]]) -> dict:
    acc, acc_stderr = mean_stderr([float(p == y) for (p, _), y in zip(predictions, labels)])
    acc_norm, acc_norm_stderr = mean_stderr([float(p == y) for (_, p), y in zip(predictions, labels)])
    return {"acc": acc, "acc_stderr": acc_stderr, "acc_norm": acc_norm, "acc_norm_stderr": acc_norm_stderr,
            "n": len(labels)}


def cloze_figures(loglikelihoods: Sequence[float], greedy: Sequence[bool]) -> dict:
    """Accuracy of greedy matches and perplexity. No `acc_norm`, which the harness's LAMBADA has not either: with one
    candidate its length changes nothing, and a copy of `acc` read as a measure of its own."""
    acc, acc_stderr = mean_stderr([float(g) for g in greedy])
    mean_ll, mean_ll_stderr = mean_stderr(loglikelihoods)
    perplexity = math.exp(-mean_ll)
    return {"acc": acc, "acc_stderr": acc_stderr, "perplexity": perplexity,
            "perplexity_stderr": perplexity * mean_ll_stderr,  # delta method
            "n": len(greedy)}


def format_table(step: int, results: dict[str, dict]) -> str:
    """One line per task and figure: value ± standard error."""
    width = max([4, *map(len, results)])
    lines = [f"step {step}", f"{'task':<{width}} {'metric':<11} {'value':>10}   {'stderr':>8} {'n':>7}"]
    for name, figures in results.items():
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric in figures and (metric != "acc_norm" or "perplexity" not in figures):
                lines.append(f"{name:<{width}} {metric:<11} {figures[metric]:>10.4f} ± "
                             f"{figures[metric + '_stderr']:>8.4f} {figures['n']:>7}")
    return "\n".join(lines)
