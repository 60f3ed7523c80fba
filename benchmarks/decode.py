"""How fast does `jaxgen sample` decode, against transformers' `generate` on the same exported model? Prints JSON.

Trains the embedded default LM for a few steps (its context widened to fit the
prompt and the new tokens; or takes --run-dir), exports it with `jaxgen export
--format hf`, and decodes the same prompts greedily with both, in one process:
  jaxgen        `jaxgen.tasks.decode.generate`, the KV-cache decoder `jaxgen sample`
                runs (prefill, then one jitted `while_loop` over the new tokens)
  transformers  `AutoModelForCausalLM.generate` of the exported directory
                (PyTorch float32 on the CPU, its own KV cache, `do_sample=False`)
Neither stops early: the end-of-text id is switched off in both, so every row
produces exactly --new-tokens tokens and both do the same work.

Per batch size (--batch-sizes), contestants take turns over --rounds rounds;
each round times a whole generation of --new-tokens tokens and of one token
(time to first token: the prompt's prefill and the first sample). Per-token
latency is (whole - first) / (new tokens - 1). Figures are medians over rounds
after a warm-up (which compiles jaxgen's program and warms PyTorch's kernels).
The greedy tokens of the two are compared as a check that both run the same
model (`same_tokens`: the fraction of positions where they agree).

Prompts of different lengths are padded to a bucket (a power of two), so they
share a compiled program: the `recompiles` line decodes prompts of several
lengths in one bucket after the warm-up and counts new compilations.

The last line is the summary: `vs_transformers_b1`, `vs_transformers_b16`
(jaxgen's tokens/s over transformers'), ...

    flock /tmp/jaxgen-bench.lock python benchmarks/decode.py [--rounds 5] [--batch-sizes 1,16] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

if __name__ == "__main__":  # before jax or torch is loaded, as `jaxgen` starts: Ctrl-C ends the run with
    from jaxgen.__main__ import start_cleanly  # one line, and both contestants run on tcmalloc

    start_cleanly()

import jax
import numpy as np

from jaxgen.allocator import loaded_allocator
from jaxgen.outputs.export import export_run
from jaxgen.outputs.runs import open_run
from jaxgen.tasks.decode import Sampling, Vocabulary, _decode, generate, prompt_bucket
from jaxgen.tasks.layout import MAIN_GROUP

GREEDY = Sampling(temperature=0.0)


def train_default(run_dir: pathlib.Path, context: int, steps: int) -> None:
    subprocess.run([sys.executable, "-m", "jaxgen", "train", "--run-dir", str(run_dir), f"train.steps={steps}",
                    f"model.max_seq_len={context}", "train.sample_tokens=0", "logging.progress_bar=false"],
                   check=True, capture_output=True)


def prompts_of(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, batch, length]).integers(1, vocab, (batch, length), dtype=np.int32)


def jaxgen_decoder(run_dir: pathlib.Path) -> tuple[Callable[[np.ndarray, int], np.ndarray], int]:
    """(decode(prompts_BP, new_tokens) -> tokens_BN, vocabulary size) for the run's weights."""
    run = open_run(run_dir)
    graphdef, params = run.weights.graphdefs[MAIN_GROUP], run.weights.params[MAIN_GROUP]
    vocab = run.cfg.model.vocab_size
    no_end = Vocabulary(eos_id=-1, size=vocab)  # no token id is -1, so no row ever ends early

    def decode(prompts_BP: np.ndarray, new_tokens: int) -> np.ndarray:
        return np.asarray(generate(graphdef, params, prompts_BP.tolist(), new_tokens, no_end, GREEDY))

    return decode, vocab


