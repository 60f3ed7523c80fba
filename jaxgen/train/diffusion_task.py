"""The diffusion task: a class-conditional DiT trained to denoise images.

Training batches carry images and labels; the loss draws times and noise from
the step key and drops labels to the null class for classifier-free guidance.
Held-out batches also carry their own times (a fixed grid) and noise, so the
held-out loss is the same measurement at every evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen.config import Config
from jaxgen.data.image_batches import held_out_batches, image_set, train_batches
from jaxgen.data.images import ImageSet, ImageSource, open_images
from jaxgen.data.pipeline import BatchIterator, this_process
from jaxgen.diffusion.grid import image_grid, save_png
from jaxgen.diffusion.guidance import drop_labels
from jaxgen.diffusion.objectives import make_objective
from jaxgen.diffusion.samplers import make_sampler
from jaxgen.metrics import tensorboardx
from jaxgen.models import build_model
from jaxgen.models.dit import flops_per_image

log = logging.getLogger("jaxgen")


@dataclasses.dataclass
class ImageData:
    train: BatchIterator  # host-local batches, resumable
    eval: list[dict[str, np.ndarray]]  # fixed held-out batches with their times and noise, host-local
    source: ImageSource

    @functools.cached_property
    def train_set(self) -> ImageSet:
        return image_set(self.source, "train")

    @functools.cached_property
    def held_out(self) -> ImageSet:
        return image_set(self.source, "eval")


class DiffusionTask:
    unit = "images"
    loss_name = "denoising loss (mean squared error)"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.objective = make_objective(cfg)
        self.null_label = cfg.model.num_classes
        self._samplers: dict = {}

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return build_model(self.cfg.model, rngs)

    def loss(self, model, batch, rng):
        x0_BHWC, labels_B = batch["images"], batch["labels"]
        b = x0_BHWC.shape[0]
        if "noise" in batch:  # held-out: fixed times and noise, labels as given
            t_B, eps_BHWC = batch["t"], batch["noise"]
        else:
            t_rng, eps_rng, drop_rng = jax.random.split(rng, 3)
            t_B = self.objective.train_times(t_rng, b)
            eps_BHWC = jax.random.normal(eps_rng, x0_BHWC.shape)
            labels_B = drop_labels(labels_B, drop_rng, self.cfg.diffusion.label_dropout, self.null_label)
        x_t = self.objective.noisy(x0_BHWC, eps_BHWC, t_B)
        out = model(x_t, self.objective.model_time(t_B), labels_B)
        loss_B = self.objective.loss_per_image(out, x0_BHWC, eps_BHWC, t_B)
        return jnp.sum(loss_B), jnp.asarray(b, jnp.float32)

    @property
    def sample_every(self) -> int:
        """The trainer writes a sample grid every this many steps (0: only at the end)."""
        return self.cfg.diffusion.sample_every

    def ema_settings(self) -> tuple[float, int]:
        """The trainer keeps this parameter average; samples and evaluation use it."""
        return self.cfg.diffusion.ema_decay, self.cfg.diffusion.ema_warmup

    def units_per_batch(self) -> int:
        return self.cfg.data.batch_size

    def flops_per_unit(self) -> float:
        return flops_per_image(self.cfg.model)

    def make_data(self, run_dir: pathlib.Path) -> ImageData:
        cfg = self.cfg
        source = open_images(cfg)
        log.info("data: %s, %d train and %d held-out images", source.name, source.size("train"), source.size("eval"))
        shard = this_process()
        return ImageData(
            train=train_batches(source, cfg, shard),
            eval=self.with_fixed_noise(held_out_batches(source, cfg.data.batch_size, cfg.train.eval_batches, shard)),
            source=source,
        )

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

    def sampler(self, graphdef: nnx.GraphDef):
        """The jitted sampler for this model structure, compiled once per run."""
        if graphdef not in self._samplers:
            m = self.cfg.model
            self._samplers[graphdef] = make_sampler(graphdef, self.objective, self.cfg.diffusion, self.null_label,
                                                    (m.image_size, m.image_size, m.channels))
        return self._samplers[graphdef]

    def generate(self, graphdef, params, labels: np.ndarray, seed: int, scale: float) -> np.ndarray:
        images = self.sampler(graphdef)(params, jnp.asarray(labels, jnp.int32), jax.random.PRNGKey(seed),
                                        jnp.float32(scale))
        return np.asarray(jax.device_get(images))

    def sample(self, graphdef, params, data: ImageData, run_dir: pathlib.Path, step: int | None = None) -> dict:
        """Write a grid (one row per class) to RUN_DIR/samples/ and TensorBoard; at the end, score the samples."""
        d = self.cfg.diffusion
        n_classes = self.cfg.model.num_classes
        labels = np.repeat(np.arange(n_classes), d.samples_per_class)
        images = self.generate(graphdef, params, labels, self.cfg.train.seed, d.guidance_scale)
        picture = image_grid(images, rows=n_classes)
        name = "final.png" if step is None else f"step_{step:07d}.png"
        summary = {"samples": str(run_dir / "samples" / name)}
        if jax.process_index() != 0:  # every process sampled (params are sharded); one writes
            return summary
        save_png(picture, run_dir / "samples" / name)
        if self.cfg.logging.tensorboard:
            with tensorboardx().SummaryWriter(str(run_dir / "tensorboard")) as tb:
                tb.add_image("samples", picture, self.cfg.train.steps if step is None else step, dataformats="HWC")
        if step is None and d.quality_eval and self.cfg.images.source == "digits":
            from jaxgen.evaluate_images import sample_quality

            summary.update(sample_quality(self, graphdef, params, data, d.guidance_scale))
        return summary
