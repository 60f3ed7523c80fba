"""The diffusion task end to end: held-out loss, overfitting, `jaxgen train`, sample quality figures."""

import json
import re
import shutil

import numpy as np
import pytest
import scipy.linalg

from jaxgen.data.image_batches import held_out_batches
from jaxgen.data.images import open_images
from jaxgen.data.pipeline import to_global
from jaxgen.data.splits import Shard
from jaxgen.metrics import read_metrics
from jaxgen.quality.image_quality import frechet_distance
from jaxgen.sharding import make_mesh
from jaxgen.tasks.diffusion import DiffusionTask
from jaxgen.tasks.layout import held_out_sums
from jaxgen.train.build import build_training
from jaxgen.train.state import sampling_params

from helpers import DIT_CONFIG, error_lines, jaxgen_cli, tiny_dit_config


def test_held_out_batches_carry_a_fixed_time_grid_and_fixed_noise(tmp_path):
    task = DiffusionTask(tiny_dit_config("diffusion.eval_timesteps=4"))
    first, second = task.make_data(tmp_path).eval, task.make_data(tmp_path).eval
    assert len(first) == task.cfg.train.eval_batches
    for a, b in zip(first, second):
        for key in ("images", "labels", "t", "noise"):
            np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_allclose(first[0]["t"][:5], [0.125, 0.375, 0.625, 0.875, 0.125])
    # More times than held-out rows: each row its own time, and no array of all the times (it ran out of memory).
    many = DiffusionTask(tiny_dit_config("diffusion.eval_timesteps=2147483647")).make_data(tmp_path).eval
    np.testing.assert_allclose(many[0]["t"][:2], np.array([0.5, 1.5]) / 2147483647)


def test_overfitting_one_batch_drives_the_loss_near_zero(devices):
    cfg = tiny_dit_config("model.d_model=64", "optimizer.lr=1e-2", "optimizer.warmup_steps=10",
                          "optimizer.decay=constant", "mesh.data=1")
    training = build_training(cfg, make_mesh(cfg.mesh, devices[:1]))
    task = training.task
    batch = task.with_fixed_noise(held_out_batches(open_images(cfg), 16, 1, Shard()))[0]
    batch = to_global(batch, training.mesh)
    state = training.init_state()
    losses = []
    for _ in range(100):
        state, metrics = training.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.02 * losses[0], losses[::20]


def test_rows_padding_the_last_held_out_batch_weigh_nothing(devices):
    cfg = tiny_dit_config("mesh.data=1")
    training = build_training(cfg, make_mesh(cfg.mesh, devices[:1]))
    params = sampling_params(training.init_state())
    [batch] = training.task.with_fixed_noise(held_out_batches(open_images(cfg), 16, 1, Shard()))
    padded = {**batch, "weights": (np.arange(16) < 8).astype(np.float32)}  # as if only 8 images were left
    first_rows = {key: field[:8] for key, field in batch.items()}
    loss, weight = held_out_sums(training.eval_step, params, [to_global(padded, training.mesh)])
    expected, expected_weight = held_out_sums(training.eval_step, params, [to_global(first_rows, training.mesh)])
    assert weight == expected_weight == 8 and loss == pytest.approx(expected, rel=1e-5)


def test_samples_are_drawn_in_batches_of_one_compiled_size(devices, monkeypatch):
    monkeypatch.setattr("jaxgen.tasks.diffusion.SAMPLE_BATCH", 4)  # bounds the sampler's batch, however many are asked
    cfg = tiny_dit_config("mesh.data=1", "diffusion.sample_steps=2")
    training = build_training(cfg, make_mesh(cfg.mesh, devices[:1]))
    task, weights = training.task, training.layout.models.weights(sampling_params(training.init_state()))
    labels = np.full(10, 3)
    made = []  # each batch's condition is made as it is drawn (a frozen text encoder embeds 64 captions at a time)
    requested = task.conditions.requested
    monkeypatch.setattr(task.conditions, "requested",
                        lambda weights, rows: made.append(len(rows)) or requested(weights, rows))
    images = task.draw(weights, labels, seed=3, scale=2.0)
    assert images.shape == (10, 8, 8, 1) and made == [4, 4, 4]
    # Each batch is its own draw: the first four are those of a request of four; the next (the same label) differ.
    np.testing.assert_array_equal(task.draw(weights, labels[:4], seed=3, scale=2.0), images[:4])
    assert not np.allclose(images[4:8], images[:4])
    [sampler] = task._samplers.values()
    assert sampler._cache_size() == 1  # both requests ran as batches of 4: one program


