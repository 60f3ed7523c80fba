"""The user's story: train through the CLI, see the loss fall, find the run's files."""

import json
import re

import jax
import numpy as np
import pytest

from jaxgen.data.pipeline import to_global
from jaxgen.metrics import read_metrics
from jaxgen.sharding import make_mesh
from jaxgen.train.build import build_training
from jaxgen.train.optimizer import learning_rate_schedule, weight_decay_mask
from jaxgen.train.state import QUICK_INIT_MAX_VALUES, fresh_state, init_compiler_options

from conftest import TINY_CONFIG, tiny_config
from helpers import jaxgen_cli, random_batches


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    result = jaxgen_cli("train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "mesh.fsdp=4")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_cli_training_lowers_the_loss(tiny_run):
    run_dir, result = tiny_run
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] <= 1 for r in train)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["devices"] == 8 and summary["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert "sample: And God said" in result.stdout


def test_run_directory_holds_config_tensorboard_plot_and_tokenizer(tiny_run):
    run_dir, _ = tiny_run
    from jaxgen.config import load_config

    assert load_config(run_dir / "config.yaml") == tiny_config("mesh.fsdp=4")
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "tokenizer.model").stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"loss", "eval_loss", "grad_norm", "lr", "tokens_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval_loss")] == [0, 20, 40]


def test_cli_config_error_exits_before_work(tmp_path):
    result = jaxgen_cli("train", "--run-dir", str(tmp_path / "r"), "train.stpes=3")
    assert result.returncode == 2
    assert "Did you mean 'train.steps'" in result.stderr
    assert not (tmp_path / "r").exists()


def test_existing_run_directory_is_not_overwritten(tiny_run):
    run_dir, _ = tiny_run
    result = jaxgen_cli("train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "checkpoint.resume=never")
    assert result.returncode == 2 and "already holds checkpoints" in result.stderr and "checkpoint.resume=never" in result.stderr


def test_gradient_accumulation_equals_the_full_batch(devices):
    def run(microbatches):
        cfg = tiny_config(f"train.microbatches={microbatches}", "data.batch_size=32", "mesh.data=4", "mesh.fsdp=2", "optimizer.eps=1e-3")
        training = build_training(cfg, make_mesh(cfg.mesh, devices))
        state, losses = training.init_state(), []
        for batch in random_batches(cfg, 2):
            state, metrics = training.train_step(state, to_global(batch, training.mesh))
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(state.params)

    (l1, p1), (l4, p4) = run(1), run(4)
    np.testing.assert_allclose(l1, l4, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p4)


def test_a_small_state_is_made_by_a_quickly_compiled_program_alike_on_every_mesh(devices, monkeypatch):
    assert init_compiler_options("cpu", 10**6) == {"xla_backend_optimization_level": 0}
    assert init_compiler_options("cpu", QUICK_INIT_MAX_VALUES + 1) == {}  # would run longer than it saves
    assert init_compiler_options("gpu", 10**6) == init_compiler_options("tpu", 10**6) == {}
    asked = []
    monkeypatch.setattr("jaxgen.train.state.init_compiler_options",
                        lambda *args: asked.append(args) or init_compiler_options(*args))
    states = []
    for mesh in (["mesh.data=1"], ["mesh.data=2", "mesh.fsdp=4"]):
        cfg = tiny_config(*mesh)
        training = build_training(cfg, make_mesh(cfg.mesh, devices[:1] if len(mesh) == 1 else devices))
        states.append(jax.device_get(training.init_state()))
    values = sum(x.size for x in jax.tree.leaves(states[0]))
    assert asked == [("cpu", values)] * 2
    jax.tree.map(np.testing.assert_array_equal, states[0], states[1])
    # The fully optimized program makes the same numbers, to the last bit or so.
    optimized = jax.device_get(jax.jit(lambda: fresh_state(training.task, training.txs, cfg.train.seed))())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), states[0], optimized)


def test_weight_decay_mask_spares_norms_and_embeddings():
    params = {"embed": 0, "final_norm": {"scale": 0}, "layers": {"attn": {"wq": {"kernel": 0}}}}
    assert weight_decay_mask(params, decay_embeddings=False) == {
        "embed": False, "final_norm": {"scale": False}, "layers": {"attn": {"wq": {"kernel": True}}}
    }
    assert weight_decay_mask(params, decay_embeddings=True)["embed"] is True


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_warms_up_then_decays_to_the_floor(decay):
    cfg = tiny_config(f"optimizer.decay={decay}", "optimizer.warmup_steps=10", "optimizer.min_lr_ratio=0.1").optimizer
    lr = learning_rate_schedule(cfg, total_steps=100)
    values = [float(lr(s)) for s in range(101)]
    assert 0 < values[0] < values[5] < values[9]
    np.testing.assert_allclose(values[10], cfg.lr, rtol=1e-6)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    np.testing.assert_allclose(values[100], cfg.lr * 0.1, rtol=1e-5)


def test_a_sample_prompt_longer_than_the_context_is_refused_before_any_step(tmp_path):
    """It was refused only by the end-of-run sample, after every step was trained: no summary.json, and the same
    command failed the same way again."""
    from jaxgen.errors import ConfigError
    from jaxgen.train.loop import train

    with pytest.raises(ConfigError, match=r"^train.sample_prompt is \d+ tokens with BOS, which fills the model's "
                                          r"context \(model.max_seq_len=64\); shorten it, or set "
                                          r"train.sample_tokens=0"):
        train(tiny_config("train.sample_prompt=" + "And God said " * 30), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_sample_longer_than_the_context_leaves_is_named_before_any_step(tmp_path, caplog):
    """`train.sample_tokens=500` with a 64-token context drew a shorter sample without a word."""
    from jaxgen.tasks import make_task

    cfg = tiny_config("train.sample_tokens=500", "train.sample_prompt=And God said")
    with caplog.at_level("WARNING", logger="jaxgen"):
        make_task(cfg, tmp_path).make_data(tmp_path)
    [line] = [r.getMessage() for r in caplog.records if "sample_tokens" in r.getMessage()]
    assert re.fullmatch(r"train.sample_tokens=500: train.sample_prompt leaves room for (\d+) new tokens in the "
                        r"model's context \(model.max_seq_len=64\); the end-of-run sample has \1", line)


def test_a_tensorboard_write_that_fails_names_its_folder(tmp_path):
    """A full disk under tensorboard/ stopped the run with `no space left on device`, naming no file."""
    from unittest import mock

    from jaxgen.errors import describe
    from jaxgen.metrics import TensorBoardFile

    events = TensorBoardFile(tmp_path / "tensorboard", purge_step=0)
    events.add_scalars(1, {"loss": 1.0})
    full = OSError(28, "No space left on device")
    with mock.patch.object(events._events, "flush", side_effect=full), pytest.raises(OSError) as failed:
        events.flush()
    assert failed.value.filename == str(tmp_path / "tensorboard")
    assert describe(failed.value)[0] == f"error: {tmp_path / 'tensorboard'}: no space left on device"
