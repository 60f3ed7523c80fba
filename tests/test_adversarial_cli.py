"""The autoencoder and GAN configs through the CLI, as users run them: train, die, resume, sample, evaluate.

Each family trains its shipped config (shrunk) on a small IDX dataset written
here, straight through and again killed right after a checkpoint and resumed:
the resumed run's losses, parameters, averages and both optimizers' states
equal the straight run's bit for bit.
"""

import json
import os
import pathlib
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest
from PIL import Image

from jaxgen.config import load_config
from jaxgen.errors import UsageError
from jaxgen.metrics import read_metrics
from jaxgen.tasks import make_task

from helpers import saved_state
from test_image_folders import write_idx

REPO = pathlib.Path(__file__).resolve().parents[1]
DRIVER = pathlib.Path(__file__).with_name("crash_driver.py")
SHORT = ["train.steps=6", "checkpoint.every=3", "logging.every=1", "train.eval_every=6", "data.batch_size=8",
         "train.eval_batches=1", "logging.progress_bar=false"]
FAMILIES = {
    "autoencoder": ["--config", "configs/vae_fashion.yaml", "model.block_channels=[8,8,8]", "model.norm_groups=4",
                    "autoencoder.adversarial.channels=8", "autoencoder.adversarial.start_step=2",
                    "autoencoder.sample_every=3", "autoencoder.sample_images=4"],
    "gan": ["--config", "configs/gan_fashion.yaml", "model.generator_channels=[16,8,8]",
            "model.discriminator_channels=[8,8,16]", "model.noise_dim=16", "gan.ema_warmup=0",
            "gan.sample_every=3", "gan.samples_per_class=2"],
}


def jaxgen(*args, driver=None, timeout=400, cache=None):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           **({"JAXGEN_CACHE": str(cache)} if cache else {})}
    prefix = [sys.executable, str(DRIVER), *driver, "--"] if driver else [sys.executable, "-m", "jaxgen"]
    return subprocess.run([*prefix, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fashion_like(tmp_path_factory):
    """A 28x28 IDX dataset in 10 classes: each class a bright bar at its own height on noise."""
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 96), ("t10k", 24)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 60, (count, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label:5 + 2 * label, 4:24] = 230
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def train_args(family, run_dir, data):
    return ["train", *FAMILIES[family], "--run-dir", str(run_dir), f"images.idx={data}", *SHORT]


def losses(run_dir):
    """Every phase's loss and gradient norm, per logged step (not the throughput, which differs run to run)."""
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "mfu")}
            for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def trained(fashion_like, tmp_path_factory):
    """family -> (straight run, resumed run), each family trained on first use."""
    runs = {}

    def train(family):
        if family not in runs:
            root = tmp_path_factory.mktemp(family)
            straight, crashed = root / "straight", root / "crashed"
            done = jaxgen(*train_args(family, straight, fashion_like))
            assert done.returncode == 0, done.stderr[-3000:]
            died = jaxgen(*train_args(family, crashed, fashion_like), driver=["after-commit", "3"])
            assert died.returncode == 137, died.stderr[-3000:]
            resumed = jaxgen(*train_args(family, crashed, fashion_like))
            assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
            runs[family] = straight, crashed
        return runs[family]

    return train


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_killed_run_resumes_bit_identically_with_both_optimizers_and_the_average(trained, family):
    straight, crashed = trained(family)
    assert losses(crashed)[-3:] == losses(straight)[-3:]  # bit-identical floats
    assert {"loss", "discriminator_loss", "discriminator_grad_norm"} <= set(losses(straight)[-1])
    expected, got = saved_state(straight, 6), saved_state(crashed, 6)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert set(expected.opt_state) == {"discriminator", "model" if family == "autoencoder" else "generator"}
    assert set(expected.ema_params) == (set() if family == "autoencoder" else {"generator"})
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["eval_loss_final"] > 0 and pathlib.Path(summary["samples"]).is_file()
    grids = sorted(p.name for p in (straight / "samples").iterdir())
    assert grids == ["final.png", "step_0000003.png", "step_0000006.png"]