def test_a_grid_of_many_images_wraps_and_stays_viewable_and_non_finite_images_are_refused(caplog):
    """100,000 images of one label made a 5,700,001x58 PNG no viewer opens; NaN images were written as black."""
    from jaxgen.diffusion.grid import MAX_GRID_SIDE, image_grid
    from jaxgen.errors import NonFiniteError

    cell = 33  # 8x8 digits enlarged 4x, plus a one-pixel gap
    assert image_grid(np.zeros((30, 8, 8, 1)), rows=10).shape == (10 * cell + 1, 3 * cell + 1, 3)  # as it was
    wrapped = image_grid(np.zeros((2 * 400, 8, 8, 1)), rows=2)  # 248 columns fit: each label wraps onto 2 rows
    assert wrapped.shape == (2 * (2 * cell + cell // 4) - cell // 4 + 1, 248 * cell + 1, 3)
    with caplog.at_level("WARNING", logger="jaxgen"):
        capped = image_grid(np.zeros((100_000, 8, 8, 1)), rows=1)
    assert max(capped.shape[:2]) <= MAX_GRID_SIDE
    assert "the grid shows 61,504 of the 100,000 images of each row" in caplog.text
    assert "--save-array keeps them all" in caplog.text
    images = np.zeros((6, 8, 8, 1), np.float32)
    images[4, 2, 2, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"^1 of the 6 images drawn hold NaN or infinite values: the model, or its "
                                             r"sampler with these settings, diverged .*; nothing was written$"):
        image_grid(images, rows=2)
    assert image_grid(images, rows=2, finite_only=False).shape == (2 * cell + 1, 3 * cell + 1, 3)  # training's grid


@pytest.mark.parametrize("overrides, options, says", [
    ([], {"sampler": "ddpm", "steps": None},
     "--sampler ddpm does not fit this run's diffusion.objective='flow'; valid: euler, heun"),
    ([], {"sampler": None, "steps": 100_000_000},
     "--steps 100,000,000 is more than jaxgen samples a flow model with; "
     "give --steps 1 to 1,000"),
    (["diffusion.objective=eps", "diffusion.sampler=ddim", "diffusion.timesteps=50"], {"sampler": None, "steps": 51},
     "--steps 51 is more than the run's diffusion.timesteps=50; give --steps 1 to 50"),
])
def test_sampler_options_are_refused_naming_the_flag_before_the_checkpoint_is_read(overrides, options, says):
    """`--sampler ddpm` on a flow run was 'invalid config: ... diffusion.sampler'; `--steps 100000000` ran for ever."""
    from jaxgen.errors import UsageError
    from jaxgen.outputs.sample import check_sampler

    with pytest.raises(UsageError) as refusal:
        check_sampler(tiny_dit_config(*overrides), options)
    assert str(refusal.value) == says
    check_sampler(tiny_dit_config(), {"sampler": "euler", "steps": 1000})


def test_frechet_distance_matches_the_matrix_square_root_formula():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 5))
    b = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 5)) + 0.5
    mu_a, mu_b, ca, cb = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    np.testing.assert_allclose(frechet_distance(a, b), expected, rtol=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-9
    np.testing.assert_allclose(frechet_distance(a, a + 2.0), 5 * 4.0, rtol=1e-9)


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dit") / "run"
    result = jaxgen_cli("train", "--config", str(DIT_CONFIG), "--run-dir", str(run_dir), "model.size=null",
                        "model.d_model=32", "model.n_layers=2", "model.freq_dim=32", "data.batch_size=32",
                        "train.steps=10", "train.eval_every=5", "logging.every=5", "mesh.fsdp=2",
                        "diffusion.samples_per_class=3", "diffusion.sample_steps=4", "diffusion.quality_eval=false")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_jaxgen_train_writes_a_sample_grid_one_row_per_class(dit_run):
    import matplotlib.image

    summary = json.loads((dit_run / "summary.json").read_text())
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    assert summary["images_per_s_median"] > 0
    grid = matplotlib.image.imread(dit_run / "samples" / "final.png")
    cell = 33  # 8x8 digits enlarged 4x, plus a one-pixel gap
    assert grid.shape[:2] == (10 * cell + 1, 3 * cell + 1)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(dit_run / "tensorboard"))
    events.Reload()
    assert "samples" in events.Tags()["images"]


