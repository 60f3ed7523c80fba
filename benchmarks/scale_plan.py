"""Which sharding preset, remat policy and microbatch count let a published-size LM train on N accelerators? Prints JSON.

For each device count the real train step (`build_training`, the program
`jaxgen train` runs) is compiled ahead of time for N simulated CPU devices, on
abstract inputs that carry their shardings: no weight is ever allocated. The
device count of a JAX process is fixed when its backend starts, so each count
runs in a subprocess of its own.

For each sharding preset (`dp`, `fsdp`, `tp`, `fsdp_tp`; tensor parallelism over
the largest of 8, 4, 2 devices that divides the heads, kv heads, d_ff and vocab)
one JSON line per compiled setting gives, per device:
  memory.measured   `compiled.memory_analysis()`: arguments, outputs, temporaries,
                    aliased (donated) bytes, and peak = arguments + outputs +
                    temporaries - aliased
  memory.analytic   params + Adam moments (sharded as the preset shards them), the
                    gradient, gathered FSDP weights and an activation estimate by
                    term (`analytic_activations`); `peak` assumes the attention
                    scores are materialised, `peak_flash` that they are not
  collectives       bytes one device sends per step, summed over the compiled HLO's
                    collectives (sharding_report.py's parser and ring convention),
                    beside the analytic figure for XLA:CPU's lowering and for a
                    backend with true reduce-scatters (XLA:GPU, TPU)
  fits              per accelerator memory size: measured peak <= USABLE x capacity
  fits_flash        the same for the analytic peak without materialised attention
                    (`model.attention=cudnn`; not for soft-capped attention, which has no
                    flash kernel)

The first setting of a preset is the config's own (its remat policy, no gradient
accumulation). If it does not fit the smallest accelerator, the settings of
`LADDER` that follow it (less memory, more recomputation or more, smaller
microbatches) are compiled in turn until one does, or until the analytic state
and gradient alone overflow the largest. `fsdp_tp` is skipped where tensor
parallelism takes every device (it is then `tp`). The global batch stays fixed
(`--seqs` sequences per data-parallel rank), so the settings train the same thing.
The last line is the summary: for each device count, preset and accelerator, the
first setting of the ladder that fits, or null.

What it mirrors and what it cannot:
  * The program is compiled with the choices `model.attention=auto` and
    `model.batch_slices=auto` make on a GPU (XLA attention, one batch slice),
    not the CPU-only ones.
  * XLA:CPU's memory_analysis is not XLA:GPU's or TPU's: buffer assignment,
    fusion and rematerialisation passes differ, and XLA:CPU has no reduce-scatter
    (a gradient is all-reduced whole, then sliced), so its temporaries can be
    larger than a GPU's. Treat the measured figures as an upper estimate of the
    same program on an accelerator and check on one before a long run.
  * XLA attention materialises the (L, L) scores. `model.attention=cudnn`
    (flash attention, NVIDIA) does not: `fits_flash` estimates that case.

    flock /tmp/jaxgen-bench.lock python benchmarks/scale_plan.py --config configs/llama3_8b.yaml --devices 8,64,256
    python benchmarks/scale_plan.py --config configs/qwen3_0_6b.yaml --devices 8 --presets fsdp --out run.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import jax

from jaxgen.config import Config, TransformerConfig, load_config
from jaxgen.errors import ConfigError
from jaxgen.sharding import data_parallel_size, make_mesh
from jaxgen.train.build import build_training

from sharding_report import (
    IDEAL,
    LOWERINGS,
    Lowering,
    ParamLeaf,
    abstract_batch,
    analytic_memory,
    analytic_traffic,
    measured_memory,
    param_leaves,
    parse_collectives,
    summarize_collectives,
)

PRESETS = ("dp", "fsdp", "tp", "fsdp_tp")
# Data-sheet memory of current accelerators (A100/H100 80 GB, H100 NVL, H200), in bytes.
ACCELERATORS = {"80GB": 80e9, "95GB": 95e9, "141GB": 141e9}
# The runtime, cuBLAS/cuDNN workspaces and fragmentation need some of it; this also assumes
# XLA_PYTHON_CLIENT_MEM_FRACTION is raised from its default 0.75 (or preallocation is off).
USABLE = 0.9
# (remat policy, microbatches): ordered from the least recomputation to the least memory.
LADDER = (("dots_saveable", 1), ("dots_saveable", 2), ("dots_with_no_batch_dims_saveable", 1),
          ("dots_with_no_batch_dims_saveable", 2), ("full", 1), ("full", 2), ("full", 4))
ACTIVATION_BYTES = 4  # matmuls accumulate and return float32; the residual stream is float32

# ----------------------------------------------------------------------------- the cases


def tensor_size(model: TransformerConfig, devices: int) -> int:
    """Tensor-parallel devices: the largest of 8, 4, 2 (one node's GPUs at most) that splits the model evenly."""
    dims = (model.n_heads, model.n_kv_heads, model.d_ff, model.vocab_size, devices)
    return next((t for t in (8, 4, 2) if all(d % t == 0 for d in dims)), 1)


def case_overrides(model: TransformerConfig, preset: str, devices: int, seqs: int, remat: str,
                   microbatches: int) -> list[str]:
    """Mesh, preset, global batch (`seqs` sequences per data-parallel rank) and the setting tried."""
    tensor = tensor_size(model, devices) if preset in ("tp", "fsdp_tp") else 1
    data_parallel = devices // tensor
    data, fsdp = (data_parallel, 1) if preset in ("dp", "tp") else (1, data_parallel)
    return [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", f"sharding.preset={preset}",
            f"data.batch_size={data_parallel * seqs}", f"model.remat={remat}", f"train.microbatches={microbatches}",
            # What `auto` resolves to on a GPU, so the CPU compiles the accelerator's program.
            "model.attention=xla", "model.batch_slices=1"]


def ladder_after(remat: str, microbatches: int, seqs: int) -> list[tuple[str, int]]:
    """The ladder's settings that come after the given one (all of them if it is not on the ladder)."""
    usable = [s for s in LADDER if seqs % s[1] == 0]
    if (remat, microbatches) in usable:
        return usable[usable.index((remat, microbatches)) + 1:]
    return usable


# ----------------------------------------------------------------------------- analytic memory


def analytic_activations(cfg: Config, data_parallel: int, tensor: int) -> dict[str, float]:
    """Per-device activation bytes at the peak of the backward pass, by term (a first-order model).

    t = tokens per device per microbatch; T = tensor devices (they split heads, d_ff, vocab).
      residuals         every layer's input, which the scan keeps for the backward pass
      saved_matmuls     the matmul outputs the remat policy keeps, every layer
      layer_backward    one layer's intermediates and their cotangents, while its backward runs
      attention_scores  the (L, L) scores: those `dots_saveable` keeps in every layer, and
                        scores, probabilities and their cotangent in the layer being
                        differentiated; zero with flash attention
      logits            logits, log-probabilities and their cotangent
    """
    m = cfg.model
    b = cfg.data.batch_size // data_parallel // cfg.train.microbatches
    t, n, f = b * cfg.data.seq_len, m.n_layers, ACTIVATION_BYTES
    hd = m.resolved_head_dim
    qkv = (m.n_heads + 2 * m.n_kv_heads) * hd / tensor
    weights = qkv + m.d_model + 2 * m.d_ff / tensor + m.d_model  # outputs of wq wk wv, wo, w_gate w_up, w_down
    heads_scores = m.n_heads / tensor * cfg.data.seq_len  # score entries per token
    saved = {"full": 0.0, "dots_with_no_batch_dims_saveable": weights, "dots_saveable": weights + m.n_heads * hd / tensor,
             "none": weights + m.n_heads * hd / tensor + 2 * m.d_ff / tensor + 2 * m.d_model}[m.remat]
    saved_scores = heads_scores if m.remat in ("dots_saveable", "none") else 0.0
    return {
        "residuals": n * t * m.d_model * f,
        "saved_matmuls": n * t * saved * f,
        "layer_backward": 2 * t * (3 * m.d_model + qkv + 3 * m.d_ff / tensor) * f,
        "attention_scores": (n * saved_scores + 3 * heads_scores) * t * f,
        "logits": 3 * t * m.vocab_size / tensor * f,
    }


def analytic_peak(cfg: Config, leaves: list[ParamLeaf], state: dict, data_parallel: int, tensor: int) -> dict:
    """State, gradient, gathered weights and activations per device; the peak with and without (L, L) scores."""
    grads = sum(leaf.device_bytes for leaf in leaves)
    if cfg.train.microbatches > 1:
        grads *= 2  # the running sum and the current microbatch's gradient
    layers = [leaf for leaf in leaves if leaf.path.startswith("layers/")]
    # An FSDP-sharded weight is gathered whole (over its data-parallel shards) before use:
    # two layers at a time in the scan (the next one's gather overlaps this one's compute);
    # the embedding and output layer whole, and their gradients whole before they are reduced.
    gathered = 2 * sum(leaf.nbytes / leaf.other_shards for leaf in layers if leaf.batch_shards > 1) / cfg.model.n_layers
    gathered += 2 * sum(leaf.nbytes / leaf.other_shards for leaf in leaves
                        if leaf.batch_shards > 1 and not leaf.path.startswith("layers/"))
    activations = analytic_activations(cfg, data_parallel, tensor)
    peak = state["argument_bytes"] + grads + gathered + sum(activations.values())
    # Soft-capped scores (Gemma 2) take jaxgen's own attention, which has no flash kernel.
    flash = peak if cfg.model.attn_logit_softcap else peak - activations["attention_scores"]
    return {"state_bytes": state["state_bytes"], "argument_bytes": state["argument_bytes"], "grad_bytes": grads,
            "gathered_weight_bytes": gathered, "activations": activations,
            "peak_bytes": peak, "peak_flash_bytes": flash}


def verdicts(peak_bytes: float) -> dict[str, bool]:
    return {name: peak_bytes <= USABLE * capacity for name, capacity in ACCELERATORS.items()}


# ----------------------------------------------------------------------------- analytic traffic


def expected_traffic(cfg: Config, leaves: list[ParamLeaf], mesh, lowering: Lowering) -> dict[str, float]:
    """sharding_report's analytic bytes per device per step, by cause, with tied embeddings counted twice.

    A tied embedding is used twice, by the token lookup and by the output layer: each use
    gathers it, and each use's gradient is reduced on its own where the backend does not
    sum partial gradients before reducing them.
    """
    traffic = analytic_traffic(cfg, leaves, mesh, lowering)
    if cfg.model.tie_embeddings:
        embed = analytic_traffic(cfg, [leaf for leaf in leaves if leaf.path == "embed"], mesh, lowering)
        traffic["param_all_gather"] += embed["param_all_gather"]
        if lowering.all_reduce_each_partial_sum:
            traffic["grad_reduce"] += embed["grad_reduce"]
    return traffic


# ----------------------------------------------------------------------------- one compiled case


def plan_case(cfg: Config, devices: list) -> dict:
    """Compile the real train step for `cfg` on `devices` (abstract inputs only) and measure it."""
    if not isinstance(cfg.model, TransformerConfig):
        raise ConfigError(f"the scale plan covers language models (model.kind=transformer), got {cfg.model.kind!r}")
    mesh = make_mesh(cfg.mesh, devices)
    start = time.perf_counter()
    training = build_training(cfg, mesh)
    compiled = training.train_step.lower(training.layout.target, abstract_batch(cfg, mesh)).compile()
    compile_s = time.perf_counter() - start

    measured = measured_memory(compiled)
    measured["peak_bytes"] = (measured["argument_bytes"] + measured["output_bytes"] + measured["temp_bytes"]
                              - measured["alias_bytes"])
    leaves = param_leaves(training)
    data_parallel = data_parallel_size(mesh)
    analytic = analytic_peak(cfg, leaves, analytic_memory(training, leaves), data_parallel,
                             mesh.size // data_parallel)
    traffic = summarize_collectives(parse_collectives(compiled.as_text(), mesh.size))
    lowering = LOWERINGS.get(devices[0].platform, IDEAL)
    by_cause = expected_traffic(cfg, leaves, mesh, lowering)
    return {
        "devices": mesh.size,
        "preset": cfg.sharding.preset,
        "mesh": dict(mesh.shape),
        "remat": cfg.model.remat,
        "microbatches": cfg.train.microbatches,
        "batch_size": cfg.data.batch_size,
        "seqs_per_rank_per_microbatch": cfg.data.batch_size // data_parallel // cfg.train.microbatches,
        "seq_len": cfg.data.seq_len,
        "compile_s": round(compile_s, 1),
        "memory": {"measured": measured, "analytic": _rounded(analytic),
                   "measured_over_analytic": round(measured["peak_bytes"] / analytic["peak_bytes"], 3)},
        "collectives": {"measured_bytes": traffic["total_bytes"], "by_kind": traffic["by_kind"],
                        "analytic_bytes": round(sum(by_cause.values())),
                        "analytic_by_cause": _rounded(by_cause),
                        "analytic_ideal_bytes": round(sum(expected_traffic(cfg, leaves, mesh, IDEAL).values()))},
        "fits": verdicts(measured["peak_bytes"]),
        "fits_flash": verdicts(analytic["peak_flash_bytes"]),
    }


def _rounded(tree):
    if isinstance(tree, dict):
        return {k: _rounded(v) for k, v in tree.items()}
    return round(tree) if isinstance(tree, float) else tree


# ----------------------------------------------------------------------------- the plan for one device count


def plan_devices(config: str | None, overrides: list[str], presets: list[str], seqs: int, devices: list, emit) -> None:
    """Every preset on `devices`: the config's own setting, then the ladder until one fits the smallest accelerator."""
    base = load_config(config, overrides)
    smallest = min(ACCELERATORS, key=ACCELERATORS.get)
    for preset in presets:
        if preset == "fsdp_tp" and tensor_size(base.model, len(devices)) == len(devices):
            emit({"config": config, "devices": len(devices), "preset": preset,
                  "skipped": "tensor parallelism takes every device, leaving fsdp_tp the same mesh as tp"})
            continue
        settings = [(base.model.remat, 1)]
        settings += ladder_after(*settings[0], seqs)
        for remat, microbatches in settings:
            case = case_overrides(base.model, preset, len(devices), seqs, remat, microbatches)
            head = {"config": config, "devices": len(devices), "preset": preset, "remat": remat,
                    "microbatches": microbatches}
            try:
                result = plan_case(load_config(config, [*overrides, *case]), devices)
            except ConfigError as err:  # this preset cannot split this model on this mesh
                emit({**head, "error": str(err)})
                break
            emit({"config": config, **result})
            if result["fits"][smallest]:
                break
            analytic = result["memory"]["analytic"]
            if analytic["argument_bytes"] + analytic["grad_bytes"] > USABLE * max(ACCELERATORS.values()):
                break  # no remat policy or microbatch count shrinks the state and its gradient


# ----------------------------------------------------------------------------- driver


def summarize(config: str | None, seqs: int, records: list[dict]) -> dict:
    """For each device count, preset and accelerator: the first setting tried that fits, or null.

    Settings are tried in ladder order after the config's own, so the first that fits costs least.
    """
    plan: dict[str, dict] = {}
    for r in records:
        if "error" in r or "skipped" in r:
            plan.setdefault(str(r["devices"]), {})[r["preset"]] = {k: r[k] for k in ("error", "skipped") if k in r}
            continue
        entry = plan.setdefault(str(r["devices"]), {}).setdefault(r["preset"], {
            "mesh": r["mesh"], "state_gb": round(r["memory"]["analytic"]["state_bytes"] / 1e9, 2),
            "collective_gb_per_step": round(r["collectives"]["measured_bytes"] / 1e9, 2),
            "fits": dict.fromkeys(ACCELERATORS), "fits_flash": dict.fromkeys(ACCELERATORS), "peak_gb": {}})
        name = f"{r['remat']}/mb{r['microbatches']}"
        entry["peak_gb"][name] = round(r["memory"]["measured"]["peak_bytes"] / 1e9, 2)
        for key in ("fits", "fits_flash"):
            for accelerator, ok in r[key].items():
                if ok and entry[key][accelerator] is None:
                    entry[key][accelerator] = name
    return {"summary": True, "config": config, "seqs_per_rank": seqs, "usable_fraction": USABLE,
            "backend": "cpu (simulated devices)", "plan": plan}


def run_device_count(args: argparse.Namespace, devices: int, out) -> list[dict]:
    """The plan for one device count, in a subprocess started with that many CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    command = [sys.executable, __file__, "--worker", "--devices", str(devices), "--seqs", str(args.seqs),
               "--presets", *args.presets, *(["--config", args.config] if args.config else []), *args.overrides]
    records = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as worker:
        for line in worker.stdout:
            record = json.loads(line)
            records.append(record)
            print(line, end="", flush=True)
            if out:
                out.write(line)
                out.flush()
    if worker.returncode:
        raise SystemExit(f"the worker for {devices} devices failed (exit {worker.returncode})")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.seq_len=4096")
    parser.add_argument("--config", help="a YAML config (default: the embedded default)")
    parser.add_argument("--devices", default="8", help="comma-separated simulated device counts")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--seqs", type=int, default=2, help="sequences per data-parallel rank per step")
    parser.add_argument("--out", type=pathlib.Path, help="also append the JSON lines to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not re.fullmatch(r"\d+(,\d+)*", args.devices):
        parser.error(f"--devices takes comma-separated counts, got {args.devices!r}")
    counts = [int(d) for d in args.devices.split(",")]

    if args.worker:
        def emit(record: dict) -> None:
            print(json.dumps(record), flush=True)

        plan_devices(args.config, args.overrides, args.presets, args.seqs, jax.devices()[:counts[0]], emit)
        return

    records = []
    with open(args.out, "a") if args.out else open(os.devnull, "w") as out:
        for count in counts:
            records += run_device_count(args, count, out)
        line = json.dumps(summarize(args.config, args.seqs, records))
        print(line, flush=True)
        out.write(line + "\n")


if __name__ == "__main__":
    main()
