"""The PyTorch peer of jaxgen's class-conditional DiT and its rectified-flow train step.

Same shapes and parameters as `jaxgen.models.dit.DiT` (a `DiTConfig`): patches
embedded by a matmul on flattened (row-major, channels-last) patches plus fixed
2-D sin-cos positions; a timestep MLP on cosine-then-sine features and a class
table with one extra row for the null class, summed into the condition; blocks
of affine-free LayerNorm modulated by adaLN-Zero (shift, scale, gate for
attention and MLP), fused QKV and output projections without biases, a
tanh-GELU MLP whose first projection has a bias; a modulated final LayerNorm and
a biased output projection. Modulations and the output projection start at zero.

A step is the same work as jaxgen's train step for `diffusion.objective: flow`:
logit-normal times, labels dropped to the null class, x_t = (1 - t) x0 + t eps,
mean squared error against eps - x0, backward, global-norm clipping, AdamW
(biases undecayed, as jaxgen's weight-decay mask) and the parameter average
(EMA with jaxgen's linear warm-up of the decay). The learning rate stays at the
configured peak (a schedule is a few scalar operations per step); jaxgen's non-finite guard has no
counterpart. Modes: `eager` and `compile` (`torch.compile` of the model; the
optimizer and EMA run eagerly), float32 or bfloat16 autocast.

`benchmarks/dit_step.py` times this beside jaxgen in one run.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def patchify(x_BHWC: torch.Tensor, p: int) -> torch.Tensor:
    b, h, w, c = x_BHWC.shape
    x = x_BHWC.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x_BNP: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    b, _, ppc = x_BNP.shape
    x = x_BNP.reshape(b, h // p, w // p, p, p, ppc // (p * p)).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, -1)


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim): sines then cosines of the row index in the first half, of the column in the second."""
    def one_axis(positions, width):
        omega = 1.0 / 10_000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
        angles = positions.double()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one_axis(rows.flatten(), dim // 2), one_axis(cols.flatten(), dim // 2)], dim=1).float()


def timestep_features(t_B: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = t_B.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def normal_(layer: nn.Linear, std: float) -> nn.Linear:
    if std:
        nn.init.normal_(layer.weight, std=std)
    else:
        nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int, eps: float, std: float):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.modulation = normal_(nn.Linear(d, 6 * d), 0.0)
        self.wqkv = normal_(nn.Linear(d, 3 * d, bias=False), std)
        self.wo = normal_(nn.Linear(d, d, bias=False), std)
        self.w_in = normal_(nn.Linear(d, d_ff), std)
        self.w_out = normal_(nn.Linear(d_ff, d, bias=False), std)

    def forward(self, x, c):
        b, n, d = x.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(F.silu(c)).chunk(6, dim=-1)
        h = modulate(F.layer_norm(x, (d,), eps=self.eps), shift_a, scale_a)
        q, k, v = self.wqkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate_a[:, None, :] * self.wo(attn)
        h = modulate(F.layer_norm(x, (d,), eps=self.eps), shift_m, scale_m)
        return x + gate_m[:, None, :] * self.w_out(F.gelu(self.w_in(h), approximate="tanh"))


class DiT(nn.Module):
    def __init__(self, image_size: int, channels: int, patch: int, d: int, layers: int, heads: int, d_ff: int,
                 num_classes: int, freq_dim: int, out_channels: int, eps: float, std: float):
        super().__init__()
        self.patch, self.freq_dim, self.eps = patch, freq_dim, eps
        pixels = patch * patch * channels
        self.patch_embed = normal_(nn.Linear(pixels, d), (1 / pixels) ** 0.5)
        self.register_buffer("positions", sincos_positions(image_size // patch, d))
        self.t_in = normal_(nn.Linear(freq_dim, d), std)
        self.t_out = normal_(nn.Linear(d, d), std)
        self.class_embed = nn.Parameter(torch.randn(num_classes + 1, d) * std)  # the last row: the null class
        self.blocks = nn.ModuleList(Block(d, heads, d_ff, eps, std) for _ in range(layers))
        self.final_modulation = normal_(nn.Linear(d, 2 * d), 0.0)
        self.final = normal_(nn.Linear(d, patch * patch * out_channels), 0.0)

    def forward(self, x_BHWC, t_B, labels_B):
        _, h, w, _ = x_BHWC.shape
        x = self.patch_embed(patchify(x_BHWC, self.patch)) + self.positions
        c = self.t_out(F.silu(self.t_in(timestep_features(t_B, self.freq_dim)))) + self.class_embed[labels_B]
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_modulation(F.silu(c)).chunk(2, dim=-1)
        x = modulate(F.layer_norm(x, (x.shape[-1],), eps=self.eps), shift, scale)
        return unpatchify(self.final(x), self.patch, h, w).float()


def shape_of(model_cfg) -> dict:
    """The DiT constructor's arguments for a jaxgen DiTConfig."""
    return {"image_size": model_cfg.image_size, "channels": model_cfg.channels, "patch": model_cfg.patch_size,
            "d": model_cfg.d_model, "layers": model_cfg.n_layers, "heads": model_cfg.n_heads,
            "d_ff": model_cfg.resolved_d_ff, "num_classes": model_cfg.num_classes, "freq_dim": model_cfg.freq_dim,
            "out_channels": model_cfg.out_channels, "eps": model_cfg.norm_eps, "std": model_cfg.init_std}


def make_step(model: nn.Module, ema: nn.Module, cfg, dtype: str):
    """The flow train step for a jaxgen Config `cfg` (its optimizer and diffusion settings)."""
    d, o = cfg.diffusion, cfg.optimizer
    if d.objective != "flow" or d.flow_time != "logit_normal" or cfg.model.learn_sigma:
        raise ValueError("the PyTorch DiT step supports diffusion.objective=flow with logit-normal times only")
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for name, p in model.named_parameters() if not name.endswith("bias")]
    undecayed = [p for name, p in model.named_parameters() if name.endswith("bias")]
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": o.weight_decay},
                             {"params": undecayed, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    ema_params = list(ema.parameters())
    null_label, updates = cfg.model.num_classes, 0

    def step(x0_BHWC: torch.Tensor, labels_B: torch.Tensor) -> float:
        nonlocal updates
        b = x0_BHWC.shape[0]
        opt.zero_grad(set_to_none=True)
        t = torch.sigmoid(d.logit_mean + d.logit_std * torch.randn(b))
        eps = torch.randn_like(x0_BHWC)
        labels = torch.where(torch.rand(b) < d.label_dropout, null_label, labels_B)
        x_t = (1 - t[:, None, None, None]) * x0_BHWC + t[:, None, None, None] * eps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = model(x_t, t * 1000.0, labels)
        loss = (out - (eps - x0_BHWC)).square().mean()
        loss.backward()
        if o.clip_norm:
            torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
        opt.step()
        updates += 1
        decay = d.ema_decay * (min(updates / d.ema_warmup, 1.0) if d.ema_warmup else 1.0)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        return loss.item()

    return step


def build(cfg, mode: str, dtype: str, seed: int = 0):
    """The train step of a fresh model for a jaxgen Config; `mode` eager or compile."""
    torch.manual_seed(seed)
    model = DiT(**shape_of(cfg.model))
    ema = copy.deepcopy(model).requires_grad_(False)
    runnable = torch.compile(model) if mode == "compile" else model
    return make_step(runnable, ema, cfg, dtype)


def forward_flops(model: DiT, batch: int, image_size: int, channels: int) -> float:
    """FLOPs of one forward pass, counted by PyTorch's own operator-level counter.

    Attention runs through its reference (math) backend here, whose batched matmuls the
    counter sees; it has no formula for the fused CPU kernel.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, image_size, image_size, channels)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, torch.zeros(batch), torch.zeros(batch, dtype=torch.long))
    return float(counter.get_total_flops())
