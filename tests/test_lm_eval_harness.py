"""The same tasks scored by jaxgen natively, by lm-evaluation-harness with the jaxgen backend and with its HF model.

The harness runs as users run it (a subprocess, tasks from local YAML files via
--include_path, nothing downloaded); its HF model reads the run exported with
`jaxgen export --format hf`. Per-example log-likelihoods must agree within 1e-4,
greedy flags and accuracies exactly, generated text exactly.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxgen.data.tokenizer import load_tokenizer
from jaxgen.evals.benchmark import Benchmarks, load_tasks, make_scorer
from jaxgen.outputs.runs import open_run
from jaxgen.tasks.layout import MAIN_GROUP

from benchmark_data import LAMBADA, write_jsonl, write_task_data
from conftest import TINY_CONFIG
from helpers import REPO, cli_env, jaxgen_cli

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # the harness's HF model needs it (lm-eval[hf])

# The harness's task definitions of PIQA and LAMBADA, reading the test's files.
TASK_YAMLS = {
    "piqa_local": """
dataset_kwargs:
  data_files:
    validation: {data}/piqa.jsonl
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""",
    "lambada_local": """
dataset_kwargs:
  data_files:
    test: {data}/lambada/lambada_test_en.jsonl
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list: [{{metric: perplexity}}, {{metric: acc}}]
""",
    "rolling_local": """
dataset_kwargs:
  data_files:
    test: {data}/lambada/lambada_test_en.jsonl
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}]
""",
    "generate_local": """
dataset_kwargs:
  data_files:
    test: {data}/generate.jsonl
