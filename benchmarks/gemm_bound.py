"""How fast could the LM train step be if everything but its matmuls took no time? Prints JSON.

Every dot XLA runs in the compiled train step (read from the optimized HLO: fusion
bodies included, loop bodies times their trip count, remat recomputation included)
is timed on its own, with the same operand shapes, dtypes and contraction, one
after another on the whole machine. Their sum is the step's GEMM-only time: a
lower bound on the step for this GEMM library on these shapes, and
`max_mfu_gemm_only` = model FLOPs / that bound / the measured matmul peak is the
highest MFU the step could reach with every other op free. With `--torch` the
same products are timed in PyTorch (MKL / oneDNN; transposed operands are passed
as views, as `torch.nn.functional.linear` does), which is where the PyTorch peer's
GEMM time comes from.

One line per distinct dot with `--each`, then one line per compute dtype:
  dot_gflop_per_step   what the compiled step multiplies (remat recomputation included)
  gemm_ms              the dots' time, each timed alone (XLA:CPU's library choice)
  torch_gemm_ms        the same products in PyTorch
  step_ms              the whole compiled step, median of `--steps`
  gemm_share           gemm_ms / step_ms

    flock /tmp/jaxgen-bench.lock python benchmarks/gemm_bound.py --torch [--each] [model.batch_slices=1 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import jax
import jax.numpy as jnp
from lm_step import JaxgenStep, MatmulPeaks, emit

from jaxgen.config import load_config
from jaxgen.models.transformer import flops_per_token

from hlo import array_type, attribute_dims, walk_instructions

_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Dot:
    """One dot_general as XLA runs it: operand dtypes and shapes, dimension numbers, result dtype."""

    lhs: tuple[str, tuple[int, ...]]
    rhs: tuple[str, tuple[int, ...]]
    contracting: tuple[tuple[int, ...], tuple[int, ...]]
    batch: tuple[tuple[int, ...], tuple[int, ...]]
    out_dtype: str

    @property
    def flops(self) -> int:
        lhs_shape, rhs_shape = self.lhs[1], self.rhs[1]
        contracted = math.prod(lhs_shape[d] for d in self.contracting[0])
        batch = math.prod(lhs_shape[d] for d in self.batch[0])
        lhs_free = math.prod(lhs_shape) // (contracted * batch)
        rhs_free = math.prod(rhs_shape) // (contracted * batch)
        return 2 * batch * lhs_free * rhs_free * contracted

    def describe(self) -> str:
        """Shapes and layout: N where an operand contracts as in row-major x @ w, T where it is transposed."""
        lhs_tag = "N" if self.contracting[0] == (len(self.lhs[1]) - 1,) else "T"
        rhs_tag = "N" if self.contracting[1] == (len(self.batch[1]),) else "T"
        return f"{self.lhs[0]}{list(self.lhs[1])} x {self.rhs[0]}{list(self.rhs[1])} {lhs_tag}{rhs_tag} -> {self.out_dtype}"


def dots_of(hlo_text: str) -> dict[Dot, int]:
    """Every dot the compiled program runs, with how many times per execution."""
    counts: dict[Dot, int] = {}
    for instruction, _, types, times, in_unknown_loop in walk_instructions(hlo_text):
        if instruction.opcode != "dot":
            continue
        if in_unknown_loop:
            raise ValueError(f"{instruction.name} is in a loop with no known trip count")
        lhs, rhs = (array_type(types[o.lstrip("%")]) for o in instruction.operands)
        attributes = instruction.attributes
        dot = Dot(lhs, rhs,
                  (attribute_dims(attributes, "lhs_contracting_dims"), attribute_dims(attributes, "rhs_contracting_dims")),
                  (attribute_dims(attributes, "lhs_batch_dims"), attribute_dims(attributes, "rhs_batch_dims")),
                  array_type(instruction.type_text)[0])
        counts[dot] = counts.get(dot, 0) + times
    return counts


def time_in_xla(dot: Dot, chain: int = 16, repeats: int = 5) -> float:
    """Seconds per dot, `chain` of them in one program, each waiting for the one before."""
    lhs = jnp.ones(dot.lhs[1], _DTYPES[dot.lhs[0]])
    rhs = jnp.ones(dot.rhs[1], _DTYPES[dot.rhs[0]])
    numbers = (dot.contracting, dot.batch)
    corner = (0,) * len(dot.lhs[1])

    def body(_, lhs):
        out = jax.lax.dot_general(lhs, rhs, numbers, preferred_element_type=_DTYPES[dot.out_dtype])
        # One element of the next left operand depends on this result: the dots run one at a
        # time and none is hoisted out of the loop, for the cost of a one-element update.
        return lhs.at[corner].set(out[(0,) * out.ndim].astype(lhs.dtype) * 0)

    run = jax.jit(lambda lhs: jax.lax.fori_loop(0, chain, body, lhs))
    run(lhs).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(lhs).block_until_ready()
        times.append((time.perf_counter() - start) / chain)
    return statistics.median(times)


def torch_operands(dot: Dot, values: tuple | None = None) -> tuple:
    """The dot's operands as PyTorch (batch..., free, contracted) and (batch..., contracted, free) matrices.

    Permuted views of row-major tensors (a view wherever each group is a single axis, as in
    every dot of these models), so MKL / oneDNN see the transposes as flags, as they do
    under `torch.nn.functional.linear`. `values` (two arrays in the HLO operand shapes)
    fills them; ones otherwise.
    """
    import torch

    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

    def operand(array, contracted, batch, contracted_last, value):
        dtype, shape = array
        free = [d for d in range(len(shape)) if d not in contracted and d not in batch]
        first, second = (free, list(contracted)) if contracted_last else (list(contracted), free)
        t = torch.ones(shape, dtype=dtypes[dtype]) if value is None else torch.tensor(value, dtype=dtypes[dtype])
        t = t.permute(list(batch) + first + second)
        return t.reshape(*t.shape[:len(batch)], math.prod(shape[d] for d in first), -1)

    (lhs_c, rhs_c), (lhs_b, rhs_b) = dot.contracting, dot.batch
    lhs_value, rhs_value = values or (None, None)
    return (operand(dot.lhs, lhs_c, lhs_b, True, lhs_value), operand(dot.rhs, rhs_c, rhs_b, False, rhs_value))


def time_in_torch(dot: Dot, repeats: int = 16) -> float:
    """Seconds per dot in PyTorch (`torch_operands`), the operands made before timing."""
    import torch

    a, b = torch_operands(dot)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides of the embedded default, e.g. model.d_model=512")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the whole train step")
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--each", action="store_true", help="also print every distinct dot")
    args = parser.parse_args()

    peaks = MatmulPeaks()
    peaks.measure()
    for dtype in args.dtypes.split(","):
        cfg = load_config(None, [f"model.compute_dtype={dtype}", *args.overrides])
        step = JaxgenStep(cfg)
        counts = dots_of(step.compiled.as_text())
        gemm_s = torch_s = 0.0
        for dot, times in sorted(counts.items(), key=lambda kv: -kv[0].flops * kv[1]):
            seconds = time_in_xla(dot)
            gemm_s += times * seconds
            record = {"dot": dot.describe(), "times": times, "gflops": dot.flops / seconds / 1e9}
            if args.torch:
                torch_seconds = time_in_torch(dot)
                torch_s += times * torch_seconds
                record["torch_gflops"] = dot.flops / torch_seconds / 1e9
            if args.each:
                emit(record)
        step.run(2)
        step_s = statistics.median(step.run(args.steps))
        peaks.measure()
        model_flops = flops_per_token(cfg.model, cfg.data.seq_len) * step.tokens_per_step
        summary = {"compute_dtype": dtype, "distinct_dots": len(counts),
                   "dot_gflop_per_step": sum(d.flops * n for d, n in counts.items()) / 1e9,
                   "model_gflop_per_step": model_flops / 1e9, "gemm_ms": 1e3 * gemm_s, "step_ms": 1e3 * step_s,
                   "gemm_share": gemm_s / step_s, "peak_gflops": peaks[dtype] / 1e9,
                   "max_mfu_gemm_only": model_flops / gemm_s / peaks[dtype],
                   "mfu": model_flops / step_s / peaks[dtype]}
        if args.torch:
            summary |= {"torch_gemm_ms": 1e3 * torch_s, "torch_max_mfu_gemm_only": model_flops / torch_s / peaks[dtype]}
        emit(summary)


if __name__ == "__main__":
    main()
