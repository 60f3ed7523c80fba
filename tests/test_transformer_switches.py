"""The transformer's family switches (Llama 3, Mistral, Qwen2/3, Gemma 2): each does what it says, everywhere.

Every attention implementation and the KV-cache decoder agree under each switch, a
sliding window hides exactly what lies outside it, soft-capping bounds the logits,
and 8 sharded devices compute what one does. The switches' maths against
`transformers` itself is tests/test_hf_families.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgen.models import build_model
from jaxgen.models.layers import dot_product_attention
from jaxgen.models.transformer import param_count
from jaxgen.outputs.hf_families import flat_params
from jaxgen.sharding import batch_sharding, make_mesh, resolve_rules, with_rules
from jaxgen.tasks import make_task
from jaxgen.tasks.layout import MAIN_GROUP, plan_models

from conftest import tiny_config

WINDOW = 4
# Each family's switches on the tiny config (2 layers, d_model 64), initialised large enough for soft-capping to bite.
FAMILY_SWITCHES = {
    "llama3": ["model.rope_theta=500000", "model.rope_scaling.factor=8", "model.rope_scaling.original_max_seq_len=16"],
    "mistral": [f"model.sliding_window={WINDOW}"],
    "qwen2": ["model.qkv_bias=true", f"model.sliding_window={WINDOW}", "model.sliding_window_layers=[1]"],
    "qwen3": ["model.qk_norm=true", "model.tie_embeddings=true"],
    "gemma2": ["model.norm_unit_offset=true", "model.scale_embeddings=true", "model.mlp_activation=gelu_tanh",
               "model.post_norms=true", "model.attn_logit_softcap=1.5", "model.final_logit_softcap=2.5",
               "model.query_pre_attn_scalar=8", f"model.sliding_window={WINDOW}", "model.sliding_window_layers=[0]",
               "model.tie_embeddings=true"],
}
EVERY_SWITCH = sorted({s for switches in FAMILY_SWITCHES.values() for s in switches
                       if not s.startswith(("model.sliding_window_layers", "model.tie_embeddings"))})


def model_of(*switches, init_std=0.2, seed=0):
    cfg = tiny_config(f"model.init_std={init_std}", *switches)
    return cfg, build_model(cfg.model, nnx.Rngs(params=seed))


def jitted(model):
    """The model's forward pass, compiled once."""
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    return lambda t: forward(params, t)


def tokens(batch=4, length=24, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 3, 512)


def test_defaults_add_no_parameters_and_every_switch_is_counted():
    _, plain = model_of()
    names = flat_params(nnx.to_pure_dict(nnx.state(plain, nnx.Param)))
    assert not [n for n in names if any(w in n for w in ("bias", "q_norm", "k_norm", "post_"))]
    for switches in [*FAMILY_SWITCHES.values(), EVERY_SWITCH]:
        cfg, model = model_of(*switches)
        assert param_count(cfg.model) == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("window,softcap,scale", [(3, None, None), (None, 2.0, None), (None, None, 0.2),
                                                  (5, 1.0, 0.3)])
@pytest.mark.parametrize("segments", [None, jnp.array([[0] * 5 + [1] * 11, [0] * 16])])
def test_cpu_attention_equals_xla_under_window_softcap_and_scale(window, softcap, scale, segments):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (2, 16, 4, 8)) * 2
    k, v = (jax.random.normal(key, (2, 16, 2, 8)) * 2 for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], (2, 16, 4, 8))

    def value_and_grads(implementation):
        def attention(q, k, v):
            return dot_product_attention(q, k, v, is_causal=True, segments_BL=segments, window=window,
                                         implementation=implementation, scale=scale, softcap=softcap)

        # Under jit the window is traced, as it is inside the scan over layers.
        out, vjp = jax.vjp(jax.jit(attention), q, k, v)
        return (out, *vjp(cotangent))

    for name, got, want in zip(("out", "dq", "dk", "dv"), value_and_grads("cpu"), value_and_grads("xla")):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=name)


# Every switch at once, with a sliding layer beside a global one (the window is then a per-layer scan input).
MIXED = [*EVERY_SWITCH, "model.sliding_window_layers=[1]"]


