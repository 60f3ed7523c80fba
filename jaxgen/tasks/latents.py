"""Latent diffusion's side of the diffusion task: the frozen autoencoder group and the scale of its latents.

With `diffusion.autoencoder: RUN_DIR` the run holds a frozen `autoencoder`
group (models/latent_space.py): the autoencoder's parameters and the latent
scale and shift, saved in every checkpoint. The scale comes from the latent
dataset's manifest (`images.source: latents`, where `jaxgen data prepare`
measured it), or is measured at the start of training from the first
`SCALE_IMAGES` training images when batches hold images to encode in the
step. A fresh run freezes the autoencoder run's newest checkpoint, and its
checkpoints record which (`identity`). Cached latents are decoded only by the
autoencoder that wrote them: a latent dataset written by another autoencoder
than the one the run freezes, or froze (a resumed or evaluated run: its
record, not the autoencoder run's newest), is refused in one line before
anything is built, and so are latents whose shape the model does not take.
"""

from __future__ import annotations

import logging
import pathlib
import shlex

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen.chunks import map_chunks
from jaxgen.config import AutoencoderConfig, Config
from jaxgen.data.image_batches import part_examples
from jaxgen.data.image_source import ImageSource
from jaxgen.data.images import ImageSet
from jaxgen.errors import ConfigError
from jaxgen.models.latent_space import LatentSpace
from jaxgen.tasks.base import ModelSpec, Weights

log = logging.getLogger("jaxgen")

AUTOENCODER_GROUP = "autoencoder"
SCALE_IMAGES = 1024
DECODE_BATCH = 64


def frozen_autoencoder_settings(cfg: Config) -> AutoencoderConfig:
    """The model settings of the autoencoder a latent diffusion run freezes: those the run kept of it
    (diffusion.autoencoder_model, in its config.yaml), else its run's (diffusion.autoencoder). The same on every
    process: whether a process sees that run does not decide it."""
    if cfg.diffusion.autoencoder_model is not None:
        return cfg.diffusion.autoencoder_model
    from jaxgen.outputs.frozen_autoencoder import autoencoder_config

    path = cfg.diffusion.autoencoder
    try:
        return autoencoder_config(path)
    except ConfigError as err:  # a relative path is read from where the command runs, not the run's folder
        where = "" if pathlib.Path(path).is_absolute() else f" (from {pathlib.Path.cwd()})"
        raise ConfigError(f"diffusion.autoencoder={path!r}{where}: {err}") from None


