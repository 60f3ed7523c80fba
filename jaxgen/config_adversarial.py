"""The training sections of the adversarial families: `autoencoder:` (with its PatchGAN) and `gan:`.

Each discriminator is a second model of its task with an optimizer of its own,
configured here in the shape of the `optimizer:` section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from jaxgen.config_optimizer import OptimizerConfig
from jaxgen.config_section import Section as _Section


class DiscriminatorOptimizerConfig(OptimizerConfig):
    """GAN practice: a constant rate from the first step, a low first-moment decay, no weight decay, no clipping.

    Defaults of their own (not `optimizer:`'s), so that setting one key keeps the others.
    """

    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "constant"
    b1: float = Field(0.5, ge=0, lt=1)
    b2: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    clip_norm: float | None = Field(None, gt=0)


class GANDiscriminatorOptimizerConfig(DiscriminatorOptimizerConfig):
    """StyleGAN's Adam moments (b1 0, b2 0.99)."""

    b1: float = Field(0.0, ge=0, lt=1)
    b2: float = Field(0.99, ge=0, lt=1)


def patchgan_side(image_size: int, layers: int) -> int:
    """The side of a PatchGAN's score map: `layers` halvings of the image, then two 4x4 stride-1 convolutions."""
    side = image_size
    for _ in range(layers):
        side //= 2
    return side - 2


class AdversarialConfig(_Section):
    """A PatchGAN discriminator scoring patches of an autoencoder's reconstructions (Esser et al. 2021)."""

    # Multiplier of the adaptive adversarial weight; 0 trains no discriminator at all.
    weight: float = Field(0.0, ge=0)
    # Steps before the discriminator and the adversarial term start (reconstructions must be
    # reasonable before a critic helps).
    start_step: int = Field(0, ge=0)
    loss: Literal["hinge", "non_saturating"] = "hinge"
    # Channels of the first of `layers` stride-2 4x4 convolutions, doubled per layer (up to 8x).
    channels: int = Field(64, gt=0)
    layers: int = Field(2, gt=0)
    # The adaptive weight ||grad rec|| / ||grad adv|| (at the decoder's last layer) is clipped to this.
    max_adaptive_weight: float = Field(1e4, gt=0)
    optimizer: DiscriminatorOptimizerConfig = Field(default_factory=DiscriminatorOptimizerConfig)

    @property
    def enabled(self) -> bool:
        return self.weight > 0


class AutoencoderTrainingConfig(_Section):
    """How an autoencoder is trained (model.kind: autoencoder) and shown."""

    reconstruction: Literal["l1", "l2"] = "l1"
    # Weight of the KL divergence of the latent posterior from N(0, I), per latent number
    # against the reconstruction loss per pixel (Stable Diffusion's VAE: 1e-6).
    kl_weight: float = Field(1e-6, ge=0)
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)
    # Reconstruction grids (held-out images above their reconstructions) every this many steps and
    # at the end; 0 = only at the end.
    sample_every: int = Field(0, ge=0)
    sample_images: int = Field(16, gt=0)


class GANTrainingConfig(_Section):
    """How a GAN is trained (model.kind: gan) and shown; `optimizer:` is the generator's."""

    # non_saturating: softplus losses (Goodfellow et al. 2014); hinge: Miyato et al. 2018.
    loss: Literal["non_saturating", "hinge"] = "non_saturating"
    # R1 penalty gamma / 2 * |grad_x D(x)|^2 on real images (Mescheder et al. 2018); 0 = off.
    r1_gamma: float = Field(1.0, ge=0)
    # Exponential moving average of the generator: decay ramps linearly from 0 over ema_warmup steps.
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: int = Field(100, ge=0)
    # Sample grids (one row per class) every this many steps and at the end; 0 = only at the end.
    sample_every: int = Field(0, ge=0)
    # Samples in each row: a picture to look at, held in memory whole, so at most 100.
    samples_per_class: int = Field(10, gt=0, le=100)
    discriminator_optimizer: GANDiscriminatorOptimizerConfig = Field(default_factory=GANDiscriminatorOptimizerConfig)
