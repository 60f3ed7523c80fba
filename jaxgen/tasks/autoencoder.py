"""The autoencoder task: a KL-regularised autoencoder, optionally against a PatchGAN discriminator.

One step runs two phases on the same batch. The autoencoder phase minimises
the reconstruction loss (L1 or L2, per pixel) plus kl_weight times the KL
divergence of the latent posterior from N(0, I) (per latent number), plus,
from adversarial.start_step, the adaptively weighted generator loss of the
discriminator's patch scores. The discriminator phase (from the same step)
then scores real images against the updated autoencoder's reconstructions.
Held-out batches are scored on the posterior mean (no sampling noise): the
reconstruction + KL loss, the same measurement at every evaluation.
"""

from __future__ import annotations

import glob
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.chunks import map_chunks
from jaxgen.config import Config
from jaxgen.data.image_data import ImageData, build_image_data
from jaxgen.diffusion.grid import image_grid, save_png
from jaxgen.errors import ConfigError
from jaxgen.models.autoencoder import AutoencoderKL, flops_per_image
from jaxgen.models.layers import Dtypes
from jaxgen.models.patchgan import PatchGAN
from jaxgen.tasks.adversarial import adaptive_weight, discriminator_loss, generator_loss
from jaxgen.tasks.base import ModelSpec, Phase, Weights
from jaxgen.tasks.image_outputs import (
    check_image_inputs,
    check_sample_fits,
    image_inputs,
    save_arrays,
    to_unit_range,
    write_training_grid,
)
from jaxgen.tasks.layout import MAIN_GROUP

DISCRIMINATOR = "discriminator"


