"""Time to the first step: the persistent compilation cache option, a warm second run, the benchmark's output."""

import json
import pathlib
import subprocess
import sys

import pytest
from startup import parse_records, run_record, summarize

from jaxgen.allocator import find_tcmalloc
from jaxgen.config import load_config
from jaxgen.errors import ConfigError

from conftest import TINY_CONFIG
from helpers import run_jaxgen


def test_a_bad_cache_directory_is_one_clear_line(tmp_path):
    a_file = tmp_path / "cache.txt"
    a_file.write_text("not a directory")
    for value, says in ((str(a_file), "is a file, not a directory"), ('"  "', "is blank")):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"train.compilation_cache_dir={value}"])
        line = str(err.value)
        assert "\n" not in line and line.startswith("invalid config: train.compilation_cache_dir: ")
        assert says in line and "give a directory, 'auto', or null to disable the cache" in line
    assert load_config(None, ["train.compilation_cache_dir=null"]).train.compilation_cache_dir is None
    assert load_config(None, []).train.compilation_cache_dir == "auto"


def test_a_second_run_loads_its_programs_from_the_cache(tmp_path, tokenizer):
    cache = tmp_path / "cache"
    summaries = []
    for name in ("first", "second"):
        result = run_jaxgen("train", "--config", str(TINY_CONFIG), "--run-dir", str(tmp_path / name),
                            "train.steps=1", "train.eval_batches=1", "train.sample_tokens=0",
                            "logging.tensorboard=false", f"data.tokenizer={tokenizer.path}",
                            f"train.compilation_cache_dir={cache}")
        assert result.returncode == 0, result.stderr[-2000:]
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    first, second = summaries
    assert first["compilation_cache"] == {"dir": str(cache), "hits": 0, "writes": first["compilation_cache"]["writes"]}
    assert first["compilation_cache"]["writes"] > 0 and any(cache.iterdir())
    assert second["compilation_cache"]["hits"] >= first["compilation_cache"]["writes"]
    assert second["compilation_cache"]["writes"] == 0  # every program the run compiled was there
    assert second["peak_source"] in ("measured", "cache", "achieved") and second["mfu_median"] <= 1
    assert second["allocator"] == ("tcmalloc" if find_tcmalloc() else "system")  # what `jaxgen` re-executed on
    phases = second["startup_s"]
    assert list(phases)[-2:] == ["first_step", "total"] and {"imports", "data", "state", "compile"} <= set(phases)
    assert phases["total"] == pytest.approx(sum(v for k, v in phases.items() if k != "total"), abs=0.01)


def test_the_startup_benchmark_output_reads_back():
    summaries = [
        {"startup_s": {"imports": 1.0, "data": 2.0, "compile": 9.0, "first_step": 0.5, "total": 12.5},
         "compile_s": 9.0, "compilation_cache": {"hits": 0, "writes": 14}, "process_wall_s": 16.0},
        {"startup_s": {"imports": 1.0, "data": 2.0, "compile": 1.0, "first_step": 0.5, "total": 4.5},
         "compile_s": 1.0, "compilation_cache": {"hits": 14, "writes": 0}, "process_wall_s": 7.0},
    ]
    records = [{"help_s": 0.6}] + [run_record(kind, 0, s) for kind, s in zip(("cold", "warm"), summaries)]
    lines = [json.dumps(r) for r in records] + [json.dumps(summarize(records, target_s=10.0))]
    parsed, summary = parse_records(lines)
    assert parsed == records
    assert summary["first_step_s_cold"] == 12.5 and summary["first_step_s_warm"] == 4.5
    assert summary["phases_warm"] == {"imports": 1.0, "data": 2.0, "compile": 1.0, "first_step": 0.5}
    assert summary["warm_within_target"] and summary["help_s"] == 0.6
    assert records[2]["cache_hits"] == 14
    with pytest.raises(ValueError, match="summary"):
        parse_records(lines[:-1])