def test_the_autoencoder_reconstructs_given_images(trained, tmp_path):
    run, _ = trained("autoencoder")
    for i, size in enumerate((28, 40, 64)):  # other sizes are scaled and centre-cropped, as training images
        Image.fromarray(np.full((size, size + 8), 40 * i, np.uint8)).save(tmp_path / f"in{i}.png")
    out, arrays = tmp_path / "grid.png", tmp_path / "rec.npz"
    done = jaxgen("sample", "--run-dir", str(run), "--images", str(tmp_path / "in*.png"), "--out", str(out),
                  "--save-array", str(arrays))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["images"] == 3 and Image.open(out).size[1] > 2 * 28
    with np.load(arrays) as saved:
        assert saved["images"].shape == saved["reconstructions"].shape == (3, 28, 28)
        assert 0 <= saved["reconstructions"].min() and saved["reconstructions"].max() <= 1
    wrong = jaxgen("sample", "--run-dir", str(run), "--labels", "1")
    assert wrong.returncode == 2 and "--labels cannot be used" in wrong.stderr and "--images" in wrong.stderr
    # An output that is one of the inputs is refused before the model is read (the grid replaced the image).
    before = (tmp_path / "in1.png").read_bytes()
    over = jaxgen("sample", "--run-dir", str(run), "--images", str(tmp_path / "in*.png"), "--out",
                  str(tmp_path / "in1.png"))
    assert over.returncode == 2 and "loaded" not in over.stderr
    assert over.stderr.strip().splitlines()[-1] == (f"jaxgen: error: --out '{tmp_path / 'in1.png'}' is one of the "
                                                    "--images files, which it would overwrite; give another path")
    assert (tmp_path / "in1.png").read_bytes() == before
    none = jaxgen("sample", "--run-dir", str(run), "--images", str(tmp_path / "nothing*.png"))
    assert none.returncode != 0 and "matches no files" in none.stderr.strip().splitlines()[-1]
    # More images than the host holds (here a host with room for 5 of these images) are refused before any is read.
    task = make_task(load_config(run / "config.yaml"))
    with mock.patch("jaxgen.device_memory.host_available_bytes", return_value=5 * 28 * 28 * 9):
        with pytest.raises(UsageError, match=r"--images '.*in\*.png' \(3 files, each with its reconstruction\) asks "
                                             r"for 6 images, about 42.3 kB held at once for the grid, more than the "
                                             r"35.3 kB this host has available \(room for at most 5\)"):
            task.check_sample_options({"images": str(tmp_path / "in*.png")})
    # Nor outputs their disk has no room for: found full only once drawn, the images were lost.
    with mock.patch("jaxgen.tasks.image_outputs.shutil.disk_usage", return_value=mock.Mock(free=1000)):
        with pytest.raises(UsageError, match=r"^--save-array '.*s.npz': --images '.*in\*.png' \(3 files, each with its "
                                             r"reconstruction\) takes up to [\d.]+ kB there, and its disk has 1 kB "
                                             r"free; free space or write it elsewhere$"):
            task.check_sample_options({"images": str(tmp_path / "in*.png"), "save_array": str(tmp_path / "s.npz")})
        with pytest.raises(UsageError, match=r"^--out '.*g.png': "):
            task.check_sample_options({"images": str(tmp_path / "in*.png"), "out": str(tmp_path / "g.png")})


def test_the_gan_draws_grids_for_the_labels_asked(trained, tmp_path):
    run, _ = trained("gan")
    arrays = tmp_path / "s.npz"
    done = jaxgen("sample", "--run-dir", str(run), "--labels", "0,3", "--num-per-label", "2", "--save-array",
                  str(arrays), "--out", str(tmp_path / "g.png"))
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(arrays) as saved:
        assert saved["images"].shape == (4, 28, 28) and list(saved["labels"]) == [0, 0, 3, 3]
    bad = jaxgen("sample", "--run-dir", str(run), "--labels", "12")
    assert bad.returncode != 0 and "each label must be in 0..9" in bad.stderr.strip().splitlines()[-1]


def test_eval_scores_reconstructions_beside_pca_and_samples_beside_the_real_data_floor(trained, tmp_path):
    autoencoder, _ = trained("autoencoder")
    done = jaxgen("eval", "--run-dir", str(autoencoder), cache=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["pca_components"] == 7 * 7 * 4
    for figure in ("psnr_db", "ssim", "frechet_distance_to_originals"):
        assert np.isfinite(report[f"model_{figure}"]) and np.isfinite(report[f"pca_{figure}"])
    assert report["eval_loss"] > 0

    gan, _ = trained("gan")
    done = jaxgen("eval", "--run-dir", str(gan), cache=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["frechet_distance"] > report["frechet_floor"] >= 0  # six steps make no Fashion-MNIST
    assert 0 <= report["conditional_accuracy"] <= 1 and report["classifier_heldout_accuracy"] > 0.5
    assert list(tmp_path.iterdir())  # the classifier was cached where JAXGEN_CACHE says
