"""The model presets have exactly the published models' parameter counts, counted without allocating a weight."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgen.config import load_config
from jaxgen.models import build_model
from jaxgen.models.transformer import param_count
from jaxgen.outputs.hf_families import hf_config

from conftest import REPO

# The totals the publishers report (transformers' num_parameters() of their checkpoints).
PUBLISHED = {
    "llama3_8b": ("llama", 8_030_261_248),
    "mistral_7b": ("mistral", 7_241_732_096),
    "qwen3_0_6b": ("qwen3", 596_049_920),
    "gemma2_2b": ("gemma2", 2_614_341_888),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_has_the_published_parameter_count(preset):
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    family, published = PUBLISHED[preset]
    abstract = nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(params=0)))
    counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert counted == param_count(cfg.model) == published
    assert hf_config(cfg)["model_type"] == family  # and it exports as its family
