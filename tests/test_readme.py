"""Every `jaxgen` example in the README runs as written, in order, on a machine with one CPU device.

Two liberties, both visible here: repository paths (`configs/...`,
`jaxgen/data/...`) are made absolute because the examples run in a temporary
directory, and training examples get `train.steps=2` appended (overrides may
go anywhere after the command), so that a four-minute example takes seconds;
an example that sets `train.steps` itself keeps its own. The set-up commands
(`pip install ...`) are checked by installing into a fresh virtualenv, not here.
"""

import re
import shlex

from helpers import REPO, run_jaxgen

EXAMPLE = re.compile(r"^    (jaxgen .*)$", re.M)


def readme_examples() -> list[list[str]]:
    return [shlex.split(line, comments=True)[1:] for line in EXAMPLE.findall((REPO / "README.md").read_text())]


def as_run_here(args: list[str]) -> list[str]:
    args = [str(REPO / a) if a.startswith(("configs/", "jaxgen/data/")) else a for a in args]
    trains = "train" in args and (args[0] == "train" or args[0] == "launch")
    if trains and not any(a.startswith("train.steps=") for a in args):
        args.append("train.steps=2")
    return args


def test_the_readme_examples_run_as_written(tmp_path):
    examples = readme_examples()
    assert len(examples) >= 10 and examples[0][0] == "train"
    for args in examples:
        result = run_jaxgen(*as_run_here(args), cwd=tmp_path, timeout=600)
        assert result.returncode == 0, f"jaxgen {shlex.join(args)}\n{result.stderr[-3000:]}"
    assert (tmp_path / "runs" / "try-imported" / "checkpoints").is_dir()
    assert (tmp_path / "runs" / "grid.png").read_bytes()[:4] == b"\x89PNG"
