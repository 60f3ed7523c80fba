"""The GAN task: a class-conditional generator against a projection discriminator.

One step runs two phases on the same batch of real images and labels: the
generator phase (the first: its loss is the run's `loss`) draws noise and
minimises the generator loss of the discriminator's scores of its images for
the batch's labels; then the discriminator phase scores the real images
against fresh generated ones (held fixed), plus the R1 penalty on the real
ones. Samples and evaluation use the generator's parameter average (EMA).
Held-out batches carry fixed noise, so the held-out loss — the discriminator's
loss on held-out real images against generated ones — is the same measurement
at every evaluation.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.chunks import map_chunks
from jaxgen.config import Config
from jaxgen.data.image_data import ImageData, build_image_data
from jaxgen.data.pipeline import this_process_rows
from jaxgen.diffusion.grid import image_grid, save_png
from jaxgen.models.gan import Discriminator, Generator, discriminator_flops, generator_flops
from jaxgen.tasks.adversarial import discriminator_loss, generator_loss, r1_penalty
from jaxgen.tasks.base import ModelSpec, Phase, Weights
from jaxgen.tasks.image_outputs import (
    check_image_inputs,
    check_sample_fits,
    draw_progress,
    image_inputs,
    quality_images,
    requested_labels,
    save_arrays,
    to_unit_range,
    write_training_grid,
)

GENERATOR, DISCRIMINATOR = "generator", "discriminator"


class GANTask:
    unit = "images"
    sample_options: dict[str, Any] = {"labels": None, "num_per_label": 8, "out": None, "save_array": None,
                                      "seed": 0}

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.gan = cfg.gan
        self.loss_name = f"generator loss ({self.gan.loss.replace('_', '-')})"
        self.sample_every = cfg.gan.sample_every
        self._draw = jax.jit(self._draw_images)

    def models(self) -> dict[str, ModelSpec]:
        return {GENERATOR: ModelSpec(build=lambda rngs: Generator(self.cfg.model, rngs),
                                     ema=(self.gan.ema_decay, self.gan.ema_warmup)),
                DISCRIMINATOR: ModelSpec(build=lambda rngs: Discriminator(self.cfg.model, rngs),
                                         optimizer=self.gan.discriminator_optimizer)}

    def phases(self) -> list[Phase]:
        return [Phase(GENERATOR, (GENERATOR,), self.generator_loss),
                Phase(DISCRIMINATOR, (DISCRIMINATOR,), self.discriminator_loss)]

    # ------------------------------------------------------------------ losses
    def noise(self, rng: jax.Array, rows: int) -> jax.Array:
        return jax.random.normal(rng, (rows, self.cfg.model.noise_dim))

    def generator_loss(self, models, batch, rng, step=None):
        labels = batch["labels"]
        fake = models[GENERATOR](self.noise(rng, labels.shape[0]), labels)
        loss_B = generator_loss(self.gan.loss, models[DISCRIMINATOR](fake, labels))
        return jnp.sum(loss_B), jnp.float32(labels.shape[0])

    def critic_loss_per_image(self, models, real, labels, noise, r1: bool) -> jax.Array:
        fake = jax.lax.stop_gradient(models[GENERATOR](noise, labels))
        discriminator = models[DISCRIMINATOR]
        loss_B = discriminator_loss(self.gan.loss, discriminator(real, labels), discriminator(fake, labels))
        if r1 and self.gan.r1_gamma > 0:
            loss_B = loss_B + 0.5 * self.gan.r1_gamma * r1_penalty(lambda x: discriminator(x, labels), real)
        return loss_B

    def discriminator_loss(self, models, batch, rng, step=None):
        real, labels = batch["images"], batch["labels"]
        loss_B = self.critic_loss_per_image(models, real, labels, self.noise(rng, labels.shape[0]), r1=True)
        return jnp.sum(loss_B), jnp.float32(labels.shape[0])

    def eval_loss(self, models, batch):
        loss_B = self.critic_loss_per_image(models, batch["images"], batch["labels"], batch["noise"], r1=False)
        return jnp.sum(loss_B * batch["weights"]), jnp.sum(batch["weights"])

    def units_per_batch(self) -> int:
        return self.cfg.data.batch_size

    def flops_per_unit(self) -> float:
        """Training FLOPs per real image: the generator phase (G and D forward and backward) and the
        discriminator phase (G forward, D forward and backward on real and fake images)."""
        g, d = generator_flops(self.cfg.model), discriminator_flops(self.cfg.model)
        return 3 * (g + d) + g + 2 * 3 * d

    def make_data(self, run_dir: pathlib.Path) -> ImageData:
        data = build_image_data(self.cfg)
        data.eval = self.with_fixed_noise(data.eval)
        return data

    def with_fixed_noise(self, batches: list[dict]) -> list[dict]:
        """Each held-out batch with the generator's noise, fixed by the data seed and drawn for the global batch,
        of which each process keeps its rows: the held-out loss is the same on any number of processes."""
        rng, rows = np.random.default_rng([self.cfg.data.seed, 2]), self.cfg.data.batch_size
        return [{**batch, "noise": this_process_rows(rng.standard_normal((rows, self.cfg.model.noise_dim))
                                                     .astype(np.float32))} for batch in batches]

    def inputs(self, data: ImageData) -> dict:
        return image_inputs(data)

    def check_inputs(self, saved: dict, current: dict) -> None:
        check_image_inputs(saved, current)

    # ------------------------------------------------------------------ samples, evaluation, generation
    def _draw_images(self, graphdef, params, labels, key):
        generator = Weights({GENERATOR: graphdef}, {GENERATOR: params}).models()[GENERATOR]
        return generator(self.noise(key, labels.shape[0]), labels)

    def draw(self, weights: Weights, labels: np.ndarray, seed: int, batch_size: int = 256) -> np.ndarray:
        """Images (N, H, W, C) in [-1, 1] for `labels`, from the generator's average."""
        graphdef, params = weights.graphdefs[GENERATOR], weights.params[GENERATOR]
        return map_chunks(lambda chunk, i: self._draw(graphdef, params, jnp.asarray(chunk),
                                                       jax.random.fold_in(jax.random.PRNGKey(seed), i)),
                          np.asarray(labels, np.int32), batch_size, progress=draw_progress(self.cfg, "generate"))

    def sample(self, weights: Weights, data: ImageData, run_dir: pathlib.Path, step: int | None) -> dict:
        """A grid, one row per class, to RUN_DIR/samples/ and TensorBoard."""
        n = self.cfg.model.num_classes
        images = self.draw(weights, np.repeat(np.arange(n), self.gan.samples_per_class), self.cfg.train.seed)
        return {"samples": write_training_grid(self.cfg, images, n, run_dir, step)}

    def evaluate(self, weights: Weights, data: ImageData, loss_sum: float, weight_sum: float) -> dict:
        """Held-out loss; Fréchet distance of samples (one per held-out image, for its label) beside the
        real-data floor, and the class accuracy of the samples, in a classifier's features."""
        from jaxgen.quality.image_quality import sample_report

        held_out = quality_images(self.cfg, data.held_out)
        samples = self.draw(weights, held_out.labels, seed=1)
        return {"eval_loss": loss_sum / max(weight_sum, 1.0),
                **sample_report(samples, held_out.labels, data.train_set, held_out)}

    def check_sample_inputs(self, options: dict[str, Any], run_dir: pathlib.Path) -> None:
        """Nothing here needs the run's files (Task.check_sample_inputs)."""

    def check_sample_options(self, options: dict[str, Any]) -> None:
        m = self.cfg.model
        rows = len(requested_labels(options["labels"], m.num_classes))
        check_sample_fits(rows * options["num_per_label"], (m.image_size, m.image_size, m.channels),
                          f"--num-per-label {options['num_per_label']} for {rows} labels", options)

    def generate(self, weights: Weights, run_dir: pathlib.Path, step: int, options: dict[str, Any],
                 on_text: Callable[[str], None] | None) -> list[dict]:
        """A grid, one row per label (every class unless `labels` names some), and optionally the arrays."""
        labels = requested_labels(options["labels"], self.cfg.model.num_classes)
        labels_N = np.repeat(np.asarray(labels, np.int32), options["num_per_label"])
        images = self.draw(weights, labels_N, options["seed"])
        out = pathlib.Path(options["out"]) if options["out"] else run_dir / "samples" / f"sample_step{step}.png"
        save_png(image_grid(images, rows=len(labels)), out)
        result = {"grid": str(out), "step": step, "labels": labels, "num_per_label": options["num_per_label"]}
        if options["save_array"]:
            result["array"] = save_arrays(options["save_array"], images=to_unit_range(images), labels=labels_N)
        return [result]
