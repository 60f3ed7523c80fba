"""The `conditioning:` section: what a DiT is conditioned on, class labels or captions.

`by: text` makes a text-to-image model: each image's caption is embedded per
token and reaches every DiT block through cross-attention, and its pooled
embedding joins the timestep in the adaLN conditioning (models/dit.py). The
captions are embedded by a frozen jaxgen encoder or encoder-decoder run
(`text_encoder: RUN_DIR`), or by a small transformer encoder trained jointly
with the DiT from scratch over hashed words (`text_encoder: null`, the
`joint_*` settings). `drop_rate` of training captions are replaced by the null
caption, so the one model also predicts unconditionally, as classifier-free
guidance needs.
"""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field

from jaxgen.config_section import Section as _Section


class ConditioningConfig(_Section):
    # class: images.label_key labels (model.num_classes of them); text: the images' captions.
    by: Literal["class", "text"] = "class"
    # A jaxgen encoder (model.kind=encoder) or encoder-decoder run whose frozen encoder embeds the captions;
    # null: a small text encoder trained with the DiT.
    text_encoder: str | None = None
    # Caption tokens kept (longer captions are cut): the length every caption is padded to.
    max_length: int = Field(32, ge=2)
    # Probability a training caption is replaced by the null caption (classifier-free guidance).
    drop_rate: float = Field(0.1, ge=0, le=1)
    # The jointly trained encoder: lower-cased words hashed into joint_vocab buckets (so any prompt has ids
    # and no vocabulary file is needed), learned positions, pre-norm transformer blocks.
    joint_vocab: int = Field(4096, ge=16)
    joint_width: int = Field(128, gt=0)
    joint_layers: int = Field(2, gt=0)
    joint_heads: int = Field(4, gt=0)

    @pydantic.model_validator(mode="after")
    def _check_heads(self) -> ConditioningConfig:
        if self.joint_width % self.joint_heads:
            raise ValueError(f"conditioning.joint_width={self.joint_width} is not divisible by "
                             f"conditioning.joint_heads={self.joint_heads}")
        return self
