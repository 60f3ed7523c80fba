"""The `optimizer:` section: AdamW's settings, its learning-rate schedule and clipping.

A task's second trained model (a discriminator) takes its own section of the same shape.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from jaxgen.config_section import Section as _Section


class OptimizerConfig(_Section):
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    # Final learning rate as a fraction of the peak.
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    # Norm scales are never decayed; embeddings only when asked.
    decay_embeddings: bool = False
    clip_norm: float | None = Field(1.0, gt=0)
