"""benchmarks/decode.py's summary: ratios of jaxgen's tokens/s over transformers' per batch size."""

import decode
import pytest


def record(contestant: str, batch: int, tokens_per_s: float, **extra) -> dict:
    return {"contestant": contestant, "batch": batch, "tokens_per_s": tokens_per_s, "ttft_ms": 10.0,
            "per_token_ms": 1000 / tokens_per_s, **extra}


def test_the_summary_divides_jaxgens_tokens_per_second_by_transformers_at_each_batch_size():
    records = [record("jaxgen", 1, 300.0, same_tokens=1.0), record("transformers", 1, 200.0),
               record("jaxgen", 16, 2000.0, same_tokens=0.98), record("transformers", 16, 2500.0)]
    summary = decode.summarize(records, {"recompiles": 0}, "1 x cpu")
    assert summary["vs_transformers_b1"] == pytest.approx(1.5)
    assert summary["vs_transformers_b16"] == pytest.approx(0.8)
    assert summary["same_tokens_b16"] == 0.98 and summary["recompiles"] == 0
    alone = decode.summarize(records[::2], {"recompiles": 1}, "1 x cpu")  # --no-torch
    assert "vs_transformers_b1" not in alone and alone["jaxgen_tokens_per_s_b16"] == 2000.0


def test_prompts_are_the_same_for_both_contestants_and_within_the_vocabulary():
    first, again = decode.prompts_of(16, 32, 100), decode.prompts_of(16, 32, 100)
    assert (first == again).all() and first.shape == (16, 32) and first.min() >= 1 and first.max() < 100
