"""The GEMM-only bound finds every dot a compiled program runs, loop trips included, and times it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemm_bound


def test_dots_in_a_scanned_loop_count_once_per_trip_with_their_layout():
    def program(x_MK, w_LKN, g_MN):
        def layer(x, w):
            return jnp.tanh(x @ w), None

        y, _ = jax.lax.scan(layer, x_MK, w_LKN)  # 3 trips of a (64, 32) x (32, 32) product
        dw = jax.lax.dot_general(x_MK, g_MN, (((0,), (0,)), ((), ())))  # x.T @ g: transposed left operand
        return y, dw

    args = (jnp.ones((64, 32)), jnp.ones((3, 32, 32)), jnp.ones((64, 16)))
    counts = gemm_bound.dots_of(jax.jit(program).lower(*args).compile().as_text())

    by_shapes = {(dot.lhs[1], dot.rhs[1]): (dot, times) for dot, times in counts.items()}
    looped, looped_times = by_shapes[((64, 32), (32, 32))]
    assert looped_times == 3
    assert looped.flops == 2 * 64 * 32 * 32
    assert looped.describe() == "f32[64, 32] x f32[32, 32] NN -> f32"
    transposed, transposed_times = by_shapes[((64, 32), (64, 16))]
    assert transposed_times == 1
    assert transposed.flops == 2 * 32 * 16 * 64
    assert transposed.describe().endswith("TN -> f32")


@pytest.mark.parametrize("contracting,batch,rhs_shape", [
    (((1,), (1,)), ((), ()), (12, 8)),  # g @ w.T
    (((0,), (0,)), ((), ()), (16, 12)),  # x.T @ g
    (((3,), (3,)), ((0, 1), (0, 1)), (2, 2, 12, 8)),  # attention scores, batched over (B, K)
])
def test_torch_operands_compute_the_same_product_as_the_hlo_dot(contracting, batch, rhs_shape):
    import torch

    lhs_shape = (2, 2, 16, 8) if batch[0] else (16, 8)
    dot = gemm_bound.Dot(lhs=("f32", lhs_shape), rhs=("f32", rhs_shape), contracting=contracting, batch=batch,
                         out_dtype="f32")
    rng = np.random.default_rng(0)
    lhs, rhs = rng.standard_normal(lhs_shape, np.float32), rng.standard_normal(rhs_shape, np.float32)
    expected = jax.lax.dot_general(lhs, rhs, (contracting, batch), precision="highest")
    a, b = gemm_bound.torch_operands(dot, (lhs, rhs))
    got = torch.matmul(a, b).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_batched_dot_is_timed_in_xla_and_torch():
    dot = gemm_bound.Dot(lhs=("bf16", (2, 2, 16, 8)), rhs=("bf16", (2, 2, 12, 8)), contracting=((3,), (3,)),
                         batch=((0, 1), (0, 1)), out_dtype="f32")
    assert dot.flops == 2 * 4 * 16 * 12 * 8
    assert dot.describe() == "bf16[2, 2, 16, 8] x bf16[2, 2, 12, 8] NT -> f32"
    assert 0 < gemm_bound.time_in_xla(dot, chain=2, repeats=2) < 1
    assert 0 < gemm_bound.time_in_torch(dot, repeats=2) < 1