def reconstruction_error(kind: str, x_BHWC: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Per image: mean |x - x_hat| (l1) or mean (x - x_hat)^2 (l2) over pixels and channels."""
    diff = x_hat.astype(jnp.float32) - x_BHWC.astype(jnp.float32)
    per_pixel = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
    return per_pixel.reshape(per_pixel.shape[0], -1).mean(axis=-1)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Per image: KL(N(mean, exp(logvar)) || N(0, I)), averaged over the latent numbers."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).mean(axis=-1)


class AutoencoderTask:
    unit = "images"
    sample_options: dict[str, Any] = {"images": None, "out": None, "save_array": None}

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.train_cfg = cfg.autoencoder
        self.adversarial = cfg.autoencoder.adversarial
        self.loss_name = f"reconstruction ({self.train_cfg.reconstruction.upper()}) + KL loss"
        self.sample_every = cfg.autoencoder.sample_every
        self._reconstruct = jax.jit(self._reconstruct_batch)

    @staticmethod
    def _reconstruct_batch(graphdef, params, x_BHWC):
        model = Weights({MAIN_GROUP: graphdef}, {MAIN_GROUP: params}).models()[MAIN_GROUP]
        return model.decode(model.encode(x_BHWC)[0])

    def models(self) -> dict[str, ModelSpec]:
        specs = {MAIN_GROUP: ModelSpec(build=lambda rngs: AutoencoderKL(self.cfg.model, rngs))}
        if self.adversarial.enabled:
            specs[DISCRIMINATOR] = ModelSpec(
                build=lambda rngs: PatchGAN(self.cfg.model.channels, self.adversarial, Dtypes.of(self.cfg.model), rngs),
                optimizer=self.adversarial.optimizer)
        return specs

    def phases(self) -> list[Phase]:
        phases = [Phase("autoencoder", (MAIN_GROUP,), self.loss)]
        if self.adversarial.enabled:
            phases.append(Phase(DISCRIMINATOR, (DISCRIMINATOR,), self.discriminator_loss,
                                start_step=self.adversarial.start_step))
        return phases

    # ------------------------------------------------------------------ losses
    def loss(self, models, batch, rng, step=None):
        x = batch["images"]
        model = models[MAIN_GROUP]
        mean, logvar = model.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        features = model.decoder_features(z)
        last = model.decoder.conv_out
        x_hat = last(features)
        reconstruction_B = reconstruction_error(self.train_cfg.reconstruction, x, x_hat)
        loss_B = reconstruction_B + self.train_cfg.kl_weight * kl_divergence(mean, logvar)
        if self.adversarial.enabled:
            # Nothing of the discriminator is computed before its start step.
            loss_B = loss_B + jax.lax.cond(
                step >= self.adversarial.start_step,
                lambda: self.adversarial_term(models[DISCRIMINATOR], x, x_hat, features, last),
                lambda: jnp.zeros_like(loss_B))
        return jnp.sum(loss_B), jnp.float32(x.shape[0])

    def adversarial_term(self, discriminator, x, x_hat, features, last) -> jax.Array:
        """Per image: weight * generator loss, the weight balancing both gradients at the decoder's last kernel."""
        kind = self.adversarial.loss
        kernel = last.kernel[...]
        held = jax.lax.stop_gradient(features)  # a kernel's gradient depends only on its input and the output's

        def mean_reconstruction(k):
            return jnp.mean(reconstruction_error(self.train_cfg.reconstruction, x, last.with_kernel(held, k)))

        def mean_adversarial(k):
            return jnp.mean(generator_loss(kind, discriminator(last.with_kernel(held, k))))

        weight = adaptive_weight(jax.grad(mean_reconstruction)(kernel), jax.grad(mean_adversarial)(kernel),
                                 self.adversarial.max_adaptive_weight)
        return self.adversarial.weight * weight * generator_loss(kind, discriminator(x_hat))

    def discriminator_loss(self, models, batch, rng, step=None):
        x = batch["images"]
        model = models[MAIN_GROUP]
        mean, logvar = model.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        fake = jax.lax.stop_gradient(model.decode(z))
        discriminator = models[DISCRIMINATOR]
        loss_B = discriminator_loss(self.adversarial.loss, discriminator(x), discriminator(fake))
        return jnp.sum(loss_B), jnp.float32(x.shape[0])

    def eval_loss(self, models, batch):
        x, weight_B = batch["images"], batch["weights"]
        model = models[MAIN_GROUP]
        mean, logvar = model.encode(x)
        loss_B = (reconstruction_error(self.train_cfg.reconstruction, x, model.decode(mean))
                  + self.train_cfg.kl_weight * kl_divergence(mean, logvar))
        return jnp.sum(loss_B * weight_B), jnp.sum(weight_B)

    def units_per_batch(self) -> int:
        return self.cfg.data.batch_size

    def flops_per_unit(self) -> float:
        return flops_per_image(self.cfg.model)

    def make_data(self, run_dir: pathlib.Path) -> ImageData:
        return build_image_data(self.cfg)

    def inputs(self, data: ImageData) -> dict:
        return image_inputs(data)

    def check_inputs(self, saved: dict, current: dict) -> None:
        check_image_inputs(saved, current)

    # ------------------------------------------------------------------ reconstructions, evaluation
    def reconstruct(self, weights: Weights, images_NHWC: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Decoded posterior means of `images_NHWC` (in [-1, 1]), batch by batch on the host."""
        graphdef, params = weights.graphdefs[MAIN_GROUP], weights.params[MAIN_GROUP]
        return map_chunks(lambda chunk, _: self._reconstruct(graphdef, params, jnp.asarray(chunk)), images_NHWC,
                          batch_size)

    def sample(self, weights: Weights, data: ImageData, run_dir: pathlib.Path, step: int | None) -> dict:
        """A grid of held-out images (upper row) over their reconstructions (lower row)."""
        originals = data.held_out.images[:self.train_cfg.sample_images]
        pairs = np.concatenate([originals, self.reconstruct(weights, originals)])
        return {"samples": write_training_grid(self.cfg, pairs, 2, run_dir, step, tag="reconstructions")}

    def evaluate(self, weights: Weights, data: ImageData, loss_sum: float, weight_sum: float) -> dict:
        """Held-out loss; PSNR, SSIM and Fréchet distance of reconstructions beside PCA at the same latent size."""
        from jaxgen.quality.image_quality import reconstruction_report

        held_out = data.held_out.images
        m = self.cfg.model
        latent_numbers = m.latent_size * m.latent_size * m.latent_channels
        report = reconstruction_report(held_out, self.reconstruct(weights, held_out), data.train_set,
                                       latent_numbers)
        return {"eval_loss": loss_sum / max(weight_sum, 1.0), **report}

    def check_sample_inputs(self, options: dict[str, Any], run_dir: pathlib.Path) -> None:
        """Nothing here needs the run's files (Task.check_sample_inputs)."""

    def check_sample_options(self, options: dict[str, Any]) -> list[str]:
        """The files `--images` names."""
        if not options["images"]:
            raise ConfigError("an autoencoder run reconstructs given images: pass --images GLOB "
                              "(e.g. --images 'photos/*.png')")
        files = sorted(glob.glob(options["images"], recursive=True))
        if not files:
            raise ConfigError(f"--images {options['images']!r} matches no files")
        m = self.cfg.model  # each image and its reconstruction
        check_sample_fits(2 * len(files), (m.image_size, m.image_size, m.channels),
                          f"--images {options['images']!r} ({len(files):,} files, each with its reconstruction)",
                          options)
        return files

    def generate(self, weights: Weights, run_dir: pathlib.Path, step: int, options: dict[str, Any],
                 on_text: Callable[[str], None] | None) -> list[dict]:
        """Reconstruct the images `--images GLOB` names: a grid of them over their reconstructions."""
        from jaxgen.data.folder_images import read_image_files

        files = self.check_sample_options(options)
        m = self.cfg.model
        originals = read_image_files(files, m.image_size, m.channels, resize=self.cfg.images.resize)
        reconstructions = self.reconstruct(weights, originals)
        out = pathlib.Path(options["out"]) if options["out"] else run_dir / "samples" / f"reconstruct_step{step}.png"
        save_png(image_grid(np.concatenate([originals, reconstructions]), rows=2), out)
        result = {"grid": str(out), "step": step, "images": len(files),
                  "mean_abs_error": float(np.mean(np.abs(reconstructions - originals)) / 2)}
        if options["save_array"]:
            result["array"] = save_arrays(options["save_array"], images=to_unit_range(originals),
                                          reconstructions=to_unit_range(reconstructions),
                                          files=np.asarray(files))
        return [result]
