"""Checkpoints are verified: digests, damage of every kind of file, fallback, readers, retention, records."""

import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgen.checkpoint import Checkpointer, DamagedCheckpoint, read_failure, restore_subtree
from jaxgen.checkpoint_layout import committed_steps
from jaxgen.config import CheckpointConfig
from jaxgen.errors import CheckpointError, NonFiniteError
from jaxgen.integrity import _digests, _packs, all_finite, differing, tree_digest
from jaxgen.metrics import MetricsWriter, read_metrics

from helpers import flip_bytes


@pytest.fixture(scope="module")
def mesh(devices):
    return jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def make_state(mesh, seed: int) -> dict:
    """A stand-in train state: sharded float params and moments, a bf16 array, integer counters, a key."""
    rng = np.random.default_rng(seed)
    sharded = NamedSharding(mesh, P("data", "fsdp"))
    w = rng.standard_normal((256, 128)).astype(np.float32)
    return {
        "params": {"w": jax.device_put(w, sharded), "b": jnp.asarray(rng.standard_normal(128), jnp.bfloat16)},
        "opt_state": {"mu": jax.device_put(w * 0.1, sharded), "count": jnp.int32(seed)},
        "rng": jax.random.PRNGKey(seed),
    }


def target_of(state: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# ----------------------------------------------------------------------------- digests


def test_digest_does_not_depend_on_sharding_and_catches_any_changed_word(mesh):
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    layouts = [P(), P("data", "fsdp"), P(None, "data"), P(("data", "fsdp"))]
    digests = [tree_digest({"x": jax.device_put(x, NamedSharding(mesh, spec))}) for spec in layouts]
    assert all(d == digests[0] for d in digests)

    flipped = x.copy()
    flipped.view(np.uint32)[5, 3] ^= 1 << 30  # one bit
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
    for changed in (flipped, swapped):
        assert differing(digests[0], tree_digest({"x": jnp.asarray(changed)})) == ["x"]


def test_finite_flags_and_all_finite():
    good = {"a": jnp.ones(3), "n": jnp.arange(3)}
    bad = {"a": jnp.asarray([1.0, jnp.inf, 0.0]), "n": jnp.arange(3)}
    assert all(d["finite"] for d in tree_digest(good).values())
    assert tree_digest(bad)["a"]["finite"] is False and tree_digest(bad)["n"]["finite"] is True
    assert bool(all_finite(good)) and not bool(all_finite(bad)) and bool(all_finite({"n": jnp.arange(2)}))


def test_small_leaves_digested_together_give_the_figures_of_one_leaf_at_a_time(mesh):
    """Small replicated leaves of every packable dtype, with infinities and NaNs, beside leaves that keep a pass
    of their own (big, sharded, 64-bit-free key data): each digest equals the leaf-by-leaf computation's."""
    rng = np.random.default_rng(1)
    dtypes = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.uint8, jnp.int8, jnp.bool_]
    tree = {}
    for i in range(40):
        x = rng.standard_normal((1 + i % 5, 2 + i % 3)) * 300
        x.flat[i % x.size] = [np.inf, -np.inf, np.nan, 1.0][i % 4]
        tree[f"small{i}"] = jnp.asarray(x > 0) if dtypes[i % 7] == jnp.bool_ else jnp.asarray(x).astype(dtypes[i % 7])
    rows = jnp.asarray(rng.standard_normal((3, 300)), jnp.float32).at[2, 299].set(jnp.inf)  # several rows of the pack
    tree |= {"scalar": jnp.float32(3.0), "big": jnp.ones((600, 600)), "key": jax.random.PRNGKey(1),
             "empty": jnp.zeros((0, 3)), "rows": rows, "int16": jnp.asarray(rng.integers(-3000, 3000, 7), jnp.int16),
             "uint16": jnp.asarray(rng.integers(0, 60000, 5), jnp.uint16),
             "sharded": jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("data", "fsdp")))}
    assert sum(_packs(x) for x in tree.values()) == 46  # all but big and sharded (the key: uint32)
    names = list(tree)
    one_at_a_time = jax.device_get(_digests([tree[name] for name in names]))
    expected = {name: {"hash": [int(h) for h in hashes], "finite": bool(finite)}
                for name, (hashes, finite) in zip(names, one_at_a_time)}
    assert tree_digest(tree) == expected
    assert [name for name, d in expected.items() if not d["finite"]] == [
        f"small{i}" for i in range(40) if i % 4 < 3 and dtypes[i % 7] in (jnp.float32, jnp.bfloat16, jnp.float16)
    ] + ["rows"]