def test_an_unwritable_cache_directory_trains_uncached_by_default_and_is_refused_where_given(tmp_path, monkeypatch,
                                                                                            caplog):
    """A read-only home (a compute node, a container) refused every `jaxgen train`, for a cache nobody asked for."""
    import jax

    from jaxgen.train import compilation_cache as cache

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    before = jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setattr(cache, "user_cache_dir", lambda: blocker / "cache")
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        with caplog.at_level("WARNING", logger="jaxgen"):
            assert cache.use_compilation_cache("auto") is None
        assert not jax.config.jax_enable_compilation_cache
        [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warning.startswith(f"train.compilation_cache_dir='auto': cannot create '{blocker}/cache/compilation' (")
        assert warning.endswith("training without the compilation cache (give a writable directory to keep compiled "
                                "programs between runs)")
        with pytest.raises(ConfigError) as refused:
            cache.use_compilation_cache(str(blocker / "mine"))
        assert str(refused.value).startswith(f"train.compilation_cache_dir='{blocker}/mine': cannot create ")
        assert str(refused.value).endswith("give a writable directory, 'auto' (the user cache), or null to disable "
                                           "the cache")
        # A given directory that exists but cannot be written (a site's read-only cache) is read, said once.
        shared = tmp_path / "shared"
        shared.mkdir()
        monkeypatch.setattr(cache.os, "access", lambda path, mode: pathlib.Path(path) != shared)
        caplog.clear()
        with caplog.at_level("WARNING", logger="jaxgen"):
            assert cache.use_compilation_cache(str(shared)) == str(shared)
        assert jax.config.jax_compilation_cache_dir == str(shared)
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
            f"train.compilation_cache_dir='{shared}': cannot write in it (permission denied or a read-only file "
            "system); programs found there are used, new ones are not kept"]
    finally:
        jax.config.update("jax_enable_compilation_cache", before[0])
        jax.config.update("jax_compilation_cache_dir", before[1])


CACHE_USER = """
import logging, resource, sys
from jaxgen.train.compilation_cache import cache_events, use_compilation_cache
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
use_compilation_cache(sys.argv[1])
if int(sys.argv[2]):  # Python ignores SIGXFSZ: a write past the limit fails (EFBIG) as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
import jax, jax.numpy as jnp, numpy as np
def program(x):
    return jnp.sum(jnp.sin(x) @ x.T)
print(float(jax.jit(program)(np.ones((64, 64), np.float32))))
print({"hits": cache_events["hits"], "writes": cache_events["writes"] - cache_events["failed"]})
"""


def test_a_cache_entry_a_full_disk_cut_short_is_removed_not_read_for_ever(tmp_path):
    """JAX writes an entry in place and never replaces one: a write a full disk cut short left an entry every
    later run failed to read (two raw warning lines each time) and compiled again, for good."""
    cache = tmp_path / "cache"

    def use(limit=0):
        ran = subprocess.run([sys.executable, "-c", CACHE_USER, str(cache), str(limit)], capture_output=True,
                             text=True, timeout=300, check=False)
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert "UserWarning" not in ran.stderr and "warnings.warn" not in ran.stderr
        return json.loads(ran.stdout.splitlines()[-1].replace("'", '"')), [
            line for line in ran.stderr.splitlines() if line.startswith(("INFO compilation", "WARNING"))]

    def entries():
        return sorted(cache.glob("jit_program-*-cache"))

    counts, said = use(limit=2048)  # the disk fills as the entry is written
    assert counts == {"hits": 0, "writes": 0} and not entries()
    assert len(said) == 1 and said[0].startswith(f"WARNING compilation cache {cache}: a compiled program could not "
                                                 "be kept (OSError: [Errno 27] File too large")

    (cache / "jit_program-0123-cache").write_bytes(b"")  # what a write on a disk already full leaves
    counts, said = use()
    assert said == [f"INFO compilation cache {cache}: removed 1 empty entries, left by writes a full disk cut short; "
                    "their programs are compiled and kept again"]
    [entry] = entries()
    assert counts == {"hits": 0, "writes": 1} and entry.stat().st_size > 2048

    entry.write_bytes(entry.read_bytes()[:2048])  # cut short: no longer decompresses
    counts, said = use()
    assert counts == {"hits": 0, "writes": 1}
    assert len(said) == 1 and said[0].startswith(f"WARNING compilation cache {cache}: a compiled program of "
                                                 "'jit_program' could not be read (")
    assert said[0].endswith("; 1 damaged entry of it (cut short by a full disk or a kill) removed; compiled instead")
    assert use() == ({"hits": 1, "writes": 0}, [])  # written whole again, and read