class Latents:
    def __init__(self, cfg: Config):
        """Reads only configs and the manifest: opening a run to sample or evaluate loads no autoencoder twice."""
        self.cfg, self.cached = cfg, cfg.images.source == "latents"
        self.ae_cfg = frozen_autoencoder_settings(cfg)
        h, z = self.ae_cfg.latent_size, self.ae_cfg.latent_channels
        m = cfg.model
        if (m.image_size, m.channels) != (h, z):
            raise ConfigError(f"diffusion.autoencoder={cfg.diffusion.autoencoder!r} makes {h}x{h}x{z} latents; set "
                              f"model.image_size={h} model.channels={z}")
        self.manifest = None
        if self.cached:
            from jaxgen.data.latent_dataset import read_manifest

            self.manifest = read_manifest(cfg.images.latents)
        self.scale: float | None = None if self.manifest is None else float(self.manifest["scale"])
        self.autoencoder = None  # FrozenAutoencoder, loaded by `prepare` for a fresh run
        self.frozen: dict | None = None  # what the run's checkpoints record of the autoencoder they froze
        self._checked = None  # (frozen group's params, latents' digest) last found to agree
        self._decode = jax.jit(lambda graphdef, params, z: nnx.merge(graphdef, params).decode(z), static_argnums=0)

    def image_model(self):
        """The model config images are read for: batches of images to encode in the step are of the
        autoencoder's size and channels (the DiT's own are the latents'); cached latents are the DiT's."""
        if self.cached:
            return self.cfg.model
        return self.cfg.model.model_copy(update={"image_size": self.ae_cfg.image_size,
                                                 "channels": self.ae_cfg.channels})

    def models(self) -> dict[str, ModelSpec]:
        def build(rngs: nnx.Rngs) -> LatentSpace:
            """The loaded autoencoder in a fresh run; a checkpoint's replaces it in a resumed or opened one."""
            from jaxgen.models.autoencoder import AutoencoderKL

            ae = self.autoencoder
            module = AutoencoderKL(self.ae_cfg, rngs) if ae is None else nnx.merge(ae.graphdef, ae.params)
            return LatentSpace(module, self.scale or 1.0, float(self.ae_cfg.shift_factor or 0.0))

        return {AUTOENCODER_GROUP: ModelSpec(build=build, trained=False)}

    def prepare(self, source: ImageSource, run_dir: pathlib.Path) -> None:
        """Before the state is made. A run whose checkpoints record the autoencoder they froze (one resumed or
        evaluated) needs nothing of the autoencoder run: cached latents are checked against that record. A
        fresh run loads the autoencoder run's newest checkpoint, checks cached latents against it and, for
        images encoded in the step, measures their scale from the data."""
        from jaxgen.diffusion.latents import measure_scale
        from jaxgen.outputs.frozen_autoencoder import frozen_in_run, load_autoencoder

        recorded = frozen_in_run(run_dir)
        if recorded:
            self.frozen = recorded
            self._refuse_latents_of_another(recorded, "the one this run froze in its checkpoints")
            return
        if self.autoencoder is None:
            self.autoencoder = load_autoencoder(self.cfg.diffusion.autoencoder)
        ae = self.autoencoder
        if ae.cfg != self.ae_cfg:  # a config.yaml of another run taken as this one's
            raise ConfigError(f"diffusion.autoencoder_model holds other settings than diffusion.autoencoder="
                              f"{self.cfg.diffusion.autoencoder!r} has; remove diffusion.autoencoder_model from the "
                              "config (training keeps it itself)")
        if recorded is None:  # a fresh run: what it freezes (checkpoints saved before the record carry none)
            self.frozen = {"run_dir": str(ae.run_dir), "step": ae.step, "digest": ae.digest, "scale": self.scale}
        self._refuse_latents_of_another({"run_dir": str(ae.run_dir), "step": ae.step, "digest": ae.digest},
                                        f"diffusion.autoencoder={self.cfg.diffusion.autoencoder!r} (step {ae.step})")
        if self.scale is not None:
            return
        images = part_examples(source, "train", SCALE_IMAGES)["images"]
        self.scale = measure_scale(ae.with_scale(1.0).encode(images))
        if self.frozen is not None:
            self.frozen["scale"] = self.scale
        log.info("latent scale %.4f: unit variance over the latents of the first %d training images",
                 self.scale, len(images))

    def identity(self) -> dict:
        """What a checkpoint records of the frozen autoencoder ({}: not known, a run saved before the record)."""
        return dict(self.frozen or {})

    def _refuse_latents_of_another(self, autoencoder: dict, named: str) -> None:
        """Refuse cached latents that `autoencoder` (its run_dir, step, digest and, where known, scale) did not
        write: the run would decode them through another autoencoder than the one that encoded them."""
        if self.manifest is None:
            return
        writer = self.manifest["autoencoder"]
        if writer["digest"] != autoencoder["digest"]:
            raise ConfigError(f"images.latents={self.cfg.images.latents!r} was encoded by the autoencoder of "
                              f"{writer['run_dir']} (step {writer['step']}), not by {named}; prepare the latents "
                              f"again with it: jaxgen data prepare --autoencoder {shlex.quote(autoencoder['run_dir'])}"
                              f" --step {autoencoder['step']} --images ... --out ...")
        scale = autoencoder.get("scale")
        if scale is not None and float(self.manifest["scale"]) != float(scale):
            raise ConfigError(f"images.latents={self.cfg.images.latents!r} are scaled by {self.manifest['scale']:.6g}"
                              f", but {named} scales its latents by {scale:.6g}; prepare the latents again with the "
                              "images the run started with, or start a new run")

    def model_input(self, models: dict[str, nnx.Module], images_BHWC: jax.Array) -> jax.Array:
        """What the DiT denoises: cached latents as they are, images encoded by the frozen autoencoder."""
        if self.cached:
            return images_BHWC
        return jax.lax.stop_gradient(models[AUTOENCODER_GROUP].encode(images_BHWC))

    def decode(self, weights: Weights, latents_NhwZ: jax.Array) -> np.ndarray:
        """Images (N, H, W, C) in [-1, 1] of sampled latents, through the run's own autoencoder and scale."""
        graphdef, params = weights.graphdefs[AUTOENCODER_GROUP], weights.params[AUTOENCODER_GROUP]
        self.check_frozen(params)
        return map_chunks(lambda chunk, _: self._decode(graphdef, params, jnp.asarray(chunk)),
                          np.asarray(jax.device_get(latents_NhwZ)), DECODE_BATCH)

    def check_frozen(self, params) -> None:
        """Refuse cached latents that the run's frozen autoencoder group (`params`) did not write: latents
        prepared again with a newer checkpoint of the autoencoder run would be decoded by the one frozen when
        the run began."""
        checked, digest = self._checked or (None, None)
        if self.manifest is None or (checked is params and digest == self.manifest["autoencoder"]["digest"]):
            return
        from jaxgen.diffusion.latents import params_digest

        writer, digest = self.manifest["autoencoder"], params_digest(params["autoencoder"])
        if digest != writer["digest"]:
            raise ConfigError(f"images.latents={self.cfg.images.latents!r} was encoded by the autoencoder of "
                              f"{writer['run_dir']} (step {writer['step']}), not by the one this run froze in its "
                              f"checkpoints (parameter digest {digest[:12]}); set images.latents to latents "
                              "prepared with that autoencoder, or start a new run")
        self._checked = (params, writer["digest"])

    def pixel_set(self, weights: Weights, latents: ImageSet) -> ImageSet:
        """Cached latents as the images the autoencoder makes of them (what sample quality compares with)."""
        return ImageSet(self.decode(weights, latents.images), latents.labels)
