"""Device mesh and the logical-axis rules that place parameters and activations on it.

Model code names *logical* axes; a rules table maps each to mesh axes. Parameter
axes (`embed`, `mlp`, `q_heads`, ...) and activation axes (`act_batch`,
`act_embed`, ...) are separate names, so FSDP can shard a weight's `embed` axis
while activations keep theirs whole. Changing strategy never touches model code.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxgen.config import MeshConfig
from jaxgen.errors import ConfigError

# jaxgen places every array itself (abstract state -> shardings -> jit), so
# variables must not try to shard themselves when created.
nnx.use_eager_sharding(False)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # every data-parallel axis splits the batch

Rules = Mapping[str, str | tuple[str, ...] | None]

_ACTIVATIONS: Rules = {"act_batch": BATCH_AXES, "act_length": None, "act_embed": None}
_TENSOR_PARALLEL: Rules = {
    "q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor",
    "act_heads": "tensor", "act_kv_heads": "tensor", "act_mlp": "tensor", "act_vocab": "tensor",
}
PRESETS: dict[str, Rules] = {
    "dp": {**_ACTIVATIONS},
    "fsdp": {**_ACTIVATIONS, "embed": "fsdp"},
    "tp": {**_ACTIVATIONS, **_TENSOR_PARALLEL},
    "fsdp_tp": {**_ACTIVATIONS, **_TENSOR_PARALLEL, "embed": "fsdp"},
}


def resolve_rules(preset: str, custom: Mapping[str, str | list[str] | None] | None = None) -> dict:
    """The preset's table with the config's own entries laid over it."""
    rules = dict(PRESETS[preset])
    for logical, mesh_axes in (custom or {}).items():
        axes = tuple(mesh_axes) if isinstance(mesh_axes, list) else mesh_axes
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            if axis not in MESH_AXES:
                raise ConfigError(
                    f"sharding.rules.{logical}: unknown mesh axis {axis!r}; valid: {', '.join(MESH_AXES)}"
                )
        if isinstance(axes, tuple) and len(set(axes)) < len(axes):
            raise ConfigError(f"sharding.rules.{logical}: {list(axes)} names a mesh axis twice; an array dimension is "
                              "split over each axis once (give each at most once)")
        rules[logical] = axes
    return rules


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); a single -1 takes the devices the others leave."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    described = ", ".join(f"mesh.{name}={size}" for name, size in zip(MESH_AXES, sizes))
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {described}")
    known = math.prod(s for s in sizes if s != -1)
    if fills:
        if n_devices % known:
            simulate = f"; to try it on one machine's CPU, add --cpu-devices {known}" if known > n_devices else ""
            raise ConfigError(
                f"{described}: the fixed axes use {known} devices, which does not divide "
                f"the {n_devices} devices present{simulate}"
            )
        sizes[fills[0]] = n_devices // known
    elif known != n_devices:
        simulate = f"; to try it on one machine's CPU, add --cpu-devices {known}" if known > n_devices else ""
        raise ConfigError(
            f"{described}: the mesh has {known} devices but {n_devices} are present; "
            f"make the product equal the device count or set one axis to -1{simulate}"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    # Auto axes: NamedSharding + sharding constraints, the GSPMD (pjit) model.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes: tuple[str | None, ...], rules: Rules) -> PartitionSpec:
    """Map logical names to a PartitionSpec; a mesh axis is used at most once."""
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        target = rules.get(name) if name else None
        axes = mesh_axes_of(target)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _check_divisible(what: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, axes in zip(shape, spec):
        axes = mesh_axes_of(axes)
        parts = math.prod(mesh.shape[a] for a in axes)
        if dim % parts:
            raise ConfigError(
                f"{what} of shape {shape} cannot be split over mesh axes {axes} "
                f"({parts} devices): {dim} is not divisible by {parts}. Change the model size, "
                "the mesh, or sharding.rules"
            )


def param_path(path: tuple) -> str:
    """`layers/attn/wq/kernel` from a pytree key path."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


# The logical axes of activations (`constrain`); those of parameters are in their metadata (`logical_axes`).
ACTIVATION_AXES = ("act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")


def logical_axes(abstract_state: nnx.State) -> set[str]:
    """The logical axis names a model's parameters carry."""
    names = set()
    for _, variable in nnx.to_flat_state(abstract_state):
        names.update(name for name in variable.get_metadata().get("out_sharding") or () if isinstance(name, str))
    return names


def refuse_unknown_rules(custom: Mapping[str, object] | None, parameter_axes: set[str]) -> None:
    """A `sharding.rules` entry for a logical axis the model does not have is a typo that shards nothing."""
    known = parameter_axes | set(ACTIVATION_AXES)
    unknown = sorted(set(custom or {}) - known)
    if unknown:
        raise ConfigError(f"sharding.rules.{unknown[0]}: this model has no logical axis {unknown[0]!r}; its axes: "
                          f"{', '.join(sorted(known))}")


def mesh_axes_of(target: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """A rule's mesh axes as a tuple: one name, several, or none."""
    return (target,) if isinstance(target, str) else tuple(target or ())


def idle_mesh_axes(mesh_sizes: Mapping[str, int], rules: Rules, parameter_axes: set[str]) -> list[str]:
    """Mesh axes of more than one device that split neither the batch nor any parameter the model has: every
    device along one computes what the others do."""
    used = set(BATCH_AXES)
    for logical in parameter_axes:
        used.update(mesh_axes_of(rules.get(logical)))
    return [axis for axis in MESH_AXES if mesh_sizes.get(axis, 1) > 1 and axis not in used]


def presets_splitting(axis: str) -> list[str]:
    """The sharding presets that split some parameter over mesh axis `axis`."""
    return [name for name, rules in PRESETS.items()
            if any(axis in mesh_axes_of(target) for logical, target in rules.items() if logical not in ACTIVATION_AXES)]


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules, name_prefix: str = "") -> dict:
    """Pure dict of NamedShardings from the logical axes in each Variable's metadata.

    `name_prefix` goes before a parameter's path in messages (a model group's name).
    """

    def one(path, variable: nnx.Variable) -> NamedSharding:
        logical = variable.get_metadata().get("out_sharding") or (None,) * variable.get_value().ndim
        spec = logical_to_spec(tuple(logical), rules)
        _check_divisible(f"parameter {name_prefix}{param_path(path)}", variable.get_value().shape, spec, mesh)
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(
        one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


# ----------------------------------------------------------------------------- activations

_active: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While tracing inside this block, `constrain` pins activations to the mesh."""
    token = _active.set((mesh, rules))
    try:
        yield
    finally:
        _active.reset(token)


def activation_shards(logical_axis: str) -> tuple[int, str | None]:
    """How many ways `constrain` splits an activation axis, and the mesh's platform.

    (1, None) outside `activation_rules`.
    """
    active = _active.get()
    if active is None:
        return 1, None
    mesh, rules = active
    entry = logical_to_spec((logical_axis,), rules)[0]
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([mesh.shape[n] for n in names])), mesh.devices.flat[0].platform


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `activation_rules`."""
    active = _active.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical_axes, rules)
    _check_divisible(f"activation {logical_axes}", x.shape, spec, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def with_rules(fn, mesh: Mesh, rules: Rules):
    """`fn`, traced with the activation sharding rules active (wrap it before jax.jit)."""

    def wrapped(*args):
        with activation_rules(mesh, rules):
            return fn(*args)

    return wrapped
