"""lm-evaluation-harness backend: `lm_eval --model jaxgen --model_args run_dir=R --tasks ...`.

The harness (0.4.x) finds a model only in its own table or among classes
registered in the running process; it has no plugin entry points. So the
command is run through this module, which registers `jaxgen` first and then
hands the command line to the harness unchanged:

    python -m jaxgen.evals.harness --model jaxgen --model_args run_dir=runs/try --tasks hellaswag

(`jaxgen-lm-eval` is the same, installed as a script). From Python, importing
this module is enough: `lm_eval.simple_evaluate(model="jaxgen", ...)`.

Log-likelihoods come from jaxgen's own batched scorer on the run's sharded
parameters (the EMA where the run keeps one), so they equal `jaxgen eval --tasks`.
`--model_args`: run_dir (required), step (default: the newest), max_gen_toks (default 256);
the harness's `--batch_size N` sets the rows scored at once.
"""

from __future__ import annotations

import json
import sys

from jaxgen.errors import ConfigError

NOT_INSTALLED = 'lm-evaluation-harness is not installed; pip install -e ".[eval]"'
try:
    # The harness fills its registry with its own models only while it is empty: they go in first.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    if __name__ == "__main__":
        sys.exit(f"jaxgen: error: {NOT_INSTALLED}")
    raise ConfigError(NOT_INSTALLED) from None

from jaxgen.evals.benchmark import make_scorer, require_language_model, run_tokenizer
from jaxgen.evals.loglikelihood import TokenRequest, encode_requests
from jaxgen.outputs.runs import open_run
from jaxgen.tasks.decode import Sampling, Vocabulary, generate
from jaxgen.tasks.layout import MAIN_GROUP


def rolling_requests(tokens: list[int], prefix: int, window: int) -> list[TokenRequest]:
    """Disjoint windows of `window` tokens covering `tokens` once, each after as much context as fits.

    The scorer keeps the last window + 1 tokens of a request, so every window but the
    first is predicted from the `window` tokens before its end: the harness's rolling windows.
    """
    return [TokenRequest([prefix, *tokens[:start]], tokens[start:start + window])
            for start in range(0, len(tokens), window)]


def cut_at_stops(text: str, stops: list[str]) -> str:
    """`text` up to the first of `stops` it contains."""
    cut = min([text.find(s) for s in stops if s and s in text], default=len(text))
    return text[:cut]


# What `--model_args` may set (the harness passes batch_size and the rest itself).
MODEL_ARGS = ("run_dir", "step", "max_gen_toks")


@register_model("jaxgen")
class JaxgenLM(LM):
    def __init__(self, run_dir: str, step: int | None = None, batch_size: int | str | None = 32,
                 max_gen_toks: int = 256, max_batch_size: int | None = None, device: str | None = None):
        super().__init__()
        del max_batch_size, device  # the harness passes these to every model; jaxgen uses the devices JAX finds
        self.run = open_run(run_dir, step)
        require_language_model(self.run.cfg)
        self.tokenizer = run_tokenizer(self.run.run_dir)
        rows = int(batch_size) if str(batch_size or "").isdigit() else 32  # "auto": the default
        layout = self.run.layout
        self.scorer = make_scorer(self.run.cfg, self.run.mesh, layout.graphdefs[MAIN_GROUP],
                                  layout.shardings[MAIN_GROUP], rows)
        self.window, self.max_gen_toks = self.run.cfg.model.max_seq_len, int(max_gen_toks)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> JaxgenLM:
        from lm_eval import utils

        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> JaxgenLM:
        """The model of `--model_args`, whose keys are checked first: an unknown one was a TypeError traceback."""
        unknown = sorted(set(arg_dict) - set(MODEL_ARGS))
        if unknown or "run_dir" not in arg_dict:
            given = ",".join(f"{k}={v}" for k, v in arg_dict.items())
            problem = (f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not among its keys"
                       if unknown else "run_dir is missing")
            raise ConfigError(f"--model_args {given!r} for the jaxgen model: {problem}; give "
                              f"{', '.join(MODEL_ARGS)} (run_dir required), e.g. run_dir=runs/lm,step=500")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**arg_dict, **extra)

    @property
    def params(self):
        return self.run.weights.params[MAIN_GROUP]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        token_requests = encode_requests(self.tokenizer, [r.args for r in requests])
        scores = self.scorer.score(self.params, token_requests, None if disable_tqdm else "loglikelihood")
        return [(s.loglikelihood, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        windows = [rolling_requests(tokens, self.tokenizer.bos_id, self.window)
                   for tokens in self.tokenizer.encode(texts)]
        scores = self.scorer.score(self.params, [w for document in windows for w in document],
                                   None if disable_tqdm else "loglikelihood_rolling")
        totals, start = [], 0
        for document in windows:
            totals.append(sum(s.loglikelihood for s in scores[start:start + len(document)]))
            start += len(document)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample and a temperature) continuations, cut at the first stop string."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):  # requests with the same settings decode together
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        texts: dict[int, str] = {}
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.scorer.batch_size):
                chunk = indices[start:start + self.scorer.batch_size]
                texts.update(zip(chunk, self._generate([requests[i].args[0] for i in chunk], settings)))
        return [texts[i] for i in range(len(requests))]

    def _generate(self, contexts: list[str], settings: dict) -> list[str]:
        stops = settings.get("until") or [self.tokenizer.decode([self.tokenizer.eos_id])]
        stops = [stops] if isinstance(stops, str) else list(stops)
        max_new = int(settings.get("max_gen_toks", self.max_gen_toks))
        temperature = float(settings.get("temperature", 0.0)) if settings.get("do_sample") else 0.0
        # A prompt loses tokens from the left, its start token first, as the harness's HF model does.
        keep = max(self.window - max_new, 1)
        prompts = [[self.tokenizer.bos_id, *ids][-keep:] for ids in self.tokenizer.encode(contexts)]
        max_new = max(min(max_new, self.window - max(len(p) for p in prompts)), 1)
        vocabulary = Vocabulary(self.tokenizer.eos_id, self.tokenizer.vocab_size)
        new = generate(self.run.weights.graphdefs[MAIN_GROUP], self.params, prompts, max_new, vocabulary,
                       Sampling(temperature=temperature), int(settings.get("seed", 0)))
        # The continuation decoded alone, as the harness's HF model decodes it: a sentencepiece
        # tokenizer then drops its leading space, which the harness's answer filters expect.
        return [cut_at_stops(self.tokenizer.decode(tokens), stops) for tokens in new]


def main() -> int | None:
    """The harness's own command line, with the `jaxgen` model registered."""
    from lm_eval.__main__ import cli_evaluate

    from jaxgen.errors import JaxgenError, describe

    try:
        cli_evaluate()
    except JaxgenError as err:  # a jaxgen mistake (no run, no tokenizer) is one line, as in `jaxgen`
        line, status = describe(err)
        print(f"jaxgen: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
