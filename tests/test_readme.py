"""Every `jaxgen` example in the README runs as written, in order, on a machine with one CPU device.

Two liberties, both visible here: repository paths (`configs/...`,
`jaxgen/data/...`) are made absolute because the examples run in a temporary
directory, and training examples get `train.steps=2` appended (overrides may
go anywhere after the command), so that a four-minute example takes seconds;
an example that sets `train.steps` itself keeps its own. The synthetic shapes
set is made with at most 640 scenes, and sample quality at the end of a diffusion or GAN
training example and in `jaxgen eval` of a text-to-image run is scored on 16 images
(`images.quality_images=16`) for the same reason. Only where
Fashion-MNIST is not installed (CI machines): the configs reading it get a small
IDX dataset written here instead. A line ending in a backslash continues on the
next, as in a shell. The set-up commands (`pip install ...`) are
checked by installing into a fresh virtualenv, not here.
"""

import pathlib
import re
import shlex

import numpy as np

from helpers import REPO, run_jaxgen
from test_image_folders import write_idx

EXAMPLE = re.compile(r"^    (jaxgen .*)$", re.M)


SHAPES_COUNT = 640
# Configs whose training ends by scoring samples drawn for held-out images (diffusion, GANs).
SAMPLING_CONFIGS = ("dit_digits.yaml", "gan_fashion.yaml", "t2i_shapes.yaml")


def readme_examples() -> list[list[str]]:
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line, comments=True)[1:] for line in EXAMPLE.findall(text)]


FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


def small_idx_dataset(root: pathlib.Path) -> pathlib.Path:
    """28x28 grey images in 10 classes, in Fashion-MNIST's files."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 128), ("t10k", 64)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)
    return root


def as_run_here(args: list[str], fashion_mnist: pathlib.Path = FASHION_MNIST) -> list[str]:
    reads_fashion_mnist = any(a.endswith("_fashion.yaml") for a in args)
    args = [str(REPO / a) if a.startswith(("configs/", "jaxgen/data/")) else a for a in args]
    trains = "train" in args and (args[0] == "train" or args[0] == "launch")
    if trains and not any(a.startswith("train.steps=") for a in args):
        args.append("train.steps=2")
    if trains and reads_fashion_mnist and fashion_mnist != FASHION_MNIST:
        args.append(f"images.idx={fashion_mnist}")
    if args[:3] == ["data", "synth", "shapes"] and "--count" in args:
        at = args.index("--count") + 1
        args[at] = str(min(int(args[at]), SHAPES_COUNT))
    samples_to_score = trains and any(a.endswith(SAMPLING_CONFIGS) for a in args)
    if samples_to_score or (args[0] == "eval" and "runs/t2i_" in " ".join(args)):
        args.append("images.quality_images=16")
    return args


def test_the_readme_examples_run_as_written(tmp_path):
    examples = readme_examples()
    assert len(examples) >= 10 and examples[0][0] == "train"
    fashion_mnist = FASHION_MNIST if FASHION_MNIST.is_dir() else small_idx_dataset(tmp_path / "fashion-mnist")
    for args in examples:
        result = run_jaxgen(*as_run_here(args, fashion_mnist), cwd=tmp_path, timeout=600)
        assert result.returncode == 0, f"jaxgen {shlex.join(args)}\n{result.stderr[-3000:]}"
    assert (tmp_path / "runs" / "try-imported" / "checkpoints").is_dir()
    assert (tmp_path / "runs" / "grid.png").read_bytes()[:4] == b"\x89PNG"
