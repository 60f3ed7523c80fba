"""Benchmark-task throughput: jaxgen's native scorer against lm-evaluation-harness's HF model.

Trains a tiny LM (configs/lm_tiny.yaml, a few steps; or takes --run-dir), exports it
with `jaxgen export --format hf`, writes one multiple-choice task of --examples
examples drawn from the bundled corpus (4 choices each), and scores it, in one process:
  native          `jaxgen eval --tasks multiple_choice=FILE`'s scorer on the devices JAX finds
                  (native_first: the first pass, compiles included; native: the fastest of --repeats more)
  hf_loglikelihood  the harness's HF model (PyTorch, float32, CPU) scoring the same requests,
                  `HFLM.loglikelihood` alone: the model-against-model figure (first pass; fastest of the rest)
  lm_eval_jaxgen, lm_eval_hf  whole `lm_eval.simple_evaluate` runs of the task with
                  `--model jaxgen` / `--model hf` (loading the model and the data included)
Prints one JSON line per method (examples/s, requests/s, seconds), then a summary with the
ratios of native to hf_loglikelihood and of lm_eval_jaxgen to lm_eval_hf; every method gets
--batch-size rows at once. Accuracies are printed too: the same requests, the same answers.

    python benchmarks/eval_throughput.py [--examples 500] [--batch-size 32] [--repeats 3] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time
import types

import jax

from jaxgen.data.corpus import BUNDLED_CORPUS, iter_documents
from jaxgen.evals.benchmark import Benchmarks, load_tasks, make_scorer, run_tokenizer
from jaxgen.outputs.export import export_run
from jaxgen.outputs.runs import open_run
from jaxgen.tasks.layout import MAIN_GROUP

REPO = pathlib.Path(__file__).resolve().parents[1]
TASK_YAML = """task: throughput_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""


