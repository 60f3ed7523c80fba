"""Benchmark tasks on a tiny trained LM: each protocol's prompts, scores equal to a per-example reference, the CLI."""

import json
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgen.data.tokenizer import load_tokenizer
from jaxgen.errors import ConfigError, DataError
from jaxgen.evals import benchmark
from jaxgen.evals.benchmark import Benchmarks, evaluate_benchmarks, load_tasks, make_scorer
from jaxgen.evals.loglikelihood import bucket_length
from jaxgen.metrics import read_metrics
from jaxgen.outputs.runs import open_run
from jaxgen.tasks.layout import MAIN_GROUP

from benchmark_data import MULTIPLE_CHOICE, write_jsonl, write_task_data
from conftest import TINY_CONFIG, tiny_config
from helpers import error_lines, jaxgen_cli

TASKS = ["hellaswag", "arc_easy", "piqa", "lambada"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bench") / "run"
    result = jaxgen_cli("train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "train.steps=10",
                        "train.eval_every=10", "train.sample_tokens=0", "checkpoint.every=5")
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    root = write_task_data(tmp_path_factory.mktemp("tasks") / "data")
    write_jsonl(root / "mine.jsonl", MULTIPLE_CHOICE)
    return root


def test_each_task_builds_the_harness_prompts(task_data):
    hellaswag, arc, piqa, lambada, mine = load_tasks([*TASKS, f"multiple_choice={task_data / 'mine.jsonl'}"], task_data)
    assert len(hellaswag.examples) == 3  # the validation file only, not the train file beside it
    first = hellaswag.examples[0]
    assert first.context == "Sowing seed: A sower went forth to sow. And when he sowed"
    assert first.choices[1] == "the fowls. came and devoured them."  # " [title]" becomes ". "
    assert hellaswag.examples[2].choices[2] == "and he said unto them."  # other [markup] is dropped
    assert first.requests()[0] == (first.context, " some seeds fell by the way side.")
    assert arc.examples[0].context == "Question: Who created the heaven and the earth in the beginning?\nAnswer:"
    assert [e.label for e in arc.examples] == [0, 0, 1]  # ARC-Easy's test split, not ARC-Challenge beside it
    assert piqa.examples[1].choices == ("put it into old bottles.", "put it into new bottles.")
    assert piqa.examples[1].label == 1
    assert len(lambada.examples) == 3  # the English file, not the translation beside it
    assert lambada.examples[0].requests() == [("In the beginning God created the heaven and the", " earth")]
    assert mine.examples[2].requests()[0] == ("", " And God said")


@nnx.jit
def causal_logits(model, tokens_BL):
    return model(tokens_BL)


def reference_score(model, tokenizer, context: str, continuation: str, window: int):
    """One request on its own: no batch, bucket or sharding; the harness's tokenization written out. (Zeros
    after the request fill the window: a causal model's logits at earlier positions do not see them, and
    every request then shares one compiled forward.)"""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    bos = tokenizer.bos_id
    if context:
        context_ids = [bos, *tokenizer.encode([context])[0]]
        continuation_ids = [bos, *tokenizer.encode([context + continuation])[0]][len(context_ids):]
    else:
        context_ids, continuation_ids = [bos], tokenizer.encode([continuation])[0]
    sequence = (context_ids + continuation_ids)[-(window + 1):]
    inputs = sequence[:-1]
    logits = np.asarray(causal_logits(model, jnp.asarray([inputs + [0] * (window - len(inputs))])),
                        np.float64)[0, :len(inputs)]
    logprobs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    positions = range(len(sequence) - 1 - len(continuation_ids), len(sequence) - 1)
    loglikelihood = sum(logprobs[p, sequence[p + 1]] for p in positions)
    greedy = all(int(np.argmax(logits[p])) == sequence[p + 1] for p in positions)
    return loglikelihood, greedy


def test_scores_equal_a_per_example_reference(trained, task_data):
    run = open_run(trained)
    tokenizer = load_tokenizer(trained)
    tasks = load_tasks([*TASKS, f"multiple_choice={task_data / 'mine.jsonl'}"], task_data)
    scorer = make_scorer(run.cfg, run.mesh, run.layout.graphdefs[MAIN_GROUP], run.layout.shardings[MAIN_GROUP],
                         batch_size=8)
    results = Benchmarks(tasks, tokenizer, scorer).run(run.weights.params[MAIN_GROUP], progress=False)
    model, window = run.weights.models()[MAIN_GROUP], run.cfg.model.max_seq_len
    for task in tasks:
        result, correct, correct_norm, greedy_hits, lls = results[task.name], [], [], [], []
        for example, scores in zip(task.examples, result.scores):
            reference = [reference_score(model, tokenizer, c, k, window) for c, k in example.requests()]
            np.testing.assert_allclose([s.loglikelihood for s in scores], [r[0] for r in reference], atol=1e-4)
            assert [s.greedy for s in scores] == [r[1] for r in reference]
            lls.append(reference[0][0])
            greedy_hits.append(reference[0][1])
            if hasattr(example, "choices"):
                reference_lls = np.asarray([r[0] for r in reference])
                correct.append(int(np.argmax(reference_lls)) == example.label)
                lengths = np.asarray([len(c) for c in example.choices])
                correct_norm.append(int(np.argmax(reference_lls / lengths)) == example.label)
        figures = result.figures
        assert figures["n"] == len(task.examples)
        if task.name == "lambada":
            assert figures["acc"] == np.mean(greedy_hits)
            assert figures["perplexity"] == pytest.approx(np.exp(-np.mean(lls)), rel=1e-4)
            assert figures["truncated"] == 1  # the passage longer than the window
        else:
            assert (figures["acc"], figures["acc_norm"]) == (np.mean(correct), np.mean(correct_norm))
            assert figures["acc_stderr"] == pytest.approx(np.std(correct, ddof=1) / np.sqrt(len(correct)))
            assert figures["truncated"] == 0


def test_a_batch_size_beyond_the_requests_scores_them_in_one_batch_of_their_number(trained, task_data):
    """`--batch-size 100000000` allocated and compiled a batch of a hundred million rows for a few hundred
    requests, and ran out of memory half a minute later."""
    run = open_run(trained)
    tasks = load_tasks(TASKS[:1], task_data)
    params = run.weights.params[MAIN_GROUP]
    results = [Benchmarks(tasks, load_tokenizer(trained), make_scorer(
        run.cfg, run.mesh, run.layout.graphdefs[MAIN_GROUP], run.layout.shardings[MAIN_GROUP], batch_size=size)
    ).run(params, progress=False)[tasks[0].name].figures for size in (8, 10**6)]
    assert results[0] == results[1]


def test_rows_are_bucketed_to_few_lengths():
    assert [bucket_length(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    assert bucket_length(100, 80) == 80


def test_cli_scores_every_checkpoint_into_json_and_a_table(trained, task_data):
    result = jaxgen_cli("eval", "--run-dir", str(trained), "--all", "--tasks", "arc_easy,lambada",
                        "--tasks", f"multiple_choice={task_data / 'mine.jsonl'}", "--task-data", str(task_data))
    assert result.returncode == 0, result.stderr[-2000:]
    for step in (5, 10):
        record = json.loads((trained / "evals" / f"{step}.json").read_text())
        assert record["step"] == step
        assert list(record["tasks"]) == ["arc_easy", "lambada", f"multiple_choice={task_data / 'mine.jsonl'}"]
        for task, figures in record["tasks"].items():
            assert {"acc", "n", "acc_stderr", *(["perplexity"] if task == "lambada" else ["acc_norm"])} <= set(figures)
            assert task != "lambada" or "acc_norm" not in figures  # one candidate: a copy of acc, as if measured
        assert record["tasks"]["arc_easy"]["n"] == 3
        assert f"step {step}" in result.stdout
    assert re.search(r"\nlambada +perplexity +[\d.]+ ± +[\d.]+ +3\n", result.stdout)
    for metric in ("acc", "acc_norm", "perplexity"):  # beside the loss curve, every checkpoint a point
        assert (trained / f"evals_{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained / "loss_curve.png").is_file()


def test_bad_input_is_one_clear_error(trained, task_data, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown task 'hellaswagg' \(did you mean 'hellaswag'\?\); known tasks: "
                                          "hellaswag, arc_easy"):
        load_tasks(["hellaswagg"], task_data)
    broken = write_jsonl(tmp_path / "broken.jsonl", [MULTIPLE_CHOICE[0], {"context": "x", "label": 0}])
    with pytest.raises(DataError, match=r"broken.jsonl:2: missing field 'choices'"):
        load_tasks([f"multiple_choice={broken}"], None)
    with pytest.raises(DataError, match=r"no data for task 'piqa'"):
        load_tasks(["piqa"], tmp_path)
    with pytest.raises(ConfigError, match="give --task-data DIR"):
        load_tasks(["piqa"], None)
    bad_label = write_jsonl(tmp_path / "label.jsonl", [{"context": "x", "choices": ["a", "b"], "label": 2}])
    with pytest.raises(DataError, match=r"label.jsonl:1: label 2 is not the index of one of its 2 choices"):
        load_tasks([f"multiple_choice={bad_label}"], None)

    no_tokenizer = tmp_path / "run"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.yaml").write_text((trained / "config.yaml").read_text())
    result = jaxgen_cli("eval", "--run-dir", str(no_tokenizer), "--tasks", "piqa", "--task-data", str(task_data))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "keeps no tokenizer" in line
    result = jaxgen_cli("eval", "--run-dir", str(trained), "--task-data", str(task_data))  # tasks forgotten
    assert result.returncode == 2 and "give the tasks with --tasks" in error_lines(result.stderr)[0]
    with pytest.raises(ConfigError, match="--tasks ',,' names no task; known tasks: hellaswag"):  # scored nothing, rc 0
        evaluate_benchmarks(trained, [",,"], task_data)


@pytest.mark.parametrize("choices,says", [
    (["b"], r"field 'choices' holds 1 choice; a multiple-choice question needs at least 2"),
    ([" Let there be light", ""], r"choice 1 of field 'choices' is ''; every choice needs text to score"),
    (["", " "], r"choice 0 of field 'choices' is ''"),
])
def test_a_question_every_model_answers_right_is_refused(tmp_path, choices, says):
    """An empty choice scores no loss and always wins, a single one is always right: both gave a higher
    accuracy, exit 0, without a word."""
    path = write_jsonl(tmp_path / "mc.jsonl", [MULTIPLE_CHOICE[0], {"context": "a", "choices": choices, "label": 0}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: {says}"):
        load_tasks([f"multiple_choice={path}"], None)


def test_only_the_scored_split_is_read_never_another(tmp_path):
    """A task folder without its scored split's file was scored on whatever it held: the train split, or train and
    test together, without a word."""
    piqa = tmp_path / "piqa"
    piqa.mkdir()
    row = {"goal": "Let there be", "sol1": " light", "sol2": " dark", "label": 0}
    write_jsonl(piqa / "train.jsonl", [row] * 3)
    with pytest.raises(DataError, match=rf"^directory '{piqa}' holds no file of the validation split of task "
                                        r"'piqa', only of other splits \(train.jsonl\); give it a validation file "
                                        r"\(one whose name says validation or valid or val or dev\)$"):
        load_tasks(["piqa"], tmp_path)
    write_jsonl(piqa / "piqa.jsonl", [row])  # a file naming no split is the split
    write_jsonl(piqa / "test.jsonl", [row] * 5)
    [task] = load_tasks(["piqa"], tmp_path)
    assert len(task.examples) == 1


@pytest.mark.parametrize("text", ["", "   ", "word", "ends in a space "])
def test_a_lambada_passage_without_a_last_word_to_predict_is_refused(tmp_path, text):
    """Scored anyway, an empty passage counted in n and put the perplexity in the hundreds of thousands."""
    lambada = write_jsonl(tmp_path / "lambada.jsonl", [{"text": "In the beginning God created"}, {"text": text}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(lambada))}:2: field 'text' is .*; a LAMBADA passage "
                                        "needs words before its last word, and the last word to predict$"):
        load_tasks(["lambada"], tmp_path)


def test_a_task_file_not_utf8_or_a_directory_is_named(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [MULTIPLE_CHOICE[0], {"context": "cafX", "choices": ["a", "b"],
                                                                  "label": 0}])
    path.write_bytes(path.read_bytes().replace(b"cafX", b"caf\xe9"))  # a Latin-1 file
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not UTF-8 text \(byte 0xe9 at column \d+\); "
                                        r"save mc.jsonl as UTF-8$"):
        load_tasks([f"multiple_choice={path}"], None)
    with pytest.raises(DataError, match=rf"^task file '{tmp_path}' is a directory; give a JSONL file"):
        load_tasks([f"multiple_choice={tmp_path}"], None)
    path.write_text(json.dumps([MULTIPLE_CHOICE[0]], indent=1))
    with pytest.raises(DataError, match=r":1: not a JSON object \(.*\) \(a JSON array: task files are JSON Lines, "):
        load_tasks([f"multiple_choice={path}"], None)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(MULTIPLE_CHOICE[0]).encode() + b"\n")  # saved on Windows
    [task] = load_tasks([f"multiple_choice={path}"], None)
    assert len(task.examples) == 1


def test_every_missing_field_is_named_at_once(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"choices": ["a", "b"]}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: missing fields 'context', 'label' \(fields "
                                        r"there: \['choices'\]\)$"):
        load_tasks([f"multiple_choice={path}"], None)


def test_tasks_scored_in_the_loop_are_logged_at_the_configured_steps(tmp_path, task_data):
    run_dir, mine = tmp_path / "run", task_data / "mine.jsonl"
    result = jaxgen_cli("train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "train.steps=10",
                        "train.sample_tokens=0", f"train.eval_tasks=[arc_easy, lambada, multiple_choice={mine}]",
                        "train.eval_tasks_every=4", f"train.eval_task_data={task_data}")
    assert result.returncode == 0, result.stderr[-2000:]
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "arc_easy/acc" in r]
    assert [r["step"] for r in records] == [4, 8, 10]  # every 4 steps and the last
    assert {"arc_easy/acc_norm", "lambada/perplexity", "mine/acc", "mine/acc_norm"} <= set(records[-1])
    assert sorted(int(p.stem) for p in (run_dir / "evals").glob("*.json")) == [4, 8, 10]
    assert (run_dir / "evals_acc.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("arc_easy/acc")] == [4, 8, 10]
    assert [e.value for e in events.Scalars("mine/acc_norm")] == pytest.approx([r["mine/acc_norm"] for r in records])
    # The loop scores exactly what `jaxgen eval --tasks` scores on the same checkpoint.
    result = jaxgen_cli("eval", "--run-dir", str(run_dir), "--tasks", f"arc_easy,lambada,multiple_choice={mine}",
                        "--task-data", str(task_data))
    assert result.returncode == 0, result.stderr[-2000:]
    offline = json.loads((run_dir / "evals" / "10.json").read_text())["tasks"]
    assert records[-1]["arc_easy/acc"] == offline["arc_easy"]["acc"]
    assert records[-1]["mine/acc_norm"] == offline[f"multiple_choice={mine}"]["acc_norm"]
    assert records[-1]["lambada/perplexity"] == pytest.approx(offline["lambada"]["perplexity"], rel=1e-4)


def test_config_refuses_unknown_eval_tasks():
    with pytest.raises(ConfigError, match=r"train.eval_tasks: unknown task 'hellaswagg' \(did you mean "
                                          r"'hellaswag'\?\); known tasks: hellaswag"):
        tiny_config("train.eval_tasks=[hellaswagg]")
    assert tiny_config("train.eval_tasks=hellaswag,piqa").train.eval_tasks == ("hellaswag", "piqa")


def test_a_task_file_is_named_by_its_absolute_path_so_two_folders_never_share_a_result(tmp_path, monkeypatch):
    from jaxgen.evals.tasks import parse_task_names

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    [from_a] = parse_task_names(["multiple_choice=mine.jsonl"])
    monkeypatch.chdir(tmp_path / "b")
    [from_b] = parse_task_names(["multiple_choice=./mine.jsonl"])
    assert (from_a, from_b) == (f"multiple_choice={tmp_path / 'a' / 'mine.jsonl'}",
                                f"multiple_choice={tmp_path / 'b' / 'mine.jsonl'}")
    (tmp_path / "b" / "mine.jsonl").touch()
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "b" / "mine.jsonl")
    for twice in (f"multiple_choice=mine.jsonl,multiple_choice={tmp_path / 'b' / 'mine.jsonl'}",
                  f"multiple_choice=mine.jsonl,multiple_choice={tmp_path / 'link.jsonl'}"):
        with pytest.raises(ConfigError, match="a task is named twice"):
            parse_task_names([twice])
    for clash in (f"multiple_choice=mine.jsonl,multiple_choice={tmp_path / 'a' / 'mine.jsonl'}",
                  "piqa,multiple_choice=piqa.jsonl"):
        with pytest.raises(ConfigError, match=r"two tasks would be logged as (mine|piqa)/acc \("):
            parse_task_names([clash])


def test_scores_on_a_sharded_model_equal_the_replicated_ones(trained, task_data):
    tasks = load_tasks(["hellaswag", "lambada"], task_data)
    scores = []
    for overrides in ([], ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "sharding.preset=fsdp_tp"]):
        run = open_run(trained, overrides=overrides)
        scorer = make_scorer(run.cfg, run.mesh, run.layout.graphdefs[MAIN_GROUP], run.layout.shardings[MAIN_GROUP],
                             batch_size=8)
        results = Benchmarks(tasks, load_tokenizer(trained), scorer).run(run.weights.params[MAIN_GROUP], progress=False)
        scores.append([s for task in tasks for example in results[task.name].scores for s in example])
    np.testing.assert_allclose([s.loglikelihood for s in scores[1]], [s.loglikelihood for s in scores[0]], atol=1e-4)
    assert [s.greedy for s in scores[1]] == [s.greedy for s in scores[0]]


def test_acc_norm_divides_by_characters_as_the_harness_does():
    from jaxgen.evals.metrics import choice_predictions, mean_stderr

    # Per character, "ééé" (3 characters, 6 bytes) beats "bb": -4.5/3 = -1.5 > -4/2 = -2, though -4 > -4.5.
    assert choice_predictions([-4.5, -4.0], ["ééé", "bb"]) == (1, 0)
    assert choice_predictions([-1.0, -1.0], ["a", "a"]) == (0, 0)  # ties go to the first choice
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx((0.5, np.std([1, 0, 1, 0], ddof=1) / 2))


def test_a_plot_that_fails_after_scoring_stopped_never_hides_why_it_stopped(tmp_path, monkeypatch, caplog):
    def no_space(run_dir):
        raise OSError(28, "No space left on device", str(run_dir / "evals_acc.png"))

    monkeypatch.setattr("jaxgen.evals.benchmark.plot_benchmarks", no_space)
    benchmark.plot_scored(tmp_path, [])  # nothing scored: nothing to plot
    with caplog.at_level("WARNING", logger="jaxgen"):
        benchmark.plot_scored(tmp_path, [{"step": 4}], stopped=DataError("checkpoint 8 is damaged"))
    assert "could not plot the results scored so far: [Errno 28] No space left on device" in caplog.text
    with pytest.raises(OSError, match="No space left"):  # when scoring finished, the plot's failure is the error
        benchmark.plot_scored(tmp_path, [{"step": 4}])


def test_a_step_scored_again_on_other_tasks_keeps_the_earlier_tasks(tmp_path, caplog):
    """`eval --tasks hellaswag` then `eval --tasks arc_easy` left only arc_easy in evals/<step>.json."""
    benchmark.write_result(tmp_path, {"step": 8, "tasks": {"hellaswag": {"acc": 0.3}, "piqa": {"acc": 0.6}}})
    benchmark.write_result(tmp_path, {"step": 8, "tasks": {"arc_easy": {"acc": 0.4}, "piqa": {"acc": 0.7}}})
    saved = json.loads((tmp_path / "evals" / "8.json").read_text())
    assert saved == {"step": 8, "tasks": {"hellaswag": {"acc": 0.3}, "piqa": {"acc": 0.7}, "arc_easy": {"acc": 0.4}}}
    (tmp_path / "evals" / "8.json").write_text('{"step": 8, "tasks": {"hella')  # cut short by hand or a tool
    with caplog.at_level("WARNING", logger="jaxgen"):
        benchmark.write_result(tmp_path, {"step": 8, "tasks": {"lambada": {"acc": 0.2}}})
    assert f"{tmp_path / 'evals' / '8.json'} cannot be read (" in caplog.text
    assert json.loads((tmp_path / "evals" / "8.json").read_text())["tasks"] == {"lambada": {"acc": 0.2}}
    (tmp_path / "evals" / "4.json").write_text("{")  # another step's damaged file is left out of the plots
    with caplog.at_level("WARNING", logger="jaxgen"):
        assert [p.name for p in benchmark.plot_benchmarks(tmp_path)] == ["evals_acc.png"]
    assert f"{tmp_path / 'evals' / '4.json'} is left out of the plots: Expecting" in caplog.text


def test_tasks_scored_on_another_checkpoint_of_the_step_are_set_aside_not_merged(tmp_path, caplog):
    """A run continued from an earlier checkpoint saves a new one at a step evals/<step>.json holds tasks of:
    `eval --tasks` on it merged the old checkpoint's tasks in as its own (and plotted them)."""
    benchmark.write_result(tmp_path, {"step": 8, "tasks": {"hellaswag": {"acc": 0.3}}, "checkpoint": "old"})
    benchmark.write_result(tmp_path, {"step": 8, "tasks": {"piqa": {"acc": 0.6}}})  # the trainer's: no checkpoint
    with caplog.at_level("WARNING", logger="jaxgen"):
        benchmark.write_result(tmp_path, {"step": 8, "tasks": {"arc_easy": {"acc": 0.4}}, "checkpoint": "new"})
    assert "scored on another checkpoint" not in caplog.text  # the trainer's record left it unknown
    saved = json.loads((tmp_path / "evals" / "8.json").read_text())
    assert saved == {"step": 8, "tasks": {"hellaswag": {"acc": 0.3}, "piqa": {"acc": 0.6}, "arc_easy": {"acc": 0.4}},
                     "checkpoint": "new"}  # after the trainer's record the file's checkpoint is unknown: merged
    with caplog.at_level("WARNING", logger="jaxgen"):
        benchmark.write_result(tmp_path, {"step": 8, "tasks": {"lambada": {"acc": 0.2}}, "checkpoint": "newer"})
    assert "8.json held arc_easy, hellaswag, piqa, scored on another checkpoint saved at step 8" in caplog.text
    saved = json.loads((tmp_path / "evals" / "8.json").read_text())
    assert saved == {"step": 8, "tasks": {"lambada": {"acc": 0.2}}, "checkpoint": "newer",
                     "replaced": [{"checkpoint": "new", "tasks": {"hellaswag": {"acc": 0.3}, "piqa": {"acc": 0.6},
                                                                  "arc_easy": {"acc": 0.4}}}]}
    benchmark.write_result(tmp_path, {"step": 8, "tasks": {"piqa": {"acc": 0.7}}, "checkpoint": "newer"})
    assert json.loads((tmp_path / "evals" / "8.json").read_text())["tasks"] == {"lambada": {"acc": 0.2},
                                                                                 "piqa": {"acc": 0.7}}


def test_evaluations_of_one_step_at_once_keep_every_task(tmp_path):
    """The trainer's `train.eval_tasks` and a user's `eval --tasks` on one step: each read evals/<step>.json,
    added its tasks and wrote it back, so the later write dropped the other's tasks."""
    script = ("import sys; from jaxgen.evals.benchmark import write_result\n"
              "for i in range(25):\n"
              "    write_result(__import__('pathlib').Path(sys.argv[1]), {'step': 8, 'tasks': {f'{sys.argv[2]}_{i}': {}}})")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), f"w{w}"]) for w in range(3)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    saved = json.loads((tmp_path / "evals" / "8.json").read_text())
    assert sorted(saved["tasks"]) == sorted(f"w{w}_{i}" for w in range(3) for i in range(25))
    assert [p.name for p in (tmp_path / "evals").iterdir() if not p.name.startswith(".")] == ["8.json"]
