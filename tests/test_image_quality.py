"""Image-quality figures: PSNR, SSIM (as scikit-image computes it), the PCA baseline, Fréchet distance,
and the cached feature classifier, on tiny synthetic images."""

import logging

import numpy as np
import pytest
import scipy.linalg

from jaxgen.data.images import ImageSet
from jaxgen.quality import image_classifier as classifier_module
from jaxgen.quality.image_classifier import ClassifierConfig, cache_path, image_classifier
from jaxgen.quality.image_quality import (
    class_accuracy,
    frechet_distance,
    gaussian_frechet_distance,
    pca_reconstruction,
    psnr,
    reconstruction_report,
    sample_report,
    ssim,
)

TINY = ClassifierConfig(channels=(8, 16), features=16, steps=80, batch_size=32, lr=1e-2)


def bright_quadrant_set(n: int, seed: int, shape=(12, 14, 3)) -> ImageSet:
    """Noisy images whose class (0..3) is the quadrant that is bright: trivially separable."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 4).astype(np.int32)
    images = rng.uniform(-1.0, -0.4, (n, *shape)).astype(np.float32)
    h, w = shape[0] // 2, shape[1] // 2
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 2)
        images[i, row * h:(row + 1) * h, col * w:(col + 1) * w] += 1.2
    return ImageSet(images, labels)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def trainings(monkeypatch):
    """How many times a classifier was trained (rather than read from the cache)."""
    calls = []
    real = classifier_module.train_classifier
    monkeypatch.setattr(classifier_module, "train_classifier", lambda *a: calls.append(1) or real(*a))
    return calls


def test_psnr_is_infinite_for_identical_images_and_known_for_a_constant_offset():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 6, 5, 2))
    assert np.all(np.isinf(psnr(images, images)))
    np.testing.assert_allclose(psnr(images, images + 0.1), 10 * np.log10(2.0 ** 2 / 0.01))
    np.testing.assert_allclose(psnr(images, images + 0.1, data_range=1.0), 10 * np.log10(1.0 / 0.01))


def structured_pairs():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:20, 0:24] / 10.0
    stripes = np.sin(3 * xx + yy)[None, ..., None] * np.ones((2, 1, 1, 3))
    blurred = 0.8 * stripes + 0.1 * np.cos(5 * yy)[None, ..., None]
    noise_a, noise_b = rng.uniform(-1, 1, (2, 2, 16, 13, 1))
    return [(noise_a, noise_b), (noise_a, 0.7 * noise_a + 0.3 * noise_b), (stripes, blurred)]


@pytest.mark.parametrize("pair", range(3))
def test_ssim_equals_scikit_image(pair):
    metrics = pytest.importorskip("skimage.metrics")
    a, b = structured_pairs()[pair]
    expected = [metrics.structural_similarity(x, y, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=2.0) for x, y in zip(a, b)]
    np.testing.assert_allclose(ssim(a, b), expected, rtol=1e-10, atol=1e-12)


def test_ssim_is_one_for_identical_images_and_refuses_images_smaller_than_its_window():
    a = np.random.default_rng(2).uniform(-1, 1, (3, 11, 15, 1))
    np.testing.assert_allclose(ssim(a, a), 1.0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :8, :8], a[:, :8, :8])


def test_pca_with_every_component_reconstructs_exactly_and_fewer_lose_detail():
    rng = np.random.default_rng(3)
    train = rng.uniform(-1, 1, (60, 4, 4, 1))
    held_out = rng.uniform(-1, 1, (10, 4, 4, 1))
    np.testing.assert_allclose(pca_reconstruction(train, held_out, 16), held_out, atol=1e-5)
    quality = [psnr(held_out, pca_reconstruction(train, held_out, k)).mean() for k in (2, 8, 16)]
    assert quality[0] < quality[1] < quality[2]


def test_pca_fits_on_a_subsample_of_many_train_images():
    rng = np.random.default_rng(4)
    basis = rng.standard_normal((3, 25))
    train = (rng.standard_normal((500, 3)) @ basis).reshape(500, 5, 5, 1)  # rank 3
    held_out = (rng.standard_normal((7, 3)) @ basis).reshape(7, 5, 5, 1)
    np.testing.assert_allclose(pca_reconstruction(train, held_out, 3, max_fit_images=50), held_out, atol=1e-4)


def test_frechet_distance_is_zero_for_one_set_and_a_shift_adds_its_squared_length():
    a = np.random.default_rng(5).standard_normal((400, 5))
    assert abs(frechet_distance(a, a)) < 1e-9
    rank_deficient = np.random.default_rng(6).standard_normal((50, 30))  # more features than a PCA of few images
    assert frechet_distance(rank_deficient, rank_deficient) == 0.0  # rounding left it below zero (-6e-14)
    np.testing.assert_allclose(frechet_distance(a, a + 2.0), 5 * 4.0, rtol=1e-9)


def test_frechet_distance_between_gaussians_matches_the_closed_forms():
    rng = np.random.default_rng(6)
    rotation, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    var_a, var_b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([4.0, 1.0, 0.5, 0.1])
    mu_a, mu_b = rng.standard_normal(4), rng.standard_normal(4)
    cov_a, cov_b = (rotation * var_a) @ rotation.T, (rotation * var_b) @ rotation.T  # commuting covariances
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    np.testing.assert_allclose(gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b), expected, rtol=1e-10)
    m = rng.standard_normal((4, 4))
    cov_c = m @ m.T
    general = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_c - 2 * scipy.linalg.sqrtm(cov_a @ cov_c).real)
    np.testing.assert_allclose(gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_c), general, rtol=1e-8)


def test_the_classifier_is_cached_and_a_damaged_cache_file_is_retrained(cache, trainings):
    train = bright_quadrant_set(64, seed=7)
    first = image_classifier(train, TINY)
    second = image_classifier(train, TINY)
    assert len(trainings) == 1
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    path = cache_path(np.asarray(train.images, np.float32), train.labels, TINY)
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind
    path.write_bytes(path.read_bytes()[:100])
    image_classifier(train, TINY)
    assert len(trainings) == 2
    image_classifier(train, TINY)
    assert len(trainings) == 2
    image_classifier(train, ClassifierConfig(**{**TINY.__dict__, "features": 8}))  # other hyper-parameters
    assert len(trainings) == 3


def test_a_cache_setting_that_names_a_file_is_said_so_not_called_damaged(tmp_path, monkeypatch, trainings, caplog):
    monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path / "notes.txt"))
    (tmp_path / "notes.txt").write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        image_classifier(bright_quadrant_set(64, seed=7), TINY)
    assert len(trainings) == 1 and "damaged" not in caplog.text
    assert f"image classifier not cached at {tmp_path / 'notes.txt'}/image_classifier_" in caplog.text
    assert f"({tmp_path / 'notes.txt'}: not a directory)" in caplog.text
    assert (tmp_path / "notes.txt").read_text() == "not a folder"
    monkeypatch.delenv("JAXGEN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # unset: the user's cache, as the rest of jaxgen's
    assert classifier_module.cache_dir() == tmp_path / "xdg" / "jaxgen"


def test_reports_on_a_trivially_separable_dataset(cache):
    train, held_out = bright_quadrant_set(96, seed=8, shape=(16, 16, 1)), bright_quadrant_set(32, seed=9,
                                                                                              shape=(16, 16, 1))
    classifier = image_classifier(train, TINY)
    assert class_accuracy(classifier, held_out.images, held_out.labels) == 1.0

    blurred = 0.7 * held_out.images + 0.3 * held_out.images.mean(0)
    report = reconstruction_report(held_out.images, blurred, train, latent_numbers=4, classifier=classifier)
    assert set(report) == {"pca_components", "model_psnr_db", "model_ssim", "model_frechet_distance_to_originals",
                           "pca_psnr_db", "pca_ssim", "pca_frechet_distance_to_originals"}
    assert all(type(v) is float for v in report.values())
    assert 0 < report["model_ssim"] < 1 and report["model_psnr_db"] > 0

    small = ImageSet(held_out.images[:, :8, :8], held_out.labels)  # smaller than SSIM's window: no SSIM
    report = reconstruction_report(small.images, small.images, small, latent_numbers=4, classifier=None)
    assert "model_ssim" not in report and report["model_psnr_db"] == float("inf")

    wrong_labels = (held_out.labels + 1) % 4
    samples = sample_report(held_out.images, wrong_labels, train, held_out, classifier=classifier)
    assert all(type(v) is float for v in samples.values())
    assert samples["classifier_heldout_accuracy"] == 1.0 and samples["conditional_accuracy"] == 0.0
    assert samples["frechet_distance"] == pytest.approx(samples["frechet_floor"])
