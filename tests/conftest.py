"""Every test sees 8 simulated CPU devices; this must run before JAX initialises.

XLA_FLAGS (rather than jax.config) so that CLI runs in subprocesses get them too.
CLI runs in subprocesses also share one persistent compilation cache for the
session: most of them compile the same tiny programs, and compiling is most
of a tiny run's time. The pytest process itself does not use it (set after JAX
read its configuration), since writing the cache slowed in-process tests down.
"""

import atexit
import os
import pathlib
import re
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Made by the first pytest process (xdist's workers inherit the variable) and removed when it
    # exits, so that test sessions leave no compilation caches behind in the temp directory.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxgen-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
# The cache's file lock keeps one subprocess from reading an entry another is still writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))

from jaxgen.config import Config, load_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# Benchmark scripts import their siblings by name (hlo, lm_step), as they do when run from their folder.
sys.path.append(str(REPO / "benchmarks"))
TINY_CONFIG = REPO / "configs" / "lm_tiny.yaml"


def tiny_config(*overrides: str) -> Config:
    return load_config(TINY_CONFIG, list(overrides))


def compiled_dot_operand_types(compiled_text: str) -> list[tuple[str, str]]:
    """Element types of both operands of every dot XLA actually runs, fusion bodies included.

    XLA:CPU silently upcasts a bf16 dot it cannot give its GEMM library (for instance
    one with a transposed operand) to f32, so this is how tests see that bf16 holds.
    """
    types, found = {}, []
    for line in compiled_text.splitlines():
        if m := re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = (\w+)\[", line):
            types[m.group(1)] = m.group(2)
        if m := re.search(r" dot\((%[\w.\-]+), (%[\w.\-]+)\)", line):
            found.append((types[m.group(1)], types[m.group(2)]))
    return found


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "tests need 8 simulated CPU devices"
    return jax.devices()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A 512-piece sentencepiece model of the bundled corpus, trained once per test session."""
    import itertools

    from jaxgen.data.corpus import BUNDLED_CORPUS, iter_documents
    from jaxgen.data.tokenizer import train_tokenizer

    documents = itertools.islice(iter_documents([BUNDLED_CORPUS]), 3000)
    return train_tokenizer(documents, 512, tmp_path_factory.mktemp("tok") / "kjv512.model")


# The longest files first (pyproject's --no-loadscope-reorder hands files out in this order): whole
# files go to each worker, and the README's examples (the suite's longest test by far) started
# last would run alone at the end while the other core waits.
LONGEST_FIRST = ("test_readme.py", "test_text_to_image.py", "test_launch_processes.py", "test_checkpoint.py",
                 "test_adversarial_cli.py", "test_bidirectional_cli.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
