"""Text from a run's checkpoint: the prompts tokenised as in training, the context checked, pieces streamed."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

from jaxgen.data.tokenizer import BOS_ID, EOS_ID, Tokenizer
from jaxgen.errors import ConfigError
from jaxgen.generate import Sampling, generate
from jaxgen.runs import open_run

__all__ = ["Sampling", "sample_text"]


def sample_text(run_dir: str | pathlib.Path, prompts: list[str], max_new_tokens: int, sampling: Sampling,
                seed: int = 0, step: int | None = None, overrides: list[str] = (),
                on_text: Callable[[str], None] | None = None) -> list[tuple[str, str]]:
    """(prompt, prompt + continuation) for each prompt; `on_text` receives one prompt's text piece by piece."""
    run = open_run(run_dir, step, overrides)
    tokenizer = Tokenizer(pathlib.Path(run_dir) / "tokenizer.model")
    ids = [[BOS_ID, *tokenizer.encode([p])[0]] for p in prompts]
    room = run.cfg.model.max_seq_len - max(len(i) for i in ids)
    if room < 1:
        raise ConfigError(f"the longest prompt ({max(len(i) for i in ids)} tokens with BOS) fills the model's "
                          f"context (model.max_seq_len={run.cfg.model.max_seq_len}); shorten it")
    streamed: list[int] = []

    def stream(i, tokens_B, done_B) -> None:
        # Decoding the whole text each time keeps pieces that only make sense together (spaces, bytes) right.
        if not bool(done_B[0]) and int(tokens_B[0]) != EOS_ID:
            before = tokenizer.decode(ids[0][1:] + streamed)
            streamed.append(int(tokens_B[0]))
            on_text(tokenizer.decode(ids[0][1:] + streamed)[len(before):])

    if on_text is not None:
        on_text(prompts[0])
    outputs = generate(run.training.layout.graphdef, run.params, ids, min(max_new_tokens, room), sampling, seed,
                       on_token=stream if on_text is not None else None)
    return [(tokenizer.decode(p[1:]), tokenizer.decode(p[1:] + new)) for p, new in zip(ids, outputs)]
