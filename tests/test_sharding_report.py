"""The sharding report reads collectives from compiled HLO correctly and matches its analytic model."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sharding_report

TINY = ["model.vocab_size=256", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=192", "model.max_seq_len=32", "data.seq_len=32", "data.batch_size=8"]


def test_parser_counts_a_psum_in_a_loop_and_an_all_gather(devices):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,), devices=devices)

    def per_device(x_1N):
        def body(carry_1N, _):
            return jax.lax.psum(carry_1N * 2.0, "x"), None

        summed_1N, _ = jax.lax.scan(body, x_1N, None, length=3)
        return summed_1N, jax.lax.all_gather(x_1N, "x", tiled=True)

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("x"), out_specs=(P("x"), P()), check_vma=False))
    x = jax.ShapeDtypeStruct((8, 1024), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    found = sharding_report.parse_collectives(fn.lower(x).compile().as_text(), num_devices=8)

    by_kind = {c.kind: c for c in found}
    assert sorted(by_kind) == ["all-gather", "all-reduce"] and len(found) == 2
    psum = by_kind["all-reduce"]
    assert (psum.group, psum.buffer_bytes, psum.times) == (8, 4096, 3)  # a (1, 1024) float32 block, 3 iterations
    gather = by_kind["all-gather"]
    assert (gather.group, gather.buffer_bytes, gather.times) == (8, 8 * 4096, 1)
    summary = sharding_report.summarize_collectives(found)
    assert summary["total_bytes"] == 3 * 2 * 7 * 4096 // 8 + 7 * 4096


@pytest.mark.parametrize("preset", ["dp", "fsdp"])
def test_train_step_traffic_and_state_match_the_analytic_model(devices, preset):
    result = sharding_report.report(sharding_report.preset_config(preset, TINY))

    assert 0.9 <= result["ratio"] <= 1.1 and result["ok"], result
    expected_kinds = {"dp": {"all-reduce n=8"}, "fsdp": {"all-gather n=8", "all-reduce n=8"}}[preset]
    assert set(result["collectives"]) == expected_kinds
    measured, analytic = result["memory"]["measured"], result["memory"]["analytic"]
    assert measured["argument_bytes"] == analytic["argument_bytes"]
    assert measured["alias_bytes"] == analytic["alias_bytes"]  # the whole state is donated


GPU_STYLE_HLO = """HloModule step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%cond (c: (s32[], bf16[64])) -> pred[] {
  %c = (s32[], bf16[64]{0}) parameter(0)
  ROOT %go = pred[] constant(true)
}

%body (carry: (s32[], bf16[64])) -> (s32[], bf16[64]) {
  %carry = (s32[], bf16[64]{0}) parameter(0)
  %shard = bf16[64]{0} get-tuple-element(%carry), index=1
  %ags = (bf16[64]{0}, bf16[256]{0}) all-gather-start(%shard), replica_groups=[2,4]<=[8], dimensions={0}
  %agd = bf16[256]{0} all-gather-done(%ags)
  %rs = bf16[64]{0} reduce-scatter(bf16[256]{0} %agd), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  ROOT %out = (s32[], bf16[64]{0}) tuple(s32[] %i, %rs)
}

ENTRY %main (x: bf16[64]) -> bf16[64] {
  %x = bf16[64]{0} parameter(0)
  %loop = (s32[], bf16[64]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %ars = f32[32]{0} all-reduce-start(f32[32]{0} %y), replica_groups={}, to_apply=%add
  ROOT %ard = f32[32]{0} all-reduce-done(%ars)
}
"""


def test_parser_reads_async_pairs_iota_groups_and_typed_operands():
    found = sharding_report.parse_collectives(GPU_STYLE_HLO, num_devices=8)

    got = sorted((c.kind, c.group, c.buffer_bytes, c.times) for c in found)
    assert got == [("all-gather", 4, 4 * 128, 5), ("all-reduce", 8, 128, 1), ("reduce-scatter", 4, 512, 5)]
