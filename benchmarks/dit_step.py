"""How fast is jaxgen's DiT train step, against the hardware and against PyTorch? Prints JSON.

For a named config it times the real train step of a class-conditional DiT
(`build_training`, the program `jaxgen train` runs: rectified-flow noising with
logit-normal times and label dropout, forward, backward, clipping, AdamW, the
EMA update and the non-finite guard) with float32 and with bfloat16 compute
(`model.compute_dtype`), and beside it, in the same run, the same architecture
and step in PyTorch (`benchmarks/torch_dit.py`, eager and `torch.compile`,
float32 and bfloat16 autocast). Contestants take turns over several rounds, as
in `lm_step.py`; step times are medians after warm-up.

Model FLOPs per image (`jaxgen.models.dit.flops_per_image`): 6 x (matmul
parameters x the tokens they see: patch embedding, per layer QKV, output and
the two MLP projections, and the final projection, for each of the N =
(image/patch)^2 patches; the timestep MLP and the adaLN modulations once per
image) + 12 x layers x d_model x N^2 for attention scores and the weighted sum.
That is 3 x the forward pass; the first line checks it against PyTorch's own
operator-level count of the PyTorch model's forward pass, and the parameter
counts of the two models against each other. MFU = images/s x FLOPs per image /
peak, the peak being the best matmul measured before every round and after the
last (`lm_step.MatmulPeaks`). An MFU above 1 means the FLOP count or the peak is
wrong, and stops the run. Peak memory is XLA's `memory_analysis()` of the
compiled step; PyTorch's CPU allocator keeps no peak figure, so none is given
for it.

The last line is the summary: `mfu`, `vs_torch_eager`, `vs_torch_compile`, `bf16_speedup`, ...

    flock /tmp/jaxgen-bench.lock python benchmarks/dit_step.py                  # DiT-S/2, 32x32x4
    flock /tmp/jaxgen-bench.lock python benchmarks/dit_step.py --config digits --rounds 2
    python benchmarks/dit_step.py --config digits --no-torch --steps 2
"""

from __future__ import annotations

import argparse
import pathlib
import time

if __name__ == "__main__":  # before jax or torch is loaded, as `jaxgen` starts: Ctrl-C ends the run with
    from jaxgen.__main__ import start_cleanly  # one line, and both contestants run on tcmalloc

    start_cleanly()

import jax
import numpy as np

from jaxgen.allocator import loaded_allocator
from jaxgen.config import load_config
from jaxgen.models.dit import flops_per_image
from jaxgen.sharding import batch_sharding, make_mesh
from jaxgen.train.build import build_training

from lm_step import Contestant, JaxgenStep, MatmulPeaks, at_least, data_sheet_peak, emit, take_turns

DIGITS = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "dit_digits.yaml")
# Named configs: overrides of configs/dit_digits.yaml (its optimizer and diffusion settings throughout).
CONFIGS: dict[str, list[str]] = {
    # The CPU-sized model `jaxgen train --config configs/dit_digits.yaml` trains: 8x8x1, 16 patches.
    "digits": [],
    # DiT-S/2 on the 32x32x4 latents of 256x256 images (the DiT paper's setting), 1000 classes.
    # No data is read; the source only has to admit the shape.
    "S2": ["model.d_model=384", "model.n_layers=12", "model.n_heads=6", "model.patch_size=2",
           "model.image_size=32", "model.channels=4", "model.num_classes=1000", "data.batch_size=8",
           "images.source=folder", "images.folder=unread"],
}


def with_compute_dtype(cfg, dtype: str):
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"compute_dtype": dtype})})


class JaxgenDiTStep(JaxgenStep):
    """One compiled jaxgen train step on one device, on a fixed batch of images and labels (lm_step's
    step and memory figures)."""

    def __init__(self, cfg):
        mesh = make_mesh(cfg.mesh.model_copy(update={"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
        training = build_training(cfg, mesh)
        self.state = training.init_state()
        m, b = cfg.model, cfg.data.batch_size
        rng = np.random.default_rng(0)
        host = {"images": rng.uniform(-1, 1, (b, m.image_size, m.image_size, m.channels)).astype(np.float32),
                "labels": rng.integers(0, m.num_classes, (b,), dtype=np.int32)}
        self.batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in host.items()}
        start = time.perf_counter()
        self.compiled = training.train_step.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.images_per_step = b


class TorchDiTStep(Contestant):
    """The same model and step in PyTorch (benchmarks/torch_dit.py)."""

    name = "PyTorch"

    def __init__(self, cfg, mode: str, dtype: str):
        import torch
        from torch_dit import build

        self.train_step = build(cfg, mode, dtype)
        m, b = cfg.model, cfg.data.batch_size
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(b, m.image_size, m.image_size, m.channels, generator=generator) * 2 - 1
        self.labels = torch.randint(0, m.num_classes, (b,), generator=generator)
        start = time.perf_counter()
        self.step()  # compiles in compile mode
        self.compile_s = time.perf_counter() - start
        self.images_per_step = b

    def step(self) -> float:
        return self.train_step(self.images, self.labels)


def check_models_agree(cfg) -> dict:
    """Parameter counts of both models and both FLOP counts per image; raises if they disagree."""
    from flax import nnx
    from torch_dit import DiT, forward_flops, shape_of

    from jaxgen.models import build_model

    jax_model = nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0)))
    jax_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(jax_model, nnx.Param)))
    torch_model = DiT(**shape_of(cfg.model))
    torch_params = sum(p.numel() for p in torch_model.parameters())
    batch = 2
    torch_flops = 3 * forward_flops(torch_model, batch, cfg.model.image_size, cfg.model.channels) / batch
    formula = flops_per_image(cfg.model)
    if jax_params != torch_params or abs(torch_flops - formula) > 1e-9 * formula:
        raise RuntimeError(f"the PyTorch DiT differs from jaxgen's: {torch_params} vs {jax_params} parameters, "
                           f"3 x forward {torch_flops:.6g} vs {formula:.6g} FLOPs per image")
    return {"params": jax_params, "torch_params": torch_params, "flops_per_image": formula,
            "torch_counted_flops_per_image": torch_flops}


