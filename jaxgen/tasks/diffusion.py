"""The diffusion task: a class-conditional DiT trained to denoise images.

Training batches carry images and labels; the loss draws times and noise from
the step key and drops labels to the null class for classifier-free guidance.
Held-out batches also carry their own times (a fixed grid) and noise, so the
held-out loss is the same measurement at every evaluation, and row weights
(each held-out image once; the rows padding the last batch weigh 0). Samples and
evaluation use the parameter average (EMA).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import Config, with_overrides
from jaxgen.data.image_data import ImageData, build_image_data
from jaxgen.diffusion.grid import image_grid, save_png
from jaxgen.diffusion.guidance import drop_labels
from jaxgen.diffusion.objectives import make_objective
from jaxgen.diffusion.samplers import make_sampler
from jaxgen.models import build_model
from jaxgen.models.dit import flops_per_image
from jaxgen.tasks.base import ModelSpec, Phase, Weights
from jaxgen.tasks.image_outputs import (
    check_image_inputs,
    image_inputs,
    quality_images,
    requested_labels,
    save_arrays,
    to_unit_range,
    write_training_grid,
)
from jaxgen.tasks.layout import MAIN_GROUP


class DiffusionTask:
    unit = "images"
    loss_name = "denoising loss (mean squared error)"
    sample_options: dict[str, Any] = {"labels": None, "num_per_label": 8, "guidance": None, "sampler": None,
                                      "steps": None, "out": None, "save_array": None}

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.objective = make_objective(cfg)
        self.null_label = cfg.model.num_classes
        self.sample_every = cfg.diffusion.sample_every
        self._samplers: dict = {}

    def models(self) -> dict[str, ModelSpec]:
        d = self.cfg.diffusion
        return {MAIN_GROUP: ModelSpec(build=lambda rngs: build_model(self.cfg.model, rngs),
                                      ema=(d.ema_decay, d.ema_warmup))}

    def phases(self) -> list[Phase]:
        return [Phase("loss", (MAIN_GROUP,), self.loss)]

    def loss(self, models, batch, rng, step=None):
        x0_BHWC, labels_B = batch["images"], batch["labels"]
        b = x0_BHWC.shape[0]
        if "noise" in batch:  # held-out: fixed times and noise, labels as given, the last batch's padding weighs 0
            t_B, eps_BHWC, weight_B = batch["t"], batch["noise"], batch["weights"]
        else:
            t_rng, eps_rng, drop_rng = jax.random.split(rng, 3)
            t_B = self.objective.train_times(t_rng, b)
            eps_BHWC = jax.random.normal(eps_rng, x0_BHWC.shape)
            labels_B = drop_labels(labels_B, drop_rng, self.cfg.diffusion.label_dropout, self.null_label)
            weight_B = jnp.ones((b,), jnp.float32)
        x_t = self.objective.noisy(x0_BHWC, eps_BHWC, t_B)
        out = models[MAIN_GROUP](x_t, self.objective.model_time(t_B), labels_B)
        loss_B = self.objective.loss_per_image(out, x0_BHWC, eps_BHWC, t_B)
        return jnp.sum(loss_B * weight_B), jnp.sum(weight_B)

    def eval_loss(self, models, batch):
        return self.loss(models, batch, jax.random.PRNGKey(0))

    def units_per_batch(self) -> int:
        return self.cfg.data.batch_size

    def flops_per_unit(self) -> float:
        return flops_per_image(self.cfg.model)

    def make_data(self, run_dir: pathlib.Path) -> ImageData:
        data = build_image_data(self.cfg)
        data.eval = self.with_fixed_noise(data.eval)
        return data

    def with_fixed_noise(self, batches: list[dict]) -> list[dict]:
        """Row i of every held-out batch is scored at grid time i mod K, with noise fixed by the data seed."""
        grid = self.objective.eval_times(self.cfg.diffusion.eval_timesteps)
        rng = np.random.default_rng([self.cfg.data.seed, 1])
        out = []
        for batch in batches:
            rows = len(batch["labels"])
            t = grid[np.arange(rows) % len(grid)]
            noise = rng.standard_normal(batch["images"].shape).astype(np.float32)
            out.append({**batch, "t": t, "noise": noise})
        return out

    # ------------------------------------------------------------------ what a run records about its inputs
    def inputs(self, data: ImageData) -> dict:
        return image_inputs(data)

    def check_inputs(self, saved: dict, current: dict) -> None:
        check_image_inputs(saved, current)

    # ------------------------------------------------------------------ samples, evaluation, generation
    def draw(self, weights: Weights, labels: np.ndarray, seed: int, scale: float, overrides: list[str] = ()) -> np.ndarray:
        """Images (N, H, W, C) in [-1, 1] for `labels`, from the sampler the config (and `overrides`) names."""
        cfg = with_overrides(self.cfg, list(overrides)) if overrides else self.cfg
        graphdef = weights.graphdefs[MAIN_GROUP]
        key = (graphdef, cfg.diffusion.sampler, cfg.diffusion.sample_steps)
        if key not in self._samplers:  # compiled once per model structure and sampler
            m = cfg.model
            self._samplers[key] = make_sampler(graphdef, make_objective(cfg), cfg.diffusion, self.null_label,
                                               (m.image_size, m.image_size, m.channels))
        images = self._samplers[key](weights.params[MAIN_GROUP], jnp.asarray(labels, jnp.int32),
                                     jax.random.PRNGKey(seed), jnp.float32(scale))
        return np.asarray(jax.device_get(images))

    def sample(self, weights: Weights, data: ImageData, run_dir: pathlib.Path, step: int | None) -> dict:
        """Write a grid (one row per class) to RUN_DIR/samples/ and TensorBoard; at the end, score the samples."""
        d = self.cfg.diffusion
        n_classes = self.cfg.model.num_classes
        images = self.draw(weights, np.repeat(np.arange(n_classes), d.samples_per_class), self.cfg.train.seed,
                           d.guidance_scale)
        summary = {"samples": write_training_grid(self.cfg, images, n_classes, run_dir, step)}
        if jax.process_index() != 0:  # every process sampled (params are sharded); one scores
            return summary
        if step is None and d.quality_eval:
            summary.update(self.quality(weights, data))
        return summary

    def quality(self, weights: Weights, data: ImageData) -> dict:
        """Sample quality: one sample per held-out image, for its label, in a classifier's features."""
        from jaxgen.diffusion.quality import sample_quality

        scale = self.cfg.diffusion.guidance_scale
        held_out = quality_images(self.cfg, data.held_out)
        samples = self.draw(weights, held_out.labels, seed=1, scale=scale)
        return {**sample_quality(samples, held_out.labels, data.train_set, held_out), "guidance_scale": scale}

    def evaluate(self, weights: Weights, data: ImageData, loss_sum: float, weight_sum: float) -> dict:
        """Held-out diffusion loss (fixed noise levels and noise) and sample quality."""
        return {"eval_loss": loss_sum / max(weight_sum, 1.0), **self.quality(weights, data)}

    def generate(self, weights: Weights, run_dir: pathlib.Path, step: int, options: dict[str, Any],
                 on_text: Callable[[str], None] | None) -> list[dict]:
        """A grid, one row per label (every class unless `labels` names some), and optionally the arrays."""
        labels = requested_labels(options["labels"], self.cfg.model.num_classes)
        overrides = [*([f"diffusion.sampler={options['sampler']}"] if options["sampler"] else []),
                     *([f"diffusion.sample_steps={options['steps']}"] if options["steps"] else [])]
        scale = self.cfg.diffusion.guidance_scale if options["guidance"] is None else options["guidance"]
        labels_N = np.repeat(np.asarray(labels, np.int32), options["num_per_label"])
        images_NHWC = self.draw(weights, labels_N, options["seed"], scale, overrides)
        out = pathlib.Path(options["out"]) if options["out"] else run_dir / "samples" / f"sample_step{step}.png"
        save_png(image_grid(images_NHWC, rows=len(labels)), out)
        result = {"grid": str(out), "step": step, "labels": labels, "num_per_label": options["num_per_label"],
                  "guidance": scale}
        if options["save_array"]:
            result["array"] = save_arrays(options["save_array"], images=to_unit_range(images_NHWC), labels=labels_N)
        return [result]
