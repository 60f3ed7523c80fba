"""How fast is jaxgen's LM train step, against the hardware and against PyTorch? Prints JSON.

For a named model config it times the real train step (`build_training`, the
program `jaxgen train` runs: forward, backward, clipping, AdamW, non-finite
guard) in float32 and with bfloat16 compute, and beside it, in the same run,
the same architecture in PyTorch (`benchmarks/torch_reference.py`, eager and
`torch.compile`, float32 and bfloat16 autocast). Contestants take turns over
several rounds so drift in machine speed hits them alike; step times are
medians after warm-up.

Model FLOPs per token follow PaLM (appendix B): 6 x matmul parameters +
12 x layers x heads x head_dim x seq_len for attention (see
`jaxgen.models.transformer.flops_per_token`); no credit for recomputation.
MFU = tokens/s x FLOPs per token / peak, where the peak is the best of the
matmuls measured before every round and after the last, on this device
(CPU: f32 and bf16-in/f32-accumulate separately; accelerators: the data-sheet
bf16 peak as well). Each contestant's per-round medians are printed beside its
overall median, so the run's own spread is visible. Peak memory is XLA's
`memory_analysis()` of the compiled step (arguments + outputs + temporaries -
aliased donations); on GPUs the allocator's peak is reported too.

A second table shows the remat / layer-scan trade-off: step time, compile
time and temporary memory for each remat policy with scanned and unrolled
layers.

The last line is the summary: `mfu`, `vs_torch_eager`, `bf16_speedup`, ...

    flock /tmp/jaxgen-bench.lock python benchmarks/lm_step.py               # the default config
    python benchmarks/lm_step.py --config nanogpt --no-tradeoff
    python benchmarks/lm_step.py --config 1b --no-torch --no-tradeoff        # on a GPU
    python benchmarks/lm_step.py --config 1b --no-torch --no-tradeoff model.attention=cudnn
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Callable

if __name__ == "__main__":  # before jax or torch is loaded, as `jaxgen` starts: Ctrl-C ends the run with
    from jaxgen.__main__ import start_cleanly  # one line, and both contestants run on tcmalloc

    start_cleanly()

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.allocator import loaded_allocator
from jaxgen.config import load_config
from jaxgen.metrics import KNOWN_PEAK_FLOPS, measure_matmul_peak
from jaxgen.models.transformer import flops_per_token, param_count
from jaxgen.sharding import batch_sharding, make_mesh
from jaxgen.train.build import build_training

# Named configs: overrides of the embedded default (which is `small`).
CONFIGS: dict[str, list[str]] = {
    "small": [],
    # The shapes of the PyTorch figure quoted in the performance issue (nanoGPT-like).
    "nanogpt": ["model.vocab_size=4096", "model.n_kv_heads=4", "model.d_ff=1024", "model.max_seq_len=256",
                "data.seq_len=256", "data.batch_size=8"],
    # About 1B parameters, for one accelerator.
    "1b": ["model.vocab_size=32000", "model.d_model=2048", "model.n_layers=18", "model.n_heads=16",
           "model.n_kv_heads=8", "model.d_ff=5632", "model.max_seq_len=2048", "data.seq_len=2048",
           "data.batch_size=8", "model.remat=dots_with_no_batch_dims_saveable"],
}


class Contestant:
    """A train step with its model, optimizer state and a fixed batch; `step()` returns the loss."""

    name = "contestant"
    compile_s: float
    tokens_per_step: int

    def step(self) -> float:
        raise NotImplementedError

    def run(self, steps: int) -> list[float]:
        """Seconds per step, each ending with the loss on the host (as the loop's logging does)."""
        times, loss = [], 0.0
        for _ in range(steps):
            start = time.perf_counter()
            loss = self.step()
            times.append(time.perf_counter() - start)
        if not np.isfinite(loss):
            raise RuntimeError(f"{self.name} produced a non-finite loss")
        return times


class JaxgenStep(Contestant):
    """One compiled jaxgen train step on one device."""

    name = "jaxgen"

    def __init__(self, cfg):
        self.cfg = cfg
        mesh = make_mesh(cfg.mesh.model_copy(update={"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
        training = build_training(cfg, mesh)
        self.state = training.init_state()
        b, seq = cfg.data.batch_size, cfg.data.seq_len
        tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (b, seq + 1), dtype=np.int32)
        host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, seq), np.float32)}
        if cfg.model.document_mask:
            host |= {"positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (b, seq)),
                     "segment_ids": np.ones((b, seq), np.int32)}
        self.batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in host.items()}
        start = time.perf_counter()
        self.compiled = training.train_step.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.tokens_per_step = b * seq

    def step(self) -> float:
        self.state, metrics = self.compiled(self.state, self.batch)
        return float(metrics["loss"])

    def memory(self) -> dict:
        m = self.compiled.memory_analysis()
        if m is None:
            return {}
        peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        out = {"peak_mib": peak / 2**20, "temp_mib": m.temp_size_in_bytes / 2**20,
               "arguments_mib": m.argument_size_in_bytes / 2**20}
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["allocator_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
        return out


class TorchStep(Contestant):
    """The same model in PyTorch (benchmarks/torch_reference.py)."""

    name = "PyTorch"

    def __init__(self, cfg, mode: str, dtype: str):
        import torch

        from torch_reference import Llama, make_step, shape_of

        torch.manual_seed(0)
        model = Llama(**shape_of(cfg.model))
        self.train_step = make_step(torch.compile(model) if mode == "compile" else model, dtype)
        b, seq = cfg.data.batch_size, cfg.data.seq_len
        tokens = torch.randint(0, cfg.model.vocab_size, (b, seq + 1))
        self.inputs, self.targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        start = time.perf_counter()
        self.step()  # compiles in compile mode
        self.compile_s = time.perf_counter() - start
        self.tokens_per_step = b * seq

    def step(self) -> float:
        return self.train_step(self.inputs, self.targets)


@dataclasses.dataclass
class Timing:
    """Step seconds of one contestant: the median of every timed step, and each round's median."""

    median_s: float
    round_medians_s: list[float]


def take_turns(contestants: dict, rounds: int, steps: int, warmup: int,
               before_round: Callable[[], None] = lambda: None) -> dict[str, Timing]:
    """Time each contestant round-robin, so drift in machine speed hits them alike."""
    for c in contestants.values():
        c.run(warmup)
    times: dict[str, list[list[float]]] = {name: [] for name in contestants}
    for _ in range(rounds):
        before_round()
        for name, c in contestants.items():
            times[name].append(c.run(steps))
    return {name: Timing(statistics.median(t for r in per_round for t in r),
                         [statistics.median(r) for r in per_round]) for name, per_round in times.items()}


def at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


class MatmulPeaks:
    """FLOP/s of the best of a few square matmul sizes, f32 and bf16 inputs (f32 accumulation).

    Measured again before every round: on a shared machine the same matmul's speed drifts
    within minutes, and the best figure of the run is the honest denominator (a single slow
    measurement would inflate every MFU).
    """

    DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

    def __init__(self):
        self.measured: dict[str, list[float]] = {name: [] for name in self.DTYPES}

    def measure(self) -> None:
        for name, dtype in self.DTYPES.items():
            self.measured[name].append(max(measure_matmul_peak(n, repeats=7, dtype=dtype) for n in (1024, 2048)))

    def __getitem__(self, dtype: str) -> float:
        return max(self.measured[dtype])


def data_sheet_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((flops for name, flops in KNOWN_PEAK_FLOPS.items() if name.lower() in kind.lower()), None)


def emit(record: dict) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.remat=full")
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=at_least(1), default=5, help="timed steps per contestant per round")
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps per contestant before timing")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="jaxgen compute dtypes to time")
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tradeoff", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    for dtype in args.dtypes.split(","):
        if dtype not in ("float32", "bfloat16"):
            parser.error(f"--dtypes takes float32 and/or bfloat16, got {dtype!r}")

    overrides = CONFIGS[args.config] + args.overrides
    cfg = load_config(None, overrides)
    device = jax.devices()[0]
    sheet = data_sheet_peak()
    emit({"device": device.device_kind, "platform": device.platform, "allocator": loaded_allocator(),
          "config": args.config, "overrides": overrides, "params": param_count(cfg.model),
          "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len),
          "data_sheet_bf16_tflops": sheet / 1e12 if sheet else None})

    contestants = {}
    for dtype in args.dtypes.split(","):
        contestants[f"jaxgen_{dtype}"] = JaxgenStep(cfg.model_copy(
            update={"model": cfg.model.model_copy(update={"compute_dtype": dtype})}))
    if args.torch:
        modes = ("eager", "compile") if args.torch_compile else ("eager",)
        for mode in modes:
            for dtype in ("float32", "bfloat16"):
                contestants[f"torch_{mode}_{dtype}"] = TorchStep(cfg, mode, dtype)
    peaks = MatmulPeaks()
    timings = take_turns(contestants, args.rounds, args.steps, args.warmup, before_round=peaks.measure)
    peaks.measure()
    emit({"peak_f32_gflops": peaks["float32"] / 1e9, "peak_bf16_gflops": peaks["bfloat16"] / 1e9,
          **{f"peak_{name}_gflops_each_round": [round(f / 1e9, 1) for f in measured]
             for name, measured in peaks.measured.items()}})

    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_s = {}
    for name, timing in timings.items():
        c = contestants[name]
        tps = c.tokens_per_step / timing.median_s
        tokens_per_s[name] = tps
        dtype = name.rsplit("_", 1)[1]
        record = {"contestant": name, "step_ms": 1e3 * timing.median_s,
                  "step_ms_each_round": [round(1e3 * t, 1) for t in timing.round_medians_s], "tokens_per_s": tps,
                  "achieved_gflops": tps * fpt / 1e9, "mfu_vs_measured_peak": tps * fpt / peaks[dtype],
                  "compile_s": c.compile_s}
        if isinstance(c, JaxgenStep):
            record |= c.memory()
            if sheet:
                record["mfu_vs_data_sheet"] = tps * fpt / sheet
        emit(record)

    if args.tradeoff:
        tradeoff(cfg, args)

    summary = {"config": args.config}
    f32, bf16 = tokens_per_s.get("jaxgen_float32"), tokens_per_s.get("jaxgen_bfloat16")
    if f32:
        summary |= {"tokens_per_s_f32": f32, "mfu": f32 * fpt / peaks["float32"]}
    if bf16:
        summary |= {"tokens_per_s_bf16": bf16, "mfu_bf16": bf16 * fpt / peaks["bfloat16"]}
        if sheet:
            summary["mfu_bf16_vs_data_sheet"] = bf16 * fpt / sheet
    if f32 and bf16:
        summary["bf16_speedup"] = bf16 / f32
    for mode in ("eager", "compile"):
        peer_f32, peer_bf16 = tokens_per_s.get(f"torch_{mode}_float32"), tokens_per_s.get(f"torch_{mode}_bfloat16")
        if f32 and peer_f32:
            summary[f"vs_torch_{mode}"] = f32 / peer_f32
        if bf16 and peer_bf16:
            summary[f"bf16_vs_torch_{mode}_autocast"] = bf16 / peer_bf16
    emit(summary)


def tradeoff(cfg, args) -> None:
    """Step time, compile time and memory for every remat policy, layers scanned and unrolled (f32)."""
    for scan in (True, False):
        for remat in ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"):
            variant = cfg.model_copy(update={"model": cfg.model.model_copy(
                update={"scan_layers": scan, "remat": remat, "compute_dtype": "float32"})})
            step = JaxgenStep(variant)
            seconds = take_turns({"x": step}, 1, args.steps * 2, args.warmup)["x"].median_s
            emit({"tradeoff": True, "scan_layers": scan, "remat": remat, "step_ms": 1e3 * seconds,
                  "tokens_per_s": step.tokens_per_step / seconds, "compile_s": step.compile_s, **step.memory()})
            del step


if __name__ == "__main__":
    main()
