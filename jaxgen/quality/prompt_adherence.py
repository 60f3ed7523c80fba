"""Prompt adherence and sample quality against the guidance scale, as a picture.

`jaxgen eval` of a text-to-image run scores samples at each scale of
`diffusion.eval_guidance_scales`; this draws what it found: whole-prompt and
per-attribute adherence (with the shuffled-prompt baseline as a dashed line)
on the left, the Fréchet distance of the samples beside the real-data floor on
the right.
"""

from __future__ import annotations

import pathlib

from jaxgen.files import write_atomic

ATTRIBUTES = ("prompt", "kind", "colour", "size", "relation")


def plot_guidance_sweep(sweep: list[dict], path: pathlib.Path) -> pathlib.Path:
    """`sweep`: one quality report per guidance scale (`guidance_scale`, `frechet_distance`,
    `frechet_floor`, and `adherence` where the checker could judge); writes the PNG atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["guidance_scale"] for r in sweep]
    judged = all("adherence" in r for r in sweep)
    fig, axes = plt.subplots(1, 2 if judged else 1, figsize=(10 if judged else 5, 4), squeeze=False)
    if judged:
        ax = axes[0][0]
        for attribute in ATTRIBUTES:
            ax.plot(scales, [r["adherence"][attribute] for r in sweep], marker="o", label=attribute)
        chance = sum(r["adherence"]["chance"]["prompt"] for r in sweep) / len(sweep)
        ax.axhline(chance, color="grey", linestyle="--", label="whole prompt, shuffled prompts")
        ax.set(xlabel="guidance scale", ylabel="accuracy on held-out prompts", ylim=(0, 1.02),
               title="prompt adherence")
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    ax.plot(scales, [r["frechet_distance"] for r in sweep], marker="o", label="samples")
    if "frechet_floor" in sweep[0]:
        ax.axhline(sweep[0]["frechet_floor"], color="grey", linestyle="--", label="real-data floor")
    ax.set(xlabel="guidance scale", ylabel="Fréchet distance (classifier features)", title="sample quality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path
