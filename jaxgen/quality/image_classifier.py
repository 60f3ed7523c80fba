"""A small CNN whose features score generated images, trained once per train set and cached on disk.

Fréchet distances and class accuracies of generated images are measured in its
dense feature layer. It trains on the real training images with light pixel
noise, so it does not lean on single pixels a generator may get slightly wrong.
The parameters are cached under $JAXGEN_CACHE (default $XDG_CACHE_HOME/jaxgen, else
~/.cache/jaxgen), keyed by a hash of the images, the labels and the
hyper-parameters; a cache file that cannot be read, or holds other shapes, is
retrained and replaced.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import io
import logging
import math
import os
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen.data.images import ImageSet
from jaxgen.errors import describe_os_error
from jaxgen.files import user_cache_dir, write_atomic

log = logging.getLogger("jaxgen")

Params = dict[str, np.ndarray]
ARCHITECTURE = "conv3x3-stride2-relu x N, dense-relu features, dense logits"  # part of the cache key


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    channels: tuple[int, ...] = (32, 64)  # one 3x3 convolution of stride 2 per entry
    features: int = 128  # width of the feature layer the Fréchet distance is measured in
    steps: int = 3000  # minibatch AdamW steps, fewer when max_epochs passes over a small set take fewer
    max_epochs: float = 40.0
    batch_size: int = 128
    lr: float = 2e-3  # peak of a cosine decay to zero
    weight_decay: float = 1e-4
    noise: float = 0.1  # std of the Gaussian noise added to training pixels in [-1, 1]
    seed: int = 0


def cache_dir() -> pathlib.Path:
    """$JAXGEN_CACHE, else jaxgen's cache of the user (where the matmul peak and compiled programs are kept)."""
    return pathlib.Path(os.environ["JAXGEN_CACHE"]) if os.environ.get("JAXGEN_CACHE") else user_cache_dir()


def init_params(cfg: ClassifierConfig, image_shape: tuple[int, int, int], num_classes: int,
                key: jax.Array) -> dict[str, jax.Array]:
    """He-initialised weights; the feature layer sees the last map flattened."""
    h, w, c = image_shape
    keys = jax.random.split(key, len(cfg.channels) + 2)
    params = {}
    for i, width in enumerate(cfg.channels):
        params[f"conv{i}_w"] = jax.random.normal(keys[i], (3, 3, c, width)) * (2.0 / (9 * c)) ** 0.5
        params[f"conv{i}_b"] = jnp.zeros((width,))
        h, w, c = -(-h // 2), -(-w // 2), width
    flat = h * w * c
    params["features_w"] = jax.random.normal(keys[-2], (flat, cfg.features)) * (2.0 / flat) ** 0.5
    params["features_b"] = jnp.zeros((cfg.features,))
    params["logits_w"] = jax.random.normal(keys[-1], (cfg.features, num_classes)) * cfg.features ** -0.5
    params["logits_b"] = jnp.zeros((num_classes,))
    return params


def forward(params: dict, images_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(features (B, F), logits (B, classes))."""
    h = images_BHWC
    i = 0
    while f"conv{i}_w" in params:
        # Stride 2 rather than pooling: XLA:CPU differentiates pooling slowly, and it halves the work.
        h = jax.lax.conv_general_dilated(h, params[f"conv{i}_w"], (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + params[f"conv{i}_b"])
        i += 1
    features = jax.nn.relu(h.reshape(h.shape[0], -1) @ params["features_w"] + params["features_b"])
    return features, features @ params["logits_w"] + params["logits_b"]


def training_steps(cfg: ClassifierConfig, n_images: int) -> int:
    return max(1, min(cfg.steps, math.ceil(cfg.max_epochs * n_images / cfg.batch_size)))


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: ClassifierConfig) -> Params:
    """Minibatch AdamW on noisy copies of `images` (N, H, W, C) in [-1, 1]."""
    init_key, data_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params = init_params(cfg, images.shape[1:], num_classes, init_key)
    steps = training_steps(cfg, len(images))
    tx = optax.adamw(optax.cosine_decay_schedule(cfg.lr, steps), weight_decay=cfg.weight_decay)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, key, x, y):  # the data are arguments, not constants baked into the program
        pick_key, noise_key = jax.random.split(key)
        rows = jax.random.randint(pick_key, (cfg.batch_size,), 0, x.shape[0])
        x_B, y_B = x[rows], y[rows]

        def loss_fn(p):
            _, logits = forward(p, x_B + cfg.noise * jax.random.normal(noise_key, x_B.shape))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y_B).mean()

        updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    x, y = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
    opt_state = tx.init(params)
    for key in jax.random.split(data_key, steps):  # not lax.scan: XLA:CPU runs convolutions in loops slowly
        params, opt_state = step(params, opt_state, key, x, y)
    return {name: np.asarray(value) for name, value in jax.device_get(params).items()}


def cache_path(images: np.ndarray, labels: np.ndarray, cfg: ClassifierConfig) -> pathlib.Path:
    digest = hashlib.sha256()
    for part in (ARCHITECTURE, repr(cfg), str(images.shape), str(images.dtype)):
        digest.update(part.encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels, np.int64).tobytes())
    return cache_dir() / f"image_classifier_{digest.hexdigest()[:20]}.npz"


def load_params(path: pathlib.Path, expected: dict[str, tuple[int, ...]]) -> Params | None:
    """The cached parameters, or None when the file is missing, unreadable or holds other shapes."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            params = {name: saved[name] for name in saved.files}
    except (FileNotFoundError, NotADirectoryError):  # a cache folder that is a file: saving says so
        return None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        log.warning("image classifier cache %s is damaged (%s); retraining", path, err)
        return None
    if {name: value.shape for name, value in params.items()} != expected:
        log.warning("image classifier cache %s holds other parameters; retraining", path)
        return None
    return params


def save_params(path: pathlib.Path, params: Params) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **params)
    if path.parent.exists() and not path.parent.is_dir():  # mkdir would say only that it "exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())  # concurrent runs never read half a file


def image_classifier(train_set: ImageSet, cfg: ClassifierConfig = ClassifierConfig()) -> Params:
    """The classifier for this train set: read from the cache, or trained and cached on first use."""
    images = np.asarray(train_set.images, np.float32)
    num_classes = int(train_set.labels.max()) + 1
    path = cache_path(images, train_set.labels, cfg)
    shapes = jax.eval_shape(lambda: init_params(cfg, images.shape[1:], num_classes, jax.random.PRNGKey(0)))
    params = load_params(path, {name: s.shape for name, s in shapes.items()})
    if params is None:
        log.info("training the image classifier for quality figures on %d images (cached at %s)", len(images), path)
        params = train_classifier(images, train_set.labels, num_classes, cfg)
        try:
            save_params(path, params)
        except OSError as err:  # a read-only or full cache costs a retraining next time, not this run
            log.warning("image classifier not cached at %s (%s)", path, describe_os_error(err))
    return params


_forward_jit = jax.jit(forward)


def classify(params: Params, images_NHWC: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, F) float64, predicted classes (N,)), in fixed-size chunks so memory stays bounded."""
    images = np.asarray(images_NHWC, np.float32)
    n = len(images)
    padded = np.concatenate([images, np.zeros((-n % chunk, *images.shape[1:]), np.float32)])
    features, predictions = [], []
    for start in range(0, len(padded), chunk):
        f, logits = _forward_jit(params, padded[start:start + chunk])
        features.append(np.asarray(f, np.float64))
        predictions.append(np.asarray(jnp.argmax(logits, -1)))
    return np.concatenate(features)[:n], np.concatenate(predictions)[:n]
