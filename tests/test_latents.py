"""Latent caching: a frozen autoencoder encodes and decodes as its own task reconstructs, the scale gives the
training latents unit variance, `jaxgen data prepare --images` stores exactly the latents (labels, captions)
encoding on the fly gives, and every user mistake is one line."""

import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from jaxgen.cli import run_command
from jaxgen.config import Config
from jaxgen.data.image_batches import part_examples
from jaxgen.data.images import open_images
from jaxgen.data.latent_dataset import MANIFEST, open_latent_images, read_manifest
from jaxgen.data.splits import Shard
from jaxgen.data.synth_shapes import write_shapes_folder
from jaxgen.diffusion.latents import measure_scale
from jaxgen.errors import ConfigError, DataError, JaxgenError, describe
from jaxgen.outputs.frozen_autoencoder import load_autoencoder
from jaxgen.outputs.latent_dataset_writer import prepare_latent_dataset
from jaxgen.outputs.runs import open_run, save_imported_run
from jaxgen.tasks import make_task
from jaxgen.tasks.layout import fresh_params

from helpers import jaxgen_cli, run_jaxgen, start_jaxgen, wait_for

# 16x16 RGB images -> 8x8x4 latents; the 32 px shapes folder is scaled down as training would read it.
AE = {"kind": "autoencoder", "image_size": 16, "channels": 3, "block_channels": (8, 16), "norm_groups": 4,
      "latent_channels": 4, "layers_per_block": 1}