# ----------------------------------------------------------------------------- damage and fallback


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, mesh):
    """Checkpoints 1 and 2 of the stand-in state, and the states themselves."""
    directory = tmp_path_factory.mktemp("two") / "checkpoints"
    states = {step: make_state(mesh, step) for step in (1, 2)}
    saver = Checkpointer(directory, CheckpointConfig(keep=5))
    for step, state in states.items():
        saver.save(step, state, {"position": step}, {"note": "test"})
    saver.wait()
    saver.close()
    return directory, {s: jax.device_get(v) for s, v in states.items()}


def largest_file(step_dir: pathlib.Path, under: str) -> pathlib.Path:
    return max((p for p in (step_dir / under).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# What a disk, a bad copy or a hand can do to the newest checkpoint.
DAMAGE = {
    "array data file flipped": lambda d: flip_bytes(largest_file(d, "state/d"), count=16, every=1024),
    "array index (ocdbt manifest) flipped": lambda d: flip_bytes(d / "state" / "manifest.ocdbt"),
    "array metadata flipped": lambda d: flip_bytes(d / "state" / "_METADATA"),
    "per-process array metadata flipped": lambda d: flip_bytes(next((d / "state" / "array_metadatas").iterdir())),
    "data position json flipped": lambda d: flip_bytes(d / "data" / "metadata"),
    "run metadata json flipped": lambda d: flip_bytes(d / "meta" / "metadata"),
    "checksum file flipped": lambda d: flip_bytes(d / "jaxgen_checksums.json"),
    "checksum file deleted": lambda d: (d / "jaxgen_checksums.json").unlink(),
    "array data file truncated": lambda d: largest_file(d, "state/d").write_bytes(
        largest_file(d, "state/d").read_bytes()[:100]),
    "array data file deleted": lambda d: largest_file(d, "state/d").unlink(),
    "data item deleted": lambda d: shutil.rmtree(d / "data"),
    "step directory emptied": lambda d: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in list(d.iterdir())],
}

READER_UNAFFECTED = {"data position json flipped", "data item deleted", "run metadata json flipped"}
READER_INVISIBLE = {"checksum file deleted", "step directory emptied"}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_never_loaded_the_run_falls_back_to_the_previous(
        two_checkpoints, tmp_path, mesh, damage, caplog):
    source, saved = two_checkpoints
    directory = tmp_path / "checkpoints"
    shutil.copytree(source, directory)
    DAMAGE[damage](directory / "2")
    target = target_of(make_state(mesh, 0))

    # A reader of the params refuses it in one line and changes nothing (the data position is not its concern;
    # a step without its checksum file is not committed for readers at all).
    if damage in READER_UNAFFECTED:
        params, _, _ = restore_subtree(directory, ("params",), target["params"], step=2)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved[2]["params"])
    elif damage in READER_INVISIBLE:
        with pytest.raises(CheckpointError, match=r"has no checkpoint for step 2; available: \[1\]"):
            restore_subtree(directory, ("params",), target["params"], step=2)
    else:
        with pytest.raises(DamagedCheckpoint, match=r"checkpoint .*/2 is damaged") as refused:
            restore_subtree(directory, ("params",), target["params"], step=2)
        assert "\n" not in str(refused.value) and "TensorStore details" not in str(refused.value)
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]

    # The training run falls back, loudly, and sets the damaged one aside.
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        restored = Checkpointer(directory, CheckpointConfig()).restore_newest_intact(target)
    assert restored.step == 1 and restored.data_states == [{"position": 1}]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), saved[1])
    assert "checkpoints/2 " in caplog.text and "falling back" in caplog.text
    assert committed_steps(directory) == [1] and (directory / "2.damaged").is_dir()


