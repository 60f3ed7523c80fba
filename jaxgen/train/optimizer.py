"""AdamW with warmup + decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import logging

import jax
import optax

from jaxgen.config import OptimizerConfig

log = logging.getLogger("jaxgen")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    decay = {
        "cosine": optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio),
        "linear": optax.linear_schedule(cfg.lr, end, decay_steps),
        "constant": optax.constant_schedule(cfg.lr),
    }[cfg.decay]
    # Warmup from lr/warmup (not 0) so the first step already learns.
    warm = optax.linear_schedule(cfg.lr / max(warmup, 1), cfg.lr, max(warmup - 1, 1))
    return optax.join_schedules([warm, decay], [warmup])


def warn_of_long_warmup(cfg: OptimizerConfig, total_steps: int) -> None:
    """A warmup longer than the run is cut to it (`learning_rate_schedule`): the run never decays."""
    if cfg.warmup_steps > total_steps:
        log.warning("optimizer.warmup_steps=%d is more than train.steps=%d: the learning rate warms up over all %d "
                    "steps and never decays", cfg.warmup_steps, total_steps, total_steps)


def weight_decay_mask(params: dict, decay_embeddings: bool) -> dict:
    """Decay matrices; never norm scales or biases; embeddings only when asked.

    A stacked layer weight has a leading 'layers' axis, so its rank says nothing:
    the leaf name does. Norm scales are named `scale`, the embedding table `embed`.
    """

    def decide(path, leaf) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("scale", "bias"):
            return False
        if name == "embed":
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=lambda params: weight_decay_mask(params, cfg.decay_embeddings),
    )
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity()
    return optax.chain(clip, adamw), schedule
