"""An encoder-decoder on two real processes (4 CPU devices each, over loopback) trains on the same global
batches as one process of 8 devices: the same losses and held-out losses, step for step.

It reads supervised pairs, so the pairs' JSONL lines are dealt out to the processes' reader streams,
packed there and joined into global batches. The masked-LM rows go through the same streams, packing
and per-row random draws (seeded by stream and position), so one family covers both.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxgen.data.corpus import BUNDLED_CORPUS, iter_documents
from jaxgen.metrics import read_metrics

from conftest import REPO
from test_launch_processes import launch_local

COMMON = ["model.vocab_size=400", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
          "data.seq_len=32", "data.batch_size=8", "train.eval_batches=2", "train.steps=4", "train.eval_every=2",
          "checkpoint.every=4", "logging.every=1", "logging.progress_bar=false", "logging.tensorboard=false",
          "mesh.data=2", "mesh.fsdp=4", "optimizer.eps=1e-3"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    (root / "verses.txt").write_text("\n".join(list(iter_documents([BUNDLED_CORPUS]))[:3000]) + "\n")
    rng = np.random.default_rng(0)
    words = sorted({"".join(rng.choice(list("abcdefgh"), rng.integers(3, 6))) for _ in range(900)})
    (root / "pairs.jsonl").write_text("".join(
        json.dumps({"spelling": " ".join(w), "reversed": " ".join(w[::-1].upper())}) + "\n" for w in words))
    return root


def family_args(family, sources):
    if family == "encoder":
        return ["--config", "configs/bert_tiny.yaml", "model.max_seq_len=32", f"data.text={sources / 'verses.txt'}"]
    return ["--config", "configs/t5_g2p.yaml", f"data.jsonl={sources / 'pairs.jsonl'}", "data.target_field=reversed",
            "data.eval_every_nth_doc=10", "data.target_len=32", "model.vocab_size=280"]


def logged(run_dir, key):
    return {r["step"]: r[key] for r in read_metrics(run_dir / "metrics.jsonl") if key in r}


@pytest.mark.parametrize("family", ["encoder_decoder"])
def test_two_processes_train_like_one(sources, tmp_path, family):
    args = ["train", *COMMON, *family_args(family, sources)]
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, "-m", "jaxgen", *args, "--run-dir", str(one)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    status, output = launch_local("--processes", "2", "--devices-per-process", "4", "--", *args, "--run-dir",
                                  str(two))
    assert status == 0, output[-5000:]
    for key in ("loss", "eval_loss"):
        assert list(logged(two, key)) == list(logged(one, key))
        np.testing.assert_allclose(list(logged(two, key).values()), list(logged(one, key).values()), rtol=1e-5)
