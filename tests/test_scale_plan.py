"""The scale plan compiles the real step for a mesh without weights, and its analytic figures are the ones it says."""

import json
import os
import subprocess
import sys

import pytest
import scale_plan

from jaxgen.config import load_config

from conftest import REPO, TINY_CONFIG, tiny_config

# The tiny config on a 4-device mesh: every global batch divides by 4.
TINY = ["data.batch_size=8"]


def test_tensor_parallel_size_divides_the_model_and_the_mesh():
    llama = load_config(REPO / "configs" / "llama3_8b.yaml", []).model
    gemma = load_config(REPO / "configs" / "gemma2_2b.yaml", []).model
    assert scale_plan.tensor_size(llama, 64) == 8
    assert scale_plan.tensor_size(gemma, 64) == 4  # 4 kv heads
    assert scale_plan.tensor_size(llama, 4) == 4  # no more than the devices


def test_case_keeps_sequences_per_rank_and_mirrors_the_gpu_program():
    llama = load_config(REPO / "configs" / "llama3_8b.yaml", []).model
    cfg = load_config(REPO / "configs" / "llama3_8b.yaml",
                      scale_plan.case_overrides(llama, "fsdp_tp", 64, 2, "full", 2))
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, 8, 8)
    assert cfg.data.batch_size == 16 and cfg.train.microbatches == 2 and cfg.model.remat == "full"
    assert cfg.model.attention == "xla" and cfg.model.batch_slices == 1


def test_ladder_continues_after_the_config_setting_with_microbatches_that_divide():
    assert scale_plan.ladder_after("full", 1, seqs=2) == [("full", 2)]
    assert scale_plan.ladder_after("full", 4, seqs=4) == []
    assert scale_plan.ladder_after("none", 1, seqs=1) == [s for s in scale_plan.LADDER if s[1] == 1]


def test_activation_terms_follow_tokens_policy_and_tensor_split():
    cfg = tiny_config(*TINY, "model.remat=full")  # d_model 64, 2 layers, 4 heads, d_ff 192, vocab 512, L 64
    full = scale_plan.analytic_activations(cfg, data_parallel=4, tensor=1)
    t = 2 * 64  # 8 sequences over 4 ranks
    assert full["residuals"] == 2 * t * 64 * 4
    assert full["saved_matmuls"] == 0
    assert full["logits"] == 3 * t * 512 * 4
    assert full["attention_scores"] == 3 * t * 4 * 64 * 4  # the differentiated layer's scores only

    halves = scale_plan.analytic_activations(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"microbatches": 2})}), data_parallel=4, tensor=1)
    assert all(halves[k] == full[k] / 2 for k in full)
    split = scale_plan.analytic_activations(cfg, data_parallel=4, tensor=2)
    assert split["logits"] == full["logits"] / 2 and split["residuals"] == full["residuals"]

    saveable = scale_plan.analytic_activations(tiny_config(*TINY, "model.remat=dots_saveable"), 4, 1)
    assert saveable["saved_matmuls"] > 0
    assert saveable["attention_scores"] == (2 + 3) * t * 4 * 64 * 4  # every layer's scores are kept


def test_verdict_leaves_headroom():
    fits = scale_plan.verdicts(scale_plan.USABLE * 95e9)
    assert fits == {"80GB": False, "95GB": True, "141GB": True}


@pytest.mark.parametrize("tied", [False, True])
def test_compiled_step_memory_and_collectives_match_the_analytic_model(devices, tied):
    cfg = tiny_config(*TINY, *scale_plan.case_overrides(tiny_config().model, "fsdp", 4, 2, "full", 1),
                      f"model.tie_embeddings={str(tied).lower()}")
    result = scale_plan.plan_case(cfg, devices[:4])

    assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    measured, analytic = result["memory"]["measured"], result["memory"]["analytic"]
    assert measured["argument_bytes"] == analytic["argument_bytes"]  # weights never allocated, still counted
    assert measured["peak_bytes"] == (measured["argument_bytes"] + measured["output_bytes"]
                                      + measured["temp_bytes"] - measured["alias_bytes"])
    collectives = result["collectives"]
    assert set(collectives["by_kind"]) == {"all-gather n=4", "all-reduce n=4"}
    assert collectives["measured_bytes"] == pytest.approx(collectives["analytic_bytes"], rel=0.1)
    assert result["fits"] == {"80GB": True, "95GB": True, "141GB": True}


def test_summary_names_the_first_setting_that_fits():
    def record(remat, mb, fits):
        return {"devices": 8, "preset": "fsdp", "mesh": {"fsdp": 8}, "remat": remat, "microbatches": mb,
                "memory": {"analytic": {"state_bytes": 1e9}, "measured": {"peak_bytes": 9e10}},
                "collectives": {"measured_bytes": 2e9}, "fits": fits, "fits_flash": fits}

    records = [record("full", 1, {"80GB": False, "95GB": False, "141GB": True}),
               record("full", 2, {"80GB": True, "95GB": True, "141GB": True})]
    plan = scale_plan.summarize("c.yaml", 2, records)["plan"]["8"]["fsdp"]
    assert plan["fits"] == {"80GB": "full/mb2", "95GB": "full/mb2", "141GB": "full/mb1"}


def test_cli_runs_each_device_count_in_its_own_process(tmp_path):
    out = tmp_path / "plan.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale_plan.py"), "--config", str(TINY_CONFIG),
                          "--devices", "2", "--presets", "fsdp", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and lines[0]["batch_size"] == 4
    assert lines[-1]["summary"] and lines[-1]["plan"]["2"]["fsdp"]["fits"]["80GB"] == "dots_saveable/mb1"
