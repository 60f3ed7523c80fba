"""Sample quality for digits models, measured in the features of a small digits classifier.

The classifier (an MLP on the 64 pixels) is trained once on the train split
and cached on disk, keyed by a hash of that split. Two figures come out:
the Fréchet distance between Gaussians fitted to the features of samples and
of the train split, reported beside the same distance for real held-out images
(the floor a perfect model would reach with as many images), and the
fraction of samples the classifier assigns to the class they were drawn for.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen.data.images import ImageSet

log = logging.getLogger("jaxgen")

WIDTHS = (64, 256, 64, 10)  # pixels -> hidden -> features -> classes
TRAIN_STEPS = 1500


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("JAXGEN_CACHE", pathlib.Path.home() / ".cache" / "jaxgen"))


def _forward(params: dict, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(features (B, 64), logits (B, 10))."""
    h = x_BHWC.reshape(x_BHWC.shape[0], -1)
    for i in range(len(WIDTHS) - 2):
        h = jax.nn.relu(h @ params[f"w{i}"] + params[f"b{i}"])
    last = len(WIDTHS) - 2
    return h, h @ params[f"w{last}"] + params[f"b{last}"]


def train_classifier(train: ImageSet, seed: int = 0) -> dict:
    """Full-batch AdamW; light pixel noise keeps it from leaning on single pixels that samples may get wrong."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(WIDTHS))
    params = {}
    for i, (d_in, d_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        params[f"w{i}"] = jax.random.normal(keys[i], (d_in, d_out)) * (2.0 / d_in) ** 0.5
        params[f"b{i}"] = jnp.zeros((d_out,))
    tx = optax.adamw(3e-3, weight_decay=1e-4)
    x, y = jnp.asarray(train.images), jnp.asarray(train.labels)

    def step(carry, key):
        params, opt_state = carry

        def loss_fn(p):
            _, logits = _forward(p, x + 0.1 * jax.random.normal(key, x.shape))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    run = jax.jit(lambda p, k: jax.lax.scan(step, (p, tx.init(p)), jax.random.split(k, TRAIN_STEPS))[0][0])
    return jax.device_get(run(params, keys[-1]))


def digits_classifier(train: ImageSet) -> dict:
    """The cached classifier for this train split, trained on first use."""
    digest = hashlib.sha256(train.images.tobytes() + train.labels.tobytes()).hexdigest()[:16]
    path = cache_dir() / f"digits_classifier_{'x'.join(map(str, WIDTHS))}_{TRAIN_STEPS}_{digest}.npz"
    if path.exists():
        with np.load(path) as saved:
            return dict(saved)
    log.info("training the digits classifier for sample quality (cached at %s)", path)
    params = train_classifier(train)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **params)
    tmp.replace(path)  # atomic: concurrent runs never read half a file
    return params


def classify(params: dict, images_NHWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features, logits = jax.jit(_forward)(params, jnp.asarray(images_NHWC, jnp.float32))
    return np.asarray(features, np.float64), np.asarray(jnp.argmax(logits, -1))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to two feature sets.

    Tr((S_a S_b)^1/2) is computed as the sum of square roots of the eigenvalues
    of S_a^1/2 S_b S_a^1/2, which is symmetric, so eigh keeps it stable.
    """
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sum(np.sqrt(np.maximum(cross, 0.0)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def quality(classifier: dict, samples: np.ndarray, sample_labels: np.ndarray, train: ImageSet,
            held_out: ImageSet) -> dict:
    """Figures for `samples` drawn for the held-out labels, so they compare with held-out images one to one."""
    train_feats, _ = classify(classifier, train.images)
    held_feats, held_pred = classify(classifier, held_out.images)
    sample_feats, sample_pred = classify(classifier, samples)
    return {
        "frechet_distance": frechet_distance(sample_feats, train_feats),
        "frechet_floor": frechet_distance(held_feats, train_feats),
        "conditional_accuracy": float(np.mean(sample_pred == sample_labels)),
        "classifier_heldout_accuracy": float(np.mean(held_pred == held_out.labels)),
    }


def sample_quality(samples: np.ndarray, labels: np.ndarray, train: ImageSet, held_out: ImageSet) -> dict:
    """Score samples drawn for the held-out labels (one per held-out image) against the real images."""
    figures = quality(digits_classifier(train), samples, labels, train, held_out)
    log.info("sample quality: %s", {k: round(v, 4) for k, v in figures.items()})
    return figures