def images_config(folder) -> dict:
    return {"source": "folder", "folder": str(folder)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A captioned shapes folder, an autoencoder run of random weights (checkpoint 0) and its latent dataset."""
    root = tmp_path_factory.mktemp("latents")
    write_shapes_folder(root / "shapes", 40, size=32)
    cfg = Config(model=AE, images=images_config(root / "shapes"))
    params = jax.jit(lambda: fresh_params(make_task(cfg), 0))()
    (root / "ae").mkdir()
    save_imported_run(root / "ae", cfg, params, "tests/test_latents.py", inputs={})
    result = jaxgen_cli("data", "prepare", "--images", f"folder:{root / 'shapes'}", "--autoencoder",
                        str(root / "ae"), "--out", str(root / "latents"))
    assert result.returncode == 0, result.stderr[-2000:]
    return root, cfg, load_autoencoder(root / "ae"), json.loads(result.stdout)


def test_decoding_the_encoding_is_the_autoencoders_reconstruction(world):
    root, cfg, ae, _ = world
    images = part_examples(open_images(cfg), "eval")["images"]
    run = open_run(root / "ae")
    expected = np.clip(run.task.reconstruct(run.weights, images), -1, 1)
    for scale in (1.0, 0.37):
        np.testing.assert_allclose(ae.with_scale(scale).decode(ae.with_scale(scale).encode(images)), expected,
                                   rtol=0, atol=1e-5)
    assert ae.digest == load_autoencoder(root / "ae").digest and len(ae.digest) == 64


def latent_source(directory, **model):
    """The latent dataset `directory` opened for a DiT of 8x8x4 inputs (or `model`'s)."""
    cfg = Config(model={"kind": "dit", "image_size": 8, "channels": 4, **model},
                 images={"source": "latents", "latents": str(directory)})
    return open_latent_images(cfg.images, cfg.model)


def test_the_dataset_holds_the_latents_of_the_images_in_order_with_labels_and_captions(world):
    root, cfg, ae, manifest = world
    source = open_images(cfg)
    train = part_examples(source, "train")["images"]
    assert manifest["scale"] == pytest.approx(measure_scale(ae.with_scale(1.0).encode(train)))
    scaled = ae.with_scale(manifest["scale"])
    assert np.std(scaled.encode(train)) == pytest.approx(1.0, rel=1e-4)
    assert manifest == read_manifest(root / "latents")
    assert (manifest["latent_shape"], manifest["shift"], manifest["captions"]) == ([8, 8, 4], 0.0, True)
    assert manifest["autoencoder"] == {"run_dir": str((root / "ae").resolve()), "step": 0, "digest": ae.digest}
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no lock, no partial directory left

    latents = latent_source(root / "latents", num_classes=manifest["num_classes"])
    for part in ("train", "eval"):
        originals = list(source.records(part, Shard(), None, epochs=1))
        records = [latents.parts[part][i] for i in range(latents.size(part))]
        assert manifest["counts"][part] == len(records) == len(originals)
        stored = np.stack([r["image"] for r in records])
        assert stored.dtype == np.float32 and stored.shape[1:] == (8, 8, 4)
        np.testing.assert_allclose(stored, scaled.encode(part_examples(source, part)["images"]), rtol=0, atol=1e-6)
        assert [int(r["label"]) for r in records] == [int(o["label"]) for o in originals]
        assert [r["caption"] for r in records] == [o["caption"] for o in originals]
        assert all(r["caption"] for r in records)
    # What training reads: the float records pass through as they are.
    np.testing.assert_array_equal(part_examples(latents, "eval")["images"], stored)


def test_a_recorded_scale_is_used(world, tmp_path):
    root, cfg, ae, _ = world
    run = tmp_path / "sd_vae"
    shutil.copytree(root / "ae", run)
    (run / "config.yaml").write_text(
        Config(model={**AE, "scaling_factor": 0.25, "shift_factor": 0.5}, images=cfg.images).to_yaml())
    recorded = load_autoencoder(run)
    assert (recorded.scale, recorded.shift) == (0.25, 0.5)
    manifest = prepare_latent_dataset(f"folder:{cfg.images.folder}", run, tmp_path / "latents", progress=False)
    assert (manifest["scale"], manifest["shift"]) == (0.25, 0.5) and "scaling_factor" in manifest["scale_from"]
    image = part_examples(open_images(cfg), "train", limit=1)["images"]
    np.testing.assert_allclose(latent_source(tmp_path / "latents").parts["train"][0]["image"],
                               (ae.with_scale(1.0).encode(image)[0] - 0.5) * 0.25, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model, message", [
    ({"image_size": 16}, "holds 8x8x4 latents, but model.image_size=16, model.channels=4; "
                         "set model.image_size=8, model.channels=4"),
    ({"channels": 3}, "set model.image_size=8, model.channels=4"),
    ({"num_classes": 2}, "classes, more than model.num_classes=2; set model.num_classes="),
])
def test_the_reader_refuses_a_model_of_another_shape(world, model, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        latent_source(world[0] / "latents", **model)


def test_the_reader_refuses_an_unfinished_or_missing_dataset(world, tmp_path):
    killed = tmp_path / "killed"  # what a prepare killed before its last file holds
    shutil.copytree(world[0] / "latents", killed)
    (killed / MANIFEST).unlink()
    with pytest.raises(DataError, match=re.escape("is not a finished latent dataset (no latents.json)")):
        latent_source(killed)
    with pytest.raises(DataError, match="does not exist; write one with jaxgen data prepare --images"):
        latent_source(tmp_path / "none")


def test_a_damaged_dataset_file_is_named_in_one_line(world, tmp_path):
    root, _, _, manifest = world
    shutil.copytree(root / "latents", tmp_path / "latents")
    damaged = tmp_path / "latents" / manifest["files"]["train"][0]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 10] ^= 0xFF  # one byte of the first chunk's data
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError) as refused:
        source = latent_source(tmp_path / "latents")
        [source.parts["train"][i] for i in range(len(source.parts["train"]))]
    message, _ = describe(refused.value)
    assert f"{str(damaged)!r} is damaged" in message and "prepare the dataset again" in message
    assert "\n" not in message
    os.truncate(damaged, len(data) // 2)  # cut short: its reader failed as it opened, naming no file
    with pytest.raises(DataError) as refused:
        latent_source(tmp_path / "latents")
    message, _ = describe(refused.value)
    assert f"{str(damaged)!r} is damaged" in message and "\n" not in message


def test_prepare_refuses_mistakes_in_one_line(world, tmp_path):
    root = world[0]
    shapes, ae = f"folder:{root / 'shapes'}", str(root / "ae")
    lm_run = tmp_path / "lm"
    lm_run.mkdir()
    (lm_run / "config.yaml").write_text(Config().to_yaml())
    cases = [
        (["--images", shapes, "--autoencoder", str(lm_run)], "trains model.kind='transformer'; latent diffusion "
                                                              "needs an autoencoder run"),
        (["--images", "pictures", "--autoencoder", ae], "--images 'pictures' names no image dataset; give "
                                                        "folder:DIR, idx:DIR, tfds:NAME, digits or shapes"),
        (["--images", "digits", "--autoencoder", ae], "--images digits holds 8x8x1 images, but the autoencoder"),
        (["--images", shapes], "--images SOURCE needs --autoencoder RUN_DIR"),
        (["--images", shapes, "--autoencoder", ae, "--input", "x.txt", "--field", "body"],
         "--input, --field are options of text datasets"),
        (["--autoencoder", ae], "--autoencoder go with --images SOURCE"),
        ([], "give --input GLOB (a text dataset) or --images SOURCE --autoencoder RUN_DIR"),
        (["--images", shapes, "--autoencoder", ae, "--out", str(root / "latents")],  # a second prepare
         f"--out {str(root / 'latents')!r} already exists; choose a new directory"),
    ]
    for args, message in cases:
        with pytest.raises(JaxgenError) as caught:
            run_command(["data", "prepare", "--out", str(tmp_path / "out"), *args])  # a later --out wins
        line, status = describe(caught.value)
        assert status == 2 and "\n" not in line and message in line, (args, line)
    assert not (tmp_path / "out").exists()


def test_a_full_disk_or_a_kill_during_prepare_leaves_nothing_and_a_rerun_finishes(world, tmp_path):
    root = world[0]
    out = tmp_path / "latents"
    args = ("data", "prepare", "--images", f"folder:{root / 'shapes'}", "--autoencoder", str(root / "ae"),
            "--out", str(out))
    full = run_jaxgen(*args, file_size_limit=4096)  # the latents need ~40 KiB
    assert full.returncode != 0 and "Traceback" not in full.stderr
    assert full.stderr.strip().splitlines()[-1] == (f"jaxgen: error: {out}/latents-train-00000.unnumbered: file too "
                                                    "large (a file-size limit was reached)")
    assert list(tmp_path.iterdir()) == [], "a full disk left a partial dataset"
    killed = start_jaxgen(*args)
    wait_for(lambda: any(tmp_path.iterdir()), what="the prepare to start writing")  # under a hidden name
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not out.exists(), "a killed prepare left a dataset under the final name"
    rerun = run_jaxgen(*args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert read_manifest(out)["counts"] == read_manifest(root / "latents")["counts"]