def write_task(directory: pathlib.Path, n: int) -> pathlib.Path:
    """`n` examples: a verse's first half, its own second half among three others'."""
    # Verses of 8 to 30 words: every choice fits the tiny model's window (the HF model refuses one that does not).
    verses = [v.split() for v in itertools.islice(iter_documents([BUNDLED_CORPUS]), 8 * n) if 8 <= len(v.split()) <= 30]
    rng = random.Random(0)
    records = []
    for i, words in enumerate(verses[:n]):
        half = len(words) // 2
        others = [" ".join(v[len(v) // 2:]) for v in rng.sample(verses, 3)]
        label = rng.randrange(4)
        choices = others[:label] + [" ".join(words[half:])] + others[label:]
        records.append({"context": " ".join(words[:half]), "choices": choices, "label": label})
    path = directory / "throughput_mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "yaml").mkdir()
    (directory / "yaml" / "throughput_mc.yaml").write_text(TASK_YAML.format(file=path))
    return path


def timed_harness(directory: pathlib.Path, model: str, model_args: str, batch_size: int) -> tuple[float, float]:
    """(seconds of `simple_evaluate`, accuracy) of the harness on the task; model loading included."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["throughput_mc"],
                                      task_manager=TaskManager(include_path=str(directory / "yaml")),
                                      batch_size=batch_size, device="cpu")
    return time.perf_counter() - start, results["results"]["throughput_mc"]["acc,none"]


def passes(score, repeats: int):
    """(seconds of the first pass, of the fastest of `repeats` more, the last result).

    The first pass compiles (JAX) or warms kernels up per shape (PyTorch); the fastest later
    one is the steady figure least disturbed by whatever else the machine runs.
    """
    start = time.perf_counter()
    result = score()
    first, later = time.perf_counter() - start, []
    for _ in range(repeats):
        start = time.perf_counter()
        result = score()
        later.append(time.perf_counter() - start)
    return first, min(later), result


def line(method: str, n: int, seconds: float, acc: float, **extra) -> dict:
    record = {"method": method, "examples": n, "requests": 4 * n, "seconds": round(seconds, 3),
              "examples_per_s": round(n / seconds, 1), "requests_per_s": round(4 * n / seconds, 1),
              "acc": acc, **extra}
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="multiple-choice examples (4 choices each)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences scored at once, by both")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the first (the fastest counts)")
    parser.add_argument("--run-dir", help="a trained LM run (default: train configs/lm_tiny.yaml for 20 steps)")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        run_dir = pathlib.Path(args.run_dir) if args.run_dir else tmp / "run"
        if not args.run_dir:
            subprocess.run([sys.executable, "-m", "jaxgen", "train", "--config", str(REPO / "configs" / "lm_tiny.yaml"),
                            "--run-dir", str(run_dir), "train.steps=20", "train.sample_tokens=0",
                            "logging.progress_bar=false"], check=True, capture_output=True)
        export_run(run_dir, tmp / "hf", "hf")
        task_file = write_task(tmp, args.examples)
        n = args.examples

        run = open_run(run_dir)
        layout = run.layout
        scorer = make_scorer(run.cfg, run.mesh, layout.graphdefs[MAIN_GROUP], layout.shardings[MAIN_GROUP],
                             args.batch_size)
        benchmarks = Benchmarks(load_tasks([f"multiple_choice={task_file}"], None), run_tokenizer(run_dir), scorer)
        params = run.weights.params[MAIN_GROUP]
        first, best, results = passes(lambda: benchmarks.run(params, progress=False), args.repeats)
        [result] = results.values()
        devices = f"{jax.device_count()} x {jax.devices()[0].platform}"
        line("native_first", n, first, result.figures["acc"], devices=devices)
        native = line("native", n, best, result.figures["acc"], devices=devices)

        import torch
        from lm_eval.models.huggingface import HFLM

        import jaxgen.evals.harness  # noqa: F401  (registers --model jaxgen)

        hf_model = HFLM(pretrained=str(tmp / "hf"), dtype="float32", device="cpu", batch_size=args.batch_size)
        pairs = [pair for example in benchmarks.tasks[0].examples for pair in example.requests()]
        requests = [types.SimpleNamespace(args=pair) for pair in pairs]
        first, best, lls = passes(lambda: hf_model.loglikelihood(requests, disable_tqdm=True), args.repeats)
        hf_acc = sum(max(range(len(e.choices)), key=lambda c, i=i: lls[4 * i + c][0]) == e.label
                     for i, e in enumerate(benchmarks.tasks[0].examples)) / n
        line("hf_loglikelihood_first", n, first, hf_acc, torch_threads=torch.get_num_threads())
        hf_direct = line("hf_loglikelihood", n, best, hf_acc, torch_threads=torch.get_num_threads())

        seconds, acc = timed_harness(tmp, "jaxgen", f"run_dir={run_dir}", args.batch_size)
        seconds, acc = timed_harness(tmp, "hf", f"pretrained={tmp / 'hf'},dtype=float32", args.batch_size)
        jaxgen_harness = line("lm_eval_jaxgen", n, seconds, acc, devices=devices)
        seconds, acc = timed_harness(tmp, "hf", f"pretrained={tmp / 'hf'},dtype=float32", args.batch_size)
        hf = line("lm_eval_hf", n, seconds, acc, torch_threads=torch.get_num_threads())
    print(json.dumps({"summary": True, "examples": n, "batch_size": args.batch_size, "devices": devices,
                      "native_examples_per_s": native["examples_per_s"],
                      "hf_loglikelihood_examples_per_s": hf_direct["examples_per_s"],
                      "ratio_native_to_hf": round(native["examples_per_s"] / hf_direct["examples_per_s"], 2),
                      "ratio_lm_eval_jaxgen_to_lm_eval_hf": round(jaxgen_harness["examples_per_s"]
                                                                  / hf["examples_per_s"], 2)}))


if __name__ == "__main__":
    main()
