"""Collective traffic and per-device memory of the compiled train step, per sharding preset. Prints JSON.

For each preset on 8 simulated CPU devices the real train step is lowered and
compiled on abstract inputs (nothing runs). One JSON line per preset, then a
summary line `{preset: {collective_bytes, analytic_bytes, ratio, ok, memory}}`:
  collective_bytes  bytes one device sends per step, summed over the collectives
                    of the compiled HLO (ops in loop bodies times the trip count)
  analytic_bytes    the same figure from the parameter and activation shapes and
                    the preset's shardings, as this backend lowers them
                    (`analytic_traffic` and `Lowering` say what that assumes)
  analytic_ideal_bytes  the same for a backend that makes true reduce-scatters,
                    sums partial gradients before all-reducing them and hoists
                    reductions out of loops (XLA:GPU)
  memory            `compiled.memory_analysis()` (per device) beside the analytic
                    state, argument and output sizes; temp is measured only
Target: collective_bytes within 10% of analytic_bytes (`ok`) for dp and fsdp;
tp and fsdp_tp get the same check.

Byte convention, ring algorithms: n = devices in the replica group, S = the
whole buffer (the gathered result of an all-gather, the operand of the others):
  all-reduce          2 (n-1)/n S   (a reduce-scatter, then an all-gather)
  all-gather          (n-1)/n S
  reduce-scatter      (n-1)/n S
  all-to-all          (n-1)/n S
  collective-permute  S             (every device sends its buffer once)

    flock /tmp/jaxgen-bench.lock python benchmarks/sharding_report.py [model.d_model=512 ...] [--presets dp fsdp]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxgen.config import Config, TransformerConfig, load_config
from jaxgen.errors import ConfigError
from jaxgen.models.transformer import param_count
from jaxgen.sharding import BATCH_AXES, batch_sharding, data_parallel_size, make_mesh, param_path
from jaxgen.tasks.layout import MAIN_GROUP
from jaxgen.train.build import Training, build_training

from hlo import operand_bytes, replica_group_size, walk_instructions

# Meshes the default model (4 query heads, 2 kv heads) divides evenly: the kv-head
# activations are split over `tensor`, so tensor parallelism stops at 2 here.
# -1 takes the remaining devices (8 unless --devices says otherwise).
PRESET_MESHES = {
    "dp": ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1"],
    "fsdp": ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"],
    "tp": ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=2"],
    "fsdp_tp": ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=2"],
}
TOLERANCE = 0.10

# ----------------------------------------------------------------------------- collectives of the compiled HLO

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of COLLECTIVES (an async `-start` counts as its op; `-done` is not counted)
    group: int  # devices in one replica group (0 for collective-permute)
    buffer_bytes: int  # S of the convention in the module docstring
    times: int  # executions per step: the product of the enclosing loops' trip counts
    computation: str

    @property
    def bytes_per_device(self) -> float:
        """Bytes one device sends, per execution (the docstring's ring convention)."""
        n = self.group
        if self.kind == "collective-permute":
            return float(self.buffer_bytes)
        factor = 2.0 if self.kind == "all-reduce" else 1.0
        return factor * (n - 1) / n * self.buffer_bytes if n else 0.0


def parse_collectives(hlo_text: str, num_devices: int) -> list[Collective]:
    """Every collective the compiled step runs (see `walk_instructions`).

    Raises if a loop holding a collective has no known trip count, since its traffic
    per step is unknown.
    """
    found: list[Collective] = []
    for instruction, computation, types, times, in_unknown_loop in walk_instructions(hlo_text):
        kind = instruction.opcode.removesuffix("-start")
        if kind not in COLLECTIVES:
            continue
        if in_unknown_loop:
            raise ValueError(f"{instruction.name} is in a loop with no known trip count")
        operand = sum(operand_bytes(o, types) for o in instruction.operands)
        group = 0 if kind == "collective-permute" else replica_group_size(instruction.attributes, num_devices)
        buffer = operand * group if kind == "all-gather" else operand
        found.append(Collective(kind, group, buffer, times, computation))
    return found


def summarize_collectives(collectives: list[Collective]) -> dict:
    """Total bytes per device per step, and the same grouped by kind and replica-group size."""
    groups: dict[str, dict] = {}
    for c in collectives:
        key = c.kind if c.kind == "collective-permute" else f"{c.kind} n={c.group}"
        entry = groups.setdefault(key, {"ops_per_step": 0, "bytes": 0.0, "in_loops_bytes": 0.0})
        entry["ops_per_step"] += c.times
        entry["bytes"] += c.times * c.bytes_per_device
        if c.times > 1:
            entry["in_loops_bytes"] += c.times * c.bytes_per_device
    for entry in groups.values():
        entry["bytes"] = round(entry["bytes"])
        entry["in_loops_bytes"] = round(entry["in_loops_bytes"])
    return {"total_bytes": sum(g["bytes"] for g in groups.values()), "by_kind": dict(sorted(groups.items()))}


# ----------------------------------------------------------------------------- analytic model


@dataclasses.dataclass(frozen=True)
class ParamLeaf:
    path: str  # `layers/mlp/w_up/kernel`
    elements: int  # of the whole array
    itemsize: int
    batch_shards: int  # g: product of the data-parallel mesh axes (data, fsdp) that split it
    other_shards: int  # t: product of the other mesh axes (tensor) that split it

    @property
    def nbytes(self) -> int:
        return self.elements * self.itemsize

    @property
    def device_bytes(self) -> float:
        return self.nbytes / (self.batch_shards * self.other_shards)


def param_leaves(training: Training) -> list[ParamLeaf]:
    mesh = training.mesh

    def leaf(path, abstract: jax.ShapeDtypeStruct, sharding: NamedSharding) -> ParamLeaf:
        axes = [a for entry in sharding.spec for a in ((entry,) if isinstance(entry, str) else entry or ())]
        batch = math.prod(mesh.shape[a] for a in axes if a in BATCH_AXES)
        other = math.prod(mesh.shape[a] for a in axes if a not in BATCH_AXES)
        return ParamLeaf(param_path(path), abstract.size, abstract.dtype.itemsize, batch, other)

    flat = jax.tree_util.tree_flatten_with_path(training.layout.abstract.params[MAIN_GROUP])[0]
    shardings = jax.tree.leaves(training.layout.shardings.params[MAIN_GROUP])
    return [leaf(path, a, s) for (path, a), s in zip(flat, shardings, strict=True)]


def _ring(n: int) -> float:
    """(n-1)/n: the share of a buffer one device sends in a ring all-gather or reduce-scatter."""
    return (n - 1) / n


@dataclasses.dataclass(frozen=True)
class Lowering:
    """How a backend's XLA pipeline lowers three patterns of the SPMD-partitioned step."""

    # Without the reduce-scatter creator pass a reduce-scatter stays an all-reduce
    # of the whole buffer followed by a slice: twice the bytes.
    reduce_scatter_as_all_reduce: bool
    # Without all-reduce reassociation, ar(x) + ar(y) is not rewritten to ar(x + y):
    # each column-parallel projection all-reduces its own input gradient.
    all_reduce_each_partial_sum: bool
    # Without moving all-reduces out of loops, gradient accumulation reduces every
    # microbatch's gradient rather than their sum.
    reduce_every_microbatch: bool


IDEAL = Lowering(reduce_scatter_as_all_reduce=False, all_reduce_each_partial_sum=False, reduce_every_microbatch=False)
# XLA:CPU runs none of those passes (XLA:GPU's collective pipeline has all three); others count as ideal.
LOWERINGS = {"cpu": Lowering(reduce_scatter_as_all_reduce=True, all_reduce_each_partial_sum=True,
                             reduce_every_microbatch=True)}


def analytic_traffic(cfg: Config, leaves: list[ParamLeaf], mesh: Mesh, lowering: Lowering) -> dict[str, float]:
    """Bytes one device sends per step, by cause, in the module docstring's convention.

    D = data-parallel devices (data x fsdp), T = tensor devices; g and t are a
    parameter's own shard counts over those axes (`ParamLeaf`).
      param_all_gather  a weight split over data-parallel axes is gathered where it
                        is used. Layer weights under `model.scan_layers` twice:
                        the forward and the backward loop each gather their own
                        (ZeRO-3; a loop keeps nothing the partitioner made).
                        Weights outside loops once: XLA's CSE hands the forward's
                        gather to the backward (with the weight held in between),
                        though when the backward gathers in another layout it
                        gathers again and the measured bytes come out higher. The
                        embedding table is gathered whole, over all its shards,
                        as `embed_tokens` asks for a replicated table. With
                        microbatches, every microbatch gathers again.
      grad_reduce       each device's gradient is a partial sum over its part of
                        the batch: reduce-scattered over the g devices that shard
                        the weight, all-reduced over the other D/g. The embedding
                        gradient is a scatter-add into a whole table, so the whole
                        table is reduced. Once per step, or once per microbatch
                        (`Lowering.reduce_every_microbatch`).
      scalars           loss and weight sums over D; a squared-norm partial per
                        sharded gradient, twice (the logged grad_norm and the
                        clipping each reduce their own).
      activations       Megatron tensor parallelism when T > 1, all-reduces over T
                        of the float32 (B/D, L, d_model) residual stream: per layer
                        after the attention and the MLP (forward) and of their
                        input gradients (backward: 2, or 3 + 2 when each of q, k, v,
                        gate and up reduces its own), plus the attention's forward
                        one again when `model.remat=full` recomputes the layer (the
                        backward needs the MLP's input, not its output); one for the
                        gradient into the vocab-split output layer; and the
                        cross-entropy's per-token max, sum of exponentials and
                        target logit over the vocab.
    """
    model: TransformerConfig = cfg.model
    data_parallel = data_parallel_size(mesh)
    tensor = mesh.size // data_parallel
    traffic = dict.fromkeys(("param_all_gather", "grad_reduce", "scalars", "activations"), 0.0)
    norms = 2 if cfg.optimizer.clip_norm else 1
    microbatches = cfg.train.microbatches
    reductions = microbatches if lowering.reduce_every_microbatch else 1
    for leaf in leaves:
        g, t = leaf.batch_shards, leaf.other_shards
        is_embed = leaf.path == "embed"
        if is_embed:
            traffic["param_all_gather"] += _ring(g * t) * leaf.nbytes
        elif g > 1:
            uses = 2 if model.scan_layers and leaf.path.startswith("layers/") else 1
            traffic["param_all_gather"] += microbatches * uses * _ring(g) * leaf.nbytes / t
        local = leaf.nbytes if is_embed else leaf.nbytes / t
        scatter = (2 if lowering.reduce_scatter_as_all_reduce else 1) * _ring(g) * local
        traffic["grad_reduce"] += reductions * (scatter + 2 * _ring(data_parallel // g) * local / g)
        if g * t > 1:
            traffic["scalars"] += norms * 2 * _ring(g * t) * 4
    traffic["scalars"] += 2 * 2 * _ring(data_parallel) * 4
    if tensor > 1:
        tokens = cfg.data.batch_size // data_parallel * cfg.data.seq_len
        backward = (5 if lowering.all_reduce_each_partial_sum else 2) + (model.remat == "full")
        residuals = (2 + backward) * model.n_layers + 1
        traffic["activations"] = 2 * _ring(tensor) * 4 * tokens * (residuals * model.d_model + 3)
    return traffic


def analytic_memory(training: Training, leaves: list[ParamLeaf]) -> dict[str, float]:
    """Per-device bytes of the state (params + Adam mu and nu, sharded alike), the arguments and outputs."""
    cfg = training.cfg
    if sum(leaf.elements for leaf in leaves) != param_count(cfg.model):
        raise AssertionError("the model's parameters disagree with param_count")
    abstract = training.layout.abstract
    # Besides params, mu and nu: the step counters, the Adam count and the rng key, all replicated.
    counts = optax.tree_map_params(training.txs[MAIN_GROUP], lambda _: None, abstract.opt_state[MAIN_GROUP],
                                   transform_non_params=lambda x: x)
    small = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract.replace(params={}, opt_state=counts)))
    state = 3 * sum(leaf.device_bytes for leaf in leaves) + small
    batch = abstract_batch(cfg, training.mesh)
    batch_bytes = sum(a.size * a.dtype.itemsize for a in batch.values()) / data_parallel_size(training.mesh)
    # Metrics: loss, grad_norm, lr, nonfinite_steps. XLA also counts the output tuple's
    # table of buffer pointers, 8 bytes an output.
    metrics = 4
    outputs = 4 * metrics + 8 * (len(jax.tree.leaves(abstract)) + metrics)
    return {"state_bytes": state, "argument_bytes": state + batch_bytes, "output_bytes": state + outputs,
            "alias_bytes": state}


# ----------------------------------------------------------------------------- compile and report


def abstract_batch(cfg: Config, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    sharding = batch_sharding(mesh)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    keys = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
    if cfg.model.document_mask:
        keys |= {"positions": jnp.int32, "segment_ids": jnp.int32}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, dtype in keys.items()}


def compile_train_step(cfg: Config) -> tuple[Training, jax.stages.Compiled]:
    """The real train step, compiled for abstract inputs carrying their shardings."""
    if not isinstance(cfg.model, TransformerConfig):
        raise ConfigError(f"the sharding report covers language models (model.kind=transformer), got {cfg.model.kind!r}")
    training = build_training(cfg, make_mesh(cfg.mesh))
    return training, training.train_step.lower(training.layout.target, abstract_batch(cfg, training.mesh)).compile()


def measured_memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    fields = ("argument", "output", "alias", "temp", "generated_code")
    return {f"{f}_bytes": int(getattr(stats, f"{f}_size_in_bytes")) for f in fields}


def report(cfg: Config) -> dict:
    training, compiled = compile_train_step(cfg)
    measured = summarize_collectives(parse_collectives(compiled.as_text(), training.mesh.size))
    leaves = param_leaves(training)
    lowering = LOWERINGS.get(jax.devices()[0].platform, IDEAL)
    analytic = analytic_traffic(cfg, leaves, training.mesh, lowering)
    ideal = analytic_traffic(cfg, leaves, training.mesh, IDEAL)
    analytic_bytes = sum(analytic.values())
    ratio = measured["total_bytes"] / analytic_bytes if analytic_bytes else float("nan")
    return {
        "preset": cfg.sharding.preset,
        "mesh": dict(training.mesh.shape),
        "params": param_count(cfg.model),
        "collective_bytes": measured["total_bytes"],
        "analytic_bytes": round(analytic_bytes),
        "ratio": round(ratio, 4),
        "ok": abs(ratio - 1) <= TOLERANCE,
        "collectives": measured["by_kind"],
        "analytic": {k: round(v) for k, v in analytic.items()},
        "analytic_ideal_bytes": round(sum(ideal.values())),
        "lowering": dataclasses.asdict(lowering),
        "memory": {"measured": measured_memory(compiled),
                   "analytic": {k: round(v) for k, v in analytic_memory(training, leaves).items()}},
    }


def preset_config(preset: str, overrides: list[str]) -> Config:
    return load_config(None, [*PRESET_MESHES[preset], f"sharding.preset={preset}", *overrides])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.d_model=512")
    parser.add_argument("--presets", nargs="+", default=list(PRESET_MESHES), choices=list(PRESET_MESHES))
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    args = parser.parse_args()

    # Before anything initialises a JAX backend.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    summary = {}
    for preset in args.presets:
        result = report(preset_config(preset, args.overrides))
        print(json.dumps(result), flush=True)
        summary[preset] = {k: result[k] for k in ("collective_bytes", "analytic_bytes", "ratio", "ok", "memory")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
