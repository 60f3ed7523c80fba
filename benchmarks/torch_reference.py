"""The PyTorch peer: jaxgen's Llama architecture and training step, timed on CPU. Prints JSON.

Same shapes as a jaxgen `TransformerConfig` (RMSNorm, rotary positions in the
half-split layout, grouped-query causal attention through
`scaled_dot_product_attention`, SwiGLU MLP, untied output head), trained with
AdamW and global-norm clipping at jaxgen's default settings. A step is
zero_grad + forward + mean cross-entropy + backward + clip + AdamW, the same
work as jaxgen's train step.

Modes: `eager` and `compile` (`torch.compile` of the model; the optimizer
runs eagerly, as in most PyTorch training scripts), each in float32 or with
bfloat16 autocast. PyTorch is a benchmark-only dependency (the `test` extra
pins the CPU wheel).

    flock /tmp/jaxgen-bench.lock python benchmarks/torch_reference.py
    python benchmarks/torch_reference.py --modes eager --dtypes float32 --steps 5

`benchmarks/lm_step.py` imports `measure` to time PyTorch beside jaxgen in one run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def rotate(x, cos, sin):
    """Rotary embedding, half-split layout; x (B, H, L, Dh), cos/sin (L, Dh/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, d_ff: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.attn_norm, self.mlp_norm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.wq = nn.Linear(d, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, d, bias=False)
        self.w_gate = nn.Linear(d, d_ff, bias=False)
        self.w_up = nn.Linear(d, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x, cos, sin):
        b, seq, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(b, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(h).view(b, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(h).view(b, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin).to(v.dtype), rotate(k, cos, sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)
        x = x + self.wo(out.transpose(1, 2).reshape(b, seq, -1))
        h = self.mlp_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class Llama(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, kv_heads: int, d_ff: int,
                 eps: float = 1e-5, rope_theta: float = 10_000.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, kv_heads, d_ff, eps) for _ in range(layers))
        self.final_norm = RMSNorm(d, eps)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        head_dim = d // heads
        self.register_buffer("inv_freq", 1.0 / rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens):
        angles = torch.arange(tokens.shape[1], device=tokens.device).float()[:, None] * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.final_norm(x))


def make_step(model: nn.Module, dtype: str, lr: float = 3e-3, weight_decay: float = 0.1, clip: float = 1.0):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    autocast = dtype == "bfloat16"

    def step(inputs, targets) -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss.item()

    return step


def measure(shape: dict, batch: int, seq_len: int, mode: str = "eager", dtype: str = "float32",
            steps: int = 10, warmup: int = 3, seed: int = 0) -> dict:
    """Median step time and tokens/s of one (mode, dtype); `shape` holds the Llama constructor's arguments."""
    torch.manual_seed(seed)
    model = Llama(**shape)
    runnable = torch.compile(model) if mode == "compile" else model
    step = make_step(runnable, dtype)
    tokens = torch.randint(0, shape["vocab"], (batch, seq_len + 1))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    start = time.perf_counter()
    for _ in range(warmup):  # includes compilation in compile mode
        first_loss = step(inputs, targets)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step(inputs, targets)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    if not math.isfinite(loss):
        raise RuntimeError(f"PyTorch {mode}/{dtype} produced a non-finite loss")
    return {"mode": mode, "dtype": dtype, "step_ms": 1e3 * median, "tokens_per_s": batch * seq_len / median,
            "warmup_s": warmup_s, "first_loss": first_loss, "threads": torch.get_num_threads()}


def shape_of(model_cfg) -> dict:
    """The Llama constructor's arguments for a jaxgen TransformerConfig."""
    if model_cfg.head_dim not in (None, model_cfg.d_model // model_cfg.n_heads) or model_cfg.tie_embeddings:
        raise ValueError("the PyTorch reference supports head_dim = d_model / n_heads and untied embeddings only")
    return {"vocab": model_cfg.vocab_size, "d": model_cfg.d_model, "layers": model_cfg.n_layers,
            "heads": model_cfg.n_heads, "kv_heads": model_cfg.n_kv_heads, "d_ff": model_cfg.d_ff,
            "eps": model_cfg.norm_eps, "rope_theta": model_cfg.rope_theta}


def main() -> None:
    from jaxgen.config import load_config  # jaxgen only for its defaults; no JAX work happens here

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="jaxgen config overrides, e.g. model.d_model=512")
    parser.add_argument("--modes", default="eager,compile")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    cfg = load_config(None, args.overrides)
    results = [measure(shape_of(cfg.model), cfg.data.batch_size, cfg.data.seq_len, mode, dtype, args.steps)
               for mode in args.modes.split(",") for dtype in args.dtypes.split(",")]
    for r in results:
        print(json.dumps(r))
    print(json.dumps({"batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "shape": shape_of(cfg.model),
                      "tokens_per_s": {f"{r['mode']}_{r['dtype']}": round(r["tokens_per_s"]) for r in results}}))


if __name__ == "__main__":
    main()