def test_xla_and_cpu_models_agree_in_logits_and_gradients():
    x = tokens()

    def logits_and_grads(attention):
        _, model = model_of(f"model.attention={attention}", *MIXED)
        graphdef, params = nnx.split(model)

        def loss(p):
            logits = nnx.merge(graphdef, p)(x)
            return jnp.sum(jnp.sin(logits)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, jax.tree.leaves(grads)

    (cpu, cpu_grads), (xla, xla_grads) = logits_and_grads("cpu"), logits_and_grads("xla")
    np.testing.assert_allclose(cpu, xla, rtol=1e-5, atol=1e-5)
    for got, want in zip(cpu_grads, xla_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_kv_cache_decoding_gives_the_full_forward_passs_logits():
    """A prompt of 6, then one token at a time well past the window: each step's logits are the forward pass's.

    The prefill's start is known when tracing (as in `jaxgen sample`), so it attends over the
    written slots alone; every later step's start is traced and attends over the whole buffer.
    """
    _, model = model_of(*MIXED)
    graphdef, params = nnx.split(model)
    x = tokens(batch=2, length=16)
    positions = jnp.broadcast_to(jnp.arange(16), x.shape)
    key_valid = jnp.ones(x.shape, bool)
    decode = jax.jit(lambda p, t, pos, cache, start: nnx.merge(graphdef, p).decode(t, pos, cache, start, key_valid))
    prefill = jax.jit(lambda p, t, pos, cache: nnx.merge(graphdef, p).decode(t, pos, cache, 0, key_valid))
    logits, cache = prefill(params, x[:, :6], positions[:, :6], model.init_cache(2, 16))
    stepwise = [logits]
    for t in range(6, 16):
        logits, cache = decode(params, x[:, t:t + 1], positions[:, t:t + 1], cache, t)
        stepwise.append(logits)
    np.testing.assert_allclose(jnp.concatenate(stepwise, axis=1), jitted(model)(x), rtol=1e-5, atol=1e-5)


def test_a_token_outside_the_sliding_window_changes_no_logit():
    model = jitted(model_of(*FAMILY_SWITCHES["mistral"])[1])  # every layer slides: 2 layers see 2 * (WINDOW - 1) back
    x = tokens(batch=1, length=16)
    last, reach = 15, 2 * (WINDOW - 1)
    base = model(x)[0, last]
    outside = model(x.at[0, last - reach - 1].set(7))[0, last]
    inside = model(x.at[0, last - (WINDOW - 1)].set(7))[0, last]
    np.testing.assert_array_equal(outside, base)
    assert float(jnp.abs(inside - base).max()) > 1e-3
    # Without the window the same change reaches the last token.
    full = jitted(model_of()[1])
    assert float(jnp.abs(full(x.at[0, last - reach - 1].set(7))[0, last] - full(x)[0, last]).max()) > 1e-3


def test_gemma2_global_layers_see_past_the_window():
    model = jitted(model_of(*FAMILY_SWITCHES["gemma2"])[1])  # layer 0 slides, layer 1 is global
    x = tokens(batch=1, length=16)
    changed = model(x.at[0, 0].set(7))[0, 15]
    assert float(jnp.abs(changed - model(x)[0, 15]).max()) > 1e-4


def test_final_soft_capping_bounds_the_logits():
    capped = jitted(model_of("model.final_logit_softcap=2.5", init_std=1.0)[1])
    free = jitted(model_of(init_std=1.0)[1])
    x = tokens()
    assert float(jnp.abs(free(x)).max()) > 10
    assert float(jnp.abs(capped(x)).max()) <= 2.5  # tanh saturates to exactly 1 in float32


def test_sharded_forward_equals_one_device(devices):
    """fsdp_tp over (data 2, fsdp 2, tensor 2), every switch on at once (per-layer windows included)."""
    cfg = tiny_config("model.init_std=0.2", *MIXED, "sharding.preset=fsdp_tp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    model = build_model(cfg.model, nnx.Rngs(params=0))
    x = tokens(batch=8)
    one_device = jitted(model)(x)
    mesh, rules = make_mesh(cfg.mesh, devices), resolve_rules("fsdp_tp")
    layout = plan_models(make_task(cfg), mesh, rules, cfg.train.seed)
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), layout.shardings[MAIN_GROUP])
    assert any(len(s.device_set) == 8 and not s.is_fully_replicated for s in jax.tree.leaves(
        layout.shardings[MAIN_GROUP]))
    forward = jax.jit(with_rules(lambda p, t: nnx.merge(layout.graphdefs[MAIN_GROUP], p)(t), mesh, rules),
                      in_shardings=(layout.shardings[MAIN_GROUP], batch_sharding(mesh)))
    np.testing.assert_allclose(forward(params, x), one_device, rtol=1e-5, atol=1e-5)
