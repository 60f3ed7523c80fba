"""Built-in image sources for diffusion runs (digits, shapes) through the grain pipeline: scaled to
[-1, 1], shuffled, sharded per process, optionally mirrored, resumable."""

import json

import numpy as np

from jaxgen.data.image_batches import image_set, train_batches
from jaxgen.data.images import make_shapes, open_images
from jaxgen.data.splits import Shard

from test_data import assert_same_batches, take
from test_dit import tiny_dit_config


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
