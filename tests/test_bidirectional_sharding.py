"""Train steps of both bidirectional families on 8 simulated devices equal one device's.

Packed rows of two documents each, padding at the end; two optimizer steps on
fsdp_tp (fsdp 4 x tensor 2) and on data 2 x fsdp 2 x tensor 2 (where a
gathered embedding once gave a GAN wrong gradients) against one device.
"""

import functools

import jax
import numpy as np
import pytest

from jaxgen.config import load_config
from jaxgen.data.pipeline import to_global
from jaxgen.sharding import make_mesh
from jaxgen.train.build import build_training

TINY = ["model.vocab_size=96", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64",
        "data.seq_len=16", "data.batch_size=8", "data.target_len=8", "optimizer.eps=0.01",
        "optimizer.warmup_steps=0"]
ONE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
MESHES = {"fsdp_tp": ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "sharding.preset=fsdp_tp"],
          "data_fsdp_tp": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "sharding.preset=fsdp_tp"]}


def packed(rng, rows, length, first, vocab):
    """Rows of two documents (the first `first` tokens, then the rest but two), two padding slots at the end."""
    tokens = rng.integers(4, vocab, (rows, length)).astype(np.int32)
    segments = np.asarray([1] * first + [2] * (length - first - 2) + [0, 0], np.int32)
    positions = np.asarray(list(range(first)) + list(range(length - first - 2)) + [0, 0], np.int32)
    tokens[:, segments == 0] = 0
    return tokens, np.tile(segments, (rows, 1)), np.tile(positions, (rows, 1))


def batch_for(kind):
    rng = np.random.default_rng(0)
    if kind == "encoder":
        targets, segments, positions = packed(rng, 8, 16, 9, 96)
        weights = ((rng.random((8, 16)) < 0.3) & (segments > 0)).astype(np.float32)
        inputs = np.where(weights > 0, 3, targets).astype(np.int32)
        return {"inputs": inputs, "targets": targets, "weights": weights, "segment_ids": segments,
                "positions": positions}
    inputs, input_segments, input_positions = packed(rng, 8, 16, 9, 96)
    targets, target_segments, target_positions = packed(rng, 8, 8, 3, 96)
    targets_in = np.where(target_positions == 0, 1, np.roll(targets, 1, axis=1)) * (target_segments > 0)
    return {"inputs": inputs, "input_segments": input_segments, "input_positions": input_positions,
            "targets": targets, "targets_in": targets_in.astype(np.int32), "target_segments": target_segments,
            "target_positions": target_positions, "weights": (target_segments > 0).astype(np.float32)}


@functools.cache
def one_device(kind):
    """Two steps of the default on one device: what every other setting is compared with."""
    return train_steps(kind, jax.devices()[:1], *ONE_DEVICE)


def train_steps(kind, devices, *mesh, steps=2):
    cfg = load_config(None, [f"model.kind={kind}", *TINY, *mesh])
    training = build_training(cfg, make_mesh(cfg.mesh, devices))
    state = training.init_state()
    for _ in range(steps):
        state, metrics = training.train_step(state, to_global(batch_for(kind), training.mesh))
    return jax.device_get((state.params, metrics["loss"], metrics["grad_norm"]))


@pytest.mark.parametrize("kind", ["encoder", "encoder_decoder"])
@pytest.mark.parametrize("mesh", list(MESHES))
def test_a_sharded_train_step_equals_one_device(devices, kind, mesh):
    one = one_device(kind)
    sharded = train_steps(kind, devices, *MESHES[mesh])
    np.testing.assert_allclose(sharded[1:], one[1:], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), sharded[0], one[0])


@pytest.mark.parametrize("kind", ["encoder", "encoder_decoder"])
def test_remat_unrolled_layers_and_bf16_train_like_the_default(devices, kind):
    default = one_device(kind)
    for switches, rtol in ((["model.remat=full", "model.scan_layers=false"], 1e-5),
                           (["model.compute_dtype=bfloat16"], 3e-2)):
        other = train_steps(kind, devices[:1], *ONE_DEVICE, *switches)
        np.testing.assert_allclose(other[1:], default[1:], rtol=rtol, err_msg=str(switches))
