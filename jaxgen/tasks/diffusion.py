"""The diffusion task: a DiT trained to denoise images, conditioned on class labels or captions.

Training batches carry images and labels (and tokenized captions); the loss
draws times and noise from the step key and drops labels (captions) to the null
class (caption) for classifier-free guidance (tasks/conditions.py). With
`diffusion.autoencoder` the DiT denoises a frozen autoencoder's scaled latents
(tasks/latents.py): batches of cached latents are used as they are, batches of
images are encoded in the step; samples are decoded through the same frozen
autoencoder.
Held-out batches also carry their own times (a fixed grid) and noise, so the
held-out loss is the same measurement at every evaluation, and row weights
(each held-out image once; the rows padding the last batch weigh 0). Samples and
evaluation use the parameter average (EMA).
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.chunks import chunk_size, map_chunks
from jaxgen.config import Config, with_overrides
from jaxgen.data.image_data import ImageData, build_image_data
from jaxgen.data.images import ImageSet
from jaxgen.data.pipeline import this_process_rows
from jaxgen.diffusion.grid import image_grid, save_png
from jaxgen.diffusion.objectives import make_objective
from jaxgen.diffusion.samplers import make_sampler
from jaxgen.models import build_model
from jaxgen.models.dit import flops_per_image
from jaxgen.tasks.base import ModelSpec, Phase, Weights
from jaxgen.tasks.conditions import CaptionConditions, make_conditions
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
from jaxgen.tasks.layout import MAIN_GROUP

log = logging.getLogger("jaxgen")


class DiffusionTask:
    unit = "images"
    loss_name = "denoising loss (mean squared error)"
    def __init__(self, cfg: Config, run_dir: pathlib.Path | None = None):
        self.cfg = cfg
        self.objective = make_objective(cfg)
        self.conditions = make_conditions(cfg, run_dir)
        self.text = isinstance(self.conditions, CaptionConditions)
        self.latents = None
        if cfg.diffusion.autoencoder is not None:
            from jaxgen.tasks.latents import Latents

            self.latents = Latents(cfg)
        self.sample_every = cfg.diffusion.sample_every
        self.sample_options: dict[str, Any] = {
            **({"prompt": None, "negative_prompt": None} if self.text else {"labels": None}),
            "num_per_label": 8, "guidance": None, "sampler": None, "steps": None, "out": None, "save_array": None,
            "seed": 0}
        self._samplers: dict = {}
        self._real: tuple[ImageData, tuple[ImageSet, ImageSet]] | None = None  # real_images' last (data, result)

    def models(self) -> dict[str, ModelSpec]:
        d, m = self.cfg.diffusion, self.cfg.model
        if self.text:
            from jaxgen.models.dit import DiT

            build = lambda rngs: DiT(m, rngs, text=self.cfg.conditioning, text_width=self.conditions.text_width())  # noqa: E731
        else:
            build = lambda rngs: build_model(m, rngs)  # noqa: E731
        return {MAIN_GROUP: ModelSpec(build=build, ema=(d.ema_decay, d.ema_warmup)),
                **self.conditions.models(), **(self.latents.models() if self.latents else {})}

    def phases(self) -> list[Phase]:
        return [Phase("loss", (MAIN_GROUP,), self.loss)]

    def loss(self, models, batch, rng, step=None):
        x0_BHWC = batch["images"] if self.latents is None else self.latents.model_input(models, batch["images"])
        b = x0_BHWC.shape[0]
        if "t" in batch:  # held-out: fixed times and noise, conditions as given, the last batch's padding weighs 0
            t_B, eps_BHWC, weight_B = batch["t"], batch["noise"], batch["weights"]
            condition = self.conditions.held_out(models, batch)
        else:
            t_rng, eps_rng, drop_rng = jax.random.split(rng, 3)
            t_B = self.objective.train_times(t_rng, b)
            eps_BHWC = jax.random.normal(eps_rng, x0_BHWC.shape)
            condition = self.conditions.training(models, batch, drop_rng)
            weight_B = jnp.ones((b,), jnp.float32)
        x_t = self.objective.noisy(x0_BHWC, eps_BHWC, t_B)
        out = models[MAIN_GROUP](x_t, self.objective.model_time(t_B), condition)
        loss_B = self.objective.loss_per_image(out, x0_BHWC, eps_BHWC, t_B)
        return jnp.sum(loss_B * weight_B), jnp.sum(weight_B)

    def eval_loss(self, models, batch):
        return self.loss(models, batch, jax.random.PRNGKey(0))

    def units_per_batch(self) -> int:
        return self.cfg.data.batch_size

    def flops_per_unit(self) -> float:
        length = self.cfg.conditioning.max_length if self.text else 0
        width = self.conditions.text_width() or self.cfg.conditioning.joint_width
        return flops_per_image(self.cfg.model, length, width if self.text else 0)

    def make_data(self, run_dir: pathlib.Path) -> ImageData:
        data = build_image_data(self.cfg, self.conditions.caption_tokens(),
                                self.latents.image_model() if self.latents is not None else None)
        if self.text:
            self.conditions.report_collisions(data.source.part_captions["train"])
        if self.latents is not None:
            self.latents.prepare(data.source, run_dir)
        data.eval = self.with_fixed_noise(data.eval)
        return data

    def with_fixed_noise(self, batches: list[dict]) -> list[dict]:
        """Row i of every global held-out batch is scored at grid time i mod K, with noise fixed by the data seed;
        each process keeps its rows of both, so the held-out loss is the same on any number of processes."""
        rng, rows = np.random.default_rng([self.cfg.data.seed, 1]), self.cfg.data.batch_size
        m = self.cfg.model  # the model's input: latents when the batch holds images to encode
        t = this_process_rows(self.objective.eval_times(self.cfg.diffusion.eval_timesteps, rows))
        shape = (rows, m.image_size, m.image_size, m.channels)
        return [{**batch, "t": t, "noise": this_process_rows(rng.standard_normal(shape).astype(np.float32))}
                for batch in batches]

    def keep_frozen(self, run_dir: pathlib.Path) -> None:
        """A new run keeps what it needs of its frozen text encoder's run (config.yaml keeps the autoencoder's)."""
        if self.text:
            self.conditions.keep(run_dir)

    # ------------------------------------------------------------------ what a run records about its inputs
    def inputs(self, data: ImageData) -> dict:
        frozen = self.latents.identity() if self.latents is not None else {}
        return {**image_inputs(data), **({"autoencoder": frozen} if frozen else {})}

    def check_inputs(self, saved: dict, current: dict) -> None:
        check_image_inputs(saved, current)

    # ------------------------------------------------------------------ samples, evaluation, generation
    def draw(self, weights: Weights, requests: Sequence, seed: int, scale: float, overrides: list[str] = (),
             negative: str | None = None) -> np.ndarray:
        """Images (N, H, W, C) in [-1, 1], one per request (a label, or a caption: None for the null caption),
        guided away from the null condition (or the `negative` caption), from the sampler the config (and
        `overrides`) names. Drawn SAMPLE_BATCH rows (or fewer) at a time, each batch with its own key; each
        batch's condition is made as it is drawn, so a frozen text encoder's embeddings of thousands of captions
        are never all held at once."""
        cfg = with_overrides(self.cfg, list(overrides)) if overrides else self.cfg
        graphdef = weights.graphdefs[MAIN_GROUP]
        key = (graphdef, cfg.diffusion.sampler, cfg.diffusion.sample_steps)
        if key not in self._samplers:  # compiled once per model structure and sampler
            m = cfg.model
            self._samplers[key] = make_sampler(graphdef, make_objective(cfg), cfg.diffusion,
                                               (m.image_size, m.image_size, m.channels), clip=self.latents is None)
        sampler, rows = self._samplers[key], np.asarray(list(requests), object)
        size = chunk_size(len(rows), SAMPLE_BATCH)
        unconditional = jax.tree.map(jnp.asarray, self.conditions.null(weights, size) if negative is None
                                     else self.conditions.requested(weights, [negative] * size))

        def draw_batch(requests_B: np.ndarray, index: int) -> jax.Array:
            condition = jax.tree.map(jnp.asarray, self.conditions.requested(weights, list(requests_B)))
            return sampler(weights.params[MAIN_GROUP], condition, unconditional,
                           jax.random.fold_in(jax.random.PRNGKey(seed), index), jnp.float32(scale))

        images = map_chunks(draw_batch, rows, size, progress=draw_progress(self.cfg, "sample"))
        return self.latents.decode(weights, images) if self.latents is not None else images

    def sample(self, weights: Weights, data: ImageData, run_dir: pathlib.Path, step: int | None) -> dict:
        """Write a grid (one row per class, or per held-out caption) to RUN_DIR/samples/ and TensorBoard; at the
        end, score the samples."""
        d = self.cfg.diffusion
        if self.text:
            requests = list(dict.fromkeys(data.source.part_captions["eval"]))[:SAMPLE_PROMPTS]
        else:
            requests = list(range(self.cfg.model.num_classes))
        images = self.draw(weights, [r for r in requests for _ in range(d.samples_per_class)], self.cfg.train.seed,
                           d.guidance_scale)
        summary = {"samples": write_training_grid(self.cfg, images, len(requests), run_dir, step)}
        if jax.process_index() != 0:  # every process sampled (params are sharded); one scores
            return summary
        if step is None and d.quality_eval:
            summary.update(self.quality(weights, data, d.guidance_scale, self.real_images(weights, data)))
        return summary

    def real_images(self, weights: Weights, data: ImageData) -> tuple[ImageSet, ImageSet]:
        """(held-out, train) images sample quality compares with; for cached latents, what the autoencoder makes
        of them. Decoding a whole split is slow, and the autoencoder is frozen (its group is never trained), so
        they are made once for `data` and kept for every later evaluation and guidance scale."""
        if self._real is not None and self._real[0] is data:
            return self._real[1]
        held_out, train_set = quality_images(self.cfg, data.held_out), data.train_set
        if self.latents is not None and self.latents.cached:
            held_out, train_set = self.latents.pixel_set(weights, held_out), self.latents.pixel_set(weights, train_set)
        self._real = (data, (held_out, train_set))
        return held_out, train_set

    def quality(self, weights: Weights, data: ImageData, scale: float, real: tuple[ImageSet, ImageSet]) -> dict:
        """Sample quality: one sample per held-out image, for its label (caption), in a classifier's features;
        for captions of the synthetic shapes, prompt adherence beside shuffled prompts. `real`: what `real_images` gives."""
        from jaxgen.diffusion.quality import sample_quality

        held_out, train_set = real
        requests = (list(data.source.part_captions["eval"][:len(held_out)]) if self.text
                    else held_out.labels.tolist())
        samples = self.draw(weights, requests, seed=1, scale=scale)
        report = {**sample_quality(samples, held_out.labels, train_set, held_out, scale), "guidance_scale": scale}
        if self.text and shapes_captions(requests):
            from jaxgen.quality.shape_checker import adherence

            report["adherence"] = adherence(samples, requests)
        return report

    def evaluate(self, weights: Weights, data: ImageData, loss_sum: float, weight_sum: float) -> dict:
        """Held-out diffusion loss (fixed noise levels and noise) and sample quality; for a text-to-image run,
        quality and adherence at each scale of `diffusion.eval_guidance_scales`, with a plot."""
        configured = self.cfg.diffusion.guidance_scale
        scales = list(dict.fromkeys(self.cfg.diffusion.eval_guidance_scales)) if self.text else []
        real = self.real_images(weights, data)
        reports = {scale: self.quality(weights, data, scale, real) for scale in dict.fromkeys([configured, *scales])}
        result = {"eval_loss": loss_sum / max(weight_sum, 1.0), **reports[configured]}
        if scales:
            result["guidance_sweep"] = [reports[scale] for scale in scales]
        return result

    def check_sample_inputs(self, options: dict[str, Any], run_dir: pathlib.Path) -> None:
        """Nothing here needs the run's files (Task.check_sample_inputs)."""

    def check_sample_options(self, options: dict[str, Any]) -> list[str]:
        """The sampler overrides `--sampler` and `--steps` make (a sampler must fit the objective)."""
        rows = len(options["prompt"] or [""]) if self.text else len(
            requested_labels(options["labels"], self.cfg.model.num_classes))
        pixels = self.cfg.model if self.latents is None else self.latents.ae_cfg
        asked = f"--num-per-label {options['num_per_label']} for {rows} {'prompts' if self.text else 'labels'}"
        check_sample_fits(rows * options["num_per_label"], (pixels.image_size, pixels.image_size, pixels.channels),
                          asked, options)
        overrides = [*([f"diffusion.sampler={options['sampler']}"] if options["sampler"] else []),
                     *([f"diffusion.sample_steps={options['steps']}"] if options["steps"] else [])]
        with_overrides(self.cfg, overrides)
        return overrides

    def generate(self, weights: Weights, run_dir: pathlib.Path, step: int, options: dict[str, Any],
                 on_text: Callable[[str], None] | None) -> list[dict]:
        """A grid, one row per label (every class unless `labels` names some) or per prompt, and optionally the
        arrays."""
        overrides = self.check_sample_options(options)
        if self.text:
            requests = options["prompt"] or [""]
            if not options["prompt"]:
                log.warning("no --prompt: drawing for the empty caption (what the model makes of no text)")
            self.conditions.warn_of_prompts_read_in_part([*requests, *([options["negative_prompt"]]
                                                               if options.get("negative_prompt") else [])])
        else:
            requests = requested_labels(options["labels"], self.cfg.model.num_classes)
        scale = self.cfg.diffusion.guidance_scale if options["guidance"] is None else options["guidance"]
        per = options["num_per_label"]
        rows = [r for r in requests for _ in range(per)]
        negative = options.get("negative_prompt")
        images_NHWC = self.draw(weights, rows, options["seed"], scale, overrides, negative)
        out = pathlib.Path(options["out"]) if options["out"] else run_dir / "samples" / f"sample_step{step}.png"
        save_png(image_grid(images_NHWC, rows=len(requests)), out)
        result = {"grid": str(out), "step": step, ("prompts" if self.text else "labels"): requests,
                  "num_per_label": per, "guidance": scale, **({"negative_prompt": negative} if negative else {})}
        if options["save_array"]:
            arrays = {"prompts": np.asarray(rows)} if self.text else {"labels": np.asarray(rows, np.int32)}
            result["array"] = save_arrays(options["save_array"], images=to_unit_range(images_NHWC), **arrays)
        return [result]


# Rows the sampler draws at once (fewer for a smaller request): a quality evaluation of thousands of
# images runs in batches of this many, compiled once, its memory bounded (with guidance the model sees twice as many).
SAMPLE_BATCH = 64
SAMPLE_PROMPTS = 8  # rows of a text-to-image run's sample grid: its first distinct held-out captions


def shapes_captions(captions: list[str]) -> bool:
    """Whether every caption is one of the synthetic shapes set's (so the shape checker can judge samples)."""
    from jaxgen.data.synth_shapes import parse_caption
    from jaxgen.errors import DataError

    try:
        for caption in captions:
            parse_caption(caption)
    except DataError:
        return False
    return bool(captions)