def test_jaxgen_sample_writes_a_grid_and_the_arrays_from_the_ema(dit_run, tmp_path):
    result = jaxgen_cli("sample", "--run-dir", str(dit_run), "--labels", "0,3,7", "--num-per-label", "2",
                        "--guidance", "2", "--steps", "4", "--out", str(tmp_path / "grid.png"),
                        "--save-array", str(tmp_path / "samples.npz"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded ema_params/model" in result.stderr
    arrays = np.load(tmp_path / "samples.npz")
    assert arrays["images"].shape == (6, 8, 8)
    assert 0 <= arrays["images"].min() and arrays["images"].max() <= 1
    assert arrays["labels"].tolist() == [0, 0, 3, 3, 7, 7]
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    bad = jaxgen_cli("sample", "--run-dir", str(dit_run), "--labels", "0,12")
    assert bad.returncode == 2 and "each label must be in 0..9" in bad.stderr
    # Drawn in batches but held whole: a grid no host holds is refused before the model is read (it drew
    # for minutes, then took the host's memory).
    huge = jaxgen_cli("sample", "--run-dir", str(dit_run), "--labels", "0,3", "--num-per-label", "1000000000000")
    assert huge.returncode == 2 and "loaded" not in huge.stderr
    assert re.search(r"error: --num-per-label 1000000000000 for 2 labels asks for 2,000,000,000,000 images, about "
                     r"1.15 PB held at once for the grid, more than the .* this host has available \(room for at "
                     r"most [\d,]+\)$", error_lines(huge.stderr)[0])
    every = jaxgen_cli("sample", "--run-dir", str(dit_run), "--num-per-label", "1", "--steps", "2",
                       "--save-array", str(tmp_path / "every.npz"))  # no --labels: one row per class
    assert every.returncode == 0, every.stderr[-3000:]
    assert np.load(tmp_path / "every.npz")["labels"].tolist() == list(range(10))


def test_jaxgen_eval_reports_the_loops_held_out_loss_and_sample_quality(dit_run):
    result = jaxgen_cli("eval", "--run-dir", str(dit_run))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    logged = [r["eval_loss"] for r in read_metrics(dit_run / "metrics.jsonl") if r["step"] == 10 and "eval_loss" in r]
    assert report["eval_loss"] == pytest.approx(logged[0], rel=1e-6)
    assert {"frechet_distance", "frechet_floor", "conditional_accuracy"} <= set(report)


def test_a_resumed_dit_refuses_another_objective_and_names_its_held_out_rows_as_images(dit_run, tmp_path):
    """`diffusion.objective: flow -> eps` on resume only warned: the network went on learning another target from
    weights that predict the first. A changed data.batch_size was explained in tokens of data.seq_len."""
    run_dir = tmp_path / "run"
    shutil.copytree(dit_run, run_dir)
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    refused = jaxgen_cli("train", "--run-dir", str(run_dir), "train.steps=11", "diffusion.objective=eps",
                         "diffusion.sampler=ddim")
    assert refused.returncode == 2
    assert error_lines(refused.stderr) == [
        "jaxgen: error: diffusion.objective='eps': the run's step 10 was trained to predict for "
        "diffusion.objective='flow', and continuing would train the same output toward another target; give "
        "diffusion.objective='flow' to continue it, or fine-tune for 'eps' in a new --run-dir with "
        "checkpoint.init_from=RUN_DIR"]
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
    resumed = jaxgen_cli("train", "--run-dir", str(run_dir), "train.steps=11", "data.batch_size=16")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("data.batch_size changed: the held-out set is train.eval_batches batches of data.batch_size images, so "
            "eval_loss from step 10 on is measured on another set than before") in resumed.stderr