def test_a_failed_read_is_told_by_its_innermost_reason_and_the_array_it_read():
    """Orbax wraps TensorStore's reason in one naming only a slice and an object's repr."""
    store = ValueError('FAILED_PRECONDITION: Error reading "params.model.embed/0.0.0" in OCDBT database at local file '
                       '"/r/checkpoints/8/state/": ZSTD_decompressStream() failed: Data corruption detected\nmore')
    try:
        try:
            raise store
        except ValueError:
            raise Exception("Encountered error while reading array index: (slice(0, 2, 1),). See full TensorStore "
                            "details: <bound method spec of TensorStore({...})>") from None  # context, not cause
    except Exception as wrapped:
        assert read_failure(wrapped) == ("array params.model.embed: ZSTD_decompressStream() failed: "
                                         "Data corruption detected")
    assert read_failure(FileNotFoundError("no such file: _METADATA")) == "FileNotFoundError: no such file: _METADATA"
    assert read_failure(KeyError()) == "KeyError: "
    try:  # an emptied _METADATA: json's decode error hides its StopIteration, which was named instead
        json.loads("")
    except json.JSONDecodeError as emptied:
        assert read_failure(emptied) == "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"


def test_when_every_checkpoint_is_damaged_nothing_is_set_aside(two_checkpoints, tmp_path, mesh):
    source, _ = two_checkpoints
    directory = tmp_path / "checkpoints"
    shutil.copytree(source, directory)
    for step in (1, 2):
        flip_bytes(largest_file(directory / str(step), "state/d"))
    with pytest.raises(DamagedCheckpoint, match=r"every checkpoint in .* is damaged.*/2 .*/1 .*Move"):
        Checkpointer(directory, CheckpointConfig()).restore_newest_intact(target_of(make_state(mesh, 0)))
    assert committed_steps(directory) == [1, 2]


def test_a_state_with_a_non_finite_value_is_never_saved(tmp_path, mesh):
    state = make_state(mesh, 1)
    state["opt_state"]["mu"] = state["opt_state"]["mu"].at[0, 0].set(jnp.nan)
    saver = Checkpointer(tmp_path / "ck", CheckpointConfig())
    saver.save(3, state, {}, {})
    with pytest.raises(NonFiniteError, match=r"refused to commit checkpoint 3: non-finite values in opt_state/mu"):
        saver.wait()
    assert committed_steps(tmp_path / "ck") == [] and not (tmp_path / "ck" / "3").exists()


def test_retention_keeps_the_checkpoint_read_back_intact_until_a_newer_one_is(two_checkpoints, tmp_path, mesh):
    source, _ = two_checkpoints
    directory = tmp_path / "checkpoints"
    shutil.copytree(source, directory)
    flip_bytes(largest_file(directory / "2", "state/d"))
    ckpt = Checkpointer(directory, CheckpointConfig(keep=1))
    assert ckpt.restore_newest_intact(target_of(make_state(mesh, 0))).step == 1
    for step in (3, 4, 5):
        ckpt.save(step, make_state(mesh, step), {}, {})
        ckpt.wait()
    assert committed_steps(directory) == [1, 5]  # keep=1, but 1 is the only one known to read back intact
    ckpt.close()
    assert Checkpointer(directory, CheckpointConfig(keep=1)).restore_newest_intact(
        target_of(make_state(mesh, 0))).step == 5


# ----------------------------------------------------------------------------- records


def test_records_after_the_resumed_step_and_a_torn_last_line_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(6)) + '{"step": 6, "lo')
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4, 5]
    MetricsWriter(tmp_path, tensorboard=False, resumed_at=3).write(4, {"loss": 2.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0)]
    MetricsWriter(tmp_path, tensorboard=False, resumed_at=None)  # starting over keeps nothing
    assert read_metrics(path) == []
