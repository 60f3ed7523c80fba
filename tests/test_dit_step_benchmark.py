"""benchmarks/dit_step.py: the PyTorch peer is the same DiT (parameters, FLOPs, outputs), and the summary's ratios; an MFU above 1 is refused."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config import load_config

from conftest import REPO


def tiny_dit_config():
    return load_config(REPO / "configs" / "dit_digits.yaml",
                       ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.freq_dim=16"])


def test_the_pytorch_dit_has_jaxgens_parameters_flops_and_outputs():
    import jax
    import torch
    from dit_step import check_models_agree
    from flax import nnx
    from torch_dit import DiT, shape_of

    from jaxgen.models import build_model

    cfg = tiny_dit_config()
    agreed = check_models_agree(cfg)  # raises if parameter or FLOP counts differ
    assert agreed["params"] == agreed["torch_params"] > 0
    assert agreed["torch_counted_flops_per_image"] == agreed["flops_per_image"]

    # Random weights everywhere (the zero-initialised modulations would hide the blocks), copied across.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0))))
    flat = nnx.to_flat_state(abstract)
    keys = jax.random.split(jax.random.PRNGKey(1), len(flat))
    weights = {path: 0.2 * np.asarray(jax.random.normal(k, v.shape)) for (path, v), k in zip(flat, keys)}
    params = nnx.from_flat_state({path: v.replace(jnp.asarray(weights[path])) for path, v in flat})
    peer = DiT(**shape_of(cfg.model))
    renamed = {"patch_bias": "patch_embed", "t_in_bias": "t_in", "t_out_bias": "t_out", "b_in": "w_in",
               "modulation_bias": "modulation", "final_modulation_bias": "final_modulation", "final_bias": "final"}
    with torch.no_grad():
        for path, w in weights.items():
            if path == ("class_embed",):
                peer.class_embed.copy_(torch.from_numpy(w))
                continue
            *modules, leaf = path
            name = f"{renamed.get(modules[-1], modules[-1])}.{'weight' if leaf == 'kernel' else 'bias'}"
            for prefix, w_i in ([(f"blocks.{i}.", w_i) for i, w_i in enumerate(w)] if modules[0] == "layers"
                                else [("", w)]):
                peer.get_parameter(prefix + name).copy_(torch.from_numpy(w_i.T if leaf == "kernel" else w_i))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)
    t, labels = np.array([10.0, 500.0, 990.0], np.float32), np.array([0, 7, 10])
    expected = np.asarray(jax.jit(lambda p, *inputs: nnx.merge(graphdef, p)(*inputs))(params, x, t, labels))
    with torch.no_grad():
        got = peer(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(labels)).numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)


def test_dit_step_summary_and_its_refusal_of_mfu_above_one():
    from dit_step import summarize

    peaks = {"float32": 100e9, "bfloat16": 200e9}
    images_per_s = {"jaxgen_float32": 10.0, "jaxgen_bfloat16": 15.0, "torch_eager_float32": 8.0,
                    "torch_eager_bfloat16": 12.0, "torch_compile_float32": 20.0}
    summary = summarize("digits", images_per_s, 1e9, peaks)
    assert summary == pytest.approx({"config": "digits", "images_per_s_f32": 10.0, "mfu": 0.1,
                                     "images_per_s_bf16": 15.0, "mfu_bf16": 0.075, "bf16_speedup": 1.5,
                                     "vs_torch_eager": 1.25, "bf16_vs_torch_eager_autocast": 1.25,
                                     "vs_torch_compile": 0.5})
    assert set(summarize("digits", {"jaxgen_float32": 10.0}, 1e9, peaks)) == {"config", "images_per_s_f32", "mfu"}
    with pytest.raises(RuntimeError, match="MFU 1.100 exceeds 1"):
        summarize("digits", {"jaxgen_float32": 110.0}, 1e9, peaks)
