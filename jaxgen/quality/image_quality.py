"""Image-quality figures for autoencoders, GANs and diffusion models, on any labelled image dataset.

Images are (N, H, W, C) arrays in [-1, 1], the range `ImageSet` and the models
use, so PSNR and SSIM take a data range of 2 unless told otherwise.
- Reconstructions: per-image PSNR and SSIM (Wang et al. 2004, computed as
  scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`), beside the same for PCA keeping as many numbers
  per image as the model's latent: the trivial baseline a model must beat.
- Samples and reconstructions: the Fréchet distance between Gaussians fitted to
  features of a small classifier trained on the real images (image_classifier.py),
  and the fraction of images the classifier assigns to their label.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from jaxgen.data.images import ImageSet
from jaxgen.quality.image_classifier import Params, classify, image_classifier

DATA_RANGE = 2.0  # images in [-1, 1]
SSIM_SIGMA, SSIM_TRUNCATE = 1.5, 3.5  # scikit-image's Gaussian window: radius int(3.5 * 1.5 + 0.5) = 5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_CHUNK = 1024  # images filtered at once, so memory stays bounded
PCA_MAX_FIT_IMAGES = 20_000
PCA_EXACT_MAX_PIXELS = 4096  # beyond, only the leading directions, by randomized SVD


def psnr(reference: np.ndarray, reconstruction: np.ndarray, data_range: float = DATA_RANGE) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of each image (N,); inf where an image is reproduced exactly."""
    diff = np.asarray(reference, np.float64) - np.asarray(reconstruction, np.float64)
    mse = np.mean(diff.reshape(len(diff), -1) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range ** 2 / mse)


def _ssim_chunk(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    def blur(image):  # over height and width only; scipy's "reflect" is scikit-image's default
        return scipy.ndimage.gaussian_filter(image, (0, SSIM_SIGMA, SSIM_SIGMA, 0), mode="reflect",
                                             truncate=SSIM_TRUNCATE)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov_xy = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    pad = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # the border the window overhangs is left out
    return ssim_map[:, pad:-pad, pad:-pad, :].mean(axis=(1, 2, 3))


SSIM_WINDOW = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1  # pixels on a side


def ssim(reference: np.ndarray, reconstruction: np.ndarray, data_range: float = DATA_RANGE) -> np.ndarray:
    """Mean structural similarity of each image (N,), over the pixels the 11x11 window fits in and the channels."""
    x, y = np.asarray(reference, np.float64), np.asarray(reconstruction, np.float64)
    window = SSIM_WINDOW
    if min(x.shape[1:3]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels (its Gaussian window); "
                         f"these are {x.shape[1]}x{x.shape[2]}")
    return np.concatenate([_ssim_chunk(x[i:i + SSIM_CHUNK], y[i:i + SSIM_CHUNK], data_range)
                           for i in range(0, len(x), SSIM_CHUNK)])


def pca_basis(train_images: np.ndarray, n_components: int, max_fit_images: int = PCA_MAX_FIT_IMAGES,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean pixel vector (D,), orthonormal principal directions (K, D)) of at most `max_fit_images` images."""
    from sklearn.utils.extmath import randomized_svd

    if len(train_images) > max_fit_images:
        train_images = train_images[np.sort(np.random.default_rng(seed).choice(len(train_images), max_fit_images,
                                                                               replace=False))]
    flat = np.asarray(train_images, np.float64).reshape(len(train_images), -1)
    mean = flat.mean(axis=0)
    centered = flat - mean
    if centered.shape[1] <= PCA_EXACT_MAX_PIXELS:  # eigenvectors of the (D, D) scatter matrix, largest first
        _, vectors = np.linalg.eigh(centered.T @ centered)
        return mean, vectors[:, ::-1][:, :n_components].T
    _, _, vt = randomized_svd(centered, n_components, n_iter=6, random_state=seed)
    return mean, vt


def pca_reconstruction(train_images: np.ndarray, images: np.ndarray, n_components: int,
                       max_fit_images: int = PCA_MAX_FIT_IMAGES) -> np.ndarray:
    """`images` projected on the leading `n_components` principal directions of the train images, and back."""
    mean, basis = pca_basis(train_images, n_components, max_fit_images)
    flat = np.asarray(images, np.float64).reshape(len(images), -1) - mean
    return ((flat @ basis.T) @ basis + mean).reshape(np.shape(images)).astype(np.float32)


def gaussian_frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two Gaussians.

    Tr((S_a S_b)^1/2) is the sum of square roots of the eigenvalues of
    S_a^1/2 S_b S_a^1/2, which is symmetric, so eigh keeps it stable where
    sqrtm of the non-symmetric S_a S_b may turn complex.
    """
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sum(np.sqrt(np.maximum(cross, 0.0)))
    distance = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(distance, 0.0)  # a distance: below zero is only the rounding of two equal sets (printed as -7e-05)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    return gaussian_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def class_accuracy(classifier: Params, images: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of `images` the classifier assigns to their label."""
    _, predicted = classify(classifier, images)
    return float(np.mean(predicted == np.asarray(labels)))


def reconstruction_report(originals: np.ndarray, reconstructions: np.ndarray, train_set: ImageSet,
                          latent_numbers: int, classifier: Params | None = None) -> dict[str, float]:
    """A model's reconstructions of held-out `originals` beside PCA keeping `latent_numbers` numbers per image.

    Without `classifier`, the cached one for `train_set` is used (trained on first use). Images smaller
    than SSIM's window get no SSIM figures.
    """
    classifier = image_classifier(train_set) if classifier is None else classifier
    pca = pca_reconstruction(train_set.images, originals, latent_numbers)
    with_ssim = min(originals.shape[1:3]) >= SSIM_WINDOW
    original_features, _ = classify(classifier, originals)
    figures = {"pca_components": float(latent_numbers)}
    for name, images in (("model", reconstructions), ("pca", pca)):
        figures[f"{name}_psnr_db"] = float(np.mean(psnr(originals, images)))
        if with_ssim:
            figures[f"{name}_ssim"] = float(np.mean(ssim(originals, images)))
        figures[f"{name}_frechet_distance_to_originals"] = frechet_distance(classify(classifier, images)[0],
                                                                            original_features)
    return figures


def sample_report(samples: np.ndarray, sample_labels: np.ndarray, train_set: ImageSet, held_out: ImageSet,
                  classifier: Params | None = None) -> dict[str, float]:
    """Samples drawn for the held-out labels (one per held-out image, so they compare with them one to one).

    `frechet_distance` (samples vs the train split) sits beside `frechet_floor`
    (real held-out images vs the train split: what a perfect model would reach
    with as many images); `conditional_accuracy` is the fraction of samples
    classified as the label they were drawn for, and
    `classifier_heldout_accuracy` how far to trust it. Without `classifier`, the
    cached one for `train_set` is used (trained on first use).
    """
    classifier = image_classifier(train_set) if classifier is None else classifier
    train_features, _ = classify(classifier, train_set.images)
    held_features, held_predicted = classify(classifier, held_out.images)
    sample_features, sample_predicted = classify(classifier, samples)
    return {
        "frechet_distance": frechet_distance(sample_features, train_features),
        "frechet_floor": frechet_distance(held_features, train_features),
        "conditional_accuracy": float(np.mean(sample_predicted == np.asarray(sample_labels))),
        "classifier_heldout_accuracy": float(np.mean(held_predicted == held_out.labels)),
    }
