"""jaxgen's CPU attention against jax.nn.dot_product_attention, and the platform dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.models.layers import dot_product_attention

from conftest import compiled_dot_operand_types

B, L, DH = 2, 16, 8


def qkv(heads: int, kv_heads: int, dtype=jnp.float32, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (B, L, heads, DH), dtype)
    k = jax.random.normal(keys[1], (B, L, kv_heads, DH), dtype)
    v = jax.random.normal(keys[2], (B, L, kv_heads, DH), dtype)
    cotangent = jax.random.normal(keys[3], (B, L, heads, DH), dtype)
    return q, k, v, cotangent


def reference(q, k, v, *, is_causal, segments_BL=None):
    mask = None if segments_BL is None else (segments_BL[:, :, None] == segments_BL[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")


def value_and_grads(fn, q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cotangent))


SEGMENTS = jnp.array([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("is_causal,segments", [(True, None), (False, None), (True, SEGMENTS)])
def test_cpu_attention_matches_xla_in_value_and_gradients(heads, kv_heads, is_causal, segments):
    q, k, v, cotangent = qkv(heads, kv_heads)
    ours = value_and_grads(lambda q, k, v: dot_product_attention(
        q, k, v, is_causal=is_causal, segments_BL=segments, implementation="cpu"), q, k, v, cotangent)
    theirs = value_and_grads(lambda q, k, v: reference(q, k, v, is_causal=is_causal, segments_BL=segments),
                             q, k, v, cotangent)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, theirs):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=name)


def test_segments_keep_documents_apart():
    q, k, v, _ = qkv(4, 2)
    out = dot_product_attention(q, k, v, is_causal=True, segments_BL=SEGMENTS, implementation="cpu")
    # The second document of row 0 (positions 5..11) attends as if it were alone.
    alone = dot_product_attention(q[:1, 5:12], k[:1, 5:12], v[:1, 5:12], is_causal=True, implementation="cpu")
    np.testing.assert_allclose(out[:1, 5:12], alone, rtol=1e-5, atol=1e-5)


def bf16_step_dots(implementation: str):
    q, k, v, cotangent = qkv(4, 2, jnp.bfloat16)
    step = jax.jit(lambda q, k, v, g: value_and_grads(
        lambda q, k, v: dot_product_attention(q, k, v, is_causal=True, implementation=implementation), q, k, v, g))
    return compiled_dot_operand_types(step.lower(q, k, v, cotangent).compile().as_text())


def test_bf16_cpu_attention_keeps_every_matmul_in_bf16_and_auto_picks_it_on_cpu():
    # 2 forward + 4 backward products, none of them upcast by XLA:CPU.
    assert bf16_step_dots("cpu") == [("bf16", "bf16")] * 6
    assert bf16_step_dots("auto") == bf16_step_dots("cpu")
    # What the dispatch avoids: XLA's own lowering runs some of them in f32 on CPU.
    assert ("f32", "f32") in bf16_step_dots("xla")


def test_bf16_cpu_attention_is_close_to_f32():
    q, k, v, cotangent = qkv(4, 2)
    exact = value_and_grads(lambda q, k, v: reference(q, k, v, is_causal=True), q, k, v, cotangent)
    low = value_and_grads(lambda q, k, v: dot_product_attention(q, k, v, is_causal=True, implementation="cpu"),
                          *(x.astype(jnp.bfloat16) for x in (q, k, v, cotangent)))
    for name, got, want in zip(("out", "dq", "dk", "dv"), low, exact):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.05 * float(jnp.abs(want).max()), err_msg=name)


def test_uneven_head_groups_are_rejected():
    q, k, v, _ = qkv(4, 3)
    with pytest.raises(ValueError, match="4 query heads cannot share 3 key/value heads"):
        dot_product_attention(q, k, v, is_causal=True, implementation="cpu")
