"""The transformer: causal, the size the formula says, and layout-independent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgen.models import build_model
from jaxgen.models.transformer import param_count

from conftest import tiny_config


def logits(cfg, tokens, seed=0):
    return build_model(cfg.model, nnx.Rngs(seed))(tokens)


@pytest.fixture
def tokens():
    return jax.random.randint(jax.random.PRNGKey(1), (2, 32), 0, 512)


def test_causal_future_tokens_never_change_past_logits(tokens):
    cfg = tiny_config()
    t = 12
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % 512)
    before, after = logits(cfg, tokens), logits(cfg, changed)
    np.testing.assert_array_equal(before[:, : t + 1], after[:, : t + 1])
    assert not np.allclose(before[:, t + 1:], after[:, t + 1:])


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_param_count_matches_formula(tie, kv_heads):
    cfg = tiny_config(f"model.tie_embeddings={tie}", f"model.n_kv_heads={kv_heads}").model
    abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
    assert counted == param_count(cfg)
    d, v, f, L = 64, 512, 192, 2
    attn = 2 * d * d + 2 * d * (kv_heads * 16)
    assert counted == v * d + L * (attn + 3 * d * f + 2 * d) + d + (0 if tie else d * v)


@pytest.mark.parametrize("override", ["model.scan_layers=false", "model.remat=none", "model.remat=full",
                                      "model.remat=dots_with_no_batch_dims_saveable", "model.batch_slices=1"])
def test_layer_scan_and_remat_do_not_change_the_function(tokens, override):
    base, variant = tiny_config(), tiny_config(override)

    def loss_and_grad(cfg):
        model = build_model(cfg.model, nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        f = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
        return jax.value_and_grad(f)(params)

    (l0, g0), (l1, g1) = loss_and_grad(base), loss_and_grad(variant)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_bf16_compute_with_f32_params(tokens):
    cfg = tiny_config("model.compute_dtype=bfloat16")
    model = build_model(cfg.model, nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model)))
    out = model(tokens)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, logits(tiny_config(), tokens), atol=0.05)


def test_gradients_reach_every_parameter(tokens):
    model = build_model(tiny_config().model, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    grads = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_document_mask_makes_packed_documents_independent():
    cfg = tiny_config("model.document_mask=true")
    model = build_model(cfg.model, nnx.Rngs(0))
    doc_a = jax.random.randint(jax.random.PRNGKey(1), (1, 10), 3, 512)
    doc_b = jax.random.randint(jax.random.PRNGKey(2), (1, 14), 3, 512)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segments = jnp.asarray([[1] * 10 + [2] * 14])
    positions = jnp.asarray([list(range(10)) + list(range(14))])
    together = model(packed, positions, segments)
    np.testing.assert_allclose(together[:, :10], model(doc_a), atol=1e-5)
    np.testing.assert_allclose(together[:, 10:], model(doc_b), atol=1e-5)
    # Without the mask the second document sees the first.
    assert not np.allclose(model(packed)[:, 10:], model(doc_b), atol=1e-3)


@pytest.mark.parametrize("slices", [2, 4])
def test_batch_slices_do_not_change_the_function_with_packed_documents(slices):
    """Slices take interleaved rows; positions and document ids must travel with their rows."""
    tokens = jax.random.randint(jax.random.PRNGKey(2), (8, 32), 0, 512)
    positions = jnp.tile(jnp.concatenate([jnp.arange(12), jnp.arange(20)]), (8, 1))
    segments = jnp.tile(jnp.repeat(jnp.array([0, 1]), jnp.array([12, 20]), total_repeat_length=32), (8, 1))
    segments = segments + jnp.arange(8)[:, None] * 2  # every row its own documents

    def loss_and_grad(cfg):
        graphdef, params = nnx.split(build_model(cfg.model, nnx.Rngs(0)))
        f = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens, positions, segments) ** 2)
        return jax.value_and_grad(f)(params)

    base = loss_and_grad(tiny_config("model.batch_slices=1", "model.document_mask=true"))
    sliced = loss_and_grad(tiny_config(f"model.batch_slices={slices}", "model.document_mask=true"))
    np.testing.assert_allclose(base[0], sliced[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), base[1], sliced[1])


def test_auto_batch_slices_follow_the_per_device_batch(devices):
    from jaxgen.config import MeshConfig
    from jaxgen.models.cpu_kernels import resolve_batch_slices
    from jaxgen.sharding import activation_rules, make_mesh, resolve_rules

    assert resolve_batch_slices("auto", 32) == 4  # CPU, no mesh
    assert [resolve_batch_slices("auto", b, auto=(2, 1)) for b in (8, 3)] == [2, 1]  # the DiT's attention
    mesh = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1), devices)
    with activation_rules(mesh, resolve_rules("dp")):
        assert [resolve_batch_slices("auto", b) for b in (64, 16, 8)] == [4, 2, 1]
        with pytest.raises(ValueError, match=r"batch_slices=4 does not divide the per-device batch 2 "
                                             r"\(batch 16 over 8 devices\)"):
            resolve_batch_slices(4, 16)


def test_batch_slices_must_divide_the_batch():
    with pytest.raises(Exception, match=r"model.batch_slices=3 does not divide the batch each step sees \(8 "):
        tiny_config("model.batch_slices=3", "data.batch_size=8")