output_type: generate_until
test_split: test
doc_to_text: "{{{{text}}}}"
doc_to_target: " and"
generation_kwargs: {{until: [":"], max_gen_toks: 12, do_sample: false}}
metric_list: [{{metric: exact_match}}]
""",
}
NATIVE = {"piqa_local": "piqa", "lambada_local": "lambada"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    run_dir, hf_dir = root / "run", root / "hf"
    result = jaxgen_cli("train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "train.steps=20",
                        "train.eval_every=20", "train.sample_tokens=0")
    assert result.returncode == 0, result.stderr[-2000:]
    result = jaxgen_cli("export", "--run-dir", str(run_dir), "--format", "hf", "--out", str(hf_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    data = write_task_data(root / "data")
    write_jsonl(data / "generate.jsonl", [{"text": "And God said"}, {"text": "In the beginning God"},
                                          {"text": LAMBADA[2]["text"]}])  # longer than the window
    for name, body in TASK_YAMLS.items():
        (root / "yaml").mkdir(exist_ok=True)
        (root / "yaml" / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\n" + body.format(data=data))
    return root


def harness(setup, name: str, tasks: list[str], *model: str) -> dict[str, list[dict]]:
    """Per-task samples of one `lm_eval` run over `tasks`."""
    env = {**cli_env(1), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(setup / "hf_cache"), "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    out = setup / f"out_{name}"
    result = subprocess.run([sys.executable, "-m", *model, "--tasks", ",".join(tasks), "--include_path",
                             str(setup / "yaml"), "--batch_size", "4", "--log_samples", "--output_path", str(out)],
                            env=env, cwd=setup, text=True, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = {}
    for task in tasks:
        [path] = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
        samples[task] = sorted((json.loads(line) for line in open(path)), key=lambda r: r["doc_id"])
    return samples


def loglikelihoods(samples: list[dict]) -> list[list[float]]:
    return [[float(ll) for ll, _ in r["filtered_resps"]] for r in samples]


def greedy_flags(samples: list[dict]) -> list[list[bool]]:
    return [[flag == "True" for _, flag in r["filtered_resps"]] for r in samples]


def test_native_jaxgen_backend_and_hf_model_agree(setup):
    jaxgen = harness(setup, "jaxgen", list(TASK_YAMLS), "jaxgen.evals.harness", "--model", "jaxgen", "--model_args",
                     f"run_dir={setup / 'run'}")
    hf_model = f"pretrained={setup / 'hf'},dtype=float32"
    hf = harness(setup, "hf", [*NATIVE, "generate_local"], "lm_eval", "--model", "hf", "--model_args", hf_model,
                 "--device", "cpu")
    # The HF model's rolling log-likelihood scores every token its tokenizer adds, BOS included; without it
    # the text is scored after the BOS prefix alone, as jaxgen scores it.
    hf.update(harness(setup, "hf_rolling", ["rolling_local"], "lm_eval", "--model", "hf", "--model_args",
                      f"{hf_model},add_bos_token=False", "--device", "cpu"))

    run = open_run(setup / "run")
    scorer = make_scorer(run.cfg, run.mesh, run.layout.graphdefs[MAIN_GROUP], run.layout.shardings[MAIN_GROUP], 8)
    tasks = load_tasks(list(NATIVE.values()), setup / "data")
    native = Benchmarks(tasks, load_tokenizer(setup / "run"), scorer).run(run.weights.params[MAIN_GROUP],
                                                                          progress=False)
    for task, native_name in NATIVE.items():
        ours = [[s.loglikelihood for s in example] for example in native[native_name].scores]
        np.testing.assert_allclose(np.concatenate(loglikelihoods(jaxgen[task])), np.concatenate(ours), atol=1e-4)
        np.testing.assert_allclose(np.concatenate(loglikelihoods(hf[task])), np.concatenate(ours), atol=1e-4)
        assert greedy_flags(jaxgen[task]) == greedy_flags(hf[task]) == [[s.greedy for s in e]
                                                                         for e in native[native_name].scores]
        for metric in ("acc", "acc_norm"):
            if metric in jaxgen[task][0]:
                assert ([r[metric] for r in jaxgen[task]] == [r[metric] for r in hf[task]])
                assert np.mean([r[metric] for r in hf[task]]) == native[native_name].figures[metric]
    # The long passage lost tokens from the left in all three, the same ones.
    assert native["lambada"].figures["truncated"] == 1

    rolling = [float(r["filtered_resps"][0]) for r in jaxgen["rolling_local"]]
    np.testing.assert_allclose(rolling, [float(r["filtered_resps"][0]) for r in hf["rolling_local"]], atol=1e-4)
    assert rolling[2] < 5 * rolling[0]  # the long passage spans several windows, each scored once
    assert [r["filtered_resps"] for r in jaxgen["generate_local"]] == [r["filtered_resps"] for r in hf["generate_local"]]
    assert any(r["filtered_resps"][0] for r in jaxgen["generate_local"])  # something was generated


def test_registering_jaxgen_keeps_the_harness_models():
    # A fresh process: the harness fills its registry with its own models only while it is empty.
    program = ("import jaxgen.evals.harness\nfrom lm_eval.api.registry import get_model\n"
               "print(get_model('jaxgen').__name__, get_model('hf').__name__)")
    result = subprocess.run([sys.executable, "-c", program], env=cli_env(1), text=True, capture_output=True,
                            timeout=300)
    assert result.stdout.split() == ["JaxgenLM", "HFLM"], result.stderr[-2000:]


def test_model_args_the_jaxgen_model_does_not_take_are_one_line():
    """`--model_args run_dir=lm,foo=1` was a traceback: TypeError: JaxgenLM.__init__() got an unexpected keyword."""
    from jaxgen.errors import ConfigError
    from jaxgen.evals.harness import JaxgenLM

    with pytest.raises(ConfigError, match=r"^--model_args 'run_dir=lm,foo=1' for the jaxgen model: 'foo' is not among "
                                          r"its keys; give run_dir, step, max_gen_toks \(run_dir required\)"):
        JaxgenLM.create_from_arg_string("run_dir=lm,foo=1", {"batch_size": 8, "device": None})
    with pytest.raises(ConfigError, match=r"^--model_args 'step=3' for the jaxgen model: run_dir is missing; "):
        JaxgenLM.create_from_arg_obj({"step": 3})


def test_rolling_windows_are_the_harness_windows():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from jaxgen.evals.harness import rolling_requests
    from jaxgen.evals.loglikelihood import window_row

    for n, window in [(1, 4), (4, 4), (5, 4), (23, 8), (64, 64), (130, 64)]:
        tokens = list(range(10, 10 + n))
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, window, 1)]
        # The harness's models feed (context + continuation)[-(window + 1):][:-1] and score the last len(continuation).
        expected = [((c + k)[-(window + 1):][:-1], k) for c, k in theirs]
        ours = [window_row(r, window) for r in rolling_requests(tokens, 1, window)]
        assert [(inputs, targets[len(targets) - scored:]) for inputs, targets, scored, _ in ours] == expected


def test_generated_text_stops_at_the_first_stop_string():
    from jaxgen.evals.harness import cut_at_stops

    assert cut_at_stops("and God said: Let there be light.\nAnd", ["\n", ":"]) == "and God said"
    assert cut_at_stops("no stop here", ["\n", ""]) == "no stop here"
