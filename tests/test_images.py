"""Image sources for diffusion runs: digits, shapes and a TFDS dataset this test prepares itself
(ArrayRecord, no download, no TensorFlow), all through the same grain pipeline: scaled to
[-1, 1], shuffled, sharded per process, optionally mirrored, resumable; one clear error each
for a dataset that cannot serve the model."""

import io
import json
import shutil
import tempfile
from unittest import mock

import numpy as np
import pytest

from jaxgen.data.image_batches import held_out_batches, image_set, train_batches
from jaxgen.data.images import make_shapes, open_images
from jaxgen.data.pipeline import merged_position
from jaxgen.data.splits import Shard
from jaxgen.data.tfds_builders import might_be_prepared
from jaxgen.errors import ConfigError, DataError

from helpers import DIT_CONFIG, as_tfrecord_dataset, assert_same_batches, jaxgen_cli, take, tiny_dit_config

tfds = pytest.importorskip("tensorflow_datasets")

TRAIN_RECORDS, TEST_RECORDS = 40, 12


def marked_image(i: int, height: int, width: int) -> np.ndarray:
    """Random grey pixels with the record number in the top-left corner and both extremes present."""
    pixels = np.random.default_rng(i).integers(0, 256, (height, width, 1), dtype=np.uint8)
    pixels[0, 0, 0], pixels[0, 1, 0], pixels[0, 2, 0] = i, 0, 255
    return pixels


class TinyImagesConfig(tfds.core.BuilderConfig):
    def __init__(self, *, width: int, as_tensor: bool, **kwargs):
        super().__init__(**kwargs)
        self.width, self.as_tensor = width, as_tensor