def transformers_decoder(hf_dir: pathlib.Path) -> Callable[[np.ndarray, int], np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # run to max_new_tokens, as jaxgen does here

    def decode(prompts_BP: np.ndarray, new_tokens: int) -> np.ndarray:
        ids = torch.from_numpy(prompts_BP.astype(np.int64))
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].numpy()

    return decode


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(decoders: dict, batch: int, prompt_len: int, new_tokens: int, vocab: int, rounds: int) -> list[dict]:
    """One JSON record per contestant at this batch size: medians over `rounds` turns."""
    prompts = prompts_of(batch, prompt_len, vocab)
    tokens = {name: decode(prompts, new_tokens) for name, decode in decoders.items()}  # warm-up (compiles)
    for decode in decoders.values():
        decode(prompts, 1)
    times: dict[str, dict[str, list[float]]] = {name: {"whole": [], "first": []} for name in decoders}
    for _ in range(rounds):
        for name, decode in decoders.items():
            times[name]["whole"].append(seconds(lambda: decode(prompts, new_tokens)))
            times[name]["first"].append(seconds(lambda: decode(prompts, 1)))
    reference = tokens.get("transformers")
    records = []
    for name in decoders:
        whole, first = statistics.median(times[name]["whole"]), statistics.median(times[name]["first"])
        record = {"contestant": name, "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens,
                  "tokens_per_s": batch * new_tokens / whole, "whole_s": whole, "ttft_ms": 1000 * first,
                  "per_token_ms": 1000 * (whole - first) / max(new_tokens - 1, 1),
                  "whole_s_rounds": [round(t, 4) for t in times[name]["whole"]]}
        if reference is not None and name != "transformers":
            record["same_tokens"] = float(np.mean(tokens[name] == reference))
        print(json.dumps(record), flush=True)
        records.append(record)
    return records


def recompiles(decode: Callable[[np.ndarray, int], np.ndarray], prompt_len: int, new_tokens: int, vocab: int) -> dict:
    """New compilations when prompts of several lengths in the bucket of `prompt_len` are decoded."""
    lengths = sorted({max(1, prompt_bucket(prompt_len) // 2 + 1), prompt_len - 5, prompt_len - 1, prompt_len})
    decode(prompts_of(1, prompt_len, vocab), new_tokens)
    before = _decode._cache_size()
    for length in lengths:
        decode(prompts_of(1, length, vocab, seed=length), new_tokens)
    record = {"recompiles": _decode._cache_size() - before, "prompt_lengths": lengths,
              "bucket": prompt_bucket(prompt_len)}
    print(json.dumps(record), flush=True)
    return record


def summarize(records: list[dict], recompiled: dict, devices: str) -> dict:
    by = {(r["contestant"], r["batch"]): r for r in records}
    summary: dict = {"summary": True, "devices": devices, "recompiles": recompiled["recompiles"]}
    for (name, batch), record in sorted(by.items()):
        if name != "jaxgen":
            continue
        summary[f"jaxgen_tokens_per_s_b{batch}"] = record["tokens_per_s"]
        summary[f"jaxgen_ttft_ms_b{batch}"] = record["ttft_ms"]
        summary[f"jaxgen_per_token_ms_b{batch}"] = record["per_token_ms"]
        if "same_tokens" in record:
            summary[f"same_tokens_b{batch}"] = record["same_tokens"]
        if ("transformers", batch) in by:
            theirs = by[("transformers", batch)]
            summary[f"vs_transformers_b{batch}"] = record["tokens_per_s"] / theirs["tokens_per_s"]
            summary[f"transformers_ttft_ms_b{batch}"] = theirs["ttft_ms"]
            summary[f"transformers_per_token_ms_b{batch}"] = theirs["per_token_ms"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="a trained LM run (default: the embedded default, --train-steps steps)")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="time jaxgen alone")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        run_dir = pathlib.Path(args.run_dir) if args.run_dir else tmp / "run"
        if not args.run_dir:
            # The default's context (128, its training sequence length) widened to hold prompt and new tokens.
            train_default(run_dir, max(128, prompt_bucket(args.prompt_len) + args.new_tokens), args.train_steps)
        decode, vocab = jaxgen_decoder(run_dir)
        decoders = {"jaxgen": decode}
        if not args.no_torch:
            export_run(run_dir, tmp / "hf", "hf")
            decoders["transformers"] = transformers_decoder(tmp / "hf")
        devices = f"{jax.device_count()} x {jax.devices()[0].platform}"
        records = []
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            records += measure(decoders, batch, args.prompt_len, args.new_tokens, vocab, args.rounds)
        recompiled = recompiles(decode, args.prompt_len, args.new_tokens, vocab)
        print(json.dumps({**summarize(records, recompiled, devices), "allocator": loaded_allocator()}), flush=True)


if __name__ == "__main__":
    main()
