"""Benchmark evaluation of language models: zero-shot multiple-choice and cloze tasks.

`task_files` reads the public datasets' files, `tasks` turns their records into
scoring requests by each task's protocol, `loglikelihood` scores requests in
batches on the sharded model, `metrics` turns scores into figures, `benchmark`
ties them to a run directory (and the training loop), `plots` draws figures
against step, and `harness` is the lm-evaluation-harness backend.
"""