class TinyImages(tfds.core.GeneratorBasedBuilder):
    """8x8 grey images in 10 classes (the digits DiT's shape): `tensor` stores raw uint8 tensors, `wide` 8x6 PNGs."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        TinyImagesConfig(name="png", width=8, as_tensor=False),
        TinyImagesConfig(name="tensor", width=8, as_tensor=True),
        TinyImagesConfig(name="wide", width=6, as_tensor=False),
    ]

    def _info(self):
        shape = (8, self.builder_config.width, 1)
        image = (tfds.features.Tensor(shape=shape, dtype=np.uint8) if self.builder_config.as_tensor
                 else tfds.features.Image(shape=shape, encoding_format="png"))
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": image, "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(TRAIN_RECORDS)),
                "test": self._generate_examples(range(100, 100 + TEST_RECORDS))}

    def _generate_examples(self, numbers):
        import PIL.Image

        for i in numbers:
            pixels = marked_image(i, 8, self.builder_config.width)
            if not self.builder_config.as_tensor:  # PNG bytes made by PIL: tfds would encode with TensorFlow
                png = io.BytesIO()
                PIL.Image.fromarray(pixels[..., 0]).save(png, format="png")
                pixels = png.getvalue()
            yield i, {"image": pixels, "label": i % 10}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    # tfds makes an empty scratch directory per unprepared builder in the system's temp dir and
    # never removes it: here it goes under pytest's own temporary directory instead.
    with mock.patch.object(tempfile, "tempdir", str(tmp_path_factory.mktemp("tfds-scratch"))):
        for config in ("png", "tensor", "wide"):
            TinyImages(data_dir=str(data_dir), config=config, file_format="array_record").download_and_prepare()
    return data_dir


def tfds_config(data_dir, *overrides, name="tiny_images/png"):
    return tiny_dit_config("images.source=tfds", f"images.tfds={name}", f"images.tfds_data_dir={data_dir}",
                           "data.batch_size=8", *overrides)


def corner_marks(batches) -> list[int]:
    """Record numbers from the top-left pixels (scaled back from [-1, 1])."""
    return [int(round((x + 1) * 127.5)) for batch in batches for x in batch["images"][:, 0, 0, 0]]


# ----------------------------------------------------------------------------- built-in sources


def test_digits_are_exact_and_split_every_fifth():
    source = open_images(tiny_dit_config())
    train, held = image_set(source, "train"), image_set(source, "eval")
    assert len(train) + len(held) == 1797 and len(held) == 359
    assert held.images.shape == (359, 8, 8, 1) and held.images.dtype == np.float32
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(held.images[0, ..., 0], load_digits().images[4] / 8.0 - 1.0)
    assert sorted(set(train.labels.tolist())) == list(range(10))


def test_shapes_are_reproducible_uint8_rgb_pictures_of_six_classes():
    a, b = make_shapes(60, seed=3), make_shapes(60, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.shape == (60, 32, 32, 3) and a.images.dtype == np.uint8
    assert np.bincount(a.labels).tolist() == [10] * 6
    assert not np.array_equal(a.images, make_shapes(60, seed=4).images)
    # Every picture has a foreground: some pixels differ clearly from the background corner.
    corner = a.images[:, :1, :1].astype(int)
    assert np.all(np.abs(a.images.astype(int) - corner).max(axis=(1, 2, 3)) > 25)
    cfg = tiny_dit_config("images.source=shapes", "images.shapes_count=60", "model.image_size=32",
                          "model.channels=3", "model.num_classes=6", "images.hflip=true")
    batch = next(train_batches(open_images(cfg), cfg, Shard()))
    assert batch["images"].shape == (16, 32, 32, 3) and -1 <= batch["images"].min() <= batch["images"].max() <= 1


def test_digit_batches_mirror_half_the_images_and_resume_exactly():
    plain, mirrored = (tiny_dit_config("data.batch_size=64", f"images.hflip={flip}") for flip in ("false", "true"))
    p, f = (next(train_batches(open_images(cfg), cfg, Shard())) for cfg in (plain, mirrored))
    assert f["images"].dtype == np.float32 and f["labels"].dtype == np.int32
    np.testing.assert_array_equal(f["labels"], p["labels"])  # the same records, in the same order
    flipped = [np.array_equal(fi, pi[:, ::-1]) and not np.array_equal(fi, pi) for fi, pi in zip(f["images"], p["images"])]
    assert all(flipped[i] or np.array_equal(f["images"][i], p["images"][i]) for i in range(64))
    assert 10 < sum(flipped) < 54

    batches = train_batches(open_images(mirrored), mirrored, Shard())
    take(batches, 30)  # into the second epoch of 1438 training digits
    state = json.loads(json.dumps(batches.get_state()))  # as a checkpoint stores it
    expected = take(batches, 5)
    resumed = train_batches(open_images(mirrored), mirrored, Shard())
    resumed.set_state(state)
    assert_same_batches(take(resumed, 5), expected)


def test_held_out_batches_hold_every_held_out_image_once_and_a_set_smaller_than_a_batch_is_refused():
    source = open_images(tiny_dit_config())
    batches = held_out_batches(source, 64, 100, Shard())  # 359 held-out digits: 6 batches, the last padded
    weights = np.concatenate([batch["weights"] for batch in batches])
    assert len(batches) == 6 and weights.tolist() == [1.0] * 359 + [0.0] * 25
    np.testing.assert_array_equal(np.concatenate([batch["images"] for batch in batches])[:359],
                                  image_set(source, "eval").images)
    fewer = held_out_batches(source, 64, 2, Shard())  # train.eval_batches=2: the first 128, still each once
    assert_same_batches(fewer, batches[:2])
    with pytest.raises(DataError, match=r"^the held-out part of digits holds 359 images, fewer than one batch of "
                                        r"data.batch_size=512; hold out more with a smaller images.eval_every_nth "
                                        r"\(now 5\)$"):
        held_out_batches(source, 512, 1, Shard())


def test_two_processes_hold_the_rows_of_one_process_and_resume_its_position():
    cfg = tiny_dit_config("data.batch_size=16", "images.hflip=true")
    one = train_batches(open_images(cfg), cfg, Shard())
    halves = [train_batches(open_images(cfg), cfg, Shard(i, 2)) for i in range(2)]
    for whole, *parts in zip(take(one, 3), *(take(h, 3) for h in halves)):
        assert_same_batches([whole], [{k: np.concatenate([p[k] for p in parts]) for k in whole}])
    position = merged_position([json.loads(json.dumps(h.get_state())) for h in halves])
    resumed = train_batches(open_images(cfg), cfg, Shard())
    resumed.set_state(position)
    assert_same_batches(take(resumed, 2), take(one, 2))


# ----------------------------------------------------------------------------- a TFDS dataset


@pytest.mark.parametrize("name", ["tiny_images/png", "tiny_images/tensor"])
def test_tfds_images_come_scaled_shuffled_and_whole(tfds_dir, name):
    cfg = tfds_config(tfds_dir, name=name)
    source = open_images(cfg)
    assert (source.size("train"), source.size("eval")) == (TRAIN_RECORDS, TEST_RECORDS)
    batches = train_batches(source, cfg, Shard())
    epoch = take(batches, TRAIN_RECORDS // 8)
    batch = epoch[0]
    assert batch["images"].shape == (8, 8, 8, 1) and batch["images"].dtype == np.float32
    assert batch["labels"].dtype == np.int32
    assert batch["images"].min() == -1.0 and batch["images"].max() == 1.0
    marks = corner_marks(epoch)
    assert sorted(marks) == list(range(TRAIN_RECORDS)) and marks != sorted(marks)  # one shuffled epoch
    i = marks[0]
    np.testing.assert_allclose(batch["images"][0], marked_image(i, 8, 8) / 127.5 - 1.0, atol=1e-6)
    assert batch["labels"][0] == i % 10
    assert corner_marks(take(batches, TRAIN_RECORDS // 8)) != marks  # the next epoch in another order
    again = train_batches(open_images(cfg), cfg, Shard())
    assert_same_batches(take(again, 3), epoch[:3])


def test_tfds_processes_read_disjoint_shares_and_the_same_held_out_batches(tfds_dir):
    cfg = tfds_config(tfds_dir, "train.eval_batches=2")
    source = open_images(cfg)
    # Each of two processes holds 20 records: one epoch is 5 batches of its 4 rows.
    shares = [set(corner_marks(take(train_batches(source, cfg, Shard(i, 2)), 5))) for i in range(2)]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(range(TRAIN_RECORDS))
    halves = [held_out_batches(source, 8, 2, Shard(i, 2)) for i in range(2)]
    whole = held_out_batches(source, 8, 2, Shard())
    marks = corner_marks(whole)  # the split's records in its stored order, each once; 4 rows of padding
    weights = np.concatenate([batch["weights"] for batch in whole])
    assert weights.tolist() == [1.0] * TEST_RECORDS + [0.0] * 4
    assert sorted(marks[:TEST_RECORDS]) == list(range(100, 100 + TEST_RECORDS))
    assert marks == corner_marks(held_out_batches(source, 8, 2, Shard()))
    for b in range(2):
        for key in ("images", "weights"):
            np.testing.assert_array_equal(np.concatenate([h[b][key] for h in halves]), whole[b][key])


@pytest.mark.parametrize("workers", [0, 1])
def test_tfds_batches_resume_exactly_with_mirroring(tfds_dir, workers):
    cfg = tfds_config(tfds_dir, "images.hflip=true", f"data.workers={workers}")
    batches = train_batches(open_images(cfg), cfg, Shard())
    take(batches, 7)  # into the second epoch
    state = json.loads(json.dumps(batches.get_state()))
    expected = take(batches, 6)
    resumed = train_batches(open_images(cfg), cfg, Shard())
    resumed.set_state(state)
    assert_same_batches(take(resumed, 6), expected)
    for pipeline in (batches, resumed):
        pipeline.close()


@pytest.mark.parametrize("name, expected", [
    ("mnist", True), ("mnist:3.0.1", True), ("mnist:3.*.*", True), ("tiny_images", True),
    ("tiny_images/png:1.0.0", True), ("mnistx", False), ("tiny_imagez/png", False), ("cifar10:3.0.2", False),
    ("huggingface:cifar10", True),  # a community namespace: tfds alone knows where it keeps those
])
def test_only_a_name_among_the_prepared_ones_is_handed_to_tfds(name, expected):
    assert might_be_prepared(name, ["mnist", "tiny_images/png"]) is expected


def test_a_prepared_tfds_dataset_tfds_cannot_read_is_called_damaged_not_missing(tfds_dir, tmp_path):
    """Its files cut or edited: `no such prepared dataset (prepared there: ['tiny_images/png'])`, contradicting
    itself."""
    damaged = shutil.copytree(tfds_dir, tmp_path / "tfds")
    [info] = (damaged / "tiny_images" / "png").glob("*/dataset_info.json")
    info.write_text(json.dumps({**json.loads(info.read_text()), "version": ""}))
    with pytest.raises(DataError, match=r"^images.tfds 'tiny_images/png' in \S+: \S+/tiny_images/png holds a "
                                        r"dataset_info.json, but tfds cannot read it as a prepared dataset "
                                        r"\(AssertionError: Failed to construct dataset .*\); its files are "
                                        r"incomplete or damaged, or another tfds wrote them: prepare it again: "
                                        r"tfds build tiny_images/png "):
        open_images(tfds_config(damaged, name="tiny_images/png"))


def test_tfds_errors_name_the_dataset_and_what_would_be_valid(tfds_dir, tmp_path, monkeypatch):
    temp = tmp_path / "system-temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with pytest.raises(DataError, match=r"'tiny_imagez/png'.*no such prepared dataset.*tiny_images/png"):
        open_images(tfds_config(tfds_dir, name="tiny_imagez/png"))
    with pytest.raises(DataError, match=r"'mnist'.*no such prepared dataset"):  # known to TFDS, not prepared here
        open_images(tfds_config(tfds_dir, name="mnist"))
    with pytest.raises(DataError, match=r"'mnist:3.0.1'.*no such prepared dataset"):
        open_images(tfds_config(tfds_dir, name="mnist:3.0.1"))
    assert list(temp.iterdir()) == []  # tfds was not asked, so it left no scratch directory behind
    assert open_images(tfds_config(tfds_dir, name="tiny_images/png:1.0.0")).name == "tiny_images/png:1.0.0"
    with pytest.raises(DataError, match=r"images.tfds_data_dir '.*nowhere' is not a directory"):
        open_images(tfds_config(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"images.eval_split.*Unknown split 'validation'.*\['train', 'test'\]"):
        open_images(tfds_config(tfds_dir, "images.eval_split=validation"))
    with pytest.raises(DataError, match=r"holds 8x6 images, but the model takes square images of model.image_size=8"):
        open_images(tfds_config(tfds_dir, name="tiny_images/wide"))
    with pytest.raises(ConfigError, match=r"holds 8x8x1 images in 10 classes.*set model.image_size=8, "
                                          r"model.channels=1, model.num_classes=10"):
        open_images(tfds_config(tfds_dir, "model.image_size=16", "model.num_classes=12"))
    with pytest.raises(DataError, match=r"no feature 'pixels' \(images.image_key\); its features: \['image', 'label'\]"):
        open_images(tfds_config(tfds_dir, "images.image_key=pixels"))
    with pytest.raises(ConfigError, match="images.source=tfds needs images.tfds=NAME"):
        tiny_dit_config("images.source=tfds")


def test_tfrecord_images_without_tensorflow_say_to_install_the_extra(tfds_dir, tmp_path):
    if __import__("importlib").util.find_spec("tensorflow"):
        pytest.skip("TensorFlow is installed, so TFRecord datasets are readable")
    shutil.copytree(tfds_dir / "tiny_images", tmp_path / "tiny_images")
    info_path = tmp_path / "tiny_images" / "png" / "1.0.0" / "dataset_info.json"
    info_path.write_text(json.dumps(json.loads(info_path.read_text()) | {"fileFormat": "tfrecord"}))
    with pytest.raises(DataError, match=r"stored as TFRecord.*pip install 'jaxgen\[tf\]'"):
        open_images(tfds_config(tmp_path))


def test_tfrecord_images_stream_with_tensorflow(tfds_dir, tmp_path):
    pytest.importorskip("tensorflow")

    shutil.copytree(tfds_dir / "tiny_images", tmp_path / "tiny_images")
    as_tfrecord_dataset(tmp_path / "tiny_images" / "png" / "1.0.0")
    cfg = tfds_config(tmp_path, "images.hflip=true")
    source = open_images(cfg)
    assert sorted(corner_marks(held_out_batches(source, 8, 2, Shard()))[:TEST_RECORDS]) == list(range(100, 112))
    batches = train_batches(source, cfg, Shard())
    assert sorted(corner_marks(take(batches, TRAIN_RECORDS // 8))) == list(range(TRAIN_RECORDS))
    state, expected = batches.get_state(), take(batches, 3)
    resumed = train_batches(open_images(cfg), cfg, Shard())
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), expected)


def test_jaxgen_train_a_dit_on_the_tfds_dataset(tfds_dir, tmp_path):
    result = jaxgen_cli("train", "--config", str(DIT_CONFIG), "--run-dir", str(tmp_path / "run"), "model.size=null",
                        "model.d_model=32", "model.n_layers=1", "model.freq_dim=32", "images.source=tfds",
                        "images.tfds=tiny_images/png", f"images.tfds_data_dir={tfds_dir}", "data.batch_size=8",
                        "train.steps=3", "train.eval_every=3", "train.eval_batches=1", "diffusion.samples_per_class=1",
                        "diffusion.sample_steps=2", "logging.progress_bar=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data: tiny_images/png, {TRAIN_RECORDS} train and {TEST_RECORDS} held-out images" in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["eval_loss_final"])
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