def utilisation(images_per_s: float, flops: float, peak: float, who: str) -> float:
    """MFU; above 1 the FLOP count or the peak is wrong, which must never pass for a result."""
    mfu = images_per_s * flops / peak
    if mfu > 1.0:
        raise RuntimeError(f"{who}: MFU {mfu:.3f} exceeds 1 ({images_per_s:.4g} images/s x {flops:.4g} FLOPs "
                           f"against a peak of {peak:.4g} FLOP/s): the FLOP count or the peak is wrong")
    return mfu


def summarize(config: str, images_per_s: dict[str, float], flops: float, peaks: dict[str, float]) -> dict:
    """The summary line from each contestant's images/s (names as `take_turns` keys them) and the peaks."""
    summary: dict = {"config": config}
    f32, bf16 = images_per_s.get("jaxgen_float32"), images_per_s.get("jaxgen_bfloat16")
    if f32:
        summary |= {"images_per_s_f32": f32, "mfu": utilisation(f32, flops, peaks["float32"], "jaxgen_float32")}
    if bf16:
        summary |= {"images_per_s_bf16": bf16,
                    "mfu_bf16": utilisation(bf16, flops, peaks["bfloat16"], "jaxgen_bfloat16")}
    if f32 and bf16:
        summary["bf16_speedup"] = bf16 / f32
    for mode in ("eager", "compile"):
        peer_f32, peer_bf16 = images_per_s.get(f"torch_{mode}_float32"), images_per_s.get(f"torch_{mode}_bfloat16")
        if f32 and peer_f32:
            summary[f"vs_torch_{mode}"] = f32 / peer_f32
        if bf16 and peer_bf16:
            summary[f"bf16_vs_torch_{mode}_autocast"] = bf16 / peer_bf16
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. data.batch_size=16")
    parser.add_argument("--config", default="S2", choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=at_least(1), default=3, help="timed steps per contestant per round")
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps per contestant before timing")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes to time")
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:
        if dtype not in ("float32", "bfloat16"):
            parser.error(f"--dtypes takes float32 and/or bfloat16, got {dtype!r}")

    overrides = CONFIGS[args.config] + args.overrides
    cfg = load_config(DIGITS, overrides)
    device, sheet = jax.devices()[0], data_sheet_peak()
    flops = flops_per_image(cfg.model)
    emit({"device": device.device_kind, "platform": device.platform, "allocator": loaded_allocator(),
          "config": args.config, "overrides": overrides,
          "batch": cfg.data.batch_size, "patches": (cfg.model.image_size // cfg.model.patch_size) ** 2,
          **check_models_agree(cfg), "data_sheet_bf16_tflops": sheet / 1e12 if sheet else None})

    contestants = {f"jaxgen_{dtype}": JaxgenDiTStep(with_compute_dtype(cfg, dtype)) for dtype in dtypes}
    if args.torch:
        for mode in ("eager", "compile") if args.torch_compile else ("eager",):
            for dtype in dtypes:
                contestants[f"torch_{mode}_{dtype}"] = TorchDiTStep(cfg, mode, dtype)
    peaks = MatmulPeaks()
    timings = take_turns(contestants, args.rounds, args.steps, args.warmup, before_round=peaks.measure)
    peaks.measure()
    best = {dtype: peaks[dtype] for dtype in MatmulPeaks.DTYPES}
    emit({"peak_f32_gflops": best["float32"] / 1e9, "peak_bf16_gflops": best["bfloat16"] / 1e9,
          **{f"peak_{name}_gflops_each_round": [round(f / 1e9, 1) for f in measured]
             for name, measured in peaks.measured.items()}})

    images_per_s = {}
    for name, timing in timings.items():
        c = contestants[name]
        ips = c.images_per_step / timing.median_s
        images_per_s[name] = ips
        dtype = name.rsplit("_", 1)[1]
        record = {"contestant": name, "step_ms": 1e3 * timing.median_s,
                  "step_ms_each_round": [round(1e3 * t, 1) for t in timing.round_medians_s], "images_per_s": ips,
                  "achieved_gflops": ips * flops / 1e9, "mfu_vs_measured_peak": utilisation(ips, flops, best[dtype], name),
                  "compile_s": c.compile_s}
        if isinstance(c, JaxgenDiTStep):
            record |= c.memory()
            if sheet:
                record["mfu_vs_data_sheet"] = utilisation(ips, flops, sheet, name)
        emit(record)
    emit(summarize(args.config, images_per_s, flops, best))


if __name__ == "__main__":
    main()
